"""CUDA graphs and concurrent streams: the claims the interpreter cannot check.

The wide forward (backend ``triton``) and the split strategy keep no state between
launches (no ticket counters: whole rows per program in their row-finishing kernels),
so a captured graph replays correctly, two graphs replay independently, and two
streams can run the op at once.  Reasoning: every buffer a launch touches is allocated
by that call (the caching allocator hands graph-private pools to captures), and no
kernel reads memory another program of the same launch writes.  These tests are the
GPU check of that reasoning; they skip on a CPU.
"""

import pytest
import torch

import fbp_kernels

from conftest import cuda_only

STRATEGIES = ["split", "triton"]


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
@pytest.mark.parametrize("backend", STRATEGIES)
def test_two_graphs_replayed_on_two_streams_do_not_interfere(backend):
    # The first one-launch kernel's cached counters would be shared here; these
    # strategies have none.
    probs = [_problem(seed=s) for s in (4, 5)]
    for p in probs:
        fbp_kernels.fbp(*p, factor=5, backend=backend)
    torch.cuda.synchronize()
    graphs, outs = [], []
    for p in probs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(fbp_kernels.fbp(*p, factor=5, backend=backend))
        graphs.append(g)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(10):
        for g, s in zip(graphs, streams):
            with torch.cuda.stream(s):
                g.replay()
    torch.cuda.synchronize()
    for p, out in zip(probs, outs):
        assert torch.equal(out, fbp_kernels.fbp(*p, factor=5, backend=backend))


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
