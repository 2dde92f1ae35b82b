"""Human-readable output: the terminal table of one problem, the markdown summary."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .environment import peak_bandwidth_gbps
from .harness import MEASURE_ORDER
from .problems import Problem
from .results import BANDWIDTH, Row
from .table import BASELINE, FLOOR, ResultIndex, fmt, fmt_bytes
from .targets import check_targets

LEGEND = ("cells: median ms, speedup over the eager reference (x), time over the floor "
          "(f: 1.00 = as fast as the bare matmuls)")


def terminal_table(problem: Problem, rows: Sequence[Row]) -> str:
    """One problem, one line per provider: each mode's time and two ratios, then the
    saved activations (and peak memory on a GPU)."""
    idx = ResultIndex(rows)
    gpu = any(r.device_type == "cuda" for r in rows)
    head = f"{'provider':<14}" + "".join(f"{m:>26}" for m in MEASURE_ORDER) + f"{'saved':>12}"
    head += f"{'peak f+b':>12}" if gpu else ""
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
