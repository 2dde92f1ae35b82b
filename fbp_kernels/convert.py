"""Load the weights of existing MFB modules into :class:`FactorizedBilinearPooling`.

Four public MFB/MFH implementations hold most trained MFB weights people have:

* **openvqa** (``openvqa/models/mfb/mfb.py`` and ``models/mfh/mfh.py``): class ``MFB``
  with ``proj_i`` / ``proj_q`` (``nn.Linear``), ``dropout`` (``nn.Dropout``) and
  ``pool`` (``nn.AvgPool1d(k, stride=k)``).  See :func:`from_openvqa_mfb`.
* **block.bootstrap** (Cadene, ``block/models/networks/fusions/fusions.py``): class
  ``MFB`` with ``linear0`` / ``linear1`` (``nn.Linear(in, mm_dim*factor)``) and
  ``linear_out``, and ``MFH`` with ``linear0_0/1_0/0_1/1_1``.  See
  :func:`from_block_mfb`, :class:`BlockMFB`, :func:`from_block_mfh`, :class:`BlockMFH`.
  mmf's ``fusions.MFB``/``MFH`` are the same classes.
* **mmf** ``modules/layers.py`` ``MFH``: ``mfb_expand_list[i].lc_image/lc_ques``,
  normalised jointly over the regions of a sample.  See :func:`from_mmf_mfh`.
* **vqa-mfb.pytorch** co-attention: 1x1 ``Conv2d`` projections.  See
  :func:`from_linear` and :func:`conv1x1_as_linear`.

:func:`swap_fusions` replaces all of them in a live model, sharing their parameters.

Both use the same layout as this package: ``nn.Linear`` weights ``(factor*o, in)`` and
output ``j`` summing the ``factor`` *consecutive* product columns ``j*factor + i``.
So the weights are copied unchanged; only the key names differ (``proj_i -> proj_x``,
``proj_q -> proj_y``; ``linear0 -> proj_x``, ``linear1 -> proj_y``).

The one numerical difference is the power normalisation.  Both sources use the
textbook signed square root ``sqrt(relu(s)) - sqrt(relu(-s))``; this package uses the
zero-safe ``t(s) = sign(s) * (sqrt(|s| + eps) - sqrt(eps))`` so that its gradient is
finite at ``s = 0``.  Per element, ``0 <= sqrt(|s|) - |t(s)| <= sqrt(eps)``, hence
``||t_textbook - t|| <= sqrt(o * eps)`` and after the L2 normalisation::

    ||z_textbook - z|| <= 2 * sqrt(o * eps / sum_j |s_j|)        (per row)

(``sum_j |s_j| = ||t_textbook||^2``).  Converters default to ``eps = CONVERT_EPS =
1e-12`` (a layer trained from scratch keeps ``DEFAULT_EPS = 1e-6``): the bound is then
``2e-6 * sqrt(o / sum|s|)``, below 1e-5 relative whenever the mean ``|s_j|`` exceeds
0.04 (o = 1000: 2e-6 at ``sum|s| = 1000``, 2e-5 at 10; with 1e-6 it would be 2e-3 and
2e-2), so a converted model reproduces its source's forward to fp32 rounding for
typical inputs (``tests/test_convert.py::test_converter_default_eps_meets_fp32_fidelity``).
Gradients stay finite, with slope at most ``0.5 / sqrt(eps) = 5e5`` at ``s = 0`` (the
sources' own slope is unbounded there); in fp16 training that slope can overflow a
large gradient: pass ``eps=1e-8`` (slope 5e3) or train in bf16/fp32.
Without normalisation (block.bootstrap's default ``normalize=False``) the conversion
is exact up to floating-point rounding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import check_options, check_rate, fbp
from .mfh import MultimodalFactorizedHighOrderPooling, mfh
from .modules import FactorizedBilinearPooling
from .reference import DEFAULT_EPS

#: Default ``eps`` of every converter and of :func:`swap_fusions`: small enough that the
#: zero-safe signed sqrt matches the sources' textbook one to ~1e-5 relative in fp32
#: (module docstring), large enough that the gradient at ``s = 0`` stays finite.
CONVERT_EPS = 1e-12

#: A module (its ``state_dict()`` is read) or a state dict.
Source = Union[nn.Module, Mapping[str, Tensor]]

#: Marks an option the caller did not give: read it from the source module, or use
#: the source library's own default when the source is a bare state dict.
_UNSET = object()

# Defaults of the source classes, used for state dicts (which do not record options).
OPENVQA_DEFAULT_DROPOUT = 0.1  # openvqa's MFB_DROPOUT_RATIO / DROPOUT_R
BLOCK_DEFAULTS = {"activ_input": "relu", "activ_output": "relu", "normalize": False,
                  "dropout_input": 0.0, "dropout_pre_norm": 0.0, "dropout_output": 0.0}


# --------------------------------------------------------------------------- helpers

def _state_dict(source: Source, prefix: str) -> Dict[str, Tensor]:
    """The source's tensors with ``prefix`` stripped (``prefix`` selects a submodule
    of a whole model's checkpoint, e.g. ``"backbone.mfb."``)."""
    if isinstance(source, nn.Module):
        sd = source.state_dict()
    elif isinstance(source, Mapping):
        sd = source
    else:
        raise TypeError(f"source must be an nn.Module or a state dict (a mapping of names "
                        f"to tensors), got {type(source).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _linear(sd: Dict[str, Tensor], name: str, source_kind: str) -> Tuple[Tensor, Optional[Tensor]]:
    """``(weight, bias)`` of the linear layer ``name`` in ``sd``, checked."""
    key = f"{name}.weight"
    if key not in sd:
        keys = sorted(sd)
        # A whole model's checkpoint has thousands of keys: show the first few.
        found = ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "") \
            if keys else "nothing"
        raise ValueError(f"source has no {key!r}, so it is not an MFB state dict of {source_kind} "
                         f"(wrong prefix?); found: {found}")
    w, b = sd[key], sd.get(f"{name}.bias")
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"{key} must be a 2-D tensor (out_features, in_features), got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"{name}.bias must have shape ({w.shape[0]},), got "
                         f"{getattr(b, 'shape', type(b).__name__)}")
    return w, b


def _copy_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """A fresh ``nn.Linear`` holding a copy of ``weight``/``bias`` (same dtype and
    device), so the converted layer never aliases the source's parameters."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _option(name: str, given, module: Optional[nn.Module], attr: str, default):
    """An option of the conversion: given by the caller, else the source module's
    attribute, else ``default``.  A given value that contradicts the module is an
    error: silently converting to different semantics is what this module avoids."""
    from_module = getattr(module, attr, _UNSET) if module is not None else _UNSET
    if given is _UNSET:
        return default if from_module is _UNSET else from_module
    if from_module is not _UNSET and from_module != given:
        raise ValueError(f"{name}={given!r} contradicts the source module's "
                         f"{attr}={from_module!r}")
    return given


def _pair_rows(wx: Tensor, wy: Tensor, names: Tuple[str, str]) -> int:
    if wx.shape[0] != wy.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same out_features "
                         f"(factor * out), got {wx.shape[0]} and {wy.shape[0]}")
    return wx.shape[0]


def _check_factor(factor, rows: int) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int):
        raise TypeError(f"factor must be an int, got {type(factor).__name__}")
    if factor < 1 or rows % factor:
        raise ValueError(f"factor must be an int >= 1 dividing the projections' "
                         f"out_features={rows}, got {factor}")
    return factor


def _holder(source: Source, prefix: str) -> Optional[nn.Module]:
    """The module that holds the weights: ``source`` itself, or the submodule that
    ``prefix`` names (so options come from the MFB, not from the whole model)."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if not isinstance(source, nn.Module):
        return None
    if not prefix:
        return source
    name = prefix[:-1] if prefix.endswith(".") else prefix
    try:
        return source.get_submodule(name)
    except AttributeError:
        raise ValueError(f"prefix={prefix!r} names no submodule of the source "
                         f"{type(source).__name__}") from None


def _required(name: str, given, module: Optional[nn.Module], attr: str, why: str):
    """An option that changes the maths: read from the module, else it must be given
    (a state dict does not record it, and guessing would convert silently wrong)."""
    if module is None and given is _UNSET:
        raise ValueError(f"{name} is required when source is a state dict: {why}")
    return _option(name, given, module, attr, _UNSET)


def _activation(activ_input) -> Optional[str]:
    """block/mmf ``activ_input`` -> the fused layers' ``activation``."""
    if activ_input is None or activ_input == "" or activ_input is False:
        return None
    if activ_input in ("relu", "tanh"):
        return activ_input
    raise ValueError(f"activ_input={activ_input!r}: the fused layers apply only None, "
                     f"'relu' or 'tanh' to the projections, so this activation cannot be "
                     f"reproduced")


def _inherit(layer: nn.Module, module: Optional[nn.Module]) -> nn.Module:
    """A converted layer keeps the source's train/eval state (a state dict has none:
    PyTorch's default, training)."""
    if module is not None:
        layer.train(module.training)
    return layer


def _pool_k(pool) -> int:
    k = pool.kernel_size
    return k[0] if isinstance(k, (tuple, list)) else k


# --------------------------------------------------------------------------- conv

class _Conv1x1Linear(nn.Linear):
    """An ``nn.Linear`` view of a 1x1 ``Conv2d``: ``weight`` is the conv's weight
    ``(out, in, 1, 1)`` viewed as ``(out, in)`` on every access and ``bias`` is the
    conv's bias, so the parameters ARE the conv's (one optimizer entry, gradients
    land on ``conv.weight``, the checkpoint keeps ``conv.*``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would create fresh parameters
        self.conv = conv
        self.in_features, self.out_features = conv.in_channels, conv.out_channels

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.conv.weight.view(self.out_features, self.in_features)

    @property
    def bias(self) -> Optional[Tensor]:  # type: ignore[override]
        return self.conv.bias


def conv1x1_as_linear(conv: nn.Module) -> nn.Linear:
    """``conv`` if it is an ``nn.Linear``; a 1x1 ``Conv2d`` (stride 1, no padding,
    dilation or groups, so it is a per-pixel linear map) wrapped as an ``nn.Linear``
    that shares its parameters; anything else is a TypeError/ValueError naming why."""
    if isinstance(conv, nn.Linear):
        return conv
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"projection must be an nn.Linear or a 1x1 nn.Conv2d, got "
                        f"{type(conv).__name__}")
    for attr, ok in (("kernel_size", (1, 1)), ("stride", (1, 1)), ("dilation", (1, 1)),
                     ("groups", 1)):
        if getattr(conv, attr) != ok:
            raise ValueError(f"Conv2d {attr}={getattr(conv, attr)!r}: only a 1x1 conv "
                             f"with stride 1, dilation 1 and groups 1 is a linear map "
                             f"of each pixel's channels")
    if any(conv.padding) if isinstance(conv.padding, tuple) else conv.padding != 0:
        raise ValueError(f"Conv2d padding={conv.padding!r}: padding adds pixels a linear "
                         f"layer does not produce")
    return _Conv1x1Linear(conv)


def from_linear(proj_x: nn.Module, proj_y: nn.Module, factor: int,
                **options) -> FactorizedBilinearPooling:
    """:meth:`FactorizedBilinearPooling.from_linear` that also takes 1x1 ``Conv2d``
    projections (vqa-mfb.pytorch's co-attention).  Parameters are shared.  The fused
    layer takes channels-last input ``(..., in)``: permute an ``(N, C, H, W)`` map to
    ``(N, H, W, C)`` first (the conv's channel axis is the Linear's feature axis)."""
    options.setdefault("eps", CONVERT_EPS)  # a converted layer: the fidelity default
    return FactorizedBilinearPooling.from_linear(conv1x1_as_linear(proj_x),
                                                 conv1x1_as_linear(proj_y), factor,
                                                 **options)


# --------------------------------------------------------------------------- openvqa

def openvqa_state_dict(source: Source, *, prefix: str = "") -> Dict[str, Tensor]:
    """openvqa MFB weights renamed for :class:`FactorizedBilinearPooling`.

    ``proj_i.{weight,bias} -> proj_x.*`` and ``proj_q.{weight,bias} -> proj_y.*``;
    other keys are dropped.  Use it to load into an existing layer:
    ``layer.load_state_dict(openvqa_state_dict(ckpt, prefix="backbone.mfb."))``.
    """
    sd = _state_dict(source, prefix)
    out = {}
    for src, dst in (("proj_i", "proj_x"), ("proj_q", "proj_y")):
        w, b = _linear(sd, src, "openvqa")
        out[f"{dst}.weight"] = w
        if b is not None:
            out[f"{dst}.bias"] = b
    return out


def _openvqa_stage(source: Source, prefix: str, factor, dropout, index: Optional[int] = None):
    """Weights and options of one openvqa MFB (an MFB or an MFH stage).

    Returns ``(state dict, factor, dropout, is_first or None, holder module)``."""
    where = "" if index is None else f"stages[{index}]: "
    module = _holder(source, prefix)
    sd = openvqa_state_dict(source, prefix=prefix)
    rows = _pair_rows(sd["proj_x.weight"], sd["proj_y.weight"], ("proj_i", "proj_q"))
    pool = getattr(module, "pool", None)
    if pool is not None:
        k = _pool_k(pool)
        if factor is None:
            factor = k
        elif factor != k:
            raise ValueError(f"{where}factor={factor!r} contradicts the source's "
                             f"pool.kernel_size={k}")
    if factor is None:
        raise ValueError(f"{where}factor is required when source is a state dict: openvqa "
                         f"keeps MFB_K in its config, not in the checkpoint")
    factor = _check_factor(factor, rows)
    drop_module = getattr(module, "dropout", None)
    rate = drop_module.p if isinstance(drop_module, nn.Dropout) else _UNSET
    if dropout is _UNSET:
        dropout = OPENVQA_DEFAULT_DROPOUT if rate is _UNSET else rate
    elif rate is not _UNSET and rate != dropout:
        raise ValueError(f"{where}dropout={dropout!r} contradicts the source's "
                         f"dropout.p={rate!r}")
    is_first = getattr(module, "is_first", None) if module is not None else None
    return sd, factor, dropout, is_first, module


def _refuse_later_stage_state_dict(source: Source, prefix: str) -> None:
    """openvqa names MFH stages ``mfh1``, ``mfh2``: a state dict selected at ``mfh2.``
    (or later) holds a stage that multiplies by the previous stage's product, and
    converting it alone gives a plain MFB silently."""
    if isinstance(source, nn.Module) or not isinstance(prefix, str):
        return  # modules are checked by is_first; a bad prefix type by _holder
    last = prefix.rstrip(".").rsplit(".", 1)[-1]
    if last.startswith("mfh") and last[3:].isdigit() and int(last[3:]) > 1:
        raise ValueError(f"prefix={prefix!r} selects openvqa MFH stage {last!r}, which "
                         f"multiplies by the previous stage's expanded product; convert "
                         f"the whole cascade with from_openvqa_mfh([stage1, stage2, ...])")


def from_openvqa_mfb(source: Source, factor=None, *, prefix: str = "", dropout=_UNSET,
                     norm_dims: int = 2, eps: float = CONVERT_EPS, backend: str = "auto",
                     save_projections: bool = False) -> FactorizedBilinearPooling:
    """Convert an openvqa ``MFB`` (module or state dict) to a fused layer.

    What openvqa's ``MFB.forward(img_feat (N, C, m), ques_feat (N, 1, n))`` computes::

        a = proj_i(img_feat); c = proj_q(ques_feat)      # (N, C, k*o), (N, 1, k*o)
        p = dropout(a * c)                               # nn.Dropout(DROPOUT_R)
        s = AvgPool1d(k, stride=k)(p) * k                # = sum of k consecutive columns
        t = sqrt(relu(s)) - sqrt(relu(-s))               # textbook signed sqrt
        z = F.normalize(t.view(N, -1)).view(N, C, o)     # L2 over all C*o values
        return z, p

    The returned layer (``factor=k``, ``dropout`` = the source's rate,
    ``normalize=True``, ``norm_dims``) reproduces ``z`` for 3-D inputs ``(N, C, .)``,
    which is what openvqa feeds (``C`` = 1 in ``CoAtt``, regions in ``IAtt``):
    ``norm_dims=2`` (default) is openvqa's joint normalisation of the ``C*o`` values
    of a sample.  For 2-D inputs ``(N, m)`` openvqa normalises each row: pass
    ``norm_dims=1`` (``norm_dims=2`` would normalise the whole batch together).
    :func:`swap_fusions` picks it per call.  Differences that remain:

    * the signed square root is the zero-safe one; see the module docstring for the
      bound ``||z_openvqa - z|| <= 2 sqrt(o * eps / sum|s|)`` and how ``eps`` tunes it;
    * only ``z`` is returned, not the expanded product ``p``, so an MFH stage
      (``is_first=False``) is refused here: convert the cascade with
      :func:`from_openvqa_mfh`.

    Dropout acts at the same place (on ``p``, before pooling) with the same rate,
    but draws a different random mask.

    Args:
        source: an openvqa ``MFB`` module (or a model holding one at ``prefix``, whose
            options are then read from that submodule), or a state dict with
            ``proj_i.*`` and ``proj_q.*`` (after ``prefix``).
        factor: ``MFB_K``.  Read from the module's ``pool.kernel_size``; required for
            a state dict (the checkpoint does not record it).
        dropout: defaults to the module's ``dropout.p``, or openvqa's default 0.1
            for a state dict (dropout does not change evaluation outputs).
        norm_dims, eps, backend, save_projections: options of the new layer.

    Returns:
        :class:`FactorizedBilinearPooling` with ``x`` = image features (``proj_i``)
        and ``y`` = question features (``proj_q``), weights copied in the source's
        dtype and device, in the source module's train/eval state.
    """
    _refuse_later_stage_state_dict(source, prefix)
    sd, factor, dropout, is_first, module = _openvqa_stage(source, prefix, factor, dropout)
    if is_first is False:
        raise ValueError("source is an openvqa MFH stage (is_first=False): it multiplies by "
                         "the previous stage's expanded product, which a single MFB layer "
                         "does not have; convert the cascade with from_openvqa_mfh")
    layer = _build(sd, factor, dropout=dropout, normalize=True, eps=eps, backend=backend,
                   save_projections=save_projections, norm_dims=norm_dims)
    return _inherit(layer, module)


def from_openvqa_mfh(stages: Sequence[Source], factor=None, *, prefixes=None,
                     dropout=_UNSET, norm_dims: int = 2, eps: float = CONVERT_EPS,
                     backend: str = "auto") -> MultimodalFactorizedHighOrderPooling:
    """Convert openvqa's MFH cascade (``CoAtt.mfh1``, ``mfh2``, ...) to one fused
    :class:`~fbp_kernels.MultimodalFactorizedHighOrderPooling`.

    openvqa's stage ``l > 1`` computes ``p_l = dropout(a_l * c_l * p_{l-1})`` and
    each stage's ``z_l`` as in :func:`from_openvqa_mfb`; ``CoAtt`` concatenates
    ``z_1 .. z_L`` (after squeezing ``C = 1``).  The fused layer returns the same
    concatenation ``(..., L*o)``, block ``l`` at ``[..., l*o:(l+1)*o]``.

    Args:
        stages: the cascade's MFB modules (or state dicts) in order: the first with
            ``is_first=True``, the others ``False`` (checked on modules).
        factor: ``MFB_K``; read from the modules, required for state dicts.
        prefixes: ``None`` or one prefix per stage (for whole-model state dicts, e.g.
            ``["backbone.mfh1.", "backbone.mfh2."]``).
        dropout: common rate of all stages (read from the modules; they must agree).
        norm_dims, eps, backend: as in :func:`from_openvqa_mfb`.
    """
    if isinstance(stages, (nn.Module, Mapping)) or not hasattr(stages, "__iter__"):
        raise TypeError("stages must be a list of the cascade's MFB modules (or state "
                        "dicts) in order, e.g. [coatt.mfh1, coatt.mfh2]")
    stages = list(stages)
    if len(stages) < 1:
        raise ValueError("stages is empty: MFH needs at least one stage")
    prefixes = [""] * len(stages) if prefixes is None else list(prefixes)
    if len(prefixes) != len(stages):
        raise ValueError(f"prefixes must have one entry per stage ({len(stages)}), got "
                         f"{len(prefixes)}")
    converted, rates, training = [], [], None
    for i, (src, pre) in enumerate(zip(stages, prefixes)):
        sd, factor_i, rate, is_first, module = _openvqa_stage(src, pre, factor, _UNSET, i)
        if is_first is not None and is_first != (i == 0):
            raise ValueError(f"stages[{i}] has is_first={is_first}: the first stage must "
                             f"have is_first=True and every later one is_first=False "
                             f"(stages in cascade order)")
        if factor is None:
            factor = factor_i
        converted.append(sd)
        if module is not None:
            rates.append(rate)
            training = module.training if training is None else training
    if dropout is _UNSET:
        if len(set(rates)) > 1:
            raise ValueError(f"the stages' dropout rates differ ({rates}); the fused MFH "
                             f"has one rate for all blocks")
        dropout = rates[0] if rates else OPENVQA_DEFAULT_DROPOUT
    elif any(r != dropout for r in rates):
        raise ValueError(f"dropout={dropout!r} contradicts the stages' dropout.p={rates}")
    layer = MultimodalFactorizedHighOrderPooling.from_linear(
        [_copy_linear(sd["proj_x.weight"], sd.get("proj_x.bias")) for sd in converted],
        [_copy_linear(sd["proj_y.weight"], sd.get("proj_y.bias")) for sd in converted],
        factor, dropout=dropout, normalize=True, eps=eps, backend=backend,
        norm_dims=norm_dims)
    if training is not None:
        layer.train(training)
    return layer


def _build(sd: Dict[str, Tensor], factor: int, **options) -> FactorizedBilinearPooling:
    proj_x = _copy_linear(sd["proj_x.weight"], sd.get("proj_x.bias"))
    proj_y = _copy_linear(sd["proj_y.weight"], sd.get("proj_y.bias"))
    layer = FactorizedBilinearPooling.from_linear(proj_x, proj_y, factor, **options)
    # A bad conversion fails now, not at the first forward (the rules of fbp()).
    check_options(factor, options["dropout"], options["eps"])
    return layer


# --------------------------------------------------------------------------- block

def block_state_dict(source: Source, *, prefix: str = "") -> Dict[str, Tensor]:
    """block.bootstrap MFB fusion weights renamed for :class:`FactorizedBilinearPooling`.

    ``linear0.* -> proj_x.*`` and ``linear1.* -> proj_y.*``; ``linear_out`` and other
    keys are dropped (``linear_out`` is an ordinary ``nn.Linear`` applied after the
    fusion; :class:`BlockMFB` keeps it).
    """
    sd = _state_dict(source, prefix)
    out = {}
    for src, dst in (("linear0", "proj_x"), ("linear1", "proj_y")):
        w, b = _linear(sd, src, "block.bootstrap")
        out[f"{dst}.weight"] = w
        if b is not None:
            out[f"{dst}.bias"] = b
    return out


_BLOCK_WHY = {
    "activ_input": "block applies it to both projections (its default 'relu' is in every "
                   "shipped config); pass activ_input='relu', 'tanh' or None",
    "normalize": "it decides whether the signed sqrt and L2 normalisation run; pass "
                 "normalize=True or False",
    "activ_output": "it is applied after linear_out; pass activ_output='relu' (block's "
                    "default), another torch.nn.functional name, or None",
}


def _block_common(source: Source, prefix: str, names: Sequence[Tuple[str, str]],
                  out_blocks: int, factor, mm_dim, activ_input, normalize, dropout_input,
                  drop_name: str, drop_value, strict: bool):
    """Resolve the options shared by block's MFB and MFH and refuse what the fused
    layers cannot honour.  ``names`` are the (x, y) projection names per block."""
    module = _holder(source, prefix)
    sd = _state_dict(source, prefix)
    pairs = []
    for nx, ny in names:
        wx, bx = _linear(sd, nx, "block.bootstrap")
        wy, by = _linear(sd, ny, "block.bootstrap")
        rows = _pair_rows(wx, wy, (nx, ny))
        pairs.append(((wx, bx), (wy, by)))
    if len({p[0][0].shape[0] for p in pairs}) > 1:
        raise ValueError("the MFH blocks' projections have different widths")
    out_w = sd.get("linear_out.weight")
    if out_w is not None and (not isinstance(out_w, Tensor) or out_w.dim() != 2):
        raise ValueError(f"linear_out.weight must be a 2-D tensor (out_features, mm_dim), got "
                         f"{getattr(out_w, 'shape', type(out_w).__name__)}")
    inferred_mm = out_w.shape[1] // out_blocks if isinstance(out_w, Tensor) else _UNSET
    mm_dim = _option("mm_dim", _UNSET if mm_dim is None else mm_dim, module, "mm_dim",
                     inferred_mm)
    if inferred_mm is not _UNSET and mm_dim != inferred_mm:
        raise ValueError(f"mm_dim={mm_dim!r} contradicts linear_out, which takes "
                         f"{out_w.shape[1]} features ({out_blocks} x mm_dim)")
    factor = _option("factor", _UNSET if factor is None else factor, module, "factor",
                     _UNSET)
    if factor is _UNSET:
        if mm_dim is _UNSET:
            raise ValueError("factor is required: the state dict has no linear_out from "
                             "which mm_dim (and so factor = rows / mm_dim) could be read")
        if isinstance(mm_dim, bool) or not isinstance(mm_dim, int) or mm_dim < 1 \
                or rows % mm_dim:
            raise ValueError(f"mm_dim must be an int >= 1 dividing {names[0][0]}'s "
                             f"out_features={rows}, got {mm_dim!r}")
        factor = rows // mm_dim
    factor = _check_factor(factor, rows)
    if mm_dim is not _UNSET and mm_dim * factor != rows:
        raise ValueError(f"mm_dim={mm_dim} and factor={factor} do not match {names[0][0]}'s "
                         f"out_features={rows} (block uses mm_dim * factor)")
    opts = {
        "activation": _activation(_required("activ_input", activ_input, module,
                                            "activ_input", _BLOCK_WHY["activ_input"])),
        "normalize": bool(_required("normalize", normalize, module, "normalize",
                                    _BLOCK_WHY["normalize"])),
        # Dropout rates only act in training; a state dict defaults them to block's 0.
        "dropout": _option(drop_name, drop_value, module, drop_name, 0.0),
    }
    d_in = _option("dropout_input", dropout_input, module, "dropout_input", 0.0)
    if d_in:
        msg = (f"dropout_input={d_in!r} drops the projections before the product; the "
               f"fused layer only drops the product ({drop_name}). Evaluation outputs are "
               f"identical, training differs")
        if strict:
            raise ValueError(msg + "; pass strict=False to convert without it")
        warnings.warn(msg + "; converted without it", stacklevel=4)
    return pairs, sd, factor, opts, module


def _block_fusion(pairs, factor, opts, eps, backend, share_from=None, **extra):
    """The fused layer: FBP for one block pair, MFH for several.  ``share_from`` is a
    list of (x, y) ``nn.Linear`` pairs to wrap as they are (swap_fusions)."""
    if share_from is None:
        share_from = [(_copy_linear(*px), _copy_linear(*py)) for px, py in pairs]
    kw = dict(dropout=opts["dropout"], normalize=opts["normalize"], eps=eps,
              backend=backend, activation=opts["activation"])
    check_options(factor, opts["dropout"], eps)
    if len(share_from) == 1:
        return FactorizedBilinearPooling.from_linear(share_from[0][0], share_from[0][1],
                                                     factor, **kw, **extra)
    return MultimodalFactorizedHighOrderPooling.from_linear(
        [p[0] for p in share_from], [p[1] for p in share_from], factor, **kw)


def from_block_mfb(source: Source, factor=None, *, prefix: str = "", mm_dim=None,
                   activ_input=_UNSET, normalize=_UNSET, dropout_input=_UNSET,
                   dropout_pre_norm=_UNSET, strict: bool = True, eps: float = CONVERT_EPS,
                   backend: str = "auto",
                   save_projections: bool = False) -> FactorizedBilinearPooling:
    """Convert the fusion part of a block.bootstrap (or mmf ``fusions``) ``MFB``.

    What block's ``MFB.forward([x0 (B, d0), x1 (B, d1)])`` computes::

        a = activ_input(linear0(x0)); c = activ_input(linear1(x1))  # (B, mm_dim*factor)
        a, c = dropout(a, dropout_input), dropout(c, dropout_input)
        p = dropout(a * c, dropout_pre_norm)
        s = p.view(B, mm_dim, factor).sum(2)          # factor consecutive columns
        if normalize: s = F.normalize(sqrt(relu(s)) - sqrt(relu(-s)), p=2)   # per row
        z = activ_output(linear_out(s)); z = dropout(z, dropout_output)

    The returned layer computes ``s`` or its normalised form (zero-safe signed sqrt,
    within the bound of the module docstring) with ``activation = activ_input``
    (``None``/``''``, ``'relu'`` or ``'tanh'``; others are refused), ``x = x0``,
    ``y = x1`` and ``dropout = dropout_pre_norm``.  ``linear_out`` and after are not
    part of it: use :class:`BlockMFB` for the whole module.

    Options are read from the module that holds the weights (``source``, or its
    submodule at ``prefix``).  For a state dict, ``activ_input`` and ``normalize`` are
    required (they change the maths and the checkpoint does not record them); the
    dropout rates default to 0.  ``dropout_input > 0`` is refused unless
    ``strict=False`` (evaluation would still match).  ``factor`` is inferred from
    ``linear_out`` (``factor = linear0 rows / mm_dim``) when not given.
    """
    pairs, _, factor, opts, module = _block_common(
        source, prefix, [("linear0", "linear1")], 1, factor, mm_dim, activ_input,
        normalize, dropout_input, "dropout_pre_norm", dropout_pre_norm, strict)
    layer = _block_fusion(pairs, factor, opts, eps, backend,
                          save_projections=save_projections)
    return _inherit(layer, module)


class _BlockHead(nn.Module):
    """``fusion``, then ``linear_out``, ``activ_output`` and output dropout, called
    like block's fusions with one sequence ``[x0, x1]``."""

    def __init__(self, fusion: nn.Module, linear_out: nn.Linear,
                 activ_output: Optional[str] = "relu", dropout_output: float = 0.0) -> None:
        super().__init__()
        if activ_output and not callable(getattr(F, activ_output, None)):
            raise ValueError(f"activ_output must name a torch.nn.functional function, "
                             f"got {activ_output!r}")
        width = getattr(fusion, "output_features", None) or fusion.out_features
        if width != linear_out.in_features:
            raise ValueError(f"linear_out expects {linear_out.in_features} features but the "
                             f"fusion gives {width}")
        self.fusion = fusion
        self.linear_out = linear_out
        self.activ_output = activ_output
        check_rate("dropout_output", dropout_output)
        self.dropout_output = dropout_output

    @classmethod
    def _head(cls, fusion, sd, module, activ_output, dropout_output, share):
        act = _required("activ_output", activ_output, module, "activ_output",
                        _BLOCK_WHY["activ_output"])
        drop = _option("dropout_output", dropout_output, module, "dropout_output", 0.0)
        if share:
            lin = module.linear_out
        else:
            lin = _copy_linear(*_linear(sd, "linear_out", "block.bootstrap"))
        return _inherit(cls(fusion, lin, act, drop), module)

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        """``x = [x0 (..., d0), x1 (..., d1)]`` -> ``(..., output_dim)``."""
        if not isinstance(x, (list, tuple)) or len(x) != 2:
            raise TypeError(f"{type(self).__name__} takes one sequence [x0, x1] of two "
                            f"tensors, as block.bootstrap's fusions do")
        z = self.linear_out(self.fusion(x[0], x[1]))
        if self.activ_output:
            z = getattr(F, self.activ_output)(z)
        if self.dropout_output > 0:
            z = F.dropout(z, p=self.dropout_output, training=self.training)
        return z


class BlockMFB(_BlockHead):
    """Drop-in replacement for a whole block.bootstrap ``MFB`` module.

    ``forward([x0 (..., d0), x1 (..., d1)]) -> (..., output_dim)``, called like block's
    (one sequence of two tensors): the fused ``fusion`` layer (with block's
    ``activ_input`` as its ``activation``), then ``linear_out``, ``activ_output`` (a
    ``torch.nn.functional`` name, or ``None``/``''``) and output dropout.  Build it
    with :meth:`from_block`.
    """

    @classmethod
    def from_block(cls, source: Source, factor=None, *, prefix: str = "", mm_dim=None,
                   activ_input=_UNSET, normalize=_UNSET, dropout_input=_UNSET,
                   dropout_pre_norm=_UNSET, activ_output=_UNSET, dropout_output=_UNSET,
                   strict: bool = True, eps: float = CONVERT_EPS, backend: str = "auto",
                   save_projections: bool = False, _share: bool = False) -> "BlockMFB":
        """Convert a block.bootstrap ``MFB`` (module, or state dict with ``linear0``,
        ``linear1`` and ``linear_out``); see :func:`from_block_mfb` for the options.
        A state dict also needs ``activ_output`` (``dropout_output`` defaults to 0)."""
        pairs, sd, factor, opts, module = _block_common(
            source, prefix, [("linear0", "linear1")], 1, factor, mm_dim, activ_input,
            normalize, dropout_input, "dropout_pre_norm", dropout_pre_norm, strict)
        shared = [(module.linear0, module.linear1)] if _share else None
        fusion = _block_fusion(pairs, factor, opts, eps, backend, shared,
                               save_projections=save_projections)
        return cls._head(fusion, sd, module, activ_output, dropout_output, _share)


class BlockMFH(_BlockHead):
    """Drop-in replacement for a whole block.bootstrap (or mmf ``fusions``) ``MFH``.

    ``forward([x0 (..., d0), x1 (..., d1)]) -> (..., output_dim)``: a fused
    :class:`~fbp_kernels.MultimodalFactorizedHighOrderPooling` of order 2
    (``linear0_0``/``linear1_0`` then ``linear0_1``/``linear1_1``), whose output
    ``concat(z_0, z_1)`` is block's, then ``linear_out`` (``2*mm_dim -> output_dim``),
    ``activ_output`` and output dropout.  Build it with :func:`from_block_mfh`.
    """


def from_block_mfh(source: Source, factor=None, *, prefix: str = "", mm_dim=None,
                   activ_input=_UNSET, normalize=_UNSET, dropout_input=_UNSET,
                   dropout_pre_lin=_UNSET, activ_output=_UNSET, dropout_output=_UNSET,
                   strict: bool = True, eps: float = CONVERT_EPS, backend: str = "auto",
                   _share: bool = False) -> BlockMFH:
    """Convert a block.bootstrap ``MFH`` (module or state dict) to :class:`BlockMFH`.

    block's ``MFH`` runs two MFB blocks: ``p_0 = drop(a_0 * c_0)``,
    ``p_1 = drop(a_1 * c_1 * p_0)`` (``drop`` = ``dropout_pre_lin``), each sum-pooled
    over ``factor`` consecutive columns and, if ``normalize``, signed-sqrt and L2
    normalised per row; ``activ_input`` acts on every projection.  That is this
    package's MFH cascade with ``dropout = dropout_pre_lin`` and ``activation =
    activ_input``.  Options, state-dict rules and refusals as in
    :func:`from_block_mfb` and :meth:`BlockMFB.from_block`; ``factor`` is inferred
    from ``linear_out`` (which takes ``2 * mm_dim``) when not given.
    """
    names = [("linear0_0", "linear1_0"), ("linear0_1", "linear1_1")]
    pairs, sd, factor, opts, module = _block_common(
        source, prefix, names, 2, factor, mm_dim, activ_input, normalize, dropout_input,
        "dropout_pre_lin", dropout_pre_lin, strict)
    shared = [(getattr(module, a), getattr(module, b)) for a, b in names] if _share else None
    fusion = _block_fusion(pairs, factor, opts, eps, backend, shared)
    return BlockMFH._head(fusion, sd, module, activ_output, dropout_output, _share)


# --------------------------------------------------------------------------- per-sample norm

def _per_sample_norm_dims(x: Tensor, y: Tensor) -> int:
    """openvqa and mmf normalise ``t.view(N, -1)``: everything but the first batch
    dimension, i.e. ``norm_dims`` = the number of batch dimensions."""
    return max(1, len(torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])))


def _run(fusion: nn.Module, x: Tensor, y: Tensor, norm_dims: int) -> Tensor:
    """``fusion``'s forward with ``norm_dims`` chosen for this call."""
    if isinstance(fusion, MultimodalFactorizedHighOrderPooling):
        return mfh(x, y, [p.weight for p in fusion.proj_x], [p.weight for p in fusion.proj_y],
                   [p.bias for p in fusion.proj_x], [p.bias for p in fusion.proj_y],
                   factor=fusion.factor, dropout=fusion.dropout, training=fusion.training,
                   normalize=fusion.normalize, eps=fusion.eps, backend=fusion.backend,
                   norm_dims=norm_dims, activation=fusion.activation)
    return fbp(x, y, fusion.proj_x.weight, fusion.proj_y.weight, fusion.proj_x.bias,
               fusion.proj_y.bias, factor=fusion.factor, dropout=fusion.dropout,
               training=fusion.training, normalize=fusion.normalize, eps=fusion.eps,
               backend=fusion.backend, save_projections=fusion.save_projections,
               norm_dims=norm_dims, activation=fusion.activation)


class OpenVQAMFB(nn.Module):
    """openvqa-compatible fused MFB: ``forward(img (N, C, m), ques (N, 1, n),
    exp_in=1) -> (z (N, C, o), None)``, so call sites that unpack
    ``z, _ = self.mfb(...)`` keep working.  The second element is ``None`` because
    the fused layer never materialises the expanded product; :func:`swap_fusions`
    only installs it where that product is not consumed.  The normalisation spans
    each sample (``norm_dims`` = number of batch dimensions), as openvqa's
    ``F.normalize(t.view(N, -1))`` does for any input rank."""

    def __init__(self, fusion: FactorizedBilinearPooling) -> None:
        super().__init__()
        self.fusion = fusion

    def forward(self, img_feat: Tensor, ques_feat: Tensor, exp_in=1):
        return _run(self.fusion, img_feat, ques_feat,
                    _per_sample_norm_dims(img_feat, ques_feat)), None


class _OpenVQACarry:
    """What a swapped openvqa MFH stage returns in place of its expanded product:
    the later stages' outputs, already computed by the one fused MFH call, and the
    identity of the inputs they were computed from (checked by the next stage)."""

    def __init__(self, rest: Tensor, o: int, inputs) -> None:
        self.rest, self.o, self.inputs = rest, o, inputs

    def take(self, img: Tensor, ques: Tensor, where: str):
        if _input_key(img, ques) != self.inputs:
            raise ValueError(f"{where} was called with other inputs than the first MFH "
                             f"stage; the swapped cascade computes every stage from the "
                             f"first stage's inputs, as openvqa's CoAtt calls them")
        z, rest = self.rest[..., :self.o], self.rest[..., self.o:]
        return z, (_OpenVQACarry(rest, self.o, self.inputs) if rest.shape[-1] else None)


def _input_key(img: Tensor, ques: Tensor):
    # unsqueeze(1) views share storage and offset, so the same features called twice
    # match; shapes guard against a different slice of the same storage.
    return (img.data_ptr(), tuple(img.shape), ques.data_ptr(), tuple(ques.shape))


class OpenVQAMFHFirst(nn.Module):
    """Swapped first stage of an openvqa MFH cascade (``CoAtt.mfh1``): runs the whole
    fused MFH once and returns ``(z_1, carry)``; the carry, passed as ``exp_in`` to
    the next stage (:class:`OpenVQAMFHLater`), holds the later stages' outputs.  The
    call sites ``z1, exp1 = self.mfh1(i, q)`` and ``z2, _ = self.mfh2(i, q, exp1)``
    are unchanged.  Dropout is drawn where openvqa's is, on every stage's product."""

    def __init__(self, fusion: MultimodalFactorizedHighOrderPooling) -> None:
        super().__init__()
        self.fusion = fusion

    def forward(self, img_feat: Tensor, ques_feat: Tensor, exp_in=1):
        z = _run(self.fusion, img_feat, ques_feat, _per_sample_norm_dims(img_feat, ques_feat))
        o = self.fusion.out_features
        return z[..., :o], _OpenVQACarry(z[..., o:], o, _input_key(img_feat, ques_feat))


class OpenVQAMFHLater(nn.Module):
    """Swapped later stage of an openvqa MFH cascade: ``forward(img, ques, exp_in)``
    with ``exp_in`` the previous stage's carry; returns ``(z_l, carry or None)``.
    Holds no parameters (its projections live in the first stage's fused MFH)."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, img_feat: Tensor, ques_feat: Tensor, exp_in=1):
        if not isinstance(exp_in, _OpenVQACarry):
            raise TypeError(f"swapped openvqa MFH stage {self.stage + 1} needs exp_in = the "
                            f"second output of the previous swapped stage, got "
                            f"{type(exp_in).__name__}")
        return exp_in.take(img_feat, ques_feat, f"MFH stage {self.stage + 1}")

    def extra_repr(self) -> str:
        return f"stage={self.stage}"


# --------------------------------------------------------------------------- mmf

class MmfMFH(nn.Module):
    """Drop-in replacement for mmf's ``layers.MFH``:
    ``forward(image_feat (N, K, i) or (N, i), question_embedding (N, q))
    -> (N, K, order*o)`` or ``(N, order*o)``.  The question is broadcast over the
    regions as mmf does, and each block is normalised over all regions of a sample
    (mmf's ``F.normalize(t.view(N, -1))``)."""

    def __init__(self, fusion: MultimodalFactorizedHighOrderPooling) -> None:
        super().__init__()
        self.fusion = fusion

    @property
    def out_dim(self) -> int:  # mmf's attribute, read by the layers after it
        return self.fusion.output_features

    def forward(self, image_feat: Tensor, question_embedding: Tensor) -> Tensor:
        q = question_embedding
        if image_feat.dim() == 3 and q.dim() == 2:
            q = q.unsqueeze(1)  # mmf expands the question over the K regions
        return _run(self.fusion, image_feat, q, _per_sample_norm_dims(image_feat, q))


def from_mmf_mfh(source: Source, pool_size=None, *, prefix: str = "", dropout=_UNSET,
                 order=None, eps: float = CONVERT_EPS, backend: str = "auto",
                 _share: bool = False) -> MmfMFH:
    """Convert mmf's ``modules.layers.MFH`` (module or state dict) to :class:`MmfMFH`.

    mmf's MFH: per stage ``i``, ``e_i = dropout(lc_image(img) * lc_ques(q))``,
    ``p_i = p_{i-1} * e_i`` (``p_0 = 1``), sum-pool ``pool_size`` consecutive columns,
    textbook signed sqrt, L2 over all regions of a sample; concatenation over stages.
    Multiplying the dropped ``e_i`` by ``p_{i-1}`` equals dropping the product, so
    this is this package's MFH with ``factor = pool_size`` and joint normalisation.

    ``pool_size`` and ``dropout`` are read from the module (``pool_size`` attribute,
    ``mfb_expand_list[i].dropout.p``); for a state dict both are required (mmf keeps
    them in its config), and ``order`` defaults to the number of stages found.
    Refused: stages of different ``hidden_sizes`` (the fused MFH multiplies the
    blocks' products elementwise, so they must have one width).
    """
    module = _holder(source, prefix)
    sd = _state_dict(source, prefix)
    stages = sorted({int(k.split(".")[1]) for k in sd
                     if k.startswith("mfb_expand_list.") and k.split(".")[1].isdigit()})
    if not stages:
        raise ValueError("source has no 'mfb_expand_list.<i>.lc_image.weight', so it is not "
                         "an mmf layers.MFH (wrong prefix?)")
    if stages != list(range(len(stages))):
        raise ValueError(f"mfb_expand_list stages are not 0..n-1: {stages}")
    order = _option("order", _UNSET if order is None else order, module, "order",
                    len(stages))
    if order != len(stages):
        raise ValueError(f"order={order} but the source holds {len(stages)} stages")
    pool_size = _required("pool_size", _UNSET if pool_size is None else pool_size, module,
                          "pool_size", "it is mmf's factor (kwargs['pool_size']); pass it")
    rates = []
    if module is not None:
        rates = [m.dropout.p for m in module.mfb_expand_list]
        if len(set(rates)) > 1:
            raise ValueError(f"the stages' dropout rates differ ({rates}); the fused MFH "
                             f"has one rate")
    if dropout is _UNSET:
        if not rates:
            raise ValueError("dropout is required when source is a state dict: mmf keeps it "
                             "in its config (kwargs['dropout'])")
        dropout = rates[0]
    elif rates and rates[0] != dropout:
        raise ValueError(f"dropout={dropout!r} contradicts the source's dropout.p={rates[0]!r}")
    projs = []
    for i in range(order):
        wx, bx = _linear(sd, f"mfb_expand_list.{i}.lc_image", "mmf")
        wy, by = _linear(sd, f"mfb_expand_list.{i}.lc_ques", "mmf")
        _pair_rows(wx, wy, (f"mfb_expand_list.{i}.lc_image", f"mfb_expand_list.{i}.lc_ques"))
        if _share:
            stage = module.mfb_expand_list[i]
            projs.append((stage.lc_image, stage.lc_ques))
        else:
            projs.append((_copy_linear(wx, bx), _copy_linear(wy, by)))
    widths = [p[0].out_features for p in projs]
    if len(set(widths)) > 1:
        raise ValueError(f"hidden_sizes={widths}: the fused MFH needs one hidden size for "
                         f"all stages (their products are multiplied elementwise)")
    pool_size = _check_factor(pool_size, widths[0])
    check_options(pool_size, dropout, eps)
    fusion = MultimodalFactorizedHighOrderPooling.from_linear(
        [p[0] for p in projs], [p[1] for p in projs], pool_size, dropout=dropout,
        normalize=True, eps=eps, backend=backend)
    return _inherit(MmfMFH(fusion), module)


# --------------------------------------------------------------------------- swap

@dataclass
class SwapRecord:
    """One module :func:`swap_fusions` looked at: its dotted ``name`` in the model,
    the peer ``kind`` it was recognised as (``"openvqa.MFB"``, ``"block.MFB"``,
    ``"block.MFH"``, ``"mmf.MFH"``, or ``None`` when only its class name suggested a
    fusion), whether it was ``replaced`` (by ``replacement``, a class name), and
    ``reason``: why it was left alone (empty when replaced)."""

    name: str
    kind: Optional[str]
    replaced: bool
    replacement: str = ""
    reason: str = ""


def _is_proj(m) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))


def _kind(m: nn.Module) -> Optional[str]:
    """Which peer ``m`` is, by structure (attribute names and types)."""
    has = lambda *names: all(_is_proj(getattr(m, n, None)) for n in names)  # noqa: E731
    if has("proj_i", "proj_q") and isinstance(getattr(m, "pool", None), nn.AvgPool1d) \
            and isinstance(getattr(m, "dropout", None), nn.Dropout):
        return "openvqa.MFB"
    if has("linear0_0", "linear1_0", "linear0_1", "linear1_1", "linear_out") \
            and hasattr(m, "activ_input"):
        return "block.MFH"
    if has("linear0", "linear1", "linear_out") and hasattr(m, "factor") \
            and hasattr(m, "dropout_pre_norm"):
        return "block.MFB"
    stages = getattr(m, "mfb_expand_list", None)
    if isinstance(stages, nn.ModuleList) and hasattr(m, "pool_size") and len(stages) and \
            all(_is_proj(getattr(s, "lc_image", None)) and _is_proj(getattr(s, "lc_ques", None))
                for s in stages):
        return "mmf.MFH"
    return None


def _openvqa_swap(m: nn.Module, consumed: bool, options) -> nn.Module:
    if m.is_first is False:
        raise ValueError("is_first=False: an openvqa MFH stage multiplies by the previous "
                         "stage's expanded product, which the fused layer does not return; "
                         "convert the cascade with from_openvqa_mfh and change the call site")
    if consumed:
        raise ValueError("its expanded product (the second output) feeds a later MFH stage "
                         "(a sibling with is_first=False), and the fused layer does not "
                         "return it; convert the cascade with from_openvqa_mfh")
    if not isinstance(m.proj_i, nn.Linear) or not isinstance(m.proj_q, nn.Linear):
        raise ValueError("openvqa projections are expected to be nn.Linear")
    sd, factor, dropout, _, _ = _openvqa_stage(m, "", None, _UNSET)
    fusion = FactorizedBilinearPooling.from_linear(
        m.proj_i, m.proj_q, factor, dropout=dropout, normalize=True, **options)
    return OpenVQAMFB(fusion)


def _openvqa_cascade(stages: List[nn.Module], options) -> List[nn.Module]:
    """Swapped modules for an openvqa MFH cascade, sharing its projections."""
    for i, m in enumerate(stages):
        if not isinstance(m.proj_i, nn.Linear) or not isinstance(m.proj_q, nn.Linear):
            raise ValueError(f"stage {i + 1}: openvqa projections are expected to be nn.Linear")
    from_openvqa_mfh(stages)  # the checks (order, is_first, factor, one dropout rate)
    factor = _pool_k(stages[0].pool)
    fusion = MultimodalFactorizedHighOrderPooling.from_linear(
        [m.proj_i for m in stages], [m.proj_q for m in stages], factor,
        dropout=stages[0].dropout.p, normalize=True, **options)
    first = OpenVQAMFHFirst(fusion).train(stages[0].training)
    return [first] + [OpenVQAMFHLater(i).train(m.training)
                      for i, m in enumerate(stages[1:], 1)]


def swap_fusions(model: nn.Module, **options) -> List[SwapRecord]:
    """Replace, in place, every peer MFB/MFH module of ``model`` with a fused one.

    Recognised by structure (attribute names and types, not class names):

    * openvqa ``MFB`` (``proj_i``, ``proj_q``, ``pool: AvgPool1d``, ``dropout``) ->
      :class:`OpenVQAMFB`, which returns ``(z, None)`` like openvqa's ``(z, exp_out)``
      so ``z, _ = self.mfb(...)`` still works.  An MFH cascade (siblings: one
      ``is_first=True`` stage registered first, then ``is_first=False`` ones, as
      ``CoAtt.mfh1``/``mfh2``) becomes :class:`OpenVQAMFHFirst` (one fused MFH) and
      :class:`OpenVQAMFHLater` stages, keeping the call sites
      ``z1, exp1 = self.mfh1(i, q); z2, _ = self.mfh2(i, q, exp1)``.  Any other
      arrangement of ``is_first=False`` stages is left alone.
    * block.bootstrap / mmf ``fusions.MFB`` and ``MFH`` -> :class:`BlockMFB` /
      :class:`BlockMFH`.
    * mmf ``layers.MFH`` (``mfb_expand_list``, ``pool_size``) -> :class:`MmfMFH`.

    Each replacement shares the source's parameters (same tensors: the optimizer,
    device and dtype are unchanged) and keeps its train/eval state.  ``options``
    (``eps``, ``backend``, and ``strict`` for block) go to every replacement.  A
    module that is recognised but cannot be reproduced is left alone, with the
    converter's message as the reason; so is one whose class name contains
    ``MFB``/``MFH`` but whose structure is unknown.

    Returns:
        one :class:`SwapRecord` per recognised (or fusion-named) module, in model order.
    """
    allowed = {"eps", "backend", "strict"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"swap_fusions got unknown options {sorted(unknown)}; it accepts "
                        f"{sorted(allowed)}")
    fused = {k: v for k, v in options.items() if k != "strict"}
    strict = options.get("strict", True)
    records: List[SwapRecord] = []

    def visit(parent: nn.Module, path: str) -> None:
        children = list(parent.named_children())
        stages = [(n, c) for n, c in children if _kind(c) == "openvqa.MFB"]
        firsts = [n for n, c in stages if getattr(c, "is_first", True) is not False]
        later = len(firsts) < len(stages)
        done = set()
        if later and len(firsts) == 1 and stages[0][0] == firsts[0]:
            # openvqa's CoAtt: mfh1 (is_first) then mfh2, ... in registration order.
            try:
                new = _openvqa_cascade([c for _, c in stages], fused)
            except (ValueError, TypeError) as exc:
                for n, _ in stages:
                    records.append(SwapRecord(f"{path}{n}", "openvqa.MFH", False,
                                              reason=str(exc)))
                    done.add(n)
            else:
                for i, (n, c) in enumerate(stages):
                    setattr(parent, n, new[i])
                    records.append(SwapRecord(f"{path}{n}", "openvqa.MFH", True,
                                              type(new[i]).__name__))
                    done.add(n)
        for name, child in children:
            if name in done:
                continue
            full = f"{path}{name}"
            kind = _kind(child)
            if kind is None:
                if any(t in type(child).__name__.upper() for t in ("MFB", "MFH")) and \
                        not isinstance(child, (FactorizedBilinearPooling,
                                               MultimodalFactorizedHighOrderPooling,
                                               _BlockHead, OpenVQAMFB, MmfMFH)):
                    records.append(SwapRecord(full, None, False, reason=(
                        f"class {type(child).__name__} looks like a fusion but its "
                        f"attributes match no known peer (openvqa proj_i/proj_q/pool, "
                        f"block linear0/linear1/linear_out, mmf mfb_expand_list)")))
                visit(child, full + ".")
                continue
            try:
                if kind == "openvqa.MFB":
                    new = _openvqa_swap(child, later, fused)
                elif kind == "block.MFB":
                    new = BlockMFB.from_block(child, strict=strict, _share=True, **fused)
                elif kind == "block.MFH":
                    new = from_block_mfh(child, strict=strict, _share=True, **fused)
                else:
                    new = from_mmf_mfh(child, _share=True, **fused)
            except (ValueError, TypeError) as exc:
                records.append(SwapRecord(full, kind, False, reason=str(exc)))
                continue
            new.train(child.training)
            setattr(parent, name, new)
            records.append(SwapRecord(full, kind, True, type(new).__name__))

    visit(model, "")
    return records
