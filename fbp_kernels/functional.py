"""``fbp()``: argument checks, autocast, dropout seeding and backend choice."""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import backends, ops, strategy
from .backends._common import broadcast_batch
from .reference import ACTIVATIONS, DEFAULT_EPS, check_norm_dims

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        # Sparse and other layouts would reach the kernels (which index by strides) or
        # fail deep inside F.linear/expand: refuse them here, by name.
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; "
                        f"convert it with .to_dense()")
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


def check_rate(name: str, rate) -> None:
    """A dropout rate: any real number (numpy scalars included, bools not) in [0, 1);
    NaN fails the range test.  ValueError otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, (numbers.Real, torch.SymFloat)) \
            or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {rate!r}")


def check_options(factor, dropout, eps, backend: str = "auto") -> None:
    """Validate the non-tensor options (shared by fbp() and the modules' constructors)."""
    check_size("factor", factor)
    check_rate("dropout", dropout)
    if isinstance(eps, bool) or not isinstance(eps, (numbers.Real, torch.SymFloat)):
        raise ValueError(_eps_message(eps))
    if not _traced(eps):
        check_eps(eps)
    # else: torch.compile may trace eps as a SymFloat (dynamic=True, or after a
    # recompile for a new value); testing its range here would specialise on it, so
    # the registered op checks the concrete value when it runs, with the same error.
    if backend != "auto" and backend not in backends.NAMES:
        raise ValueError(f"backend must be 'auto' or one of {list(backends.NAMES)}, "
                         f"got {backend!r}")


#: The names check_inputs uses in its messages; MFH passes per-block ones.
FBP_NAMES = {k: k for k in ("x", "y", "weight_x", "weight_y", "bias_x", "bias_y")}


def check_inputs(x, y, weight_x, weight_y, bias_x, bias_y, factor, dropout, eps,
                 names=FBP_NAMES) -> torch.Size:
    """Validate ``fbp`` arguments; returns the broadcast leading shape.

    Raises TypeError for wrong types or dtypes and ValueError for shapes, devices
    and out-of-range options, each naming the offending argument (as ``names``
    spells it: :func:`fbp_kernels.mfh` says ``weights_x[1]`` for block 1's weight).
    """
    n = names
    _check_tensor(n["x"], x)
    _check_tensor(n["y"], y)
    _check_tensor(n["weight_x"], weight_x, 2)
    _check_tensor(n["weight_y"], weight_y, 2)
    check_options(factor, dropout, eps)
    ko = weight_x.shape[0]
    if ko == 0 or ko % factor != 0:
        raise ValueError(f"{n['weight_x']}.shape[0] (= factor * out_features) must be a "
                         f"positive multiple of factor={factor}, got {ko}")
    if weight_y.shape[0] != ko:
        raise ValueError(f"{n['weight_x']} and {n['weight_y']} must have the same number of "
                         f"rows (factor * out_features), got {ko} and {weight_y.shape[0]}")
    for v, w in (("x", "weight_x"), ("y", "weight_y")):
        t, wt = (x, weight_x) if v == "x" else (y, weight_y)
        if wt.shape[1] != t.shape[-1]:
            raise ValueError(f"{n[v]} has {t.shape[-1]} features (shape {tuple(t.shape)}) but "
                             f"{n[w]} expects {wt.shape[1]} (shape {tuple(wt.shape)})")
    named = [(n["x"], x), (n["y"], y), (n["weight_x"], weight_x), (n["weight_y"], weight_y)]
    for key, b in (("bias_x", bias_x), ("bias_y", bias_y)):
        if b is not None:
            _check_tensor(n[key], b, 1)
            if b.shape[0] != ko:
                raise ValueError(f"{n[key]} must have shape ({ko},), got {tuple(b.shape)}")
            named.append((n[key], b))
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) > 1:
        desc = ", ".join(f"{name}={t.dtype}" for name, t in named)
        raise TypeError(f"all tensors must share one dtype (cast them, or use torch.autocast), "
                        f"got {desc}")
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        desc = ", ".join(f"{name} on {t.device}" for name, t in named)
        raise ValueError(f"all tensors must be on one device, got {desc}")
    try:
        return broadcast_batch(x.shape[:-1], y.shape[:-1])
    except ValueError:
        raise ValueError(f"the leading dimensions of {n['x']} {tuple(x.shape[:-1])} and "
                         f"{n['y']} {tuple(y.shape[:-1])} do not broadcast") from None


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


#: ``save_projections`` values -> the mode the operators carry: what forward keeps.
PROJECTION_MODES = {False: "none", True: "both", "x": "x", "y": "y"}
#: Backends that can keep one projection and recompute the other.
ONE_PROJECTION_BACKENDS = ops.ONE_PROJECTION_BACKENDS


def projection_mode(save_projections) -> str:
    """``"none"``, ``"both"``, ``"x"`` or ``"y"`` from ``save_projections`` (``False``,
    ``True``, ``"x"``, ``"y"``); ValueError for anything else."""
    if isinstance(save_projections, (bool, str)) and save_projections in PROJECTION_MODES:
        return PROJECTION_MODES[save_projections]
    raise ValueError(f"save_projections must be False, True, 'x' or 'y' (keep the x or the "
                     f"y projection only), got {save_projections!r}")


def check_drop_in(norm_dims, activation) -> None:
    """The drop-in options of ``fbp``, ``mfh`` and both modules: ``norm_dims`` an int
    >= 1 (TypeError for a non-int or a bool, ValueError below 1), ``activation`` one of
    ``None``, ``"relu"``, ``"tanh"`` (ValueError)."""
    check_size("norm_dims", norm_dims)
    if activation is not None and not (isinstance(activation, str)
                                       and activation in ACTIVATIONS):
        raise ValueError(f"activation must be None, 'relu' or 'tanh' (applied to both "
                         f"projections before the product), got {activation!r}")


def route_drop_in(backend: str, norm_dims: int, activation, device=None,
                  supported=None) -> Optional[str]:
    """The one routing rule for ``norm_dims != 1`` and ``activation`` (FBP and MFH).

    ``None`` when both are at their defaults (the usual choice applies).  Otherwise
    the backend to run, one of ``supported`` (default ``ops.DROP_IN_BACKENDS``, FBP's;
    MFH passes ``ops.MFH_DROP_IN_BACKENDS``).  ``"auto"`` takes, on a CUDA ``device``,
    the first of them that runs there (``split``: cuBLAS and a Triton epilogue), and
    ``torch`` on any other device (or without ``device``), as ``strategy.choose`` does
    without these options: on the CPU BLAS is the fast path and the Triton interpreter
    a testing tool.  A named backend must be among them (ValueError naming the options
    and the backends that have them).
    """
    supported = ops.DROP_IN_BACKENDS if supported is None else supported
    used = ops.drop_in_in_use(norm_dims, activation)
    if not used:
        return None
    if backend == "auto":
        if device is not None and torch.device(device).type == "cuda":
            for name in supported:
                # Constant-folded under torch.compile (as backend_name_or_raise is).
                if name != "torch" and _backend_or_problem(name, str(device)) == name:
                    return name
        return "torch"
    if backend not in backends.NAMES:
        raise ValueError(f"backend must be 'auto' or one of {list(backends.NAMES)}, "
                         f"got {backend!r}")
    if backend not in supported:
        raise ValueError(ops.drop_in_unsupported(used, backend, supported))
    return backend


def _prepare(tensors, factor, dropout, eps, backend, save_projections=False, norm_dims=1,
             activation=None):
    """Autocast and check ``fbp``'s arguments; returns ``(autocast dtype or None,
    the cast tensors, the backend's name, the projection mode)``."""
    _check_tensor("x", tensors[0])
    cast_dtype = _autocast_dtype(tensors[0].device.type)
    tensors = _autocast(cast_dtype, tensors)
    batch = check_inputs(*tensors, factor, dropout, eps)
    check_drop_in(norm_dims, activation)
    check_norm_dims(norm_dims, len(batch))
    mode = projection_mode(save_projections)
    device = tensors[0].device
    routed = route_drop_in(backend, norm_dims, activation, device)
    if routed is not None:
        # split, cuda and torch keep any of the projection modes with these options;
        # triton refuses save_projections=True with the reason (drop_in_problem).
        return cast_dtype, tensors, backend_name_or_raise(routed, device), mode
    if mode in ("x", "y"):
        # Backends in ONE_PROJECTION_BACKENDS keep one projection.
        # auto: eager takes the cost model's choice for this shape in this mode
        # (strategy.choose); compiled graphs split where it runs, else torch.
        if backend == "auto":
            if device.type == "cuda" and not torch.compiler.is_compiling():
                return cast_dtype, tensors, _auto_for_shape(*tensors[:4], factor,
                                                            keep=mode), mode
            split_ok = device.type == "cuda" and backends.unsupported_reason(
                "split", device) is None
            name = "split" if split_ok else backend_name_or_raise("torch", device)
            return cast_dtype, tensors, name, mode
        name = backend_name_or_raise(backend, device)
        if name not in ONE_PROJECTION_BACKENDS:
            raise ValueError(f"save_projections={save_projections!r} (keep one projection) "
                             f"is supported by backends {list(ONE_PROJECTION_BACKENDS)}, "
                             f"not {name!r}")
        return cast_dtype, tensors, name, mode
    if backend == "auto" and device.type == "cuda" and not torch.compiler.is_compiling():
        # Eager: the cost model's choice for this very shape (strategy.py); compiled
        # graphs take the device-level choice (one constant per trace).
        return cast_dtype, tensors, _auto_for_shape(*tensors[:4], factor,
                                                    keep=mode == "both"), mode
    return cast_dtype, tensors, backend_name_or_raise(backend, device), mode


def _auto_for_shape(x, y, weight_x, weight_y, factor, keep=False) -> str:
    """strategy.choose for this call's shape; ``keep``: its ``save_projections``."""
    batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    rows = 1
    for d in batch:
        rows *= d
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad
                                              or weight_x.requires_grad
                                              or weight_y.requires_grad)
    return strategy.choose(x.device, rows, x.shape[-1], y.shape[-1], factor,
                           weight_x.shape[0] // factor, x.dtype, needs_grad, keep)[0]


@torch.compiler.assume_constant_result
def _backend_or_problem(name: str, device: str) -> str:
    # Evaluated once at trace time by torch.compile, which wraps any exception raised
    # here; so the problem comes back as a string: NUL, then V (ValueError: unknown
    # name) or B (BackendUnavailableError), then the message.
    try:
        return backends.resolve(name, torch.device(device)).NAME
    except backends.BackendUnavailableError as exc:
        return "\0B" + str(exc)
    except ValueError as exc:
        return "\0V" + str(exc)


def backend_name_or_raise(name: str, device: torch.device) -> str:
    """The backend ``name`` resolves to on ``device``; BackendUnavailableError if none."""
    found = _backend_or_problem(name, str(device))
    if found.startswith("\0"):
        kind = ValueError if found[1] == "V" else backends.BackendUnavailableError
        raise kind(found[2:])
    return found


def _output_shape(x, y, weight_x, factor, blocks: int) -> list:
    """Best guess at the output shape for arguments that failed the checks (so code
    traced after the call still sees a plausible shape); ``[0]`` when there is none."""
    if not (isinstance(x, Tensor) and isinstance(y, Tensor) and isinstance(weight_x, Tensor)
            and x.dim() >= 1 and y.dim() >= 1 and weight_x.dim() == 2
            and isinstance(factor, int) and not isinstance(factor, bool) and factor >= 1):
        return [0]
    try:
        batch = broadcast_batch(x.shape[:-1], y.shape[:-1])
    except ValueError:
        batch = x.shape[:-1]
    return [*batch, blocks * (weight_x.shape[0] // factor)]


def checked(prepare, args, options, shape):
    """``(prepare(args, *options), None)``: the argument checks of ``fbp`` and ``mfh``.

    Under ``torch.compile`` a TypeError/ValueError/BackendUnavailableError they raise
    comes back as ``(None, out)`` instead, ``out`` being the graph op that raises it
    when the graph runs (:func:`raise_when_run`; ``shape()`` guesses the result's
    shape); the caller returns ``out``.
    """
    if not torch.compiler.is_compiling():
        return prepare(args, *options), None
    try:
        return prepare(args, *options), None
    except (TypeError, ValueError, backends.BackendUnavailableError) as exc:
        return None, raise_when_run(exc, args, shape())


def raise_when_run(exc: Exception, tensors, shape) -> Tensor:
    """Under ``torch.compile``: the graph op that raises ``exc`` when the graph runs.

    Dynamo turns an exception raised while tracing into its own RuntimeError
    ("Observed exception") under ``fullgraph=True``.  Argument checks therefore catch
    their TypeError/ValueError while tracing and put :func:`ops.argument_error` in
    the graph instead, which raises the same type and message at run time, as the
    eager call would.  Its output (``shape``, never computed) stands in for the result.
    """
    like = next((t for t in _flat_tensors(tensors)), None)
    if like is None:
        like = torch.empty(0)
    if isinstance(exc, backends.BackendUnavailableError):
        kind = "BackendUnavailableError"
    else:
        kind = "TypeError" if isinstance(exc, TypeError) else "ValueError"
    return ops.argument_error(like, kind, str(exc), shape)


def _flat_tensors(items):
    for t in items:
        if isinstance(t, Tensor):
            yield t
        elif isinstance(t, (list, tuple)):
            yield from _flat_tensors(t)


def dropout_seed(training: bool, dropout: float) -> Optional[Tensor]:
    """The dropout seed of one call (a CPU int64 scalar), or None when dropout is off.

    Drawn from PyTorch's CPU generator: ``torch.manual_seed`` makes runs reproducible,
    and a CPU scalar never synchronises the GPU.  Kernels regenerate the mask from it.
    """
    if training and dropout > 0:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # The seed reaches the kernels as an argument, which a CUDA graph freezes:
            # every replay would draw the captured call's mask, silently.
            raise RuntimeError(
                "fbp: dropout while capturing a CUDA graph would replay one dropout mask "
                "on every replay (the seed is a kernel argument, frozen by the capture); "
                "capture with dropout=0 or the module in eval mode, or run this step "
                "outside the graph")
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
    save_projections=False,
    norm_dims: int = 1,
    activation: Optional[str] = None,
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
        backend: ``"auto"``, ``"split"``, ``"triton"``, ``"cuda"`` or ``"torch"``.
        save_projections: ``True`` keeps the two ``(..., factor*o)`` projections for
            backward instead of recomputing them (two GEMMs fewer in backward, ``factor``
            times more activation memory); ``"x"`` or ``"y"`` keeps only that input's
            (half the memory, one GEMM recomputed; backends ``split``, ``triton``,
            ``cuda`` and ``torch``).
            Default ``False``: recompute both.  With ``activation`` backend
            ``torch`` keeps the activated projections and ``split`` the pre-activation
            ones (its epilogue applies the activation as it reads them).
        norm_dims: the L2 normalisation spans the ``o`` outputs and the last
            ``norm_dims - 1`` leading dimensions of the broadcast batch (default 1:
            each row on its own).  ``norm_dims=2`` on regions ``(N, C, ...)`` is
            openvqa's joint normalisation ``F.normalize(t.view(N, -1)).view(N, C, o)``.
            At most the batch's number of dimensions + 1 (ValueError).
        activation: ``None``, ``"relu"`` or ``"tanh"``, applied to both projections
            (after their biases) before the product, as block.bootstrap's and mmf's
            ``activ_input``; relu's gradient at exactly 0 is 0 (PyTorch's convention).

        ``norm_dims != 1`` and ``activation`` run on backends ``split``, ``triton``
        (its wide kernels; not with ``save_projections=True``), ``cuda`` and ``torch``:
        ``backend="auto"`` takes ``split`` on a CUDA device where Triton runs, else
        ``torch``.

    Returns:
        ``(..., o)`` with ``o = weight_x.shape[0] // factor``, in the inputs' dtype
        (the autocast dtype under ``torch.autocast``).

    Non-finite inputs propagate as they do through ``nn.Linear``: a NaN or Inf in a
    row gives NaN in that row's output; other rows are unaffected.
    """
    tensors = [x, y, weight_x, weight_y, bias_x, bias_y]
    prepared, failed = checked(_prepare, tensors,
                               (factor, dropout, eps, backend, save_projections,
                                norm_dims, activation),
                               lambda: _output_shape(x, y, weight_x, factor, 1))
    if failed is not None:
        return failed
    cast_dtype, tensors, backend_name, mode = prepared
    x, y, weight_x, weight_y, bias_x, bias_y = tensors
    device = x.device
    seed = dropout_seed(training, dropout)
    if seed is None:
        dropout = 0.0
    args = (factor, float(dropout), bool(normalize), as_float(eps), mode, backend_name,
            norm_dims, activation)
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
