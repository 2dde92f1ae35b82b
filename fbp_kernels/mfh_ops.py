"""MFH as registered PyTorch operators: ``torch.ops.fbp_kernels.mfh_forward`` and
``torch.ops.fbp_kernels.mfh_backward``.

The same design as :mod:`fbp_kernels.ops` (read that first): a custom-op pair with
fake kernels and ``register_autograd``, so ``torch.compile(fullgraph=True)`` sees two
opaque operators with known output shapes whatever backend runs underneath.

The per-block parameters travel as ``Tensor[]`` lists.  A missing bias is an empty
``(0,)`` tensor in its list, not ``None``: ``Tensor?[]`` passes schema inference,
but the autograd wrapper then fails to match the structure of the gradients it gets
back against the inputs (a ``None`` inside a list is an empty pytree node, not a
leaf).  Real biases are ``(factor*o,)`` with ``factor*o > 0``, so the marker is
unambiguous.

Backend choice for MFH: ``"auto"`` takes the fused Triton MFH on CUDA tensors when
it exists and Triton can run there, and the plain-PyTorch one otherwise.  A named
backend without an MFH implementation raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends
from .backends import BackendUnavailableError
from .backends._common import acc_dtype
# The FBP operators' conventions (markers for absent tensors, the CPU seed, the
# concrete-eps check, the backward's no_grad + double-backward refusal, the in-place
# error) are written once there and used by both pairs of operators.
from .ops import (MFH_DROP_IN_BACKENDS, _empty, _none_if_marker, _seed_value,
                  check_concrete_eps, drop_in_options,
                  fused_backward, saved_tensors)

#: Backend name -> its MFH module, in the order ``"auto"`` prefers them on CUDA.
_MFH_MODULES = {
    "triton": "fbp_kernels.backends.triton_mfh",
    "cuda": "fbp_kernels.backends.cuda_mfh",
    "torch": "fbp_kernels.backends.torch_mfh",
}



def _load(name: str) -> ModuleType:
    return importlib.import_module(_MFH_MODULES[name])


def unsupported_reason(name: str, device: torch.device, order: Optional[int] = None,
                       factor: Optional[int] = None) -> Optional[str]:
    """Why backend ``name`` cannot run MFH (of ``order`` blocks and ``factor``, where
    given) on ``device``, or ``None`` when it can."""
    if name not in _MFH_MODULES:
        return (f"backend {name!r} has no MFH implementation; MFH runs on "
                f"{sorted(_MFH_MODULES)} (or backend='auto')")
    try:
        module = _load(name)
    except ImportError as exc:  # optional dependency (Triton) missing
        return f"backend {name!r} cannot be imported: {exc}"
    reason = module.unsupported_reason(torch.device(device))
    problem = getattr(module, "unsupported_problem", None)
    if reason is None and problem is not None:
        reason = problem(order, factor)
    return reason


def resolve(name: str, device: torch.device, order: Optional[int] = None,
            factor: Optional[int] = None) -> ModuleType:
    """The MFH implementation for backend ``name`` on ``device`` (for ``order`` blocks
    and ``factor``, where given).

    ``"auto"`` (what the ops see under ``torch.compile``, or when called directly: the
    front end otherwise resolves it per shape) takes the device-level choice on a CUDA
    device, ``strategy.auto_mfh_backend`` (the cost model at the MFB default shape, as
    FBP's compiled path), when it can run this ``order`` and ``factor``; else the
    plain-PyTorch one (on CPU the interpreter is a testing tool, never an automatic
    choice).  It depends only on the device, order and factor, so the forward and
    backward ops agree.  A named backend that cannot run raises
    :class:`BackendUnavailableError` with the reason.
    """
    if name == "auto":
        if device.type == "cuda":
            from . import strategy

            cand = strategy.auto_mfh_backend(device, order if order is not None else 2)
            if unsupported_reason(cand, device, order, factor) is None:
                return _load(cand)
        return _load("torch")
    if name not in backends.NAMES:
        raise ValueError(f"backend must be 'auto' or one of {list(backends.NAMES)}, "
                         f"got {name!r}")
    reason = unsupported_reason(name, device, order, factor)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run MFH on device {device}: "
                                      f"{reason}")
    return _load(name)


def _is_marker(t: Tensor) -> bool:
    return _none_if_marker(t) is None


def to_marker_list(biases: Sequence[Optional[Tensor]], like: Tensor) -> List[Tensor]:
    """``None`` entries become empty ``(0,)`` markers (see the module docstring)."""
    return [_empty(like) if b is None else b for b in biases]


def _from_markers(biases: Sequence[Tensor]) -> List[Optional[Tensor]]:
    return [None if _is_marker(b) else b for b in biases]


@torch.library.custom_op("fbp_kernels::mfh_forward", mutates_args=())
def mfh_forward(
    x: Tensor, y: Tensor, weights_x: List[Tensor], weights_y: List[Tensor],
    biases_x: List[Tensor], biases_y: List[Tensor], seed: Optional[Tensor],
    factor: int, dropout: float, normalize: bool, eps: float, backend: str,
    norm_dims: int = 1, activation: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Returns ``(out (..., P*o), norms (..., P))``; ``norms`` is empty when
    ``normalize`` is false, and per row whatever ``norm_dims`` (each row holds its
    group's norm)."""
    check_concrete_eps(eps)
    impl = resolve(backend, x.device, len(weights_x), factor)
    extra = drop_in_options(impl.NAME, norm_dims, activation, MFH_DROP_IN_BACKENDS)
    res = impl.forward(x, y, list(weights_x), list(weights_y), _from_markers(biases_x),
                       _from_markers(biases_y), factor=factor, dropout=dropout,
                       seed=_seed_value(seed), normalize=normalize, eps=eps, **extra)
    return res.out, _empty(x) if res.norms is None else res.norms


@mfh_forward.register_fake
def _(x, y, weights_x, weights_y, biases_x, biases_y, seed, factor, dropout, normalize, eps,
      backend, norm_dims=1, activation=None):
    batch = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    order = len(weights_x)
    o = weights_x[0].shape[0] // factor
    out = x.new_empty((*batch, order * o))
    norms = x.new_empty((*batch, order), dtype=acc_dtype(x.dtype)) if normalize \
        else _empty(x)
    return out, norms


@torch.library.custom_op("fbp_kernels::mfh_backward", mutates_args=())
def mfh_backward(
    grad: Tensor, x: Tensor, y: Tensor, weights_x: List[Tensor], weights_y: List[Tensor],
    biases_x: List[Tensor], biases_y: List[Tensor], out: Tensor, norms: Tensor,
    seed: Optional[Tensor], factor: int, dropout: float, normalize: bool, eps: float,
    backend: str, norm_dims: int = 1, activation: Optional[str] = None,
) -> List[Tensor]:
    """Returns ``[dx, dy, *dweights_x, *dweights_y, *dbiases_x, *dbiases_y]``, a bias
    gradient being an empty marker where the bias is one."""
    impl = resolve(backend, x.device, len(weights_x), factor)
    extra = drop_in_options(impl.NAME, norm_dims, activation, MFH_DROP_IN_BACKENDS)
    res = impl.backward(grad, x, y, list(weights_x), list(weights_y),
                        _from_markers(biases_x), _from_markers(biases_y),
                        out if normalize else None, norms if normalize else None,
                        factor=factor, dropout=dropout, seed=_seed_value(seed),
                        normalize=normalize, eps=eps, **extra)
    return [res.dx, res.dy, *res.dweights_x, *res.dweights_y,
            *to_marker_list(res.dbiases_x, x), *to_marker_list(res.dbiases_y, x)]


@mfh_backward.register_fake
def _(grad, x, y, weights_x, weights_y, biases_x, biases_y, out, norms, seed, factor, dropout,
      normalize, eps, backend, norm_dims=1, activation=None):
    return [torch.empty_like(x), torch.empty_like(y),
            *[torch.empty_like(w) for w in weights_x], *[torch.empty_like(w) for w in weights_y],
            *[torch.empty_like(b) for b in biases_x], *[torch.empty_like(b) for b in biases_y]]


def _setup_context(ctx, inputs, output):
    (x, y, weights_x, weights_y, biases_x, biases_y, seed, factor, dropout, normalize, eps,
     backend, norm_dims, activation) = inputs
    out, norms = output
    ctx.order = len(weights_x)
    # The raw output (normalize=False) is not needed by backward: not saving it lets
    # in-place ops on it work.
    ctx.save_for_backward(x, y, *weights_x, *weights_y, *biases_x, *biases_y,
                          out if normalize else _empty(x), norms, seed)
    ctx.config = (factor, dropout, normalize, eps, backend, norm_dims, activation)
    ctx.mark_non_differentiable(norms)


def _backward(ctx, grad_out, _grad_norms):
    P = ctx.order
    x, y, *rest = saved_tensors(ctx)
    wx, wy, bx, by = rest[:P], rest[P:2 * P], rest[2 * P:3 * P], rest[3 * P:4 * P]
    out, norms, seed = rest[4 * P:]
    factor, dropout, normalize, eps, backend, norm_dims, activation = ctx.config
    g = fused_backward(lambda: mfh_backward(grad_out.contiguous(), x, y, wx, wy, bx, by, out,
                                            norms, seed, factor, dropout, normalize, eps,
                                            backend, norm_dims, activation),
                       (x, y, *wx, *wy, *bx, *by, grad_out))
    dx, dy, dg = g[0], g[1], g[2:]
    # A marker input gets its (empty) marker gradient back: same shape, so autograd
    # accepts it, and the marker never requires grad, so it goes nowhere.
    return (dx, dy, dg[:P], dg[P:2 * P], dg[2 * P:3 * P], dg[3 * P:4 * P],
            None, None, None, None, None, None, None, None)


mfh_forward.register_autograd(_backward, setup_context=_setup_context)
