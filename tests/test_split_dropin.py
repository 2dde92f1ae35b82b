"""``norm_dims`` (joint L2 normalisation) and ``activation`` (relu/tanh on both
projections) in backends ``split`` and ``triton`` (issue 12, item 6): forward and every
gradient against the reference, with dropout, broadcast, degenerate groups and all four
dtypes (both backends); split's memory modes and chunking (groups never cut; a group
larger than the budget); routing (``auto`` takes ``split`` on a CUDA device only).

Tolerances, per dtype (as tests/test_correctness.py, and why):
- float64: the same maths in another order (a hand-written backward against
  autograd, a rescaled row norm against one norm of the flattened group): ~1e-16 per
  operation, amplified at most by the signed sqrt's slope (<= 500) and sums of < 100
  terms, so atol 1e-10 / rtol 1e-8 has margin yet fails on any formula error (>= 1e-3).
- float32, float16, bfloat16: the backend's error against the float64 reference (max
  abs error over the largest exact magnitude) must be at most twice that of the eager
  reference run in the same dtype, plus a floor of a few units in the last place
  (1e-5 / 2e-3 / 1.6e-2), as test_correctness does for half precision.  Not a fixed
  fp32 tolerance: with relu many pooled values sit at or near s = 0, where t'(s) =
  0.5 / sqrt(|s| + eps) changes by ~25 per 1e-7 of s, so a fp32 rounding of s moves a
  gradient element by 3e-5 relative; the eager fp32 reference errs by exactly as
  much (measured), a formula error by 1e-3 or more.
Results of one backend computed two ways (chunked vs whole, kept vs recomputed
projections) must agree to 1e-12 in float64: only GEMM blocking and the order of the
per-chunk weight-gradient sums differ.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fbp_kernels
from fbp_kernels import backends, functional, ops, reference
from conftest import DEVICE
from helpers import assert_close, error_vs

reason = backends.unsupported_reason("split", DEVICE)
pytestmark = pytest.mark.skipif(reason is not None, reason=f"backend 'split': {reason}")

if reason is None:
    from fbp_kernels.backends import split_backend as S
    from fbp_kernels.backends import triton_split as E

EXACT_TOL = {torch.float64: dict(atol=1e-10, rtol=1e-8)}
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAMES = ["out", "dx", "dy", "dweight_x", "dweight_y", "dbias_x", "dbias_y"]
SAME = dict(atol=1e-12, rtol=1e-12)


def _backends():
    """split, and triton and cuda where they run (their fused kernels carry both
    options; cuda's only on a GPU)."""
    yield "split"
    for name in ("triton", "cuda"):
        why = backends.unsupported_reason(name, DEVICE)
        yield pytest.param(name, marks=[pytest.mark.skip(reason=f"backend {name!r}: {why}")]
                           if why else [])


BACKENDS = list(_backends())


def _inputs(xs, ys, m, n, k, o, dtype=torch.float64, bias=True):
    """Leaves ``x (*xs, m), y (*ys, n), wx, wy, bx, by`` with nn.Linear-like scales."""
    g = lambda *s, std=1.0: (torch.randn(*s, dtype=torch.float64, device=DEVICE)  # noqa: E731
                             * std).to(dtype).requires_grad_()
    return [g(*xs, m), g(*ys, n), g(k * o, m, std=m ** -0.5), g(k * o, n, std=n ** -0.5),
            g(k * o, std=0.3) if bias else None, g(k * o, std=0.3) if bias else None]


def _live(tensors):
    return [t for t in tensors if t is not None]


def _grads(out, tensors, g):
    return list(torch.autograd.grad(out, _live(tensors), g))


def _as64(tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _mask(seed, tensors, rate):
    """The keep-mask split draws for ``seed``: rows are the broadcast rows."""
    x, y, wx = tensors[:3]
    batch = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    return S.dropout_mask(seed, (*batch, wx.shape[0]), rate, DEVICE)


def _split_and_reference(tensors, k, *, norm_dims, activation, dropout=0.0, save=False,
                         g=None, seed=5, backend="split"):
    """``([out, *grads] of ``backend`` (split), the same of the float64 reference, the
    cotangent)`` on the same inputs and dropout mask (split's: every Triton kernel draws
    the same stream, triton_dropout.py)."""
    mask = None
    if dropout:
        torch.manual_seed(seed)
        mask = _mask(int(functional.dropout_seed(True, dropout)), tensors, dropout)
        torch.manual_seed(seed)  # fbp() draws the same seed again
    out = fbp_kernels.fbp(*tensors, factor=k, backend=backend, dropout=dropout,
                          training=bool(dropout), norm_dims=norm_dims,
                          activation=activation, save_projections=save)
    if g is None:
        g = torch.randn(out.shape, dtype=torch.float64, device=DEVICE)
    got = [out] + _grads(out, tensors, g.to(out.dtype))
    t64 = _as64(tensors)
    ref = reference.fbp(*t64, factor=k, dropout=dropout, dropout_mask=mask,
                        norm_dims=norm_dims, activation=activation)
    return got, [ref] + _grads(ref, t64, g), g


def _assert_all_close(got, exp, tol, what=""):
    for name, a, e in zip(NAMES, got, exp):
        assert a.dtype == got[0].dtype, f"{name}: dtype {a.dtype}"
        assert_close(a, e, **tol, name=f"{what}{name}")


def _assert_within_eager_error(got, exact, tensors, k, g, **options):
    """Low-precision check: each result's error within twice the eager reference's in
    the same dtype (same inputs, cotangent and options) plus the dtype's floor."""
    dtype = got[0].dtype
    out = reference.fbp(*tensors, factor=k, **options)
    eager = [out] + _grads(out, tensors, g.to(dtype))
    for name, a, l, e in zip(NAMES, got, eager, exact):
        assert a.dtype == dtype and a.shape == e.shape, name
        err, ref_err = error_vs(a, e), error_vs(l, e)
        bound = 2 * ref_err + FLOOR[dtype]
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (eager {ref_err:.3g})"


# ----------------------------------------------------------------------------- vs reference

#: (x batch, y batch, m, n, factor, o).  Co-attention, groups of R = 3 regions, with
#: rows of one epilogue block and (K 5, o 9: no power of two anywhere) of several (the
#: two-pass forward); 7 plain rows at K 1 (norm_dims 2: one group of 7); three
#: alternating broadcast levels (the materialised layout, groups of 3).
COATT, WIDE = ((2, 3), (2, 1), 4, 3, 3, 4), ((2, 3), (2, 1), 4, 3, 5, 9)
PLAIN, MATERIALISED = ((7,), (7,), 5, 4, 1, 7), ((2, 1, 3), (1, 2, 1), 4, 3, 2, 5)
CASES = ([(s, a, nd, torch.float64) for s in (COATT, WIDE) for a in (None, "relu", "tanh")
          for nd in (1, 2)]
         + [(s, a, 2, torch.float64) for s in (PLAIN, MATERIALISED) for a in ("relu", "tanh")]
         + [(WIDE, a, 2, torch.float32) for a in (None, "relu", "tanh")])


def _case_id(case):
    (xs, ys, m, n, k, o), act, nd, dtype = case
    return f"x{xs}y{ys}k{k}o{o}-{act}-nd{nd}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(case, backend):
    (xs, ys, m, n, k, o), activation, norm_dims, dtype = case
    if backend == "split" and E.INTERPRET:
        # The epilogue path meant (in the interpreter's tiles; a GPU's hold every row
        # here in one block, and test_gpu_tiles_with_an_activation forces several).
        blocks = -(-o // E.pick_epilogue_config(6, o, k, activation=activation).block_o)
        assert blocks == (2 if (k, o) == (5, 9) else 1)
    tensors = _inputs(xs, ys, m, n, k, o, dtype)
    got, exp, g = _split_and_reference(tensors, k, norm_dims=norm_dims,
                                       activation=activation, backend=backend)
    if dtype == torch.float64:
        _assert_all_close(got, exp, EXACT_TOL[dtype])
    else:
        _assert_within_eager_error(got, exp, tensors, k, g, norm_dims=norm_dims,
                                   activation=activation)
    if norm_dims == 2 and len(xs) == 2:
        # Each sample is unit-norm as a whole, not row by row (the option did something).
        z = got[0].detach().double()
        like = dict(dtype=z.dtype, device=z.device)
        assert torch.allclose(z.flatten(1).norm(dim=1), torch.ones(xs[0], **like))
        assert not torch.allclose(z.norm(dim=-1), torch.ones(xs, **like), atol=1e-3)


def test_gpu_tiles_with_an_activation(monkeypatch):
    # On a GPU, rows of several blocks take quarter-width blocks with an activation
    # (registers; see pick_epilogue_config).  The tiles, then the maths with such a tile
    # forced here (the GPU rule at the interpreter's 64 elements: 5 blocks of 2).
    gpu = E.GPU_TILE_ELEMENTS
    assert E.pick_epilogue_config(1024, 4000, 5, limit=gpu, activation="tanh") == \
        E.EpilogueConfig(1, 256, 8, 4)
    assert E.pick_epilogue_config(1024, 1000, 5, limit=gpu, activation="tanh") == \
        E.pick_epilogue_config(1024, 1000, 5, limit=gpu)  # one block: unchanged
    assert E.pick_epilogue_config(1024, 16, 5, limit=gpu, activation="relu").block_r == 8
    real = E.pick_epilogue_config
    monkeypatch.setattr(E, "pick_epilogue_config",
                        lambda rows, o, f, limit=None, activation=None:
                        real(rows, o, f, limit=64, activation=activation))
    assert E.pick_epilogue_config(4, 9, 5, activation="tanh").block_o == 2
    tensors = _inputs((2, 2), (2, 1), 4, 3, 5, 9)
    k = 5
    got, exp, _ = _split_and_reference(tensors, k, norm_dims=2, activation="tanh")
    _assert_all_close(got, exp, EXACT_TOL[torch.float64])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision(activation, dtype, backend):
    # Co-attention with groups of 4 regions; fp16/bf16 outputs go through the fp32
    # scratch (rounded once).
    k, o = 5, 6
    tensors = _inputs((3, 4), (3, 1), 16, 12, k, o, dtype)
    got, exact, g = _split_and_reference(tensors, k, norm_dims=2, activation=activation,
                                         backend=backend)
    _assert_within_eager_error(got, exact, tensors, k, g, norm_dims=2,
                               activation=activation)


@pytest.mark.parametrize("norm_dims, activation", [(2, "relu"), (3, "tanh")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout(norm_dims, activation, backend):
    # The mask is the one split (and the fused kernels) draw, fed to the reference.
    k, o = 3, 4
    tensors = _inputs((2, 3), (2, 1), 5, 4, k, o)
    got, exp, _ = _split_and_reference(tensors, k, norm_dims=norm_dims,
                                       activation=activation, dropout=0.3, backend=backend)
    _assert_all_close(got, exp, EXACT_TOL[torch.float64])
    kept = fbp_kernels.fbp(*tensors, factor=k, backend=backend, norm_dims=norm_dims,
                           activation=activation)
    assert (kept - got[0]).abs().max() > 1e-3  # the mask dropped something


@pytest.mark.parametrize("xs, ys", [((2, 3), (2, 1)), ((2, 1), (2, 3)), ((4,), ()),
                                    ((2, 3), (3,))], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_row_maps(xs, ys, backend):
    # Shared projections read through row maps (the question once per sample, a y
    # shared by every row, one list of questions for all samples); norm_dims over the
    # whole batch too.
    k, o = 2, 3
    nd = len(torch.broadcast_shapes(xs, ys)) + 1
    for norm_dims in sorted({2, nd}):
        tensors = _inputs(xs, ys, 4, 3, k, o)
        got, exp, _ = _split_and_reference(tensors, k, norm_dims=norm_dims,
                                           activation="tanh", backend=backend)
        _assert_all_close(got, exp, EXACT_TOL[torch.float64], f"norm_dims={norm_dims} ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_normalisation_the_options_still_apply(backend):
    # normalize=False: the activation acts, norm_dims has nothing to normalise.
    k, o = 3, 2
    tensors = _inputs((2, 3), (2, 1), 4, 5, k, o)
    out = fbp_kernels.fbp(*tensors, factor=k, backend=backend, normalize=False,
                          norm_dims=2, activation="relu")
    ref = reference.fbp(*tensors, factor=k, normalize=False, norm_dims=2, activation="relu")
    g = torch.randn_like(ref)
    _assert_all_close([out] + _grads(out, tensors, g), [ref] + _grads(ref, tensors, g),
                      EXACT_TOL[torch.float64])


# ----------------------------------------------------------------------------- tanh itself

@pytest.mark.parametrize("dtype, ulps", [(torch.float32, 4), (torch.float64, 4)], ids=str)
def test_kernel_tanh_is_within_a_few_ulp(dtype, ulps):
    # factor 1, o 1, y's projection tanh(20) = 1 exactly, no normalisation: the output
    # is the kernel's tanh(x).  Both branches (|x| < 1/4: series; above: exp form),
    # the switch point, tiny, huge and signed values.
    xs = torch.cat([torch.linspace(-6, 6, 301, dtype=torch.float64),
                    torch.tensor([0.25, -0.25, 0.2499999, 1e-30, -1e-8, 40.0, -400.0, 0.0],
                                 dtype=torch.float64)]).to(dtype).to(DEVICE)
    one = torch.ones(1, 1, dtype=dtype, device=DEVICE)
    out = fbp_kernels.fbp(xs[:, None], torch.zeros(len(xs), 1, dtype=dtype, device=DEVICE),
                          one, 0 * one, None, torch.full((1,), 20.0, dtype=dtype, device=DEVICE),
                          factor=1, backend="split", normalize=False, activation="tanh")[:, 0]
    exact = torch.tanh(xs.double())
    if DEVICE.type == "cuda" and dtype == torch.float32:
        # The GPU build's exp is ex2.approx.f32 and its division div.full.f32 (up to 2
        # ulp each; the interpreter rounds exactly), amplified up to ~3x by the
        # cancellation near |x| = 1/4: up to ~9 ulp emulated at those bounds.
        ulps = 16
    tol = ulps * torch.finfo(dtype).eps
    rel = ((out.double() - exact).abs() / exact.abs().clamp_min(1e-300)).max().item()
    assert rel <= tol, f"max relative error {rel:.3g} > {tol:.3g}"
    assert out[-3].item() == 1.0 and out[-2].item() == -1.0 and out[-1].item() == 0.0
    nan = fbp_kernels.fbp(torch.full((1, 1), float("nan"), dtype=dtype, device=DEVICE),
                          torch.zeros(1, 1, dtype=dtype, device=DEVICE), one, 0 * one, None,
                          torch.full((1,), 20.0, dtype=dtype, device=DEVICE), factor=1,
                          backend="split", normalize=False, activation="tanh")
    assert torch.isnan(nan).all()


# ----------------------------------------------------------------------------- memory modes

@pytest.fixture
def budget():
    """Set the split memory budget for one test, restored afterwards."""
    old = fbp_kernels.strategy.split_memory_budget()
    yield fbp_kernels.set_split_memory_budget
    fbp_kernels.set_split_memory_budget(old)


@pytest.mark.parametrize("keep", [True, "x", "y"], ids=str)
def test_every_memory_mode_gives_the_same_gradients(budget, keep):
    # Chunked (a few rows per chunk), co-attention, dropout, both options: keeping
    # projections (which are the pre-activation ones) changes nothing but memory.
    budget(2 * 12 * 8 * 2)
    x, y, wx, wy, bx, by = [t.detach() for t in _inputs((3, 2), (3, 1), 5, 4, 3, 4)]
    opts = dict(factor=3, dropout=0.25, seed=9, normalize=True, eps=1e-6, norm_dims=2,
                activation="tanh")
    res = S.forward(x, y, wx, wy, bx, by, save_projections=keep, **opts)
    lean = S.forward(x, y, wx, wy, bx, by, save_projections=False, **opts)
    assert (res.a is not None) == (keep in (True, "x"))
    assert (res.c is not None) == (keep in (True, "y"))
    # What is kept: the pre-activation projections, at each operand's own shape.
    if res.a is not None:
        assert_close(res.a, F.linear(x, wx, bx), **SAME, name="kept a")
    if res.c is not None:
        assert res.c.shape == (3, 1, 12)
        assert_close(res.c, F.linear(y, wy, by), **SAME, name="kept c")
    assert_close(res.out, lean.out, **SAME, name="out")
    assert_close(res.norm, lean.norm, **SAME, name="norm")
    g = torch.randn_like(res.out)
    got = S.backward(g, x, y, wx, wy, bx, by, res.out, res.norm, res.a, res.c, **opts)
    want = S.backward(g, x, y, wx, wy, bx, by, lean.out, lean.norm, None, None, **opts)
    for name, p, q in zip(NAMES[1:], got, want):
        assert_close(p, q, **SAME, name=name)


@pytest.mark.parametrize("keep", [False, True, "x", "y"], ids=str)
def test_memory_modes_through_the_public_api(keep):
    tensors = _inputs((2, 3), (2, 1), 5, 4, 2, 3)
    got, exp, _ = _split_and_reference(tensors, 2, norm_dims=2, activation="relu",
                                       save=keep)
    _assert_all_close(got, exp, EXACT_TOL[torch.float64])


def test_saved_projections_survive_a_second_backward():
    # The kept pre-activation projections must not be overwritten by their gradients.
    tensors = _inputs((2, 3), (2, 3), 4, 3, 2, 3)
    z = fbp_kernels.fbp(*tensors, factor=2, backend="split", save_projections=True,
                        norm_dims=2, activation="tanh")
    g = torch.randn_like(z)
    first = torch.autograd.grad(z, _live(tensors), g, retain_graph=True)
    second = torch.autograd.grad(z, _live(tensors), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- chunking

def _chunk_rows(monkeypatch):
    """Spy on the forward epilogue: the row ranges of its chunks."""
    seen = []
    real = E.epilogue_forward

    def spy(a, c, out, norm, **kw):
        seen.append((kw["row_offset"], out.shape[0]))
        return real(a, c, out, norm, **kw)

    monkeypatch.setattr(E, "epilogue_forward", spy)
    return seen


@pytest.mark.parametrize("xs, ys, norm_dims, whole", [
    ((4, 3), (4, 3), 2, 3),          # plain rows (one level, d1 = 1), groups of 3
    ((3, 2, 3), (3, 1, 1), 2, 6),    # d1 = 6 rows per level-0 index, groups of 3
    ((2, 3, 2), (2, 1, 1), 3, 6),    # groups of 6 = whole samples over two dimensions
    ((2, 1, 3), (1, 2, 1), 2, 3),    # materialised (three broadcast levels), groups of 3
], ids=str)
@pytest.mark.parametrize("rows_per_chunk", [1, 4])
def test_chunks_never_cut_a_group(budget, monkeypatch, xs, ys, norm_dims, whole,
                                  rows_per_chunk):
    # Budgets of about 1 and 4 rows.  Forward chunks start and end at
    # multiples of lcm(group, d1) rows (``whole``), the fewest that hold whole groups,
    # even when the budget is smaller; results equal the reference with dropout (the
    # mask is indexed by the global row).
    k, o = 2, 3
    tensors = _inputs(xs, ys, 4, 3, k, o)
    budget(rows_per_chunk * 2 * k * o * 8)
    seen = _chunk_rows(monkeypatch)
    got, exp, g = _split_and_reference(tensors, k, norm_dims=norm_dims, activation="relu",
                                       dropout=0.2)
    rows = math.prod(torch.broadcast_shapes(xs, ys))
    assert sum(n for _, n in seen) == rows and [r0 for r0, _ in seen][0] == 0
    assert all(r0 % whole == 0 and n % whole == 0 for r0, n in seen), seen
    if rows_per_chunk < whole:  # over the budget: the smallest whole chunk
        assert all(n == whole for _, n in seen), seen
    _assert_all_close(got, exp, EXACT_TOL[torch.float64])


def test_a_group_over_the_budget_is_processed_whole(budget, monkeypatch):
    # One sample's 5 regions need 5 rows of buffers; a 1-byte budget cannot hold even
    # one row.  Forward still takes whole groups (one per chunk), backward chunks freely;
    # both exact.
    k, o = 3, 2
    tensors = _inputs((3, 5), (3, 1), 4, 3, k, o)
    budget(1)
    seen = _chunk_rows(monkeypatch)
    got, exp, _ = _split_and_reference(tensors, k, norm_dims=2, activation="tanh")
    assert seen == [(0, 5), (5, 5), (10, 5)]
    _assert_all_close(got, exp, EXACT_TOL[torch.float64])


def test_chunked_equals_unchunked(budget):
    k, o = 3, 4
    tensors = _inputs((4, 3), (4, 1), 5, 4, k, o)
    results = []
    for nbytes in (1, 2**26):  # one group per chunk, one chunk
        budget(nbytes)
        torch.manual_seed(2)
        z = fbp_kernels.fbp(*tensors, factor=k, backend="split", norm_dims=2,
                            activation="tanh", dropout=0.3, training=True)
        g = torch.linspace(-1, 1, z.numel(), dtype=z.dtype, device=z.device).view_as(z)
        results.append([z.detach()] + _grads(z, tensors, g))
    for other in results[:-1]:
        for name, a, b in zip(NAMES, other, results[-1]):
            assert_close(a, b, **SAME, name=name)


def test_level0_step_is_a_multiple_of_whole_groups(budget):
    # (6, 4) regions with a (6, 1) question: d1 = 4 rows per level-0 index.  Groups of 6
    # rows need steps of lcm(6, 4) / 4 = 3 indices; groups of 4, of 1 index; the budget
    # then decides how many such steps (rounded down, never below one).
    lay = S._layout(torch.zeros(6, 4, 2), torch.zeros(6, 1, 2))
    assert (lay.d0, lay.d1) == (6, 4)
    assert S.group_rows(lay.batch, 2) == 4 and S.group_rows(lay.batch, 3) == 24
    budget(1)
    assert S._level0_step(lay, 10, torch.float32, False, group=6) == 3
    assert S._level0_step(lay, 10, torch.float32, False, group=4) == 1
    budget(7 * 5 * 10 * 4)  # 7 indices of 4 x rows + 1 y row (K*o = 10, fp32)
    assert S._level0_step(lay, 10, torch.float32, False) == 7
    assert S._level0_step(lay, 10, torch.float32, False, group=6) == 6
    assert S._level0_step(lay, 10, torch.float32, False, group=24) == 6


# ----------------------------------------------------------------------------- degenerate

@pytest.mark.parametrize("activation", [None, "relu", "tanh"], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_group_has_zero_gradient_and_zero_rows_inside_a_group_are_exact(activation, backend):
    # Sample 1: every region zero, no bias -> a degenerate group (zero output, zero
    # gradient, nothing flows into its question).  Sample 0: one zero region inside a
    # live group (its rows' t = 0 but the group norm is not): exact gradients.
    tensors = _inputs((3, 4), (3, 1), 5, 6, 2, 3, bias=False)
    with torch.no_grad():
        tensors[0][1] = 0.0
        tensors[0][0, 2] = 0.0
    got, exp, _ = _split_and_reference(tensors, 2, norm_dims=2, activation=activation,
                                       backend=backend)
    out, dx, dy = got[:3]
    assert (out[1] == 0).all() and (out[0, 2] == 0).all() and (out[0] != 0).any()
    assert all(torch.isfinite(t).all() for t in got)
    assert (dy[1] == 0).all() and (dx[1] == 0).all()
    for name, a, e in zip(NAMES, got, exp):
        assert_close(a, e, **EXACT_TOL[torch.float64], name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_group_is_finite_in_every_dtype(dtype, backend):
    tensors = _inputs((2, 3), (2, 1), 4, 3, 2, 3, dtype=dtype, bias=False)
    with torch.no_grad():
        tensors[0][0] = 0.0
    out = fbp_kernels.fbp(*tensors, factor=2, backend=backend, norm_dims=2,
                          activation="tanh")
    grads = _grads(out, tensors, torch.ones_like(out))
    assert (out[0] == 0).all() and all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_kink_has_zero_gradient(backend):
    # Pre-activations exactly 0 (zero input, zero bias on columns 0-1): relu's gradient
    # is 0 there, as torch.relu's; other columns live.
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.zeros(2, 3, requires_grad=True, **f64)
    y = torch.randn(2, 4, **f64)
    wx = torch.randn(6, 3, **f64)
    wy = torch.randn(6, 4, **f64) * 0.5
    by = torch.full((6,), 5.0, **f64)
    bx = torch.zeros(6, **f64)
    bx[2:] = 1.0 + torch.rand(4, **f64)
    bx.requires_grad_()
    out = fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=2, backend=backend,
                          activation="relu", norm_dims=2)
    ref = reference.fbp(x, y, wx, wy, bx, by, factor=2, activation="relu", norm_dims=2)
    g = torch.randn_like(ref)
    got, exp = torch.autograd.grad(out, [bx], g)[0], torch.autograd.grad(ref, [bx], g)[0]
    assert (got[:2] == 0).all() and (got[2:] != 0).all()
    assert_close(got, exp, **EXACT_TOL[torch.float64], name="dbias_x")


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("norm_dims, activation", [(2, "tanh"), (3, "relu")])
def test_gradcheck_with_dropout_over_several_chunks(budget, norm_dims, activation):
    # Through the interpreter, in float64: the backward is the derivative of the forward
    # (dropout fixed by its seed; x's projection kept; norm_dims 2: chunks of one group of
    # 3 rows).  fast_mode (random directional derivatives per input) keeps it to a few
    # dozen interpreted forwards; the reference comparisons above check every element.
    budget(1)
    x, y, wx, wy, bx, by = _inputs((2, 3), (2, 1), 3, 4, 2, 2)
    seed = 1234

    def f(*a):
        return ops.FBPFunction.apply(*a, seed, 2, 0.25, True, 1e-6, "x", "split",
                                     norm_dims, activation)

    assert torch.autograd.gradcheck(f, (x, y, wx, wy, bx, by), eps=1e-6, atol=1e-7,
                                    rtol=1e-5, fast_mode=True)


# ----------------------------------------------------------------------------- routing

def test_auto_takes_split_on_cuda_only(monkeypatch):
    # On the CPU auto stays on torch (BLAS; the interpreter is for tests), even though
    # split runs here through the interpreter.
    cpu = torch.device("cpu")
    assert functional.route_drop_in("auto", 2, None, cpu) == "torch"
    assert functional.route_drop_in("auto", 1, "tanh", cpu) == "torch"
    assert functional.route_drop_in("auto", 1, None, cpu) is None
    *_, name, _mode = functional._prepare(_inputs((2,), (2,), 3, 4, 2, 2), 2, 0.0, 1e-6,
                                          "auto", False, 2, "relu")
    assert name == "torch"
    # On a CUDA device: split where it runs, else torch (the availability check is the
    # front end's constant-folded one, stubbed here).
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(functional, "_backend_or_problem", lambda n, d: n)
    assert functional.route_drop_in("auto", 2, "relu", cuda) == "split"
    assert ops.DROP_IN_BACKENDS[0] == "split"
    monkeypatch.setattr(functional, "_backend_or_problem", lambda n, d: "\0Bno Triton")
    assert functional.route_drop_in("auto", 2, "relu", cuda) == "torch"
    # MFH has no split backend; its triton blocks (FBP's wide kernels) have the options.
    monkeypatch.setattr(functional, "_backend_or_problem", lambda n, d: n)
    assert functional.route_drop_in("auto", 2, None, cuda, ops.MFH_DROP_IN_BACKENDS) == "triton"


def test_cuda_backend_takes_the_options():
    # Routed to cuda like any drop-in backend: on the CPU it is then unavailable (the
    # device is named), never refused for the options, nor for keeping one projection.
    assert "cuda" in ops.DROP_IN_BACKENDS
    assert ops.DROP_IN_BACKENDS.index("cuda") > ops.DROP_IN_BACKENDS.index("triton")
    assert ops.drop_in_options("cuda", 2, "tanh") == {"norm_dims": 2, "activation": "tanh"}
    tensors = _inputs((2, 3), (2, 1), 3, 4, 2, 2)
    if DEVICE.type == "cpu":
        for option in ({"norm_dims": 2}, {"activation": "tanh"}):
            with pytest.raises(backends.BackendUnavailableError, match="CUDA device"):
                fbp_kernels.fbp(*tensors, factor=2, backend="cuda", **option)
    assert ops.backend_keep("x", "cuda") == "x" and "cuda" in ops.ONE_PROJECTION_BACKENDS


def test_operators_run_split_and_triton():
    x, y, wx, wy, bx, by = [t.detach() for t in _inputs((2, 3), (2, 1), 3, 4, 2, 2)]
    out = ops.fbp_forward(x, y, wx, wy, bx, by, None, 2, 0.0, True, 1e-6, "both", "split",
                          2, "tanh")
    ref = reference.fbp(x, y, wx, wy, bx, by, factor=2, norm_dims=2, activation="tanh")
    assert_close(out[0], ref, **EXACT_TOL[torch.float64], name="op out")
    assert out[2].shape == (2, 3, 4) and out[3].shape == (2, 1, 4)  # fake kernel's shapes
    if backends.unsupported_reason("triton", DEVICE) is None:
        out = ops.fbp_forward(x, y, wx, wy, bx, by, None, 2, 0.0, True, 1e-6, "none",
                              "triton", 2, "tanh")
        assert_close(out[0], ref, **EXACT_TOL[torch.float64], name="triton op out")
        # The norm output holds each row's group norm (one value per sample here).
        assert torch.equal(out[1], out[1][:, :1].expand(2, 3))


def test_compiled_graph_runs_split_with_the_options():
    # torch.compile sees the registered operators; the fake kernel's shapes must match
    # split's kept (pre-activation, per-operand) projections.
    tensors = _inputs((2, 3), (2, 1), 4, 5, 2, 3)
    x, y, wx, wy, bx, by = tensors

    def f(x, y):
        return fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=2, backend="split",
                               norm_dims=2, activation="tanh", save_projections=True)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, y)
    ref = reference.fbp(*tensors, factor=2, norm_dims=2, activation="tanh")
    g = torch.randn_like(ref)
    _assert_all_close([out] + _grads(out, tensors, g), [ref] + _grads(ref, tensors, g),
                      EXACT_TOL[torch.float64])
