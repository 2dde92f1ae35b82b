"""The naive eager implementation of factorized bilinear pooling: the specification.

Written the way public MFB code writes it (two ``F.linear`` calls, ``*``, dropout,
``view(..., o, k).sum(-1)``, signed square root, ``F.normalize``), with two
deliberate differences: the power normalisation is the zero-safe one below, so the
gradient is finite everywhere and is the true derivative of the forward, and the L2
normalisation gives degenerate (all-zero) rows zero gradient (below).

Every backend is tested against :func:`fbp` and every benchmark uses it as the
baseline.  It keeps the autograd graph of plain PyTorch, so it saves two
``(rows, factor*o)`` tensors (the projections) for backward.

Zero-safe power normalisation (``eps > 0``)::

    t(s)  = sign(s) * (sqrt(|s| + eps) - sqrt(eps))  =  s / (sqrt(|s| + eps) + sqrt(eps))
    t'(s) = 0.5 / sqrt(|s| + eps)            (at most 0.5 / sqrt(eps), at s = 0)

It is computed in the second form: no cancellation for small ``|s|``, and autograd
then gets the derivative right at exactly ``s = 0`` (``sign(s) * f(|s|)`` would give
0 there, because autograd differentiates ``sign`` as 0 and ``sign(0) = 0``).

L2 normalisation: ``z = t / max(||t||, 1e-12)``, the forward of ``F.normalize``.  Its
gradient at a *degenerate* row, ``||t|| <= 1e-12`` (all pooled values zero: padding
with ``bias=False``, or every product dropped), is defined as **zero** rather than the
clamp's slope ``1/1e-12``: that slope is an artifact of the clamp (the function has
no finite-slope direction at ``t = 0``), it overflows fp16 and bf16 (``1e12 * 500``),
and ``inf * 0`` then turns every weight gradient of the batch into NaN.  Zero is also
what such rows should contribute: a padding row should not train the layer, and a
fully dropped row has zero gradient through its mask anyway.  Every backend follows
this convention, in every dtype.

Joint normalisation (``norm_dims``, default 1): the L2 norm spans the ``o`` output
features and the last ``norm_dims - 1`` leading dimensions of the broadcast batch, so
``norm_dims=2`` on an ``(N, C, o)`` result is openvqa's
``F.normalize(t.view(N, -1)).view(N, C, o)`` (after the zero-safe signed sqrt; in MFH
per block).  A group whose norm is ``<= 1e-12`` gets zero gradient, as a row does.

Projection activations (``activation`` in ``None``, ``"relu"``, ``"tanh"``): applied to
both projections, after their biases, before the product (block.bootstrap's and mmf's
``activ_input``).  ``relu`` follows PyTorch's convention at its kink: gradient 0 at
exactly 0.

``t`` is odd, continuously differentiable and within ``sqrt(eps)`` of the textbook
``sign(s) * sqrt(|s|)`` everywhere.  A useful consequence used by the fused
backward: ``t'(s) = 0.5 / (|t| + sqrt(eps))``, so it never needs ``s`` again.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Default smoothing of the power normalisation.  Each pooled value moves by at most
#: ``sqrt(eps) = 1e-3`` from the textbook signed square root; gradients are bounded
#: by ``0.5 / sqrt(eps) = 500`` per element.
DEFAULT_EPS = 1e-6

#: Lower bound on the row norm in the L2 normalisation, as in ``F.normalize``.
NORM_DELTA = 1e-12


def signed_sqrt(s: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Zero-safe signed square root ``sign(s) * (sqrt(|s| + eps) - sqrt(eps))``."""
    return s / (torch.sqrt(s.abs() + eps) + eps**0.5)


def signed_sqrt_grad(s: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Derivative of :func:`signed_sqrt`: ``0.5 / sqrt(|s| + eps)``."""
    return 0.5 * torch.rsqrt(s.abs() + eps)


def row_norm(t: Tensor, keepdim: bool = False) -> Tensor:
    """``||t||_2`` over the last dimension, scaled before squaring so it cannot overflow.

    ``torch.linalg.vector_norm`` squares as it is: fp32 values above ~1.3e19 (which
    ``t`` reaches when the products near fp32's top) give ``inf``.  Each row is divided
    by a power of two ``2^(e-1)`` with ``2^(e-1) <= max|t| < 2^e`` first: exact, so for
    values that did not overflow the result is bitwise that of ``vector_norm``.  The
    scale is a constant for autograd (the norm is 1-homogeneous, so this is exact).
    """
    amax = t.detach().abs().amax(dim=-1, keepdim=True) if t.shape[-1] else \
        t.detach().new_zeros((*t.shape[:-1], 1))
    _, e = torch.frexp(amax)  # amax = mantissa * 2^e; e = 0 for 0, inf and NaN
    scale = torch.exp2((e - 1).to(t.dtype))
    norm = torch.linalg.vector_norm(t / scale, dim=-1, keepdim=True) * scale
    return norm if keepdim else norm.squeeze(-1)


#: The projection activations: name -> function (``None``: identity).
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


def activate(t: Tensor, activation: Optional[str]) -> Tensor:
    """``activation`` (``None``, ``"relu"`` or ``"tanh"``) applied to a projection."""
    if activation is None:
        return t
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'relu' or 'tanh', got {activation!r}")
    return ACTIVATIONS[activation](t)


def check_norm_dims(norm_dims: int, batch_ndim: int) -> None:
    """``norm_dims`` spans the output features plus ``norm_dims - 1`` batch dimensions,
    so it can be at most ``batch_ndim + 1`` (ValueError otherwise)."""
    if norm_dims > batch_ndim + 1:
        raise ValueError(
            f"norm_dims={norm_dims} spans more dimensions than the output has: the "
            f"broadcast batch has {batch_ndim} leading dimension(s), so norm_dims must be "
            f"at most {batch_ndim + 1} (the output features plus every batch dimension)")


def l2_normalize(t: Tensor, norm_dims: int = 1) -> Tensor:
    """``t / max(||t||, NORM_DELTA)`` over the last ``norm_dims`` dimensions
    (``F.normalize``'s forward on the flattened group, with an overflow-safe norm),
    with zero gradient at degenerate groups ``||t|| <= NORM_DELTA``."""
    if norm_dims != 1:
        check_norm_dims(norm_dims, t.dim() - 1)
        lead = t.dim() - norm_dims
        # Explicit sizes: reshape cannot infer -1 next to a zero-sized dimension.
        group = t.reshape(*t.shape[:lead], math.prod(t.shape[lead:]))
        return l2_normalize(group).view(t.shape)
    norm = row_norm(t, keepdim=True)
    return torch.where(norm > NORM_DELTA, t / norm.clamp_min(NORM_DELTA),
                       t.detach() / NORM_DELTA)


def textbook_signed_sqrt(s: Tensor) -> Tensor:
    """``sign(s) * sqrt(|s|)`` as public MFB code writes it (NaN gradient at 0)."""
    return torch.sign(s) * torch.sqrt(s.abs())


def fbp(
    x: Tensor,
    y: Tensor,
    weight_x: Tensor,
    weight_y: Tensor,
    bias_x: Optional[Tensor] = None,
    bias_y: Optional[Tensor] = None,
    *,
    factor: int,
    dropout: float = 0.0,
    training: bool = False,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    dropout_mask: Optional[Tensor] = None,
    norm_dims: int = 1,
    activation: Optional[str] = None,
) -> Tensor:
    """Reference FBP/MFB forward.

    Shapes: ``x (..., m)``, ``y (..., n)`` with broadcastable leading dimensions,
    ``weight_x (factor*o, m)``, ``weight_y (factor*o, n)``, biases ``(factor*o,)``.
    Returns ``(..., o)``.  ``norm_dims`` and ``activation``: see the module docstring.

    ``dropout_mask`` (bool, broadcastable to ``(..., factor*o)``) replaces the random
    mask when given, so tests can feed a backend's own mask to the reference.
    """
    a = activate(F.linear(x, weight_x, bias_x), activation)  # (..., k*o)
    c = activate(F.linear(y, weight_y, bias_y), activation)  # (..., k*o)
    p = a * c
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout)
    elif training and dropout > 0:
        p = F.dropout(p, dropout, training=True)
    o = p.shape[-1] // factor
    s = p.view(*p.shape[:-1], o, factor).sum(-1)  # k consecutive columns per output
    if not normalize:
        return s
    return l2_normalize(signed_sqrt(s, eps), norm_dims)


def mfh(
    x: Tensor,
    y: Tensor,
    weights_x: Sequence[Tensor],
    weights_y: Sequence[Tensor],
    biases_x: Optional[Sequence[Optional[Tensor]]] = None,
    biases_y: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    factor: int,
    dropout: float = 0.0,
    training: bool = False,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    dropout_masks: Optional[Sequence[Tensor]] = None,
    norm_dims: int = 1,
    activation: Optional[str] = None,
) -> Tensor:
    """Reference MFH (order ``p = len(weights_x)``): cascaded FBP blocks.

    ``p_1 = drop(a_1 * c_1)``, ``p_l = drop(a_l * c_l * p_{l-1})``; each block is
    sum-pooled and normalised on its own (``norm_dims`` as in :func:`fbp`, per block);
    outputs are concatenated to ``(..., p*o)``.  ``activation`` acts on every block's
    two projections.
    """
    order = len(weights_x)
    biases_x = list(biases_x) if biases_x is not None else [None] * order
    biases_y = list(biases_y) if biases_y is not None else [None] * order
    outs = []
    prev = None
    for l in range(order):
        p = activate(F.linear(x, weights_x[l], biases_x[l]), activation) * \
            activate(F.linear(y, weights_y[l], biases_y[l]), activation)
        if prev is not None:
            p = p * prev
        if dropout_masks is not None:
            p = p * dropout_masks[l].to(p.dtype) / (1.0 - dropout)
        elif training and dropout > 0:
            p = F.dropout(p, dropout, training=True)
        prev = p
        o = p.shape[-1] // factor
        s = p.view(*p.shape[:-1], o, factor).sum(-1)
        if normalize:
            s = l2_normalize(signed_sqrt(s, eps), norm_dims)
        outs.append(s)
    return torch.cat(outs, dim=-1)
