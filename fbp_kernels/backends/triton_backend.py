"""Backend ``triton``: the fused Triton kernels behind the backend contract.

Kernels and their design notes (row norm, backward, memory) live in
:mod:`fbp_kernels.backends.triton_kernels`.  This module flattens broadcast inputs
to ``(rows, width)`` matrices, launches the kernels, and runs the four gradient
GEMMs of the backward.

Backward memory: besides the gradients themselves, backward allocates ``dA`` and
``dC`` (each ``rows x factor*o`` in the input dtype) and one fp32 per row for
``<z, g>``; they are freed when backward returns.  Nothing of width ``factor*o``
is saved between forward and backward unless ``save_projections`` says so: ``True``
keeps both (the one-launch kernel stores them), ``"x"``/``"y"`` keeps that input's
pre-activation projection at its own leading shape (cuBLAS forms it; the wide kernels
read it in place of that side's main loop, forward and backward, as they read
co-attention's shared projection: one recomputed GEMM in backward instead of two).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Optional

import torch

from ._common import (BackwardResult, CoAttention, ForwardResult, as_rows, broadcast_batch,
                      coattention_layout, flatten_rows, group_rows, unflatten_grad)
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


def drop_in_problem(factor: int, dtype: torch.dtype, device, save_projections,
                    activation: Optional[str] = None) -> Optional[str]:
    """Why ``norm_dims != 1`` / ``activation`` cannot run here (None when they can): only
    the wide kernels carry them, and those recompute the projections."""
    if save_projections is True:
        return ("backend 'triton' implements norm_dims/activation in its wide kernels, "
                "which keep at most one projection: save_projections must be False, "
                "'x' or 'y' (backend 'split' keeps both)")
    return _wide_tiles_problem(factor, dtype, device, activation,
                               "implements norm_dims/activation in its wide kernels")


def _wide_tiles_problem(factor, dtype, device, activation, feature) -> Optional[str]:
    """Why ``feature`` (which only the wide kernels have) cannot run at ``factor``: every
    tile the launchers may pick (training-sized and small batches, the backward) must
    hold a factor group."""
    tiles = (W.pick_wide_config(dtype, device, None),
             W.pick_wide_config(dtype, device, W.SMALL_ROWS),
             W.pick_wide_config(dtype, device, 1),
             W.pick_wide_bwd_config(dtype, device, activation))
    if not all(W.supports(factor, cfg) for cfg in tiles):
        return (f"backend 'triton' {feature}, whose tiles hold at most "
                f"{min(c.block_n for c in tiles)} projected columns: factor={factor} is "
                f"too large (use backend='split')")
    return None


def _uses_drop_in(factor, x, save_projections, norm_dims, activation) -> bool:
    """Whether ``norm_dims``/``activation`` are in use; ValueError where they cannot run."""
    if norm_dims == 1 and activation is None:
        return False
    problem = drop_in_problem(factor, x.dtype, x.device, save_projections, activation)
    if problem is not None:
        raise ValueError(problem)
    return True


class WideLayout(NamedTuple):
    """The wide kernels' operands.  ``x2 (rows, .)`` runs its main loop; ``y2`` runs one
    too (``r == 0``) or is read from its projection ``y2 @ wy^T + by`` (``r > 0``: one
    ``y2`` row per ``r`` consecutive rows; co-attention's shared input, or a kept
    projection at ``r = 1``).  ``swapped``: the slots hold (y, x), weights and biases
    with them (the product is symmetric).  ``grad_x``/``grad_y``: a slot's input
    gradient, ``(len(x2) or len(y2), width)``, to its input's shape (summing broadcast
    rows)."""

    x2: torch.Tensor
    y2: torch.Tensor
    wx: torch.Tensor
    wy: torch.Tensor
    bx: Optional[torch.Tensor]
    by: Optional[torch.Tensor]
    r: int
    swapped: bool
    grad_x: Callable
    grad_y: Callable
    lead: tuple  # the y slot's rows as broadcast dimensions (for its kept projection)


def _wide_layout(x, y, weight_x, weight_y, bias_x, bias_y, keep=None,
                 kept_rows: bool = True) -> WideLayout:
    """The wide kernels' operands for ``(x, y)``.  Co-attention (``coattention_layout``):
    the shared input in the y slot, one row per group.  ``keep`` ``"x"`` / ``"y"`` (the
    middle memory mode): that input in the y slot, read from its kept projection; if it
    is not co-attention's shared input its rows are the broadcast rows, or with
    ``kept_rows=False`` (the forward: the kernels read only the projection) a
    zero-stride view of that shape instead of a copy.  Other broadcasts are
    materialised rows."""
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    co = coattention_layout(x, y)
    swapped = keep == "x" if keep is not None else co is not None and co.swapped
    plain, other = (y, x) if swapped else (x, y)
    wx, wy, bx, by = ((weight_y, weight_x, bias_y, bias_x) if swapped else
                      (weight_x, weight_y, bias_x, bias_y))
    if co is not None and co.swapped == swapped:
        # The y slot is co-attention's shared input: one row per group of co.r rows.
        return WideLayout(co.plain, co.shared, wx, wy, bx, by, co.r, swapped,
                          lambda d: d.view(plain.shape),
                          lambda d: d.view(co.shared_shape).sum_to_size(other.shape),
                          tuple(co.shared_shape[:-1]))
    x2 = as_rows(plain.expand(*batch, plain.shape[-1]))
    rows = x2.shape[0]
    if keep is not None and not kept_rows and tuple(other.shape[:-1]) != tuple(batch):
        # Never read (the kept projection stands in for its main loop); the backward,
        # whose weight gradient reads them, builds its own layout.
        y2 = other.new_empty((1, other.shape[-1])).expand(rows, other.shape[-1])
    else:
        y2 = as_rows(other.expand(*batch, other.shape[-1]))
    return WideLayout(x2, y2, wx, wy, bx, by, 1 if keep is not None else 0, swapped,
                      lambda d: unflatten_grad(d, batch, plain),
                      lambda d: unflatten_grad(d, batch, other), tuple(batch))


def _kept_rows(proj, lay: WideLayout) -> torch.Tensor:
    """A kept projection (its input's leading shape, ``(..., K*o)``) as the wide kernels
    read it: one row per row of the y slot (broadcast rows copied, as for its input)."""
    ko = proj.shape[-1]
    nd = len(lay.lead)
    pad = (1,) * (nd - (proj.dim() - 1))
    return as_rows(proj.reshape(*pad, *proj.shape[:-1], ko).expand(*lay.lead, ko))


def _kept_side(save_projections) -> Optional[str]:
    return save_projections if save_projections in ("x", "y") else None


def kept_problem(factor: int, dtype: torch.dtype, device, activation=None) -> Optional[str]:
    """Why ``save_projections="x"/"y"`` cannot run here (None when it can): the wide
    kernels read the kept projection, so their tiles must hold a factor group."""
    return _wide_tiles_problem(factor, dtype, device, activation,
                               "keeps one projection in its wide kernels")


def forward(x, y, weight_x, weight_y, bias_x, bias_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float,
            save_projections=False, norm_dims: int = 1,
            activation: Optional[str] = None) -> ForwardResult:
    drop_in = _uses_drop_in(factor, x, save_projections, norm_dims, activation)
    keep = _kept_side(save_projections)
    if keep is not None:
        problem = kept_problem(factor, x.dtype, x.device, activation)
        if problem is not None:
            raise ValueError(problem)
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    rows = math.prod(batch)
    wide_cfg = W.pick_wide_config(x.dtype, x.device, rows)
    if drop_in or keep is not None or (not save_projections and
                                       W.supports(factor, wide_cfg)):
        # The wide main loop: one K pass per projection for every factor group, and a
        # row-finishing kernel instead of the ticket protocol (triton_wide.py).
        lay = _wide_layout(x, y, weight_x, weight_y, bias_x, bias_y, keep, kept_rows=False)
        proj = rows_proj = None
        if keep is not None:
            # The middle memory mode: the kept input's pre-activation projection at its
            # own leading shape (cuBLAS), read by the kernel in place of its main loop.
            inp = x if keep == "x" else y
            proj = torch.nn.functional.linear(inp, lay.wy, lay.by)
            rows_proj = _kept_rows(proj, lay)
        with _device_guard(x.device):
            out, norm = W.wide_forward(lay.x2, lay.y2, lay.wx, lay.wy, lay.bx, lay.by,
                                       factor=factor, dropout=dropout, seed=seed,
                                       normalize=normalize, eps=eps, batch=batch,
                                       activation=activation,
                                       group=group_rows(batch, norm_dims) if normalize
                                       and rows else 1, shared=lay.r,
                                       projection=rows_proj)
        return ForwardResult(out, norm.view(batch) if norm is not None else None,
                             proj if keep == "x" else None, proj if keep == "y" else None)
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
    # One kept projection (the middle mode) comes at its input's leading shape.
    keep = "x" if a is not None and c is None else "y" if c is not None and a is None \
        else None
    both = a is not None and c is not None
    drop_in = _uses_drop_in(factor, x, both, norm_dims, activation)
    ko = weight_x.shape[0]
    o = ko // factor
    g2 = grad.reshape(-1, o)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if drop_in or keep is not None or (not both and W.supports(
            factor, W.pick_wide_bwd_config(x.dtype, x.device, activation))):
        return _wide_backward(g2, x, y, weight_x, weight_y, bias_x, bias_y, out, norm,
                              factor=factor, dropout=dropout, seed=seed, normalize=normalize,
                              eps=eps, norm_dims=norm_dims, activation=activation,
                              keep=keep, proj=a if keep == "x" else c)
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


def _slot_gradients(da, dc, lay: WideLayout, wx, wy, bx, by) -> BackwardResult:
    """:func:`_gradients` of one (dA, dC) pair in the layout's slots, the input gradients
    as rows (``lay.grad_x``/``grad_y`` bring them to their inputs' shapes).  The y slot's
    dC (co-attention's shared input) comes per broadcast row and is summed over each
    group first, so that side's GEMMs run on one row per group.  ``wx``..``by``: the
    slots' parameters (MFH passes each block's)."""
    if lay.r > 1:
        dc = dc.view(-1, lay.r, dc.shape[1]).sum(1)   # one row per group
    return _gradients(da, dc, lay.x2, lay.y2, wx, wy, bx, by, lambda d: d, lambda d: d)


def _wide_backward(g2, x, y, weight_x, weight_y, bias_x, bias_y, out, norm, *, factor,
                   dropout, seed, normalize, eps, norm_dims, activation, keep=None,
                   proj=None) -> BackwardResult:
    """dA, dC from the wide kernels (triton_wide), then the GEMMs.  Lean mode: both
    projections recomputed; ``keep`` ``"x"``/``"y"``: that one read from ``proj``.  The y
    slot's dC (co-attention's shared input) comes per broadcast row and is summed over
    each group first, so that side's GEMMs run on one row per group."""
    o = g2.shape[1]
    lay = _wide_layout(x, y, weight_x, weight_y, bias_x, bias_y, keep)
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    out2 = out.reshape(-1, o) if normalize else g2
    if out2.stride(-1) != 1:
        out2 = out2.contiguous()
    with _device_guard(x.device):
        da, dc = W.wide_backward_products(
            g2, lay.x2, lay.y2, lay.wx, lay.wy, lay.bx, lay.by, out2,
            norm.reshape(-1) if norm is not None else None,
            factor=factor, dropout=dropout, seed=seed, normalize=normalize, eps=eps,
            activation=activation,
            group=group_rows(batch, norm_dims) if normalize and lay.x2.shape[0] else 1,
            shared=lay.r, projection=_kept_rows(proj, lay) if proj is not None else None)
    res = _slot_gradients(da, dc, lay, lay.wx, lay.wy, lay.bx, lay.by)
    res = res._replace(dx=lay.grad_x(res.dx), dy=lay.grad_y(res.dy))
    if lay.swapped:
        return BackwardResult(res.dy, res.dx, res.dweight_y, res.dweight_x, res.dbias_y,
                              res.dbias_x)
    return res
