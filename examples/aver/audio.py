"""WAV reading (stdlib ``struct`` + numpy) and log-mel spectrogram frames (torch.stft).

No resampling: the STFT window and hop are set in milliseconds and the mel
filterbank is built for the file's own sample rate, so a 44.1 kHz and a 16 kHz
recording of the same sound give comparable frames (as long as ``fmax`` is
below half of both sample rates).
"""

from __future__ import annotations

import math
import struct
import warnings
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


# WAVE format codes (the fmt chunk's first field; WAVE_FORMAT_EXTENSIBLE carries the
# real one in the first two bytes of its sub-format GUID).
WAVE_PCM, WAVE_FLOAT, WAVE_EXTENSIBLE = 1, 3, 0xFFFE
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def _chunks(blob: bytes):
    """``(chunk id, body)`` pairs of a RIFF file after the 12-byte header."""
    pos = 12
    while pos + 8 <= len(blob):
        cid, size = blob[pos:pos + 4], struct.unpack_from("<I", blob, pos + 4)[0]
        # A streaming writer (ffmpeg to a pipe) may leave the data size unset: take the rest.
        end = len(blob) if cid == b"data" and (size in (0, 0xFFFFFFFF)
                                               or pos + 8 + size > len(blob)) else pos + 8 + size
        yield cid, blob[pos + 8:end]
        pos = end + (size & 1 if end < len(blob) else 0)  # chunks are word-aligned


def read_wav(path: Path) -> Tuple[np.ndarray, int]:
    """Samples of a WAV file as float32, mixed down to mono: ``(samples (N,), rate)``.

    Integer PCM of 8 (unsigned), 16, 24 and 32 bits is scaled to [-1, 1); IEEE
    float (32 and 64 bit) is taken as it is; both also inside
    ``WAVE_FORMAT_EXTENSIBLE`` (format 65534, what ffmpeg and sox write for 24-bit,
    float or multichannel audio). The RIFF chunks are parsed here (stdlib ``struct``
    + numpy) because the stdlib ``wave`` module reads 16-bit-style PCM only.
    Compressed WAV (ADPCM, mu-law, ...) raises ``ValueError``.
    """
    blob = Path(path).read_bytes()
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    chunks = dict(_chunks(blob))  # a later duplicate chunk wins; real files have one each
    fmt, raw = chunks.get(b"fmt "), chunks.get(b"data")
    if fmt is None or len(fmt) < 16 or raw is None:
        raise ValueError(f"{path}: WAV file without a complete fmt and data chunk")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == WAVE_EXTENSIBLE:
        if len(fmt) < 40 or fmt[26:40] != _GUID_TAIL:
            raise ValueError(f"{path}: WAVE_FORMAT_EXTENSIBLE with an unknown sub-format")
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels < 1 or block_align < channels or block_align % channels:
        raise ValueError(f"{path}: inconsistent fmt chunk ({channels} channels, "
                         f"block align {block_align})")
    width = block_align // channels  # container bytes per sample (24-in-32 is left-justified)
    raw = raw[: len(raw) - len(raw) % block_align]
    if tag == WAVE_PCM and width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == WAVE_PCM and width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif tag == WAVE_PCM and width == 3:
        # No numpy dtype for 24-bit: place the 3 little-endian bytes in the top of an
        # int32 (sign comes along for free), then scale.
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).astype(np.float32) / 2.0**31
    elif tag == WAVE_PCM and width == 4:
        x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    elif tag == WAVE_FLOAT and width in (4, 8):
        x = np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
    else:
        kind = {WAVE_PCM: "PCM", WAVE_FLOAT: "float"}.get(tag, f"format code {tag}")
        raise ValueError(f"{path}: unsupported WAV encoding ({kind}, {8 * width}-bit "
                         f"container); convert with ffmpeg -i IN -acodec pcm_s16le OUT.wav")
    x = x.reshape(-1, channels).mean(axis=1)
    return x.astype(np.float32), int(rate)


WAV_ENCODINGS = ("pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64")


def write_wav(path: Path, samples: np.ndarray, rate: int, encoding: str = "pcm16",
              extensible: bool = False) -> None:
    """Write float samples in [-1, 1] (``(N,)`` mono or ``(N, C)``) as a WAV file.

    ``encoding`` is one of :data:`WAV_ENCODINGS`; ``extensible`` writes the
    WAVE_FORMAT_EXTENSIBLE header (format 65534) as ffmpeg and sox do. Used by the
    tests to make every format :func:`read_wav` accepts.
    """
    x = np.asarray(samples, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    channels = x.shape[1]
    x = x.reshape(-1)
    if encoding.startswith("pcm"):
        bits, tag = int(encoding[3:]), WAVE_PCM
        if bits == 8:
            raw = np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8).tobytes()
        else:
            top = 2.0 ** (bits - 1)
            q = np.clip(np.round(x * top), -top, top - 1).astype("<i8")
            raw = np.stack([(q >> s) & 0xFF for s in range(0, bits, 8)], -1).astype(
                np.uint8).tobytes()
    elif encoding in ("float32", "float64"):
        bits, tag = int(encoding[5:]), WAVE_FLOAT
        raw = x.astype("<f4" if bits == 32 else "<f8").tobytes()
    else:
        raise ValueError(f"encoding must be one of {WAV_ENCODINGS}, got {encoding!r}")
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", WAVE_EXTENSIBLE if extensible else tag, channels, rate,
                      rate * block, block, bits)
    if extensible:
        mask = 0x4 if channels == 1 else 0x3  # centre, or front left + right
        fmt += struct.pack("<HHI", 22, bits, mask) + struct.pack("<H", tag) + _GUID_TAIL
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(raw)) + raw + (b"\x00" if len(raw) % 2 else b"")
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def effective_fmax(rate: int, config: "MelConfig") -> float:
    """Top of the mel bands for a file of this rate: ``config.fmax`` clamped to Nyquist."""
    return min(float(config.fmax), rate / 2)


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


def log_mel(samples: np.ndarray, rate: int, config: MelConfig = MelConfig(),
            source: str = "") -> Tensor:
    """Log-mel frames of a mono signal: ``(T, n_mels)`` float32, ``T = 1 + N // hop``.

    Power spectrogram of Hann-windowed frames (``torch.stft``, centred, reflect
    padding), mel filterbank, ``log(mel + log_floor)``. Clips shorter than one
    window are zero-padded to one window. ``source`` names the file in warnings.
    """
    fmax = effective_fmax(rate, config)
    if fmax < config.fmax:
        # Bands above Nyquist would be empty; clamp and say so rather than fail.
        warnings.warn(f"{source or 'audio'}: sample rate {rate} Hz < 2*fmax: mel bands stop "
                      f"at {fmax:.0f} Hz, so these features are not comparable with "
                      f"higher-rate files", stacklevel=2)
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


def wav_to_frames(path: Path, config: MelConfig = MelConfig(), return_rate: bool = False):
    """``read_wav`` then ``log_mel``: ``(T, n_mels)`` float32 at ``config.fps()`` frames/s.

    With ``return_rate=True``: ``(frames, the file's sample rate)``.
    """
    samples, rate = read_wav(path)
    if len(samples) == 0:
        raise ValueError(f"{path}: no audio samples")
    frames = log_mel(samples, rate, config, source=str(path))
    return (frames, rate) if return_rate else frames
