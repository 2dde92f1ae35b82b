#!/usr/bin/env python
"""Predict the emotion of clips, labelled or not, with a trained checkpoint.

    python examples/aver/predict.py --checkpoint runs/afew/best.pt feats_test/ --out preds
    python examples/aver/predict.py --checkpoint runs/afew/best.pt Test_AFEW/ \\
        --backbone-weights resnet18.pth --save-attention

INPUT (one or more, mixed):

- a clip feature file ``<clip_id>.pt`` (the format ``train.py`` reads);
- a video file with its audio track as ``<stem>.wav`` beside it;
- a folder: its ``*.pt`` feature files if it has any, else every video file under it
  (any depth), each with its ``<stem>.wav``.

Media is turned into features with the checkpoint's own extraction settings (mel
layout, backbone, image size, frame rate, recorded at training time); give the
same ``--backbone-weights`` file (checked by its hash) or nothing for a seeded
random backbone. Feature files must have been made with those settings too.
Any difference is an error that names it.

Writes ``OUT/predictions.csv`` (clip id, source, predicted class, its
probability, one probability column per class, the label if the clip has one)
and ``OUT/predictions.json`` (the same, plus the checkpoint and classes); with
``--save-attention`` also ``OUT/attention/<clip_id>.png``: the pooling weights of
the video frames and the audio frames over time, under the frames' thumbnails and
over the log-mel spectrogram and waveform (media that is no longer on disk, and
synthetic clips, get the weights and the features only).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `aver` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from aver.data import collate_clips, load_clip
from aver.feature_settings import FeatureMismatchError, check_compatible, settings_of

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg")


# ---------------------------------------------------------------------- inputs

def collect_inputs(inputs: Sequence[Path]) -> Tuple[List[Path], List[Path]]:
    """``(feature files, video files)`` named by the command line's INPUTs."""
    features, videos = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            pts = sorted(item.glob("*.pt"))
            if pts:
                features += pts
            else:
                found = sorted(p for p in item.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
                if not found:
                    raise FileNotFoundError(f"{item}: no .pt feature files and no video files "
                                            f"({', '.join(VIDEO_EXTENSIONS)})")
                videos += found
        elif item.suffix == ".pt" and item.is_file():
            features.append(item)
        elif item.suffix.lower() in VIDEO_EXTENSIONS and item.is_file():
            videos.append(item)
        else:
            raise FileNotFoundError(f"{item}: not a .pt feature file, a video file or a folder")
    return features, videos


def extractor_for(settings: Optional[dict], args):
    """A ClipExtractor that reproduces the checkpoint's feature settings."""
    from aver.audio import MelConfig
    from aver.extract_features import ClipExtractor, ExtractConfig

    if not settings or settings.get("type") != "media":
        kind = (settings or {}).get("type", "unrecorded")
        raise ValueError(f"the checkpoint was trained on {kind} features, not on features "
                         f"extracted from media: give its feature files instead of videos")
    weights = settings["video_weights"]
    seed = int(weights.split(":", 1)[1]) if weights.startswith("random-seed:") else 0
    if weights.startswith("sha256:") and args.backbone_weights is None:
        raise ValueError(f"the checkpoint's video features came from a weights file "
                         f"({weights}): pass it with --backbone-weights")
    config = ExtractConfig(
        mel=MelConfig(n_mels=settings["n_mels"], win_ms=settings["win_ms"],
                      hop_ms=settings["hop_ms"], fmin=settings["fmin"], fmax=settings["fmax"]),
        fps=settings["fps"], max_frames=args.max_frames, image_size=settings["image_size"],
        backbone=settings["video_backbone"], backbone_weights=args.backbone_weights,
        backbone_seed=seed, face_detector=args.face_detector, face_model=args.face_model,
        device=str(args.resolved_device))
    extractor = ClipExtractor(config)
    check_compatible(settings, extractor.settings, "the checkpoint's training features",
                     "this extractor")
    return extractor


def load_inputs(features: Sequence[Path], videos: Sequence[Path], settings: Optional[dict],
                checkpoint: Path, args) -> Tuple[List[dict], List[str], Dict[str, str]]:
    """``(clips, sources, skipped)``: clip dicts in input order, where each came from,
    and ``{source: reason}`` for media that could not be read."""
    from aver.extract_features import ClipSource

    clips, sources, skipped = [], [], {}
    seen: Dict[str, str] = {}
    trained_on = f"the features {checkpoint} was trained on"

    def add(clip: dict, source: str) -> None:
        cid = str(clip["clip_id"])
        if cid in seen:
            raise ValueError(f"two inputs have clip id {cid!r}: {seen[cid]} and {source}")
        seen[cid] = source
        clips.append(clip)
        sources.append(source)

    for path in features:
        clip = load_clip(path)
        check_compatible(settings, settings_of(clip), trained_on, str(path))
        add(clip, str(path))
    if videos:
        extractor = extractor_for(settings, args)
        for video in videos:
            try:
                add(extractor.extract(ClipSource(video.stem, "", video, video.with_suffix(".wav")),
                                      label=-1), str(video))
            except FeatureMismatchError:
                raise
            except (ValueError, OSError, RuntimeError) as e:
                skipped[str(video)] = f"{type(e).__name__}: {e}"  # one bad file: go on
    return clips, sources, skipped


# ---------------------------------------------------------------------- model

@torch.no_grad()
def predict_clips(model, clips: Sequence[dict], device, batch_size: int = 32) -> List[dict]:
    """Class probabilities and pooling weights per clip.

    Returns one dict per clip: ``probs`` (num_classes,) float tensor and ``weights``
    ``{modality: (T,) tensor}`` over that clip's real frames.
    """
    model.eval()
    out = []
    for i in range(0, len(clips), batch_size):
        chunk = clips[i:i + batch_size]
        b = collate_clips(list(chunk))
        logits, weights = model(b["audio"].to(device), b["audio_mask"].to(device),
                                b["video"].to(device), b["video_mask"].to(device),
                                return_weights=True)
        probs = torch.softmax(logits.float(), -1).cpu()
        for j, clip in enumerate(chunk):
            out.append({"probs": probs[j],
                        "weights": {m: w[j, : clip[m].shape[0]].float().cpu()
                                    for m, w in weights.items()}})
    return out


# ---------------------------------------------------------------------- outputs

def write_predictions(rows: List[dict], classes: Sequence[str], out_dir: Path,
                      checkpoint: Path, skipped: Dict[str, str]) -> Dict[str, Path]:
    """``predictions.csv`` and ``predictions.json`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "predictions.csv", out_dir / "predictions.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip_id", "source", "predicted", "probability",
                    *[f"p_{c}" for c in classes], "label"])
        for r in rows:
            w.writerow([r["clip_id"], r["source"], r["predicted"],
                        f"{r['probabilities'][r['predicted']]:.6f}",
                        *[f"{r['probabilities'][c]:.6f}" for c in classes], r["label"] or ""])
    json_path.write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve()),
                                     "classes": list(classes), "predictions": rows,
                                     "skipped": skipped}, indent=2))
    return {"csv": csv_path, "json": json_path}


def _media_for_plot(clip: dict):
    """The waveform ``(samples, rate)`` and video frames of a clip, when still on disk."""
    from aver.audio import read_wav

    meta = clip.get("meta") or {}
    wave = frames = None
    audio_path, video_path = meta.get("audio_path"), meta.get("video_path")
    if audio_path and Path(audio_path).is_file():
        try:
            wave = read_wav(audio_path)
        except ValueError:
            wave = None
    if video_path and Path(video_path).is_file() and clip.get("video_fps"):
        from aver.video import UnreadableMediaError, read_frames
        try:
            # The same fps and frame count select the same frames the features came from.
            frames, _ = read_frames(video_path, (meta.get("features") or {}).get("fps", 5.0),
                                    max_frames=clip["video"].shape[0])
        except UnreadableMediaError:
            frames = None
    return wave, frames


def plot_attention(clip: dict, pred: dict, classes: Sequence[str], path: Path) -> Path:
    """One PNG: video and audio pooling weights over time, with the clip's frames,
    log-mel features and waveform (what is available)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    wave, frames = _media_for_plot(clip)
    weights = pred["weights"]
    rows = (["frames"] if frames else []) + (["video"] if "video" in weights else []) + \
        (["audio"] if "audio" in weights else []) + (["wave"] if wave else [])
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.9 * len(rows)), squeeze=False)
    axes = dict(zip(rows, axes[:, 0]))
    v_fps, a_fps = float(clip.get("video_fps") or 1.0), float(clip.get("audio_fps") or 1.0)
    if "frames" in axes:
        import cv2
        thumbs = [cv2.resize(f, (64, int(64 * f.shape[0] / f.shape[1])))[..., ::-1]
                  for f in frames]
        axes["frames"].imshow(np.concatenate(thumbs, axis=1))
        axes["frames"].set_axis_off()
        axes["frames"].set_title("video frames used (left to right)", fontsize=9)
    if "video" in axes:
        w = weights["video"].numpy()
        t = np.arange(len(w)) / v_fps
        found = clip.get("face_found")
        colors = ["tab:blue" if found is None or bool(found[i]) else "tab:gray"
                  for i in range(len(w))]
        axes["video"].bar(t, w, width=0.8 / v_fps, color=colors, align="edge")
        axes["video"].set(ylabel="video weight", xlim=(0, max(len(w) / v_fps, 1e-3)))
        axes["video"].set_title("video attention (grey: no face found, centre crop)", fontsize=9)
    if "audio" in axes:
        ax = axes["audio"]
        feats = clip["audio"].float().numpy().T
        dur = feats.shape[1] / a_fps
        ax.imshow(feats, aspect="auto", origin="lower", cmap="magma", extent=(0, dur, 0, 1))
        ax.set(yticks=[], ylabel="log-mel")
        twin = ax.twinx()
        w = weights["audio"].numpy()
        twin.plot((np.arange(len(w)) + 0.5) / a_fps, w, color="cyan", lw=1.2)
        twin.set(ylabel="audio weight", ylim=(0, max(float(w.max()) * 1.1, 1e-6)), xlim=(0, dur))
        ax.set_title("audio attention over the log-mel frames", fontsize=9)
    if "wave" in axes:
        samples, rate = wave
        axes["wave"].plot(np.arange(len(samples)) / rate, samples, lw=0.4, color="k")
        axes["wave"].set(ylabel="waveform", xlim=(0, len(samples) / rate))
    list(axes.values())[-1].set_xlabel("time (s)")
    probs = pred["probs"]
    k = int(probs.argmax())
    fig.suptitle(f"{clip['clip_id']}: {classes[k]} ({float(probs[k]):.2f})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict emotions of clips (feature files, "
                                            "videos, or folders of either) with a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help=".pt feature file, video file (+ <stem>.wav), or folder of either")
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt or last.pt")
    p.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT_DIR/predict)")
    p.add_argument("--save-attention", action="store_true",
                   help="write OUT/attention/<clip_id>.png per clip")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    m = p.add_argument_group("media inputs (extraction settings come from the checkpoint)")
    m.add_argument("--backbone-weights", type=Path,
                   help="the weights file the training features were extracted with")
    m.add_argument("--face-detector", choices=("auto", "haar", "yunet", "none"), default="auto")
    m.add_argument("--face-model", type=Path, help="YuNet ONNX file for --face-detector yunet")
    m.add_argument("--max-frames", type=int, default=64, help="video frames per clip at most")
    return p


def main(argv=None) -> List[dict]:
    from aver.train import load_checkpoint, resolve_device

    args = build_parser().parse_args(argv)
    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} not found")
    device = args.resolved_device = resolve_device(args.device)
    model, state = load_checkpoint(args.checkpoint, device)
    classes = state.get("classes")
    if not classes:  # checkpoints from before the class names were stored in them
        from aver.data import EMOTIONS, read_classes
        data = state["args"].get("data")
        classes = read_classes(Path(data)) if data else list(EMOTIONS)
    if len(classes) != model.config.num_classes:
        raise ValueError(f"{len(classes)} class names for a {model.config.num_classes}-class "
                         f"checkpoint")
    settings = state.get("feature_settings")
    features, videos = collect_inputs(args.inputs)
    clips, sources, skipped = load_inputs(features, videos, settings, args.checkpoint, args)
    if not clips:
        raise ValueError(f"no clip could be read: {skipped}")
    preds = predict_clips(model, clips, device, args.batch_size)
    out = args.out or args.checkpoint.parent / "predict"
    rows = []
    for clip, source, pred in zip(clips, sources, preds):
        probs = {c: float(p) for c, p in zip(classes, pred["probs"])}
        label = int(clip.get("label", -1))
        rows.append({"clip_id": str(clip["clip_id"]), "source": source,
                     "predicted": classes[int(pred["probs"].argmax())], "probabilities": probs,
                     "label": classes[label] if 0 <= label < len(classes) else None})
        if args.save_attention:
            rows[-1]["attention_png"] = str(plot_attention(
                clip, pred, classes, out / "attention" / f"{clip['clip_id']}.png"))
    paths = write_predictions(rows, classes, out, args.checkpoint, skipped)
    for r in rows[:20]:
        print(f"{r['clip_id']:>24s}  {r['predicted']:>10s}  {r['probabilities'][r['predicted']]:.3f}")
    if len(rows) > 20:
        print(f"... {len(rows) - 20} more")
    for source, reason in skipped.items():
        print(f"skipped {source}: {reason}")
    print(f"wrote {paths['csv']} and {paths['json']}"
          + (f" and {len(rows)} PNGs in {out / 'attention'}" if args.save_attention else ""))
    return rows


if __name__ == "__main__":
    from aver.cli import run_main
    run_main(main)
