"""The nn.Module: drop-in for a textbook MFB layer, from_linear, repr, state_dict."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbp_kernels
from fbp_kernels import FactorizedBilinearPooling, reference
from helpers import assert_close


class TextbookMFB(nn.Module):
    """MFB as public code writes it (openvqa-like, without dropout)."""

    def __init__(self, m, n, o, k):
        super().__init__()
        self.k, self.o = k, o
        self.proj_i = nn.Linear(m, k * o)
        self.proj_q = nn.Linear(n, k * o)

    def forward(self, x, y):
        p = self.proj_i(x) * self.proj_q(y)
        s = p.view(*p.shape[:-1], self.o, self.k).sum(-1)
        t = torch.sqrt(F.relu(s)) - torch.sqrt(F.relu(-s))
        return F.normalize(t, dim=-1)


def test_drop_in_for_textbook_mfb(backend, device):
    torch.manual_seed(0)
    mfb = TextbookMFB(12, 10, 6, 5).double().to(device)
    x = torch.randn(7, 12, dtype=torch.float64, device=device)
    y = torch.randn(7, 10, dtype=torch.float64, device=device)
    want = mfb(x, y)
    # A tiny eps reproduces the textbook forward to within sqrt(eps)-sized terms.
    ours = FactorizedBilinearPooling.from_linear(mfb.proj_i, mfb.proj_q, factor=5, eps=1e-14,
                                                 backend=backend)
    assert_close(ours(x, y), want, atol=1e-6, rtol=1e-5, name="eps=1e-14")
    # The default eps stays within the documented bound:
    # ||z - z_tb|| <= 2 sqrt(o * eps) / ||t_tb|| per row.
    default = FactorizedBilinearPooling.from_linear(mfb.proj_i, mfb.proj_q, factor=5,
                                                    backend=backend)
    p = mfb.proj_i(x) * mfb.proj_q(y)
    t_tb = reference.textbook_signed_sqrt(p.view(7, 6, 5).sum(-1))
    bound = 2 * math.sqrt(6 * fbp_kernels.DEFAULT_EPS) / t_tb.norm(dim=-1)
    diff = (default(x, y) - want).norm(dim=-1)
    assert (diff <= bound).all() and (diff > 0).any()


def test_from_linear_shares_parameters():
    px, py = nn.Linear(8, 12), nn.Linear(6, 12)
    layer = FactorizedBilinearPooling.from_linear(px, py, factor=3)
    assert layer.proj_x is px and layer.proj_y is py
    assert layer.proj_x.weight.data_ptr() == px.weight.data_ptr()
    assert layer.out_features == 4
    out = layer(torch.randn(2, 8), torch.randn(2, 6))
    out.sum().backward()
    assert px.weight.grad is not None and py.bias.grad is not None


@pytest.mark.parametrize("bad", [dict(factor=5), dict(factor=0)])
def test_from_linear_rejects_bad_factor(bad):
    with pytest.raises(ValueError, match="factor"):
        FactorizedBilinearPooling.from_linear(nn.Linear(8, 12), nn.Linear(6, 12), **bad)


def test_from_linear_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="out_features"):
        FactorizedBilinearPooling.from_linear(nn.Linear(8, 12), nn.Linear(6, 15), factor=3)


def test_module_matches_functional_and_reference():
    layer = FactorizedBilinearPooling(9, 7, 4, factor=3).double()
    x, y = torch.randn(3, 5, 9, dtype=torch.float64), torch.randn(3, 1, 7, dtype=torch.float64)
    want = reference.fbp(x, y, layer.proj_x.weight, layer.proj_y.weight, layer.proj_x.bias,
                         layer.proj_y.bias, factor=3)
    assert layer(x, y).shape == (3, 5, 4)
    assert_close(layer(x, y), want, atol=1e-12, rtol=1e-10)


def test_extra_repr_and_state_dict_roundtrip():
    layer = FactorizedBilinearPooling(9, 7, 4, factor=3, dropout=0.1)
    text = repr(layer)
    for piece in ("x_features=9", "y_features=7", "out_features=4", "factor=3", "dropout=0.1",
                  "proj_x", "proj_y"):
        assert piece in text, text
    clone = FactorizedBilinearPooling(9, 7, 4, factor=3, dropout=0.1)
    clone.load_state_dict(layer.state_dict())
    x, y = torch.randn(2, 9), torch.randn(2, 7)
    layer.eval(), clone.eval()
    assert torch.equal(layer(x, y), clone(x, y))
    assert set(layer.state_dict()) == {"proj_x.weight", "proj_x.bias", "proj_y.weight",
                                       "proj_y.bias"}


def test_module_dropout_follows_train_and_eval():
    layer = FactorizedBilinearPooling(9, 7, 4, factor=3, dropout=0.5)
    x, y = torch.randn(6, 9), torch.randn(6, 7)
    layer.eval()
    assert torch.equal(layer(x, y), layer(x, y))
    layer.train()
    assert not torch.equal(layer(x, y), layer(x, y))


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError, match="factor"):
        FactorizedBilinearPooling(4, 4, 4, factor=0)
    with pytest.raises(ValueError, match="out_features"):
        FactorizedBilinearPooling(4, 4, 0)
