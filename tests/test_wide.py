"""The wide fused forward (backend ``triton``): one K pass per projection feeding every
factor group, pooling by identity / reshape / selection product, and a row-finishing
kernel.  The shared suites run it as backend ``triton``; this file pins its paths."""

import pytest
import torch

import fbp_kernels
from fbp_kernels import backends
from fbp_kernels.reference import fbp as fbp_reference

from conftest import DEVICE

reason = backends.unsupported_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(reason is not None, reason=f"backend 'triton': {reason}")

if reason is None:
    from fbp_kernels.backends import triton_wide as W


def _inputs(rows, m, n, factor, o, dtype):
    g = torch.Generator().manual_seed(rows * 100 + factor)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ts = (r(rows, m), r(rows, n), r(factor * o, m) / m ** 0.5, r(factor * o, n) / n ** 0.5,
          r(factor * o), r(factor * o))
    return [t.to(dtype=dtype, device=DEVICE) for t in ts]


# Relative error bounds per dtype, on ||z - ref|| / ||ref|| with ref in fp64 from the
# same (rounded) inputs: fp64 ~1e-16 (bound 1e-12), fp32 ~1e-7 (1e-5: long sums), fp16
# ~5e-4 (output rounding 2^-11, bound 5e-3), bf16 ~4e-3 (2^-8, bound 3e-2).
TOLS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", list(TOLS))
def test_every_pooling_path_matches_the_reference(factor, dtype):
    cfg = W.pick_wide_config(dtype)
    assert W.supports(factor, cfg)
    # 19 rows x 7 outputs: tiles cut through rows and output groups (16-row tiles,
    # 16 // factor outputs per tile in the interpreter).
    args = _inputs(19, 21, 18, factor, 7, dtype)
    z = fbp_kernels.fbp(*args, factor=factor, backend="triton")
    ref = fbp_reference(*[a.double() for a in args], factor=factor)
    err = ((z.double() - ref).norm() / ref.norm()).item()
    assert err < TOLS[dtype], (W.pool_mode(factor), err)


def test_unpooled_output_and_dropout_match_the_split_strategy():
    if backends.unsupported_reason("split", DEVICE) is not None:
        pytest.skip("needs backend 'split' to compare against")
    args = _inputs(9, 6, 5, 3, 11, torch.float64)
    for kw in (dict(normalize=False), dict(dropout=0.4, training=True)):
        torch.manual_seed(2)
        zw = fbp_kernels.fbp(*args, factor=3, backend="triton", **kw)
        torch.manual_seed(2)
        zs = fbp_kernels.fbp(*args, factor=3, backend="split", **kw)
        torch.testing.assert_close(zw, zs, rtol=1e-12, atol=1e-12)


def test_a_factor_wider_than_the_tile_falls_back_to_the_first_kernel():
    cfg = W.pick_wide_config(torch.float64)
    factor = cfg.block_n + 1
    assert not W.supports(factor, cfg)
    args = _inputs(3, 4, 4, factor, 2, torch.float64)
    z = fbp_kernels.fbp(*args, factor=factor, backend="triton")
    torch.testing.assert_close(z, fbp_reference(*args, factor=factor), rtol=1e-12, atol=1e-12)


def test_row_norm_does_not_overflow():
    # As for the split epilogue: t ~ 1e19 per output, sum of squares above fp32's range.
    o = 40
    x = torch.ones(2, 4, device=DEVICE)
    x[1] *= 1e-3
    w = torch.full((o, 4), 2.5e18, device=DEVICE)
    z = fbp_kernels.fbp(x, x, w, w, factor=1, backend="triton")
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[0], torch.full((o,), o ** -0.5, device=DEVICE))
