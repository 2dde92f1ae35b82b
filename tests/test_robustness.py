"""Defects found by hostile probing (issue 11, R1-R12), one test (or a few) each.

Every test here failed before its fix.  The MFH tests use the MFH backends' own
availability rule; the FBP ones use the ``backend`` fixture of conftest.
"""

from __future__ import annotations

import pytest
import torch

import fbp_kernels
from fbp_kernels import mfh_ops
from conftest import DEVICE, backend_param

M, N, FACTOR, O, ROWS = 5, 4, 2, 3, 3
KO = FACTOR * O

MFH_BACKENDS = [backend_param(n, mfh_ops.unsupported_reason) for n in ("torch", "triton")]


def _tensors(dtype=torch.float64, rows=ROWS, m=M, n=N, bias=True, seed=0, device=DEVICE):
    # Drawn on the CPU (the same values everywhere), then moved to the device the
    # backend fixture runs on (a GPU run has triton/split/cuda only there).
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(
            device=device, dtype=dtype).requires_grad_()

    return (r(rows, m), r(rows, n), r(KO, m), r(KO, n),
            r(KO) if bias else None, r(KO) if bias else None)


# ------------------------------------------------------------------ R1 double backward

def _second_order(fn, x, wx):
    """A gradient penalty: d/dW_x of ||d out / d x||^2."""
    out = fn()
    w = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)
    (gx,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum(), wx)


def test_double_backward_is_refused_with_a_pointer_to_the_reference(backend):
    x, y, wx, wy, bx, by = _tensors()
    with pytest.raises(RuntimeError, match=r"double backward.*fbp_kernels\.reference"):
        _second_order(lambda: fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=FACTOR,
                                              backend=backend), x, wx)


@pytest.mark.parametrize("mfh_backend", MFH_BACKENDS)
def test_mfh_double_backward_is_refused_with_a_pointer_to_the_reference(mfh_backend):
    x, y, wx, wy, bx, by = _tensors()
    with pytest.raises(RuntimeError, match=r"double backward.*fbp_kernels\.reference"):
        _second_order(lambda: fbp_kernels.mfh(x, y, [wx, wx * 0.5], [wy, wy], [bx, None],
                                              None, factor=FACTOR, backend=mfh_backend),
                      x, wx)


def test_compiled_double_backward_is_refused():
    x, y, wx, wy, bx, by = _tensors()
    f = torch.compile(lambda *t: fbp_kernels.fbp(*t, factor=FACTOR, backend="torch"),
                      fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"double backward"):
        _second_order(lambda: f(x, y, wx, wy, bx, by), x, wx)


def test_create_graph_first_order_gradients_still_match():
    # create_graph=True alone (no second backward) must keep giving the right gradients.
    x, y, wx, wy, bx, by = _tensors()
    out = fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=FACTOR, backend="torch")
    got = torch.autograd.grad(out.sum(), (x, wx), create_graph=True)
    ref_out = fbp_kernels.reference.fbp(x, y, wx, wy, bx, by, factor=FACTOR)
    want = torch.autograd.grad(ref_out.sum(), (x, wx))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ R2 eps traced symbolically

def _layer(eps, cls=fbp_kernels.FactorizedBilinearPooling, **kw):
    torch.manual_seed(0)
    return cls(M, N, O, factor=FACTOR, eps=eps, backend="torch", **kw).double()


def _xy():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(ROWS, M, generator=gen, dtype=torch.float64),
            torch.randn(ROWS, N, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("cls", [fbp_kernels.FactorizedBilinearPooling, fbp_kernels.MFH],
                         ids=["fbp", "mfh"])
def test_compile_dynamic_traces_eps(cls):
    layer = _layer(1e-3, cls)
    x, y = _xy()
    got = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")(x, y)
    torch.testing.assert_close(got, layer(x, y), rtol=0, atol=0)


def test_compile_two_layers_with_different_eps():
    a, b = _layer(1e-2), _layer(1e-5)
    x, y = _xy()
    ca = torch.compile(a, fullgraph=True, backend="aot_eager")
    cb = torch.compile(b, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(ca(x, y), a(x, y), rtol=0, atol=0)
    torch.testing.assert_close(cb(x, y), b(x, y), rtol=0, atol=0)
    assert not torch.equal(a(x, y), b(x, y))  # eps really reached the computation


def test_compile_eps_changed_after_compiling():
    layer = _layer(1e-2)
    x, y = _xy()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x, y)
    layer.eps = 1e-5
    torch.testing.assert_close(compiled(x, y), layer(x, y), rtol=0, atol=0)


def test_compile_eps_as_argument():
    x, y = _xy()
    _, _, wx, wy, bx, by = (t.detach() if t is not None else None
                            for t in _tensors(device="cpu"))  # beside _xy's CPU rows

    def f(x, y, eps):
        return fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=FACTOR, eps=eps, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for eps in (1e-2, 1e-4, 1e-6):
        torch.testing.assert_close(compiled(x, y, eps), f(x, y, eps), rtol=0, atol=0)


# ------------------------------------------------------------------ R3 zero rows, every dtype

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _zero_row_problem(dtype, zero_row=1):
    """x row ``zero_row`` all zeros and no bias: every pooled value of that row is 0."""
    x, y, wx, wy, _, _ = (t.detach() if t is not None else None
                          for t in _tensors(torch.float64, bias=False))
    x[zero_row] = 0
    return [t.to(dtype).requires_grad_() for t in (x, y, wx, wy)]


def _check_zero_row_grads(grads, names, x_grad, dtype, zero_row=1):
    for name, g in zip(names, grads):
        assert torch.isfinite(g).all(), f"d{name} not finite in {dtype}"
    # The convention: a degenerate row contributes no gradient at all.
    assert torch.equal(x_grad[zero_row], torch.zeros_like(x_grad[zero_row]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_row_gives_finite_zero_gradient_in_every_dtype(dtype, backend):
    tensors = _zero_row_problem(dtype)
    out = fbp_kernels.fbp(*tensors, factor=FACTOR, backend=backend)
    g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64,
                       device=out.device).view_as(out).to(dtype)
    grads = torch.autograd.grad(out, tensors, g)
    _check_zero_row_grads(grads, ("x", "y", "weight_x", "weight_y"), grads[0], dtype)
    if dtype == torch.float64:
        ref = [t.detach().requires_grad_() for t in tensors]
        want = torch.autograd.grad(fbp_kernels.reference.fbp(*ref, factor=FACTOR), ref, g)
        for got, w in zip(grads, want):
            torch.testing.assert_close(got, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mfh_backend", MFH_BACKENDS)
def test_mfh_zero_row_gives_finite_zero_gradient_in_every_dtype(dtype, mfh_backend):
    x, y, wx, wy = _zero_row_problem(dtype)
    wx2 = (wx.detach() * 0.5).requires_grad_()
    out = fbp_kernels.mfh(x, y, [wx, wx2], [wy, wy], factor=FACTOR, backend=mfh_backend)
    grads = torch.autograd.grad(out, (x, y, wx, wx2, wy), torch.ones_like(out))
    _check_zero_row_grads(grads, ("x", "y", "weights_x[0]", "weights_x[1]", "weights_y"),
                          grads[0], dtype)


def test_reference_zero_row_gradient_is_zero():
    # The specification itself follows the convention (its forward is F.normalize's).
    x, y, wx, wy = _zero_row_problem(torch.float64)
    out = fbp_kernels.reference.fbp(x, y, wx, wy, factor=FACTOR)
    torch.testing.assert_close(out, torch.nn.functional.normalize(
        fbp_kernels.reference.signed_sqrt(fbp_kernels.reference.fbp(
            x, y, wx, wy, factor=FACTOR, normalize=False)), dim=-1), rtol=0, atol=0)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(gx[1], torch.zeros_like(gx[1]))


# ------------------------------------------------------------------ R4 zero-width inputs

def _zero_width(which):
    m, n = (0, N) if which == "m" else (M, 0)
    return _tensors(torch.float64, m=m, n=n)


def _check_against_reference(out, ref_out, inputs, ref_inputs):
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref_out, ref_inputs, g)
    for a, b, t in zip(got, want, inputs):
        assert a.shape == t.shape  # e.g. weight_x's gradient is (factor*o, 0)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("which", ["m", "n"])
def test_zero_width_input_projects_to_the_bias(which, backend):
    tensors = _zero_width(which)
    ref = [t.detach().requires_grad_() for t in tensors]
    out = fbp_kernels.fbp(*tensors, factor=FACTOR, backend=backend)
    _check_against_reference(out, fbp_kernels.reference.fbp(*ref, factor=FACTOR),
                             tensors, ref)


@pytest.mark.parametrize("which", ["m", "n"])
@pytest.mark.parametrize("mfh_backend", MFH_BACKENDS)
def test_mfh_zero_width_input_projects_to_the_bias(which, mfh_backend):
    x, y, wx, wy, bx, by = _zero_width(which)
    tensors = [x, y, wx, wy, bx, by]
    ref = [t.detach().requires_grad_() for t in tensors]

    def run(f, x, y, wx, wy, bx, by, **kw):
        return f(x, y, [wx, wx], [wy, wy], [bx, bx], [by, None], factor=FACTOR, **kw)

    out = run(fbp_kernels.mfh, *tensors, backend=mfh_backend)
    _check_against_reference(out, run(fbp_kernels.reference.mfh, *ref), tensors, ref)


# ------------------------------------------------------------------ R5 overflow-safe norms

def _huge_problem():
    """fp32 products near the top of the range: |a|, |c| up to 1.5e19, a*c up to 2.25e38
    (fp32 max 3.4e38), factor 1, so each pooled value fits but sum(t^2) would not."""
    gen = torch.Generator().manual_seed(5)
    x = torch.tensor([[1.5e19], [-1.5e19], [1.0]], dtype=torch.float64)
    y = torch.tensor([[1.5e19], [1.5e19], [1.5e19]], dtype=torch.float64)
    wx = torch.rand(4, 1, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    wy = torch.rand(4, 1, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    return tuple(t.to(DEVICE) for t in (x, y, wx, wy))


def _check_huge(run):
    x, y, wx, wy = _huge_problem()
    got = [t.float().requires_grad_() for t in (x, y, wx, wy)]
    ref = [t.clone().requires_grad_() for t in (x, y, wx, wy)]
    out, want = run(*got), run(*ref, reference=True)
    # Each output is O(1) and each step is a handful of fp32 roundings: 1e-5 relative.
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=want.device).view_as(want)
    # The weights' gradients are O(1) (z ~ sqrt(w_x w_y) per column); x's and y's are
    # not compared: z does not depend on their scale, so the exact dx is ~0 and fp32
    # gives rounding noise around it.  Intermediates of the backward reach ~1e-39,
    # fp32 subnormals (relative spacing ~1e-6 there): 1e-3 leaves room for that.
    gots = torch.autograd.grad(out, got, g.float())
    for a in gots:
        assert torch.isfinite(a).all()
    for a, b in zip(gots[2:], torch.autograd.grad(want, ref[2:], g)):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-6)


def test_norm_does_not_overflow_near_fp32_max(backend):
    _check_huge(lambda *t, reference=False: (fbp_kernels.reference.fbp(*t, factor=1)
                if reference else fbp_kernels.fbp(*t, factor=1, backend=backend)))


@pytest.mark.parametrize("mfh_backend", MFH_BACKENDS)
def test_mfh_norm_does_not_overflow_near_fp32_max(mfh_backend):
    # Order 1 (a second block would multiply two huge products, which overflows).
    _check_huge(lambda x, y, wx, wy, reference=False: (
        fbp_kernels.reference.mfh(x, y, [wx], [wy], factor=1) if reference
        else fbp_kernels.mfh(x, y, [wx], [wy], factor=1, backend=mfh_backend)))


def test_reference_norm_does_not_overflow_and_is_exact_elsewhere():
    t = torch.tensor([[3e19, 4e19], [3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(fbp_kernels.reference.row_norm(t),
                               torch.tensor([5e19, 5.0, 0.0]), rtol=1e-6, atol=0)
    r = torch.randn(64, 7)
    assert torch.equal(fbp_kernels.reference.row_norm(r), torch.linalg.vector_norm(r, dim=-1))


# ------------------------------------------------------------------ R6 meta device, dropout on

@pytest.mark.parametrize("cls", [fbp_kernels.FactorizedBilinearPooling, fbp_kernels.MFH],
                         ids=["fbp", "mfh"])
def test_meta_forward_with_dropout_gives_the_shape(cls):
    layer = cls(M, N, O, factor=FACTOR, dropout=0.3, device="meta").train()
    out = layer(torch.empty(7, 1, M, device="meta"), torch.empty(ROWS, N, device="meta"))
    width = O * (layer.order if cls is fbp_kernels.MFH else 1)
    assert out.device.type == "meta" and out.shape == (7, ROWS, width)


# ------------------------------------------------------------------ R7 one constructor check

@pytest.mark.parametrize("cls", [fbp_kernels.FactorizedBilinearPooling, fbp_kernels.MFH],
                         ids=["fbp", "mfh"])
@pytest.mark.parametrize("kw, exc, match", [
    (dict(x_features=0), ValueError, r"x_features must be an int >= 1"),
    (dict(x_features=-1), ValueError, r"x_features must be an int >= 1"),
    (dict(x_features=True), TypeError, r"x_features must be an int, got bool"),
    (dict(y_features=2.0), TypeError, r"y_features must be an int, got float"),
    (dict(out_features=0), ValueError, r"out_features must be an int >= 1"),
    (dict(factor=2.0), TypeError, r"factor must be an int, got float"),
    (dict(factor=0), ValueError, r"factor must be an int >= 1"),
    (dict(dropout=1.0), ValueError, r"dropout"),
    (dict(eps=-1.0), ValueError, r"eps"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v))
def test_both_modules_check_their_arguments_alike(cls, kw, exc, match):
    args = dict(x_features=M, y_features=N, out_features=O, factor=FACTOR)
    args.update(kw)
    with pytest.raises(exc, match=match):
        cls(**args)


@pytest.mark.parametrize("order, exc", [(0, ValueError), (True, TypeError), (2.0, TypeError)])
def test_mfh_order_is_checked_like_the_sizes(order, exc):
    with pytest.raises(exc, match="order must be an int"):
        fbp_kernels.MFH(M, N, O, factor=FACTOR, order=order)


def test_from_linear_factor_type_error_alike():
    lin = [torch.nn.Linear(M, KO), torch.nn.Linear(N, KO)]
    with pytest.raises(TypeError, match="factor must be an int"):
        fbp_kernels.FactorizedBilinearPooling.from_linear(*lin, factor=2.0)
    with pytest.raises(TypeError, match="factor must be an int"):
        fbp_kernels.MFH.from_linear([lin[0]], [lin[1]], factor=2.0)


# ------------------------------------------------------------------ R8 the whole 64-bit seed

@pytest.mark.parametrize("high", [2**32, 2**40, 2**61])
def test_torch_backend_mask_depends_on_every_seed_bit(high):
    from fbp_kernels.backends import torch_backend
    shape, rate = (16, 64), 0.5
    for s in (0, 12345, 2**31 + 7):
        a = torch_backend.dropout_mask(s, shape, rate, "cpu")
        b = torch_backend.dropout_mask(s + high, shape, rate, "cpu")
        # Two independent masks of 1024 fair coins agree everywhere with prob. 2^-1024.
        assert not torch.equal(a, b), f"seeds {s} and {s}+{high} give the same mask"
    # Still a pure function of the seed (backward regenerates it).
    assert torch.equal(torch_backend.dropout_mask(99 + high, shape, rate, "cpu"),
                       torch_backend.dropout_mask(99 + high, shape, rate, "cpu"))


# ------------------------------------------------------------------ R9 in-place ops on the output

def _fbp_call(backend, normalize):
    def run(x, y, wx, wy, bx, by, f=None):
        f = f or (lambda *t, **kw: fbp_kernels.fbp(*t, backend=backend, **kw))
        return f(x, y, wx, wy, bx, by, factor=FACTOR, normalize=normalize)
    return run


def _mfh_call(backend, normalize):
    def run(x, y, wx, wy, bx, by, f=None):
        f = f or (lambda *t, **kw: fbp_kernels.mfh(*t, backend=backend, **kw))
        return f(x, y, [wx, wx], [wy, wy], [bx, None], [by, by], factor=FACTOR,
                 normalize=normalize)
    return run


def _inplace_relu_grads(run, reference_run):
    tensors = _tensors()
    out = run(*tensors)
    torch.nn.ReLU(inplace=True)(out)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    got = torch.autograd.grad(out, tensors, g)
    ref = [t.detach().requires_grad_() for t in tensors]
    want = torch.autograd.grad(torch.relu(reference_run(*ref)), ref, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_inplace_op_on_raw_output_is_supported(backend):
    run = _fbp_call(backend, normalize=False)
    _inplace_relu_grads(run, lambda *t: run(*t, f=fbp_kernels.reference.fbp))


@pytest.mark.parametrize("mfh_backend", MFH_BACKENDS)
def test_mfh_inplace_op_on_raw_output_is_supported(mfh_backend):
    run = _mfh_call(mfh_backend, normalize=False)
    _inplace_relu_grads(run, lambda *t: run(*t, f=fbp_kernels.reference.mfh))


@pytest.mark.parametrize("call", ["fbp", "mfh-torch", "mfh-triton"])
def test_inplace_op_on_normalized_output_names_the_cause(call, backend):
    if call != "fbp":
        if backend != "torch":
            pytest.skip("one MFH run per MFH backend is enough")
        backend = call.split("-")[1]
        if mfh_ops.unsupported_reason(backend, DEVICE):
            pytest.skip(f"no MFH backend {backend} here")
    run = (_fbp_call if call == "fbp" else _mfh_call)(backend, normalize=True)
    out = run(*_tensors())
    torch.nn.ReLU(inplace=True)(out)
    with pytest.raises(RuntimeError, match=r"modified in place.*inplace=False"):
        out.sum().backward()


# ------------------------------------------------------------------ R10 errors under torch.compile

def _valid_kwargs():
    # CPU: the refused changes below are CPU tensors, and the calls use backend torch
    x, y, wx, wy, bx, by = (t.detach() for t in _tensors(torch.float32, device="cpu"))
    return dict(x=x, y=y, weight_x=wx, weight_y=wy, bias_x=bx, bias_y=by, factor=FACTOR)


COMPILED_REFUSED = [
    ("factor-0", {"factor": 0}, ValueError, r"factor must be an int >= 1"),
    ("factor-float", {"factor": 2.0}, TypeError, r"factor must be an int"),
    ("x-width", {"x": torch.randn(ROWS, M + 1)}, ValueError, r"x has 6 features"),
    ("y-dtype", {"y": torch.randn(ROWS, N, dtype=torch.float64)}, TypeError, r"one dtype"),
    ("x-not-tensor", {"x": [[1.0] * M] * ROWS}, TypeError, r"x must be a torch.Tensor"),
    ("dropout", {"dropout": 1.5}, ValueError, r"dropout"),
    ("eps", {"eps": -1.0}, ValueError, r"eps must be a finite float > 0"),
    ("backend", {"backend": "nope"}, ValueError, r"backend must be"),
]


@pytest.mark.parametrize("changes,exc,match", [pytest.param(c, e, m, id=i)
                                               for i, c, e, m in COMPILED_REFUSED])
def test_compiled_fbp_keeps_documented_exception_types(changes, exc, match):
    torch._dynamo.reset()
    kw = {**_valid_kwargs(), **changes}
    compiled = torch.compile(lambda kw: fbp_kernels.fbp(**kw), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(exc, match=match):
        compiled(kw)


@pytest.mark.parametrize("changes,exc,match", [
    ({"factor": 0}, ValueError, r"factor must be an int >= 1"),
    ({"x": torch.randn(ROWS, M + 1)}, ValueError, r"x has 6 features.*weights_x\[0\]"),
    ({"weights_y": "w"}, TypeError, r"weights_y must be a list"),
    ({"eps": 0.0}, ValueError, r"eps must be a finite float > 0"),
], ids=["factor", "x-width", "weights-str", "eps"])
def test_compiled_mfh_keeps_documented_exception_types(changes, exc, match):
    torch._dynamo.reset()
    v = _valid_kwargs()
    kw = dict(x=v["x"], y=v["y"], weights_x=[v["weight_x"]] * 2,
              weights_y=[v["weight_y"]] * 2, factor=FACTOR, backend="torch")
    kw.update(changes)
    compiled = torch.compile(lambda kw: fbp_kernels.mfh(**kw), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(exc, match=match):
        compiled(kw)


def test_compiled_module_with_wrong_input_width_raises_value_error():
    torch._dynamo.reset()
    layer = fbp_kernels.FactorizedBilinearPooling(M, N, O, factor=FACTOR, backend="torch")
    head = torch.nn.Linear(O, 2)
    model = torch.compile(lambda x, y: head(layer(x, y)), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"x has 7 features"):
        model(torch.randn(ROWS, 7), torch.randn(ROWS, N))


# ------------------------------------------------------------------ R11 threads and the interpreter

@pytest.mark.parametrize("op", ["fbp", "mfh"])
def test_triton_backend_from_two_threads(op):
    import threading
    from fbp_kernels import backends
    if backends.unsupported_reason("triton", torch.device("cpu")):
        pytest.skip("the Triton interpreter is not on (a GPU run launches natively)")
    x, y, wx, wy, bx, by = (t.detach() for t in _tensors(rows=40, device="cpu"))

    def run():
        if op == "fbp":
            out = fbp_kernels.fbp(x, y, wx, wy, bx, by, factor=FACTOR, backend="triton")
        else:
            out = fbp_kernels.mfh(x, y, [wx, wx], [wy, wy], factor=FACTOR, backend="triton")
        return out

    results, errors = [], []

    def worker():
        try:
            for _ in range(20):
                results.append(run())
        except Exception as exc:  # reported below, with its type
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
    want = run()
    assert len(results) == 40 and all(torch.equal(r, want) for r in results)


# ------------------------------------------------------------------ R12 odd argument kinds

def test_numpy_scalars_are_accepted_as_numbers():
    np = pytest.importorskip("numpy")
    kw = _valid_kwargs()
    want = fbp_kernels.fbp(**kw, dropout=0.1, eps=1e-4, backend="torch")
    got = fbp_kernels.fbp(**kw, dropout=np.float32(0.1), eps=np.float32(1e-4),
                          backend="torch")
    # training=False: dropout is validated but not applied; eps is the same value up
    # to its fp32 rounding (relative 6e-8), which moves outputs far less than 1e-6.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    fbp_kernels.FactorizedBilinearPooling(M, N, O, factor=FACTOR, dropout=np.float64(0.2))
    fbp_kernels.MFH(M, N, O, factor=FACTOR, dropout=np.float32(0.2), eps=np.float32(1e-5))


@pytest.mark.parametrize("which", ["x", "y", "weight_x", "bias_y"])
def test_sparse_tensors_are_refused_at_the_front_end(which, backend):
    kw = _valid_kwargs()
    kw[which] = kw[which].to_sparse()
    with pytest.raises(TypeError, match=rf"{which} must be a dense \(strided\) tensor.*sparse"):
        fbp_kernels.fbp(**kw, backend=backend)


def test_mfh_sparse_input_is_refused():
    kw = _valid_kwargs()
    with pytest.raises(TypeError, match=r"x must be a dense \(strided\) tensor"):
        fbp_kernels.mfh(kw["x"].to_sparse(), kw["y"], [kw["weight_x"]], [kw["weight_y"]],
                        factor=FACTOR)


def _block_sd(out_weight):
    return {"linear0.weight": torch.randn(KO, M), "linear1.weight": torch.randn(KO, N),
            "linear_out.weight": out_weight}


@pytest.mark.parametrize("rate", [-0.5, 1.0, float("nan")])
def test_block_mfb_refuses_bad_dropout_output(rate):
    from fbp_kernels.convert import BlockMFB
    with pytest.raises(ValueError, match=r"dropout_output must be a float in \[0, 1\)"):
        BlockMFB.from_block(_block_sd(torch.randn(2, O)), activ_input=None,
                            normalize=False, activ_output="relu", dropout_output=rate)


def test_block_one_dimensional_linear_out_weight_is_named_as_such():
    from fbp_kernels.convert import from_block_mfb
    with pytest.raises(ValueError, match=r"linear_out.weight must be a 2-D tensor"):
        from_block_mfb(_block_sd(torch.randn(O)), activ_input=None)


# ------------------------------------------------------------------ R13 the docs match the tests

def test_docs_pin_known_problems_only_with_xfails_that_exist():
    """A doc that says a problem is "pinned by xfail" must point at a real xfail; the
    three it described were fixed and their xfails removed, leaving the doc stale."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent
    tests = "".join(p.read_text() for p in (root / "tests").glob("test_*.py")
                    if p.name != "test_robustness.py")
    has_xfail = "mark.xfail" in tests or "pytest.xfail" in tests
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        if not has_xfail:
            assert "xfail" not in text, f"{doc.name} describes xfails, but no test has one"


def test_dropout_while_capturing_a_cuda_graph_is_refused(monkeypatch):
    """The dropout seed is a kernel argument: a captured graph would replay one mask on
    every replay, silently.  So fbp and mfh refuse dropout during stream capture (the
    CPU cannot capture: the capture state is simulated), and run without it or outside
    a capture as before."""
    x, y = torch.randn(4, 6), torch.randn(4, 5)
    wx, wy = torch.randn(3 * 2, 6), torch.randn(3 * 2, 5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for call in (lambda **kw: fbp_kernels.fbp(x, y, wx, wy, factor=3, backend="torch", **kw),
                 lambda **kw: fbp_kernels.mfh(x, y, [wx, wx], [wy, wy], factor=3,
                                              backend="torch", **kw)):
        with pytest.raises(RuntimeError, match="capturing a CUDA graph"):
            call(dropout=0.1, training=True)
        call(dropout=0.1, training=False)  # eval: no mask, nothing to freeze
        call(dropout=0.0, training=True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fbp_kernels.fbp(x, y, wx, wy, factor=3, backend="torch", dropout=0.1, training=True)
