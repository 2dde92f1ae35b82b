"""Compile the Triton kernels for real GPU targets without a GPU, and report resources.

The interpreter never runs Triton's GPU compiler, so a kernel can pass every CPU test
and still fail to compile (layouts, ``tl.dot`` shape or dtype rules) or spill
registers.  This module compiles every kernel, for every tile configuration the
launch heuristic can pick, for sm_80 and sm_90 and for fp32/fp16/bf16, and reads
registers, spill stack and shared memory off each cubin with ``cuobjdump``.

It must run in a process where ``TRITON_INTERPRET`` is unset (``triton.compile``
needs real ``JITFunction`` objects), so tests call it as a subprocess::

    python -m fbp_kernels.backends.triton_compile --json out.json

The exit status is non-zero when a kernel fails to compile or a default
configuration spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List

ARCHS = (80, 90)
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass
class CompileRow:
    kernel: str
    arch: int
    dtype: str
    config: str
    num_warps: int
    registers: int
    stack_bytes: int  # > 0 means register spills (local-memory stack frame)
    shared_bytes: int
    tensor_cores: str  # "wgmma", "mma" or "none", from the PTX
    ok: bool
    error: str = ""


# Arguments that real launches see as multiples of 16 at the MFB default shape (Triton
# specialises such integers and 16-byte-aligned pointers, which enables vectorised and
# asynchronous loads): the compile check must see the same hints.
_ALIGNED = ("M", "N", "stride_xr", "stride_yr", "stride_wxr", "stride_wyr")


def _source(fn, sig: Dict[str, str], consts: Dict[str, object]):
    from triton.compiler import ASTSource

    for k in consts:
        sig[k] = "constexpr"
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, v in sig.items() if v.startswith("*") or k in _ALIGNED}
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def _common_signature(dtype: str) -> Dict[str, str]:
    ptr = f"*{dtype}"
    return {name: ptr for name in ("x_ptr", "y_ptr", "wx_ptr", "wy_ptr", "bx_ptr", "by_ptr")}


def _fwd_source(dtype: str, cfg, precision: str):
    from . import triton_kernels as K

    sig = _common_signature(dtype)
    sig.update({"out_ptr": f"*{dtype}", "t_ptr": "*fp32", "partial_ptr": "*fp32",
                "norm_ptr": "*fp32", "counter_ptr": "*i32", "a_ptr": f"*{dtype}",
                "c_ptr": f"*{dtype}"})
    for name in ("rows", "M", "N", "O", "stride_xr", "stride_yr", "stride_wxr", "stride_wyr",
                 "stride_or", "stride_tr"):
        sig[name] = "i32"
    sig.update({"seed": "i64", "drop_p": "fp32", "keep_scale": "fp32", "eps": "fp32",
                "sqrt_eps": "fp32"})
    consts = {"stride_xk": 1, "stride_yk": 1, "stride_wxk": 1, "stride_wyk": 1,
              "FACTOR": 5, "HAS_BIAS": True, "DROPOUT": True, "NORMALIZE": True,
              "STORE_AC": False, "DOT_FP32": False, "PRECISION": precision,
              "BLOCK_M": cfg.block_m, "BLOCK_O": cfg.block_o, "BLOCK_K": cfg.block_k}
    return _source(K._fbp_fwd_kernel, sig, consts)


def _bwd_source(dtype: str, cfg, precision: str):
    from . import triton_kernels as K

    sig = _common_signature(dtype)
    sig.update({"g_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "norm_ptr": "*fp32",
                "zg_ptr": "*fp32", "a_ptr": f"*{dtype}", "c_ptr": f"*{dtype}",
                "da_ptr": f"*{dtype}", "dc_ptr": f"*{dtype}"})
    for name in ("rows", "M", "N", "O", "stride_xr", "stride_yr", "stride_wxr", "stride_wyr",
                 "stride_gr", "stride_zr"):
        sig[name] = "i32"
    sig.update({"seed": "i64", "drop_p": "fp32", "keep_scale": "fp32", "sqrt_eps": "fp32"})
    consts = {"stride_xk": 1, "stride_yk": 1, "stride_wxk": 1, "stride_wyk": 1,
              "FACTOR": 5, "HAS_BIAS": True, "DROPOUT": True, "NORMALIZE": True,
              "LOAD_AC": False, "DOT_FP32": False, "PRECISION": precision,
              "BLOCK_M": cfg.block_m, "BLOCK_O": cfg.block_o, "BLOCK_K": cfg.block_k}
    return _source(K._fbp_bwd_kernel, sig, consts)


def _row_dot_source(dtype: str, cfg, precision: str):
    from . import triton_kernels as K

    sig = {"z_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "out_ptr": "*fp32", "rows": "i32",
           "O": "i32", "stride_zr": "i32", "stride_gr": "i32"}
    return _source(K._row_dot_kernel, sig, {"BLOCK_M": cfg.block_m, "BLOCK_O": cfg.block_o})


def _mask_source():
    from . import triton_kernels as K

    sig = {"mask_ptr": "*i8", "seed": "i64", "rows": "i32", "KO": "i32", "drop_p": "fp32"}
    bm, bc = K.MASK_BLOCKS
    return _source(K._dropout_mask_kernel, sig, {"BLOCK_M": bm, "BLOCK_C": bc})


def _split_sources(dtype: str, cfg, kernel: str, one_block: bool, broadcast: bool):
    """The split strategy's epilogue kernels (``triton_split``) for one tile."""
    from . import triton_split as E

    if kernel == "split_fwd":
        sig = {"a_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
               "norm_ptr": "*fp32", "rows": "i32", "O": "i32", "row_offset": "i64",
               "D1": "i32", "stride_ar": "i32", "stride_cr": "i32", "stride_or": "i32",
               "a_s0": "i32", "a_s1": "i32", "c_s0": "i32", "c_s1": "i32", "seed": "i64",
               "drop_p": "fp32", "keep_scale": "fp32", "eps": "fp32", "sqrt_eps": "fp32"}
        fn = E._split_fwd_kernel
        consts = {"ONE_BLOCK": one_block}
    else:
        sig = {"g_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "norm_ptr": "*fp32",
               "a_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "da_ptr": f"*{dtype}",
               "dc_ptr": f"*{dtype}", "rows": "i32", "O": "i32", "row_offset": "i64",
               "D1": "i32", "stride_gr": "i32", "stride_zr": "i32", "stride_ar": "i32",
               "stride_cr": "i32", "stride_dar": "i32", "stride_dcr": "i32"}
        sig.update({f"{t}_s{i}": "i32" for t in ("a", "c", "da", "dc") for i in (0, 1)})
        sig.update({"seed": "i64", "drop_p": "fp32", "keep_scale": "fp32", "sqrt_eps": "fp32"})
        fn = E._split_bwd_kernel
        consts = {}
    consts.update({"FACTOR": 5, "DROPOUT": True, "NORMALIZE": True, "BROADCAST": broadcast,
                   "BLOCK_R": cfg.block_r, "BLOCK_O": cfg.block_o, "BLOCK_F": cfg.block_f})
    return _source(fn, sig, consts)


def _wide_source(dtype: str, cfg, factor: int, precision: str):
    """The wide fused forward (``triton_wide``) for one tile and factor."""
    from . import triton_wide as W

    sig = _common_signature(dtype)
    sig["s_ptr"] = "*fp32"
    for name in ("rows", "M", "N", "O", "stride_xr", "stride_yr", "stride_wxr", "stride_wyr",
                 "stride_sr"):
        sig[name] = "i32"
    sig.update({"seed": "i64", "drop_p": "fp32", "keep_scale": "fp32"})
    block_j, block_jp = W.tile_outputs(cfg, factor)
    consts = {"stride_xk": 1, "stride_yk": 1, "stride_wxk": 1, "stride_wyk": 1,
              "FACTOR": factor, "HAS_BIAS": True, "DROPOUT": True, "DOT_FP32": False,
              "PRECISION": precision, "POOL": W.pool_mode(factor), "HALF": dtype != "fp32",
              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_J": block_j,
              "BLOCK_JP": block_jp, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m}
    return _source(W._wide_fwd_kernel, sig, consts)


def _finish_source(dtype: str):
    from . import triton_wide as W

    sig = {"s_ptr": "*fp32", "out_ptr": f"*{dtype}", "norm_ptr": "*fp32", "rows": "i32",
           "O": "i32", "stride_sr": "i32", "stride_or": "i32", "eps": "fp32",
           "sqrt_eps": "fp32"}
    return _source(W._finish_kernel, sig, {"NORMALIZE": True, "BLOCK_R": 1, "BLOCK_O": 1024})


#: Factors the wide forward is compiled for: its three pooling paths (selection product
#: at the MFB default 5, identity at 1, reshape at 2).
WIDE_FACTORS = (5, 1, 2)

#: Epilogue tiles the split launcher picks, by (rows, o, factor, broadcast): the MFB
#: default (one block per row), a wide row (two passes), a narrow one (many rows per
#: program), and co-attention (regions x one question: the int64 row-map path).
SPLIT_SHAPES = {"mfb": (1024, 1000, 5, False), "wide": (1024, 4000, 5, False),
                "narrow": (1024, 16, 5, False), "coatt": (6400, 1000, 5, True),
                "coatt-narrow": (6400, 16, 5, True)}


def _compile_row(triton, target, kernel, arch, dtype, cfg_name, num_warps, num_stages,
                 source_fn) -> CompileRow:
    row = CompileRow(kernel, arch, dtype, cfg_name, num_warps, -1, -1, -1, "none", False)
    try:
        compiled = triton.compile(source_fn(), target=target,
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        res = _resources(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        row.registers = res["registers"]
        row.stack_bytes = res["stack_bytes"]
        row.shared_bytes = compiled.metadata.shared  # dynamic smem
        row.tensor_cores = ("wgmma" if "wgmma" in ptx else
                            "mma" if re.search(r"\bmma\.sync", ptx) else "none")
        row.ok = True
    except Exception as exc:  # report every failure, not just the first
        row.error = f"{type(exc).__name__}: {str(exc)[:500]}"
    return row


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    def grab(key):
        m = re.search(rf"{key}:(\d+)", text)
        return int(m.group(1)) if m else -1
    return {"registers": grab("REG"), "stack_bytes": grab("STACK"), "shared_bytes": grab("SHARED")}


def compile_all(archs=ARCHS, dtypes=tuple(DTYPES)) -> List[CompileRow]:
    import triton
    from triton.backends.compiler import GPUTarget

    from . import triton_kernels as K

    if K.INTERPRET:
        raise RuntimeError("run with TRITON_INTERPRET unset: triton.compile needs JIT kernels")
    rows = []
    precision = "ieee"  # PyTorch's default: no TF32 for fp32 matmuls
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dtype in dtypes:
            family = "fp32" if dtype == "fp32" else "half"
            for cfg_name, cfg in K.CONFIGS[family].items():
                for kernel, make in (("fbp_fwd", _fwd_source), ("fbp_bwd", _bwd_source),
                                     ("row_dot", _row_dot_source)):
                    rows.append(_compile_row(
                        triton, target, kernel, arch, dtype, cfg_name, cfg.num_warps,
                        cfg.num_stages, lambda: make(dtype, cfg, precision)))
            for shape_name, (r, o, f, bc) in SPLIT_SHAPES.items():
                from .triton_split import GPU_TILE_ELEMENTS, pick_epilogue_config

                cfg = pick_epilogue_config(r, o, f, limit=GPU_TILE_ELEMENTS)
                for kernel in ("split_fwd", "split_bwd"):
                    rows.append(_compile_row(
                        triton, target, kernel, arch, dtype, shape_name, cfg.num_warps, 1,
                        lambda: _split_sources(dtype, cfg, kernel, o <= cfg.block_o, bc)))
            from .triton_wide import WIDE_CONFIGS

            wcfg = WIDE_CONFIGS[family]
            for f in WIDE_FACTORS:
                rows.append(_compile_row(
                    triton, target, "wide_fwd", arch, dtype, f"K{f}", wcfg.num_warps,
                    wcfg.num_stages, lambda: _wide_source(dtype, wcfg, f, precision)))
            rows.append(_compile_row(triton, target, "finish", arch, dtype, "default", 4, 1,
                                     lambda: _finish_source(dtype)))
        # The dropout-mask kernel (tests and debugging) has no dtype or tile variants.
        rows.append(_compile_row(triton, target, "mask", arch, "-", "default", 4, 3,
                                 _mask_source))
    return rows


def format_table(rows: List[CompileRow]) -> str:
    head = f"{'kernel':8} {'arch':>4} {'dtype':5} {'config':12} {'warps':>5} {'regs':>4} " \
           f"{'stack':>5} {'smem':>6} {'tensor cores':12} status"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kernel:8} {r.arch:>4} {r.dtype:5} {r.config:12} {r.num_warps:>5} "
                     f"{r.registers:>4} {r.stack_bytes:>5} {r.shared_bytes:>6} "
                     f"{r.tensor_cores:12} {'ok' if r.ok else 'FAILED ' + r.error}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows as JSON to this path")
    args = parser.parse_args(argv)
    rows = compile_all()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    failed = [r for r in rows if not r.ok]
    spilled = [r for r in rows if r.ok and r.stack_bytes > 0]
    if failed:
        print(f"{len(failed)} kernel builds FAILED", file=sys.stderr)
    if spilled:
        print(f"{len(spilled)} kernel builds spill registers", file=sys.stderr)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
