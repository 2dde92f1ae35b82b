"""Build script: pure-Python package plus an optional CUDA extension (``fbp_kernels._C``).

Environment flags (read once, here):

- ``FBP_SKIP_CUDA_BUILD=1``  never build the extension (default: build when CUDA is usable).
- ``FBP_FORCE_CUDA=1``       build it even without a visible GPU (CI, cross-compiling);
                             needs nvcc and a CUDA build of torch.
- ``TORCH_CUDA_ARCH_LIST``   architectures, default ``"8.0;9.0"`` (Ampere, Hopper).
- ``MAX_JOBS``               parallel compile jobs for ninja (torch's own flag).
- ``NVCC_THREADS``           ``nvcc --threads`` per job, default 2.

Without CUDA (or with the skip flag) the package installs without the extension and
still works: the ``torch`` backend everywhere, ``triton`` on GPUs; the ``cuda``
backend can then be built just in time on first use (see fbp_kernels/backends/cuda_build.py).
"""

import glob
import os
import warnings

from setuptools import setup

SKIP_CUDA_BUILD = os.environ.get("FBP_SKIP_CUDA_BUILD", "0") == "1"
FORCE_CUDA = os.environ.get("FBP_FORCE_CUDA", "0") == "1"
DEFAULT_ARCH_LIST = "8.0;9.0"
NVCC_THREADS = os.environ.get("NVCC_THREADS", "2")

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extension():
    """The extension to build, or None (with a warning saying why)."""
    if SKIP_CUDA_BUILD:
        return None
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: skipping the CUDA extension "
                      "(install with --no-build-isolation to build it)")
        return None
    if not (torch.cuda.is_available() or FORCE_CUDA):
        return None
    if CUDA_HOME is None or torch.version.cuda is None:
        warnings.warn("nvcc/CUDA_HOME or a CUDA build of torch not found: skipping the CUDA "
                      "extension; the package installs without it")
        return None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    nvidia_include = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
    ext = CUDAExtension(
        name="fbp_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")] + ([os.path.abspath(nvidia_include)]
                                                     if os.path.isdir(nvidia_include) else []),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                     "-Xptxas=-v", f"--threads={NVCC_THREADS}"],
        },
    )
    return ext, BuildExtension


ext = cuda_extension()
setup(
    ext_modules=[ext[0]] if ext else [],
    cmdclass={"build_ext": ext[1].with_options(use_ninja=True)} if ext else {},
)
