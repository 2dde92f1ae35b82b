"""PNG plots: speedup over the baseline and time over the floor, against the swept
dimension, one figure per sweep (and dtype), one column per mode."""

from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")  # files only: works on a machine without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from .harness import MEASURE_ORDER  # noqa: E402
from .table import FLOOR, ResultIndex  # noqa: E402

# Dimensions that grow geometrically read best on a log axis.
_LOG_AXES = {"rows", "m", "n", "o"}


def _x_positions(problems, varied):
    values = [p.swept_value if p.swept else p.rows for p in problems]
    if varied == "dtype":  # categorical
        return list(range(len(values))), [str(v) for v in values]
    return values, None


def plot_sweeps(idx: ResultIndex, out_dir: Path, title: str) -> List[Path]:
    """Writes one PNG per sweep with at least two points; returns their paths."""
    paths = []
    providers = [p for p in idx.providers if p != FLOOR]
    for (sweep, dtype), problems in idx.sweeps.items():
        if len(problems) < 2:
            continue
        varied = problems[0].swept or "rows"
        xs, labels = _x_positions(problems, varied)
        fig, axes = plt.subplots(2, len(MEASURE_ORDER), figsize=(5 * len(MEASURE_ORDER), 7),
                                 sharex=True, squeeze=False)
        for col, mode in enumerate(MEASURE_ORDER):
            for row, (ylabel, fn) in enumerate((
                    ("speedup over reference (higher: better)", idx.speedup),
                    ("time / floor (lower: better; 1 = floor)", idx.over_floor))):
                ax = axes[row][col]
                for prov in providers:
                    pts = [(x, fn(p, prov, mode)) for x, p in zip(xs, problems)]
                    pts = [(x, v) for x, v in pts if v is not None]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=prov)
                ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
                if varied in _LOG_AXES:
                    ax.set_xscale("log", base=2)
                    ax.xaxis.set_major_formatter(ScalarFormatter())
                    ax.set_xticks(xs)
                if labels is not None:
                    ax.set_xticks(xs, labels)
                if row == 0:
                    ax.set_title(mode)
                if row == 1:
                    ax.set_xlabel(varied)
                if col == 0:
                    ax.set_ylabel(ylabel)
                ax.grid(True, alpha=0.3)
        handles, names = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False)
        fig.suptitle(f"{title}: sweep {sweep}{' ' + dtype if dtype else ''}", fontsize=11)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = out_dir / f"plot-{sweep}{'-' + dtype if dtype else ''}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
