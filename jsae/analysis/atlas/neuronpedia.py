"""Export an atlas as Neuronpedia dashboard batches (``batch-N.json``), the files SAEDashboard's
``neuronpedia_runner`` writes and Neuronpedia's converter imports.

A batch is ``{model_id, layer, sae_set, sae_id_suffix, features: [...]}``; a feature carries
``feature_index``, ``vector`` (the raw-unit decoder direction), ``neuron_alignment_*`` (the
``d_model`` coordinates the direction loads on most), ``correlated_features_*`` (here: the
decoder-cosine neighbours; SAEDashboard also puts cosine in the ``_l1`` slot), ``pos_str`` /
``pos_values`` and ``neg_str`` / ``neg_values`` (logit effects), ``frac_nonzero``,
``freq_hist_data_bar_heights`` / ``_values`` (activation histogram: counts and bin centres),
``logits_hist_data_*`` and ``decoder_weights_dist`` (empty: not computed), ``n_prompts_total``,
``n_tokens_in_prompt``, ``dataset``, and ``activations``: the top examples first with
SAEDashboard's "top activations" bin (``bin_min=-1, bin_max=max, bin_contains=-1``), then the
quantile-band samples with their band's bounds and the fraction of firing tokens in the band;
each has ``tokens`` (strings), ``values`` and ``qualifying_token_index``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from jsae.analysis.atlas.types import AtlasData


def _r(x, digits: int = 4) -> list[float]:
    a = np.asarray(x, np.float64).ravel()
    return [float(round(v, digits)) if np.isfinite(v) else 0.0 for v in a]


def _example(data: AtlasData, tokens, acts, anchor) -> tuple[list[str], list[float], int]:
    keep = np.flatnonzero(np.asarray(tokens) >= 0)
    toks = [data.token_str.get(int(tokens[i]), f"<{int(tokens[i])}>") for i in keep]
    vals = _r(np.asarray(acts, np.float32)[keep])
    q = int(np.searchsorted(keep, anchor)) if len(keep) else 0
    return toks, vals, min(q, max(len(keep) - 1, 0))


def feature_json(data: AtlasData, row: int, vector=None, *, n_alignment: int = 3) -> dict:
    """One feature in Neuronpedia's dashboard layout."""
    f = int(data.feature_ids[row])
    ts = data.token_str
    acts = []
    for k in range(data.top_value.shape[1]):
        if data.top_value[row, k] <= 0:
            continue
        t, v, q = _example(data, data.top_tokens[row, k], data.top_acts[row, k], data.top_anchor[row, k])
        acts.append({"bin_min": -1.0, "bin_max": float(round(float(data.max_act[row]), 4)),
                     "bin_contains": -1.0, "tokens": t, "values": v, "qualifying_token_index": q})
    fires = max(int(data.band_count[row].sum()), 1)
    for b in range(data.band_value.shape[1]):
        lo, hi = _r(data.band_edges[row, b : b + 2])
        for s in range(data.band_value.shape[2]):
            if data.band_value[row, b, s] <= 0:
                continue
            t, v, q = _example(data, data.band_tokens[row, b, s], data.band_acts[row, b, s],
                               data.band_anchor[row, b, s])
            acts.append({"bin_min": lo, "bin_max": hi,
                         "bin_contains": float(round(data.band_count[row, b] / fires, 6)),
                         "tokens": t, "values": v, "qualifying_token_index": q})
    edges = np.asarray(data.hist_edges, np.float64)
    centres = np.sqrt(edges[:-1] * edges[1:])
    counts = np.asarray(data.hist_counts[row])
    nz = counts > 0
    cos_ok = data.cos_ids[row] >= 0
    vec = [] if vector is None else _r(np.asarray(vector)[f], 6)
    if vector is not None:
        v = np.asarray(vector)[f]
        align = np.argsort(-np.abs(v), kind="stable")[:n_alignment]
        l1 = np.abs(v[align]) / max(float(np.abs(v).sum()), 1e-12)
        na_i, na_v, na_l1 = [int(i) for i in align], _r(v[align]), _r(l1)
    else:
        na_i, na_v, na_l1 = [], [], []
    return {
        "feature_index": f,
        "vector": vec,
        "neuron_alignment_indices": na_i,
        "neuron_alignment_values": na_v,
        "neuron_alignment_l1": na_l1,
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [int(i) for i in data.cos_ids[row][cos_ok]],
        "correlated_features_pearson": _r(data.cos_vals[row][cos_ok]),
        "correlated_features_l1": _r(data.cos_vals[row][cos_ok]),
        "neg_str": [ts.get(int(i), f"<{int(i)}>") for i in data.logit_bottom_ids[row]],
        "neg_values": _r(data.logit_bottom_vals[row]),
        "pos_str": [ts.get(int(i), f"<{int(i)}>") for i in data.logit_top_ids[row]],
        "pos_values": _r(data.logit_top_vals[row]),
        "frac_nonzero": float(data.density[row]),
        "freq_hist_data_bar_heights": [float(c) for c in counts[nz]],
        "freq_hist_data_bar_values": _r(centres[nz]),
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
        "n_prompts_total": int(data.meta.get("n_contexts", 0)),
        "n_tokens_in_prompt": int(data.meta.get("context_length", 0)),
        "dataset": str(data.meta.get("dataset", "jsae offline corpus (Wikipedia summaries, SOTU)")),
        "activations": acts,
    }


def export_neuronpedia(data: AtlasData, out_dir, *, vectors=None, model_id: str | None = None,
                       sae_set: str | None = None, sae_id_suffix: str = "", layer: int | None = None,
                       features_per_batch: int = 128, live_only: bool = True) -> list[Path]:
    """Write ``out_dir/batch-0.json, batch-1.json, ...`` (``features_per_batch`` features each;
    only features that fired, unless ``live_only=False``). ``vectors [d_sae, d_in]``: raw-unit
    decoder directions for the ``vector`` and neuron-alignment fields."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hook = str(data.meta.get("hook", ""))
    if layer is None:
        m = re.search(r"blocks\.(\d+)\.", hook)
        layer = int(m.group(1)) if m else 0
    kind = {"hook_resid_post": "res", "hook_resid_pre": "res", "hook_resid_mid": "res",
            "hook_mlp_out": "mlp", "hook_attn_out": "att"}.get(hook.split(".")[-1], "sae")
    model_id = model_id or str(data.meta.get("model") or "model").split("/")[-1]
    sae_set = sae_set or f"{kind}-jsae-{int(data.meta.get('d_sae', data.n_features))}"
    vec = None if vectors is None else np.asarray(vectors, np.float32)
    rows = [r for r in range(data.n_features) if not live_only or data.density[r] > 0]
    files = []
    for b, s in enumerate(range(0, len(rows), features_per_batch)):
        batch = {"model_id": model_id, "layer": int(layer), "sae_set": sae_set,
                 "sae_id_suffix": sae_id_suffix,
                 "features": [feature_json(data, r, vec) for r in rows[s : s + features_per_batch]]}
        p = out / f"batch-{b}.json"
        p.write_text(json.dumps(batch), encoding="utf-8")  # ASCII escapes: lone surrogates survive
        files.append(p)
    return files
