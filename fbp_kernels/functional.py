"""``fbp()``: argument checks, autocast, dropout seeding and backend choice."""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from . import backends, ops
from .backends._common import broadcast_batch
from .reference import DEFAULT_EPS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, "
                        f"float32, float64")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if ndim is None and t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension (..., features), "
                         f"got a 0-D tensor")


def _traced(v) -> bool:
    """Whether ``v`` may be a value torch.compile traces symbolically.  Inside Dynamo a
    float argument or module attribute can be a SymFloat that still passes
    ``isinstance(v, float)``, so "while compiling" is the test, plus the Sym types for
    code that runs on symbolic values outside Dynamo (AOTAutograd, export)."""
    return torch.compiler.is_compiling() or isinstance(v, (torch.SymFloat, torch.SymInt))


def _eps_message(eps) -> str:
    return (f"eps must be a finite float > 0 (the smoothing of the signed square root), "
            f"got {eps!r}")


def check_eps(eps: float) -> None:
    """The range check of a concrete ``eps`` (ValueError)."""
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(_eps_message(eps))


def as_float(v):
    """``float(v)`` for concrete numbers; a traced value passes through untouched
    (``float()`` would force torch.compile to specialise on it)."""
    return v if _traced(v) else float(v)


def check_size(name: str, value) -> None:
    """A positive int argument (sizes, ``factor``, ``order``): TypeError for anything
    but an int (a bool included), ValueError below 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_options(factor, dropout, eps, backend: str = "auto") -> None:
    """Validate the non-tensor options (shared by fbp() and the modules' constructors)."""
    check_size("factor", factor)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, torch.SymFloat)):
        raise ValueError(_eps_message(eps))
    if not _traced(eps):
        check_eps(eps)
    # else: torch.compile may trace eps as a SymFloat (dynamic=True, or after a
    # recompile for a new value); testing its range here would specialise on it, so
    # the registered op checks the concrete value when it runs, with the same error.
    if backend != "auto" and backend not in backends.NAMES:
        raise ValueError(f"backend must be 'auto' or one of {list(backends.NAMES)}, "
                         f"got {backend!r}")


def check_inputs(x, y, weight_x, weight_y, bias_x, bias_y, factor, dropout, eps) -> torch.Size:
    """Validate ``fbp`` arguments; returns the broadcast leading shape.

    Raises TypeError for wrong types or dtypes and ValueError for shapes, devices
    and out-of-range options, each naming the offending argument.
    """
    _check_tensor("x", x)
    _check_tensor("y", y)
    _check_tensor("weight_x", weight_x, 2)
    _check_tensor("weight_y", weight_y, 2)
    check_options(factor, dropout, eps)
    ko = weight_x.shape[0]
    if ko == 0 or ko % factor != 0:
        raise ValueError(f"weight_x.shape[0] (= factor * out_features) must be a positive "
                         f"multiple of factor={factor}, got {ko}")
    if weight_y.shape[0] != ko:
        raise ValueError(f"weight_x and weight_y must have the same number of rows "
                         f"(factor * out_features), got {ko} and {weight_y.shape[0]}")
    if weight_x.shape[1] != x.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight_x "
                         f"expects {weight_x.shape[1]} (shape {tuple(weight_x.shape)})")
    if weight_y.shape[1] != y.shape[-1]:
        raise ValueError(f"y has {y.shape[-1]} features (shape {tuple(y.shape)}) but weight_y "
                         f"expects {weight_y.shape[1]} (shape {tuple(weight_y.shape)})")
    named = [("x", x), ("y", y), ("weight_x", weight_x), ("weight_y", weight_y)]
    for name, b in (("bias_x", bias_x), ("bias_y", bias_y)):
        if b is not None:
            _check_tensor(name, b, 1)
            if b.shape[0] != ko:
                raise ValueError(f"{name} must have shape ({ko},), got {tuple(b.shape)}")
            named.append((name, b))
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) > 1:
        desc = ", ".join(f"{n}={t.dtype}" for n, t in named)
        raise TypeError(f"all tensors must share one dtype (cast them, or use torch.autocast), "
                        f"got {desc}")
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        desc = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"all tensors must be on one device, got {desc}")
    try:
        return broadcast_batch(x.shape[:-1], y.shape[:-1])
    except ValueError:
        raise ValueError(f"the leading dimensions of x {tuple(x.shape[:-1])} and y "
                         f"{tuple(y.shape[:-1])} do not broadcast") from None


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None (also for device types,
    such as ``meta``, that autocast does not know)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:
        pass
    return None


def _autocast(dtype: Optional[torch.dtype], tensors):
    """Cast like ``nn.Linear`` under autocast: floating operands to the autocast dtype,
    except float64, which autocast leaves alone."""
    if dtype is None:
        return tensors
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point()
            and t.dtype != torch.float64 else t for t in tensors]


def dropout_seed(training: bool, dropout: float) -> Optional[Tensor]:
    """The dropout seed of one call (a CPU int64 scalar), or None when dropout is off.

    Drawn from PyTorch's CPU generator: ``torch.manual_seed`` makes runs reproducible,
    and a CPU scalar never synchronises the GPU.  Kernels regenerate the mask from it.
    """
    if training and dropout > 0:
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    return None


def no_autocast(device_type: str, cast_dtype: Optional[torch.dtype]):
    """Disable autocast inside the op: the operands were already cast once."""
    if cast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


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
    backend: str = "auto",
    save_projections: bool = False,
) -> Tensor:
    """Factorized bilinear pooling (MFB), fused.

    Args:
        x: ``(..., m)``; y: ``(..., n)``. Leading dimensions broadcast against each
            other, e.g. regions ``(B, R, m)`` with a question ``(B, 1, n)``.
        weight_x: ``(factor*o, m)``, weight_y: ``(factor*o, n)`` (``nn.Linear`` layout).
        bias_x, bias_y: ``(factor*o,)`` or ``None``.
        factor: ``k``, the number of consecutive projected columns summed into each
            output (column ``j*k + i`` feeds output ``j``).
        dropout: rate applied to the expanded product before pooling, when
            ``training`` is true.
        normalize: apply the zero-safe signed square root and L2 normalisation;
            ``False`` returns the raw sum-pooled values.
        eps: smoothing of the signed square root, ``sign(s)(sqrt(|s|+eps)-sqrt(eps))``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        save_projections: keep the two ``(..., factor*o)`` projections for backward
            instead of recomputing them (faster backward, ``factor`` times more
            activation memory). Default ``False``.

    Returns:
        ``(..., o)`` with ``o = weight_x.shape[0] // factor``, in the inputs' dtype
        (the autocast dtype under ``torch.autocast``).

    Non-finite inputs propagate as they do through ``nn.Linear``: a NaN or Inf in a
    row gives NaN in that row's output; other rows are unaffected.
    """
    _check_tensor("x", x)
    device = x.device
    cast_dtype = _autocast_dtype(device.type)
    x, y, weight_x, weight_y, bias_x, bias_y = _autocast(
        cast_dtype, [x, y, weight_x, weight_y, bias_x, bias_y])
    check_inputs(x, y, weight_x, weight_y, bias_x, bias_y, factor, dropout, eps)
    backend_name = backends.resolve_name(backend, str(device))  # clear error if unusable
    seed = dropout_seed(training, dropout)
    if seed is None:
        dropout = 0.0
    args = (factor, float(dropout), bool(normalize), as_float(eps), bool(save_projections),
            backend_name)
    with no_autocast(device.type, cast_dtype):
        if torch.compiler.is_compiling():
            # The registered operator: the compiler sees one opaque op with a fake kernel.
            out, *_ = ops.fbp_forward(x, y, weight_x, weight_y, bias_x, bias_y, seed, *args)
        else:
            # Eager: the same backend code through a plain autograd.Function.
            seed_int = None if seed is None else int(seed)
            out = ops.FBPFunction.apply(x, y, weight_x, weight_y, bias_x, bias_y, seed_int,
                                        *args)
    return out
