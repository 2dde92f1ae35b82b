"""MFH (multimodal factorized high-order pooling) in plain PyTorch, memory-lean.

Runs on any device; it is the CPU path and the fallback for MFH everywhere.

Forward, per row, for blocks ``l = 0 .. P-1`` (SPEC.md, "MFH")::

    a_l = W_x^l x + b_x^l ;  c_l = W_y^l y + b_y^l ;  q_l = a_l * c_l
    p_0 = q_0 * d_0 ;        p_l = q_l * p_{l-1} * d_l        (length factor*o)
    s_l = sumpool_k(p_l) ;   z_l = L2(signed_sqrt(s_l))        (length o)
    out = concat(z_0, ..., z_{P-1})                            (length P*o)

where ``d_l = mask_l / (1 - rate)`` is block ``l``'s dropout (``d_l = 1`` without).

Memory contract: for backward the op keeps only the inputs, the parameters, the
output ``(..., P*o)`` and the per-block row norms ``(..., P)``.  Autograd on the
reference keeps, per block, the two projections, the product and the dropout
mask: at least ``3 * P * rows * factor * o`` values.  Here everything of width
``factor*o`` is recomputed in backward (``2P`` extra GEMMs).

Backward, given ``g_l = dL/dz_l``.  ``p_l`` feeds its own pooling and, through
``p_{l+1} = q_{l+1} * p_l * d_{l+1}``, every later block, so the total gradient
of ``p_l`` is accumulated from the last block down::

    e_l  = repeat(grad_pooled(g_l, z_l, ||t_l||), factor)     own pooled gradient
    G_{P-1} = e_{P-1}
    G_l  = e_l + G_{l+1} * d_{l+1} * q_{l+1}                  = e_l + u_{l+1} * q_{l+1}
    u_l  = G_l * d_l                                          dL/d(q_l * p_{l-1})
    dq_l = u_l * p_{l-1}      (dq_0 = u_0)
    da_l = dq_l * c_l ;  dc_l = dq_l * a_l
    dx = sum_l da_l W_x^l ;  dW_x^l = da_l^T x ;  db_x^l = sum_rows da_l   (y alike)

Transient memory in backward (freed when the op returns): the recomputed
``a_l, c_l`` (each in its own input's leading shape) and ``p_0 .. p_{P-2}``, i.e.
at most ``3P - 1`` tensors of width ``factor*o``; the masks are regenerated from
the seed once and kept as bool.  Backward runs one layer at a time, so this peak
does not add up across a network the way saved activations do.

``norm_dims`` and ``activation`` act per block exactly as in the FBP backend
(:mod:`torch_backend`): the group-wise norm and its gradient are the shared
``normalized`` / ``grad_pooled``; ``a_l, c_l`` above are the activated projections and
``da_l, dc_l`` are multiplied by the activation's derivative (from the activated value).

Dropout: block ``l`` draws its keep-mask over the broadcast ``(..., factor*o)``
shape with :func:`torch_backend.dropout_mask` from ``block_seed(seed, l)``
(below); block 0 uses the op's seed itself, so an order-1 MFH draws exactly the
mask FBP draws for the same seed.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ._common import as_rows, broadcast_batch
# One implementation of every per-row rule shared with FBP (FBP is MFH of order 1):
# availability, dropout masks, normalisation, its gradient, broadcast sums.
from .torch_backend import (activation_grad_, dropout_mask, grad_pooled,  # noqa: F401
                            normalized, projection, sum_to, unsupported_reason)

NAME = "torch"

#: Odd 64-bit constant (2^64 / golden ratio) used to spread block seeds apart.
_SEED_STRIDE = 0x9E3779B97F4A7C15
#: Seeds stay in [0, 2^62), the range the public function draws from, so they fit
#: an int64 everywhere (torch.Generator, Triton kernel arguments).
_SEED_MOD = 2**62


def block_seed(seed: int, block: int) -> int:
    """The dropout seed of block ``block`` (0-based) for the op's ``seed``.

    ``(seed + block * 0x9E3779B97F4A7C15) mod 2**62``: block 0 keeps ``seed``
    (for ``seed < 2**62``), later blocks land far apart in seed space, so two calls
    whose op seeds differ by a small amount do not share block masks.
    """
    return (int(seed) + block * _SEED_STRIDE) % _SEED_MOD


def block_masks(seed: int, shape, rate: float, order: int, device) -> List[Tensor]:
    """The ``order`` bool keep-masks (each ``shape``) the backends use for ``seed``."""
    return [dropout_mask(block_seed(seed, l), shape, rate, device) for l in range(order)]


class MFHForwardResult(NamedTuple):
    """out: ``(..., P*o)``; norms: ``(..., P)`` row norms ``||t_l||`` before clamping,
    fp32 (fp64 for fp64 inputs), ``None`` when ``normalize=False``."""

    out: Tensor
    norms: Optional[Tensor]


class MFHBackwardResult(NamedTuple):
    """Gradients shaped like the inputs; bias entries are ``None`` where the bias is."""

    dx: Tensor
    dy: Tensor
    dweights_x: List[Tensor]
    dweights_y: List[Tensor]
    dbiases_x: List[Optional[Tensor]]
    dbiases_y: List[Optional[Tensor]]


def forward(x: Tensor, y: Tensor, weights_x: Sequence[Tensor], weights_y: Sequence[Tensor],
            biases_x: Sequence[Optional[Tensor]], biases_y: Sequence[Optional[Tensor]], *,
            factor: int, dropout: float, seed: Optional[int], normalize: bool,
            eps: float, norm_dims: int = 1,
            activation: Optional[str] = None) -> MFHForwardResult:
    """MFH forward.  ``x (..., m)``, ``y (..., n)``, ``weights_x[l] (factor*o, m)``,
    ``weights_y[l] (factor*o, n)``, ``biases_*[l] (factor*o,)`` or ``None``.

    Only one block's ``a, c, p`` (width ``factor*o``) is alive at a time, plus the
    previous block's ``p``.
    """
    outs, norms = [], []
    prev = None
    for l, (wx, wy, bx, by) in enumerate(zip(weights_x, weights_y, biases_x, biases_y)):
        p = projection(x, wx, bx, activation) * projection(y, wy, by, activation)
        if prev is not None:
            p.mul_(prev)
        if seed is not None:
            mask = dropout_mask(block_seed(seed, l), p.shape, dropout, p.device)
            p.mul_(mask).mul_(1.0 / (1.0 - dropout))
        s = p.view(*p.shape[:-1], p.shape[-1] // factor, factor).sum(-1)
        prev = p
        if normalize:
            s, norm = normalized(s, eps, norm_dims)
            norms.append(norm)
        outs.append(s)
    out = torch.cat(outs, dim=-1)
    return MFHForwardResult(out, torch.stack(norms, dim=-1) if normalize else None)


def _product_shape(a: Tensor, c: Tensor) -> torch.Size:
    return broadcast_batch(a.shape, c.shape)


def backward(grad: Tensor, x: Tensor, y: Tensor, weights_x: Sequence[Tensor],
             weights_y: Sequence[Tensor], biases_x: Sequence[Optional[Tensor]],
             biases_y: Sequence[Optional[Tensor]], out: Tensor, norms: Optional[Tensor], *,
             factor: int, dropout: float, seed: Optional[int], normalize: bool,
             eps: float, norm_dims: int = 1,
             activation: Optional[str] = None) -> MFHBackwardResult:
    """Gradients of MFH from ``grad = dL/dout (..., P*o)``, the saved output and the
    row norms ``(..., P)`` (``None`` when ``normalize=False``).  See the module
    docstring for the formulas and what is recomputed."""
    order = len(weights_x)
    ko = weights_x[0].shape[0]
    o = ko // factor
    scale = 1.0 / (1.0 - dropout)

    # Recompute the projections, the masks and the running products p_0 .. p_{P-2}.
    a_s, c_s, masks, p_s = [], [], [], []
    prev = None
    for l in range(order):
        a = projection(x, weights_x[l], biases_x[l], activation)
        c = projection(y, weights_y[l], biases_y[l], activation)
        a_s.append(a)
        c_s.append(c)
        if l == order - 1:
            break  # the last product feeds nothing in backward
        p = a * c
        if prev is not None:
            p.mul_(prev)
        if seed is not None:
            mask = dropout_mask(block_seed(seed, l), p.shape, dropout, p.device)
            masks.append(mask)
            p.mul_(mask).mul_(scale)
        p_s.append(p)
        prev = p
    if seed is not None:
        masks.append(dropout_mask(block_seed(seed, order - 1), _product_shape(a_s[-1], c_s[-1]),
                                  dropout, x.device))

    dx = dy = None
    dwx: List[Tensor] = [None] * order
    dwy: List[Tensor] = [None] * order
    dbx: List[Optional[Tensor]] = [None] * order
    dby: List[Optional[Tensor]] = [None] * order
    x2, y2 = as_rows(x), as_rows(y)
    u_next = None  # u_{l+1} = G_{l+1} * d_{l+1}
    for l in reversed(range(order)):
        sl = slice(l * o, (l + 1) * o)
        ds = grad_pooled(grad[..., sl], out[..., sl] if normalize else None,
                         norms[..., l] if normalize else None,
                         normalize=normalize, eps=eps, norm_dims=norm_dims).to(x.dtype)
        # e_l: each pooled gradient repeated over its `factor` consecutive columns.
        G = ds.unsqueeze(-1).expand(*ds.shape, factor).reshape(*ds.shape[:-1], ko)
        if u_next is not None:
            G = G + u_next * (a_s[l + 1] * c_s[l + 1])
        u = G * masks[l] * scale if seed is not None else G
        dq = u * p_s[l - 1] if l > 0 else u
        # Free what later iterations no longer need before the next allocations.
        a, c = a_s[l], c_s[l]
        if l + 1 < order:
            a_s[l + 1] = c_s[l + 1] = None
        if l > 0:
            p_s[l - 1] = None
        u_next = u
        da = sum_to(dq * c, (*x.shape[:-1], ko))
        dc = sum_to(dq * a, (*y.shape[:-1], ko))
        if activation is not None:
            da, dc = activation_grad_(da, a, activation), activation_grad_(dc, c, activation)
        da2, dc2 = da.reshape(-1, ko), dc.reshape(-1, ko)
        gx = (da2 @ weights_x[l]).view(x.shape)
        gy = (dc2 @ weights_y[l]).view(y.shape)
        dx = gx if dx is None else dx.add_(gx)
        dy = gy if dy is None else dy.add_(gy)
        dwx[l] = da2.t() @ x2
        dwy[l] = dc2.t() @ y2
        dbx[l] = da2.sum(0) if biases_x[l] is not None else None
        dby[l] = dc2.sum(0) if biases_y[l] is not None else None
    return MFHBackwardResult(dx, dy, dwx, dwy, dbx, dby)
