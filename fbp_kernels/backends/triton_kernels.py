"""Triton kernels for fused factorized bilinear pooling, and their launchers.

Layout: the projected column ``j*K + i`` (``K = factor``) feeds output ``j``.  A
program owns a tile of ``BLOCK_M`` rows x ``BLOCK_O`` outputs and walks the factor
groups ``i = 0..K-1``: for each it computes the two projection tiles
``A_i = x W_x[cols_i]^T`` and ``C_i = y W_y[cols_i]^T`` (``cols_i = j*K + i``) with
``tl.dot`` in fp32, adds the biases, multiplies, applies dropout and accumulates
``s += A_i * C_i``.  Only the ``(BLOCK_M, BLOCK_O)`` pooled tile ever exists;
the ``(rows, K*o)`` projections and product never reach global memory.  Three fp32
accumulators live at once (A_i, C_i, s).

Row norm ("last program finishes", one launch).  The L2 norm of a row spans every
output tile, i.e. several programs.  Each program writes its tile of
``t = signed_sqrt(s)`` (fp32 scratch) and, per row, its max ``|t|`` and partial
``sum((t/max)^2)`` (scaled before squaring: ``t^2`` summed over a row overflows fp32
for ``|t|`` near 1e19), then
takes a ticket from a per-row-block counter (``atomic_add``, acq_rel, after a CTA
barrier so the whole tile is published).  The program that draws the last ticket
combines the partials in tile order (deterministic), writes ``||t||`` and rescales the
row block's ``t`` into the output.  The counters are zeroed per call (one memset of
``rows / BLOCK_M`` int32) from the caching allocator, never cached: a buffer kept per
stream was shared by every CUDA graph captured on that stream, so two such graphs
replayed at once on two streams would have drawn each other's tickets (issue 12 item
8); a graph now captures its own zeroed buffer and its memset.  Cost: an extra read and write of
``rows x o`` fp32 (``8*o`` bytes per row, against ``2*K*o*(m+n)`` FLOPs per row of
GEMM work) and a serial tail of ``o/BLOCK_O`` tiny tile copies per row block.  The
alternatives are worse at one end: a program owning whole rows leaves most SMs idle
at small batch (1..64 rows), and a separate finishing kernel costs a second launch.

Backward (memory-lean, "recompute"): from ``(g, z, ||t||)`` it needs neither ``s``
nor the projections saved: ``t = z * max(||t||, delta)`` and
``t'(s) = 0.5 / (|t| + sqrt(eps))``.  ``_row_dot_kernel`` first reduces ``<z, g>``
per row (``rows`` fp32).  ``_fbp_bwd_kernel`` then recomputes ``A_i, C_i`` tile by
tile exactly as the forward does, forms ``dp = ds * mask/(1-p)`` and writes
``dA = dp * C`` and ``dC = dp * A`` (two transient ``(rows, K*o)`` buffers in the
input dtype, freed before backward returns).  The four gradient GEMMs
(``dx = dA W_x``, ``dW_x = dA^T x``, and the same for y) and the bias sums are left
to cuBLAS: they are plain GEMMs that it runs at peak.  No atomics: deterministic.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _common
from .triton_dropout import keep_elements

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
NORM_DELTA = 1e-12
_NORM_DELTA = tl.constexpr(NORM_DELTA)  # usable inside kernels


@triton.jit
def _clamp_norm(norm):
    """``max(norm, delta)`` with delta in ``norm``'s dtype (``tl.maximum`` would make the
    Python constant an fp32 one first: 1e-12 rounded in fp64 kernels), and delta for a
    NaN norm on every target, as the reference's clamp does."""
    return tl.where(norm > _NORM_DELTA, norm, _NORM_DELTA)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _keep_mask(seed, rows_i64, cols_i64, KO, drop_p):
    """Dropout keep-mask for elements (row, col) of the (rows, K*o) product: the shared
    stream of :mod:`triton_dropout` (int64 rows, so no wrap past 2^31 elements)."""
    return keep_elements(seed, rows_i64[:, None], cols_i64[None, :], KO, drop_p)


# Addressing: every program turns its tile origin into int64 *scalar* base pointers
# (row0 * row_stride can pass 2^31) and keeps per-element offsets inside the tile in
# int32 (the host checks they fit).  int64 per-element offsets would double the
# registers spent on addresses and make the kernels spill.


@triton.jit
def _projection_tile(in_base, w_base, rm, m_mask, lc, c_ok, width, stride_ir, stride_ik,
                     stride_wr, stride_wk, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                     PRECISION: tl.constexpr):
    """``in[rm, :] @ w[lc, :]^T`` as a (BLOCK_M, BLOCK_O) fp32 (fp64 for fp64) tile.

    ``rm``/``lc`` are tile-local row and weight-row indices relative to the bases.
    """
    acc_dtype = tl.float64 if in_base.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=acc_dtype)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = in_base + rm[:, None] * stride_ir + rk[None, :] * stride_ik
    # The weight tile is loaded already transposed, (BLOCK_K, BLOCK_O): tl.dot wants K x N.
    b_ptrs = w_base + lc[None, :] * stride_wr + rk[:, None] * stride_wk
    for k0 in range(0, width, BLOCK_K):
        k_mask = rk < width - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=c_ok[None, :] & k_mask[:, None], other=0.0)
        if DOT_FP32:
            # The interpreter cannot multiply bf16 operands (it uses their raw bits).
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc_dtype)
        a_ptrs += BLOCK_K * stride_ik
        b_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _factor_group(x_base, y_base, wx_base, wy_base, bx_base, by_base, rm, m_mask, lc, c_ok,
                  M, N, stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk,
                  stride_wyr, stride_wyk, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr):
    """The two projection tiles (A_i, C_i) for the tile-local weight rows ``lc``."""
    a = _projection_tile(x_base, wx_base, rm, m_mask, lc, c_ok, M, stride_xr, stride_xk,
                         stride_wxr, stride_wxk, BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
    c = _projection_tile(y_base, wy_base, rm, m_mask, lc, c_ok, N, stride_yr, stride_yk,
                         stride_wyr, stride_wyk, BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
    if HAS_BIAS:
        a += tl.load(bx_base + lc, mask=c_ok, other=0.0).to(a.dtype)[None, :]
        c += tl.load(by_base + lc, mask=c_ok, other=0.0).to(c.dtype)[None, :]
    return a, c


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fbp_fwd_kernel(
    # pointers
    x_ptr, y_ptr, wx_ptr, wy_ptr, bx_ptr, by_ptr, out_ptr, t_ptr, partial_ptr, norm_ptr,
    counter_ptr, a_ptr, c_ptr,
    # sizes
    rows, M, N, O,
    # strides
    stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk, stride_wyr, stride_wyk,
    stride_or, stride_tr,
    # scalars (fp64: Triton would type a Python float fp32, rounding fp64 runs' scalars)
    seed, drop_p, keep_scale: tl.float64, eps: tl.float64, sqrt_eps: tl.float64,
    # meta-parameters
    FACTOR: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    NORMALIZE: tl.constexpr, STORE_AC: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = (pid_o * BLOCK_O * FACTOR).to(tl.int64)  # first projected column of the tile
    rm = tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_mask = rm < rows - row0
    o_mask = offs_o < O
    tile_mask = m_mask[:, None] & o_mask[None, :]
    KO = O * FACTOR
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    # The fp64 scalars converted once to the accumulation dtype (exact for fp64).
    keep_scale = tl.full((), keep_scale, acc_dtype)
    eps = tl.full((), eps, acc_dtype)
    sqrt_eps = tl.full((), sqrt_eps, acc_dtype)
    x_base = x_ptr + row0 * stride_xr
    y_base = y_ptr + row0 * stride_yr
    wx_base = wx_ptr + col0 * stride_wxr
    wy_base = wy_ptr + col0 * stride_wyr

    s = tl.zeros((BLOCK_M, BLOCK_O), dtype=acc_dtype)
    for i in range(FACTOR):
        lc = tl.arange(0, BLOCK_O) * FACTOR + i  # tile-local projected columns
        a, c = _factor_group(x_base, y_base, wx_base, wy_base, bx_ptr + col0, by_ptr + col0,
                             rm, m_mask, lc, o_mask, M, N, stride_xr, stride_xk, stride_yr,
                             stride_yk, stride_wxr, stride_wxk, stride_wyr, stride_wyk,
                             HAS_BIAS, BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
        if STORE_AC:
            ac_offs = rm[:, None] * KO + lc[None, :]
            tl.store(a_ptr + row0 * KO + col0 + ac_offs, a.to(a_ptr.dtype.element_ty),
                     mask=tile_mask)
            tl.store(c_ptr + row0 * KO + col0 + ac_offs, c.to(c_ptr.dtype.element_ty),
                     mask=tile_mask)
        p = a * c
        if DROPOUT:
            keep = _keep_mask(seed, row0 + rm, col0 + lc, KO, drop_p)
            p = tl.where(keep, p * keep_scale, 0.0)
        s += p

    if NORMALIZE:
        _finish_normalised(s, rm, offs_o, m_mask, tile_mask, pid_m, pid_o, row0, rows, O,
                           out_ptr, t_ptr, partial_ptr, norm_ptr, counter_ptr, stride_or,
                           stride_tr, eps, sqrt_eps, BLOCK_M, BLOCK_O)
    else:
        tl.store(out_ptr + row0 * stride_or + rm[:, None] * stride_or + offs_o[None, :],
                 s.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _finish_normalised(s, rm, offs_o, m_mask, tile_mask, pid_m, pid_o, row0, rows, O, out_ptr,
                       t_ptr, partial_ptr, norm_ptr, counter_ptr, stride_or, stride_tr, eps,
                       sqrt_eps, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr):
    """Signed sqrt of the pooled tile, then the "last program finishes" row norm."""
    # Zero-safe signed sqrt in the cancellation-free form s / (sqrt(|s|+eps) + sqrt(eps)).
    t = s / (tl.sqrt(tl.abs(s) + eps) + sqrt_eps)
    t = tl.where(tile_mask, t, 0.0)
    rows64 = tl.cast(rows, tl.int64)
    t_base = t_ptr + row0 * stride_tr
    out_base = out_ptr + row0 * stride_or
    tl.store(t_base + rm[:, None] * stride_tr + offs_o[None, :], t, mask=tile_mask)
    n_tiles = tl.num_programs(1)
    # Overflow-safe partials (scale before squaring): |t| reaches ~1.8e19 in fp32, and
    # the sum of a row's t^2 would overflow to inf.  Each tile stores its per-row max
    # |t| (second half of `partial`) and sum((t / max)^2) (first half).
    amax = tl.max(tl.abs(t), axis=1)
    tu = t * (1.0 / tl.where(amax > 0, amax, 1.0))[:, None]
    tl.store(partial_ptr + pid_o * rows64 + row0 + rm, tl.sum(tu * tu, axis=1), mask=m_mask)
    tl.store(partial_ptr + (n_tiles + pid_o) * rows64 + row0 + rm, amax, mask=m_mask)
    # Publish the whole tile (every thread's stores) before the release of the ticket.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + pid_m, 1, sem="acq_rel", scope="gpu")
    if ticket == n_tiles - 1:
        # Last program of this row block: finish the norm (partials combined in tile
        # order: deterministic) and rescale the row block's t into the output.
        # One pass with a running scale: ||t|| = big * sqrt(sumsq), where sumsq is
        # sum(t^2) / big^2 over the tiles seen so far and big their max |t|.
        big = tl.zeros((BLOCK_M,), dtype=t.dtype)
        sumsq = tl.zeros((BLOCK_M,), dtype=t.dtype)
        for j in range(0, n_tiles):
            pmax = tl.load(partial_ptr + (n_tiles + j) * rows64 + row0 + rm, mask=m_mask,
                           other=0.0, cache_modifier=".cg")
            psum = tl.load(partial_ptr + j * rows64 + row0 + rm, mask=m_mask, other=0.0,
                           cache_modifier=".cg")
            nbig = tl.maximum(big, pmax)
            inv = 1.0 / tl.where(nbig > 0, nbig, 1.0)
            rb = big * inv
            rp = pmax * inv
            sumsq = sumsq * (rb * rb) + psum * (rp * rp)
            big = nbig
        norm = big * tl.sqrt(sumsq)
        tl.store(norm_ptr + row0 + rm, norm, mask=m_mask)
        inv = 1.0 / _clamp_norm(norm)
        for j in range(0, n_tiles):
            cols_o = j * BLOCK_O + tl.arange(0, BLOCK_O)
            msk = m_mask[:, None] & (cols_o < O)[None, :]
            tt = tl.load(t_base + rm[:, None] * stride_tr + cols_o[None, :], mask=msk,
                         other=0.0, cache_modifier=".cg")
            tl.store(out_base + rm[:, None] * stride_or + cols_o[None, :],
                     (tt * inv[:, None]).to(out_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _row_dot_kernel(z_ptr, g_ptr, out_ptr, rows, O, stride_zr, stride_gr,
                    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr):
    """``out[r] = <z[r], g[r]>`` in fp32 (fp64 for fp64 inputs)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    m_mask = rm < rows - row0
    acc_dtype = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    z_base = z_ptr + row0 * stride_zr
    g_base = g_ptr + row0 * stride_gr
    for o0 in range(0, O, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        msk = m_mask[:, None] & (offs_o < O)[None, :]
        z = tl.load(z_base + rm[:, None] * stride_zr + offs_o[None, :], mask=msk, other=0.0)
        g = tl.load(g_base + rm[:, None] * stride_gr + offs_o[None, :], mask=msk, other=0.0)
        acc += tl.sum(z.to(acc_dtype) * g.to(acc_dtype), axis=1)
    tl.store(out_ptr + row0 + rm, acc, mask=m_mask)


@triton.jit
def _fbp_bwd_kernel(
    # pointers
    x_ptr, y_ptr, wx_ptr, wy_ptr, bx_ptr, by_ptr, g_ptr, z_ptr, norm_ptr, zg_ptr,
    a_ptr, c_ptr, da_ptr, dc_ptr,
    # sizes
    rows, M, N, O,
    # strides
    stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk, stride_wyr, stride_wyk,
    stride_gr, stride_zr,
    # scalars (fp64, as in the forward)
    seed, drop_p, keep_scale: tl.float64, sqrt_eps: tl.float64,
    # meta-parameters
    FACTOR: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    NORMALIZE: tl.constexpr, LOAD_AC: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = (pid_o * BLOCK_O * FACTOR).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_mask = rm < rows - row0
    o_mask = offs_o < O
    tile_mask = m_mask[:, None] & o_mask[None, :]
    KO = O * FACTOR
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    keep_scale = tl.full((), keep_scale, acc_dtype)  # the fp64 scalars, as in the forward
    sqrt_eps = tl.full((), sqrt_eps, acc_dtype)

    g = tl.load(g_ptr + row0 * stride_gr + rm[:, None] * stride_gr + offs_o[None, :],
                mask=tile_mask, other=0.0).to(acc_dtype)
    if NORMALIZE:
        z = tl.load(z_ptr + row0 * stride_zr + rm[:, None] * stride_zr + offs_o[None, :],
                    mask=tile_mask, other=0.0).to(acc_dtype)
        norm = tl.load(norm_ptr + row0 + rm, mask=m_mask, other=1.0)
        zg = tl.load(zg_ptr + row0 + rm, mask=m_mask, other=0.0)
        r = _clamp_norm(norm)
        # d z / d t: project out z and divide by r; a degenerate row (norm <= delta)
        # gets zero gradient, the convention of reference.py (finite in every dtype).
        dt = tl.where((norm > _NORM_DELTA)[:, None], (g - z * zg[:, None]) / r[:, None],
                      0.0)
        t = z * r[:, None]
        ds = dt * (0.5 / (tl.abs(t) + sqrt_eps))
    else:
        ds = g

    x_base = x_ptr + row0 * stride_xr
    y_base = y_ptr + row0 * stride_yr
    wx_base = wx_ptr + col0 * stride_wxr
    wy_base = wy_ptr + col0 * stride_wyr
    ac_base = row0 * KO + col0  # (rows, K*o) buffers are contiguous
    for i in range(FACTOR):
        lc = tl.arange(0, BLOCK_O) * FACTOR + i
        ac_offs = rm[:, None] * KO + lc[None, :]
        if LOAD_AC:
            a = tl.load(a_ptr + ac_base + ac_offs, mask=tile_mask, other=0.0).to(acc_dtype)
            c = tl.load(c_ptr + ac_base + ac_offs, mask=tile_mask, other=0.0).to(acc_dtype)
        else:
            a, c = _factor_group(x_base, y_base, wx_base, wy_base, bx_ptr + col0, by_ptr + col0,
                                 rm, m_mask, lc, o_mask, M, N, stride_xr, stride_xk, stride_yr,
                                 stride_yk, stride_wxr, stride_wxk, stride_wyr, stride_wyk,
                                 HAS_BIAS, BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
        dp = ds
        if DROPOUT:
            keep = _keep_mask(seed, row0 + rm, col0 + lc, KO, drop_p)
            dp = tl.where(keep, ds * keep_scale, 0.0)
        tl.store(da_ptr + ac_base + ac_offs, (dp * c).to(da_ptr.dtype.element_ty),
                 mask=tile_mask)
        tl.store(dc_ptr + ac_base + ac_offs, (dp * a).to(dc_ptr.dtype.element_ty),
                 mask=tile_mask)


@triton.jit
def _dropout_mask_kernel(mask_ptr, seed, rows, KO, drop_p, BLOCK_M: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """Materialise the keep-mask the fused kernels use (for tests and debugging)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    msk = (offs_m < rows)[:, None] & (offs_c < KO)[None, :]
    keep = _keep_mask(seed, offs_m, offs_c, KO, drop_p)
    tl.store(mask_ptr + offs_m[:, None] * KO + offs_c[None, :], keep.to(tl.int8), mask=msk)


# ----------------------------------------------------------------------------- launch settings


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch settings of one kernel launch."""

    block_m: int
    block_o: int
    block_k: int
    num_warps: int
    num_stages: int


#: The configurations the heuristic below can pick, per operand family (all compiled
#: for sm_80 and sm_90 in CI, see triton_compile.py).  Half precision feeds tensor
#: cores; fp32 (IEEE, PyTorch's default) runs tl.dot on FMA units with operands in
#: registers, so its tiles are smaller to stay clear of register spills.
CONFIGS = {
    "half": {
        # Inference when even "small" would leave SMs idle (rows=1, o=1000 gives only
        # 16 programs of 64 outputs): 16 outputs per program, 4x the programs, each
        # streaming a quarter of the weights.  No split along m/n: the product a*c
        # needs complete projections, so a split-K would need a second pass.
        "tiny": TileConfig(block_m=16, block_o=16, block_k=128, num_warps=4, num_stages=3),
        # Inference (rows <= 32): a thin row tile; parallelism comes from the output
        # tiles and the kernel streams the weights once.
        "small": TileConfig(block_m=16, block_o=64, block_k=64, num_warps=4, num_stages=3),
        # Medium batch: more row reuse per weight tile.
        "medium": TileConfig(block_m=32, block_o=64, block_k=64, num_warps=4, num_stages=3),
        # Training batch: square tile, 8 warps for the three fp32 accumulators
        # (A_i, C_i, s); wgmma on Hopper.
        "large": TileConfig(block_m=64, block_o=64, block_k=32, num_warps=8, num_stages=3),
    },
    "fp32": {
        "tiny": TileConfig(block_m=16, block_o=16, block_k=64, num_warps=4, num_stages=3),
        "small": TileConfig(block_m=16, block_o=32, block_k=32, num_warps=4, num_stages=3),
        # block_k 16: at 32 the sm_80 backward spilled 8 B with Triton 3.6 (the GPU
        # machine's version); 16 compiles clean on 3.6 and 3.8 (184-188 registers).
        "medium": TileConfig(block_m=32, block_o=32, block_k=16, num_warps=4, num_stages=3),
        # 64x64 with 8 warps spills in the backward on sm_90 (FMA dot operands live in
        # registers); 32x64 does not.
        "large": TileConfig(block_m=32, block_o=64, block_k=16, num_warps=8, num_stages=3),
    },
}
#: Tiny tiles for the CPU interpreter: it runs programs one after another.
INTERPRETER_CONFIG = TileConfig(block_m=16, block_o=16, block_k=16, num_warps=1, num_stages=1)


def config_family(dtype: torch.dtype) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(rows: int, o: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """Heuristic tile choice by batch size, width and dtype (the interpreter gets tiny
    tiles).  fp64 (gradcheck) uses the fp32 family's tiles."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    family = CONFIGS[config_family(dtype)]
    if rows <= 32:
        small = family["small"]
        programs = triton.cdiv(rows, small.block_m) * triton.cdiv(o, small.block_o)
        return family["tiny"] if programs < _sm_count(device) else small
    if rows <= 256:
        return family["medium"]
    return family["large"]


#: CUDA's limit on a grid's second dimension (the first kernel's output tiles).
MAX_GRID_Y = 65535


def _first_kernel_grid(rows: int, o: int, cfg):
    """(row tiles, output tiles) of the one-launch kernels; an output count whose tiles
    pass CUDA's 65535 limit on the grid's second dimension (o above ~2-4 million, where
    the launch itself would fail with 'invalid argument') is refused by name."""
    grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(o, cfg.block_o))
    if grid[1] > MAX_GRID_Y:
        raise ValueError(
            f"fbp: {o} outputs make {grid[1]} output tiles of {cfg.block_o}, above CUDA's "
            f"{MAX_GRID_Y} for the one-launch Triton kernel (save_projections=True or a "
            f"factor the wide kernels do not take); use backend='split' or 'torch'")
    return grid


def dot_settings(dtype: torch.dtype):
    """(upcast operands to fp32 before tl.dot?, tl.dot input_precision)."""
    dot_fp32 = INTERPRET and dtype == torch.bfloat16
    if dtype == torch.float32 and not INTERPRET and _common.matmul_allows_tf32():
        return dot_fp32, "tf32"  # honour PyTorch's matmul precision setting
    return dot_fp32, "ieee"


# ----------------------------------------------------------------------------- launchers


#: Serialises kernel launches under TRITON_INTERPRET=1.  The interpreter runs a launch
#: by patching triton.language's module-level functions for the duration and
#: restoring them afterwards; two Python threads launching at once see each other's
#: half-patched module and fail with InterpreterError.  A GPU launch is asynchronous
#: and thread-safe, so there is no lock then.
_INTERPRETER_LOCK = threading.RLock() if INTERPRET else None


def one_cta_registers(num_warps: int) -> dict:
    """Launch option ``maxnreg``: the registers one CTA of ``num_warps`` warps may hold on
    an SM (65536 / threads, at most 255), CUDA's ``__launch_bounds__(threads, 1)``.

    For the kernels whose elementwise dropout (``triton_dropout.keep_elements``) ptxas
    otherwise fit into 96-168 registers with 8 B of spills (the first kernel's forward,
    the split forward epilogue, the mask kernel; Triton 3.6 and 3.8): with the bound they
    compile clean.  Not applied to every kernel: some others then spilled 8-24 B
    (ptxas spent the larger budget elsewhere).  Empty under the interpreter."""
    return {} if INTERPRET else {"maxnreg": min(255, 65536 // (32 * num_warps))}


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, one at a time under the interpreter."""
    with _INTERPRETER_LOCK if _INTERPRETER_LOCK is not None else contextlib.nullcontext():
        return kernel[grid](*args, **kwargs)


_INT32_MAX = 2**31 - 1


def _tile_offsets_fit(cfg: TileConfig, x2, y2, wx, wy, factor: int) -> bool:
    """Whether every per-element offset *inside a tile* fits int32 (tile origins are
    int64 scalars in the kernels, so only these spans matter)."""
    ko = wx.shape[0]
    spans = [
        cfg.block_m * abs(x2.stride(0)) + x2.shape[1] * abs(x2.stride(1)),
        cfg.block_m * abs(y2.stride(0)) + y2.shape[1] * abs(y2.stride(1)),
        cfg.block_o * factor * abs(wx.stride(0)) + wx.shape[1] * abs(wx.stride(1)),
        cfg.block_o * factor * abs(wy.stride(0)) + wy.shape[1] * abs(wy.stride(1)),
        cfg.block_m * ko,  # (rows, K*o) buffers: saved projections, dA, dC
    ]
    return max(spans) <= _INT32_MAX


def _int32_safe(cfg, x2, y2, wx, wy, factor):
    """Copy exotic strided inputs so in-tile offsets fit int32; refuse sizes that can't."""
    if not _tile_offsets_fit(cfg, x2, y2, wx, wy, factor):
        x2, y2, wx, wy = (t.contiguous() for t in (x2, y2, wx, wy))
        if not _tile_offsets_fit(cfg, x2, y2, wx, wy, factor):
            raise ValueError(f"problem too large for the Triton kernels' int32 in-tile "
                             f"offsets: widths {x2.shape[1]}, {y2.shape[1]}, factor*o={wx.shape[0]}; "
                             f"use backend='torch'")
    return x2, y2, wx, wy


def _bias_args(bias_x, bias_y, like):
    if bias_x is None and bias_y is None:
        return like, like, False  # never read: HAS_BIAS=False
    # The kernels index biases with unit stride; a strided bias view is copied (tiny).
    # One HAS_BIAS flag covers both projections, so a missing bias reads as zeros.
    ko = like.shape[0]
    bx = bias_x.contiguous() if bias_x is not None else like.new_zeros(ko)
    by = bias_y.contiguous() if bias_y is not None else like.new_zeros(ko)
    return bx, by, True


def output_buffer(x2, o: int, batch=None):
    """``(out_full (*batch, o), out (rows, o))``: the output allocated at its final shape
    (``batch`` defaults to ``(rows,)``) and the 2-D view kernels write through, so the
    returned output is not itself a view (autograd forbids in-place ops on views created
    inside a custom Function)."""
    rows = x2.shape[0]
    out_full = torch.empty((*(batch if batch is not None else (rows,)), o), dtype=x2.dtype,
                           device=x2.device)
    return out_full, out_full.view(rows, o)


def fused_forward(x2, y2, wx, wy, bx, by, *, factor, dropout, seed, normalize, eps,
                  save_projections, batch=None):
    """Launch the fused forward on ``(rows, m)`` / ``(rows, n)`` matrices.

    Returns ``(out (*batch, o), norm (rows,) or None, a or None, c or None)``;
    ``batch`` defaults to ``(rows,)``.  ``out`` is allocated at its final shape (the
    kernel writes it through a 2-D view) so that it is not itself a view: autograd
    forbids in-place ops on views created inside a custom Function.
    """
    rows, m = x2.shape
    n = y2.shape[1]
    ko = wx.shape[0]
    o = ko // factor
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    out_full, out = output_buffer(x2, o, batch)
    a = c = None
    if save_projections:
        a = torch.empty((rows, ko), dtype=x2.dtype, device=x2.device)
        c = torch.empty((rows, ko), dtype=x2.dtype, device=x2.device)
    if rows == 0:
        return (out_full, (torch.empty(0, dtype=acc, device=x2.device) if normalize else None),
                a, c)
    cfg = pick_config(rows, o, x2.dtype, x2.device)
    x2, y2, wx, wy = _int32_safe(cfg, x2, y2, wx, wy, factor)
    grid = _first_kernel_grid(rows, o, cfg)
    if normalize:
        t = torch.empty((rows, o), dtype=acc, device=x2.device)
        # Per output tile and row: sum((t/max)^2), then (second half) max |t|.
        partial = torch.empty((2 * grid[1], rows), dtype=acc, device=x2.device)
        norm = torch.empty((rows,), dtype=acc, device=x2.device)
        # Zeroed per call, never cached (module docstring: graphs and streams).
        counters = torch.zeros(grid[0], dtype=torch.int32, device=x2.device)
    else:
        t = partial = norm = counters = out  # never touched
    bx_, by_, has_bias = _bias_args(bx, by, wx)
    dot_fp32, precision = dot_settings(x2.dtype)
    launch(_fbp_fwd_kernel, grid,
        x2, y2, wx, wy, bx_, by_, out, t, partial, norm, counters,
        a if a is not None else out, c if c is not None else out,
        rows, m, n, o,
        x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
        wx.stride(0), wx.stride(1), wy.stride(0), wy.stride(1),
        out.stride(0), t.stride(0) if normalize else 0,
        seed if seed is not None else 0, float(dropout),
        1.0 / (1.0 - dropout), float(eps), math.sqrt(eps),
        FACTOR=factor, HAS_BIAS=has_bias, DROPOUT=seed is not None, NORMALIZE=normalize,
        STORE_AC=save_projections, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_O=cfg.block_o, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **one_cta_registers(cfg.num_warps),
    )
    return out_full, (norm if normalize else None), a, c


def fused_backward_products(grad, x2, y2, wx, wy, bx, by, out, norm, a, c, *, factor, dropout,
                            seed, normalize, eps):
    """Launch the backward elementwise kernels: returns ``(dA, dC)``, each (rows, K*o)."""
    rows = x2.shape[0]
    ko = wx.shape[0]
    o = ko // factor
    da = torch.empty((rows, ko), dtype=x2.dtype, device=x2.device)
    dc = torch.empty((rows, ko), dtype=x2.dtype, device=x2.device)
    if rows == 0:
        return da, dc
    cfg = pick_config(rows, o, x2.dtype, x2.device)
    x2, y2, wx, wy = _int32_safe(cfg, x2, y2, wx, wy, factor)
    grid = _first_kernel_grid(rows, o, cfg)
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    if normalize:
        zg = torch.empty((rows,), dtype=acc, device=x2.device)
        launch(_row_dot_kernel, (grid[0],), out, grad, zg, rows, o, out.stride(0), grad.stride(0),
                                    BLOCK_M=cfg.block_m, BLOCK_O=cfg.block_o,
                                    num_warps=cfg.num_warps)
    else:
        zg = norm = grad  # never read
    bx_, by_, has_bias = _bias_args(bx, by, wx)
    dot_fp32, precision = dot_settings(x2.dtype)
    launch(_fbp_bwd_kernel, grid,
        x2, y2, wx, wy, bx_, by_, grad, out, norm, zg,
        a if a is not None else da, c if c is not None else dc, da, dc,
        rows, x2.shape[1], y2.shape[1], o,
        x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
        wx.stride(0), wx.stride(1), wy.stride(0), wy.stride(1),
        grad.stride(0), out.stride(0),
        seed if seed is not None else 0, float(dropout), 1.0 / (1.0 - dropout),
        math.sqrt(eps),
        FACTOR=factor, HAS_BIAS=has_bias, DROPOUT=seed is not None, NORMALIZE=normalize,
        LOAD_AC=a is not None, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_O=cfg.block_o, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return da, dc


#: Tile of the dropout-mask kernel on a GPU (rows, columns).
MASK_BLOCKS = (32, 128)


def dropout_keep_mask(seed: int, rows: int, ko: int, rate: float, device) -> torch.Tensor:
    """The (rows, K*o) bool keep-mask the kernels draw for ``seed``."""
    mask = torch.empty((rows, ko), dtype=torch.int8, device=device)
    if rows and ko:
        bm, bc = (16, 16) if INTERPRET else MASK_BLOCKS
        grid = (triton.cdiv(rows, bm), triton.cdiv(ko, bc))
        if grid[1] > MAX_GRID_Y:  # the launch would fail with 'invalid argument'
            raise ValueError(
                f"fbp: a dropout mask of {ko} columns needs {grid[1]} column tiles of {bc}, "
                f"above CUDA's {MAX_GRID_Y} on the grid's second dimension")
        launch(_dropout_mask_kernel, grid,
            mask, seed, rows, ko, float(rate), BLOCK_M=bm, BLOCK_C=bc,
            **one_cta_registers(4))
    return mask.bool()


def group_pairs(z2: torch.Tensor, g2: torch.Tensor, n2: torch.Tensor, group: int) -> torch.Tensor:
    """``(rows, 2)``: each row's group norm (``n2``, saved by forward) and its group's
    ``<z, g>``, the pair the epilogue's ``GROUP_ZG`` mode reads."""
    rows, o = z2.shape
    zg = torch.empty((rows,), dtype=n2.dtype, device=z2.device)
    if rows:
        cfg = pick_config(rows, o, z2.dtype, z2.device)
        launch(_row_dot_kernel, (-(-rows // cfg.block_m),), z2, g2, zg, rows, o,
               z2.stride(0), g2.stride(0), BLOCK_M=cfg.block_m, BLOCK_O=cfg.block_o,
               num_warps=cfg.num_warps)
    zg = zg.view(-1, group).sum(1, keepdim=True).expand(-1, group)
    return torch.stack((n2.view(-1, group), zg), dim=-1).view(rows, 2)
