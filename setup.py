"""Build script: pure-Python package plus an optional CUDA extension (``fbp_kernels._C``).

Environment flags (read once, here):

- ``FBP_SKIP_CUDA_BUILD=1``  never build the extension (default: build when CUDA is usable).
- ``FBP_FORCE_CUDA=1``       build it even without a visible GPU (CI, cross-compiling);
                             needs nvcc and a CUDA build of torch.
- ``TORCH_CUDA_ARCH_LIST``   architectures, default ``"8.0;9.0a"`` (Ampere; Hopper with
                             wgmma/TMA, which need the arch-specific 9.0a target).
- ``MAX_JOBS``               parallel compile jobs for ninja (torch's own flag).
- ``NVCC_THREADS``           ``nvcc --threads`` per job, default 2.

Without CUDA (or with the skip flag) the package installs without the extension and
still works: the ``torch`` backend everywhere, ``triton`` on GPUs; the ``cuda``
backend can then be built just in time on first use (see fbp_kernels/backends/cuda_build.py).
"""

import glob
import os
import sys
import warnings

from setuptools import setup

SKIP_CUDA_BUILD = os.environ.get("FBP_SKIP_CUDA_BUILD", "0") == "1"
FORCE_CUDA = os.environ.get("FBP_FORCE_CUDA", "0") == "1"
DEFAULT_ARCH_LIST = "8.0;9.0a"
NVCC_THREADS = os.environ.get("NVCC_THREADS", "2")

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_module():
    """fbp_kernels/backends/cuda_build.py loaded by path (the package is not importable
    while it is being built; that file needs only torch)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_fbp_cuda_build", os.path.join(HERE, "fbp_kernels", "backends", "cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cuda_extension():
    """The extension to build, or None (with a warning saying why)."""
    if SKIP_CUDA_BUILD:
        return None
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return None
    try:
        import torch
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: skipping the CUDA extension "
                      "(install with --no-build-isolation to build it)")
        return None
    if not (torch.cuda.is_available() or FORCE_CUDA):
        return None
    # The same toolkit discovery as the just-in-time build (follows an nvcc wrapper
    # script; torch alone may guess /usr/local and fail to link -lcudart).
    cuda_home = _cuda_build_module().find_cuda_home() or cpp_extension.CUDA_HOME
    if cuda_home is None or torch.version.cuda is None:
        warnings.warn("nvcc/CUDA_HOME or a CUDA build of torch not found: skipping the CUDA "
                      "extension; the package installs without it")
        return None
    os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    # The pip CUDA wheels' headers (cublas_v2.h, cusparse.h), which torch's CUDA headers
    # include and a bare toolkit may lack.
    nvidia_includes = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..",
                                                    "nvidia", "cu[0-9]*", "include")))
    ext = CUDAExtension(
        name="fbp_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")] + [os.path.abspath(d) for d in nvidia_includes],
        # No -std (torch picks c++17 or c++20 to match its headers) and no
        # --use_fast_math (the signed sqrt and the normalisation must match the
        # reference); -Xptxas=-v prints each kernel's registers, spills and smem.
        # Keep these in step with fbp_kernels/backends/cuda_build.py.
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v", f"--threads={NVCC_THREADS}"]
            + _cuda_build_module().arch_defines(os.environ["TORCH_CUDA_ARCH_LIST"]),
        },
    )
    return ext, BuildExtension


ext = cuda_extension()
setup(
    ext_modules=[ext[0]] if ext else [],
    cmdclass={"build_ext": ext[1].with_options(use_ninja=True)} if ext else {},
)
