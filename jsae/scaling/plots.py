"""The PNGs of `jsae scaling` (loss vs tokens per size; the frontier with the fitted lines;
the optimal features and tokens against compute) and of `jsae families` (children per parent
and coverage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jsae.scaling import fit


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_size(result: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for p in result["points"]:
        out.setdefault(p["d_sae"], []).append(p)
    return {k: sorted(v, key=lambda p: p["tokens"]) for k, v in sorted(out.items())}


def scaling_pngs(result: dict, out: Path) -> list[str]:
    """Write loss_vs_tokens.png, frontier.png and (with a joint fit) optimal.png into ``out``;
    returns the file names."""
    plt = _plt()
    metric, sizes = result["metric"], _by_size(result)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    names = []

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for col, (size, pts) in zip(colours, sizes.items()):
        t = np.asarray([p["tokens"] for p in pts])
        ax.plot(t, [p["value"] for p in pts], "o", color=col, label=f"{size:,} features")
        f = result["per_size"].get(str(size), {})
        if "b" in f:  # the per-size fit, drawn over tokens (C = flops per token * tokens)
            per_tok = pts[0]["flops"] / pts[0]["tokens"]
            tt = np.geomspace(t.min(), t.max(), 50)
            ax.plot(tt, fit.power_law_value(f, tt * per_tok), "-", color=col, lw=1)
    ax.set(xscale="log", yscale="log", xlabel="training tokens", ylabel=f"held-out {metric}",
           title="loss vs tokens per dictionary size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_tokens.png", dpi=110)
    plt.close(fig)
    names.append("loss_vs_tokens.png")

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for col, (size, pts) in zip(colours, sizes.items()):
        ax.plot([p["flops"] for p in pts], [p["value"] for p in pts], "o", color=col, ms=4,
                label=f"{size:,}")
    fr = result["frontier"]
    ax.plot([p["flops"] for p in fr], [p["value"] for p in fr], "k--", lw=1,
            label="frontier (points)")
    j = result.get("joint") or {}
    cs = np.geomspace(min(p["flops"] for p in result["points"]),
                      max(p["flops"] for p in result["points"]), 40)
    if "alpha" in j:
        slope, icpt = (result["flops_per_token"][k] for k in ("per_feature", "constant"))
        no, do = fit.optimal_allocation(j, lambda x: slope * np.asarray(x) + icpt, cs)
        ax.plot(cs, fit.joint_loss(j, no, do), "r-", lw=1.5, label="L(N*, D*) fitted")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel=f"held-out {metric}",
           title="compute-efficient frontier")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    plt.close(fig)
    names.append("frontier.png")

    if "alpha" in j:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        ax.plot(cs, no, "b-", label=f"features N* ~ C^{j['n_exponent']:.2f}")
        ax.plot(cs, do, "g-", label=f"tokens D* ~ C^{j['d_exponent']:.2f}")
        ax.plot([p["flops"] for p in fr], [p["d_sae"] for p in fr], "bo", ms=4)
        ax.plot([p["flops"] for p in fr], [p["tokens"] for p in fr], "go", ms=4)
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs",
               title="compute-optimal allocation (lines: fit; dots: frontier)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "optimal.png", dpi=110)
        plt.close(fig)
        names.append("optimal.png")
    return names


def families_png(result: dict, path: Path) -> str:
    """Per level (a dictionary and the next larger one): how many children each parent has,
    and, with an activation sample, how much of each parent's firing its children cover."""
    plt = _plt()
    levels = result["levels"]
    cover = any(lv.get("coverage_mean") is not None for lv in levels)
    fig, axes = plt.subplots(1, 2 if cover else 1, figsize=(10 if cover else 5.5, 3.8),
                             squeeze=False)
    for lv in levels:
        counts = np.asarray(lv["children_per_parent"])
        hist = np.bincount(counts, minlength=counts.max() + 1 if len(counts) else 1)
        axes[0, 0].plot(np.arange(len(hist)), hist, "o-",
                        label=f"{lv['parent_d_sae']:,} -> {lv['child_d_sae']:,}")
        if cover:
            cov = np.asarray([c for c in lv["coverage"] if c is not None])
            axes[0, 1].hist(cov, bins=20, range=(0, 1), histtype="step",
                            label=f"{lv['parent_d_sae']:,} -> {lv['child_d_sae']:,}")
    axes[0, 0].set(xlabel="children per parent feature", ylabel="parent features",
                   title="feature splitting")
    axes[0, 0].legend(fontsize=7)
    if cover:
        axes[0, 1].set(xlabel="fraction of the parent's firing its children cover",
                       ylabel="parent features", title="coverage")
        axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


__all__ = ["families_png", "scaling_pngs"]
