"""MFH on the CUDA backend (``backends/cuda_mfh.py``): FBP's operators per block, chained.

On the CPU the operators are replaced by a PyTorch model of their contract
(csrc/fbp_binding.cpp: ``prev`` multiplied in before dropout and pooling, ``chain``
returning the block's product; in backward ``carry`` added to the block's pooled
gradient, ``prev`` multiplied in, ``carry_out`` returning ``u * act(a) * act(c)``), written
from torch_mfh's formulas independently of the kernels, so the chaining, the block
order, the carries and the layouts of cuda_mfh are checked against backend ``torch``
for orders 1-3, co-attention and the drop-in options.  On a GPU the real operators run
against the reference (tests/test_mfh.py and tests/test_dropin.py parametrise over
every MFH backend, cuda included).

Tolerance: float64, the same maths in another order: atol 1e-10 / rtol 1e-8, the
project's float64 bound (a formula error is O(1e-3) or more).
"""

import pytest
import torch

from fbp_kernels import mfh_ops, ops
from fbp_kernels.backends import cuda_backend, cuda_mfh, torch_backend, torch_mfh
from helpers import assert_close

TOL = dict(atol=1e-10, rtol=1e-8)
ACT = {0: None, 1: "relu", 2: "tanh"}


def _act(t, code):
    return {0: lambda v: v, 1: torch.relu, 2: torch.tanh}[code](t)


def _act_grad(act, code):
    return {0: torch.ones_like, 1: lambda a: (a > 0).to(a.dtype),
            2: lambda a: 1 - a * a}[code](act)


class _ChainOps:
    """The FBP operators with MFH's chain options, in PyTorch (no dropout: seed None)."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _rows(x, y, per_x, per_y):
        return x.repeat_interleave(per_x, 0), y.repeat_interleave(per_y, 0)

    def _product(self, x, y, wx, wy, bx, by, activation, per_x, per_y):
        xr, yr = self._rows(x, y, per_x, per_y)
        a = _act(torch.nn.functional.linear(xr, wx, bx), activation)
        c = _act(torch.nn.functional.linear(yr, wy, by), activation)
        return a, c

    def fbp_forward(self, x, y, wx, wy, bx, by, factor, dropout, seed, normalize, eps,
                    activation, group, keep_x, keep_y, per_x, per_y, prev, chain):
        assert seed is None and not keep_x and not keep_y
        self.calls.append(("forward", prev is not None, chain))
        a, c = self._product(x, y, wx, wy, bx, by, activation, per_x, per_y)
        p = a * c if prev is None else a * c * prev
        s = p.view(p.shape[0], p.shape[1] // factor, factor).sum(-1)
        empty = x.new_empty(0)
        if normalize:
            z, norm = torch_backend.normalized(s.view(s.shape[0] // group, group, s.shape[-1]),
                                               eps, 2 if group > 1 else 1)
            z, norm = z.reshape(s.shape), norm.reshape(-1)
        else:
            z, norm = s, empty
        return z, norm, empty, empty, p if chain else empty

    def fbp_backward(self, grad, x, y, wx, wy, bx, by, out, norm, factor, dropout, seed,
                     normalize, eps, activation, group, a_kept, c_kept, per_x, per_y, prev,
                     carry, carry_out):
        self.calls.append(("backward", prev is not None, carry is not None, carry_out))
        a, c = self._product(x, y, wx, wy, bx, by, activation, per_x, per_y)
        nd = 2 if group > 1 else 1
        ds = torch_backend.grad_pooled(grad.view(-1, group, grad.shape[-1]),
                                       out.view(-1, group, out.shape[-1]),
                                       norm.view(-1, group) if normalize else None,
                                       normalize=normalize, eps=eps, norm_dims=nd)
        u = ds.reshape(grad.shape).repeat_interleave(factor, -1)
        if carry is not None:
            u = u + carry
        dq = u if prev is None else u * prev
        da = dq * c * _act_grad(a, activation)
        dc = dq * a * _act_grad(c, activation)
        da = da.view(x.shape[0], per_x, -1).sum(1)
        dc = dc.view(y.shape[0], per_y, -1).sum(1)
        empty = x.new_empty(0)
        return (da @ wx, dc @ wy, da.t() @ x, dc.t() @ y,
                da.sum(0) if bx is not None else empty, dc.sum(0) if by is not None else empty,
                u * a * c if carry_out else empty)


def _params(xs, ys, m, n, ko, order, bias=True):
    g = torch.Generator().manual_seed(11)
    r = lambda *s, std=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * std  # noqa: E731
    return (r(*xs, m), r(*ys, n), [r(ko, m, std=m ** -0.5) for _ in range(order)],
            [r(ko, n, std=n ** -0.5) for _ in range(order)],
            [r(ko, std=0.3) if bias else None for _ in range(order)],
            [r(ko, std=0.3) if bias else None for _ in range(order)])


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("xs,ys,norm_dims,activation", [
    ((5,), (5,), 1, None),
    ((2, 3), (2, 1), 2, "tanh"),     # co-attention, joint normalisation per sample
    ((2, 1), (2, 3), 1, "relu"),     # the mirror
    ((2, 1, 3), (1, 2, 1), 1, None),  # crossed broadcast: materialised
], ids=str)
def test_chained_blocks_match_backend_torch(monkeypatch, order, xs, ys, norm_dims, activation):
    model = _ChainOps()
    monkeypatch.setattr(cuda_backend, "_ops", lambda: model)
    x, y, wx, wy, bx, by = _params(xs, ys, 4, 3, 6, order, bias=order != 2)
    opts = dict(factor=2, dropout=0.0, seed=None, normalize=True, eps=1e-6,
                norm_dims=norm_dims, activation=activation)
    got = cuda_mfh.forward(x, y, wx, wy, bx, by, **opts)
    ref = torch_mfh.forward(x, y, wx, wy, bx, by, **opts)
    assert_close(got.out, ref.out, **TOL, name="out")
    assert_close(got.norms, ref.norms, **TOL, name="norms")
    # Forward: each block but the last returns its product, each but the first takes one.
    assert model.calls == [("forward", l > 0, l < order - 1) for l in range(order)]
    model.calls.clear()
    grad = torch.randn(got.out.shape, dtype=torch.float64)
    gb = cuda_mfh.backward(grad, x, y, wx, wy, bx, by, got.out, got.norms, **opts)
    rb = torch_mfh.backward(grad, x, y, wx, wy, bx, by, ref.out, ref.norms, **opts)
    assert_close(gb.dx, rb.dx, **TOL, name="dx")
    assert_close(gb.dy, rb.dy, **TOL, name="dy")
    for name in ("dweights_x", "dweights_y", "dbiases_x", "dbiases_y"):
        for l, (a, e) in enumerate(zip(getattr(gb, name), getattr(rb, name))):
            assert (a is None) == (e is None), (name, l)
            if a is not None:
                assert_close(a, e, **TOL, name=f"{name}[{l}]")
    # Backward: the products again (blocks 0 .. P-2), then the blocks from last to first,
    # each passing a carry on except block 0.
    again = [("forward", l > 0, True) for l in range(order - 1)]
    back = [("backward", l > 0, l < order - 1, l > 0) for l in reversed(range(order))]
    assert model.calls == again + back


def test_cuda_is_an_mfh_backend_with_the_drop_in_options():
    assert "cuda" in mfh_ops._MFH_MODULES and "cuda" in ops.MFH_DROP_IN_BACKENDS
    assert list(mfh_ops._MFH_MODULES).index("cuda") < list(mfh_ops._MFH_MODULES).index("torch")
    reason = mfh_ops.unsupported_reason("cuda", torch.device("cpu"), 2, 5)
    assert reason is not None and "CUDA device" in reason


def test_block_masks_are_the_triton_kernels_stream():
    """Every block draws the stream the Triton MFH kernels draw (block 0: FBP's mask), so
    both GPU backends drop the same elements for one seed (on a GPU: both backends'
    GPU kernels; elsewhere the extension's CPU mask operator against the Triton kernels
    through the interpreter)."""
    from fbp_kernels import backends
    from fbp_kernels.backends import cuda_build

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    missing = cuda_build.missing_requirements()
    if missing:
        pytest.skip("cannot build the CUDA extension here: " + "; ".join(missing))
    why = backends.unsupported_reason("triton", device)
    if why is not None:
        pytest.skip(f"backend 'triton': {why}")
    from fbp_kernels.backends import triton_mfh

    cuda_build.load()
    shape, seed = (3, 7, 10), 2**40 + 5
    got = cuda_mfh.block_masks(seed, shape, 0.3, 3, device)
    want = triton_mfh.block_masks(seed, shape, 0.3, 3, device)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[0], got[1])  # the blocks' streams differ


def test_an_empty_batch_gives_empty_outputs(monkeypatch):
    # cuda_mfh shapes the concatenated output explicitly: a 0-row batch has no -1 to infer.
    monkeypatch.setattr(cuda_backend, "_ops", lambda: _ChainOps())
    x, y, wx, wy, bx, by = _params((0, 3), (0, 1), 4, 3, 6, 2)
    res = cuda_mfh.forward(x, y, wx, wy, bx, by, factor=2, dropout=0.0, seed=None,
                           normalize=True, eps=1e-6)
    assert res.out.shape == (0, 3, 2 * 3) and res.norms.shape == (0, 3, 2)
