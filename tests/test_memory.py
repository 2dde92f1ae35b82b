"""What each implementation keeps for backward, measured with saved_tensors_hooks."""

import pytest
import torch

import fbp_kernels
from fbp_kernels import reference
from helpers import Case, make_inputs

CASE = Case((6, 2), (6, 1), 9, 7, 5, 4)


def saved_tensors(fn):
    """Run ``fn`` and return (its output, the tensors autograd packed for backward)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _extra(saved, tensors, out):
    """Saved tensors that are neither parameters/inputs nor the output."""
    live = {t.data_ptr() for t in tensors if t is not None} | {out.data_ptr()}
    return [t for t in saved if t.numel() and t.data_ptr() not in live]


@pytest.mark.parametrize("save_projections", [False, True], ids=["lean", "saved"])
def test_backend_saves_no_expanded_activation(save_projections, backend, device):
    tensors = make_inputs(CASE, torch.float32, device)
    out, saved = saved_tensors(lambda: fbp_kernels.fbp(
        *tensors, factor=CASE.factor, backend=backend, save_projections=save_projections))
    rows = out.shape[:-1].numel()
    ko = CASE.factor * CASE.o
    extra = _extra(saved, tensors, out)
    wide = [t for t in extra if t.shape[-1] == ko]
    if save_projections:
        # The opt-in mode keeps exactly the two projections.
        assert len(wide) == 2, [tuple(t.shape) for t in extra]
    else:
        assert not wide, f"saved (.., factor*o) tensors: {[tuple(t.shape) for t in wide]}"
        # Everything else is O(rows) statistics (the row norms) or the scalar seed.
        assert all(t.numel() <= rows for t in extra), [tuple(t.shape) for t in extra]
        extra_bytes = sum(t.numel() * t.element_size() for t in extra)
        assert extra_bytes <= rows * 8 + 8


def test_reference_saves_the_projections():
    """The baseline keeps (at least) both (rows, factor*o) projections: what we avoid."""
    tensors = make_inputs(CASE, torch.float32)
    out, saved = saved_tensors(lambda: reference.fbp(*tensors, factor=CASE.factor))
    ko = CASE.factor * CASE.o
    wide = [t for t in _extra(saved, tensors, out) if t.shape[-1] == ko and t.dim() >= 2]
    assert len(wide) >= 2
