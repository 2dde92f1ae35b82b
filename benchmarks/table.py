"""Looking results up: an index over rows, and the ratios every report uses.

speedup    = reference time / provider time   (> 1: faster than the eager baseline)
over_floor = provider time / floor time       (1.00: as fast as the bare matmuls)
saved ratio = provider saved bytes / reference saved bytes
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

from .problems import Problem
from .results import ERROR, PEAK_MEMORY, SAVED_BYTES, SAVED_MODE, TIME_MEDIAN, Row

BASELINE = "reference"
FLOOR = "floor"


class ResultIndex:
    """Rows keyed by (problem shape, provider, mode, metric)."""

    def __init__(self, rows: Iterable[Row]):
        self.rows: List[Row] = list(rows)
        self._by_key: Dict[Tuple, Row] = {}
        self.providers: List[str] = []
        self.sweeps: "OrderedDict[Tuple[str, str], List[Problem]]" = OrderedDict()
        seen = set()
        for r in self.rows:
            p = r.problem()
            self._by_key[(p.shape_key(), r.provider, r.mode, r.metric)] = r
            if r.provider not in self.providers:
                self.providers.append(r.provider)
            # The dtype sweep spans dtypes; every other sweep is grouped per dtype.
            group = (r.sweep, "" if r.sweep == "dtype" else r.dtype)
            if (group, p.shape_key()) not in seen:
                seen.add((group, p.shape_key()))
                self.sweeps.setdefault(group, []).append(p)

    def value(self, problem: Problem, provider: str, mode: str, metric: str) -> Optional[float]:
        r = self._by_key.get((problem.shape_key(), provider, mode, metric))
        if r is None or math.isnan(r.value):
            return None
        return r.value

    def error(self, problem: Problem, provider: str, mode: str) -> Optional[str]:
        r = self._by_key.get((problem.shape_key(), provider, mode, ERROR))
        return r.note if r is not None else None

    def time(self, problem: Problem, provider: str, mode: str) -> Optional[float]:
        return self.value(problem, provider, mode, TIME_MEDIAN)

    def time_ratio(self, problem: Problem, num: str, den: str, mode: str) -> Optional[float]:
        """time(num) / time(den), or None when either is missing."""
        a, b = self.time(problem, num, mode), self.time(problem, den, mode)
        return a / b if a is not None and b else None

    def speedup(self, problem: Problem, provider: str, mode: str) -> Optional[float]:
        return self.time_ratio(problem, BASELINE, provider, mode)

    def over_floor(self, problem: Problem, provider: str, mode: str) -> Optional[float]:
        return self.time_ratio(problem, provider, FLOOR, mode)

    def saved(self, problem: Problem, provider: str) -> Optional[float]:
        return self.value(problem, provider, SAVED_MODE, SAVED_BYTES)

    def saved_ratio(self, problem: Problem, provider: str) -> Optional[float]:
        a, b = self.saved(problem, provider), self.saved(problem, BASELINE)
        return a / b if a is not None and b else None

    def peak(self, problem: Problem, provider: str, mode: str) -> Optional[float]:
        return self.value(problem, provider, mode, PEAK_MEMORY)

    def errors(self) -> List[Row]:
        return [r for r in self.rows if r.metric == ERROR]


def fmt(value: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
