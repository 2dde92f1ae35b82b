"""MFH (cascaded FBP blocks): every MFH backend against ``reference.mfh``.

Tolerances, per dtype, against a float64 reference on the same inputs:
- float64: same math in a different order, only rounding differs: atol 1e-10,
  rtol 1e-8 (as for FBP).
- float32: an order-P block multiplies 2P projections before the sum-pool, the
  signed sqrt and the L2 norm, and a pooled value near zero is ill-conditioned:
  the derivative 0.5/sqrt(|s|+eps) of the signed sqrt reaches 500 and amplifies the
  rounding of s.  Measured here, the eager fp32 reference itself is off by up to
  7e-4 of a tensor's largest magnitude (order 2, 19 rows, factor 2), so a fixed
  tolerance would either hide bugs elsewhere or flake.  Instead, like FBP's
  half-precision test: the backend's scale-free error against float64 must be at
  most twice the eager fp32 reference's, plus 1e-5 (~100 float32 ulps).
"""

import pytest
import torch

import fbp_kernels
from fbp_kernels import backends, mfh_ops, reference
from fbp_kernels.backends import torch_mfh
from fbp_kernels.mfh import check_mfh_inputs
from helpers import Case, assert_close, error_vs, grads
from conftest import DEVICE, backend_param


@pytest.fixture(params=[backend_param(n, mfh_ops.unsupported_reason)
                        for n in mfh_ops._MFH_MODULES])
def mfh_backend(request):
    """Every backend with an MFH implementation; unusable ones skip with the reason."""
    return request.param


# Small on purpose (a Triton MFH would run them through the CPU interpreter).
CASES = [
    Case((4,), (4,), 8, 6, 1, 3),            # factor 1
    Case((5,), (5,), 7, 9, 5, 4),            # MFB default factor, odd widths
    Case((2, 3), (2, 1), 6, 5, 3, 5),        # VQA broadcast: regions x one question
    Case((), (), 5, 4, 2, 3),                # 1-D inputs
    Case((0,), (0,), 5, 4, 2, 3),            # empty batch
    Case((2, 1, 3), (1, 4, 1), 5, 3, 4, 3),  # both inputs broadcast
    Case((3,), (1,), 13, 7, 3, 5, bias=False),  # no bias, y broadcast over rows
    Case((19,), (19,), 10, 12, 2, 7),        # rows and o not multiples of tiles
]
ORDERS = [1, 2, 3, 4]
TOL64 = (1e-10, 1e-8)


class Inputs:
    """``x, y`` and per-block parameter lists, flattenable for autograd."""

    def __init__(self, x, y, wx, wy, bx, by):
        self.x, self.y, self.wx, self.wy, self.bx, self.by = x, y, wx, wy, bx, by

    def args(self):
        return self.x, self.y, self.wx, self.wy, self.bx, self.by

    def flat(self):
        """All tensors, ``None`` for absent biases, in a fixed order with names."""
        P = len(self.wx)
        names = ["x", "y"] + [f"{n}[{l}]" for n in ("weights_x", "weights_y", "biases_x",
                                                    "biases_y") for l in range(P)]
        return names, [self.x, self.y, *self.wx, *self.wy, *self.bx, *self.by]

    def map(self, fn):
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return Inputs(f(self.x), f(self.y), [f(t) for t in self.wx], [f(t) for t in self.wy],
                      [f(t) for t in self.bx], [f(t) for t in self.by])

    def detached64(self):
        return self.map(lambda t: t.detach().double().requires_grad_(t.requires_grad))


def make_mfh_inputs(case: Case, order: int, dtype=torch.float32, device=DEVICE,
                    requires_grad=True, bias_pattern=None) -> Inputs:
    """Random inputs, weights scaled like nn.Linear's init so every product is O(1).

    ``bias_pattern``: per block, whether it has biases (default: ``case.bias``).
    """
    ko = case.factor * case.o

    def rand(*shape, std=1.0):
        t = (torch.randn(*shape, dtype=torch.float64, device=device) * std).to(dtype)
        return t.requires_grad_(requires_grad)

    pattern = bias_pattern or [case.bias] * order
    return Inputs(rand(*case.batch_x, case.m), rand(*case.batch_y, case.n),
                  [rand(ko, case.m, std=case.m ** -0.5) for _ in range(order)],
                  [rand(ko, case.n, std=case.n ** -0.5) for _ in range(order)],
                  [rand(ko, std=0.1) if b else None for b in pattern],
                  [rand(ko, std=0.1) if b else None for b in pattern])


def run(fn, inp: Inputs, g=None, **kw):
    """``[out, *grads]`` of ``<fn(...), g>`` (g random when not given), and g."""
    out = fn(*inp.args(), **kw)
    if g is None:
        g = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    names, flat = inp.flat()
    return [out] + grads(out, flat, g.to(out.dtype)), ["out"] + names, g


def assert_all_close(got, exact, names, *, atol, rtol):
    for name, a, e in zip(names, got, exact):
        if e is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert a is not None, f"{name}: missing gradient"
        assert_close(a, e, atol=atol, rtol=rtol, name=name)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(case, order, dtype, mfh_backend):
    inp = make_mfh_inputs(case, order, dtype)
    got, names, g = run(fbp_kernels.mfh, inp, factor=case.factor, backend=mfh_backend)
    assert got[0].shape == (*torch.broadcast_shapes(case.batch_x, case.batch_y),
                            order * case.o)
    assert all(t is None or t.dtype == dtype for t in got)
    exact, _, _ = run(reference.mfh, inp.detached64(), g, factor=case.factor)
    if dtype == torch.float64:
        assert_all_close(got, exact, names, atol=TOL64[0], rtol=TOL64[1])
    else:
        eager, _, _ = run(reference.mfh, inp, g, factor=case.factor)
        for name, a, lo, e in zip(names, got, eager, exact):
            assert (a is None) == (e is None), name
            if e is not None:
                err, ref_err = error_vs(a, e), error_vs(lo, e)
                assert err <= 2 * ref_err + 1e-5, \
                    f"{name}: error {err:.3g} vs eager float32 {ref_err:.3g}"


@pytest.mark.parametrize("order", [2, 3])
def test_without_normalisation(order, mfh_backend):
    case = Case((2, 3), (2, 1), 6, 5, 3, 4)
    inp = make_mfh_inputs(case, order, torch.float64)
    got, names, g = run(fbp_kernels.mfh, inp, factor=3, normalize=False, backend=mfh_backend)
    exact, _, _ = run(reference.mfh, inp.detached64(), g, factor=3, normalize=False)
    assert_all_close(got, exact, names, atol=TOL64[0], rtol=TOL64[1])


def test_mixed_biases_per_block(mfh_backend):
    """Some blocks with biases, some without: exactly the present ones get gradients."""
    case = Case((5,), (5,), 6, 4, 2, 3)
    inp = make_mfh_inputs(case, 3, torch.float64, bias_pattern=[False, True, False])
    inp.by[1] = None  # and x/y asymmetric within a block
    got, names, g = run(fbp_kernels.mfh, inp, factor=2, backend=mfh_backend)
    exact, _, _ = run(reference.mfh, inp.detached64(), g, factor=2)
    assert_all_close(got, exact, names, atol=TOL64[0], rtol=TOL64[1])
    assert sum(t is not None for t in got[-6:]) == 1


@pytest.mark.parametrize("eps", [1e-3, 1e-8])
def test_eps_is_honoured(eps, mfh_backend):
    case = Case((4,), (4,), 6, 5, 3, 4)
    inp = make_mfh_inputs(case, 2, torch.float64)
    got, names, g = run(fbp_kernels.mfh, inp, factor=3, eps=eps, backend=mfh_backend)
    exact, _, _ = run(reference.mfh, inp.detached64(), g, factor=3, eps=eps)
    assert_all_close(got, exact, names, atol=TOL64[0], rtol=TOL64[1])
    other = fbp_kernels.mfh(*inp.args(), factor=3, backend=mfh_backend)
    assert not torch.allclose(got[0], other), "eps had no effect"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(dtype, mfh_backend):
    """Error against float64 at most twice the eager reference's in the same dtype,
    plus a few units in the last place (what a user swapping layers would see)."""
    floor = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    case = Case((6,), (6,), 12, 8, 3, 5)
    inp = make_mfh_inputs(case, 2, dtype)
    got, names, g = run(fbp_kernels.mfh, inp, factor=3, backend=mfh_backend)
    lowp, _, _ = run(reference.mfh, inp, g, factor=3)
    exact, _, _ = run(reference.mfh, inp.detached64(), g, factor=3)
    for name, a, lo, e in zip(names, got, lowp, exact):
        assert a.dtype == dtype and a.shape == e.shape, name
        err, ref_err = error_vs(a, e), error_vs(lo, e)
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} vs eager {ref_err:.3g}"


def test_gradcheck_float64(mfh_backend):
    """The backward is the true derivative of the forward (finite differences),
    including through dropout: the seed is fixed per call so every evaluation draws
    the same masks."""
    case = Case((2, 2), (2, 1), 4, 3, 2, 3)
    inp = make_mfh_inputs(case, 3, torch.float64, bias_pattern=[True, False, True])
    names, flat = inp.flat()
    live = [t for t in flat if t is not None]
    P = 3

    def fn(*ts):
        it = iter(ts)
        x, y = next(it), next(it)
        wx = [next(it) for _ in range(P)]
        wy = [next(it) for _ in range(P)]
        bx = [next(it) if b is not None else None for b in inp.bx]
        by = [next(it) if b is not None else None for b in inp.by]
        torch.manual_seed(1234)
        return fbp_kernels.mfh(x, y, wx, wy, bx, by, factor=2, dropout=0.25, training=True,
                               backend=mfh_backend)

    # The interpreter takes ~0.2-0.4 s per launch here, so the Triton kernels get
    # gradcheck's fast mode (random directional derivatives: a few dozen launches
    # instead of one per input element); the torch backend gets the full Jacobian.
    fast = mfh_backend != "torch"
    assert torch.autograd.gradcheck(fn, live, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]], ids=str)
def test_order_one_equals_fbp(case, dropout, mfh_backend):
    """Order 1 is FBP.  The torch backends run the same operations in the same order,
    so they agree bitwise.  The Triton MFH finishes the row norm in PyTorch where the
    FBP kernel finishes it in-kernel, so they agree to an ulp or two (fp32); both draw
    block 0's dropout mask from the same seed (a different mask would show as an O(1)
    difference)."""
    inp = make_mfh_inputs(case, 1, torch.float32)
    kw = dict(factor=case.factor, dropout=dropout, training=True, backend=mfh_backend)
    torch.manual_seed(7)
    got, names, g = run(fbp_kernels.mfh, inp, **kw)
    torch.manual_seed(7)
    out = fbp_kernels.fbp(inp.x, inp.y, inp.wx[0], inp.wy[0], inp.bx[0], inp.by[0], **kw)
    _, flat = inp.flat()
    want = [out] + grads(out, flat, g.to(out.dtype))
    for name, a, e in zip(names, got, want):
        assert (a is None) == (e is None), name
        if a is None:
            continue
        if mfh_backend == "torch":
            assert torch.equal(a, e), f"{name}: order-1 MFH differs from FBP " \
                                      f"by {(a - e).abs().max().item():.3g}"
        else:
            assert_close(a, e, atol=1e-6 * max(e.abs().max().item(), 1.0), rtol=1e-5,
                         name=name)


def test_block_zero_mask_is_fbps_mask(mfh_backend):
    impl = mfh_ops.resolve(mfh_backend, DEVICE)
    fbp_impl = backends.resolve(mfh_backend, DEVICE)
    shape = (5, 3, 20)
    mfh_masks = impl.block_masks(2**40 + 3, shape, 0.3, 2, DEVICE)
    assert torch.equal(mfh_masks[0], fbp_impl.dropout_mask(2**40 + 3, shape, 0.3, DEVICE))
    assert not torch.equal(mfh_masks[1], mfh_masks[0])


def _regenerated_masks(seed_state, shape, rate, order, backend):
    """The masks an MFH call made after ``torch.manual_seed(seed_state)`` must use:
    the op seed is the first draw of the CPU generator, then the backend's
    ``block_masks`` (``block_seed`` per block, the backend's own generator)."""
    torch.manual_seed(seed_state)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return mfh_ops.resolve(backend, DEVICE).block_masks(seed, shape, rate, order, DEVICE)


@pytest.mark.parametrize("order", [2, 3])
def test_dropout_masks_match_reference(order, mfh_backend):
    """Forward equals the reference fed the regenerated per-block masks, and so do all
    gradients (backward regenerates the same masks from the seed)."""
    case = Case((2, 3), (2, 1), 6, 5, 3, 8)
    rate = 0.4
    inp = make_mfh_inputs(case, order, torch.float64)
    torch.manual_seed(99)
    got, names, g = run(fbp_kernels.mfh, inp, factor=3, dropout=rate, training=True,
                        backend=mfh_backend)
    masks = _regenerated_masks(99, (2, 3, case.factor * case.o), rate, order, mfh_backend)
    exact, _, _ = run(reference.mfh, inp.detached64(), g, factor=3, dropout=rate,
                      dropout_masks=masks)
    assert_all_close(got, exact, names, atol=TOL64[0], rtol=TOL64[1])
    # The test can fail: without masks (or with the masks of another seed) it differs.
    no_drop = fbp_kernels.mfh(*inp.args(), factor=3, backend=mfh_backend)
    assert not torch.allclose(got[0], no_drop)
    other = _regenerated_masks(100, masks[0].shape, rate, order, mfh_backend)
    assert not torch.allclose(reference.mfh(*inp.detached64().args(), factor=3, dropout=rate,
                                            dropout_masks=other), exact[0])


@pytest.mark.parametrize("batch_x,batch_y", [((2, 3), (2, 1)), ((2, 1), (2, 3)),
                                             ((3, 4), (1,)), ((2, 1, 3), (1, 4, 1))],
                         ids=["coatt", "coatt-mirror", "one-group", "materialised"])
def test_broadcast_layouts_with_every_option(batch_x, batch_y, mfh_backend):
    """Each operand layout the Triton blocks take (co-attention's shared side, one row
    per group, either way round; a materialised broadcast), order 3 with dropout, tanh
    and joint normalisation, forward and every gradient against the reference fed the
    backend's masks."""
    case = Case(batch_x, batch_y, 6, 5, 3, 4)
    rate, order = 0.3, 3
    inp = make_mfh_inputs(case, order, torch.float64)
    kw = dict(factor=3, activation="tanh", norm_dims=2)
    torch.manual_seed(7)
    got, names, g = run(fbp_kernels.mfh, inp, dropout=rate, training=True,
                        backend=mfh_backend, **kw)
    batch = torch.broadcast_shapes(batch_x, batch_y)
    masks = _regenerated_masks(7, (*batch, case.factor * case.o), rate, order, mfh_backend)
    exact, _, _ = run(reference.mfh, inp.detached64(), g, dropout=rate, dropout_masks=masks,
                      **kw)
    assert_all_close(got, exact, names, atol=TOL64[0], rtol=TOL64[1])


def test_block_masks_are_distinct_and_have_the_rate():
    masks = torch_mfh.block_masks(12345, (64, 100), 0.3, 4, DEVICE)
    assert torch_mfh.block_seed(12345, 0) == 12345  # block 0 draws FBP's mask
    assert len({torch_mfh.block_seed(12345, l) for l in range(4)}) == 4
    for l in range(4):
        assert 0.25 < 1 - masks[l].float().mean().item() < 0.35
        for j in range(l):
            assert not torch.equal(masks[l], masks[j]), f"blocks {j} and {l} share a mask"
    assert all(0 <= torch_mfh.block_seed(2**62 - 1, l) < 2**62 for l in range(8))


def test_dropout_is_off_in_eval_and_reproducible_in_training(mfh_backend):
    case = Case((4,), (4,), 6, 5, 3, 4)
    inp = make_mfh_inputs(case, 2, torch.float64, requires_grad=False)
    kw = dict(factor=3, dropout=0.5, backend=mfh_backend)
    base = fbp_kernels.mfh(*inp.args(), factor=3, backend=mfh_backend)
    assert torch.equal(fbp_kernels.mfh(*inp.args(), training=False, **kw), base)
    torch.manual_seed(3)
    a = fbp_kernels.mfh(*inp.args(), training=True, **kw)
    torch.manual_seed(3)
    b = fbp_kernels.mfh(*inp.args(), training=True, **kw)
    c = fbp_kernels.mfh(*inp.args(), training=True, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, base)


def test_rows_of_zeros_give_finite_gradients(mfh_backend):
    """A zero row in block 0 zeroes every later block's product too (the cascade):
    outputs are zero there and all gradients stay finite."""
    case = Case((4,), (4,), 6, 5, 3, 4, bias=False)
    inp = make_mfh_inputs(case, 3, torch.float64, requires_grad=False)
    inp.x[1] = 0.0
    inp = inp.map(lambda t: t.requires_grad_(True))
    got, names, g = run(fbp_kernels.mfh, inp, factor=3, backend=mfh_backend)
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))
    for name, t in zip(names, got):
        assert t is None or torch.isfinite(t).all(), name
    exact, _, _ = run(reference.mfh, inp.detached64(), g, factor=3)
    assert_all_close(got, exact, names, atol=TOL64[0], rtol=TOL64[1])


def test_empty_batch_gives_empty_output_and_zero_weight_gradients(mfh_backend):
    case = Case((0, 3), (1, 3), 5, 4, 2, 3)
    inp = make_mfh_inputs(case, 2, torch.float32)
    got, names, _ = run(fbp_kernels.mfh, inp, factor=2, backend=mfh_backend)
    assert got[0].shape == (0, 3, 6)
    assert got[1].shape == (0, 3, 5) and got[2].shape == (1, 3, 4)
    for name, t in zip(names[3:], got[3:]):
        assert torch.equal(t, torch.zeros_like(t)), name


def _saved_tensors(fn):
    """Every tensor autograd saves while ``fn`` runs (via saved-tensor hooks)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def test_saves_nothing_of_width_factor_times_o(mfh_backend):
    """Only inputs, parameters, the output and the (rows, order) norms are saved;
    the reference (autograd) saves (rows, factor*o) tensors, so the check can fail."""
    case = Case((6, 2), (6, 1), 5, 7, 3, 4)  # factor*o = 12, distinct from every width
    order = 3
    inp = make_mfh_inputs(case, order, torch.float32)
    _, flat = inp.flat()
    params = {t.data_ptr() for t in flat if t is not None}
    out, saved = _saved_tensors(lambda: fbp_kernels.mfh(*inp.args(), factor=3,
                                                        backend=mfh_backend))
    allowed_shapes = {tuple(out.shape), (6, 2, order), (), (0,)}
    assert saved, "no saved tensors seen: the hooks did not fire"
    for t in saved:
        if t.data_ptr() in params and t.numel() > 0:
            continue
        assert tuple(t.shape) in allowed_shapes, f"saved an activation of shape {tuple(t.shape)}"
    _, ref_saved = _saved_tensors(lambda: reference.mfh(*inp.args(), factor=3))
    assert any(t.shape[-1:] == (12,) and t.dim() == 3 for t in ref_saved)


def test_opcheck(mfh_backend):
    case = Case((3,), (1,), 4, 5, 2, 3)
    inp = make_mfh_inputs(case, 2, torch.float64)
    bx = mfh_ops.to_marker_list(inp.bx, inp.x)
    by = mfh_ops.to_marker_list([None, None], inp.x)  # absent biases as markers
    seed = torch.tensor(42, dtype=torch.int64)
    fwd_args = (inp.x, inp.y, inp.wx, inp.wy, bx, by, seed, 2, 0.2, True, 1e-6, mfh_backend)
    torch.library.opcheck(torch.ops.fbp_kernels.mfh_forward.default, fwd_args)
    out, norms = torch.ops.fbp_kernels.mfh_forward(*fwd_args)
    assert norms.shape == (3, 2) and norms.dtype == torch.float64
    grad = torch.randn_like(out)
    bwd_args = (grad, inp.x.detach(), inp.y.detach(), [w.detach() for w in inp.wx],
                [w.detach() for w in inp.wy], [b.detach() for b in bx], by, out.detach(),
                norms, seed, 2, 0.2, True, 1e-6, mfh_backend)
    torch.library.opcheck(torch.ops.fbp_kernels.mfh_backward.default, bwd_args)


def test_torch_compile_fullgraph_matches_eager(mfh_backend):
    mod = fbp_kernels.MultimodalFactorizedHighOrderPooling(6, 5, 4, factor=3, order=3,
                                                          backend=mfh_backend).double()
    mod = mod.to(DEVICE)
    x = torch.randn(2, 3, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randn(2, 1, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    got = compiled(x, y)
    want = mod(x, y)
    assert_close(got, want, atol=1e-12, rtol=1e-10, name="out")
    g = torch.randn_like(want)
    params = [x, y, *mod.parameters()]
    for a, e in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        assert_close(a, e, atol=1e-12, rtol=1e-10, name="grad")


def test_autocast_casts_like_linear():
    mod = fbp_kernels.MFH(6, 5, 4, factor=2, order=2)
    x, y = torch.randn(3, 6), torch.randn(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x, y)
    assert out.dtype == torch.bfloat16
    assert error_vs(out, mod(x, y)) < 5e-2


def test_noncontiguous_inputs_and_weights(mfh_backend):
    case = Case((5,), (5,), 7, 6, 3, 4)
    inp = make_mfh_inputs(case, 2, torch.float64, requires_grad=False)
    # Same values, strided storage: transposed allocations viewed back.
    strided = inp.map(lambda t: t.t().contiguous().t() if t.dim() == 2 else t)
    strided = strided.map(lambda t: t.requires_grad_(True))
    assert not strided.x.is_contiguous() and not strided.wx[1].is_contiguous()
    got, names, g = run(fbp_kernels.mfh, strided, factor=3, backend=mfh_backend)
    exact, _, _ = run(reference.mfh, strided.detached64(), g, factor=3)
    assert_all_close(got, exact, names, atol=TOL64[0], rtol=TOL64[1])


@pytest.mark.parametrize("backend", [backend_param(n, mfh_ops.unsupported_reason)
                                     for n in mfh_ops._MFH_MODULES])
def test_any_order_runs(backend):
    """Order 5 (past what the literature uses): torch loops over blocks, and so does
    triton (one launch of FBP's kernels per block, no unrolled limit)."""
    inp = make_mfh_inputs(Case((3,), (3,), 4, 5, 2, 3), 5, torch.float64)
    assert mfh_ops.unsupported_reason(backend, DEVICE, 5, 2) is None
    got, names, g = run(fbp_kernels.mfh, inp, factor=2, backend=backend)
    exact, _, _ = run(reference.mfh, inp.detached64(), g, factor=2)
    assert_all_close(got, exact, names, atol=TOL64[0], rtol=TOL64[1])


def test_triton_host_guards_int32_tile_offsets():
    """A strided view whose row stride overflows the int32 in-tile offsets gets a
    compact copy; a K*o that overflows them (the (rows, K*o) running products and
    gradients) is refused with a clear error.  (Tiny tensors and a pretend row tile of 2^27
    rows stand in for huge ones.)"""
    pytest.importorskip("triton", reason="Triton is not installed")
    from fbp_kernels.backends import triton_wide as W

    big = W.WideConfig(block_m=2**27, block_n=32, block_k=16, num_warps=1, num_stages=1)
    wide = torch.randn(3, 40)[:, :8]  # row stride 40: 2^27 * 40 >= 2^31
    y2, wx, wy = torch.randn(3, 8), torch.randn(8, 8), torch.randn(8, 8)
    x2, *_ = W._checked_operands(big, wide, y2, wx, wy, 2)
    assert x2.stride(0) == 8 and torch.equal(x2, wide)
    w16 = torch.randn(16, 4)
    with pytest.raises(ValueError, match="too large for the Triton kernels"):
        W._checked_operands(big, torch.randn(3, 4), torch.randn(3, 4), w16, w16, 2)


# ---------------------------------------------------------------- module


def test_module_matches_functional_and_trains_every_parameter():
    mod = fbp_kernels.MultimodalFactorizedHighOrderPooling(6, 5, 4, factor=3, order=3,
                                                          dropout=0.2)
    assert mod.order == 3 and mod.out_features == 4 and mod.output_features == 12
    assert len(list(mod.parameters())) == 12
    x, y = torch.randn(7, 6), torch.randn(7, 5)
    mod.eval()
    out = mod(x, y)
    want = fbp_kernels.mfh(x, y, [p.weight for p in mod.proj_x], [p.weight for p in mod.proj_y],
                           [p.bias for p in mod.proj_x], [p.bias for p in mod.proj_y], factor=3)
    assert torch.equal(out, want) and out.shape == (7, 12)
    mod.train()
    mod(x, y).square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "order=3" in repr(mod) and "factor=3" in repr(mod)
    assert fbp_kernels.MFH is fbp_kernels.MultimodalFactorizedHighOrderPooling


def test_from_linear_shares_parameters():
    xs = [torch.nn.Linear(6, 8) for _ in range(2)]
    ys = [torch.nn.Linear(5, 8, bias=False) for _ in range(2)]
    mod = fbp_kernels.MFH.from_linear(xs, ys, factor=2)
    assert mod.order == 2 and mod.out_features == 4 and mod.proj_x[1] is xs[1]
    x, y = torch.randn(3, 6), torch.randn(3, 5)
    want = reference.mfh(x, y, [l.weight for l in xs], [l.weight for l in ys],
                         [l.bias for l in xs], None, factor=2)
    assert_close(mod(x, y), want, atol=1e-5, rtol=1e-4, name="out")
    with pytest.raises(ValueError, match="factor must be an int >= 1 dividing"):
        fbp_kernels.MFH.from_linear(xs, ys, factor=3)
    with pytest.raises(ValueError, match="one nn.Linear per block"):
        fbp_kernels.MFH.from_linear(xs, ys[:1], factor=2)
    with pytest.raises(ValueError, match="same out_features"):
        fbp_kernels.MFH.from_linear(xs, [ys[0], torch.nn.Linear(5, 10)], factor=2)
    with pytest.raises(TypeError, match=r"projs_y\[0\] must be an nn.Linear"):
        fbp_kernels.MFH.from_linear(xs, [torch.nn.ReLU(), ys[0]], factor=2)


@pytest.mark.parametrize("kw, match", [
    (dict(order=0), "order must be an int >= 1"),
    (dict(factor=0), "factor must be an int >= 1"),
    (dict(out_features=0), "out_features must be an int >= 1"),
])
def test_module_rejects_bad_options(kw, match):
    args = dict(x_features=4, y_features=3, out_features=2, factor=2, order=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        fbp_kernels.MultimodalFactorizedHighOrderPooling(**args)


# ---------------------------------------------------------------- bad input


def _bad(inp: Inputs, **changes):
    args = dict(x=inp.x, y=inp.y, weights_x=inp.wx, weights_y=inp.wy, biases_x=inp.bx,
                biases_y=inp.by)
    args.update(changes)
    return args


@pytest.mark.parametrize("change, exc, match", [
    (lambda i: dict(weights_x=torch.stack(i.wx)), TypeError, r"pass list\(weights_x\)"),
    (lambda i: dict(weights_x=[], weights_y=[]), ValueError, "at least one block"),
    (lambda i: dict(weights_y=i.wy[:1]), ValueError, "one entry per block, got 2 and 1"),
    (lambda i: dict(biases_x=i.bx[:1]), ValueError, r"biases_x must have one entry .* got 1"),
    (lambda i: dict(biases_y=5), TypeError, "biases_y must be a list"),
    (lambda i: dict(weights_x=[i.wx[0], i.wx[1][:, :3]]), ValueError,
     r"weights_x\[1\] expects 3"),
    (lambda i: dict(weights_x=[i.wx[0], i.wx[1][:4]], weights_y=[i.wy[0], i.wy[1][:4]],
                    biases_x=None, biases_y=None),
     ValueError, r"weights_x\[0\] has 6 rows, weights_x\[1\] has 4"),
    (lambda i: dict(biases_y=[i.by[0], i.by[1].double()]), TypeError,
     r"biases_y\[1\]=torch.float64"),
    (lambda i: dict(biases_x=[i.bx[0], i.bx[1][:5]]), ValueError,
     r"biases_x\[1\] must have shape \(6,\)"),
    (lambda i: dict(y=i.y[:2]), ValueError, "do not broadcast"),
    (lambda i: dict(x=i.x[0, 0]), ValueError, "x must have at least 1 dimension"),
    (lambda i: dict(x=i.x[:, :3]), ValueError, r"x has 3 features .* weights_x\[0\] expects 4"),
])
def test_bad_input_raises_clear_error(change, exc, match):
    inp = make_mfh_inputs(Case((3,), (3,), 4, 5, 2, 3), 2, requires_grad=False)
    with pytest.raises(exc, match=match):
        fbp_kernels.mfh(**_bad(inp, **change(inp)), factor=2)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(order=3), ValueError, "order=3 but 2 blocks"),
    (dict(order=2.0), TypeError, "order must be an int"),
    (dict(factor=4), ValueError, "multiple of factor=4"),
    (dict(dropout=1.0), ValueError, "dropout must be a float in"),
    (dict(eps=0.0), ValueError, "eps must be a finite float > 0"),
    (dict(backend="nope"), ValueError, "backend must be 'auto' or one of"),
])
def test_bad_options_raise_clear_error(kw, exc, match):
    inp = make_mfh_inputs(Case((3,), (3,), 4, 5, 2, 3), 2, requires_grad=False)
    args = dict(factor=2)
    args.update(kw)
    with pytest.raises(exc, match=match):
        fbp_kernels.mfh(*inp.args(), **args)


def test_backend_without_mfh_or_device_is_refused():
    inp = make_mfh_inputs(Case((3,), (3,), 4, 5, 2, 3), 2, requires_grad=False)
    for name in backends.NAMES:
        if mfh_ops.unsupported_reason(name, DEVICE) is None:
            continue
        with pytest.raises(backends.BackendUnavailableError, match=repr(name)):
            fbp_kernels.mfh(*inp.args(), factor=2, backend=name)


def test_check_returns_lists_of_order_length():
    inp = make_mfh_inputs(Case((3,), (3,), 4, 5, 2, 3), 3, requires_grad=False)
    wx, wy, bx, by = check_mfh_inputs(inp.x, inp.y, tuple(inp.wx), inp.wy, None, inp.by, 2,
                                      None, 0.0, 1e-6)
    assert len(wx) == len(wy) == len(bx) == len(by) == 3 and bx == [None] * 3


def test_mfh_block_columns_stay_int32_safe_in_the_wide_kernels():
    """A block's columns of the (rows, order * o) gradient / output: the strided view,
    unless its row stride times a tile's rows could pass int32 (the kernels scale it by
    an in-tile row index in 32 bits), then a contiguous copy; the bound covers every
    tile the wide kernels run."""
    from fbp_kernels.backends import triton_mfh, triton_wide as W

    tiles = [*W.WIDE_CONFIGS.values(), *W.WIDE_BWD_CONFIGS.values(), W.INTERPRETER_WIDE]
    assert max(c.block_m for c in tiles) <= triton_mfh.MAX_TILE_ROWS
    small = torch.empty(8, 3 * 40, device="meta")
    assert triton_mfh._block_cols(small, slice(40, 80)).stride(0) == 3 * 40  # a view
    o = 2 ** 31 // triton_mfh.MAX_TILE_ROWS // 3 + 1  # 3 * o * MAX_TILE_ROWS > 2^31
    big = torch.empty(2, 3 * o, device="meta")
    part = triton_mfh._block_cols(big, slice(o, 2 * o))
    assert part.shape == (2, o) and part.stride(0) == o
