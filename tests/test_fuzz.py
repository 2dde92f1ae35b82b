"""Fuzz target over the public API (hypothesis, derandomized, fixed budget).

Each example draws a call of :func:`fbp_kernels.fbp` or :func:`fbp_kernels.mfh`:
shapes (broadcast leading dimensions, zero widths, empty batches), memory layouts
(transposed, strided slices), dtypes, options, values (zeros, huge, NaN/Inf) and
sometimes one deliberately bad argument.  The contract:

* a bad argument raises one of the documented types (TypeError, ValueError,
  BackendUnavailableError), nothing else;
* a valid call returns the documented shape and dtype; in float64 it matches the
  reference elementwise: the same elements are finite, the finite ones agree, and
  so do the input gradients when everything is finite.

Backend ``torch`` only, so the budget (``max_examples`` below) runs in a few tens of
seconds; the kernel backends are held to the reference by ``test_properties.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fbp_kernels
from fbp_kernels import BackendUnavailableError, reference

DOCUMENTED = (TypeError, ValueError, BackendUnavailableError)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Huge but finite in every product the layer forms for that dtype (|x| * |w| terms,
# squared by the product a*c): fp64 1e100 -> 1e200 < 1.8e308.
HUGE = {torch.float64: 1e100, torch.float32: 1e15, torch.float16: 10.0,
        torch.bfloat16: 1e15}
BAD = [None, "factor-0", "factor-float", "width", "dtype", "eps", "dropout", "x-list",
       "backend"]


@st.composite
def calls(draw):
    """(function name, kwargs, what was broken or None)."""
    op = draw(st.sampled_from(["fbp", "mfh"]))
    # Half the examples in float64, the dtype whose values are compared.
    dtype = draw(st.sampled_from([torch.float64] * 3 + DTYPES[1:]))
    factor, o = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    m, n = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    rows = draw(st.integers(0, 4))
    shape_x, shape_y = draw(st.sampled_from([((rows,), (rows,)), ((rows,), (1,)),
                                             ((2, rows), (1, rows)), ((), ())]))
    order = draw(st.integers(1, 3)) if op == "mfh" else 1
    bias = draw(st.sampled_from(["both", "none", "x", "y"]))
    values = draw(st.sampled_from(["normal", "zeros-row", "huge", "nan", "inf"]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ko = factor * o

    def rand(*shape, std=1.0):
        if layout == "transposed" and len(shape) >= 2:
            t = torch.randn(*reversed(shape), generator=gen, dtype=torch.float64)
            t = t.permute(*reversed(range(len(shape))))
        elif layout == "strided" and len(shape) >= 1:
            t = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen,
                            dtype=torch.float64)[..., ::2]
        else:
            t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return t * std

    x, y = rand(*shape_x, m), rand(*shape_y, n)
    if values == "zeros-row" and x.dim() >= 2 and x.shape[0] > 0:
        x[0] = 0
    elif values == "huge":
        x, y = x * HUGE[dtype], y * HUGE[dtype]
    elif values in ("nan", "inf") and x.numel() > 0:
        x[(0,) * x.dim()] = float("nan") if values == "nan" else float("inf")
    wx = [rand(ko, m, std=max(m, 1) ** -0.5) for _ in range(order)]
    wy = [rand(ko, n, std=max(n, 1) ** -0.5) for _ in range(order)]
    bx = [rand(ko, std=0.1) if bias in ("both", "x") else None for _ in range(order)]
    by = [rand(ko, std=0.1) if bias in ("both", "y") else None for _ in range(order)]
    cast = [t.to(dtype) if t is not None else None for t in (x, y)]
    kw = dict(x=cast[0], y=cast[1], factor=factor,
              normalize=draw(st.booleans()), eps=draw(st.sampled_from([1e-6, 1e-2])),
              dropout=draw(st.sampled_from([0.0, 0.3])), backend="torch")
    per_block = [[t.to(dtype) if t is not None else None for t in seq]
                 for seq in (wx, wy, bx, by)]
    if op == "fbp":
        kw.update(weight_x=per_block[0][0], weight_y=per_block[1][0],
                  bias_x=per_block[2][0], bias_y=per_block[3][0])
    else:
        kw.update(weights_x=per_block[0], weights_y=per_block[1], biases_x=per_block[2],
                  biases_y=per_block[3])
    # Three in four calls are valid; the rest break one argument.
    bad = draw(st.sampled_from([None] * 24 + BAD[1:]))
    if bad == "factor-0":
        kw["factor"] = 0
    elif bad == "factor-float":
        kw["factor"] = float(factor)
    elif bad == "width":
        kw["x"] = torch.zeros(*shape_x, m + 1, dtype=dtype)
    elif bad == "dtype":
        kw["y"] = kw["y"].to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif bad == "eps":
        kw["eps"] = draw(st.sampled_from([0.0, -1e-3, float("nan"), float("inf")]))
    elif bad == "dropout":
        kw["dropout"] = draw(st.sampled_from([1.0, -0.1, float("nan")]))
    elif bad == "x-list":
        kw["x"] = kw["x"].tolist()
    elif bad == "backend":
        kw["backend"] = "nope"
    return op, kw, bad


def _reference(op, kw):
    kw = {k: v for k, v in kw.items() if k != "backend"}
    return (reference.fbp if op == "fbp" else reference.mfh)(**kw)


def _leaves(op, kw):
    named = ["x", "y"] + (["weight_x", "weight_y"] if op == "fbp" else [])
    return [kw[k] for k in named]


@settings(max_examples=2000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls())
def test_public_api_meets_its_contract(call):
    op, kw, bad = call
    fn = fbp_kernels.fbp if op == "fbp" else fbp_kernels.mfh
    if bad is not None:
        with pytest.raises(DOCUMENTED):
            fn(**kw)
        return
    dtype = kw["x"].dtype
    leaves = [t.requires_grad_() for t in _leaves(op, kw)]
    out = fn(**kw)
    batch = torch.broadcast_shapes(kw["x"].shape[:-1], kw["y"].shape[:-1])
    blocks = 1 if op == "fbp" else len(kw["weights_x"])
    ko = (kw["weight_x"] if op == "fbp" else kw["weights_x"][0]).shape[0]
    assert out.shape == (*batch, blocks * ko // kw["factor"]) and out.dtype == dtype
    if dtype != torch.float64:
        return  # low precision: shape and dtype only (values: test_properties.py)
    ref_kw = {k: (v.detach().requires_grad_() if torch.is_tensor(v) and v.requires_grad
                  else v) for k, v in kw.items()}
    ref = _reference(op, ref_kw)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), (out, ref)
    finite = torch.isfinite(ref)
    # Same arithmetic as the reference, in float64: agreement to rounding.
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-9, atol=1e-12)
    if not finite.all() or out.numel() == 0:
        return
    if max((t.detach().abs().max().item() if t.numel() else 0.0) for t in leaves[:2]) > 1e3:
        # Huge inputs: the output hardly depends on their scale (z ~ t/||t||), so most
        # exact gradients are ~0 and both sides return rounding noise around 0, with
        # nothing to compare (the forward values above were compared).
        return
    if kw["normalize"] and ko // kw["factor"] == 1:
        return  # one output per block: z = sign(s), whose exact gradient is 0 (noise)
    g = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
    got = torch.autograd.grad(out, leaves, g, allow_unused=True)
    want = torch.autograd.grad(ref, _leaves(op, ref_kw), g, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:
            continue
        # The fused backward reorders the reference's arithmetic (the projection
        # g - z<z,g>, its own chain rule): rounding differences relative to the
        # largest gradient, amplified at most by the conditioning of the pooled sums.
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8 * scale + 1e-300)
