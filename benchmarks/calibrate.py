"""Measure the cost model's unmeasured assumptions on this GPU (``make gpu-check`` runs it).

Every forward target the model misses is bounded by two numbers nobody has measured on
this project's GPU: the aggregate L2 -> SM bandwidth (``l2_tbs``: 7.7 TB/s, a lower bound
a public H100 GEMM measurement implies, ``costmodel.GH100_L2_TBS``; the wide Triton and
CUDA main loops, 64 FLOP per L2 byte, are L2-bound below ~7.5 TB/s) and the Triton main
loop's tensor-core efficiency (``TRITON_MMA_EFFICIENCY``, 0.55 assumed for wgmma: what
bounds them above).  The model puts the fused forward at rows 4096 at 2.24x / 1.76x /
1.74x the floor at 6 / 7.7 / 12 TB/s (``benchmarks/model.py --set l2_tbs=...``): at the
bound, the efficiency decides, and so which redesign pays (warp specialisation for
efficiency, 2-CTA multicast for L2).  So the first GPU call measures them, in ~30 s:

    python benchmarks/calibrate.py --out DIR      # DIR/calibration.json, a table
    python benchmarks/model.py --calibration DIR/calibration.json --targets

Probes (each the median of CUDA-event timings after warm-ups, no L2 flush):

- ``hbm_copy_tbs``: ``dst.copy_(src)`` of 1 GiB, bytes read + written per second.
- ``l2_read_tbs``: :func:`_read_kernel` streaming a buffer of two 8 KiB blocks per
  program (17.3 MB on 132 SMs: well inside the L2's resident share on H100/H200/A100)
  128 times, ``.cg`` loads (L2, not L1), unmasked (four 16-byte loads per thread in
  flight), the blocks rotated per pass so no SM re-reads its own; at 4 and at 8 CTAs
  per SM (32 / 64 KiB in flight per SM, 4.3 / 8.7 MB over the GPU: by Little's law 12 /
  25 TB/s at the model's 0.35 us L2 latency), the faster kept; ``latency_bound`` when
  the second is still >10% faster (the probe, not the L2, may then bound it).
  ``hbm_read_tbs``: the same kernel over 2 GiB once (a diagnostic).
- ``cublas_bf16_tflops``: ``torch.matmul`` of 8192^3 bf16 random operands; plus the MFB
  default's larger projection (4096 x 5000 x 2048) beside the model's ``gemm`` price.
- ``triton_mainloop_tflops``: :func:`_mainloop_kernel`, the wide kernels' own main loop
  (``triton_wide._wide_projection``: same tile, warps, stages, grouped order, TMA
  descriptors as the wide forward on this GPU) computing ``A @ W^T`` alone, bf16, 8192 x
  5120 x 2048; its L2 traffic at the measured ``l2_read_tbs`` says whether that rate is
  the instruction's or the L2's (``bound``).  ``triton_128x256_tflops``: the same loop
  at 128 x 256 x 64 / 8 warps / 3 stages (85 FLOP/B, a diagnostic: if it is much faster
  per FLOP, the 128 x 128 tile is L2-bound).
- ``launch_us``: a CUDA graph of 256 back-to-back one-element kernels, GPU time per
  kernel (the model's dependent-launch cost).

Not measured (the model keeps its assumptions): loaded HBM and L2 latencies.  The JSON's
``measured`` map is what :func:`fbp_kernels.costmodel.calibrated` reads; ``probes`` holds
every timing.  ``FBP_COSTMODEL_CALIBRATION=DIR/calibration.json`` makes ``backend="auto"``
price strategies with it on a GPU of the same name.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.measure import median_event_ms  # noqa: E402
from fbp_kernels import costmodel as cm  # noqa: E402
from fbp_kernels.backends import triton_wide  # noqa: E402
from fbp_kernels.backends.triton_wide import _tile_of, _wide_projection  # noqa: E402

#: The read probe's launch: BLOCK fp32 elements per load (4 warps: 16 per thread, four
#: 16-byte loads, issued back to back when the buffer is a whole number of blocks:
#: ``EVEN``), CTAS_PER_SM programs per SM (the sm_90 build: 44 registers, so 8 fit).  It
#: runs at each of READ_CTA_LEVELS (bytes in flight: 32 / 64 KiB per SM) and keeps the
#: faster: a rate still growing with the bytes in flight is marked latency-bound.
READ_BLOCK = 2048
READ_CTAS_PER_SM = 8
READ_CTA_LEVELS = (4, 8)
#: Blocks per program per pass at READ_CTAS_PER_SM: the L2 buffer is sized from the SM
#: count so every program reads the same number (2 x 8 KiB; 17.3 MB on 132 SMs, inside
#: the resident share of a 50-60 MB L2).
L2_BLOCKS_PER_CTA = 2
L2_PASSES = 128
HBM_BUFFER_BYTES = 2 * 2**30
COPY_BYTES = 2**30
#: The main-loop probe's problem: compute-bound for cuBLAS, ~0.2 ms at 800 TFLOP/s.  M
#: 8448 = 66 x 128: 66 x 40 = 2640 = 20 x 132 tiles of 128 x 128 (1320 of 128 x 256),
#: whole waves on 132 SMs, so the measured rate carries no wave tail of its own (the
#: model adds the wide kernels' own).
MAINLOOP_SHAPE = (8448, 5120, 2048)
#: The 85 FLOP/B comparison tile (Triton tutorial 09's Hopper tile).
WIDE_N_TILE = triton_wide.WideConfig(block_m=128, block_n=256, block_k=64, num_warps=8,
                                     num_stages=3, tma=True)
GRAPH_LAUNCHES = 256


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _read_kernel(src, out, n_elems, passes, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """Every program sums its blocks of ``src`` (fp32, ``n_elems``) over ``passes``
    passes into ``out[pid, :]``: pass ``p`` gives program ``pid`` blocks ``(pid + i *
    nprog + p * shift) % nblocks``, so the grid reads the whole buffer once per pass
    and an SM never re-reads the blocks it read the pass before (``.cg``: through L2
    only).  ``sum(out) == passes * sum(src)`` (the tests check it: every byte is read).
    ``EVEN`` (``n_elems`` a multiple of BLOCK): no mask, so the four 16-byte loads of a
    thread issue back to back (masked, their zero fill let ptxas reuse two register
    quads and serialise them: half the bytes in flight)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    nblocks = tl.cdiv(n_elems, BLOCK)
    shift = nprog // 2 + 1
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(passes):
        for b in range(pid, nblocks, nprog):
            blk = (b + p * shift) % nblocks
            idx = blk.to(tl.int64) * BLOCK + offs
            if EVEN:
                acc += tl.load(src + idx, cache_modifier=".cg")
            else:
                acc += tl.load(src + idx, mask=idx < n_elems, other=0.0, cache_modifier=".cg")
    tl.store(out + pid.to(tl.int64) * BLOCK + offs, acc)


@triton.jit
def _mainloop_kernel(a_src, w_src, c_ptr, M, N, K, stride_am, stride_ak, stride_wn,
                     stride_wk, stride_cm, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                     PRECISION: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     X_DESC: tl.constexpr, W_DESC: tl.constexpr):
    """``c = a @ w^T`` (a (M, K), w (N, K)) through the wide kernels' main loop and grid
    order (``_tile_of``, ``_wide_projection``), the tile stored in c's dtype: the wide
    forward's per-projection work without its epilogue.  ``HAS_BIAS``/``HALF`` are
    ``_main_loop_args``' (unused here)."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0_32 = pid_m * BLOCK_M  # int32 TMA coordinates, int64 where they scale a stride
    col0_32 = pid_n * BLOCK_N
    row0 = row0_32.to(tl.int64)
    col0 = col0_32.to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    m_mask = rm < M - row0_32
    n_ok = rn < N - col0_32
    acc = _wide_projection(a_src, w_src, row0_32 if X_DESC else row0,
                           col0_32 if W_DESC else col0, rm, m_mask, rn, n_ok, K, stride_am,
                           stride_ak, stride_wn, stride_wk, X_DESC, W_DESC, BLOCK_M,
                           BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    ptrs = c_ptr + (row0 + rm)[:, None] * stride_cm + (col0 + rn)[None, :]
    tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_ok[None, :])


@triton.jit
def _tiny_kernel(ptr):
    tl.store(ptr, tl.load(ptr) + 1)


# ----------------------------------------------------------------------------- launchers


def read_sum(src: torch.Tensor, passes: int, ctas: int) -> torch.Tensor:
    """(ctas, READ_BLOCK) fp32 partial sums of ``passes`` reads of ``src`` (fp32)."""
    out = torch.empty((ctas, READ_BLOCK), dtype=torch.float32, device=src.device)
    _read_kernel[(ctas,)](src, out, src.numel(), passes, BLOCK=READ_BLOCK,
                          EVEN=src.numel() % READ_BLOCK == 0, num_warps=4)
    return out


def mainloop_config(device: torch.device) -> triton_wide.WideConfig:
    """The wide forward's half-precision tile on ``device`` (sm_90: 128x128x64, 16 warps,
    TMA; sm_80: 128x64x64, 8 warps, cp.async); the interpreter's tile on a CPU."""
    if device.type != "cuda":
        return triton_wide.INTERPRETER_WIDE
    major = torch.cuda.get_device_capability(device)[0]
    return triton_wide.WIDE_CONFIGS["sm90-half" if major == 9 else "half"]


def mainloop(a: torch.Tensor, w: torch.Tensor, cfg: triton_wide.WideConfig) -> torch.Tensor:
    """``a @ w^T`` by :func:`_mainloop_kernel` at tile ``cfg`` (TMA where it qualifies)."""
    M, K = a.shape
    N = w.shape[0]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    operands, strides, meta = triton_wide._main_loop_args(cfg, [a], [w], has_bias=False)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _mainloop_kernel[grid](*operands, c, M, N, K, *strides, c.stride(0), **meta)
    return c


# ----------------------------------------------------------------------------- probes


def _probe(name: str, ms: float, *, nbytes: float = 0.0, flops: float = 0.0, **extra):
    row = dict(name=name, us=ms * 1e3, **extra)
    if nbytes:
        row["tbs"] = nbytes / (ms * 1e-3) / 1e12
    if flops:
        row["tflops"] = flops / (ms * 1e-3) / 1e12
    return row


class _Rows(list):
    """The probe rows, handed to ``on_row`` after each one (main writes the JSON then, so
    a phase cut off by its timeout still leaves what was measured)."""

    def __init__(self, on_row=None):
        super().__init__()
        self.on_row = on_row

    def append(self, row):
        super().append(row)
        print(json.dumps(row), flush=True)
        if self.on_row is not None:
            self.on_row(list(self))


def probe_all(device: torch.device, on_row=None) -> List[dict]:
    """Every probe of the module docstring on ``device`` (a CUDA GPU); ``on_row(rows)``
    after each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows: List[dict] = _Rows(on_row)

    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    rows.append(_probe("hbm_copy", median_event_ms(lambda: dst.copy_(src)),
                       nbytes=2 * COPY_BYTES))
    del src, dst

    ctas = sms * READ_CTAS_PER_SM
    l2_bytes = ctas * L2_BLOCKS_PER_CTA * READ_BLOCK * 4
    buf = torch.ones(l2_bytes // 4, dtype=torch.float32, device=device)
    levels = []
    for per_sm in READ_CTA_LEVELS:
        ms = median_event_ms(lambda: read_sum(buf, L2_PASSES, sms * per_sm))
        levels.append(_probe(f"l2_read_{per_sm}_per_sm", ms, nbytes=l2_bytes * L2_PASSES,
                             ctas=sms * per_sm))
    best = max(levels, key=lambda r: r["tbs"])
    # Still growing with twice the bytes in flight: the probe, not L2, may bound it.
    growing = levels[-1]["tbs"] > 1.1 * levels[0]["tbs"]
    rows.append(dict(best, name="l2_read", buffer_mb=l2_bytes / 1e6, passes=L2_PASSES,
                     levels={r["ctas"] // sms: round(r["tbs"], 3) for r in levels},
                     latency_bound=growing))
    big = torch.ones(HBM_BUFFER_BYTES // 4, dtype=torch.float32, device=device)
    rows.append(_probe("hbm_read", median_event_ms(lambda: read_sum(big, 1, ctas), reps=5),
                       nbytes=HBM_BUFFER_BYTES))
    del buf, big

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    rows.append(_probe("cublas_bf16_8192", median_event_ms(lambda: a @ b), flops=2.0 * n ** 3))
    del a, b
    M, N, K = 4096, 5000, 2048
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    model = cm.gpu_for(device)
    rows.append(_probe("cublas_bf16_mfb_x", median_event_ms(lambda: x @ w.t()),
                       flops=2.0 * M * N * K, shape=[M, N, K],
                       predicted_us=cm.gemm("x W^T", M, N, K, "bf16", model).time_us))
    del x, w

    M, N, K = MAINLOOP_SHAPE
    a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16) / math.sqrt(K)
    ref = (a @ w.t()).float()
    for name, cfg in (("triton_mainloop", mainloop_config(device)),
                      ("triton_128x256", WIDE_N_TILE)):
        try:
            got = mainloop(a, w, cfg).float()
            err = float((got - ref).abs().max() / ref.abs().max())
            ms = median_event_ms(lambda: mainloop(a, w, cfg))
        except Exception as exc:  # a tile that does not compile here: say so, go on
            rows.append(dict(name=name, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        l2 = tiles * (cfg.block_m + cfg.block_n) * K * 2  # every tile reads its panels
        rows.append(_probe(name, ms, flops=2.0 * M * N * K, shape=[M, N, K],
                           tile=[cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps,
                                 cfg.num_stages], tma=cfg.tma, l2_bytes=l2,
                           max_rel_err=err))
    del a, w, ref

    flag = torch.zeros(1, device=device, dtype=torch.int32)
    _tiny_kernel[(1,)](flag)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_LAUNCHES):
            _tiny_kernel[(1,)](flag)
    ms = median_event_ms(graph.replay)
    rows.append(_probe("launch", ms, launches=GRAPH_LAUNCHES,
                       us_per_launch=ms * 1e3 / GRAPH_LAUNCHES))
    return list(rows)


# ----------------------------------------------------------------------------- compile check


def compile_check(archs=(80, 90)) -> List[dict]:
    """The probe kernels compiled (no GPU needed; TRITON_INTERPRET must be unset) as the
    probes launch them: the main loop at each arch's wide tile (sm_90: TMA descriptors)
    and, on sm_90, the 128 x 256 tile; the read kernel.  Rows of
    triton_compile.CompileRow fields (registers, stack bytes, tensor cores, TMA)."""
    from triton.backends.compiler import GPUTarget

    from fbp_kernels.backends import triton_compile as tc

    def loop_source(cfg):
        def make():
            if cfg.tma:
                sig = {"a_src": f"tensordesc<bf16[{cfg.block_m},{cfg.block_k}]>",
                       "w_src": f"tensordesc<bf16[{cfg.block_n},{cfg.block_k}]>"}
            else:
                sig = {"a_src": "*bf16", "w_src": "*bf16"}
            sig.update({"c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                        "stride_am": "i32", "stride_wn": "i32", "stride_cm": "i32"})
            consts = {"stride_ak": 1, "stride_wk": 1, "HAS_BIAS": False, "DOT_FP32": False,
                      "PRECISION": "ieee", "HALF": True, "BLOCK_M": cfg.block_m,
                      "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                      "GROUP_M": cfg.group_m, "X_DESC": cfg.tma, "W_DESC": cfg.tma}
            # The launch's sizes and row strides are multiples of 16 (Triton specialises
            # them so: vectorised, asynchronous loads), as the wide kernels' are.
            return tc._source(_mainloop_kernel, sig, consts,
                              aligned=("M", "N", "K", "stride_am", "stride_wn", "stride_cm"))
        return make

    def read_source():
        # The launch's buffer sizes are multiples of 16 elements (vector loads), as
        # Triton specialises them; int32 (< 2^31 elements).
        return tc._source(_read_kernel, {"src": "*fp32", "out": "*fp32", "n_elems": "i32",
                                         "passes": "i32"}, {"BLOCK": READ_BLOCK, "EVEN": True},
                          aligned=("n_elems",))

    rows = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        builds = [("mainloop", "sm90-half" if arch == 90 else "half",
                   triton_wide.WIDE_CONFIGS["sm90-half" if arch == 90 else "half"])]
        if arch == 90:
            builds.append(("mainloop", "128x256", WIDE_N_TILE))
        for kernel, name, cfg in builds:
            rows.append(tc._compile_row(triton, target, kernel, arch, "bf16", name,
                                        cfg.num_warps, cfg.num_stages, loop_source(cfg)))
        rows.append(tc._compile_row(triton, target, "read", arch, "fp32", "read", 4, 1,
                                    read_source))
    return [dataclasses.asdict(r) for r in rows]


# ----------------------------------------------------------------------------- results


def measured_from(probes: List[dict]) -> Dict[str, Optional[float]]:
    """The ``measured`` map (costmodel.CALIBRATION_KEYS) of a probe list; a probe that
    failed or is missing leaves its key None (the model keeps that assumption)."""
    by = {p["name"]: p for p in probes if "error" not in p}

    def pick(name, field):
        return by[name][field] if name in by and field in by[name] else None

    return {"hbm_copy_tbs": pick("hbm_copy", "tbs"), "l2_read_tbs": pick("l2_read", "tbs"),
            "cublas_bf16_tflops": pick("cublas_bf16_8192", "tflops"),
            "triton_mainloop_tflops": pick("triton_mainloop", "tflops"),
            "launch_us": pick("launch", "us_per_launch")}


def mainloop_bound(probe: dict, l2_tbs: float) -> str:
    """"l2" when the main-loop probe's L2 traffic at ``l2_tbs`` explains at least 90% of
    its time (its rate is then a lower bound of the instruction's efficiency), else
    "compute"."""
    t_l2_us = probe["l2_bytes"] / (l2_tbs * 1e12) * 1e6
    return "l2" if t_l2_us >= 0.9 * probe["us"] else "compute"


def report(data: dict) -> str:
    """The assumption beside each measurement, and what the main-loop probe was bound by."""
    gpu = cm.gpu_for_name(data["gpu"], tuple(data["capability"]), calibration=False)
    cal = cm.calibrated(gpu, data["measured"])
    m = data["measured"]
    lines = [f"Calibration on {data['gpu']} (model entry {gpu.name}); assumption -> measured:",
             "| quantity | assumed | measured |", "|---|---|---|"]

    def line(label, assumed, value, fmt):
        shown = "not measured" if value is None else format(value, fmt)
        lines.append(f"| {label} | {format(assumed, fmt)} | {shown} |")

    line("HBM stream share of peak", cm.hbm_efficiency(gpu),
         None if m["hbm_copy_tbs"] is None else cal.hbm_efficiency, ".3f")
    line("L2 -> SM TB/s", gpu.l2_tbs, m["l2_read_tbs"], ".2f")
    line("cuBLAS bf16 share of peak", cm.cublas_efficiency(gpu, "bf16"),
         None if m["cublas_bf16_tflops"] is None else cal.cublas_efficiency, ".3f")
    line("Triton main loop share of peak", cm.mma_efficiency(gpu, cm._native_mma(gpu)[0]),
         None if m["triton_mainloop_tflops"] is None else cal.mma_efficiency, ".3f")
    line("us per dependent launch", gpu.launch_us, m["launch_us"], ".2f")
    probe = next((p for p in data["probes"] if p["name"] == "triton_mainloop"
                  and "error" not in p), None)
    if probe is not None:
        lines.append(f"main-loop probe: {probe['tflops']:.0f} TFLOP/s, "
                     f"{mainloop_bound(probe, cal.l2_tbs)}-bound at {cal.l2_tbs:.2f} TB/s L2")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for calibration.json")
    ap.add_argument("--compile-check", action="store_true",
                    help="no GPU: compile the probe kernels for sm_80/sm_90, print JSON rows")
    args = ap.parse_args(argv)
    if args.compile_check:
        rows = compile_check()
        print(json.dumps(rows))
        return 0 if all(r["ok"] for r in rows) else 1
    if args.out is None:
        ap.error("--out is required (or --compile-check)")
    if not torch.cuda.is_available():
        print("calibrate: needs a CUDA GPU (it measures one); nothing written",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    head = dict(gpu=torch.cuda.get_device_name(device),
                capability=list(torch.cuda.get_device_capability(device)),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__)

    def save(probes):
        data = dict(head, measured=measured_from(probes), probes=probes)
        tmp = args.out / "calibration.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(args.out / "calibration.json")
        return data

    data = save(probe_all(device, on_row=save))
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
