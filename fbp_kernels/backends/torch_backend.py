"""Backend ``torch``: FBP in plain PyTorch with a hand-written, memory-lean backward.

Runs on any device; it is the CPU path and the fallback everywhere.

Memory contract (the reason this backend exists): for backward it keeps only the
inputs, the parameters, the output ``z (..., o)`` and the row norm ``||t|| (...)``.
Autograd on the reference keeps the two projections, ``2 * rows * factor * o``
values; here they are recomputed in backward (two extra GEMMs) unless
``save_projections=True`` trades that memory back for speed.  Recomputing is the
default because the projections are ``factor`` times wider than everything else
the layer keeps (5x at the MFB default), and activation memory is what limits
batch size in training.

Backward, per row, given ``g = dL/dz`` (SPEC.md)::

    r  = max(||t||, delta)
    dt = (g - z <z, g>) / r          if ||t|| > delta, else 0  (degenerate row, see
                                     reference.py: finite in every dtype)
    t  = z * r                       exact in both branches, so s is never needed:
    ds = dt * 0.5 / (|t| + sqrt(eps))   (= dt * t'(s) for the zero-safe t)
    dp = repeat(ds, factor) * mask / (1 - rate)
    da = dp * c ;  dc = dp * a ;  dx = da W_x ;  dW_x = da^T x ;  db_x = sum da

Joint normalisation (``norm_dims > 1``): the norm is taken per *group* of rows (the
last ``norm_dims - 1`` batch dimensions together with ``o``).  Forward still returns
one norm per row, each row holding its group's norm (so the saved tensor and the
operators' shapes do not depend on ``norm_dims``); backward then needs ``<z, g>``
summed over the group instead of the row, the rest of the formula is unchanged
(``t = z * r`` holds row by row with the group's ``r``).

Projection activations (``activation`` ``"relu"`` / ``"tanh"``): forward applies them
to ``a`` and ``c`` (after the bias); backward multiplies ``da`` and ``dc`` by the
derivative, computed from the *activated* values (``relu'(a) = [act > 0]``, PyTorch's
0 at the kink; ``tanh'(a) = 1 - act^2``), so the pre-activation is never needed:
``save_projections`` keeps the activated projections.

Broadcasting is native: ``a`` keeps ``x``'s leading shape and ``c`` keeps ``y``'s,
so a VQA question vector is projected once, not once per region; gradients are
summed back to each input's own shape.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import NORM_DELTA, row_norm
from ._common import BackwardResult, ForwardResult, acc_dtype, as_rows, kept

NAME = "torch"


def unsupported_reason(device: torch.device) -> Optional[str]:
    """Every device PyTorch runs on is supported."""
    return None


_MASK64 = 2**64 - 1


def mix_seed(seed: int) -> int:
    """SplitMix64's finaliser of ``seed``: a 64-bit value whose every bit depends on
    every bit of ``seed``.

    The CPU generator (mt19937) keeps only 32 bits of what ``manual_seed`` gets, so
    the raw seed would make ``s`` and ``s + 2**32`` draw the same mask; the mixed
    seed's low 32 bits depend on all 64 bits of ``s``.
    """
    z = (int(seed) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def dropout_mask(seed: int, shape, rate: float, device) -> Tensor:
    """The keep-mask (bool, ``shape``) this backend draws for ``seed``.

    A private ``torch.Generator`` seeded with ``mix_seed(seed)`` makes the mask a pure
    function of the seed (all 64 bits of it), so backward regenerates it instead of
    storing it.
    """
    if torch.device(device).type == "meta":
        # Shape propagation only: the meta device has no generator (and no data).
        return torch.empty(shape, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed))
    return torch.rand(shape, generator=gen, device=device) >= rate


def activate_(t: Tensor, activation: Optional[str]) -> Tensor:
    """``activation`` applied in place to a freshly computed projection ``t``."""
    if activation == "relu":
        return t.relu_()
    if activation == "tanh":
        return t.tanh_()
    return t


def activation_grad_(d: Tensor, act: Tensor, activation: Optional[str]) -> Tensor:
    """``d`` (a fresh gradient w.r.t. the activated projection ``act``, same shape)
    times the activation's derivative, in place, from the activated value alone."""
    if activation == "relu":
        # act > 0 exactly where the pre-activation is > 0: gradient 0 at the kink, as
        # PyTorch's relu backward.
        return d.mul_(act > 0)
    if activation == "tanh":
        return d.mul_(1 - act * act)
    return d


def projection(x, weight, bias, activation: Optional[str] = None) -> Tensor:
    """``activation(x W^T + b)``, ``(..., factor*o)``."""
    return activate_(F.linear(x, weight, bias), activation)


def _projections(x, y, weight_x, weight_y, bias_x, bias_y, activation=None):
    return (projection(x, weight_x, bias_x, activation),
            projection(y, weight_y, bias_y, activation))


def _pooled(a: Tensor, c: Tensor, factor: int, dropout: float, seed: Optional[int]) -> Tensor:
    p = a * c  # (*batch, k*o), broadcast
    if seed is not None:
        p.mul_(dropout_mask(seed, p.shape, dropout, p.device)).mul_(1.0 / (1.0 - dropout))
    return p.view(*p.shape[:-1], p.shape[-1] // factor, factor).sum(-1)


def forward(x, y, weight_x, weight_y, bias_x, bias_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float,
            save_projections: bool, norm_dims: int = 1,
            activation: Optional[str] = None) -> ForwardResult:
    """``norm`` comes back per row ``(...)``: with ``norm_dims > 1`` each row holds the
    norm of its group; the kept projections are the activated ones."""
    a, c = _projections(x, y, weight_x, weight_y, bias_x, bias_y, activation)
    s = _pooled(a, c, factor, dropout, seed)
    keep_a, keep_c = kept(save_projections)
    a, c = (a if keep_a else None), (c if keep_c else None)
    if not normalize:
        return ForwardResult(s, None, a, c)
    z, norm = normalized(s, eps, norm_dims)
    return ForwardResult(z, norm, a, c)


def normalized(s: Tensor, eps: float, norm_dims: int = 1):
    """``(z, ||t||)``: zero-safe signed sqrt and L2 normalisation of the pooled ``s``.

    Shared with the MFH backend (per block), so an order-1 MFH is bitwise FBP.  Done
    on ``(rows, o)`` only, in fp32 for half inputs; ``z`` comes back in ``s``'s dtype.
    With ``norm_dims > 1`` the norm spans the last ``norm_dims - 1`` batch dimensions
    too, and ``||t||`` (shape ``s.shape[:-1]``) holds each row's group norm.
    """
    sf = s.to(acc_dtype(s.dtype))
    t = sf / (torch.sqrt(sf.abs() + eps) + math.sqrt(eps))  # zero-safe signed sqrt
    if norm_dims == 1:
        norm = row_norm(t)  # scaled before squaring: no overflow for |t| near 1e19
        z = t / norm.clamp_min(NORM_DELTA).unsqueeze(-1)
        return z.to(s.dtype), norm
    lead = t.dim() - norm_dims
    # t is fresh and contiguous, so this is a view; explicit sizes because reshape
    # cannot infer -1 next to a zero-sized dimension.
    group = t.reshape(*t.shape[:lead], math.prod(t.shape[lead:]))
    gnorm = row_norm(group)  # (*batch[:lead])
    z = (group / gnorm.clamp_min(NORM_DELTA).unsqueeze(-1)).view(t.shape)
    # One value per row (the operators' norm shape does not depend on norm_dims): a
    # copy of o times fewer values than z.
    norm = gnorm.view(*gnorm.shape, *(1,) * (norm_dims - 1)).expand(t.shape[:-1])
    return z.to(s.dtype), norm.contiguous()


def grad_pooled(grad: Tensor, out: Tensor, norm: Optional[Tensor], *, normalize: bool,
                eps: float, norm_dims: int = 1) -> Tensor:
    """``ds = dL/ds (..., o)`` from the output gradient, the output and the row norm
    (with ``norm_dims > 1``: each row's group norm, as :func:`normalized` returns it).

    Shared by every backend whose backward starts from ``(g, z, ||t||)``.
    """
    if not normalize:
        return grad
    g = grad.to(norm.dtype)
    z = out.to(norm.dtype)
    r = norm.clamp_min(NORM_DELTA).unsqueeze(-1)
    zg = (z * g).sum(-1, keepdim=True)  # (..., 1)
    if norm_dims > 1:
        # <z, g> over the whole group: the last norm_dims - 1 batch dimensions, which
        # in the (..., 1) layout are dimensions -norm_dims .. -2.
        zg = zg.sum(dim=tuple(range(-norm_dims, -1)), keepdim=True)
    proj = (g - z * zg) / r
    # A degenerate row (||t|| <= delta: all zeros, or every product dropped) gets zero
    # gradient (reference.py).  The clamp's slope 1/delta = 1e12 would overflow fp16
    # and bf16 once cast, and inf * 0 then poisons every weight gradient.
    dt = torch.where(norm.unsqueeze(-1) > NORM_DELTA, proj, torch.zeros_like(proj))
    t = z * r
    return dt * (0.5 / (t.abs() + math.sqrt(eps)))


def sum_to(t: Tensor, shape) -> Tensor:
    """``t`` summed down to ``shape`` (broadcast dimensions), without a copy if equal."""
    return t if t.shape == shape else t.sum_to_size(shape)


def backward(grad, x, y, weight_x, weight_y, bias_x, bias_y, out, norm, a, c, *,
             factor: int, dropout: float, seed: Optional[int], normalize: bool,
             eps: float, norm_dims: int = 1,
             activation: Optional[str] = None) -> BackwardResult:
    ds = grad_pooled(grad, out, norm, normalize=normalize, eps=eps,
                     norm_dims=norm_dims).to(x.dtype)
    # Recompute what forward did not keep (both, one, or neither projection); a kept
    # one is already activated.
    if a is None:
        a = projection(x, weight_x, bias_x, activation)
    if c is None:
        c = projection(y, weight_y, bias_y, activation)
    ko = weight_x.shape[0]
    # Expand each pooled gradient over its `factor` consecutive columns.
    dp = ds.unsqueeze(-1).expand(*ds.shape, factor).reshape(*ds.shape[:-1], ko)
    if seed is not None:
        dp = dp * dropout_mask(seed, dp.shape, dropout, dp.device) * (1.0 / (1.0 - dropout))
    da = sum_to(dp * c, (*x.shape[:-1], ko))
    dc = sum_to(dp * a, (*y.shape[:-1], ko))
    if activation is not None:
        # a and c have x's and y's own leading shapes, like da and dc.
        da, dc = activation_grad_(da, a, activation), activation_grad_(dc, c, activation)
    da2, dc2 = da.reshape(-1, ko), dc.reshape(-1, ko)
    dx = (da2 @ weight_x).view(x.shape)
    dy = (dc2 @ weight_y).view(y.shape)
    dwx = da2.t() @ as_rows(x)
    dwy = dc2.t() @ as_rows(y)
    dbx = da2.sum(0) if bias_x is not None else None
    dby = dc2.sum(0) if bias_y is not None else None
    return BackwardResult(dx, dy, dwx, dwy, dbx, dby)
