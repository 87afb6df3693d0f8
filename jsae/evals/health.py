"""Latent health: dead and dense latents, and the log10 feature-density histogram."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jsae.evals.reconstruction import DENSE_THRESHOLD


def latent_health(counts: np.ndarray, n_tokens: int, dense_threshold: float = DENSE_THRESHOLD) -> dict:
    """From per-latent firing counts over ``n_tokens`` evaluated tokens.

    dead: never fired; dense: fired on more than ``dense_threshold`` of the tokens.
    Density quantiles are over the latents that fired at least once (log10 scale).
    """
    counts = np.asarray(counts, np.float64)
    if n_tokens <= 0:
        raise ValueError("no tokens were evaluated")
    density = counts / n_tokens
    alive = density[density > 0]
    out = {
        "dead": int(np.sum(counts == 0)),
        "dense": int(np.sum(density > dense_threshold)),
        "dead_frac": float(np.mean(counts == 0)),
        "dense_frac": float(np.mean(density > dense_threshold)),
    }
    if alive.size:
        q = np.quantile(np.log10(alive), [0.1, 0.5, 0.9])
        out.update(log10_density_p10=float(q[0]), log10_density_median=float(q[1]),
                   log10_density_p90=float(q[2]))
    return out


def plot_feature_density(
    densities: Mapping[str, np.ndarray], path: str | Path, *, n_tokens: Mapping[str, int] | None = None
) -> Path:
    """One log10 feature-density histogram per hook (dead latents counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hooks = list(densities)
    fig, axes = plt.subplots(len(hooks), 1, figsize=(7, 2.8 * len(hooks)), squeeze=False)
    for ax, h in zip(axes[:, 0], hooks):
        d = np.asarray(densities[h], np.float64)
        alive = d[d > 0]
        dead = int(np.sum(d == 0))
        if alive.size:
            lo = min(np.floor(np.log10(alive.min())), -1.0) - 0.25
            bins = np.linspace(lo, 0.0, 61)
            ax.hist(np.log10(alive), bins=bins, color="tab:blue")
        ax.axvline(np.log10(DENSE_THRESHOLD), color="tab:red", ls="--", lw=1, label="dense (10%)")
        if n_tokens and h in n_tokens and n_tokens[h] > 0:
            ax.axvline(-np.log10(n_tokens[h]), color="gray", ls=":", lw=1, label="1 token")
        ax.set_title(f"{h}: {d.size} latents, {dead} dead ({dead / max(d.size, 1):.1%})")
        ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
        ax.set_ylabel("latents")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
