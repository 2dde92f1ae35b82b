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
from typing import Optional

import torch

from ._common import BackwardResult, ForwardResult, flatten_rows, unflatten_grad
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


def forward(x, y, weight_x, weight_y, bias_x, bias_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float,
            save_projections: bool) -> ForwardResult:
    x2, y2, batch = flatten_rows(x, y)
    wide_cfg = W.pick_wide_config(x.dtype, x.device, x2.shape[0])
    if not save_projections and W.supports(factor, wide_cfg):
        # The wide main loop: one K pass per projection for every factor group, and a
        # row-finishing kernel instead of the ticket protocol (triton_wide.py).
        with _device_guard(x.device):
            out, norm = W.wide_forward(x2, y2, weight_x, weight_y, bias_x, bias_y,
                                       factor=factor, dropout=dropout, seed=seed,
                                       normalize=normalize, eps=eps, batch=batch)
        return ForwardResult(out, norm.view(batch) if norm is not None else None, None, None)
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
             eps: float) -> BackwardResult:
    x2, y2, batch = flatten_rows(x, y)
    o = weight_x.shape[0] // factor
    g2 = grad.reshape(-1, o)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    with _device_guard(x.device):
        da, dc = _products(g2, x2, y2, weight_x, weight_y, bias_x, bias_y, out, norm, a, c,
                           factor=factor, dropout=dropout, seed=seed, normalize=normalize,
                           eps=eps)
    # The four gradient GEMMs are plain GEMMs: cuBLAS (or CPU BLAS) runs them at peak.
    dx = unflatten_grad(da @ weight_x, batch, x)
    dy = unflatten_grad(dc @ weight_y, batch, y)
    dwx = da.t() @ x2
    dwy = dc.t() @ y2
    dbx = da.sum(0) if bias_x is not None else None
    dby = dc.sum(0) if bias_y is not None else None
    return BackwardResult(dx, dy, dwx, dwy, dbx, dby)


def _products(g2, x2, y2, weight_x, weight_y, bias_x, bias_y, out, norm, a, c, *, factor,
              dropout, seed, normalize, eps):
    ko = weight_x.shape[0]
    o = ko // factor
    out2 = out.reshape(-1, o) if out is not None else g2
    if a is None and c is None and W.supports(factor, W.pick_wide_bwd_config(x2.dtype,
                                                                             x2.device)):
        # Lean mode: recompute A and C on the wide main loop (one K pass per projection
        # for every factor group), as the forward does.
        return W.wide_backward_products(g2, x2, y2, weight_x, weight_y, bias_x, bias_y, out2,
                                        norm.reshape(-1) if norm is not None else None,
                                        factor=factor, dropout=dropout, seed=seed,
                                        normalize=normalize, eps=eps)
    return K.fused_backward_products(
        # out is None when normalize=False (not saved); the kernel then never reads z.
        g2, x2, y2, weight_x, weight_y, bias_x, bias_y,
        out.reshape(-1, o) if out is not None else g2,
        norm.reshape(-1) if norm is not None else None,
        a.reshape(-1, ko) if a is not None else None,
        c.reshape(-1, ko) if c is not None else None,
        factor=factor, dropout=dropout, seed=seed, normalize=normalize, eps=eps)
