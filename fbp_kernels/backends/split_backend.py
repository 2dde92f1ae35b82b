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

Co-attention without copies.  Broadcast leading dimensions are grouped into at most
two levels ``(d0, d1)`` (e.g. ``(B, R)`` regions with a ``(B, 1)`` question: d0 = B,
d1 = R): each operand is projected at its own leading shape (the question once per
batch element, not once per region), and the epilogue reads, for broadcast row
``i0*d1 + i1``, the projection row its row map gives.  Backward writes the gradient of
a broadcast operand's projection per broadcast row and sums it over the rows that
shared it before its GEMMs.  Chunks run over ``d0``.  Layouts that need more than two
levels (rare: e.g. ``(A, 1, C)`` with ``(1, B, C)`` ... alternating) materialise the
broadcast like the fused backend.

Saved for backward: inputs, parameters, output and the fp32 row norm (the projections
too with ``save_projections=True``), like every backend.  Dropout masks are the Triton
backend's (same Philox index), so ``dropout_mask`` is shared.

Projection activations (``activation="relu"``/``"tanh"``) run inside the epilogue, on
the projections as it loads them (``triton_split``): the buffers, and the projections
``save_projections`` keeps, are the *pre-activation* GEMM outputs (backend ``torch``
keeps the activated ones; both give the same gradients), and backward's epilogue
writes the gradients w.r.t. the pre-activations, so the GEMMs after it are unchanged.

Joint normalisation (``norm_dims > 1``: one L2 norm over a group of ``G`` consecutive
broadcast rows, ``G`` the product of the last ``norm_dims - 1`` batch dimensions).
Forward: the epilogue runs as for ``norm_dims=1`` (each row divided by its own norm,
the row norms stored), then, per chunk, each group's norm comes from its rows' norms
(overflow-safe) and every row is rescaled by ``max(||t_row||, delta) /
max(||t_group||, delta)``, which is exactly ``t / max(||t_group||, delta)``.  For
fp16/bf16 the epilogue writes these row-normalised values to an fp32 scratch of
``(chunk, o)`` so that the output is rounded once; fp32/fp64 rescale in place.  The
saved norm holds, per row, its group's norm (as in backend ``torch``).  So that a
group's rows are all in one chunk, forward chunks end at multiples of ``G`` rows
(``lcm(G, d1) / d1`` level-0 indices): a group whose buffers exceed the memory budget
is still processed whole, in one chunk over the budget (correct, just larger).
Backward: ``<z, g>`` per row (the fused backend's row-dot kernel), summed over each
group before the chunk loop; the epilogue reads each row's (group norm, group
``<z, g>``) pair and the rest of the formula is the per-row one.  Its chunks need no
alignment.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import strategy
from . import triton_backend
from . import triton_kernels as K
from . import triton_split as E
from ._common import (BackwardResult, ForwardResult, acc_dtype, as_rows, broadcast_batch,
                      flatten_rows, group_rows, join_groups, kept)

NAME = "split"

# The epilogue runs where the Triton kernels run (CUDA, or the CPU interpreter).
unsupported_reason = triton_backend.unsupported_reason
dropout_mask = triton_backend.dropout_mask
_device_guard = triton_backend._device_guard


def chunk_rows(ko: int, dtype: torch.dtype, budget: Optional[int] = None) -> int:
    """Plain (unbroadcast) rows per chunk: two ``(chunk, K*o)`` buffers in ``dtype``
    within the budget (at least one row, whatever the budget)."""
    return _chunk(2 * ko * _itemsize(dtype), budget)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _chunk(bytes_per_unit: int, budget: Optional[int] = None) -> int:
    budget = strategy.split_memory_budget() if budget is None else budget
    return max(1, budget // max(1, bytes_per_unit))


# ----------------------------------------------------------------------------- layout


class _Operand(NamedTuple):
    """One input as the kernels see it: its rows ``(rows, width)`` and how broadcast
    rows ``i0*d1 + i1`` map onto them."""

    src: Tensor      # (own rows, width): rows ordered (i0, i1) over the levels it has
    has0: bool       # varies along level 0 (so chunks over d0 slice it)
    has1: bool       # varies along level 1
    d1: int          # rows per level-0 index: d1 of the layout if has1, else 1

    def rows_for(self, i0a: int, i0b: int) -> Tensor:
        """The operand's rows that level-0 indices ``i0a..i0b`` read."""
        return self.slice_of(self.src, i0a, i0b)

    def slice_of(self, t: Tensor, i0a: int, i0b: int) -> Tensor:
        """The same rows of a tensor laid out like the operand (e.g. its projection)."""
        return t[i0a * self.d1:i0b * self.d1] if self.has0 else t

    def row_map(self) -> "E.RowMap":
        return E.RowMap(self.d1 if self.has0 else 0, 1 if self.has1 else 0)

    @property
    def plain(self) -> bool:
        return self.has0 and self.has1


class _Layout(NamedTuple):
    d0: int
    d1: int
    x: _Operand
    y: _Operand
    batch: torch.Size
    materialised: bool  # broadcast copied (more than two levels): plain rows


def _layout(x: Tensor, y: Tensor) -> _Layout:
    """Group the broadcast leading dimensions into <= 2 levels, or materialise."""
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    nd = len(batch)
    xs = (1,) * (nd - x.dim() + 1) + tuple(x.shape[:-1])
    ys = (1,) * (nd - y.dim() + 1) + tuple(y.shape[:-1])
    levels = []  # [(x varies, y varies), size], adjacent equal kinds merged
    for bx, by, b in zip(xs, ys, batch):
        if b == 1:
            continue
        kind = (bx == b, by == b)
        if levels and levels[-1][0] == kind:
            levels[-1][1] *= b
        else:
            levels.append([kind, b])
    if len(levels) > 2:
        x2, y2, _ = flatten_rows(x, y)
        rows = x2.shape[0]
        return _Layout(rows, 1, _Operand(x2, True, True, 1), _Operand(y2, True, True, 1),
                       batch, True)
    while len(levels) < 2:
        levels.append([(True, True), 1])
    (k0, d0), (k1, d1) = levels
    x2 = as_rows(x)
    y2 = as_rows(y)
    return _Layout(d0, d1, _Operand(x2, k0[0], k1[0], d1 if k1[0] else 1),
                   _Operand(y2, k0[1], k1[1], d1 if k1[1] else 1), batch, False)


def _level0_step(lay: _Layout, ko: int, dtype: torch.dtype, backward: bool,
                 skip=(), group: int = 1, row_bytes: int = 0) -> int:
    """Level-0 indices per chunk: the transient projection rows per index of operands
    not in ``skip`` (kept or shared: computed whole), and in backward a gradient buffer
    per operand that is broadcast or kept, plus ``row_bytes`` per broadcast row, within
    the budget.  ``group > 1``: a multiple of the indices that hold whole groups of
    ``group`` rows (at least one such multiple, whatever the budget)."""
    ops = (lay.x, lay.y)
    rows = sum(op.d1 for k, op in enumerate(ops) if op.has0 and k not in skip)
    if backward:
        rows += lay.d1 * sum(not op.plain or k in skip for k, op in enumerate(ops))
    step = _chunk(rows * ko * _itemsize(dtype) + lay.d1 * row_bytes)
    if group > 1:
        # Chunk boundaries at row multiples of lcm(group, d1), i.e. of q level-0 indices.
        q = group // math.gcd(group, lay.d1)
        step = max(q, step // q * q)
    return step


def _project(inp, weight, bias, out=None):
    """``inp @ weight^T + bias`` by cuBLAS (CPU BLAS under the interpreter)."""
    if out is None:
        out = inp.new_empty((inp.shape[0], weight.shape[0]))
    if bias is None:
        return torch.mm(inp, weight.t(), out=out)
    return torch.addmm(bias, inp, weight.t(), out=out)


def _saved_view(proj: Tensor, like: Tensor, lay: _Layout) -> Tensor:
    """Saved projections have the operand's own leading shape (as in backend torch)."""
    return proj.view(*like.shape[:-1], proj.shape[-1])


def _source_rows(saved: Tensor, lay: _Layout, like: Tensor) -> Tensor:
    """A projection at the operand's own shape as the kernel's rows: itself, or copied
    out to the broadcast rows when the layout is materialised."""
    ko = saved.shape[-1]
    if lay.materialised:
        saved = saved.expand(*lay.batch, ko)
    return as_rows(saved)


# ----------------------------------------------------------------------------- forward


def forward(x, y, weight_x, weight_y, bias_x, bias_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float,
            save_projections, norm_dims: int = 1,
            activation: Optional[str] = None) -> ForwardResult:
    """``norm`` comes back per row (each row holding its group's norm when
    ``norm_dims > 1``); kept projections are the pre-activation ones."""
    lay = _layout(x, y)
    rows, ko = lay.d0 * lay.d1, weight_x.shape[0]
    o = ko // factor
    group = group_rows(lay.batch, norm_dims) if normalize and rows else 1
    # Half outputs of grouped rows go through an fp32 scratch (rounded once, at the end).
    staged = group > 1 and x.dtype in (torch.float16, torch.bfloat16)
    # Allocated at the final shape and written through a 2-D view: the output must not be
    # a view (autograd forbids in-place ops on views created inside a custom Function).
    out_full = torch.empty((*lay.batch, o), dtype=x.dtype, device=x.device)
    out = out_full.view(rows, o)
    norm = torch.empty((rows,), dtype=acc_dtype(x.dtype), device=x.device) if normalize \
        else None
    opts = dict(factor=factor, dropout=dropout, seed=seed, normalize=normalize, eps=eps,
                d1=lay.d1, a_map=lay.x.row_map(), c_map=lay.y.row_map(),
                activation=activation)
    ops = ((lay.x, x, weight_x, bias_x), (lay.y, y, weight_y, bias_y))
    keep = kept(save_projections)
    saved = [None, None]
    with _device_guard(x.device):
        # Kept projections are computed whole, at the operand's own leading shape (what
        # the fake kernel in ops.py promises); so are those of operands without level 0
        # (shared by every chunk).  The rest chunk by chunk into reused buffers.
        whole = {}
        for k, (op, t, w, b) in enumerate(ops):
            if keep[k]:
                saved[k] = _project(as_rows(t), w, b)
                whole[k] = _source_rows(saved[k].view(*t.shape[:-1], ko), lay, t)
            elif not op.has0:
                whole[k] = _project(op.src, w, b)
        step = _level0_step(lay, ko, x.dtype, backward=False, skip=whole, group=group,
                            row_bytes=4 * o if staged else 0)
        bufs = {}
        scratch = out.new_empty((min(rows, step * lay.d1), o), dtype=torch.float32) \
            if staged else None
        for i0a in range(0, lay.d0, step):
            i0b = min(lay.d0, i0a + step)
            r0, r1 = i0a * lay.d1, i0b * lay.d1
            projs = []
            for k, (op, t, w, b) in enumerate(ops):
                if k in whole:
                    projs.append(op.slice_of(whole[k], i0a, i0b))
                    continue
                inp = op.rows_for(i0a, i0b)
                if k not in bufs:  # reused by every chunk: sized for the first (largest)
                    bufs[k] = inp.new_empty((inp.shape[0], ko))
                projs.append(_project(inp, w, b, bufs[k][:inp.shape[0]]))
            z_rows = out[r0:r1] if scratch is None else scratch[:r1 - r0]
            E.epilogue_forward(projs[0], projs[1], z_rows,
                               norm[r0:r1] if normalize else None, row_offset=r0, **opts)
            if group > 1:  # the chunk holds whole groups (_level0_step)
                join_groups(z_rows, out[r0:r1], norm[r0:r1], group)
    return ForwardResult(out_full, norm.view(lay.batch) if normalize else None,
                         _saved_view(saved[0], x, lay) if saved[0] is not None else None,
                         _saved_view(saved[1], y, lay) if saved[1] is not None else None)


# ----------------------------------------------------------------------------- backward


class _GradSum:
    """A sum over chunks: the first term is kept as it is (one chunk = exactly eager's
    GEMMs); later terms add into fp32 for half inputs (in place otherwise).  No atomics:
    bitwise repeatable."""

    def __init__(self):
        self.value = None

    def add(self, t: Optional[Tensor]):
        if t is None:
            return
        if self.value is None:
            self.value = t
            return
        if self.value.dtype in (torch.float16, torch.bfloat16):
            self.value = self.value.float()
        self.value += t

    def result(self, dtype):
        return None if self.value is None else self.value.to(dtype)


def _reduce_to_source(d_b: Tensor, op: _Operand, n0: int, d1: int) -> Tensor:
    """Sum a broadcast-row gradient ``(n0*d1, K*o)`` onto the operand's own rows."""
    d = d_b.view(n0, d1, d_b.shape[-1])
    if not op.has1:
        d = d.sum(1, keepdim=True)
    if not op.has0:
        d = d.sum(0, keepdim=True)
    return d.reshape(-1, d_b.shape[-1])


def backward(grad, x, y, weight_x, weight_y, bias_x, bias_y, out, norm, a, c, *,
             factor: int, dropout: float, seed: Optional[int], normalize: bool,
             eps: float, norm_dims: int = 1,
             activation: Optional[str] = None) -> BackwardResult:
    """``a``/``c`` (when kept) are the pre-activation projections forward returned."""
    lay = _layout(x, y)
    rows, ko = lay.d0 * lay.d1, weight_x.shape[0]
    o = ko // factor
    group = group_rows(lay.batch, norm_dims) if normalize and rows else 1
    g2 = grad.reshape(rows, o)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    # Without normalisation the output is not saved (it may be modified in place) and
    # not needed: the kernel never reads z then.
    z2 = out.reshape(rows, o) if normalize else g2
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    n2 = norm.reshape(rows) if normalize else None
    if group > 1:
        with _device_guard(x.device):
            n2 = K.group_pairs(z2, g2, n2, group)  # (rows, 2): whole groups, before chunking
    ops = ((lay.x, weight_x, bias_x), (lay.y, weight_y, bias_y))
    saved = (_source_rows(a, lay, x) if a is not None else None,
             _source_rows(c, lay, y) if c is not None else None)
    d_src = [op.src.new_empty(op.src.shape) for op, _, _ in ops]   # dx2, dy2
    dw = [_GradSum(), _GradSum()]
    db = [_GradSum(), _GradSum()]
    d_shared = [_GradSum(), _GradSum()]  # projection grads of operands without level 0
    opts = dict(factor=factor, dropout=dropout, seed=seed, normalize=normalize, eps=eps,
                d1=lay.d1, a_map=lay.x.row_map(), c_map=lay.y.row_map(),
                activation=activation, group_zg=group > 1)
    whole = {k: saved[k] for k in (0, 1) if saved[k] is not None}
    whole.update({k: _project(op.src, w, b) for k, (op, w, b) in enumerate(ops)
                  if k not in whole and not op.has0})
    step = _level0_step(lay, ko, x.dtype, backward=True, skip=whole)
    with _device_guard(x.device):
        for i0a in range(0, max(lay.d0, 1), step):
            i0b = min(lay.d0, i0a + step)
            r0, r1 = i0a * lay.d1, i0b * lay.d1
            n0 = i0b - i0a
            projs, grads, maps = [], [], []
            for k, (op, w, b) in enumerate(ops):
                transient = k not in whole
                proj = _project(op.rows_for(i0a, i0b), w, b) if transient \
                    else op.slice_of(whole[k], i0a, i0b)
                projs.append(proj)
                if op.plain:
                    # 1:1 with the broadcast rows: a transient projection is overwritten
                    # by its gradient; a kept one never is (retain_graph=True runs
                    # backward twice on it).
                    grads.append(proj if transient else torch.empty_like(proj))
                    maps.append(op.row_map())
                else:
                    grads.append(proj.new_empty((r1 - r0, ko)))
                    maps.append(E.RowMap.plain(lay.d1))
            E.epilogue_backward(g2[r0:r1], z2[r0:r1], n2[r0:r1] if normalize else None,
                                projs[0], projs[1], grads[0], grads[1], row_offset=r0,
                                da_map=maps[0], dc_map=maps[1], **opts)
            for k, (op, w, b) in enumerate(ops):
                d = grads[k] if op.plain else _reduce_to_source(grads[k], op, n0, lay.d1)
                if not op.has0:
                    d_shared[k].add(d)  # shared by every chunk: GEMMs after the loop
                    continue
                inp = op.rows_for(i0a, i0b)
                torch.mm(d, w, out=d_src[k][i0a * op.d1:i0b * op.d1])
                dw[k].add(d.t() @ inp)
                db[k].add(d.sum(0) if b is not None else None)
        for k, (op, w, b) in enumerate(ops):
            if op.has0:
                continue
            d = d_shared[k].result(op.src.dtype)
            torch.mm(d, w, out=d_src[k])
            dw[k].add(d.t() @ op.src)
            db[k].add(d.sum(0) if b is not None else None)
    dx, dy = (_unflatten(d_src[0], x, lay), _unflatten(d_src[1], y, lay))
    return BackwardResult(dx, dy, dw[0].result(weight_x.dtype), dw[1].result(weight_y.dtype),
                          db[0].result(weight_x.dtype), db[1].result(weight_y.dtype))


def _unflatten(d2: Tensor, like: Tensor, lay: _Layout) -> Tensor:
    if lay.materialised:
        d = d2.view(*lay.batch, like.shape[-1])
        return d if d.shape == like.shape else d.sum_to_size(like.shape)
    return d2.view(like.shape)
