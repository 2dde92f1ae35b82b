"""MFH, multimodal factorized high-order pooling (Yu et al. 2018, "Beyond Bilinear"):
the public function :func:`mfh` and the module
:class:`MultimodalFactorizedHighOrderPooling` (alias :data:`MFH`).

MFH cascades ``order`` FBP blocks.  Block ``l`` has its own projections
``a_l = W_x^l x + b_x^l`` and ``c_l = W_y^l y + b_y^l``; its expanded product is
multiplied into the next block's::

    p_1 = dropout(a_1 * c_1) ;   p_l = dropout(a_l * c_l * p_{l-1})
    z_l = L2(signed_sqrt(sumpool_factor(p_l)))        each block on its own
    out = concat(z_1, ..., z_order)                   (..., order * o)

Order 1 is exactly :func:`fbp_kernels.fbp`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import mfh_ops, ops
from .backends._common import broadcast_batch
from .functional import (_autocast, _autocast_dtype, _output_shape, as_float, check_drop_in,
                         check_inputs, check_options, checked, dropout_seed, no_autocast,
                         route_drop_in)
from .modules import _PoolingOptions, check_factor_divides, check_layer_args
from .reference import DEFAULT_EPS, check_norm_dims

__all__ = ["mfh", "MultimodalFactorizedHighOrderPooling", "MFH"]



def _as_list(name: str, seq, what: str) -> list:
    if isinstance(seq, Tensor):
        raise TypeError(f"{name} must be a list or tuple of {what} (one per block), got a "
                        f"single tensor of shape {tuple(seq.shape)}; pass list({name}) to "
                        f"split a stacked tensor into blocks")
    if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
        raise TypeError(f"{name} must be a list or tuple of {what} (one per block), got "
                        f"{type(seq).__name__}")
    return list(seq)


def _check_block(l: int, x, y, wx, wy, bx, by, factor, dropout, eps) -> None:
    """``check_inputs`` on one block, its messages naming ``weights_x[l]`` etc."""
    names = {"x": "x", "y": "y", "weight_x": f"weights_x[{l}]", "weight_y": f"weights_y[{l}]",
             "bias_x": f"biases_x[{l}]", "bias_y": f"biases_y[{l}]"}
    check_inputs(x, y, wx, wy, bx, by, factor, dropout, eps, names=names)


def check_mfh_inputs(x, y, weights_x, weights_y, biases_x, biases_y, factor, order, dropout,
                     eps):
    """Validate :func:`mfh` arguments.

    Returns ``(weights_x, weights_y, biases_x, biases_y)`` as lists of length
    ``order`` (absent biases as ``None`` entries).  Raises TypeError/ValueError
    naming the offending argument and block.
    """
    weights_x = _as_list("weights_x", weights_x, "2-D weight tensors")
    weights_y = _as_list("weights_y", weights_y, "2-D weight tensors")
    if not weights_x:
        raise ValueError("weights_x is empty: MFH needs at least one block (order >= 1)")
    if len(weights_y) != len(weights_x):
        raise ValueError(f"weights_x and weights_y must have one entry per block, got "
                         f"{len(weights_x)} and {len(weights_y)}")
    if order is not None:
        if isinstance(order, bool) or not isinstance(order, int):
            raise TypeError(f"order must be an int or None, got {type(order).__name__}")
        if order != len(weights_x):
            raise ValueError(f"order={order} but {len(weights_x)} blocks of weights were "
                             f"given; order must equal len(weights_x) (or be None)")
    n = len(weights_x)
    lists = []
    for name, seq in (("biases_x", biases_x), ("biases_y", biases_y)):
        if seq is None:
            lists.append([None] * n)
            continue
        seq = _as_list(name, seq, "1-D bias tensors or None")
        if len(seq) != n:
            raise ValueError(f"{name} must have one entry (a tensor or None) per block, "
                             f"i.e. {n}, got {len(seq)}")
        lists.append(seq)
    biases_x, biases_y = lists
    for l in range(n):
        _check_block(l, x, y, weights_x[l], weights_y[l], biases_x[l], biases_y[l], factor,
                     dropout, eps)
    ko = weights_x[0].shape[0]
    for l in range(1, n):
        if weights_x[l].shape[0] != ko:
            raise ValueError(f"every block must have the same factor*out_features (the "
                             f"products are multiplied elementwise across blocks): "
                             f"weights_x[0] has {ko} rows, weights_x[{l}] has "
                             f"{weights_x[l].shape[0]}")
    return weights_x, weights_y, biases_x, biases_y


def _auto_for_shape(x, y, lists, factor) -> str:
    """strategy.choose_mfh for this call: its rows, widths, order, dtype and whether a
    gradient is needed; ``lists``: (weights_x, weights_y, biases_x, biases_y)."""
    from . import strategy

    params = [t for seq in lists for t in seq if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, *params))
    return strategy.choose_mfh_for(x, y, lists[0], factor, needs_grad)[0]


def _prepare(args, factor, order, dropout, eps, backend, norm_dims=1, activation=None):
    """Autocast and check :func:`mfh`'s arguments; returns ``(autocast dtype or None,
    [x, y, weights_x, weights_y, biases_x, biases_y], backend)`` with the per-block
    lists and ``backend`` the requested one (a named backend is checked against
    ``norm_dims``/``activation`` by ``functional.route_drop_in``)."""
    x, y, weights_x, weights_y, biases_x, biases_y = args
    # Cast before the checks, as fbp() does, so autocast's low-precision activations
    # mix with fp32 parameters like in nn.Linear; malformed arguments pass through
    # unchanged for check_mfh_inputs to report.
    cast_dtype = _autocast_dtype(x.device.type) if isinstance(x, Tensor) else None
    if cast_dtype is not None:
        x, y = _autocast(cast_dtype, [x, y])
        weights_x, weights_y, biases_x, biases_y = (
            _autocast(cast_dtype, list(seq)) if isinstance(seq, (list, tuple)) else seq
            for seq in (weights_x, weights_y, biases_x, biases_y))
    check_options(factor, dropout, eps, backend)
    lists = check_mfh_inputs(x, y, weights_x, weights_y, biases_x, biases_y, factor, order,
                             dropout, eps)
    check_drop_in(norm_dims, activation)
    check_norm_dims(norm_dims, len(broadcast_batch(x.shape[:-1], y.shape[:-1])))
    if backend != "auto":
        # A named backend must have the options; auto's MFH candidates all do, and
        # mfh_ops.resolve checks the problem (order, factor) against each.
        backend = route_drop_in(backend, norm_dims, activation, x.device,
                                ops.MFH_DROP_IN_BACKENDS) or backend
    if not torch.compiler.is_compiling():
        if backend == "auto" and x.device.type == "cuda":
            # Per shape, from the cost model (strategy.choose_mfh); forward and backward
            # then run the same backend (each draws its own dropout masks).  Under
            # torch.compile the ops resolve "auto" to the device-level choice
            # (strategy.auto_mfh_backend: the model at the MFB default shape).
            backend = _auto_for_shape(x, y, lists, factor)
        # A clear error here rather than from inside the op.  Skipped while tracing:
        # resolving imports modules, which Dynamo refuses to trace; the op resolves
        # again when it runs, so a bad backend still fails there.
        mfh_ops.resolve(backend, x.device, len(lists[0]), factor)
    return cast_dtype, [x, y, *lists], backend


def mfh(
    x: Tensor,
    y: Tensor,
    weights_x: Sequence[Tensor],
    weights_y: Sequence[Tensor],
    biases_x: Optional[Sequence[Optional[Tensor]]] = None,
    biases_y: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    factor: int,
    order: Optional[int] = None,
    dropout: float = 0.0,
    training: bool = False,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
    norm_dims: int = 1,
    activation: Optional[str] = None,
) -> Tensor:
    """Multimodal factorized high-order pooling (MFH), ``order`` cascaded FBP blocks.

    Args:
        x: ``(..., m)``; y: ``(..., n)``. Leading dimensions broadcast against each
            other, as in :func:`fbp_kernels.fbp`.
        weights_x: ``order`` tensors ``(factor*o, m)``; weights_y: ``order`` tensors
            ``(factor*o, n)`` (``nn.Linear`` layout), one pair per block.
        biases_x, biases_y: ``None``, or ``order`` entries each ``(factor*o,)`` or
            ``None``.
        factor: ``k``, consecutive projected columns summed into each output.
        order: number of blocks; ``None`` means ``len(weights_x)``, anything else
            must equal it (a guard against passing the wrong lists).
        dropout: rate applied to each block's expanded product (after the
            multiplication by the previous block's) when ``training`` is true; the
            dropped product is what the next block multiplies in.
        normalize: per block, zero-safe signed square root then L2 normalisation;
            ``False`` returns the raw sum-pooled values of every block.
        eps: smoothing of the signed square root.
        backend: ``"auto"`` (on CUDA tensors ``triton`` or ``torch``, whichever the
            cost model predicts faster for the call's shape: ``strategy.choose_mfh``;
            ``torch`` on other devices or where triton's tiles cannot hold the
            factor), ``"triton"`` (FBP's wide kernels, one launch per block, any order),
            ``"cuda"`` (FBP's fused C++ kernels per block, any order; never picked by
            ``"auto"``) or ``"torch"``.
        norm_dims: per block, the L2 norm spans the ``o`` outputs and the last
            ``norm_dims - 1`` batch dimensions (mmf's ``layers.MFH`` normalises all
            regions of a sample together: ``norm_dims=2`` on ``(N, C, ...)``), as in
            :func:`fbp_kernels.fbp`.
        activation: ``None``, ``"relu"`` or ``"tanh"`` on every block's two
            projections (block.bootstrap / mmf ``activ_input``), as in
            :func:`fbp_kernels.fbp`.  Both options run on ``triton``, ``cuda`` and
            ``torch``; another explicit backend raises ValueError.

    Returns:
        ``(..., order*o)``: block ``l``'s ``o`` outputs at ``[..., l*o:(l+1)*o]``, in
        the inputs' dtype (the autocast dtype under ``torch.autocast``).

    Dropout is drawn from one seed per call (PyTorch's CPU generator, so
    ``torch.manual_seed`` makes it reproducible); block ``l`` uses the seed
    ``backends.torch_mfh.block_seed(seed, l)``.
    """
    def shape():
        listed = isinstance(weights_x, (list, tuple)) and len(weights_x) > 0
        return _output_shape(x, y, weights_x[0] if listed else None, factor,
                             len(weights_x) if listed else 1)

    prepared, failed = checked(_prepare, [x, y, weights_x, weights_y, biases_x, biases_y],
                               (factor, order, dropout, eps, backend, norm_dims, activation),
                               shape)
    if failed is not None:
        return failed
    cast_dtype, (x, y, weights_x, weights_y, biases_x, biases_y), backend = prepared
    device = x.device
    seed = dropout_seed(training, dropout)
    if seed is None:
        dropout = 0.0
    with no_autocast(device.type, cast_dtype):
        out, _ = mfh_ops.mfh_forward(
            x, y, weights_x, weights_y, mfh_ops.to_marker_list(biases_x, x),
            mfh_ops.to_marker_list(biases_y, x), seed, factor, float(dropout),
            bool(normalize), as_float(eps), backend, norm_dims, activation)
    return out


class MultimodalFactorizedHighOrderPooling(_PoolingOptions, nn.Module):
    """MFH fusion layer: ``order`` cascaded factorized bilinear pooling blocks.

    ``proj_x[l] = nn.Linear(x_features, factor*out_features)`` and ``proj_y[l]``
    likewise, for ``l < order`` (``nn.ModuleList``s).
    ``forward(x (..., x_features), y (..., y_features)) -> (..., order*out_features)``
    (see :attr:`output_features`); leading dimensions broadcast.  Dropout acts on
    each block's expanded product while the module is in training mode.  See
    :func:`fbp_kernels.mfh` for the semantics, ``norm_dims`` and ``activation``.
    """

    def __init__(self, x_features: int, y_features: int, out_features: int, factor: int = 5,
                 order: int = 2, bias: bool = True, dropout: float = 0.0,
                 normalize: bool = True, eps: float = DEFAULT_EPS, backend: str = "auto",
                 device=None, dtype=None, norm_dims: int = 1,
                 activation: Optional[str] = None) -> None:
        super().__init__()
        check_layer_args(x_features, y_features, out_features, factor, dropout, eps, backend,
                         order, norm_dims=norm_dims, activation=activation)
        kw = {"device": device, "dtype": dtype}
        self.proj_x = nn.ModuleList(
            nn.Linear(x_features, factor * out_features, bias=bias, **kw) for _ in range(order))
        self.proj_y = nn.ModuleList(
            nn.Linear(y_features, factor * out_features, bias=bias, **kw) for _ in range(order))
        self._set_options(factor, dropout, normalize, eps, backend, norm_dims=norm_dims,
                          activation=activation)

    @classmethod
    def from_linear(cls, projs_x: Sequence[nn.Linear], projs_y: Sequence[nn.Linear],
                    factor: int, *, dropout: float = 0.0, normalize: bool = True,
                    eps: float = DEFAULT_EPS, backend: str = "auto", norm_dims: int = 1,
                    activation: Optional[str] = None,
                    ) -> "MultimodalFactorizedHighOrderPooling":
        """Wrap existing ``nn.Linear`` layers, one x and one y projection per block;
        parameters are shared, not copied (an ``nn.ModuleList`` is kept as is)."""
        projs = []
        for name, seq in (("projs_x", projs_x), ("projs_y", projs_y)):
            seq = seq if isinstance(seq, nn.ModuleList) else nn.ModuleList(list(seq))
            for i, lin in enumerate(seq):
                if not isinstance(lin, nn.Linear):
                    raise TypeError(f"{name}[{i}] must be an nn.Linear, got "
                                    f"{type(lin).__name__}")
            projs.append(seq)
        projs_x, projs_y = projs
        if len(projs_x) == 0 or len(projs_x) != len(projs_y):
            raise ValueError(f"projs_x and projs_y must hold one nn.Linear per block (at least "
                             f"one), got {len(projs_x)} and {len(projs_y)}")
        ko = projs_x[0].out_features
        for name, seq in (("projs_x", projs_x), ("projs_y", projs_y)):
            for i, lin in enumerate(seq):
                if lin.out_features != ko:
                    raise ValueError(f"every projection must have the same out_features; "
                                     f"projs_x[0] has {ko}, {name}[{i}] has {lin.out_features}")
            if len({lin.in_features for lin in seq}) > 1:
                raise ValueError(f"all of {name} must take the same in_features, got "
                                 f"{[lin.in_features for lin in seq]}")
        check_options(factor, dropout, eps, backend)
        check_factor_divides(factor, ko)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.proj_x, self.proj_y = projs_x, projs_y
        self._set_options(factor, dropout, normalize, eps, backend, norm_dims=norm_dims,
                          activation=activation)
        return self

    @property
    def order(self) -> int:
        return len(self.proj_x)

    @property
    def out_features(self) -> int:
        """Outputs per block (``o``)."""
        return self.proj_x[0].out_features // self.factor

    @property
    def output_features(self) -> int:
        """Width of the layer's output, ``order * out_features``."""
        return self.order * self.out_features

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return mfh(x, y, [p.weight for p in self.proj_x], [p.weight for p in self.proj_y],
                   [p.bias for p in self.proj_x], [p.bias for p in self.proj_y],
                   factor=self.factor, dropout=self.dropout, training=self.training,
                   normalize=self.normalize, eps=self.eps, backend=self.backend,
                   norm_dims=self.norm_dims, activation=self.activation)

    def extra_repr(self) -> str:
        return (f"x_features={self.proj_x[0].in_features}, "
                f"y_features={self.proj_y[0].in_features}, "
                f"out_features={self.out_features}, order={self.order}, "
                f"{self._options_repr()}")


#: Short alias.
MFH = MultimodalFactorizedHighOrderPooling
