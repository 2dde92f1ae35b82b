"""benchmarks/calibrate.py and the cost model's calibrated GPUs.

The probes only mean something on a GPU; here their kernels run through the Triton
interpreter to show they do what their rates assume (the read probe reads every byte
of its buffer once per pass, the main-loop probe computes ``a @ w^T`` with the wide
kernels' own loop), and the calibrated model is checked against hand-computed cases.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import calibrate  # noqa: E402
from fbp_kernels import costmodel as cm  # noqa: E402
from fbp_kernels.backends import triton_wide  # noqa: E402

from conftest import DEVICE  # noqa: E402

MEASURED = {"hbm_copy_tbs": 4.32, "l2_read_tbs": 9.0, "cublas_bf16_tflops": 782.0,
            "triton_mainloop_tflops": 450.0, "launch_us": 1.5}


@pytest.mark.parametrize("n, passes, ctas", [(5000, 3, 7), (2048, 1, 1), (300, 2, 5),
                                             (3 * 2048 + 1, 4, 2), (4 * 2048, 3, 3),
                                             (4 * 2048, 2, 2)])
def test_read_probe_reads_every_byte_once_per_pass(n, passes, ctas):
    """Buffers that are and are not a multiple of the block (the unmasked EVEN path the
    GPU run takes, and the masked one), grids larger and smaller than the block count:
    the partial sums add up to ``passes`` times the buffer's sum (small integers, so fp32
    sums are exact in any order)."""
    src = torch.randint(0, 4, (n,), device=DEVICE).float()
    out = calibrate.read_sum(src, passes, ctas)
    assert out.shape == (ctas, calibrate.READ_BLOCK)
    assert out.sum().item() == passes * src.sum().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tma", [True, False])
def test_mainloop_probe_is_a_matmul(dtype, tma):
    """The probe's kernel (the wide kernels' ``_wide_projection`` and grid order) is
    ``a @ w^T`` at sizes that are not tile multiples, through descriptors and pointers.
    fp32: IEEE products of K = 40 terms, within 1e-5 of float64; bf16: one rounding of
    the fp32 result to bf16 (the interpreter truncates: below 2^-7 relative, plus the fp32
    sum's own error; the bound is 2^-6 so no summation order can cross it)."""
    a = torch.randn(37, 40, device=DEVICE).to(dtype)
    w = torch.randn(45, 40, device=DEVICE).to(dtype)
    cfg = dataclasses.replace(calibrate.mainloop_config(DEVICE), tma=tma)
    got = calibrate.mainloop(a, w, cfg)
    assert got.shape == (37, 45) and got.dtype == dtype
    ref = a.double() @ w.double().t()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    err = ((got.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= tol, err


def test_mainloop_probe_uses_the_wide_forwards_tile():
    assert calibrate.mainloop_config(torch.device("cpu")) == triton_wide.INTERPRETER_WIDE
    assert triton_wide.WIDE_CONFIGS["sm90-half"].tma  # what the sm_90 probe times
    # The comparison tile is the 85 FLOP/B one the docstring names.
    t = calibrate.WIDE_N_TILE
    assert t.block_m * t.block_n / (t.block_m + t.block_n) == pytest.approx(85.33, abs=0.01)


def test_measured_map_from_probes():
    probes = [dict(name="hbm_copy", us=500.0, tbs=4.3), dict(name="l2_read", us=300, tbs=7.5),
              dict(name="cublas_bf16_8192", us=1400, tflops=785.0),
              dict(name="triton_mainloop", error="CompilationError: out of resources"),
              dict(name="launch", us=400.0, us_per_launch=1.6)]
    m = calibrate.measured_from(probes)
    assert set(m) == set(cm.CALIBRATION_KEYS)
    assert m == {"hbm_copy_tbs": 4.3, "l2_read_tbs": 7.5, "cublas_bf16_tflops": 785.0,
                 "triton_mainloop_tflops": None, "launch_us": 1.6}
    assert calibrate.measured_from([]) == dict.fromkeys(cm.CALIBRATION_KEYS)


def test_mainloop_bound_by_hand():
    # 1 GB through L2 at 5 TB/s is 200 us: a 210 us probe is L2-bound, a 400 us one not.
    probe = dict(l2_bytes=1e9, us=210.0)
    assert calibrate.mainloop_bound(probe, 5.0) == "l2"
    assert calibrate.mainloop_bound(dict(probe, us=400.0), 5.0) == "compute"


def test_calibrated_gpu_replaces_each_assumption():
    h200 = cm.GPUS["H200"]
    g = cm.calibrated(h200, MEASURED, source="test")
    assert g.calibration == "test" and g.name == "H200"
    assert g.l2_tbs == 9.0 and g.launch_us == 1.5
    assert cm.hbm_efficiency(g) == pytest.approx(4.32 / 4.8)
    assert cm.cublas_efficiency(g, "bf16") == pytest.approx(782.0 / 989.4)
    assert cm.cublas_efficiency(g, "fp16") == pytest.approx(782.0 / 989.4)
    assert cm.cublas_efficiency(g, "tf32") == cm.CUBLAS_EFFICIENCY["tf32"]  # not measured
    assert cm.mma_efficiency(g, "wgmma") == pytest.approx(450.0 / 989.4)
    assert cm.mma_efficiency(g, "mma") == cm.TRITON_MMA_EFFICIENCY[("mma", 90)]
    # On an sm_80 entry the measured loop is mma.sync's.
    a = cm.calibrated(cm.GPUS["A100"], {"triton_mainloop_tflops": 156.0})
    assert cm.mma_efficiency(a, "mma") == pytest.approx(0.5)
    # The uncalibrated entry is untouched; missing and null keys keep the assumption.
    assert cm.hbm_efficiency(h200) == cm.HBM_EFFICIENCY and h200.calibration == ""
    assert cm.calibrated(h200, {"l2_read_tbs": None}) is h200
    with pytest.raises(ValueError, match="l2_read_tbs"):
        cm.calibrated(h200, {"l2_read_tbs": -1.0})
    with pytest.raises(ValueError, match="launch_us"):
        cm.calibrated(h200, {"launch_us": float("nan")})


def test_calibrated_l2_bandwidth_moves_an_l2_bound_kernel_by_hand():
    """The CUDA forward at rows 4096 is L2-bound at the model's 7.7 TB/s (its bytes through L2 over
    the bandwidth, plus its tail and one launch); at 12 TB/s that term halves, and the
    kernel is then bound by compute at the calibrated efficiency."""
    h200 = cm.GPUS["H200"]
    s = cm.Shape(rows=4096, m=2048, n=1024, factor=5, o=1000, dtype="bf16")
    base = cm.predict("cuda", s, h200).kernels
    fused = [k for k in base if k.name.startswith("cuda fused forward")][0]
    assert fused.bound == "l2"
    g = cm.calibrated(h200, {"l2_read_tbs": 12.0, "triton_mainloop_tflops": 989.4 * 0.55})
    fast = [k for k in cm.predict("cuda", s, g).kernels
            if k.name.startswith("cuda fused forward")][0]
    assert fast.l2_bytes == fused.l2_bytes and fast.flops == fused.flops
    assert fast.bound == "compute"
    assert fast.time_us < fused.time_us
    rest = fused.time_us - fused.l2_bytes / (h200.l2_tbs * 1e12) * 1e6  # tail and launch
    assert rest >= 0
    assert fast.time_us >= fused.l2_bytes / 12e12 * 1e6 + rest - 1e-9


def _write(tmp_path, **changes):
    data = {"gpu": "NVIDIA H200", "capability": [9, 0], "date": "2026-12-03",
            "measured": dict(MEASURED), "probes": []}
    data.update(changes)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    return path


def test_load_calibration_round_trip_and_bad_files(tmp_path):
    gpu, data = cm.load_calibration(_write(tmp_path))
    assert gpu.name == "H200" and gpu.l2_tbs == 9.0 and data["measured"] == MEASURED
    assert str(tmp_path) in gpu.calibration
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a calibration file"):
        cm.load_calibration(bad)
    with pytest.raises(ValueError, match="not a calibration file"):
        cm.load_calibration(_write(tmp_path, measured=None))
    with pytest.raises(ValueError, match="missing.json"):
        cm.load_calibration(tmp_path / "missing.json")


def test_env_calibration_applies_to_its_own_device_only(tmp_path, monkeypatch):
    path = _write(tmp_path)
    monkeypatch.setenv(cm.CALIBRATION_ENV, str(path))
    cm._env_calibration.cache_clear()
    try:
        assert cm.gpu_for_name("NVIDIA H200").l2_tbs == 9.0
        assert cm.gpu_for_name("NVIDIA H200", calibration=False) is cm.GPUS["H200"]
        # Another device of the same entry (a different name) keeps the assumptions.
        assert cm.gpu_for_name("NVIDIA H200 NVL") is cm.GPUS["H200"]
        assert cm.gpu_for_name("NVIDIA H100 80GB HBM3") is cm.GPUS["H100"]
    finally:
        cm._env_calibration.cache_clear()


def test_model_cli_with_a_calibration(tmp_path):
    path = _write(tmp_path)
    run = [sys.executable, str(ROOT / "benchmarks" / "model.py"), "--calibration", str(path)]
    proc = subprocess.run(run + ["--rows", "1024"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "L2 9 TB/s (measured)" in proc.stdout and "calibrated by" in proc.stdout
    proc = subprocess.run(run + ["--targets"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "calibrated by" in proc.stdout, proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    proc = subprocess.run(run[:-1] + [str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a calibration file" in proc.stderr


def test_report_sets_each_assumption_beside_its_measurement():
    data = {"gpu": "NVIDIA H200", "capability": [9, 0], "measured": dict(MEASURED),
            "probes": [dict(name="triton_mainloop", us=400.0, tflops=450.0, l2_bytes=1e9)]}
    text = calibrate.report(data)
    assert f"| L2 -> SM TB/s | {cm.GH100_L2_TBS:.2f} | 9.00 |" in text
    assert f"| cuBLAS bf16 share of peak | 0.790 | {782 / 989.4:.3f} |" in text
    # 1 GB at 9 TB/s = 111 us of 400: compute-bound.
    assert "compute-bound at 9.00 TB/s L2" in text
    data["measured"]["l2_read_tbs"] = None
    assert f"| L2 -> SM TB/s | {cm.GH100_L2_TBS:.2f} | not measured |" in calibrate.report(data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_calibrate_refuses_without_a_gpu(tmp_path, capsys):
    assert calibrate.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "calibration.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the probes time a CUDA GPU")
def test_calibration_probes_on_the_gpu(tmp_path):
    """On a GPU: every probe runs, its rates are positive and below the datasheet
    peaks, and the main-loop probe's result matches cuBLAS."""
    assert calibrate.main(["--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "calibration.json").read_text())
    gpu = cm.gpu_for_name(data["gpu"], tuple(data["capability"]), calibration=False)
    m = data["measured"]
    assert 0 < m["hbm_copy_tbs"] <= gpu.hbm_tbs * 1.05
    assert m["l2_read_tbs"] > 0 and m["launch_us"] > 0
    assert 0 < m["cublas_bf16_tflops"] <= gpu.tensor_tflops["bf16"] * 1.05
    probe = [p for p in data["probes"] if p["name"] == "triton_mainloop"][0]
    assert "error" not in probe, probe
    assert probe["max_rel_err"] < 2e-2
    assert math.isfinite(probe["tflops"])


TRITON_36 = ROOT / ".venv" / "triton-3.6"


@pytest.mark.parametrize("triton_path", [
    pytest.param(None, id="dev-triton"),
    pytest.param(TRITON_36, id="triton-3.6", marks=[] if (TRITON_36 / "triton").is_dir() else
                 [pytest.mark.skip(reason=f"Triton 3.6 not installed at {TRITON_36} (`make "
                                          f"setup` installs it)")])])
def test_probe_kernels_compile_as_the_wide_kernels_do(triton_path):
    """The probes compile for sm_80 and sm_90 without spills (so the first GPU call does
    not spend its seconds on a compile failure), and the sm_90 main-loop probe runs the
    wide forward's instructions: wgmma fed by TMA, the 128x128 tile at 1 CTA per SM."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path is not None:
        env["PYTHONPATH"] = f"{triton_path}:{ROOT}:{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate.py"),
                           "--compile-check"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {(r["kernel"], r["arch"], r["config"]) for r in rows} == {
        ("mainloop", 80, "half"), ("read", 80, "read"), ("mainloop", 90, "sm90-half"),
        ("mainloop", 90, "128x256"), ("read", 90, "read")}
    for r in rows:
        assert r["ok"] and r["stack_bytes"] == 0, r
    by = {(r["kernel"], r["arch"], r["config"]): r for r in rows}
    hopper = by[("mainloop", 90, "sm90-half")]
    assert hopper["tensor_cores"] == "wgmma" and hopper["tma"], hopper
    assert by[("mainloop", 80, "half")]["cp_async"]
    for arch in (80, 90):  # the read probe's launch fits: its CTAs per SM are resident
        assert by[("read", arch, "read")]["ctas_per_sm"] >= calibrate.READ_CTAS_PER_SM
    assert by[("mainloop", 90, "128x256")]["tensor_cores"] == "wgmma"


def test_a_bad_env_calibration_warns_and_keeps_the_assumptions(tmp_path, monkeypatch):
    """``auto`` must keep working when FBP_COSTMODEL_CALIBRATION names a missing or broken
    file; a rewritten file is read again (the cache is keyed on its mtime)."""
    cm._env_calibration.cache_clear()
    try:
        monkeypatch.setenv(cm.CALIBRATION_ENV, str(tmp_path / "missing.json"))
        with pytest.warns(RuntimeWarning, match="ignored"):
            assert cm.gpu_for_name("NVIDIA H200") is cm.GPUS["H200"]
        path = _write(tmp_path)
        monkeypatch.setenv(cm.CALIBRATION_ENV, str(path))
        assert cm.gpu_for_name("NVIDIA H200").l2_tbs == 9.0
        _write(tmp_path, measured=dict(MEASURED, l2_read_tbs=11.0))
        os.utime(path, (1, 1))  # a different mtime, whatever the clock's resolution
        assert cm.gpu_for_name("NVIDIA H200").l2_tbs == 11.0
        path.write_text("{broken")
        os.utime(path, (2, 2))
        with pytest.warns(RuntimeWarning, match="not a calibration file"):
            assert cm.gpu_for_name("NVIDIA H200") is cm.GPUS["H200"]
    finally:
        cm._env_calibration.cache_clear()


def test_the_triton_probe_does_not_calibrate_the_cuda_engines():
    """The main-loop probe runs Triton's loop: the CUDA engines keep their assumed
    efficiency, while the Triton wide kernels take the measured one."""
    h200 = cm.GPUS["H200"]
    fast = cm.calibrated(h200, {"triton_mainloop_tflops": 0.9 * 989.4, "l2_read_tbs": 30.0})
    only_l2 = cm.calibrated(h200, {"l2_read_tbs": 30.0})
    s = cm.Shape(rows=4096, m=2048, n=1024, factor=5, o=1000, dtype="bf16")
    assert cm.predict("cuda", s, fast).time_us == cm.predict("cuda", s, only_l2).time_us
    assert cm.predict("fused", s, fast).time_us < cm.predict("fused", s, only_l2).time_us
