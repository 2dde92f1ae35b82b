"""The wide fused forward (backend ``triton``): one K pass per projection feeding every
factor group, pooling by identity / reshape / selection product, and a row-finishing
kernel.  The shared suites run it as backend ``triton``; this file pins its paths."""

import pytest
import torch

import fbp_kernels
from fbp_kernels import backends, reference
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
    # 32 // factor outputs per tile in the interpreter, rounded so tiles start at a
    # multiple of 4 columns).
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


def _tma(flags, dtype=torch.float64, backward=False):
    """``flags`` (X_DESC, W_DESC, ...) as this device's tile gives them: the interpreter's
    tile reads through TMA where the operands allow (as sm_90's half tiles do); a GPU's
    fp64 tile never does, so there every descriptor flag is False."""
    cfg = (W.pick_wide_bwd_config(dtype, DEVICE) if backward
           else W.pick_wide_config(dtype, DEVICE))
    return tuple(f and cfg.tma if isinstance(f, bool) else f for f in flags)


def _record_launches(monkeypatch):
    """The (X_DESC, W_DESC) flags of every wide-forward launch."""
    seen = []
    real = W.launch

    def spy(kernel, grid, *args, **kw):
        if kernel is W._wide_fwd_kernel:
            seen.append((kw["X_DESC"], kw["W_DESC"]))
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(W, "launch", spy)
    return seen


def test_tma_descriptors_and_pointers_give_the_same_result(monkeypatch):
    """Aligned, unit-stride operands go through TMA descriptors (the interpreter's
    config, like sm_90's, has tma=True); the pointer path gives the same numbers.  (On a
    GPU the fp64 tile reads through pointers both times: there the descriptor path is
    the bf16 tests', test_cuda_graphs.py and test_operands_tma_cannot_read_on_the_gpu.)"""
    import dataclasses

    seen = _record_launches(monkeypatch)
    args = _inputs(19, 24, 16, 5, 7, torch.float64)  # rows 192 B / 128 B: 16-B aligned
    assert all(W.descriptor_ok(t) for t in args[:4])
    z_tma = fbp_kernels.fbp(*args, factor=5, backend="triton")
    first = _tma((True, True))
    monkeypatch.setattr(W, "INTERPRETER_WIDE", dataclasses.replace(W.INTERPRETER_WIDE, tma=False))
    z_ptr = fbp_kernels.fbp(*args, factor=5, backend="triton")
    assert seen == [first, (False, False)]
    torch.testing.assert_close(z_tma, z_ptr, rtol=1e-13, atol=1e-15)
    ref = fbp_reference(*args, factor=5)
    torch.testing.assert_close(z_tma, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["odd-width", "transposed", "offset", "weights-odd"])
def test_operands_that_tma_cannot_read_use_pointers(monkeypatch, case):
    """TMA needs unit stride along K and 16-byte aligned bases and row strides; other
    operands fall back to the pointer path per pair (x, y) / (weights), correctly."""
    seen = _record_launches(monkeypatch)
    x, y, wx, wy, bx, by = _inputs(13, 24, 16, 3, 5, torch.float64)
    expect = (False, True)
    if case == "odd-width":        # 21 fp64 = 168 B rows: not a multiple of 16 B
        x = torch.randn(13, 21, dtype=torch.float64, device=DEVICE)
        wx = torch.randn(15, 21, dtype=torch.float64, device=DEVICE)
        expect = (False, False)
    elif case == "transposed":     # stride along K is not 1
        y = y.t().contiguous().t()
    elif case == "offset":         # base 8 B past an aligned address
        x = torch.randn(13, 25, dtype=torch.float64, device=DEVICE)[:, 1:]
    else:                          # weights only
        wy = torch.randn(15, 17, dtype=torch.float64, device=DEVICE)[:, :16]
        expect = (True, False)
    z = fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=3, backend="triton")
    assert seen == [_tma(expect)]
    torch.testing.assert_close(z, fbp_reference(x, y, wx, wy, bx, by, factor=3),
                               rtol=1e-12, atol=1e-12)


def test_dropout_through_descriptors_keeps_the_shared_mask(monkeypatch):
    """Dropout is applied to A before the y pass (register pressure, triton_wide.py): the
    kept elements and their scale must still be those of the shared Philox mask."""
    seen = _record_launches(monkeypatch)
    args = _inputs(18, 16, 24, 5, 6, torch.float64)
    torch.manual_seed(5)
    z = fbp_kernels.fbp(*args, factor=5, backend="triton", dropout=0.3, training=True)
    assert seen == [_tma((True, True))]
    torch.manual_seed(5)
    seed = int(fbp_kernels.functional.dropout_seed(True, 0.3))
    mask = backends.resolve("triton", DEVICE).dropout_mask(seed, (18, 30), 0.3, DEVICE)
    assert 0 < mask.sum() < mask.numel()
    ref = fbp_reference(*args, factor=5, dropout=0.3, dropout_mask=mask)
    torch.testing.assert_close(z, ref, rtol=1e-12, atol=1e-12)


def _record_backward(monkeypatch):
    seen = []
    real = W.launch

    def spy(kernel, grid, *args, **kw):
        if kernel is W._wide_grad_kernel:
            seen.append((kw["X_DESC"], kw["W_DESC"], kw["POOL"]))
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(W, "launch", spy)
    return seen


@pytest.mark.parametrize("factor", [1, 2, 3, 5])
@pytest.mark.parametrize("normalize", [True, False])
def test_backward_on_the_wide_main_loop_matches_the_reference(monkeypatch, factor, normalize):
    """Lean backward (no saved projections): dA/dC from the wide main loop (every pooling
    path's transpose), then the four GEMMs; all six gradients against the reference."""
    seen = _record_backward(monkeypatch)
    args = [t.requires_grad_() for t in _inputs(21, 24, 16, factor, 7, torch.float64)]
    z = fbp_kernels.fbp(*args, factor=factor, backend="triton", normalize=normalize)
    g = torch.linspace(-1, 1, z.numel(), dtype=z.dtype, device=z.device).view_as(z)
    got = torch.autograd.grad(z, args, g)
    want = torch.autograd.grad(fbp_reference(*args, factor=factor, normalize=normalize),
                               args, g)
    # Two passes: C recomputed -> dA, then A recomputed -> dC.
    assert seen == [_tma((True, True, W.pool_mode(factor)), backward=True)] * 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_backward_with_dropout_and_a_zero_row(monkeypatch):
    """The backward's mask is the forward's (same Philox index), and a row whose ||t||
    is 0 gets zero gradient (the project's degenerate-row rule)."""
    seen = _record_backward(monkeypatch)
    x, y, wx, wy, bx, by = _inputs(18, 16, 24, 5, 6, torch.float64)
    x[3] = 0.0
    bx, by = torch.zeros_like(bx), torch.zeros_like(by)  # row 3: s = 0 exactly
    args = [t.requires_grad_() for t in (x, y, wx, wy, bx, by)]
    torch.manual_seed(9)
    z = fbp_kernels.fbp(*args, factor=5, backend="triton", dropout=0.3, training=True)
    g = torch.randn(z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(1))
    g = g.to(z.device)
    got = torch.autograd.grad(z, args, g)
    torch.manual_seed(9)
    seed = int(fbp_kernels.functional.dropout_seed(True, 0.3))
    mask = backends.resolve("triton", DEVICE).dropout_mask(seed, (18, 30), 0.3, DEVICE)
    zr = fbp_reference(*args, factor=5, dropout=0.3, dropout_mask=mask)
    want = torch.autograd.grad(zr, args, g)
    assert seen == [_tma((True, True, 2), backward=True)] * 2
    assert got[0][3].abs().max() == 0 and got[1][3].abs().max() == 0
    # fp64 throughout: the kernels take 1/(1-p) as an fp64 argument (an fp32 one carried
    # 2.4e-8 relative rounding into every gradient).  The mask must match exactly (a
    # wrong element would be an O(1) difference).
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_backward_gradcheck_through_descriptors_and_pointers(monkeypatch):
    import dataclasses

    for tma in (True, False):
        monkeypatch.setattr(W, "INTERPRETER_WIDE",
                            dataclasses.replace(W.INTERPRETER_WIDE, tma=tma))
        args = [t.requires_grad_() for t in _inputs(5, 8, 6, 3, 4, torch.float64)]
        assert torch.autograd.gradcheck(
            lambda *a: fbp_kernels.fbp(*a, factor=3, backend="triton"), args)


def test_backward_tile_families():
    """The backward's tile per target: sm_90 half through TMA at 128 x 128 / 16 warps,
    the pointer-loop tile for operands TMA cannot read, the activation tiles; the
    interpreter runs its own small tile whatever the options."""
    bf16, f32 = torch.bfloat16, torch.float32
    fam = W.bwd_config_family
    assert fam(bf16, (9, 0)) == "sm90-half" and W.WIDE_BWD_CONFIGS["sm90-half"].tma
    assert fam(bf16, (9, 0), descriptors=False) == "half"
    assert fam(bf16, (9, 0), "tanh") == "sm90-half-act"
    assert fam(bf16, (9, 0), "relu", descriptors=False) == "half-act"
    assert fam(bf16, (8, 0)) == "half" and fam(bf16, (8, 0), "relu") == "half-act"
    assert fam(f32, (9, 0), "relu") == fam(f32, (8, 0)) == "fp32"
    assert not any(c.tma for k, c in W.WIDE_BWD_CONFIGS.items() if not k.startswith("sm90"))
    if W.INTERPRET:  # a GPU picks by the rules above
        assert W.pick_wide_bwd_config(bf16, None, "relu", False) is W.INTERPRETER_WIDE


def test_forward_tile_for_operands_tma_cannot_read(monkeypatch):
    """sm_90's forward tile is the 128 x 128 TMA one for operands a descriptor can read;
    otherwise (rows not 16-byte aligned, a broadcast row stride of 0) the pointer-loop
    tile, whose build without stride hints does not spill (the TMA-sized one did: 336 B);
    at the chained and small-batch tiles nothing changes."""
    bf16 = torch.bfloat16
    fam = W.config_family
    assert fam(bf16, (9, 0)) == "sm90-half" and fam(bf16, (9, 0), descriptors=False) == "half"
    assert fam(bf16, (9, 0), chained=True, descriptors=False) == "sm90-half-chain"
    assert fam(bf16, (9, 0), rows=1, descriptors=False) == "tiny"
    assert fam(bf16, (8, 0), descriptors=False) == fam(bf16, (8, 0)) == "half"
    # descriptor_ok: aligned rows yes; 600-byte rows (bf16 m = 300), a stride-0 broadcast
    # of one row, a non-unit K stride no.
    aligned = torch.zeros(64, 304, dtype=bf16)
    assert W.descriptor_ok(aligned)
    assert not W.descriptor_ok(torch.zeros(64, 300, dtype=bf16))
    assert not W.descriptor_ok(torch.zeros(304, dtype=bf16).expand(64, 304))
    assert not W.descriptor_ok(torch.zeros(304, 64, dtype=bf16).t())
    # forward_config as a Hopper launch would pick it (the interpreter runs its own tile).
    monkeypatch.setattr(W, "INTERPRET", False)
    monkeypatch.setattr(W, "_capability", lambda device: (9, 0))
    w = torch.zeros(5 * 40, 304, dtype=bf16)
    assert W.forward_config(aligned, aligned, w, w, 5, 4096) is W.WIDE_CONFIGS["sm90-half"]
    odd = torch.zeros(64, 300, dtype=bf16)
    w_odd = torch.zeros(5 * 40, 300, dtype=bf16)
    assert W.forward_config(odd, odd, w_odd, w_odd, 5, 4096) is W.WIDE_CONFIGS["half"]
    # A factor the pointer tile (64 columns) cannot hold keeps the wide tile.
    assert not W.supports(17, W.WIDE_CONFIGS["half"]) and W.supports(17, W.WIDE_CONFIGS["sm90-half"])
    w17 = torch.zeros(17 * 4, 300, dtype=bf16)
    assert W.forward_config(odd, odd, w17, w17, 17, 4096) is W.WIDE_CONFIGS["sm90-half"]


def test_coattention_layout():
    """Which input is shared by how many consecutive broadcast rows, and what stays a
    plain broadcast (materialised)."""
    from fbp_kernels.backends._common import coattention_layout

    def lay(xs, ys):
        co = coattention_layout(torch.zeros(*xs, 3), torch.zeros(*ys, 2))
        return None if co is None else (co.r, co.swapped, tuple(co.shared.shape))

    assert lay((4, 5), (4, 1)) == (5, False, (4, 2))         # regions x question
    assert lay((4, 1), (4, 5)) == (5, True, (4, 3))          # the mirror: x shared
    assert lay((2, 3, 4), (2, 1, 1)) == (12, False, (2, 2))  # shared over two dimensions
    assert lay((6,), ()) == (6, False, (1, 2))               # one y for every row
    assert lay((2, 3, 4), (1, 1, 1)) == (24, False, (1, 2))
    assert lay((2, 3, 4), (2, 3, 1)) == (4, False, (6, 2))
    assert lay((5, 3, 4), (1, 3, 1)) == (4, False, (15, 2))  # leading broadcast: per group
    assert lay((4, 5), (4, 5)) is None and lay((4, 5), (1, 5)) is None  # not trailing
    assert lay((1, 5), (4, 1)) is None                       # neither covers the batch


def _record_shared(monkeypatch):
    seen = []
    real = W.launch

    def spy(kernel, grid, *args, **kw):
        if "SHARED" in kw:
            seen.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel),
                         kw["SHARED"]))
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(W, "launch", spy)
    return seen


def _broadcast_args(g, xs, ys, k, o, m, n):
    """fp64 ``(x (*xs, m), y (*ys, n), W_x, W_y, b_x, b_y)`` needing gradients, drawn
    from ``g``."""
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = [r(*xs, m), r(*ys, n), r(k * o, m) / 3, r(k * o, n) / 3, r(k * o), r(k * o)]
    return [a.to(DEVICE).requires_grad_() for a in args]


def _assert_matches_reference_with_the_kernels_mask(z, args, g, xs, ys, k, o, activation,
                                                    norm_dims):
    """``z = fbp(*args, dropout=0.25, training=True, ...)`` drawn after
    ``torch.manual_seed(3)``: forward and all six gradients against the fp64 reference
    fed the kernels' own keep-mask for the same seed."""
    torch.manual_seed(3)
    seed = int(fbp_kernels.functional.dropout_seed(True, 0.25))
    batch = torch.broadcast_shapes(xs, ys)
    mask = backends.resolve("triton", DEVICE).dropout_mask(seed, (*batch, k * o), 0.25, DEVICE)
    ref = fbp_reference(*args, factor=k, dropout=0.25, dropout_mask=mask,
                        activation=activation, norm_dims=norm_dims)
    torch.testing.assert_close(z, ref, rtol=1e-12, atol=1e-12)
    gz = torch.randn(z.shape, generator=g, dtype=z.dtype).to(DEVICE)
    got = torch.autograd.grad(z, args, gz)
    want = torch.autograd.grad(ref, args, gz)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)  # 1/(1-p) in fp32


@pytest.mark.parametrize("xs, ys", [((3, 5), (3, 1)), ((3, 1), (3, 5)), ((2, 3, 4), (2, 1, 1)),
                                    ((6,), ())], ids=str)
@pytest.mark.parametrize("activation, norm_dims", [(None, 1), ("tanh", 2)])
def test_coattention_reads_the_shared_projection_per_group(monkeypatch, xs, ys, activation,
                                                          norm_dims):
    """Co-attention without copies: the shared input's projection is formed once per
    group and read per row (forward and the backward's first pass: SHARED), dC summed
    over each group; forward and all six gradients against the reference, with dropout
    (the kernels' own mask fed to the reference)."""
    seen = _record_shared(monkeypatch)
    g = torch.Generator().manual_seed(7)
    k, o, m, n = 5, 6, 9, 7
    args = _broadcast_args(g, xs, ys, k, o, m, n)
    torch.manual_seed(3)
    z = fbp_kernels.fbp(*args, factor=k, backend="triton", dropout=0.25, training=True,
                        activation=activation, norm_dims=norm_dims)
    _assert_matches_reference_with_the_kernels_mask(z, args, g, xs, ys, k, o, activation,
                                                    norm_dims)
    assert seen == [("_wide_fwd_kernel", True), ("_wide_grad_kernel", True),
                    ("_wide_grad_kernel", False)], seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_coattention_low_precision(dtype):
    """The shared projection is rounded to the input dtype once (as eager rounds its
    projections): within the same bounds as the plain path."""
    args = _inputs(12, 20, 12, 5, 7, torch.float64)
    x = args[0].view(3, 4, 20)
    y = args[1].view(3, 4, 12)[:, :1]
    low = [t.to(dtype) for t in (x, y, *args[2:])]
    z = fbp_kernels.fbp(*low, factor=5, backend="triton")
    ref = fbp_reference(*[t.double() for t in low], factor=5)
    err = ((z.double() - ref).norm() / ref.norm()).item()
    assert err < TOLS[dtype], err


@pytest.mark.parametrize("xs, ys, keep", [
    ((4,), (4,), "x"), ((4,), (4,), "y"),
    ((3, 5), (3, 1), "y"),      # co-attention, the shared question's projection kept
    ((3, 5), (3, 1), "x"),      # ... the regions' kept: the question materialised
    ((3, 1), (3, 5), "x"),      # the mirror (x shared, slots swapped)
    ((1, 4), (3, 4), "x"),      # a plain broadcast: the kept projection copied to rows
], ids=str)
@pytest.mark.parametrize("activation, norm_dims", [(None, 1), ("relu", 2)])
def test_middle_memory_mode_reads_the_kept_projection(monkeypatch, xs, ys, keep, activation,
                                                      norm_dims):
    """save_projections="x"/"y" on the wide kernels (issue 12 item 4): forward keeps that
    input's pre-activation projection at its own leading shape (and nothing else of
    width K*o), the kernels read it in place of its main loop (SHARED in the forward
    and the backward's first pass), and forward and all six gradients match the
    reference, with dropout (the kernels' own mask)."""
    seen = _record_shared(monkeypatch)
    g = torch.Generator().manual_seed(11)
    k, o, m, n = 3, 5, 6, 7
    args = _broadcast_args(g, xs, ys, k, o, m, n)
    saved = []
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = fbp_kernels.fbp(*args, factor=k, backend="triton", dropout=0.25, training=True,
                            activation=activation, norm_dims=norm_dims, save_projections=keep)
    inp, w, b = (args[0], args[2], args[4]) if keep == "x" else (args[1], args[3], args[5])
    wide = [t for t in saved if t.dim() >= 1 and t.shape[-1] == k * o and t.dim() > 1]
    assert len(wide) == 1 and wide[0].shape == (*inp.shape[:-1], k * o), \
        [tuple(t.shape) for t in wide]
    torch.testing.assert_close(wide[0], torch.nn.functional.linear(inp, w, b).detach(),
                               rtol=1e-13, atol=1e-13)
    _assert_matches_reference_with_the_kernels_mask(z, args, g, xs, ys, k, o, activation,
                                                    norm_dims)
    assert seen == [("_wide_fwd_kernel", True), ("_wide_grad_kernel", True),
                    ("_wide_grad_kernel", False)], seen


def test_middle_memory_mode_forward_does_not_copy_the_kept_inputs_rows(monkeypatch):
    """A plain broadcast of the kept input: its forward reads only the kept projection,
    so its rows are a zero-stride view, not a materialised copy (backward, whose weight
    gradient reads them, builds its own layout; the result still matches the reference:
    test_middle_memory_mode_reads_the_kept_projection)."""
    seen = []
    real = W.wide_forward

    def spy(x2, y2, *a, **k):
        seen.append((tuple(x2.shape), tuple(y2.shape), y2.stride(0)))
        return real(x2, y2, *a, **k)

    monkeypatch.setattr(W, "wide_forward", spy)
    g = torch.Generator().manual_seed(5)
    args = _broadcast_args(g, (1, 4), (3, 4), 3, 5, 6, 7)
    fbp_kernels.fbp(*args, factor=3, backend="triton", save_projections="x")
    # slots swapped (x kept): the y slot holds x's 12 broadcast rows of width 6
    assert seen == [((12, 7), (12, 6), 0)], seen


def test_middle_memory_mode_low_precision_and_refusals():
    """bf16: within the plain path's bound; save_projections=True with an activation is
    refused (the wide kernels keep at most one projection), naming the way out."""
    args = _inputs(12, 20, 12, 5, 7, torch.float64)
    low = [t.to(torch.bfloat16) for t in args]
    ref = fbp_reference(*[t.double() for t in low], factor=5)
    for keep in ("x", "y"):
        z = fbp_kernels.fbp(*low, factor=5, backend="triton", save_projections=keep)
        err = ((z.double() - ref).norm() / ref.norm()).item()
        assert err < TOLS[torch.bfloat16], (keep, err)
    with pytest.raises(ValueError, match="at most one projection"):
        fbp_kernels.fbp(*args, factor=5, backend="triton", save_projections=True,
                        activation="relu")


def _fbp_on(x, y, wx, wy, bx, by, *, factor, backend, **kw):
    """FBP on ``backend`` ("reference": the specification)."""
    if backend == "reference":
        return fbp_reference(x, y, wx, wy, bx, by, factor=factor, **kw)
    return fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=factor, backend=backend, **kw)


def _mfh_of_pairs(x, y, wx0, wy0, bx0, by0, wx1, wy1, bx1, by1, *, factor, backend, **kw):
    """An order-2 MFH from flat per-block tensors, on ``backend`` ("reference": the
    specification)."""
    blocks = ([wx0, wx1], [wy0, wy1], [bx0, bx1], [by0, by1])
    if backend == "reference":
        return reference.mfh(x, y, *blocks, factor=factor, **kw)
    return fbp_kernels.mfh(x, y, *blocks, factor=factor, backend=backend, **kw)


GPU_TILES = ["sm90-half", "half", "tiny", "sm90-half-chain", "fp32"]


@pytest.mark.parametrize("family", GPU_TILES)
def test_every_gpu_tile_runs_in_the_interpreter(monkeypatch, family):
    """The GPU tiles themselves (not the interpreter's 16 x 32 x 16) through the
    interpreter: each one's constexprs (BLOCK_J/BLOCK_JP, a BLOCK_K wider than m, the
    tiny tile's 16 rows) give the reference's forward and gradients; MFH's chained tile
    runs an order-2 MFH (its chained kernels)."""
    assert sorted(GPU_TILES) == sorted(W.WIDE_CONFIGS)
    cfg = W.WIDE_CONFIGS[family]
    mfh = family == "sm90-half-chain"
    if cfg.tma and DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) < (9, 0):
        pytest.skip("TMA descriptors need sm_90")
    # Both launchers take this tile (the forward's and the backward's pick), on a GPU as
    # in the interpreter.
    monkeypatch.setattr(W, "pick_wide_config", lambda *a, **k: cfg)
    monkeypatch.setattr(W, "pick_wide_bwd_config", lambda *a, **k: cfg)
    dtype = torch.float32 if family == "fp32" else torch.bfloat16
    # 20 rows: two 16-row tiles (one partial) for tiny, one partial tile otherwise;
    # factor 5 x o 30: 3 (64 columns) or 2 (128) output tiles, the last partial.
    args = [a.requires_grad_() for a in _inputs(20, 40, 24, 5, 30, dtype)]
    if mfh:
        # Two blocks: the second block's parameters are the first's in reversed row order.
        second = [t.detach().flip(0).requires_grad_() for t in args[2:]]
        args = args + second
    op = _mfh_of_pairs if mfh else _fbp_on
    z = op(*args, factor=5, backend="triton")
    exact = [a.detach().double().requires_grad_() for a in args]
    ref = op(*exact, factor=5, backend="reference")
    err = ((z.double() - ref).norm() / ref.norm()).item()
    assert err < TOLS[dtype], (family, err)
    # Gradients at eps 1e-2: at the default 1e-6 the signed sqrt's slope at pooled values
    # near 0 (up to 500) turns a rounding of s into an O(1) change of a gradient element,
    # so every low-precision backend, eager included, errs by 15-30% (measured) on
    # this small problem, and by how much depends on where its roundings fall.  With
    # slope <= 5 the bound below is about the kernels, not about that conditioning.
    z = op(*args, factor=5, backend="triton", eps=1e-2)
    ref = op(*exact, factor=5, eps=1e-2, backend="reference")
    g = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = g.to(z.device)
    got = torch.autograd.grad(z, args, g.to(dtype))
    want = torch.autograd.grad(ref, exact, g)
    # Bound: twice the eager reference's own error in the same dtype, plus a floor of a
    # few units in the last place (as tests/test_split_dropin.py).
    eager = torch.autograd.grad(op(*args, factor=5, eps=1e-2, backend="reference"), args,
                                g.to(dtype))
    floor = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    names = ["dx", "dy", "dwx", "dwy", "dbx", "dby"]
    names += [f"{n}[1]" for n in names[2:]] if mfh else []
    for name, a, e, b in zip(names, got, eager, want):
        rel = ((a.double() - b).norm() / b.norm()).item()
        rel_eager = ((e.double() - b).norm() / b.norm()).item()
        assert rel <= 2 * rel_eager + floor, (family, name, rel, rel_eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("expand_x", [False, True], ids=["rows-600B", "x-expanded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_operands_tma_cannot_read_on_the_gpu(dtype, expand_x):
    """Operands no TMA descriptor can read at a training row count: rows of 600 bytes
    (m = 300 in half precision) and an x given as one row expand()ed over the batch
    (row stride 0; no co-attention layout, so the view reaches the kernel).  On sm_90
    they take the pointer-loop tile (forward_config); forward and every gradient within
    twice the eager reference's own error in that dtype plus a floor of a few ulp (the
    rule of test_correctness), without the normalisation."""
    from helpers import detached64, error_vs, grads

    floor = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.manual_seed(0)
    rows, m, n, factor, o = 200, 300, 200, 5, 40
    dev = torch.device("cuda")
    x = torch.randn(1 if expand_x else rows, m, device=dev, dtype=torch.float64)
    y = torch.randn(rows, n, device=dev, dtype=torch.float64)
    wx = torch.randn(factor * o, m, device=dev, dtype=torch.float64) * m ** -0.5
    wy = torch.randn(factor * o, n, device=dev, dtype=torch.float64) * n ** -0.5
    bx = torch.randn(factor * o, device=dev, dtype=torch.float64) * 0.1
    by = torch.randn(factor * o, device=dev, dtype=torch.float64) * 0.1
    leaves = [t.to(dtype).requires_grad_() for t in (x, y, wx, wy, bx, by)]

    def inputs(ts):
        return [ts[0].expand(rows, m) if expand_x else ts[0], *ts[1:]]

    def run(ts, fn):
        # normalize=False: the main loop and pooling this test is about, without the
        # signed square root, whose slope near 0 turns rounding into noise that a
        # ratio to eager's error cannot bound.
        out = fn(*inputs(ts), factor=factor, normalize=False)
        return [out] + grads(out, ts, g.to(out.dtype))

    g = torch.randn(rows, o, device=dev, dtype=torch.float64)
    exact = run(detached64(leaves), fbp_reference)
    eager = run(leaves, fbp_reference)
    got = run(leaves, lambda *a, **k: fbp_kernels.fbp(*a, backend="triton", **k))
    for name, a, e, ex in zip(("out", "dx", "dy", "dwx", "dwy", "dbx", "dby"), got, eager, exact):
        assert error_vs(a, ex) <= 2 * error_vs(e, ex) + floor, name


def test_first_kernel_grid_refuses_too_many_output_tiles():
    """The one-launch kernels put output tiles on the grid's second dimension, which CUDA
    caps at 65535: beyond it a clear ValueError naming the alternatives, not a launch
    failure (the interpreter has no such limit, so the rule is checked directly)."""
    from fbp_kernels.backends import triton_kernels as K

    cfg = next(iter(K.CONFIGS["fp32"].values()))
    assert K._first_kernel_grid(100, cfg.block_o * K.MAX_GRID_Y, cfg)[1] == K.MAX_GRID_Y
    with pytest.raises(ValueError, match="backend='split'"):
        K._first_kernel_grid(100, cfg.block_o * K.MAX_GRID_Y + 1, cfg)


def test_tile_origins_past_2_31_rows_do_not_wrap():
    """With rows >= 2^31 (an i64 argument) the row tile's origin passes 2^31: it must be
    computed in 64 bits (an int32 row-tile index wrapped it negative), while the output
    tile stays int32 (the weights' TMA coordinate).  Checked on _tile_frame with the
    last row tile's program id (one output tile: program id = row tile)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, pid, rows, O, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr):
        row0_32, row0, j0, col0_32, col0, KO, rm, rn, m_mask, n_ok = W._tile_frame(
            pid, rows, O, 5, BLOCK_M, 128, BLOCK_J, 8)
        tl.store(out_ptr, row0_32.to(tl.int64))
        tl.store(out_ptr + 1, row0)
        tl.store(out_ptr + 2, tl.sum(m_mask.to(tl.int64), axis=0))
        tl.store(out_ptr + 3, col0)

    rows = 2**31 + 4100
    last = -(-rows // 128) - 1
    out = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    probe[(1,)](out, last, rows, 20, BLOCK_M=128, BLOCK_J=24)
    assert last * 128 > 2**31
    assert out.tolist() == [last * 128, last * 128, rows - last * 128, 0]
