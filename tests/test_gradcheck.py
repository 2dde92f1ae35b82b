"""torch.autograd.gradcheck in float64 through the public op, for every backend
(the Triton kernels run through the interpreter on CPU)."""

import pytest
import torch

import fbp_kernels
from fbp_kernels import ops
from helpers import Case, make_inputs

# Full gradcheck perturbs every input element (two forwards each); the Triton
# interpreter needs ~0.2 s per forward, so kernel backends use fast_mode (a random
# directional derivative per input, same failure power for a wrong backward formula).
def _fast(backend):
    return backend != "torch"


GRADCHECK_CASES = [
    Case((2, 3), (2, 1), 6, 5, 3, 4),          # broadcast, bias
    Case((3,), (3,), 5, 4, 1, 3, bias=False),  # factor 1, no bias
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_gradcheck(case, normalize, backend, device):
    tensors = make_inputs(case, torch.float64, device)

    def f(x, y, wx, wy, bx=None, by=None):
        return fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=case.factor, normalize=normalize,
                               backend=backend)

    live = [t for t in tensors if t is not None]
    assert torch.autograd.gradcheck(f, live, eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=_fast(backend))


def test_gradcheck_with_dropout(backend, device):
    """With a fixed seed the mask is a pure function of it, so the dropout-ed op is
    deterministic and its backward must be the derivative of that same function."""
    case = GRADCHECK_CASES[0]
    tensors = make_inputs(case, torch.float64, device)
    seed = torch.tensor(1234, dtype=torch.int64)

    def f(x, y, wx, wy, bx, by):
        return ops.fbp_forward(x, y, wx, wy, bx, by, seed, case.factor, 0.3, True, 1e-6,
                               "none", backend)[0]

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=_fast(backend))


def test_gradient_at_exact_zero_is_the_true_derivative(backend, device):
    """At s = 0 exactly the zero-safe signed sqrt has slope 0.5/sqrt(eps); a
    sign(s)*f(|s|) formulation would give 0 there.  Checked through gradcheck on
    inputs that make one pooled value exactly zero (perturbing weight_x moves it off
    zero; a larger eps keeps the finite differences accurate across the kink of t')."""
    case = Case((2,), (2,), 4, 3, 2, 3, bias=False)
    x, y, wx, wy, _, _ = make_inputs(case, torch.float64, device, requires_grad=False)
    wx[0:2] = 0.0  # output 0 of every row pools only zeros
    live = [x.requires_grad_(), wx.requires_grad_()]

    def f(x, wx):
        return fbp_kernels.fbp(x, y, wx, wy, factor=case.factor, eps=1.0, backend=backend)

    out = f(*live)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    g = torch.autograd.grad(out[:, 0].sum(), wx)[0]
    assert g[0:2].abs().sum() > 0, "zero slope at s = 0: the sign(s)*f(|s|) trap"

    assert torch.autograd.gradcheck(f, live, eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=_fast(backend))
