"""Compile facts of the CUDA C++ kernels (``csrc/*.cu``) for sm_80 and sm_90, without a GPU.

sm_90 is built as the arch-specific target sm_90a (``-gencode=arch=compute_90a,
code=sm_90a``), as the extension is (cuda_build.DEFAULT_ARCH_LIST): wgmma exists only
there.

The counterpart of :mod:`.triton_compile` for the ``cuda`` backend. Each ``.cu`` file is
compiled on its own to a cubin per architecture (``nvcc -cubin -Xptxas -v``; the
``.cu`` files include no ATen header, so this needs no torch build and takes about
30 s per file and architecture on 2 cores); then, per kernel:

- ``registers``, ``stack_bytes`` (spills or local arrays), ``local_bytes`` and static
  ``shared_bytes`` from ``cuobjdump --dump-resource-usage``; ``spill_stores`` /
  ``spill_loads`` from ptxas' ``-v`` report;
- ``tensor_cores`` from the SASS (``cuobjdump -sass``): ``"HGMMA"`` (Hopper wgmma),
  ``"HMMA"`` (mma.sync / wmma), ``"DMMA"`` (fp64 mma) or ``"none"``; ``tma`` (SASS has
  ``UTMALDG`` or ``UBLKCP``), ``cp_async`` (``LDGSTS``) and ``ldmatrix`` (``LDSM``);
- ``ctas_per_sm``: the smallest of the register, shared-memory, thread and block
  limits of the architecture (:data:`SM_LIMITS`; see :func:`ctas_per_sm`);
- for the GEMM kernels, from the tile shape of their engine (:data:`TILES`, checked
  against ``csrc/fbp_tile.cuh`` by ``tests/test_cuda_compile.py``):
  ``flop_per_byte = 2*BM*BN*BK / ((BM + BN)*BK*element_bytes)`` per CTA and k-step, and
  ``inflight_bytes_per_sm`` = bytes of operand tiles in flight per CTA (one tile for
  synchronous staging, ``stages - 1`` tiles for a multi-stage cp.async pipeline) times
  ``ctas_per_sm``.

Cubins and ptxas logs are cached by a hash of the sources, the nvcc version, the flags
and the architecture under ``<cuda_build.cache_root()>/compile/<key>``: an unchanged tree
reports in a few seconds. Run as::

    python -m fbp_kernels.backends.cuda_compile --json out.json

The exit status is non-zero when a file fails to compile, a kernel spills or the sm_90
training engine misses the thresholds below. Issue 12's
main-loop thresholds (wgmma and TMA on sm_90, ``flop_per_byte >= 64``,
``inflight_bytes_per_sm >= 64 KiB``) are printed as a gap list for every sm_90 half
engine; ``tests/test_cuda_compile.py`` asserts them for the training engine (the one
``FBP_CUDA_STAGING=auto`` runs there, :data:`TRAINING_ENGINE_OF_DTYPE`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from . import cuda_build

ARCHS = (80, 90)


class Tile(NamedTuple):
    """A GEMM engine's CTA tile: (BM, BN, BK), threads per CTA, shared-memory stages."""

    bm: int
    bn: int
    bk: int
    threads: int
    stages: int  # 1: synchronous staging (load, barrier, compute, barrier)


#: Tile shapes of the engines in csrc/fbp_tile.cuh (EngineFor<T>); tests parse the header
#: and fail when these drift from it.
TILES: Dict[str, Tile] = {
    "WmmaEngine": Tile(64, 64, 32, 128, 1),
    "WmmaAsyncEngine": Tile(64, 64, 32, 128, 3),
    "WmmaWideEngine": Tile(128, 128, 32, 256, 4),
    "WgmmaEngine": Tile(128, 128, 64, 256, 4),
    "FmaEngine<float>": Tile(64, 64, 16, 256, 1),
    "FmaEngine<double>": Tile(32, 64, 16, 256, 1),
}

#: The engine each input dtype uses (EngineFor<T> in csrc/fbp_tile.cuh).
ENGINE_OF_DTYPE = {"fp16": "WmmaEngine", "bf16": "WmmaEngine", "fp32": "FmaEngine<float>",
                   "fp64": "FmaEngine<double>"}

#: The cp.async engine of a dtype (AsyncEngineFor<T>), chosen at run time when every
#: operand is 16-byte aligned and contiguous along K (FBP_CUDA_STAGING; docs/cuda.md).
ASYNC_ENGINE_OF_DTYPE = {"fp16": "WmmaAsyncEngine", "bf16": "WmmaAsyncEngine"}
#: The 128x128 cp.async engine of a dtype (WideEngineFor<T>): what the launcher runs
#: for aligned fp16/bf16 operands on sm_80 and sm_90 (FBP_CUDA_STAGING=auto).
WIDE_ENGINE_OF_DTYPE = {"fp16": "WmmaWideEngine", "bf16": "WmmaWideEngine"}
#: The wgmma + TMA engine of a dtype (WgmmaEngineFor<T>): sm_90a only (its body traps on
#: sm_80, where the report still lists it).
WGMMA_ENGINE_OF_DTYPE = {"fp16": "WgmmaEngine", "bf16": "WgmmaEngine"}
#: What FBP_CUDA_STAGING=auto runs for aligned fp16/bf16 operands (on sm_80 above 128
#: rows), per architecture: the kernels issue 12's thresholds are asserted on (sm_90).
TRAINING_ENGINE_OF_DTYPE = {80: WIDE_ENGINE_OF_DTYPE, 90: WGMMA_ENGINE_OF_DTYPE}
#: Engines whose kernels exist only for sm_90a: the sm_80 cubin holds trap stubs of them
#: (the host code instantiates every engine; the binding never launches these there), so
#: the report leaves them out of its sm_80 rows.
SM90A_ENGINES = ("WgmmaEngine",)

#: Dynamic shared memory per CTA of the engines whose fused kernels take more than the
#: 48 KiB a static array may (TileSmem<E>::kBytes; ptxas reports no static buffer for
#: them): the stages (4 x 256 rows x 40 halves), the fp32 a tile (128 x 136), the
#: biases.  Checked against the built extension (torch.ops.fbp_kernels_cuda.engine_tile).
#: WgmmaEngine: 1 KiB of alignment slack + 4 stages of (128 + 128) x 64 halves + 4
#: mbarriers (rounded to 128 bytes), the fp32 a tile (128 x 136), the biases.
DYNAMIC_SMEM_BYTES = {"WmmaWideEngine": 4 * 256 * 40 * 2 + 128 * 136 * 4 + 2 * 128 * 4,
                      "WgmmaEngine": 132224 + 128 * 136 * 4 + 2 * 128 * 4}

#: Bytes per element of each input dtype (the operand tiles are loaded in it).
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}

#: Threads per block of the kernels that are not GEMM tiles: one warp per row,
#: kRowsPerBlock = 8 rows per block (fbp_forward.cu, fbp_backward.cu); one block of
#: kGroupThreads = 256 per joint-normalisation group (fbp_launch.h); dropout_keep runs
#: kThreads = 256 (fbp_forward.cu). Checked against the sources by the tests.
ROW_KERNEL_THREADS = {"finish_norm": 256, "grad_pooled": 256, "finish_group_norm": 256,
                      "grad_pooled_group": 256, "dropout_keep": 256}

#: Kernels built on a GEMM engine (their tile gives flop_per_byte and bytes in flight).
GEMM_KERNELS = ("fused_forward", "projection_grads")
KERNELS = GEMM_KERNELS + tuple(ROW_KERNEL_THREADS)


class SmLimits(NamedTuple):
    registers: int      # 32-bit registers per SM
    shared_bytes: int   # shared memory per SM usable by CTAs (largest carveout)
    threads: int        # resident threads per SM
    blocks: int         # resident CTAs per SM
    reserved_smem: int  # shared memory the system reserves per CTA
    reg_unit: int       # registers are allocated per warp in units of this many


#: A100 (sm_80) and H100/H200 (sm_90), CUDA C Programming Guide, "Compute Capabilities".
SM_LIMITS = {
    80: SmLimits(65536, 164 * 1024, 2048, 32, 1024, 256),
    90: SmLimits(65536, 228 * 1024, 2048, 32, 1024, 256),
}

#: Issue 12's CI thresholds for the main loop of a training kernel (sm_90, fp16/bf16):
#: reported for every engine, asserted by the tests for TRAINING_ENGINE_OF_DTYPE[90].
ISSUE12_THRESHOLDS = {"tensor_cores": "HGMMA", "tma": True, "flop_per_byte": 64.0,
                      "inflight_bytes_per_sm": 64 * 1024}


@dataclass
class KernelFacts:
    kernel: str            # fused_forward, finish_norm, dropout_keep, grad_pooled, ... (_FAMILY)
    arch: int
    dtype: str             # fp16 / bf16 / fp32 / fp64, "-" for dropout_keep
    config: str            # the engine (TILES key) for GEMM kernels, "default" otherwise
    num_warps: int
    source: str            # the .cu file
    symbol: str            # demangled name (anonymous-namespace hash included)
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int      # shared memory per CTA: static (ptxas) + dynamic (DYNAMIC_SMEM_BYTES)
    shared_bytes_cuobjdump: int  # cuobjdump's SHARED (sm_90: + the 1 KiB system reserve)
    spill_stores: int
    spill_loads: int
    threads: int
    tensor_cores: str      # HGMMA / HMMA / DMMA / none (from SASS)
    tma: bool              # UTMALDG or UBLKCP in SASS
    cp_async: bool         # LDGSTS in SASS
    ldmatrix: bool         # LDSM in SASS
    ctas_per_sm: int
    ctas_limited_by: str   # registers / shared / threads / blocks
    bm: Optional[int] = None
    bn: Optional[int] = None
    bk: Optional[int] = None
    stages: Optional[int] = None
    flop_per_byte: Optional[float] = None
    inflight_bytes_per_sm: Optional[int] = None
    ok: bool = True
    error: str = ""


@dataclass
class CompileResult:
    source: str
    arch: int
    ok: bool
    seconds: float         # compile time (0 when read from the cache)
    cached: bool
    log: str = ""          # ptxas -v output (and errors)
    cubin: Optional[str] = None
    kernels: List[KernelFacts] = field(default_factory=list)


# ------------------------------------------------------------------ occupancy and intensity

def ctas_per_sm(registers: int, shared_bytes: int, threads: int, arch: int) -> Tuple[int, str]:
    """Resident CTAs per SM and the limit that sets it.

    Registers are allocated per warp, ``ceil(registers * 32 / 256) * 256`` each; shared
    memory per CTA is its declared static size (ptxas' ``bytes smem``) plus the 1 KiB the
    system reserves per CTA on sm_80 and sm_90 (cuobjdump's ``SHARED`` already includes
    that reserve on sm_90, not on sm_80), rounded to 128 bytes, against the largest
    carveout (the driver picks it for a kernel with static shared memory when that
    raises occupancy).
    """
    lim = SM_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // lim.reg_unit) * lim.reg_unit
    by = {
        "registers": (lim.registers // per_warp) // warps,
        "shared": lim.shared_bytes // (-(-(shared_bytes + lim.reserved_smem) // 128) * 128),
        "threads": lim.threads // (warps * 32),
        "blocks": lim.blocks,
    }
    limit = min(by, key=lambda k: (by[k], list(by).index(k)))
    return by[limit], limit


def tile_intensity(tile: Tile, element_bytes: int) -> Tuple[float, int]:
    """(FLOP per byte loaded into shared memory per CTA and k-step, bytes of operand
    tiles in flight per CTA)."""
    tile_bytes = (tile.bm + tile.bn) * tile.bk * element_bytes
    flop = 2 * tile.bm * tile.bn * tile.bk
    in_flight = tile_bytes * max(1, tile.stages - 1)
    return flop / tile_bytes, in_flight


# ------------------------------------------------------------------ tools

def find_nvcc() -> Optional[str]:
    home = cuda_build.find_cuda_home()
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return None


def missing_tools() -> List[str]:
    """What stops the report here (empty when it can run), each with a fix."""
    missing = []
    if find_nvcc() is None:
        missing.append("nvcc (no CUDA toolkit found): install the CUDA toolkit and set "
                       "CUDA_HOME=/path/to/cuda")
    if cuda_build._find_cuobjdump() is None:
        missing.append("cuobjdump (not in CUDA_HOME/bin, PATH or Triton's bundled tools): "
                       "install the CUDA toolkit or `pip install triton`")
    return missing


def nvcc_flags(arch: int, csrc: Path) -> List[str]:
    """The build's device flags (torch's common nvcc flags, cuda_build.NVCC_FLAGS), one
    architecture, cubin output."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
        common = list(COMMON_NVCC_FLAGS)
    except ImportError:  # pragma: no cover - torch is a dependency
        common = []
    return (common + [f for f in cuda_build.NVCC_FLAGS if f != "-Xptxas=-v"]
            + ["-Xptxas=-v", "-std=c++17", "--threads=1", *arch_flags(arch), "-cubin",
               f"-I{csrc}"])


def arch_flags(arch: int) -> List[str]:
    """nvcc's target for one report architecture: sm_90 is the arch-specific sm_90a (what
    the extension builds, with the define it implies; HOPPER.md: the -gencode form)."""
    if arch == 90:
        return ["-gencode=arch=compute_90a,code=sm_90a", *cuda_build.arch_defines("9.0a")]
    return [f"-arch=sm_{arch}"]


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else "unknown"


def source_key(csrc: Path, arch: int, flags: List[str], nvcc_version: str, source: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(csrc.iterdir()):
        if p.suffix in (".cu", ".cuh", ".h"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(source.name.encode())
    h.update(" ".join(flags).encode())
    h.update(nvcc_version.encode())
    h.update(str(arch).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ parsing

_FAMILY = re.compile(r"(fused_forward|finish_group_norm|finish_norm|grad_pooled_group|"
                     r"grad_pooled|projection_grads|dropout_keep)_kernel")
_DTYPE = [("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("double", "fp64"), ("float", "fp32")]


def classify(symbol: str) -> Tuple[str, str, str]:
    """(kernel family, dtype, engine) of a demangled kernel name."""
    m = _FAMILY.search(symbol)
    family = m.group(1) if m else symbol
    dtype = "-"
    if family != "dropout_keep" and m:
        first = symbol[m.end():].lstrip("<").lstrip()
        dtype = next((d for prefix, d in _DTYPE if first.startswith(prefix)), "-")
    engine = "-"
    em = re.search(r"fbp::(\w+Engine)<", symbol)
    if em:
        name = em.group(1)
        engine = name if name != "FmaEngine" else ENGINE_OF_DTYPE.get(dtype, name)
    return family, dtype, engine


def parse_ptxas(log: str) -> Dict[str, Dict[str, int]]:
    """Per mangled kernel name: registers, stack, spill stores and loads (ptxas -v)."""
    facts: Dict[str, Dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
            facts.setdefault(current, {})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            facts.setdefault(current, {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
        if m:
            facts[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            facts[current]["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            facts[current]["smem"] = int(sm.group(1)) if sm else 0
    return facts


def parse_sass(text: str) -> Dict[str, set]:
    """Per mangled kernel name: the set of SASS opcodes (without modifiers)."""
    ops: Dict[str, set] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            ops[current] = set()
            continue
        if current is None:
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[current].add(m.group(1))
    return ops


def tensor_core_kind(opcodes: set) -> str:
    if "HGMMA" in opcodes:
        return "HGMMA"
    if "HMMA" in opcodes:
        return "HMMA"
    if "DMMA" in opcodes:
        return "DMMA"
    return "none"


def _resource_rows(tool: str, cubin: str) -> Dict[str, Tuple[int, int, int, int]]:
    out = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True,
                         text=True, check=True).stdout
    rows, kernel = {}, None
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"Function\s+(\S+?):?$", line)
        if m:
            kernel = m.group(1)
            continue
        if kernel and line.startswith("REG:"):
            f = dict(re.findall(r"(\w+):(\d+)", line))
            rows[kernel] = (int(f.get("REG", 0)), int(f.get("STACK", 0)),
                            int(f.get("LOCAL", 0)), int(f.get("SHARED", 0)))
            kernel = None
    return rows


def kernel_facts(source: str, arch: int, cubin: str, log: str) -> List[KernelFacts]:
    """Every kernel of one cubin with its facts."""
    tool = cuda_build._find_cuobjdump()
    resources = _resource_rows(tool, cubin)
    sass = parse_sass(subprocess.run([tool, "-sass", cubin], capture_output=True, text=True,
                                     check=True).stdout)
    ptxas = parse_ptxas(log)
    mangled = sorted(resources)
    names = cuda_build._demangle(mangled)
    rows = []
    for raw, symbol in zip(mangled, names):
        regs, stack, local, shared = resources[raw]
        family, dtype, engine = classify(symbol)
        if engine in SM90A_ENGINES and arch != 90:
            continue  # a trap stub (SM90A_ENGINES)
        tile = TILES.get(engine) if family in GEMM_KERNELS else None
        threads = tile.threads if tile else ROW_KERNEL_THREADS.get(family, 0)
        opcodes = sass.get(raw, set())
        info = ptxas.get(raw, {})
        declared = info.get("smem", shared) + DYNAMIC_SMEM_BYTES.get(engine, 0)
        ctas, limit = ctas_per_sm(regs, declared, threads, arch) if threads else (0, "unknown")
        row = KernelFacts(
            kernel=family, arch=arch, dtype=dtype,
            config=engine if engine != "-" else "default", num_warps=-(-threads // 32),
            source=source,
            symbol=symbol, registers=regs, stack_bytes=stack, local_bytes=local,
            shared_bytes=declared, shared_bytes_cuobjdump=shared, spill_stores=info.get("spill_stores", -1),
            spill_loads=info.get("spill_loads", -1), threads=threads,
            tensor_cores=tensor_core_kind(opcodes),
            tma=bool(opcodes & {"UTMALDG", "UBLKCP"}), cp_async="LDGSTS" in opcodes,
            ldmatrix="LDSM" in opcodes, ctas_per_sm=ctas, ctas_limited_by=limit)
        if tile is not None:
            fpb, in_flight = tile_intensity(tile, ELEMENT_BYTES[dtype])
            row.bm, row.bn, row.bk, row.stages = tile.bm, tile.bn, tile.bk, tile.stages
            row.flop_per_byte = round(fpb, 3)
            row.inflight_bytes_per_sm = in_flight * ctas
        if not threads:
            row.ok, row.error = False, f"unknown kernel {symbol!r}: add it to cuda_compile"
        rows.append(row)
    return rows


# ------------------------------------------------------------------ compiling

def _compile_one(nvcc: str, source: Path, arch: int, csrc: Path, cache: Path,
                 use_cache: bool, version: str) -> CompileResult:
    flags = nvcc_flags(arch, csrc)
    key = source_key(csrc, arch, flags, version, source)
    directory = cache / key
    cubin = directory / f"{source.stem}.sm_{arch}.cubin"
    log_path = directory / f"{source.stem}.sm_{arch}.ptxas.txt"
    if use_cache and cubin.exists() and log_path.exists():
        return CompileResult(source.name, arch, True, 0.0, True, log_path.read_text(),
                             str(cubin))
    directory.mkdir(parents=True, exist_ok=True)
    tmp = cubin.with_suffix(f".tmp{os.getpid()}")
    start = time.monotonic()
    proc = subprocess.run([nvcc, *flags, str(source), "-o", str(tmp)], capture_output=True,
                          text=True)
    seconds = time.monotonic() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or not tmp.exists():
        return CompileResult(source.name, arch, False, seconds, False, log)
    os.replace(tmp, cubin)  # atomic: a concurrent report never reads half a cubin
    log_path.write_text(log)
    return CompileResult(source.name, arch, True, seconds, False, log, str(cubin))


def compile_all(archs=ARCHS, csrc: Optional[Path] = None, use_cache: bool = True,
                jobs: Optional[int] = None) -> List[CompileResult]:
    """Compile every ``csrc/*.cu`` for each architecture and collect the facts."""
    missing = missing_tools()
    if missing:
        raise RuntimeError("cannot report CUDA compile facts, missing: " + "; ".join(missing))
    csrc = Path(csrc) if csrc is not None else cuda_build.CSRC
    nvcc = find_nvcc()
    version = _nvcc_version(nvcc)
    cache = cuda_build.cache_root() / "compile"
    sources = sorted(csrc.glob("*.cu"))
    jobs = jobs or int(os.environ.get("MAX_JOBS", "2"))
    tasks = [(s, a) for s in sources for a in archs]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(
            lambda t: _compile_one(nvcc, t[0], t[1], csrc, cache, use_cache, version), tasks))
    for r in results:
        if r.ok:
            try:
                r.kernels = kernel_facts(r.source, r.arch, r.cubin, r.log)
            except (subprocess.CalledProcessError, OSError) as exc:
                r.ok, r.log = False, f"{r.log}\ncuobjdump failed: {exc}"
    return results


def failed_row(res: CompileResult) -> dict:
    """The JSON row of a file that did not compile."""
    return {"kernel": res.source, "arch": res.arch, "dtype": "-", "config": "-",
            "source": res.source, "ok": False, "error": res.log[-4000:]}


def issue12_gaps(rows: List[KernelFacts], training_only: bool = True) -> List[str]:
    """Where the sm_90 fp16/bf16 main loops miss issue 12's thresholds (one line each):
    those of the training engine (TRAINING_ENGINE_OF_DTYPE[90]), or with
    ``training_only=False`` of every engine (the cp.async ones, for rows <= 128 and
    operands TMA cannot read, miss them by design)."""
    gaps = []
    for r in rows:
        if r.arch != 90 or r.kernel not in GEMM_KERNELS or r.dtype not in ("fp16", "bf16"):
            continue
        if training_only and r.config != TRAINING_ENGINE_OF_DTYPE[90].get(r.dtype):
            continue
        misses = []
        if r.tensor_cores != ISSUE12_THRESHOLDS["tensor_cores"]:
            misses.append(f"tensor cores {r.tensor_cores} (wants HGMMA)")
        if not r.tma:
            misses.append("no TMA")
        if r.flop_per_byte is not None and r.flop_per_byte < ISSUE12_THRESHOLDS["flop_per_byte"]:
            misses.append(f"flop_per_byte {r.flop_per_byte:g} < 64")
        if (r.inflight_bytes_per_sm is not None
                and r.inflight_bytes_per_sm < ISSUE12_THRESHOLDS["inflight_bytes_per_sm"]):
            misses.append(f"inflight_bytes_per_sm {r.inflight_bytes_per_sm} < 65536")
        if misses:
            gaps.append(f"{r.kernel} sm_{r.arch} {r.dtype} {r.config}: " + ", ".join(misses))
    return gaps


def format_table(results: List[CompileResult]) -> str:
    head = (f"{'kernel':16} {'arch':>4} {'dtype':5} {'config':17} {'thr':>3} {'regs':>4} "
            f"{'stack':>5} {'spill':>5} {'smem':>6} {'tc':5} {'tma':3} {'cpa':3} "
            f"{'ctas':>4} {'by':9} {'F/B':>6} {'inflight':>8}")
    lines = [head, "-" * len(head)]
    for res in results:
        if not res.ok:
            lines.append(f"{res.source} sm_{res.arch}: FAILED\n{res.log[-2000:]}")
            continue
        for r in sorted(res.kernels, key=lambda r: (r.kernel, r.dtype)):
            fpb = f"{r.flop_per_byte:6.2f}" if r.flop_per_byte is not None else f"{'-':>6}"
            infl = (f"{r.inflight_bytes_per_sm:8d}" if r.inflight_bytes_per_sm is not None
                    else f"{'-':>8}")
            lines.append(
                f"{r.kernel:16} {r.arch:>4} {r.dtype:5} {r.config:17} {r.threads:>3} "
                f"{r.registers:>4} {r.stack_bytes:>5} {r.spill_stores:>5} {r.shared_bytes:>6} "
                f"{r.tensor_cores:5} {'yes' if r.tma else 'no':3} "
                f"{'yes' if r.cp_async else 'no':3} {r.ctas_per_sm:>4} {r.ctas_limited_by:9} "
                f"{fpb} {infl}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows as JSON to this path (a list, one row "
                        "per kernel and architecture, as triton_compile; a file that failed "
                        "to compile is one row with ok false and the compiler's error)")
    parser.add_argument("--csrc", help="source folder (default: the package's csrc/)")
    parser.add_argument("--arch", type=int, action="append",
                        help="architecture, e.g. 80 (repeatable; default 80 and 90)")
    parser.add_argument("--no-cache", action="store_true", help="recompile even if cached")
    args = parser.parse_args(argv)
    start = time.monotonic()
    results = compile_all(tuple(args.arch or ARCHS), args.csrc, use_cache=not args.no_cache)
    wall = time.monotonic() - start
    print(format_table(results))
    rows = [k for r in results for k in r.kernels]
    compile_s = sum(r.seconds for r in results)
    print(f"\n{len(results)} compiles ({sum(r.cached for r in results)} cached), nvcc time "
          f"{compile_s:.1f} s, wall {wall:.1f} s")
    gaps = issue12_gaps(rows)
    others = [g for g in issue12_gaps(rows, training_only=False) if g not in gaps]
    training = [r for r in rows if r.arch == 90 and r.kernel in GEMM_KERNELS
                and r.config == TRAINING_ENGINE_OF_DTYPE[90].get(r.dtype)]
    if 90 in (args.arch or ARCHS) and len(training) != len(GEMM_KERNELS) * len(
            TRAINING_ENGINE_OF_DTYPE[90]):
        gaps.append(f"sm_90 training engine rows missing from the report: {len(training)} "
                    f"of {len(GEMM_KERNELS) * len(TRAINING_ENGINE_OF_DTYPE[90])}")
    if 90 in (args.arch or ARCHS):
        print("\nissue 12 main-loop thresholds, sm_90 training engine ("
              + ", ".join(sorted(set(TRAINING_ENGINE_OF_DTYPE[90].values()))) + "): "
              + ("MISSED" if gaps else "met"))
        print("\n".join("  " + g for g in gaps))
        if others:
            print("the other sm_90 engines (rows <= 128, operands TMA cannot read) miss them:")
            print("\n".join("  " + g for g in others))
    if args.json:
        out = [asdict(k) for k in rows] + [failed_row(r) for r in results if not r.ok]
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    failed = [r for r in results if not r.ok] + [k for k in rows if not k.ok]
    spilled = [k for k in rows if k.stack_bytes > 0 or k.local_bytes > 0 or k.spill_stores > 0]
    if failed:
        print(f"{len(failed)} compiles or kernels FAILED", file=sys.stderr)
    if spilled:
        print(f"{len(spilled)} kernels spill registers", file=sys.stderr)
    if gaps:
        print(f"{len(gaps)} training main loops miss issue 12's thresholds", file=sys.stderr)
    return 1 if failed or spilled or gaps else 0


if __name__ == "__main__":
    sys.exit(main())
