"""The benchmark harness (benchmarks/): a CI-sized run produces its files with sane
contents, and the measuring pieces count what they claim to count.

Timing *values* are never asserted (a shared CI machine makes them noise); what is
asserted is structure, consistency (p20 <= median <= p80) and the byte counts,
which are exact.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import measure, summary  # noqa: E402
from benchmarks.harness import Settings, run_problems  # noqa: E402
from benchmarks.problems import SMOKE_PLAN, Problem, sweep_problems  # noqa: E402
from benchmarks.providers import Provider, make_inputs, providers_for  # noqa: E402
from benchmarks.results import ERROR, SAVED_BYTES, TIME_MEDIAN, make_row  # noqa: E402
from benchmarks.table import ResultIndex  # noqa: E402

MODES = {"forward", "backward", "forward+backward"}
TINY = Problem(rows=4, m=6, n=5, factor=3, o=4)
FAST = Settings(min_run_time=0.001, min_samples=2, warmup_ms=1.0, rep_ms=2.0, warmup_calls=1)
ENV = {"date": "2026-01-01T00:00:00Z", "device": "test", "device_type": "cpu",
       "torch": torch.__version__, "triton": None, "cuda": None}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `run.py --smoke` in a subprocess, as `make bench BENCH_ARGS=--smoke` runs it.

    torch.compile goes through its "eager" backend here: it still exercises dynamo's
    tracing of the reference, without inductor's C++ compile (tens of seconds).
    """
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(out),
         "--compile-backend", "eager"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"run.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def test_smoke_run_writes_every_output(smoke_run):
    out, stdout = smoke_run
    for name in ("results.csv", "results.json", "summary.md", "plot-rows-fp32.png",
                 "plot-factor-fp32.png"):
        assert (out / name).is_file(), f"{name} missing; got {sorted(os.listdir(out))}"
    for png in out.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    # The terminal table names the device and the providers.
    assert "CPU run" in stdout or "GPU run" in stdout
    assert "torch+saved" in stdout and "floor" in stdout
    if not torch.cuda.is_available():
        # Without a GPU the cost model's predicted GPU table is printed beside the CPU run.
        assert "Predicted GPU times (cost model" in stdout
        assert "rows=16384" in stdout and "split" in stdout


def test_smoke_rows_are_complete_and_consistent(smoke_run):
    out, _ = smoke_run
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    errors = [r for r in rows if r["metric"] == ERROR]
    assert not errors, f"providers failed: {[(r['provider'], r['note']) for r in errors]}"
    providers = {r["provider"] for r in rows}
    assert {"reference", "compile", "torch", "torch+saved", "floor"} <= providers
    for key in ("device", "torch", "date", "dtype", "rows", "m", "n", "factor", "o"):
        assert all(r[key] for r in rows), f"empty {key} in some row"

    times = {}
    for r in rows:
        times[(r["sweep"], r["rows"], r["factor"], r["provider"], r["mode"], r["metric"])] = \
            float(r["value"])
    medians = [(k, v) for k, v in times.items() if k[-1] == TIME_MEDIAN]
    # 2 sweeps x 2 points x every provider x 3 modes.
    assert len(medians) == 2 * 2 * len(providers) * 3
    assert {k[4] for k, _ in medians} == MODES
    for k, med in medians:
        p20, p80 = times[k[:-1] + ("time_p20_ms",)], times[k[:-1] + ("time_p80_ms",)]
        assert 0 < p20 <= med <= p80 and math.isfinite(p80), (k, p20, med, p80)

    saved = {(r["rows"], r["factor"], r["provider"]): int(float(r["value"]))
             for r in rows if r["metric"] == SAVED_BYTES}
    for (nrows, factor, prov), value in saved.items():
        if prov == "torch":  # lean: only the output (rows, o) and the row norm (rows,)
            o = SMOKE_PLAN.centre.o
            assert value == int(nrows) * (o + 1) * 4, (nrows, factor, value)
        assert value < saved[(nrows, factor, "reference")] or prov in ("reference", "compile")


def test_smoke_json_and_markdown(smoke_run):
    out, _ = smoke_run
    doc = json.loads((out / "results.json").read_text())
    assert doc["environment"]["torch"] == torch.__version__
    assert doc["environment"]["device"]
    with open(out / "results.csv", newline="") as f:
        assert len(doc["rows"]) == sum(1 for _ in csv.DictReader(f))
    md = (out / "summary.md").read_text()
    if not torch.cuda.is_available():
        assert "**CPU run.**" in md
    assert "## Sweep `rows` (fp32)" in md and "## Sweep `factor` (fp32)" in md
    assert "## Targets (issue 5)" in md
    if not torch.cuda.is_available():
        assert "## Predicted GPU times (cost model, not measured)" in md
        table = md.split("## Predicted GPU times")[1]
        for rows in (1, 16, 256, 1024, 16384):
            assert f"| rows={rows} | forward | fused |" in table
            assert f"| rows={rows} | forward+backward | split |" in table
    assert "| torch forward / reference |" in md or torch.cuda.is_available()


def test_saved_activation_bytes_are_exact():
    """Lean backend keeps (rows, o) + (rows,); +saved adds both projections; the
    reference keeps at least the projections; inputs and parameters never count."""
    p = TINY
    inp = make_inputs(p, torch.device("cpu"))
    provs = {q.name: q for q in providers_for("fbp", ["torch"], include_compile=False)}
    count = {name: measure.saved_activation_bytes(provs[name].make_forward(p, inp), inp.leaves)
             for name in ("reference", "torch", "torch+saved")}
    ko, el = p.factor * p.o, 4
    assert count["torch"] == p.rows * (p.o + 1) * el
    assert count["torch+saved"] == count["torch"] + 2 * p.rows * ko * el
    assert count["reference"] >= 2 * p.rows * ko * el
    # A forward that saves nothing but its inputs counts zero.
    assert measure.saved_activation_bytes(lambda: inp.x * inp.y[:, :1], inp.leaves) == 0


def test_timing_summary_percentiles():
    t = measure.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.samples) == (3.0, 1.8, 4.2, 5)
    with pytest.raises(ValueError):
        measure.summarize([])
    cpu = measure.time_cpu(lambda: torch.ones(8).sum(), min_run_time=0.005, min_samples=3)
    assert cpu.samples >= 3 and 0 < cpu.p20_ms <= cpu.median_ms <= cpu.p80_ms


def test_interleaved_timing_isolates_a_failing_call():
    """Round-robin CPU timing: each call gets its samples; one that starts failing
    midway is reported as its exception without stopping the others; a setup runs
    before every sample and is not timed."""
    calls = {"n": 0, "setups": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("broke after 3 calls")

    def setup():
        calls["setups"] += 1
        time.sleep(0.02)  # would dominate the timing if it were inside it

    out = measure.time_cpu_interleaved(
        {"ok": lambda: None, "flaky": flaky,
         "with_setup": measure.Call(lambda: None, setup=setup)},
        min_run_time=0.01, min_samples=4)
    assert isinstance(out["flaky"], RuntimeError)
    assert out["ok"].samples >= 4
    assert out["with_setup"].samples >= 4 and calls["setups"] == out["with_setup"].samples + 1
    assert out["with_setup"].median_ms < 5.0


def test_sweeps_vary_one_dimension_around_the_centre():
    problems = sweep_problems(SMOKE_PLAN, ["rows", "width"], ["fp32"])
    centre = SMOKE_PLAN.centre
    assert [p.sweep for p in problems] == ["rows"] * 2 + ["m"] * 2 + ["n"] * 2
    for p in problems:
        diffs = [f for f in ("rows", "m", "n", "factor", "o") if getattr(p, f) != getattr(centre, f)]
        assert set(diffs) <= {p.swept}
    with pytest.raises(ValueError, match="unknown sweep"):
        sweep_problems(SMOKE_PLAN, ["nope"], ["fp32"])
    with pytest.raises(ValueError, match="unknown dtype"):
        sweep_problems(SMOKE_PLAN, ["rows"], ["fp8"])
    # The command line rejects them before measuring anything (usage error, exit 2).
    from benchmarks import run
    for bad in (["--sweep", "rowz"], ["--dtypes", "fp8"], ["--op", "mfh", "--order", "1"]):
        with pytest.raises(SystemExit) as info:
            run.parse_args(bad)
        assert info.value.code == 2, bad


def test_a_failing_provider_is_recorded_not_fatal():
    def broken_build(problem, inputs):
        raise RuntimeError("no compiler here")

    def half_broken(problem, inputs):
        ok = lambda: inputs.x + 1  # noqa: E731
        def bad():
            raise NotImplementedError("backward missing")
        return {"forward": ok, "backward": bad, "forward+backward": bad}

    provs = providers_for("fbp", [], include_compile=False)
    provs += [Provider("broken", "compile", make_modes=broken_build),
              Provider("half", "backend", make_modes=half_broken)]
    rows = run_problems("fbp", [TINY], provs, torch.device("cpu"), FAST, ENV)
    idx = ResultIndex(rows)
    assert all("no compiler here" in (idx.error(TINY, "broken", m) or "") for m in MODES)
    assert idx.time(TINY, "half", "forward") is not None
    assert "backward missing" in idx.error(TINY, "half", "backward")
    assert idx.time(TINY, "reference", "forward+backward") is not None
    assert "half failed: NotImplementedError" in summary.terminal_table(TINY, rows)


def test_targets_pass_and_fail_on_the_worst_point():
    """The targets table reports the worst problem and fails on it."""
    def rows_for(p, ratio):
        out = []
        for prov, t in (("reference", 1.0), ("torch", ratio), ("floor", 0.5)):
            out.append(make_row(ENV, "fbp", p, prov, "forward", TIME_MEDIAN, t))
        return out

    a = Problem(rows=8, m=4, n=4, factor=2, o=3, sweep="rows", swept="rows")
    b = Problem(rows=16, m=4, n=4, factor=2, o=3, sweep="rows", swept="rows")
    md = summary.markdown(rows_for(a, 1.0) + rows_for(b, 1.02), ENV, "cmd")
    assert "| torch forward / reference | <= 1.05 | 1.020 (rows=16" in md and "| pass |" in md
    md = summary.markdown(rows_for(a, 1.3) + rows_for(b, 1.02), ENV, "cmd")
    assert "1.300 (rows=8" in md and "**FAIL**" in md


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_timing_and_peak_memory():
    dev = torch.device("cuda")
    a = torch.randn(512, 512, device=dev)
    t = measure.time_cuda(lambda: a @ a, dev, warmup_ms=1, rep_ms=5)
    assert t.samples >= 10 and 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    mib = 2**20
    peak = measure.peak_memory_bytes(lambda: torch.empty(mib, dtype=torch.int8, device=dev), dev)
    assert mib <= peak < 4 * mib


def test_append_merges_runs_into_one_folder(tmp_path):
    """Two calls with --append (a GPU run split across device calls) give one set of
    results covering both sweeps."""
    from benchmarks import run

    threads = torch.get_num_threads()
    common = ["--smoke", "--no-compile", "--no-plots", "--device", "cpu", "--out", str(tmp_path)]
    try:
        assert run.main(common + ["--sweep", "rows"]) == 0
        assert run.main(common + ["--sweep", "factor", "--append"]) == 0
    finally:
        torch.set_num_threads(threads)  # --smoke runs single-threaded
    with open(tmp_path / "results.csv", newline="") as f:
        sweeps = {r["sweep"] for r in csv.DictReader(f)}
    assert sweeps == {"rows", "factor"}
    md = (tmp_path / "summary.md").read_text()
    assert "## Sweep `rows`" in md and "## Sweep `factor`" in md
    # --from rebuilds the reports from saved rows without measuring anything.
    rebuilt = tmp_path / "rebuilt"
    assert run.main(["--from", str(tmp_path / "results.csv"), "--out", str(rebuilt)]) == 0
    assert (rebuilt / "summary.md").read_text().count("## Sweep") == 2
    assert (rebuilt / "plot-rows-fp32.png").is_file()


def test_gpu_report_renders_from_synthetic_rows(tmp_path):
    """The GPU-only parts of the report (peak memory, bandwidth at small rows, the
    GPU targets) cannot run here; render them from made-up GPU rows."""
    from benchmarks import plots
    from benchmarks.problems import GPU_PLAN
    from benchmarks.results import BANDWIDTH, PEAK_MEMORY

    env = dict(ENV, device="NVIDIA H100 80GB HBM3", device_type="cuda")
    centre = GPU_PLAN.centre
    small = Problem(rows=8, m=centre.m, n=centre.n, factor=5, o=1000, dtype="bf16")
    timing = {"reference": 3.0, "compile": 2.0, "triton": 1.1, "triton+saved": 1.05,
              "floor": 1.0}
    rows = []
    for p in (Problem(**{**centre.__dict__, "sweep": "rows", "swept": "rows"}),
              Problem(**{**small.__dict__, "sweep": "rows", "swept": "rows"})):
        for prov, t in timing.items():
            for mode in MODES:
                rows.append(make_row(env, "fbp", p, prov, mode, TIME_MEDIAN, t))
                rows.append(make_row(env, "fbp", p, prov, mode, PEAK_MEMORY, 1e6 * t))
            rows.append(make_row(env, "fbp", p, prov, "forward", BANDWIDTH, 2500.0))
            if prov != "floor":
                rows.append(make_row(env, "fbp", p, prov, "forward+backward", SAVED_BYTES,
                                     1e6 if prov in ("triton",) else 1e7))
    md = summary.markdown(rows, env, "cmd")
    assert "CPU run" not in md
    assert "## Inference (rows <= 16): forward bandwidth" in md and "| 75% |" in md
    assert "| triton forward / floor | <= 1.15 | 1.100" in md
    assert "| triton (lean) forward+backward / floor | <= 1.45 | 1.100" in md
    assert "| triton saved activations / reference | <= 0.125 | 0.100" in md
    assert "peak 2.9 MiB (1.00)" in md  # the reference's own peak, ratio 1
    # Each measured time beside the cost model's prediction (H100 entry for this name).
    assert "## Measured vs predicted (cost model)" in md and "H100 entry" in md
    from fbp_kernels import costmodel
    pred = costmodel.predict("fused", costmodel.Shape(1024, 2048, 1024, 5, 1000, "bf16"),
                             costmodel.GPUS["H100"], "forward").time_us / 1e3
    assert f"| triton | forward | 1.100 | {pred:.3f} | {1.1 / pred:.2f} |" in md
    assert "## Predicted GPU times" not in md  # measured, so no prediction-only table
    assert "predicted H100 ms" in summary.terminal_table(
        Problem(**{**centre.__dict__, "sweep": "rows", "swept": "rows"}), rows)
    assert plots.plot_sweeps(ResultIndex(rows), tmp_path, "synthetic")


def test_split_provider_only_when_the_backend_exists(monkeypatch):
    """The benchmark measures backend "split" only when the registry has it and it can
    run; without it (today's main) nothing changes."""
    from benchmarks import run
    from fbp_kernels import backends

    cpu = torch.device("cpu")
    monkeypatch.setattr(backends, "NAMES", tuple(n for n in backends.NAMES if n != "split"))
    assert run.split_backend(cpu) == []
    monkeypatch.setattr(backends, "NAMES", backends.NAMES + ("split",))
    monkeypatch.setattr(backends, "unsupported_reason",
                        lambda name, device: None if name == "split" else "no")
    assert run.split_backend(cpu) == ["split"]
    monkeypatch.setattr(backends, "unsupported_reason", lambda name, device: "needs CUDA")
    assert run.split_backend(cpu) == []
    provs = [p.name for p in providers_for("fbp", ["split"], include_compile=False)]
    assert "split" in provs and "split+saved" in provs


def test_coatt_sweep_measures_broadcast_inputs(tmp_path):
    # The co-attention sweep feeds (B, R, m) regions with a (B, 1, n) question (what the
    # split strategy projects once per sample); the floor projects the distinct rows.
    (problem,) = sweep_problems(SMOKE_PLAN, ["coatt"], ["fp32"], smoke=True)
    assert (problem.rows, problem.regions, problem.y_rows) == (6, 3, 2)
    inp = make_inputs(problem, torch.device("cpu"))
    assert inp.x.shape == (2, 3, problem.m) and inp.y.shape == (2, 1, problem.n)
    assert inp.grad_out.shape == (2, 3, problem.o)
    shape = summary.model_shape(problem)
    assert (shape.x_rows, shape.y_rows) == (6, 2)
    from benchmarks import run
    from benchmarks.results import read_csv

    assert run.main(["--smoke", "--no-compile", "--sweep", "coatt", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "results.csv")
    assert rows and {r.regions for r in rows} == {3}
    assert {r.provider for r in rows if r.metric == TIME_MEDIAN} >= {"reference", "floor"}


def test_mfh_problems_get_the_cost_models_mfh_prediction():
    """A GPU run of ``--op mfh`` puts costmodel.predict_mfh beside each measured MFH
    provider (reference -> eager, triton -> fused, torch, floor); FBP keeps predict."""
    from fbp_kernels import costmodel as cm
    from benchmarks.problems import Problem

    h200 = cm.GPUS["H200"]
    mfh = Problem(1024, 2048, 1024, 5, 1000, "bf16", order=3)
    shape = cm.Shape(1024, 2048, 1024, 5, 1000, "bf16")
    for prov, name in (("reference", "eager"), ("triton", "fused"), ("torch", "torch"),
                       ("floor", "floor")):
        for mode in cm.MODES:
            assert summary.predicted_ms(mfh, prov, mode, h200) == pytest.approx(
                cm.predict_mfh(name, shape, h200, mode, 3) / 1e3)
    assert summary.predicted_ms(mfh, "split", "forward", h200) is None  # no MFH split
    fbp = Problem(1024, 2048, 1024, 5, 1000, "bf16")
    assert summary.predicted_ms(fbp, "triton", "forward", h200) == pytest.approx(
        cm.predict("fused", shape, h200, "forward").time_us / 1e3)


def _run_gpu_check(tmp_path, **extra_env):
    """scripts/gpu_check.sh with a stub interpreter that records its arguments: the
    calls, one argument list each."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "py"
    stub.write_text("#!/usr/bin/env bash\nfor a in \"$@\"; do printf '%s\\x1f' \"$a\" >> "
                    f"{log}; done; echo >> {log}\n")
    stub.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PY": str(stub), "OUT": str(tmp_path / "out"), **extra_env}
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines() if line]


def test_gpu_check_passes_a_test_selection_as_one_expression(tmp_path):
    """GPU_CHECK_TESTS narrows the test phase: pytest gets ``-k`` and the whole
    expression as one argument (unquoted, its words became file names and nothing was
    collected)."""
    calls = _run_gpu_check(tmp_path, GPU_CHECK_TESTS="cuda_graphs or split")
    (pytest_args,) = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert pytest_args[pytest_args.index("-k") + 1] == "cuda_graphs or split"


def test_gpu_check_script_phases_and_outputs(tmp_path):
    """scripts/gpu_check.sh (``make gpu-check``) with a stub interpreter that records its
    arguments: no -k by default; the CUDA engines' files first (they need no Triton
    compile, which is what eats the phase), no file twice, none that checks CPU-side
    facts (the ~400-kernel compile report above all); -v and a SIGINT timeout so a cut
    run still names its tests; the benchmark its sweeps; the phases in order."""
    root = Path(__file__).resolve().parents[1]
    calls = _run_gpu_check(tmp_path)
    (pytest_args,) = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert "-k" not in pytest_args and "-v" in pytest_args
    files = [a for a in pytest_args if a.startswith("tests/")]
    assert files[:2] == ["tests/test_cuda_graphs.py", "tests/test_cuda_backend.py"]
    assert len(files) == len(set(files)) and all((root / f).is_file() for f in files)
    assert {"tests/test_wide.py", "tests/test_split.py", "tests/test_correctness.py",
            "tests/test_large_offsets.py"} <= set(files)
    assert not {"tests/test_triton_gpu_compile.py", "tests/test_cuda_compile.py",
                "tests/test_cost_model.py", "tests/test_benchmark_smoke.py"} & set(files)
    script = (root / "scripts" / "gpu_check.sh").read_text()
    assert re.search(r"timeout -s INT -k \d+ \d+ \"\$PY\" -m pytest", script)
    (bench,) = [c for c in calls if c and c[0] == "benchmarks/run.py"]
    assert bench[bench.index("--sweep") + 1] == "rows,coatt"
    # no new problem after 75 s: results are written inside the phase's 95 s timeout
    assert float(bench[bench.index("--time-budget") + 1]) < 95
    # The engine smoke runs before the tests, each engine under its own timeout; the
    # calibration after it (an engine that hangs is out by then) and before the
    # benchmark (whose predictions it informs).
    (smoke,) = [c for c in calls if c and c[0] == "scripts/gpu_smoke.py"]
    assert calls.index(smoke) < calls.index(pytest_args)
    assert float(smoke[smoke.index("--timeout") + 1]) <= 20
    (calibrate,) = [c for c in calls if c and c[0] == "benchmarks/calibrate.py"]
    assert calls.index(smoke) < calls.index(calibrate) < calls.index(bench)
    # Everything comes back packed: the device tool returns at most 8 files from $OUT.
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "gpu-check.tar.gz" in out and "summary.txt" in out and len(out) <= 8, out
    with tarfile.open(tmp_path / "out" / "gpu-check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"env.txt", "tests.log", "bench.log", "summary.txt"} <= names, names


def _gpu_smoke():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_smoke_keeps_a_failed_engine_out_of_the_later_phases():
    """scripts/gpu_smoke.py's rule: nothing changes when every engine that could run
    passed; an engine that hung, erred or was wrong is listed (auto then passes over
    it), and no engine is forced (a forced one refuses operands it cannot stage)."""
    smoke = _gpu_smoke()
    ok, bad = {"status": "ok"}, {"status": "hang"}
    assert smoke.fallback({e: ok for e in smoke.ENGINES}) == {}
    assert smoke.fallback({"wgmma": {"status": "skipped"}, "wide": ok, "async": ok,
                           "sync": ok}) == {}
    assert smoke.fallback({"wgmma": bad, "wide": ok, "async": ok, "sync": ok}) == {
        "FBP_CUDA_BROKEN_ENGINES": "wgmma"}
    assert smoke.fallback({"wgmma": {"status": "wrong"}, "wide": {"status": "error"},
                           "async": ok, "sync": ok}) == {
        "FBP_CUDA_BROKEN_ENGINES": "wgmma,wide"}
    assert smoke.fallback({e: bad for e in smoke.ENGINES}) == {
        "FBP_CUDA_BROKEN_ENGINES": ",".join(smoke.ENGINES)}


def test_gpu_smoke_prices_each_engine_with_the_model():
    """The smoke's per-engine prediction is the cost model's cuda provider with its
    engine rule pinned: on an H200 the engine auto runs gives the plain prediction, the
    others their own tiles (the 64x64 tile slower at rows 1024), sync none."""
    from fbp_kernels import costmodel as cm

    smoke = _gpu_smoke()
    h200 = cm.GPUS["H200"]
    shape = cm.Shape(rows=1024, m=2048, n=1024, factor=5, o=1000, dtype="bf16")
    got = smoke.predicted_us("wgmma", h200)
    assert got == {mode: cm.predict("cuda", shape, h200, mode).time_us
                   for mode in ("forward", "forward+backward")}
    assert smoke.predicted_us("async", h200)["forward"] > got["forward"]
    assert smoke.predicted_us("sync", h200) == {}
    assert cm.cuda_engine("bf16", 1024, 90) == "wgmma"  # the pin was undone


def test_gpu_smoke_records_hangs_and_results(tmp_path, monkeypatch):
    """The parent: one child per engine, FBP_CUDA_STAGING set for it; a timeout is a
    hang, the child's JSON line its result; smoke.json and staging.env written."""
    smoke = _gpu_smoke()
    seen = []

    def fake_run(cmd, env, timeout):
        engine = cmd[cmd.index("--engine") + 1]
        seen.append((engine, env["FBP_CUDA_STAGING"], timeout))
        if engine == "wgmma":
            raise subprocess.TimeoutExpired(cmd, timeout)
        out = {"wide": '{"status": "wrong", "max_rel_err": 0.9}'}.get(engine, '{"status": "ok"}')
        return subprocess.CompletedProcess(cmd, 0, "log line\n" + out + "\n", "")

    monkeypatch.setattr(smoke, "run_engine_process", fake_run)
    assert smoke.main(["--out", str(tmp_path), "--timeout", "7"]) == 0
    assert seen == [(e, e, 7.0) for e in smoke.ENGINES]
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["engines"]["wgmma"]["status"] == "hang"
    assert report["engines"]["wide"]["max_rel_err"] == 0.9
    assert (tmp_path / "staging.env").read_text() == "FBP_CUDA_BROKEN_ENGINES=wgmma,wide\n"


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_gpu_smoke_kills_an_engine_childs_whole_process_group(tmp_path):
    """An engine child that started a process of its own (a build's nvcc, ninja) and hung:
    at the timeout the whole group dies, not the child alone; a child that finishes
    returns its output."""
    smoke = _gpu_smoke()
    done = smoke.run_engine_process([sys.executable, "-c", "print(2 + 2)"],
                                    dict(os.environ), 30.0)
    assert done.returncode == 0 and done.stdout.strip() == "4"
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(60)\n")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        smoke.run_engine_process([sys.executable, "-c", code], dict(os.environ), 5.0)
    assert time.monotonic() - start < 30
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the engine child's own child outlived the timeout"


def test_mfh_benchmark_measures_only_mfh_backends(monkeypatch):
    """On a GPU, ``--op mfh`` measures MFH's backends (triton, cuda, torch): split has no
    MFH implementation and would only record failures."""
    from benchmarks import run
    from fbp_kernels import mfh_ops

    monkeypatch.setattr(mfh_ops, "unsupported_reason", lambda name, dev, *a: None)
    assert run.backend_names("mfh", torch.device("cuda")) == ["triton", "cuda", "torch"]
    monkeypatch.setattr(mfh_ops, "unsupported_reason",
                        lambda name, dev, *a: None if name == "torch" else "not built")
    assert run.backend_names("mfh", torch.device("cuda")) == ["torch"]
    assert run.backend_names("mfh", torch.device("cpu")) == ["torch"]


def test_rows_option_orders_the_rows_sweep(tmp_path):
    """--rows replaces the rows sweep's values and keeps their order (make gpu-check
    measures the training batches first); bad lists are refused by name."""
    import csv

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke",
                           "--rows", "8,2,5", "--sweep", "rows", "--no-plots", "--no-compile",
                           "--providers", "torch", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "results.csv") as fh:
        seen = []
        for row in csv.DictReader(fh):
            if row["sweep"] == "rows" and int(row["rows"]) not in seen:
                seen.append(int(row["rows"]))
    assert seen == [8, 2, 5]
    for bad in ("2,x", "0"):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--rows", bad],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and "--rows" in proc.stderr
