"""Checkpoint converters: openvqa-style and block.bootstrap-style MFB weights.

Each source's forward is re-written inline below (from its published semantics), a
random instance is converted, and the outputs are compared.  Everything runs in
float64 so that the only differences left are the documented ones: the zero-safe
signed square root (bounded by 2 sqrt(o eps / sum|s|) per row) and openvqa's joint
normalisation over regions.
"""

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fbp_kernels import FactorizedBilinearPooling
from fbp_kernels.convert import (BlockMFB, block_state_dict, from_block_mfb,
                                 from_openvqa_mfb, openvqa_state_dict)

DT = torch.float64


def textbook_sqrt(s):
    return torch.sqrt(F.relu(s)) - torch.sqrt(F.relu(-s))


class OpenVQAMFB(nn.Module):
    """openvqa's MFB: proj_i/proj_q, dropout on the product, AvgPool1d(k)*k, textbook
    signed sqrt, L2 over the C*o values of each sample; returns (z, product)."""

    def __init__(self, img_size, ques_size, k, o, dropout=0.1, is_first=True):
        super().__init__()
        self.k, self.o, self.is_first = k, o, is_first
        self.proj_i = nn.Linear(img_size, k * o)
        self.proj_q = nn.Linear(ques_size, k * o)
        self.dropout = nn.Dropout(dropout)
        self.pool = nn.AvgPool1d(k, stride=k)

    def forward(self, img, ques, exp_in=1):
        n = img.shape[0]
        exp_out = self.proj_i(img) * self.proj_q(ques)
        exp_out = self.dropout(exp_out if self.is_first else exp_out * exp_in)
        z = self.pool(exp_out) * self.k
        z = textbook_sqrt(z)
        z = F.normalize(z.view(n, -1))
        return z.view(n, -1, self.o), exp_out


class BlockMFBSource(nn.Module):
    """block.bootstrap's MFB: linear0/linear1 (mm_dim*factor), input activations and
    dropout, product dropout, view(B, mm_dim, factor).sum(2), optional textbook
    normalisation, linear_out, output activation and dropout."""

    def __init__(self, input_dims, output_dim, mm_dim=6, factor=2, activ_input="relu",
                 activ_output="relu", normalize=False, dropout_input=0.0,
                 dropout_pre_norm=0.0, dropout_output=0.0):
        super().__init__()
        self.mm_dim, self.factor = mm_dim, factor
        self.activ_input, self.activ_output, self.normalize = activ_input, activ_output, normalize
        self.dropout_input, self.dropout_pre_norm = dropout_input, dropout_pre_norm
        self.dropout_output = dropout_output
        self.linear0 = nn.Linear(input_dims[0], mm_dim * factor)
        self.linear1 = nn.Linear(input_dims[1], mm_dim * factor)
        self.linear_out = nn.Linear(mm_dim, output_dim)

    def forward(self, x):
        x0, x1 = self.linear0(x[0]), self.linear1(x[1])
        if self.activ_input:
            x0, x1 = getattr(F, self.activ_input)(x0), getattr(F, self.activ_input)(x1)
        if self.dropout_input > 0:
            x0 = F.dropout(x0, p=self.dropout_input, training=self.training)
            x1 = F.dropout(x1, p=self.dropout_input, training=self.training)
        z = x0 * x1
        if self.dropout_pre_norm > 0:
            z = F.dropout(z, p=self.dropout_pre_norm, training=self.training)
        z = z.view(z.size(0), self.mm_dim, self.factor).sum(2)
        self.pooled = z  # kept so the test can evaluate the documented bound
        if self.normalize:
            z = F.normalize(textbook_sqrt(z), p=2)
        z = self.linear_out(z)
        if self.activ_output:
            z = getattr(F, self.activ_output)(z)
        if self.dropout_output > 0:
            z = F.dropout(z, p=self.dropout_output, training=self.training)
        return z


def sqrt_bound(s, eps):
    """The documented per-row bound ||z_textbook - z|| <= 2 sqrt(o eps / sum|s|)."""
    o = s.shape[-1]
    return 2 * torch.sqrt(o * eps / s.abs().sum(-1))


# ------------------------------------------------------------------------- openvqa

def openvqa_pooled(src, img, ques):
    return (src.proj_i(img) * src.proj_q(ques)).view(*torch.broadcast_shapes(
        img.shape[:-1], ques.shape[:-1]), src.o, src.k).sum(-1)


@pytest.mark.parametrize("eps", [1e-6, 1e-14])
def test_openvqa_matches_final_fusion(eps):
    # CoAtt's final MFB: (N, 1, m) x (N, 1, n): one row per sample, so per-row and
    # per-sample normalisation coincide and only the signed sqrt differs.
    src = OpenVQAMFB(7, 5, k=5, o=4).to(DT).eval()
    img, ques = torch.randn(6, 1, 7, dtype=DT), torch.randn(6, 1, 5, dtype=DT)
    want, _ = src(img, ques)
    layer = from_openvqa_mfb(src, eps=eps)
    assert (layer.factor, layer.out_features, layer.dropout) == (5, 4, 0.1)
    got = layer.eval()(img, ques)
    assert got.shape == want.shape == (6, 1, 4)
    diff = (got - want).norm(dim=-1)
    bound = sqrt_bound(openvqa_pooled(src, img, ques), eps)
    assert (diff <= bound).all(), (diff, bound)
    if eps == 1e-14:  # tiny smoothing: the textbook forward up to ~1e-6
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:  # the default smoothing is visible, i.e. the bound is not vacuous
        assert diff.max() > 1e-6


def test_openvqa_refuses_mfh_stage_and_contradictions():
    with pytest.raises(ValueError, match="is_first"):
        from_openvqa_mfb(OpenVQAMFB(4, 3, k=2, o=3, is_first=False))
    src = OpenVQAMFB(4, 3, k=2, o=3)
    with pytest.raises(ValueError, match="factor=3 contradicts"):
        from_openvqa_mfb(src, 3)
    with pytest.raises(ValueError, match="dropout=0.5 contradicts"):
        from_openvqa_mfb(src, dropout=0.5)


def test_openvqa_copies_weights_and_keeps_dtype():
    src = OpenVQAMFB(4, 3, k=2, o=3)
    layer = from_openvqa_mfb(src)
    assert layer.proj_x.weight.dtype == torch.float32
    assert torch.equal(layer.proj_x.weight, src.proj_i.weight)
    assert torch.equal(layer.proj_y.bias, src.proj_q.bias)
    # A copy, not an alias: training the converted layer leaves the source alone.
    assert layer.proj_x.weight.data_ptr() != src.proj_i.weight.data_ptr()


def test_openvqa_state_dict_loads_into_existing_layer():
    src = OpenVQAMFB(4, 3, k=2, o=3)
    layer = FactorizedBilinearPooling(4, 3, 3, factor=2)
    layer.load_state_dict(openvqa_state_dict(src))
    assert torch.equal(layer.proj_y.weight, src.proj_q.weight)


def test_openvqa_training_dropout_is_on_the_product():
    # Same rate, same place: with dropout 0.5 the layer's training output differs from
    # its eval output, and keep-probability scaling keeps E[s] unchanged (checked on
    # normalize=False output averaged over many draws).
    src = OpenVQAMFB(3, 3, k=2, o=2, dropout=0.5).to(DT)
    layer = from_openvqa_mfb(src).train()
    layer.normalize = False
    img, ques = torch.randn(1, 3, dtype=DT), torch.randn(1, 3, dtype=DT)
    draws = torch.stack([layer(img, ques) for _ in range(4000)])
    exact = openvqa_pooled(src, img, ques)
    assert not torch.equal(draws[0], draws[1])
    # Each pooled value is a sum of 2 terms kept w.p. 1/2 and doubled: the std of one
    # draw is sqrt(sum p_i^2); the mean of 4000 draws is within 5 standard errors.
    stderr = (src.proj_i(img) * src.proj_q(ques)).view(2, 2).pow(2).sum(-1).sqrt() / math.sqrt(4000)
    assert ((draws.mean(0) - exact).abs() <= 5 * stderr + 1e-12).all()


# ------------------------------------------------------------------------- block

def test_block_unnormalised_is_exact():
    src = BlockMFBSource([5, 4], 3, mm_dim=6, factor=2, activ_input=None).to(DT).eval()
    x0, x1 = torch.randn(7, 5, dtype=DT), torch.randn(7, 4, dtype=DT)
    src([x0, x1])
    layer = from_block_mfb(src)
    assert (layer.factor, layer.out_features, layer.normalize) == (2, 6, False)
    torch.testing.assert_close(layer.eval()(x0, x1), src.pooled, atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("activ_output", ["relu", None])
def test_block_whole_module_with_normalisation(activ_output):
    src = BlockMFBSource([5, 4], 3, mm_dim=6, factor=3, activ_input=None,
                         activ_output=activ_output, normalize=True).to(DT).eval()
    x0, x1 = torch.randn(7, 5, dtype=DT), torch.randn(7, 4, dtype=DT)
    want = src([x0, x1])
    for eps, tol in ((1e-6, None), (1e-14, 1e-5)):
        drop_in = BlockMFB.from_block(src, eps=eps).eval()
        got = drop_in([x0, x1])
        assert got.shape == want.shape == (7, 3)
        if tol is not None:
            torch.testing.assert_close(got, want, atol=tol, rtol=0)
        # The fusion alone obeys the documented bound against the textbook form.
        z_ref = F.normalize(textbook_sqrt(src.pooled), p=2)
        diff = (drop_in.fusion(x0, x1) - z_ref).norm(dim=-1)
        assert (diff <= sqrt_bound(src.pooled, eps)).all()


def test_block_dropout_pre_norm_maps_to_dropout():
    src = BlockMFBSource([3, 3], 2, activ_input=None, dropout_pre_norm=0.2)
    assert from_block_mfb(src).dropout == 0.2


def test_block_mfh_checkpoint_is_rejected_by_name():
    sd = {"linear0_0.weight": torch.zeros(4, 3), "linear1_0.weight": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match="no 'linear0.weight'.*linear0_0.weight"):
        from_block_mfb(sd, 2, activ_input=None, normalize=False)


def test_source_type_errors():
    with pytest.raises(TypeError, match="source"):
        from_block_mfb([torch.zeros(2, 2)], 1)
    with pytest.raises(TypeError, match="factor"):
        from_openvqa_mfb(OpenVQAMFB(3, 3, 2, 2).state_dict(), 2.0)
    with pytest.raises(ValueError, match="factor"):
        from_openvqa_mfb(OpenVQAMFB(3, 3, 2, 3).state_dict(), 4)
    sd = OpenVQAMFB(3, 3, 2, 2).state_dict()
    sd["proj_q.weight"], sd["proj_q.bias"] = torch.zeros(6, 3), torch.zeros(6)
    with pytest.raises(ValueError, match="proj_i and proj_q"):
        from_openvqa_mfb(sd, 2)
    with pytest.raises(ValueError, match="eps"):
        from_openvqa_mfb(OpenVQAMFB(3, 3, 2, 2), eps=0.0)


# ------------------------------------------------------------------------- checkpoints

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fusion = FactorizedBilinearPooling(5, 4, 3, factor=2)
        self.head = nn.Linear(3, 2)

    def forward(self, x, y):
        return self.head(self.fusion(x, y))


def test_state_dict_round_trip_through_torch_save():
    model, other = Model().eval(), Model().eval()
    x, y = torch.randn(3, 5), torch.randn(3, 4)
    assert not torch.equal(model(x, y), other(x, y))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert set(model.state_dict()) == {"fusion.proj_x.weight", "fusion.proj_x.bias",
                                       "fusion.proj_y.weight", "fusion.proj_y.bias",
                                       "head.weight", "head.bias"}
    assert torch.equal(model(x, y), other(x, y))


def test_block_drop_in_state_dict_round_trip():
    src = BlockMFBSource([5, 4], 3, activ_input=None).eval()
    a = BlockMFB.from_block(src).eval()
    b = BlockMFB.from_block(BlockMFBSource([5, 4], 3, activ_input=None)).eval()
    b.load_state_dict(a.state_dict())
    x = [torch.randn(2, 5), torch.randn(2, 4)]
    assert torch.equal(a(x), b(x))
    with pytest.raises(TypeError, match="sequence"):
        a(x[0])


# ------------------------------------------------------------------------- issue 13

def grads(out, g, tensors):
    return torch.autograd.grad((out * g).sum(), tensors)


def assert_grads_close(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


def test_openvqa_from_state_dict_needs_factor():
    src = OpenVQAMFB(4, 3, k=2, o=3).to(DT)
    sd = {"mfb." + k: v for k, v in src.state_dict().items()}
    with pytest.raises(ValueError, match="factor"):
        from_openvqa_mfb(sd, prefix="mfb.")
    layer = from_openvqa_mfb(sd, 2, prefix="mfb.", eps=1e-12)
    assert layer.training  # a state dict has no train/eval state: PyTorch's default
    img, ques = torch.randn(3, 5, 4, dtype=DT), torch.randn(3, 1, 3, dtype=DT)
    want, _ = src.eval()(img, ques)
    torch.testing.assert_close(layer.eval()(img, ques), want, atol=1e-5, rtol=0)
    assert layer.dropout == 0.1  # openvqa's default rate when the state dict cannot say
    # 2-D inputs: openvqa normalises each row, which is norm_dims=1.
    img2, ques2 = torch.randn(3, 4, dtype=DT), torch.randn(3, 3, dtype=DT)
    want2, _ = src(img2, ques2)
    row = from_openvqa_mfb(sd, 2, prefix="mfb.", eps=1e-12, norm_dims=1).eval()
    torch.testing.assert_close(row(img2, ques2), want2.view(3, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("regions", [1, 5])
def test_openvqa_joint_normalisation_forward_and_gradients(regions):
    # IAtt's MFB: the C regions of a sample are normalised together (norm_dims=2).
    src = OpenVQAMFB(6, 4, k=3, o=2).to(DT).eval()
    layer = from_openvqa_mfb(src, eps=1e-12)
    assert not layer.training and layer.norm_dims == 2  # inherits eval()
    img = torch.randn(2, regions, 6, dtype=DT, requires_grad=True)
    ques = torch.randn(2, 1, 4, dtype=DT, requires_grad=True)
    want, _ = src(img, ques)
    got = layer(img, ques)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    g = torch.randn_like(want)
    assert_grads_close(grads(got, g, [img, ques, layer.proj_x.weight]),
                       grads(want, g, [img, ques, src.proj_i.weight]))
    if regions > 1:  # per-row normalisation really is different here
        per_row = from_openvqa_mfb(src, norm_dims=1, eps=1e-12)(img, ques)
        assert (per_row - want).abs().max() > 0.1


class CoAttMFH(nn.Module):
    """openvqa's CoAtt with HIGH_ORDER: mfh1 (is_first) feeds its product to mfh2."""

    def __init__(self, m=6, n=4, k=3, o=2, dropout=0.1):
        super().__init__()
        self.dropout = nn.Dropout(0.5)  # a model-level rate the converter must not read
        self.mfh1 = OpenVQAMFB(m, n, k, o, dropout, is_first=True)
        self.mfh2 = OpenVQAMFB(m, n, k, o, dropout, is_first=False)

    def forward(self, img, ques):
        z1, exp1 = self.mfh1(img.unsqueeze(1), ques.unsqueeze(1))
        z2, _ = self.mfh2(img.unsqueeze(1), ques.unsqueeze(1), exp1)
        return torch.cat((z1.squeeze(1), z2.squeeze(1)), 1)


def test_openvqa_mfh_cascade_forward_and_gradients():
    from fbp_kernels import MultimodalFactorizedHighOrderPooling
    from fbp_kernels.convert import from_openvqa_mfh
    net = CoAttMFH().to(DT).eval()
    layer = from_openvqa_mfh([net.mfh1, net.mfh2], eps=1e-12)
    assert isinstance(layer, MultimodalFactorizedHighOrderPooling)
    assert (layer.order, layer.factor, layer.dropout, layer.training) == (2, 3, 0.1, False)
    img = torch.randn(5, 6, dtype=DT, requires_grad=True)
    ques = torch.randn(5, 4, dtype=DT, requires_grad=True)
    want = net(img, ques)
    got = layer(img.unsqueeze(1), ques.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    g = torch.randn_like(want)
    assert_grads_close(grads(got, g, [img, ques, layer.proj_y[1].weight]),
                       grads(want, g, [img, ques, net.mfh2.proj_q.weight]))
    # State dicts with prefixes: factor required, then the same layer.
    sd = net.state_dict()
    with pytest.raises(ValueError, match="factor is required"):
        from_openvqa_mfh([sd, sd], prefixes=["mfh1.", "mfh2."])
    layer2 = from_openvqa_mfh([sd, sd], 3, prefixes=["mfh1.", "mfh2."], eps=1e-12).eval()
    torch.testing.assert_close(layer2(img.unsqueeze(1), ques.unsqueeze(1)).squeeze(1), want,
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="is_first"):
        from_openvqa_mfh([net.mfh2, net.mfh1])
    with pytest.raises(TypeError, match="stages must be a list"):
        from_openvqa_mfh(net.mfh1)


def test_openvqa_options_come_from_the_submodule():
    net = CoAttMFH()
    # A module plus a prefix: the MFB's dropout (0.1), not the model's (0.5).
    assert from_openvqa_mfb(net, prefix="mfh1.").dropout == 0.1
    with pytest.raises(ValueError, match="prefix='nope.' names no submodule"):
        from_openvqa_mfb(net, prefix="nope.")


def test_openvqa_mfh_stage_two_refused_in_every_form():
    net = CoAttMFH()
    with pytest.raises(ValueError, match="is_first=False"):
        from_openvqa_mfb(net, prefix="mfh2.")
    with pytest.raises(ValueError, match="stage 'mfh2'.*from_openvqa_mfh"):
        from_openvqa_mfb(net.state_dict(), 2, prefix="mfh2.")
    with pytest.raises(ValueError, match="no 'proj_i.weight'"):
        from_openvqa_mfb(net.state_dict(), 2)  # whole MFH net, no prefix


def test_block_state_dict_options():
    src = BlockMFBSource([5, 4], 3, mm_dim=6, factor=2, activ_input=None).to(DT)
    sd = src.state_dict()
    # A bare state dict does not record activ_input or normalize: both are required.
    with pytest.raises(ValueError, match="activ_input is required"):
        from_block_mfb(sd, normalize=False)
    with pytest.raises(ValueError, match="normalize is required"):
        from_block_mfb(sd, activ_input=None)
    with pytest.raises(ValueError, match="activ_output is required"):
        BlockMFB.from_block(sd, activ_input=None, normalize=False)
    kw = dict(activ_input=None, normalize=False)
    layer = from_block_mfb(sd, **kw)  # factor inferred from linear_out
    assert (layer.factor, layer.out_features) == (2, 6)
    del sd["linear_out.weight"], sd["linear_out.bias"]
    with pytest.raises(ValueError, match="factor is required"):
        from_block_mfb(sd, **kw)
    assert from_block_mfb(sd, 4, **kw).out_features == 3
    with pytest.raises(ValueError, match="mm_dim=5 and factor=2"):
        from_block_mfb(sd, 2, mm_dim=5, **kw)


@pytest.mark.parametrize("activ", ["relu", "tanh", None])
@pytest.mark.parametrize("normalize", [False, True])
def test_block_activations_forward_and_gradients(activ, normalize):
    src = BlockMFBSource([5, 4], 3, mm_dim=6, factor=3, activ_input=activ,
                         normalize=normalize).to(DT).eval()
    x0 = torch.randn(7, 5, dtype=DT, requires_grad=True)
    x1 = torch.randn(7, 4, dtype=DT, requires_grad=True)
    want = src([x0, x1])
    drop_in = BlockMFB.from_block(src, eps=1e-12)
    assert not drop_in.training and drop_in.fusion.activation == activ
    got = drop_in([x0, x1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    g = torch.randn_like(want)
    assert_grads_close(grads(got, g, [x0, x1, drop_in.fusion.proj_x.weight]),
                       grads(want, g, [x0, x1, src.linear0.weight]))


def test_block_refusals():
    with pytest.raises(ValueError, match="activ_input='sigmoid'"):
        from_block_mfb(BlockMFBSource([3, 3], 2, activ_input="sigmoid"))
    src = BlockMFBSource([3, 3], 2, activ_input=None, dropout_input=0.1)
    with pytest.raises(ValueError, match="strict=False"):
        from_block_mfb(src)
    with pytest.warns(UserWarning, match="dropout_input"):
        layer = from_block_mfb(src, strict=False)
    x0, x1 = torch.randn(4, 3), torch.randn(4, 3)
    src.eval()([x0, x1])
    torch.testing.assert_close(layer.eval()(x0, x1), src.pooled)  # eval is unaffected
    with pytest.raises(ValueError, match="normalize=True contradicts"):
        from_block_mfb(BlockMFBSource([3, 3], 2, activ_input=None), normalize=True)


class BlockMFHSource(nn.Module):
    """block.bootstrap's MFH: two MFB blocks, the second multiplied by the first's
    (dropped) product, each pooled and optionally normalised; concat -> linear_out."""

    def __init__(self, input_dims, output_dim, mm_dim=4, factor=2, activ_input="relu",
                 activ_output="relu", normalize=False, dropout_input=0.0,
                 dropout_pre_lin=0.0, dropout_output=0.0):
        super().__init__()
        self.mm_dim, self.factor = mm_dim, factor
        self.activ_input, self.activ_output, self.normalize = activ_input, activ_output, normalize
        self.dropout_input, self.dropout_pre_lin = dropout_input, dropout_pre_lin
        self.dropout_output = dropout_output
        for b in (0, 1):
            setattr(self, f"linear0_{b}", nn.Linear(input_dims[0], mm_dim * factor))
            setattr(self, f"linear1_{b}", nn.Linear(input_dims[1], mm_dim * factor))
        self.linear_out = nn.Linear(2 * mm_dim, output_dim)

    def forward(self, x):
        zs, prev = [], None
        for b in (0, 1):
            a, c = getattr(self, f"linear0_{b}")(x[0]), getattr(self, f"linear1_{b}")(x[1])
            if self.activ_input:
                a, c = getattr(F, self.activ_input)(a), getattr(F, self.activ_input)(c)
            p = a * c if prev is None else a * c * prev
            if self.dropout_pre_lin > 0:
                p = F.dropout(p, p=self.dropout_pre_lin, training=self.training)
            prev = p
            s = p.view(p.size(0), self.mm_dim, self.factor).sum(2)
            if self.normalize:
                s = F.normalize(textbook_sqrt(s), p=2)
            zs.append(s)
        z = self.linear_out(torch.cat(zs, 1))
        if self.activ_output:
            z = getattr(F, self.activ_output)(z)
        return z


@pytest.mark.parametrize("activ,normalize", [("relu", True), ("tanh", False), (None, True)])
def test_block_mfh_forward_and_gradients(activ, normalize):
    from fbp_kernels.convert import BlockMFH, from_block_mfh
    src = BlockMFHSource([5, 4], 3, mm_dim=4, factor=3, activ_input=activ,
                         normalize=normalize, dropout_pre_lin=0.2).to(DT).eval()
    x0 = torch.randn(6, 5, dtype=DT, requires_grad=True)
    x1 = torch.randn(6, 4, dtype=DT, requires_grad=True)
    want = src([x0, x1])
    drop_in = from_block_mfh(src, eps=1e-12)
    assert isinstance(drop_in, BlockMFH) and not drop_in.training
    assert (drop_in.fusion.order, drop_in.fusion.factor, drop_in.fusion.dropout) == (2, 3, 0.2)
    got = drop_in([x0, x1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    g = torch.randn_like(want)
    assert_grads_close(grads(got, g, [x0, x1, drop_in.fusion.proj_x[1].weight]),
                       grads(want, g, [x0, x1, src.linear0_1.weight]))
    sd = src.state_dict()
    with pytest.raises(ValueError, match="activ_input is required"):
        from_block_mfh(sd, normalize=normalize, activ_output="relu")
    again = from_block_mfh(sd, activ_input=activ, normalize=normalize, activ_output="relu",
                           eps=1e-12).eval()
    assert again.fusion.factor == 3  # inferred: linear_out takes 2 * mm_dim
    torch.testing.assert_close(again([x0, x1]), want, atol=1e-5, rtol=0)


class MmfMFHSource(nn.Module):
    """mmf's layers.MFH: per stage lc_image/lc_ques, dropout on the product, times the
    previous stage's product, sum-pool, textbook sqrt, L2 over all regions of a sample."""

    def __init__(self, i_dim, q_dim, hidden_sizes=(6, 6), pool_size=3, dropout=0.1):
        super().__init__()
        self.order, self.pool_size = len(hidden_sizes), pool_size
        self.mfb_expand_list = nn.ModuleList()
        for h in hidden_sizes:
            stage = nn.Module()
            stage.lc_image, stage.lc_ques = nn.Linear(i_dim, h), nn.Linear(q_dim, h)
            stage.dropout = nn.Dropout(dropout)
            self.mfb_expand_list.append(stage)

    def forward(self, img, q):
        if img.dim() == 3:
            q = q.unsqueeze(1)
        out, prev = [], 1
        for stage in self.mfb_expand_list:
            e = stage.dropout(stage.lc_image(img) * stage.lc_ques(q)) * prev
            prev = e
            s = e.view(*e.shape[:-1], -1, self.pool_size).sum(-1)
            n = s.shape[0]
            out.append(F.normalize(textbook_sqrt(s).reshape(n, -1)).view_as(s))
        return torch.cat(out, -1)


@pytest.mark.parametrize("regions", [None, 4])
def test_mmf_mfh_joint_normalisation(regions):
    from fbp_kernels.convert import MmfMFH, from_mmf_mfh
    src = MmfMFHSource(5, 4).to(DT).eval()
    shape = (3, 5) if regions is None else (3, regions, 5)
    img = torch.randn(*shape, dtype=DT, requires_grad=True)
    q = torch.randn(3, 4, dtype=DT, requires_grad=True)
    want = src(img, q)
    layer = from_mmf_mfh(src, eps=1e-12)
    assert isinstance(layer, MmfMFH) and not layer.training and layer.out_dim == 4
    got = layer(img, q)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    g = torch.randn_like(want)
    assert_grads_close(grads(got, g, [img, q]), grads(want, g, [img, q]))
    with pytest.raises(ValueError, match="pool_size is required"):
        from_mmf_mfh(src.state_dict(), dropout=0.1)
    with pytest.raises(ValueError, match="hidden_sizes=\\[6, 9\\]"):
        from_mmf_mfh(MmfMFHSource(5, 4, hidden_sizes=(6, 9)))


def test_from_linear_accepts_1x1_conv_sharing_parameters():
    from fbp_kernels.convert import from_linear
    cx, cy = nn.Conv2d(5, 6, 1).to(DT), nn.Conv2d(4, 6, 1).to(DT)
    layer = from_linear(cx, cy, 3, eps=1e-12).eval()
    # The parameters ARE the conv's: one set, gradients land on conv.weight.
    assert {id(p) for p in layer.parameters()} == {id(p) for p in (cx.weight, cx.bias,
                                                                   cy.weight, cy.bias)}
    x, y = torch.randn(2, 5, 3, 1, dtype=DT), torch.randn(2, 4, 3, 1, dtype=DT)
    p = (cx(x) * cy(y)).permute(0, 2, 3, 1)  # (N, H, W, 6): channels last
    s = p.reshape(2, 3, 1, 2, 3).sum(-1)
    want = F.normalize(textbook_sqrt(s), dim=-1)
    got = layer(x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got.sum().backward()
    assert cx.weight.grad is not None and cx.weight.grad.shape == (6, 5, 1, 1)
    with pytest.raises(ValueError, match="kernel_size"):
        from_linear(nn.Conv2d(5, 6, 3), cy, 3)
    with pytest.raises(TypeError, match="nn.Linear or a 1x1 nn.Conv2d"):
        from_linear(nn.Conv1d(5, 6, 1), cy, 3)


def test_block_mfh_training_dropout_is_on_each_product():
    # dropout_pre_lin acts on p_0 and on p_1 = a_1 c_1 p_0, as in block: both pooled
    # blocks stay unbiased (the mean of many draws is the eval value) while single
    # draws differ.
    from fbp_kernels.convert import from_block_mfh
    torch.manual_seed(0)
    src = BlockMFHSource([3, 3], 2, mm_dim=2, factor=2, activ_input=None,
                         dropout_pre_lin=0.5).to(DT)
    layer = from_block_mfh(src).fusion
    layer.normalize = False
    x0, x1 = torch.randn(1, 3, dtype=DT), torch.randn(1, 3, dtype=DT)
    exact = layer.eval()(x0, x1)
    layer.train()
    draws = torch.stack([layer(x0, x1) for _ in range(4000)])
    assert not torch.equal(draws[0], draws[1])
    stderr = draws.std(0) / math.sqrt(4000)
    assert ((draws.mean(0) - exact).abs() <= 6 * stderr + 1e-12).all()


def test_converter_default_eps_meets_fp32_fidelity():
    # Issue 13 item 5: with its default eps a converted layer reproduces the source's
    # forward within 1e-5 relative in fp32 for typical inputs (nn.Linear initialisation,
    # unit-variance features, the MFB default widths scaled down), and its gradient at
    # an all-zero row stays finite.  The source here is openvqa's MFB forward written
    # from its semantics: textbook signed sqrt, joint L2 over the regions.
    import torch.nn.functional as F
    from fbp_kernels.convert import CONVERT_EPS, from_openvqa_mfb

    torch.manual_seed(0)
    m, n, k, o, N, C = 256, 128, 5, 200, 4, 10
    src = nn.Module()
    src.proj_i, src.proj_q = nn.Linear(m, k * o), nn.Linear(n, k * o)
    src.dropout = nn.Dropout(0.1)
    src.pool = nn.AvgPool1d(k, stride=k)
    src.is_first = True
    src.eval()
    img, ques = torch.randn(N, C, m), torch.randn(N, 1, n)
    s = (src.proj_i(img) * src.proj_q(ques)).view(N, C, o, k).sum(-1)
    t = torch.sqrt(F.relu(s)) - torch.sqrt(F.relu(-s))
    want = F.normalize(t.reshape(N, -1)).view(N, C, o)
    fused = from_openvqa_mfb(src, 5)
    assert fused.eps == CONVERT_EPS
    got = fused(img, ques)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel
    # The same layer at the training default eps = 1e-6 is ~1e-3 away: the bound is real.
    loose = from_openvqa_mfb(src, 5, eps=1e-6)(img, ques)
    assert ((loose - want).norm() / want.norm()).item() > 1e-4
    # Finite gradients at an exactly-zero row (no bias, zero input) with that eps.
    from fbp_kernels import fbp

    x = torch.randn(2, m)
    x[0] = 0
    x.requires_grad_(True)
    w = src.proj_i.weight.detach().clone().requires_grad_(True)
    out = fbp(x, torch.randn(2, n), w, src.proj_q.weight.detach(), factor=5, eps=CONVERT_EPS)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
