"""Issue 13, items 1-2: ``norm_dims`` (joint L2 normalisation) and ``activation``
(relu/tanh on both projections) on fbp, mfh and both modules.

Layers:
- the reference against peer-style code written here from the peers' semantics
  (openvqa's joint ``F.normalize(t.view(N, -1)).view(N, C, o)``, block.bootstrap's /
  mmf's ``activ_input``), in float64;
- the torch backend (the public functions, which route these options there) against
  the reference: forward and every gradient, with broadcasting, dropout, MFH orders
  1-3 and the projection-saving modes;
- gradcheck in float64; degenerate (all-zero) groups; routing and refusals; bad values.

Tolerances: float64 throughout.  The backend and the reference do the same maths in
a different order (a hand-written backward against autograd), so only rounding
differs: ~1e-16 relative per operation, amplified at most by the signed sqrt's slope
(<= 0.5 / sqrt(eps) = 500) and sums over < 100 terms, i.e. well under 1e-11.
``atol=1e-10, rtol=1e-8`` (the project's float64 tolerance) leaves margin for any
CPU's BLAS blocking yet fails on any formula error (those are O(1e-3) or more).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fbp_kernels
from fbp_kernels import functional, mfh_ops, ops, reference
from fbp_kernels.backends import torch_backend
from fbp_kernels.reference import DEFAULT_EPS
from conftest import DEVICE, backend_param
from helpers import assert_close

TOL = dict(atol=1e-10, rtol=1e-8)
ACTIVATIONS = [None, "relu", "tanh"]


def _params(batch_x, batch_y, m, n, ko, order=1, bias=True, dtype=torch.float64):
    """Random ``x, y`` and ``order`` blocks of nn.Linear-scaled weights and biases."""
    g = lambda *s, std=1.0: (torch.randn(*s, dtype=dtype, device=DEVICE) * std)  # noqa: E731
    x, y = g(*batch_x, m), g(*batch_y, n)
    wx = [g(ko, m, std=m ** -0.5) for _ in range(order)]
    wy = [g(ko, n, std=n ** -0.5) for _ in range(order)]
    bx = [g(ko, std=0.3) if bias else None for _ in range(order)]
    by = [g(ko, std=0.3) if bias else None for _ in range(order)]
    return x, y, wx, wy, bx, by


def _leaves(*groups):
    """Every tensor in ``groups`` (tensors or lists), made a leaf that requires grad."""
    out = []
    for item in groups:
        if isinstance(item, list):
            out.append([None if t is None else t.detach().clone().requires_grad_()
                        for t in item])
        else:
            out.append(item.detach().clone().requires_grad_())
    return out


def _flat(*groups):
    flat = []
    for item in groups:
        flat.extend([t for t in item if t is not None] if isinstance(item, list) else [item])
    return flat


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _zero_safe_sqrt(s, eps=DEFAULT_EPS):
    # Written in the first form of reference.py's docstring, independently of the code.
    return torch.sign(s) * (torch.sqrt(s.abs() + eps) - math.sqrt(eps))


# --- The reference against peer-style code ------------------------------------------

def openvqa_mfb(img, ques, lin_i, lin_q, k, o, eps=DEFAULT_EPS):
    """openvqa's region-wise MFB (IAtt): ``img (N, C, m)``, ``ques (N, 1, n)``; sum
    pooling of ``k`` consecutive columns, signed sqrt, then ONE L2 norm per sample over
    all its regions and outputs."""
    N, C = img.shape[0], img.shape[1]
    exp_out = lin_i(img) * lin_q(ques)  # (N, C, k*o)
    z = exp_out.view(N, C, o, k).sum(3)
    z = _zero_safe_sqrt(z, eps)
    return F.normalize(z.reshape(N, -1)).view(N, C, o)


def mmf_mfh(img, ques, lins_i, lins_q, k, o, eps=DEFAULT_EPS):
    """mmf-style MFH: the cascade ``exp_l = a_l * c_l * exp_{l-1}``, each block jointly
    normalised over the sample's regions, blocks concatenated."""
    N, C = img.shape[0], img.shape[1]
    outs, prev = [], None
    for li, lq in zip(lins_i, lins_q):
        exp_out = li(img) * lq(ques)
        if prev is not None:
            exp_out = exp_out * prev
        prev = exp_out
        z = _zero_safe_sqrt(exp_out.view(N, C, o, k).sum(3), eps)
        outs.append(F.normalize(z.reshape(N, -1)).view(N, C, o))
    return torch.cat(outs, dim=-1)


def block_mfb(x, y, lin0, lin1, k, o, activ_input, eps=DEFAULT_EPS):
    """block.bootstrap-style MFB: ``activ_input`` (a name in torch.nn.functional) on
    both projections, product, sum pooling, signed sqrt, row-wise L2 norm."""
    x0, x1 = lin0(x), lin1(y)
    if activ_input:
        x0 = getattr(F, activ_input)(x0)
        x1 = getattr(F, activ_input)(x1)
    z = (x0 * x1).view(x.shape[0], o, k).sum(2)
    return F.normalize(_zero_safe_sqrt(z, eps))


def _linear(w, b):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def test_reference_norm_dims_2_is_openvqa_joint_normalisation():
    k, o = 3, 4
    x, y, wx, wy, bx, by = _params((2, 5), (2, 1), 6, 7, k * o)
    expected = openvqa_mfb(x, y, _linear(wx[0], bx[0]), _linear(wy[0], by[0]), k, o)
    got = reference.fbp(x, y, wx[0], wy[0], bx[0], by[0], factor=k, norm_dims=2)
    assert_close(got, expected, atol=1e-13, rtol=1e-12, name="joint")
    # Each sample is unit-norm as a whole, not row by row: the test could fail.
    assert torch.allclose(got.flatten(1).norm(dim=1), torch.ones(2, dtype=got.dtype))
    assert not torch.allclose(got.norm(dim=-1), torch.ones(2, 5, dtype=got.dtype))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_reference_mfh_norm_dims_2_is_joint_per_block(order):
    k, o = 2, 3
    x, y, wx, wy, bx, by = _params((3, 4), (3, 1), 5, 6, k * o, order=order)
    expected = mmf_mfh(x, y, [_linear(w, b) for w, b in zip(wx, bx)],
                       [_linear(w, b) for w, b in zip(wy, by)], k, o)
    got = reference.mfh(x, y, wx, wy, bx, by, factor=k, norm_dims=2)
    assert_close(got, expected, atol=1e-13, rtol=1e-12, name="mfh joint")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_reference_activation_is_block_activ_input(activation):
    k, o = 5, 4
    x, y, wx, wy, bx, by = _params((6,), (6,), 7, 8, k * o)
    expected = block_mfb(x, y, _linear(wx[0], bx[0]), _linear(wy[0], by[0]), k, o,
                         activation)
    got = reference.fbp(x, y, wx[0], wy[0], bx[0], by[0], factor=k, activation=activation)
    assert_close(got, expected, atol=1e-13, rtol=1e-12, name=activation)
    # And it differs from no activation (the option does something).
    plain = reference.fbp(x, y, wx[0], wy[0], bx[0], by[0], factor=k)
    assert (got - plain).abs().max() > 1e-2


# --- The torch backend (through the public functions) against the reference ---------

def _drawn_seed(s):
    """The dropout seed fbp()/mfh() draw right after ``torch.manual_seed(s)``."""
    torch.manual_seed(s)
    return int(functional.dropout_seed(True, 0.5))


def _fbp_both(x, y, wx, wy, bx, by, k, norm_dims, activation, dropout, save):
    """(backend output, reference output) on the same leaves, the same dropout mask."""
    batch = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    mask = None
    if dropout:
        seed = _drawn_seed(7)
        mask = torch_backend.dropout_mask(seed, (*batch, wx.shape[0]), dropout, x.device)
        torch.manual_seed(7)
    out = fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=k, dropout=dropout,
                          training=bool(dropout), norm_dims=norm_dims,
                          activation=activation, save_projections=save)
    ref = reference.fbp(x, y, wx, wy, bx, by, factor=k, dropout=dropout,
                        dropout_mask=mask, norm_dims=norm_dims, activation=activation)
    return out, ref


@pytest.mark.parametrize("norm_dims", [1, 2, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("save", [False, True, "x"], ids=["recompute", "keep", "keep_x"])
def test_fbp_torch_backend_matches_reference(norm_dims, activation, dropout, save):
    k, o = 3, 4
    x, y, wx, wy, bx, by = _params((3, 5), (3, 1), 6, 7, k * o)  # (B, R) x (B, 1)
    x, y, wx, wy, bx, by = _leaves(x, y, wx[0], wy[0], bx[0], by[0])
    out, ref = _fbp_both(x, y, wx, wy, bx, by, k, norm_dims, activation, dropout, save)
    assert_close(out, ref, **TOL, name="out")
    inputs = [x, y, wx, wy, bx, by]
    g = torch.randn_like(ref)
    names = ["x", "y", "weight_x", "weight_y", "bias_x", "bias_y"]
    for name, got, exp in zip(names, _grads(out, inputs, g), _grads(ref, inputs, g)):
        assert_close(got, exp, **TOL, name=f"d{name}")


MFH_BACKENDS = [backend_param(n, mfh_ops.unsupported_reason) for n in ops.MFH_DROP_IN_BACKENDS]


@pytest.mark.parametrize("backend", MFH_BACKENDS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("norm_dims", [1, 2, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_mfh_backends_match_reference(order, norm_dims, activation, dropout, backend):
    """Both MFH backends (torch; triton, FBP's wide kernels per block, through the
    interpreter here) against the reference, with each backend's own dropout masks."""
    k, o = 2, 3
    params = _params((2, 4), (2, 1), 5, 6, k * o, order=order)
    x, y, wx, wy, bx, by = _leaves(*params)
    batch = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    masks = None
    if dropout:
        seed = _drawn_seed(11)
        masks = mfh_ops.resolve(backend, x.device).block_masks(
            seed, (*batch, k * o), dropout, order, x.device)
        torch.manual_seed(11)
    out = fbp_kernels.mfh(x, y, wx, wy, bx, by, factor=k, dropout=dropout,
                          training=bool(dropout), norm_dims=norm_dims, activation=activation,
                          backend=backend)
    ref = reference.mfh(x, y, wx, wy, bx, by, factor=k, dropout=dropout,
                        dropout_masks=masks, norm_dims=norm_dims, activation=activation)
    assert_close(out, ref, **TOL, name="out")
    inputs = _flat(x, y, wx, wy, bx, by)
    g = torch.randn_like(ref)
    for i, (got, exp) in enumerate(zip(_grads(out, inputs, g), _grads(ref, inputs, g))):
        assert_close(got, exp, **TOL, name=f"grad of input {i}")


@pytest.mark.parametrize("backend", MFH_BACKENDS)
def test_order_1_mfh_is_fbp_with_the_options(backend):
    # triton: one kernel family and one operand layout, so order 1 runs FBP's own
    # launches (bitwise equal; here co-attention's, y's projection once per group)
    k, o = 3, 2
    x, y, wx, wy, bx, by = _params((2, 3), (2, 1), 4, 5, k * o)
    kw = dict(factor=k, norm_dims=2, activation="tanh", backend=backend)
    assert torch.equal(fbp_kernels.mfh(x, y, wx, wy, bx, by, **kw),
                       fbp_kernels.fbp(x, y, wx[0], wy[0], bx[0], by[0], **kw))


def test_modules_carry_the_options():
    torch.manual_seed(3)
    layer = fbp_kernels.FactorizedBilinearPooling(6, 7, 4, factor=3, norm_dims=2,
                                                  activation="relu", dtype=torch.float64)
    x, y = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 1, 7, dtype=torch.float64)
    p = layer.proj_x, layer.proj_y
    expected = reference.fbp(x, y, p[0].weight, p[1].weight, p[0].bias, p[1].bias, factor=3,
                             norm_dims=2, activation="relu")
    assert_close(layer(x, y), expected, **TOL, name="FBP module")
    assert "norm_dims=2" in repr(layer) and "activation='relu'" in repr(layer)
    wrapped = fbp_kernels.FactorizedBilinearPooling.from_linear(
        p[0], p[1], 3, norm_dims=2, activation="relu")
    assert torch.equal(wrapped(x, y), layer(x, y))

    mfh = fbp_kernels.MFH(6, 7, 4, factor=3, order=2, norm_dims=2, activation="tanh",
                          dtype=torch.float64)
    expected = reference.mfh(x, y, [q.weight for q in mfh.proj_x],
                             [q.weight for q in mfh.proj_y], [q.bias for q in mfh.proj_x],
                             [q.bias for q in mfh.proj_y], factor=3, norm_dims=2,
                             activation="tanh")
    assert_close(mfh(x, y), expected, **TOL, name="MFH module")
    wrapped = fbp_kernels.MFH.from_linear(mfh.proj_x, mfh.proj_y, 3, norm_dims=2,
                                          activation="tanh")
    assert torch.equal(wrapped(x, y), mfh(x, y))
    # Defaults leave the repr as it was.
    assert "norm_dims" not in repr(fbp_kernels.FactorizedBilinearPooling(2, 2, 2))


# --- gradcheck -------------------------------------------------------------------------

@pytest.mark.parametrize("norm_dims,activation", [(2, None), (3, "tanh"), (2, "relu")])
def test_gradcheck_fbp(norm_dims, activation):
    # relu: random inputs keep every pre-activation far (>> the 1e-6 step) from the
    # kink, where the function is smooth.
    x, y, wx, wy, bx, by = _leaves(*_params((2, 3), (2, 1), 4, 3, 6))

    def f(x, y, wx, wy, bx, by):
        return fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=2, norm_dims=norm_dims,
                               activation=activation)

    assert torch.autograd.gradcheck(f, (x, y, wx[0], wy[0], bx[0], by[0]), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


def test_gradcheck_fbp_with_dropout_through_the_operator():
    # A fixed seed makes the masked op a deterministic function (see test_gradcheck).
    x, y, wx, wy, bx, by = _leaves(*_params((2, 3), (2, 1), 4, 3, 6))
    seed = torch.tensor(1234, dtype=torch.int64)

    def f(x, y, wx, wy, bx, by):
        return ops.fbp_forward(x, y, wx, wy, bx, by, seed, 2, 0.3, True, 1e-6, "none",
                               "torch", 2, "tanh")[0]

    assert torch.autograd.gradcheck(f, (x, y, wx[0], wy[0], bx[0], by[0]), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_gradcheck_mfh(order):
    x, y, wx, wy, bx, by = _leaves(*_params((2, 2), (2, 1), 3, 4, 4, order=order))

    def f(x, y, *flat):
        return fbp_kernels.mfh(x, y, list(flat[:order]), list(flat[order:2 * order]),
                               list(flat[2 * order:3 * order]), list(flat[3 * order:]),
                               factor=2, norm_dims=2, activation="tanh")

    assert torch.autograd.gradcheck(f, (x, y, *wx, *wy, *bx, *by), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


# --- degenerate groups ---------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_zero_group_stays_finite(activation):
    """A sample whose regions are all padding (zero inputs, no bias) has a zero group:
    its output is zero and every gradient is finite, with zero contribution from it."""
    x, y, wx, wy, _, _ = _params((3, 4), (3, 1), 5, 6, 6)
    x[1] = 0.0
    x, y, wx, wy = _leaves(x, y, wx[0], wy[0])
    for fn in (fbp_kernels.fbp, reference.fbp):
        out = fn(x, y, wx, wy, factor=2, norm_dims=2, activation=activation)
        assert torch.isfinite(out).all() and (out[1] == 0).all()
        grads = _grads(out, [x, y, wx, wy], torch.randn_like(out))
        assert all(torch.isfinite(g).all() for g in grads)
        # Nothing flows back into the padded sample's question.
        assert (grads[1][1] == 0).all()
    mfh_out = fbp_kernels.mfh(x, y, [wx, wx], [wy, wy], factor=2, norm_dims=3,
                              activation=activation)
    mfh_grads = _grads(mfh_out, [x, y, wx, wy], torch.randn_like(mfh_out))
    assert all(torch.isfinite(g).all() for g in mfh_grads)


def test_relu_kink_has_zero_gradient_like_pytorch():
    """A pre-activation exactly 0 (zero input, zero bias on that column) gets gradient 0
    through relu, as torch.relu's backward gives.  Output 0 pools exactly 0, where the
    signed sqrt's slope is largest (500), so any other convention shows up big."""
    x = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, dtype=torch.float64)
    wx = torch.randn(6, 3, dtype=torch.float64)
    wy = torch.randn(6, 4, dtype=torch.float64) * 0.5  # |wy y| ~ 1
    by = torch.full((6,), 5.0, dtype=torch.float64)    # c > 0: y's relu is inactive
    bx = torch.zeros(6, dtype=torch.float64)
    # Columns 0, 1 (output 0) exactly at the kink; columns 2-5 (outputs 1, 2) active
    # with distinct values, so the normalised output still moves with them.
    bx[2:] = 1.0 + torch.rand(4, dtype=torch.float64)
    bx.requires_grad_()
    out = fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=2, activation="relu")
    ref = reference.fbp(x, y, wx, wy, bx, by, factor=2, activation="relu")
    g = torch.randn_like(ref)
    got, exp = _grads(out, [bx], g)[0], _grads(ref, [bx], g)[0]
    assert (got[:2] == 0).all() and (got[2:] != 0).all()
    assert_close(got, exp, **TOL, name="dbias_x")


# --- the operators under torch.compile (schemas and fake kernels) --------------------

def test_compiled_graph_carries_the_options():
    x, y, wx, wy, bx, by = _leaves(*_params((2, 3), (2, 1), 4, 5, 6))
    wx, wy, bx, by = wx[0], wy[0], bx[0], by[0]

    def f(x, y):
        return fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=2, norm_dims=2, activation="tanh")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, y)
    ref = reference.fbp(x, y, wx, wy, bx, by, factor=2, norm_dims=2, activation="tanh")
    assert_close(out, ref, **TOL, name="compiled out")
    g = torch.randn_like(ref)
    for got, exp in zip(_grads(out, [x, wx], g), _grads(ref, [x, wx], g)):
        assert_close(got, exp, **TOL, name="compiled grad")


# --- routing ---------------------------------------------------------------------------

def test_auto_routes_to_torch():
    x, y, wx, wy, bx, by = _params((2,), (2,), 3, 4, 4)
    for options in ({"norm_dims": 2}, {"activation": "relu"}):
        *_, name, _mode = functional._prepare([x, y, wx[0], wy[0], bx[0], by[0]], 2, 0.0,
                                              DEFAULT_EPS, "auto", False,
                                              options.get("norm_dims", 1),
                                              options.get("activation"))
        assert name == "torch"
    assert functional.route_drop_in("auto", 1, None) is None  # defaults: usual choice
    assert functional.route_drop_in("auto", 2, None) == "torch"


@pytest.mark.parametrize("option,value", [("norm_dims", 2), ("activation", "relu")])
def test_explicit_kernel_backend_is_refused(option, value):
    # Refused by name, before availability: the same ValueError on any machine.  Every
    # FBP backend has both options (tests/test_split_dropin.py), every MFH backend too;
    # split has no MFH.
    x, y, wx, wy, bx, by = _params((2, 3), (2, 1), 3, 4, 4)
    assert set(ops.DROP_IN_BACKENDS) == set(fbp_kernels.backends.NAMES)
    assert ops.MFH_DROP_IN_BACKENDS == ("triton", "cuda", "torch")
    with pytest.raises(ValueError, match=option) as info:
        fbp_kernels.mfh(x, y, wx, wy, bx, by, factor=2, backend="split", **{option: value})
    assert "['triton', 'cuda', 'torch']" in str(info.value) and "'split'" in str(info.value)


@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_direct_operator_use_is_refused(backend):
    # Backend triton has the options in its wide kernels, which recompute the projections:
    # keeping them, or a factor too wide for a tile, is refused with the reason.
    x, y, wx, wy, bx, by = _params((2,), (2,), 3, 4, 4)
    with pytest.raises(ValueError, match="save_projections"):
        ops.fbp_forward(x, y, wx[0], wy[0], bx[0], by[0], None, 2, 0.0, True, 1e-6, "both",
                        backend, 2, None)
    with pytest.raises(ValueError, match="save_projections"):
        ops.FBPFunction.apply(x, y, wx[0], wy[0], bx[0], by[0], None, 2, 0.0, True, 1e-6,
                              "both", backend, 1, "tanh")
    from fbp_kernels.backends import triton_wide as W

    wide = 4 * W.pick_wide_config(x.dtype, x.device).block_n  # no tile holds one group
    like = dict(dtype=x.dtype, device=x.device)
    xw, yw = torch.randn(2, 3, **like), torch.randn(2, 4, **like)
    with pytest.raises(ValueError, match=f"factor={wide + 1}"):
        ops.fbp_forward(xw, yw, torch.randn((wide + 1) * 2, 3, **like),
                        torch.randn((wide + 1) * 2, 4, **like), None, None, None,
                        wide + 1, 0.0, True, 1e-6, "none", backend, 1, "relu")


@pytest.mark.parametrize("backend", [backend_param("triton", mfh_ops.unsupported_reason)])
def test_mfh_factor_too_wide_for_the_tiles_is_refused(backend):
    # MFH's triton blocks need whole factor groups in every tile: a wider factor is
    # refused by name, with the reason (auto then takes torch: test_strategy.py).
    from fbp_kernels.backends import triton_wide as W

    wide = 4 * W.pick_wide_config(torch.float64).block_n + 1  # odd: no tile holds a group
    assert mfh_ops.unsupported_reason(backend, DEVICE, 2, wide) is not None
    assert mfh_ops.unsupported_reason(backend, DEVICE, 2, 3) is None
    x, y, wx, wy, bx, by = _params((2,), (2,), 3, 4, 2 * wide, order=2)
    with pytest.raises(fbp_kernels.BackendUnavailableError, match=f"factor {wide}"):
        fbp_kernels.mfh(x, y, wx, wy, bx, by, factor=wide, backend=backend,
                        activation="relu")


# --- bad values ------------------------------------------------------------------------

BAD = [("norm_dims", 0, ValueError), ("norm_dims", 1.5, TypeError),
       ("norm_dims", True, TypeError), ("activation", "gelu", ValueError),
       ("activation", F.relu, ValueError)]


@pytest.mark.parametrize("option,value,error", BAD, ids=lambda v: repr(v)[:12])
def test_bad_values_are_refused(option, value, error):
    x, y, wx, wy, bx, by = _params((2, 3), (2, 1), 3, 4, 4)
    with pytest.raises(error, match=option):
        fbp_kernels.fbp(x, y, wx[0], wy[0], bx[0], by[0], factor=2, **{option: value})
    with pytest.raises(error, match=option):
        fbp_kernels.mfh(x, y, wx, wy, bx, by, factor=2, **{option: value})
    with pytest.raises(error, match=option):
        fbp_kernels.FactorizedBilinearPooling(3, 4, 2, factor=2, **{option: value})
    with pytest.raises(error, match=option):
        fbp_kernels.MFH(3, 4, 2, factor=2, **{option: value})
    lin_x, lin_y = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)
    with pytest.raises(error, match=option):
        fbp_kernels.FactorizedBilinearPooling.from_linear(lin_x, lin_y, 2, **{option: value})
    with pytest.raises(error, match=option):
        fbp_kernels.MFH.from_linear([lin_x], [lin_y], 2, **{option: value})


def test_norm_dims_beyond_the_batch_is_refused():
    x, y, wx, wy, bx, by = _params((2, 3), (2, 1), 3, 4, 4)  # batch (2, 3): at most 3
    assert fbp_kernels.fbp(x, y, wx[0], wy[0], factor=2, norm_dims=3).shape == (2, 3, 2)
    for fn, args in ((fbp_kernels.fbp, (wx[0], wy[0])), (fbp_kernels.mfh, (wx, wy)),
                     (reference.fbp, (wx[0], wy[0]))):
        with pytest.raises(ValueError, match="norm_dims=4"):
            fn(x, y, *args, factor=2, norm_dims=4)
    with pytest.raises(ValueError, match="norm_dims"):  # 1-D inputs: no batch at all
        fbp_kernels.fbp(x[0, 0], y[0, 0], wx[0], wy[0], factor=2, norm_dims=2)
