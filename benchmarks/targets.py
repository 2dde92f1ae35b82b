"""The performance targets of issue 5, checked against whatever this run measured.

Each target is a ratio with a threshold, evaluated at every problem in its scope;
the table shows the worst value (and where) and the geometric mean, and a target
passes only if its worst value does.  Targets whose providers or shapes were not
measured in this run are left out rather than reported as passing.

GPU (bf16, problems with rows >= 256), for each fused backend B:
  forward time / floor <= 1.15; at the MFB default shape B is >= 1.5x faster than
  the reference and >= 1.2x faster than torch.compile; forward+backward time / floor
  <= 1.25 with ``B+saved`` and <= 1.45 with B (memory-lean); saved activations of B
  <= 1/8 of the reference's; peak memory of forward+backward below the reference's.
  Forward at rows <= 16: >= 70% of the device's peak memory bandwidth.
CPU (fp32, every problem): backend ``torch`` forward within 1.05x of the reference;
  forward+backward within 1.4x (memory-lean) and 1.05x (``torch+saved``).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

from .environment import peak_bandwidth_gbps
from .problems import GPU_PLAN, Problem
from .results import BANDWIDTH
from .table import BASELINE, ResultIndex, fmt

FUSED_BACKENDS = ("triton", "cuda")


def _check(label: str, problems: List[Problem], fn: Callable[[Problem], Optional[float]],
           threshold: float, higher_is_better: bool = False) -> Optional[str]:
    values = [(v, p) for p in problems for v in [fn(p)] if v is not None]
    if not values:
        return None
    worst, where = (min if higher_is_better else max)(values, key=lambda vp: vp[0])
    geo = math.exp(sum(math.log(v) for v, _ in values) / len(values)) \
        if all(v > 0 for v, _ in values) else None
    ok = worst >= threshold if higher_is_better else worst <= threshold
    sign = ">=" if higher_is_better else "<="
    return (f"| {label} | {sign} {threshold:g} | {fmt(worst, '.3f')} ({where.label()}) | "
            f"{fmt(geo, '.3f')} | {len(values)} | {'pass' if ok else '**FAIL**'} |")


def _unique(problems) -> List[Problem]:
    seen, out = set(), []
    for p in problems:
        if p.shape_key() not in seen:
            seen.add(p.shape_key())
            out.append(p)
    return out


def _gpu_lines(idx: ResultIndex, all_problems: List[Problem]) -> List[Optional[str]]:
    large = [p for p in all_problems if p.dtype == "bf16" and p.rows >= 256]
    centre = [p for p in large if p.shape_key() == GPU_PLAN.centre.shape_key()]
    lines: List[Optional[str]] = []
    for b in FUSED_BACKENDS:
        if b not in idx.providers:
            continue
        s = b + "+saved"
        fb = "forward+backward"
        lines += [
            _check(f"{b} forward / floor", large, lambda p: idx.over_floor(p, b, "forward"), 1.15),
            _check(f"{b} forward speedup over reference (MFB default)", centre,
                   lambda p: idx.speedup(p, b, "forward"), 1.5, True),
            _check(f"{b} forward speedup over compile (MFB default)", centre,
                   lambda p: idx.time_ratio(p, "compile", b, "forward"), 1.2, True),
            _check(f"{s} forward+backward / floor", large,
                   lambda p: idx.over_floor(p, s, fb), 1.25),
            _check(f"{s} forward+backward speedup over reference", large,
                   lambda p: idx.speedup(p, s, fb), 1.0, True),
            _check(f"{s} forward+backward speedup over compile", large,
                   lambda p: idx.time_ratio(p, "compile", s, fb), 1.0, True),
            _check(f"{b} (lean) forward+backward / floor", large,
                   lambda p: idx.over_floor(p, b, fb), 1.45),
            _check(f"{b} saved activations / reference", large,
                   lambda p: idx.saved_ratio(p, b), 0.125),
            _check(f"{b} peak memory forward+backward / reference", large,
                   lambda p: _peak_ratio(idx, p, b), 0.999),
        ]
        peak = peak_bandwidth_gbps(str(idx.rows[0].device)) if idx.rows else None
        if peak:
            small = [p for p in all_problems if p.rows <= 16]
            lines.append(_check(f"{b} forward bandwidth / peak (rows <= 16)", small,
                                lambda p: _share(idx, p, b, peak), 0.7, True))
    return lines


def _peak_ratio(idx: ResultIndex, p: Problem, provider: str) -> Optional[float]:
    a, b = idx.peak(p, provider, "forward+backward"), idx.peak(p, BASELINE, "forward+backward")
    return a / b if a is not None and b else None


def _share(idx: ResultIndex, p: Problem, provider: str, peak: float) -> Optional[float]:
    v = idx.value(p, provider, "forward", BANDWIDTH)
    return v / peak if v is not None else None


def _cpu_lines(idx: ResultIndex, all_problems: List[Problem]) -> List[Optional[str]]:
    fp32 = [p for p in all_problems if p.dtype == "fp32"]
    return [
        _check("torch forward / reference", fp32,
               lambda p: idx.time_ratio(p, "torch", BASELINE, "forward"), 1.05),
        _check("torch (lean) forward+backward / reference", fp32,
               lambda p: idx.time_ratio(p, "torch", BASELINE, "forward+backward"), 1.4),
        _check("torch+saved forward+backward / reference", fp32,
               lambda p: idx.time_ratio(p, "torch+saved", BASELINE, "forward+backward"), 1.05),
        _check("torch (lean) saved activations / reference", fp32,
               lambda p: idx.saved_ratio(p, "torch"), 0.125),
    ]


def check_targets(idx: ResultIndex, gpu: bool) -> List[str]:
    """Markdown lines of the targets table (empty when nothing applies)."""
    problems = _unique(p for ps in idx.sweeps.values() for p in ps)
    checks = [c for c in (_gpu_lines(idx, problems) if gpu else _cpu_lines(idx, problems))
              if c is not None]
    if not checks:
        return []
    return ["## Targets (issue 5)", "",
            "Worst value over the problems in scope (and where), geometric mean, number "
            "of problems. CPU timings on a shared machine are noisy: read the p20-p80 "
            "columns of results.csv before trusting a near miss." if not gpu else
            "Worst value over the bf16 problems with rows >= 256 (and where), geometric "
            "mean, number of problems.", "",
            "| target | threshold | worst (where) | geomean | n | result |",
            "|---|---|---|---|---|---|", *checks, ""]
