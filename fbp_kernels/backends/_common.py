"""Types and small helpers shared by the backends."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import math

import torch
from torch import Tensor

from ..reference import NORM_DELTA, row_norm


class ForwardResult(NamedTuple):
    """What a backend's forward returns.

    out:  ``(..., o)`` in the input dtype.
    norm: ``(...)`` row norms ``||t||`` before clamping, fp32 (fp64 for fp64 inputs);
          ``None`` when ``normalize=False``.
    a, c: the projections ``(..., factor*o)`` a memory mode keeps (``save_projections``
          ``True``: both; ``"x"`` / ``"y"``: that input's), else ``None``.
    """

    out: Tensor
    norm: Optional[Tensor]
    a: Optional[Tensor]
    c: Optional[Tensor]


class BackwardResult(NamedTuple):
    """Gradients, each shaped like its input; bias gradients are ``None`` without bias."""

    dx: Tensor
    dy: Tensor
    dweight_x: Tensor
    dweight_y: Tensor
    dbias_x: Optional[Tensor]
    dbias_y: Optional[Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_allows_tf32() -> bool:
    """PyTorch's setting for fp32 CUDA matmuls: may they run in TF32?

    The new API (``torch.backends.cuda.matmul.fp32_precision``: "tf32", "ieee", or
    "none" = inherit ``torch.backends.fp32_precision``) where this torch has it: once a
    program has used it, reading the legacy ``allow_tf32`` raises ("mix of the legacy
    and new APIs"), while the new attribute reflects both (``allow_tf32 = True`` and
    ``set_float32_matmul_precision("high")`` read back as "tf32").  Older torch: the
    legacy flag."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def broadcast_batch(a, b) -> torch.Size:
    """``torch.broadcast_shapes(a, b)`` for two shapes, without its per-call cost
    (~40 us: it runs the Python reference implementation); raises ValueError."""
    if tuple(a) == tuple(b):
        return torch.Size(a)
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for p, q in zip(a, b):
        if p == q or q == 1:
            out.append(p)
        elif p == 1:
            out.append(q)
        else:
            raise ValueError(f"shapes {a} and {b} do not broadcast")
    return torch.Size(out)


def as_rows(t: Tensor) -> Tensor:
    """``t (..., w)`` viewed (or copied) as ``(rows, w)``.  ``reshape(-1, w)`` cannot
    infer ``rows`` when ``w == 0`` (a zero-width input), so the count is explicit."""
    rows = 1
    for d in t.shape[:-1]:
        rows *= d
    return t.reshape(rows, t.shape[-1])


def flatten_rows(x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, torch.Size]:
    """Broadcast the leading dimensions and view both inputs as ``(rows, width)``.

    ``reshape`` copies only when a view is impossible (a broadcast input or strides
    that do not collapse); kernels then read rows with an explicit row stride.
    """
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    x2 = as_rows(x.expand(*batch, x.shape[-1]))
    y2 = as_rows(y.expand(*batch, y.shape[-1]))
    return x2, y2, batch


def unflatten_grad(d2: Tensor, batch: torch.Size, like: Tensor) -> Tensor:
    """Undo :func:`flatten_rows` for a gradient: sum over broadcast dimensions."""
    d = d2.view(*batch, like.shape[-1])
    return d if d.shape == like.shape else d.sum_to_size(like.shape)


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


def kept(save_projections) -> Tuple[bool, bool]:
    """Which projections a forward keeps for backward, from the backend-level option:
    ``True`` both, ``False`` neither, ``"x"`` / ``"y"`` only that input's (the middle
    memory mode: half the saved bytes of ``True``, one recomputed GEMM instead of two)."""
    if isinstance(save_projections, str):
        return save_projections == "x", save_projections == "y"
    return bool(save_projections), bool(save_projections)


#: The opt-in switch of the wide forward's warp-specialised Gluon main loop (read per
#: call): ``gluon`` runs backends/gluon_wide.py wherever it applies.
WIDE_ENGINE_ENV = "FBP_WIDE_ENGINE"

#: ``activation`` -> the kernels' code for it (the Triton kernels' ``ACTIVATION``
#: constexpr and the CUDA kernels' ``Activation``, csrc/fbp_math.cuh).
ACTIVATION_CODES = {None: 0, "relu": 1, "tanh": 2}


def group_rows(batch, norm_dims: int) -> int:
    """Rows per normalisation group: the product of the last ``norm_dims - 1`` batch
    dimensions (1 for ``norm_dims=1``)."""
    if norm_dims <= 1:
        return 1
    return math.prod(batch[len(batch) - (norm_dims - 1):])


def join_groups(z_rows: Tensor, out: Tensor, norm: Tensor, group: int) -> None:
    """Turn row-normalised ``z_rows = t / max(||t_row||, delta)`` (``(rows, o)``, with
    the row norms in ``norm (rows,)``) into ``out = t / max(||t_group||, delta)`` for
    groups of ``group`` consecutive rows, and ``norm`` into each row's group norm.
    ``z_rows`` may be ``out`` itself."""
    rn = norm.view(-1, group)
    gn = row_norm(rn, keepdim=True)  # (groups, 1): sqrt(sum of row norms^2), scaled
    scale = rn.clamp_min(NORM_DELTA) / gn.clamp_min(NORM_DELTA)
    torch.mul(z_rows, scale.view(-1, 1), out=out)  # fp32/fp64 maths; one rounding to out
    rn.copy_(gn.expand(-1, group))
