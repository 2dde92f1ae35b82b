"""``backend="auto"``'s choice between strategies, and ``fbp_kernels.explain``."""

import pytest
import torch

import fbp_kernels
from fbp_kernels import backends, mfh_ops, strategy

from conftest import DEVICE, cuda_only


def _fake_gpu(monkeypatch, preds):
    """Pretend a CUDA device with both Triton strategies, and a model predicting ``preds``."""
    monkeypatch.setattr(strategy.backends, "unsupported_reason", lambda name, dev: None)
    monkeypatch.setattr(strategy, "_device_name", lambda dev: "NVIDIA H200")
    monkeypatch.setattr(strategy, "_predict", lambda *a: preds(*a))


def test_auto_picks_the_strategy_with_the_lower_prediction(monkeypatch):
    seen = []

    def preds(device, rows, m, n, factor, o, dtype, mode, suffix=""):
        seen.append((rows, mode, dtype))
        assert suffix == ""  # the lean mode
        # made-up numbers (the rule is under test here): fused wins at 16 rows, split at 1024
        return {"split": 100.0 + rows, "fused": 4.0 * rows}

    _fake_gpu(monkeypatch, preds)
    cuda = torch.device("cuda")
    name, why, p = strategy.choose(cuda, 16, 64, 32, 5, 10, torch.bfloat16, False)
    assert name == "triton" and p == {"split": 116.0, "fused": 64.0}, (name, why, p)
    assert "fused 64.0 us < split 116.0 us" in why
    assert strategy.choose(cuda, 1024, 64, 32, 5, 10, torch.bfloat16, True)[0] == "split"
    assert seen[-1] == (1024, "forward+backward", "bf16")
    assert seen[0][1] == "forward"
    # fp32 follows PyTorch's matmul precision setting
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32, expect in ((True, "tf32"), (False, "fp32")):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            strategy.choose(cuda, 8, 64, 32, 5, 10, torch.float32, False)
            assert seen[-1][2] == expect
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_auto_prices_the_memory_mode_it_runs(monkeypatch):
    """save_projections reaches the model as the provider suffix of its mode; the middle
    mode never picks triton where its wide tiles cannot hold a factor group; without
    Triton it takes cuda in every mode (its fused kernels keep any projection)."""
    seen = []

    def preds(device, rows, m, n, factor, o, dtype, mode, suffix=""):
        seen.append(suffix)
        return {"split": 50.0, "fused": 10.0}  # made up: fused ahead

    _fake_gpu(monkeypatch, preds)
    cuda = torch.device("cuda")
    for keep, suffix in ((False, ""), (True, "+saved"), ("x", "+keep_x"), ("y", "+keep_y")):
        name, _, _ = strategy.choose(cuda, 64, 64, 32, 5, 10, torch.bfloat16, True, keep)
        assert name == "triton" and seen[-1] == suffix, (keep, name, seen)
    # factor 200 exceeds every wide tile (at most 128 projected columns): split, unpriced.
    n = len(seen)
    name, why, _ = strategy.choose(cuda, 64, 64, 32, 200, 10, torch.bfloat16, True, "x")
    assert name == "split" and len(seen) == n, why
    monkeypatch.setattr(strategy.backends, "unsupported_reason",
                        lambda name, dev: None if name == "cuda" else "no Triton")
    assert strategy.choose(cuda, 64, 64, 32, 5, 10, torch.bfloat16, True, "y")[0] == "cuda"
    assert strategy.choose(cuda, 64, 64, 32, 5, 10, torch.bfloat16, True)[0] == "cuda"
    monkeypatch.setattr(strategy.backends, "unsupported_reason", lambda name, dev: "none here")
    assert strategy.choose(cuda, 64, 64, 32, 5, 10, torch.bfloat16, True, "y")[0] == "torch"


def test_auto_without_a_model_or_for_float64_runs_split(monkeypatch):
    _fake_gpu(monkeypatch, lambda *a: None)
    cuda = torch.device("cuda")
    name, why, _ = strategy.choose(cuda, 8, 4, 4, 2, 3, torch.float16, True)
    assert name == "split" and "unavailable" in why
    name, why, _ = strategy.choose(cuda, 8, 4, 4, 2, 3, torch.float64, True)
    assert name == "split" and "float64" in why


def test_auto_on_the_cpu_is_plain_pytorch():
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    plan = fbp_kernels.explain(x, y, torch.randn(6, 4), torch.randn(6, 5), factor=2)
    assert plan.backend == "torch" and "cpu" in plan.reason
    assert backends.resolve("auto", torch.device("cpu")).NAME == "torch"


@pytest.mark.skipif(backends.unsupported_reason("split", DEVICE) is not None,
                    reason="backend 'split' cannot run here")
def test_explain_reports_the_split_chunks_and_tile():
    old = fbp_kernels.set_split_memory_budget(2 * 12 * 4 * 3)  # 3 fp32 rows per chunk
    try:
        x = torch.randn(2, 5, 4, device=DEVICE)
        y = torch.randn(1, 5, 6, device=DEVICE)
        plan = fbp_kernels.explain(x, y, torch.randn(12, 4, device=DEVICE), None, factor=3,
                                   backend="split")
    finally:
        fbp_kernels.set_split_memory_budget(old)
    assert plan.backend == "split" and plan.reason == "requested explicitly"
    assert "4 chunk(s) of <= 3 rows" in plan.tile, plan.tile  # 10 broadcast rows
    assert "_split_fwd_kernel" in plan.kernels
    assert "backend: split" in str(plan)


@pytest.mark.skipif(backends.unsupported_reason("triton", DEVICE) is not None,
                    reason="backend 'triton' cannot run here")
def test_explain_names_the_wide_kernels_the_triton_backend_runs(monkeypatch):
    """explain() describes what the launcher runs: the wide forward and backward unless
    projections are kept (then the one-launch kernel and its backward)."""
    from fbp_kernels.backends import triton_wide as W

    launched = []
    real = W.launch

    def spy(kernel, grid, *args, **kw):
        launched.append(kernel)
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(W, "launch", spy)
    x, y = torch.randn(7, 4, device=DEVICE), torch.randn(7, 6, device=DEVICE)
    wx, wy = torch.randn(12, 4, device=DEVICE), torch.randn(12, 6, device=DEVICE)
    plan = fbp_kernels.explain(x, y, wx, wy, factor=3, backend="triton")
    cfg = W.pick_wide_config(torch.float32, DEVICE, 7)
    assert "_wide_fwd_kernel" in plan.kernels and "_wide_grad_kernel" in plan.kernels
    assert f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}" in plan.tile, plan.tile
    fbp_kernels.fbp(x, y, wx, wy, factor=3, backend="triton")
    assert launched and launched[0] is W._wide_fwd_kernel, launched
    kept = fbp_kernels.explain(x, y, wx, wy, factor=3, backend="triton", save_projections=True)
    assert "_fbp_fwd_kernel" in kept.kernels and "_wide" not in kept.kernels


def test_explain_refuses_an_unusable_backend_like_fbp():
    x = torch.randn(2, 4)
    with pytest.raises(backends.BackendUnavailableError):
        fbp_kernels.explain(x, x, torch.randn(4, 4), None, factor=2, backend="cuda")


@cuda_only
def test_auto_on_a_gpu_runs_what_explain_says():
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    wx = torch.randn(50, 256, device="cuda", dtype=torch.bfloat16)
    wy = torch.randn(50, 128, device="cuda", dtype=torch.bfloat16)
    plan = fbp_kernels.explain(x, y, wx, wy, factor=5)
    assert plan.backend in ("split", "triton") and plan.predicted_us, plan
    z_auto = fbp_kernels.fbp(x, y, wx, wy, factor=5)
    z_named = fbp_kernels.fbp(x, y, wx, wy, factor=5, backend=plan.backend)
    assert torch.equal(z_auto, z_named)


# ----------------------------------------------------------------------------- MFH


def test_mfh_auto_picks_the_backend_the_model_predicts_faster(monkeypatch):
    """On a (pretended) H200, bf16, MFB widths, order 2: the real cost model puts triton
    ahead for small-batch inference and torch at training batches (costmodel.predict_mfh
    prices both from FBP's providers); the choice follows the predictions."""
    from fbp_kernels import costmodel as cm, mfh_ops

    monkeypatch.setattr(mfh_ops, "unsupported_reason", lambda name, dev, order=None,
                        factor=None: None)
    monkeypatch.setattr(strategy, "_device_name", lambda dev: "NVIDIA H200")
    cuda = torch.device("cuda")
    h200 = cm.GPUS["H200"]
    for rows, grad in ((1, False), (16, False), (1024, True), (16384, True)):
        name, why, preds = strategy.choose_mfh(cuda, rows, 2048, 1024, 5, 1000, 2,
                                               torch.bfloat16, grad)
        mode = "forward+backward" if grad else "forward"
        shape = cm.Shape(rows=rows, m=2048, n=1024, factor=5, o=1000)
        want = {p: cm.predict_mfh(p, shape, h200, mode, 2) for p in ("fused", "torch")}
        assert preds == pytest.approx(want), rows
        assert name == ("triton" if want["fused"] < want["torch"] else "torch"), (rows, why)
    assert strategy.choose_mfh(cuda, 1, 2048, 1024, 5, 1000, 2, torch.bfloat16,
                               False)[0] == "triton"
    assert strategy.choose_mfh(cuda, 16384, 2048, 1024, 5, 1000, 2, torch.bfloat16,
                               True)[0] == "torch"
    # float64 (gradcheck) has no model: triton, the default on CUDA
    name, why, _ = strategy.choose_mfh(cuda, 8, 4, 4, 2, 3, 2, torch.float64, True)
    assert name == "triton" and "no cost model" in why
    # a factor no wide tile holds, or a device without Triton: torch
    monkeypatch.setattr(mfh_ops, "unsupported_reason", lambda name, dev, order=None,
                        factor=None: "its wide tiles cannot hold whole groups")
    name, why, _ = strategy.choose_mfh(cuda, 8, 4, 4, 33, 3, 2, torch.bfloat16, True)
    assert name == "torch" and "wide tiles" in why
    assert strategy.choose_mfh(torch.device("cpu"), 8, 4, 4, 2, 3, 2, torch.bfloat16,
                               True)[0] == "torch"


def test_predict_mfh_is_fbp_at_order_one_and_grows_with_order():
    from fbp_kernels import costmodel as cm

    h200 = cm.GPUS["H200"]
    s = cm.Shape(rows=1024, m=2048, n=1024, factor=5, o=1000)
    for mode in cm.MODES:
        for kernels in ("fused", "cuda"):
            assert cm.predict_mfh(kernels, s, h200, mode, 1) == pytest.approx(
                cm.predict(kernels, s, h200, mode).time_us)
        assert cm.predict_mfh("floor", s, h200, mode, 3) == pytest.approx(
            3 * cm.predict("floor", s, h200, mode).time_us)
        for p in cm.MFH_PROVIDERS:
            t = [cm.predict_mfh(p, s, h200, mode, k) for k in (1, 2, 3)]
            assert t[0] < t[1] < t[2], (p, mode, t)
            assert t[1] >= cm.predict_mfh("floor", s, h200, mode, 2), (p, mode)
    with pytest.raises(ValueError, match="provider"):
        cm.predict_mfh("split", s, h200)
    with pytest.raises(ValueError, match="order"):
        cm.predict_mfh("fused", s, h200, "forward", 0)


@cuda_only
def test_mfh_auto_on_a_gpu_runs_what_choose_mfh_says(monkeypatch):
    from fbp_kernels import mfh_ops

    seen = []
    real = mfh_ops.resolve

    def spy(name, *a, **k):
        seen.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(mfh_ops, "resolve", spy)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(4, 32, device="cuda", dtype=torch.bfloat16)
    wx = [torch.randn(50, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    wy = [torch.randn(50, 32, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    fbp_kernels.mfh(x, y, wx, wy, factor=5)
    want = strategy.choose_mfh(x.device, 4, 64, 32, 5, 10, 2, torch.bfloat16, False)[0]
    assert seen and set(seen) == {want}, seen


def test_explain_mfh_on_the_cpu_and_by_name():
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    wx, wy = [torch.randn(6, 4) for _ in range(2)], [torch.randn(6, 5) for _ in range(2)]
    plan = fbp_kernels.explain_mfh(x, y, wx, wy, factor=2)
    assert plan.backend == "torch" and "cpu" in plan.reason and "per block (2)" in plan.kernels
    with pytest.raises(backends.BackendUnavailableError):
        fbp_kernels.explain_mfh(x, y, wx, wy, factor=2, backend="cuda")


def test_explain_mfh_names_the_cuda_blocks(monkeypatch):
    # Where the extension runs (stubbed here): FBP's CUDA kernels per block, chained.
    from fbp_kernels.backends import cuda_mfh

    monkeypatch.setattr(mfh_ops, "resolve", lambda *a, **k: cuda_mfh)
    x, y = torch.randn(300, 4).bfloat16(), torch.randn(300, 5).bfloat16()
    wx = [torch.randn(10, 4).bfloat16() for _ in range(3)]
    plan = fbp_kernels.explain_mfh(x, y, wx, factor=2, backend="cuda")
    assert plan.backend == "cuda" and "per block (3)" in plan.kernels
    assert "fused_forward_kernel" in plan.kernels and "carry" in plan.kernels
    assert plan.tile.startswith("128x128x32"), plan.tile


@pytest.mark.skipif(mfh_ops.unsupported_reason("triton", DEVICE) is not None,
                    reason="backend 'triton' cannot run MFH here")
def test_explain_mfh_names_the_chained_tiles(monkeypatch):
    """On triton: the wide kernels per block at the chained tile the launchers pick; with
    auto, the backend, reason and predictions are choose_mfh's for the call's shape."""
    from fbp_kernels.backends import triton_wide as W

    x, y = torch.randn(7, 4, device=DEVICE), torch.randn(7, 6, device=DEVICE)
    wx = [torch.randn(12, 4, device=DEVICE) for _ in range(3)]
    plan = fbp_kernels.explain_mfh(x, y, wx, factor=3, backend="triton")
    fwd = W.pick_wide_config(torch.float32, DEVICE, 7, chained=True)
    assert plan.backend == "triton" and "per block (3)" in plan.kernels
    assert f"forward {fwd.block_m}x{fwd.block_n}x{fwd.block_k}" in plan.tile, plan.tile
    seen = []

    def choose(*a, **k):
        seen.append((a, k))
        return "torch", "cost model: made up", {"fused": 2.0, "torch": 1.0}

    monkeypatch.setattr(strategy, "choose_mfh", choose)
    big = torch.empty(64, 100, 2048, dtype=torch.bfloat16, device="meta")
    q = torch.empty(64, 1, 1024, dtype=torch.bfloat16, device="meta")
    w = [torch.empty(5000, 2048, dtype=torch.bfloat16, device="meta") for _ in range(2)]
    plan = fbp_kernels.explain_mfh(big, q, w, factor=5, needs_grad=True)
    assert plan.backend == "torch" and plan.predicted_us == {"fused": 2.0, "torch": 1.0}
    (args, kw), = seen
    assert args[1:] == (6400, 2048, 1024, 5, 1000, 2, torch.bfloat16, True)
    assert kw == {"x_rows": 6400, "y_rows": 64}


def test_mfh_ops_auto_is_the_device_level_choice(monkeypatch):
    """What the MFH ops run for "auto" (under torch.compile, or called directly): the
    model's choice at the MFB default training shape, the same for the forward and the
    backward op (it depends on the device, order and factor only)."""
    from fbp_kernels import costmodel as cm

    monkeypatch.setattr(mfh_ops, "unsupported_reason", lambda name, dev, order=None,
                        factor=None: None)
    monkeypatch.setattr(strategy, "_device_name", lambda dev: "NVIDIA H200")
    cuda = torch.device("cuda")
    shape = cm.Shape(rows=1024, m=2048, n=1024, factor=5, o=1000)
    for order in (2, 3):
        t = {p: cm.predict_mfh(p, shape, cm.GPUS["H200"], "forward+backward", order)
             for p in ("fused", "torch")}
        want = "triton" if t["fused"] < t["torch"] else "torch"
        assert strategy.auto_mfh_backend(cuda, order) == want
        assert mfh_ops.resolve("auto", cuda, order, 5).NAME == want
    assert mfh_ops.resolve("auto", torch.device("cpu"), 2, 5).NAME == "torch"


def test_explain_names_the_cuda_engine_and_tile():
    """The CUDA backend's plan: its kernels and the engine the launcher runs for the
    dtype and rows (the binding's rule, mirrored by costmodel.cuda_engine; CPU tensors
    are described as on sm_80, an sm_90 GPU gets the wgmma engine)."""
    from fbp_kernels import costmodel as cm

    cpu = torch.device("cpu")
    assert cm.cuda_engine("bf16", 1024, 90) == cm.cuda_engine("bf16", 1, 90) == "wgmma"
    assert cm.cuda_engine("bf16", 1024, 80) == "wide" and cm.cuda_engine("bf16", 128, 80) == "async"
    assert cm.cuda_engine("bf16", 1024, 100) == "wide"  # wgmma is sm_90a code only
    assert cm.cuda_engine("tf32", 1024, 90) == "fp32"
    kernels, tile = strategy._describe("cuda", 1024, 1000, 5, torch.bfloat16, cpu, False)
    assert "fused_forward_kernel" in kernels and "projection_grads_kernel" in kernels
    assert tile.startswith("128x128x32, 256 threads, 4 stage(s), cp.async") and "25 outputs" in tile
    _, tile = strategy._describe("cuda", 128, 1000, 5, torch.float16, cpu, False)
    assert tile.startswith("64x64x32, 128 threads, 3 stage(s)") and "12 outputs" in tile
    _, tile = strategy._describe("cuda", 1024, 1000, 5, torch.float32, cpu, False)
    assert tile.startswith("64x64x16, 256 threads, 1 stage(s), FMA")
    kernels, tile = strategy._describe("cuda", 8, 10, 2, torch.float64, cpu, True)
    assert "kept projections" in kernels and "fp64" in tile



@pytest.mark.parametrize("setting, tf32", [
    ("pass", False),
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.set_float32_matmul_precision('high')", True),
    ("torch.set_float32_matmul_precision('highest')", False),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
     "torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
])
def test_fp32_matmul_precision_is_read_through_either_api(setting, tf32):
    """auto's model dtype for fp32 (and the Triton kernels' tl.dot precision) follow
    PyTorch's setting whichever API set it; after the new one, reading the legacy
    allow_tf32 raises, which failed every fp32 call.  One process per setting: the APIs
    leave process-wide state."""
    import subprocess
    import sys

    code = ("import torch\n" + setting + "\n"
            "from fbp_kernels import strategy\n"
            "from fbp_kernels.backends import _common\n"
            "print(_common.matmul_allows_tf32(), strategy._model_dtype(torch.float32))\n")
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision") and "fp32_precision" in setting:
        pytest.skip("this torch has no fp32_precision API")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(tf32), "tf32" if tf32 else "fp32"], proc.stdout
