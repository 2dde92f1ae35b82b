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

Dropout keeps element ``(row, col)`` of the ``(rows, K*o)`` product by the shared
stream of :mod:`triton_dropout` (word ``col % 4`` of one Philox call per four columns
of a row, int64 rows): the same draw as the fused kernels in :mod:`triton_kernels` and
:mod:`triton_wide`, so every strategy gives the same mask for one seed (tested), and
``backend="auto"`` switching between them never changes the random stream.  ``row``
is the global row: launchers pass the chunk's first row.

Projection activations (``ACTIVATION``: 0 none, 1 relu, 2 tanh) act on ``A`` and ``C``
as the kernels load them, so the buffers hold (and ``save_projections`` keeps) the
*pre-activation* GEMM outputs.  Backward loads the pre-activation values too and
multiplies ``dp * act(C)`` by ``act'(A)`` in registers: relu' = 1[A > 0] (0 at the
kink, PyTorch's convention), tanh' = 1 - tanh(A)^2 from the recomputed tanh (the
formula of PyTorch's tanh backward).  Exact, and no second buffer per projection.
``tanh`` is written with ``tl.exp`` (:func:`_tanh`): libdevice does not run in the
interpreter, and one code path is what the CPU tests check.

Joint normalisation (``norm_dims > 1``: one norm per group of consecutive rows) is
left to the launchers' callers (``split_backend``): forward runs this kernel unchanged
(each row normalised by its own norm, the row norms stored), and the caller rescales
each row by ``||t_row|| / ||t_group||``; backward gets each row's group norm and
group ``<z, g>`` precomputed (``GROUP_ZG``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import ACTIVATION_CODES
from .triton_kernels import INTERPRET, NORM_DELTA, _clamp_norm, launch, one_cta_registers
from .triton_dropout import keep_elements

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
    The shared stream (:mod:`triton_dropout`), as ``triton_kernels._keep_mask``."""
    keep = keep_elements(seed, grow[:, None, None], cols[None, :, :].to(tl.int64), KO, drop_p)
    return tl.where(keep, p * keep_scale, 0.0)


@triton.jit
def _tanh(x):
    """``tanh`` of an fp32/fp64 tensor, within ~3 ulp (measured against a correctly
    rounded tanh with an exact ``exp``; a GPU's fast fp32 ``exp`` adds its own ulp or two).

    ``|x| >= 1/4``: ``1 - 2 / (exp(2|x|) + 1)``, whose cancellation costs at most ~3x
    the rounding at ``tanh(1/4) = 0.245``; ``|x|`` is capped at 20 first (tanh is 1 to
    fp64's precision there) so ``exp`` never overflows.
    ``|x| < 1/4``: the odd Taylor series ``x + x^3 (c3 + c5 x^2 + ...)``, truncated
    where the next term is below the dtype's rounding (fp32: through x^9, next term
    < 1e-8 relative; fp64: through x^21, < 1e-17).  NaN propagates.
    """
    ax = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp(2.0 * tl.where(ax > 20.0, 20.0, ax)) + 1.0)  # NaN stays NaN
    x2 = ax * ax
    if x.dtype == tl.float64:
        p = -1.0 / 3.0 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397 + x2 * (
            0.021869488536155203 + x2 * (-0.008863235529902197 + x2 * (
                0.003592128036572481 + x2 * (-0.0014558343870513183 + x2 * (
                    0.000590027440945586 + x2 * (-0.00023912911424355248
                                                 + x2 * 9.691537956929451e-05))))))))
    else:
        p = -1.0 / 3.0 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                            + x2 * 0.021869488536155203))
    th = tl.where(ax < 0.25, ax + ax * x2 * p, big)
    return tl.where(x < 0, -th, th)


@triton.jit
def _activate(v, ACTIVATION: tl.constexpr):
    """``act(v)`` for a loaded projection tile (in the accumulation dtype)."""
    if ACTIVATION == 1:
        return tl.where(v < 0, 0.0, v)  # relu; NaN stays NaN, as in torch.relu
    elif ACTIVATION == 2:
        return _tanh(v)
    else:
        return v


@triton.jit
def _activate_with_grad(v, ACTIVATION: tl.constexpr):
    """``(act(v), act'(v))`` for a pre-activation tile (``ACTIVATION`` 1 or 2)."""
    if ACTIVATION == 1:
        return tl.where(v < 0, 0.0, v), tl.where(v > 0, 1.0, 0.0)
    else:
        th = _tanh(v)
        return th, 1.0 - th * th


@triton.jit
def _pooled_t(a_base, a_off, c_base, c_off, o0, grow, r_ok, O, seed, drop_p, keep_scale,
              eps, sqrt_eps, FACTOR: tl.constexpr, DROPOUT: tl.constexpr,
              NORMALIZE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
              ACTIVATION: tl.constexpr):
    """One output block: ``s`` pooled (or ``t = signed_sqrt(s)`` when normalising),
    ``(BLOCK_R, BLOCK_O)`` in the accumulation dtype, zero outside the valid tile
    (masked lanes load 0, and act(0) = 0 for every activation)."""
    acc_dtype = tl.float64 if a_base.dtype.element_ty == tl.float64 else tl.float32
    a_offs, cols, col_ok, o_ok = _tile_offsets(o0, a_off, O, FACTOR, BLOCK_O, BLOCK_F)
    c_offs, _, _, _ = _tile_offsets(o0, c_off, O, FACTOR, BLOCK_O, BLOCK_F)
    msk = r_ok[:, None, None] & col_ok[None, :, :]
    a = _activate(tl.load(a_base + a_offs, mask=msk, other=0.0).to(acc_dtype), ACTIVATION)
    c = _activate(tl.load(c_base + c_offs, mask=msk, other=0.0).to(acc_dtype), ACTIVATION)
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
def _split_fwd_dropin_kernel(
    # pointers
    a_ptr, c_ptr, out_ptr, norm_ptr,
    # sizes (D1: inner broadcast group size, see _row_map)
    rows, O, row_offset, D1,
    # strides (unit column strides: the launcher's buffers are row-major); a_s0.. are
    # the row maps of the two projections, in rows
    stride_ar, stride_cr, stride_or, a_s0, a_s1, c_s0, c_s1,
    # scalars
    seed, drop_p, keep_scale: tl.float64, eps: tl.float64, sqrt_eps: tl.float64,
    # meta-parameters
    FACTOR: tl.constexpr, DROPOUT: tl.constexpr, NORMALIZE: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BROADCAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
    # 0 none, 1 relu, 2 tanh (_common.ACTIVATION_CODES)
    ACTIVATION: tl.constexpr = 0,
):
    """The forward epilogue with a projection activation (see _split_fwd_kernel)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < rows - row0
    grow = row_offset + row0 + rr  # int64: the dropout index passes 2^31
    a_base, a_off = _row_map(a_ptr, row0, rr, D1, a_s0, a_s1, stride_ar, BROADCAST)
    c_base, c_off = _row_map(c_ptr, row0, rr, D1, c_s0, c_s1, stride_cr, BROADCAST)
    out_base = out_ptr + row0 * stride_or
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    # fp64 arguments (Triton would type a Python float fp32, rounding fp64 runs'
    # scalars): converted once to the accumulation dtype, exact for fp64.
    keep_scale = tl.full((), keep_scale, acc_dtype)
    eps = tl.full((), eps, acc_dtype)
    sqrt_eps = tl.full((), sqrt_eps, acc_dtype)
    if not NORMALIZE:
        for o0 in range(0, O, BLOCK_O):
            s, o_ok = _pooled_t(a_base, a_off, c_base, c_off, o0, grow, r_ok, O, seed,
                                drop_p, keep_scale, eps, sqrt_eps, FACTOR, DROPOUT, False,
                                BLOCK_O, BLOCK_F, ACTIVATION)
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
                                BLOCK_O, BLOCK_F, ACTIVATION)
            mx, ssq = _scaled_sumsq(t, mx, ssq)
        else:
            for o0 in range(0, O, BLOCK_O):
                tb, _ = _pooled_t(a_base, a_off, c_base, c_off, o0, grow, r_ok, O, seed,
                                  drop_p, keep_scale, eps, sqrt_eps, FACTOR, DROPOUT, True,
                                  BLOCK_O, BLOCK_F, ACTIVATION)
                mx, ssq = _scaled_sumsq(tb, mx, ssq)
        norm = mx * tl.sqrt(ssq)
        inv = 1.0 / _clamp_norm(norm)
        if ONE_BLOCK:
            _store_rows(out_base, rr, r_ok, 0, t * inv[:, None], o_ok, stride_or, BLOCK_O)
        else:
            for o0 in range(0, O, BLOCK_O):
                t, o_ok = _pooled_t(a_base, a_off, c_base, c_off, o0, grow, r_ok, O, seed,
                                    drop_p, keep_scale, eps, sqrt_eps, FACTOR, DROPOUT, True,
                                    BLOCK_O, BLOCK_F, ACTIVATION)
                _store_rows(out_base, rr, r_ok, o0, t * inv[:, None], o_ok, stride_or,
                            BLOCK_O)
        tl.store(norm_ptr + row0 + rr, norm, mask=r_ok)


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
    seed, drop_p, keep_scale: tl.float64, eps: tl.float64, sqrt_eps: tl.float64,
    # meta-parameters
    FACTOR: tl.constexpr, DROPOUT: tl.constexpr, NORMALIZE: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BROADCAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """The forward epilogue without activation: the kernel launched by default.

    A separate entry point with the original signature rather than a defaulted
    constexpr: ``triton.compile`` (``ASTSource``, used by triton_compile.py) needs every
    kernel argument in its signature or constants and ignores Python defaults, so a
    new parameter would break the existing compile entries.  Same code (inlined)."""
    _split_fwd_dropin_kernel(
        a_ptr, c_ptr, out_ptr, norm_ptr, rows, O, row_offset, D1,
        stride_ar, stride_cr, stride_or, a_s0, a_s1, c_s0, c_s1,
        seed, drop_p, keep_scale, eps, sqrt_eps,
        FACTOR, DROPOUT, NORMALIZE, ONE_BLOCK, BROADCAST, BLOCK_R, BLOCK_O, BLOCK_F, 0)


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
        r = _clamp_norm(norm)
        # d z / d t: project out z and divide by r; a degenerate row (norm <= delta) gets
        # zero gradient, the convention of reference.py (finite in every dtype).
        dt = tl.where((norm > _NORM_DELTA)[:, None], (g - z * zg[:, None]) / r[:, None],
                      0.0)
        t = z * r[:, None]  # exact in both branches: s is never needed
        return dt * (0.5 / (tl.abs(t) + sqrt_eps))
    return g


@triton.jit
def _split_bwd_dropin_kernel(
    # pointers (da/dc may alias a/c: each element is read before it is written)
    g_ptr, z_ptr, norm_ptr, a_ptr, c_ptr, da_ptr, dc_ptr,
    # sizes
    rows, O, row_offset, D1,
    # strides and row maps (in rows) of a, c, da, dc
    stride_gr, stride_zr, stride_ar, stride_cr, stride_dar, stride_dcr,
    a_s0, a_s1, c_s0, c_s1, da_s0, da_s1, dc_s0, dc_s1,
    # scalars
    seed, drop_p, keep_scale: tl.float64, sqrt_eps: tl.float64,
    # meta-parameters
    FACTOR: tl.constexpr, DROPOUT: tl.constexpr, NORMALIZE: tl.constexpr,
    BROADCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_F: tl.constexpr,
    # ACTIVATION as in the forward: a/c hold the pre-activation projections and da/dc
    # receive the gradients w.r.t. them.  GROUP_ZG (norm_dims > 1): norm_ptr points at
    # (rows, 2) pairs (the row's group norm, its group's <z, g>), summed over the group
    # by the caller, so the kernel skips its own per-row <z, g>.
    ACTIVATION: tl.constexpr = 0, GROUP_ZG: tl.constexpr = False,
):
    """The backward epilogue with the drop-in options (see _split_bwd_kernel)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < rows - row0
    grow = row_offset + row0 + rr  # int64: the dropout index passes 2^31
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    # fp64 arguments, converted once (see _split_fwd_dropin_kernel).
    keep_scale = tl.full((), keep_scale, acc_dtype)
    sqrt_eps = tl.full((), sqrt_eps, acc_dtype)
    g_base = g_ptr + row0 * stride_gr
    z_base = z_ptr + row0 * stride_zr
    a_base, a_off = _row_map(a_ptr, row0, rr, D1, a_s0, a_s1, stride_ar, BROADCAST)
    c_base, c_off = _row_map(c_ptr, row0, rr, D1, c_s0, c_s1, stride_cr, BROADCAST)
    da_base, da_off = _row_map(da_ptr, row0, rr, D1, da_s0, da_s1, stride_dar, BROADCAST)
    dc_base, dc_off = _row_map(dc_ptr, row0, rr, D1, dc_s0, dc_s1, stride_dcr, BROADCAST)
    norm = tl.zeros((BLOCK_R,), dtype=acc_dtype)
    zg = tl.zeros((BLOCK_R,), dtype=acc_dtype)
    if NORMALIZE and GROUP_ZG:
        pair = norm_ptr + 2 * (row0 + rr)
        norm = tl.load(pair, mask=r_ok, other=1.0).to(acc_dtype)
        zg = tl.load(pair + 1, mask=r_ok, other=0.0).to(acc_dtype)
    elif NORMALIZE:
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
        if ACTIVATION != 0:
            # Gradients w.r.t. the pre-activations: dp * act(other) * act'(own).
            a, a_grad = _activate_with_grad(a, ACTIVATION)
            c, c_grad = _activate_with_grad(c, ACTIVATION)
            da = dp * c * a_grad
            dc = dp * a * c_grad
        else:
            da = dp * c
            dc = dp * a
        da_offs, _, _, _ = _tile_offsets(o0, da_off, O, FACTOR, BLOCK_O, BLOCK_F)
        dc_offs, _, _, _ = _tile_offsets(o0, dc_off, O, FACTOR, BLOCK_O, BLOCK_F)
        tl.store(da_base + da_offs, da.to(da_ptr.dtype.element_ty), mask=msk)
        tl.store(dc_base + dc_offs, dc.to(dc_ptr.dtype.element_ty), mask=msk)


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
    seed, drop_p, keep_scale: tl.float64, sqrt_eps: tl.float64,
    # meta-parameters
    FACTOR: tl.constexpr, DROPOUT: tl.constexpr, NORMALIZE: tl.constexpr,
    BROADCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """The backward epilogue without activation or joint norm: launched by default, with
    the original signature (why: _split_fwd_kernel)."""
    _split_bwd_dropin_kernel(
        g_ptr, z_ptr, norm_ptr, a_ptr, c_ptr, da_ptr, dc_ptr, rows, O, row_offset, D1,
        stride_gr, stride_zr, stride_ar, stride_cr, stride_dar, stride_dcr,
        a_s0, a_s1, c_s0, c_s1, da_s0, da_s1, dc_s0, dc_s1,
        seed, drop_p, keep_scale, sqrt_eps,
        FACTOR, DROPOUT, NORMALIZE, BROADCAST, BLOCK_R, BLOCK_O, BLOCK_F, 0, False)


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


def pick_epilogue_config(rows: int, o: int, factor: int, limit=None,
                         activation=None) -> EpilogueConfig:
    """The tile for ``rows`` rows of ``o`` outputs (``limit``: elements per tile, by
    default the GPU's or the interpreter's) of the kernels with ``activation``."""
    gpu = limit is not None or not INTERPRET
    if limit is None:
        limit = GPU_TILE_ELEMENTS if gpu else INTERPRETER_TILE_ELEMENTS
    block_f = triton.next_power_of_2(factor)
    block_o = max(1, min(triton.next_power_of_2(o), limit // block_f))
    # An activation's temporaries (tanh's series and exp form, then its derivative) are
    # live beside A and C.  Tiles the row does not fit anyway shrink for them: at full
    # size the tanh forward of a wide row (o 4000) and the backward of co-attention with
    # short rows reached 255 registers, ptxas's cap (sm_80/sm_90, Triton 3.8).  Wide
    # rows take a quarter-width block (4 warps, 16 elements per thread: <= 139
    # registers; half width at 8 warps made ptxas cap itself at 48-64 and spill 8 B on
    # sm_90 fp32).  A row that fits one block (the MFB default) keeps it: splitting it
    # would cost the second pass over A and C.  (Registers are a GPU matter: the
    # interpreter keeps its tiles, whose count is what its run time follows.)
    slim = activation is not None and gpu
    if slim and o > block_o:
        block_o = max(1, block_o // 4)
    # Short rows: several rows per program so each still moves a useful tile, but at most
    # a quarter of the single-row limit: many-row tiles cost more registers per element
    # (64 rows x 16 x 8 lanes spilled 104 B at 16 warps; 16 x 16 x 8 at 4 warps: 168
    # registers, no spill, sm_90 bf16 backward); an eighth with an activation.
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)),
                         (limit // (8 if slim else 4)) // (block_o * block_f)))
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
                     c_map=None, activation=None) -> None:
    """Fill ``out (rows, o)`` (and ``norm (rows,)`` when normalising) from the projection
    buffers ``a, c (*, K*o)``, broadcast row ``r`` reading the rows ``a_map``/``c_map``
    give (default: row ``r`` itself).  ``row_offset`` is the global index of row 0
    (the dropout index).  ``activation`` (``None``, ``"relu"``, ``"tanh"``) acts on the
    loaded projections; ``out`` may be wider than ``a`` (fp32 for half projections)."""
    rows, o = out.shape
    if rows == 0:
        return
    _check_unit_columns(a, c, out)
    a_map, c_map = a_map or RowMap.plain(d1), c_map or RowMap.plain(d1)
    cfg = pick_epilogue_config(rows, o, factor, activation=activation)
    grid = (triton.cdiv(rows, cfg.block_r),)
    # The plain entry point unless an option needs the other (the two compile apart).
    options = {} if activation is None else {"ACTIVATION": ACTIVATION_CODES[activation]}
    launch(_split_fwd_dropin_kernel if options else _split_fwd_kernel, grid,
        a, c, out, norm if normalize else out,
        rows, o, row_offset, d1,
        a.stride(0), c.stride(0), out.stride(0), a_map.s0, a_map.s1, c_map.s0, c_map.s1,
        seed if seed is not None else 0, float(dropout), 1.0 / (1.0 - dropout), float(eps),
        math.sqrt(eps),
        FACTOR=factor, DROPOUT=seed is not None, NORMALIZE=normalize,
        ONE_BLOCK=o <= cfg.block_o,
        BROADCAST=_broadcast_needed(cfg, d1, (a_map, c_map), (a, c, out)),
        BLOCK_R=cfg.block_r, BLOCK_O=cfg.block_o, BLOCK_F=cfg.block_f, **options,
        num_warps=cfg.num_warps, **one_cta_registers(cfg.num_warps),
    )


def epilogue_backward(g, z, norm, a, c, da, dc, *, factor: int, dropout: float, seed,
                      normalize: bool, eps: float, row_offset: int = 0, d1: int = 1,
                      a_map=None, c_map=None, da_map=None, dc_map=None, activation=None,
                      group_zg: bool = False) -> None:
    """Write ``dA = dp * C`` into ``da`` and ``dC = dp * A`` into ``dc`` from
    ``g, z (rows, o)`` and ``norm (rows,)``; every buffer is ``(*, K*o)`` and read or
    written at the rows its map gives (``da``/``dc`` may be ``a``/``c`` themselves when
    their maps are the same: each element is read before it is written).

    ``activation``: ``a``/``c`` are pre-activation and ``da``/``dc`` get the gradients
    w.r.t. them.  ``group_zg``: ``norm`` is ``(rows, 2)``, each row's group norm and
    its group's ``<z, g>`` (joint normalisation)."""
    rows, o = g.shape
    if rows == 0:
        return
    _check_unit_columns(g, z, a, c, da, dc)
    if group_zg and not (normalize and norm.shape == (rows, 2) and norm.is_contiguous()):
        raise ValueError("group_zg needs normalize and a contiguous (rows, 2) norm buffer")
    maps = [mp or RowMap.plain(d1) for mp in (a_map, c_map, da_map, dc_map)]
    cfg = pick_epilogue_config(rows, o, factor, activation=activation)
    grid = (triton.cdiv(rows, cfg.block_r),)
    options = {}
    if activation is not None:
        options["ACTIVATION"] = ACTIVATION_CODES[activation]
    if group_zg:
        options["GROUP_ZG"] = True
    launch(_split_bwd_dropin_kernel if options else _split_bwd_kernel, grid,
        g, z, norm if normalize else g, a, c, da, dc,
        rows, o, row_offset, d1,
        g.stride(0), z.stride(0), a.stride(0), c.stride(0), da.stride(0), dc.stride(0),
        *(v for mp in maps for v in (mp.s0, mp.s1)),
        seed if seed is not None else 0, float(dropout), 1.0 / (1.0 - dropout),
        math.sqrt(eps),
        FACTOR=factor, DROPOUT=seed is not None, NORMALIZE=normalize,
        BROADCAST=_broadcast_needed(cfg, d1, maps, (g, z, a, c, da, dc)),
        BLOCK_R=cfg.block_r, BLOCK_O=cfg.block_o, BLOCK_F=cfg.block_f, **options,
        num_warps=cfg.num_warps,
    )
