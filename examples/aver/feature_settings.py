"""The settings that made a clip's features, and the check that two sets are compatible.

Every clip written by ``extract_features.py`` carries ``meta["features"]``, a flat
dict of JSON values; a feature directory also has ``features.json`` with the
settings of the runs that wrote it. A model trained on one set of features is
meaningless on another (a different backbone, weights file, random seed or mel
layout gives vectors of the same shape and unrelated meaning), so training,
evaluation and prediction compare the settings and stop with an error that
names every difference.

Keys (extracted media):

=================== ============================================================
``type``            ``"media"`` (``"synthetic"`` for the synthetic task)
``audio_feature``   ``"log-mel"``
``n_mels``, ``win_ms``, ``hop_ms``, ``fmin``    mel layout
``fmax``            top of the mel bands actually used: ``min(--fmax, rate / 2)``,
                    so an 8 kHz file (bands stop at 4 kHz) differs from 16 kHz ones
``video_backbone``  torchvision model name
``video_weights``   ``"sha256:<first 16 hex digits>"`` of the weights file, or
                    ``"random-seed:<n>"`` for the seeded random backbone
``image_size``, ``fps``                          face-crop side, video frames/s
=================== ============================================================

Information that does not change what the numbers mean (the sample rate, paths,
face detector, ``max_frames``) is kept beside, in ``meta``, and not compared. Clips
without settings (made by other tools) are not checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional

SETTINGS_FILE = "features.json"


class FeatureMismatchError(ValueError):
    """Features made with different settings were about to be used together."""


def weights_id(path: Optional[Path], seed: int) -> str:
    """``"sha256:<16 hex>"`` of a weights file, or ``"random-seed:<seed>"`` without one."""
    if path is None:
        return f"random-seed:{seed}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()[:16]}"


def settings_of(clip: dict) -> Optional[dict]:
    """The clip's ``meta["features"]``, or None when it has none."""
    meta = clip.get("meta") or {}
    return meta.get("features") if isinstance(meta, dict) else None


def differences(expected: dict, got: dict) -> Dict[str, tuple]:
    """``{key: (expected value, got value)}`` for every key whose value differs."""
    keys = sorted(set(expected) | set(got))
    return {k: (expected.get(k), got.get(k)) for k in keys if expected.get(k) != got.get(k)}


def check_compatible(expected: Optional[dict], got: Optional[dict], expected_name: str,
                     got_name: str) -> None:
    """Raise :class:`FeatureMismatchError` naming each difference; None skips the check."""
    if expected is None or got is None:
        return
    diff = differences(expected, got)
    if "type" in diff:  # different kinds of features: the other keys would only be noise
        diff = {"type": diff["type"]}
    if diff:
        parts = "; ".join(f"{k} {b!r} instead of {a!r}" for k, (a, b) in diff.items())
        hint = ""
        weights = diff.get("video_weights")
        if weights and None not in weights and "random-seed" in f"{weights[0]}{weights[1]}":
            hint = " (extract every split with the same --backbone-weights, or the same " \
                   "--backbone-seed)"
        raise FeatureMismatchError(f"incompatible features: {got_name} differs from "
                                   f"{expected_name} in {parts}{hint}")


def read_dir_settings(feature_dir: Path) -> Optional[dict]:
    path = Path(feature_dir) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_dir_settings(feature_dir: Path, settings: dict) -> None:
    """Record (or confirm) the directory's settings; refuses different ones."""
    feature_dir = Path(feature_dir)
    check_compatible(read_dir_settings(feature_dir), settings,
                     f"the features already in {feature_dir} ({SETTINGS_FILE})", "this run")
    (feature_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))
