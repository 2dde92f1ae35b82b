"""Input factories and a comparison that says where and how much things differ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from fbp_kernels import reference


@dataclass(frozen=True)
class Case:
    """One FBP problem: leading shapes of x and y, widths, factor and outputs."""

    batch_x: Tuple[int, ...]
    batch_y: Tuple[int, ...]
    m: int
    n: int
    factor: int
    o: int
    bias: bool = True

    def __str__(self):
        return (f"x{self.batch_x}m{self.m}-y{self.batch_y}n{self.n}-k{self.factor}o{self.o}"
                + ("" if self.bias else "-nobias"))


# Small on purpose: the Triton backend runs these through the CPU interpreter.
CASES = [
    Case((4,), (4,), 8, 6, 1, 3),            # factor 1
    Case((5,), (5,), 7, 9, 5, 4),            # MFB default factor, odd widths
    Case((2, 3), (2, 1), 6, 5, 3, 5),        # VQA broadcast: regions x one question
    Case((), (), 5, 4, 2, 3),                # 1-D inputs
    Case((1,), (1,), 16, 16, 8, 2),          # batch 1, factor 8
    Case((0,), (0,), 5, 4, 2, 3),            # empty batch
    Case((2, 1, 3), (1, 4, 1), 5, 3, 4, 3),  # 4-D output, both broadcast
    Case((3,), (1,), 33, 17, 7, 5, bias=False),  # no bias, y broadcast over rows
    Case((37,), (37,), 20, 12, 2, 19),       # rows and o not multiples of tiles
]


def make_inputs(case: Case, dtype=torch.float32, device="cpu", requires_grad=True,
                noncontiguous=False, scale: float = 1.0):
    """Random ``(x, y, wx, wy, bx, by)``; weights scaled like nn.Linear's init."""
    ko = case.factor * case.o

    def rand(*shape, std=1.0):
        if noncontiguous and len(shape) >= 1:
            # Same values, strided storage: allocate the transpose and view it back.
            t = torch.randn(*reversed(shape), dtype=torch.float64, device=device).permute(
                *reversed(range(len(shape))))
        else:
            t = torch.randn(*shape, dtype=torch.float64, device=device)
        return (t * std).to(dtype)

    x = rand(*case.batch_x, case.m, std=scale)
    y = rand(*case.batch_y, case.n, std=scale)
    wx = rand(ko, case.m, std=case.m ** -0.5)
    wy = rand(ko, case.n, std=case.n ** -0.5)
    bx = rand(ko, std=0.1) if case.bias else None
    by = rand(ko, std=0.1) if case.bias else None
    tensors = [x, y, wx, wy, bx, by]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


def detached64(tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for t in tensors]


def grads(out, tensors, grad_out):
    """Gradients of ``<out, grad_out>`` w.r.t. each tensor (None stays None)."""
    live = [t for t in tensors if t is not None]
    g = torch.autograd.grad(out, live, grad_out, allow_unused=True)
    it = iter(g)
    return [None if t is None else next(it) for t in tensors]


def assert_close(actual, expected, *, atol: float, rtol: float, name: str = "tensor"):
    """Like torch.testing.assert_close, but reports the worst element and the share
    of elements out of tolerance, which is what one needs to judge a kernel bug."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{name}: non-finite mismatch"
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements ({100.0 * bad.float().mean():.2f}%) "
            f"outside atol={atol:g} rtol={rtol:g}; worst at {idx}: actual={a[idx].item():.6g} "
            f"expected={e[idx].item():.6g} |diff|={diff[idx].item():.3g}")


def error_vs(actual, exact):
    """Max abs error normalised by the largest exact magnitude (a scale-free number)."""
    if actual.numel() == 0:
        return 0.0
    return ((actual.double() - exact.double()).abs().max() / exact.double().abs().max().clamp_min(1e-30)).item()


def reference_fbp(tensors, case: Case, **kw):
    return reference.fbp(*tensors, factor=case.factor, **kw)
