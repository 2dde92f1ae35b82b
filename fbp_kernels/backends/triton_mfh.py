"""MFH in Triton: all blocks of a tile in one launch, forward and backward.

Layout as in :mod:`triton_kernels` (the FBP kernels, whose patterns this follows;
they are not imported, so each can change on its own): projected column
``j*K + i`` (``K = factor``) feeds output ``j``; a program owns ``BLOCK_M`` rows x
``BLOCK_O`` outputs and walks the factor groups ``i = 0..K-1``.

Forward (``_mfh_fwd_kernel``).  For factor group ``i`` the blocks are visited in
order: ``A = x W_x^l[cols_i]^T``, ``C = y W_y^l[cols_i]^T`` (``tl.dot``, fp32
accumulate), ``p = drop_l(A * C * p)`` and ``s_l += p``.  The running product ``p``
is one ``(BLOCK_M, BLOCK_O)`` register tile, carried from block to block; the
pooled tiles ``s_0 .. s_{P-1}`` stay in registers across the factor groups.
Nothing of width ``factor*o`` reaches global memory.  The kernel writes
``t_l = signed_sqrt(s_l)`` (or ``s_l`` when not normalising) to an fp32
``(rows, P*o)`` buffer; the row norms ``||t_l||`` and the rescale are finished by
PyTorch on that small buffer (a row spans several programs; an in-kernel finish
like the FBP kernel's ticket scheme would save one read and write of
``rows x P*o`` fp32, small next to the ``2*P*K*o*(m+n)`` FLOPs per row).

Backward (``_mfh_bwd_kernel``), memory-lean: ``ds_l = dL/ds_l`` comes from
``(g, z, ||t_l||)`` (``torch_backend.grad_pooled``, ``(rows, P*o)``).  For each
factor group the kernel recomputes ``A_l, C_l`` for every block and the running
products ``p_0 .. p_{P-2}`` in registers (the two forward GEMMs per block again),
then walks the blocks backwards (formulas in :mod:`torch_mfh`)::

    u_l  = drop_l(ds_l + u_{l+1} * A_{l+1} * C_{l+1})
    dA_l = u_l * p_{l-1} * C_l ;  dC_l = u_l * p_{l-1} * A_l      (p_{-1} = 1)

and writes ``dA_l, dC_l``: transient ``(P, rows, K*o)`` buffers in the input dtype,
freed when backward returns.  The ``4P`` gradient GEMMs (``dx += dA_l W_x^l``,
``dW_x^l = dA_l^T x``, same for y) and the bias sums are left to cuBLAS.  No
atomics: deterministic.

Limits: order 1..``MAX_ORDER`` (the blocks are unrolled at compile time, one
pointer argument per block; the literature uses orders 2 and 3).  Dropout:
block ``l`` keeps element ``(r, col)`` by the FBP kernels' rule
(:mod:`triton_dropout`) keyed by ``block_seed(seed, l)``, so block 0 draws exactly
FBP's Triton mask.

``python -m fbp_kernels.backends.triton_mfh`` (with ``TRITON_INTERPRET`` unset)
compiles both kernels for sm_80 and sm_90 without a GPU and reports registers and
spills.
"""

from __future__ import annotations

import math
import os
import sys
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..reference import NORM_DELTA, row_norm
from ._common import acc_dtype, flatten_rows, unflatten_grad
from .torch_backend import grad_pooled
from .torch_mfh import MFHBackwardResult, MFHForwardResult, block_seed
from .triton_dropout import keep_elements
# Shared with the FBP kernels: the projection tile, launch-config type, dropout mask
# kernel, dot settings and availability rules are the same for both operations.
from .triton_backend import unsupported_reason  # noqa: F401  (backend contract)
from .triton_kernels import (INTERPRET, INTERPRETER_CONFIG, TileConfig, dot_settings,
                             dropout_keep_mask, launch)
from .triton_kernels import _projection_tile as _proj

NAME = "triton"
MAX_ORDER = 4
# ----------------------------------------------------------------------------- helpers


@triton.jit
def _ac(x_base, y_base, wx_ptr, wy_ptr, bx_ptr, by_ptr, col0, rm, m_mask, lc, o_mask, M, N,
        stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk, stride_wyr,
        stride_wyk, HAS_BX: tl.constexpr, HAS_BY: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr):
    """One block's projection tiles ``(A, C)`` for the tile-local columns ``lc``."""
    a = _proj(x_base, wx_ptr + col0 * stride_wxr, rm, m_mask, lc, o_mask, M, stride_xr,
              stride_xk, stride_wxr, stride_wxk, BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
    c = _proj(y_base, wy_ptr + col0 * stride_wyr, rm, m_mask, lc, o_mask, N, stride_yr,
              stride_yk, stride_wyr, stride_wyk, BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
    if HAS_BX:
        a += tl.load(bx_ptr + col0 + lc, mask=o_mask, other=0.0).to(a.dtype)[None, :]
    if HAS_BY:
        c += tl.load(by_ptr + col0 + lc, mask=o_mask, other=0.0).to(c.dtype)[None, :]
    return a, c


@triton.jit
def _drop(v, seed, rows_i64, cols_i64, KO, drop_p, keep_scale, DROPOUT: tl.constexpr):
    """``v * mask / (1 - rate)`` with the block's Philox mask (identity without dropout)."""
    if DROPOUT:
        keep = keep_elements(seed, rows_i64[:, None], cols_i64[None, :], KO, drop_p)
        v = tl.where(keep, v * keep_scale, 0.0)
    return v


@triton.jit
def _store_pooled(s, L: tl.constexpr, t_base, rm, offs_o, tile_mask, O, stride_tr, eps,
                  sqrt_eps, NORMALIZE: tl.constexpr):
    if NORMALIZE:
        # Zero-safe signed sqrt, cancellation-free form s / (sqrt(|s|+eps) + sqrt(eps)).
        s = s / (tl.sqrt(tl.abs(s) + eps) + sqrt_eps)
    tl.store(t_base + rm[:, None] * stride_tr + L * O + offs_o[None, :], s, mask=tile_mask)


@triton.jit
def _load_ds(L: tl.constexpr, ds_base, rm, offs_o, tile_mask, O, stride_dr):
    return tl.load(ds_base + rm[:, None] * stride_dr + L * O + offs_o[None, :], mask=tile_mask,
                   other=0.0)


@triton.jit
def _store_grads(dq, a, c, L: tl.constexpr, da_ptr, dc_ptr, rows, KO, ac_base, ac_offs,
                 tile_mask):
    """``dA_l = dq * C_l`` and ``dC_l = dq * A_l`` into the (P, rows, K*o) buffers."""
    base = L * tl.cast(rows, tl.int64) * KO + ac_base
    tl.store(da_ptr + base + ac_offs, (dq * c).to(da_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(dc_ptr + base + ac_offs, (dq * a).to(dc_ptr.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mfh_fwd_kernel(
    # pointers: inputs, per-block weights and biases (unused blocks get a dummy), output
    x_ptr, y_ptr, wx0, wx1, wx2, wx3, wy0, wy1, wy2, wy3, bx0, bx1, bx2, bx3,
    by0, by1, by2, by3, t_ptr,
    # sizes
    rows, M, N, O,
    # strides (every block's weights share them: the host makes them contiguous)
    stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk, stride_wyr, stride_wyk,
    stride_tr,
    # scalars: per-block dropout seeds, rate, smoothing
    seed0, seed1, seed2, seed3, drop_p, keep_scale, eps, sqrt_eps,
    # meta-parameters
    ORDER: tl.constexpr, FACTOR: tl.constexpr, BX_MASK: tl.constexpr, BY_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, NORMALIZE: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    # int64 scalar tile origins (rows * stride can pass 2^31), int32 offsets inside.
    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = (pid_o * BLOCK_O * FACTOR).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_mask = rm < rows - row0
    o_mask = offs_o < O
    tile_mask = m_mask[:, None] & o_mask[None, :]
    KO = O * FACTOR
    acc_t = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    x_base = x_ptr + row0 * stride_xr
    y_base = y_ptr + row0 * stride_yr

    s0 = tl.zeros((BLOCK_M, BLOCK_O), dtype=acc_t)
    s1 = tl.zeros((BLOCK_M, BLOCK_O), dtype=acc_t)
    s2 = tl.zeros((BLOCK_M, BLOCK_O), dtype=acc_t)
    s3 = tl.zeros((BLOCK_M, BLOCK_O), dtype=acc_t)
    for i in range(FACTOR):
        lc = tl.arange(0, BLOCK_O) * FACTOR + i
        r64 = row0 + rm
        c64 = col0 + lc
        a, c = _ac(x_base, y_base, wx0, wy0, bx0, by0, col0, rm, m_mask, lc, o_mask, M, N,
                   stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk,
                   stride_wyr, stride_wyk, (BX_MASK >> 0) & 1, (BY_MASK >> 0) & 1, BLOCK_M,
                   BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
        p = _drop(a * c, seed0, r64, c64, KO, drop_p, keep_scale, DROPOUT)
        s0 += p
        if ORDER > 1:
            a, c = _ac(x_base, y_base, wx1, wy1, bx1, by1, col0, rm, m_mask, lc, o_mask, M, N,
                       stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk,
                       stride_wyr, stride_wyk, (BX_MASK >> 1) & 1, (BY_MASK >> 1) & 1,
                       BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
            p = _drop(a * c * p, seed1, r64, c64, KO, drop_p, keep_scale, DROPOUT)
            s1 += p
        if ORDER > 2:
            a, c = _ac(x_base, y_base, wx2, wy2, bx2, by2, col0, rm, m_mask, lc, o_mask, M, N,
                       stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk,
                       stride_wyr, stride_wyk, (BX_MASK >> 2) & 1, (BY_MASK >> 2) & 1,
                       BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
            p = _drop(a * c * p, seed2, r64, c64, KO, drop_p, keep_scale, DROPOUT)
            s2 += p
        if ORDER > 3:
            a, c = _ac(x_base, y_base, wx3, wy3, bx3, by3, col0, rm, m_mask, lc, o_mask, M, N,
                       stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk,
                       stride_wyr, stride_wyk, (BX_MASK >> 3) & 1, (BY_MASK >> 3) & 1,
                       BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
            p = _drop(a * c * p, seed3, r64, c64, KO, drop_p, keep_scale, DROPOUT)
            s3 += p

    t_base = t_ptr + row0 * stride_tr
    _store_pooled(s0, 0, t_base, rm, offs_o, tile_mask, O, stride_tr, eps, sqrt_eps, NORMALIZE)
    if ORDER > 1:
        _store_pooled(s1, 1, t_base, rm, offs_o, tile_mask, O, stride_tr, eps, sqrt_eps,
                      NORMALIZE)
    if ORDER > 2:
        _store_pooled(s2, 2, t_base, rm, offs_o, tile_mask, O, stride_tr, eps, sqrt_eps,
                      NORMALIZE)
    if ORDER > 3:
        _store_pooled(s3, 3, t_base, rm, offs_o, tile_mask, O, stride_tr, eps, sqrt_eps,
                      NORMALIZE)


@triton.jit
def _mfh_bwd_kernel(
    # pointers: inputs, per-block weights and biases, dL/ds (rows, P*o), outputs dA, dC
    x_ptr, y_ptr, wx0, wx1, wx2, wx3, wy0, wy1, wy2, wy3, bx0, bx1, bx2, bx3,
    by0, by1, by2, by3, ds_ptr, da_ptr, dc_ptr,
    # sizes
    rows, M, N, O,
    # strides
    stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk, stride_wyr, stride_wyk,
    stride_dr,
    # scalars
    seed0, seed1, seed2, seed3, drop_p, keep_scale,
    # meta-parameters
    ORDER: tl.constexpr, FACTOR: tl.constexpr, BX_MASK: tl.constexpr, BY_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
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
    x_base = x_ptr + row0 * stride_xr
    y_base = y_ptr + row0 * stride_yr
    ds_base = ds_ptr + row0 * stride_dr
    ac_base = row0 * KO + col0  # dA/dC blocks are contiguous (rows, K*o)

    for i in range(FACTOR):
        lc = tl.arange(0, BLOCK_O) * FACTOR + i
        ac_offs = rm[:, None] * KO + lc[None, :]
        r64 = row0 + rm
        c64 = col0 + lc
        # Recompute, in forward order, the projections and the running products.
        a0, c0 = _ac(x_base, y_base, wx0, wy0, bx0, by0, col0, rm, m_mask, lc, o_mask, M, N,
                     stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk,
                     stride_wyr, stride_wyk, (BX_MASK >> 0) & 1, (BY_MASK >> 0) & 1, BLOCK_M,
                     BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
        if ORDER > 1:
            p0 = _drop(a0 * c0, seed0, r64, c64, KO, drop_p, keep_scale, DROPOUT)
            a1, c1 = _ac(x_base, y_base, wx1, wy1, bx1, by1, col0, rm, m_mask, lc, o_mask, M,
                         N, stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk,
                         stride_wyr, stride_wyk, (BX_MASK >> 1) & 1, (BY_MASK >> 1) & 1,
                         BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
        if ORDER > 2:
            p1 = _drop(a1 * c1 * p0, seed1, r64, c64, KO, drop_p, keep_scale, DROPOUT)
            a2, c2 = _ac(x_base, y_base, wx2, wy2, bx2, by2, col0, rm, m_mask, lc, o_mask, M,
                         N, stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk,
                         stride_wyr, stride_wyk, (BX_MASK >> 2) & 1, (BY_MASK >> 2) & 1,
                         BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)
        if ORDER > 3:
            p2 = _drop(a2 * c2 * p1, seed2, r64, c64, KO, drop_p, keep_scale, DROPOUT)
            a3, c3 = _ac(x_base, y_base, wx3, wy3, bx3, by3, col0, rm, m_mask, lc, o_mask, M,
                         N, stride_xr, stride_xk, stride_yr, stride_yk, stride_wxr, stride_wxk,
                         stride_wyr, stride_wyk, (BX_MASK >> 3) & 1, (BY_MASK >> 3) & 1,
                         BLOCK_M, BLOCK_O, BLOCK_K, DOT_FP32, PRECISION)

        # Backwards through the blocks; `carry` = u_{l+1} * A_{l+1} * C_{l+1}, the
        # gradient reaching p_l through block l+1.
        if ORDER > 3:
            u = _drop(_load_ds(3, ds_base, rm, offs_o, tile_mask, O, stride_dr), seed3, r64,
                      c64, KO, drop_p, keep_scale, DROPOUT)
            _store_grads(u * p2, a3, c3, 3, da_ptr, dc_ptr, rows, KO, ac_base, ac_offs,
                         tile_mask)
            carry = u * (a3 * c3)
        if ORDER > 2:
            g = _load_ds(2, ds_base, rm, offs_o, tile_mask, O, stride_dr)
            if ORDER > 3:
                g += carry
            u = _drop(g, seed2, r64, c64, KO, drop_p, keep_scale, DROPOUT)
            _store_grads(u * p1, a2, c2, 2, da_ptr, dc_ptr, rows, KO, ac_base, ac_offs,
                         tile_mask)
            carry = u * (a2 * c2)
        if ORDER > 1:
            g = _load_ds(1, ds_base, rm, offs_o, tile_mask, O, stride_dr)
            if ORDER > 2:
                g += carry
            u = _drop(g, seed1, r64, c64, KO, drop_p, keep_scale, DROPOUT)
            _store_grads(u * p0, a1, c1, 1, da_ptr, dc_ptr, rows, KO, ac_base, ac_offs,
                         tile_mask)
            carry = u * (a1 * c1)
        g = _load_ds(0, ds_base, rm, offs_o, tile_mask, O, stride_dr)
        if ORDER > 1:
            g += carry
        u = _drop(g, seed0, r64, c64, KO, drop_p, keep_scale, DROPOUT)
        _store_grads(u, a0, c0, 0, da_ptr, dc_ptr, rows, KO, ac_base, ac_offs, tile_mask)


# ----------------------------------------------------------------------------- launch settings


#: GPU tiles by order, untuned for speed (no GPU was lent while this was written)
#: but checked for register spills by compiling for sm_90 (fp32, dropout on, K=5):
#: software pipelining (num_stages=2) pushed every variant to 255 registers and
#: spilled, so these use one stage; the backward holds 3P-1 live tiles (A_l, C_l,
#: p_l) per factor group, hence the thinner row tile from order 3.
#: ``python -m fbp_kernels.backends.triton_mfh`` re-checks all of them.
CONFIGS = {
    "order<=2": TileConfig(block_m=32, block_o=32, block_k=32, num_warps=4, num_stages=1),
    "order>=3": TileConfig(block_m=16, block_o=32, block_k=32, num_warps=4, num_stages=1),
}


def config_name(order: int) -> str:
    return "order<=2" if order <= 2 else "order>=3"


def pick_config(order: int) -> TileConfig:
    if INTERPRET:
        return INTERPRETER_CONFIG
    return CONFIGS[config_name(order)]


# ----------------------------------------------------------------------------- host side


def _check_order(order: int) -> None:
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"the Triton MFH kernels support order 1..{MAX_ORDER}, got {order}; "
                         f"use backend='torch' for higher orders")


def _padded(ts: Sequence[Optional[torch.Tensor]], dummy: torch.Tensor) -> List[torch.Tensor]:
    """Per-block pointer arguments: absent entries (and blocks past the order) get a
    dummy tensor the kernel never reads (its constexpr flags say so)."""
    # The kernels index per-block tensors with unit stride in the last dimension
    # (biases get no stride argument at all): copy strided views (tiny for biases).
    ts = [dummy if t is None else t.contiguous() for t in ts]
    return ts + [dummy] * (MAX_ORDER - len(ts))


def _bias_mask(biases: Sequence[Optional[torch.Tensor]]) -> int:
    return sum(1 << l for l, b in enumerate(biases) if b is not None)


def _seeds(seed: Optional[int], order: int) -> List[int]:
    if seed is None:
        return [0] * MAX_ORDER
    return [block_seed(seed, l) for l in range(order)] + [0] * (MAX_ORDER - order)


def _contiguous_weights(weights: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    # One set of strides serves every block: nn.Linear weights are contiguous already,
    # so this copies nothing in practice.
    return [w if w.is_contiguous() else w.contiguous() for w in weights]


def _rows_for_kernels(x, y, ko: int, order: int, o: int):
    """Flatten to ``(rows, width)`` and make sure in-tile offsets fit the kernels' int32.

    Programs add int32 offsets ``row_in_tile * stride`` to int64 tile bases: a row
    stride (of a strided view) too large for that is fixed by a compact copy; a
    ``factor*o`` that large (dA/dC rows) cannot be, so it is refused.
    """
    x2, y2, batch = flatten_rows(x, y)
    block_m = pick_config(order).block_m
    if block_m * x2.stride(0) >= 2**31:
        x2 = x2.contiguous()
    if block_m * y2.stride(0) >= 2**31:
        y2 = y2.contiguous()
    if block_m * max(ko, order * o, x2.shape[1], y2.shape[1]) >= 2**31:
        raise ValueError(f"factor*o={ko} (or a width) is too large for the Triton MFH "
                         f"kernels' int32 in-tile offsets; use backend='torch'")
    return x2, y2, batch


def forward(x, y, weights_x, weights_y, biases_x, biases_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float) -> MFHForwardResult:
    order = len(weights_x)
    _check_order(order)
    wx = _contiguous_weights(weights_x)
    wy = _contiguous_weights(weights_y)
    ko = wx[0].shape[0]
    o = ko // factor
    x2, y2, batch = _rows_for_kernels(x, y, ko, order, o)
    rows, m = x2.shape
    n = y2.shape[1]
    acc = acc_dtype(x.dtype)
    t = torch.empty((rows, order * o), dtype=acc, device=x.device)
    if rows:
        cfg = pick_config(order)
        grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(o, cfg.block_o))
        dot_fp32, precision = dot_settings(x.dtype)
        launch(_mfh_fwd_kernel, grid,
            x2, y2, *_padded(wx, wx[0]), *_padded(wy, wy[0]), *_padded(biases_x, wx[0]),
            *_padded(biases_y, wx[0]), t,
            rows, m, n, o,
            x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
            wx[0].stride(0), wx[0].stride(1), wy[0].stride(0), wy[0].stride(1), t.stride(0),
            *_seeds(seed, order), float(dropout), 1.0 / (1.0 - dropout), float(eps),
            math.sqrt(eps),
            ORDER=order, FACTOR=factor, BX_MASK=_bias_mask(biases_x),
            BY_MASK=_bias_mask(biases_y), DROPOUT=seed is not None, NORMALIZE=normalize,
            DOT_FP32=dot_fp32, PRECISION=precision, BLOCK_M=cfg.block_m,
            BLOCK_O=cfg.block_o, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    # The output is allocated at its final shape, not returned as a view of a
    # temporary: autograd forbids in-place ops on views created inside the op.
    out = torch.empty((*batch, order * o), dtype=x.dtype, device=x.device)
    if not normalize:
        out.view(rows, order * o).copy_(t)
        return MFHForwardResult(out, None)
    tv = t.view(rows, order, o)
    norms = row_norm(tv)  # (rows, P), scaled before squaring
    out.view(rows, order, o).copy_(tv / norms.clamp_min(NORM_DELTA).unsqueeze(-1))
    return MFHForwardResult(out, norms.view(*batch, order))


def backward(grad, x, y, weights_x, weights_y, biases_x, biases_y, out, norms, *,
             factor: int, dropout: float, seed: Optional[int], normalize: bool,
             eps: float) -> MFHBackwardResult:
    order = len(weights_x)
    _check_order(order)
    wx = _contiguous_weights(weights_x)
    wy = _contiguous_weights(weights_y)
    ko = wx[0].shape[0]
    o = ko // factor
    x2, y2, batch = _rows_for_kernels(x, y, ko, order, o)
    rows, m = x2.shape
    n = y2.shape[1]
    acc = acc_dtype(x.dtype)
    # dL/ds for every block, (rows, P*o), from (g, z, ||t_l||): small, done by PyTorch.
    g2 = grad.reshape(rows, order, o)
    if normalize:
        ds = grad_pooled(g2, out.reshape(rows, order, o), norms.reshape(rows, order),
                         normalize=True, eps=eps)
    else:
        ds = g2
    ds = ds.to(acc).reshape(rows, order * o).contiguous()
    da = torch.empty((order, rows, ko), dtype=x.dtype, device=x.device)
    dc = torch.empty((order, rows, ko), dtype=x.dtype, device=x.device)
    if rows:
        cfg = pick_config(order)
        grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(o, cfg.block_o))
        dot_fp32, precision = dot_settings(x.dtype)
        launch(_mfh_bwd_kernel, grid,
            x2, y2, *_padded(wx, wx[0]), *_padded(wy, wy[0]), *_padded(biases_x, wx[0]),
            *_padded(biases_y, wx[0]), ds, da, dc,
            rows, m, n, o,
            x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
            wx[0].stride(0), wx[0].stride(1), wy[0].stride(0), wy[0].stride(1), ds.stride(0),
            *_seeds(seed, order), float(dropout), 1.0 / (1.0 - dropout),
            ORDER=order, FACTOR=factor, BX_MASK=_bias_mask(biases_x),
            BY_MASK=_bias_mask(biases_y), DROPOUT=seed is not None, DOT_FP32=dot_fp32,
            PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_O=cfg.block_o,
            BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    # The gradient GEMMs are plain GEMMs: cuBLAS (or CPU BLAS) runs them at peak.
    dx2 = sum(da[l] @ weights_x[l] for l in range(order))
    dy2 = sum(dc[l] @ weights_y[l] for l in range(order))
    dwx = [da[l].t() @ x2 for l in range(order)]
    dwy = [dc[l].t() @ y2 for l in range(order)]
    dbx = [da[l].sum(0) if b is not None else None for l, b in enumerate(biases_x)]
    dby = [dc[l].sum(0) if b is not None else None for l, b in enumerate(biases_y)]
    return MFHBackwardResult(unflatten_grad(dx2, batch, x), unflatten_grad(dy2, batch, y),
                             dwx, dwy, dbx, dby)


def block_masks(seed: int, shape, rate: float, order: int, device) -> List[torch.Tensor]:
    """The ``order`` bool keep-masks (each ``shape``, i.e. ``(..., K*o)``) the kernels
    draw for ``seed``."""
    ko = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return [dropout_keep_mask(block_seed(seed, l), rows, ko, rate, device).view(shape)
            for l in range(order)]


# ----------------------------------------------------------------------------- GPU compile check


def _kernel_source(kernel: str, dtype: str, order: int, cfg: TileConfig, dropout: bool):
    """``ASTSource`` of one kernel with the argument types and hints a real launch sees."""
    from triton.compiler import ASTSource

    fn = _mfh_fwd_kernel if kernel == "fwd" else _mfh_bwd_kernel
    per_block = [f"{k}{l}" for k in ("wx", "wy", "bx", "by") for l in range(MAX_ORDER)]
    sig = {k: f"*{dtype}" for k in ["x_ptr", "y_ptr"] + per_block}
    if kernel == "fwd":
        sig["t_ptr"] = "*fp32"
    else:
        sig.update({"ds_ptr": "*fp32", "da_ptr": f"*{dtype}", "dc_ptr": f"*{dtype}"})
    for k in ("rows", "M", "N", "O", "stride_xr", "stride_yr", "stride_wxr", "stride_wyr",
              "stride_tr" if kernel == "fwd" else "stride_dr"):
        sig[k] = "i32"
    for k in ("seed0", "seed1", "seed2", "seed3"):
        sig[k] = "i64"
    for k in ("drop_p", "keep_scale") + (("eps", "sqrt_eps") if kernel == "fwd" else ()):
        sig[k] = "fp32"
    consts = {"stride_xk": 1, "stride_yk": 1, "stride_wxk": 1, "stride_wyk": 1,
              "ORDER": order, "FACTOR": 5, "BX_MASK": (1 << order) - 1,
              "BY_MASK": (1 << order) - 1, "DROPOUT": dropout, "DOT_FP32": False,
              "PRECISION": "ieee", "BLOCK_M": cfg.block_m, "BLOCK_O": cfg.block_o,
              "BLOCK_K": cfg.block_k}
    if kernel == "fwd":
        consts["NORMALIZE"] = True
    for k in consts:
        sig[k] = "constexpr"
    # Pointers and the widths/strides real MFB shapes have are multiples of 16: Triton
    # specialises on that (vectorised loads), so the check must see the same hints.
    aligned = {"M", "N", "stride_xr", "stride_yr", "stride_wxr", "stride_wyr"}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, v in sig.items() if v.startswith("*") or k in aligned}
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def _resources(cubin: bytes) -> dict:
    import re
    import subprocess
    import tempfile

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    found = {key: re.search(rf"{key}:(\d+)", text) for key in ("REG", "STACK")}
    return {"registers": int(found["REG"].group(1)) if found["REG"] else -1,
            "stack_bytes": int(found["STACK"].group(1)) if found["STACK"] else -1}


def compile_report(archs=(80, 90), dtypes=("fp32", "bf16"), orders=(2, 4),
                   dropout: bool = True) -> List[dict]:
    """Compile both kernels, with the configuration each order launches with, for
    real GPU targets (no GPU needed), and read registers and spill stack off each
    cubin.  Needs ``TRITON_INTERPRET`` unset."""
    from triton.backends.compiler import GPUTarget

    if INTERPRET:
        raise RuntimeError("run with TRITON_INTERPRET unset: triton.compile needs JIT kernels")
    report = []
    for arch in archs:
        for dtype in dtypes:
            for order in orders:
                cfg_name = config_name(order)
                cfg = CONFIGS[cfg_name]
                for kernel in ("fwd", "bwd"):
                    row = {"kernel": f"mfh_{kernel}", "arch": arch, "dtype": dtype,
                           "order": order, "config": cfg_name, "ok": False,
                           "registers": -1, "stack_bytes": -1, "error": ""}
                    try:
                        compiled = triton.compile(
                            _kernel_source(kernel, dtype, order, cfg, dropout),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps,
                                     "num_stages": cfg.num_stages})
                        row.update(ok=True, **_resources(compiled.asm["cubin"]))
                    except Exception as exc:  # report every failure, not just the first
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    report.append(row)
    return report


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Compile the MFH kernels for GPU targets.")
    parser.add_argument("--archs", default="80,90")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--orders", default="2,4")
    parser.add_argument("--json", help="write the rows as JSON to this path")
    args = parser.parse_args(argv)
    rows = compile_report(tuple(int(a) for a in args.archs.split(",")),
                          tuple(args.dtypes.split(",")),
                          tuple(int(o) for o in args.orders.split(",")))
    for r in rows:
        print(f"{r['kernel']:8} sm_{r['arch']} {r['dtype']:4} order {r['order']} "
              f"{r['config']:8} regs {r['registers']:>4} stack {r['stack_bytes']:>5} "
              f"{'ok' if r['ok'] else 'FAILED ' + r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
