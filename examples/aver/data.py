"""Clip feature files, split lists, padding collate and the synthetic task.

Clip format (one ``<clip_id>.pt`` per clip, a dict saved with ``torch.save``):

=============== ============================ =========================================
key             type / shape                 meaning
=============== ============================ =========================================
``format``      str                          ``"aver-clip-v1"``
``clip_id``     str                          unique id; the file stem
``label``       int                          class index into ``classes``; -1 = unknown
``label_name``  str                          class name ("" when unknown)
``audio``       float32 ``(Ta, Da)``         audio frames (log-mel: Da = n_mels)
``video``       float32 ``(Tv, Dv)``         video frames (CNN embedding per frame)
``audio_fps``   float                        audio frames per second
``video_fps``   float                        video frames per second after sampling
``face_found``  bool ``(Tv,)``               per video frame: detector found a face
                                             (False: centre-crop fallback)
``meta``        dict                         provenance (paths, settings); its
                                             ``features`` entry holds the settings
                                             checked by :mod:`aver.feature_settings`
=============== ============================ =========================================

A feature directory holds the ``.pt`` files, ``classes.json`` (the ordered list
of class names; the AFEW emotions when absent) and ``splits/{train,val,test}.txt``
with one clip id per line (blank lines and ``#`` comments ignored).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `aver` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from aver.feature_settings import check_compatible, read_dir_settings, settings_of

FORMAT = "aver-clip-v1"
EMOTIONS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------- files and splits

def validate_clip(clip: dict, where: str = "clip") -> dict:
    """Check a clip dict against the format; returns it, or raises ValueError."""
    missing = {"clip_id", "label", "audio", "video"} - set(clip)
    if missing:
        raise ValueError(f"{where}: missing keys {sorted(missing)}")
    for key in ("audio", "video"):
        x = clip[key]
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{where}: {key} must be a (T>=1, D) tensor, got {shape}")
    return clip


def save_clip(clip: dict, directory: Path) -> Path:
    """Write one clip as ``<directory>/<clip_id>.pt``."""
    validate_clip(clip)
    path = Path(directory) / f"{clip['clip_id']}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, **clip}, path)
    return path


def load_clip(path: Path) -> dict:
    clip = torch.load(path, map_location="cpu", weights_only=True)
    if clip.get("format") != FORMAT:
        raise ValueError(f"{path}: format {clip.get('format')!r}, expected {FORMAT!r}")
    return validate_clip(clip, str(path))


def read_split(path: Path) -> List[str]:
    """Clip ids of a split file: one per line, blank lines and ``#`` comments skipped."""
    ids = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids


def write_split(path: Path, ids: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def read_classes(feature_dir: Path) -> List[str]:
    path = Path(feature_dir) / "classes.json"
    return json.loads(path.read_text()) if path.exists() else list(EMOTIONS)


class ClipDataset(Dataset):
    """The clips of one split, loaded lazily from a feature directory.

    ``ClipDataset(feature_dir, "train")`` reads ``feature_dir/splits/train.txt``
    (or ``splits_dir/train.txt``). Missing clip files fail at construction with
    the list of what is missing, not halfway through an epoch. With
    ``expected_settings`` every clip loaded (and the directory's ``features.json``)
    is checked against them (:class:`~aver.feature_settings.FeatureMismatchError`).
    """

    def __init__(self, feature_dir: Path, split: str, splits_dir: Optional[Path] = None,
                 preload: bool = False, expected_settings: Optional[dict] = None,
                 expected_name: str = "the training features") -> None:
        self.dir = Path(feature_dir)
        split_file = Path(splits_dir or self.dir / "splits") / f"{split}.txt"
        if not split_file.exists():
            raise FileNotFoundError(f"split file {split_file} not found (one clip id per line)")
        self.ids = read_split(split_file)
        if not self.ids:
            raise ValueError(f"split file {split_file} lists no clips")
        self.paths = [self.dir / f"{i}.pt" for i in self.ids]
        missing = [p.name for p in self.paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} clips of {split_file} have no feature file "
                                    f"in {self.dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.classes = read_classes(self.dir)
        self.expected_settings, self.expected_name = expected_settings, expected_name
        check_compatible(expected_settings, read_dir_settings(self.dir), expected_name,
                         f"{self.dir / 'features.json'}")
        self._cache = [self._load(i) for i in range(len(self.paths))] if preload else None

    def _load(self, i: int) -> dict:
        clip = load_clip(self.paths[i])
        check_compatible(self.expected_settings, settings_of(clip), self.expected_name,
                         str(self.paths[i]))
        return clip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return self._cache[i] if self._cache is not None else self._load(i)

    def labels(self) -> List[int]:
        """The label of every clip (reads each file once unless preloaded)."""
        return [int(self[i]["label"]) for i in range(len(self))]


class InMemoryDataset(Dataset):
    """A list of clip dicts (the synthetic set, or clips already in memory)."""

    def __init__(self, clips: List[dict], classes: Sequence[str]) -> None:
        self.clips = [validate_clip(c) for c in clips]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        return self.clips[i]

    def labels(self) -> List[int]:
        return [int(c["label"]) for c in self.clips]


def _pad(seqs: List[Tensor]):
    lengths = torch.tensor([s.shape[0] for s in seqs])
    out = torch.zeros(len(seqs), int(lengths.max()), seqs[0].shape[1], dtype=torch.float32)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    mask = torch.arange(out.shape[1])[None, :] < lengths[:, None]
    return out, mask


def collate_clips(clips: List[dict]) -> Dict[str, object]:
    """Pad a list of clips into a batch.

    Returns ``audio (B, Ta, Da)``, ``audio_mask (B, Ta)`` bool, ``video (B, Tv, Dv)``,
    ``video_mask (B, Tv)`` bool (True = real frame; padding is zeros), ``label (B,)``
    int64, ``clip_id`` (list of B str) and ``meta`` (list of B dicts, may be None).
    """
    audio, audio_mask = _pad([c["audio"] for c in clips])
    video, video_mask = _pad([c["video"] for c in clips])
    return {"audio": audio, "audio_mask": audio_mask, "video": video, "video_mask": video_mask,
            "label": torch.tensor([int(c["label"]) for c in clips], dtype=torch.int64),
            "clip_id": [str(c["clip_id"]) for c in clips],
            "meta": [c.get("meta") for c in clips]}


# ------------------------------------------------------------------ synthetic task

class SyntheticTask:
    """A task where the label is an audio-video interaction carried by a few frames.

    Each clip draws an audio token ``a`` and a video token ``v`` (each uniform in
    ``0..classes-1``) and gets the label ``(a + v) mod classes``. Either token alone
    says nothing about the label (its marginal is uniform whatever ``a`` is), so
    one modality alone sits at chance and the model must combine both.

    Frames are Gaussian noise; ``salient`` frames per modality (random positions)
    carry the clip's token prototype plus a shared "salience" direction, and each
    other frame carries a random distractor token with probability
    ``distractor_prob`` (without the salience direction). Averaging all frames
    mixes the true token with the distractors, so mean pooling sees a weak
    signal; attention can find the salient frames and read their token.
    """

    def __init__(self, audio_dim: int = 40, video_dim: int = 64, classes: int = 7,
                 audio_frames=(24, 48), video_frames=(8, 16), salient: int = 3,
                 distractor_prob: float = 0.5, noise: float = 0.6, seed: int = 1234) -> None:
        if salient < 1 or salient > min(audio_frames[0], video_frames[0]):
            raise ValueError(f"salient must be in [1, shortest clip], got {salient}")
        self.audio_dim, self.video_dim, self.classes = audio_dim, video_dim, classes
        self.audio_frames, self.video_frames = audio_frames, video_frames
        self.salient, self.distractor_prob, self.noise = salient, distractor_prob, noise
        # What the feature-compatibility check compares (aver.feature_settings).
        self.settings = {"type": "synthetic", "audio_dim": audio_dim, "video_dim": video_dim,
                         "classes": classes, "task_seed": seed}
        # The prototypes define the task: a fixed seed, independent of the sample seed,
        # so train, val and test sets drawn with different seeds share them.
        g = torch.Generator().manual_seed(seed)
        self.protos = {"audio": self._unit(torch.randn(classes, audio_dim, generator=g)),
                       "video": self._unit(torch.randn(classes, video_dim, generator=g))}
        self.marker = {"audio": self._unit(torch.randn(1, audio_dim, generator=g))[0],
                       "video": self._unit(torch.randn(1, video_dim, generator=g))[0]}

    @staticmethod
    def _unit(x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True) * math.sqrt(x.shape[-1]) * 0.5

    def _stream(self, modality: str, token: int, frames, g: torch.Generator):
        dim = self.protos[modality].shape[1]
        t = int(torch.randint(frames[0], frames[1] + 1, (1,), generator=g))
        x = self.noise * torch.randn(t, dim, generator=g)
        salient = torch.randperm(t, generator=g)[: self.salient]
        is_salient = torch.zeros(t, dtype=torch.bool)
        is_salient[salient] = True
        distract = (torch.rand(t, generator=g) < self.distractor_prob) & ~is_salient
        tokens = torch.randint(0, self.classes, (t,), generator=g)
        x[distract] += self.protos[modality][tokens[distract]]
        x[is_salient] += self.protos[modality][token] + self.marker[modality]
        return x, is_salient

    def sample(self, n: int, seed: int, prefix: str = "syn") -> List[dict]:
        """``n`` clips in the clip format; the same ``seed`` gives the same clips."""
        g = torch.Generator().manual_seed(seed)
        clips = []
        for i in range(n):
            a, v = (int(t) for t in torch.randint(0, self.classes, (2,), generator=g))
            audio, audio_salient = self._stream("audio", a, self.audio_frames, g)
            video, video_salient = self._stream("video", v, self.video_frames, g)
            label = (a + v) % self.classes
            clips.append({
                "format": FORMAT, "clip_id": f"{prefix}{seed}_{i:05d}", "label": label,
                "label_name": EMOTIONS[label] if self.classes == len(EMOTIONS) else str(label),
                "audio": audio, "video": video, "audio_fps": 25.0, "video_fps": 5.0,
                "face_found": torch.ones(video.shape[0], dtype=torch.bool),
                "meta": {"synthetic": True, "features": dict(self.settings),
                         "audio_token": a, "video_token": v,
                         "audio_salient": audio_salient, "video_salient": video_salient}})
        return clips

    def class_names(self) -> List[str]:
        return list(EMOTIONS) if self.classes == len(EMOTIONS) else [str(i) for i in range(self.classes)]


def synthetic_splits(sizes=(2000, 500, 500), seed: int = 0, **task_kwargs):
    """``{"train": ds, "val": ds, "test": ds}`` of the synthetic task, disjoint seeds."""
    task = SyntheticTask(**task_kwargs)
    return {name: InMemoryDataset(task.sample(n, seed=seed * 10 + k, prefix=f"{name}-"),
                                  task.class_names())
            for k, (name, n) in enumerate(zip(SPLITS, sizes))}, task


def write_synthetic(out_dir: Path, sizes=(2000, 500, 500), seed: int = 0, **task_kwargs) -> Path:
    """Write the synthetic set as a feature directory (clip files, classes, splits)."""
    out_dir = Path(out_dir)
    splits, task = synthetic_splits(sizes, seed, **task_kwargs)
    for name, ds in splits.items():
        for clip in ds.clips:
            save_clip(clip, out_dir)
        write_split(out_dir / "splits" / f"{name}.txt", [c["clip_id"] for c in ds.clips])
    (out_dir / "classes.json").write_text(json.dumps(task.class_names()))
    (out_dir / "features.json").write_text(json.dumps(task.settings, indent=2, sort_keys=True))
    return out_dir


# ------------------------------------------------------------------ split tools

def carve_split(feature_dir: Path, source: str = "train", target: str = "val",
                fraction: float = 0.1, seed: int = 0) -> Dict[str, int]:
    """Move a stratified ``fraction`` of ``splits/<source>.txt`` into ``splits/<target>.txt``.

    AFEW has labelled Train and Val sets and an unlabelled Test set: extract Train
    as ``train`` and Val as ``test``, then carve a validation set out of ``train``
    for model selection. Refuses to overwrite an existing target split.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    split_dir = Path(feature_dir) / "splits"
    target_path = split_dir / f"{target}.txt"
    if target_path.exists():
        raise FileExistsError(f"{target_path} exists; remove it first")
    ids = read_split(split_dir / f"{source}.txt")
    by_label: Dict[int, List[str]] = {}
    for i in ids:
        by_label.setdefault(int(load_clip(Path(feature_dir) / f"{i}.pt")["label"]), []).append(i)
    g = torch.Generator().manual_seed(seed)
    moved = set()
    for label_ids in by_label.values():
        k = int(round(fraction * len(label_ids)))
        moved.update(label_ids[j] for j in torch.randperm(len(label_ids), generator=g)[:k].tolist())
    write_split(target_path, [i for i in ids if i in moved])
    write_split(split_dir / f"{source}.txt", [i for i in ids if i not in moved])
    return {source: len(ids) - len(moved), target: len(moved)}


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Split-file and synthetic-data tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("carve", help="move a stratified fraction of one split into a new one")
    c.add_argument("feature_dir", type=Path)
    c.add_argument("--source", default="train")
    c.add_argument("--target", default="val")
    c.add_argument("--fraction", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("synthetic", help="write the synthetic task as a feature directory")
    s.add_argument("out", type=Path)
    s.add_argument("--sizes", type=int, nargs=3, default=(2000, 500, 500))
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd == "carve":
        print(carve_split(args.feature_dir, args.source, args.target, args.fraction, args.seed))
    else:
        print(f"wrote {write_synthetic(args.out, tuple(args.sizes), args.seed)}")


if __name__ == "__main__":
    from aver.cli import run_main
    run_main(main)
