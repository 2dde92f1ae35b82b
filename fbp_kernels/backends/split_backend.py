"""Backend ``split``: cuBLAS projections plus one fused Triton epilogue, chunked over rows.

Forward, per chunk of rows::

    A = x W_x^T + b_x ;  C = y W_y^T + b_y        cuBLAS (addmm into reused buffers)
    z, ||t|| = epilogue(A, C)                      one Triton pass: product, dropout,
                                                   pooling, signed sqrt, row norm

Backward, per chunk: ``A`` and ``C`` recomputed into the same kind of buffers (or the
saved ones read when ``save_projections=True``), one Triton pass turns them into
``dA = dp * C`` and ``dC = dp * A`` in place, then cuBLAS runs ``dx = dA W_x``,
``dW_x += dA^T x`` (and the same for ``y``) and the bias sums.

Transient memory is bounded by the chunk: two ``(chunk, K*o)`` buffers, sized so they
take at most the split memory budget (default 64 MiB; ``FBP_SPLIT_BUDGET_MIB`` or
:func:`fbp_kernels.set_split_memory_budget` change it).  At the MFB default in bf16 (K*o = 5000) that is
3355 rows per chunk, so a 1024-row batch is one chunk and runs exactly like eager's two
GEMMs.  Across chunks the weight gradients accumulate in fp32 (half inputs) or in place
(fp32/fp64); nothing is atomic, so results are bitwise repeatable.

Why it exists: PERFORMANCE.md predicts this at ~1.15x the two-GEMM floor forward on an
H200 (the epilogue moves ``2*K*o`` elements in and ``o`` out per row), against ~3.5x for
today's one-launch kernel; any fused main loop has to beat it to be the default.

Saved for backward: inputs, parameters, output and the fp32 row norm (the projections
too with ``save_projections=True``), like every backend.  Dropout masks are the Triton
backend's (same Philox index), so ``dropout_mask`` is shared.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import strategy
from . import triton_backend
from . import triton_split as E
from ._common import BackwardResult, ForwardResult, acc_dtype, flatten_rows, unflatten_grad

NAME = "split"

def chunk_rows(ko: int, dtype: torch.dtype, budget: Optional[int] = None) -> int:
    """Rows per chunk: two ``(chunk, K*o)`` buffers in ``dtype`` within the budget
    (at least one row, whatever the budget)."""
    budget = strategy.split_memory_budget() if budget is None else budget
    per_row = 2 * ko * torch.empty((), dtype=dtype).element_size()
    return max(1, budget // per_row)


# The epilogue runs where the Triton kernels run (CUDA, or the CPU interpreter).
unsupported_reason = triton_backend.unsupported_reason
dropout_mask = triton_backend.dropout_mask
_device_guard = triton_backend._device_guard


def _project(inp, weight, bias, out):
    """``out = inp @ weight^T + bias`` by cuBLAS (CPU BLAS under the interpreter)."""
    if bias is None:
        return torch.mm(inp, weight.t(), out=out)
    return torch.addmm(bias, inp, weight.t(), out=out)


def forward(x, y, weight_x, weight_y, bias_x, bias_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float,
            save_projections: bool) -> ForwardResult:
    x2, y2, batch = flatten_rows(x, y)
    rows, ko = x2.shape[0], weight_x.shape[0]
    o = ko // factor
    out = torch.empty((rows, o), dtype=x.dtype, device=x.device)
    norm = torch.empty((rows,), dtype=acc_dtype(x.dtype), device=x.device) if normalize \
        else None
    opts = dict(factor=factor, dropout=dropout, seed=seed, normalize=normalize, eps=eps)
    a = c = None
    with _device_guard(x.device):
        if save_projections:
            # The caller asked to keep them: full-size, no chunking.
            a = _project(x2, weight_x, bias_x, x2.new_empty((rows, ko)))
            c = _project(y2, weight_y, bias_y, y2.new_empty((rows, ko)))
            E.epilogue_forward(a, c, out, norm, **opts)
        else:
            step = chunk_rows(ko, x.dtype)
            buf_a = x2.new_empty((min(step, rows), ko))
            buf_c = y2.new_empty((min(step, rows), ko))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                ca = _project(x2[r0:r1], weight_x, bias_x, buf_a[:r1 - r0])
                cc = _project(y2[r0:r1], weight_y, bias_y, buf_c[:r1 - r0])
                E.epilogue_forward(ca, cc, out[r0:r1],
                                   norm[r0:r1] if normalize else None, row_offset=r0, **opts)
    return ForwardResult(out.view(*batch, o), norm.view(batch) if normalize else None,
                         a.view(*batch, ko) if a is not None else None,
                         c.view(*batch, ko) if c is not None else None)


class _WeightGrads:
    """Weight and bias gradients summed over chunks: the first chunk's GEMM result is
    kept as it is (one chunk = exactly eager's GEMMs); later chunks add into an fp32
    accumulator for half inputs (in place otherwise)."""

    def __init__(self, has_bias: bool):
        self.dw = None
        self.db = None
        self.has_bias = has_bias

    def add(self, d, inp):
        dw = d.t() @ inp
        db = d.sum(0) if self.has_bias else None
        if self.dw is None:
            self.dw, self.db = dw, db
            return
        if self.dw.dtype in (torch.float16, torch.bfloat16):
            self.dw = self.dw.float()
            self.db = self.db.float() if self.db is not None else None
        self.dw += dw
        if self.has_bias:
            self.db += db

    def result(self, dtype):
        return (self.dw.to(dtype),
                self.db.to(dtype) if self.db is not None else None)


def backward(grad, x, y, weight_x, weight_y, bias_x, bias_y, out, norm, a, c, *,
             factor: int, dropout: float, seed: Optional[int], normalize: bool,
             eps: float) -> BackwardResult:
    x2, y2, batch = flatten_rows(x, y)
    rows, ko = x2.shape[0], weight_x.shape[0]
    o = ko // factor
    g2 = grad.reshape(rows, o)
    z2 = out.reshape(rows, o)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    n2 = norm.reshape(rows) if normalize else None
    opts = dict(factor=factor, dropout=dropout, seed=seed, normalize=normalize, eps=eps)
    dx2 = x2.new_empty((rows, x2.shape[1]))
    dy2 = y2.new_empty((rows, y2.shape[1]))
    gx, gy = _WeightGrads(bias_x is not None), _WeightGrads(bias_y is not None)
    with _device_guard(x.device):
        if a is not None:
            # Saved projections are read, never overwritten (backward may run twice
            # with retain_graph=True), so dA and dC get their own buffers.
            a2, c2 = a.reshape(rows, ko), c.reshape(rows, ko)
            step, bufs = rows, None
        else:
            step = chunk_rows(ko, x.dtype)
            bufs = (x2.new_empty((min(step, rows), ko)), y2.new_empty((min(step, rows), ko)))
        for r0 in range(0, max(rows, 1), max(step, 1)):
            r1 = min(rows, r0 + step)
            xs, ys = x2[r0:r1], y2[r0:r1]
            if bufs is None:
                ca, cc = a2[r0:r1], c2[r0:r1]
                da, dc = torch.empty_like(ca), torch.empty_like(cc)
            else:
                ca = _project(xs, weight_x, bias_x, bufs[0][:r1 - r0])
                cc = _project(ys, weight_y, bias_y, bufs[1][:r1 - r0])
                da, dc = ca, cc  # in place: the projections are not needed afterwards
            E.epilogue_backward(g2[r0:r1], z2[r0:r1], n2[r0:r1] if normalize else None,
                                ca, cc, da, dc, row_offset=r0, **opts)
            torch.mm(da, weight_x, out=dx2[r0:r1])
            torch.mm(dc, weight_y, out=dy2[r0:r1])
            gx.add(da, xs)
            gy.add(dc, ys)
    dwx, dbx = gx.result(weight_x.dtype)
    dwy, dby = gy.result(weight_y.dtype)
    return BackwardResult(unflatten_grad(dx2, batch, x), unflatten_grad(dy2, batch, y),
                          dwx, dwy, dbx, dby)
