#!/usr/bin/env python
"""Generated media in AFEW's layout, to try the real-data path without a dataset.

    python examples/aver/make_demo_media.py /tmp/aver_demo

writes ``OUT/Train/<class>/<clip>.avi`` + ``.wav`` (``--train`` clips per class),
``OUT/Val/<class>/...`` (``--val`` per class, names prefixed ``val_`` so they never
collide with Train's) and ``OUT/Test/`` (``--test`` unlabelled clips, no class
folders, like AFEW's Test set). Each clip is a drawn cartoon face (the mouth
opens wider, and the face moves, by class) and a tone whose pitch and loudness
depend on the class, with noise: easy, but it needs the pipeline end to end.
MJPG ``.avi`` and 16-bit PCM WAV, both written with OpenCV and the stdlib only.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `aver` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from typing import List, Sequence

import cv2
import numpy as np

from aver.audio import write_wav
from aver.data import EMOTIONS


def draw_face(size: int, mouth_open: float = 0.03) -> np.ndarray:
    """A cartoon frontal face (BGR uint8, ``(size, size, 3)``) that OpenCV 4's Haar
    cascade detects; ``mouth_open`` is the mouth's half-height as a share of ``size``."""
    img = np.full((size, size, 3), 90, np.uint8)
    c = size // 2
    cv2.ellipse(img, (c, c), (int(size * .3), int(size * .38)), 0, 0, 360, (170, 190, 215), -1)
    for dx in (-1, 1):
        ex, ey = c + dx * int(size * .12), c - int(size * .08)
        cv2.ellipse(img, (ex, ey - int(size * .07)), (int(size * .08), int(size * .02)), 0, 0, 360,
                    (40, 50, 60), -1)
        cv2.ellipse(img, (ex, ey), (int(size * .06), int(size * .03)), 0, 0, 360, (30, 30, 30), -1)
    cv2.ellipse(img, (c, c + int(size * .06)), (int(size * .03), int(size * .08)), 0, 0, 360,
                (140, 160, 190), -1)
    cv2.ellipse(img, (c, c + int(size * .2)), (int(size * .1), max(1, int(size * mouth_open))),
                0, 0, 360, (60, 60, 120), -1)
    return cv2.GaussianBlur(img, (5, 5), 0)


def write_clip(stem: Path, k: int, n_classes: int, seconds: float, rng: np.random.Generator,
               fps: int = 10, rate: int = 16000) -> None:
    """``stem.avi`` and ``stem.wav`` for class index ``k``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    share = k / max(1, n_classes - 1)
    frames = []
    for j in range(max(1, int(fps * seconds))):
        frame = np.full((200, 320, 3), 30, np.uint8)
        x = int(10 + 140 * share + 3 * j) % 150  # where the face sits depends on the class
        frame[20:180, x:x + 160] = draw_face(160, 0.02 + 0.06 * share)
        noise = rng.integers(-8, 9, frame.shape)
        frames.append(np.clip(frame.astype(int) + noise, 0, 255).astype(np.uint8))
    writer = cv2.VideoWriter(str(stem.with_suffix(".avi")), cv2.VideoWriter_fourcc(*"MJPG"),
                             fps, (320, 200))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write MJPG .avi files here")
    for f in frames:
        writer.write(f)
    writer.release()
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.05 + 0.3 * share) * np.sin(2 * np.pi * (200 + 600 * share) * t)
    write_wav(stem.with_suffix(".wav"), tone + 0.01 * rng.standard_normal(len(t)), rate)


def write_demo(out: Path, classes: Sequence[str] = EMOTIONS, train: int = 4, val: int = 2,
               test: int = 3, seconds: float = 1.0, seed: int = 0) -> List[Path]:
    """Write the three trees under ``out``; returns ``[Train, Val, Test]`` folders."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        for i in range(train):
            write_clip(out / "Train" / name.capitalize() / f"{name}_{i:03d}", k, len(classes),
                       seconds, rng)
        for i in range(val):
            write_clip(out / "Val" / name.capitalize() / f"val_{name}_{i:03d}", k, len(classes),
                       seconds, rng)
    for i in range(test):
        write_clip(out / "Test" / f"test_{i:03d}", int(rng.integers(len(classes))), len(classes),
                   seconds, rng)
    return [out / "Train", out / "Val", out / "Test"]


def main(argv=None) -> List[Path]:
    p = argparse.ArgumentParser(description="Write generated clips in AFEW's layout.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=4, help="Train clips per class")
    p.add_argument("--val", type=int, default=2, help="Val clips per class")
    p.add_argument("--test", type=int, default=3, help="unlabelled Test clips")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dirs = write_demo(args.out, EMOTIONS, args.train, args.val, args.test, args.seconds,
                      args.seed)
    print("wrote " + ", ".join(map(str, dirs)))
    return dirs


if __name__ == "__main__":
    from aver.cli import run_main
    run_main(main)
