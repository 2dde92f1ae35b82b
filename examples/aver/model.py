"""``AttentionAVER``: per-modality frame encoders, masked attention pooling, fusion.

Data flow for a batch of B clips (``Ta``/``Tv`` = padded audio/video frame counts)::

    audio (B, Ta, Da) --encoder--> (B, Ta, H) --pool (mask)--> (B, H) --\
                                                                          fusion -> (B, F)
    video (B, Tv, Dv) --encoder--> (B, Tv, H) --pool (mask)--> (B, H) --/
                                                  -> dropout -> classifier -> (B, classes)

Fusion ``fbp`` is :class:`fbp_kernels.FactorizedBilinearPooling` (F = fbp_out),
``mfh`` its high-order form (F = order * fbp_out, if the package provides it),
``concat`` joins the two pooled vectors (F = 2H), ``audio``/``video`` use one
modality only (F = H; the other modality's encoder is not even built).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fbp_kernels

FUSIONS = ("fbp", "mfh", "concat", "audio", "video")
POOLINGS = ("attention", "mean")
AUDIO_ENCODERS = ("frame", "temporal")


@dataclass
class AVERConfig:
    """Everything needed to rebuild an ``AttentionAVER`` (stored in checkpoints)."""

    audio_dim: int
    video_dim: int
    num_classes: int = 7
    hidden: int = 64
    # "frame" (the default, and what checkpoints without this key used): FrameEncoder.
    # "temporal": TemporalEncoder, ~0.6 s receptive field, loudness kept.
    audio_encoder: str = "frame"
    fusion: str = "fbp"
    pooling: str = "attention"
    fbp_out: int = 64
    factor: int = 5
    order: int = 2            # MFH only
    fbp_dropout: float = 0.1  # on the expanded product, as in MFB
    dropout: float = 0.2      # frame encoders and before the classifier
    classifier_hidden: int = 0  # 0: one linear layer after fusion, as in the paper

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.audio_encoder not in AUDIO_ENCODERS:
            raise ValueError(f"audio_encoder must be one of {AUDIO_ENCODERS}, "
                             f"got {self.audio_encoder!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for name in ("audio_dim", "video_dim", "num_classes", "hidden", "fbp_out",
                     "factor", "order"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.classifier_hidden < 0:
            raise ValueError(f"classifier_hidden must be >= 0, got {self.classifier_hidden}")
        for name in ("fbp_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


def mfh_class():
    """The package's MFH module, or a clear error if this version does not have it."""
    cls = getattr(fbp_kernels, "MultimodalFactorizedHighOrderPooling", None)
    if cls is None:
        raise RuntimeError(
            f"fusion='mfh' needs fbp_kernels.MultimodalFactorizedHighOrderPooling, which "
            f"fbp_kernels {fbp_kernels.__version__} does not provide; use fusion='fbp'")
    return cls


def _masked_fill_zero(h: Tensor, mask: Tensor) -> Tensor:
    # torch.where, not h * mask: 0 * NaN is NaN, so multiplying would let a NaN or
    # Inf in a padded frame through. Replaced values cannot reach the output.
    return torch.where(mask.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device))


class FrameEncoder(nn.Module):
    """Per-frame projection plus one residual temporal convolution.

    ``(B, T, in_dim), mask (B, T) -> (B, T, hidden)``. Input LayerNorm makes raw
    log-mel values and CNN embeddings usable without dataset statistics. Padded
    frames are zeroed before the convolution, so they look exactly like the
    convolution's own zero padding: their contents never reach valid frames.
    """

    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # Zero padded inputs first: otherwise a NaN there would still reach the
        # LayerNorm weight gradient (0 * NaN) even though it never reaches the output.
        x = _masked_fill_zero(x, mask)
        h = self.drop(F.gelu(self.proj(self.norm(x))))
        h = _masked_fill_zero(h, mask)
        h = h + self.drop(F.gelu(self.conv(h.transpose(1, 2)).transpose(1, 2)))
        return _masked_fill_zero(h, mask)


def masked_utterance_norm(x: Tensor, mask: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-utterance, per-channel standardisation over the valid frames.

    ``(B, T, D), mask (B, T) -> (B, T, D)``. Each channel (mel band) is shifted and
    scaled by its mean and standard deviation over the clip's real frames, so
    recording gain and channel colour go, but a frame louder than the rest of its
    utterance stays louder (per-frame LayerNorm divides that away). Padded frames
    do not enter the statistics and come out as zeros.
    """
    x = _masked_fill_zero(x, mask)
    m = mask.unsqueeze(-1).to(x.dtype)
    n = m.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * m).sum(1, keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum(1, keepdim=True) / n
    return _masked_fill_zero((x - mean) / torch.sqrt(var + eps), mask)


class TemporalEncoder(nn.Module):
    """Per-utterance normalisation, projection, then dilated residual convolutions.

    ``(B, T, in_dim), mask (B, T) -> (B, T, hidden)``. Kernel-3 convolutions with
    dilations ``1, 2, 4, 8, 16`` give a receptive field of ``1 + 2 * 31 = 63``
    frames: 0.63 s at the log-mel's 100 frames/s, the span of a syllable or two,
    where the one-convolution FrameEncoder sees 3 frames (30 ms). Padded frames are
    zeroed before every convolution, as in :class:`FrameEncoder`, so a clip gives
    the same output alone and inside a padded batch.
    """

    def __init__(self, in_dim: int, hidden: int, dropout: float,
                 dilations=(1, 2, 4, 8, 16)) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel_size=3, dilation=d,
                                             padding=d) for d in dilations)
        self.drop = nn.Dropout(dropout)
        self.receptive_field = 1 + 2 * sum(dilations)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.drop(F.gelu(self.proj(masked_utterance_norm(x, mask))))
        for conv in self.convs:
            h = _masked_fill_zero(h, mask)
            h = h + self.drop(F.gelu(conv(h.transpose(1, 2)).transpose(1, 2)))
        return _masked_fill_zero(h, mask)


class AttentionPool(nn.Module):
    """Frame-level attention: ``score_t = v^T tanh(W h_t)``, softmax over valid frames.

    ``h (B, T, H), mask (B, T) -> pooled (B, H), weights (B, T)``. Padded frames get
    a score of -inf, hence a weight of exactly 0.
    """

    def __init__(self, hidden: int, attn_hidden: Optional[int] = None) -> None:
        super().__init__()
        attn_hidden = attn_hidden or hidden
        self.proj = nn.Linear(hidden, attn_hidden)
        self.score = nn.Linear(attn_hidden, 1, bias=False)

    def forward(self, h: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        scores = self.score(torch.tanh(self.proj(h))).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.einsum("bt,bth->bh", weights, h), weights


def mean_pool(h: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Average over valid frames; returns the same ``(pooled, weights)`` as attention."""
    weights = mask.to(h.dtype) / mask.sum(-1, keepdim=True).to(h.dtype)
    return torch.einsum("bt,bth->bh", weights, h), weights


class AttentionAVER(nn.Module):
    """Attention-guided audio-video emotion recognition with FBP fusion.

    ``forward(audio (B, Ta, Da), audio_mask (B, Ta) bool, video (B, Tv, Dv),
    video_mask (B, Tv) bool) -> logits (B, num_classes)``; with
    ``return_weights=True`` also a dict of per-frame pooling weights
    ``{"audio": (B, Ta), "video": (B, Tv)}`` (only the modalities used).
    Masks are True for real frames; every clip needs at least one real frame per
    modality used.
    """

    def __init__(self, config: AVERConfig) -> None:
        super().__init__()
        self.config = c = config
        self.modalities = {"audio": ("audio",), "video": ("video",)}.get(
            c.fusion, ("audio", "video"))
        dims = {"audio": c.audio_dim, "video": c.video_dim}
        encoder = {"audio": TemporalEncoder if c.audio_encoder == "temporal" else FrameEncoder,
                   "video": FrameEncoder}
        self.encoders = nn.ModuleDict(
            {m: encoder[m](dims[m], c.hidden, c.dropout) for m in self.modalities})
        if c.pooling == "attention":
            self.pools = nn.ModuleDict({m: AttentionPool(c.hidden) for m in self.modalities})
        if c.fusion == "fbp":
            self.fusion = fbp_kernels.FactorizedBilinearPooling(
                c.hidden, c.hidden, c.fbp_out, factor=c.factor, dropout=c.fbp_dropout)
            fused = c.fbp_out
        elif c.fusion == "mfh":
            self.fusion = mfh_class()(c.hidden, c.hidden, c.fbp_out, factor=c.factor,
                                      order=c.order, dropout=c.fbp_dropout)
            fused = c.order * c.fbp_out
        else:
            fused = 2 * c.hidden if c.fusion == "concat" else c.hidden
        self.drop = nn.Dropout(c.dropout)
        if c.classifier_hidden:
            self.classifier = nn.Sequential(nn.Linear(fused, c.classifier_hidden), nn.GELU(),
                                            nn.Dropout(c.dropout),
                                            nn.Linear(c.classifier_hidden, c.num_classes))
        else:
            self.classifier = nn.Linear(fused, c.num_classes)

    def _check(self, name: str, x: Tensor, mask: Tensor, dim: int) -> None:
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"{name} must be (B, T, {dim}), got shape {tuple(x.shape)}")
        if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
            raise ValueError(f"{name}_mask must be a bool tensor of shape {tuple(x.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        empty = (~mask.any(-1)).nonzero().flatten()
        if len(empty):
            raise ValueError(f"{name}: clips at batch positions {empty.tolist()} have no valid "
                             f"frames (every clip needs at least one)")

    def pooled(self, modality: str, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """Encode and pool one modality: ``(B, T, D), (B, T) -> (B, H), weights (B, T)``."""
        h = self.encoders[modality](x, mask)
        if self.config.pooling == "attention":
            return self.pools[modality](h, mask)
        return mean_pool(h, mask)

    def forward(self, audio: Tensor, audio_mask: Tensor, video: Tensor, video_mask: Tensor,
                return_weights: bool = False):
        c = self.config
        inputs = {"audio": (audio, audio_mask, c.audio_dim),
                  "video": (video, video_mask, c.video_dim)}
        pooled: Dict[str, Tensor] = {}
        weights: Dict[str, Tensor] = {}
        for m in self.modalities:
            x, mask, dim = inputs[m]
            self._check(m, x, mask, dim)
            pooled[m], weights[m] = self.pooled(m, x, mask)
        if c.fusion in ("fbp", "mfh"):
            fused = self.fusion(pooled["audio"], pooled["video"])
        elif c.fusion == "concat":
            fused = torch.cat([pooled["audio"], pooled["video"]], dim=-1)
        else:
            fused = pooled[c.fusion]
        logits = self.classifier(self.drop(fused))
        return (logits, weights) if return_weights else logits
