"""Triton epilogue kernels of the *split* strategy, and their launchers.

The split strategy leaves the two projections to cuBLAS (``A = x W_x^T + b_x``,
``C = y W_y^T + b_y``, each ``(chunk, K*o)`` with ``K = factor``) and does everything
after them in one memory-bound pass per row: product, dropout, sum pooling over ``K``
consecutive columns, the zero-safe signed square root and the L2 row norm.  Backward
does the mirror image: from ``(g, z, ||t||)`` and the (recomputed) projections one pass
writes ``dA = dp * C`` and ``dC = dp * A``, in place over ``A`` and ``C`` when they are
transient, and cuBLAS runs the four gradient GEMMs.  Why this design exists
(PERFORMANCE.md, design 2): cuBLAS runs the GEMMs near peak, and the epilogue reads
each projection once (``2*K*o`` elements per row) and writes ``o``: predicted ~1.15x
the two-GEMM floor forward, where today's one-launch kernel is ~3.5x.

Tiles.  A program owns ``BLOCK_R`` whole rows and walks their ``o`` outputs in blocks
of ``BLOCK_O``; each block is a ``(BLOCK_R, BLOCK_O, BLOCK_F)`` tile whose element
``(r, j, i)`` is projected column ``j*K + i`` (``BLOCK_F = next_pow2(K)``, lanes with
``i >= K`` masked).  Consecutive lanes read consecutive addresses, so the masked lanes
cost issue slots but no DRAM sectors.  Because a program owns whole rows, the row norm
needs no cross-program protocol (no atomics, no counters, nothing that CUDA graphs or
concurrent streams could break): when the row fits one block (``o <= BLOCK_O``, true at
the MFB default o = 1000) it is finished in registers; otherwise a first pass reduces
the norm and a second pass recomputes ``t`` from ``A`` and ``C`` (the re-read comes from
L2: a program's working set is ``2*K*o`` elements, far below the 50 MB L2).

Norms are overflow-safe: ``||t||`` is accumulated as ``mx * sqrt(sum((t/mx)^2))`` with
a running maximum ``mx`` (rescaled when a later block has a larger value), so rows
whose ``t^2`` sum exceeds the dtype's range still get the right norm.

Dropout keeps element ``(row, col)`` of the ``(rows, K*o)`` product when Philox
(``tl.rand``) keyed by the seed and the element's int64 linear index ``row*K*o + col``
is ``>= p``: the same index and the same draw as the fused kernels in
:mod:`triton_kernels`, so both strategies give the same mask for one seed (tested),
and ``backend="auto"`` switching between them never changes the random stream.
``row`` is the global row: launchers pass the chunk's first row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_kernels import INTERPRET, NORM_DELTA, launch

_NORM_DELTA = tl.constexpr(NORM_DELTA)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tile_offsets(o0, row_off, O, FACTOR: tl.constexpr, BLOCK_O: tl.constexpr,
                  BLOCK_F: tl.constexpr):
    """Element offsets ``(BLOCK_R, BLOCK_O, BLOCK_F)`` of projected columns ``j*K + i``
    for outputs ``j = o0 + 0..BLOCK_O-1`` in the rows starting at ``row_off``, their
    projected column index, and the column masks."""
    jj = o0 + tl.arange(0, BLOCK_O)
    ii = tl.arange(0, BLOCK_F)
    cols = jj[:, None] * FACTOR + ii[None, :]                      # (BLOCK_O, BLOCK_F)
    col_ok = (jj < O)[:, None] & (ii < FACTOR)[None, :]
    offs = row_off[:, None, None] + cols[None, :, :]
    return offs, cols, col_ok, jj < O


@triton.jit
def _row_map(ptr, row0, rr, D1, s0, s1, stride_r, BROADCAST: tl.constexpr):
    """Base pointer and per-row element offsets of a projection buffer for the tile's
    broadcast rows ``row0 + rr``.

    Plain rows (``BROADCAST`` False): buffer row = broadcast row; the row block's origin
    goes into the int64 scalar base and the in-tile offsets stay int32 (the launcher
    checks ``BLOCK_R * stride_r + K*o`` fits): int64 per-element offsets cost two
    registers each and made many-row tiles spill.  Broadcast rows (co-attention, e.g.
    ``(B, R)`` regions with a ``(B, 1)`` question): broadcast row ``r = i0 * D1 + i1``
    reads buffer row ``i0 * s0 + i1 * s1`` (``s = 0`` along a broadcast dimension), so a
    shared projection is computed once and read by every row of its group; int64.
    """
    if BROADCAST:
        lr = row0 + rr.to(tl.int64)
        off = ((lr // D1) * s0 + (lr % D1) * s1) * stride_r
        base = ptr
    else:
        off = rr * stride_r
        base = ptr + row0 * stride_r
    return base, off


@triton.jit
def _dropped(p, seed, grow, cols, KO, drop_p, keep_scale):
    """Dropout on a (BLOCK_R, BLOCK_O, BLOCK_F) tile; ``grow`` are global int64 rows.
    Same Philox index as ``triton_kernels._keep_mask``: ``row * K*o + col``."""
    idx = grow[:, None, None] * KO + cols[None, :, :].to(tl.int64)
    keep = tl.rand(seed, idx) >= drop_p
    return tl.where(keep, p * keep_scale, 0.0)


@triton.jit
def _pooled_t(a_base, a_off, c_base, c_off, o0, grow, r_ok, O, seed, drop_p, keep_scale,
              eps, sqrt_eps, FACTOR: tl.constexpr, DROPOUT: tl.constexpr,
              NORMALIZE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr):
    """One output block: ``s`` pooled (or ``t = signed_sqrt(s)`` when normalising),
    ``(BLOCK_R, BLOCK_O)`` in the accumulation dtype, zero outside the valid tile."""
    acc_dtype = tl.float64 if a_base.dtype.element_ty == tl.float64 else tl.float32
    a_offs, cols, col_ok, o_ok = _tile_offsets(o0, a_off, O, FACTOR, BLOCK_O, BLOCK_F)
    c_offs, _, _, _ = _tile_offsets(o0, c_off, O, FACTOR, BLOCK_O, BLOCK_F)
    msk = r_ok[:, None, None] & col_ok[None, :, :]
    a = tl.load(a_base + a_offs, mask=msk, other=0.0).to(acc_dtype)
    c = tl.load(c_base + c_offs, mask=msk, other=0.0).to(acc_dtype)
    p = a * c
    if DROPOUT:
        p = _dropped(p, seed, grow, cols, O * FACTOR, drop_p, keep_scale)
    s = tl.sum(p, axis=2)
    if NORMALIZE:
        # Zero-safe signed sqrt, cancellation-free: s / (sqrt(|s|+eps) + sqrt(eps)).
        s = s / (tl.sqrt(tl.abs(s) + eps) + sqrt_eps)
        s = tl.where(r_ok[:, None] & o_ok[None, :], s, 0.0)
    return s, o_ok


@triton.jit
def _store_rows(out_base, rr, r_ok, o0, vals, o_ok, stride_or, BLOCK_O: tl.constexpr):
    """Store a (BLOCK_R, BLOCK_O) block of outputs ``o0..`` in the output's dtype."""
    jj = o0 + tl.arange(0, BLOCK_O)
    tl.store(out_base + rr[:, None] * stride_or + jj[None, :],
             vals.to(out_base.dtype.element_ty), mask=r_ok[:, None] & o_ok[None, :])


@triton.jit
def _scaled_sumsq(t, mx, ssq):
    """Fold a block into the running ``(max |t|, sum (t/max)^2)`` of each row."""
    new_mx = tl.maximum(mx, tl.max(tl.abs(t), axis=1))
    safe = tl.where(new_mx > 0, new_mx, 1.0)
    ratio = mx / safe
    q = t / safe[:, None]
    return new_mx, ssq * ratio * ratio + tl.sum(q * q, axis=1)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _split_fwd_kernel(
    # pointers
    a_ptr, c_ptr, out_ptr, norm_ptr,
    # sizes (D1: inner broadcast group size, see _row_map)
    rows, O, row_offset, D1,
    # strides (unit column strides: the launcher's buffers are row-major); a_s0.. are
    # the row maps of the two projections, in rows
    stride_ar, stride_cr, stride_or, a_s0, a_s1, c_s0, c_s1,
    # scalars
    seed, drop_p, keep_scale, eps, sqrt_eps,
    # meta-parameters
    FACTOR: tl.constexpr, DROPOUT: tl.constexpr, NORMALIZE: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BROADCAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < rows - row0
    grow = row_offset + row0 + rr  # int64: the dropout index passes 2^31
    a_base, a_off = _row_map(a_ptr, row0, rr, D1, a_s0, a_s1, stride_ar, BROADCAST)
    c_base, c_off = _row_map(c_ptr, row0, rr, D1, c_s0, c_s1, stride_cr, BROADCAST)
    out_base = out_ptr + row0 * stride_or
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    if not NORMALIZE:
        for o0 in range(0, O, BLOCK_O):
            s, o_ok = _pooled_t(a_base, a_off, c_base, c_off, o0, grow, r_ok, O, seed,
                                drop_p, keep_scale, eps, sqrt_eps, FACTOR, DROPOUT, False,
                                BLOCK_O, BLOCK_F)
            _store_rows(out_base, rr, r_ok, o0, s, o_ok, stride_or, BLOCK_O)
    else:
        mx = tl.zeros((BLOCK_R,), dtype=acc_dtype)
        ssq = tl.zeros((BLOCK_R,), dtype=acc_dtype)
        # Pass 1: the norm.  Pass 2: recompute t (A and C again, from L2) and store.  A
        # row that fits one block (ONE_BLOCK) keeps t in registers and skips pass 2 (a
        # tensor made inside a compiled loop does not outlive it: hence no shared loop).
        if ONE_BLOCK:
            t, o_ok = _pooled_t(a_base, a_off, c_base, c_off, 0, grow, r_ok, O, seed,
                                drop_p, keep_scale, eps, sqrt_eps, FACTOR, DROPOUT, True,
                                BLOCK_O, BLOCK_F)
            mx, ssq = _scaled_sumsq(t, mx, ssq)
        else:
            for o0 in range(0, O, BLOCK_O):
                tb, _ = _pooled_t(a_base, a_off, c_base, c_off, o0, grow, r_ok, O, seed,
                                  drop_p, keep_scale, eps, sqrt_eps, FACTOR, DROPOUT, True,
                                  BLOCK_O, BLOCK_F)
                mx, ssq = _scaled_sumsq(tb, mx, ssq)
        norm = mx * tl.sqrt(ssq)
        inv = 1.0 / tl.maximum(norm, _NORM_DELTA)
        if ONE_BLOCK:
            _store_rows(out_base, rr, r_ok, 0, t * inv[:, None], o_ok, stride_or, BLOCK_O)
        else:
            for o0 in range(0, O, BLOCK_O):
                t, o_ok = _pooled_t(a_base, a_off, c_base, c_off, o0, grow, r_ok, O, seed,
                                    drop_p, keep_scale, eps, sqrt_eps, FACTOR, DROPOUT, True,
                                    BLOCK_O, BLOCK_F)
                _store_rows(out_base, rr, r_ok, o0, t * inv[:, None], o_ok, stride_or,
                            BLOCK_O)
        tl.store(norm_ptr + row0 + rr, norm, mask=r_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _pooled_grad(g_base, z_base, o0, rr, r_ok, O, norm, zg, stride_gr, stride_zr, sqrt_eps,
                 NORMALIZE: tl.constexpr, BLOCK_O: tl.constexpr):
    """``ds = dL/ds`` for one output block, ``(BLOCK_R, BLOCK_O)``, zero outside."""
    ACC = tl.float64 if g_base.dtype.element_ty == tl.float64 else tl.float32
    jj = o0 + tl.arange(0, BLOCK_O)
    msk = r_ok[:, None] & (jj < O)[None, :]
    g = tl.load(g_base + rr[:, None] * stride_gr + jj[None, :], mask=msk, other=0.0).to(ACC)
    if NORMALIZE:
        z = tl.load(z_base + rr[:, None] * stride_zr + jj[None, :], mask=msk,
                    other=0.0).to(ACC)
        r = tl.maximum(norm, _NORM_DELTA)
        # d z / d t: project out z and divide by r; a degenerate row (norm <= delta) gets
        # zero gradient, the convention of reference.py (finite in every dtype).
        dt = tl.where((norm > _NORM_DELTA)[:, None], (g - z * zg[:, None]) / r[:, None],
                      0.0)
        t = z * r[:, None]  # exact in both branches: s is never needed
        return dt * (0.5 / (tl.abs(t) + sqrt_eps))
    return g


@triton.jit
def _split_bwd_kernel(
    # pointers (da/dc may alias a/c: each element is read before it is written)
    g_ptr, z_ptr, norm_ptr, a_ptr, c_ptr, da_ptr, dc_ptr,
    # sizes
    rows, O, row_offset, D1,
    # strides and row maps (in rows) of a, c, da, dc
    stride_gr, stride_zr, stride_ar, stride_cr, stride_dar, stride_dcr,
    a_s0, a_s1, c_s0, c_s1, da_s0, da_s1, dc_s0, dc_s1,
    # scalars
    seed, drop_p, keep_scale, sqrt_eps,
    # meta-parameters
    FACTOR: tl.constexpr, DROPOUT: tl.constexpr, NORMALIZE: tl.constexpr,
    BROADCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < rows - row0
    grow = row_offset + row0 + rr  # int64: the dropout index passes 2^31
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    g_base = g_ptr + row0 * stride_gr
    z_base = z_ptr + row0 * stride_zr
    a_base, a_off = _row_map(a_ptr, row0, rr, D1, a_s0, a_s1, stride_ar, BROADCAST)
    c_base, c_off = _row_map(c_ptr, row0, rr, D1, c_s0, c_s1, stride_cr, BROADCAST)
    da_base, da_off = _row_map(da_ptr, row0, rr, D1, da_s0, da_s1, stride_dar, BROADCAST)
    dc_base, dc_off = _row_map(dc_ptr, row0, rr, D1, dc_s0, dc_s1, stride_dcr, BROADCAST)
    norm = tl.zeros((BLOCK_R,), dtype=acc_dtype)
    zg = tl.zeros((BLOCK_R,), dtype=acc_dtype)
    if NORMALIZE:
        norm = tl.load(norm_ptr + row0 + rr, mask=r_ok, other=1.0).to(acc_dtype)
        # <z, g> per row, the only cross-column quantity of the backward.
        for o0 in range(0, O, BLOCK_O):
            jj = o0 + tl.arange(0, BLOCK_O)
            msk = r_ok[:, None] & (jj < O)[None, :]
            z = tl.load(z_base + rr[:, None] * stride_zr + jj[None, :], mask=msk, other=0.0)
            g = tl.load(g_base + rr[:, None] * stride_gr + jj[None, :], mask=msk, other=0.0)
            zg += tl.sum(z.to(acc_dtype) * g.to(acc_dtype), axis=1)
    for o0 in range(0, O, BLOCK_O):
        ds = _pooled_grad(g_base, z_base, o0, rr, r_ok, O, norm, zg, stride_gr, stride_zr,
                          sqrt_eps, NORMALIZE, BLOCK_O)
        a_offs, cols, col_ok, _ = _tile_offsets(o0, a_off, O, FACTOR, BLOCK_O, BLOCK_F)
        c_offs, _, _, _ = _tile_offsets(o0, c_off, O, FACTOR, BLOCK_O, BLOCK_F)
        msk = r_ok[:, None, None] & col_ok[None, :, :]
        a = tl.load(a_base + a_offs, mask=msk, other=0.0).to(acc_dtype)
        c = tl.load(c_base + c_offs, mask=msk, other=0.0).to(acc_dtype)
        dp = ds[:, :, None]  # broadcast over the factor lanes by the products below
        if DROPOUT:
            dp = _dropped(dp, seed, grow, cols, O * FACTOR, drop_p, keep_scale)
        da_offs, _, _, _ = _tile_offsets(o0, da_off, O, FACTOR, BLOCK_O, BLOCK_F)
        dc_offs, _, _, _ = _tile_offsets(o0, dc_off, O, FACTOR, BLOCK_O, BLOCK_F)
        tl.store(da_base + da_offs, (dp * c).to(da_ptr.dtype.element_ty), mask=msk)
        tl.store(dc_base + dc_offs, (dp * a).to(dc_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------- launch settings


@dataclass(frozen=True)
class EpilogueConfig:
    """Tile of one epilogue launch: ``block_r`` rows x ``block_o`` outputs x ``block_f``
    factor lanes per program."""

    block_r: int
    block_o: int
    block_f: int
    num_warps: int

    @property
    def elements(self) -> int:
        return self.block_r * self.block_o * self.block_f


#: Elements per tile and tensor on a GPU.  8192 covers a whole MFB-default row
#: (o 1000 -> 1024 x 8 lanes) so the forward finishes in registers; with 8 warps that is
#: 32 elements per thread and tensor (A, C, then their fp32 product), no spills (see
#: triton_compile.py).  The interpreter gets tiny tiles so tests reach the multi-block
#: path with small widths.
GPU_TILE_ELEMENTS = 8192
INTERPRETER_TILE_ELEMENTS = 64


def pick_epilogue_config(rows: int, o: int, factor: int, limit=None) -> EpilogueConfig:
    """The tile for ``rows`` rows of ``o`` outputs (``limit``: elements per tile, by
    default the GPU's or the interpreter's)."""
    gpu = limit is not None or not INTERPRET
    if limit is None:
        limit = GPU_TILE_ELEMENTS if gpu else INTERPRETER_TILE_ELEMENTS
    block_f = triton.next_power_of_2(factor)
    block_o = max(1, min(triton.next_power_of_2(o), limit // block_f))
    # Short rows: several rows per program so each still moves a useful tile, but at most
    # a quarter of the single-row limit: many-row tiles cost more registers per element
    # (64 rows x 16 x 8 lanes spilled 104 B at 16 warps; 16 x 16 x 8 at 4 warps: 168
    # registers, no spill, sm_90 bf16 backward).
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)),
                         (limit // 4) // (block_o * block_f)))
    elements = block_r * block_o * block_f
    # ~16 elements per thread and tensor.  A row that takes several blocks (two passes)
    # keeps 8 warps: at 16 ptxas capped it at 64 registers and spilled 8 B (sm_90 bf16).
    max_warps = 16 if o <= block_o else 8
    num_warps = max(4, min(max_warps, elements // 512)) if gpu else 1
    return EpilogueConfig(block_r, block_o, block_f, num_warps)


def _check_unit_columns(*tensors):
    for t in tensors:
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError("split epilogue buffers must be row-major 2-D views")


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class RowMap:
    """Which buffer row broadcast row ``r = i0 * d1 + i1`` of a launch reads:
    ``i0 * s0 + i1 * s1`` (``s = 0`` along a dimension the operand is broadcast over).
    ``RowMap.plain(d1)`` is the identity."""

    s0: int
    s1: int

    @staticmethod
    def plain(d1: int) -> "RowMap":
        return RowMap(d1, 1)


_INT32_MAX = 2**31 - 1


def _broadcast_needed(cfg, d1, maps, bufs) -> bool:
    """Whether the kernel needs its int64 row-map path: a real broadcast, or plain rows
    whose in-tile offsets (``BLOCK_R`` rows of a buffer) would not fit int32."""
    if any(mp != RowMap.plain(d1) for mp in maps):
        return True
    return any(cfg.block_r * abs(b.stride(0)) + b.shape[1] > _INT32_MAX for b in bufs)


def epilogue_forward(a, c, out, norm, *, factor: int, dropout: float, seed, normalize: bool,
                     eps: float, row_offset: int = 0, d1: int = 1, a_map=None,
                     c_map=None) -> None:
    """Fill ``out (rows, o)`` (and ``norm (rows,)`` when normalising) from the projection
    buffers ``a, c (*, K*o)``, broadcast row ``r`` reading the rows ``a_map``/``c_map``
    give (default: row ``r`` itself).  ``row_offset`` is the global index of row 0
    (the dropout index)."""
    rows, o = out.shape
    if rows == 0:
        return
    _check_unit_columns(a, c, out)
    a_map, c_map = a_map or RowMap.plain(d1), c_map or RowMap.plain(d1)
    cfg = pick_epilogue_config(rows, o, factor)
    grid = (triton.cdiv(rows, cfg.block_r),)
    launch(_split_fwd_kernel, grid,
        a, c, out, norm if normalize else out,
        rows, o, row_offset, d1,
        a.stride(0), c.stride(0), out.stride(0), a_map.s0, a_map.s1, c_map.s0, c_map.s1,
        seed if seed is not None else 0, float(dropout), 1.0 / (1.0 - dropout), float(eps),
        math.sqrt(eps),
        FACTOR=factor, DROPOUT=seed is not None, NORMALIZE=normalize,
        ONE_BLOCK=o <= cfg.block_o,
        BROADCAST=_broadcast_needed(cfg, d1, (a_map, c_map), (a, c, out)),
        BLOCK_R=cfg.block_r, BLOCK_O=cfg.block_o, BLOCK_F=cfg.block_f,
        num_warps=cfg.num_warps,
    )


def epilogue_backward(g, z, norm, a, c, da, dc, *, factor: int, dropout: float, seed,
                      normalize: bool, eps: float, row_offset: int = 0, d1: int = 1,
                      a_map=None, c_map=None, da_map=None, dc_map=None) -> None:
    """Write ``dA = dp * C`` into ``da`` and ``dC = dp * A`` into ``dc`` from
    ``g, z (rows, o)`` and ``norm (rows,)``; every buffer is ``(*, K*o)`` and read or
    written at the rows its map gives (``da``/``dc`` may be ``a``/``c`` themselves when
    their maps are the same: each element is read before it is written)."""
    rows, o = g.shape
    if rows == 0:
        return
    _check_unit_columns(g, z, a, c, da, dc)
    maps = [mp or RowMap.plain(d1) for mp in (a_map, c_map, da_map, dc_map)]
    cfg = pick_epilogue_config(rows, o, factor)
    grid = (triton.cdiv(rows, cfg.block_r),)
    launch(_split_bwd_kernel, grid,
        g, z, norm if normalize else g, a, c, da, dc,
        rows, o, row_offset, d1,
        g.stride(0), z.stride(0), a.stride(0), c.stride(0), da.stride(0), dc.stride(0),
        *(v for mp in maps for v in (mp.s0, mp.s1)),
        seed if seed is not None else 0, float(dropout), 1.0 / (1.0 - dropout),
        math.sqrt(eps),
        FACTOR=factor, DROPOUT=seed is not None, NORMALIZE=normalize,
        BROADCAST=_broadcast_needed(cfg, d1, maps, (g, z, a, c, da, dc)),
        BLOCK_R=cfg.block_r, BLOCK_O=cfg.block_o, BLOCK_F=cfg.block_f,
        num_warps=cfg.num_warps,
    )
