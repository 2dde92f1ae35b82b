"""Index arithmetic past 2^31 elements.

Kernels form int64 scalar tile origins and keep int32 offsets inside a tile; the
host guard copies exotic strided inputs (or refuses) when an in-tile span would not
fit int32.  The real >2^31 run needs a GPU (8 GB of backward buffers)."""

import pytest
import torch

from conftest import backend_param, cuda_only

K = pytest.importorskip("fbp_kernels.backends.triton_kernels",
                        reason="Triton backend not importable")


def _meta(rows, cols, stride0=None):
    t = torch.empty((rows, stride0 or cols), device="meta", dtype=torch.float16)
    return t[:, :cols]


def test_host_guard_copies_inputs_whose_in_tile_span_overflows_int32():
    cfg = K.TileConfig(64, 64, 32, 8, 3)
    wx, wy = _meta(40, 8), _meta(40, 8)
    x_ok, y = _meta(128, 8), _meta(128, 8)
    assert K._tile_offsets_fit(cfg, x_ok, y, wx, wy, factor=5)
    x_far = _meta(128, 8, stride0=2**26)  # 64 rows * 2^26 > 2^31
    assert not K._tile_offsets_fit(cfg, x_far, y, wx, wy, factor=5)
    x2, *_ = K._int32_safe(cfg, x_far, y, wx, wy, 5)
    assert x2.stride(0) == 8  # copied to a dense layout, which fits


def test_host_guard_refuses_what_no_copy_can_fix():
    cfg = K.TileConfig(64, 64, 32, 8, 3)
    ko = 2**26  # 64 rows * 2^26 columns of dA per tile > 2^31
    wx, wy = _meta(ko, 4), _meta(ko, 4)
    with pytest.raises(ValueError, match="int32"):
        K._int32_safe(cfg, _meta(2, 4), _meta(2, 4), wx, wy, 1)


@cuda_only
@pytest.mark.parametrize("backend", ["triton", backend_param("cuda")])
def test_expanded_product_past_2_31_elements_on_gpu(backend):
    """rows * factor * o = 2^31: backward's dA/dC buffers pass 2^31 elements (triton's
    kernels and the CUDA C++ ones: int64 offsets throughout)."""
    import fbp_kernels

    torch.manual_seed(0)
    rows, m, n, factor, o = 2**17, 16, 16, 8, 2048
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(rows, m, device=dev, dtype=dt, requires_grad=True)
    y = torch.randn(rows, n, device=dev, dtype=dt, requires_grad=True)
    wx = (torch.randn(factor * o, m, device=dev) * m**-0.5).to(dt).requires_grad_()
    wy = (torch.randn(factor * o, n, device=dev) * n**-0.5).to(dt).requires_grad_()
    out = fbp_kernels.fbp(x, y, wx, wy, factor=factor, backend=backend)
    g = torch.randn_like(out)
    dx, dwx = torch.autograd.grad(out, (x, wx), g)
    # Check the last rows (whose offsets pass 2^31) against the torch backend on them.
    tail = slice(rows - 64, rows)
    ref = fbp_kernels.fbp(x[tail].float(), y[tail].float(), wx.float(), wy.float(),
                          factor=factor, backend="torch")
    torch.testing.assert_close(out[tail].float(), ref, atol=2e-2, rtol=2e-2)
    # (the gradient w.r.t. the bf16 leaf is bf16: compared in fp32 like dx)
    ref_dx = torch.autograd.grad(ref, x, g[tail].float())[0][tail].float()
    torch.testing.assert_close(dx[tail].float(), ref_dx, atol=5e-2, rtol=5e-2)
    assert torch.isfinite(dwx).all()
