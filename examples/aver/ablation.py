#!/usr/bin/env python
"""The paper's comparison on the synthetic task, over several seeds.

    python examples/aver/ablation.py --seeds 0 1 2

Trains each variant with every seed (same synthetic clips, different model
initialisation, batch order and dropout) and writes a markdown table of test
accuracy and macro F1 as mean ± standard deviation over seeds (and the range),
plus the share of pooling weight on the label-carrying frames, to ``--out``
(default ``examples/aver/runs/ablation/ablation.md``, so that trying it does not
touch the committed results; ``--update-results`` writes
``examples/aver/results/ablation.md`` instead) with the command that made it, and
every run's numbers to the matching ``.json``.

Variants: audio only, video only, concatenation (linear classifier, as in the
paper; and with a hidden layer, so concatenation gets a non-linear head too),
FBP with mean pooling, FBP with attention, and MFH (order 2) with attention
when ``fbp_kernels`` provides it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `aver` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import platform
import shlex
import time
from typing import Dict, List

import numpy as np
import torch

import fbp_kernels
from aver import train as train_mod

HERE = Path(__file__).resolve().parent

# name -> extra train.py arguments
VARIANTS: Dict[str, List[str]] = {
    "audio only (attention)": ["--fusion", "audio"],
    "video only (attention)": ["--fusion", "video"],
    "concat (attention)": ["--fusion", "concat"],
    "concat + MLP head (attention)": ["--fusion", "concat", "--classifier-hidden", "128"],
    "FBP + mean pooling": ["--fusion", "fbp", "--pooling", "mean"],
    "FBP + attention": ["--fusion", "fbp", "--pooling", "attention"],
    "MFH order 2 + attention": ["--fusion", "mfh", "--order", "2"],
}


def cpu_name() -> str:
    """The CPU model (results differ in the last bits between CPUs), or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mean_std(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    return (f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f} "
            f"({v.min():.3f}-{v.max():.3f})")


def run_variant(name: str, extra: List[str], seeds, common: List[str], out: Path) -> List[dict]:
    runs = []
    for seed in seeds:
        slug = name.split(" (")[0].replace(" ", "_").replace("+", "").replace("__", "_").lower()
        argv = ["--synthetic", "--no-progress", "--seed", str(seed),
                "--out", str(out / slug / f"seed{seed}"), *common, *extra]
        t0 = time.time()
        result = train_mod.train(train_mod.build_parser().parse_args(argv))
        test = result["test"]
        runs.append({"seed": seed, "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
                     "attention_on_salient": test.get("attention_on_salient", {}),
                     "best_epoch": result["best"]["epoch"], "seconds": time.time() - t0,
                     "argv": argv})
        print(f"{name:32s} seed {seed}: acc {test['accuracy']:.3f}  F1 {test['macro_f1']:.3f}  "
              f"({runs[-1]['seconds']:.0f} s)", flush=True)
    return runs


def table(results: Dict[str, List[dict]]) -> str:
    lines = [f"| variant | test accuracy | test macro F1 | pooling weight on salient frames "
             f"(audio / video) | s per run |",
             "| --- | --- | --- | --- | --- |"]
    for name, runs in results.items():
        sal = [r["attention_on_salient"] for r in runs]
        parts = []
        for m in ("audio", "video"):
            vals = [s[m] for s in sal if m in s]
            parts.append(f"{np.mean(vals):.2f}" if vals else "–")
        lines.append(f"| {name} | {mean_std([r['accuracy'] for r in runs])} | "
                     f"{mean_std([r['macro_f1'] for r in runs])} | {' / '.join(parts)} | "
                     f"{np.mean([r['seconds'] for r in runs]):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> Dict[str, List[dict]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--synthetic-sizes", type=int, nargs=3, default=(2000, 500, 500))
    p.add_argument("--variants", nargs="+", help="subset of variant names (default: all)")
    p.add_argument("--out", type=Path, help="markdown table to write (default: RUNS/ablation.md,"
                                            " or results/ablation.md with --update-results)")
    p.add_argument("--update-results", action="store_true",
                   help="write the committed examples/aver/results/ablation.md")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further train.py arguments for every run (e.g. --audio-encoder "
                        "temporal); must come last")
    p.add_argument("--runs", type=Path, default=HERE / "runs" / "ablation",
                   help="where the per-run checkpoints and reports go")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = HERE / "results" / "ablation.md" if args.update_results \
            else args.runs / "ablation.md"

    variants = dict(VARIANTS)
    if not hasattr(fbp_kernels, "MultimodalFactorizedHighOrderPooling"):
        print("note: fbp_kernels has no MultimodalFactorizedHighOrderPooling; skipping MFH")
        variants.pop("MFH order 2 + attention")
    if args.variants:
        unknown = set(args.variants) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.variants}
    common = ["--epochs", str(args.epochs), "--synthetic-sizes",
              *map(str, args.synthetic_sizes), *args.extra]
    t0 = time.time()
    results = {name: run_variant(name, extra, args.seeds, common, args.runs)
               for name, extra in variants.items()}
    total = time.time() - t0

    command = "python examples/aver/ablation.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    defaults = train_mod.build_parser().parse_args(["--synthetic"])
    md = "\n".join([
        "# Ablation on the synthetic audio-video task",
        "",
        f"Command: `{command}`",
        "",
        f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.epochs} epochs, "
        f"synthetic train/val/test = {'/'.join(map(str, args.synthetic_sizes))} clips, "
        f"7 classes (chance = 0.143). Test metrics of the best-validation epoch; "
        f"mean ± sample standard deviation over seeds (min-max). Model: hidden {defaults.hidden}, "
        f"FBP/MFH out {defaults.fbp_out} per order, factor {defaults.factor}, AdamW lr "
        f"{defaults.lr}, batch {defaults.batch_size}, CPU, 1 thread.",
        "",
        table(results),
        "",
        "The label is (audio token + video token) mod 7, and each token is carried by 3 "
        "frames of its stream among 24-48 (audio) or 8-16 (video) frames, half of the others "
        "carrying random distractor tokens. The last column is the mean share of pooling "
        "weight on those 3 frames (mean pooling gives each frame the same weight).",
        "",
        f"fbp_kernels {fbp_kernels.__version__}, torch {torch.__version__}, "
        f"{platform.machine()} ({cpu_name()}), total {total / 60:.1f} min.",
        ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "results": results}, indent=2))
    print(md)
    return results


if __name__ == "__main__":
    from aver.cli import run_main
    run_main(main)
