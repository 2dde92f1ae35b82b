"""First contact of the CUDA backend's GEMM engines with a GPU, one engine per process.

``make gpu-check`` runs this before its test phase.  None of the cp.async / TMA engines
(``FBP_CUDA_STAGING`` = async, wide, wgmma) had run on a GPU when they were written; a
wrong mbarrier phase or descriptor bit would hang or corrupt the whole test phase and
spend the GPU session's minutes on nothing.  So each engine first runs one small aligned
bf16 problem (forward and every gradient against the float64 reference) in its own
process under its own timeout:

    python scripts/gpu_smoke.py --out DIR [--timeout 15]

Per engine the status is ``ok``, ``wrong`` (runs, but the result is off: the largest
error relative to the reference's largest value, over the output and gradients, is at
least ``TOLERANCE``), ``error`` (an exception, e.g. a launch failure), ``hang`` (killed
at the timeout) or ``skipped`` (cannot run here: no GPU, or the build/GPU lacks the
engine, with the reason).  An engine that passed is then timed at the MFB default
(rows 1024, m 2048, n 1024, factor 5, o 1000, bf16: forward and forward+backward, CUDA
events, the median of 10 after 3 warm-ups) beside the cost model's prediction for that
engine: the first measurement of each engine.  DIR/smoke.json holds the results;
DIR/staging.env the setting the later phases should use: ``FBP_CUDA_BROKEN_ENGINES``
(the engines that failed), which the extension's ``auto`` passes over for the next
engine the operands allow and which the tests that force an engine skip with a reason.
Empty when nothing failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

# The repository root, so fbp_kernels and benchmarks import without an install (as
# benchmarks/calibrate.py does): a failed `pip install -e .` must not read as engines
# that all erred.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Engines in auto's order of preference (wgmma on sm_90; the 128x128 cp.async one above
#: 128 rows elsewhere; the synchronous one last, for operands cp.async cannot read).
ENGINES = ("wgmma", "wide", "async", "sync")
#: Largest error relative to the reference's largest magnitude that still counts as ok:
#: bf16 rounds each operand at 2^-8; the products of this problem (K 64 and 48, outputs
#: pooled over 5) stay well below 2% (the engine bugs this looks for give O(1) errors).
TOLERANCE = 0.05


def run_child(engine: str) -> Dict[str, object]:
    """Forward and backward on ``engine`` (FBP_CUDA_STAGING is set by the parent)."""
    import torch

    import fbp_kernels
    from fbp_kernels import reference

    from fbp_kernels import backends

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA GPU"}
    why = backends.unsupported_reason("cuda", torch.device("cuda"))
    if why is not None:  # no extension: says nothing of the engine
        return {"status": "skipped", "reason": f"the cuda backend cannot run: {why}"}
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    # 300 rows: three 128-row tiles (the last partial); widths multiples of 8 (aligned
    # rows for cp.async / TMA), K = 5 * 40 = 200 (a partial 128-column tile).
    rows, m, n, factor, o = 300, 64, 48, 5, 40
    x = torch.randn(rows, m, device=dev)
    y = torch.randn(rows, n, device=dev)
    wx = torch.randn(factor * o, m, device=dev) / m ** 0.5
    wy = torch.randn(factor * o, n, device=dev) / n ** 0.5
    bx = torch.randn(factor * o, device=dev) * 0.1
    by = torch.randn(factor * o, device=dev) * 0.1
    inputs = [t.to(dt).requires_grad_() for t in (x, y, wx, wy, bx, by)]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    from fbp_kernels.backends import cuda_build

    try:
        out = fbp_kernels.fbp(*inputs, factor=factor, backend="cuda")
        g = torch.randn_like(out)
        got = [out] + list(torch.autograd.grad(out, inputs, g))
        torch.cuda.synchronize()
    except cuda_build.CudaBuildError as exc:  # no extension: says nothing of the engine
        return {"status": "skipped", "reason": "the CUDA extension is unavailable: " +
                str(exc).splitlines()[0][:240]}
    except RuntimeError as exc:
        text = str(exc)
        if f"FBP_CUDA_STAGING={engine}, but" in text:
            return {"status": "skipped", "reason": text.splitlines()[0][:300]}
        return {"status": "error", "reason": text.splitlines()[0][:300]}
    ref = reference.fbp(*exact, factor=factor)
    want = [ref] + list(torch.autograd.grad(ref, exact, g.double()))
    errors = {}
    for name, a, e in zip(("out", "dx", "dy", "dwx", "dwy", "dbx", "dby"), got, want):
        scale = e.abs().max().item() or 1.0
        errors[name] = (a.double() - e).abs().max().item() / scale
    worst = max(errors.values())
    ok = worst < TOLERANCE and all(torch.isfinite(a).all().item() for a in got)
    result = {"status": "ok" if ok else "wrong", "max_rel_err": worst, "errors": errors,
              "device": torch.cuda.get_device_name()}
    if ok:
        try:  # a correct engine stays ok when its timing or its price fails
            result["timing"] = time_engine(engine)
        except Exception as exc:
            result["timing_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result


def _median_us(fn) -> float:
    from benchmarks.measure import median_event_ms

    return median_event_ms(fn) * 1e3


def predicted_us(engine: str, gpu, rows: int = 1024) -> Dict[str, float]:
    """The cost model's forward and forward+backward microseconds of the CUDA backend on
    ``engine`` (its cuda_engine rule pinned to it) at the MFB default widths; empty for
    the synchronous engine, which the model does not price."""
    from fbp_kernels import costmodel as cm

    if engine not in cm.CUDA_TILES:
        return {}
    shape = cm.Shape(rows=rows, m=2048, n=1024, factor=5, o=1000, dtype="bf16")
    pinned, cm.cuda_engine = cm.cuda_engine, (lambda dtype, r, arch=80: engine)
    try:
        return {mode: cm.predict("cuda", shape, gpu, mode).time_us
                for mode in ("forward", "forward+backward")}
    finally:
        cm.cuda_engine = pinned


def time_engine(engine: str, rows: int = 1024) -> Dict[str, object]:
    """Measured and predicted microseconds of ``engine`` at the MFB default widths."""
    import torch

    import fbp_kernels
    from fbp_kernels import costmodel as cm

    m, n, factor, o = 2048, 1024, 5, 1000
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(rows, m, device=dev, dtype=dt, requires_grad=True)
    y = torch.randn(rows, n, device=dev, dtype=dt, requires_grad=True)
    wx = (torch.randn(factor * o, m, device=dev) / m ** 0.5).to(dt).requires_grad_()
    wy = (torch.randn(factor * o, n, device=dev) / n ** 0.5).to(dt).requires_grad_()
    bx = torch.zeros(factor * o, device=dev, dtype=dt, requires_grad=True)
    by = torch.zeros(factor * o, device=dev, dtype=dt, requires_grad=True)
    args = (x, y, wx, wy, bx, by)
    g = torch.randn(rows, o, device=dev, dtype=dt)

    def forward():
        with torch.no_grad():
            fbp_kernels.fbp(*args, factor=factor, backend="cuda")

    def both():
        out = fbp_kernels.fbp(*args, factor=factor, backend="cuda")
        torch.autograd.grad(out, args, g)

    measured = {"forward": _median_us(forward), "forward+backward": _median_us(both)}
    predicted = predicted_us(engine, cm.gpu_for(dev), rows)
    return {"rows": rows, "measured_us": measured, "predicted_us": predicted}


def fallback(results: Dict[str, Dict[str, object]]) -> Dict[str, str]:
    """The environment the later phases should run with: empty when no engine failed;
    else the failed engines (FBP_CUDA_BROKEN_ENGINES), which the extension's auto mode
    then passes over for the next engine the operands allow (fbp_binding.cpp
    choose_engine).  Not a forced FBP_CUDA_STAGING: a forced engine refuses operands it
    cannot stage (unaligned widths), which would turn every such test into an error."""
    broken = [e for e in ENGINES if results.get(e, {}).get("status") in ("wrong", "error", "hang")]
    return {"FBP_CUDA_BROKEN_ENGINES": ",".join(broken)} if broken else {}


def run_engine_process(cmd: List[str], env: Dict[str, str], timeout: float):
    """The child engine run: its CompletedProcess, or subprocess.TimeoutExpired after
    its whole process group is killed (a child that started an nvcc or ninja build must
    not leave it writing into the build folder after the timeout)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def write_results(out: Path, results: Dict[str, Dict[str, object]]) -> Dict[str, str]:
    """smoke.json and staging.env for the engines so far (rewritten after each one, so
    a parent killed by an outer timeout still leaves what finished)."""
    env = fallback(results)
    for name, text in (("smoke.json", json.dumps({"engines": results, "fallback": env},
                                                  indent=1)),
                       ("staging.env", "".join(f"{k}={v}\n" for k, v in env.items()))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    return env


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".", help="folder for smoke.json and staging.env")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per engine")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # the child's entry point
    args = ap.parse_args(argv)
    if args.engine:
        print(json.dumps(run_child(args.engine)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Dict[str, object]] = {}
    for engine in ENGINES:
        env = {**os.environ, "FBP_CUDA_STAGING": engine}
        start = time.monotonic()
        try:
            proc = run_engine_process([sys.executable, __file__, "--engine", engine], env,
                                      args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            res = (json.loads(lines[-1]) if lines else
                   {"status": "error", "reason": (proc.stderr.strip().splitlines() or
                                                  ["no output"])[-1][:300]})
        except subprocess.TimeoutExpired:
            res = {"status": "hang", "reason": f"killed after {args.timeout:g} s"}
        res["seconds"] = round(time.monotonic() - start, 1)
        results[engine] = res
        timing = res.get("timing", {})
        times = " ".join(f"{k} {v:.0f} us (model {timing['predicted_us'].get(k, float('nan')):.0f})"
                         for k, v in timing.get("measured_us", {}).items())
        print(f"{engine:6} {res['status']:8} {res.get('max_rel_err', '')!s:24} "
              f"{res.get('reason', '')}{times}{res.get('timing_error', '')}", flush=True)
        env = write_results(out, results)
    print("later phases run with: " + (" ".join(f"{k}={v}" for k, v in env.items())
                                       or "the defaults (every engine that could run passed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
