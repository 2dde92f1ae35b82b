#!/usr/bin/env python
"""Train ``AttentionAVER`` on clip feature files or on the synthetic task.

    python examples/aver/train.py --synthetic                       # ~1-2 min on CPU
    python examples/aver/train.py --data feats/ --out runs/afew --epochs 40
    python examples/aver/train.py --resume runs/afew/last.pt         # continue exactly

Each epoch writes ``<out>/last.pt`` (and ``best.pt`` when validation accuracy
improves) holding the model, AdamW and scheduler states, the RNG state and the
arguments, so ``--resume`` continues with the same batches and dropout masks as
an uninterrupted run. At the end ``best.pt`` is evaluated on the test split
(``test_results.json``, ``test_confusion.png``) and ``history.json`` is written.
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
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from aver.data import SPLITS, ClipDataset, collate_clips, synthetic_splits
from aver.evaluate import evaluate_model, format_summary, write_report
from aver.model import FUSIONS, POOLINGS, AttentionAVER, AVERConfig

# Arguments that may differ on --resume; every other one is taken from the checkpoint.
RESUME_OVERRIDABLE = ("epochs", "device", "no_progress", "workers", "threads", "resume")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train AttentionAVER (audio-video emotion "
                                            "recognition with FBP fusion).")
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


def build_datasets(args, splits: Sequence[str] = SPLITS) -> Tuple[Dict[str, object], list]:
    """The requested splits as datasets, and the class names.

    Real data: ``train`` must exist; ``val``/``test`` are skipped when their split
    file is absent.
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
        out[s] = ClipDataset(args.data, s, args.splits, preload=getattr(args, "preload", False))
    return out, next(iter(out.values())).classes


def model_config(args, example: dict, num_classes: int) -> AVERConfig:
    return AVERConfig(audio_dim=example["audio"].shape[1], video_dim=example["video"].shape[1],
                      num_classes=num_classes, hidden=args.hidden, fusion=args.fusion,
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


def train_step(model, batch, optimizer, scheduler, device) -> float:
    model.train()
    if (batch["label"] < 0).any():
        raise ValueError(f"unlabelled clips (label -1) in the training split: "
                         f"{[i for i, y in zip(batch['clip_id'], batch['label']) if y < 0][:5]}")
    logits = model(batch["audio"].to(device), batch["audio_mask"].to(device),
                   batch["video"].to(device), batch["video_mask"].to(device))
    loss = torch.nn.functional.cross_entropy(logits, batch["label"].to(device))
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
                    history: list, args) -> None:
    """Everything needed to continue exactly after ``epoch`` (0-based, completed)."""
    state = {"model": model.state_dict(), "config": model.config.to_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "best": best, "history": history, "rng": _rng_state(),
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

def train(args) -> dict:
    """Run training as configured by ``args`` (the parsed command line).

    Returns ``{"history": [...], "best": {...}, "test": results or None, "out": path}``.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    resume_state = None
    if args.resume:
        resume_state = torch.load(args.resume, map_location="cpu", weights_only=False)
        saved = dict(resume_state["args"])
        for k in RESUME_OVERRIDABLE:
            saved[k] = getattr(args, k)
        if saved["epochs"] != resume_state["args"]["epochs"]:
            print(f"note: --epochs {saved['epochs']} differs from the checkpoint's "
                  f"{resume_state['args']['epochs']}: the learning-rate schedule changes")
        args = argparse.Namespace(**saved)
        args.out = Path(args.out)
        args.data = Path(args.data) if args.data else None
    device = resolve_device(args.device)
    seed_everything(args.seed)
    datasets, classes = build_datasets(args)
    train_set = datasets["train"]
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
            losses.append(train_step(model, batch, optimizer, scheduler, device))
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
        save_checkpoint(args.out / "last.pt", model, optimizer, scheduler, epoch, best,
                        history, args)
        if improved:
            save_checkpoint(args.out / "best.pt", model, optimizer, scheduler, epoch, best,
                            history, args)
        if not args.no_progress:
            tqdm.write(f"epoch {epoch + 1:3d}  loss {record['train_loss']:.4f}" + (
                f"  val acc {record['val_accuracy']:.4f}  val F1 {record['val_macro_f1']:.4f}"
                if val_loader is not None else "") + f"  ({record['seconds']:.1f} s)")
    (args.out / "history.json").write_text(json.dumps(history, indent=2))

    test = None
    if "test" in datasets:
        model, _ = load_checkpoint(args.out / "best.pt", device)
        test = evaluate_model(model, DataLoader(datasets["test"], batch_size=128,
                                                collate_fn=collate_clips), device, classes)
        test["best_epoch"] = best["epoch"]
        paths = write_report(test, args.out, "test")
        print(f"test (best epoch {best['epoch'] + 1}): " + format_summary(test))
        print(f"wrote {paths['json']}, {paths['png']}")
    return {"history": history, "best": best, "test": test, "out": args.out}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if not args.synthetic and args.data is None and args.resume is None:
        build_parser().error("give --data FEATURE_DIR, --synthetic, or --resume CHECKPOINT")
    return train(args)


if __name__ == "__main__":
    main()
