"""Dropout on the expanded product: seeded, regenerated in backward, mean-preserving."""

import math

import pytest
import torch

import fbp_kernels
from fbp_kernels import backends, reference
from helpers import Case, assert_close, detached64, error_vs, grads, make_inputs

RATE = 0.3
CASE = Case((5, 2), (5, 1), 7, 6, 3, 5)


def _run(tensors, backend, seed, **kw):
    torch.manual_seed(seed)  # fbp draws its dropout seed from the CPU generator
    return fbp_kernels.fbp(*tensors, factor=CASE.factor, dropout=RATE, training=True,
                           backend=backend, **kw)


def _drawn_seed(seed):
    torch.manual_seed(seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def test_same_seed_same_output_different_seed_different_output(backend, device):
    tensors = make_inputs(CASE, torch.float64, device, requires_grad=False)
    a, b, c = _run(tensors, backend, 1), _run(tensors, backend, 1), _run(tensors, backend, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eval_mode_is_deterministic_and_dropout_free(backend, device):
    tensors = make_inputs(CASE, torch.float64, device, requires_grad=False)
    out = fbp_kernels.fbp(*tensors, factor=CASE.factor, dropout=RATE, training=False,
                          backend=backend)
    assert_close(out, reference.fbp(*tensors, factor=CASE.factor), atol=1e-10, rtol=1e-8,
                 name="eval")


@pytest.mark.parametrize("normalize", [True, False])
def test_forward_and_backward_use_the_mask_of_the_seed(normalize, backend, device):
    """The output and every gradient equal the reference fed the backend's own mask:
    so backward regenerated exactly the forward's mask."""
    tensors = make_inputs(CASE, torch.float64, device)
    out = _run(tensors, backend, 7, normalize=normalize)
    impl = backends.resolve(backend, torch.device(device))
    ko = CASE.factor * CASE.o
    mask = impl.dropout_mask(_drawn_seed(7), (*out.shape[:-1], ko), RATE, torch.device(device))
    assert mask.dtype == torch.bool and mask.shape == (*out.shape[:-1], ko)
    g = torch.randn_like(out)
    ref_inputs = detached64(tensors)
    ref = reference.fbp(*ref_inputs, factor=CASE.factor, dropout=RATE, dropout_mask=mask,
                        normalize=normalize)
    assert_close(out, ref, atol=1e-10, rtol=1e-8, name="out")
    for name, a, e in zip(["dx", "dy", "dwx", "dwy", "dbx", "dby"], grads(out, tensors, g),
                          grads(ref, ref_inputs, g)):
        assert_close(a, e, atol=1e-10, rtol=1e-8, name=name)


def test_keep_rate_and_scaling_preserve_the_mean(backend, device):
    """About (1 - rate) of the elements are kept (within 5 standard deviations), and
    kept elements are scaled by 1/(1 - rate), so E[dropout(p)] = p."""
    impl = backends.resolve(backend, torch.device(device))
    shape = (64, 96)
    mask = impl.dropout_mask(99, shape, RATE, torch.device(device))
    n = mask.numel()
    kept = mask.float().mean().item()
    sigma = math.sqrt(RATE * (1 - RATE) / n)
    assert abs(kept - (1 - RATE)) < 5 * sigma, kept
    # Columns are not all-kept or all-dropped: the mask depends on the column index.
    assert 0 < mask[:, 0].float().mean() < 1 and 0 < mask[0].float().mean() < 1
    # Raw pooled output averaged over many seeds approaches the dropout-free one.
    case = Case((4,), (4,), 5, 4, 2, 3, bias=False)
    tensors = make_inputs(case, torch.float64, device, requires_grad=False)
    exact = reference.fbp(*tensors, factor=case.factor, normalize=False)
    runs = torch.stack([fbp_kernels.fbp(*tensors, factor=case.factor, dropout=RATE,
                                        training=True, normalize=False, backend=backend)
                        for _ in range(200)])
    assert (runs.mean(0) - exact).abs().max() < 0.25 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_half_precision_dropout_backward_uses_the_fp32_scale(dtype, normalize, backend, device):
    """Half inputs with dropout, forward and every gradient against the fp64 reference fed
    the backend's own mask: within twice eager's error in that dtype plus a few ulp.
    Without normalisation the wide backward's pooled cotangent is the half-precision
    grad itself; an earlier conversion of the 1/(1-p) scale to its dtype failed to build
    in the interpreter in bf16 (caught here).  The bias it gave on a GPU (-0.16%) is
    below any bound against eager's error: the compile fact in test_kernel_scalars.py
    checks that the scale is converted to fp32 instead."""
    rate = 0.1
    case = Case((6, 2), (6, 2), 16, 12, 3, 8)
    tensors = make_inputs(case, dtype, device)
    torch.manual_seed(3)
    out = fbp_kernels.fbp(*tensors, factor=case.factor, dropout=rate, training=True,
                          normalize=normalize, backend=backend)
    impl = backends.resolve(backend, torch.device(device))
    mask = impl.dropout_mask(_drawn_seed(3), (*out.shape[:-1], case.factor * case.o), rate,
                             torch.device(device))
    g = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    exact_in = detached64(tensors)
    exact = reference.fbp(*exact_in, factor=case.factor, dropout=rate, dropout_mask=mask,
                          normalize=normalize)
    eager = reference.fbp(*tensors, factor=case.factor, dropout=rate, dropout_mask=mask,
                          normalize=normalize)
    floor = {torch.float16: 4e-3, torch.bfloat16: 3.2e-2}[dtype]
    got = [out] + grads(out, tensors, g.to(dtype))
    ref = [eager] + grads(eager, tensors, g.to(dtype))
    ex = [exact] + grads(exact, exact_in, g)
    for name, a, e, x in zip(("out", "dx", "dy", "dwx", "dwy", "dbx", "dby"), got, ref, ex):
        assert error_vs(a, x) <= 2 * error_vs(e, x) + floor, name


def test_mask_kernel_refuses_more_column_tiles_than_cuda_allows():
    """The mask kernel puts column tiles on the grid's second dimension (CUDA: at most
    65535): past it a clear ValueError before any launch, not 'invalid argument' (the
    interpreter has no such limit, so the rule is checked here)."""
    from fbp_kernels.backends import triton_kernels as K

    bc = 16 if K.INTERPRET else K.MASK_BLOCKS[1]
    with pytest.raises(ValueError, match="65535"):
        K.dropout_keep_mask(1, 1, bc * K.MAX_GRID_Y + 1, 0.5, torch.device("cpu"))
