"""CUDA graphs and concurrent streams: the claims the interpreter cannot check.

The wide forward (backend ``triton``), the split strategy and the CUDA C++ kernels
(backend ``cuda``: a separate finishing kernel per row or group, dynamic shared memory
opted into per call, host work only outside the stream) keep no state between
launches (no ticket counters: whole rows per program in their row-finishing kernels;
the first one-launch kernel, ``save_projections=True``, zeroes its tickets per call),
so a captured graph replays correctly, two graphs replay independently, and two
streams can run the op at once.  Reasoning: every buffer a launch touches is allocated
by that call (the caching allocator hands graph-private pools to captures), and no
kernel reads memory another program of the same launch writes.  These tests are the
GPU check of that reasoning; they skip on a CPU.
"""

import pytest
import torch

import fbp_kernels

from fbp_kernels import mfh_ops

from conftest import backend_param, cuda_only

STRATEGIES = ["split", "triton", backend_param("cuda")]
MFH_KERNELS = [backend_param(n, mfh_ops.unsupported_reason) for n in ("triton", "cuda")]


def _problem(rows=256, m=512, n=256, factor=5, o=100, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    return r(rows, m), r(rows, n), r(factor * o, m) / m ** 0.5, r(factor * o, n) / n ** 0.5


@cuda_only
@pytest.mark.parametrize("backend", STRATEGIES)
def test_captured_graph_replays_match_eager(backend):
    x, y, wx, wy = _problem()
    static_x, static_y = x.clone(), y.clone()
    fbp_kernels.fbp(static_x, static_y, wx, wy, factor=5, backend=backend)  # warm-up: JIT
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fbp_kernels.fbp(static_x, static_y, wx, wy, factor=5, backend=backend)
    for seed in (1, 2, 3):
        nx, ny, _, _ = _problem(seed=seed)
        static_x.copy_(nx)
        static_y.copy_(ny)
        graph.replay()
        want = fbp_kernels.fbp(nx, ny, wx, wy, factor=5, backend=backend)
        torch.cuda.synchronize()
        assert torch.equal(static_out, want), (backend, seed)


@cuda_only
@pytest.mark.parametrize("backend,options", [
    ("split", {}), ("triton", {}), ("triton", {"save_projections": True}),
    pytest.param("cuda", {}, marks=backend_param("cuda").marks),
    pytest.param("cuda", {"save_projections": True}, marks=backend_param("cuda").marks)],
    ids=["split", "triton", "triton-first-kernel", "cuda", "cuda-keep"])
def test_two_graphs_replayed_on_two_streams_do_not_interfere(backend, options):
    """Two graphs captured on one stream, replayed concurrently on two streams, each give
    the eager result.  The first one-launch kernel (``save_projections=True``) finishes
    rows through atomic tickets: a ticket buffer cached per stream (as before) would be
    shared by both graphs here; it is now zeroed per call, so each graph owns one.
    Split's graphs are captured on a stream each: its projections are cuBLAS calls, and
    PyTorch keys cuBLAS's workspace by the capture stream, so two graphs captured on one
    stream share it and race there when replayed concurrently (a property of PyTorch,
    not of these kernels; the forwards of the other backends call no cuBLAS)."""
    kw = dict(factor=5, backend=backend, **options)
    probs = [_problem(seed=s) for s in (4, 5)]
    for p in probs:
        fbp_kernels.fbp(*p, **kw)
    torch.cuda.synchronize()
    graphs, outs = [], []
    capture = torch.cuda.Stream()
    for p in probs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=torch.cuda.Stream() if backend == "split" else capture):
            outs.append(fbp_kernels.fbp(*p, **kw))
        graphs.append(g)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(20):
        for g, s in zip(graphs, streams):
            with torch.cuda.stream(s):
                g.replay()
    torch.cuda.synchronize()
    for p, out in zip(probs, outs):
        assert torch.equal(out, fbp_kernels.fbp(*p, **kw))


@cuda_only
@pytest.mark.parametrize("backend", STRATEGIES)
def test_bf16_on_the_gpu_matches_the_reference(backend):
    # The interpreter never runs bf16 tl.dot (it upcasts): this is the first check of
    # the compiled wgmma / mma path and of the bf16 hi/lo pooling product.
    from fbp_kernels.reference import fbp as reference

    for factor in (1, 2, 5):
        x, y, wx, wy = _problem(rows=300, m=640, n=320, factor=factor, o=97)
        z = fbp_kernels.fbp(x, y, wx, wy, factor=factor, backend=backend)
        ref = reference(x.double(), y.double(), wx.double(), wy.double(), factor=factor)
        err = ((z.double() - ref).norm() / ref.norm()).item()
        eager = reference(x, y, wx, wy, factor=factor)
        eager_err = ((eager.double() - ref).norm() / ref.norm()).item()
        assert err <= max(2 * eager_err, 1e-3), (backend, factor, err, eager_err)


def _mfh_problem(rows=256, m=512, n=256, factor=5, o=100, order=2, dtype=torch.bfloat16,
                 seed=0, question_rows=None):
    """``x (rows, m)``, ``y`` (``(rows, n)``, or ``(question_rows, 1, n)`` against
    ``x`` as ``(question_rows, rows / question_rows, m)``: co-attention) and ``order``
    blocks of weights."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    if question_rows:
        x, y = r(question_rows, rows // question_rows, m), r(question_rows, 1, n)
    else:
        x, y = r(rows, m), r(rows, n)
    wx = [r(factor * o, m) / m ** 0.5 for _ in range(order)]
    wy = [r(factor * o, n) / n ** 0.5 for _ in range(order)]
    return x, y, wx, wy


@cuda_only
@pytest.mark.parametrize("backend", MFH_KERNELS)
def test_mfh_captured_graph_replays_match_eager(backend):
    # MFH's triton and cuda blocks are FBP's stateless kernels with per-call buffers (the
    # running products and the carries): a captured graph replays to the eager result.
    x, y, wx, wy = _mfh_problem()
    static_x, static_y = x.clone(), y.clone()
    fbp_kernels.mfh(static_x, static_y, wx, wy, factor=5, backend=backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fbp_kernels.mfh(static_x, static_y, wx, wy, factor=5, backend=backend)
    for seed in (1, 2):
        nx, ny, _, _ = _mfh_problem(seed=seed)
        static_x.copy_(nx)
        static_y.copy_(ny)
        graph.replay()
        want = fbp_kernels.mfh(nx, ny, wx, wy, factor=5, backend=backend)
        torch.cuda.synchronize()
        assert torch.equal(static_out, want), seed


@cuda_only
@pytest.mark.parametrize("backend", MFH_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("question_rows", [None, 8], ids=["rows", "coatt"])
def test_mfh_at_the_mfb_widths_on_the_gpu_matches_the_reference(dtype, question_rows,
                                                                   backend):
    """The compiled chained kernels (triton on sm_90: the 64 x 128 wgmma/TMA tile; cuda:
    on sm_90 the wgmma + TMA engine, on sm_80 the 128x128 cp.async one, its co-attention shared projection) at the MFB
    default widths, order 3, plain rows and co-attention: the output and every gradient
    within twice eager's own error in the same dtype (plus a floor) of the fp64
    reference; gradients at eps 1e-2 (at 1e-6 the signed sqrt's slope makes even eager
    err O(1) on some elements; see tests/test_wide.py).  A GPU-only check: through the
    interpreter, whose fp32 -> bf16 conversion truncates, bf16 errs 2-3x more (the
    README's note), so this bound is about the compiled kernels."""
    from fbp_kernels import reference

    x, y, wx, wy = _mfh_problem(rows=512, m=2048, n=1024, factor=5, o=1000, order=3,
                                dtype=dtype, question_rows=question_rows)
    leaves = [t.requires_grad_() for t in (x, y, *wx, *wy)]
    exact = [t.detach().double().requires_grad_() for t in leaves]

    def call(fn, ts, **kw):
        x_, y_, *w = ts
        return fn(x_, y_, w[:3], w[3:], factor=5, eps=1e-2, **kw)

    z = call(fbp_kernels.mfh, leaves, backend=backend)
    ref = call(reference.mfh, exact)
    eager = call(reference.mfh, leaves)
    g = torch.randn(ref.shape, device="cuda", dtype=torch.float64,
                    generator=torch.Generator(device="cuda").manual_seed(9))
    floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    outs = [(z, eager, ref)]
    outs += zip(torch.autograd.grad(z, leaves, g.to(dtype)),
                torch.autograd.grad(eager, leaves, g.to(dtype)),
                torch.autograd.grad(ref, exact, g))
    for i, (a, e, b) in enumerate(outs):
        rel = ((a.double() - b).norm() / b.norm()).item()
        rel_eager = ((e.double() - b).norm() / b.norm()).item()
        assert rel <= 2 * rel_eager + floor, (backend, dtype, question_rows, i, rel,
                                              rel_eager)


@cuda_only
def test_first_kernel_row_norm_stress():
    """The first one-launch kernel's row norm (the last program per row block finishes
    the row through an atomic ticket): 50 launches with many output tiles per row (o
    2000 on the 64 x 64 tile: 32 tickets per row block, 32 row blocks) are bitwise equal
    to the first run."""
    kw = dict(factor=5, backend="triton", save_projections=True)
    x, y, wx, wy = _problem(rows=2048, m=256, n=128, o=2000, seed=8)
    first = fbp_kernels.fbp(x, y, wx, wy, **kw)
    for _ in range(50):
        assert torch.equal(fbp_kernels.fbp(x, y, wx, wy, **kw), first)
