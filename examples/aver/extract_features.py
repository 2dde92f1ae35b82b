#!/usr/bin/env python
"""Media files -> one feature file per clip (the format in :mod:`aver.data`).

Input, either
  a directory tree ``ROOT/<class>/<clip>.<avi|mp4|mkv|mov|webm>`` with the audio
  track as ``<clip>.wav`` beside each video (AFEW's layout; class folder names
  match ``--classes`` case-insensitively), or
  a CSV manifest (``--manifest``) with columns ``clip_id,label,video,audio``
  (paths relative to the manifest; an empty label means unlabelled, -1).

Audio: PCM WAV -> log-mel frames (:mod:`aver.audio`). Extract the track first, e.g.
``ffmpeg -i clip.avi -vn -ac 1 -ar 16000 clip.wav``.
Video: ~``--fps`` frames/s, face crop (or centre-crop fallback), torchvision
backbone embedding per frame (:mod:`aver.video`).

    python examples/aver/extract_features.py Train_AFEW/ feats/ --split train \\
        --backbone resnet18 --backbone-weights resnet18.pth

Writes ``OUT/<clip_id>.pt``, ``OUT/classes.json``, ``OUT/features.json`` (the
extraction settings, see :mod:`aver.feature_settings`; a run with different
settings is refused), adds the ids to ``OUT/splits/<split>.txt`` if ``--split`` is
given, and appends this run's report (every skipped clip and why) to
``OUT/extraction_report.json``. Clips whose file exists and came from the same
media are skipped (resumable) unless ``--overwrite``; a clip id that already
belongs to other media is refused, naming both files. Runs offline.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `aver` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import json
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from aver.audio import MelConfig, effective_fmax, wav_to_frames
from aver.data import EMOTIONS, FORMAT, load_clip, read_split, save_clip, write_split
from aver.feature_settings import check_compatible, weights_id, write_dir_settings
from aver.video import (UnreadableMediaError, build_backbone, crop_face, embed,
                        make_face_detector, read_frames, to_tensor)

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg")


@dataclass
class ClipSource:
    """Where one clip's media is: its id, label name ('' = unlabelled) and files."""

    clip_id: str
    label_name: str
    video: Path
    audio: Path


@dataclass
class ExtractConfig:
    mel: MelConfig = field(default_factory=MelConfig)
    fps: float = 5.0            # video frames kept per second
    max_frames: int = 64        # per clip, spread uniformly
    image_size: int = 224       # backbone input side
    backbone: str = "resnet18"
    backbone_weights: Optional[Path] = None
    backbone_seed: int = 0      # draws the random backbone when there is no weights file
    face_detector: str = "auto"
    face_model: Optional[Path] = None
    batch_size: int = 32
    device: str = "cpu"


class ClipExtractor:
    """Holds the backbone and face detector; :meth:`extract` turns media into a clip dict."""

    def __init__(self, config: ExtractConfig = ExtractConfig()) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.backbone, self.video_dim = build_backbone(config.backbone, config.backbone_weights,
                                                       config.backbone_seed)
        self.backbone.to(self.device)
        self.detector = make_face_detector(config.face_detector, config.face_model)
        self.settings = self.settings_for(config.mel.fmax)

    def settings_for(self, fmax: float) -> dict:
        """The compared settings (:mod:`aver.feature_settings`) for bands up to ``fmax``."""
        c = self.config
        return {"type": "media", "audio_feature": "log-mel", "n_mels": c.mel.n_mels,
                "win_ms": c.mel.win_ms, "hop_ms": c.mel.hop_ms, "fmin": c.mel.fmin,
                "fmax": float(fmax), "video_backbone": c.backbone,
                "video_weights": weights_id(c.backbone_weights, c.backbone_seed),
                "image_size": c.image_size, "fps": c.fps}

    def extract(self, source: ClipSource, label: int) -> dict:
        """One clip dict in the :mod:`aver.data` format.

        Raises ``UnreadableMediaError`` / ``ValueError`` for unusable media.
        """
        c = self.config
        if not Path(source.audio).is_file():
            raise UnreadableMediaError(f"{source.audio}: no audio file (extract it with "
                                       f"ffmpeg -i VIDEO -vn -ac 1 -ar 16000 {Path(source.audio).name})")
        audio, rate = wav_to_frames(source.audio, c.mel, return_rate=True)
        settings = self.settings_for(effective_fmax(rate, c.mel))
        # A low-rate file's bands stop early: its features mean something else.
        check_compatible(self.settings, settings, "this run's settings",
                         f"{source.audio} ({rate} Hz)")
        frames, video_fps = read_frames(source.video, c.fps, c.max_frames)
        crops, found = zip(*(crop_face(f, self.detector) for f in frames))
        video = embed(self.backbone, to_tensor(list(crops), c.image_size), c.batch_size,
                      self.device)
        return {"format": FORMAT, "clip_id": source.clip_id, "label": label,
                "label_name": source.label_name, "audio": audio, "video": video,
                "audio_fps": c.mel.fps(), "video_fps": video_fps,
                "face_found": torch.tensor(found, dtype=torch.bool),
                "meta": {"video_path": str(Path(source.video).resolve()),
                         "audio_path": str(Path(source.audio).resolve()),
                         "sample_rate": rate, "features": settings,
                         "backbone": c.backbone,
                         "backbone_weights": str(c.backbone_weights or "RANDOM"),
                         "face_detector": c.face_detector,
                         "image_size": c.image_size, "mel": asdict(c.mel)}}


# ---------------------------------------------------------------------- sources

def find_clips(root: Path, classes: Sequence[str]) -> tuple:
    """Clips of a ``ROOT/<class>/<clip>.<video>`` tree (audio: ``<clip>.wav`` beside).

    Returns ``(sources, ignored)``: ``ignored`` lists folders whose name is not a class.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    lookup = {c.lower(): c for c in classes}
    sources, ignored = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = lookup.get(folder.name.lower())
        if name is None:
            ignored.append(folder.name)
            continue
        for video in sorted(folder.iterdir()):
            if video.suffix.lower() in VIDEO_EXTENSIONS:
                sources.append(ClipSource(video.stem, name, video, video.with_suffix(".wav")))
    return sources, ignored


def read_manifest(path: Path) -> List[ClipSource]:
    """Clips listed in a CSV with header ``clip_id,label,video,audio``."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"clip_id", "label", "video", "audio"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: columns must include {sorted(need)}, got {list(rows[0])}")
    return [ClipSource(r["clip_id"].strip(), r["label"].strip(), path.parent / r["video"].strip(),
                       path.parent / r["audio"].strip()) for r in rows]


# ---------------------------------------------------------------------- driver

def _existing_source(path: Path) -> Optional[str]:
    """The video an existing clip file was extracted from (None if unknown)."""
    try:
        meta = load_clip(path).get("meta") or {}
    except (ValueError, OSError, RuntimeError):
        return None
    return meta.get("video_path")


def _append_report(path: Path, report: dict) -> None:
    """Add this run to ``extraction_report.json`` (``{"runs": [...]}``), keeping earlier runs."""
    runs = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
            runs = old["runs"] if isinstance(old, dict) and "runs" in old else [old]
        except (ValueError, KeyError):
            runs = []  # unreadable: start again rather than fail after the extraction
    path.write_text(json.dumps({"runs": runs + [report]}, indent=2))


def extract_all(sources: Sequence[ClipSource], out_dir: Path, extractor: ClipExtractor,
                classes: Sequence[str], split: Optional[str] = None, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Extract every clip to ``out_dir``; unreadable clips are skipped and reported.

    Returns this run's report, also appended to ``out_dir/extraction_report.json``:
    ``{"written": [...], "existing": [...], "failed": {clip_id: reason}, ...}``.
    Raises :class:`FeatureMismatchError` before extracting anything if ``out_dir``
    holds features made with other settings.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes_path = out_dir / "classes.json"
    if classes_path.exists() and json.loads(classes_path.read_text()) != list(classes):
        raise ValueError(f"{classes_path} lists {json.loads(classes_path.read_text())}, but this "
                         f"run uses {list(classes)}: class indices would disagree")
    write_dir_settings(out_dir, extractor.settings)
    classes_path.write_text(json.dumps(list(classes)))
    index = {c.lower(): i for i, c in enumerate(classes)}
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "split": split, "written": [],
              "existing": [], "failed": {}, "frames_without_face": 0, "video_frames": 0}
    seen = {}
    t0 = time.time()
    for src in tqdm(sources, desc="clips", unit="clip", disable=not progress):
        try:
            video_path = str(Path(src.video).resolve())
            if src.clip_id in seen:
                raise ValueError(f"duplicate clip id {src.clip_id!r}: {seen[src.clip_id]} and "
                                 f"{video_path}")
            seen[src.clip_id] = video_path
            if src.label_name and src.label_name.lower() not in index:
                raise ValueError(f"label {src.label_name!r} is not one of {list(classes)}")
            clip_path = out_dir / f"{src.clip_id}.pt"
            if clip_path.exists():
                # Same id, other media (e.g. a Val clip named like a Train clip): taking it
                # as "already there" would put the train clip into this split. Refused
                # even with --overwrite, which would replace the other clip silently.
                earlier = _existing_source(clip_path)
                if earlier is not None and str(Path(earlier).resolve()) != video_path:
                    raise ValueError(f"clip id {src.clip_id!r} collides: {clip_path} was "
                                     f"extracted from {earlier}, this run's clip is "
                                     f"{video_path}; give one of them another id (e.g. a "
                                     f"--manifest with distinct clip_id values)")
                if not overwrite:
                    report["existing"].append(src.clip_id)
                    continue
            label = index[src.label_name.lower()] if src.label_name else -1
            clip = extractor.extract(src, label)
            save_clip(clip, out_dir)
            report["written"].append(src.clip_id)
            report["video_frames"] += len(clip["face_found"])
            report["frames_without_face"] += int((~clip["face_found"]).sum())
        except (UnreadableMediaError, ValueError, OSError, RuntimeError) as e:
            # One bad file must not cost the whole run: note it and go on.
            # (FeatureMismatchError is a ValueError: a low-rate file is skipped, with why.)
            report["failed"][src.clip_id] = f"{type(e).__name__}: {e}"
    report["seconds"] = time.time() - t0
    report["config"] = {k: str(v) for k, v in asdict(extractor.config).items()}
    report["features"] = extractor.settings
    if split:
        split_path = out_dir / "splits" / f"{split}.txt"
        ids = read_split(split_path) if split_path.exists() else []
        ok = [s.clip_id for s in sources if s.clip_id not in report["failed"]]
        write_split(split_path, ids + [i for i in ok if i not in set(ids)])
        report["split_file"] = str(split_path)
    _append_report(out_dir / "extraction_report.json", report)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Extract AVER clip features from audio-video files.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("root", type=Path, nargs="?", help="ROOT/<class>/<clip>.avi (+ <clip>.wav)")
    p.add_argument("out", type=Path, help="feature directory to write")
    p.add_argument("--manifest", type=Path, help="CSV clip_id,label,video,audio instead of ROOT")
    p.add_argument("--split", help="append the extracted clip ids to OUT/splits/SPLIT.txt")
    p.add_argument("--classes", default=",".join(EMOTIONS),
                   help="comma-separated class names in label order (default: AFEW emotions)")
    p.add_argument("--backbone", default="resnet18", help="torchvision model name")
    p.add_argument("--backbone-weights", type=Path,
                   help="local state_dict file for the backbone (without: random weights!)")
    p.add_argument("--backbone-seed", type=int, default=0,
                   help="seed of the random backbone used without --backbone-weights (record"
                        "ed in the features; smoke tests only)")
    p.add_argument("--face-detector", choices=("auto", "haar", "yunet", "none"), default="auto")
    p.add_argument("--face-model", type=Path, help="YuNet ONNX file for --face-detector yunet")
    p.add_argument("--fps", type=float, default=5.0, help="video frames kept per second")
    p.add_argument("--max-frames", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n-mels", type=int, default=64)
    p.add_argument("--hop-ms", type=float, default=10.0, help="audio frame hop")
    p.add_argument("--win-ms", type=float, default=25.0, help="audio frame window")
    p.add_argument("--fmax", type=float, default=8000.0,
                   help="top mel band edge in Hz (4000 for 8 kHz telephone audio)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="re-extract existing clip files")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.manifest:
        sources = read_manifest(args.manifest)
    elif args.root:
        sources, ignored = find_clips(args.root, classes)
        if ignored:
            print(f"note: ignoring folders that are not classes: {ignored}")
    else:
        build_parser().error("give ROOT or --manifest")
    if not sources:
        raise SystemExit(f"no clips found (video extensions: {', '.join(VIDEO_EXTENSIONS)})")
    config = ExtractConfig(
        mel=MelConfig(n_mels=args.n_mels, hop_ms=args.hop_ms, win_ms=args.win_ms,
                      fmax=args.fmax),
        fps=args.fps, max_frames=args.max_frames, image_size=args.image_size,
        backbone=args.backbone, backbone_weights=args.backbone_weights,
        backbone_seed=args.backbone_seed,
        face_detector=args.face_detector, face_model=args.face_model, device=args.device)
    report = extract_all(sources, args.out, ClipExtractor(config), classes, args.split,
                         args.overwrite, progress=not args.no_progress)
    print(f"{len(report['written'])} clips written, {len(report['existing'])} already there, "
          f"{len(report['failed'])} skipped; {report['frames_without_face']} of "
          f"{report['video_frames']} video frames had no face (centre-cropped)")
    for clip_id, reason in list(report["failed"].items())[:20]:
        print(f"  skipped {clip_id}: {reason}")
    if len(report["failed"]) > 20:
        print(f"  ... {len(report['failed']) - 20} more in {args.out / 'extraction_report.json'}")
    return report


if __name__ == "__main__":
    from aver.cli import run_main
    run_main(main)
