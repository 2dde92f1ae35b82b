"""The cost model's predicted GPU table (fbp_kernels.costmodel), and its compile facts.

    python benchmarks/model.py                          # MFB default, rows 1..16384, H200
    python benchmarks/model.py --gpu A100 --mode all    # forward, backward, forward+backward
    python benchmarks/model.py --sweep coatt            # co-attention: B 64 x R 100 regions
    python benchmarks/model.py --rows 1024 --m 2048 --n 1024 --factor 5 --o 1000 --dtype bf16
    python benchmarks/model.py --refresh-facts          # recompile the Triton kernels and
                                                        # rewrite costmodel.COMPILE_FACTS
    python benchmarks/model.py --refresh-cuda-facts     # the same for the CUDA kernels

Every number is a prediction (benchmarks/README.md, "The cost model"): FLOPs, HBM bytes,
L2->SM bytes, bytes in flight per SM and waves of the call's longest kernel on ``--gpu``,
the predicted time on each of H100, H200, A100, and the ratios to the floor and to eager
on ``--gpu``.  Measurements on a GPU replace them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fbp_kernels import costmodel as cm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROWS = (1, 16, 256, 1024, 16384)
MFB = dict(m=2048, n=1024, factor=5, o=1000)
#: Issue 12's co-attention sweep: B samples x R regions fused with one question each.
COATT = dict(B=64, R=100, **MFB)
TABLE_PROVIDERS = ("floor", "eager", "compile", "fused", "split", "fused+saved", "split+saved")


def coatt_shapes(dtype: str = "bf16", B: int = COATT["B"], R: int = COATT["R"]) -> List[Tuple[str, cm.Shape]]:
    """The co-attention problem (x: B*R distinct rows, y: B rows) and the same problem
    flattened (y materialised per region), which is what it must beat."""
    rows = B * R
    base = dict(m=COATT["m"], n=COATT["n"], factor=COATT["factor"], o=COATT["o"], dtype=dtype)
    return [(f"coatt B={B} R={R}", cm.Shape(rows=rows, x_rows=rows, y_rows=B, **base)),
            (f"flattened B*R={rows}", cm.Shape(rows=rows, **base))]


def predict_rows(shapes: Sequence[Tuple[str, cm.Shape]], modes: Sequence[str],
                 providers: Sequence[str], gpu: cm.GPU,
                 others: Sequence[cm.GPU] = ()) -> List[dict]:
    """One dict per (shape, mode, provider): the prediction on ``gpu``, the time on each
    of ``others`` and the ratios to the floor and to eager (on ``gpu``)."""
    out = []
    for label, shape in shapes:
        for mode in modes:
            preds = {p: cm.predict(p, shape, gpu, mode) for p in providers}
            floor = preds.get("floor") or cm.predict("floor", shape, gpu, mode)
            eager = preds.get("eager") or cm.predict("eager", shape, gpu, mode)
            for p, pr in preds.items():
                out.append(dict(
                    shape=label, rows=shape.rows, m=shape.m, n=shape.n, factor=shape.factor,
                    o=shape.o, dtype=shape.dtype, x_rows=shape.rx, y_rows=shape.ry,
                    mode=mode, provider=p, gpu=gpu.name, time_us=pr.time_us, flops=pr.flops,
                    hbm_bytes=pr.hbm_bytes, l2_bytes=pr.l2_bytes,
                    inflight_per_sm=pr.bytes_in_flight_per_sm, waves=pr.waves,
                    bound=pr.bound, launches=pr.launches,
                    over_floor=pr.time_us / floor.time_us,
                    over_eager=pr.time_us / eager.time_us,
                    **{f"time_us_{g.name}": cm.predict(p, shape, g, mode).time_us
                       for g in others}))
    return out


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _kib(x: float) -> str:
    return f"{x / 1024:.0f} KiB"


def format_text(rows: List[dict], others: Sequence[cm.GPU]) -> str:
    """A terminal table, one line per (shape, mode, provider)."""
    head = (f"{'shape':<22}{'mode':<17}{'provider':<13}{'FLOP':>10}{'HBM':>10}{'L2':>10}"
            f"{'inflight/SM':>12}{'waves':>7}{'bound':>14}"
            + "".join(f"{g.name + ' us':>10}" for g in others) + f"{'/floor':>8}{'/eager':>8}")
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        key = (r["shape"], r["mode"])
        if last is not None and key != last:
            lines.append("")
        last = key
        lines.append(
            f"{r['shape']:<22}{r['mode']:<17}{r['provider']:<13}{_si(r['flops'], 'F'):>10}"
            f"{_si(r['hbm_bytes'], 'B'):>10}{_si(r['l2_bytes'], 'B'):>10}"
            f"{_kib(r['inflight_per_sm']):>12}{r['waves']:>7.2f}{r['bound']:>14}"
            + "".join(f"{r[f'time_us_{g.name}']:>10.1f}" for g in others)
            + f"{r['over_floor']:>8.2f}{r['over_eager']:>8.2f}")
    return "\n".join(lines)


def format_markdown(rows: List[dict], others: Sequence[cm.GPU]) -> List[str]:
    lines = ["| shape | mode | provider | FLOP | HBM | L2 | in flight / SM | waves | bound | "
             + " | ".join(f"{g.name} us" for g in others) + " | / floor | / eager |",
             "|" + "---|" * (11 + len(others))]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['provider']} | {_si(r['flops'], 'F')} | "
            f"{_si(r['hbm_bytes'], 'B')} | {_si(r['l2_bytes'], 'B')} | "
            f"{_kib(r['inflight_per_sm'])} | {r['waves']:.2f} | {r['bound']} | "
            + " | ".join(f"{r[f'time_us_{g.name}']:.1f}" for g in others)
            + f" | {r['over_floor']:.2f} | {r['over_eager']:.2f} |")
    return lines


def assumptions_text(gpu: cm.GPU) -> str:
    if gpu.calibration:
        tag = " (measured)"
    elif gpu.arch == 90 and gpu.l2_tbs == cm.GH100_L2_TBS:
        tag = " (a measured lower bound)"
    else:
        tag = " (assumed)"
    text = (f"{gpu.name}: {gpu.sms} SMs, bf16 {gpu.tensor_tflops['bf16']:g} TFLOP/s dense "
            f"(cuBLAS at {cm.cublas_efficiency(gpu, 'bf16'):.0%}, Triton's main loop at "
            f"{cm.mma_efficiency(gpu, cm._native_mma(gpu)[0]):.0%}), HBM {gpu.hbm_tbs:g} "
            f"TB/s (streams at {cm.hbm_efficiency(gpu):.0%}), L2 {gpu.l2_tbs:.3g} TB/s{tag}, "
            f"{gpu.l2_mb:g} MB L2, latency HBM {gpu.hbm_latency_us} us / L2 "
            f"{gpu.l2_latency_us} us, {gpu.launch_us:.3g} us per launch; compile facts: "
            f"{cm.COMPILE_FACTS_SOURCE}")
    if gpu.calibration:
        text += f"; calibrated by {gpu.calibration}"
    return text


# ----------------------------------------------------------------------------- targets


#: Issue 12's targets (bf16 on an H200 at the MFB widths), as the model evaluates them:
#: (label, rows, mode, memory mode, ratio, threshold).  ``ratio`` "floor": the shipped
#: design's time over the floor (at most the threshold); "eager": eager's time over the
#: design's (at least the threshold).  The shipped design is the faster of the
#: strategies auto chooses between (fused, split) in that memory mode.
TARGETS = (
    ("forward within 1.15x of the two-GEMM floor", (1024, 4096, 16384), "forward", "", "floor", 1.15),
    ("forward >= 1.5x faster than eager", (1024, 4096, 16384), "forward", "", "eager", 1.5),
    ("rows <= 16 forward within 1.5x of the weight-streaming floor", (1, 16), "forward", "",
     "floor", 1.5),
    ("forward+backward within 1.45x of the six-GEMM floor (lean)", (1024, 4096, 16384),
     "forward+backward", "", "floor", 1.45),
    ("forward+backward within 1.3x of the six-GEMM floor (middle: keep x)",
     (1024, 4096, 16384), "forward+backward", "+keep_x", "floor", 1.3),
)


def predicted_targets(gpu: cm.GPU) -> List[dict]:
    """Each target of TARGETS, and co-attention's (>= 1.3x faster than the same problem
    flattened, forward and forward+backward), at its worst shape: the value, the provider
    that gives it, and whether the prediction meets the threshold."""
    out = []
    for label, rows_list, mode, suffix, ratio, threshold in TARGETS:
        worst = None
        for rows in rows_list:
            shape = cm.Shape(rows=rows, **MFB)
            preds = {p: cm.predict(p + suffix, shape, gpu, mode) for p in ("fused", "split")}
            best = min(preds, key=lambda p: preds[p].time_us)
            base = cm.predict("floor" if ratio == "floor" else "eager", shape, gpu, mode)
            value = preds[best].time_us / base.time_us if ratio == "floor" else \
                base.time_us / preds[best].time_us
            bad = value > threshold if ratio == "floor" else value < threshold
            if worst is None or (value > worst["value"] if ratio == "floor"
                                 else value < worst["value"]):
                worst = dict(target=label, rows=rows, provider=best + suffix, value=value,
                             threshold=threshold, met=not bad)
        out.append(worst)
    (_, co), (_, flat) = coatt_shapes()
    for mode in ("forward", "forward+backward"):
        t = {}
        for name, shape in (("co", co), ("flat", flat)):
            preds = {p: cm.predict(p, shape, gpu, mode).time_us for p in ("fused", "split")}
            t[name] = min(preds.items(), key=lambda kv: kv[1])
        value = t["flat"][1] / t["co"][1]
        out.append(dict(target=f"coatt {mode} >= 1.3x faster than flattened",
                        rows=co.rows, provider=t["co"][0], value=value, threshold=1.3,
                        met=value >= 1.3))
    return out


def _least(meets, hi: float) -> float:
    """The least x in (0, hi] with ``meets(x)`` (monotone: true above some x), or inf."""
    if not meets(hi):
        return math.inf
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi


def forward_needs(gpu: cm.GPU) -> List[dict]:
    """What the fused forward's main loop would have to reach for each forward target
    with a ``floor`` or ``eager`` ratio, at each of its row counts, solved on the model
    itself: the least Triton main-loop efficiency (share of the datasheet peak) that
    meets the target with L2 unlimited, and the least L2 -> SM bandwidth that meets it
    at full efficiency, stated as FLOP per L2 byte at ``gpu.l2_tbs`` (the intensity the
    tile would need at today's L2); beside what the model assumes and the shipped tile
    gives.  ``left_us``: the target's time minus the prediction's other kernels.  A
    design target for the next main loop, in the model's own terms (inf: unreachable
    even at full efficiency / unlimited bandwidth)."""
    import dataclasses

    out = []
    for label, rows_list, mode, suffix, ratio, threshold in TARGETS:
        if mode != "forward" or suffix or min(rows_list) <= 16:
            continue
        for rows in rows_list:
            shape = cm.Shape(rows=rows, **MFB)
            fused = cm.predict("fused", shape, gpu, mode)
            main = max(fused.kernels, key=lambda k: k.flops)
            base = cm.predict("floor" if ratio == "floor" else "eager", shape, gpu, mode)
            allowed = base.time_us * threshold if ratio == "floor" else base.time_us / threshold

            def meets(**change):
                g = dataclasses.replace(gpu, **change)
                return cm.predict("fused", shape, g, mode).time_us <= allowed

            eff = _least(lambda e: meets(mma_efficiency=e, l2_tbs=1e6), 1.0)
            l2 = _least(lambda b: meets(mma_efficiency=1.0, l2_tbs=b), 1e6)
            now = main.flops / main.l2_bytes
            out.append(dict(target=label, rows=rows,
                            left_us=allowed - (fused.time_us - main.time_us),
                            efficiency=eff, l2_tbs=l2, flop_per_byte=now * l2 / gpu.l2_tbs,
                            assumed_efficiency=cm.mma_efficiency(
                                gpu, "wgmma" if gpu.arch >= 90 else "mma"),
                            flop_per_byte_now=now))
    return out


def format_needs(rows: List[dict], gpu: cm.GPU) -> str:
    lines = [f"What the fused forward's main loop would need ({gpu.name}, L2 {gpu.l2_tbs:g} "
             f"TB/s; time left = the target's time minus the other kernels):",
             "| target | rows | time left (us) | efficiency >= | FLOP per L2 byte >= | "
             "today (assumed efficiency, FLOP per L2 byte) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['rows']} | {r['left_us']:.0f} | "
                     f"{r['efficiency']:.2f} | {r['flop_per_byte']:.0f} | "
                     f"{r['assumed_efficiency']:.2f}, {r['flop_per_byte_now']:.0f} |")
    return "\n".join(lines)


def format_targets(rows: List[dict], gpu: cm.GPU) -> str:
    measured = f", calibrated by {gpu.calibration}" if gpu.calibration else ""
    lines = [f"Issue 12's targets as the cost model predicts them ({gpu.name}{measured}, "
             f"bf16, MFB widths; the faster of fused and split; worst shape):",
             "| target | worst at rows | provider | predicted | threshold | |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['rows']} | {r['provider']} | {r['value']:.2f} | "
                     f"{r['threshold']:g} | {'met' if r['met'] else 'missed'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- facts


def compile_facts_live(kernels=("fbp_fwd", "fbp_bwd", "wide_fwd"), archs=(80, 90),
                       dtypes=("fp32", "fp16", "bf16"), configs=None,
                       timeout_s: float = 600.0) -> Dict[tuple, tuple]:
    """Compile the Triton kernels now (subprocess: TRITON_INTERPRET must be unset) and
    return the COMPILE_FACTS entries they give."""
    code = f"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from fbp_kernels.backends import triton_compile as tc, triton_kernels as K
out = []
makers = {{"fbp_fwd": tc._fwd_source, "fbp_bwd": tc._bwd_source}}
for arch in {tuple(archs)!r}:
    target = GPUTarget("cuda", arch, 32)
    for dtype in {tuple(dtypes)!r}:
        fam = "fp32" if dtype == "fp32" else "half"
        for name, cfg in K.CONFIGS[fam].items():
            if {configs!r} is not None and name not in {configs!r}:
                continue
            for kernel in [k for k in {tuple(kernels)!r} if k != "wide_fwd"]:
                make = makers[kernel]
                row = tc._compile_row(triton, target, kernel, arch, dtype, name, cfg.num_warps,
                                      cfg.num_stages, lambda: make(dtype, cfg, "ieee"))
                out.append(dict(row.__dict__))
        if "wide_fwd" in {tuple(kernels)!r}:
            # The launcher's build at factor 5 (TMA descriptors where the tile uses them),
            # and its small-batch tiles where they differ.
            builds = tc.wide_builds(arch, dtype)
            picks = [("wide", builds[0])] + [("wide-small", b) for b in builds
                                             if b[0].endswith("-small")] + \
                [("wide-tiny", b) for b in builds if b[0].endswith("-tiny")]
            for config, (_name, wcfg, f, desc, _shared) in picks:
                row = tc._compile_row(triton, target, "wide_fwd", arch, dtype, config,
                                      wcfg.num_warps, wcfg.num_stages,
                                      lambda: tc._wide_source(dtype, wcfg, f, "ieee", desc))
                out.append(dict(row.__dict__))
            _name, wcfg, f, desc, _act, _pass, _shared = tc.wide_bwd_builds(arch, dtype)[0]
            row = tc._compile_row(triton, target, "wide_bwd", arch, dtype, "wide",
                                  wcfg.num_warps, wcfg.num_stages,
                                  lambda: tc._wide_bwd_source(dtype, wcfg, f, "ieee", desc))
            out.append(dict(row.__dict__))
print("FACTS-JSON" + json.dumps({{"triton": triton.__version__, "rows": out}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout_s, cwd=str(ROOT))
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("FACTS-JSON")]
    if proc.returncode != 0 or not marker:
        raise RuntimeError(f"compile failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    doc = json.loads(marker[0][len("FACTS-JSON"):])
    facts = {}
    for r in doc["rows"]:
        if not r["ok"]:
            raise RuntimeError(f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']}: {r['error']}")
        facts[(r["kernel"], r["arch"], r["dtype"], r["config"])] = (
            r["num_warps"], r["registers"], r["stack_bytes"], r["shared_bytes"],
            r["tensor_cores"])
    return {"triton": doc["triton"], "facts": facts}


def refresh_facts(path: Path = ROOT / "fbp_kernels" / "costmodel.py") -> int:
    """Recompile every kernel and configuration; rewrite the generated block of
    costmodel.py.  Returns the number of entries written."""
    live = compile_facts_live()
    date = datetime.date.today().isoformat()
    body = [f'COMPILE_FACTS_SOURCE = "triton {live["triton"]}, '
            f'fbp_kernels.backends.triton_compile, {date}"',
            "#: (kernel, arch, dtype, config) -> (num_warps, registers, spill stack bytes,",
            "#: dynamic shared memory bytes, tensor-core instruction).  Compiled with the MFB default",
            "#: constexprs of triton_compile (FACTOR 5, bias, dropout, normalize, IEEE precision).",
            "COMPILE_FACTS = {"]
    for key in sorted(live["facts"], key=lambda k: (k[1], ("fp32", "fp16", "bf16").index(k[2]),
                                                   ("tiny", "small", "medium", "large",
                                                    "wide", "wide-small",
                                                    "wide-tiny").index(k[3]),
                                                   k[0] != "fbp_fwd")):
        w, regs, stack, smem, tc = live["facts"][key]
        body.append(f'    ("{key[0]}", {key[1]}, "{key[2]}", "{key[3]}"): '
                    f'({w}, {regs}, {stack}, {smem}, "{tc}"),')
    body.append("}")
    text = path.read_text()
    begin = "# BEGIN COMPILE FACTS"
    end = "# END COMPILE FACTS"
    i = text.index("\n", text.index(begin)) + 1
    j = text.index(end)
    path.write_text(text[:i] + "\n".join(body) + "\n" + text[j:])
    return len(live["facts"])


#: costmodel.CUDA_TILES engine -> the compile report's config for each dtype.
CUDA_ENGINE_CONFIGS = {"wgmma": "WgmmaEngine", "wide": "WmmaWideEngine",
                       "async": "WmmaAsyncEngine", "fp32": "FmaEngine<float>"}


def refresh_cuda_facts(path: Path = ROOT / "fbp_kernels" / "costmodel.py",
                       rows: Optional[list] = None) -> int:
    """Rewrite costmodel.CUDA_COMPILE_FACTS (registers, shared bytes, tensor-core SASS per
    (kernel, arch, dtype, engine)) and its source line from a live nvcc build
    (``python -m fbp_kernels.backends.cuda_compile``; ``rows``: its JSON rows, for
    tests).  Returns the number of entries rewritten."""
    import re

    from fbp_kernels.backends import cuda_compile

    if rows is None:
        rows = [r.__dict__ for res in cuda_compile.compile_all() for r in res.kernels]
        version = cuda_compile._nvcc_version(cuda_compile.find_nvcc())
    else:
        version = None
    facts = {(r["kernel"], r["arch"], r["dtype"], r["config"]):
             (r["registers"], r["shared_bytes"], r["tensor_cores"]) for r in rows}
    text = path.read_text()
    count = 0

    def entry(m):
        nonlocal count
        kernel, arch, dtype, engine = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        regs, smem, tc = facts[(kernel, arch, dtype, CUDA_ENGINE_CONFIGS[engine])]
        count += 1
        return f'("{kernel}", {arch}, "{dtype}", "{engine}"): ({regs}, {smem}, "{tc}")'

    text = re.sub(r'\("(\w+)", (\d+), "(\w+)", "(\w+)"\): \(\d+, \d+, "\w+"\)', entry, text)
    if version is not None:
        date = datetime.date.today().isoformat()
        text = re.sub(r'CUDA_COMPILE_FACTS_SOURCE = "[^"]*"',
                      f'CUDA_COMPILE_FACTS_SOURCE = "nvcc {version}, {date}"', text)
    path.write_text(text)
    return count


# ----------------------------------------------------------------------------- CLI


def apply_overrides(gpu: cm.GPU, overrides: Sequence[str]) -> cm.GPU:
    """``["l2_tbs=8"]`` -> a copy of ``gpu`` with that field changed."""
    numeric = {k for k, v in gpu.__dict__.items() if isinstance(v, (int, float))}
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in numeric:
            raise SystemExit(f"--set {item}: field must be one of {sorted(numeric)}")
        changes[key] = type(getattr(gpu, key))(float(value))
    return replace(gpu, **changes) if changes else gpu


def _ints(text: str) -> List[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="H200", choices=sorted(cm.GPUS),
                    help="GPU of the traffic/waves/ratio columns (times: all three)")
    ap.add_argument("--rows", type=_ints, default=list(DEFAULT_ROWS))
    ap.add_argument("--m", type=int, default=MFB["m"])
    ap.add_argument("--n", type=int, default=MFB["n"])
    ap.add_argument("--factor", type=int, default=MFB["factor"])
    ap.add_argument("--o", type=int, default=MFB["o"])
    ap.add_argument("--dtype", default="bf16", choices=sorted(cm.DTYPE_BYTES))
    ap.add_argument("--mode", default="forward", choices=(*cm.MODES, "all"))
    ap.add_argument("--providers", default=",".join(TABLE_PROVIDERS),
                    help="comma-separated: " + ", ".join(TABLE_PROVIDERS) +
                    "; also cuda (the C++ extension), fused+keep_x/y, split+keep_x/y")
    ap.add_argument("--sweep", choices=("rows", "coatt"), default="rows",
                    help="rows: the --rows list at the given widths; coatt: B 64 x R 100 "
                         "regions with one question per sample, and the same flattened")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="FIELD=VALUE",
                    help="override a numeric field of the --gpu entry, e.g. l2_tbs=8 or "
                         "hbm_latency_us=0.5 (to see how much a prediction rests on it)")
    ap.add_argument("--calibration", type=Path, metavar="FILE",
                    help="a benchmarks/calibrate.py calibration.json: its GPU's entry with "
                         "the measured bandwidths and efficiencies in place of the "
                         "assumptions (it sets --gpu; --set still applies after it)")
    ap.add_argument("--breakdown", action="store_true", help="print every kernel's cost")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--targets", action="store_true",
                    help="issue 12's targets as the model predicts them, met or missed")
    ap.add_argument("--refresh-facts", action="store_true",
                    help="recompile the Triton kernels (~1 min) and rewrite "
                         "costmodel.COMPILE_FACTS")
    ap.add_argument("--refresh-cuda-facts", action="store_true",
                    help="recompile the CUDA kernels (nvcc, ~30 s) and rewrite "
                         "costmodel.CUDA_COMPILE_FACTS")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.refresh_facts:
        n = refresh_facts()
        print(f"wrote {n} compile facts to fbp_kernels/costmodel.py")
        return 0
    if args.refresh_cuda_facts:
        n = refresh_cuda_facts()
        print(f"wrote {n} CUDA compile facts to fbp_kernels/costmodel.py")
        return 0
    base = cm.GPUS[args.gpu]
    if args.calibration is not None:
        try:
            base, _ = cm.load_calibration(args.calibration)
        except ValueError as exc:
            raise SystemExit(f"--calibration: {exc}")
    gpu = apply_overrides(base, args.overrides)
    if args.targets:
        print(format_targets(predicted_targets(gpu), gpu))
        print()
        print(format_needs(forward_needs(gpu), gpu))
        return 0
    others = [gpu if k == gpu.name else cm.GPUS[k] for k in ("H100", "H200", "A100")]
    modes = cm.MODES if args.mode == "all" else (args.mode,)
    providers = [p for p in args.providers.split(",") if p]
    if args.sweep == "coatt":
        shapes = coatt_shapes(args.dtype)
    else:
        shapes = [(f"rows={r}", cm.Shape(r, args.m, args.n, args.factor, args.o, args.dtype))
                  for r in args.rows]
    rows = predict_rows(shapes, modes, providers, gpu, others)
    print(f"Predicted (cost model, not measured): m={args.m} n={args.n} factor={args.factor} "
          f"o={args.o} {args.dtype}")
    print("  " + assumptions_text(gpu))
    print("\n".join(format_markdown(rows, others)) if args.markdown else format_text(rows, others))
    if args.breakdown:
        for label, shape in shapes:
            for mode in modes:
                for p in providers:
                    print(f"\n{label} {mode} {p}:")
                    for note in cm.predict(p, shape, gpu, mode).notes:
                        print("   " + note)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
