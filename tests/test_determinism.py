"""Determinism: under ``torch.use_deterministic_algorithms(True)`` repeated forward and
backward runs are bitwise identical on every backend, or the backend raises
PyTorch's standard error for a nondeterministic operation.

On the CPU the Triton interpreter runs a grid's programs one after another, so a
race between programs (atomics, split reductions) cannot show here; the same test
on a GPU runs larger shapes, with many programs per row and per weight tile, where
it can.
"""

from __future__ import annotations

import pytest
import torch

import fbp_kernels
from helpers import Case, make_inputs

REPEATS = 3
# Small on CPU (the Triton interpreter), large enough on a GPU that rows, outputs
# and the reduction dimension each span several tiles.
CASE = Case((2, 5), (2, 1), 12, 10, 3, 5) if not torch.cuda.is_available() else \
    Case((8, 300), (8, 1), 256, 192, 5, 200)


@pytest.fixture
def deterministic(monkeypatch):
    # cuBLAS needs a fixed workspace configuration to be deterministic; without it
    # PyTorch raises in deterministic mode.  Harmless on the CPU.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def _run(tensors, backend, **kw):
    torch.manual_seed(11)  # the dropout seed is drawn from the CPU generator
    out = fbp_kernels.fbp(*tensors, factor=CASE.factor, backend=backend, **kw)
    g = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
    live = [t for t in tensors if t is not None]
    return [out.detach()] + list(torch.autograd.grad(out, live, g))


@pytest.mark.parametrize("options", [
    {},
    {"save_projections": True},
    {"normalize": False},
    {"dropout": 0.2, "training": True},
], ids=["default", "save_projections", "no-normalize", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_repeated_runs_are_bitwise_identical(options, dtype, backend, device, deterministic):
    tensors = make_inputs(CASE, dtype, device)
    try:
        first = _run(tensors, backend, **options)
    except RuntimeError as exc:
        # The documented alternative: PyTorch's own error for a nondeterministic op.
        assert "deterministic" in str(exc), f"unexpected error: {exc}"
        return
    assert all(torch.isfinite(t).all() for t in first)
    for _ in range(REPEATS - 1):
        again = _run(tensors, backend, **options)
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), (f"tensor {i} differs between runs: max "
                                       f"|diff| {(a - b).abs().max().item():.3g}")

