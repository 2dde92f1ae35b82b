"""The shapes the benchmark measures: one problem, and named sweeps of problems.

Every sweep varies ONE dimension around a centre shape, so each plot reads as
"what happens when only this grows".  The GPU centre is the MFB default of the
literature (rows 1024, x width m = 2048, y width n = 1024, factor 5, o = 1000).
The CPU centre keeps the layer's real widths but only 128 rows, so that a whole
CPU run (including torch.compile's compilations) fits in a few minutes on 2 cores.

The ``aver`` sweep is the audio-video emotion model's fusion layer
(examples/aver): attention-pooled audio and video vectors per clip, so rows are the
batch (32 to 256 clips); audio m = 1582 (the openSMILE IS10 paralinguistic feature
set), video n = 2048 (a ResNet-50-sized pooled face feature), o = 256, factor 5:
fusion at feature scale.  (examples/aver's default model fuses 64-wide encoded
vectors into 64 outputs, a launch-bound size not worth a sweep.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}


@dataclass(frozen=True)
class Problem:
    """One measured shape.

    ``x (rows, m)``, ``y (rows, n)``, weights ``(factor*o, m)`` and ``(factor*o, n)``
    per block; ``order`` blocks for MFH (1 for FBP).  ``sweep`` and ``swept`` say
    which named sweep the problem belongs to and which field it varies.
    """

    rows: int
    m: int
    n: int
    factor: int
    o: int
    dtype: str = "fp32"
    order: int = 1
    sweep: str = ""
    swept: str = ""
    #: Co-attention: ``regions`` x rows share one y row: x is ``(rows // regions,
    #: regions, m)`` and y ``(rows // regions, 1, n)`` (VQA regions with one question).
    regions: int = 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def swept_value(self):
        """The value of the swept field (a string for the dtype sweep)."""
        return getattr(self, self.swept) if self.swept else None

    def shape_key(self) -> Tuple:
        """Identity of the computation, ignoring which sweep asked for it."""
        return (self.rows, self.m, self.n, self.factor, self.o, self.dtype, self.order,
                self.regions)

    @property
    def y_rows(self) -> int:
        """Distinct rows of y (one per ``regions`` rows of x)."""
        return self.rows // self.regions

    def label(self) -> str:
        text = (f"rows={self.rows} m={self.m} n={self.n} factor={self.factor} o={self.o} "
                f"{self.dtype}")
        if self.regions > 1:
            text += f" coatt B={self.y_rows} R={self.regions}"
        return text + (f" order={self.order}" if self.order > 1 else "")

    def matmul_flops(self) -> int:
        """Floating-point operations of the forward's two projections (all blocks)."""
        return 2 * self.rows * self.factor * self.o * (self.m + self.n) * self.order


@dataclass(frozen=True)
class Plan:
    """A centre shape and the values each named sweep takes (None: not in this plan)."""

    centre: Problem
    values: Dict[str, Tuple]
    aver_rows: Tuple[int, ...]
    #: Co-attention sweep: ``coatt_batch`` questions, each fused with R regions, R over
    #: ``coatt_regions`` (issue 12: B 64, R 100 at the MFB widths on a GPU).
    coatt_batch: int = 64
    coatt_regions: Tuple[int, ...] = (10, 36, 100)


# Sweep name -> the Problem field it varies.  "dtype", "aver" and "coatt" are special.
SWEEP_FIELDS = {"rows": "rows", "m": "m", "n": "n", "factor": "factor", "o": "o",
                "dtype": "dtype", "aver": "rows", "coatt": "regions"}
#: Shorthands accepted by ``--sweep``.
SWEEP_GROUPS = {"width": ("m", "n"), "all": tuple(SWEEP_FIELDS)}

GPU_PLAN = Plan(
    centre=Problem(rows=1024, m=2048, n=1024, factor=5, o=1000, dtype="bf16"),
    values={
        "rows": (1, 4, 16, 64, 256, 1024, 4096, 16384),
        "m": (512, 1024, 2048, 4096),
        "n": (512, 1024, 2048, 4096),
        "factor": (1, 2, 3, 5, 8, 10),
        "o": (256, 512, 1000, 2048),
        "dtype": ("fp32", "fp16", "bf16"),
    },
    aver_rows=(32, 64, 128, 256),
)

CPU_PLAN = Plan(
    centre=Problem(rows=128, m=2048, n=1024, factor=5, o=1000, dtype="fp32"),
    values={
        "rows": (1, 16, 128, 256),
        "m": (512, 2048, 4096),
        "n": (512, 1024, 4096),
        "factor": (1, 5, 10),
        "o": (256, 1000, 2048),
        "dtype": ("fp32",),
    },
    aver_rows=(32, 128),
    coatt_batch=8,
    coatt_regions=(4, 16),
)

# Seconds-long: for the CI smoke test and for trying the harness out.
SMOKE_PLAN = Plan(
    centre=Problem(rows=8, m=32, n=24, factor=3, o=16, dtype="fp32"),
    values={"rows": (2, 8), "m": (16, 32), "n": (24, 48), "factor": (1, 3), "o": (8, 16),
            "dtype": ("fp32",)},
    aver_rows=(4,),
    coatt_batch=2,
    coatt_regions=(3,),
)

# On a GPU the most telling sweeps come first: a time-limited run drops the last ones.
DEFAULT_SWEEPS = {"cuda": ("dtype", "rows", "coatt", "aver", "factor", "o", "m", "n"),
                  "cpu": ("rows", "factor", "aver"),
                  "smoke": ("rows", "factor")}

AVER_SHAPE = dict(m=1582, n=2048, o=256, factor=5)


def expand_sweep_names(names: Sequence[str]) -> List[str]:
    """``["width", "rows"]`` -> ``["m", "n", "rows"]``; raises ValueError on unknown names."""
    out: List[str] = []
    for name in names:
        group = SWEEP_GROUPS.get(name, (name,))
        for g in group:
            if g not in SWEEP_FIELDS:
                known = sorted(set(SWEEP_FIELDS) | set(SWEEP_GROUPS))
                raise ValueError(f"unknown sweep {name!r}; choose from {known}")
            if g not in out:
                out.append(g)
    return out


def sweep_problems(plan: Plan, sweeps: Sequence[str], dtypes: Sequence[str],
                   order: int = 1, smoke: bool = False) -> List[Problem]:
    """The problems of ``sweeps`` for each dtype of ``dtypes``, in run order.

    The dtype sweep runs once (it is itself over dtypes).  Centre points shared
    by several sweeps appear once per sweep, tagged with that sweep; the runner
    measures each distinct shape only once.
    """
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    problems: List[Problem] = []
    for sweep in expand_sweep_names(sweeps):
        field = SWEEP_FIELDS[sweep]
        if sweep == "dtype":
            for d in plan.values["dtype"]:
                problems.append(replace(plan.centre, dtype=d, order=order, sweep=sweep,
                                        swept=field))
            continue
        for d in dtypes:
            if sweep == "coatt":
                for r in plan.coatt_regions:
                    problems.append(replace(plan.centre, dtype=d, order=order, sweep=sweep,
                                            swept=field, regions=r,
                                            rows=plan.coatt_batch * r))
                continue
            if sweep == "aver":
                base = plan.centre if smoke else replace(plan.centre, **AVER_SHAPE)
                values = plan.aver_rows
            else:
                base, values = plan.centre, plan.values[sweep]
            for v in values:
                problems.append(replace(base, dtype=d, order=order, sweep=sweep, swept=field,
                                        **{field: v}))
    return problems
