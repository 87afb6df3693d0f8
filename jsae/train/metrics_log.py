"""Training metrics to the console, a CSV file, TensorBoard event files and a PNG plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from jsae.fileio import atomic_file


def flatten_metrics(per_hook: dict[str, dict], multi: bool) -> dict[str, float]:
    """``{key: {name: value}}`` -> ``{name: float}``, or ``{"key/name": float}`` when ``multi``
    (several dictionaries share one row of metrics.csv)."""
    out = {}
    for h, m in per_hook.items():
        for k, v in m.items():
            out[f"{h}/{k}" if multi else k] = float(np.asarray(v))
    return out


class MetricsLogger:
    """Appends one row per logged step to ``run_dir/metrics.csv`` (and TensorBoard events).

    Resumed runs append to the same file; rows carry the step so plots stay correct.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "metrics.csv"
        self._fields: list[str] | None = None
        if self.csv_path.exists():
            with self.csv_path.open() as f:
                header = f.readline().strip()
            self._fields = header.split(",") if header else None
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # optional
                self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if self._fields is None:
            self._fields = list(row)
            with self.csv_path.open("w", newline="") as f:
                csv.writer(f).writerow(self._fields)
        elif any(k not in self._fields for k in row):
            self._extend_columns([k for k in row if k not in self._fields])
        with self.csv_path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self._fields])
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def _extend_columns(self, new: list[str]) -> None:
        """New metric names (e.g. periodic eval_*): rewrite the file with a wider header."""
        with self.csv_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        self._fields = [*self._fields, *new]
        with atomic_file(self.csv_path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, restval="")
            w.writeheader()
            w.writerows(rows)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(csv_path: str | Path) -> dict[str, list[float]]:
    cols: dict[str, list[float]] = {}
    with Path(csv_path).open() as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                cols.setdefault(k, []).append(float(v) if v not in ("", None) else math.nan)
    return cols


def plot_metrics(csv_path: str | Path, out_png: str | Path) -> Path | None:
    """Loss, FVU, L0 and dead fraction against step, one panel each (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = read_metrics(csv_path)
    if not cols.get("step"):
        return None
    steps = cols["step"]
    panels = [k for k in cols if k != "step" and not k.startswith("lr")]
    wanted = [
        k for k in panels
        if any(k.endswith(m) for m in ("loss", "fvu", "l0", "dead_frac", "eval_fvu"))
    ]
    wanted = wanted or panels[:4]
    n = len(wanted)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, wanted):
        pts = [(s, v) for s, v in zip(steps, cols[key]) if math.isfinite(v)]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        if key.endswith(("loss", "fvu")) and pts and min(v for _, v in pts) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
