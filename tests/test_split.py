"""The split strategy (cuBLAS projections + one Triton epilogue, chunked over rows).

The shared suites (correctness, gradcheck, dropout, memory, bad input, ...) run it as
backend ``split`` like every other backend; this file checks what is particular to it:
chunking, the epilogue's one-block and multi-block paths, the dropout stream it shares
with the fused kernels, overflow-safe norms and its saved-projection backward.
"""

import pytest
import torch

import fbp_kernels
from fbp_kernels import backends
from fbp_kernels.reference import fbp as fbp_reference

from conftest import DEVICE

reason = backends.unsupported_reason("split", DEVICE)
pytestmark = pytest.mark.skipif(reason is not None, reason=f"backend 'split': {reason}")

if reason is None:
    from fbp_kernels.backends import split_backend as S
    from fbp_kernels.backends import triton_split as E


def _problem(rows, m, n, factor, o, dtype=torch.float64, bias=True):
    t = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE, requires_grad=True)  # noqa: E731
    x, y = t(rows, m), t(rows, n)
    wx, wy = t(factor * o, m), t(factor * o, n)
    bx, by = (t(factor * o), t(factor * o)) if bias else (None, None)
    return x, y, wx, wy, bx, by


def _run(args, factor, backend="split", seed=0, **kw):
    """Forward with a fixed dropout seed, then the gradients of a fixed cotangent."""
    torch.manual_seed(seed)
    z = fbp_kernels.fbp(*args, factor=factor, backend=backend, **kw)
    g = torch.linspace(-1, 1, z.numel(), dtype=z.dtype, device=z.device).view_as(z)
    inputs = [a for a in args if a is not None]
    return z.detach(), torch.autograd.grad(z, inputs, g)


@pytest.fixture
def budget():
    """Set the split memory budget for one test, restored afterwards."""
    old = fbp_kernels.strategy.split_memory_budget()
    yield fbp_kernels.set_split_memory_budget
    fbp_kernels.set_split_memory_budget(old)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_chunks_of_any_size_give_the_same_result(budget, dropout):
    # 7 rows in chunks of 1, 2, 3 and one chunk: the dropout index is the global row,
    # so masks and results must not depend on the chunking.  fp64: the GEMMs' blocking
    # (it depends on the number of rows) and the order of the weight-gradient sums over
    # chunks differ, a few ulp; a wrong mask or row offset would differ by O(1).
    args = _problem(7, 6, 5, 3, 4)
    ko_bytes = 2 * 12 * 8  # two (row, K*o) fp64 buffers per row
    results = []
    for rows_per_chunk in (1, 2, 3, 100):
        budget(rows_per_chunk * ko_bytes)
        assert S.chunk_rows(12, torch.float64) == rows_per_chunk
        results.append(_run(args, 3, dropout=dropout, training=True))
    z0, g0 = results[-1]
    for z, grads in results[:-1]:
        torch.testing.assert_close(z, z0, rtol=1e-13, atol=1e-13)
        for a, b in zip(grads, g0):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_chunk_rows_respects_the_budget(budget):
    # MFB default in bf16: K*o = 5000, two buffers of 10 kB per row -> 64 MiB / 20 kB.
    assert S.chunk_rows(5000, torch.bfloat16, budget=64 * 2**20) == 64 * 2**20 // 20000
    assert S.chunk_rows(5000, torch.float32, budget=64 * 2**20) == 64 * 2**20 // 40000
    assert S.chunk_rows(5000, torch.float32, budget=1) == 1  # never zero rows
    for bad in (0, -5, 2.5, True, "64"):
        with pytest.raises(ValueError, match="budget"):
            budget(bad)


@pytest.mark.parametrize("o, factor, blocks", [(5, 3, 1), (20, 3, 2), (9, 1, 1), (70, 2, 3)])
def test_one_block_and_multi_block_rows_match_the_reference(monkeypatch, o, factor, blocks):
    # The interpreter's tile size everywhere: a GPU's 8192-element tile would hold each
    # of these rows in one block, and the multi-block path is what is under test.
    real = E.pick_epilogue_config
    monkeypatch.setattr(E, "pick_epilogue_config",
                        lambda rows, o, f, limit=None, activation=None:
                        real(rows, o, f, limit=E.INTERPRETER_TILE_ELEMENTS,
                             activation=activation))
    cfg = E.pick_epilogue_config(4, o, factor)
    assert -(-o // cfg.block_o) == blocks  # the path this case is meant to cover
    args = _problem(4, 7, 5, factor, o)
    z, grads = _run(args, factor)
    ref = fbp_reference(*[a for a in args], factor=factor)
    torch.testing.assert_close(z, ref.detach(), rtol=1e-12, atol=1e-12)
    g = torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype, device=ref.device).view_as(ref)
    for a, b in zip(grads, torch.autograd.grad(ref, args, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(backends.unsupported_reason("triton", DEVICE) is not None,
                    reason="needs the fused Triton backend to compare against")
def test_dropout_mask_is_the_fused_kernels_mask():
    # Same seed, same Philox index: switching strategies never changes the random stream.
    args = _problem(5, 6, 4, 3, 7)
    zs, gs = _run(args, 3, backend="split", seed=3, dropout=0.4, training=True)
    zt, gt = _run(args, 3, backend="triton", seed=3, dropout=0.4, training=True)
    torch.testing.assert_close(zs, zt, rtol=1e-12, atol=1e-12)
    for a, b in zip(gs, gt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    m_split = backends.resolve("split", DEVICE).dropout_mask(11, (5, 21), 0.4, DEVICE)
    m_fused = backends.resolve("triton", DEVICE).dropout_mask(11, (5, 21), 0.4, DEVICE)
    assert torch.equal(m_split, m_fused)


@pytest.mark.parametrize("o", [8, 40])  # one block, and several (the running-max rescale)
def test_row_norm_does_not_overflow(o):
    # Factor 1, a = c = 1e19 in one row: s = 1e38 (fits fp32), t ~ 1e19, but the sum of
    # o squares t^2 ~ o * 1e38 is above fp32's 3.4e38.  Scaled accumulation gets
    # z = t / ||t|| = 1/sqrt(o) everywhere; a naive sum of squares gives 0 and NaN.
    m = n = 4
    x = torch.full((2, m), 1.0, device=DEVICE)
    y = torch.full((2, n), 1.0, device=DEVICE)
    x[1] *= 1e-3  # an ordinary row beside it
    w = torch.full((o, m), 2.5e18, device=DEVICE)
    z = fbp_kernels.fbp(x, y, w, w, factor=1, backend="split")
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[0], torch.full((o,), o ** -0.5, device=DEVICE))
    ref = fbp_reference(x.double(), y.double(), w.double(), w.double(), factor=1)
    torch.testing.assert_close(z[1].double(), ref[1], rtol=1e-5, atol=1e-6)


def test_saved_projections_survive_a_second_backward():
    # With save_projections the epilogue must not write dA/dC over the saved A/C:
    # retain_graph=True runs backward twice on the same saved tensors.
    args = _problem(3, 5, 4, 2, 6)
    z = fbp_kernels.fbp(*args, factor=2, backend="split", save_projections=True)
    g = torch.randn_like(z)
    first = torch.autograd.grad(z, args, g, retain_graph=True)
    second = torch.autograd.grad(z, args, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gradcheck_with_dropout_over_several_chunks(budget):
    budget(2 * 2 * 6 * 8)  # two rows per chunk, three chunks
    x, y, wx, wy, bx, by = _problem(5, 3, 4, 2, 3)
    seed = torch.randint(0, 2**62, ()).item()

    def f(*a):
        return fbp_kernels.ops.FBPFunction.apply(*a, seed, 2, 0.25, True, 1e-6, "none", "split")

    assert torch.autograd.gradcheck(f, (x, y, wx, wy, bx, by), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- co-attention

BROADCASTS = [
    ((2, 3), (2, 1)),        # regions x one question per sample (VQA co-attention)
    ((2, 1), (2, 3)),        # the mirrored case
    ((3,), (1,)), ((1,), (3,)), ((4,), ()), ((), (3,)),
    ((2, 3), (3,)),          # one question list shared by every sample
    ((2, 1, 3), (1, 2, 1)),  # three alternating levels: materialised
    ((0, 3), (0, 1)),        # empty batch
]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("xs, ys", BROADCASTS)
def test_broadcast_layouts_match_the_reference(budget, xs, ys, dropout):
    budget(2 * 12 * 8 * 2)  # a few rows per chunk, so chunks cut through the groups
    m, n, factor, o = 5, 4, 3, 4
    t = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE,  # noqa: E731
                               requires_grad=True)
    args = (t(*xs, m), t(*ys, n), t(factor * o, m), t(factor * o, n), t(factor * o),
            t(factor * o))
    z, grads = _run(args, factor, dropout=dropout, training=True, seed=4)
    # The fused backend materialises the broadcast and draws the same masks: the two
    # must agree to rounding, masks included.
    if backends.unsupported_reason("triton", DEVICE) is None:
        zt, gt = _run(args, factor, backend="triton", dropout=dropout, training=True, seed=4)
        torch.testing.assert_close(z, zt, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, gt):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if dropout == 0.0:
        ref = fbp_reference(*args, factor=factor)
        torch.testing.assert_close(z, ref.detach(), rtol=1e-12, atol=1e-12)
        g = torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype, device=ref.device).view_as(ref)
        for a, b in zip(grads, torch.autograd.grad(ref, args, g)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_shared_question_is_projected_once_per_sample(monkeypatch):
    # (B, R, m) regions with a (B, 1, n) question: y is projected for B rows, not B*R,
    # in forward and in backward, and its gradient GEMMs see B rows too.
    B, R, m, n, factor, o = 3, 5, 6, 4, 2, 3
    projected = []
    real = S._project

    def spy(inp, weight, bias, out=None):
        projected.append((inp.shape[0], weight.shape[1]))
        return real(inp, weight, bias, out)

    monkeypatch.setattr(S, "_project", spy)
    x = torch.randn(B, R, m, device=DEVICE, requires_grad=True)
    y = torch.randn(B, 1, n, device=DEVICE, requires_grad=True)
    wx = torch.randn(factor * o, m, device=DEVICE, requires_grad=True)
    wy = torch.randn(factor * o, n, device=DEVICE, requires_grad=True)
    z = fbp_kernels.fbp(x, y, wx, wy, factor=factor, backend="split")
    z.sum().backward()
    assert sorted(projected) == sorted([(B * R, m), (B, n)] * 2), projected
    assert y.grad.shape == y.shape and wy.grad.shape == wy.shape


def test_saved_projections_keep_each_operands_own_shape():
    x = torch.randn(2, 4, 5, device=DEVICE)
    y = torch.randn(2, 1, 3, device=DEVICE)
    wx, wy = torch.randn(6, 5, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    res = S.forward(x, y, wx, wy, None, None, factor=2, dropout=0.0, seed=None,
                    normalize=True, eps=1e-6, save_projections=True)
    assert res.a.shape == (2, 4, 6) and res.c.shape == (2, 1, 6)
    assert res.out.shape == (2, 4, 3)


@pytest.mark.parametrize("keep", [False, True, "x", "y"])
def test_every_memory_mode_gives_the_same_gradients(budget, keep):
    # Keep both projections, neither, or one (recompute the other): same results, only
    # what forward saves differs.  Chunked (2 rows per chunk) and broadcast (co-attention).
    budget(2 * 2 * 6 * 8)
    x = torch.randn(3, 2, 5, dtype=torch.float64, device=DEVICE)
    y = torch.randn(3, 1, 4, dtype=torch.float64, device=DEVICE)
    wx = torch.randn(6, 5, dtype=torch.float64, device=DEVICE)
    wy = torch.randn(6, 4, dtype=torch.float64, device=DEVICE)
    bx = torch.randn(6, dtype=torch.float64, device=DEVICE)
    by = torch.randn(6, dtype=torch.float64, device=DEVICE)
    opts = dict(factor=2, dropout=0.25, seed=9, normalize=True, eps=1e-6)
    res = S.forward(x, y, wx, wy, bx, by, save_projections=keep, **opts)
    assert (res.a is not None) == (keep in (True, "x"))
    assert (res.c is not None) == (keep in (True, "y"))
    if res.c is not None:
        assert res.c.shape == (3, 1, 6)  # the question's projection, once per sample
    lean = S.forward(x, y, wx, wy, bx, by, save_projections=False, **opts)
    torch.testing.assert_close(res.out, lean.out, rtol=1e-13, atol=1e-13)  # GEMM blocking
    g = torch.randn_like(res.out)
    got = S.backward(g, x, y, wx, wy, bx, by, res.out, res.norm, res.a, res.c, **opts)
    want = S.backward(g, x, y, wx, wy, bx, by, lean.out, lean.norm, None, None, **opts)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("keep", ["x", "y"])
def test_keeping_one_projection_through_the_public_api(keep):
    # fbp(save_projections="x"/"y"): the same gradients as recomputing both, and only
    # the kept projection among the saved tensors (its operand's own shape).
    args = _problem(4, 5, 3, 2, 3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = fbp_kernels.fbp(*args, factor=2, backend="split", save_projections=keep)
    wide = [t for t in saved if t.dim() == 2 and t.shape[-1] == 6 and t.shape[0] == 4]
    assert len(wide) == 1  # one (rows, factor*o) projection kept, not two
    g = torch.randn_like(z)
    got = torch.autograd.grad(z, args, g)
    want = torch.autograd.grad(fbp_kernels.fbp(*args, factor=2, backend="split"), args, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_keeping_one_projection_is_refused_where_unsupported():
    args = _problem(2, 3, 3, 1, 2)
    for bad in ("both", 1, None, "xy"):
        with pytest.raises(ValueError, match="save_projections"):
            fbp_kernels.fbp(*args, factor=1, backend="split", save_projections=bad)
    with pytest.raises(ValueError, match="save_projections"):
        fbp_kernels.FactorizedBilinearPooling(3, 3, 2, factor=1, save_projections="z")
    # Every backend keeps any of the projections now (cuda's fused kernels write and read
    # them); the operators' guard refuses a backend outside ONE_PROJECTION_BACKENDS.
    from fbp_kernels import ops

    with pytest.raises(ValueError, match="keep one projection.*'split'"):
        ops.backend_keep("x", "nope")
    assert ops.backend_keep("y", "triton") == "y" and ops.backend_keep("both", "cuda") is True
    assert ops.backend_keep("x", "cuda") == "x"
