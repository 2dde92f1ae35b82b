"""The measuring loop: every provider, every mode, every metric of one problem.

A provider that fails (torch.compile without a working C++ compiler, a backend
that rejects a dtype, out of memory) is recorded as an ``error`` row with the
message, and the run goes on: one broken provider must not cost the others'
numbers, least of all on a GPU lent for ten minutes.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import measure
from .problems import Problem
from .providers import MODES, Provider, make_inputs
from .results import (BANDWIDTH, ERROR, PEAK_MEMORY, SAVED_BYTES, SAVED_MODE, TIME_MEDIAN,
                      TIME_P20, TIME_P80, Row, make_row)

# Table order: the two end-to-end modes first, then the backward alone.
MEASURE_ORDER = ("forward", "forward+backward", "backward")
assert sorted(MEASURE_ORDER) == sorted(MODES)


@dataclass(frozen=True)
class Settings:
    """How long to measure: on the CPU at least ``min_samples`` samples and
    ``min_run_time`` seconds; on a GPU about ``warmup_ms`` of warm-up and ``rep_ms``
    of timed calls."""

    min_run_time: float = 0.2
    min_samples: int = 5
    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    warmup_calls: int = 2


def _short(exc: BaseException, limit: int = 300) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:limit]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device, collect: bool = False) -> None:
    """Give freed GPU blocks back so the next peak-memory reading starts clean.

    Refcounting frees the providers' tensors; a full ``gc.collect`` (for reference
    cycles) costs up to a second once torch.compile is imported, so it runs once
    per problem only, and after ``gc.freeze`` in :func:`run_problems`.
    """
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_problem(op: str, problem: Problem, providers: Sequence[Provider], device,
                    settings: Settings, env) -> List[Row]:
    """All rows of every provider on one problem (errors included).

    Per mode: every provider is warmed up (compilation happens here), then all
    are timed together (interleaved on the CPU, see measure.time_all), then on a
    GPU each one's peak memory is read.  Saved activations come last, from the
    same built forward (one torch.compile per problem).
    """
    inputs = make_inputs(problem, device)
    kinds = {p.name: p.kind for p in providers}
    rows: List[Row] = []

    def add(name, mode, metric, value, note=""):
        rows.append(make_row(env, op, problem, name, mode, metric, value, note))

    built = {}
    for p in providers:
        try:
            built[p.name] = p.build(problem, inputs)
        except Exception as exc:  # a provider that cannot even start: record, go on
            for mode in MEASURE_ORDER:
                add(p.name, mode, ERROR, float("nan"), _short(exc))

    failed: Dict[str, str] = {}  # provider -> first error
    for mode in MEASURE_ORDER:
        ready = {}
        for name, (fns, _) in built.items():
            if name in failed and kinds[name] == "compile":
                # A compiler that failed once fails again, slowly: do not retry.
                add(name, mode, ERROR, float("nan"), failed[name])
                continue
            try:
                for _ in range(settings.warmup_calls):  # compilation, autotuning, allocator
                    measure.call_once(fns[mode])
                _sync(device)
                ready[name] = fns[mode]
            except Exception as exc:
                failed.setdefault(name, _short(exc))
                add(name, mode, ERROR, float("nan"), _short(exc))
                _free(device)
        timings = measure.time_all(ready, device, min_run_time=settings.min_run_time,
                                   min_samples=settings.min_samples,
                                   warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms)
        for name, t in timings.items():
            if isinstance(t, Exception):
                failed.setdefault(name, _short(t))
                add(name, mode, ERROR, float("nan"), _short(t))
                continue
            add(name, mode, TIME_MEDIAN, t.median_ms, f"{t.samples} samples")
            add(name, mode, TIME_P20, t.p20_ms)
            add(name, mode, TIME_P80, t.p80_ms)
            if mode == "forward":
                add(name, mode, BANDWIDTH, inputs.min_bytes() / (t.median_ms * 1e-3) / 1e9)
            if device.type == "cuda":
                try:
                    add(name, mode, PEAK_MEMORY, measure.peak_memory_bytes(ready[name], device))
                except Exception as exc:
                    add(name, mode, ERROR, float("nan"), "peak memory: " + _short(exc))
                _free(device)

    for name, (fns, forward) in built.items():
        if forward is None or name in failed:
            continue
        try:
            add(name, SAVED_MODE, SAVED_BYTES,
                measure.saved_activation_bytes(forward, inputs.leaves))
        except Exception as exc:
            add(name, SAVED_MODE, ERROR, float("nan"), "saved bytes: " + _short(exc))
        _free(device)
    del built, inputs
    _free(device, collect=True)
    return rows


def run_problems(op: str, problems: Sequence[Problem], providers: Sequence[Provider],
                 device: torch.device, settings: Settings, env,
                 on_problem: Optional[Callable[[Problem, List[Row]], None]] = None,
                 deadline: Optional[float] = None) -> List[Row]:
    """Measure every problem; a shape met again in another sweep is not re-measured,
    its rows are copied under the new sweep's name.

    ``on_problem(problem, rows)`` is called after each problem (to print and to save
    partial results).  Past ``deadline`` (a ``time.monotonic()`` value) no new
    problem starts, so a time-limited run still writes what it has.
    """
    done: Dict[tuple, List[Row]] = {}
    all_rows: List[Row] = []
    gc.freeze()  # imported modules are long-lived: later collections skip them
    for problem in problems:
        if deadline is not None and time.monotonic() > deadline:
            print(f"time budget spent: skipping {problem.label()} [{problem.sweep}] "
                  f"and the rest", flush=True)
            break
        key = problem.shape_key()
        if key in done:
            rows = [replace(r, sweep=problem.sweep, swept=problem.swept) for r in done[key]]
        else:
            rows = measure_problem(op, problem, providers, device, settings, env)
            done[key] = rows
        all_rows += rows
        if on_problem is not None:
            on_problem(problem, rows)
    return all_rows
