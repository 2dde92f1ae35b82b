"""What the benchmark measures: the providers of one operation (FBP or MFH).

A provider turns a problem's tensors into one callable per mode:

- ``forward``:          inference, under ``torch.no_grad()``;
- ``backward``:         ``torch.autograd.grad`` through a graph that an untimed
                        forward built just before; gradients of x, y, weights, biases;
- ``forward+backward``: a training step of the layer: forward with autograd, then
                        the same gradients.

Providers: ``reference`` (the eager specification, the baseline), ``compile``
(``torch.compile`` of the reference: what a user would try instead), each backend
``<name>`` (memory-lean, recomputes the projections in backward) and
``<name>+saved`` (``save_projections=True``), and ``floor``: only the matrix
products the operation cannot avoid (2 per block forward, 4 per block backward,
6 per block for both), so every other time also reads as "times the floor".
Bias gradients and the epilogue are deliberately not in the floor.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

import fbp_kernels
from fbp_kernels import reference
from fbp_kernels.backends._common import WIDE_ENGINE_ENV

from .measure import Call
from .problems import Problem

MODES = ("forward", "backward", "forward+backward")

#: A mode's work: a zero-argument callable, or a Call with an untimed setup.
ModeFn = Union[Call, Callable[[], object]]


@dataclass
class Inputs:
    """One problem's tensors; every one requires grad (x and y come from upstream
    networks in a real model, so their gradients are part of the cost).

    ``x (rows, m)``, ``y (rows, n)``; per block ``weights_x (k*o, m)``,
    ``weights_y (k*o, n)``, biases ``(k*o,)``; ``grad_out (rows, order*o)``.
    """

    x: Tensor
    y: Tensor
    weights_x: List[Tensor]
    weights_y: List[Tensor]
    biases_x: List[Tensor]
    biases_y: List[Tensor]
    grad_out: Tensor

    @property
    def params(self) -> List[Tensor]:
        return [*self.weights_x, *self.weights_y, *self.biases_x, *self.biases_y]

    @property
    def leaves(self) -> List[Tensor]:
        return [self.x, self.y, *self.params]

    def min_bytes(self) -> int:
        """Bytes a forward must move at least: read inputs and parameters once, write
        the output once.  Over the forward time this is its achieved bandwidth,
        the number that matters at small ``rows`` where reading the weights dominates."""
        tensors = [*self.leaves, self.grad_out]  # grad_out is shaped like the output
        return sum(t.numel() * t.element_size() for t in tensors)


def make_inputs(problem: Problem, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs (never zeros: they can run faster than real data), weights
    scaled like ``nn.Linear``'s initialisation so the pooled values are O(1)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype, ko = problem.torch_dtype, problem.factor * problem.o

    def rand(*shape, std=1.0):
        t = torch.randn(*shape, generator=gen) * std
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    blocks = range(problem.order)
    if problem.regions > 1:  # co-attention: (B, R, m) regions with a (B, 1, n) question
        lead_x, lead_y = (problem.y_rows, problem.regions), (problem.y_rows, 1)
    else:
        lead_x = lead_y = (problem.rows,)
    return Inputs(
        x=rand(*lead_x, problem.m),
        y=rand(*lead_y, problem.n),
        weights_x=[rand(ko, problem.m, std=problem.m ** -0.5) for _ in blocks],
        weights_y=[rand(ko, problem.n, std=problem.n ** -0.5) for _ in blocks],
        biases_x=[rand(ko, std=0.1) for _ in blocks],
        biases_y=[rand(ko, std=0.1) for _ in blocks],
        grad_out=torch.randn(*lead_x, problem.order * problem.o, generator=gen)
        .to(device=device, dtype=dtype),
    )


@dataclass
class Provider:
    """A named way to compute the operation.

    Either ``make_forward(problem, inputs)`` returns a differentiable forward (the
    modes then come from :func:`autograd_modes`, and the same forward counts the
    saved activations), or ``make_modes(problem, inputs)`` returns the mode
    callables directly (the floor).  Either may raise; the runner records it.
    """

    name: str
    kind: str  # "baseline", "compile", "backend", "floor"
    make_forward: Optional[Callable[[Problem, Inputs], Callable[[], Tensor]]] = None
    make_modes: Optional[Callable[[Problem, Inputs], Dict[str, ModeFn]]] = None

    def build(self, problem: Problem,
              inputs: Inputs) -> Tuple[Dict[str, ModeFn], Optional[Callable[[], Tensor]]]:
        """``({mode: work}, forward or None)``; built once per problem, so that
        torch.compile compiles once for the timings and the saved-bytes count."""
        if self.make_forward is not None:
            fwd = self.make_forward(problem, inputs)
            return autograd_modes(fwd, inputs), fwd
        return self.make_modes(problem, inputs), None


def autograd_modes(fwd: Callable[[], Tensor], inputs: Inputs) -> Dict[str, ModeFn]:
    """The three mode callables of a differentiable forward."""
    leaves, g = inputs.leaves, inputs.grad_out

    def forward():
        with torch.no_grad():
            return fwd()

    graph = {}

    def build_graph():
        graph["out"] = fwd()

    def backward():
        # pop: the graph is freed by this backward, as in training.
        return torch.autograd.grad(graph.pop("out"), leaves, g)

    def forward_backward():
        return torch.autograd.grad(fwd(), leaves, g)

    return {"forward": forward, "backward": Call(backward, setup=build_graph),
            "forward+backward": forward_backward}


# ----------------------------------------------------------------------------------
# The forwards of each operation.

def _reference_forward(op: str):
    def make(problem: Problem, inp: Inputs) -> Callable[[], Tensor]:
        if op == "fbp":
            args = (inp.x, inp.y, inp.weights_x[0], inp.weights_y[0], inp.biases_x[0],
                    inp.biases_y[0])
            return lambda: reference.fbp(*args, factor=problem.factor)
        return lambda: reference.mfh(inp.x, inp.y, inp.weights_x, inp.weights_y,
                                     inp.biases_x, inp.biases_y, factor=problem.factor)
    return make


def _compiled_forward(op: str, compile_backend: str):
    def make(problem: Problem, inp: Inputs) -> Callable[[], Tensor]:
        # A fresh compilation per problem: dynamo's cache would otherwise switch to
        # dynamic shapes after the first shape change (or fall back to eager after
        # its recompile limit), and the result would not be a per-shape compile.
        torch._dynamo.reset()
        factor = problem.factor
        if op == "fbp":
            fn = torch.compile(lambda x, y, wx, wy, bx, by:
                               reference.fbp(x, y, wx, wy, bx, by, factor=factor),
                               backend=compile_backend, dynamic=False)
            args = (inp.x, inp.y, inp.weights_x[0], inp.weights_y[0], inp.biases_x[0],
                    inp.biases_y[0])
        else:
            fn = torch.compile(lambda x, y, wx, wy, bx, by:
                               reference.mfh(x, y, wx, wy, bx, by, factor=factor),
                               backend=compile_backend, dynamic=False)
            args = (inp.x, inp.y, inp.weights_x, inp.weights_y, inp.biases_x, inp.biases_y)
        return lambda: fn(*args)
    return make


def _backend_forward(op: str, backend: str, save_projections: bool):
    def make(problem: Problem, inp: Inputs) -> Callable[[], Tensor]:
        kw = dict(factor=problem.factor, backend=backend)
        if save_projections:
            kw["save_projections"] = True
        if op == "fbp":
            args = (inp.x, inp.y, inp.weights_x[0], inp.weights_y[0], inp.biases_x[0],
                    inp.biases_y[0])
            return lambda: fbp_kernels.fbp(*args, **kw)
        mfh = getattr(fbp_kernels, "mfh", None)
        if mfh is None:
            raise NotImplementedError("fbp_kernels.mfh does not exist in this version")
        return lambda: mfh(inp.x, inp.y, inp.weights_x, inp.weights_y, inp.biases_x,
                           inp.biases_y, **kw)
    return make


def _floor_modes(problem: Problem, inp: Inputs) -> Dict[str, ModeFn]:
    """Only the unavoidable matrix products, on the same operands and shapes.

    Backward: ``dx = da W_x``, ``dW_x = da^T x`` and the same for y, per block, with
    random stand-ins for ``da``, ``dc (rows, k*o)``.  No autograd, no epilogue.
    """
    # On the distinct rows: a co-attention question is projected once, not per region.
    x = inp.x.detach().reshape(-1, problem.m)
    y = inp.y.detach().reshape(-1, problem.n)
    blocks = list(zip([w.detach() for w in inp.weights_x], [w.detach() for w in inp.weights_y],
                      [b.detach() for b in inp.biases_x], [b.detach() for b in inp.biases_y]))
    gen = torch.Generator(device="cpu").manual_seed(1)
    ko = problem.factor * problem.o
    da = torch.randn(x.shape[0], ko, generator=gen).to(x.device, x.dtype)
    dc = torch.randn(y.shape[0], ko, generator=gen).to(x.device, x.dtype)

    def forward():
        return [(F.linear(x, wx, bx), F.linear(y, wy, by)) for wx, wy, bx, by in blocks]

    def backward():
        return [(da @ wx, dc @ wy, da.t() @ x, dc.t() @ y) for wx, wy, _, _ in blocks]

    def forward_backward():
        return forward(), backward()

    return {"forward": forward, "backward": backward, "forward+backward": forward_backward}


def _accepts_save_projections(op: str) -> bool:
    fn = fbp_kernels.fbp if op == "fbp" else getattr(fbp_kernels, "mfh", None)
    return fn is not None and "save_projections" in inspect.signature(fn).parameters


def providers_for(op: str, backend_names: List[str], include_compile: bool = True,
                  compile_backend: str = "inductor") -> List[Provider]:
    """The providers of ``op`` ("fbp" or "mfh") in table order, baseline first.

    ``backend_names`` are the fbp_kernels backends to measure, each also as
    ``+saved`` when the op has ``save_projections``; the caller decides which are
    available on the device.
    """
    if op not in ("fbp", "mfh"):
        raise ValueError(f"op must be 'fbp' or 'mfh', got {op!r}")
    variants = (False, True) if _accepts_save_projections(op) else (False,)
    out = [Provider("reference", "baseline", make_forward=_reference_forward(op))]
    if include_compile:
        out.append(Provider("compile", "compile",
                            make_forward=_compiled_forward(op, compile_backend)))
    for name in backend_names:
        for saved in variants:
            out.append(Provider(name + ("+saved" if saved else ""), "backend",
                                make_forward=_backend_forward(op, name, saved)))
    if op == "fbp" and "triton" in backend_names and _gluon_device():
        # The opt-in warp-specialised forward main loop (fbp_kernels/backends/
        # gluon_wide.py); backward is the triton provider's.
        out.append(Provider("triton-gluon", "backend",
                            make_forward=_with_env(_backend_forward(op, "triton", False),
                                                   WIDE_ENGINE_ENV, "gluon")))
    out.append(Provider("floor", "floor", make_modes=_floor_modes))
    return out


def _gluon_device() -> bool:
    """Whether the Gluon engine can run here: a CUDA device of compute capability 9+."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _with_env(make, name: str, value: str):
    """``make`` whose callables run with the environment variable ``name`` set to
    ``value`` (restored after each call; a few microseconds of host time per call)."""
    import os

    def wrapped(problem: Problem, inp: Inputs) -> Callable[[], Tensor]:
        fn = make(problem, inp)

        def call():
            old = os.environ.get(name)
            os.environ[name] = value
            try:
                return fn()
            finally:
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
        return call
    return wrapped
