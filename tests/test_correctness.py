"""Every backend against the reference: forward and all six gradients.

Tolerances, per dtype:
- float64: the backends and the reference do the same math in a different order,
  so only rounding differs (~1e-16 per op): atol 1e-10, rtol 1e-8.
- float32: reductions over at most ~33 terms plus sqrt/normalise, ~1e-6 relative;
  the signed sqrt can amplify a rounding error of s by 0.5/sqrt(|s|+eps) near 0,
  hence atol 2e-5, rtol 2e-4 against a float64 reference of the same inputs.
- float16/bfloat16: a fixed tolerance would either hide bugs or flake, so the
  backend's error against the float64 reference must be at most twice that of the
  eager reference run in the same dtype, plus a floor of a few units in the last
  place of the dtype (what a user swapping layers would compare against).
"""

import pytest
import torch

import fbp_kernels
from helpers import CASES, Case, assert_close, detached64, error_vs, grads, make_inputs, reference_fbp

EXACT_TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-5, 2e-4)}
LOWP_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAMES = ["out", "dx", "dy", "dweight_x", "dweight_y", "dbias_x", "dbias_y"]


def run_backend(tensors, case, backend, **kw):
    out = fbp_kernels.fbp(*tensors, factor=case.factor, backend=backend, **kw)
    g = torch.randn_like(out, dtype=torch.float64).to(out.dtype)
    return [out] + grads(out, tensors, g), g


def run_reference(tensors, case, g, **kw):
    out = reference_fbp(tensors, case, **kw)
    return [out] + grads(out, tensors, g.to(out.dtype))


def compare(case, dtype, backend, device, noncontiguous=False, **kw):
    tensors = make_inputs(case, dtype, device, noncontiguous=noncontiguous)
    got, g = run_backend(tensors, case, backend, **{k: v for k, v in kw.items()})
    kw.pop("save_projections", None)
    exact = run_reference(detached64(tensors), case, g.double(), **kw)
    if dtype in EXACT_TOL:
        atol, rtol = EXACT_TOL[dtype]
        for name, a, e in zip(NAMES, got, exact):
            if e is None:
                assert a is None, f"{name}: expected no gradient"
                continue
            assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
            assert_close(a, e, atol=atol, rtol=rtol, name=name)
    else:
        lowp = run_reference(tensors, case, g, **kw)
        for name, a, l, e in zip(NAMES, got, lowp, exact):
            if e is None:
                continue
            assert a.dtype == dtype and a.shape == e.shape, name
            err, ref_err = error_vs(a, e), error_vs(l, e)
            bound = 2 * ref_err + LOWP_FLOOR[dtype]
            assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (eager {dtype}: {ref_err:.3g})"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference(case, dtype, backend, device):
    compare(case, dtype, backend, device)


#: 16-byte aligned half-precision rows (24 and 16 elements): the operands the wide
#: Triton kernels read through TMA descriptors and the CUDA backend stages with cp.async
#: (the CASES widths above are odd, so they take the pointer / synchronous paths).
ALIGNED_HALF = Case((37,), (37,), 24, 16, 5, 19)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[8], ALIGNED_HALF], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(case, dtype, backend, device):
    compare(case, dtype, backend, device)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=str)
def test_noncontiguous_inputs(case, backend, device):
    compare(case, torch.float64, backend, device, noncontiguous=True)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=str)
def test_without_normalisation(case, backend, device):
    compare(case, torch.float64, backend, device, normalize=False)


@pytest.mark.parametrize("case", [CASES[2], CASES[8]], ids=str)
def test_saved_projections_mode(case, backend, device):
    compare(case, torch.float64, backend, device, save_projections=True)


@pytest.mark.parametrize("eps", [1e-3, 1e-9])
def test_eps_is_honoured(eps, backend, device):
    compare(CASES[1], torch.float64, backend, device, eps=eps)


@pytest.mark.parametrize("factor", range(1, 9))
def test_every_factor(factor, backend, device):
    compare(Case((6,), (6,), 9, 7, factor, 3), torch.float64, backend, device)


def test_rows_of_zeros_give_finite_output_and_gradients(backend, device):
    """A row whose pooled values are all zero: the output is zero (F.normalize's
    clamp), and gradients are finite (the zero-safe signed sqrt)."""
    case = Case((4,), (4,), 6, 5, 3, 4, bias=False)
    x, y, wx, wy, _, _ = make_inputs(case, torch.float64, device, requires_grad=False)
    x[1] = 0.0  # projection a is zero in row 1, so s = 0 there
    tensors = [t.requires_grad_(True) for t in (x, y, wx, wy)] + [None, None]
    compare_inputs = tensors
    out = fbp_kernels.fbp(*compare_inputs, factor=case.factor, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    gs = grads(out, tensors, torch.ones_like(out))
    for g in gs:
        if g is not None:
            assert torch.isfinite(g).all()
    exact = reference_fbp(detached64(tensors), case)
    assert_close(out, exact, atol=1e-10, rtol=1e-8, name="out")


def test_norms_below_the_clamp_use_delta_exactly_in_fp64(backend, device):
    """Rows whose ||t|| lies in (0, 1e-12) are divided by the clamp delta = 1e-12 itself:
    in fp64 that constant must be the fp64 1e-12 (``tl.maximum`` with a Python constant
    made it fp32's 9.99999996e-13, a 4e-9 relative error in every such row)."""
    case = CASES[1]
    x, y, wx, wy, bx, by = make_inputs(case, torch.float64, device, requires_grad=False)
    tensors = (x * 3e-10, y * 3e-10, wx, wy, bx * 3e-10, by * 3e-10)
    t = reference_fbp(tensors, case, normalize=False)
    t = t / (torch.sqrt(t.abs() + 1e-12) + 1e-6)  # the signed square root
    norms = t.norm(dim=-1)
    assert bool(((norms > 0) & (norms < 1e-12)).all()), norms  # the regime under test
    out = fbp_kernels.fbp(*tensors, factor=case.factor, backend=backend)
    assert_close(out, reference_fbp(tensors, case), atol=0, rtol=1e-11, name="out")
