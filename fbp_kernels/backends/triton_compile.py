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
from typing import Dict, List, Optional

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
    tma: bool = False  # TMA bulk tensor copies (cp.async.bulk.tensor) in the PTX
    cp_async: bool = False  # Ampere-style asynchronous copies (cp.async.ca/.cg) in the PTX
    num_stages: int = 0  # software-pipeline stages the build was compiled with
    # Main-loop facts from the tile and loop order (None for kernels without a GEMM loop):
    # FLOP per byte moved from global/L2 into shared memory per k-step of one CTA,
    # 2*BM*BN*BK / ((BM + BN) * BK * elem), and the operand bytes in flight per SM,
    # (stages - 1) k-steps (at least one) times the resident CTAs.
    flop_per_byte: Optional[float] = None
    inflight_bytes_per_sm: Optional[int] = None
    ctas_per_sm: int = 0  # resident CTAs by registers, shared memory, threads, CTA limit


@dataclass(frozen=True)
class MainLoop:
    """The GEMM main loop of a kernel build: tile (BM x BN x BK), pipeline stages and the
    operand element size in bytes."""

    block_m: int
    block_n: int
    block_k: int
    stages: int
    elem_bytes: int

    @property
    def stage_bytes(self) -> int:
        return (self.block_m + self.block_n) * self.block_k * self.elem_bytes

    @property
    def flop_per_byte(self) -> float:
        return 2.0 * self.block_m * self.block_n * self.block_k / self.stage_bytes


#: Per-SM limits by arch: registers, shared memory (bytes), threads, resident CTAs.
SM_LIMITS = {80: (65536, 164 * 1024, 2048, 32), 90: (65536, 228 * 1024, 2048, 32)}


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident CTAs per SM: registers are allocated per warp in units of 256 (per
    thread rounded up to 8); each CTA also reserves 1 KiB of shared memory."""
    regs, smem, threads, max_ctas = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (regs // per_warp) // num_warps if per_warp else max_ctas
    by_smem = smem // (shared_bytes + 1024)
    by_threads = threads // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, max_ctas)


# Arguments that real launches see as multiples of 16 at the MFB default shape (Triton
# specialises such integers and 16-byte-aligned pointers, which enables vectorised and
# asynchronous loads): the compile check must see the same hints.
_ALIGNED = ("M", "N", "stride_xr", "stride_yr", "stride_wxr", "stride_wyr")


def _source(fn, sig: Dict[str, str], consts: Dict[str, object], aligned=_ALIGNED):
    from triton.compiler import ASTSource

    for k in consts:
        sig[k] = "constexpr"
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, v in sig.items() if v.startswith("*") or k in aligned}
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
    sig.update({"seed": "i64", "drop_p": "fp32", "keep_scale": "fp64", "eps": "fp64",
                "sqrt_eps": "fp64"})
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
    sig.update({"seed": "i64", "drop_p": "fp32", "keep_scale": "fp64", "sqrt_eps": "fp64"})
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


def _split_sources(dtype: str, cfg, kernel: str, one_block: bool, broadcast: bool,
                   activation: int = 0, group: bool = False, out_fp32: bool = False):
    """The split strategy's epilogue kernels (``triton_split``) for one tile; with
    ``activation`` / ``group`` (norm_dims > 1) / ``out_fp32`` (the fp32 scratch output a
    joint norm writes for half inputs) the drop-in kernels that carry those options."""
    from . import triton_split as E

    if kernel == "split_fwd":
        sig = {"a_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
               "norm_ptr": "*fp32", "rows": "i32", "O": "i32", "row_offset": "i64",
               "D1": "i32", "stride_ar": "i32", "stride_cr": "i32", "stride_or": "i32",
               "a_s0": "i32", "a_s1": "i32", "c_s0": "i32", "c_s1": "i32", "seed": "i64",
               "drop_p": "fp32", "keep_scale": "fp64", "eps": "fp64", "sqrt_eps": "fp64"}
        if out_fp32:
            sig["out_ptr"] = "*fp32"
        fn = E._split_fwd_dropin_kernel if (activation or out_fp32) else E._split_fwd_kernel
        consts = {"ONE_BLOCK": one_block}
        if fn is E._split_fwd_dropin_kernel:
            consts["ACTIVATION"] = activation
    else:
        sig = {"g_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "norm_ptr": "*fp32",
               "a_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "da_ptr": f"*{dtype}",
               "dc_ptr": f"*{dtype}", "rows": "i32", "O": "i32", "row_offset": "i64",
               "D1": "i32", "stride_gr": "i32", "stride_zr": "i32", "stride_ar": "i32",
               "stride_cr": "i32", "stride_dar": "i32", "stride_dcr": "i32"}
        sig.update({f"{t}_s{i}": "i32" for t in ("a", "c", "da", "dc") for i in (0, 1)})
        sig.update({"seed": "i64", "drop_p": "fp32", "keep_scale": "fp64", "sqrt_eps": "fp64"})
        dropin = activation or group
        fn = E._split_bwd_dropin_kernel if dropin else E._split_bwd_kernel
        consts = {"ACTIVATION": activation, "GROUP_ZG": group} if dropin else {}
    consts.update({"FACTOR": 5, "DROPOUT": True, "NORMALIZE": True, "BROADCAST": broadcast,
                   "BLOCK_R": cfg.block_r, "BLOCK_O": cfg.block_o, "BLOCK_F": cfg.block_f})
    return _source(fn, sig, consts)


def _wide_source(dtype: str, cfg, factor: int, precision: str, desc: bool = False,
                 shared: bool = False, aligned_strides: bool = True, **overrides):
    """The wide fused forward (``triton_wide``) for one tile and factor; ``desc``: x, y
    and the weights as TMA tensor descriptors (the launcher's choice for aligned,
    unit-stride operands on sm_90); ``shared``: co-attention (C read per group);
    ``aligned_strides=False``: no multiple-of-16 hints on the row strides (sm_90's
    pointer fallback, which runs for operands TMA cannot read, typically rows that are
    not 16-byte aligned)."""
    from . import triton_wide as W

    sig = _common_signature(dtype)
    if desc:
        sig = {"x_src": f"tensordesc<{dtype}[{cfg.block_m},{cfg.block_k}]>",
               "y_src": f"tensordesc<{dtype}[{cfg.block_m},{cfg.block_k}]>",
               "wx_src": f"tensordesc<{dtype}[{cfg.block_n},{cfg.block_k}]>",
               "wy_src": f"tensordesc<{dtype}[{cfg.block_n},{cfg.block_k}]>",
               "bx_ptr": f"*{dtype}", "by_ptr": f"*{dtype}"}
    else:
        sig = {k.replace("_ptr", "_src") if k[0] in "xyw" else k: v for k, v in sig.items()}
    sig["s_ptr"] = "*fp32"
    for name in ("rows", "M", "N", "O", "stride_xr", "stride_yr", "stride_wxr", "stride_wyr",
                 "stride_sr"):
        sig[name] = "i32"
    sig.update({"seed": "i64", "drop_p": "fp32", "keep_scale": "fp64", "ps_ptr": f"*{dtype}",
                "group_r": "i32", "prev_ptr": f"*{dtype}", "chain_ptr": f"*{dtype}"})
    block_j, block_jp = W.tile_outputs(cfg, factor)
    consts = {"stride_xk": 1, "stride_yk": 1, "stride_wxk": 1, "stride_wyk": 1,
              "FACTOR": factor, "HAS_BIAS": True, "DROPOUT": True, "DOT_FP32": False,
              "PRECISION": precision, "POOL": W.pool_mode(factor), "HALF": dtype != "fp32",
              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_J": block_j,
              "BLOCK_JP": block_jp, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
              "X_DESC": desc, "W_DESC": desc, "ACTIVATION": 0, "IDX64": False,
              "SHARED": shared, "PREV": False, "CHAIN": False, **overrides}
    aligned = _ALIGNED if aligned_strides else tuple(a for a in _ALIGNED if "stride" not in a)
    return _source(W._wide_fwd_kernel, sig, consts, aligned)


def _wide_bwd_source(dtype: str, cfg, factor: int, precision: str, desc: bool = False,
                     activation: int = 0, act_pass: int = 0, shared: bool = False,
                     **overrides):
    """One pass of the wide backward (``triton_wide._wide_grad_kernel``): one input and
    one weight (TMA descriptors with ``desc``), ``activation``/``act_pass`` as the
    launcher passes them (0/0 without an activation, else pass 1 or 2); ``shared``: the
    co-attention pass reading the shared projection per group."""
    from . import triton_wide as W

    if desc:
        sig = {"in_src": f"tensordesc<{dtype}[{cfg.block_m},{cfg.block_k}]>",
               "w_src": f"tensordesc<{dtype}[{cfg.block_n},{cfg.block_k}]>"}
    else:
        sig = {name: f"*{dtype}" for name in ("in_src", "w_src")}
    sig.update({"b_ptr": f"*{dtype}", "ds_ptr": "*fp32", "other_ptr": f"*{dtype}",
                "this_ptr": f"*{dtype}"})
    for name in ("rows", "WIDTH", "O", "stride_ir", "stride_wr", "stride_dr"):
        sig[name] = "i32"
    sig.update({"seed": "i64", "drop_p": "fp32", "keep_scale": "fp64", "ps_ptr": f"*{dtype}",
                "group_r": "i32", "carry_ptr": f"*{dtype}", "prev_ptr": f"*{dtype}",
                "next_ptr": f"*{dtype}"})
    block_j, block_jp = W.tile_outputs(cfg, factor)
    consts = {"stride_ik": 1, "stride_wk": 1, "FACTOR": factor, "HAS_BIAS": True,
              "DROPOUT": True, "DOT_FP32": False, "PRECISION": precision,
              "POOL": W.pool_mode(factor), "HALF": dtype != "fp32", "BLOCK_M": cfg.block_m,
              "BLOCK_N": cfg.block_n, "BLOCK_J": block_j, "BLOCK_JP": block_jp,
              "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "X_DESC": desc,
              "W_DESC": desc, "ACTIVATION": activation, "ACT_PASS": act_pass, "IDX64": False,
              "SHARED": shared, "CARRY": False, "PREV": False, "NEXT": 0, **overrides}
    return _source(W._wide_grad_kernel, sig, consts)


def _grad_pooled_source(dtype: str, group: bool = False):
    from . import triton_wide as W

    sig = {"g_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "norm_ptr": "*fp32", "zg_ptr": "*fp32",
           "ds_ptr": "*fp32", "O": "i32", "stride_gr": "i32", "stride_zr": "i32",
           "stride_dr": "i32", "sqrt_eps": "fp64"}
    return _source(W._grad_pooled_kernel, sig, {"GROUP_ZG": group, "BLOCK_O": 1024})


def _finish_source(dtype: str):
    from . import triton_wide as W

    sig = {"s_ptr": "*fp32", "out_ptr": f"*{dtype}", "norm_ptr": "*fp32", "rows": "i32",
           "O": "i32", "stride_sr": "i32", "stride_or": "i32", "eps": "fp64",
           "sqrt_eps": "fp64"}
    return _source(W._finish_kernel, sig, {"NORMALIZE": True, "BLOCK_R": 1, "BLOCK_O": 1024})


#: Factors the wide forward is compiled for: its three pooling paths (selection product
#: at the MFB default 5, identity at 1, reshape at 2).
WIDE_FACTORS = (5, 1, 2)

#: The split epilogue's drop-in builds: (tag, kernel, ACTIVATION, GROUP_ZG, fp32 output).
SPLIT_DROPIN_VARIANTS = (
    ("relu", "split_fwd", 1, False, False), ("tanh", "split_fwd", 2, False, False),
    ("f32out", "split_fwd", 0, False, True), ("tanh-f32out", "split_fwd", 2, False, True),
    ("relu", "split_bwd", 1, False, False), ("tanh", "split_bwd", 2, False, False),
    ("group", "split_bwd", 0, True, False), ("relu-group", "split_bwd", 1, True, False),
    ("tanh-group", "split_bwd", 2, True, False),
)

#: Epilogue tiles the split launcher picks, by (rows, o, factor, broadcast): the MFB
#: default (one block per row), a wide row (two passes), a narrow one (many rows per
#: program), and co-attention (regions x one question: the int64 row-map path).
SPLIT_SHAPES = {"mfb": (1024, 1000, 5, False), "wide": (1024, 4000, 5, False),
                "narrow": (1024, 16, 5, False), "coatt": (6400, 1000, 5, True),
                "coatt-narrow": (6400, 16, 5, True)}


_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def wide_builds(arch: int, dtype: str):
    """``(config name, WideConfig, factor, descriptors?, shared?)`` of the wide forward
    that the launcher can run on ``arch``: every pooling path (``WIDE_FACTORS``), through
    TMA descriptors where the config uses them, plus the pointer fallback for operands
    that do not qualify (``triton_wide.descriptor_ok``), the small-batch tiles where they
    differ (``triton_wide.SMALL_ROWS``, ``TINY_ROWS``), and co-attention (C read per
    group)."""
    import torch

    from . import triton_wide as W

    tdt, cap = getattr(torch, _TORCH_DTYPES[dtype]), (arch // 10, arch % 10)
    cfg = W.WIDE_CONFIGS[W.config_family(tdt, cap)]
    small = W.WIDE_CONFIGS[W.config_family(tdt, cap, rows=W.SMALL_ROWS)]
    tiny = W.WIDE_CONFIGS[W.config_family(tdt, cap, rows=1)]
    f0 = WIDE_FACTORS[0]
    tag = "-tma" if cfg.tma else ""
    builds = [(f"K{f}{tag}", cfg, f, cfg.tma, False) for f in WIDE_FACTORS]
    if cfg.tma:  # the pointer fallback's own tile (triton_wide.forward_config)
        ptr = W.WIDE_CONFIGS[W.config_family(tdt, cap, descriptors=False)]
        builds.append((f"K{f0}-ptr", ptr, f0, False, False))
    builds.append((f"K{f0}-coatt{tag}", cfg, f0, cfg.tma, True))
    if small != cfg:
        builds.append((f"K{f0}-small", small, f0, small.tma, False))
    if tiny not in (cfg, small):
        builds.append((f"K{f0}-tiny", tiny, f0, tiny.tma, False))
    return builds


def wide_fwd_act_builds(arch: int, dtype: str):
    """``(config name, WideConfig, descriptors?, ACTIVATION)`` of the wide forward with a
    projection activation (tanh: the one with more live temporaries) at the training
    tile, factor 5."""
    import torch

    from . import triton_wide as W

    tdt, cap = getattr(torch, _TORCH_DTYPES[dtype]), (arch // 10, arch % 10)
    cfg = W.WIDE_CONFIGS[W.config_family(tdt, cap)]
    return [(f"K{WIDE_FACTORS[0]}-tanh" + ("-tma" if cfg.tma else ""), cfg, cfg.tma, 2)]


#: The activation builds of the wide backward: (tag, ACTIVATION, ACT_PASS) at factors 5
#: and 1 (pass 2, which reads and writes both buffers, is the heaviest; factor 1's
#: unpooled ds tile is the widest).
WIDE_BWD_ACT_VARIANTS = (("relu1", 1, 1), ("relu2", 1, 2), ("tanh2", 2, 2))
WIDE_BWD_ACT_FACTORS = (5, 1)


def wide_bwd_builds(arch: int, dtype: str):
    """The wide backward's builds, ``(config name, WideConfig, factor, descriptors?,
    activation, act_pass)``: every pooling path, TMA where its config uses it, the
    pointer fallback (at its own tile, ``bwd_config_family``), and on sm_90 the
    activation tile (``WIDE_BWD_ACT_VARIANTS``)."""
    import torch

    from . import triton_wide as W

    tdt, cap = getattr(torch, _TORCH_DTYPES[dtype]), (arch // 10, arch % 10)
    cfg = W.WIDE_BWD_CONFIGS[W.bwd_config_family(tdt, cap)]
    f0 = WIDE_FACTORS[0]
    tag = "-tma" if cfg.tma else ""
    builds = [(f"K{f}{tag}", cfg, f, cfg.tma, 0, 0, False) for f in WIDE_FACTORS]
    if cfg.tma:
        ptr_cfg = W.WIDE_BWD_CONFIGS[W.bwd_config_family(tdt, cap, descriptors=False)]
        builds.append((f"K{f0}-ptr", ptr_cfg, f0, False, 0, 0, False))
    # Co-attention's shared pass (its projection read per group: no main loop, so no
    # matrix instruction, no TMA copy and no FLOP per byte; named without "-tma").
    builds.append((f"K{f0}-coatt", cfg, f0, cfg.tma, 0, 0, True))
    act_cfg = W.WIDE_BWD_CONFIGS[W.bwd_config_family(tdt, cap, "relu")]
    builds += [(f"K{f}-{name}" + ("-tma" if act_cfg.tma else ""), act_cfg, f, act_cfg.tma,
                act, ap, False)
               for f in WIDE_BWD_ACT_FACTORS for name, act, ap in WIDE_BWD_ACT_VARIANTS]
    return builds


#: MFH's builds of the wide kernels (:mod:`triton_mfh`): (kernel, tag, activation,
#: constexprs).  The forward multiplies the previous block's product in and stores its
#: own (``PREV``, ``CHAIN``); the backward's two passes carry the later blocks' gradient
#: (``CARRY``, ``PREV``, ``NEXT`` 1 or 2); pass 2 with an activation reads and writes the
#: most.  At the MFB default factor, on the training tiles.
MFH_VARIANTS = (
    ("wide_fwd", "mfh", None, {"PREV": True, "CHAIN": True}),
    ("wide_fwd", "mfh-tiny", None, {"PREV": True, "CHAIN": True}),
    ("wide_fwd", "mfh-small", None, {"PREV": True, "CHAIN": True}),
    ("wide_fwd", "tanh-mfh", None, {"PREV": True, "CHAIN": True, "ACTIVATION": 2}),
    ("wide_bwd", "mfh1", None, {"CARRY": True, "PREV": True, "NEXT": 1}),
    ("wide_bwd", "mfh2", None, {"CARRY": True, "PREV": True, "NEXT": 2, "ACT_PASS": 0}),
    ("wide_bwd", "relu2-mfh", "relu", {"CARRY": True, "PREV": True, "NEXT": 2,
                                       "ACTIVATION": 1, "ACT_PASS": 2}),
    # co-attention: the shared side's projection read per group (the backward's pass 1
    # then has no main loop: no "-tma" in its name)
    ("wide_fwd", "coatt-mfh", None, {"PREV": True, "CHAIN": True, "SHARED": True}),
    ("wide_bwd", "coatt-mfh1", None, {"CARRY": True, "PREV": True, "NEXT": 1,
                                      "SHARED": True}),
)


def mfh_builds(arch: int, dtype: str):
    """``(kernel, config name, WideConfig, descriptors?, constexpr overrides)`` of MFH's
    builds (``MFH_VARIANTS``) at the tiles its launchers pick for a training batch (the
    chained tiles), and the forward's small-batch tiles for half precision where they
    differ (rows <= TINY_ROWS, and rows <= SMALL_ROWS on sm_90)."""
    import torch

    from . import triton_wide as W

    tdt, cap = getattr(torch, _TORCH_DTYPES[dtype]), (arch // 10, arch % 10)
    f0 = WIDE_FACTORS[0]
    builds = []
    for kernel, tag, act, consts in MFH_VARIANTS:
        if tag.endswith(("-tiny", "-small")):
            if dtype == "fp32":
                continue  # fp32 has one tile for every row count
            rows = 1 if tag.endswith("-tiny") else W.SMALL_ROWS
            cfg = W.WIDE_CONFIGS[W.config_family(tdt, cap, rows=rows, chained=True)]
            if tag.endswith("-small") and \
                    cfg == W.WIDE_CONFIGS[W.config_family(tdt, cap, chained=True)]:
                continue  # sm_80: the training tile already
        elif kernel == "wide_fwd":
            cfg = W.WIDE_CONFIGS[W.config_family(tdt, cap, chained=True)]
        else:
            cfg = W.WIDE_BWD_CONFIGS[W.bwd_config_family(tdt, cap, act, chained=True)]
        loop_free = kernel == "wide_bwd" and consts.get("SHARED", False)
        builds.append((kernel, f"K{f0}-{tag}" + ("-tma" if cfg.tma and not loop_free else ""),
                       cfg, cfg.tma, consts))
    return builds


#: Kernels launched with ``triton_kernels.one_cta_registers`` (``maxnreg``): compiled
#: with it here too, so the report describes what runs.
BOUNDED_KERNELS = ("fbp_fwd", "split_fwd", "mask")


def _compile_row(triton, target, kernel, arch, dtype, cfg_name, num_warps, num_stages,
                 source_fn, loop: Optional[MainLoop] = None) -> CompileRow:
    row = CompileRow(kernel, arch, dtype, cfg_name, num_warps, -1, -1, -1, "none", False)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if kernel in BOUNDED_KERNELS:
        options["maxnreg"] = min(255, 65536 // (32 * num_warps))
    try:
        compiled = triton.compile(source_fn(), target=target, options=options)
        res = _resources(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        row.registers = res["registers"]
        row.stack_bytes = res["stack_bytes"]
        row.shared_bytes = compiled.metadata.shared  # dynamic smem
        row.tensor_cores = ("wgmma" if "wgmma" in ptx else
                            "mma" if re.search(r"\bmma\.sync", ptx) else "none")
        row.tma = "cp.async.bulk.tensor" in ptx
        row.cp_async = re.search(r"\bcp\.async\.c[ag]\b", ptx) is not None
        row.num_stages = num_stages
        row.ctas_per_sm = ctas_per_sm(arch, row.registers, num_warps, row.shared_bytes)
        if loop is not None:
            row.flop_per_byte = round(loop.flop_per_byte, 2)
            row.inflight_bytes_per_sm = max(1, loop.stages - 1) * loop.stage_bytes * \
                row.ctas_per_sm
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
    elem = {"fp32": 4, "fp16": 2, "bf16": 2}
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dtype in dtypes:
            family = "fp32" if dtype == "fp32" else "half"
            for cfg_name, cfg in K.CONFIGS[family].items():
                # The first kernel's main loop: one (BM x BO) GEMM loop per factor group.
                loop = MainLoop(cfg.block_m, cfg.block_o, cfg.block_k, cfg.num_stages,
                                elem[dtype])
                for kernel, make in (("fbp_fwd", _fwd_source), ("fbp_bwd", _bwd_source),
                                     ("row_dot", _row_dot_source)):
                    rows.append(_compile_row(
                        triton, target, kernel, arch, dtype, cfg_name, cfg.num_warps,
                        cfg.num_stages, lambda: make(dtype, cfg, precision),
                        loop if kernel != "row_dot" else None))
            for shape_name, (r, o, f, bc) in SPLIT_SHAPES.items():
                from .triton_split import GPU_TILE_ELEMENTS, pick_epilogue_config

                cfg = pick_epilogue_config(r, o, f, limit=GPU_TILE_ELEMENTS)
                for kernel in ("split_fwd", "split_bwd"):
                    rows.append(_compile_row(
                        triton, target, kernel, arch, dtype, shape_name, cfg.num_warps, 1,
                        lambda: _split_sources(dtype, cfg, kernel, o <= cfg.block_o, bc)))
            # The drop-in variants (activation, joint norm) at the MFB default shape and at
            # the co-attention shape (the tightest for the grouped backward).
            for shape_name in ("mfb", "coatt"):
                r, o, f, bc = SPLIT_SHAPES[shape_name]
                from .triton_split import GPU_TILE_ELEMENTS, pick_epilogue_config

                for tag, kernel, act, group, f32 in SPLIT_DROPIN_VARIANTS:
                    if f32 and dtype == "fp32":
                        continue
                    cfg = pick_epilogue_config(r, o, f, limit=GPU_TILE_ELEMENTS,
                                               activation=(None, "relu", "tanh")[act])
                    rows.append(_compile_row(
                        triton, target, kernel, arch, dtype, f"{shape_name}-{tag}",
                        cfg.num_warps, 1,
                        lambda: _split_sources(dtype, cfg, kernel, o <= cfg.block_o, bc,
                                               act, group, f32)))
            for cfg_name, wcfg, f, desc, act, ap, sh in wide_bwd_builds(arch, dtype):
                rows.append(_compile_row(
                    triton, target, "wide_bwd", arch, dtype, cfg_name, wcfg.num_warps,
                    wcfg.num_stages,
                    lambda: _wide_bwd_source(dtype, wcfg, f, precision, desc, act, ap, sh),
                    None if sh else MainLoop(wcfg.block_m, wcfg.block_n, wcfg.block_k,
                                             wcfg.num_stages, elem[dtype])))
            rows.append(_compile_row(triton, target, "grad_pool", arch, dtype, "default", 4, 1,
                                     lambda: _grad_pooled_source(dtype)))
            for cfg_name, wcfg, f, desc, sh in wide_builds(arch, dtype):
                rows.append(_compile_row(
                    triton, target, "wide_fwd", arch, dtype, cfg_name, wcfg.num_warps,
                    wcfg.num_stages,
                    lambda: _wide_source(dtype, wcfg, f, precision, desc, sh,
                                         aligned_strides=not cfg_name.endswith("-ptr")),
                    MainLoop(wcfg.block_m, wcfg.block_n, wcfg.block_k, wcfg.num_stages,
                             elem[dtype])))
            rows.append(_compile_row(triton, target, "finish", arch, dtype, "default", 4, 1,
                                     lambda: _finish_source(dtype)))
            for cfg_name, wcfg, desc, act in wide_fwd_act_builds(arch, dtype):
                rows.append(_compile_row(
                    triton, target, "wide_fwd", arch, dtype, cfg_name, wcfg.num_warps,
                    wcfg.num_stages,
                    lambda: _wide_source(dtype, wcfg, WIDE_FACTORS[0], precision, desc,
                                         ACTIVATION=act),
                    MainLoop(wcfg.block_m, wcfg.block_n, wcfg.block_k, wcfg.num_stages,
                             elem[dtype])))
            for kernel, cfg_name, wcfg, desc, consts in mfh_builds(arch, dtype):
                make = _wide_source if kernel == "wide_fwd" else _wide_bwd_source
                rows.append(_compile_row(
                    triton, target, kernel, arch, dtype, cfg_name, wcfg.num_warps,
                    wcfg.num_stages,
                    lambda: make(dtype, wcfg, WIDE_FACTORS[0], precision, desc, **consts),
                    None if kernel == "wide_bwd" and consts.get("SHARED") else
                    MainLoop(wcfg.block_m, wcfg.block_n, wcfg.block_k, wcfg.num_stages,
                             elem[dtype])))
        # The dropout-mask kernel (tests and debugging) has no dtype or tile variants.
        rows.append(_compile_row(triton, target, "mask", arch, "-", "default", 4, 3,
                                 _mask_source))
    return rows


def format_table(rows: List[CompileRow]) -> str:
    head = f"{'kernel':9} {'arch':>4} {'dtype':5} {'config':12} {'warps':>5} {'regs':>4} " \
           f"{'stack':>5} {'smem':>6} {'tc':5} {'tma':3} {'cta/sm':>6} {'flop/B':>6} " \
           f"{'inflight':>8} status"
    lines = [head, "-" * len(head)]
    for r in rows:
        fpb = f"{r.flop_per_byte:.1f}" if r.flop_per_byte is not None else "-"
        infl = f"{r.inflight_bytes_per_sm // 1024}K" if r.inflight_bytes_per_sm else "-"
        lines.append(f"{r.kernel:9} {r.arch:>4} {r.dtype:5} {r.config:12} {r.num_warps:>5} "
                     f"{r.registers:>4} {r.stack_bytes:>5} {r.shared_bytes:>6} "
                     f"{r.tensor_cores:5} {'yes' if r.tma else 'no':3} {r.ctas_per_sm:>6} "
                     f"{fpb:>6} {infl:>8} {'ok' if r.ok else 'FAILED ' + r.error}")
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
