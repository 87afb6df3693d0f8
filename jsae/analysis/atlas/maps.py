"""Maps of features: a 2-D layout of decoder directions (UMAP, cosine metric), clusters
(HDBSCAN on the layout) labelled from their members, the local map around one feature
(``--around F --radius R``: the features within a decoder-cosine radius, laid out and clustered
like the paper's map around "Inner Conflict"), and PNGs of both.

UMAP and scikit-learn come with ``pip install 'jsae[atlas]'``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jsae.analysis.atlas.labels import cluster_labels as _cluster_labels
from jsae.analysis.atlas.types import AtlasData, LocalMap
from jsae.errors import require


def _unit(W) -> np.ndarray:
    W = np.asarray(W, np.float32)
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def layout(directions: np.ndarray, *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
           method: str = "umap") -> np.ndarray:
    """``[M, 2]`` positions of ``directions [M, d]``: UMAP with the cosine metric, or
    ``method="pca"`` (the top two principal components of the unit directions; also used for
    fewer than 8 points, where UMAP's neighbour graph is meaningless). UMAP's first call in a
    process spends ~30-60 s compiling (numba)."""
    X = _unit(directions)
    M = len(X)
    if method not in ("umap", "pca"):
        raise ValueError(f"map method {method!r}: use 'umap' or 'pca'")
    if M == 0:
        return np.zeros((0, 2), np.float32)
    if M < 8 or method == "pca":
        Xc = X - X.mean(0)
        if M == 1:
            return np.zeros((1, 2), np.float32)
        u, s, _ = np.linalg.svd(Xc, full_matrices=False)
        xy = u[:, :2] * s[:2]
        return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1]))).astype(np.float32)
    umap = require("umap", "atlas", "the atlas map")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs / spectral-init chatter
        reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=int(min(n_neighbors, M - 1)),
                            min_dist=min_dist, random_state=seed, init="spectral" if M > 50 else "random")
        return np.asarray(reducer.fit_transform(X), np.float32)


def clusters(xy: np.ndarray, *, min_cluster_size: int | None = None) -> np.ndarray:
    """HDBSCAN cluster id per point (``-1`` = noise)."""
    M = len(xy)
    mcs = int(min_cluster_size or max(5, min(50, M // 600)))  # ~140 clusters at 9k points
    if M < max(4, mcs):  # too few points for one cluster (a family's smallest member)
        return np.full(M, -1, np.int64)
    require("sklearn", "atlas", "clustering the atlas map")
    from sklearn.cluster import HDBSCAN

    return HDBSCAN(min_cluster_size=mcs, min_samples=min(mcs, 5), copy=True).fit_predict(xy).astype(np.int64)


def global_map(W_dec, include: np.ndarray, labels: list[str], *, seed: int = 0,
               min_cluster_size: int | None = None, method: str = "umap") -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """``(map_xy [F, 2] (NaN where not included), cluster [F], cluster labels)`` for the
    features with ``include [F]`` True (e.g. live ones)."""
    W = np.asarray(W_dec)
    F = len(W)
    ids = np.flatnonzero(np.asarray(include, bool))
    xy = np.full((F, 2), np.nan, np.float32)
    cl = np.full(F, -1, np.int64)
    if len(ids):
        xy[ids] = layout(W[ids], seed=seed, method=method)
        cl[ids] = clusters(xy[ids], min_cluster_size=min_cluster_size)
    return xy, cl, _cluster_labels(cl, labels)


def local_map(sae_or_W, center: int, radius: float = 0.3, *, data: AtlasData | None = None,
              include: np.ndarray | None = None, labels: list[str] | None = None, seed: int = 0,
              max_features: int = 2000, min_features: int = 24, method: str = "umap") -> LocalMap:
    """The neighbourhood of ``center``: features within decoder-cosine distance ``radius``
    (``1 - cos <= radius``; at least the ``min_features`` nearest even when fewer lie within the
    radius, as in a young dictionary whose directions are nearly orthogonal: ``radius`` then
    grows to the farthest of them; at most
    ``max_features``, the nearest), laid out and clustered.
    ``sae_or_W``: an SAE or its :func:`~jsae.analysis.atlas.neighbours.decoder_rows`; ``data``: an atlas whose labels (and live
    features, when ``include`` is not given) are used."""
    from jsae.analysis.atlas.neighbours import decoder_rows, features_within
    from jsae.analysis.atlas.types import AtlasError

    W = decoder_rows(sae_or_W) if hasattr(sae_or_W, "params") else np.asarray(sae_or_W)
    F = len(W)
    if not 0 <= int(center) < F:
        raise AtlasError(f"feature {center} is out of range: the dictionary has {F} features (0..{F - 1})")
    if not 0 < radius <= 2:
        raise AtlasError(f"--radius {radius} must be a cosine distance in (0, 2]")
    if data is not None:
        full = np.full(F, "", object)
        full[np.asarray(data.feature_ids)] = data.labels
        labels = labels or list(full)
        if include is None:
            include = np.zeros(F, bool)
            include[np.asarray(data.feature_ids)] = np.asarray(data.density) > 0
    ids, cos = features_within(W, center, radius, candidates=include)
    if len(ids) < min_features:
        ids, cos = features_within(W, center, 2.0, candidates=include)
        ids, cos = ids[:min_features], cos[:min_features]
        radius = float(max(radius, 1.0 - cos.min()))  # the radius the map really covers
    ids = ids[:max_features]
    xy = layout(W[ids], n_neighbors=10, seed=seed, method=method)
    cl = clusters(xy, min_cluster_size=max(3, len(ids) // 12))
    labs = labels or [""] * F
    return LocalMap(int(center), float(radius), ids, xy, cl,
                    _cluster_labels(cl, [labs[i] for i in ids]))


def _colours(cluster: np.ndarray):
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [cmap(int(c) % 20) if c >= 0 else (0.75, 0.75, 0.75, 0.6) for c in cluster]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Axes without ticks (map coordinates mean nothing), saved as a PNG, figure closed."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_global(data: AtlasData, path: str | Path, *, title: str | None = None,
                max_cluster_labels: int = 25) -> Path:
    """PNG of the map of all features, coloured by cluster, the largest clusters labelled."""
    plt = _pyplot()

    xy, cl = np.asarray(data.map_xy), np.asarray(data.cluster)
    ok = np.isfinite(xy).all(1)
    fig, ax = plt.subplots(figsize=(10, 10), dpi=110)
    ax.scatter(xy[ok, 0], xy[ok, 1], s=3, c=_colours(cl[ok]), linewidths=0)
    sizes = sorted(((int((cl == c).sum()), c) for c in data.cluster_labels), reverse=True)
    for _, c in sizes[:max_cluster_labels]:
        m = ok & (cl == c)
        if m.any():
            x, y = np.median(xy[m], 0)
            ax.text(x, y, data.cluster_labels[c][:40], fontsize=7, ha="center",
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.7, lw=0))
    m = data.meta
    ax.set_title(title or f"{m.get('model', '')} {m.get('hook', '')}: {int(ok.sum())} live features "
                 f"(UMAP of decoder directions, HDBSCAN clusters)", fontsize=10)
    return _save(fig, path)


def plot_local(lm: LocalMap, path: str | Path, labels: dict[int, str] | list[str] | None = None, *,
               max_labels: int = 60) -> Path:
    """PNG of a local map: every point labelled (up to ``max_labels``, the nearest first), the
    center in red."""
    plt = _pyplot()

    xy, cl = np.asarray(lm.xy), np.asarray(lm.cluster)
    fig, ax = plt.subplots(figsize=(10, 8), dpi=110)
    ax.scatter(xy[:, 0], xy[:, 1], s=30, c=_colours(cl), linewidths=0)
    ax.scatter(xy[:1, 0], xy[:1, 1], s=120, c="red", marker="*", zorder=3)

    def lab(i):
        if labels is None:
            return ""
        return labels.get(int(i), "") if isinstance(labels, dict) else labels[int(i)]

    for j, i in enumerate(lm.ids[:max_labels]):
        ax.annotate(f"{int(i)} {lab(i)}"[:32], xy[j], fontsize=6.5, xytext=(3, 2),
                    textcoords="offset points", color="darkred" if j == 0 else "black")
    ax.set_title(f"neighbourhood of feature {lm.center}: {len(lm.ids)} features within cosine "
                 f"distance {lm.radius:.2f}, {len(lm.cluster_labels)} clusters "
                 "(UMAP of decoder directions)", fontsize=10)
    return _save(fig, path)
