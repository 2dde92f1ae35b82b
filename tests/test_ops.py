"""The registered operators: opcheck, torch.compile without graph breaks, launch count."""

import pytest
import torch

import fbp_kernels
from fbp_kernels import backends, ops
from helpers import Case, assert_close, make_inputs

CASE = Case((3, 2), (3, 1), 6, 5, 3, 4)


def _op_args(tensors, backend, **kw):
    opts = dict(seed=None, factor=CASE.factor, dropout=0.0, normalize=True, eps=1e-6,
                save_projections="none", backend=backend)
    opts.update(kw)
    return (*tensors, opts["seed"], opts["factor"], opts["dropout"], opts["normalize"],
            opts["eps"], opts["save_projections"], opts["backend"])


@pytest.mark.parametrize("variant", ["plain", "dropout", "saved", "keep_x", "raw"])
def test_opcheck_forward(variant, backend, device):
    if variant == "keep_x" and backend not in ops.ONE_PROJECTION_BACKENDS:
        pytest.skip(f"keeping one projection is a {'/'.join(ops.ONE_PROJECTION_BACKENDS)} "
                    f"mode; {backend!r} refuses it")
    tensors = make_inputs(CASE, torch.float32, device)
    kw = {"dropout": dict(seed=torch.tensor(5), dropout=0.25),
          "saved": dict(save_projections="both"), "keep_x": dict(save_projections="x"),
          "raw": dict(normalize=False), "plain": {}}[variant]
    torch.library.opcheck(ops.fbp_forward, _op_args(tensors, backend, **kw))


class Fusion(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.pre = torch.nn.Linear(6, 6)
        self.fbp = fbp_kernels.FactorizedBilinearPooling(6, 5, 4, factor=3, backend=backend)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x, y):
        return self.head(self.fbp(torch.relu(self.pre(x)), y))


def test_compile_fullgraph_matches_eager(backend, device):
    """fullgraph=True raises on any graph break, so this proves the custom op traces.
    aot_eager runs dynamo + AOTAutograd (forward and backward graphs) without the
    C++ codegen that would only slow the test down."""
    torch._dynamo.reset()
    model = Fusion(backend).to(device).double()
    x = torch.randn(3, 2, 6, dtype=torch.float64, device=device)
    y = torch.randn(3, 1, 5, dtype=torch.float64, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_out = model(x, y)
    eager_grads = torch.autograd.grad(eager_out.sum(), list(model.parameters()))
    out = compiled(x, y)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    assert_close(out, eager_out, atol=1e-12, rtol=1e-10, name="out")
    for g, e in zip(grads, eager_grads):
        assert_close(g, e, atol=1e-12, rtol=1e-10, name="grad")


def test_triton_forward_launches(monkeypatch):
    """The fused forward is the wide main loop plus one row-finishing launch (no
    cross-program counters); with save_projections the one-launch kernel that stores
    A and C; backward (lean) is the ds kernel and the wide backward on the same main
    loop, and after save_projections the row dot and the first kernel's backward."""
    if backends.unsupported_reason("triton", torch.device("cpu")) is not None and \
            not torch.cuda.is_available():
        pytest.skip("Triton backend unavailable (needs a GPU or TRITON_INTERPRET=1)")
    from fbp_kernels.backends import triton_kernels as K
    from fbp_kernels.backends import triton_wide as W

    launches = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for mod, name in ((K, "_fbp_fwd_kernel"), (K, "_fbp_bwd_kernel"), (K, "_row_dot_kernel"),
                      (W, "_wide_fwd_kernel"), (W, "_finish_kernel"), (W, "_wide_grad_kernel"),
                      (W, "_grad_pooled_kernel")):
        monkeypatch.setattr(mod, name, Counting(name, getattr(mod, name)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = make_inputs(Case((40,), (40,), 20, 12, 2, 37), torch.float32, device)
    saved = fbp_kernels.fbp(*tensors, factor=2, backend="triton", save_projections=True)
    assert launches == ["_fbp_fwd_kernel"]
    launches.clear()
    saved.sum().backward()
    assert launches == ["_row_dot_kernel", "_fbp_bwd_kernel"]
    launches.clear()
    out = fbp_kernels.fbp(*tensors, factor=2, backend="triton")
    assert launches == ["_wide_fwd_kernel", "_finish_kernel"]
    launches.clear()
    out.sum().backward()
    assert launches == ["_grad_pooled_kernel", "_wide_grad_kernel", "_wide_grad_kernel"]


def test_eager_function_and_registered_op_agree_bitwise(backend, device):
    """fbp() runs ops.FBPFunction eagerly and the custom op under torch.compile: both
    must give identical outputs and gradients (same backend code underneath)."""
    tensors = make_inputs(CASE, torch.float64, device)
    eager = fbp_kernels.fbp(*tensors, factor=CASE.factor, backend=backend)
    via_op = ops.fbp_forward(*_op_args(tensors, backend))[0]
    assert torch.equal(eager, via_op)
    g = torch.randn_like(eager)
    live = [t for t in tensors if t is not None]
    for a, b in zip(torch.autograd.grad(eager, live, g), torch.autograd.grad(via_op, live, g)):
        assert torch.equal(a, b)
