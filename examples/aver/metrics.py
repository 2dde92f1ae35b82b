"""Classification metrics and the confusion-matrix figure (numpy + matplotlib)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[true, predicted]`` counts, ``(num_classes, num_classes)`` int64."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in shape")
    bad = (labels < 0) | (labels >= num_classes) | (preds < 0) | (preds >= num_classes)
    if bad.any():
        raise ValueError(f"labels/preds outside [0, {num_classes}) at {np.flatnonzero(bad)[:5]}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def summarize(cm: np.ndarray, class_names: Sequence[str]) -> Dict[str, object]:
    """Accuracy, per-class accuracy (recall), per-class F1 and macro F1 from a matrix.

    A class with no examples gets per-class accuracy ``None`` and is left out of
    the macro F1 (averaging a 0/0 would make the number depend on a convention).
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    per_class_acc, per_class_f1 = {}, {}
    for i, name in enumerate(class_names):
        if support[i] == 0:
            per_class_acc[name] = None
            per_class_f1[name] = None
            continue
        per_class_acc[name] = float(tp[i] / support[i])
        denom = support[i] + predicted[i]
        per_class_f1[name] = float(2 * tp[i] / denom)
    f1s = [v for v in per_class_f1.values() if v is not None]
    return {"accuracy": float(tp.sum() / total) if total else float("nan"),
            "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
            "per_class_accuracy": per_class_acc, "per_class_f1": per_class_f1,
            "support": {n: int(s) for n, s in zip(class_names, support)},
            "num_examples": int(total)}


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Path,
                   title: Optional[str] = None) -> Path:
    """Save a row-normalised confusion matrix (counts in the cells) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(class_names), 0.8 + 0.7 * len(class_names)))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


METRICS_COLUMNS = ("epoch", "train_loss", "lr", "seconds", "val_loss", "val_accuracy",
                   "val_macro_f1")


def write_metrics_csv(history: Sequence[dict], path: Path) -> Path:
    """One row per epoch (1-based ``epoch``); empty cells where a value is absent."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for h in history:
            w.writerow({**h, "epoch": h["epoch"] + 1})
    return path


def plot_training_curves(history: Sequence[dict], path: Path, title: Optional[str] = None) -> Path:
    """Training/validation loss and validation accuracy per epoch, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train")
    if all("val_loss" in h for h in history):
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", ms=3, label="validation")
        ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", ms=3, label="accuracy")
        ax_acc.plot(epochs, [h["val_macro_f1"] for h in history], "o-", ms=3, label="macro F1")
        ax_acc.set_ylim(0, 1)
        ax_acc.legend()
    else:
        ax_acc.text(0.5, 0.5, "no validation split", ha="center", va="center",
                    transform=ax_acc.transAxes)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", title="validation")
    ax_loss.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
