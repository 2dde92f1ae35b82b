"""fbp-kernels: fused factorized bilinear pooling (MFB) for PyTorch.

Public API: :func:`fbp` and :class:`FactorizedBilinearPooling` (MFB), :func:`mfh`
and :class:`MultimodalFactorizedHighOrderPooling` (alias :class:`MFH`),
:func:`available_backends`, :func:`explain` / :func:`explain_mfh` (which kernel and
tile a call runs, and why), :func:`set_split_memory_budget`, checkpoint converters in :mod:`fbp_kernels.convert`, and
the specification in :mod:`fbp_kernels.reference`.
"""

from . import convert, reference, strategy
from .backends import BackendUnavailableError, available_backends
from .functional import fbp
from .mfh import MFH, MultimodalFactorizedHighOrderPooling, mfh
from .modules import FactorizedBilinearPooling
from .reference import DEFAULT_EPS
from .strategy import explain, explain_mfh, set_split_memory_budget

__version__ = "0.1.0"

__all__ = [
    "fbp",
    "FactorizedBilinearPooling",
    "mfh",
    "MultimodalFactorizedHighOrderPooling",
    "MFH",
    "available_backends",
    "explain",
    "explain_mfh",
    "set_split_memory_budget",
    "BackendUnavailableError",
    "reference",
    "convert",
    "DEFAULT_EPS",
    "__version__",
]
