"""Feature-detail JSON as circuit-tracer's frontend and Neuronpedia read it, from jsae's atlas.

One file per feature, ``features/<scan>/<index>.json`` with ``index`` the Cantor pairing of
(layer, feature) (the ``feature`` of its graph nodes), in the schema of
``circuit_tracer/frontend/feature_models.py``: ``transcoder_id``, ``index``,
``examples_quantiles`` (``[{quantile_name, examples: [{tokens, tokens_acts_list,
train_token_ind, is_repeated_datapoint}]}]``: the atlas's top examples, then its quantile bands
from the highest), ``top_logits`` / ``bottom_logits`` (token strings), ``act_min`` /
``act_max``, ``quantile_values`` (the activation at each percentile 1..100 of where the
feature fires), ``histogram`` (counts over ``n_bins`` equal bins from act_min to act_max, as the
frontend draws it) and ``activation_frequency``.

The atlas keeps a log-spaced histogram shared by all features (``AtlasData.hist_edges``); the
percentiles interpolate it geometrically inside a bin and the linear histogram puts each log
bin's count in the linear bin of its geometric centre, so both are exact to one atlas bin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jsae.analysis.atlas.types import AtlasData
from jsae.circuits.graph_json import cantor

TOP_NAME = "Top activations"


def _tok(data: AtlasData, t: int) -> str:
    s = data.token_str.get(int(t))
    return s.encode("utf-8", "replace").decode("utf-8") if s is not None else f"<{int(t)}>"


def _example(data: AtlasData, tokens, acts, anchor) -> dict[str, Any] | None:
    tokens = np.asarray(tokens).tolist()
    keep = [j for j, t in enumerate(tokens) if t >= 0]  # -1: outside the context
    if not keep:
        return None
    a = int(anchor)
    return {"tokens_acts_list": [float(np.float32(acts[j])) for j in keep],
            "train_token_ind": sum(1 for j in keep if j < a),
            "is_repeated_datapoint": False, "tokens": [_tok(data, tokens[j]) for j in keep]}


def _examples(data, values, tokens, acts, anchors) -> list[dict]:
    out = []
    for v, t, a, k in zip(np.asarray(values).ravel().tolist(), tokens, acts, anchors):
        if v > 0:
            ex = _example(data, t, a, k)
            if ex is not None:
                out.append(ex)
    return out


def percentiles(counts: np.ndarray, edges: np.ndarray) -> list[float]:
    """The activation at percentiles 1..100 of a histogram ``counts [H]`` over log-spaced
    ``edges [H + 1]`` (geometric interpolation inside a bin); [] when it never fired."""
    counts = np.asarray(counts, np.float64)
    edges = np.asarray(edges, np.float64)
    total = counts.sum()
    if total <= 0:
        return []
    cum = np.concatenate([[0.0], np.cumsum(counts)]) / total
    q = np.arange(1, 101) / 100.0
    b = np.clip(np.searchsorted(cum, q, side="left") - 1, 0, len(counts) - 1)
    frac = np.where(counts[b] > 0, (q - cum[b]) / np.where(counts[b] > 0, counts[b] / total, 1), 1.0)
    lo, hi = np.maximum(edges[b], 1e-30), edges[b + 1]
    return (lo * (hi / lo) ** np.clip(frac, 0, 1)).astype(np.float32).astype(np.float64).tolist()


def linear_histogram(counts: np.ndarray, edges: np.ndarray, lo: float, hi: float,
                     n_bins: int) -> list[float]:
    """A log-spaced histogram's counts in ``n_bins`` equal bins over [lo, hi]."""
    counts = np.asarray(counts, np.float64)
    edges = np.asarray(edges, np.float64)
    centre = np.sqrt(np.maximum(edges[:-1], 1e-30) * edges[1:])
    width = (hi - lo) / n_bins if hi > lo else 1.0
    b = np.clip(np.floor((centre - lo) / width), 0, n_bins - 1).astype(np.int64)
    out = np.zeros(n_bins)
    np.add.at(out, b, counts)
    return out.tolist()


def feature_json(data: AtlasData, feature: int, *, layer: int, transcoder_id: str,
                 index_feature: int | None = None, n_bins: int = 50) -> dict[str, Any]:
    """The detail file of atlas feature id ``feature`` at ``layer``; ``index_feature``: its
    index within the layer when that differs from the atlas id (a cross-layer transcoder's
    atlas keeps the latent index), so ``index`` = cantor(layer, index_feature)."""
    r = data.row(feature)
    counts, edges = np.asarray(data.hist_counts[r]), np.asarray(data.hist_edges)
    nz = np.flatnonzero(counts > 0)
    act_max = float(np.float32(data.max_act[r]))
    act_min = float(np.float32(edges[nz[0]])) if len(nz) else 0.0
    act_min = min(act_min, act_max)
    quantiles = [{"quantile_name": TOP_NAME,
                  "examples": _examples(data, data.top_value[r], data.top_tokens[r],
                                        data.top_acts[r], data.top_anchor[r])}]
    for b in range(data.band_value.shape[1] - 1, -1, -1):  # highest band first
        exs = _examples(data, data.band_value[r, b], data.band_tokens[r, b], data.band_acts[r, b],
                        data.band_anchor[r, b])
        if exs:
            quantiles.append({"quantile_name": f"Subsample Interval {data.band_value.shape[1] - 1 - b}",
                              "examples": exs})
    top = [_tok(data, t) for t in np.asarray(data.logit_top_ids[r]).tolist() if t >= 0]
    bottom = [_tok(data, t) for t in np.asarray(data.logit_bottom_ids[r]).tolist() if t >= 0]
    f = int(feature if index_feature is None else index_feature)
    return {"transcoder_id": str(transcoder_id), "index": cantor(layer, f),
            "examples_quantiles": quantiles, "top_logits": top, "bottom_logits": bottom,
            "act_min": act_min, "act_max": act_max, "quantile_values": percentiles(counts, edges),
            "histogram": linear_histogram(counts, edges, act_min, act_max, n_bins),
            "activation_frequency": float(data.density[r])}


__all__ = ["TOP_NAME", "feature_json", "linear_histogram", "percentiles"]
