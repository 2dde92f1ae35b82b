"""Build and load the CUDA extension (``csrc/``) that backs the ``cuda`` backend.

Two ways to get it, tried in this order by :func:`load`:

1. Ahead of time: ``FBP_FORCE_CUDA=1 pip install --no-build-isolation -e .`` (or any
   install on a machine with a GPU) builds ``fbp_kernels._C``; importing it
   registers the operators.  ``FBP_CUDA_JIT=1`` skips it (e.g. to test edited
   sources against a stale ahead-of-time build).
2. Just in time: ``torch.utils.cpp_extension.load`` compiles ``csrc/*.cpp`` and
   ``csrc/*.cu`` with ninja into a per-user cache,
   ``$FBP_CUDA_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/fbp_kernels/cuda/<key>``,
   where ``<key>`` hashes the sources, the torch and CUDA versions, the
   architecture list and the flags: edited sources or a new torch rebuild, an
   unchanged tree loads in about a second.  An exclusive file lock in the cache
   directory makes two processes building at once wait for each other (the second
   then loads the first one's library).

Either way the operators live under ``torch.ops.fbp_kernels_cuda``.

Settings (environment):

- ``CUDA_HOME``: the CUDA toolkit.  When unset it is found from ``nvcc`` on PATH
  (following wrapper scripts) or ``/usr/local/cuda*``; torch's own guess can
  point at ``/usr/local`` and then the link fails on ``-lcudart``.
- ``TORCH_CUDA_ARCH_LIST``: default ``"8.0;9.0a"`` (Ampere, and Hopper with its
  arch-specific instructions: the wgmma + TMA engine needs ``9.0a``; a plain ``9.0``
  build runs the cp.async engines there) plus the architecture of a visible GPU.
- ``MAX_JOBS``: parallel compile jobs (torch's flag).  ``NVCC_THREADS``: ``nvcc
  --threads`` (default 2).
- ``FBP_CUDA_NO_BUILD=1``: never compile; load this tree's existing build or fail at
  once (``make gpu-check`` sets it after its build phase, so a failed build is not
  retried by every test process).

:func:`resource_usage` reports each compiled kernel's registers, spill stack,
local and shared memory per architecture (``cuobjdump --dump-resource-usage``).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

EXTENSION_NAME = "fbp_kernels_cuda"
DEFAULT_ARCH_LIST = "8.0;9.0a"
CSRC = Path(__file__).resolve().parents[2] / "csrc"

CXX_FLAGS = ["-O3"]  # torch adds its own -std (c++17 up to 2.11, c++20 after)
# No --use_fast_math: the signed square root and the normalisation must match the
# reference to ~1e-6 in fp32; -Xptxas=-v prints registers/spills when verbose.
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xptxas=-v"]


class CudaBuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class KernelResources:
    """Resource usage of one compiled kernel for one architecture."""

    arch: str         # e.g. "sm_80"
    kernel: str       # demangled when c++filt is available
    registers: int
    stack: int        # bytes of stack frame: > 0 means register spills (or local arrays)
    local: int        # bytes of local memory
    shared: int       # bytes of static shared memory

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


# ------------------------------------------------------------------ toolchain discovery

def _has_cudart(home: Path) -> bool:
    return any((home / d / "libcudart.so").exists()
               for d in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"))


def _nvcc_home_from_wrapper(nvcc: str) -> Optional[Path]:
    """CUDA home behind an ``nvcc`` on PATH, following a symlink or an ``exec`` wrapper."""
    real = Path(os.path.realpath(nvcc))
    if (real.parent.parent / "bin" / "nvcc").exists() and _has_cudart(real.parent.parent):
        return real.parent.parent
    try:
        text = real.read_text(errors="ignore")[:4096]
    except OSError:
        return None
    match = re.search(r"(/\S+)/bin/nvcc\b", text)
    if match and _has_cudart(Path(match.group(1))):
        return Path(match.group(1))
    return None


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit to build with, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _nvcc_home_from_wrapper(nvcc)
        if home is not None:
            return str(home)
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if (Path(home) / "bin" / "nvcc").exists() and _has_cudart(Path(home)):
            return home
    return None


def missing_requirements() -> List[str]:
    """What stops a just-in-time build here (empty when it can run), each with a fix."""
    missing = []
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of PyTorch (this torch {torch.__version__} is CPU-only): "
                       f"install a CUDA wheel of torch")
    if find_cuda_home() is None:
        missing.append("nvcc / CUDA_HOME (no CUDA toolkit found): install the CUDA toolkit "
                       "matching torch.version.cuda and set CUDA_HOME=/path/to/cuda")
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():
        missing.append("ninja: `pip install ninja`")
    if not CSRC.is_dir():
        missing.append(f"the C++/CUDA sources ({CSRC}): use a source checkout "
                       f"(pip install -e .)")
    return missing


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for the build: the user's, else the default plus a local GPU."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env and env.strip():
        # torch also takes spaces (container images often export "8.0 8.6 9.0"): one
        # spelling, so arch_defines and the resource check read every entry.
        return ";".join(env.replace(",", " ").replace(";", " ").split())
    archs = DEFAULT_ARCH_LIST.split(";")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        local = f"{major}.{minor}"
        # 9.0a code runs on 9.0 GPUs: no second Hopper build.
        if local not in archs and local + "a" not in archs and major >= 8:
            archs.append(local)
    return ";".join(archs)


def arch_defines(archs: Optional[str] = None) -> List[str]:
    """Preprocessor flags the architecture list implies: ``-DFBP_SM90A`` when it names
    ``9.0a`` (the binding then may choose the wgmma + TMA engine, fbp_launch.h
    wgmma_built(); the host half of a .cu file cannot see which targets nvcc builds).

    Not when it also names a plain ``9.0``: the fatbin then holds an sm_90 image whose
    wgmma engine is a trap stub beside the sm_90a one, and which of the two the driver
    loads on a Hopper GPU is not documented; without the flag the binding never picks
    the wgmma engine and the cp.async engines run in either image."""
    names = [a.strip().split("+")[0] for a in (arch_list() if archs is None else archs).split(";")]
    return ["-DFBP_SM90A"] if "9.0a" in names and "9.0" not in names else []


def _include_dirs() -> List[str]:
    """csrc plus the pip wheels' CUDA headers (cublas_v2.h, cusparse.h are not always in
    the toolkit that builds; torch's CUDA headers include them)."""
    dirs = [str(CSRC)]
    site = Path(torch.__file__).resolve().parent.parent
    dirs += sorted(str(p) for p in site.glob("nvidia/cu[0-9]*/include") if p.is_dir())
    return dirs


def source_files() -> List[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu"))


def build_key() -> str:
    """Hash of everything that changes the library: sources, headers, versions, flags."""
    h = hashlib.sha256()
    for p in sorted(CSRC.iterdir()):
        if p.suffix in (".cpp", ".cu", ".cuh", ".h"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), arch_list(), sys.version,
                 " ".join(CXX_FLAGS + NVCC_FLAGS), find_cuda_home() or ""):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    if os.environ.get("FBP_CUDA_CACHE"):
        return Path(os.environ["FBP_CUDA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fbp_kernels" / "cuda"


def build_dir() -> Path:
    return cache_root() / build_key()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock across processes (POSIX flock); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------ building and loading

_state_lock = threading.Lock()
_loaded: Optional[str] = None   # path of the loaded library, or "fbp_kernels._C"
_failure: Optional[str] = None  # the error of a failed build, reported once per process


def loaded_library() -> Optional[str]:
    """The library this process loaded (a path or ``fbp_kernels._C``), or None."""
    return _loaded


def build_failure() -> Optional[str]:
    """The error message of an earlier failed build in this process, or None."""
    return _failure


def _try_aot() -> Optional[str]:
    if os.environ.get("FBP_CUDA_JIT") == "1":
        return None
    try:
        import fbp_kernels._C as ext  # noqa: F401  (registers the operators)
    except ImportError:
        return None
    return "fbp_kernels._C"


def compile_extension(name: str, sources: List[str], directory: Path, *,
                      verbose: bool = False) -> Path:
    """Compile and link ``sources`` into ``directory/name.so`` and load it into
    ``torch.ops``.  Raises :class:`CudaBuildError` with the compiler output on failure."""
    from torch.utils import cpp_extension

    missing = missing_requirements()
    if missing:
        raise CudaBuildError("cannot build the CUDA extension, missing: " + "; ".join(missing))
    home = find_cuda_home()
    # torch reads CUDA_HOME at import time; point it (and nvcc) at the toolkit found.
    cpp_extension.CUDA_HOME = home
    env = {"CUDA_HOME": home, "TORCH_CUDA_ARCH_LIST": arch_list()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    directory.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("NVCC_THREADS", "2")
    try:
        cpp_extension.load(
            name=name, sources=sources, build_directory=str(directory),
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS + arch_defines() + [f"--threads={threads}"],
            extra_include_paths=_include_dirs(), is_python_module=False, verbose=verbose)
    except Exception as exc:  # RuntimeError from ninja, OSError from dlopen
        raise CudaBuildError(
            f"building the CUDA extension in {directory} failed (CUDA_HOME={home}, "
            f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}):\n{exc}\n"
            f"Fix the error above, or use backend='triton' or 'torch'.") from exc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return directory / f"{name}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"


def load(verbose: bool = False) -> str:
    """Make ``torch.ops.fbp_kernels_cuda`` available; returns what was loaded.

    Builds just in time when there is no ahead-of-time build.  A failure is
    remembered, so a broken build is reported at once on the next call instead of
    being retried for every layer call.
    """
    global _loaded, _failure
    with _state_lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise CudaBuildError(_failure)
        aot = _try_aot()
        if aot is not None:
            _loaded = aot
            return aot
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with _file_lock(directory / ".fbp-build.lock"):
                if os.environ.get("FBP_CUDA_NO_BUILD") == "1":
                    path = _load_existing(directory)
                else:
                    # torch's own build lock ("lock", a file that exists while it
                    # builds) is left behind when a build is killed, and every later
                    # build would wait on it forever; under our lock no build of ours
                    # is running here, so one that exists is stale.
                    (directory / "lock").unlink(missing_ok=True)
                    path = compile_extension(EXTENSION_NAME,
                                             [str(p) for p in source_files()], directory,
                                             verbose=verbose)
        except CudaBuildError as exc:
            _failure = str(exc)
            raise
        _loaded = str(path)
        return _loaded


def _load_existing(directory: Path) -> Path:
    """FBP_CUDA_NO_BUILD=1: load the library an earlier build left in ``directory``."""
    path = directory / f"{EXTENSION_NAME}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
    if not path.exists():
        raise CudaBuildError(f"FBP_CUDA_NO_BUILD=1 and no build of this tree in {directory} "
                             f"(unset it to build; make gpu-check's build phase failed?)")
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:
        raise CudaBuildError(f"loading {path} failed: {exc}") from exc
    return path


def ops():
    """``torch.ops.fbp_kernels_cuda``, building the extension first if needed."""
    load()
    return torch.ops.fbp_kernels_cuda


# ------------------------------------------------------------------ resource usage

def _find_cuobjdump() -> Optional[str]:
    home = find_cuda_home()
    candidates = [os.path.join(home, "bin", "cuobjdump")] if home else []
    candidates.append(shutil.which("cuobjdump") or "")
    try:  # Triton ships one
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__),
                                       "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _demangle(names: List[str]) -> List[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


def parse_resource_usage(text: str) -> List[KernelResources]:
    """Parse ``cuobjdump --dump-resource-usage`` output."""
    rows, arch, kernel = [], None, None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"arch\s*=\s*(sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"Function\s+(\S+?):?$", line)
        if m:
            kernel = m.group(1)
            continue
        if kernel and line.startswith("REG:"):
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            rows.append((arch or "?", kernel, int(fields.get("REG", 0)),
                         int(fields.get("STACK", 0)), int(fields.get("LOCAL", 0)),
                         int(fields.get("SHARED", 0))))
            kernel = None
    names = _demangle([r[1] for r in rows])
    return [KernelResources(r[0], n, *r[2:]) for r, n in zip(rows, names)]


def resource_usage(library: Optional[str] = None) -> List[KernelResources]:
    """Registers, stack (spills), local and shared memory of every kernel in the built
    library (default: the one :func:`load` built or imported), per architecture."""
    if library is None:
        library = load()
        if library == "fbp_kernels._C":
            import fbp_kernels._C as ext
            library = ext.__file__
    tool = _find_cuobjdump()
    if tool is None:
        raise CudaBuildError("cuobjdump not found (looked in CUDA_HOME/bin, PATH and Triton's "
                             "bundled tools); it ships with the CUDA toolkit")
    out = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise CudaBuildError(f"{tool} failed on {library}: {out.stderr.strip()}")
    return parse_resource_usage(out.stdout)


def format_resource_usage(rows: List[KernelResources]) -> str:
    """A table, one line per (arch, kernel)."""
    lines = [f"{'arch':6} {'regs':>4} {'stack':>5} {'local':>5} {'smem':>6}  kernel"]
    for r in sorted(rows, key=lambda r: (r.arch, r.kernel)):
        lines.append(f"{r.arch:6} {r.registers:4d} {r.stack:5d} {r.local:5d} {r.shared:6d}  "
                     f"{r.kernel[:110]}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fbp_kernels.backends.cuda_build: build and report
    print("loaded:", load(verbose="-v" in sys.argv))
    print(format_resource_usage(resource_usage()))
