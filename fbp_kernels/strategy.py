"""Which kernel runs: ``backend="auto"``'s choice per shape, and :func:`explain`.

On a CUDA tensor ``auto`` chooses between the two Triton strategies, ``split`` (cuBLAS
projections + one fused epilogue) and ``triton`` (the one-launch fused kernel), by the
cost model's predicted time (:mod:`fbp_kernels.costmodel`: a roofline on the kernels'
launch configurations and compile facts, for the GPU it recognises) for the shape
at hand: forward only when no gradient is needed, forward+backward otherwise, in the
call's memory mode (``save_projections``).  Until
GPU measurements replace the predictions, the model puts ``split`` ahead at training
batches of the MFB default (H200, bf16, forward: the wide fused kernel 83 us against
split 57 and a floor of 52 at 1024 rows) and the wide kernel's weight-streaming tile
ahead for small-batch inference (13 us against 15 and 12 at rows <= 16; README's
table); measurements will replace both.
Without Triton, ``cuda`` (the C++ extension) then ``torch``.  On the CPU ``torch``:
BLAS wins there, and the Triton interpreter is a testing tool, never a default.

Under ``torch.compile`` the choice is made once per device at trace time with the MFB
default shape (shape-dependent Python choices would add guards and recompiles); both
strategies draw the same dropout masks, so the two differ only in rounding.

Override with ``backend="split"`` / ``"triton"`` / ``"cuda"`` / ``"torch"``.

MFH (:func:`choose_mfh`): on a CUDA tensor ``triton`` (FBP's wide kernels per block) or
``torch``, by ``costmodel.predict_mfh``, which prices MFH from FBP's providers.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from . import backends
from .backends import _common

#: The shape the device-level default (and the compiled path) is chosen for: the MFB
#: default of openvqa at a training batch (rows 1024, m 2048, n 1024, factor 5, o 1000).
DEFAULT_SHAPE = (1024, 2048, 1024, 5, 1000)

_SPLIT_BUDGET = int(float(os.environ.get("FBP_SPLIT_BUDGET_MIB", "64")) * 2**20)


def split_memory_budget() -> int:
    """Bytes the split strategy may spend on its transient ``(chunk, K*o)`` buffers."""
    return _SPLIT_BUDGET


def set_split_memory_budget(nbytes: int) -> int:
    """Set the split strategy's transient-buffer budget in bytes (default 64 MiB, or
    ``FBP_SPLIT_BUDGET_MIB`` at import); returns the previous value.  Smaller budgets
    mean more, smaller chunks: the same results, more launches."""
    global _SPLIT_BUDGET
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"the split memory budget must be a positive int of bytes, "
                         f"got {nbytes!r}")
    old, _SPLIT_BUDGET = _SPLIT_BUDGET, nbytes
    return old


_MODEL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Plan:
    """What a call would run, and why (``str(plan)`` reads as a short report)."""

    backend: str
    kernels: str
    tile: str
    reason: str
    predicted_us: Dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}", f"kernels: {self.kernels}", f"tile:    {self.tile}",
                 f"why:     {self.reason}"]
        if self.predicted_us:
            preds = ", ".join(f"{k} {v:.1f} us" for k, v in self.predicted_us.items())
            lines.append(f"model:   {preds}")
        return "\n".join(lines)


def _model_dtype(dtype: torch.dtype) -> Optional[str]:
    if dtype == torch.float32:
        return "tf32" if _common.matmul_allows_tf32() else "fp32"
    return _MODEL_DTYPES.get(dtype)


#: ``save_projections`` -> the cost model's provider suffix for that memory mode.
_MODEL_SUFFIX = {False: "", True: "+saved", "x": "+keep_x", "y": "+keep_y"}


@functools.lru_cache(maxsize=4096)
def _predict(device_name: str, rows: int, m: int, n: int, factor: int, o: int, dtype: str,
             mode: str, suffix: str = ""):
    """Predicted microseconds per strategy (in the memory mode of ``suffix``); ``None``
    when the model is unavailable."""
    try:
        from . import costmodel
    except ImportError:
        return None
    gpu = costmodel.gpu_for(device_name)
    shape = costmodel.Shape(rows=rows, m=m, n=n, factor=factor, o=o, dtype=dtype)
    return {p: costmodel.predict(p + suffix, shape, gpu, mode).time_us
            for p in ("split", "fused")}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "none"


def choose(device: torch.device, rows: int, m: int, n: int, factor: int, o: int,
           dtype: torch.dtype, needs_grad: bool, save_projections=False):
    """``(backend name, reason, predicted us per strategy)`` for ``backend="auto"``, in
    the memory mode ``save_projections`` (False, True, "x", "y")."""
    device = torch.device(device)
    if device.type != "cuda":
        return "torch", (f"{device.type} tensors: plain PyTorch (BLAS) is the fast path; "
                         f"the Triton interpreter is for tests only"), {}
    one = save_projections in ("x", "y")
    have = {name: backends.unsupported_reason(name, device) is None
            for name in ("split", "triton", "cuda")}
    if one and have["triton"]:
        from .backends.triton_backend import kept_problem

        # The middle mode runs on triton's wide kernels only where their tiles fit.
        have["triton"] = kept_problem(factor, dtype, device) is None
    if not (have["split"] or have["triton"]):
        # cuda keeps any of the projections (its fused kernels write and read them).
        name = "cuda" if have["cuda"] else "torch"
        return name, "Triton is not usable here", {}
    if not (have["split"] and have["triton"]):
        name = "split" if have["split"] else "triton"
        return name, "the only Triton strategy available", {}
    mode = "forward+backward" if needs_grad else "forward"
    mdtype = _model_dtype(dtype)
    preds = _predict(_device_name(device), rows, m, n, factor, o, mdtype, mode,
                     _MODEL_SUFFIX[save_projections]) if mdtype is not None else None
    if not preds:
        why = ("no cost model for float64 (gradcheck precision); split is the default"
               if mdtype is None else "cost model unavailable; split is the default")
        return "split", why, {}
    best = min(preds, key=preds.get)
    name = "split" if best == "split" else "triton"
    other = "fused" if best == "split" else "split"
    return name, (f"cost model ({mode}): {best} {preds[best]:.1f} us < {other} "
                  f"{preds[other]:.1f} us predicted"), dict(preds)


@functools.lru_cache(maxsize=4096)
def _predict_mfh(device_name: str, rows: int, m: int, n: int, factor: int, o: int,
                 order: int, dtype: str, mode: str, x_rows: int, y_rows: int):
    """Predicted microseconds of MFH's backends (costmodel.predict_mfh); ``None`` when
    the model is unavailable."""
    try:
        from . import costmodel
    except ImportError:
        return None
    gpu = costmodel.gpu_for(device_name)
    shape = costmodel.Shape(rows=rows, m=m, n=n, factor=factor, o=o, dtype=dtype,
                            x_rows=x_rows, y_rows=y_rows)
    return {p: costmodel.predict_mfh(p, shape, gpu, mode, order) for p in ("fused", "torch")}


def choose_mfh(device: torch.device, rows: int, m: int, n: int, factor: int, o: int,
               order: int, dtype: torch.dtype, needs_grad: bool,
               x_rows: Optional[int] = None, y_rows: Optional[int] = None):
    """``(backend name, reason, predicted us per backend)`` for ``mfh(..., backend="auto")``
    on a tensor of ``device``: ``triton`` (FBP's wide kernels per block) or ``torch``
    (cuBLAS projections and PyTorch's elementwise kernels per block), whichever the cost
    model predicts faster for this shape (costmodel.predict_mfh: H200, bf16, MFB widths,
    order 2: triton at rows 1, 27 us forward against 84; torch at training batches, rows
    1024 forward+backward 650 us against 738).  ``x_rows`` / ``y_rows``: the inputs'
    distinct rows (co-attention)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "torch", (f"{device.type} tensors: plain PyTorch (BLAS) is the fast path; "
                         f"the Triton interpreter is for tests only"), {}
    from . import mfh_ops

    problem = mfh_ops.unsupported_reason("triton", device, order, factor)
    if problem is not None:
        return "torch", f"backend triton cannot run it: {problem}", {}
    mode = "forward+backward" if needs_grad else "forward"
    mdtype = _model_dtype(dtype)
    if mdtype is None or min(rows, m, n, o) < 1:
        return "triton", "no cost model for this problem; triton is the default", {}
    preds = _predict_mfh(_device_name(device), rows, m, n, factor, o, order, mdtype, mode,
                         x_rows if x_rows is not None else rows,
                         y_rows if y_rows is not None else rows)
    if not preds:
        return "triton", "cost model unavailable; triton is the default", {}
    best = min(preds, key=preds.get)
    other = "torch" if best == "fused" else "fused"
    return ("triton" if best == "fused" else "torch"), (
        f"cost model ({mode}, order {order}): {best} {preds[best]:.1f} us < {other} "
        f"{preds[other]:.1f} us predicted"), dict(preds)


def choose_mfh_for(x, y, weights_x, factor: int, needs_grad: bool):
    """:func:`choose_mfh` for tensors: ``x (..., m)``, ``y (..., n)`` (broadcast leading
    dimensions; the inputs' own rows are the distinct ones) and the per-block
    ``weights_x``."""
    rows = rx = ry = 1
    for d in backends_batch(x, y):
        rows *= d
    for d in x.shape[:-1]:
        rx *= d
    for d in y.shape[:-1]:
        ry *= d
    return choose_mfh(x.device, rows, x.shape[-1], y.shape[-1], factor,
                      weights_x[0].shape[0] // factor, len(weights_x), x.dtype, needs_grad,
                      x_rows=min(max(rx, 1), max(rows, 1)),
                      y_rows=min(max(ry, 1), max(rows, 1)))


def auto_mfh_backend(device: torch.device, order: int = 2) -> str:
    """MFH's device-level choice (MFB default shape, ``order`` blocks, bf16,
    forward+backward): what ``auto`` runs under ``torch.compile``, as FBP's
    :func:`auto_backend`."""
    rows, m, n, factor, o = DEFAULT_SHAPE
    return choose_mfh(device, rows, m, n, factor, o, order, torch.bfloat16, True)[0]


def auto_backend(device: torch.device) -> str:
    """The device-level choice (MFB default shape, forward+backward): what ``auto``
    runs under ``torch.compile``."""
    return choose(device, *DEFAULT_SHAPE, torch.bfloat16, True)[0]


def _gluon_engine(rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the opt-in Gluon forward (backends/gluon_wide.py) is switched on and
    covers the shape (the call's operands decide the rest)."""
    import os

    from .backends._common import WIDE_ENGINE_ENV

    if os.environ.get(WIDE_ENGINE_ENV, "") != "gluon":
        return False
    from .backends import gluon_wide

    return gluon_wide.covers(rows, dtype, device)


def _describe(name: str, rows: int, o: int, factor: int, dtype: torch.dtype,
              device: torch.device, save_projections: bool):
    """(kernels, tile) of backend ``name`` for this shape, from its own launch heuristics."""
    if name == "split":
        from .backends import split_backend as S
        from .backends import triton_split as E

        ko = factor * o
        step = rows if save_projections else S.chunk_rows(ko, dtype)
        chunks = max(1, -(-rows // max(step, 1)))
        cfg = E.pick_epilogue_config(min(rows, step), o, factor)
        return ("cuBLAS addmm x2 per chunk + Triton _split_fwd_kernel "
                "(backward: _split_bwd_kernel + 4 cuBLAS GEMMs)",
                f"{chunks} chunk(s) of <= {min(rows, step)} rows "
                f"({split_memory_budget() / 2**20:.0f} MiB budget); epilogue BLOCK_R={cfg.block_r} "
                f"BLOCK_O={cfg.block_o} BLOCK_F={cfg.block_f}, {cfg.num_warps} warps")
    if name == "triton":
        from .backends import triton_kernels as K
        from .backends import triton_wide as W

        wide = W.pick_wide_config(dtype, device, rows)
        if save_projections in ("x", "y"):
            kept = {"x": "A", "y": "C"}[save_projections]
            return (f"cuBLAS {kept} (kept) + Triton _wide_fwd_kernel reading it + "
                    f"_finish_kernel (backward: _grad_pooled_kernel + _wide_grad_kernel "
                    f"twice, {kept} read, the other recomputed, + 4 cuBLAS GEMMs)",
                    f"forward {wide.block_m}x{wide.block_n}x{wide.block_k}, "
                    f"{wide.num_warps} warps ({W.tile_outputs(wide, factor)[0]} outputs "
                    f"per tile)")
        if not save_projections and W.supports(factor, wide):
            bwd = W.pick_wide_bwd_config(dtype, device)
            tiles = lambda c: (f"{c.block_m}x{c.block_n}x{c.block_k}, {c.num_warps} warps, "  # noqa: E731
                               f"{c.num_stages} stages{', TMA' if c.tma else ''}")
            ptr = ""
            if wide.tma:  # the launcher's fallback (forward_config, bwd_config_family)
                alt = W.pick_wide_config(dtype, device, rows, descriptors=False)
                if W.supports(factor, alt):
                    ptr = (f"; forward {tiles(alt)} and backward "
                           f"{tiles(W.pick_wide_bwd_config(dtype, device, descriptors=False))}"
                           f" where an operand cannot be read through TMA (rows not 16-byte "
                           f"aligned, a stride-0 broadcast)")
            fwd_kernel = "_wide_fwd_kernel"
            if _gluon_engine(rows, dtype, device):
                fwd_kernel = ("_gluon_wide_fwd_kernel (FBP_WIDE_ENGINE=gluon: warp-"
                              "specialised, 128x128x64, 6 stages, TMA + wgmma; without "
                              "dropout or activation, for operands TMA can read, else "
                              "_wide_fwd_kernel)")
            return (f"Triton {fwd_kernel} + _finish_kernel (backward: _grad_pooled_kernel "
                    "+ _wide_grad_kernel twice, one pass per projection, + 4 cuBLAS GEMMs)",
                    f"forward {tiles(wide)} ({W.tile_outputs(wide, factor)[0]} outputs per "
                    f"tile); backward {tiles(bwd)}{ptr}")
        cfg = K.pick_config(rows, o, dtype, device)
        return ("Triton _fbp_fwd_kernel, one launch (backward: _fbp_bwd_kernel + 4 cuBLAS "
                "GEMMs)",
                f"BLOCK_M={cfg.block_m} BLOCK_O={cfg.block_o} BLOCK_K={cfg.block_k}, "
                f"{cfg.num_warps} warps, {cfg.num_stages} stages")
    if name == "cuda":
        from . import costmodel

        kernels = ("CUDA fused_forward_kernel + finish_norm_kernel (backward: "
                   "grad_pooled_kernel + projection_grads_kernel + 4 cuBLAS GEMMs; csrc/)")
        if save_projections:
            kernels += "; kept projections written by the forward, read by the backward"
        short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
        if dtype not in short:
            return kernels, "FMA 32x64x16, 256 threads (fp64)"
        arch = (torch.cuda.get_device_capability(device)[0] * 10
                if device.type == "cuda" else 80)
        engine = costmodel.cuda_engine(short[dtype], rows, arch)
        bm, bn, bk, threads, stages = costmodel.CUDA_TILES[engine]
        how = {"wgmma": "wgmma + TMA (sm_90a), 198 KiB of shared memory",
               "wide": "cp.async + mma.sync, 149 KiB of shared memory",
               "async": "cp.async + mma.sync", "fp32": "FMA"}[engine]
        note = ("; synchronous WMMA 64x64x32 if an operand is not 16-byte aligned along K"
                if engine != "fp32" else "")
        return kernels, (f"{bm}x{bn}x{bk}, {threads} threads, {stages} stage(s), {how}: "
                         f"{max(1, bn // factor)} outputs per tile{note} (docs/cuda.md)")
    return ("PyTorch: F.linear x2, product, pooling, normalisation (hand-written backward)",
            "-")


def explain(x, y, weight_x, weight_y=None, *, factor: int, backend: str = "auto",
            training: bool = False, needs_grad: Optional[bool] = None,
            save_projections: bool = False) -> Plan:
    """Which backend, kernels and tile ``fbp(x, y, weight_x, weight_y, ...)`` runs, and why.

    Args are ``fbp``'s (``x (..., m)``, ``y (..., n)``, ``weight_x (factor*o, m)``);
    ``needs_grad`` defaults to whether any of the tensors requires a gradient.  An
    explicit backend that cannot run here raises ``BackendUnavailableError``, as ``fbp``
    would.
    """
    device = x.device
    rows = 1
    for d in backends_batch(x, y):
        rows *= d
    m, n = x.shape[-1], y.shape[-1]
    o = weight_x.shape[0] // factor
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, y, weight_x, weight_y))
    if backend == "auto":
        name, reason, preds = choose(device, rows, m, n, factor, o, x.dtype, needs_grad,
                                     save_projections)
    else:
        name = backends.resolve(backend, device).NAME
        reason, preds = "requested explicitly", {}
    kernels, tile = _describe(name, rows, o, factor, x.dtype, device, save_projections)
    return Plan(name, kernels, tile, reason, preds)


def explain_mfh(x, y, weights_x, weights_y=None, *, factor: int, backend: str = "auto",
                training: bool = False, needs_grad: Optional[bool] = None) -> Plan:
    """Which backend, kernels and tiles ``mfh(x, y, weights_x, weights_y, ...)`` runs, and
    why: :func:`explain` for MFH (``weights_x``: the per-block list; ``weights_y`` is
    accepted for symmetry with ``mfh`` and not needed).  An explicit backend that cannot
    run here raises ``BackendUnavailableError``, as ``mfh`` would."""
    from . import mfh_ops

    device = x.device
    weights_x = list(weights_x)
    order = len(weights_x)
    rows = 1
    for d in backends_batch(x, y):
        rows *= d
    if needs_grad is None:
        params = [*weights_x, *(weights_y or [])]
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, y, *params))
    if backend == "auto":
        name, reason, preds = choose_mfh_for(x, y, weights_x, factor, needs_grad)
    else:
        name = mfh_ops.resolve(backend, device, order, factor).NAME
        reason, preds = "requested explicitly", {}
    if name == "triton":
        from .backends import triton_wide as W

        fwd = W.pick_wide_config(x.dtype, device, rows, chained=order > 1)
        bwd = W.pick_wide_bwd_config(x.dtype, device, chained=order > 1)
        tiles = lambda c: (f"{c.block_m}x{c.block_n}x{c.block_k}, {c.num_warps} warps, "  # noqa: E731
                           f"{c.num_stages} stages{', TMA' if c.tma else ''}")
        kernels = (f"per block ({order}): Triton _wide_fwd_kernel (the running product read "
                   f"and stored: PREV/CHAIN) + _finish_kernel; backward: the products "
                   f"recomputed, then per block _grad_pooled_kernel + _wide_grad_kernel "
                   f"twice (CARRY/PREV/NEXT) + 4 cuBLAS GEMMs")
        tile = f"forward {tiles(fwd)}; backward {tiles(bwd)}"
    elif name == "cuda":
        fbp_kernels_, tile = _describe("cuda", rows, weights_x[0].shape[0] // factor, factor,
                                       x.dtype, device, False)
        kernels = (f"per block ({order}): {fbp_kernels_}, the running product multiplied in "
                   f"and returned (prev/chain); backward: the products recomputed, then per "
                   f"block the carry in and out (carry/prev/carry_out)")
    else:
        kernels = (f"per block ({order}): F.linear x2, products, pooling, normalisation "
                   f"(hand-written backward, projections recomputed)")
        tile = "-"
    return Plan(name, kernels, tile, reason, preds)


def backends_batch(x, y):
    from .backends._common import broadcast_batch

    return broadcast_batch(x.shape[:-1], y.shape[:-1])
