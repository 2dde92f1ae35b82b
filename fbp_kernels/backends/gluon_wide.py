"""The wide forward's main loop warp-specialised, in Gluon (sm_90, half precision).

Why (PERFORMANCE.md, design 3; the cost model's ``model.py --targets``): the Triton
wide forward (:mod:`triton_wide`) already reads x and y once per tile, but its main loop
is Triton's software pipeline: every warp both issues the TMA loads and waits on the
wgmma, with a barrier per k-step, and the model assumes 0.55 of the tensor peak for it.
The forward at rows >= 1024 reaches 1.15x the two-GEMM floor only at 0.80-0.86 of peak,
what cuBLAS-class loops reach (0.79 of peak measured for cuBLAS on this workplace's
H200).  Those loops are warp-specialised: one producer warp only issues TMA copies into a
ring of shared-memory stages and the consumer warpgroups only issue wgmma, each side
waiting on the other through mbarriers, with one wgmma kept in flight.  Triton's own
``warp_specialize=True`` is ignored on sm_90 (PERFORMANCE.md), so this loop is written in
Gluon, which Triton 3.6 (the GPU machine's version) and the dev Triton both ship.

The kernel computes what :func:`triton_wide._wide_fwd_kernel` computes for the plain
FBP forward (bias, no activation, no dropout, no co-attention or MFH chaining): for a
tile of ``BLOCK_M`` rows x ``BLOCK_J`` outputs (``BLOCK_N >= BLOCK_J * K`` contiguous
projected columns, the Triton kernel's tile: :func:`triton_wide.tile_outputs`),

    A = x @ Wx[cols]^T + bx (rounded to the input dtype, as eager rounds it),
    C = y @ Wy[cols]^T + by,  p = A * C,  s[:, j] = sum_i p[:, j*K + i]

into the fp32 scratch ``s``, which :func:`triton_wide.finish_rows` finishes (signed
square root, row norm) as for the Triton kernel.  Both projections stream through one
ring: the producer loads (x, Wx) tiles for ceil(m / BLOCK_K) steps, then (y, Wy) tiles
for ceil(n / BLOCK_K); the consumer accumulates A, parks it, then accumulates C.

Pooling by a factor that is not a power of two is one small wgmma with the 0/1 selection
matrix ``S[c, j] = (c // K == j)`` (in shared memory, built once per program), p split
into bf16 ``hi + lo`` parts (16 significant bits: ~1e-5 relative, far below the half
outputs' rounding), for every K > 1 (one code path; 2 x 128 x 128 x 32 MACs per tile
against 128 x 128 x (m + n) for the main loops, 2% at the MFB default).

The tile is the Triton kernel's 128 x 128 (64 FLOP per L2 byte), which the cost model
puts L2-bound at rows >= 1024 (provider ``fused-ws``: 7.7 TB/s x 64 = 0.50 of peak, below
this loop's assumed 0.68), so it gains where the Triton loop was compute-bound (rows
256-1024) and the next step is 128 x 256 (85 FLOP/B).  Tried (2026-12-05), not shipped:
A parked in registers beside a 128 x 256 accumulator spilled 776-888 B; accumulators as
two 128-column halves with A parked in shared memory (3 stages of 48 KiB + 64 KiB) were
spill-free at factors 1, 4 and 16 with Triton 3.6 but spilled 544-576 B at factors 5 and
7 (with the pooling operands in shared memory too, and not from the selection matrix),
and Triton 3.8 refuses ``_reinterpret`` of a sliced view (the hi parts over A's halves).
Then, with the accumulators starting at the bias, only the second half's columns masked
(past K*o TMA and the masked bias give 0), A parked as a (2, 128, 128) buffer and the
pooling operands (hi/lo parts in the input dtype, the selection matrix) written into A's
halves and the weight stages: no spills with Triton 3.8 at factors 1, 4, 5, 7, 16 B at
factor 5 with Triton 3.6.  Not finished because the model says it would not pay:
``fused-ws`` at 128 x 256 x 64 / 3 stages predicts 90 us at rows 1024 (48 outputs per
tile: 1.27 waves), 261 us at 4096 and 923 us at 16384 (1.74 / 1.56 / 1.41x the floor)
against split's 57 / 206 / 799 us (H200, bf16, MFB default).  A fused loop beats split
only near cuBLAS's own efficiency (0.80-0.86 of peak, ``model.py --targets``) with a
persistent schedule; a warp-specialised Triton loop is assumed at 0.68.

Status: compiled for sm_90 with both Triton versions in CI (tests/test_gluon_wide.py:
wgmma, TMA, the producer/consumer split as ``setmaxnreg``, no spills); Gluon has no
interpreter, so it has never run: it is opt-in (``FBP_WIDE_ENGINE=gluon``) and its GPU
test compares it with the reference and with the Triton kernel on the first GPU.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

from ._common import WIDE_ENGINE_ENV

#: The opt-in switch (read per call): ``gluon`` runs this kernel wherever it applies
#: (:func:`applies`), anything else the Triton kernel.
ENGINE_ENV = WIDE_ENGINE_ENV


@gluon.constexpr_function
def _mma_layout(num_warps, n):
    """wgmma accumulator layout: warpgroups stacked along the rows (m64 per warpgroup),
    instruction ``m16 x n x k16`` (half precision)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                     instr_shape=[16, n, 16])


#: The producer warp's registers (setmaxnreg): it holds a few scalars.
LOAD_REGS = gl.constexpr(40)


# ----------------------------------------------------------------------------- kernel


@gluon.jit
def _load_operand(in_desc, w_desc, in_bufs, w_bufs, ready, empty, it, row0, col0, width,
                  BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """One projection's (input, weight) tiles over ``width`` into the ring, from step
    ``it`` on.  A stage is refilled once the consumer has released it (``empty``; a
    fresh mbarrier counts as having completed phase 1, so the first pass does not wait)."""
    nbytes: gl.constexpr = in_desc.block_type.nbytes + w_desc.block_type.nbytes
    for k in range(0, width, BLOCK_K):
        idx = it % STAGES
        mbarrier.wait(empty.index(idx), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(idx), nbytes)
        tma.async_copy_global_to_shared(in_desc, [row0, k], ready.index(idx), in_bufs.index(idx))
        tma.async_copy_global_to_shared(w_desc, [col0, k], ready.index(idx), w_bufs.index(idx))
        it += 1
    return it


@gluon.jit
def _load_partition(x_desc, y_desc, wx_desc, wy_desc, in_bufs, w_bufs, ready, empty,
                    row0, col0, M, N, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """The producer warp: (x, Wx) tiles over m, then (y, Wy) tiles over n."""
    it = _load_operand(x_desc, wx_desc, in_bufs, w_bufs, ready, empty, gl.to_tensor(0),
                       row0, col0, M, BLOCK_K, STAGES)
    _load_operand(y_desc, wy_desc, in_bufs, w_bufs, ready, empty, it, row0, col0, N,
                  BLOCK_K, STAGES)


@gluon.jit
def _consume(acc, in_bufs, w_bufs, ready, empty, it, width, BLOCK_K: gl.constexpr,
             STAGES: gl.constexpr):
    """``acc += in @ w^T`` over ``width`` from the ring, one wgmma in flight: a stage is
    released once the wgmma after it has been issued and the one reading it retired."""
    for k in range(0, width, BLOCK_K):
        idx = it % STAGES
        mbarrier.wait(ready.index(idx), (it // STAGES) & 1)
        acc = warpgroup_mma(in_bufs.index(idx), w_bufs.index(idx).permute((1, 0)), acc,
                            is_async=True)
        acc, _, _ = warpgroup_mma_wait(num_outstanding=1,
                                       deps=(acc, in_bufs.index(idx), w_bufs.index(idx)))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1, pred=k > 0)
        it += 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1)
    return acc, it


@gluon.jit
def _compute_partition(in_bufs, w_bufs, ready, empty, bx_ptr, by_ptr, s_ptr, rows, M, N, O,
                       stride_sr, row0, j0, col0, FACTOR: gl.constexpr,
                       HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, BLOCK_J: gl.constexpr,
                       BLOCK_JP: gl.constexpr, BLOCK_K: gl.constexpr,
                       STAGES: gl.constexpr, num_warps: gl.constexpr):
    """The consumer warpgroups: both main loops, the product and the pooled store."""
    in_dtype: gl.constexpr = in_bufs.dtype
    acc_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    n_ok = (cols < BLOCK_J * FACTOR) & (cols < (O - j0) * FACTOR)

    acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
    acc, it = _consume(acc, in_bufs, w_bufs, ready, empty, gl.to_tensor(0), M,
                       BLOCK_K, STAGES)
    if HAS_BIAS:
        acc += gl.load(bx_ptr + col0 + cols, mask=n_ok, other=0.0).to(gl.float32)[None, :]
    # Parked in the input dtype while C accumulates (eager rounds A the same way).
    a = acc.to(in_dtype)
    acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
    acc, it = _consume(acc, in_bufs, w_bufs, ready, empty, it, N, BLOCK_K, STAGES)
    if HAS_BIAS:
        acc += gl.load(by_ptr + col0 + cols, mask=n_ok, other=0.0).to(gl.float32)[None, :]
    p = gl.where(n_ok[None, :], a.to(gl.float32) * acc, 0.0)

    if FACTOR == 1:
        s = p
        s_layout: gl.constexpr = acc_layout
    else:
        s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_JP)
        sel_layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        cc = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, sel_layout))
        jj = gl.arange(0, BLOCK_JP, layout=gl.SliceLayout(0, sel_layout))
        sel = ((cc[:, None] // FACTOR) == jj[None, :]).to(gl.bfloat16)
        sel_smem = gl.allocate_shared_memory(
            gl.bfloat16, [BLOCK_N, BLOCK_JP],
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_JP], gl.bfloat16), sel)
        fence_async_shared()  # generic-proxy store, read by the wgmma (async proxy)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout,
                                                      k_width=2)
        hi = p.to(gl.bfloat16)
        lo = (p - hi.to(gl.float32)).to(gl.bfloat16)
        s = gl.zeros((BLOCK_M, BLOCK_JP), gl.float32, s_layout)
        s = warpgroup_mma(gl.convert_layout(hi, op_layout), sel_smem, s)
        s = warpgroup_mma(gl.convert_layout(lo, op_layout), sel_smem, s)

    rr = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    jc = gl.arange(0, BLOCK_JP, layout=gl.SliceLayout(0, s_layout))
    j_ok = (jc < BLOCK_J) & (jc < O - j0)
    # int64 row origin (rows * o may pass 2^31), int32 in-tile offsets.
    base = s_ptr + row0.to(gl.int64) * stride_sr + j0
    gl.store(base + rr[:, None] * stride_sr + jc[None, :], s,
             mask=(rr < rows - row0)[:, None] & j_ok[None, :])


@gluon.jit
def _gluon_wide_fwd_kernel(x_desc, y_desc, wx_desc, wy_desc, bx_ptr, by_ptr, s_ptr,
                           rows, M, N, O, stride_sr,
                           FACTOR: gl.constexpr, HAS_BIAS: gl.constexpr,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           BLOCK_J: gl.constexpr, BLOCK_JP: gl.constexpr,
                           BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                           GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    # Grouped tile order (Triton tutorial 03), as triton_wide._tile_of: GROUP_M row
    # tiles walk the output tiles together, so each weight tile is reused from L2.
    pid = gl.program_id(0)
    num_m = gl.cdiv(rows, BLOCK_M)
    num_j = gl.cdiv(O, BLOCK_J)
    in_group = GROUP_M * num_j
    first_m = (pid // in_group) * GROUP_M
    group_size = gl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_j = (pid % in_group) // group_size
    row0 = pid_m * BLOCK_M  # TMA coordinates: int32 (rows < 2^31, descriptor_ok)
    j0 = pid_j * BLOCK_J
    col0 = j0 * FACTOR

    in_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape,
                                        x_desc.layout)
    w_bufs = gl.allocate_shared_memory(wx_desc.dtype, [STAGES] + wx_desc.block_type.shape,
                                       wx_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)

    gl.warp_specialize([
        (_compute_partition, (in_bufs, w_bufs, ready, empty, bx_ptr, by_ptr, s_ptr, rows,
                              M, N, O, stride_sr, row0, j0, col0, FACTOR, HAS_BIAS,
                              BLOCK_M, BLOCK_N, BLOCK_J, BLOCK_JP, BLOCK_K, STAGES,
                              num_warps)),
        (_load_partition, (x_desc, y_desc, wx_desc, wy_desc, in_bufs, w_bufs, ready, empty,
                           row0, col0, M, N, BLOCK_K, STAGES)),
    ], [1], [LOAD_REGS])


# ----------------------------------------------------------------------------- launcher


#: 128 x 128 x 64 tiles (the Triton kernel's sm_90 tile: 64 FLOP per L2 byte), two
#: consumer warpgroups (64 rows each) plus the producer warp, 6 stages of 32 KiB (5 in
#: flight, 160 KiB; 205 KB of shared memory with the pooling matrix: one CTA per SM).
BLOCK_M, BLOCK_N, BLOCK_K, STAGES, NUM_WARPS, GROUP_M = 128, 128, 64, 6, 8, 8
#: Registers per thread the whole CTA is compiled for (the consumers get what the
#: producer warpgroup leaves: 12 warps x 32 x 168 <= 65536).
MAXNREG = 168


def covers(rows: int, dtype: torch.dtype, device) -> bool:
    """The shape-level part of :func:`applies`: a CUDA device of compute capability 9+,
    half precision, more than SMALL_ROWS rows (below, the Triton kernel's narrower tiles
    fill the SMs)."""
    from .triton_wide import SMALL_ROWS

    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and dtype in (torch.float16, torch.bfloat16) and rows > SMALL_ROWS)


def applies(x2, y2, wx, wy, factor, *, dropout, seed, activation, shared, chained) -> bool:
    """Whether this kernel computes the call (else the Triton kernel runs): what
    :func:`covers` says, every operand readable by TMA, the plain FBP forward."""
    from .triton_wide import descriptor_ok

    return (covers(x2.shape[0], x2.dtype, x2.device) and seed is None
            and activation is None and not shared and not chained
            and config_outputs(factor)[0] >= 1
            and all(descriptor_ok(t) for t in (x2, y2, wx, wy)))


def config_outputs(factor: int):
    """``(BLOCK_J, BLOCK_JP)``: the Triton kernel's rule for the same tile (whole factor
    groups, tiles at multiples of 4 columns); BLOCK_JP >= 16 for the pooling wgmma."""
    from .triton_wide import WideConfig, tile_outputs

    block_j, block_jp = tile_outputs(WideConfig(BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS,
                                                STAGES), factor)
    return block_j, (block_jp if factor == 1 else max(16, block_jp))


def descriptors(x2, y2, wx, wy):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    in_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dt)
    w_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dt)
    return ([TensorDescriptor.from_tensor(t, [BLOCK_M, BLOCK_K], in_layout) for t in (x2, y2)]
            + [TensorDescriptor.from_tensor(t, [BLOCK_N, BLOCK_K], w_layout) for t in (wx, wy)])


def gluon_pooled(x2, y2, wx, wy, bx, by, s, *, factor):
    """:func:`triton_wide.wide_pooled` for the calls :func:`applies` accepts."""
    rows, m = x2.shape
    n, o = y2.shape[1], wx.shape[0] // factor
    from .triton_kernels import _bias_args

    block_j, block_jp = config_outputs(factor)
    bx_, by_, has_bias = _bias_args(bx, by, wx)
    grid = (triton.cdiv(rows, BLOCK_M) * triton.cdiv(o, block_j),)
    _gluon_wide_fwd_kernel[grid](
        *descriptors(x2, y2, wx, wy), bx_, by_, s,
        rows, m, n, o, s.stride(0),
        FACTOR=factor, HAS_BIAS=has_bias, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_J=block_j, BLOCK_JP=block_jp, BLOCK_K=BLOCK_K, STAGES=STAGES,
        GROUP_M=GROUP_M, num_warps=NUM_WARPS, maxnreg=MAXNREG)


# ----------------------------------------------------------------------------- compile facts


def compile_facts(dtype: str = "bf16", factor: int = 5) -> dict:
    """Compile the kernel for sm_90 without a GPU (``TRITON_INTERPRET`` unset) and read
    its facts off the PTX and cubin: registers, spill stack, shared memory, wgmma, TMA,
    and the ``setmaxnreg`` budgets of the producer and consumer partitions."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from .triton_compile import _resources

    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]

    def desc(block):
        layout = gl.NVMMASharedLayout.get_default_for(block, gdt)
        return f"tensordesc<{dtype}[{block[0]},{block[1]}],{layout!r}>"

    block_j, block_jp = config_outputs(factor)
    sig = {"x_desc": desc([BLOCK_M, BLOCK_K]), "y_desc": desc([BLOCK_M, BLOCK_K]),
           "wx_desc": desc([BLOCK_N, BLOCK_K]), "wy_desc": desc([BLOCK_N, BLOCK_K]),
           "bx_ptr": f"*{dtype}", "by_ptr": f"*{dtype}", "s_ptr": "*fp32",
           "rows": "i32", "M": "i32", "N": "i32", "O": "i32", "stride_sr": "i32"}
    consts = dict(FACTOR=factor, HAS_BIAS=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  BLOCK_J=block_j, BLOCK_JP=block_jp, BLOCK_K=BLOCK_K, STAGES=STAGES,
                  GROUP_M=GROUP_M, num_warps=NUM_WARPS)
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    src = GluonASTSource(fn=_gluon_wide_fwd_kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": NUM_WARPS, "maxnreg": MAXNREG})
    ptx = compiled.asm["ptx"]
    res = _resources(compiled.asm["cubin"])
    regs = sorted({(m.group(1), int(m.group(2))) for m in
                   re.finditer(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)})
    stage = (BLOCK_M + BLOCK_N) * BLOCK_K * 2
    return {"triton": triton.__version__, "dtype": dtype, "factor": factor,
            "registers": res["registers"], "stack_bytes": res["stack_bytes"],
            "shared_bytes": compiled.metadata.shared, "wgmma": "wgmma" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx, "setmaxnreg": regs,
            "flop_per_byte": 2 * BLOCK_M * BLOCK_N * BLOCK_K / stage,
            "inflight_bytes_per_sm": (STAGES - 1) * stage}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps([compile_facts(d, int(f)) for d in ("bf16", "fp16")
                      for f in (sys.argv[1:] or ("1", "2", "5", "7"))]))
