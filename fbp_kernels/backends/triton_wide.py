"""The "wide" fused forward: one pass over K per projection feeding every factor group.

Why (PERFORMANCE.md, design 1): the first fused forward (:mod:`triton_kernels`) runs one
K loop per factor group, so a program reads its x and y tiles ``factor`` times (5x at
the MFB default, 32 FLOP per byte from L2) and pays ``2*factor`` pipeline fills.  Here a
program owns ``BLOCK_M`` rows x ``BLOCK_J`` outputs, whose ``BLOCK_J * K`` projected
columns ``j*K + i`` are *contiguous* rows of ``W`` (``K = factor``): one GEMM tile of
width ``BLOCK_N >= BLOCK_J * K`` (a power of two) covers every factor group, so x and y
are each read once per tile and the main loops are plain GEMM loops that Triton
pipelines: on sm_90 (half precision) 128 x 128 x 64 tiles with 16 warps, wgmma, and
operands through TMA tensor descriptors (4 stages, 96 KiB in flight, 64 FLOP per L2
byte); on sm_80 128 x 64 x 64 with cp.async and mma.sync.  Operands TMA cannot read
(stride along K not 1, base or row stride not 16-byte aligned) go through pointers,
per pair: (x, y) and (weights).

Pooling ``s_j = sum_i p[:, j*K + i]`` inside the tile, without a reshape by a factor
that is not a power of two: for ``K = 1`` it is the identity, for powers of two a
reshape and a sum, otherwise one small tensor-core product ``s = p @ S`` with the 0/1
selection matrix ``S[c, j] = (c // K == j)``, ``(BLOCK_N, BLOCK_JP)``.  Half inputs
split ``p`` into ``hi + lo`` bf16 parts (16 significant bits; ``S`` is exact in bf16),
so the pooled sums carry ~1e-5 relative error, far below the bf16/fp16 output's 4e-3 /
5e-4; fp32 and fp64 run the selection product in IEEE precision.  Its cost is
``2 * BLOCK_M * BLOCK_N * BLOCK_JP`` MACs per tile against ``BLOCK_M * BLOCK_N * (m+n)``
for the main loops (1-2% at the MFB default).

Row norm without a serial tail or cross-program state: the main kernel writes the
pooled ``s`` (fp32 scratch, ``rows x o``) and a second small kernel finishes each row
(signed square root, overflow-safe ``||t||``, rescale) with whole rows per program.
No counters, so CUDA graphs and concurrent streams are safe (the first kernel's cached
ticket counters are not).  Cost: writing and reading ``rows x o`` fp32 (8 bytes per
output, ~2 us at rows 1024 on an H200) and one more launch.

Backward (lean mode, nothing saved): a row kernel forms ``ds = dL/ds`` (rows x o, fp32)
from (g, z, ||t||); ``_wide_bwd_kernel`` recomputes A and C on the same main loop,
expands ds to the tile's projected columns by the pooling's transpose and writes
``dA = dp * C``, ``dC = dp * A`` as contiguous (BLOCK_M, BLOCK_N) blocks of row-major
(rows, K*o) buffers; cuBLAS then runs the four gradient GEMMs and the bias sums
(deterministic).  With saved projections the first kernel's backward still runs.

Dropout: the fused kernels' stream (Philox keyed by the seed and ``row * K*o + col``).
Grid: grouped row-tile order (Triton tutorial 03): ``GROUP_M`` row tiles share each
weight tile while it is in L2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_kernels import INTERPRET, launch
from .triton_split import _scaled_sumsq

_NORM_DELTA = tl.constexpr(1e-12)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _pool(p, FACTOR: tl.constexpr, POOL: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_JP: tl.constexpr, HALF_POOL: tl.constexpr):
    """Sum ``FACTOR`` consecutive columns of ``p (BLOCK_M, BLOCK_N)`` ->
    ``(BLOCK_M, BLOCK_JP)``.  POOL 0: identity (K = 1); 1: reshape (K a power of two);
    2: selection product."""
    if POOL == 0:
        s = p
    elif POOL == 1:
        s = tl.sum(tl.reshape(p, (BLOCK_M, BLOCK_N // FACTOR, FACTOR)), axis=2)
    else:
        cc = tl.arange(0, BLOCK_N)
        jj = tl.arange(0, BLOCK_JP)
        sel = (cc[:, None] // FACTOR) == jj[None, :]
        if HALF_POOL:
            # p = hi + lo in bf16: 16 significant bits through the tensor cores.
            hi = p.to(tl.bfloat16)
            lo = (p - hi.to(tl.float32)).to(tl.bfloat16)
            sel_h = sel.to(tl.bfloat16)
            s = tl.dot(hi, sel_h) + tl.dot(lo, sel_h)
        else:
            # fp32/fp64, and the interpreter for every dtype (it cannot multiply bf16).
            s = tl.dot(p, sel.to(p.dtype), input_precision="ieee", out_dtype=p.dtype)
    return s


@triton.jit
def _unpool(s, FACTOR: tl.constexpr, POOL: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_JP: tl.constexpr, HALF_POOL: tl.constexpr):
    """The transpose of :func:`_pool`: ``(BLOCK_M, BLOCK_JP) -> (BLOCK_M, BLOCK_N)`` with
    column ``c`` = ``s[:, c // FACTOR]`` (zero past the tile's outputs)."""
    if POOL == 0:
        e = s
    elif POOL == 1:
        e = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_M, BLOCK_N // FACTOR, FACTOR)),
                       (BLOCK_M, BLOCK_N))
    else:
        jj = tl.arange(0, BLOCK_JP)
        cc = tl.arange(0, BLOCK_N)
        sel = jj[:, None] == (cc[None, :] // FACTOR)
        if HALF_POOL:
            hi = s.to(tl.bfloat16)
            lo = (s - hi.to(tl.float32)).to(tl.bfloat16)
            sel_h = sel.to(tl.bfloat16)
            e = tl.dot(hi, sel_h) + tl.dot(lo, sel_h)
        else:
            e = tl.dot(s, sel.to(s.dtype), input_precision="ieee", out_dtype=s.dtype)
    return e


@triton.jit
def _wide_projection(in_src, w_src, row0, col0, rm, m_mask, rn, n_ok, width, stride_ir,
                     stride_ik, stride_wr, stride_wk, IN_DESC: tl.constexpr,
                     W_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``in[row0 + rm, :] @ w[col0 + rn, :]^T`` as a (BLOCK_M, BLOCK_N) fp32 (fp64) tile.

    ``IN_DESC`` / ``W_DESC``: the operand is a TMA tensor descriptor (block
    ``(BLOCK_M | BLOCK_N, BLOCK_K)``; rows and columns past its shape read as zeros, so
    no masks) instead of a pointer read through masks and strides (cp.async)."""
    if IN_DESC:
        acc_dtype: tl.constexpr = tl.float64 if in_src.dtype == tl.float64 else tl.float32
    else:
        acc_dtype: tl.constexpr = tl.float64 if in_src.dtype.element_ty == tl.float64 \
            else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    rk = tl.arange(0, BLOCK_K)
    if not IN_DESC:
        a_ptrs = in_src + row0 * stride_ir + rm[:, None] * stride_ir + rk[None, :] * stride_ik
    if not W_DESC:
        # Loaded already transposed, (BLOCK_K, BLOCK_N): tl.dot wants K x N.
        b_ptrs = w_src + col0 * stride_wr + rn[None, :] * stride_wr + rk[:, None] * stride_wk
    for k0 in range(0, width, BLOCK_K):
        if IN_DESC:
            a = in_src.load([row0, k0])
        else:
            k_ok = rk < width - k0
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
            a_ptrs += BLOCK_K * stride_ik
        if W_DESC:
            b = w_src.load([col0, k0]).T  # (BLOCK_K, BLOCK_N): a transposed smem view
        else:
            k_ok = rk < width - k0
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            b_ptrs += BLOCK_K * stride_wk
        if DOT_FP32:
            # The interpreter cannot multiply bf16 operands (it uses their raw bits).
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc_dtype)
    return acc


@triton.jit
def _wide_fwd_kernel(
    # operands: pointers, or TMA descriptors when X_DESC (x, y) / W_DESC (weights)
    x_src, y_src, wx_src, wy_src, bx_ptr, by_ptr, s_ptr,
    # sizes
    rows, M, N, O,
    # strides (unused for descriptor operands)
    stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk, stride_wyr, stride_wyk,
    stride_sr,
    # scalars
    seed, drop_p, keep_scale,
    # meta-parameters
    FACTOR: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, POOL: tl.constexpr,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_JP: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    X_DESC: tl.constexpr = False, W_DESC: tl.constexpr = False,
):
    # Grouped order: GROUP_M consecutive row tiles walk the output tiles together.
    pid = tl.program_id(0)
    num_m = tl.cdiv(rows, BLOCK_M)
    num_j = tl.cdiv(O, BLOCK_J)
    in_group = GROUP_M * num_j
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_j = (pid % in_group) // group_size

    # Tile origins: int32 where they are TMA coordinates (the launcher checks rows and
    # factor*o < 2^31), int64 where they scale a stride.
    row0_32 = pid_m * BLOCK_M
    row0 = row0_32.to(tl.int64)
    j0 = pid_j * BLOCK_J
    col0_32 = j0 * FACTOR  # first projected column of the tile
    col0 = col0_32.to(tl.int64)
    KO = O * FACTOR
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    # int32 compare (rows < 2^31): with int64 here the 16-warp tile spilled 112-184 B.
    m_mask = rm < rows - row0_32
    n_ok = (rn < BLOCK_J * FACTOR) & (rn < (O - j0) * FACTOR)

    a = _wide_projection(x_src, wx_src, row0_32 if X_DESC else row0,
                         col0_32 if W_DESC else col0, rm, m_mask, rn, n_ok, M,
                         stride_xr, stride_xk, stride_wxr, stride_wxk, X_DESC, W_DESC,
                         BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    if HAS_BIAS:
        a += tl.load(bx_ptr + col0_32 + rn, mask=n_ok, other=0.0).to(a.dtype)[None, :]
    if DROPOUT and HALF:
        # Half inputs: applied to A before the y pass rather than to the product (the same
        # kept elements of (row, col), the same 1/(1-p) scale), so the Philox temporaries
        # are live while only A is: after the product they pushed the 128 x 128 / 16-warp
        # tile past its 128-register cap (48-72 B of spills with Triton 3.6 and 3.8).
        # fp32/fp64 keep it on the product (on A, sm_90 fp32 spilled 8 B).
        idx = (row0 + rm)[:, None] * KO + (col0_32 + rn)[None, :]
        a = tl.where(tl.rand(seed, idx) >= drop_p, a * keep_scale, 0.0)
    if HALF:
        # Park A in the input dtype while C accumulates (16 instead of 32 registers per
        # thread at 128 x 128 / 16 warps); eager rounds its projections the same way.
        if X_DESC:
            a = a.to(x_src.dtype)
        else:
            a = a.to(x_src.dtype.element_ty)
    c = _wide_projection(y_src, wy_src, row0_32 if X_DESC else row0,
                         col0_32 if W_DESC else col0, rm, m_mask, rn, n_ok, N,
                         stride_yr, stride_yk, stride_wyr, stride_wyk, X_DESC, W_DESC,
                         BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    if HAS_BIAS:
        c += tl.load(by_ptr + col0_32 + rn, mask=n_ok, other=0.0).to(c.dtype)[None, :]
    p = a.to(c.dtype) * c
    if DROPOUT and not HALF:
        idx = (row0 + rm)[:, None] * KO + (col0_32 + rn)[None, :]
        p = tl.where(tl.rand(seed, idx) >= drop_p, p * keep_scale, 0.0)
    p = tl.where(n_ok[None, :], p, 0.0)
    s = _pool(p, FACTOR, POOL, BLOCK_M, BLOCK_N, BLOCK_JP, HALF and not DOT_FP32)
    jj = tl.arange(0, BLOCK_JP)
    j_ok = (jj < BLOCK_J) & (jj < O - j0)
    tl.store(s_ptr + row0 * stride_sr + rm[:, None] * stride_sr + (j0 + jj)[None, :], s,
             mask=m_mask[:, None] & j_ok[None, :])


@triton.jit
def _wide_bwd_kernel(
    # operands as in the forward, then the backward's inputs and outputs
    x_src, y_src, wx_src, wy_src, bx_ptr, by_ptr, ds_ptr, da_ptr, dc_ptr,
    # sizes
    rows, M, N, O,
    # strides
    stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk, stride_wyr, stride_wyk,
    stride_dr,
    # scalars
    seed, drop_p, keep_scale,
    # meta-parameters
    FACTOR: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    POOL: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_JP: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, X_DESC: tl.constexpr = False, W_DESC: tl.constexpr = False,
):
    """``dA = dp * C`` and ``dC = dp * A`` for one (BLOCK_M, BLOCK_N) tile of the
    (rows, K*o) products, A and C recomputed by the forward's main loop (one K pass per
    projection for every factor group), ``dp[r, col] = ds[r, col // K] * keep / (1-p)``
    with ``ds = dL/ds`` from :func:`_grad_pooled_kernel`.  dA/dC are stored as
    contiguous (BLOCK_M, BLOCK_N) blocks of row-major (rows, K*o) buffers."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(rows, BLOCK_M)
    num_j = tl.cdiv(O, BLOCK_J)
    in_group = GROUP_M * num_j
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_j = (pid % in_group) // group_size

    row0_32 = pid_m * BLOCK_M
    row0 = row0_32.to(tl.int64)
    j0 = pid_j * BLOCK_J
    col0_32 = j0 * FACTOR
    col0 = col0_32.to(tl.int64)
    KO = O * FACTOR
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    m_mask = rm < rows - row0_32
    n_ok = (rn < BLOCK_J * FACTOR) & (rn < (O - j0) * FACTOR)

    a = _wide_projection(x_src, wx_src, row0_32 if X_DESC else row0,
                         col0_32 if W_DESC else col0, rm, m_mask, rn, n_ok, M,
                         stride_xr, stride_xk, stride_wxr, stride_wxk, X_DESC, W_DESC,
                         BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    if HAS_BIAS:
        a += tl.load(bx_ptr + col0_32 + rn, mask=n_ok, other=0.0).to(a.dtype)[None, :]
    acc_dtype: tl.constexpr = a.dtype
    if HALF:
        park: tl.constexpr = x_src.dtype if X_DESC else x_src.dtype.element_ty
    else:
        park: tl.constexpr = acc_dtype
    a = a.to(park)
    if DROPOUT:
        # The keep mask (0/1, exact in any dtype), drawn while only A is live and parked
        # beside it; the 1/(1-p) scale is applied to ds in the accumulator dtype.
        idx = (row0 + rm)[:, None] * KO + (col0_32 + rn)[None, :]
        keep = (tl.rand(seed, idx) >= drop_p).to(park)
    c = _wide_projection(y_src, wy_src, row0_32 if X_DESC else row0,
                         col0_32 if W_DESC else col0, rm, m_mask, rn, n_ok, N,
                         stride_yr, stride_yk, stride_wyr, stride_wyk, X_DESC, W_DESC,
                         BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    if HAS_BIAS:
        c += tl.load(by_ptr + col0_32 + rn, mask=n_ok, other=0.0).to(c.dtype)[None, :]
    c = c.to(park)

    # ds = dL/ds over the tile's outputs, (BLOCK_M, BLOCK_JP), then expanded to its
    # projected columns (col -> output col // K) by the pooling's transpose: whole-row
    # loads of the pooled tensor instead of a per-column gather (64-bit addresses for
    # every element), and ds formed beforehand (loading g, z, ||t||, z.g here spilled
    # the factor-1 and -2 builds).
    jj = tl.arange(0, BLOCK_JP)
    j_ok = (jj < BLOCK_J) & (jj < O - j0)
    ds = tl.load(ds_ptr + row0 * stride_dr + rm[:, None] * stride_dr + (j0 + jj)[None, :],
                 mask=m_mask[:, None] & j_ok[None, :], other=0.0).to(acc_dtype)
    ds = _unpool(ds, FACTOR, POOL, BLOCK_M, BLOCK_N, BLOCK_JP, HALF and not DOT_FP32)
    if DROPOUT:
        ds = ds * keep.to(acc_dtype) * keep_scale
    ds = tl.where(n_ok[None, :], ds, 0.0)
    tile_ok = m_mask[:, None] & n_ok[None, :]
    # int64 tile origin, int32 in-tile offsets (BLOCK_M * K*o < 2^31: launcher check)
    base = row0 * KO + col0_32
    offs = rm[:, None] * KO + rn[None, :]
    tl.store(da_ptr + base + offs, (ds * c.to(acc_dtype)).to(da_ptr.dtype.element_ty),
             mask=tile_ok)
    tl.store(dc_ptr + base + offs, (ds * a.to(acc_dtype)).to(dc_ptr.dtype.element_ty),
             mask=tile_ok)


@triton.jit
def _grad_pooled_kernel(g_ptr, z_ptr, norm_ptr, ds_ptr, O, stride_gr, stride_zr, stride_dr,
                        sqrt_eps, BLOCK_O: tl.constexpr):
    """One row per program: ``ds = dL/ds`` from the cotangent ``g``, the output ``z`` and
    ``||t||``: ``dt = (g - z <z, g>) / r`` (zero for a degenerate row, ``r <= delta``),
    ``ds = dt * 0.5 / (|t| + sqrt(eps))`` with ``t = z r``."""
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = ds_ptr.dtype.element_ty
    zg = tl.zeros((BLOCK_O,), dtype=acc_dtype)
    for o0 in range(0, O, BLOCK_O):
        jj = o0 + tl.arange(0, BLOCK_O)
        ok = jj < O
        g = tl.load(g_ptr + row * stride_gr + jj, mask=ok, other=0.0).to(acc_dtype)
        z = tl.load(z_ptr + row * stride_zr + jj, mask=ok, other=0.0).to(acc_dtype)
        zg += z * g
    dot = tl.sum(zg, axis=0)
    norm = tl.load(norm_ptr + row)
    r = tl.maximum(norm, _NORM_DELTA)
    live = norm > _NORM_DELTA
    for o0 in range(0, O, BLOCK_O):
        jj = o0 + tl.arange(0, BLOCK_O)
        ok = jj < O
        g = tl.load(g_ptr + row * stride_gr + jj, mask=ok, other=0.0).to(acc_dtype)
        z = tl.load(z_ptr + row * stride_zr + jj, mask=ok, other=0.0).to(acc_dtype)
        dt = tl.where(live, (g - z * dot) / r, 0.0)
        tl.store(ds_ptr + row * stride_dr + jj, dt * (0.5 / (tl.abs(z * r) + sqrt_eps)),
                 mask=ok)


@triton.jit
def _finish_kernel(s_ptr, out_ptr, norm_ptr, rows, O, stride_sr, stride_or, eps, sqrt_eps,
                   NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """Whole rows per program: ``z = t / max(||t||, delta)``, ``t = signed_sqrt(s)``,
    with the overflow-safe running-max norm; or ``s`` cast when not normalising."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < rows - row0
    s_base = s_ptr + row0 * stride_sr
    out_base = out_ptr + row0 * stride_or
    acc_dtype = s_ptr.dtype.element_ty
    mx = tl.zeros((BLOCK_R,), dtype=acc_dtype)
    ssq = tl.zeros((BLOCK_R,), dtype=acc_dtype)
    inv = tl.full((BLOCK_R,), 1.0, dtype=acc_dtype)
    if NORMALIZE:
        for o0 in range(0, O, BLOCK_O):
            jj = o0 + tl.arange(0, BLOCK_O)
            msk = r_ok[:, None] & (jj < O)[None, :]
            s = tl.load(s_base + rr[:, None] * stride_sr + jj[None, :], mask=msk, other=0.0)
            t = s / (tl.sqrt(tl.abs(s) + eps) + sqrt_eps)
            mx, ssq = _scaled_sumsq(t, mx, ssq)
        norm = mx * tl.sqrt(ssq)
        tl.store(norm_ptr + row0 + rr, norm, mask=r_ok)
        inv = 1.0 / tl.maximum(norm, _NORM_DELTA)
    for o0 in range(0, O, BLOCK_O):
        jj = o0 + tl.arange(0, BLOCK_O)
        msk = r_ok[:, None] & (jj < O)[None, :]
        s = tl.load(s_base + rr[:, None] * stride_sr + jj[None, :], mask=msk, other=0.0)
        if NORMALIZE:
            s = s / (tl.sqrt(tl.abs(s) + eps) + sqrt_eps) * inv[:, None]
        tl.store(out_base + rr[:, None] * stride_or + jj[None, :],
                 s.to(out_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------- launch settings


@dataclass(frozen=True)
class WideConfig:
    """Tile of the wide forward: BLOCK_M rows x BLOCK_N projected columns, K step;
    ``tma``: read operands through TMA tensor descriptors where they qualify
    (:func:`descriptor_ok`)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    tma: bool = False


#: Per target and operand family (compile facts from triton_compile.py, bf16, K = 5):
#:
#: - ``sm90-half``: 128 x 128 x 64, 16 warps (four warpgroups of wgmma m64n64), 4 stages
#:   of 32 KiB through TMA.  64 FLOP per byte from L2 (a 128 x 64 tile has 42.7), 96 KiB
#:   in flight, 119-127 registers of the 128 that 512 threads may hold, no spills with
#:   Triton 3.6 and 3.8, 128 KiB of shared memory: one CTA per SM.  8 warps at this
#:   tile need 255 registers and spill (8-48 B); so did 16 warps with dropout applied
#:   after the product (48-72 B), hence the mask on A before the y pass.
#: - ``half`` (sm_80, where there is no TMA: cp.async): 128 x 64 x 64, 8 warps,
#:   4 stages (3 in flight, 72 KiB), mma.sync; 128 x 128 spills there (104-280 B).
#:   Also sm_90's tile at rows <= SMALL_ROWS: twice the output tiles (84 instead of 40 at
#:   o = 1000, factor 5) for 132 SMs when a single row tile exists; the cost model puts
#:   rows = 1 at 18 us with it against 31 us with the 128 x 128 tile (H200, bf16).
#: - ``fp32``: tl.dot on FMA units with operands in registers (IEEE, PyTorch's default):
#:   64 x 64 x 32 with 8 warps, 104-128 registers, no spills (4 warps spilled 40-56 B on
#:   sm_90 with Triton 3.6).
WIDE_CONFIGS = {
    "sm90-half": WideConfig(block_m=128, block_n=128, block_k=64, num_warps=16, num_stages=4,
                            tma=True),
    "half": WideConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=4),
    "fp32": WideConfig(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=3),
}
#: The backward products kernel (same main loop, a heavier epilogue: A, C, the dropout
#: scale and ds live together).  The 16-warp 128 x 128 tile spills there (72-480 B with
#: Triton 3.6 and 3.8) so half precision runs 128 x 64 x 64 with 8 warps (42.7 FLOP/B),
#: through TMA on sm_90: 163-243 registers, no spills; fp32 64 x 64 x 32 with 8 warps and
#: 2 stages, 122-190 registers (64 x 64 x 16 with 3 stages spilled 8 B on sm_90 with
#: Triton 3.6).
WIDE_BWD_CONFIGS = {
    "sm90-half": WideConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=4,
                            tma=True),
    "half": WideConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=4),
    "fp32": WideConfig(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=2),
}
#: The interpreter runs the descriptor path wherever operands qualify (the shared suites
#: then cover it); tests replace this with ``tma=False`` to pin the pointer path.
INTERPRETER_WIDE = WideConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1,
                              group_m=2, tma=True)


def pool_mode(factor: int) -> int:
    if factor == 1:
        return 0
    return 1 if factor & (factor - 1) == 0 else 2


def tile_outputs(cfg: WideConfig, factor: int):
    """``(BLOCK_J, BLOCK_JP)``: outputs per tile and the width of the pooled tile (a
    power of two; >= 16 for the selection product, which tl.dot needs)."""
    block_j = cfg.block_n // factor
    if pool_mode(factor) < 2:
        return block_j, block_j
    return block_j, max(16, triton.next_power_of_2(block_j))


#: Row counts up to which sm_90 runs the narrower ``half`` tile (see WIDE_CONFIGS).
SMALL_ROWS = 64


def config_family(dtype: torch.dtype, capability=(9, 0), rows=None) -> str:
    """The ``WIDE_CONFIGS`` key for a dtype on a device of this compute capability, for
    ``rows`` rows (None: a training-sized batch)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return "fp32"
    small = rows is not None and rows <= SMALL_ROWS
    return "sm90-half" if tuple(capability) >= (9, 0) and not small else "half"


def pick_wide_config(dtype: torch.dtype, device=None, rows=None) -> WideConfig:
    if INTERPRET:
        return INTERPRETER_WIDE
    cap = torch.cuda.get_device_capability(device) if device is not None and \
        torch.device(device).type == "cuda" else (9, 0)
    return WIDE_CONFIGS[config_family(dtype, cap, rows)]


def pick_wide_bwd_config(dtype: torch.dtype, device=None) -> WideConfig:
    if INTERPRET:
        return INTERPRETER_WIDE
    cap = torch.cuda.get_device_capability(device) if device is not None and \
        torch.device(device).type == "cuda" else (9, 0)
    return WIDE_BWD_CONFIGS[config_family(dtype, cap)]


def descriptor_ok(t: torch.Tensor) -> bool:
    """Whether a 2-D operand can be read through a TMA tensor descriptor: unit stride
    along K, 16-byte aligned base and row stride, TMA's int32 coordinates (rows below
    2^31).  Otherwise the kernel reads it through pointers (any strides)."""
    e = t.element_size()
    return (t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * e) % 16 == 0 and t.shape[0] < 2 ** 31 and t.shape[1] < 2 ** 31)


def _operand(t: torch.Tensor, use_desc: bool, block):
    if not use_desc:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, list(block))


def supports(factor: int, cfg: WideConfig) -> bool:
    """A tile must hold at least one output group (``BLOCK_N >= factor``)."""
    return cfg.block_n // factor >= 1


# ----------------------------------------------------------------------------- launcher


def _main_loop_args(cfg: WideConfig, x2, y2, wx, wy, bx, by):
    """What the forward and backward kernels' shared main loop takes: ``(operands,
    strides, meta)`` = the six operand arguments (TMA descriptors or tensors, then the
    biases), the eight operand strides, and the main loop's meta-parameters."""
    from .triton_kernels import _bias_args, dot_settings

    bx_, by_, has_bias = _bias_args(bx, by, wx)
    dot_fp32, precision = dot_settings(x2.dtype)
    # In the interpreter DOT_FP32 also routes the half pooling product through fp32.
    dot_fp32 = dot_fp32 or (INTERPRET and x2.dtype in (torch.float16, torch.bfloat16))
    # TMA per operand pair (x, y) and (weights): one flag each, so both members qualify.
    x_desc = cfg.tma and descriptor_ok(x2) and descriptor_ok(y2)
    w_desc = cfg.tma and descriptor_ok(wx) and descriptor_ok(wy)
    operands = [_operand(t, x_desc, (cfg.block_m, cfg.block_k)) for t in (x2, y2)] + \
        [_operand(t, w_desc, (cfg.block_n, cfg.block_k)) for t in (wx, wy)] + [bx_, by_]
    strides = (x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
               wx.stride(0), wx.stride(1), wy.stride(0), wy.stride(1))
    meta = dict(HAS_BIAS=has_bias, DOT_FP32=dot_fp32, PRECISION=precision,
                HALF=x2.dtype in (torch.float16, torch.bfloat16), BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                X_DESC=x_desc, W_DESC=w_desc, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    return operands, strides, meta


def wide_forward(x2, y2, wx, wy, bx, by, *, factor, dropout, seed, normalize, eps,
                 batch=None):
    """``(out (*batch, o), norm (rows,) or None)`` from ``(rows, m)`` / ``(rows, n)``.

    ``out`` is allocated at its final shape (``triton_kernels.output_buffer``)."""
    from .triton_kernels import TileConfig, _int32_safe, output_buffer

    rows, m = x2.shape
    n, o = y2.shape[1], wx.shape[0] // factor
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    out_full, out = output_buffer(x2, o, batch)
    norm = torch.empty((rows,), dtype=acc, device=x2.device) if normalize else None
    if rows == 0:
        return out_full, norm
    cfg = pick_wide_config(x2.dtype, x2.device, rows)
    block_j, block_jp = tile_outputs(cfg, factor)
    # In-tile offsets are int32 (tile origins are int64 scalars): copy exotic strides, or
    # refuse, exactly as the first kernel's launcher does.
    x2, y2, wx, wy = _int32_safe(TileConfig(cfg.block_m, block_j, cfg.block_k, cfg.num_warps,
                                            cfg.num_stages), x2, y2, wx, wy, factor)
    s = torch.empty((rows, o), dtype=acc, device=x2.device)
    operands, strides, meta = _main_loop_args(cfg, x2, y2, wx, wy, bx, by)
    grid = (triton.cdiv(rows, cfg.block_m) * triton.cdiv(o, block_j),)
    launch(_wide_fwd_kernel, grid,
        *operands, s,
        rows, m, n, o,
        *strides, s.stride(0),
        seed if seed is not None else 0, float(dropout), 1.0 / (1.0 - dropout),
        FACTOR=factor, DROPOUT=seed is not None, POOL=pool_mode(factor),
        BLOCK_J=block_j, BLOCK_JP=block_jp, **meta,
    )
    block_o = min(triton.next_power_of_2(o), 16 if INTERPRET else 1024)
    launch(_finish_kernel, (rows,),
        s, out, norm if normalize else s, rows, o, s.stride(0), out.stride(0), float(eps),
        math.sqrt(eps), NORMALIZE=normalize, BLOCK_R=1, BLOCK_O=block_o,
        num_warps=1 if INTERPRET else 4)
    return out_full, norm


def wide_backward_products(grad, x2, y2, wx, wy, bx, by, out, norm, *, factor, dropout, seed,
                           normalize, eps):
    """``(dA, dC)``, each (rows, K*o) in the input dtype, with A and C recomputed by the
    wide main loop (the backward of :func:`wide_forward`; ``out``/``norm`` are its
    outputs, ``grad`` the (rows, o) cotangent)."""
    from .triton_kernels import TileConfig, _int32_safe

    rows, m = x2.shape
    n, ko = y2.shape[1], wx.shape[0]
    o = ko // factor
    da = torch.empty((rows, ko), dtype=x2.dtype, device=x2.device)
    dc = torch.empty((rows, ko), dtype=x2.dtype, device=x2.device)
    if rows == 0:
        return da, dc
    cfg = pick_wide_bwd_config(x2.dtype, x2.device)
    block_j, block_jp = tile_outputs(cfg, factor)
    x2, y2, wx, wy = _int32_safe(TileConfig(cfg.block_m, block_j, cfg.block_k, cfg.num_warps,
                                            cfg.num_stages), x2, y2, wx, wy, factor)
    if cfg.block_m * ko >= 2 ** 31:
        raise ValueError(f"factor*o = {ko} too large for the wide backward's int32 in-tile "
                         f"offsets; use backend='torch'")
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    if normalize:
        ds = torch.empty((rows, o), dtype=acc, device=x2.device)
        launch(_grad_pooled_kernel, (rows,), grad, out, norm, ds, o, grad.stride(0),
               out.stride(0), ds.stride(0), math.sqrt(eps),
               BLOCK_O=min(triton.next_power_of_2(o), 16 if INTERPRET else 1024),
               num_warps=1 if INTERPRET else 4)
    else:
        ds = grad  # dL/ds is the cotangent itself
    operands, strides, meta = _main_loop_args(cfg, x2, y2, wx, wy, bx, by)
    grid = (triton.cdiv(rows, cfg.block_m) * triton.cdiv(o, block_j),)
    launch(_wide_bwd_kernel, grid,
        *operands, ds, da, dc,
        rows, m, n, o,
        *strides, ds.stride(0),
        seed if seed is not None else 0, float(dropout), 1.0 / (1.0 - dropout),
        FACTOR=factor, DROPOUT=seed is not None, POOL=pool_mode(factor),
        BLOCK_J=block_j, BLOCK_JP=block_jp, **meta,
    )
    return da, dc
