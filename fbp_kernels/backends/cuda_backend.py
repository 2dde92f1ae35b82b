"""Backend ``cuda``: fused CUDA C++ kernels from ``csrc/`` (see docs/cuda.md).

The compiled operators (``torch.ops.fbp_kernels_cuda.*``) take 2-D ``(rows, width)``
inputs; this module flattens the leading dimensions and sums gradients back to each
input's shape.  Co-attention (regions ``(B, R, m)`` with a question ``(B, 1, n)``, or the
mirror; ``_common.coattention_layout``) is not copied per region: the shared input is
passed with one row per group (``rows_per_y = R``), the binding projects it once per
group (cuBLAS) and the fused kernels read that projection per row in place of its GEMM;
its gradient is summed per group before its GEMMs.  Other broadcasts are materialised
(:func:`._common.flatten_rows`).

Forward: one fused kernel per (64- or 128-row, output) tile computes both projections
(tensor cores for fp16/bf16, FMA for fp32/fp64), the product, dropout, the sum
over ``factor`` consecutive columns and the signed square root; a one-warp-per-row
kernel finishes ``||t||`` and the L2 normalisation.  No ``(rows, factor*o)``
tensor is written.  fp16/bf16 tiles are fed asynchronously when every operand is
contiguous along K with 16-byte-aligned rows on an sm_80+ GPU: by TMA into wgmma
(128x128x64, 4 stages) on sm_90 with an sm_90a build; elsewhere by cp.async into
ldmatrix + mma.sync (128x128x32 with 4 stages above 128 rows where the GPU's shared
memory holds it, else 64x64x32 with 3); otherwise by synchronous loads (``FBP_CUDA_STAGING`` =
``auto`` / ``sync`` / ``async`` / ``wide`` / ``wgmma``; none of these has run on a GPU
yet, docs/cuda.md).

Backward: ``ds`` from ``(g, z, ||t||)``, then a kernel that recomputes the
projections tile by tile and writes ``da = dp*c`` and ``dc = dp*a`` as transient
``(rows, factor*o)`` buffers in the input dtype, then cuBLAS for ``dx, dW, db``.

Drop-in options (``ops.DROP_IN_BACKENDS``): ``activation`` (relu/tanh on both
projections, bias included) is applied in the forward's elementwise pass and
differentiated in the backward's from the activated values (``da = dp act(c)
act'(a)``); ``norm_dims > 1`` normalises groups of consecutive flattened rows, each
finished by one 256-thread block (the norm and ``<z, g>`` over the group in a fixed
order), so only the finishing kernels differ.  Never run on a GPU, like the rest of
this backend; the CPU mirrors of that math are tested (tests/test_cuda_backend.py).

Memory modes (``save_projections``): ``True`` / ``"x"`` / ``"y"`` make the fused forward
also write that projection, ``x W_x^T`` (no bias, before the activation; ``(..., K)`` at
the input's own rows, input dtype) from its tile, and the backward's kernel read it
instead of recomputing it (one GEMM fewer per kept side); ``False`` keeps neither.

Dropout: the Triton kernels' stream (:mod:`triton_dropout`), so both GPU backends
draw the same mask: element ``(row, col)`` of the ``(rows, K)`` product has stream
index ``i = row * K4 + col`` (``K4`` = ``K = factor*o`` rounded up to a multiple of 4)
and is kept when Triton's uniform of word ``i & 3`` of Philox4x32-10(counter =
``(lo32(i >> 2), hi32(i >> 2), 0, 0)``, key = ``seed``) is ``>= rate``: a pure
function of ``(seed, row, col)`` with one Philox call per four columns of a row;
:func:`dropout_mask` returns the same mask for tests.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import cuda_build
from ._common import (ACTIVATION_CODES, BackwardResult, ForwardResult, as_rows,
                      broadcast_batch, coattention_layout, flatten_rows, group_rows, kept,
                      unflatten_grad)

NAME = "cuda"


def unsupported_reason(device: torch.device) -> Optional[str]:
    """Why the CUDA kernels cannot run on ``device`` (None when they can).

    Never starts a build: a missing toolchain is reported from what is installed,
    a failed earlier build by its error.
    """
    if device.type != "cuda":
        return f"the cuda backend needs a CUDA device, got {device.type!r}"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    if cuda_build.loaded_library() is not None:
        return None
    if cuda_build.build_failure() is not None:
        return f"the extension failed to build: {cuda_build.build_failure().splitlines()[0]}"
    if cuda_build._try_aot() is not None:
        return None
    missing = cuda_build.missing_requirements()
    if missing:
        return ("the extension is not built and cannot be built just in time; missing: "
                + "; ".join(missing))
    return None


def _ops():
    return cuda_build.ops()


def dropout_mask(seed: int, shape, rate: float, device) -> Tensor:
    """The keep-mask (bool, ``shape``) the kernels apply for ``seed`` to the
    ``(..., K)`` product (rows = the leading elements): the stream index of ``(row,
    col)`` is ``row * K4 + col``, ``K4`` = ``K`` rounded up to 4 (module docstring)."""
    shape = torch.Size(shape)
    ko = shape[-1] if len(shape) else 1
    rows = shape.numel() // ko if ko else 0
    k4 = (ko + 3) // 4 * 4
    index = (torch.arange(rows, device=device, dtype=torch.int64)[:, None] * k4 +
             torch.arange(ko, device=device, dtype=torch.int64)[None, :])
    return _ops().dropout_keep(index, int(seed), float(rate)).view(shape)


def norm_group(batch, norm_dims: int, normalize: bool) -> int:
    # Rows per joint-normalisation group: consecutive rows of the flattened batch.
    return group_rows(batch, norm_dims) if normalize and batch.numel() else 1


class _Side(NamedTuple):
    """How the kernels read one input: ``rows`` (2-D), broadcast row ``r`` reading row
    ``r // per``; ``lead`` the leading shape ``rows`` has (the broadcast batch, or
    co-attention's shared shape); ``grad`` maps a gradient of ``rows`` to the input's
    shape; ``reads_kept``: whether a kept projection is read back (a materialised
    broadcast recomputes it rather than copy it per broadcast row)."""

    rows: Tensor
    per: int
    lead: tuple
    grad: Callable[[Tensor], Tensor]
    reads_kept: bool


def sides(x, y) -> Tuple[_Side, _Side, torch.Size]:
    """The kernels' operands: co-attention's shared input (``_common.coattention_layout``)
    is read once per group of ``R`` rows, never copied per row; other broadcasts are
    materialised rows (``flatten_rows``)."""
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    co = coattention_layout(x, y)
    if co is not None:
        plain, other = (y, x) if co.swapped else (x, y)
        per_row = _Side(co.plain, 1, tuple(batch), lambda d: d.view(plain.shape), True)
        shared = _Side(co.shared, co.r, tuple(co.shared_shape[:-1]),
                       lambda d: d.view(co.shared_shape).sum_to_size(other.shape), True)
        return (shared, per_row, batch) if co.swapped else (per_row, shared, batch)
    x2, y2, _ = flatten_rows(x, y)
    full = [tuple(t.shape[:-1]) == tuple(batch) for t in (x, y)]
    return (_Side(x2, 1, tuple(batch), lambda d: unflatten_grad(d, batch, x), full[0]),
            _Side(y2, 1, tuple(batch), lambda d: unflatten_grad(d, batch, y), full[1]),
            batch)


def _own_projection(proj: Tensor, side: _Side, inp: Tensor) -> Tensor:
    """A kept projection as the operators return it (``side.rows``' rows) at the
    input's own leading shape, ``(*inp.shape[:-1], K)``: rows repeated by a broadcast are
    taken once."""
    ko = proj.shape[-1]
    own = tuple(inp.shape[:-1])
    padded = (1,) * (len(side.lead) - len(own)) + own
    full = proj.view(*side.lead, ko)
    pick = tuple(slice(0, 1) if p == 1 and f != 1 else slice(None)
                 for p, f in zip(padded, side.lead))
    return full[pick].reshape(*own, ko)


def _kept_projection(proj: Tensor, side: _Side, inp: Tensor, weight: Tensor) -> Tensor:
    """What ``save_projections`` keeps of one side: the operators' kept projection, or for
    a materialised broadcast (which backward recomputes; the kernels never wrote its
    broadcast rows' copy) the projection of the input's own rows, by cuBLAS."""
    if side.reads_kept:
        return _own_projection(proj, side, inp)
    return (as_rows(inp) @ weight.t()).view(*inp.shape[:-1], weight.shape[0])


def _kept_rows(proj: Optional[Tensor], side: _Side) -> Optional[Tensor]:
    """A kept projection (its input's own leading shape) as the kernels read it:
    ``side.rows``' rows (expanded where its input broadcasts), or None to recompute."""
    if proj is None or not side.reads_kept:
        return None
    ko = proj.shape[-1]
    pad = (1,) * (len(side.lead) - (proj.dim() - 1))
    return as_rows(proj.reshape(*pad, *proj.shape[:-1], ko).expand(*side.lead, ko))


def run_forward(sx: _Side, sy: _Side, weight_x, weight_y, bias_x, bias_y, *, factor: int,
                dropout: float, seed: Optional[int], normalize: bool, eps: float,
                norm_group: int, activation: Optional[str], keep_x: bool = False,
                keep_y: bool = False, prev: Optional[Tensor] = None, chain: bool = False):
    """The forward operator on ``sides`` operands: ``(out, norm, a, c, p)`` as 2-D rows
    (csrc/fbp_binding.cpp); ``prev`` / ``chain``: one MFH block (cuda_mfh)."""
    return _ops().fbp_forward(
        sx.rows, sy.rows, weight_x, weight_y, bias_x, bias_y, factor, float(dropout), seed,
        bool(normalize), float(eps), ACTIVATION_CODES[activation], norm_group, keep_x, keep_y,
        sx.per, sy.per, prev, chain)


def run_backward(g2: Tensor, sx: _Side, sy: _Side, weight_x, weight_y, bias_x, bias_y,
                 out2: Tensor, norm2: Tensor, *, factor: int, dropout: float,
                 seed: Optional[int], normalize: bool, eps: float, norm_group: int,
                 activation: Optional[str], a2: Optional[Tensor] = None,
                 c2: Optional[Tensor] = None, prev: Optional[Tensor] = None,
                 carry: Optional[Tensor] = None, carry_out: bool = False):
    """The backward operator on ``sides`` operands: ``(dx, dy, dW_x, dW_y, db_x, db_y,
    carry_next)`` with dx, dy on the operands' rows."""
    return _ops().fbp_backward(
        g2, sx.rows, sy.rows, weight_x, weight_y, bias_x, bias_y, out2, norm2, factor,
        float(dropout), seed, bool(normalize), float(eps), ACTIVATION_CODES[activation],
        norm_group, a2, c2, sx.per, sy.per, prev, carry, carry_out)


def forward(x, y, weight_x, weight_y, bias_x, bias_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float, save_projections: bool,
            norm_dims: int = 1, activation: Optional[str] = None) -> ForwardResult:
    """``norm`` per row ``(...)``; with ``norm_dims > 1`` each row holds its group's
    norm (the last ``norm_dims - 1`` batch dimensions).  Kept projections come back at
    their input's own leading shape (as backends ``torch`` and ``split`` keep them)."""
    sx, sy, batch = sides(x, y)
    keep_x, keep_y = kept(save_projections)
    out, norm, a, c, _ = run_forward(
        sx, sy, weight_x, weight_y, bias_x, bias_y, factor=factor, dropout=dropout,
        seed=seed, normalize=normalize, eps=eps,
        norm_group=norm_group(batch, norm_dims, normalize), activation=activation,
        keep_x=keep_x and sx.reads_kept, keep_y=keep_y and sy.reads_kept)
    return ForwardResult(out.view(*batch, weight_x.shape[0] // factor),
                         norm.view(batch) if normalize else None,
                         _kept_projection(a, sx, x, weight_x) if keep_x else None,
                         _kept_projection(c, sy, y, weight_y) if keep_y else None)


def backward(grad, x, y, weight_x, weight_y, bias_x, bias_y, out, norm, a, c, *,
             factor: int, dropout: float, seed: Optional[int], normalize: bool,
             eps: float, norm_dims: int = 1,
             activation: Optional[str] = None) -> BackwardResult:
    # a, c: the raw projections the forward kept (None: recomputed tile by tile).
    sx, sy, batch = sides(x, y)
    o = weight_x.shape[0] // factor
    g2 = grad.reshape(-1, o)
    out2 = out.reshape(-1, o) if out is not None else g2  # None without normalize: unread
    norm2 = norm.reshape(-1) if normalize else out2.new_empty(0)
    dx, dy, dwx, dwy, dbx, dby, _ = run_backward(
        g2, sx, sy, weight_x, weight_y, bias_x, bias_y, out2, norm2, factor=factor,
        dropout=dropout, seed=seed, normalize=normalize, eps=eps,
        norm_group=norm_group(batch, norm_dims, normalize), activation=activation,
        a2=_kept_rows(a, sx), c2=_kept_rows(c, sy))
    return BackwardResult(sx.grad(dx), sy.grad(dy), dwx, dwy,
                          dbx if bias_x is not None else None,
                          dby if bias_y is not None else None)
