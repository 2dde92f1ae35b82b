"""Backend registry.

A backend is a module with ``NAME``, ``unsupported_reason(device) -> str | None``,
``forward(...) -> ForwardResult``, ``backward(...) -> BackwardResult`` and
``dropout_mask(seed, shape, rate, device)``.  Modules are imported lazily, so a
missing optional dependency (Triton, the compiled extension) only matters to the
backend that needs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, List, Optional

import torch

#: Name -> module, in the order ``backend="auto"`` prefers them on CUDA tensors.
_MODULES: Dict[str, str] = {
    "triton": "fbp_kernels.backends.triton_backend",
    "split": "fbp_kernels.backends.split_backend",
    "cuda": "fbp_kernels.backends.cuda_backend",
    "torch": "fbp_kernels.backends.torch_backend",
}

NAMES = tuple(_MODULES)


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run here (missing dependency or wrong device)."""


def _load(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"backend must be 'auto' or one of {list(NAMES)}, got {name!r}")
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:  # optional dependency missing
        raise BackendUnavailableError(f"backend {name!r} cannot be imported: {exc}") from exc


def unsupported_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or ``None`` when it can."""
    try:
        module = _load(name)
    except BackendUnavailableError as exc:
        return str(exc)
    return module.unsupported_reason(torch.device(device))


def available_backends(device: Optional[torch.device] = None) -> List[str]:
    """Backends that can run on ``device`` (default: CUDA when present, else CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [n for n in NAMES if unsupported_reason(n, torch.device(device)) is None]


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` ('auto' picks the fastest available one)."""
    if name == "auto":
        # The device-level choice (fbp_kernels.strategy: the cost model at the MFB default
        # shape on CUDA; plain PyTorch on the CPU, where BLAS wins and the Triton
        # interpreter is a testing tool).  Eager fbp() refines it per shape.
        from ..strategy import auto_backend

        return _load(auto_backend(device))
    reason = unsupported_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {name!r} cannot run on device {device}: {reason}. "
            f"Available here: {available_backends(device)}"
        )
    return _load(name)


@torch.compiler.assume_constant_result
def resolve_name(name: str, device: str) -> str:
    """Name of the backend :func:`resolve` picks; ``torch.compile`` evaluates it once at
    trace time and keeps the string as a constant (importing modules cannot be traced)."""
    return resolve(name, torch.device(device)).NAME
