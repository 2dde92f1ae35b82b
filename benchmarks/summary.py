"""Human-readable output: the terminal table of one problem, the markdown summary."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from fbp_kernels import costmodel

from .environment import peak_bandwidth_gbps
from .harness import MEASURE_ORDER
from .problems import Problem
from .results import BANDWIDTH, Row
from .table import BASELINE, FLOOR, ResultIndex, fmt, fmt_bytes
from .targets import check_targets

#: Benchmark provider -> cost-model provider (fbp_kernels.costmodel.PROVIDERS).
MODEL_PROVIDERS = {"reference": "eager", "compile": "compile", "floor": "floor",
                   "triton": "fused", "triton-gluon": "fused-ws", "triton+saved": "fused+saved",
                   "split": "split",
                   "split+saved": "split+saved", "cuda": "cuda"}
#: The shapes of the predicted GPU table a CPU run prints: the MFB default, bf16.
PREDICTED_ROWS = (1, 16, 256, 1024, 16384)
PREDICTED_PROVIDERS = ("floor", "eager", "compile", "fused", "split", "fused+saved",
                       "split+saved")

LEGEND = ("cells: median ms, speedup over the eager reference (x), time over the floor "
          "(f: 1.00 = as fast as the bare matmuls)")


#: The same for MFH (costmodel.predict_mfh: MFH priced from FBP's providers).
MFH_MODEL_PROVIDERS = {"reference": "eager", "floor": "floor", "triton": "fused",
                       "cuda": "cuda", "torch": "torch"}


def model_shape(problem: Problem) -> Optional[costmodel.Shape]:
    """The cost model's view of a benchmark problem (for MFH, one block's widths)."""
    if problem.dtype not in costmodel.DTYPE_BYTES:
        return None
    if problem.regions > 1:
        return costmodel.Shape(problem.rows, problem.m, problem.n, problem.factor, problem.o,
                               problem.dtype, x_rows=problem.rows, y_rows=problem.y_rows)
    return costmodel.Shape(problem.rows, problem.m, problem.n, problem.factor, problem.o,
                           problem.dtype)


def predicted_ms(problem: Problem, provider: str, mode: str,
                 gpu: costmodel.GPU) -> Optional[float]:
    """The model's time for a measured provider, in ms, or None when it has no model."""
    mfh = problem.order > 1
    shape = model_shape(problem)
    name = (MFH_MODEL_PROVIDERS if mfh else MODEL_PROVIDERS).get(provider)
    if shape is None or name is None:
        return None
    if mfh:
        return costmodel.predict_mfh(name, shape, gpu, mode, problem.order) / 1e3
    return costmodel.predict(name, shape, gpu, mode).time_us / 1e3


def terminal_table(problem: Problem, rows: Sequence[Row]) -> str:
    """One problem, one line per provider: each mode's time and two ratios, then the
    saved activations (and on a GPU peak memory and the cost model's prediction of
    each mode, side by side with the measurement)."""
    idx = ResultIndex(rows)
    gpu = any(r.device_type == "cuda" for r in rows)
    model_gpu = costmodel.gpu_for_name(rows[0].device) if gpu and rows else None
    head = f"{'provider':<14}" + "".join(f"{m:>26}" for m in MEASURE_ORDER) + f"{'saved':>12}"
    head += f"{'peak f+b':>12}" if gpu else ""
    if model_gpu is not None:
        head += f"   predicted {model_gpu.name} ms (" + " / ".join(MEASURE_ORDER) + ")"
    lines = [f"== {problem.label()}   [sweep {problem.sweep}]", head]
    for prov in idx.providers:
        cells = []
        for mode in MEASURE_ORDER:
            t = idx.time(problem, prov, mode)
            if t is None:
                cells.append(f"{'error' if idx.error(problem, prov, mode) else '-':>26}")
                continue
            sp, fl = idx.speedup(problem, prov, mode), idx.over_floor(problem, prov, mode)
            cells.append(f"{t:>10.3f} {fmt(sp):>6}x {fmt(fl):>6}f")
        line = f"{prov:<14}" + "".join(cells) + f"{fmt_bytes(idx.saved(problem, prov)):>12}"
        if gpu:
            line += f"{fmt_bytes(idx.peak(problem, prov, 'forward+backward')):>12}"
        if model_gpu is not None:
            line += "   " + " / ".join(fmt(predicted_ms(problem, prov, m, model_gpu), ".3f")
                                       for m in MEASURE_ORDER)
        lines.append(line)
    errors = {(r.provider, r.note) for r in idx.errors()}
    lines += [f"   {p} failed: {note}" for p, note in sorted(errors)]
    return "\n".join(lines)


def _axis_value(problem: Problem):
    return problem.swept_value if problem.swept else problem.rows


def _sweep_title(sweep: str, dtype: str, problems: List[Problem]) -> str:
    fixed = problems[0]
    varied = problems[0].swept or "rows"
    others = [f"{k}={getattr(fixed, k)}" for k in ("rows", "m", "n", "factor", "o", "dtype")
              if k != varied and not (sweep == "dtype" and k == "dtype")]
    return f"Sweep `{sweep}`{' (' + dtype + ')' if dtype else ''}: {varied} varies; " \
           + ", ".join(others)


def _time_table(idx: ResultIndex, problems: List[Problem], mode: str,
                providers: List[str]) -> List[str]:
    varied = problems[0].swept or "rows"
    others = [p for p in providers if p not in (BASELINE, FLOOR)]
    lines = [f"| {varied} | reference ms | floor ms | reference / floor | "
             + " | ".join(others) + " |",
             "|" + "---|" * (4 + len(others))]
    for p in problems:
        ref_t, floor_t = idx.time(p, BASELINE, mode), idx.time(p, FLOOR, mode)
        cells = [f"{fmt(idx.speedup(p, q, mode))}x / {fmt(idx.over_floor(p, q, mode))}"
                 if idx.time(p, q, mode) is not None
                 else ("error" if idx.error(p, q, mode) else "-") for q in others]
        lines.append(f"| {_axis_value(p)} | {fmt(ref_t, '.3f')} | {fmt(floor_t, '.3f')} | "
                     f"{fmt(idx.over_floor(p, BASELINE, mode))} | " + " | ".join(cells) + " |")
    return lines


def _memory_table(idx: ResultIndex, problems: List[Problem], providers: List[str],
                  gpu: bool) -> List[str]:
    varied = problems[0].swept or "rows"
    provs = [p for p in providers if p != FLOOR]
    lines = [f"| {varied} | " + " | ".join(provs) + " |", "|" + "---|" * (1 + len(provs))]
    for p in problems:
        cells = []
        for q in provs:
            cell = f"{fmt_bytes(idx.saved(p, q))} ({fmt(idx.saved_ratio(p, q))})"
            if gpu:
                peak, ref_peak = idx.peak(p, q, "forward+backward"), \
                    idx.peak(p, BASELINE, "forward+backward")
                ratio = peak / ref_peak if peak is not None and ref_peak else None
                cell += f"; peak {fmt_bytes(peak)} ({fmt(ratio)})"
            cells.append(cell)
        lines.append(f"| {_axis_value(p)} | " + " | ".join(cells) + " |")
    return lines


def _bandwidth_lines(idx: ResultIndex, device: str, peak_gbps: Optional[float]) -> List[str]:
    small = [r for r in idx.rows if r.metric == BANDWIDTH and r.rows <= 16
             and r.device_type == "cuda"]  # the weight-reading bound is a GPU question
    if not small:
        return []
    peak_gbps = peak_gbps or peak_bandwidth_gbps(device)
    lines = ["## Inference (rows <= 16): forward bandwidth", "",
             "Bytes that must move (inputs, weights, biases, output, once each) over the "
             "median forward time. " + (f"Peak taken as {peak_gbps:.0f} GB/s." if peak_gbps
                                        else "Peak bandwidth of this device unknown "
                                             "(`--peak-bandwidth`)."), "",
             "| problem | provider | GB/s | share of peak |", "|---|---|---|---|"]
    seen = set()
    for r in small:
        key = (r.problem().shape_key(), r.provider)
        if key in seen:
            continue
        seen.add(key)
        share = f"{100 * r.value / peak_gbps:.0f}%" if peak_gbps else "-"
        lines.append(f"| {r.problem().label()} | {r.provider} | {r.value:.1f} | {share} |")
    return lines + [""]


def markdown(rows: Sequence[Row], env: Dict[str, object], command: str,
             compile_report: Optional[List[dict]] = None,
             peak_gbps: Optional[float] = None) -> str:
    idx = ResultIndex(rows)
    gpu = env.get("device_type") == "cuda"
    ops = sorted({r.op for r in rows}) or ["fbp"]
    order = max((r.order for r in rows), default=1)
    name = "/".join(o.upper() for o in ops) + (f" (order {order})" if order > 1 else "")
    lines = [f"# {name} benchmark: {env['device']}", ""]
    if not gpu:
        lines += ["> **CPU run.** No GPU was used: these numbers compare the CPU path "
                  "(backend `torch`) with eager PyTorch and `torch.compile`; they say "
                  "nothing about the fused GPU kernels. Shapes are smaller than on a GPU "
                  "(see benchmarks/problems.py).", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", f"Command: `{command}`", "",
              "How to read: each cell is **speedup over the eager reference** (higher is "
              "better) / **time over the floor** (the bare matmuls of that mode: 2 per "
              "block forward, 4 backward, 6 both; 1.00 is the best possible). Memory cells: "
              "bytes kept for backward beyond inputs and parameters (ratio to the "
              "reference)" + ("; peak extra memory of forward+backward (ratio)." if gpu
                              else "."), ""]
    lines += check_targets(idx, gpu)
    for (sweep, dtype), problems in idx.sweeps.items():
        lines += [f"## {_sweep_title(sweep, dtype, problems)}", ""]
        for mode in MEASURE_ORDER:
            lines += [f"**{mode}**", ""] + _time_table(idx, problems, mode, idx.providers) + [""]
        lines += ["**memory**", ""] + _memory_table(idx, problems, idx.providers, gpu) + [""]
    lines += _bandwidth_lines(idx, str(env["device"]), peak_gbps)
    if gpu:
        lines += measured_vs_predicted_lines(idx, costmodel.gpu_for_name(str(env["device"])))
    elif "fbp" in ops:  # the predicted table is FBP's (MFH's: docs/mfh.md)
        lines += predicted_gpu_lines()
    if compile_report:
        keys = list(compile_report[0].keys())
        lines += ["## Triton kernels: compiler resource report", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |"
                  for r in compile_report] + [""]
    errors = sorted({(r.provider, r.mode, r.note) for r in idx.errors()})
    if errors:
        lines += ["## Failures", "", "| provider | mode | error |", "|---|---|---|"]
        lines += [f"| {p} | {m} | {n.replace('|', '/')} |" for p, m, n in errors] + [""]
    return "\n".join(lines)


def predicted_gpu_table(gpu_name: str = "H200", rows=PREDICTED_ROWS,
                        modes=("forward", "forward+backward")) -> List[dict]:
    """Cost-model rows for the MFB default (bf16) at ``rows``: what a CPU run shows
    in place of GPU numbers."""
    from . import model

    shapes = [(f"rows={r}", costmodel.Shape(r, 2048, 1024, 5, 1000, "bf16")) for r in rows]
    others = [costmodel.GPUS[k] for k in ("H100", "H200", "A100")]
    return model.predict_rows(shapes, modes, PREDICTED_PROVIDERS, costmodel.GPUS[gpu_name],
                              others)


def predicted_gpu_text(gpu_name: str = "H200") -> str:
    from . import model

    others = [costmodel.GPUS[k] for k in ("H100", "H200", "A100")]
    head = ("Predicted GPU times (cost model fbp_kernels.costmodel, NOT measured; "
            "MFB default m 2048 n 1024 factor 5 o 1000 bf16):\n  "
            + model.assumptions_text(costmodel.GPUS[gpu_name]))
    return head + "\n" + model.format_text(predicted_gpu_table(gpu_name), others)


def predicted_gpu_lines(gpu_name: str = "H200") -> List[str]:
    """The predicted GPU table of a CPU run's summary.md."""
    from . import model

    others = [costmodel.GPUS[k] for k in ("H100", "H200", "A100")]
    return ["## Predicted GPU times (cost model, not measured)", "",
            "No GPU was used. These are the predictions of `fbp_kernels.costmodel` "
            "(`python benchmarks/model.py`) for the MFB default in bf16; traffic, in-flight "
            f"bytes, waves and ratios are on the {gpu_name}. See benchmarks/README.md, "
            "\"The cost model\", for the assumptions; a GPU measurement replaces them.", "",
            "Assumptions: " + model.assumptions_text(costmodel.GPUS[gpu_name]), ""] + \
        model.format_markdown(predicted_gpu_table(gpu_name), others) + [""]


def measured_vs_predicted_lines(idx: ResultIndex, gpu: costmodel.GPU) -> List[str]:
    """Every measured GPU time beside the model's prediction for the same shape."""
    lines = ["## Measured vs predicted (cost model)", "",
             f"Prediction on the model's {gpu.name} entry (`fbp_kernels.costmodel`); "
             "measured / predicted above 1 means the model was optimistic.", "",
             "| problem | provider | mode | measured ms | predicted ms | measured / predicted |",
             "|---|---|---|---|---|---|"]
    seen = set()
    n = 0
    for (sweep, dtype), problems in idx.sweeps.items():
        for p in problems:
            for prov in idx.providers:
                for mode in MEASURE_ORDER:
                    key = (p.shape_key(), prov, mode)
                    t = idx.time(p, prov, mode)
                    pred = predicted_ms(p, prov, mode, gpu)
                    if key in seen or t is None or pred is None:
                        continue
                    seen.add(key)
                    n += 1
                    lines.append(f"| {p.label()} | {prov} | {mode} | {t:.3f} | {pred:.3f} | "
                                 f"{t / pred:.2f} |")
    return lines + [""] if n else []
