"""Regression-tracking suite: ``pytest benchmarks --benchmark-only`` (``make bench-pytest``).

A few fixed shapes, every provider but torch.compile (its compile time would
dominate the suite; the main job ``benchmarks/run.py`` measures it), forward and
forward+backward.  pytest-benchmark keeps the history
(``--benchmark-autosave``, ``--benchmark-compare``); nothing here asserts a speed,
so it never decides whether the test suite passes (``pytest`` alone collects only
``tests/``, see pyproject.toml).
"""

from __future__ import annotations

import pytest
import torch

import fbp_kernels

from .measure import call_once
from .problems import Problem
from .providers import make_inputs, providers_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if DEVICE.type == "cuda":
    SHAPES = {
        "mfb-default": Problem(rows=1024, m=2048, n=1024, factor=5, o=1000, dtype="bf16"),
        "inference-rows16": Problem(rows=16, m=2048, n=1024, factor=5, o=1000, dtype="bf16"),
        "aver-batch64": Problem(rows=64, m=1582, n=2048, factor=5, o=256, dtype="bf16"),
    }
    BACKENDS = fbp_kernels.available_backends(DEVICE)
else:
    # Small enough for a 2-core machine: each case takes well under a second.
    SHAPES = {
        "cpu-small": Problem(rows=64, m=512, n=256, factor=5, o=200),
        "aver-batch32": Problem(rows=32, m=1582, n=2048, factor=5, o=256),
    }
    BACKENDS = ["torch"]

PROVIDERS = {p.name: p for p in providers_for("fbp", BACKENDS, include_compile=False)}


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fbp(benchmark, shape, provider, mode):
    problem = SHAPES[shape]
    modes, _ = PROVIDERS[provider].build(problem, make_inputs(problem, DEVICE))
    work = modes[mode]

    def call():
        call_once(work)
        _sync()  # pytest-benchmark reads a host clock: wait for the GPU's work

    benchmark.group = f"{shape}-{mode}"
    benchmark.extra_info.update(device=str(DEVICE), problem=problem.label())
    benchmark.pedantic(call, warmup_rounds=2, rounds=10, iterations=1)
