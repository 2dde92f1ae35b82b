"""The warp-specialised Gluon forward (fbp_kernels/backends/gluon_wide.py).

Gluon has no interpreter, so on a CPU machine this checks what can be checked without a
GPU: the kernel compiles for sm_90 with the dev Triton and with Triton 3.6 with the
facts its design rests on (wgmma, TMA, the producer/consumer register split, no spills,
the tile's FLOP per byte and bytes in flight), and the opt-in switch leaves every other
call, and every call on a CPU, to the Triton kernel.  On a GPU (sm_90+) its output is
compared with the reference and with the Triton kernel.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fbp_kernels
from fbp_kernels.reference import fbp as fbp_reference

pytest.importorskip("triton", reason="Triton is not installed")

TRITON_36 = Path(__file__).resolve().parents[1] / ".venv" / "triton-3.6"
ROOT = str(Path(__file__).resolve().parents[1])


def _versions():
    yield pytest.param(None, id="dev-triton")
    marks = [] if (TRITON_36 / "triton").is_dir() else [pytest.mark.skip(
        reason=f"Triton 3.6 not installed at {TRITON_36} (`make setup` installs it)")]
    yield pytest.param(TRITON_36, id="triton-3.6", marks=marks)


@pytest.fixture(scope="module", params=list(_versions()))
def facts(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        ([str(request.param)] if request.param is not None else []) + [ROOT,
                                                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "fbp_kernels.backends.gluon_wide"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    if request.param is not None:
        assert all(r["triton"].startswith("3.6") for r in rows), rows
    return rows


def test_compiles_for_sm90_with_the_design_facts(facts):
    """Every (dtype, factor) build: wgmma fed by TMA, the producer warp's registers cut
    to at most 40 and the consumers' raised to at least 232 (setmaxnreg: what makes the
    split worth it), no spill stack, one CTA's shared memory within sm_90's 227 KiB."""
    assert {(r["dtype"], r["factor"]) for r in facts} == \
        {(d, f) for d in ("bf16", "fp16") for f in (1, 2, 5, 7)}
    for r in facts:
        assert r["wgmma"] and r["tma"], r
        assert r["stack_bytes"] == 0, r
        assert 0 < r["shared_bytes"] <= 227 * 1024, r
        budgets = [n for _, n in r["setmaxnreg"]]
        assert budgets and min(budgets) <= 40 and max(budgets) >= 232, r


def test_tile_meets_the_main_loop_thresholds(facts):
    """The issue's thresholds for the sm_90 bf16 training main loop: >= 64 FLOP per L2
    byte and >= 64 KiB in flight per SM (one CTA per SM at this shared memory)."""
    for r in facts:
        assert r["flop_per_byte"] >= 64 and r["inflight_bytes_per_sm"] >= 64 * 1024, r
        assert r["shared_bytes"] > 227 * 1024 // 2  # so one CTA per SM, as counted


def test_pooling_width_holds_every_tiles_outputs():
    from fbp_kernels.backends import gluon_wide as G

    for factor in range(1, 33):
        block_j, block_jp = G.config_outputs(factor)
        assert block_j * factor <= G.BLOCK_N and block_j <= block_jp
        assert block_jp & (block_jp - 1) == 0 and (factor == 1 or block_jp >= 16)
        assert (block_j * factor) % 4 == 0  # dropout-stream tile origins (shared rule)


def _problem(dtype, device, rows=300, m=200, n=136, factor=5, o=37, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, m, generator=g)
    y = torch.randn(rows, n, generator=g)
    wx = torch.randn(factor * o, m, generator=g) * m ** -0.5
    wy = torch.randn(factor * o, n, generator=g) * n ** -0.5
    bx = torch.randn(factor * o, generator=g) * 0.1 if bias else None
    by = torch.randn(factor * o, generator=g) * 0.1 if bias else None
    return [t.to(device, dtype) if t is not None else None for t in (x, y, wx, wy, bx, by)]


def test_switch_leaves_cpu_calls_to_the_triton_kernel(monkeypatch):
    """With the switch on, CPU tensors (and the interpreter) still run the Triton kernel:
    the Gluon launcher is never reached, and the result is the switch-off result."""
    from fbp_kernels import backends
    from fbp_kernels.backends import gluon_wide as G

    if backends.unsupported_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("the Triton backend does not run on this machine's CPU")
    args = _problem(torch.float32, "cpu", rows=20, m=24, n=16, o=6)
    off = fbp_kernels.fbp(*args, factor=5, backend="triton")
    monkeypatch.setenv(G.ENGINE_ENV, "gluon")
    monkeypatch.setattr(G, "gluon_pooled", lambda *a, **k: pytest.fail("Gluon launched"))
    on = fbp_kernels.fbp(*args, factor=5, backend="triton")
    assert torch.equal(on, off)


def test_applies_only_to_the_calls_it_covers():
    from fbp_kernels.backends import gluon_wide as G

    x, y, wx, wy, _, _ = _problem(torch.bfloat16, "cpu")
    kw = dict(dropout=0.0, seed=None, activation=None, shared=0, chained=False)
    assert not G.applies(x, y, wx, wy, 5, **kw)  # a CPU tensor
    assert not G.covers(1024, torch.bfloat16, "cpu")
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        d = [t.cuda() for t in (x, y, wx, wy)]
        assert G.applies(*d, 5, **kw)
        assert not G.applies(*d, 5, **{**kw, "seed": 1})
        assert not G.applies(*d, 5, **{**kw, "activation": "relu"})
        assert not G.applies(*d, 5, **{**kw, "shared": 4})
        assert not G.applies(*d[:1], d[1][:, :-3].contiguous(), *d[2:], 5, **kw)  # 266-B rows
        assert not G.applies(d[0][:64], d[1][:64], *d[2:], 5, **kw)  # small batch
        assert G.covers(65, torch.float16, d[0].device)
        assert not G.covers(1024, torch.float32, d[0].device)


GPU90 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
    reason="the Gluon kernel needs an sm_90+ CUDA GPU")


@GPU90
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("factor", [1, 2, 5, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_the_reference_and_the_triton_kernel(monkeypatch, dtype, factor, bias):
    """Sizes that are not tile multiples (rows 300, m 200 and n 136: K tails of 8 and
    rows past the last 128-row tile, o 37), normalised and not: within twice the eager
    reference's own error against float64 plus a floor of a few ulp (test_correctness's
    rule), and so within twice that of the Triton kernel, which it replaces."""
    from helpers import error_vs
    from fbp_kernels.backends import gluon_wide as G

    floor = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    args = _problem(dtype, "cuda", factor=factor, bias=bias)
    exact_args = [t.double() if t is not None else None for t in args]
    launched = []
    real = G.gluon_pooled
    monkeypatch.setattr(G, "gluon_pooled",
                        lambda *a, **k: (launched.append(1), real(*a, **k))[1])
    for normalize in (False, True):
        exact = fbp_reference(*exact_args, factor=factor, normalize=normalize)
        eager = fbp_reference(*args, factor=factor, normalize=normalize)
        triton_out = fbp_kernels.fbp(*args, factor=factor, normalize=normalize,
                                     backend="triton")
        monkeypatch.setenv(G.ENGINE_ENV, "gluon")
        got = fbp_kernels.fbp(*args, factor=factor, normalize=normalize, backend="triton")
        monkeypatch.delenv(G.ENGINE_ENV)
        torch.cuda.synchronize()
        bound = 2 * error_vs(eager, exact) + floor
        assert error_vs(got, exact) <= bound, (normalize, error_vs(got, exact), bound)
        # Both within `bound` of the exact result, so within twice it of each other.
        assert error_vs(got, triton_out.double()) <= 2 * bound, normalize
    assert len(launched) == 2  # the Gluon kernel ran, once per call


@GPU90
def test_large_batch_and_repeat_launches_are_deterministic(monkeypatch):
    """The MFB default at rows 2048 (16 row tiles, 42 output tiles: many waves of the
    ring's phases): two launches bitwise equal, and within the tolerance rule above."""
    from helpers import error_vs
    from fbp_kernels.backends import gluon_wide as G

    args = _problem(torch.bfloat16, "cuda", rows=2048, m=2048, n=1024, factor=5, o=1000)
    monkeypatch.setenv(G.ENGINE_ENV, "gluon")
    a = fbp_kernels.fbp(*args, factor=5, backend="triton")
    b = fbp_kernels.fbp(*args, factor=5, backend="triton")
    monkeypatch.delenv(G.ENGINE_ENV)
    assert torch.equal(a, b)
    exact = fbp_reference(*[t.double() for t in args], factor=5)
    eager = fbp_reference(*args, factor=5)
    assert error_vs(a, exact) <= 2 * error_vs(eager, exact) + 1.6e-2
