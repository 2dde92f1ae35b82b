"""FBP as a ``torch.autograd.Function`` (eager) and as registered PyTorch operators
(``torch.ops.fbp_kernels.fbp_forward`` / ``fbp_backward``, for ``torch.compile``).

Both call the same backend forward and backward; :func:`fbp_kernels.fbp` takes the
autograd.Function in eager mode (it skips the custom-op dispatcher, ~50 us per call
on the host, which matters for small-batch inference on a GPU) and the operators
while ``torch.compile`` traces.

Registering the forward and the backward as ``torch.library.custom_op`` (with fake
kernels for shape propagation and ``register_autograd`` tying them together) lets
``torch.compile(fullgraph=True)`` trace a model that uses the layer without graph
breaks, whatever backend runs underneath: the compiler sees two opaque operators
with known output shapes.  In eager mode the pair behaves like a
``torch.autograd.Function`` whose backward is the backend's fused backward.

Operator outputs must be tensors, so "absent" (no bias gradient, projections not
kept, no row norm) travels as an empty tensor and is turned back into ``None`` here.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .backends._common import broadcast_batch

_EMPTY_SHAPE = (0,)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY_SHAPE)


#: Why a second backward through the fused ops fails, and what to use instead.
DOUBLE_BACKWARD_MESSAGE = (
    "fbp_kernels: double backward (create_graph=True followed by a second gradient, e.g. "
    "a gradient penalty or MAML) is not supported: the fused backward is not itself "
    "differentiable. For higher-order gradients use the plain-PyTorch reference "
    "fbp_kernels.reference.fbp / fbp_kernels.reference.mfh, which autograd differentiates "
    "to any order.")


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on the first-order gradients whose own backward raises.

    ``apply(n, *grads, *anchors)``: the ``n`` gradients come back (as copies); the
    anchors (the op's differentiable inputs) only connect them to the graph, so a
    second backward reaches this node whichever input it starts from.
    """

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(g.clone() for g in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


#: Why backward failed after the output was changed in place.
INPLACE_MESSAGE = (
    "fbp_kernels: the output of fbp/mfh was modified in place (e.g. by "
    "nn.ReLU(inplace=True)) before backward; with normalize=True the fused backward "
    "needs that output as it was returned. Use an out-of-place op (nn.ReLU(inplace=False)) "
    "or clone the output first. With normalize=False the output is not saved and "
    "in-place ops on it are fine.")


def saved_tensors(ctx):
    """``ctx.saved_tensors``, turning autograd's version-counter error (which names an
    internal view on the kernel backends) into one that says what happened.

    The output is saved only when ``normalize=True``: the backward of the raw pooled
    sum needs only the inputs, so then in-place ops on the output just work.
    """
    try:
        return ctx.saved_tensors
    except RuntimeError as exc:
        if "modified by an inplace operation" in str(exc):
            raise RuntimeError(INPLACE_MESSAGE) from exc
        raise


def fused_backward(compute, anchors):
    """Every backward of the package: ``compute()`` (a backend's gradients) under
    ``no_grad``, then :func:`refuse_double_backward` on them with ``anchors`` (the op's
    differentiable inputs and the incoming gradient)."""
    with torch.no_grad():
        grads = compute()
    return refuse_double_backward(grads, anchors)


def refuse_double_backward(grads, anchors):
    """Return ``grads`` (a sequence of tensors or None); under ``create_graph=True``
    attach them to a node whose backward raises :data:`DOUBLE_BACKWARD_MESSAGE`.

    Backends compute gradients with plain tensor ops; left to autograd under
    ``create_graph=True`` those ops would record a partial, wrong second-order graph
    (they treat the saved output and row norms as constants).  The backends' backward
    therefore runs under ``no_grad`` and any second-order use is refused here.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return list(grads)
    live = [a for a in anchors if isinstance(a, Tensor) and a.requires_grad]
    idx = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
    if not live or not idx:
        return list(grads)
    wrapped = _RefuseDoubleBackward.apply(len(idx), *[grads[i] for i in idx], *live)
    out = list(grads)
    for i, g in zip(idx, wrapped):
        out[i] = g
    return out


def _none_if_marker(t: Optional[Tensor]) -> Optional[Tensor]:
    # Real projections are (..., factor*o) with factor*o > 0, so shape (0,) is unambiguous.
    return None if t is None or tuple(t.shape) == _EMPTY_SHAPE else t


def _seed_value(seed: Optional[Tensor]) -> Optional[int]:
    # The seed lives on the CPU, so .item() never synchronises a GPU stream.
    return None if seed is None else int(seed.item())


#: FBP backends that implement ``norm_dims != 1`` and ``activation``, in the order
#: ``backend="auto"`` prefers them on a CUDA device (``functional.route_drop_in``; on
#: other devices auto takes ``torch``, as it does without these options).  ``triton``
#: has them in its wide kernels (lean memory mode, factor up to a tile's width: see
#: ``triton_backend.drop_in_problem``); the C++ extension (``cuda``) in its fused
#: kernels, after the Triton ones because it has never run on a GPU.  The front end
#: routes calls that use them here, the operators refuse others.
DROP_IN_BACKENDS = ("split", "triton", "cuda", "torch")

#: The same for MFH (``fbp_kernels.mfh``): its Triton blocks are FBP's wide kernels, its
#: CUDA blocks FBP's fused C++ kernels.
MFH_DROP_IN_BACKENDS = ("triton", "cuda", "torch")


def drop_in_in_use(norm_dims: int, activation: Optional[str]) -> List[str]:
    """The non-default drop-in options, spelled as they were passed (for messages)."""
    used = []
    if norm_dims != 1:
        used.append(f"norm_dims={norm_dims!r}")
    if activation is not None:
        used.append(f"activation={activation!r}")
    return used


def drop_in_unsupported(used: List[str], backend: str,
                        supported=DROP_IN_BACKENDS) -> str:
    """The ValueError message for drop-in options ``used`` on ``backend`` (``supported``:
    the backends that have them, FBP's by default)."""
    alternatives = " or ".join(f"backend={name!r}" for name in ("auto", *supported))
    return (f"{' and '.join(used)} is supported by backends {list(supported)} only, "
            f"not {backend!r} (its kernels do not implement it); use {alternatives}")


def drop_in_options(backend: str, norm_dims: int, activation: Optional[str],
                    supported=DROP_IN_BACKENDS) -> dict:
    """The keyword arguments carrying ``norm_dims``/``activation`` to backend
    ``backend``'s forward and backward: none at their defaults (the other backends'
    signatures do not take them), else ValueError unless the backend is in
    ``supported`` (the front end routes such calls to one that is, so this guards
    direct op use)."""
    used = drop_in_in_use(norm_dims, activation)
    if not used:
        return {}
    if backend not in supported:
        raise ValueError(drop_in_unsupported(used, backend, supported))
    return {"norm_dims": norm_dims, "activation": activation}


@torch.library.custom_op("fbp_kernels::fbp_forward", mutates_args=())
def fbp_forward(
    x: Tensor, y: Tensor, weight_x: Tensor, weight_y: Tensor,
    bias_x: Optional[Tensor], bias_y: Optional[Tensor], seed: Optional[Tensor],
    factor: int, dropout: float, normalize: bool, eps: float,
    save_projections: str, backend: str, norm_dims: int = 1,
    activation: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out, norm, a, c)``; ``norm``, ``a``, ``c`` are empty when unused.
    ``save_projections`` is the mode ``"none"``, ``"both"``, ``"x"`` or ``"y"``.
    ``norm`` is per row whatever ``norm_dims`` (each row holds its group's norm)."""
    check_concrete_eps(eps)
    impl = backends.resolve(backend, x.device)
    extra = drop_in_options(impl.NAME, norm_dims, activation)
    res = impl.forward(x, y, weight_x, weight_y, bias_x, bias_y, factor=factor,
                       dropout=dropout, seed=_seed_value(seed), normalize=normalize,
                       eps=eps, save_projections=backend_keep(save_projections, backend),
                       **extra)
    # Outputs of a custom op may not alias its inputs or each other.
    return (res.out, _or_empty(res.norm, x), _or_empty(res.a, x), _or_empty(res.c, x))


#: Backends that can keep one projection and recompute the other (the middle mode).
ONE_PROJECTION_BACKENDS = ("split", "triton", "cuda", "torch")

#: The operators' projection mode -> the backends' ``save_projections`` (bool, or the
#: name of the one input whose projection is kept).
_BACKEND_KEEP = {"none": False, "both": True, "x": "x", "y": "y"}


def backend_keep(mode: str, backend: str):
    """The backend-level option for ``mode``; keeping one projection only where the
    backend can (the front end routes such calls there, so this guards direct op use)."""
    if mode in ("x", "y") and backend not in ONE_PROJECTION_BACKENDS:
        raise ValueError(f"save_projections={mode!r} (keep one projection) is supported by "
                         f"backends {list(ONE_PROJECTION_BACKENDS)}, not {backend!r}")
    return _BACKEND_KEEP[mode]


def check_concrete_eps(eps: float) -> None:
    """The operators see ``eps`` as a concrete float even when torch.compile traced it
    symbolically (then the front end could not check it): check it here."""
    from .functional import check_eps  # functional imports this module

    check_eps(eps)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return _empty(like) if t is None else t


def _batch(x: Tensor, y: Tensor) -> torch.Size:
    return broadcast_batch(x.shape[:-1], y.shape[:-1])


@fbp_forward.register_fake
def _(x, y, weight_x, weight_y, bias_x, bias_y, seed, factor, dropout, normalize, eps,
      save_projections, backend, norm_dims=1, activation=None):
    batch = _batch(x, y)
    ko = weight_x.shape[0]
    out = x.new_empty((*batch, ko // factor))
    norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = x.new_empty(batch, dtype=norm_dtype) if normalize else _empty(x)
    keep_a = save_projections in ("both", "x")
    keep_c = save_projections in ("both", "y")
    if backend in ("torch", "split", "cuda") or save_projections in ("x", "y"):
        # Each input projected at its own leading shape (no broadcast copy; triton's
        # middle mode too, its one-launch kernel stores both at the broadcast rows).
        a_shape, c_shape = (*x.shape[:-1], ko), (*y.shape[:-1], ko)
    else:
        # triton's kernels keep both at the broadcast rows.
        a_shape = c_shape = (*batch, ko)
    a = x.new_empty(a_shape) if keep_a else _empty(x)
    c = y.new_empty(c_shape) if keep_c else _empty(x)
    return out, norm, a, c


@torch.library.custom_op("fbp_kernels::fbp_backward", mutates_args=())
def fbp_backward(
    grad: Tensor, x: Tensor, y: Tensor, weight_x: Tensor, weight_y: Tensor,
    bias_x: Optional[Tensor], bias_y: Optional[Tensor], out: Tensor, norm: Tensor,
    a: Tensor, c: Tensor, seed: Optional[Tensor],
    factor: int, dropout: float, normalize: bool, eps: float, backend: str,
    norm_dims: int = 1, activation: Optional[str] = None,
) -> List[Tensor]:
    """Returns ``[dx, dy, dweight_x, dweight_y, dbias_x, dbias_y]`` (empty bias grads
    when there is no bias)."""
    impl = backends.resolve(backend, x.device)
    extra = drop_in_options(impl.NAME, norm_dims, activation)
    res = impl.backward(grad, x, y, weight_x, weight_y, bias_x, bias_y,
                        out if normalize else None, norm if normalize else None,
                        _none_if_marker(a), _none_if_marker(c),
                        factor=factor, dropout=dropout, seed=_seed_value(seed),
                        normalize=normalize, eps=eps, **extra)
    return [res.dx, res.dy, res.dweight_x, res.dweight_y,
            _or_empty(res.dbias_x, x), _or_empty(res.dbias_y, x)]


@fbp_backward.register_fake
def _(grad, x, y, weight_x, weight_y, bias_x, bias_y, out, norm, a, c, seed, factor,
      dropout, normalize, eps, backend, norm_dims=1, activation=None):
    return [torch.empty_like(x), torch.empty_like(y), torch.empty_like(weight_x),
            torch.empty_like(weight_y),
            torch.empty_like(bias_x) if bias_x is not None else _empty(x),
            torch.empty_like(bias_y) if bias_y is not None else _empty(x)]


def _setup_context(ctx, inputs, output):
    (x, y, weight_x, weight_y, bias_x, bias_y, seed, factor, dropout, normalize, eps,
     _save_projections, backend, norm_dims, activation) = inputs
    out, norm, a, c = output
    ctx.save_for_backward(x, y, weight_x, weight_y, bias_x, bias_y,
                          out if normalize else _empty(x), norm, a, c, seed)
    ctx.config = (factor, dropout, normalize, eps, backend, norm_dims, activation)
    ctx.mark_non_differentiable(norm, a, c)


def _backward(ctx, grad_out, _grad_norm, _grad_a, _grad_c):
    x, y, weight_x, weight_y, bias_x, bias_y, out, norm, a, c, seed = saved_tensors(ctx)
    factor, dropout, normalize, eps, backend, norm_dims, activation = ctx.config
    dx, dy, dwx, dwy, dbx, dby = fused_backward(
        lambda: fbp_backward(grad_out.contiguous(), x, y, weight_x, weight_y, bias_x, bias_y,
                             out, norm, a, c, seed, factor, dropout, normalize, eps, backend,
                             norm_dims, activation),
        (x, y, weight_x, weight_y, bias_x, bias_y, grad_out))
    return (dx, dy, dwx, dwy,
            dbx if bias_x is not None else None, dby if bias_y is not None else None,
            None, None, None, None, None, None, None, None, None)


fbp_forward.register_autograd(_backward, setup_context=_setup_context)


_ERROR_TYPES = {"TypeError": TypeError, "ValueError": ValueError,
                "BackendUnavailableError": backends.BackendUnavailableError}


@torch.library.custom_op("fbp_kernels::argument_error", mutates_args=())
def argument_error(like: Tensor, kind: str, message: str, shape: List[int]) -> Tensor:
    """Raise ``kind(message)`` when run: a bad argument found while torch.compile traced
    (see ``functional.raise_when_run``).  ``like`` only gives the fake result's dtype
    and device."""
    raise _ERROR_TYPES[kind](message)


@argument_error.register_fake
def _(like, kind, message, shape):
    return like.new_empty(shape)


class FBPFunction(torch.autograd.Function):
    """Eager FBP with the backend's fused backward.

    ``apply(x, y, weight_x, weight_y, bias_x, bias_y, seed, factor, dropout, normalize,
    eps, save_projections, backend[, norm_dims, activation]) -> out``; ``seed`` is an
    int or None.  Saves the
    inputs, parameters, and with ``normalize`` the output and row norms (plus the
    projections the mode ``save_projections`` names: ``"none"``, ``"both"``, ``"x"``,
    ``"y"``).
    """

    @staticmethod
    def forward(ctx, x, y, weight_x, weight_y, bias_x, bias_y, seed, factor, dropout,
                normalize, eps, save_projections, backend, norm_dims=1, activation=None):
        impl = backends.resolve(backend, x.device)
        extra = drop_in_options(impl.NAME, norm_dims, activation)
        res = impl.forward(x, y, weight_x, weight_y, bias_x, bias_y, factor=factor,
                           dropout=dropout, seed=seed, normalize=normalize, eps=eps,
                           save_projections=backend_keep(save_projections, backend),
                           **extra)
        # The raw pooled output (normalize=False) is not needed by backward: not saving
        # it lets in-place ops on it (nn.ReLU(inplace=True)) work.
        ctx.save_for_backward(x, y, weight_x, weight_y, bias_x, bias_y,
                              res.out if normalize else None, res.norm, res.a, res.c)
        ctx.config = (impl, factor, dropout, seed, normalize, eps, extra)
        return res.out

    @staticmethod
    def backward(ctx, grad_out):
        x, y, weight_x, weight_y, bias_x, bias_y, out, norm, a, c = saved_tensors(ctx)
        impl, factor, dropout, seed, normalize, eps, extra = ctx.config
        grads = fused_backward(
            lambda: impl.backward(grad_out.contiguous(), x, y, weight_x, weight_y, bias_x,
                                  bias_y, out, norm, a, c, factor=factor, dropout=dropout,
                                  seed=seed, normalize=normalize, eps=eps, **extra),
            (x, y, weight_x, weight_y, bias_x, bias_y, grad_out))
        # Trailing Nones beyond the inputs actually passed are accepted by autograd.
        return (*grads, None, None, None, None, None, None, None, None, None)
