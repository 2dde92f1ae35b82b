"""``nn.Module`` wrappers: hold the parameters and the options, call :func:`fbp`."""

from __future__ import annotations

from torch import Tensor, nn

from typing import Optional

from .functional import check_drop_in, check_options, check_size, fbp, projection_mode
from .reference import DEFAULT_EPS


def check_layer_args(x_features, y_features, out_features, factor, dropout, eps,
                     backend, order=None, *, norm_dims=1, activation=None) -> None:
    """The constructor checks of both fusion modules (FBP and MFH), written once.

    Sizes, ``factor`` and ``order`` must be ints >= 1 (TypeError otherwise, ValueError
    when < 1); ``dropout``, ``eps``, ``backend``, ``norm_dims`` and ``activation`` as
    in :func:`fbp`.
    """
    names = [("x_features", x_features), ("y_features", y_features),
             ("out_features", out_features)]
    if order is not None:
        names.append(("order", order))
    for name, value in names:
        check_size(name, value)
    check_options(factor, dropout, eps, backend)
    check_drop_in(norm_dims, activation)


def check_factor_divides(factor, out_features: int) -> None:
    """``from_linear``: ``factor`` (an int >= 1) must divide the projections' width."""
    check_size("factor", factor)
    if out_features % factor:
        raise ValueError(f"factor must be an int >= 1 dividing out_features="
                         f"{out_features}, got {factor!r}")


class _PoolingOptions:
    """The options both fusion modules hold (``factor``, ``dropout``, ``normalize``,
    ``eps``, ``backend``, ``norm_dims``, ``activation``, and FBP's
    ``save_projections``), set and shown one way."""

    def _set_options(self, factor, dropout, normalize, eps, backend, *,
                     norm_dims: int = 1, activation: Optional[str] = None, **extra) -> None:
        # Fail here, not at the first forward.  Whether norm_dims fits the input's
        # batch, and which backend runs, can only be decided per call.
        check_options(factor, dropout, eps, backend)
        check_drop_in(norm_dims, activation)
        self.factor = factor
        self.dropout = dropout
        self.normalize = normalize
        self.eps = eps
        self.backend = backend
        self.norm_dims = norm_dims
        self.activation = activation
        for name, value in extra.items():
            setattr(self, name, value)

    def _options_repr(self) -> str:
        text = (f"factor={self.factor}, dropout={self.dropout}, normalize={self.normalize}, "
                f"eps={self.eps}, backend={self.backend!r}")
        # Shown only when set, so the repr of a default layer is unchanged.
        if self.norm_dims != 1:
            text += f", norm_dims={self.norm_dims}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        return text


class FactorizedBilinearPooling(_PoolingOptions, nn.Module):
    """Factorized bilinear pooling (MFB) as a drop-in fusion layer.

    ``proj_x = nn.Linear(x_features, factor*out_features)`` and ``proj_y`` likewise;
    ``forward(x (..., x_features), y (..., y_features)) -> (..., out_features)``,
    leading dimensions broadcast.  Dropout acts on the expanded product while the
    module is in training mode.  See :func:`fbp_kernels.fbp` for the semantics,
    ``norm_dims`` (joint normalisation) and ``activation`` (on both projections).
    """

    def __init__(self, x_features: int, y_features: int, out_features: int, factor: int = 5,
                 bias: bool = True, dropout: float = 0.0, normalize: bool = True,
                 eps: float = DEFAULT_EPS, backend: str = "auto",
                 save_projections=False, device=None, dtype=None, norm_dims: int = 1,
                 activation: Optional[str] = None) -> None:
        super().__init__()
        check_layer_args(x_features, y_features, out_features, factor, dropout, eps, backend,
                         norm_dims=norm_dims, activation=activation)
        kw = {"device": device, "dtype": dtype}
        self.proj_x = nn.Linear(x_features, factor * out_features, bias=bias, **kw)
        self.proj_y = nn.Linear(y_features, factor * out_features, bias=bias, **kw)
        projection_mode(save_projections)  # ValueError here, not at the first forward
        self._set_options(factor, dropout, normalize, eps, backend,
                          save_projections=save_projections, norm_dims=norm_dims,
                          activation=activation)

    @classmethod
    def from_linear(cls, proj_x: nn.Linear, proj_y: nn.Linear, factor: int, *,
                    dropout: float = 0.0, normalize: bool = True, eps: float = DEFAULT_EPS,
                    backend: str = "auto", save_projections=False, norm_dims: int = 1,
                    activation: Optional[str] = None) -> "FactorizedBilinearPooling":
        """Wrap two existing ``nn.Linear`` layers; parameters are shared, not copied."""
        for name, proj in (("proj_x", proj_x), ("proj_y", proj_y)):
            if not isinstance(proj, nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear, got {type(proj).__name__}")
        check_options(factor, dropout, eps, backend)
        if proj_x.out_features != proj_y.out_features:
            raise ValueError(f"proj_x and proj_y must have the same out_features, got "
                             f"{proj_x.out_features} and {proj_y.out_features}")
        check_factor_divides(factor, proj_x.out_features)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.proj_x, self.proj_y = proj_x, proj_y
        projection_mode(save_projections)  # ValueError here, not at the first forward
        self._set_options(factor, dropout, normalize, eps, backend,
                          save_projections=save_projections, norm_dims=norm_dims,
                          activation=activation)
        return self

    @property
    def out_features(self) -> int:
        return self.proj_x.out_features // self.factor

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return fbp(x, y, self.proj_x.weight, self.proj_y.weight, self.proj_x.bias,
                   self.proj_y.bias, factor=self.factor, dropout=self.dropout,
                   training=self.training, normalize=self.normalize, eps=self.eps,
                   backend=self.backend, save_projections=self.save_projections,
                   norm_dims=self.norm_dims, activation=self.activation)

    def extra_repr(self) -> str:
        return (f"x_features={self.proj_x.in_features}, y_features={self.proj_y.in_features}, "
                f"out_features={self.out_features}, {self._options_repr()}")
