"""Defects found by hostile probing (issue 11, R1-R12), one test (or a few) each.

Every test here failed before its fix.  The MFH tests use the MFH backends' own
availability rule; the FBP ones use the ``backend`` fixture of conftest.
"""

from __future__ import annotations

import pytest
import torch

import fbp_kernels
from fbp_kernels import mfh_ops
from conftest import backend_param

M, N, FACTOR, O, ROWS = 5, 4, 2, 3, 3
KO = FACTOR * O

MFH_BACKENDS = [backend_param(n, mfh_ops.unsupported_reason) for n in ("torch", "triton")]


def _tensors(dtype=torch.float64, rows=ROWS, m=M, n=N, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    return (r(rows, m), r(rows, n), r(KO, m), r(KO, n),
            r(KO) if bias else None, r(KO) if bias else None)


# ------------------------------------------------------------------ R1 double backward

def _second_order(fn, x, wx):
    """A gradient penalty: d/dW_x of ||d out / d x||^2."""
    out = fn()
    w = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    (gx,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum(), wx)


def test_double_backward_is_refused_with_a_pointer_to_the_reference(backend):
    x, y, wx, wy, bx, by = _tensors()
    with pytest.raises(RuntimeError, match=r"double backward.*fbp_kernels\.reference"):
        _second_order(lambda: fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=FACTOR,
                                              backend=backend), x, wx)


@pytest.mark.parametrize("mfh_backend", MFH_BACKENDS)
def test_mfh_double_backward_is_refused_with_a_pointer_to_the_reference(mfh_backend):
    x, y, wx, wy, bx, by = _tensors()
    with pytest.raises(RuntimeError, match=r"double backward.*fbp_kernels\.reference"):
        _second_order(lambda: fbp_kernels.mfh(x, y, [wx, wx * 0.5], [wy, wy], [bx, None],
                                              None, factor=FACTOR, backend=mfh_backend),
                      x, wx)


def test_compiled_double_backward_is_refused():
    x, y, wx, wy, bx, by = _tensors()
    f = torch.compile(lambda *t: fbp_kernels.fbp(*t, factor=FACTOR, backend="torch"),
                      fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"double backward"):
        _second_order(lambda: f(x, y, wx, wy, bx, by), x, wx)


def test_create_graph_first_order_gradients_still_match():
    # create_graph=True alone (no second backward) must keep giving the right gradients.
    x, y, wx, wy, bx, by = _tensors()
    out = fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=FACTOR, backend="torch")
    got = torch.autograd.grad(out.sum(), (x, wx), create_graph=True)
    ref_out = fbp_kernels.reference.fbp(x, y, wx, wy, bx, by, factor=FACTOR)
    want = torch.autograd.grad(ref_out.sum(), (x, wx))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ R2 eps traced symbolically

def _layer(eps, cls=fbp_kernels.FactorizedBilinearPooling, **kw):
    torch.manual_seed(0)
    return cls(M, N, O, factor=FACTOR, eps=eps, backend="torch", **kw).double()


def _xy():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(ROWS, M, generator=gen, dtype=torch.float64),
            torch.randn(ROWS, N, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("cls", [fbp_kernels.FactorizedBilinearPooling, fbp_kernels.MFH],
                         ids=["fbp", "mfh"])
def test_compile_dynamic_traces_eps(cls):
    layer = _layer(1e-3, cls)
    x, y = _xy()
    got = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")(x, y)
    torch.testing.assert_close(got, layer(x, y), rtol=0, atol=0)


def test_compile_two_layers_with_different_eps():
    a, b = _layer(1e-2), _layer(1e-5)
    x, y = _xy()
    ca = torch.compile(a, fullgraph=True, backend="aot_eager")
    cb = torch.compile(b, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(ca(x, y), a(x, y), rtol=0, atol=0)
    torch.testing.assert_close(cb(x, y), b(x, y), rtol=0, atol=0)
    assert not torch.equal(a(x, y), b(x, y))  # eps really reached the computation


def test_compile_eps_changed_after_compiling():
    layer = _layer(1e-2)
    x, y = _xy()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x, y)
    layer.eps = 1e-5
    torch.testing.assert_close(compiled(x, y), layer(x, y), rtol=0, atol=0)


def test_compile_eps_as_argument():
    x, y = _xy()
    _, _, wx, wy, bx, by = (t.detach() if t is not None else None for t in _tensors())

    def f(x, y, eps):
        return fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=FACTOR, eps=eps, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for eps in (1e-2, 1e-4, 1e-6):
        torch.testing.assert_close(compiled(x, y, eps), f(x, y, eps), rtol=0, atol=0)
