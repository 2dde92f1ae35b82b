"""The main benchmark job (``make bench``): every provider, mode and sweep, then the
terminal table, results.csv/json, summary.md and PNG plots in one results folder.

    python benchmarks/run.py                      # GPU if present, else a CPU run
    python benchmarks/run.py --sweep rows,factor  # only some sweeps
    python benchmarks/run.py --smoke --out /tmp/b # seconds: tiny shapes (CI)
    python benchmarks/run.py --op mfh --order 2   # MFH instead of FBP

See benchmarks/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fbp_kernels  # noqa: E402
from fbp_kernels import backends  # noqa: E402
from benchmarks import environment, plots, results, summary  # noqa: E402
from benchmarks.harness import Settings, run_problems  # noqa: E402
from benchmarks.problems import (CPU_PLAN, DEFAULT_SWEEPS, GPU_PLAN, SMOKE_PLAN,  # noqa: E402
                                 expand_sweep_names, sweep_problems)
from benchmarks.providers import providers_for  # noqa: E402
from benchmarks.table import ResultIndex  # noqa: E402

HERE = Path(__file__).resolve().parent
#: Seconds after which a GPU run starts no new problem: a lent GPU allows 10 minutes
#: per command, and the outputs must be written before that.
GPU_TIME_BUDGET_S = 420.0


def _csv_list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda[:i]")
    ap.add_argument("--op", default="fbp", choices=("fbp", "mfh"))
    ap.add_argument("--order", type=int, default=2, help="MFH order (with --op mfh)")
    ap.add_argument("--sweep", type=_csv_list, default=None,
                    help="comma-separated sweeps: rows, m, n (or width), factor, o, dtype, "
                         "aver, all (default: all on GPU; rows,factor,aver on CPU)")
    ap.add_argument("--rows", type=_csv_list, default=None,
                    help="comma-separated row counts of the rows sweep, measured in this "
                         "order (default: the plan's; make gpu-check puts the training "
                         "batches first so a cut run keeps them)")
    ap.add_argument("--dtypes", type=_csv_list, default=None,
                    help="dtypes of the sweeps (default bf16 on GPU, fp32 on CPU); "
                         "the dtype sweep always covers fp32, fp16, bf16 on GPU")
    ap.add_argument("--providers", type=_csv_list, default=None,
                    help="only these providers (reference and floor are always kept)")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the 'compile' provider")
    ap.add_argument("--smoke", "--quick", dest="smoke", action="store_true",
                    help="tiny shapes and short timings: a seconds-long check of the harness")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/out/<device>-<date>/)")
    ap.add_argument("--append", action="store_true",
                    help="merge with results.csv already in --out (split a GPU run into calls)")
    ap.add_argument("--from", dest="from_csv", type=Path, nargs="+", default=None,
                    metavar="CSV", help="measure nothing: rebuild summary and plots in --out "
                                        "from these results.csv files (later files win)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help=f"seconds after which no new problem starts (GPU default "
                         f"{GPU_TIME_BUDGET_S:.0f}, CPU none)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="CPU seconds per measurement (default 0.2; smoke 0.01)")
    ap.add_argument("--rep-ms", type=float, default=None,
                    help="GPU milliseconds of timed calls per measurement (default 50)")
    ap.add_argument("--peak-bandwidth", type=float, default=None,
                    help="device peak memory bandwidth in GB/s (known GPUs: looked up)")
    ap.add_argument("--compile-report", action="store_true",
                    help="also write the Triton kernels' compile report (~400 compiles, minutes: "
                         "off by default, on a GPU too, so a timed run keeps its time budget)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; smoke: 1, since tiny "
                         "shapes only pay threading overhead)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.op == "mfh" and args.order < 2:
        ap.error("--op mfh needs --order >= 2 (order 1 is FBP)")
    if args.rows is not None:
        try:
            args.rows = tuple(int(r) for r in args.rows)
        except ValueError:
            ap.error(f"--rows takes integers, got {','.join(args.rows)}")
        if not args.rows or min(args.rows) < 1:
            ap.error("--rows takes positive integers")
    try:
        expand_sweep_names(args.sweep or [])
        sweep_problems(SMOKE_PLAN, [], args.dtypes or [])  # validates the dtype names
    except ValueError as exc:
        ap.error(str(exc))
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return device


def backend_names(op: str, device: torch.device) -> List[str]:
    """Backends to measure: on CPU only ``torch`` (the Triton interpreter is a testing
    tool, not something to time); on a GPU every backend that can run there."""
    if op == "mfh" and not hasattr(fbp_kernels, "mfh"):
        print("fbp_kernels.mfh does not exist yet: measuring reference, compile and floor only")
        return []
    if device.type != "cuda":
        return ["torch"]
    if op == "mfh":
        # MFH's backends (triton: FBP's wide kernels per block; cuda: FBP's fused C++
        # kernels per block; torch); split has no MFH implementation.
        from fbp_kernels import mfh_ops

        names = [n for n in mfh_ops._MFH_MODULES if mfh_ops.unsupported_reason(n, device) is None]
        for name in mfh_ops._MFH_MODULES:
            if name not in names:
                print(f"backend {name!r} not measured: "
                      f"{mfh_ops.unsupported_reason(name, device)}")
        return names
    names = fbp_kernels.available_backends(device)
    for name in backends.NAMES:
        if name not in names:
            print(f"backend {name!r} not measured: {backends.unsupported_reason(name, device)}")
    # The split strategy (cuBLAS projections + one Triton epilogue) when this version of
    # the package has it and it runs here; available_backends lists it already when the
    # registry does, this only keeps it explicit (and absent when the backend is not).
    names += [n for n in split_backend(device) if n not in names]
    return names


def split_backend(device: torch.device) -> List[str]:
    """``["split"]`` when ``"split" in fbp_kernels.backends.NAMES`` and it can run on
    ``device`` (another branch adds it; without it the benchmark runs as before)."""
    if "split" not in getattr(backends, "NAMES", ()):
        return []
    try:
        return ["split"] if backends.unsupported_reason("split", device) is None else []
    except Exception as exc:  # a half-installed backend must not stop the benchmark
        print(f"backend 'split' not measured: {type(exc).__name__}: {exc}")
        return []


def _as_dict(row) -> dict:
    if isinstance(row, dict):
        return dict(row)
    if hasattr(row, "_asdict"):
        return dict(row._asdict())
    return dict(vars(row))


def compile_report(wanted: bool, timeout_s: float = 240.0) -> Optional[List[dict]]:
    """Registers, spills and shared memory of the Triton kernels, or None.

    ``triton_backend.compile_report()`` when the backend offers it; otherwise the
    ``fbp_kernels.backends.triton_compile`` tool, in a subprocess because it needs
    ``TRITON_INTERPRET`` unset.  Optional: a failure is printed, never fatal.
    """
    if not wanted:
        return None
    try:
        from fbp_kernels.backends import triton_backend
        fn = getattr(triton_backend, "compile_report", None)
        if fn is not None:
            return [_as_dict(r) for r in fn()] or None
        if importlib.util.find_spec("fbp_kernels.backends.triton_compile") is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "report.json"
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = subprocess.run([sys.executable, "-m", "fbp_kernels.backends.triton_compile",
                                   "--json", str(path)], env=env, capture_output=True,
                                  text=True, timeout=timeout_s)
            if not path.exists():  # a non-zero exit with the file means spills: still a report
                print(f"compile report unavailable: {proc.stderr.strip()[-500:]}")
                return None
            return json.loads(path.read_text()) or None
    except (Exception, KeyboardInterrupt) as exc:  # optional: say why it is missing, go on
        # (KeyboardInterrupt: the SIGTERM of a `timeout`, _interrupt: the outputs of what
        # was measured are still written.)
        print(f"compile report unavailable: {type(exc).__name__}: {exc}")
        return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def write_outputs(rows: List[results.Row], env: dict, command: str, out_dir: Path,
                  report: Optional[List[dict]], peak_gbps: Optional[float],
                  with_plots: bool) -> List[str]:
    """results.csv/json, summary.md and the plots; returns the file names."""
    results.write_csv(out_dir / "results.csv", rows)
    results.write_json(out_dir / "results.json", rows, env, command)
    (out_dir / "summary.md").write_text(summary.markdown(rows, env, command, report, peak_gbps))
    written = ["results.csv", "results.json", "summary.md"]
    if with_plots and rows:
        title = f"{rows[0].op} on {env['device']}"
        written += [p.name for p in plots.plot_sweeps(ResultIndex(rows), out_dir, title)]
    return written


def rebuild(args, command: str) -> int:
    """``--from``: merge existing results.csv files and rewrite the reports."""
    if args.out is None:
        raise SystemExit("--from needs --out (the folder to write the merged results to)")
    rows: List[results.Row] = []
    for path in args.from_csv:
        rows = results.merge_rows(rows, results.read_csv(path))
    if not rows:
        raise SystemExit(f"no result rows in {[str(p) for p in args.from_csv]}")
    env = results.read_environment(args.from_csv[0]) or {
        k: getattr(rows[0], k) for k in ("date", "device", "device_type", "torch", "triton",
                                         "cuda")}
    env["merged_from"] = ", ".join(str(p) for p in args.from_csv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = write_outputs(rows, env, command, args.out, None, args.peak_bandwidth,
                            not args.no_plots)
    print(f"wrote {', '.join(written)} to {args.out} ({len(rows)} rows)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in
                                                     (argv if argv is not None else sys.argv[1:]))
    if args.from_csv:
        return rebuild(args, command)
    device = pick_device(args.device)
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)
    gpu = device.type == "cuda"
    plan = SMOKE_PLAN if args.smoke else (GPU_PLAN if gpu else CPU_PLAN)
    if args.rows is not None:
        plan = dataclasses.replace(plan, values={**plan.values, "rows": args.rows})
    sweeps = args.sweep or DEFAULT_SWEEPS["smoke" if args.smoke else device.type]
    dtypes = args.dtypes or [plan.centre.dtype]
    order = args.order if args.op == "mfh" else 1
    problems = sweep_problems(plan, sweeps, dtypes, order=order, smoke=args.smoke)

    providers = providers_for(args.op, backend_names(args.op, device),
                              include_compile=not args.no_compile,
                              compile_backend=args.compile_backend)
    if args.providers:
        keep = set(args.providers) | {"reference", "floor"}
        providers = [p for p in providers if p.name in keep]

    settings = Settings(
        min_run_time=args.min_run_time or (0.01 if args.smoke else 0.2),
        min_samples=3 if args.smoke else 5,
        rep_ms=args.rep_ms or (5.0 if args.smoke else 50.0),
        warmup_ms=2.0 if args.smoke else 10.0,
        warmup_calls=1 if args.smoke else 2,
    )
    budget = args.time_budget if args.time_budget is not None else \
        (GPU_TIME_BUDGET_S if gpu else None)

    env = environment.describe(device)
    out_dir = args.out or environment.default_out_dir(HERE / "out", device)
    out_dir.mkdir(parents=True, exist_ok=True)

    print(("GPU run" if gpu else "CPU run (no GPU: CPU providers only, smaller shapes)")
          + (", smoke sizes" if args.smoke else ""))
    for k, v in env.items():
        print(f"  {k}: {v}")
    print(f"  op: {args.op}{f' order {order}' if order > 1 else ''}; sweeps: {','.join(sweeps)}; "
          f"dtypes: {','.join(dtypes)}; {len(problems)} problems")
    print(f"  providers: {', '.join(p.name for p in providers)}")
    print(f"  centre: {plan.centre.label()}")
    print(f"  results: {out_dir}")
    print(summary.LEGEND, flush=True)

    old_rows: List[results.Row] = []
    if args.append and (out_dir / "results.csv").exists():
        old_rows = results.read_csv(out_dir / "results.csv")
    new_rows: List[results.Row] = []

    def on_problem(problem, rows):
        new_rows.extend(rows)
        print(summary.terminal_table(problem, rows), flush=True)
        # Partial results survive a killed run (a hung kernel ends in SIGKILL, which
        # skips the final write): the rows, and the summary of what was measured so far.
        merged = results.merge_rows(old_rows, new_rows)
        results.write_csv(out_dir / "results.csv", merged)
        (out_dir / "summary.md").write_text(summary.markdown(merged, env, command, None,
                                                             args.peak_bandwidth))

    start = time.monotonic()
    # A `timeout` (as on the lent GPU machine) sends SIGTERM: stop measuring, but
    # still write the summary and plots of what was measured.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_problems(args.op, problems, providers, device, settings, env,
                     on_problem=on_problem,
                     deadline=start + budget if budget is not None else None)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured", flush=True)
        env["note"] = "interrupted: some problems were not measured"
    elapsed = time.monotonic() - start
    env["wall_time_s"] = round(elapsed, 1)
    measured = len({r.problem().shape_key() for r in new_rows})
    if measured < len({p.shape_key() for p in problems}) and "note" not in env:
        env["note"] = "time budget reached: some problems were not measured"

    # Not by default on a GPU either: it compiles every kernel configuration (~400, minutes)
    # after the measured part, which a `timeout` then cuts before the summary is written.
    report = compile_report(args.compile_report)
    written = write_outputs(results.merge_rows(old_rows, new_rows), env, command, out_dir,
                            report, args.peak_bandwidth, not args.no_plots)
    if not gpu and args.op == "fbp":
        # No GPU here: show what the cost model predicts for one (summary.md has it too).
        print("\n" + summary.predicted_gpu_text(), flush=True)
    print(f"\nwall time {elapsed:.1f} s; wrote {', '.join(written)} to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
