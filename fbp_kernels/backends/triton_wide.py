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
No counters (the first kernel's tickets need a zeroed buffer per call), nothing shared
between launches.  Cost: writing and reading ``rows x o`` fp32 (8 bytes per
output, ~2 us at rows 1024 on an H200) and one more launch.

Backward (lean mode, nothing saved): a row kernel forms ``ds = dL/ds`` (rows x o, fp32)
from (g, z, ||t||); then :func:`_wide_grad_kernel` runs twice on the forward's main loop,
each pass recomputing one projection for one (BLOCK_M, BLOCK_N) tile and writing the
other's gradient: C -> ``dA = dp * act(C)``, A -> ``dC = dp * act(A)``, with ds expanded to
the tile's projected columns by the pooling's transpose, stored as contiguous blocks of
row-major (rows, K*o) buffers.  Each projection is recomputed once, as in a single
kernel, but each pass holds one accumulator, so the 128 x 128 / 16-warp tile fits
(64 FLOP per L2 byte; the single kernel spilled there).  cuBLAS then runs the four
gradient GEMMs and the bias sums (deterministic).  With saved projections the first
kernel's backward still runs.

Projection activations (``ACTIVATION``: relu, tanh, triton_split's helpers) act on both
projections after the bias; backward's pass 1 also parks ``act'(C)`` in dC and pass 2
finishes ``dA *= act'(A)``, ``dC *= act'(C)`` (exact derivatives; each buffer read and
written once more).  Joint normalisation (``norm_dims > 1``, ``group`` consecutive rows
per norm): the finish kernel normalises rows in place in the fp32 scratch and
``_common.join_groups`` rescales whole groups into the output; backward passes each
row's group ``<z, g>`` to the ds kernel (``GROUP_ZG``).

Dropout: the shared stream of :mod:`triton_dropout`, drawn one Philox call per four
elements (tiles start at multiples of 4 columns, :func:`tile_outputs`).
Grid: grouped row-tile order (Triton tutorial 03): ``GROUP_M`` row tiles share each
weight tile while it is in L2.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_dropout import keep_tile
from .triton_kernels import INTERPRET, NORM_DELTA, _clamp_norm, launch
from ._common import ACTIVATION_CODES, WIDE_ENGINE_ENV
from .triton_split import _activate, _activate_with_grad, _scaled_sumsq

_NORM_DELTA = tl.constexpr(NORM_DELTA)


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
            BLOCK_N: tl.constexpr):
    """The transpose of :func:`_pool`: ``(BLOCK_M, BLOCK_JP) -> (BLOCK_M, BLOCK_N)`` with
    column ``c`` = ``s[:, c // FACTOR]``.  For factors that are not powers of two a
    register gather (exact; the selection product's hi/lo bf16 pair of tensor-core
    products, used before, cost the 128 x 128 / 16-warp backward pass 24 B of spills with
    Triton 3.6 at 128 registers, the gather 79-98 registers and none)."""
    if POOL == 0:
        e = s
    elif POOL == 1:
        e = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_M, BLOCK_N // FACTOR, FACTOR)),
                       (BLOCK_M, BLOCK_N))
    else:
        # Columns past the last whole group (e.g. 112-127 at factor 7: 18 > 15) are
        # masked by the caller; clamped so the gather never indexes past s.
        cc = tl.minimum(tl.arange(0, BLOCK_N) // FACTOR, s.shape[1] - 1)
        e = tl.gather(s, tl.broadcast_to(cc[None, :], (BLOCK_M, BLOCK_N)), axis=1)
    return e


@triton.jit
def _keep(seed, row0_32, row0, rm, col0_32, KO, drop_p, BLOCK_N: tl.constexpr,
          IDX64: tl.constexpr):
    """The tile's dropout keep-mask (the shared stream, one Philox per four elements:
    tile origins are multiples of 4 columns, :func:`tile_outputs`).  Rows as int32 when
    ``rows * K*o < 2^31`` (the same draws: Philox's high counter word is then 0) at half
    the index registers."""
    if IDX64:
        return keep_tile(seed, row0 + rm, col0_32, KO, drop_p, BLOCK_N)
    else:
        return keep_tile(seed, row0_32 + rm, col0_32, KO, drop_p, BLOCK_N)


@triton.jit
def _shared_tile(ps_ptr, row0_32, rm, tile_ok, col0_32, rn, KO, group_r):
    """The (BLOCK_M, BLOCK_N) tile of a shared projection ``Ps (groups, K*o)`` (bias
    included) for broadcast rows ``row0 + rm``: row ``r`` reads group ``r // group_r``
    (co-attention: ``group_r`` regions per question).  int64 base at the tile's first
    group, int32 in-tile offsets (BLOCK_M * K*o < 2^31: launcher check)."""
    g0 = row0_32 // group_r
    gi = (row0_32 + rm) // group_r - g0
    base = g0.to(tl.int64) * KO + col0_32
    return tl.load(ps_ptr + base + gi[:, None] * KO + rn[None, :], mask=tile_ok, other=0.0)


@triton.jit
def _tile_of(pid, rows, O, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
             GROUP_M: tl.constexpr):
    """``(row tile, output tile)`` of program ``pid`` in grouped order (Triton tutorial
    03): ``GROUP_M`` consecutive row tiles walk the output tiles together, so each
    weight tile is reused from L2 by the group's row tiles."""
    num_m = tl.cdiv(rows, BLOCK_M)
    num_j = tl.cdiv(O, BLOCK_J)
    in_group = GROUP_M * num_j
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    # The output tile in int32 even when ``rows`` arrives as an i64 (>= 2^31 rows make
    # group_size i64): it is below 2^31 / BLOCK_J and gives the weights' TMA
    # coordinate, which must be 32-bit.  The row tile stays as wide as ``rows``: its
    # origin passes 2^31 there (x is then read through pointers, descriptor_ok).
    return first_m + (pid % in_group) % group_size, ((pid % in_group) // group_size).to(tl.int32)


@triton.jit
def _tile_frame(pid, rows, O, FACTOR: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, GROUP_M: tl.constexpr):
    """Program ``pid``'s tile of the (rows, K*o) products, for the forward and both
    backward passes: ``(row0_32, row0, j0, col0_32, col0, KO, rm, rn, m_mask, n_ok)``.

    Tile origins come twice: int32 where they are TMA coordinates (rows and K*o < 2^31
    wherever x or the weights are descriptors, :func:`descriptor_ok`),
    int64 where they scale a stride.  ``row0_32`` and ``m_mask`` are int32 while rows
    < 2^31 (in int64 the 16-warp tile spilled 112-184 B) and int64 beyond (``rows`` then
    arrives as an i64 argument, and the row tile's index with it).  ``n_ok`` keeps the
    tile's whole factor groups (``BLOCK_J * FACTOR`` columns) inside K*o."""
    pid_m, pid_j = _tile_of(pid, rows, O, BLOCK_M, BLOCK_J, GROUP_M)
    row0_32 = pid_m * BLOCK_M
    row0 = row0_32.to(tl.int64)
    j0 = pid_j * BLOCK_J
    col0_32 = j0 * FACTOR  # first projected column of the tile
    col0 = col0_32.to(tl.int64)
    KO = O * FACTOR
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    m_mask = rm < rows - row0_32
    n_ok = (rn < BLOCK_J * FACTOR) & (rn < (O - j0) * FACTOR)
    return row0_32, row0, j0, col0_32, col0, KO, rm, rn, m_mask, n_ok


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
    # scalars (keep_scale fp64: Triton would type a Python float fp32, rounding fp64
    # runs' scale)
    seed, drop_p, keep_scale: tl.float64,
    # SHARED: C read from ps_ptr (groups, K*o), group_r broadcast rows per group
    ps_ptr, group_r,
    # MFH's running product, (rows, K*o) row-major: PREV multiplies the previous block's
    # into this one's, CHAIN stores this block's for the next
    prev_ptr, chain_ptr,
    # meta-parameters
    FACTOR: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, POOL: tl.constexpr,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_JP: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    X_DESC: tl.constexpr = False, W_DESC: tl.constexpr = False,
    # projection activation: 0 none, 1 relu, 2 tanh (_common.ACTIVATION_CODES);
    # IDX64: rows * K*o >= 2^31 (dropout's row indices in int64)
    ACTIVATION: tl.constexpr = 0, IDX64: tl.constexpr = False, SHARED: tl.constexpr = False,
    PREV: tl.constexpr = False, CHAIN: tl.constexpr = False,
):
    # The fp64 scale converted once to the accumulation dtype (exact for fp64).
    keep_scale = tl.full((), keep_scale,
                         tl.float64 if s_ptr.dtype.element_ty == tl.float64 else tl.float32)
    row0_32, row0, j0, col0_32, col0, KO, rm, rn, m_mask, n_ok = _tile_frame(
        tl.program_id(0), rows, O, FACTOR, BLOCK_M, BLOCK_N, BLOCK_J, GROUP_M)

    if SHARED:
        # Co-attention: y's projection was formed once per group (cuBLAS, bias included)
        # and is read per row instead of running the y main loop for every region.  Read,
        # activated and masked (dropout's kept elements and scale, on C instead of A)
        # before the x loop, then parked in the input dtype: its 64-bit addresses and the
        # Philox temporaries are live while nothing else is (after the loop, beside A,
        # the 128 x 128 / 16-warp tile spilled 24-32 B).
        c = _shared_tile(ps_ptr, row0_32, rm, m_mask[:, None] & n_ok[None, :], col0_32, rn,
                         KO, group_r)
        park: tl.constexpr = c.dtype
        c = _activate(c.to(tl.float64 if park == tl.float64 else tl.float32), ACTIVATION)
        if DROPOUT:
            c = tl.where(_keep(seed, row0_32, row0, rm, col0_32, KO, drop_p, BLOCK_N, IDX64),
                         c * keep_scale, 0.0)
        if PREV:
            # MFH: the previous block's product folded into C here too, while no
            # accumulator is live (after the loop the fp32 sm_80 tile spilled 8 B with
            # Triton 3.6).
            c = c * tl.load(prev_ptr + row0 * KO + col0_32 + rm[:, None] * KO + rn[None, :],
                            mask=m_mask[:, None] & n_ok[None, :], other=0.0).to(c.dtype)
        c = c.to(park)
    a = _wide_projection(x_src, wx_src, row0_32 if X_DESC else row0,
                         col0_32 if W_DESC else col0, rm, m_mask, rn, n_ok, M,
                         stride_xr, stride_xk, stride_wxr, stride_wxk, X_DESC, W_DESC,
                         BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    if HAS_BIAS:
        a += tl.load(bx_ptr + col0_32 + rn, mask=n_ok, other=0.0).to(a.dtype)[None, :]
    a = _activate(a, ACTIVATION)
    if SHARED:
        p = a * c.to(a.dtype)
    else:
        if DROPOUT and HALF:
            # Half inputs: applied to A before the y pass rather than to the product (the
            # same kept elements of (row, col), the same 1/(1-p) scale), so the Philox
            # temporaries are live while only A is: after the product they pushed the
            # 128 x 128 / 16-warp tile past its 128-register cap (48-72 B of spills with
            # Triton 3.6 and 3.8).  fp32/fp64 keep it on the product (on A, sm_90 fp32
            # spilled 8 B).
            a = tl.where(_keep(seed, row0_32, row0, rm, col0_32, KO, drop_p, BLOCK_N,
                               IDX64), a * keep_scale, 0.0)
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
        p = a.to(c.dtype) * _activate(c, ACTIVATION)
        if DROPOUT and not HALF:
            p = tl.where(_keep(seed, row0_32, row0, rm, col0_32, KO, drop_p, BLOCK_N,
                               IDX64), p * keep_scale, 0.0)
    p = tl.where(n_ok[None, :], p, 0.0)
    if PREV or CHAIN:
        # MFH: p_l = drop(q_l) * p_{l-1}, and p_l is what block l+1 multiplies in.
        # int64 tile origin, int32 in-tile offsets (BLOCK_M * K*o < 2^31: launcher check)
        tile_ok = m_mask[:, None] & n_ok[None, :]
        base = row0 * KO + col0_32
        offs = rm[:, None] * KO + rn[None, :]
        if PREV and not SHARED:
            p = p * tl.load(prev_ptr + base + offs, mask=tile_ok, other=0.0).to(p.dtype)
        if CHAIN:
            tl.store(chain_ptr + base + offs, p.to(chain_ptr.dtype.element_ty), mask=tile_ok)
    s = _pool(p, FACTOR, POOL, BLOCK_M, BLOCK_N, BLOCK_JP, HALF and not DOT_FP32)
    jj = tl.arange(0, BLOCK_JP)
    j_ok = (jj < BLOCK_J) & (jj < O - j0)
    tl.store(s_ptr + row0 * stride_sr + rm[:, None] * stride_sr + (j0 + jj)[None, :], s,
             mask=m_mask[:, None] & j_ok[None, :])


@triton.jit
def _wide_grad_kernel(
    # one projection's operands (pointers, or TMA descriptors when X_DESC / W_DESC), then
    # ds = dL/ds and the two gradient buffers this pass writes
    in_src, w_src, b_ptr, ds_ptr, other_ptr, this_ptr,
    # sizes: rows, the input's width, outputs
    rows, WIDTH, O,
    # strides (the input's and the weight's unused for descriptor operands)
    stride_ir, stride_ik, stride_wr, stride_wk, stride_dr,
    # scalars (keep_scale fp64, as in the forward)
    seed, drop_p, keep_scale: tl.float64,
    # SHARED: P read from ps_ptr (groups, K*o), group_r broadcast rows per group
    ps_ptr, group_r,
    # MFH (row-major (rows, K*o)): the gradient carried from the later blocks, the
    # previous block's running product, and the carry this block passes on
    carry_ptr, prev_ptr, next_ptr,
    # meta-parameters
    FACTOR: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    POOL: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_JP: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, X_DESC: tl.constexpr, W_DESC: tl.constexpr,
    ACTIVATION: tl.constexpr, ACT_PASS: tl.constexpr, IDX64: tl.constexpr,
    SHARED: tl.constexpr, CARRY: tl.constexpr = False, PREV: tl.constexpr = False,
    NEXT: tl.constexpr = 0,
):
    """One projection's share of the backward products, on the forward's main loop.

    Recomputes this side's pre-activation projection ``P`` (A or C) for one
    (BLOCK_M, BLOCK_N) tile of the (rows, K*o) products and writes the *other* side's
    gradient ``other = dp * act(P)``, ``dp[r, col] = ds[r, col // K] * keep / (1-p)``.
    The launcher runs it twice, on (y, W_y) -> dA and on (x, W_x) -> dC, so each
    projection is recomputed once and each pass has a single accumulator: the 128 x 128
    / 16-warp tile fits (the one-kernel backward, with A, C, the mask and ds live
    together, spilled at that tile and ran 128 x 64, 42.7 FLOP per L2 byte).

    With an activation each gradient also needs its own side's ``act'``, which the
    other pass holds: ``ACT_PASS`` 1 (the first pass) writes ``this = act'(P)``; 2 (the
    second) multiplies: ``this *= act'(P)`` (``this`` holds the first pass's
    ``dp * act(C)``) and ``other *= `` the first pass's ``act'(C)``.  Buffers are
    row-major (rows, K*o); blocks are stored whole and contiguous.

    MFH block ``l`` (:mod:`triton_mfh`): ``dp = drop(e_l + carry) * p_{l-1}`` with
    ``e_l`` the unpooled ds, ``carry`` (``CARRY``) what the later blocks pass back and
    ``p_{l-1}`` (``PREV``) the previous block's running product.  The carry for block
    ``l-1`` is ``u * act(A) * act(C)``, ``u = drop(e_l + carry)``: pass 1 stores
    ``u * act(C)`` (``NEXT`` 1), pass 2 multiplies it by ``act(A)`` (``NEXT`` 2)."""
    # The fp64 scale converted once to the accumulation dtype.  Not ds's dtype: without
    # normalisation ds is the cotangent itself, in the input dtype.
    keep_scale = tl.full((), keep_scale,
                         tl.float64 if ds_ptr.dtype.element_ty == tl.float64 else tl.float32)
    row0_32, row0, j0, col0_32, col0, KO, rm, rn, m_mask, n_ok = _tile_frame(
        tl.program_id(0), rows, O, FACTOR, BLOCK_M, BLOCK_N, BLOCK_J, GROUP_M)

    if SHARED:
        # Co-attention's shared side: its projection per group (bias included), no loop.
        p = _shared_tile(ps_ptr, row0_32, rm, m_mask[:, None] & n_ok[None, :], col0_32, rn,
                         KO, group_r)
        p = p.to(tl.float64 if p.dtype == tl.float64 else tl.float32)
    else:
        p = _wide_projection(in_src, w_src, row0_32 if X_DESC else row0,
                             col0_32 if W_DESC else col0, rm, m_mask, rn, n_ok, WIDTH,
                             stride_ir, stride_ik, stride_wr, stride_wk, X_DESC, W_DESC,
                             BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        if HAS_BIAS:
            p += tl.load(b_ptr + col0_32 + rn, mask=n_ok, other=0.0).to(p.dtype)[None, :]
    acc_dtype: tl.constexpr = p.dtype
    # After the main loop: a (BLOCK_M, BLOCK_N) predicate live across it cost the 16-warp
    # tile 16 B of spills (Triton 3.6).
    tile_ok = m_mask[:, None] & n_ok[None, :]
    # int64 tile origin, int32 in-tile offsets (BLOCK_M * K*o < 2^31: launcher check)
    base = row0 * KO + col0_32
    offs = rm[:, None] * KO + rn[None, :]
    if ACTIVATION != 0:
        q, dq = _activate_with_grad(p, ACTIVATION)
        if ACT_PASS == 2:
            dq = dq * tl.load(this_ptr + base + offs, mask=tile_ok, other=0.0).to(acc_dtype)
        tl.store(this_ptr + base + offs, dq.to(this_ptr.dtype.element_ty), mask=tile_ok)
    else:
        q = p
    # Park act(P) in the input dtype (half: 16 instead of 32 registers per thread at
    # 128 x 128 / 16 warps) while ds is expanded, with the dropout mask folded in (exact:
    # 0 or the value) while nothing else is live: drawn beside ds, the Philox
    # temporaries and the int64 indices spilled this tile by 300-700 B.
    if HALF:
        q = q.to(other_ptr.dtype.element_ty)
    if DROPOUT:
        q = tl.where(_keep(seed, row0_32, row0, rm, col0_32, KO, drop_p, BLOCK_N, IDX64),
                     q, 0.0).to(q.dtype)
    if NEXT == 2:
        # u * act(C) from pass 1, times act(A) (the mask again: idempotent)
        nxt = tl.load(next_ptr + base + offs, mask=tile_ok, other=0.0).to(acc_dtype)
        tl.store(next_ptr + base + offs, (nxt * q.to(acc_dtype)).to(next_ptr.dtype.element_ty),
                 mask=tile_ok)

    # ds over the tile's outputs, (BLOCK_M, BLOCK_JP), expanded to its projected columns
    # (col -> output col // K) by the pooling's transpose: whole-row loads of the pooled
    # tensor instead of a per-column gather (a 64-bit address per element).
    jj = tl.arange(0, BLOCK_JP)
    j_ok = (jj < BLOCK_J) & (jj < O - j0)
    ds = tl.load(ds_ptr + row0 * stride_dr + rm[:, None] * stride_dr + (j0 + jj)[None, :],
                 mask=m_mask[:, None] & j_ok[None, :], other=0.0).to(acc_dtype)
    ds = _unpool(ds, FACTOR, POOL, BLOCK_M, BLOCK_N)
    if CARRY:
        ds += tl.load(carry_ptr + base + offs, mask=tile_ok, other=0.0).to(acc_dtype)
    if DROPOUT:
        ds = ds * keep_scale
    g = ds * q.to(acc_dtype)
    if NEXT == 1:
        tl.store(next_ptr + base + offs, g.to(next_ptr.dtype.element_ty), mask=tile_ok)
    if PREV:
        g = g * tl.load(prev_ptr + base + offs, mask=tile_ok, other=0.0).to(acc_dtype)
    if ACT_PASS == 2:
        g = g * tl.load(other_ptr + base + offs, mask=tile_ok, other=0.0).to(acc_dtype)
    tl.store(other_ptr + base + offs, g.to(other_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _grad_pooled_kernel(g_ptr, z_ptr, norm_ptr, zg_ptr, ds_ptr, O, stride_gr, stride_zr,
                        stride_dr, sqrt_eps: tl.float64, GROUP_ZG: tl.constexpr,
                        BLOCK_O: tl.constexpr):
    """One row per program: ``ds = dL/ds`` from the cotangent ``g``, the output ``z`` and
    ``r = ||t||``: ``dt = (g - z <z, g>) / r`` (zero for a degenerate row, ``r <= delta``),
    ``ds = dt * 0.5 / (|t| + sqrt(eps))`` with ``t = z r``.  ``GROUP_ZG`` (joint
    normalisation): ``norm`` holds each row's group norm and ``zg`` its group's
    ``<z, g>``, precomputed over whole groups; otherwise the row's own dot is taken."""
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = ds_ptr.dtype.element_ty
    sqrt_eps = tl.full((), sqrt_eps, acc_dtype)  # fp64 argument, converted once
    if GROUP_ZG:
        dot = tl.load(zg_ptr + row)
    else:
        zg = tl.zeros((BLOCK_O,), dtype=acc_dtype)
        for o0 in range(0, O, BLOCK_O):
            jj = o0 + tl.arange(0, BLOCK_O)
            ok = jj < O
            g = tl.load(g_ptr + row * stride_gr + jj, mask=ok, other=0.0).to(acc_dtype)
            z = tl.load(z_ptr + row * stride_zr + jj, mask=ok, other=0.0).to(acc_dtype)
            zg += z * g
        dot = tl.sum(zg, axis=0)
    norm = tl.load(norm_ptr + row)
    r = _clamp_norm(norm)
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
def _finish_kernel(s_ptr, out_ptr, norm_ptr, rows, O, stride_sr, stride_or, eps: tl.float64,
                   sqrt_eps: tl.float64, NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_O: tl.constexpr):
    """Whole rows per program: ``z = t / max(||t||, delta)``, ``t = signed_sqrt(s)``,
    with the overflow-safe running-max norm; or ``s`` cast when not normalising."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < rows - row0
    s_base = s_ptr + row0 * stride_sr
    out_base = out_ptr + row0 * stride_or
    acc_dtype = s_ptr.dtype.element_ty
    # fp64 arguments (a Python float would be typed fp32), converted once: exact in fp64.
    eps = tl.full((), eps, acc_dtype)
    sqrt_eps = tl.full((), sqrt_eps, acc_dtype)
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
        inv = 1.0 / _clamp_norm(norm)
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
#:   Also sm_90's tile at rows <= SMALL_ROWS: twice the output tiles (84 instead of 42 at
#:   o = 1000, factor 5) for 132 SMs when a single row tile exists, two CTAs per SM (128
#:   registers, 96 KiB).  The cost model puts both tiles at 28 us at rows = 1 (H200,
#:   bf16; compute-bound on the padded rows), so small batches are the split strategy's
#:   (15 us there, see strategy.py).
#: - ``tiny`` (rows <= TINY_ROWS, sm_80 and sm_90): the small-batch path.  A batch of a
#:   few rows is a weight stream (30.7 MB of bf16 weights at the MFB default, 6.4 us at
#:   4.8 TB/s), but a 128-row tile pads it 128-fold on the tensor cores: the cost model
#:   puts the ``half`` tile compute-bound at 28 us for one row.  16 x 64 x 128 with 4
#:   warps pads 16-fold (mma.sync: wgmma needs 64-row tiles), 84 tiles of 12 outputs
#:   and 3 of 4 stages of (16 + 64) x 128 in flight (60 KiB per CTA, two CTAs per SM):
#:   weight-streaming bound, 13.3 us against split's 15.2 and a floor of 12.3 (H200,
#:   bf16, rows 1-16, predicted).
#: - ``sm90-half-chain``: MFH's chained blocks (``PREV``/``CHAIN``: the previous block's
#:   running product read and this block's stored, a (BLOCK_M, BLOCK_N) tile each):
#:   64 x 128 x 64, 8 warps, 4 stages through TMA, 178 registers, no spills (Triton 3.8);
#:   the 128 x 128 / 16-warp tile spilled 104-112 B there (the tile's 64-bit addresses
#:   on top of the product, at 128 registers per thread).  42.7 FLOP per L2 byte.
#: - ``fp32``: tl.dot on FMA units with operands in registers (IEEE, PyTorch's default):
#:   64 x 64 x 32 with 8 warps, 104-128 registers, no spills (4 warps spilled 40-56 B on
#:   sm_90 with Triton 3.6).
WIDE_CONFIGS = {
    "sm90-half": WideConfig(block_m=128, block_n=128, block_k=64, num_warps=16, num_stages=4,
                            tma=True),
    "half": WideConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=4),
    "tiny": WideConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4),
    "sm90-half-chain": WideConfig(block_m=64, block_n=128, block_k=64, num_warps=8,
                                  num_stages=4, tma=True),
    "fp32": WideConfig(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=3),
}
#: The backward's two passes (:func:`_wide_grad_kernel`: one projection recomputed per
#: pass, so one accumulator): the forward's 128 x 128 x 64 / 16-warp tile through TMA on
#: sm_90 (64 FLOP per L2 byte, 96 KiB in flight), 96-127 registers, no spills with
#: Triton 3.6 and 3.8 since the dropout mask takes one Philox per four elements (one per
#: element spilled 300-700 B; the one-kernel backward with A, C, mask and ds live spilled
#: at this tile and ran 128 x 64, 42.7 FLOP/B).  With an activation each pass also
#: reads and writes the other buffer: ``sm90-half-act`` 64 x 128 x 64 / 8 warps (no
#: spills; 128 x 128 spilled 8-320 B).  sm_80 half 128 x 64 x 64 / 8 warps (cp.async,
#: 4 stages), also the sm_90 tile for operands TMA cannot read; with an activation
#: ``half-act`` 64 x 64 x 64 / 8 warps / 3 stages (128 x 64 spilled 24-112 B at factor 1).
#: fp32 64 x 64 x 32 / 8 warps / 2 stages, activation or not.  MFH's chained passes
#: (``CARRY``/``PREV``/``NEXT``: up to three more (BLOCK_M, BLOCK_N) tiles read or written)
#: take the activation tiles too: at 128 x 128 / 16 warps they spilled 16-136 B, at
#: 64 x 128 / 8 warps 163-255 registers and none, activation included.
WIDE_BWD_CONFIGS = {
    "sm90-half": WideConfig(block_m=128, block_n=128, block_k=64, num_warps=16, num_stages=4,
                            tma=True),
    "sm90-half-act": WideConfig(block_m=64, block_n=128, block_k=64, num_warps=8,
                                num_stages=4, tma=True),
    "half": WideConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=4),
    "half-act": WideConfig(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3),
    "fp32": WideConfig(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=2),
}
#: The interpreter runs the descriptor path wherever operands qualify (the shared suites
#: then cover it); tests replace this with ``tma=False`` to pin the pointer path.
INTERPRETER_WIDE = WideConfig(block_m=16, block_n=32, block_k=16, num_warps=1, num_stages=1,
                              group_m=2, tma=True)


def pool_mode(factor: int) -> int:
    if factor == 1:
        return 0
    return 1 if factor & (factor - 1) == 0 else 2


def tile_outputs(cfg: WideConfig, factor: int):
    """``(BLOCK_J, BLOCK_JP)``: outputs per tile and the width of the pooled tile (a
    power of two; >= 16 for the selection product, which tl.dot needs).

    ``BLOCK_J * factor`` is a multiple of 4, so every tile starts at a multiple of 4
    columns and draws its dropout mask one Philox per four elements
    (:func:`triton_dropout.keep_tile`): at factor 5 and 128 columns, 24 outputs (120
    columns) instead of 25.  ``BLOCK_J`` is 0 when a tile cannot hold such a group."""
    step = 4 // math.gcd(factor, 4)
    block_j = cfg.block_n // factor // step * step
    if pool_mode(factor) < 2:
        return block_j, block_j
    return block_j, max(16, triton.next_power_of_2(max(block_j, 1)))


#: Row counts up to which sm_90 runs the narrower ``half`` tile (see WIDE_CONFIGS).
SMALL_ROWS = 64
#: Row counts up to which half precision runs the ``tiny`` (weight-streaming) tile.
TINY_ROWS = 16


def config_family(dtype: torch.dtype, capability=(9, 0), rows=None,
                  chained: bool = False, descriptors: bool = True) -> str:
    """The ``WIDE_CONFIGS`` key for a dtype on a device of this compute capability, for
    ``rows`` rows (None: a training-sized batch); ``chained``: an MFH block that reads
    or stores a running product; ``descriptors``: whether the operands qualify for TMA
    (:func:`descriptor_ok`).  sm_90's 128 x 128 / 16-warp tile is sized for descriptor
    loads: through pointers without 16-byte row-stride hints (rows TMA cannot read,
    e.g. bf16 m = 300) it spilled 336 B (Triton 3.6 and 3.8), so such operands take the
    pointer-loop tile (sm_80's "half": 243-254 registers there, no spills), as the
    backward's do."""
    if dtype not in (torch.float16, torch.bfloat16):
        return "fp32"
    if rows is not None and rows <= TINY_ROWS:
        return "tiny"
    small = rows is not None and rows <= SMALL_ROWS
    if tuple(capability) >= (9, 0) and not small:
        if chained:
            return "sm90-half-chain"
        return "sm90-half" if descriptors else "half"
    return "half"


def _capability(device):
    return torch.cuda.get_device_capability(device) if device is not None and \
        torch.device(device).type == "cuda" else (9, 0)


def pick_wide_config(dtype: torch.dtype, device=None, rows=None,
                     chained: bool = False, descriptors: bool = True) -> WideConfig:
    if INTERPRET:
        return INTERPRETER_WIDE
    return WIDE_CONFIGS[config_family(dtype, _capability(device), rows, chained,
                                      descriptors)]


def forward_config(x2, y2, wx, wy, factor: int, rows: int, chained: bool = False) -> WideConfig:
    """The forward's tile for these operands: :func:`pick_wide_config`'s, with the
    pointer-loop tile on sm_90 when an operand cannot be read through TMA (and that tile
    holds a factor group; otherwise the TMA-sized tile runs through pointers)."""
    cfg = pick_wide_config(x2.dtype, x2.device, rows, chained)
    if cfg.tma and not all(descriptor_ok(t) for t in (x2, y2, wx, wy)):
        ptr = pick_wide_config(x2.dtype, x2.device, rows, chained, descriptors=False)
        if supports(factor, ptr):
            return ptr
    return cfg


def bwd_config_family(dtype: torch.dtype, capability=(9, 0), activation=None,
                      descriptors: bool = True, chained: bool = False) -> str:
    """The ``WIDE_BWD_CONFIGS`` key for the backward passes.  ``descriptors``: whether
    the operands qualify for TMA (:func:`descriptor_ok`); sm_90's tiles are sized for
    descriptor loads (no address registers: through pointers the 128 x 128 / 16-warp
    tile spilled 16-40 B), so operands that do not take the pointer-loop tile (sm_80's,
    cp.async).  ``chained``: an MFH block's passes (the activation tile)."""
    fam = config_family(dtype, capability)
    if fam == "fp32":
        return fam
    if fam == "sm90-half" and not descriptors:
        fam = "half"
    return fam + "-act" if activation is not None or chained else fam


def pick_wide_bwd_config(dtype: torch.dtype, device=None, activation=None,
                         descriptors: bool = True, chained: bool = False) -> WideConfig:
    if INTERPRET:
        return INTERPRETER_WIDE
    return WIDE_BWD_CONFIGS[bwd_config_family(dtype, _capability(device), activation,
                                              descriptors, chained)]


def descriptor_ok(t: torch.Tensor) -> bool:
    """Whether a 2-D operand can be read through a TMA tensor descriptor: unit stride
    along K, 16-byte aligned base and row stride, TMA's int32 coordinates (rows below
    2^31).  Otherwise the kernel reads it through pointers (any strides)."""
    e = t.element_size()
    # Rows must not overlap: a broadcast view (stride 0, e.g. expand) passes the
    # alignment test but is no tensor a TMA map can describe.
    return (t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * e) % 16 == 0 and t.stride(0) >= t.shape[1]
            and t.shape[0] < 2 ** 31 and t.shape[1] < 2 ** 31)


def _operand(t: torch.Tensor, use_desc: bool, block):
    if not use_desc:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, list(block))


def supports(factor: int, cfg: WideConfig) -> bool:
    """A tile must hold at least one output group whose columns are a multiple of 4
    (:func:`tile_outputs`): factor <= BLOCK_N / 4 for odd factors."""
    return tile_outputs(cfg, factor)[0] >= 1


# ----------------------------------------------------------------------------- launcher


def _main_loop_args(cfg: WideConfig, inputs, weights, has_bias: bool):
    """What the kernels' shared main loop takes: ``(operands, strides, meta)`` = the
    inputs then the weights (TMA descriptors or tensors), their strides in that order,
    and the main loop's meta-parameters.  ``inputs``/``weights``: ``(x2, y2)`` /
    ``(wx, wy)`` for the forward, one of each for a backward pass; TMA is chosen per
    operand kind, so every member of ``inputs`` (of ``weights``) must qualify."""
    from .triton_kernels import dot_settings

    dtype = inputs[0].dtype
    dot_fp32, precision = dot_settings(dtype)
    # In the interpreter DOT_FP32 also routes the half pooling product through fp32.
    dot_fp32 = dot_fp32 or (INTERPRET and dtype in (torch.float16, torch.bfloat16))
    x_desc = cfg.tma and all(descriptor_ok(t) for t in inputs)
    w_desc = cfg.tma and all(descriptor_ok(t) for t in weights)
    operands = [_operand(t, x_desc, (cfg.block_m, cfg.block_k)) for t in inputs] + \
        [_operand(t, w_desc, (cfg.block_n, cfg.block_k)) for t in weights]
    strides = tuple(st for t in (*inputs, *weights) for st in (t.stride(0), t.stride(1)))
    meta = dict(HAS_BIAS=has_bias, DOT_FP32=dot_fp32, PRECISION=precision,
                HALF=dtype in (torch.float16, torch.bfloat16), BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                X_DESC=x_desc, W_DESC=w_desc, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    return operands, strides, meta


def _dropout_args(dropout: float, seed):
    """``(seed, p, 1/(1-p))`` as the kernels take them, and their ``DROPOUT`` flag."""
    return (seed if seed is not None else 0, float(dropout), 1.0 / (1.0 - dropout)), \
        seed is not None


def shared_projection(y2, wy, by):
    """``y2 @ wy^T + by`` by cuBLAS: the shared side's projection, once per group."""
    return torch.addmm(by, y2, wy.t()) if by is not None else y2 @ wy.t()


def _projection_rows(projection, y2, wy, by):
    """The shared side's projection as the kernels read it: row-major ``(len(y2), K*o)``
    (``_shared_tile``'s row stride is K*o), formed here when not given."""
    if projection is None:
        return shared_projection(y2, wy, by)
    if projection.shape != (y2.shape[0], wy.shape[0]):
        raise ValueError(f"the kept projection has shape {tuple(projection.shape)}, "
                         f"expected {(y2.shape[0], wy.shape[0])}")
    return projection.to(y2.dtype).contiguous()


def _checked_operands(cfg: WideConfig, x2, y2, wx, wy, factor):
    """In-tile offsets are int32 (tile origins are int64 scalars): copy exotic strides, or
    refuse, exactly as the first kernel's launcher does (its check covers the (rows,
    K*o) buffers too: MFH's products, the backward's gradients)."""
    from .triton_kernels import TileConfig, _int32_safe

    block_j = tile_outputs(cfg, factor)[0]
    return _int32_safe(TileConfig(cfg.block_m, block_j, cfg.block_k, cfg.num_warps,
                                  cfg.num_stages), x2, y2, wx, wy, factor)


def wide_pooled(x2, y2, wx, wy, bx, by, s, *, factor, dropout, seed, activation=None,
                shared=0, projection=None, prev=None, chain=None):
    """The main kernel: the pooled sums ``s = sumpool(drop(act(A) * act(C)))`` into ``s``
    (fp32 (rows, o), any row stride).  ``shared``/``projection``: see
    :func:`wide_forward`.  MFH: ``prev`` (rows, K*o) multiplies the previous block's
    running product in before pooling, ``chain`` (rows, K*o) receives this block's."""
    from .triton_kernels import _bias_args

    rows, m = x2.shape
    n, o = y2.shape[1], wx.shape[0] // factor
    if rows == 0:
        return
    chained = prev is not None or chain is not None
    if os.environ.get(WIDE_ENGINE_ENV, "") == "gluon" and not INTERPRET:
        # Opt-in: the warp-specialised Gluon main loop (gluon_wide: compiled, not yet
        # measured), for the calls it covers; every other call runs the kernel below.
        from . import gluon_wide

        if gluon_wide.applies(x2, y2, wx, wy, factor, dropout=dropout, seed=seed,
                              activation=activation, shared=shared, chained=chained):
            gluon_wide.gluon_pooled(x2, y2, wx, wy, bx, by, s, factor=factor)
            return
    # Co-attention's y main loop does not run (its projection is read per group): only
    # the operands a main loop reads decide whether TMA can.
    cfg = forward_config(x2, x2 if shared else y2, wx, wx if shared else wy, factor, rows,
                         chained)
    block_j, block_jp = tile_outputs(cfg, factor)
    x2, y2, wx, wy = _checked_operands(cfg, x2, y2, wx, wy, factor)
    bx_, by_, has_bias = _bias_args(bx, by, wx)
    if shared:
        ps = _projection_rows(projection, y2, wy, by)
        # y's main loop does not run: its operand slots repeat x's (never read).
        operands, strides, meta = _main_loop_args(cfg, (x2, x2), (wx, wx), has_bias)
    else:
        ps = s  # never read
        operands, strides, meta = _main_loop_args(cfg, (x2, y2), (wx, wy), has_bias)
    drop_args, use_dropout = _dropout_args(dropout, seed)
    grid = (triton.cdiv(rows, cfg.block_m) * triton.cdiv(o, block_j),)
    launch(_wide_fwd_kernel, grid,
        *operands, bx_, by_, s,
        rows, m, n, o,
        *strides, s.stride(0),
        *drop_args, ps, max(shared, 1),
        prev if prev is not None else s, chain if chain is not None else s,
        FACTOR=factor, DROPOUT=use_dropout, POOL=pool_mode(factor),
        BLOCK_J=block_j, BLOCK_JP=block_jp, ACTIVATION=ACTIVATION_CODES[activation],
        IDX64=rows * wx.shape[0] >= 2 ** 31, SHARED=bool(shared), PREV=prev is not None,
        CHAIN=chain is not None, **meta,
    )


def finish_rows(s, out, norm, *, normalize, eps, group=1):
    """``out`` (rows, o, any row stride) from the pooled sums ``s`` (fp32, rows x o):
    signed square root and L2 norm (``norm`` (rows,) receives each row's, or its group's
    with ``group > 1`` consecutive rows per norm), or ``s`` cast when not normalising."""
    from ._common import join_groups

    rows, o = s.shape
    if rows == 0:
        return
    joint = normalize and group > 1
    # A joint norm finishes each row in place in the fp32 scratch (normalised by its own
    # norm), then rescales whole groups into the output (one rounding, at the end).
    dest = s if joint else out
    block_o = min(triton.next_power_of_2(o), 16 if INTERPRET else 1024)
    launch(_finish_kernel, (rows,),
        s, dest, norm if normalize else s, rows, o, s.stride(0), dest.stride(0), float(eps),
        math.sqrt(eps), NORMALIZE=normalize, BLOCK_R=1, BLOCK_O=block_o,
        num_warps=1 if INTERPRET else 4)
    if joint:
        join_groups(s, out, norm, group)


def wide_forward(x2, y2, wx, wy, bx, by, *, factor, dropout, seed, normalize, eps,
                 batch=None, activation=None, group=1, shared=0, projection=None):
    """``(out (*batch, o), norm (rows,) or None)`` from ``(rows, m)`` / ``(rows, n)``.

    ``out`` is allocated at its final shape (``triton_kernels.output_buffer``).
    ``activation`` acts on both projections; ``group > 1``: one L2 norm per ``group``
    consecutive rows (``norm_dims > 1``), ``norm`` then holds each row's group norm.
    ``shared = R > 0``: y's projection is read, not recomputed: ``y2`` is ``(rows / R,
    n)``, one row per group of ``R`` consecutive rows (co-attention; ``R = 1``: a kept
    projection), and ``projection`` that side's pre-activation ``y2 @ wy^T + by``
    ``(rows / R, K*o)``, or None to form it here (cuBLAS, once per group)."""
    from .triton_kernels import output_buffer

    rows = x2.shape[0]
    o = wx.shape[0] // factor
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    out_full, out = output_buffer(x2, o, batch)
    norm = torch.empty((rows,), dtype=acc, device=x2.device) if normalize else None
    s = torch.empty((rows, o), dtype=acc, device=x2.device)
    wide_pooled(x2, y2, wx, wy, bx, by, s, factor=factor, dropout=dropout, seed=seed,
                activation=activation, shared=shared, projection=projection)
    finish_rows(s, out, norm, normalize=normalize, eps=eps, group=group)
    return out_full, norm


def pooled_grad(grad, out, norm, *, normalize, eps, group=1):
    """``ds = dL/ds`` (fp32 (rows, o)) from the cotangent ``grad`` and the forward's ``out``
    and ``norm`` (:func:`finish_rows`'s; row strides any, ``norm`` contiguous); ``grad``
    itself when not normalising."""
    from .triton_kernels import group_pairs

    if not normalize:
        return grad  # dL/ds is the cotangent itself
    rows, o = grad.shape
    ds = torch.empty((rows, o), dtype=norm.dtype, device=grad.device)
    if rows == 0:
        return ds
    joint = group > 1
    # Joint norm: each row's group <z, g>, summed over whole groups first.
    zg = group_pairs(out, grad, norm, group)[:, 1].contiguous() if joint else ds
    launch(_grad_pooled_kernel, (rows,), grad, out, norm, zg, ds, o, grad.stride(0),
           out.stride(0), ds.stride(0), math.sqrt(eps), GROUP_ZG=joint,
           BLOCK_O=min(triton.next_power_of_2(o), 16 if INTERPRET else 1024),
           num_warps=1 if INTERPRET else 4)
    return ds


def wide_grad_passes(ds, x2, y2, wx, wy, bx, by, da, dc, *, factor, dropout, seed,
                     activation=None, shared=0, projection=None, carry=None, prev=None,
                     next_carry=None):
    """Fill ``da``/``dc`` (rows, K*o, input dtype) from ``ds = dL/ds`` (rows, o): the two
    passes of :func:`_wide_grad_kernel`.  MFH block ``l``: ``carry`` is the gradient the
    later blocks pass back, ``prev`` the previous block's running product (both
    (rows, K*o)), and ``next_carry`` receives the carry for block ``l-1``."""
    rows, ko = x2.shape[0], wx.shape[0]
    o = ko // factor
    if rows == 0:
        return
    chained = carry is not None or prev is not None or next_carry is not None
    cfg = pick_wide_bwd_config(x2.dtype, x2.device, activation,
                               all(descriptor_ok(t) for t in (x2, y2, wx, wy)), chained)
    block_j, block_jp = tile_outputs(cfg, factor)
    x2, y2, wx, wy = _checked_operands(cfg, x2, y2, wx, wy, factor)
    drop_args, use_dropout = _dropout_args(dropout, seed)
    act = ACTIVATION_CODES[activation]
    grid = (triton.cdiv(rows, cfg.block_m) * triton.cdiv(o, block_j),)
    # Pass 1 recomputes C and writes dA (= dp * act(C)); pass 2 recomputes A and writes
    # dC.  With an activation, pass 1 also parks act'(C) in dC and pass 2 finishes both.
    # Both passes add a bias, zeros for a layer without one: the bias-free build of the
    # factor-5 sm_90 tile spilled 128 B (with the add it does not; the cost is one
    # (K*o,) vector).
    zeros = wx.new_zeros(ko) if bx is None or by is None else None
    # Co-attention: pass 1 reads y's projection per group (formed again here by cuBLAS,
    # G x K*o, unless kept) instead of recomputing it for every region; a kept
    # projection (shared = 1) is read per row.
    ps = _projection_rows(projection, y2, wy, by) if shared else ds
    for inp, w, b, other, this, act_pass, from_ps, nxt in (
            (y2, wy, by, da, dc, 1, bool(shared), 1), (x2, wx, bx, dc, da, 2, False, 2)):
        if from_ps:
            inp, w = x2, wx  # operand slots never read
        operands, strides, meta = _main_loop_args(cfg, (inp,), (w,), True)
        launch(_wide_grad_kernel, grid,
            *operands, b.contiguous() if b is not None else zeros, ds, other, this,
            rows, inp.shape[1], o,
            *strides, ds.stride(0),
            *drop_args, ps, max(shared, 1),
            ds if carry is None else carry, ds if prev is None else prev,
            ds if next_carry is None else next_carry,
            FACTOR=factor, DROPOUT=use_dropout, POOL=pool_mode(factor),
            BLOCK_J=block_j, BLOCK_JP=block_jp, ACTIVATION=act,
            ACT_PASS=act_pass if act else 0, IDX64=rows * ko >= 2 ** 31, SHARED=from_ps,
            CARRY=carry is not None, PREV=prev is not None,
            NEXT=nxt if next_carry is not None else 0, **meta,
        )


def wide_backward_products(grad, x2, y2, wx, wy, bx, by, out, norm, *, factor, dropout, seed,
                           normalize, eps, activation=None, group=1, shared=0,
                           projection=None):
    """``(dA, dC)``, each (rows, K*o) in the input dtype: the gradients of the
    (pre-activation) projections, recomputed by the wide main loop, one pass per
    projection (the backward of :func:`wide_forward`; ``out``/``norm`` are its outputs,
    ``grad`` the (rows, o) cotangent, ``activation``/``group``/``shared``/``projection``
    as there: with ``shared`` the first pass reads y's projection instead of recomputing
    it).  With ``shared``, dC is per broadcast row: the caller sums each group's rows."""
    rows, ko = x2.shape[0], wx.shape[0]
    da = torch.empty((rows, ko), dtype=x2.dtype, device=x2.device)
    dc = torch.empty((rows, ko), dtype=x2.dtype, device=x2.device)
    ds = pooled_grad(grad, out, norm, normalize=normalize, eps=eps, group=group)
    wide_grad_passes(ds, x2, y2, wx, wy, bx, by, da, dc, factor=factor, dropout=dropout,
                     seed=seed, activation=activation, shared=shared, projection=projection)
    return da, dc
