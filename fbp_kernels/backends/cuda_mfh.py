"""MFH on the CUDA C++ kernels: FBP's fused forward and backward per block, chained.

MFH of order ``P`` is ``P`` FBP blocks whose expanded products multiply
(``p_l = drop_l(act(A_l) * act(C_l) * p_{l-1})``, formulas in :mod:`torch_mfh`), and FBP
is MFH of order 1, so every block runs the FBP operators of :mod:`cuda_backend`
(``torch.ops.fbp_kernels_cuda.fbp_forward`` / ``fbp_backward``) with their chain
options: the forward's ``prev`` multiplies the previous block's product in before
dropout and pooling and ``chain`` returns the block's own product (``(rows, K*o)`` in the
input dtype, as eager rounds it); the backward's ``carry`` adds the gradient the later
blocks pass to the block's product, ``prev`` multiplies ``p_{l-1}`` into it, and
``carry_out`` returns the gradient for block ``l-1`` (``u * act(A) * act(C)``).  Order 1
runs exactly FBP's launches.  Every FBP option of the backend carries over: dropout
(block ``l`` draws the shared stream keyed by ``block_seed(seed, l)``, so block 0 draws
FBP's mask), ``activation``, joint normalisation (per block), co-attention's shared
input projected once per group and block, fp16/bf16/fp32/fp64, any factor.

Backward, memory-lean (the op keeps only the inputs, parameters, output and per-block
norms): the products ``p_0 .. p_{P-2}`` are formed again by forward launches, then the
blocks run from last to first, each one backward launch (``ds``, the fused ``dA``/``dC``
kernel with the carry in and out, cuBLAS for the four GEMMs and bias sums; no atomics:
deterministic).  Transient: ``P - 1`` products, two carries and one block's ``dA``/``dC``,
each ``(rows, K*o)``.  Never run on a GPU (docs/cuda.md).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import cuda_backend as CB
from .cuda_backend import unsupported_reason  # noqa: F401  (backend contract)
from .torch_mfh import MFHBackwardResult, MFHForwardResult, block_seed

NAME = "cuda"


def _seed(seed: Optional[int], block: int) -> Optional[int]:
    return None if seed is None else block_seed(seed, block)


def forward(x, y, weights_x, weights_y, biases_x, biases_y, *, factor: int, dropout: float,
            seed: Optional[int], normalize: bool, eps: float, norm_dims: int = 1,
            activation: Optional[str] = None) -> MFHForwardResult:
    """``x (..., m)``, ``y (..., n)``, per block ``weights_x[l] (K*o, m)`` etc. ->
    ``out (..., P*o)`` and the per-block norms ``(..., P)`` (None without normalising)."""
    order = len(weights_x)
    o = weights_x[0].shape[0] // factor
    sx, sy, batch = CB.sides(x, y)
    group = CB.norm_group(batch, norm_dims, normalize)
    outs, norms, prev = [], [], None
    for l, (wx, wy, bx, by) in enumerate(zip(weights_x, weights_y, biases_x, biases_y)):
        out, norm, _, _, p = CB.run_forward(
            sx, sy, wx, wy, bx, by, factor=factor, dropout=dropout, seed=_seed(seed, l),
            normalize=normalize, eps=eps, norm_group=group, activation=activation,
            prev=prev, chain=l < order - 1)
        outs.append(out)
        norms.append(norm)
        prev = p if l < order - 1 else None
    out = torch.cat(outs, dim=-1).view(*batch, order * o)  # explicit: batch may be empty
    if not normalize:
        return MFHForwardResult(out, None)
    return MFHForwardResult(out, torch.stack(norms, dim=-1).view(*batch, order))


def backward(grad, x, y, weights_x, weights_y, biases_x, biases_y, out, norms, *,
             factor: int, dropout: float, seed: Optional[int], normalize: bool, eps: float,
             norm_dims: int = 1, activation: Optional[str] = None) -> MFHBackwardResult:
    """Gradients from ``grad = dL/dout (..., P*o)``, the saved output and norms."""
    order = len(weights_x)
    o = weights_x[0].shape[0] // factor
    sx, sy, batch = CB.sides(x, y)
    group = CB.norm_group(batch, norm_dims, normalize)
    rows = grad.numel() // (order * o) if o else 0
    g2 = grad.reshape(rows, order * o)
    z2 = out.reshape(rows, order * o) if normalize else g2  # unread without normalising
    n2 = norms.reshape(rows, order) if normalize else None
    kw = dict(factor=factor, dropout=dropout, eps=eps, activation=activation,
              norm_group=group)
    blocks = list(zip(weights_x, weights_y, biases_x, biases_y))

    # The running products p_0 .. p_{P-2} again (the last feeds nothing in backward).
    chains: List[Optional[torch.Tensor]] = []
    prev = None
    for l, (wx, wy, bx, by) in enumerate(blocks[:-1]):
        *_, prev = CB.run_forward(sx, sy, wx, wy, bx, by, seed=_seed(seed, l),
                                  normalize=False, prev=prev, chain=True, **kw)
        chains.append(prev)
    del prev

    dx = dy = None
    dwx: List[torch.Tensor] = [None] * order
    dwy: List[torch.Tensor] = [None] * order
    dbx: List[Optional[torch.Tensor]] = [None] * order
    dby: List[Optional[torch.Tensor]] = [None] * order
    carry = None
    for l in reversed(range(order)):
        wx, wy, bx, by = blocks[l]
        cols = slice(l * o, (l + 1) * o)
        norm2 = n2[:, l].contiguous() if normalize else g2.new_empty(0)
        ddx, ddy, dwx[l], dwy[l], dbx_l, dby_l, nxt = CB.run_backward(
            g2[:, cols], sx, sy, wx, wy, bx, by, z2[:, cols], norm2, seed=_seed(seed, l),
            normalize=normalize, prev=chains[l - 1] if l > 0 else None, carry=carry,
            carry_out=l > 0, **kw)
        dbx[l] = dbx_l if bx is not None else None
        dby[l] = dby_l if by is not None else None
        carry = nxt if l > 0 else None
        if l > 0:
            chains[l - 1] = None  # block l-1 needs p_{l-2}, not p_{l-1}
        dx = ddx if dx is None else dx.add_(ddx)
        dy = ddy if dy is None else dy.add_(ddy)
    return MFHBackwardResult(sx.grad(dx), sy.grad(dy), dwx, dwy, dbx, dby)


def block_masks(seed: int, shape, rate: float, order: int, device) -> List[torch.Tensor]:
    """The ``order`` bool keep-masks (each ``shape``, i.e. ``(..., K*o)``) the kernels
    draw for ``seed``: FBP's stream (:func:`cuda_backend.dropout_mask`) per block seed."""
    return [CB.dropout_mask(block_seed(seed, l), shape, rate, device) for l in range(order)]
