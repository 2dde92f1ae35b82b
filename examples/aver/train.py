#!/usr/bin/env python
"""Train ``AttentionAVER`` on clip feature files or on the synthetic task.

    python examples/aver/train.py --synthetic                       # ~1-2 min on CPU
    python examples/aver/train.py --data feats/ --out runs/afew --epochs 40
    python examples/aver/train.py --resume runs/afew/last.pt         # continue exactly

Each epoch writes ``<out>/last.pt`` (and ``best.pt`` when validation accuracy
improves) holding the model, AdamW and scheduler states, the RNG state, the
arguments (data paths made absolute) and the feature settings of the training
clips, so ``--resume`` continues with the same batches and dropout masks as an
uninterrupted run, and ``metrics.csv`` (one row per epoch so far). At the end
``best.pt`` is evaluated on the test split (``test_results.json``,
``test_confusion.png``), and ``history.json`` and ``training_curves.png`` are written.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `aver` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import random
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from aver.data import SPLITS, ClipDataset, collate_clips, synthetic_splits
from aver.evaluate import evaluate_model, format_summary, write_report
from aver.feature_settings import settings_of
from aver.metrics import plot_training_curves, write_metrics_csv
from aver.model import AUDIO_ENCODERS, FUSIONS, POOLINGS, AttentionAVER, AVERConfig

# Arguments that may differ on --resume; every other one is taken from the checkpoint.
RESUME_OVERRIDABLE = ("epochs", "device", "no_progress", "workers", "threads", "resume")
CLASS_WEIGHTS = ("none", "balanced")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train AttentionAVER (audio-video emotion "
                                            "recognition with FBP fusion).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, help="feature directory (see extract_features.py)")
    d.add_argument("--splits", type=Path, help="directory with train/val/test.txt "
                                               "(default DATA/splits)")
    d.add_argument("--synthetic", action="store_true", help="use the synthetic task")
    d.add_argument("--synthetic-sizes", type=int, nargs=3, default=(2000, 500, 500),
                   metavar=("TRAIN", "VAL", "TEST"))
    d.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic clips")
    d.add_argument("--preload", action="store_true", help="keep all clip files in memory")
    m = p.add_argument_group("model")
    m.add_argument("--fusion", choices=FUSIONS, default="fbp")
    m.add_argument("--pooling", choices=POOLINGS, default="attention")
    m.add_argument("--hidden", type=int, default=64, help="frame encoder width")
    m.add_argument("--audio-encoder", choices=AUDIO_ENCODERS, default="frame",
                   help="frame: per-frame LayerNorm + one conv (30 ms); temporal: "
                        "per-utterance normalisation + dilated convs (~0.6 s), see README")
    m.add_argument("--fbp-out", type=int, default=64, help="FBP/MFH output size per order")
    m.add_argument("--factor", type=int, default=5, help="FBP factor k")
    m.add_argument("--order", type=int, default=2, help="MFH order (fusion mfh only)")
    m.add_argument("--fbp-dropout", type=float, default=0.1)
    m.add_argument("--dropout", type=float, default=0.2)
    m.add_argument("--classifier-hidden", type=int, default=0,
                   help="hidden layer after fusion (0: one linear layer, as in the paper)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--weight-decay", type=float, default=1e-2)
    t.add_argument("--warmup-epochs", type=int, default=1)
    t.add_argument("--seed", type=int, default=0, help="seed of init, shuffling and dropout")
    t.add_argument("--class-weights", choices=CLASS_WEIGHTS, default="none",
                   help="balanced: weight the loss by 1 / class frequency in the training split")
    t.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "runs" / "default")
    t.add_argument("--resume", type=Path, help="checkpoint to continue from (e.g. OUT/last.pt)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: this model's ops are too small to "
                        "gain from more, and lose a lot on a busy machine; 0 = torch's choice)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ------------------------------------------------------------------------ pieces

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_datasets(args, splits: Sequence[str] = SPLITS, expected_settings: Optional[dict] = None,
                   expected_name: str = "the training features"
                   ) -> Tuple[Dict[str, object], list]:
    """The requested splits as datasets, and the class names.

    Real data: ``train`` must exist; ``val``/``test`` are skipped when their split
    file is absent. Every clip's feature settings must match ``expected_settings``
    (default: those of the first clip of the first split), else
    :class:`~aver.feature_settings.FeatureMismatchError` names the difference.
    """
    if args.synthetic:
        sets, task = synthetic_splits(tuple(args.synthetic_sizes), seed=args.data_seed)
        return {s: sets[s] for s in splits}, task.class_names()
    if args.data is None:
        raise SystemExit("give --data FEATURE_DIR (see extract_features.py) or --synthetic")
    out = {}
    splits_dir = Path(args.splits) if args.splits else Path(args.data) / "splits"
    for s in splits:
        if s != "train" and "train" in splits and not (splits_dir / f"{s}.txt").exists():
            print(f"note: no {splits_dir / f'{s}.txt'}; skipping the {s} split")
            continue
        out[s] = ds = ClipDataset(args.data, s, args.splits,
                                  preload=getattr(args, "preload", False),
                                  expected_settings=expected_settings,
                                  expected_name=expected_name)
        if expected_settings is None:
            expected_settings = settings_of(ds[0])
            expected_name = f"the {s} split's first clip ({ds.paths[0]})"
            ds.expected_settings, ds.expected_name = expected_settings, expected_name
        else:
            ds[0]  # noqa: B018 -- fail now, not in the middle of an epoch
    return out, next(iter(out.values())).classes


def class_counts(dataset, num_classes: int) -> np.ndarray:
    """Clips per class in ``dataset``: ``(num_classes,)`` int64."""
    labels = np.asarray(dataset.labels(), dtype=np.int64)
    return np.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes]


def loss_weights(counts: np.ndarray, mode: str) -> Optional[torch.Tensor]:
    """Cross-entropy class weights: None, or ``N / (C * n_c)`` (``balanced``; 0 if n_c = 0)."""
    if mode == "none":
        return None
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)

def model_config(args, example: dict, num_classes: int) -> AVERConfig:
    return AVERConfig(audio_dim=example["audio"].shape[1], video_dim=example["video"].shape[1],
                      num_classes=num_classes, hidden=args.hidden,
                      audio_encoder=getattr(args, "audio_encoder", "frame"), fusion=args.fusion,
                      pooling=args.pooling, fbp_out=args.fbp_out, factor=args.factor,
                      order=args.order, fbp_dropout=args.fbp_dropout, dropout=args.dropout,
                      classifier_hidden=args.classifier_hidden)


def lr_lambda(args, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to zero over the run (per optimizer step)."""
    warm = max(1, args.warmup_epochs * steps_per_epoch)
    total = max(warm + 1, args.epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))
    return f


def epoch_loader(dataset, args, epoch: int) -> DataLoader:
    # One generator per epoch, seeded from (seed, epoch): the batch order of epoch e
    # does not depend on whether the run was interrupted before it.
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=g,
                      collate_fn=collate_clips, num_workers=args.workers, drop_last=False)


def train_step(model, batch, optimizer, scheduler, device,
               class_weights: Optional[torch.Tensor] = None) -> float:
    model.train()
    if (batch["label"] < 0).any():
        raise ValueError(f"unlabelled clips (label -1) in the training split: "
                         f"{[i for i, y in zip(batch['clip_id'], batch['label']) if y < 0][:5]}")
    logits = model(batch["audio"].to(device), batch["audio_mask"].to(device),
                   batch["video"].to(device), batch["video_mask"].to(device))
    weight = None if class_weights is None else class_weights.to(device)
    loss = torch.nn.functional.cross_entropy(logits, batch["label"].to(device), weight=weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    scheduler.step()
    return loss.item()


def make_optimizer(model, args, steps_per_epoch: int):
    # No weight decay on biases and norm gains: decaying them only hurts.
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, steps_per_epoch))
    return optimizer, scheduler


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, best: dict,
                    history: list, args, extra: Optional[dict] = None) -> None:
    """Everything needed to continue exactly after ``epoch`` (0-based, completed)."""
    state = {"model": model.state_dict(), "config": model.config.to_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "best": best, "history": history, "rng": _rng_state(),
             **(extra or {}),
             "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    tmp = Path(path).with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken checkpoint


def load_checkpoint(path: Path, device) -> Tuple[AttentionAVER, dict]:
    """The model (on ``device``, eval mode) and the raw checkpoint dict."""
    # weights_only=False: the checkpoint holds numpy/python RNG states; only load
    # checkpoints you wrote yourself.
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = AttentionAVER(AVERConfig(**state["config"])).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), state


# ------------------------------------------------------------------------- main

def ignored_on_resume(args, saved: dict, explicit: Sequence[str] = ()) -> Dict[str, tuple]:
    """``{option: (given, checkpoint's)}`` for every argument ``--resume`` will not use.

    An argument counts as given when it was on the command line (``explicit``) or
    differs from its default; it is ignored when it differs from the checkpoint's.
    """
    defaults = vars(build_parser().parse_args([]))
    out = {}
    for k, v in vars(args).items():
        if k in RESUME_OVERRIDABLE or k not in defaults:
            continue
        # Paths compare resolved: the checkpoint stores them absolute.
        given = str(Path(v).resolve()) if isinstance(v, Path) else v
        default = str(Path(defaults[k]).resolve()) if isinstance(defaults[k], Path) else defaults[k]
        norm = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731 (nargs values)
        if (k in explicit or norm(given) != norm(default)) and norm(given) != norm(saved.get(k)):
            out["--" + k.replace("_", "-")] = (given, saved.get(k))
    return out


def absolute_paths(args) -> None:
    """Make the data and output paths absolute, so a checkpoint works from any folder."""
    for k in ("data", "splits", "out"):
        if getattr(args, k, None) is not None:
            setattr(args, k, Path(getattr(args, k)).resolve())


def train(args, explicit: Sequence[str] = ()) -> dict:
    """Run training as configured by ``args`` (the parsed command line).

    ``explicit``: the argument names given on the command line (for the ``--resume``
    warning about arguments it ignores). Returns ``{"history": [...], "best": {...},
    "test": results or None, "out": path}``.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    resume_state = None
    if args.resume:
        resume_state = torch.load(args.resume, map_location="cpu", weights_only=False)
        saved = dict(resume_state["args"])
        ignored = ignored_on_resume(args, saved, explicit)
        if ignored:
            print("warning: --resume continues the checkpoint's run and ignores " + ", ".join(
                f"{k} {v!r} (checkpoint: {c!r})" for k, (v, c) in ignored.items()) +
                f"; only {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDABLE[:-1])} "
                f"may change",
                file=sys.stderr)
        for k in RESUME_OVERRIDABLE:
            saved[k] = getattr(args, k)
        if saved["epochs"] != resume_state["args"]["epochs"]:
            print(f"note: --epochs {saved['epochs']} differs from the checkpoint's "
                  f"{resume_state['args']['epochs']}: the learning-rate schedule changes")
        defaults = vars(build_parser().parse_args([]))
        args = argparse.Namespace(**{**defaults, **saved})  # options added since: defaults
        args.out = Path(args.out)
        args.data = Path(args.data) if args.data else None
        args.splits = Path(args.splits) if args.splits else None
    absolute_paths(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    datasets, classes = build_datasets(args)
    train_set = datasets["train"]
    feature_settings = settings_of(train_set[0])
    counts = class_counts(train_set, len(classes))
    if (counts == 0).any():
        print(f"warning: no training clips for classes "
              f"{[c for c, n in zip(classes, counts) if n == 0]}: the model cannot learn them "
              f"(clips per class: {dict(zip(classes, counts.tolist()))})", file=sys.stderr)
    class_weights = loss_weights(counts, getattr(args, "class_weights", "none"))
    config = model_config(args, train_set[0], len(classes))
    model = AttentionAVER(config).to(device)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    optimizer, scheduler = make_optimizer(model, args, steps_per_epoch)
    start_epoch, best, history = 0, {"epoch": -1, "val_accuracy": -1.0}, []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start_epoch = resume_state["epoch"] + 1
        best, history = resume_state["best"], resume_state["history"]
        _set_rng_state(resume_state["rng"])
        print(f"resumed from {args.resume} after epoch {start_epoch}")
    args.out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(train_set)} training clips, {len(classes)} classes, {n_params} parameters, "
          f"fusion={config.fusion}, pooling={config.pooling}, device={device}")

    val_loader = (DataLoader(datasets["val"], batch_size=128, collate_fn=collate_clips)
                  if "val" in datasets else None)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        losses = []
        bar = tqdm(epoch_loader(train_set, args, epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   leave=False, disable=args.no_progress)
        for batch in bar:
            losses.append(train_step(model, batch, optimizer, scheduler, device, class_weights))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                  "lr": scheduler.get_last_lr()[0], "seconds": time.time() - t0}
        if val_loader is not None:
            # evaluate_model draws no random numbers, so it cannot shift the RNG stream.
            val = evaluate_model(model, val_loader, device, classes)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"],
                          val_macro_f1=val["macro_f1"])
        history.append(record)
        # Without a validation split the last epoch counts as the best.
        improved = val_loader is None or record["val_accuracy"] > best["val_accuracy"]
        if improved:
            best = {"epoch": epoch, "val_accuracy": record.get("val_accuracy", float("nan"))}
        extra = {"feature_settings": feature_settings, "classes": list(classes),
                 "train_class_counts": counts.tolist()}
        save_checkpoint(args.out / "last.pt", model, optimizer, scheduler, epoch, best,
                        history, args, extra)
        if improved:
            save_checkpoint(args.out / "best.pt", model, optimizer, scheduler, epoch, best,
                            history, args, extra)
        write_metrics_csv(history, args.out / "metrics.csv")
        if not args.no_progress:
            tqdm.write(f"epoch {epoch + 1:3d}  loss {record['train_loss']:.4f}" + (
                f"  val acc {record['val_accuracy']:.4f}  val F1 {record['val_macro_f1']:.4f}"
                if val_loader is not None else "") + f"  ({record['seconds']:.1f} s)")
    (args.out / "history.json").write_text(json.dumps(history, indent=2))
    if history:
        plot_training_curves(history, args.out / "training_curves.png",
                             title=f"{args.out.name}: {config.fusion} + {config.pooling}")

    test = None
    if "test" in datasets:
        model, _ = load_checkpoint(args.out / "best.pt", device)
        test = evaluate_model(model, DataLoader(datasets["test"], batch_size=128,
                                                collate_fn=collate_clips), device, classes)
        test["best_epoch"] = best["epoch"]
        paths = write_report(test, args.out, "test",
                             title=f"{args.out.name} (best epoch {best['epoch'] + 1}), test: "
                                   f"accuracy {test['accuracy']:.3f}, macro F1 "
                                   f"{test['macro_f1']:.3f}")
        print(f"test (best epoch {best['epoch'] + 1}): " + format_summary(test))
        print(f"wrote {paths['json']}, {paths['png']}")
    return {"history": history, "best": best, "test": test, "out": args.out}


def explicit_options(argv: Optional[Sequence[str]]) -> List[str]:
    """Names (``dest``) of the options given in ``argv``, whatever their values."""
    p = build_parser()
    for action in p._actions:  # a parser with no defaults sees only what was given
        action.default = argparse.SUPPRESS
    return sorted(vars(p.parse_args(argv)))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if not args.synthetic and args.data is None and args.resume is None:
        build_parser().error("give --data FEATURE_DIR, --synthetic, or --resume CHECKPOINT")
    return train(args, explicit_options(argv))


if __name__ == "__main__":
    from aver.cli import run_main
    run_main(main)
