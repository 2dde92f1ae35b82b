"""The Triton kernels' dropout stream (fbp_kernels/backends/triton_dropout.py), checked
against an independent NumPy Philox4x32-10: known answers for the generator, then the
mask rule (one Philox call per four columns of a row, word ``col % 4``) for the mask
kernel, the wide kernels' tile path and the element path, which must all agree."""

import numpy as np
import pytest
import torch

import fbp_kernels
from fbp_kernels import backends
from fbp_kernels.reference import fbp as fbp_reference

from conftest import DEVICE

reason = backends.unsupported_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(reason is not None, reason=f"backend 'triton': {reason}")

from philox_ref import M32, expected_keep, philox4x32_10  # noqa: F401


def test_numpy_philox_known_answers():
    """Random123's known-answer vectors (kat_vectors) for the reference itself."""
    cases = [([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
             ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF),
              [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
             ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0),
              [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for ctr, key, want in cases:
        got = philox4x32_10([[w] for w in ctr], key)[:, 0].tolist()
        assert got == want, [hex(v) for v in got]


@pytest.mark.parametrize("seed", [1234, 2 ** 40 + 17, 2 ** 62 - 3], ids=["small", "high-word", "top"])
@pytest.mark.parametrize("ko", [1, 7, 12, 30])
def test_mask_kernel_follows_the_four_per_call_rule(seed, ko):
    from fbp_kernels.backends import triton_kernels as K

    for rate in (0.1, 0.5):
        got = K.dropout_keep_mask(seed, 37, ko, rate, DEVICE).cpu().numpy()
        assert (got == expected_keep(seed, 37, ko, rate)).all(), (seed, ko, rate)


def test_the_four_words_of_a_call_differ():
    """Four elements of a group read four different words (not one word four times):
    with rate 0.5, 14 of 16 groups are mixed."""
    from fbp_kernels.backends import triton_kernels as K

    keep = K.dropout_keep_mask(99, 64, 400, 0.5, DEVICE).view(-1, 4)
    mixed = (keep.any(1) & ~keep.all(1)).float().mean().item()
    assert abs(mixed - (1 - 2 / 16)) < 0.03, mixed


if reason is None:
    import triton
    import triton.language as tl

    from fbp_kernels.backends.triton_dropout import keep_elements

    @triton.jit
    def _element_mask_kernel(out_ptr, seed, row0, KO, drop_p, BLOCK: tl.constexpr):
        rows = row0 + tl.arange(0, 4).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        keep = keep_elements(seed, rows[:, None], cols[None, :], KO, drop_p)
        tl.store(out_ptr + tl.arange(0, 4)[:, None] * BLOCK + cols[None, :], keep.to(tl.int8))


def test_rows_past_the_int32_counter_range_use_the_high_word():
    """The element path with int64 rows: a row whose group index passes 2^32."""
    row0, ko = 2 ** 31 + 5, 16  # g = row * 4 + c // 4 > 2^33
    out = torch.empty((4, ko), dtype=torch.int8, device=DEVICE)
    _element_mask_kernel[(1,)](out, 77, row0, ko, 0.5, BLOCK=ko)
    assert (out.bool().cpu().numpy() == expected_keep(77, 4, ko, 0.5, row0=row0)).all()


@pytest.mark.parametrize("factor", [1, 2, 3, 5, 6, 7])
def test_wide_tiles_start_at_whole_groups(factor):
    from fbp_kernels.backends import triton_wide as W

    for cfg in [W.INTERPRETER_WIDE, *W.WIDE_CONFIGS.values(), *W.WIDE_BWD_CONFIGS.values()]:
        block_j, _ = W.tile_outputs(cfg, factor)
        assert W.supports(factor, cfg) == (block_j >= 1)
        assert (block_j * factor) % 4 == 0 and block_j * factor <= cfg.block_n
        assert block_j * factor > cfg.block_n - 4 * factor  # at most one group short


def test_wide_forward_and_backward_draw_the_kernels_mask():
    """The wide kernels' tile path (keep_tile) against the mask kernel (element path)
    through the outputs and gradients: 3 tiles across 18 outputs at factor 5."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = [r(21, 8), r(21, 6), r(90, 8) / 3, r(90, 6) / 3, r(90), r(90)]
    args = [a.to(DEVICE).requires_grad_() for a in args]
    torch.manual_seed(4)
    z = fbp_kernels.fbp(*args, factor=5, backend="triton", dropout=0.4, training=True)
    torch.manual_seed(4)
    seed = int(fbp_kernels.functional.dropout_seed(True, 0.4))
    mask = torch.from_numpy(expected_keep(seed, 21, 90, 0.4)).to(DEVICE)
    ref = fbp_reference(*args, factor=5, dropout=0.4, dropout_mask=mask)
    torch.testing.assert_close(z, ref, rtol=1e-12, atol=1e-12)
    gz = torch.randn(z.shape, dtype=z.dtype, generator=g).to(DEVICE)
    for a, b in zip(torch.autograd.grad(z, args, gz), torch.autograd.grad(ref, args, gz)):
        # fp64 throughout: 1/(1-p) reaches the kernels as an fp64 argument
        # (tests/test_kernel_scalars.py; as an fp32 one it carried 2.4e-8 into every
        # gradient).
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
