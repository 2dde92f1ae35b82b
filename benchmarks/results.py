"""Machine-readable results: one row per (problem, provider, mode, metric).

The long format keeps every file self-describing: each row carries the device,
the versions and the date, so rows from several runs (or machines) can be
concatenated and compared.  ``results.csv`` holds the rows; ``results.json`` holds
the same rows plus the run's environment and command line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .problems import Problem

# Metric names and their units.
TIME_MEDIAN = "time_median_ms"
TIME_P20 = "time_p20_ms"
TIME_P80 = "time_p80_ms"
PEAK_MEMORY = "peak_memory_bytes"
SAVED_BYTES = "saved_activation_bytes"
BANDWIDTH = "bandwidth_gbps"
ERROR = "error"  # value NaN, the message in ``note``
UNITS = {TIME_MEDIAN: "ms", TIME_P20: "ms", TIME_P80: "ms", PEAK_MEMORY: "bytes",
         SAVED_BYTES: "bytes", BANDWIDTH: "GB/s", ERROR: ""}

#: Mode under which saved-activation bytes are reported (they are a property of a
#: training forward, whose only purpose is the backward that follows).
SAVED_MODE = "forward+backward"


@dataclass
class Row:
    date: str
    device: str
    device_type: str
    torch: str
    triton: str
    cuda: str
    op: str
    sweep: str
    swept: str
    dtype: str
    rows: int
    m: int
    n: int
    factor: int
    o: int
    order: int
    provider: str
    mode: str
    metric: str
    value: float
    unit: str
    note: str = ""
    regions: int = 1  # last, with a default: CSVs written before it still read

    def problem(self) -> Problem:
        return Problem(rows=self.rows, m=self.m, n=self.n, factor=self.factor, o=self.o,
                       dtype=self.dtype, order=self.order, sweep=self.sweep, swept=self.swept,
                       regions=self.regions)


FIELDS = [f.name for f in fields(Row)]
_INT_FIELDS = {"rows", "m", "n", "factor", "o", "order", "regions"}


def make_row(env: Dict[str, object], op: str, problem: Problem, provider: str, mode: str,
             metric: str, value: float, note: str = "") -> Row:
    return Row(date=str(env["date"]), device=str(env["device"]),
               device_type=str(env["device_type"]), torch=str(env["torch"]),
               triton=str(env["triton"] or ""), cuda=str(env["cuda"] or ""), op=op,
               sweep=problem.sweep, swept=problem.swept, dtype=problem.dtype,
               rows=problem.rows, m=problem.m, n=problem.n, factor=problem.factor,
               o=problem.o, order=problem.order, provider=provider, mode=mode,
               metric=metric, value=float(value), unit=UNITS.get(metric, ""), note=note,
               regions=problem.regions)


def write_csv(path: Path, rows: Iterable[Row]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def read_csv(path: Path) -> List[Row]:
    out = []
    with open(path, newline="") as f:
        for d in csv.DictReader(f):
            kw = {k: (int(v) if k in _INT_FIELDS else v) for k, v in d.items()}
            kw["value"] = float(d["value"]) if d["value"] not in ("", "nan") else math.nan
            out.append(Row(**kw))
    return out


def write_json(path: Path, rows: Iterable[Row], env: Dict[str, object],
               command: Optional[str] = None) -> None:
    doc = {"environment": env, "command": command,
           "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in asdict(r).items()} for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _key(r: Row):
    return (r.op, r.sweep, r.problem().shape_key(), r.provider, r.mode, r.metric)


def merge_rows(old: Iterable[Row], new: Iterable[Row]) -> List[Row]:
    """``old`` then ``new``; where both have a row for the same (op, sweep, shape,
    provider, mode, metric), the new one wins."""
    new = list(new)
    fresh = {_key(r) for r in new}
    return [r for r in old if _key(r) not in fresh] + new


def read_environment(csv_path: Path) -> Optional[Dict[str, object]]:
    """The environment stored in the ``results.json`` beside ``csv_path``, if any."""
    path = Path(csv_path).with_name("results.json")
    try:
        return json.loads(path.read_text())["environment"]
    except (OSError, ValueError, KeyError):
        return None
