"""fbp-kernels: fused factorized bilinear pooling (MFB) for PyTorch.

Public API: :func:`fbp`, :class:`FactorizedBilinearPooling`,
:func:`available_backends`, and the specification in :mod:`fbp_kernels.reference`.
"""

from . import reference
from .backends import BackendUnavailableError, available_backends
from .functional import fbp
from .mfh import MFH, MultimodalFactorizedHighOrderPooling, mfh
from .modules import FactorizedBilinearPooling
from .reference import DEFAULT_EPS

__version__ = "0.1.0"

__all__ = [
    "fbp",
    "FactorizedBilinearPooling",
    "mfh",
    "MultimodalFactorizedHighOrderPooling",
    "MFH",
    "available_backends",
    "BackendUnavailableError",
    "reference",
    "DEFAULT_EPS",
    "__version__",
]
