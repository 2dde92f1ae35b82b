#!/usr/bin/env python
"""Evaluate an ``AttentionAVER`` checkpoint: metrics JSON and confusion-matrix PNG.

    python examples/aver/evaluate.py --checkpoint runs/syn/best.pt --synthetic
    python examples/aver/evaluate.py --checkpoint runs/afew/best.pt --data feats/ --split val

Writes ``<out>/eval_<split>_results.json`` (accuracy, per-class accuracy, macro F1,
per-class F1, support, confusion matrix, and for the synthetic task the share of
attention on the frames that carry the label) and ``<out>/eval_<split>_confusion.png``
(the ``eval_`` prefix keeps training's own ``test_results.json`` intact). The
clips' feature settings must match the checkpoint's training features.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `aver` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from aver.data import collate_clips
from aver.metrics import confusion_matrix, plot_confusion, summarize


@torch.no_grad()
def evaluate_model(model, loader, device, class_names: List[str]) -> Dict[str, object]:
    """Run ``model`` over ``loader``; returns the metrics dict (see :func:`summarize`)
    plus ``loss``, ``confusion_matrix`` (nested lists, ``[true][predicted]``),
    ``predictions`` (clip id -> class index) and, where clips carry the synthetic
    task's salient-frame masks, ``attention_on_salient`` per modality: the mean
    share of pooling weight that falls on the frames carrying the label.
    """
    model.eval()
    labels, preds, ids = [], [], []
    loss_sum = 0.0
    salient_mass: Dict[str, List[float]] = {}
    for batch in loader:
        logits, weights = model(batch["audio"].to(device), batch["audio_mask"].to(device),
                                batch["video"].to(device), batch["video_mask"].to(device),
                                return_weights=True)
        y = batch["label"].to(device)
        if (y >= 0).all():
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        labels.append(batch["label"].numpy())
        preds.append(logits.argmax(-1).cpu().numpy())
        ids += batch["clip_id"]
        for modality, w in weights.items():
            for row, meta in zip(w.cpu(), batch["meta"]):
                mask = (meta or {}).get(f"{modality}_salient")
                if mask is not None:
                    salient_mass.setdefault(modality, []).append(float(row[: len(mask)][mask].sum()))
    labels, preds = np.concatenate(labels), np.concatenate(preds)
    if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} clips have no label (-1); metrics need labels (use predict.py for unlabelled clips)")
    cm = confusion_matrix(labels, preds, len(class_names))
    out = summarize(cm, class_names)
    out["loss"] = loss_sum / max(len(labels), 1)
    out["confusion_matrix"] = cm.tolist()
    out["class_names"] = list(class_names)
    out["predictions"] = {i: int(p) for i, p in zip(ids, preds)}
    if salient_mass:
        out["attention_on_salient"] = {m: float(np.mean(v)) for m, v in salient_mass.items()}
    return out


def write_report(results: Dict[str, object], out_dir: Path, split: str,
                 title: Optional[str] = None) -> Dict[str, Path]:
    """Write ``<split>_results.json`` and ``<split>_confusion.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{split}_results.json"
    json_path.write_text(json.dumps(results, indent=2))
    png = plot_confusion(np.array(results["confusion_matrix"]), results["class_names"],
                         out_dir / f"{split}_confusion.png",
                         title or f"{split}: accuracy {results['accuracy']:.3f}, "
                                  f"macro F1 {results['macro_f1']:.3f}")
    return {"json": json_path, "png": png}


def format_summary(results: Dict[str, object]) -> str:
    lines = [f"accuracy {results['accuracy']:.4f}  macro F1 {results['macro_f1']:.4f}  "
             f"loss {results['loss']:.4f}  ({results['num_examples']} clips)"]
    for name, acc in results["per_class_accuracy"].items():
        lines.append(f"  {name:>10s}: {'n/a' if acc is None else f'{acc:.3f}'}"
                     f"  (n={results['support'][name]})")
    if "attention_on_salient" in results:
        lines.append("  attention on salient frames: " + ", ".join(
            f"{m} {v:.3f}" for m, v in results["attention_on_salient"].items()))
    return "\n".join(lines)


def main(argv=None) -> Dict[str, object]:
    from aver.train import build_datasets, load_checkpoint  # train imports this module

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, help="feature directory (default: the checkpoint's)")
    p.add_argument("--splits", type=Path, help="directory of split files (default DATA/splits)")
    p.add_argument("--synthetic", action="store_true",
                   help="evaluate on the synthetic set the checkpoint was trained with")
    p.add_argument("--split", default="test", help="split file name (default test)")
    p.add_argument("--out", type=Path, help="output directory (default: the checkpoint's)")
    p.add_argument("--prefix", default="eval_", help="prefix of the output file names")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    model, state = load_checkpoint(args.checkpoint, device)
    targs = argparse.Namespace(**state["args"])
    if args.synthetic:
        targs.synthetic = True
    elif args.data:
        targs.synthetic, targs.data, targs.splits = False, args.data, args.splits
    elif targs.data and not Path(targs.data).is_absolute():
        # Checkpoints from before paths were stored absolute: the data path was relative
        # to wherever training ran; try the checkpoint's folder's parents too.
        targs.data = next((q / targs.data for q in Path(args.checkpoint).resolve().parents
                           if (q / targs.data).is_dir()), Path(targs.data))
    datasets, classes = build_datasets(
        targs, splits=(args.split,), expected_settings=state.get("feature_settings"),
        expected_name=f"the features {args.checkpoint} was trained on")
    loader = DataLoader(datasets[args.split], batch_size=args.batch_size,
                        collate_fn=collate_clips)
    results = evaluate_model(model, loader, device, classes)
    results["checkpoint"] = str(Path(args.checkpoint).resolve())
    run = Path(args.checkpoint).resolve().parent.name
    paths = write_report(results, args.out or args.checkpoint.parent, args.prefix + args.split,
                         title=f"{run}/{Path(args.checkpoint).name}, {args.split}: accuracy "
                               f"{results['accuracy']:.3f}, macro F1 {results['macro_f1']:.3f}")
    print(format_summary(results))
    print(f"wrote {paths['json']} and {paths['png']}")
    return results


if __name__ == "__main__":
    from aver.cli import run_main
    run_main(main)
