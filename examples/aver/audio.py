"""WAV reading (stdlib ``wave`` + numpy) and log-mel spectrogram frames (torch.stft).

No resampling: the STFT window and hop are set in milliseconds and the mel
filterbank is built for the file's own sample rate, so a 44.1 kHz and a 16 kHz
recording of the same sound give comparable frames (as long as ``fmax`` is
below half of both sample rates).
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class MelConfig:
    """Log-mel frame settings: 25 ms Hann windows every 10 ms, 64 bands, 50-8000 Hz."""

    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    fmin: float = 50.0
    fmax: float = 8000.0
    log_floor: float = 1e-6  # log(mel + floor): silence maps to log(1e-6), not -inf

    def fps(self) -> float:
        return 1000.0 / self.hop_ms


def read_wav(path: Path) -> Tuple[np.ndarray, int]:
    """Samples of a PCM WAV file as float32 in [-1, 1], mixed down to mono.

    Returns ``(samples (N,), sample_rate)``. 8-bit (unsigned), 16-, 24- and 32-bit
    (signed) PCM are supported; anything else (float or compressed WAV) raises
    ``ValueError`` (convert with ``ffmpeg -i in.wav -acodec pcm_s16le out.wav``).
    """
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, n = (f.getnchannels(), f.getsampwidth(),
                                        f.getframerate(), f.getnframes())
            raw = f.readframes(n)
    except wave.Error as e:  # e.g. "unknown format: 3" for float WAV
        raise ValueError(f"{path}: not a PCM WAV file ({e})") from None
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        # No numpy dtype for 24-bit: place the 3 little-endian bytes in the top of an
        # int32 (sign comes along for free), then scale.
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).astype(np.float32) / 2.0**31
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2.0**31
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    x = x[: len(x) - len(x) % channels].reshape(-1, channels).mean(axis=1)
    return x.astype(np.float32), rate


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """Write mono float samples in [-1, 1] as 16-bit PCM (for tests and examples)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def hz_to_mel(f):
    """HTK mel scale: ``2595 log10(1 + f/700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, rate: int, n_mels: int, fmin: float, fmax: float) -> Tensor:
    """Triangular mel filters, ``(n_mels, n_fft // 2 + 1)`` float32.

    Band edges are equally spaced on the HTK mel scale between ``fmin`` and
    ``fmax``; each triangle peaks at 1 at its centre (no area normalisation).
    """
    if not 0 <= fmin < fmax <= rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= rate/2 = {rate / 2}, got fmin={fmin}, "
                         f"fmax={fmax}")
    freqs = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lower) / (centre - lower)
    down = (upper - freqs[None, :]) / (upper - centre)
    fb = np.clip(np.minimum(up, down), 0.0, None)
    empty = np.flatnonzero(fb.sum(axis=1) == 0)
    if len(empty):
        # Narrow low bands can fall between FFT bins when n_fft is small.
        raise ValueError(f"mel bands {empty.tolist()} cover no FFT bin (n_fft={n_fft}, "
                         f"rate={rate}); use fewer mels, a larger window or a higher fmin")
    return torch.from_numpy(fb.astype(np.float32))


def log_mel(samples: np.ndarray, rate: int, config: MelConfig = MelConfig()) -> Tensor:
    """Log-mel frames of a mono signal: ``(T, n_mels)`` float32, ``T = 1 + N // hop``.

    Power spectrogram of Hann-windowed frames (``torch.stft``, centred, reflect
    padding), mel filterbank, ``log(mel + log_floor)``. Clips shorter than one
    window are zero-padded to one window.
    """
    if rate < 2 * config.fmax:
        # Bands above Nyquist would be empty; clamp and say so rather than fail.
        fmax = rate / 2
        import warnings
        warnings.warn(f"sample rate {rate} Hz < 2*fmax: mel bands stop at {fmax:.0f} Hz, so "
                      f"these features are not comparable with higher-rate files")
    else:
        fmax = config.fmax
    win = max(2, int(round(rate * config.win_ms / 1000)))
    hop = max(1, int(round(rate * config.hop_ms / 1000)))
    n_fft = 1 << math.ceil(math.log2(win))
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    if x.numel() < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.numel()))
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop, win_length=win,
                      window=torch.hann_window(win), center=True, pad_mode="reflect",
                      return_complex=True)
    power = spec.abs() ** 2                                       # (F, T)
    fb = mel_filterbank(n_fft, rate, config.n_mels, config.fmin, fmax)
    return torch.log(fb @ power + config.log_floor).T.contiguous()  # (T, n_mels)


def wav_to_frames(path: Path, config: MelConfig = MelConfig()) -> Tensor:
    """``read_wav`` then ``log_mel``: ``(T, n_mels)`` float32 at ``config.fps()`` frames/s."""
    samples, rate = read_wav(path)
    if len(samples) == 0:
        raise ValueError(f"{path}: no audio samples")
    return log_mel(samples, rate, config)
