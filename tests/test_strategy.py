"""``backend="auto"``'s choice between strategies, and ``fbp_kernels.explain``."""

import pytest
import torch

import fbp_kernels
from fbp_kernels import backends, strategy

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
    mode never picks triton where its wide tiles cannot hold a factor group, nor cuda
    (which recomputes both projections)."""
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
    assert strategy.choose(cuda, 64, 64, 32, 5, 10, torch.bfloat16, True, "y")[0] == "torch"
    assert strategy.choose(cuda, 64, 64, 32, 5, 10, torch.bfloat16, True)[0] == "cuda"


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
