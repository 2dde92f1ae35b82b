"""Autocast: the layer behaves like ``nn.Linear`` under ``torch.autocast``.

What nn.Linear does, and so what is checked here:
- its floating operands (except float64) are cast to the autocast dtype, so the
  output has that dtype and the GEMMs run in it (no fp32 computation hidden inside);
- gradients of the fp32 parameters come back in fp32 (the cast's backward);
- inputs already in the autocast dtype (activations of earlier autocast layers) mix
  with fp32 parameters;
- float64 operands are not touched by autocast.

Checks run on the CPU with bfloat16; the same checks on CUDA (float16 and bfloat16)
skip without a GPU.
"""

import pytest
import torch
from torch import nn

import fbp_kernels
from fbp_kernels import FactorizedBilinearPooling, backends, reference
from helpers import error_vs

from conftest import cuda_only

M, N, O, K = 6, 5, 4, 3

CPU = pytest.param("cpu", torch.bfloat16, id="cpu-bf16")
CUDA = [pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=cuda_only)
        for dt in (torch.float16, torch.bfloat16)]
DEVICE_DTYPES = [CPU] + CUDA


def _layer(device, backend, **kw):
    return FactorizedBilinearPooling(M, N, O, factor=K, backend=backend, **kw).to(device)


class Recorder:
    """Wraps a backend's forward and backward to record the dtypes they receive."""

    def __init__(self, monkeypatch, name):
        module = backends._load(name)
        self.seen = {}
        for fn in ("forward", "backward"):
            monkeypatch.setattr(module, fn, self._wrap(fn, getattr(module, fn)))

    def _wrap(self, fn, inner):
        def wrapped(*args, **kwargs):
            self.seen[fn] = {a.dtype for a in args if torch.is_tensor(a) and a.numel() > 0
                             and a.is_floating_point() and a.dim() >= 1}
            return inner(*args, **kwargs)
        return wrapped


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("backend", backends.NAMES)
def test_dtypes_like_nn_linear(device, dtype, backend, monkeypatch):
    reason = backends.unsupported_reason(backend, torch.device(device))
    if reason:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {reason}")
    if device == "cpu" and backend == "triton":
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (ENVIRONMENT.md)")
    layer = _layer(device, backend)
    linear = nn.Linear(M, K * O).to(device)
    x = torch.randn(7, M, device=device)
    y = torch.randn(7, N, device=device)
    rec = Recorder(monkeypatch, backend)
    with torch.autocast(device, dtype=dtype):
        out = layer(x, y)
        assert out.dtype == linear(x).dtype == dtype
    out.float().pow(2).sum().backward()
    # The kernels got the autocast dtype in both directions: nothing ran in fp32
    # except what the backend does internally (accumulation, the row norm).
    assert rec.seen["forward"] == {dtype}, rec.seen
    assert dtype in rec.seen["backward"], rec.seen
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_same_as_casting_by_hand(device, dtype):
    # Autocast must mean exactly "cast the operands, then run": bitwise the same
    # output and (after the cast back) the same parameter gradients.
    layer = _layer(device, "auto")
    x = torch.randn(2, 3, M, device=device)
    y = torch.randn(2, 1, N, device=device)
    g = torch.randn(2, 3, O, device=device).to(dtype)
    with torch.autocast(device, dtype=dtype):
        out = layer(x, y)
    auto_grads = torch.autograd.grad(out, list(layer.parameters()), g)

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    wx, bx, wy, by = params
    out2 = fbp_kernels.fbp(x.to(dtype), y.to(dtype), wx.to(dtype), wy.to(dtype),
                           bx.to(dtype), by.to(dtype), factor=K)
    hand_grads = torch.autograd.grad(out2, params, g)
    assert torch.equal(out, out2)
    for a, b in zip(auto_grads, hand_grads):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_accuracy_like_eager_under_autocast(device, dtype):
    # No silent fp32 upcast, but no worse than eager PyTorch under the same autocast:
    # the error against an fp64 computation is at most twice the eager reference's
    # plus a floor of a few bf16/fp16 ulps.
    layer = _layer(device, "auto")
    x = torch.randn(16, M, device=device)
    y = torch.randn(16, N, device=device)
    args = (layer.proj_x.weight, layer.proj_y.weight, layer.proj_x.bias, layer.proj_y.bias)
    with torch.autocast(device, dtype=dtype):
        got = layer(x, y)
        eager = reference.fbp(x, y, *args, factor=K)
    exact = reference.fbp(x.double(), y.double(), *[a.double() for a in args], factor=K)
    err, ref_err = error_vs(got, exact), error_vs(eager, exact)
    assert err > 0, "bitwise equal to fp64: the computation was not done in low precision"
    floor = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    assert err <= 2 * ref_err + floor, (err, ref_err)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_disabled_region_runs_in_fp32(device, dtype):
    layer = _layer(device, "auto")
    x, y = torch.randn(3, M, device=device), torch.randn(3, N, device=device)
    with torch.autocast(device, dtype=dtype):
        with torch.autocast(device, enabled=False):
            out = layer(x, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x, y), atol=0, rtol=0)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_low_precision_activations_with_fp32_parameters(device, dtype):
    # The common case in a real autocast model: the inputs come from earlier layers
    # that already ran under autocast.
    layer = _layer(device, "auto")
    x = torch.randn(3, M, device=device).to(dtype)
    y = torch.randn(3, N, device=device)
    with torch.autocast(device, dtype=dtype):
        out = layer(x, y)
        ref = nn.Linear(M, O).to(device)(x)
    assert out.dtype == ref.dtype == dtype


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_float64_is_left_alone(device, dtype):
    layer = _layer(device, "auto").double()
    x = torch.randn(3, M, device=device, dtype=torch.float64)
    y = torch.randn(3, N, device=device, dtype=torch.float64)
    with torch.autocast(device, dtype=dtype):
        out = layer(x, y)
        assert nn.Linear(M, O).to(device).double()(x).dtype == torch.float64
    assert out.dtype == torch.float64


def test_without_autocast_mixed_dtypes_are_refused():
    layer = _layer("cpu", "auto")
    with pytest.raises(TypeError, match=r"one dtype.*x=torch.bfloat16"):
        layer(torch.randn(3, M).bfloat16(), torch.randn(3, N))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_mfh_like_nn_linear(device, dtype):
    layer = fbp_kernels.MFH(M, N, O, factor=K, order=2).to(device)
    x = torch.randn(3, M, device=device).to(dtype)  # an earlier autocast layer's output
    y = torch.randn(3, N, device=device)
    with torch.autocast(device, dtype=dtype):
        out = layer(x, y)
    assert out.dtype == dtype and out.shape == (3, 2 * O)
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())
