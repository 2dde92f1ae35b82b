"""Hostile input against every public entry point, table-driven.

Two kinds of rows:

* **refused**: each gives a TypeError (wrong type or dtype) or ValueError (wrong
  shape, device or option value) whose message names the offending argument, so a
  user can tell which argument to fix without reading our code;
* **documented results**: NaN/Inf inputs, rows of zeros, an empty batch, a factor as
  large as the projection (one output) and meta tensors give a defined answer,
  checked on every backend that runs here.

The entry points are :func:`fbp_kernels.fbp`, :func:`fbp_kernels.mfh`, the modules
(constructors and forward), ``FactorizedBilinearPooling.from_linear`` and the
checkpoint converters of :mod:`fbp_kernels.convert`.  The meta device stands in for
a second device on a machine without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fbp_kernels
from fbp_kernels import BackendUnavailableError, FactorizedBilinearPooling, reference
from fbp_kernels.convert import from_block_mfb, from_openvqa_mfb

M, N, FACTOR, O, ROWS = 5, 4, 2, 3, 3
KO = FACTOR * O


def valid_args(dtype=torch.float32):
    """Keyword arguments of a valid fbp() call: x (3, 5), y (3, 4), k=2, o=3."""
    return dict(x=torch.randn(ROWS, M, dtype=dtype), y=torch.randn(ROWS, N, dtype=dtype),
                weight_x=torch.randn(KO, M, dtype=dtype), weight_y=torch.randn(KO, N, dtype=dtype),
                bias_x=torch.randn(KO, dtype=dtype), bias_y=torch.randn(KO, dtype=dtype),
                factor=FACTOR)


def call_fbp(kw):
    x, y, wx, wy = kw.pop("x"), kw.pop("y"), kw.pop("weight_x"), kw.pop("weight_y")
    return fbp_kernels.fbp(x, y, wx, wy, **kw)


# (id, changes to the valid arguments, exception, regex the message must match).
# A value that is a callable receives the valid value and returns the bad one.
FBP_REFUSED = [
    ("x-list", {"x": [[1.0] * M]}, TypeError, r"\bx must be a torch.Tensor"),
    ("x-int", {"x": lambda t: t.long()}, TypeError, r"\bx has dtype torch.int64"),
    ("y-complex", {"y": lambda t: t.to(torch.complex64)}, TypeError, r"\by has dtype torch.complex64"),
    ("y-bool", {"y": lambda t: t > 0}, TypeError, r"\by has dtype torch.bool"),
    ("weight_x-int", {"weight_x": lambda t: t.int()}, TypeError, r"weight_x has dtype"),
    ("bias_y-complex", {"bias_y": lambda t: t.to(torch.complex128)}, TypeError, r"bias_y has dtype"),
    ("mixed-x-fp64", {"x": lambda t: t.double()}, TypeError, r"one dtype.*x=torch.float64"),
    ("mixed-bias-fp16", {"bias_x": lambda t: t.half()}, TypeError, r"bias_x=torch.float16"),
    ("x-0d", {"x": torch.tensor(1.0)}, ValueError, r"\bx must have at least 1 dimension"),
    ("weight_x-1d", {"weight_x": lambda t: t.flatten()}, ValueError, r"weight_x must be 2-D"),
    ("weight_y-3d", {"weight_y": lambda t: t[None]}, ValueError, r"weight_y must be 2-D"),
    ("bias_x-2d", {"bias_x": lambda t: t[None]}, ValueError, r"bias_x must be 1-D"),
    ("x-width", {"x": torch.randn(ROWS, M + 1)}, ValueError, r"\bx has 6 features.*weight_x expects 5"),
    ("y-width", {"y": torch.randn(ROWS, N - 1)}, ValueError, r"\by has 3 features.*weight_y expects 4"),
    ("weight_y-rows", {"weight_y": torch.randn(KO + 2, N), "bias_y": None}, ValueError,
     r"weight_x and weight_y must have the same number of rows"),
    ("bias_y-length", {"bias_y": torch.randn(KO + 1)}, ValueError, r"bias_y must have shape \(6,\)"),
    ("weight-zero-rows", {"weight_x": torch.randn(0, M), "weight_y": torch.randn(0, N),
                          "bias_x": None, "bias_y": None}, ValueError, r"weight_x.shape\[0\]"),
    ("leading-dims", {"y": torch.randn(ROWS + 1, N)}, ValueError,
     r"leading dimensions of x \(3,\) and y \(4,\) do not broadcast"),
    ("leading-dims-3d", {"x": torch.randn(2, 3, M), "y": torch.randn(3, 2, N)}, ValueError,
     r"leading dimensions"),
    ("y-meta", {"y": lambda t: t.to("meta")}, ValueError, r"one device.*\by on meta"),
    ("weight_x-meta", {"weight_x": lambda t: t.to("meta")}, ValueError, r"weight_x on meta"),
    ("bias_y-meta", {"bias_y": lambda t: t.to("meta")}, ValueError, r"bias_y on meta"),
    ("factor-0", {"factor": 0}, ValueError, r"factor must be an int >= 1, got 0"),
    ("factor-neg", {"factor": -2}, ValueError, r"factor must be an int >= 1, got -2"),
    ("factor-float", {"factor": 2.0}, TypeError, r"factor must be an int, got float"),
    ("factor-bool", {"factor": True}, TypeError, r"factor must be an int, got bool"),
    ("factor-str", {"factor": "2"}, TypeError, r"factor must be an int, got str"),
    ("factor-not-dividing", {"factor": 4}, ValueError, r"multiple of factor=4, got 6"),
    ("factor-too-big", {"factor": KO + 1}, ValueError, r"multiple of factor=7"),
    ("dropout-neg", {"dropout": -0.1}, ValueError, r"dropout must be a float in \[0, 1\), got -0.1"),
    ("dropout-one", {"dropout": 1.0}, ValueError, r"dropout must be .* got 1.0"),
    ("dropout-big", {"dropout": 1.5}, ValueError, r"dropout"),
    ("dropout-nan", {"dropout": math.nan}, ValueError, r"dropout .* got nan"),
    ("dropout-str", {"dropout": "0.1"}, ValueError, r"dropout .* got '0.1'"),
    ("eps-0", {"eps": 0.0}, ValueError, r"eps must be a finite float > 0.*got 0.0"),
    ("eps-neg", {"eps": -1e-6}, ValueError, r"eps .* got -1e-06"),
    ("eps-inf", {"eps": math.inf}, ValueError, r"eps .* got inf"),
    ("eps-nan", {"eps": math.nan}, ValueError, r"eps .* got nan"),
    ("backend-unknown", {"backend": "nope"}, ValueError, r"backend must be 'auto' or one of.*'nope'"),
]


def _apply(kw, changes):
    kw = dict(kw)
    for k, v in changes.items():
        kw[k] = v(kw[k]) if callable(v) else v
    return kw


@pytest.mark.parametrize("changes,exc,match", [pytest.param(c, e, m, id=i)
                                               for i, c, e, m in FBP_REFUSED])
def test_fbp_refuses(changes, exc, match):
    with pytest.raises(exc, match=match):
        call_fbp(_apply(valid_args(), changes))


def test_fbp_refuses_training_dropout_out_of_range_even_in_eval():
    # A bad rate is an error whatever the mode: it would surface only later, in training.
    with pytest.raises(ValueError, match="dropout"):
        call_fbp(_apply(valid_args(), {"dropout": 1.0, "training": False}))


def test_unavailable_backend_is_named():
    for name in fbp_kernels.backends.NAMES:
        reason = fbp_kernels.backends.unsupported_reason(name, torch.device("cpu"))
        if reason is None:
            continue
        with pytest.raises(BackendUnavailableError, match=rf"backend '{name}' cannot run"):
            call_fbp(_apply(valid_args(), {"backend": name}))
        return
    pytest.skip("every backend runs on CPU here, so none can be refused")


# ------------------------------------------------------------------ module forward

FORWARD_REFUSED = [
    ("x-list", lambda x, y: ([[0.0] * M], y), TypeError, r"\bx must be a torch.Tensor"),
    ("x-int", lambda x, y: (x.long(), y), TypeError, r"\bx has dtype"),
    ("y-complex", lambda x, y: (x, y.to(torch.complex64)), TypeError, r"\by has dtype"),
    ("x-fp64", lambda x, y: (x.double(), y), TypeError, r"x=torch.float64"),
    ("x-width", lambda x, y: (x[..., :-1], y), ValueError, r"\bx has 4 features"),
    ("y-width", lambda x, y: (x, torch.cat([y, y], -1)), ValueError, r"\by has 8 features"),
    ("x-0d", lambda x, y: (x[0, 0], y), ValueError, r"\bx must have at least 1 dimension"),
    ("leading-dims", lambda x, y: (x, y[:2]), ValueError, r"leading dimensions"),
    ("y-meta", lambda x, y: (x, y.to("meta")), ValueError, r"\by on meta"),
]


@pytest.mark.parametrize("bad,exc,match", [pytest.param(b, e, m, id=i)
                                           for i, b, e, m in FORWARD_REFUSED])
def test_module_forward_refuses(bad, exc, match):
    layer = FactorizedBilinearPooling(M, N, O, factor=FACTOR)
    with pytest.raises(exc, match=match):
        layer(*bad(torch.randn(ROWS, M), torch.randn(ROWS, N)))


# ------------------------------------------------------------------ construction

INIT_REFUSED = [
    ("factor-0", {"factor": 0}, ValueError, r"factor"),
    ("factor-float", {"factor": 2.5}, (TypeError, ValueError), r"factor"),
    ("factor-bool", {"factor": True}, (TypeError, ValueError), r"factor"),
    ("out_features-0", {"out_features": 0}, ValueError, r"out_features"),
    ("out_features-float", {"out_features": 2.5}, (TypeError, ValueError),
     r"out_features"),
    ("x_features-neg", {"x_features": -1}, (TypeError, ValueError), r"x_features"),
    ("y_features-0", {"y_features": 0}, ValueError, r"y_features"),
    # Options are checked where they are written, not at the first forward (or, for
    # dropout, at the first training step).
    ("dropout-neg", {"dropout": -0.1}, ValueError, r"dropout"),
    ("dropout-one", {"dropout": 1.0}, ValueError, r"dropout"),
    ("eps-0", {"eps": 0.0}, ValueError, r"eps"),
    ("backend-unknown", {"backend": "nope"}, ValueError, r"backend"),
]


@pytest.mark.parametrize("changes,exc,match", [pytest.param(c, e, m, id=i)
                                               for i, c, e, m in INIT_REFUSED])
def test_module_init_refuses(changes, exc, match):
    kw = dict(x_features=M, y_features=N, out_features=O, factor=FACTOR)
    kw.update(changes)
    with pytest.raises(exc, match=match):
        FactorizedBilinearPooling(**kw)


FROM_LINEAR_REFUSED = [
    ("out-mismatch", lambda: (nn.Linear(M, KO), nn.Linear(N, KO + 2)), {}, ValueError,
     r"proj_x and proj_y must have the same out_features"),
    ("factor-not-dividing", lambda: (nn.Linear(M, KO), nn.Linear(N, KO)), {"factor": 4},
     ValueError, r"factor .*dividing out_features=6, got 4"),
    ("factor-0", lambda: (nn.Linear(M, KO), nn.Linear(N, KO)), {"factor": 0}, ValueError,
     r"factor"),
    ("proj_x-tensor", lambda: (torch.randn(KO, M), nn.Linear(N, KO)), {},
     TypeError, r"proj_x"),
    ("dropout-one", lambda: (nn.Linear(M, KO), nn.Linear(N, KO)), {"dropout": 1.0},
     ValueError, r"dropout"),
]


@pytest.mark.parametrize("make,kw,exc,match", [pytest.param(mk, kw, e, m, id=i)
                                                for i, mk, kw, e, m in FROM_LINEAR_REFUSED])
def test_from_linear_refuses(make, kw, exc, match):
    proj_x, proj_y = make()
    kw = {"factor": FACTOR, **kw}
    with pytest.raises(exc, match=match):
        FactorizedBilinearPooling.from_linear(proj_x, proj_y, **kw)


# ------------------------------------------------------------------ converters

def _openvqa_sd():
    return {"proj_i.weight": torch.randn(KO, M), "proj_i.bias": torch.randn(KO),
            "proj_q.weight": torch.randn(KO, N), "proj_q.bias": torch.randn(KO)}


def _block_sd():
    return {"linear0.weight": torch.randn(KO, M), "linear0.bias": torch.randn(KO),
            "linear1.weight": torch.randn(KO, N), "linear1.bias": torch.randn(KO),
            "linear_out.weight": torch.randn(2, O), "linear_out.bias": torch.randn(2)}


CONVERT_REFUSED = [
    ("openvqa-source-list", lambda: from_openvqa_mfb([1, 2], FACTOR), TypeError, r"source must be"),
    ("openvqa-prefix-int", lambda: from_openvqa_mfb(_openvqa_sd(), FACTOR, prefix=1), TypeError,
     r"prefix must be a str"),
    ("openvqa-no-factor", lambda: from_openvqa_mfb(_openvqa_sd()), ValueError, r"factor is required"),
    ("openvqa-factor-0", lambda: from_openvqa_mfb(_openvqa_sd(), 0), ValueError, r"factor"),
    ("openvqa-factor-float", lambda: from_openvqa_mfb(_openvqa_sd(), 2.0), TypeError, r"factor"),
    ("openvqa-factor-not-dividing", lambda: from_openvqa_mfb(_openvqa_sd(), 4), ValueError,
     r"dividing .*=6, got 4"),
    ("openvqa-wrong-prefix", lambda: from_openvqa_mfb(_openvqa_sd(), FACTOR, prefix="mfb."),
     ValueError, r"no 'proj_i.weight'.*wrong prefix"),
    ("openvqa-weight-1d", lambda: from_openvqa_mfb({**_openvqa_sd(), "proj_i.weight": torch.randn(KO)},
                                                   FACTOR), ValueError, r"proj_i.weight must be a 2-D"),
    ("openvqa-dropout-one", lambda: from_openvqa_mfb(_openvqa_sd(), FACTOR, dropout=1.0), ValueError,
     r"dropout"),
    ("openvqa-eps-neg", lambda: from_openvqa_mfb(_openvqa_sd(), FACTOR, eps=-1.0), ValueError, r"eps"),
    ("block-activ", lambda: from_block_mfb(_block_sd()), ValueError, r"activ_input='relu'"),
    ("block-mm_dim-vs-linear_out", lambda: from_block_mfb(_block_sd(), mm_dim=2, activ_input=None),
     ValueError, r"mm_dim=2 contradicts linear_out"),
    ("block-mm_dim-not-dividing", lambda: from_block_mfb(
        {k: v for k, v in _block_sd().items() if "out" not in k}, mm_dim=4, activ_input=None),
     ValueError, r"mm_dim must be an int >= 1 dividing .*=6, got 4"),
    ("block-bias-length", lambda: from_block_mfb({**_block_sd(), "linear1.bias": torch.randn(3)},
                                                 activ_input=None), ValueError, r"linear1.bias"),
]


@pytest.mark.parametrize("call,exc,match", [pytest.param(c, e, m, id=i)
                                            for i, c, e, m in CONVERT_REFUSED])
def test_converters_refuse(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------ documented results

def _run(backend, x, y, weight_x, weight_y, bias_x=None, bias_y=None, factor=FACTOR, **kw):
    return fbp_kernels.fbp(x, y, weight_x, weight_y, bias_x, bias_y, factor=factor,
                           backend=backend, **kw)


# The Triton interpreter's numpy matmul warns about the inf * 0 it is asked to compute.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["x", "y"])
def test_non_finite_input_poisons_only_its_row(bad, where, backend, device):
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in valid_args().items()}
    clean = _run(backend, **kw)
    kw[where] = kw[where].clone()
    kw[where][1, 2] = bad
    out = _run(backend, **kw)
    assert torch.isnan(out[1]).all(), f"row 1 should be NaN, got {out[1]}"
    keep = torch.tensor([0, 2])
    assert torch.isfinite(out[keep]).all()
    torch.testing.assert_close(out[keep], clean[keep], atol=1e-6, rtol=1e-5)


def test_non_finite_input_in_broadcast_operand_poisons_rows_it_reaches(backend, device):
    # y (1, n) is shared by every row: a NaN there reaches all of them, and nothing else.
    x = torch.randn(2, 3, M, device=device)
    y = torch.randn(2, 1, N, device=device)
    y[0, 0, 0] = math.nan
    wx, wy = torch.randn(KO, M, device=device), torch.randn(KO, N, device=device)
    out = _run(backend, x, y, wx, wy)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_rows_of_zeros_have_finite_output_and_gradients(normalize, backend, device):
    # Without bias a zero row of x makes every pooled value of that row exactly 0: the
    # point where the textbook signed square root has an infinite derivative.
    x = torch.randn(ROWS, M, dtype=torch.float64, device=device)
    x[1] = 0
    y = torch.randn(ROWS, N, dtype=torch.float64, device=device)
    wx = torch.randn(KO, M, dtype=torch.float64, device=device)
    wy = torch.randn(KO, N, dtype=torch.float64, device=device)
    tensors = [t.requires_grad_() for t in (x, y, wx, wy)]
    out = _run(backend, *tensors, normalize=normalize)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    grads = torch.autograd.grad(out, tensors, torch.randn_like(out))
    for name, g in zip(("x", "y", "weight_x", "weight_y"), grads):
        assert torch.isfinite(g).all(), f"d{name} not finite"
    ref = reference.fbp(*[t.detach().requires_grad_() for t in tensors], factor=FACTOR,
                        normalize=normalize)
    torch.testing.assert_close(out, ref)


def test_all_zero_batch_gradients_are_finite(backend, device):
    x = torch.zeros(ROWS, M, device=device, requires_grad=True)
    y = torch.zeros(ROWS, N, device=device, requires_grad=True)
    wx = torch.randn(KO, M, device=device, requires_grad=True)
    wy = torch.randn(KO, N, device=device, requires_grad=True)
    out = _run(backend, x, y, wx, wy)
    assert torch.equal(out, torch.zeros(ROWS, O, device=device))
    for g in torch.autograd.grad(out.sum(), (x, y, wx, wy)):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("shapes", [((0, M), (0, N)), ((0, M), (1, N)), ((2, 0, M), (2, 1, N))],
                         ids=["both-empty", "broadcast-one", "3d"])
def test_empty_batch(shapes, backend, device):
    layer = FactorizedBilinearPooling(M, N, O, factor=FACTOR, backend=backend).to(device)
    x = torch.randn(*shapes[0], device=device, requires_grad=True)
    y = torch.randn(*shapes[1], device=device, requires_grad=True)
    out = layer(x, y)
    batch = torch.broadcast_shapes(shapes[0][:-1], shapes[1][:-1])
    assert out.shape == (*batch, O)
    out.sum().backward()
    assert x.grad.shape == x.shape and y.grad.shape == y.shape
    assert torch.equal(y.grad, torch.zeros_like(y))  # nothing flowed into y's one row
    for p in layer.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), "grads must be zero"


def test_factor_equal_to_weight_rows_gives_one_output(backend, device):
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in valid_args(torch.float64).items()}
    kw["factor"] = KO  # every projected column pools into the single output
    out = _run(backend, **kw)
    assert out.shape == (ROWS, 1)
    s = reference.fbp(kw["x"], kw["y"], kw["weight_x"], kw["weight_y"], kw["bias_x"],
                      kw["bias_y"], factor=KO, normalize=False)
    # One value normalised by its own magnitude: its sign.
    torch.testing.assert_close(out, torch.sign(s))


def test_meta_tensors_give_shapes_without_data():
    # Shape inference on the meta device (what torch.compile and model-size tools do).
    kw = {k: (v.to("meta") if torch.is_tensor(v) else v) for k, v in valid_args().items()}
    kw["x"] = torch.empty(7, 1, M, device="meta")
    out = call_fbp(dict(kw, backend="torch"))
    assert out.device.type == "meta" and out.shape == (7, ROWS, O)



# ------------------------------------------------------------------ MFH entry points

def _mfh_args():
    """A valid mfh() call: order 2, x (3, 5), y (3, 4), k=2, o=3."""
    return dict(x=torch.randn(ROWS, M), y=torch.randn(ROWS, N),
                weights_x=[torch.randn(KO, M) for _ in range(2)],
                weights_y=[torch.randn(KO, N) for _ in range(2)], factor=FACTOR)


def _call_mfh(kw):
    return fbp_kernels.mfh(kw.pop("x"), kw.pop("y"), kw.pop("weights_x"), kw.pop("weights_y"),
                           **kw)


MFH_REFUSED = [
    ("x-int", {"x": lambda t: t.long()}, TypeError, r"\bx has dtype"),
    ("weights_x-tensor", {"weights_x": lambda w: w[0]}, TypeError, r"weights_x must be a list"),
    ("order-mismatch", {"weights_y": lambda w: w[:1]}, ValueError, r"weights_x and weights_y"),
    ("no-blocks", {"weights_x": [], "weights_y": []}, ValueError, r"weights_x is empty"),
    ("block-width", {"weights_x": lambda w: [w[0], torch.randn(KO, M + 1)]}, ValueError,
     r"weights_x\[1\] expects 6"),
    ("factor-0", {"factor": 0}, ValueError, r"factor must be an int >= 1"),
    ("factor-not-dividing", {"factor": 4}, ValueError, r"factor=4"),
    ("dropout-one", {"dropout": 1.0}, ValueError, r"dropout"),
    ("eps-0", {"eps": 0.0}, ValueError, r"eps"),
    ("y-meta", {"y": lambda t: t.to("meta")}, ValueError, r"\by on meta"),
    ("leading-dims", {"y": lambda t: t[:2]}, ValueError, r"leading dimensions"),
]


@pytest.mark.parametrize("changes,exc,match", [pytest.param(c, e, m, id=i)
                                               for i, c, e, m in MFH_REFUSED])
def test_mfh_refuses(changes, exc, match):
    with pytest.raises(exc, match=match):
        _call_mfh(_apply(_mfh_args(), changes))


def test_mfh_module_init_refuses_dropout():
    with pytest.raises(ValueError, match="dropout"):
        fbp_kernels.MFH(M, N, O, factor=FACTOR, dropout=1.5)


def test_mfh_nan_row_and_empty_batch():
    kw = _mfh_args()
    kw["x"][1, 0] = math.nan
    out = _call_mfh(dict(kw))
    assert out.shape == (ROWS, 2 * O)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    kw = _mfh_args()
    kw["x"], kw["y"] = kw["x"][:0], kw["y"][:0]
    assert _call_mfh(kw).shape == (0, 2 * O)


# ------------------------------------------------------------------ magnitudes

@pytest.mark.parametrize("dtype,scale", [
    (torch.float32, 1e15), (torch.float32, 1e-5), (torch.float32, 1e-15),
    (torch.float64, 1e120), (torch.float64, 1e-5), (torch.float64, 1e-120),
], ids=["fp32-huge", "fp32-below-eps", "fp32-below-delta", "fp64-huge", "fp64-below-eps",
        "fp64-below-delta"])
def test_extreme_but_representable_magnitudes(dtype, scale, backend, device):
    # Inputs scaled so that the products a*c (~scale^2 * k) stay inside the dtype's
    # range, in the three regimes of the normalisation: |s| >> eps (textbook signed
    # sqrt), |s| << eps (linear, t = s / 2 sqrt(eps)) and ||t|| below F.normalize's
    # delta = 1e-12 (output t / delta, close to 0).  Output and input gradients
    # must be finite and match the float64 reference.
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in valid_args(dtype).items()}
    kw["bias_x"] = kw["bias_y"] = None  # a bias would not scale with the inputs
    kw["x"], kw["y"] = kw["x"] * scale, kw["y"] * scale
    x, y = kw["x"].requires_grad_(), kw["y"].requires_grad_()
    out = _run(backend, **kw)
    assert torch.isfinite(out).all()
    ref = reference.fbp(x.detach().double(), y.detach().double(), kw["weight_x"].double(),
                        kw["weight_y"].double(), factor=FACTOR)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    for g in torch.autograd.grad(out, (x, y), torch.ones_like(out)):
        assert torch.isfinite(g).all()


def test_fp16_product_overflow_is_never_silently_wrong(backend, device):
    # |a|, |c| ~ 400 make a*c ~ 1.6e5 > 65504 (fp16 max).  A backend may keep the
    # product in fp32 (then the result is right) or overflow as eager PyTorch does
    # (then the row is NaN/Inf): what it must not do is return finite garbage.
    if device.type == "cpu" and backend == "triton":
        pytest.skip("the Triton interpreter computes fp16 products through numpy: no "
                    "GPU overflow behaviour to test")
    x = torch.full((2, M), 400.0 / M ** 0.5, device=device)
    y = torch.full((2, N), 400.0 / N ** 0.5, device=device)
    wx = torch.full((KO, M), M ** -0.5, device=device)
    wy = torch.full((KO, N), N ** -0.5, device=device)
    exact = fbp_kernels.fbp(x, y, wx, wy, factor=FACTOR, backend=backend)
    out = fbp_kernels.fbp(x.half(), y.half(), wx.half(), wy.half(), factor=FACTOR,
                          backend=backend)
    finite = torch.isfinite(out).all(-1)
    torch.testing.assert_close(out[finite].float(), exact[finite], atol=2e-3, rtol=2e-3)


def test_mfh_strided_and_single_biases(backend, device):
    # A bias may be a strided view (a slice of a packed buffer) and may be missing in
    # some blocks; MFH must read it by its strides like nn.Linear does.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(ROWS, M, generator=gen, dtype=torch.float64).to(device)
    y = torch.randn(ROWS, N, generator=gen, dtype=torch.float64).to(device)
    wx = [torch.randn(KO, M, generator=gen, dtype=torch.float64).to(device) for _ in range(2)]
    wy = [torch.randn(KO, N, generator=gen, dtype=torch.float64).to(device) for _ in range(2)]
    bx = [torch.randn(2 * KO, generator=gen, dtype=torch.float64).to(device)[::2], None]
    by = [torch.randn(KO, generator=gen, dtype=torch.float64).to(device),
          torch.randn(3 * KO, generator=gen, dtype=torch.float64).to(device)[1::3]]
    try:
        out = fbp_kernels.mfh(x, y, wx, wy, bx, by, factor=FACTOR, backend=backend)
    except BackendUnavailableError as exc:
        pytest.skip(f"backend {backend!r} has no MFH here: {exc}")
    ref = reference.mfh(x, y, wx, wy, bx, by, factor=FACTOR)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
