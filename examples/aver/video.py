"""Video frames (OpenCV), face crops, and per-frame CNN embeddings (torchvision).

Pipeline for one clip: read every frame with ``cv2.VideoCapture``, keep about
``fps`` frames per second (at most ``max_frames``, spread uniformly), find the
most confident face in each kept frame, crop a square around it (with a margin), resize,
normalise with the ImageNet statistics and embed with a torchvision backbone
whose classification head is removed.

Face detectors (``make_face_detector``), none of which downloads anything:

- ``haar``: the frontal-face Haar cascade that OpenCV 4.x ships in
  ``cv2.data.haarcascades``. OpenCV 5 removed ``CascadeClassifier`` and the cascade
  files from the main package; with it this detector is unavailable.
- ``yunet``: ``cv2.FaceDetectorYN`` (OpenCV >= 4.8, including 5.x) with a YuNet
  ONNX model file that you supply (``--face-model``; it is not in the wheel).
- ``none``: no detection.
- ``auto``: ``yunet`` if a model file is given, else ``haar`` if available, else
  ``none`` with a warning.

Fallback: a frame where no face is found (or with ``none``) is centre-cropped
(the largest centred square); its ``face_found`` flag is False so you can
count or filter such frames later.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor, nn

# x, y, width, height in pixels, and optionally a confidence (higher = surer) as a 5th
# entry; crop_face picks the most confident box, or the largest when there are no scores.
Box = Tuple[float, ...]
Detector = Callable[[np.ndarray], List[Box]]  # BGR uint8 (H, W, 3) -> boxes

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
HAAR_FILE = "haarcascade_frontalface_default.xml"


class UnreadableMediaError(RuntimeError):
    """A media file that cannot be opened or decoded (the clip is skipped)."""


# ---------------------------------------------------------------------- frames

def read_frames(path: Path, fps: float = 5.0, max_frames: int = 64) -> Tuple[List[np.ndarray], float]:
    """Frames of a video, subsampled: ``([BGR uint8 (H, W, 3), ...], kept fps)``.

    Keeps every ``round(source_fps / fps)``-th frame (every frame when the file
    reports no frame rate), then at most ``max_frames`` spread uniformly over
    the clip. Raises :class:`UnreadableMediaError` if nothing can be decoded.
    """
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"need fps > 0 and max_frames >= 1, got fps={fps}, max_frames={max_frames}")
    if not Path(path).is_file():
        raise UnreadableMediaError(f"{path}: no such file")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise UnreadableMediaError(f"{path}: OpenCV cannot open this video")
        src_fps = cap.get(cv2.CAP_PROP_FPS)
        src_fps = src_fps if src_fps and np.isfinite(src_fps) and src_fps > 0 else fps
        stride = max(1, int(round(src_fps / fps)))
        frames, i = [], 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % stride == 0:
                frames.append(frame)
            i += 1
    finally:
        cap.release()
    if not frames:
        raise UnreadableMediaError(f"{path}: no decodable frames")
    kept_fps = src_fps / stride
    if len(frames) > max_frames:
        idx = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        kept_fps *= max_frames / len(frames)
        frames = [frames[j] for j in idx]
    return frames, float(kept_fps)


# ---------------------------------------------------------------------- faces

def haar_available() -> bool:
    """True when this OpenCV has ``CascadeClassifier`` and ships the frontal-face file."""
    base = getattr(getattr(cv2, "data", None), "haarcascades", None)
    return hasattr(cv2, "CascadeClassifier") and bool(base) and (Path(base) / HAAR_FILE).is_file()


def make_face_detector(kind: str = "auto", model_path: Optional[Path] = None,
                       min_size: int = 30) -> Optional[Detector]:
    """A face detector ``BGR image -> [(x, y, w, h), ...]``, or None for ``kind='none'``."""
    if kind == "auto":
        kind = "yunet" if model_path else "haar" if haar_available() else "none"
        if kind == "none":
            warnings.warn(
                f"no face detector available (OpenCV {cv2.__version__} has no Haar cascade "
                f"and no --face-model YuNet file was given): every video frame is "
                f"centre-cropped. Install opencv-python-headless<5 for the Haar cascade, or "
                f"pass a YuNet ONNX file.", stacklevel=2)
    if kind == "none":
        return None
    if kind == "haar":
        if not haar_available():
            raise RuntimeError(f"the Haar cascade is not available in OpenCV {cv2.__version__} "
                               f"(OpenCV 5 removed CascadeClassifier); install "
                               f"opencv-python-headless<5, or use --face-detector yunet/none")
        cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / HAAR_FILE))

        def detect(image: np.ndarray) -> List[Box]:
            gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
            # detectMultiScale3 also returns each box's final-stage weight: a confidence,
            # so a false positive on a textured background need not beat the real face
            # just because its box is larger.
            found, _, weights = cascade.detectMultiScale3(
                gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size),
                outputRejectLevels=True)
            return [tuple(int(v) for v in b) + (float(np.ravel(w)[0]),)
                    for b, w in zip(found, weights)]
        return detect
    if kind == "yunet":
        if model_path is None or not Path(model_path).is_file():
            raise FileNotFoundError(f"--face-detector yunet needs a YuNet ONNX model file; "
                                    f"got {model_path}")
        yunet = cv2.FaceDetectorYN.create(str(model_path), "", (320, 320))

        def detect(image: np.ndarray) -> List[Box]:
            yunet.setInputSize((image.shape[1], image.shape[0]))
            _, faces = yunet.detect(image)
            # Row layout: box (4), five landmarks (10), score.
            return [] if faces is None else [tuple(int(v) for v in f[:4]) + (float(f[14]),)
                                             for f in faces]
        return detect
    raise ValueError(f"face detector must be auto, haar, yunet or none, got {kind!r}")


def crop_face(image: np.ndarray, detector: Optional[Detector], margin: float = 0.2
              ) -> Tuple[np.ndarray, bool]:
    """Square crop around the most confident detected face, else the centre square.

    Boxes with a 5th entry (a confidence) are ranked by it, boxes without by area.
    Returns ``(crop (S, S, 3) BGR, face_found)``. The face box is grown by
    ``margin`` on every side (faces are detected tightly; expression lives in the
    brow and chin too) and clipped to the image.
    """
    h, w = image.shape[:2]
    boxes = detector(image) if detector is not None else []
    if boxes:
        best = max(boxes, key=lambda b: (b[4], b[2] * b[3]) if len(b) > 4 else (b[2] * b[3],))
        x, y, bw, bh = (int(v) for v in best[:4])
        side = int(max(bw, bh) * (1 + 2 * margin))
        cx, cy = x + bw / 2, y + bh / 2
        side = min(side, h, w)
        x0 = int(np.clip(cx - side / 2, 0, w - side))
        y0 = int(np.clip(cy - side / 2, 0, h - side))
        return image[y0:y0 + side, x0:x0 + side], True
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    return image[y0:y0 + side, x0:x0 + side], False


def to_tensor(crops: List[np.ndarray], size: int) -> Tensor:
    """BGR crops -> normalised RGB batch ``(N, 3, size, size)`` float32."""
    batch = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops])
    rgb = batch[..., ::-1].astype(np.float32) / 255.0
    return torch.from_numpy(((rgb - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).copy())


# ---------------------------------------------------------------------- backbone

def build_backbone(name: str = "resnet18", weights: Optional[Path] = None,
                   seed: int = 0) -> Tuple[nn.Module, int]:
    """A torchvision classification model with its head removed, and its output width.

    ``weights``: a local file with the model's ``state_dict`` (as saved by
    ``torch.save(model.state_dict())``, or torchvision's downloaded ``.pth``; a dict
    with a ``state_dict`` or ``model`` entry and ``module.`` prefixes also work).
    Without it the weights are random, drawn from ``seed`` (so two extraction runs
    with the same seed give the same backbone and comparable features) and the
    embeddings carry no visual meaning: a loud warning says so. Nothing is downloaded.
    """
    import torchvision

    # The seed only matters without a weights file; fork_rng keeps the caller's RNG
    # stream untouched either way.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, weights=None)
    if weights is None:
        banner = ("!" * 78 + f"\n!! WARNING: {name} has RANDOM weights (seed {seed}; no "
                  f"--backbone-weights file given).\n!! Its frame embeddings are meaningless "
                  f"for emotion recognition: use them ONLY\n!! for smoke tests of the "
                  f"pipeline, never for results.\n" + "!" * 78)
        print(banner, file=sys.stderr)
        warnings.warn(f"{name} backbone has random weights (seed {seed}): features for smoke "
                      f"tests only", stacklevel=2)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match torchvision {name}: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
    # Drop the classification head: the embedding is whatever feeds it.
    if isinstance(getattr(model, "fc", None), nn.Linear):
        dim = model.fc.in_features
        model.fc = nn.Identity()
    elif isinstance(getattr(model, "classifier", None), nn.Sequential):
        # The first Linear of the head sees the pooled features (mobilenet, efficientnet).
        dim = [m for m in model.classifier if isinstance(m, nn.Linear)][0].in_features
        model.classifier = nn.Identity()
    else:
        raise ValueError(f"don't know where the head of torchvision {name} is (expected .fc "
                         f"or .classifier); pick e.g. resnet18, resnet50, mobilenet_v3_small")
    return model.eval(), dim


@torch.no_grad()
def embed(backbone: nn.Module, images: Tensor, batch_size: int = 32,
          device: torch.device = torch.device("cpu")) -> Tensor:
    """``(N, 3, S, S) -> (N, D)`` float32 embeddings, in batches."""
    out = [backbone(images[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).flatten(1)
