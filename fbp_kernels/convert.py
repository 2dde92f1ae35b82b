"""Load the weights of existing MFB modules into :class:`FactorizedBilinearPooling`.

Two public MFB implementations hold most trained MFB weights people have:

* **openvqa** (``openvqa/models/mfb/mfb.py`` and ``models/mfh/mfh.py``): class ``MFB``
  with ``proj_i`` / ``proj_q`` (``nn.Linear``), ``dropout`` (``nn.Dropout``) and
  ``pool`` (``nn.AvgPool1d(k, stride=k)``).  See :func:`from_openvqa_mfb`.
* **block.bootstrap** (Cadene, ``block/models/networks/fusions/fusions.py``): class
  ``MFB`` with ``linear0`` / ``linear1`` (``nn.Linear(in, mm_dim*factor)``) and
  ``linear_out``.  See :func:`from_block_mfb` and :class:`BlockMFB`.

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

(``sum_j |s_j| = ||t_textbook||^2``).  With the default ``eps = 1e-6`` that is 2e-3 for
``o = 1000`` and a row with ``sum |s| = 1000``; pass a smaller ``eps`` to get closer to
the textbook forward, at the price of gradients up to ``0.5 / sqrt(eps)`` near zero.
Without normalisation (block.bootstrap's default ``normalize=False``) the conversion
is exact up to floating-point rounding.
"""

from __future__ import annotations

import warnings
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import check_options, check_rate
from .modules import FactorizedBilinearPooling
from .reference import DEFAULT_EPS

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


def from_openvqa_mfb(source: Source, factor=None, *, prefix: str = "", dropout=_UNSET,
                     eps: float = DEFAULT_EPS, backend: str = "auto",
                     save_projections: bool = False) -> FactorizedBilinearPooling:
    """Convert an openvqa ``MFB`` (module or state dict) to a fused layer.

    What openvqa's ``MFB.forward(img_feat (N, C, m), ques_feat (N, 1, n))`` computes::

        a = proj_i(img_feat); c = proj_q(ques_feat)      # (N, C, k*o), (N, 1, k*o)
        p = dropout(a * c)                               # nn.Dropout(MFB_DROPOUT_RATIO)
        s = AvgPool1d(k, stride=k)(p) * k                # = sum of k consecutive columns
        t = sqrt(relu(s)) - sqrt(relu(-s))               # textbook signed sqrt
        z = F.normalize(t.view(N, -1)).view(N, C, o)     # L2 over all C*o values
        return z, p

    The returned layer (``factor=k``, ``dropout`` = the source's rate,
    ``normalize=True``) reproduces this, with three documented differences:

    * the signed square root is the zero-safe one; see the module docstring for the
      bound ``||z_openvqa - z|| <= 2 sqrt(o * eps / sum|s|)`` and how ``eps`` tunes it;
    * L2 normalisation is per row ``(..., o)``.  openvqa normalises the ``C*o``
      values of a sample *jointly*, which is the same thing when ``C == 1`` (its
      final fusion in ``CoAtt``, and 2-D inputs) but not for the region-wise MFB in
      ``IAtt`` (``C`` = number of regions).  For that case build the layer with
      ``normalize=False`` and apply openvqa's two lines to its output
      (``t = sqrt(relu(s)) - sqrt(relu(-s)); F.normalize(t.flatten(1))``);
    * only ``z`` is returned, not the expanded product ``p`` (which is exactly what
      the fused layer avoids materialising), so an MFH stage (``is_first=False``,
      which multiplies by the previous stage's ``p``) cannot be converted.

    Dropout acts at the same place (on ``p``, before pooling) with the same rate,
    but draws a different random mask: training is equivalent in distribution, and
    evaluation outputs do not depend on it.

    Args:
        source: an openvqa ``MFB`` module, or a state dict with ``proj_i.*`` and
            ``proj_q.*`` (after ``prefix``).
        factor: ``MFB_FACTOR_NUM`` (k).  Read from the module's ``pool.kernel_size``
            when ``source`` is a module; required for a state dict (the checkpoint
            does not record it).
        dropout: defaults to the module's ``dropout.p``, or openvqa's default 0.1
            for a state dict.
        eps, backend, save_projections: options of the new layer.

    Returns:
        :class:`FactorizedBilinearPooling` with ``x`` = image features (``proj_i``)
        and ``y`` = question features (``proj_q``), weights copied in the source's
        dtype and device.
    """
    module = source if isinstance(source, nn.Module) else None
    if module is not None and getattr(module, "is_first", True) is False:
        raise ValueError("source is an MFH stage (is_first=False): it multiplies by the "
                         "previous stage's expanded product, which the fused MFB layer "
                         "does not return; only first stages (is_first=True) convert")
    sd = openvqa_state_dict(source, prefix=prefix)
    rows = _pair_rows(sd["proj_x.weight"], sd["proj_y.weight"], ("proj_i", "proj_q"))
    pool = getattr(module, "pool", None)
    if pool is not None:
        k = pool.kernel_size
        k = k[0] if isinstance(k, (tuple, list)) else k
        if factor is None:
            factor = k
        elif factor != k:
            raise ValueError(f"factor={factor!r} contradicts the source's "
                             f"pool.kernel_size={k}")
    if factor is None:
        raise ValueError("factor is required when source is a state dict: openvqa keeps "
                         "MFB_FACTOR_NUM in its config, not in the checkpoint")
    factor = _check_factor(factor, rows)
    drop_module = getattr(module, "dropout", None)
    rate = drop_module.p if isinstance(drop_module, nn.Dropout) else _UNSET
    if dropout is _UNSET:
        dropout = OPENVQA_DEFAULT_DROPOUT if rate is _UNSET else rate
    elif rate is not _UNSET and rate != dropout:
        raise ValueError(f"dropout={dropout!r} contradicts the source's dropout.p={rate!r}")
    return _build(sd, factor, dropout=dropout, normalize=True, eps=eps, backend=backend,
                  save_projections=save_projections)


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


def _block_options(source: Source, prefix: str, factor, mm_dim, activ_input, normalize,
                   dropout_input, dropout_pre_norm, strict: bool):
    """Resolve block's MFB options and refuse the ones the fused layer cannot honour."""
    module = source if isinstance(source, nn.Module) else None
    sd = _state_dict(source, prefix)
    fused = block_state_dict(source, prefix=prefix)
    rows = _pair_rows(fused["proj_x.weight"], fused["proj_y.weight"], ("linear0", "linear1"))
    out_w = sd.get("linear_out.weight")
    if out_w is not None and (not isinstance(out_w, Tensor) or out_w.dim() != 2):
        raise ValueError(f"linear_out.weight must be a 2-D tensor (out_features, mm_dim), got "
                         f"{getattr(out_w, 'shape', type(out_w).__name__)}")
    inferred_mm = out_w.shape[1] if isinstance(out_w, Tensor) and out_w.dim() == 2 else _UNSET
    mm_dim = _option("mm_dim", _UNSET if mm_dim is None else mm_dim, module, "mm_dim",
                     inferred_mm)
    if inferred_mm is not _UNSET and mm_dim != inferred_mm:
        raise ValueError(f"mm_dim={mm_dim!r} contradicts linear_out, which takes "
                         f"{inferred_mm} features")
    factor = _option("factor", _UNSET if factor is None else factor, module, "factor",
                     _UNSET)
    if factor is _UNSET:
        if mm_dim is _UNSET:
            raise ValueError("factor is required: the state dict has no linear_out from "
                             "which mm_dim (and so factor = rows / mm_dim) could be read")
        if isinstance(mm_dim, bool) or not isinstance(mm_dim, int) or mm_dim < 1 \
                or rows % mm_dim:
            raise ValueError(f"mm_dim must be an int >= 1 dividing linear0's "
                             f"out_features={rows}, got {mm_dim!r}")
        factor = rows // mm_dim
    factor = _check_factor(factor, rows)
    if mm_dim is not _UNSET and mm_dim * factor != rows:
        raise ValueError(f"mm_dim={mm_dim} and factor={factor} do not match linear0's "
                         f"out_features={rows} (block uses mm_dim * factor)")
    opts = {}
    for name, given in (("activ_input", activ_input), ("normalize", normalize),
                        ("dropout_input", dropout_input),
                        ("dropout_pre_norm", dropout_pre_norm)):
        opts[name] = _option(name, given, module, name, BLOCK_DEFAULTS[name])
    if opts["activ_input"]:
        raise ValueError(
            f"activ_input={opts['activ_input']!r}: block's MFB applies it to both projections "
            f"before their product, and the fused layer has no activation there, so no "
            f"option reproduces it (block's default is 'relu'; only checkpoints trained "
            f"with activ_input=None or '' convert)")
    if opts["dropout_input"]:
        msg = (f"dropout_input={opts['dropout_input']!r} drops the projections before the "
               f"product; the fused layer only drops the product (dropout_pre_norm). "
               f"Evaluation outputs are identical, training differs")
        if strict:
            raise ValueError(msg + "; pass strict=False to convert without it")
        warnings.warn(msg + "; converted without it", stacklevel=3)
    return fused, sd, factor, opts


def from_block_mfb(source: Source, factor=None, *, prefix: str = "", mm_dim=None,
                   activ_input=_UNSET, normalize=_UNSET, dropout_input=_UNSET,
                   dropout_pre_norm=_UNSET, strict: bool = True, eps: float = DEFAULT_EPS,
                   backend: str = "auto",
                   save_projections: bool = False) -> FactorizedBilinearPooling:
    """Convert the fusion part of a block.bootstrap ``MFB`` to a fused layer.

    What block's ``MFB.forward([x0 (B, d0), x1 (B, d1)])`` computes::

        a = activ_input(linear0(x0)); c = activ_input(linear1(x1))  # (B, mm_dim*factor)
        a, c = dropout(a, dropout_input), dropout(c, dropout_input)
        p = dropout(a * c, dropout_pre_norm)
        s = p.view(B, mm_dim, factor).sum(2)          # factor consecutive columns
        if normalize: s = F.normalize(sqrt(relu(s)) - sqrt(relu(-s)), p=2)   # per row
        z = activ_output(linear_out(s)); z = dropout(z, dropout_output)

    The returned layer computes ``s`` (``normalize=False``, exact up to rounding) or
    its normalised form (``normalize=True``: the zero-safe signed square root, within
    the bound of the module docstring) with ``factor``, ``x = x0``, ``y = x1`` and
    ``dropout = dropout_pre_norm``.  ``linear_out``, ``activ_output`` and
    ``dropout_output`` are not part of it: keep the source's ``linear_out`` after it,
    or use :class:`BlockMFB`, which wraps all of them.

    Refused, with a ValueError: a truthy ``activ_input`` (block's default ``'relu'``),
    because the fused layer has no activation between projection and product; and,
    unless ``strict=False``, ``dropout_input > 0`` (evaluation would still match).

    Options are read from the module when ``source`` is one; for a state dict they
    default to block's own defaults (``activ_input='relu'``, ``normalize=False``), so
    a state dict converts only with an explicit ``activ_input=None``.  ``factor`` is
    inferred from ``linear_out`` (``factor = linear0 rows / mm_dim``) when not given.
    """
    fused, _, factor, opts = _block_options(source, prefix, factor, mm_dim, activ_input,
                                            normalize, dropout_input, dropout_pre_norm,
                                            strict)
    return _build(fused, factor, dropout=opts["dropout_pre_norm"],
                  normalize=bool(opts["normalize"]), eps=eps, backend=backend,
                  save_projections=save_projections)


class BlockMFB(nn.Module):
    """Drop-in replacement for a whole block.bootstrap ``MFB`` module.

    ``forward([x0 (..., d0), x1 (..., d1)]) -> (..., output_dim)``, called like block's
    (one sequence of two tensors): the fused ``fusion`` layer, then ``linear_out``,
    ``activ_output`` (a ``torch.nn.functional`` name, or ``None``/``''``) and output
    dropout.  Build it with :meth:`from_block`.
    """

    def __init__(self, fusion: FactorizedBilinearPooling, linear_out: nn.Linear,
                 activ_output: Optional[str] = "relu", dropout_output: float = 0.0) -> None:
        super().__init__()
        if activ_output and not callable(getattr(F, activ_output, None)):
            raise ValueError(f"activ_output must name a torch.nn.functional function, "
                             f"got {activ_output!r}")
        if fusion.out_features != linear_out.in_features:
            raise ValueError(f"linear_out expects {linear_out.in_features} features but the "
                             f"fusion gives {fusion.out_features}")
        self.fusion = fusion
        self.linear_out = linear_out
        self.activ_output = activ_output
        check_rate("dropout_output", dropout_output)
        self.dropout_output = dropout_output

    @classmethod
    def from_block(cls, source: Source, factor=None, *, prefix: str = "", mm_dim=None,
                   activ_input=_UNSET, normalize=_UNSET, dropout_input=_UNSET,
                   dropout_pre_norm=_UNSET, activ_output=_UNSET, dropout_output=_UNSET,
                   strict: bool = True, eps: float = DEFAULT_EPS, backend: str = "auto",
                   save_projections: bool = False) -> "BlockMFB":
        """Convert a block.bootstrap ``MFB`` (module, or state dict with ``linear0``,
        ``linear1`` and ``linear_out``); see :func:`from_block_mfb` for the options."""
        fused, sd, factor, opts = _block_options(source, prefix, factor, mm_dim,
                                                 activ_input, normalize, dropout_input,
                                                 dropout_pre_norm, strict)
        module = source if isinstance(source, nn.Module) else None
        fusion = _build(fused, factor, dropout=opts["dropout_pre_norm"],
                        normalize=bool(opts["normalize"]), eps=eps, backend=backend,
                        save_projections=save_projections)
        w, b = _linear(sd, "linear_out", "block.bootstrap")
        act = _option("activ_output", activ_output, module, "activ_output",
                      BLOCK_DEFAULTS["activ_output"])
        drop = _option("dropout_output", dropout_output, module, "dropout_output",
                       BLOCK_DEFAULTS["dropout_output"])
        return cls(fusion, _copy_linear(w, b), act, drop)

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        if not isinstance(x, (list, tuple)) or len(x) != 2:
            raise TypeError("BlockMFB takes one sequence [x0, x1] of two tensors, as "
                            "block.bootstrap's fusions do")
        z = self.linear_out(self.fusion(x[0], x[1]))
        if self.activ_output:
            z = getattr(F, self.activ_output)(z)
        if self.dropout_output > 0:
            z = F.dropout(z, p=self.dropout_output, training=self.training)
        return z
