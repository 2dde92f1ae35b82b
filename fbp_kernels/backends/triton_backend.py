"""Backend ``triton``: the fused Triton kernels behind the backend contract.

Kernels and their design notes (row norm, backward, memory) live in
:mod:`fbp_kernels.backends.triton_kernels`.  This module flattens broadcast inputs
to ``(rows, width)`` matrices, launches the kernels, and runs the four gradient
GEMMs of the backward.

Backward memory: besides the gradients themselves, backward allocates ``dA`` and
``dC`` (each ``rows x factor*o`` in the input dtype) and one fp32 per row for
``<z, g>``; they are freed when backward returns.  Nothing of width ``factor*o``
is saved between forward and backward unless ``save_projections=True``.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch

from ._common import (BackwardResult, ForwardResult, as_rows, broadcast_batch, flatten_rows,
                      group_rows, unflatten_grad)
from . import triton_kernels as K
from . import triton_wide as W

NAME = "triton"


def unsupported_reason(device: torch.device) -> Optional[str]:
    if K.INTERPRET:
        return None if device.type == "cpu" else (
            "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only")
    if device.type != "cuda":
        return (f"Triton kernels need CUDA tensors (got {device.type}); on CPU set "
                f"TRITON_INTERPRET=1 before importing fbp_kernels to use the interpreter")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def _device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dropout_mask(seed: int, shape, rate: float, device) -> torch.Tensor:
    ko = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    with _device_guard(torch.device(device)):
        return K.dropout_keep_mask(seed, rows, ko, rate, device).view(shape)


class CoAttention(NamedTuple):
    """One input shared by each group of ``r`` consecutive broadcast rows: regions
    ``(B, R, m)`` with a question ``(B, 1, n)`` (or the mirror, ``swapped``)."""

    plain: torch.Tensor          # (rows, w): the per-row input as rows
    shared: torch.Tensor         # (rows / r, w'): one row per group
    r: int
    swapped: bool                # the shared input is x (weights swap with it)
    shared_shape: tuple          # the shape ``shared`` was expanded to, for its gradient
    batch: torch.Size


def coattention_layout(x, y) -> Optional[CoAttention]:
    """The co-attention layout of ``(x, y)``, or None.  One input must cover the whole
    broadcast batch; the other is 1 on its last ``d >= 1`` batch dimensions (``R`` =
    their product > 1 rows per group) and broadcasts on the rest (those rows, one per
    group, are expanded: ``rows / R`` of them, not ``rows``)."""
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    nd = len(batch)
    for plain, other, swapped in ((x, y, False), (y, x, True)):
        if tuple(plain.shape[:-1]) != tuple(batch):
            continue
        lead = (1,) * (nd - (other.dim() - 1)) + tuple(other.shape[:-1])
        t = nd
        while t > 0 and lead[t - 1] == 1:
            t -= 1
        r = math.prod(batch[t:])
        if r <= 1:
            continue
        shape = (*batch[:t], *lead[t:], other.shape[-1])
        shared = as_rows(other.reshape(*lead, other.shape[-1]).expand(shape))
        return CoAttention(as_rows(plain), shared, r, swapped, shape, batch)
    return None


def drop_in_problem(factor: int, dtype: torch.dtype, device, save_projections,
                    activation: Optional[str] = None) -> Optional[str]:
    """Why ``norm_dims != 1`` / ``activation`` cannot run here (None when they can): only
    the wide kernels carry them, and those recompute the projections."""
    if save_projections:
        return ("backend 'triton' implements norm_dims/activation in its wide kernels, "
                "which recompute the projections: save_projections must be False "
                "(backend 'split' keeps them)")
    # Every tile the launchers may pick: training-sized and small batches, the backward.
    tiles = (W.pick_wide_config(dtype, device, None), W.pick_wide_config(dtype, device, 1),
             W.pick_wide_bwd_config(dtype, device, activation))
    if not all(W.supports(factor, cfg) for cfg in tiles):
        return (f"backend 'triton' implements norm_dims/activation in its wide kernels, "
                f"whose tiles hold at most {min(c.block_n for c in tiles)} projected "
                f"columns: factor={factor} is too large (use backend='split')")
    return None


def _uses_drop_in(factor, x, save_projections, norm_dims, activation) -> bool:
    """Whether ``norm_dims``/``activation`` are in use; ValueError where they cannot run."""
    if norm_dims == 1 and activation is None:
        return False
    problem = drop_in_problem(factor, x.dtype, x.device, save_projections, activation)
    if problem is not None:
        raise ValueError(problem)
    return True


def _wide_operands(x, y, weight_x, weight_y, bias_x, bias_y):
    """``(x2, y2, wx, wy, bx, by, shared, co)`` for the wide kernels: co-attention inputs
    as (plain rows, one shared row per group), the shared one second (the product is
    symmetric, so a shared x swaps places with y, weights and biases with it); other
    broadcasts as materialised rows (``shared = 0``)."""
    co = coattention_layout(x, y)
    if co is None:
        x2, y2, _ = flatten_rows(x, y)
        return x2, y2, weight_x, weight_y, bias_x, bias_y, 0, None
    if co.swapped:
        return co.plain, co.shared, weight_y, weight_x, bias_y, bias_x, co.r, co
    return co.plain, co.shared, weight_x, weight_y, bias_x, bias_y, co.r, co


def forward(x, y, weight_x, weight_y, bias_x, bias_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float,
            save_projections: bool, norm_dims: int = 1,
            activation: Optional[str] = None) -> ForwardResult:
    drop_in = _uses_drop_in(factor, x, save_projections, norm_dims, activation)
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    rows = math.prod(batch)
    wide_cfg = W.pick_wide_config(x.dtype, x.device, rows)
    if drop_in or (not save_projections and W.supports(factor, wide_cfg)):
        # The wide main loop: one K pass per projection for every factor group, and a
        # row-finishing kernel instead of the ticket protocol (triton_wide.py).
        x2, y2, wx, wy, bx, by, shared, _co = _wide_operands(x, y, weight_x, weight_y,
                                                             bias_x, bias_y)
        with _device_guard(x.device):
            out, norm = W.wide_forward(x2, y2, wx, wy, bx, by,
                                       factor=factor, dropout=dropout, seed=seed,
                                       normalize=normalize, eps=eps, batch=batch,
                                       activation=activation,
                                       group=group_rows(batch, norm_dims) if normalize
                                       and rows else 1, shared=shared)
        return ForwardResult(out, norm.view(batch) if norm is not None else None, None, None)
    x2, y2, batch = flatten_rows(x, y)
    with _device_guard(x.device):
        out, norm, a, c = K.fused_forward(x2, y2, weight_x, weight_y, bias_x, bias_y,
                                          factor=factor, dropout=dropout, seed=seed,
                                          normalize=normalize, eps=eps,
                                          save_projections=save_projections, batch=batch)
    ko = weight_x.shape[0]
    return ForwardResult(out,
                         norm.view(batch) if norm is not None else None,
                         a.view(*batch, ko) if a is not None else None,
                         c.view(*batch, ko) if c is not None else None)


def backward(grad, x, y, weight_x, weight_y, bias_x, bias_y, out, norm, a, c, *,
             factor: int, dropout: float, seed: Optional[int], normalize: bool,
             eps: float, norm_dims: int = 1,
             activation: Optional[str] = None) -> BackwardResult:
    kept_any = a is not None or c is not None
    drop_in = _uses_drop_in(factor, x, kept_any, norm_dims, activation)
    ko = weight_x.shape[0]
    o = ko // factor
    g2 = grad.reshape(-1, o)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if drop_in or (not kept_any and W.supports(
            factor, W.pick_wide_bwd_config(x.dtype, x.device, activation))):
        return _wide_backward(g2, x, y, weight_x, weight_y, bias_x, bias_y, out, norm,
                              factor=factor, dropout=dropout, seed=seed, normalize=normalize,
                              eps=eps, norm_dims=norm_dims, activation=activation)
    x2, y2, batch = flatten_rows(x, y)
    with _device_guard(x.device):
        da, dc = K.fused_backward_products(
            # out is None when normalize=False (not saved); the kernel then never reads z.
            g2, x2, y2, weight_x, weight_y, bias_x, bias_y,
            out.reshape(-1, o) if out is not None else g2,
            norm.reshape(-1) if norm is not None else None,
            a.reshape(-1, ko) if a is not None else None,
            c.reshape(-1, ko) if c is not None else None,
            factor=factor, dropout=dropout, seed=seed, normalize=normalize, eps=eps)
    # The four gradient GEMMs are plain GEMMs: cuBLAS (or CPU BLAS) runs them at peak.
    return _gradients(da, dc, x2, y2, weight_x, weight_y, bias_x, bias_y,
                      lambda d: unflatten_grad(d, batch, x), lambda d: unflatten_grad(d, batch, y))


def _gradients(da, dc, x2, y2, wx, wy, bx, by, shape_x, shape_y) -> BackwardResult:
    """The four gradient GEMMs and the bias sums from the projections' gradients (cuBLAS
    or CPU BLAS at peak; the bias sums are deterministic reductions)."""
    return BackwardResult(shape_x(da @ wx), shape_y(dc @ wy), da.t() @ x2, dc.t() @ y2,
                          da.sum(0) if bx is not None else None,
                          dc.sum(0) if by is not None else None)


def _wide_backward(g2, x, y, weight_x, weight_y, bias_x, bias_y, out, norm, *, factor,
                   dropout, seed, normalize, eps, norm_dims, activation) -> BackwardResult:
    """Lean mode on the wide kernels: dA, dC recomputed (triton_wide), then the GEMMs.
    Co-attention: dC comes per broadcast row and is summed over each group first, so the
    shared side's GEMMs run on one row per group."""
    o = g2.shape[1]
    x2, y2, wx, wy, bx, by, shared, co = _wide_operands(x, y, weight_x, weight_y, bias_x,
                                                        bias_y)
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    out2 = out.reshape(-1, o) if normalize else g2
    if out2.stride(-1) != 1:
        out2 = out2.contiguous()
    with _device_guard(x.device):
        da, dc = W.wide_backward_products(
            g2, x2, y2, wx, wy, bx, by, out2, norm.reshape(-1) if norm is not None else None,
            factor=factor, dropout=dropout, seed=seed, normalize=normalize, eps=eps,
            activation=activation,
            group=group_rows(batch, norm_dims) if normalize and x2.shape[0] else 1,
            shared=shared)
    if co is None:
        return _gradients(da, dc, x2, y2, wx, wy, bx, by,
                          lambda d: unflatten_grad(d, batch, x),
                          lambda d: unflatten_grad(d, batch, y))
    dc = dc.view(-1, shared, dc.shape[1]).sum(1)   # one row per group
    plain, other = (y, x) if co.swapped else (x, y)
    res = _gradients(da, dc, x2, y2, wx, wy, bx, by, lambda d: d.view(plain.shape),
                     lambda d: d.view(co.shared_shape).sum_to_size(other.shape))
    if co.swapped:
        return BackwardResult(res.dy, res.dx, res.dweight_y, res.dweight_x, res.dbias_y,
                              res.dbias_x)
    return res
