"""swap_fusions: small models built like the peers' (openvqa IAtt/CoAtt, block.bootstrap
MFB/MFH, mmf layers.MFH), swapped in place; forward and gradients compared in float64
with a tiny eps so the zero-safe signed sqrt is negligible."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fbp_kernels.convert import (BlockMFB, BlockMFH, MmfMFH, OpenVQAMFB, SwapRecord,
                                 swap_fusions)
from test_convert import (BlockMFBSource, BlockMFHSource, CoAttMFH, MmfMFHSource,
                          OpenVQAMFB as OpenVQASource)

DT = torch.float64


class IAttNet(nn.Module):
    """openvqa IAtt-like: region-wise MFB, call site unpacks (z, _), attention over
    regions; then a block MFB, a block MFH and an mmf MFH on the attended feature."""

    def __init__(self):
        super().__init__()
        self.mfb = OpenVQASource(6, 4, k=3, o=2)
        self.att = nn.Linear(2, 1)
        self.block_mfb = BlockMFBSource([6, 4], 3, mm_dim=4, factor=2, activ_input="relu",
                                        normalize=True)
        self.block_mfh = BlockMFHSource([6, 4], 3, mm_dim=4, factor=2, activ_input="tanh")
        self.mmf_mfh = MmfMFHSource(6, 4)

    def forward(self, img, q):
        z, _ = self.mfb(img, q.unsqueeze(1))           # (N, C, o), joint norm over C
        w = F.softmax(self.att(z), dim=1)              # (N, C, 1)
        v = (w * img).sum(1)                           # (N, 6)
        return torch.cat([self.block_mfb([v, q]), self.block_mfh([v, q]),
                          self.mmf_mfh(img, q).flatten(1)], 1)


def compare(model, inputs):
    model = model.to(DT).eval()
    want = model(*inputs)
    g = torch.randn_like(want)
    params = list(model.parameters())
    gw = torch.autograd.grad((want * g).sum(), list(inputs) + params)
    report = swap_fusions(model, eps=1e-12)
    # Shared, not copied: the swapped model holds exactly the same parameter tensors.
    assert {id(p) for p in model.parameters()} == {id(p) for p in params}
    got = model(*inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    gg = torch.autograd.grad((got * g).sum(), list(inputs) + params)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return report


def test_swap_every_peer_forward_and_gradients():
    torch.manual_seed(0)
    model = IAttNet()
    img = torch.randn(3, 5, 6, dtype=DT, requires_grad=True)
    q = torch.randn(3, 4, dtype=DT, requires_grad=True)
    report = compare(model, (img, q))
    assert [(r.name, r.kind, r.replaced) for r in report] == [
        ("mfb", "openvqa.MFB", True), ("block_mfb", "block.MFB", True),
        ("block_mfh", "block.MFH", True), ("mmf_mfh", "mmf.MFH", True)]
    assert isinstance(model.mfb, OpenVQAMFB) and isinstance(model.block_mfb, BlockMFB)
    assert isinstance(model.block_mfh, BlockMFH) and isinstance(model.mmf_mfh, MmfMFH)
    assert not any(m.training for m in model.modules())  # eval state kept
    # The openvqa wrapper keeps the tuple call convention at any batch size.
    z, extra = model.mfb(torch.randn(2, 5, 6, dtype=DT), torch.randn(2, 1, 4, dtype=DT))
    assert z.shape == (2, 5, 2) and extra is None


def test_swap_keeps_training_state_dtype_and_device():
    model = IAttNet().train()
    model.block_mfb.eval()
    swap_fusions(model)
    assert model.training and model.mfb.training and not model.block_mfb.training
    assert model.mfb.fusion.proj_x.weight.dtype == torch.float32
    assert model.block_mfh.fusion.proj_x[0].weight.device.type == "cpu"


def test_swap_openvqa_mfh_cascade_keeps_call_sites():
    from fbp_kernels.convert import OpenVQAMFHFirst, OpenVQAMFHLater
    torch.manual_seed(1)
    model = CoAttMFH()
    img = torch.randn(4, 6, dtype=DT, requires_grad=True)
    q = torch.randn(4, 4, dtype=DT, requires_grad=True)
    report = compare(model, (img, q))  # CoAttMFH.forward is openvqa's call sequence
    assert [(r.name, r.kind, r.replaced) for r in report] == [
        ("mfh1", "openvqa.MFH", True), ("mfh2", "openvqa.MFH", True)]
    assert isinstance(model.mfh1, OpenVQAMFHFirst) and isinstance(model.mfh2, OpenVQAMFHLater)
    assert model.mfh1.fusion.dropout == 0.1  # the stages' rate, not the model's 0.5
    # Misuse is an error, not a silently wrong z2.
    _, carry = model.mfh1(img.unsqueeze(1), q.unsqueeze(1))
    with pytest.raises(ValueError, match="other inputs"):
        model.mfh2(torch.randn(4, 1, 6, dtype=DT), q.unsqueeze(1), carry)
    with pytest.raises(TypeError, match="needs exp_in"):
        model.mfh2(img.unsqueeze(1), q.unsqueeze(1), 1)


def test_swap_leaves_a_lone_mfh_stage_alone_with_reasons():
    class Odd(nn.Module):  # a later stage with no first stage before it
        def __init__(self):
            super().__init__()
            self.stage = OpenVQASource(4, 3, k=2, o=2, is_first=False)
    model = Odd()
    (record,) = swap_fusions(model)
    assert not record.replaced and "is_first=False" in record.reason
    assert isinstance(model.stage, OpenVQASource)


def test_swap_reports_refusals_and_unknown_fusions():
    class WeirdMFB(nn.Module):  # named like a fusion, shaped like nothing known
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

    model = nn.Sequential(BlockMFBSource([3, 3], 2, activ_input="sigmoid"),
                          BlockMFBSource([3, 3], 2, activ_input=None, dropout_input=0.1),
                          WeirdMFB(), nn.Linear(2, 2))
    report = swap_fusions(model)
    assert all(isinstance(r, SwapRecord) for r in report)
    assert [(r.name, r.replaced) for r in report] == [("0", False), ("1", False),
                                                      ("2", False)]
    assert "activ_input='sigmoid'" in report[0].reason
    assert "dropout_input" in report[1].reason and "strict=False" in report[1].reason
    assert report[2].kind is None and "WeirdMFB" in report[2].reason
    with pytest.warns(UserWarning, match="dropout_input"):
        again = swap_fusions(model, strict=False)
    assert [r.name for r in again if r.replaced] == ["1"]
    with pytest.raises(TypeError, match="unknown options"):
        swap_fusions(model, dropout=0.3)
