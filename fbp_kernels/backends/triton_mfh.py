"""MFH in Triton, on FBP's wide kernels (:mod:`triton_wide`): one kernel family.

MFH of order ``P`` is ``P`` FBP blocks whose expanded products multiply
(``p_l = drop_l(act(A_l) * act(C_l) * p_{l-1})``, formulas in :mod:`torch_mfh`), and
FBP is MFH of order 1.  So every block runs FBP's wide forward kernel, the same main
loop, pooling and row finish, with two options of that kernel: ``PREV`` multiplies
the previous block's running product into the tile before pooling, ``CHAIN`` stores
the block's own product for the next block, a row-major ``(rows, K*o)`` buffer in the
input dtype (eager rounds its products the same way).  Order 1 runs exactly FBP's
launches.  Every FBP option carries over: dropout (block ``l`` draws the shared stream
keyed by ``block_seed(seed, l)``, so block 0 draws FBP's mask), ``activation``,
joint normalisation (``norm_dims > 1``, per block), fp16/bf16/fp32/fp64.

Why the products go through memory (the former MFH kernels kept them in registers):
those ran one K loop per factor group and block on 64-row tiles without TMA, reading
x and y ``K`` times per tile per block.  The wide main loop reads each input once per
tile (64 x 128 tile on sm_90 for chained blocks, wgmma through TMA, 42.7 FLOP per L2
byte) and the chain costs one write and one read of ``rows x K*o`` per block
boundary: at the MFB default (rows 1024, K*o 5000, bf16) 20.5 MB, 4.3 us at the
H200's 4.8 TB/s, against 2 * 1024 * 5000 * 3072 = 31.5 GFLOP of projections per block
(32 us at its 989 TFLOP/s dense bf16 peak).

Backward, memory-lean (only the inputs, parameters, output and per-block norms are
saved): the forward kernel recomputes the running products ``p_0 .. p_{P-2}``
(``CHAIN``; their pooled sums go to a scratch row), then the blocks run from last to
first, each as FBP's two backward passes with three more options
(:func:`triton_wide._wide_grad_kernel`): ``CARRY`` adds the gradient the later
blocks pass back to the block's unpooled ``ds``, ``PREV`` multiplies ``p_{l-1}`` in, and
``NEXT`` forms the carry for block ``l-1`` (``u * act(C)`` in pass 1, times ``act(A)`` in
pass 2).  cuBLAS runs each block's four gradient GEMMs and bias sums (no atomics:
deterministic).  Transient: ``P - 1`` products, two carries and one block's dA/dC,
each ``(rows, K*o)`` (with co-attention also each block's shared projection, one row
per group, formed once and read by both uses).

Broadcasts take FBP's operand layout (``triton_backend._wide_layout``): co-attention
(regions ``(B, R, m)`` with one question ``(B, 1, n)``, or the mirror) reads the shared
side's projection, formed once per group and block by cuBLAS, instead of running its
main loop for every region (FBP's ``SHARED`` path; its dC rows are summed per group
before the GEMMs); other broadcasts are materialised.  The running products are per
broadcast row.  Factors are limited by the tiles: a tile must hold whole factor groups
(:func:`unsupported_problem`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ._common import acc_dtype, broadcast_batch, group_rows
# Shared with FBP: availability, the operand layout, the kernels and their launchers,
# the dropout stream.
from . import triton_backend as TB
from . import triton_wide as W
from .triton_backend import unsupported_reason  # noqa: F401  (backend contract)
from .torch_mfh import MFHBackwardResult, MFHForwardResult, block_seed
from .triton_kernels import INTERPRET, dropout_keep_mask

NAME = "triton"


def _tiles():
    """Every wide tile an MFH launch may pick on the current platform."""
    if INTERPRET:
        return [W.INTERPRETER_WIDE]
    return [*W.WIDE_CONFIGS.values(), *W.WIDE_BWD_CONFIGS.values()]


def unsupported_problem(order: Optional[int] = None,
                        factor: Optional[int] = None) -> Optional[str]:
    """Why these kernels cannot run an MFH of ``order`` blocks and ``factor``, or None.
    Any order runs (one launch per block); every tile must hold whole factor groups in
    a multiple of 4 columns (:func:`triton_wide.tile_outputs`): every factor up to 16
    on a GPU (8 in the interpreter), wider even ones up to 32 or 64."""
    def fits(f):
        return all(W.supports(f, cfg) for cfg in _tiles())

    if factor is not None and not fits(factor):
        every = next(f for f in range(1, 1 << 16) if not fits(f)) - 1
        return (f"its wide tiles cannot hold whole groups of factor {factor} (every factor "
                f"up to {every} fits, wider ones only when even)")
    return None


def _seed(seed: Optional[int], block: int) -> Optional[int]:
    return None if seed is None else block_seed(seed, block)


def _check(order: int, factor: int) -> None:
    reason = unsupported_problem(order, factor)
    if reason is not None:
        raise ValueError(f"the Triton MFH kernels cannot run this problem: {reason}; use "
                         f"backend='torch'")


def _blocks(lay, weights_x, weights_y, biases_x, biases_y):
    """Each block's ``(wx, wy, bx, by)`` in the layout's slots (swapped with the inputs
    when the layout holds (y, x))."""
    blocks = zip(weights_x, weights_y, biases_x, biases_y)
    if lay.swapped:
        return [(wy, wx, by, bx) for wx, wy, bx, by in blocks]
    return list(blocks)


def forward(x, y, weights_x, weights_y, biases_x, biases_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float, norm_dims: int = 1,
            activation: Optional[str] = None) -> MFHForwardResult:
    """``x (..., m)``, ``y (..., n)``, per block ``weights_x[l] (K*o, m)`` etc. ->
    ``out (..., P*o)`` and the per-block norms ``(..., P)`` (None without normalising)."""
    order = len(weights_x)
    _check(order, factor)
    ko = weights_x[0].shape[0]
    o = ko // factor
    # FBP's operand layout: co-attention's shared input one row per group (its
    # projection formed once per group and block), other broadcasts materialised.
    lay = TB._wide_layout(x, y, weights_x[0], weights_y[0], biases_x[0], biases_y[0])
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    rows = lay.x2.shape[0]
    acc = acc_dtype(x.dtype)
    group = group_rows(batch, norm_dims)
    # The output at its final shape, written through a 2-D view (autograd forbids
    # in-place ops on views created inside the op).
    out = torch.empty((*batch, order * o), dtype=x.dtype, device=x.device)
    out2 = out.view(rows, order * o)
    # One (rows, o) block of pooled sums per MFH block, each contiguous: a column slice
    # of a (rows, order * o) buffer has row stride order * o, which the kernels scale by
    # an in-tile row index in int32 (their size check bounds block_m * K * o, not that).
    s = torch.empty((order, rows, o), dtype=acc, device=x.device)
    norms = torch.empty((order, rows), dtype=acc, device=x.device) if normalize else None
    prev = None
    with TB._device_guard(x.device):
        for l, (wx, wy, bx, by) in enumerate(_blocks(lay, weights_x, weights_y, biases_x,
                                                    biases_y)):
            chain = torch.empty((rows, ko), dtype=x.dtype, device=x.device) \
                if l < order - 1 else None
            cols = slice(l * o, (l + 1) * o)
            W.wide_pooled(lay.x2, lay.y2, wx, wy, bx, by, s[l], factor=factor,
                          dropout=dropout, seed=_seed(seed, l), activation=activation,
                          shared=lay.r, prev=prev, chain=chain)
            W.finish_rows(s[l], out2[:, cols], norms[l] if normalize else None,
                          normalize=normalize, eps=eps, group=group)
            prev = chain
    if not normalize:
        return MFHForwardResult(out, None)
    return MFHForwardResult(out, norms.t().contiguous().view(*batch, order))


def _block_cols(t: torch.Tensor, cols: slice) -> torch.Tensor:
    """Block ``cols`` of a (rows, order * o) tensor: the view, unless its row stride
    times a tile's rows could pass int32 (the kernels' in-tile offsets), then a copy."""
    view = t[:, cols]
    return view if view.stride(0) * MAX_TILE_ROWS < 2 ** 31 else view.contiguous()


#: An upper bound of every wide / finishing tile's rows (BLOCK_M), for _block_cols.
MAX_TILE_ROWS = 256


def backward(grad, x, y, weights_x, weights_y, biases_x, biases_y, out, norms, *,
             factor: int, dropout: float, seed: Optional[int], normalize: bool, eps: float,
             norm_dims: int = 1, activation: Optional[str] = None) -> MFHBackwardResult:
    """Gradients from ``grad = dL/dout (..., P*o)``, the saved output and norms."""
    order = len(weights_x)
    _check(order, factor)
    ko = weights_x[0].shape[0]
    o = ko // factor
    lay = TB._wide_layout(x, y, weights_x[0], weights_y[0], biases_x[0], biases_y[0])
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    rows = lay.x2.shape[0]
    acc = acc_dtype(x.dtype)
    group = group_rows(batch, norm_dims)
    g2 = grad.reshape(rows, order * o)
    z2 = out.reshape(rows, order * o) if normalize else None
    n2 = norms.reshape(rows, order) if normalize else None
    blocks = _blocks(lay, weights_x, weights_y, biases_x, biases_y)
    kw = dict(factor=factor, dropout=dropout, activation=activation, shared=lay.r)

    with TB._device_guard(x.device):
        # Co-attention: each block's shared projection (one row per group) formed once,
        # read by the products' recompute and by the block's first backward pass.
        projs: List[Optional[torch.Tensor]] = [
            W.shared_projection(lay.y2, wy, by) if lay.r else None
            for _wx, wy, _bx, by in blocks]
        # The running products p_0 .. p_{P-2} again (the last feeds nothing in backward).
        chains: List[Optional[torch.Tensor]] = []
        scratch = torch.empty((rows, o), dtype=acc, device=x.device)
        prev = None
        for l, (wx, wy, bx, by) in enumerate(blocks[:-1]):
            chain = torch.empty((rows, ko), dtype=x.dtype, device=x.device)
            W.wide_pooled(lay.x2, lay.y2, wx, wy, bx, by, scratch, seed=_seed(seed, l),
                          prev=prev, chain=chain, projection=projs[l], **kw)
            chains.append(chain)
            prev = chain
        del scratch

        dx2 = dy2 = None
        dwx: List[torch.Tensor] = [None] * order
        dwy: List[torch.Tensor] = [None] * order
        dbx: List[Optional[torch.Tensor]] = [None] * order
        dby: List[Optional[torch.Tensor]] = [None] * order
        carry = None
        for l in reversed(range(order)):
            wx, wy, bx, by = blocks[l]
            cols = slice(l * o, (l + 1) * o)
            ds = W.pooled_grad(_block_cols(g2, cols),
                               _block_cols(z2, cols) if normalize else None,
                               n2[:, l].contiguous() if normalize else None,
                               normalize=normalize, eps=eps, group=group)
            da = torch.empty((rows, ko), dtype=x.dtype, device=x.device)
            dc = torch.empty((rows, ko), dtype=x.dtype, device=x.device)
            nxt = torch.empty((rows, ko), dtype=x.dtype, device=x.device) if l > 0 else None
            W.wide_grad_passes(ds, lay.x2, lay.y2, wx, wy, bx, by, da, dc,
                               seed=_seed(seed, l), carry=carry,
                               prev=chains[l - 1] if l > 0 else None, next_carry=nxt,
                               projection=projs[l], **kw)
            carry = nxt
            projs[l] = None
            if l > 0:
                chains[l - 1] = None  # block l-1 needs p_{l-2}, not p_{l-1}
            # FBP's GEMMs and bias sums (cuBLAS), co-attention's dC summed per group.
            r = TB._slot_gradients(da, dc, lay, wx, wy, bx, by)
            dx2 = r.dx if dx2 is None else dx2.add_(r.dx)
            dy2 = r.dy if dy2 is None else dy2.add_(r.dy)
            dwx[l], dwy[l], dbx[l], dby[l] = r.dweight_x, r.dweight_y, r.dbias_x, r.dbias_y
    dx, dy = lay.grad_x(dx2), lay.grad_y(dy2)
    if lay.swapped:
        return MFHBackwardResult(dy, dx, dwy, dwx, dby, dbx)
    return MFHBackwardResult(dx, dy, dwx, dwy, dbx, dby)


def block_masks(seed: int, shape, rate: float, order: int, device) -> List[torch.Tensor]:
    """The ``order`` bool keep-masks (each ``shape``, i.e. ``(..., K*o)``) the kernels
    draw for ``seed``."""
    ko = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return [dropout_keep_mask(block_seed(seed, l), rows, ko, rate, device).view(shape)
            for l in range(order)]
