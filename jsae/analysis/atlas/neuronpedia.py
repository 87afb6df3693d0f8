"""Export an atlas as Neuronpedia dashboard batches (``batch-N.json``), the files SAEDashboard's
``neuronpedia_runner`` writes and Neuronpedia's converter imports.

A batch is ``{model_id, layer, sae_set, sae_id_suffix, features: [...]}``; a feature carries
``feature_index``, ``vector`` (the raw-unit decoder direction), ``neuron_alignment_*`` (the
``d_model`` coordinates the direction loads on most), ``correlated_features_*`` (here: the
decoder-cosine neighbours; SAEDashboard also puts cosine in the ``_l1`` slot), ``pos_str`` /
``pos_values`` and ``neg_str`` / ``neg_values`` (logit effects), ``frac_nonzero``,
``freq_hist_data_bar_heights`` / ``_values`` (activation histogram: counts and bin centres),
``logits_hist_data_bar_heights`` / ``_values`` (when ``logit_hist`` is given: the histogram of
the feature's logit effects over the whole vocabulary, :func:`logit_histograms`, 40 bins as
SAEDashboard's ``LogitsHistogramConfig``), ``decoder_weights_dist`` (empty), ``n_prompts_total``,
``n_tokens_in_prompt``, ``dataset``, and ``activations``: the top examples first with
SAEDashboard's "top activations" bin (``bin_min=-1, bin_max=max, bin_contains=-1``), then the
quantile-band samples with their band's bounds and the fraction of firing tokens in the band;
each has ``tokens`` (strings), ``values`` and ``qualifying_token_index``.

:func:`export_bulk` writes Neuronpedia's bulk-import layout, the one its
``convert-saedashboard-to-neuronpedia-export.py`` makes from those batches:
``MODEL/LAYER-SOURCESET/{release,model,sourceset,source}.jsonl`` (one record each) and
``features/batch-N.jsonl.gz`` / ``activations/batch-N.jsonl.gz`` (one record per feature and
per example), with the field names of ``neuronpedia_utils/db_models`` (Feature, Activation,
Source, SourceSet, SourceRelease, Model).
"""

from __future__ import annotations

import datetime
import gzip
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


LOGIT_HIST_BINS = 40  # SAEDashboard's LogitsHistogramConfig default


def logit_histograms(model, sae, features, bins: int = LOGIT_HIST_BINS, chunk: int = 256):
    """``(heights [n, bins], centres [n, bins])``: per feature of ``features``, the histogram of
    its logit effects over the whole vocabulary (``build.LOGIT_METHOD``), ``bins`` equal bins
    from its smallest to its largest effect (SAEDashboard's logits histogram)."""
    import jax.numpy as jnp

    from jsae.analysis.atlas.build import _logit_hist
    from jsae.analysis.logits import feature_directions

    p = model.params
    E = p["embed"] if model.cfg.tie_embeddings else jnp.transpose(p["unembed"])
    E = jnp.asarray(E, jnp.float32)
    scale = jnp.asarray(p["final_norm"]["scale"], jnp.float32)
    feats = np.asarray(features, np.int64)
    hs, cs = [], []
    for s in range(0, len(feats), chunk):
        idx = feats[s : s + chunk]
        pad = np.concatenate([idx, np.repeat(idx[-1:], chunk - len(idx))]) if len(idx) < chunk else idx
        h, c = _logit_hist(feature_directions(sae, pad).astype(jnp.float32), scale, E, bins=bins)
        hs.append(np.asarray(h)[: len(idx)])
        cs.append(np.asarray(c)[: len(idx)])
    if not hs:
        return np.zeros((0, bins), np.int64), np.zeros((0, bins), np.float32)
    return np.concatenate(hs).astype(np.int64), np.concatenate(cs).astype(np.float32)


def feature_json(data: AtlasData, row: int, vector=None, *, n_alignment: int = 3,
                 logit_hist=None) -> dict:
    """One feature in Neuronpedia's dashboard layout; ``logit_hist``: ``(heights, centres)``
    of this feature (:func:`logit_histograms`)."""
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
        "logits_hist_data_bar_heights": [] if logit_hist is None else [float(v) for v in logit_hist[0]],
        "logits_hist_data_bar_values": [] if logit_hist is None else _r(logit_hist[1]),
        "decoder_weights_dist": [],
        "n_prompts_total": int(data.meta.get("n_contexts", 0)),
        "n_tokens_in_prompt": int(data.meta.get("context_length", 0)),
        "dataset": str(data.meta.get("dataset", "jsae offline corpus (Wikipedia summaries, SOTU)")),
        "activations": acts,
    }


def export_neuronpedia(data: AtlasData, out_dir, *, vectors=None, model_id: str | None = None,
                       sae_set: str | None = None, sae_id_suffix: str = "", layer: int | None = None,
                       features_per_batch: int = 128, live_only: bool = True,
                       logit_hist=None) -> list[Path]:
    """Write ``out_dir/batch-0.json, batch-1.json, ...`` (``features_per_batch`` features each;
    only features that fired, unless ``live_only=False``). ``vectors [d_sae, d_in]``: raw-unit
    decoder directions for the ``vector`` and neuron-alignment fields. ``logit_hist``:
    ``(model, sae)`` to fill the logit histograms (:func:`logit_histograms`)."""
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
    lh = None
    if logit_hist is not None:
        heights, centres = logit_histograms(*logit_hist, data.feature_ids[rows])
        lh = {r: (heights[i], centres[i]) for i, r in enumerate(rows)}
    files = []
    for b, s in enumerate(range(0, len(rows), features_per_batch)):
        batch = {"model_id": model_id, "layer": int(layer), "sae_set": sae_set,
                 "sae_id_suffix": sae_id_suffix,
                 "features": [feature_json(data, r, vec, logit_hist=lh[r] if lh else None)
                              for r in rows[s : s + features_per_batch]]}
        p = out / f"batch-{b}.json"
        p.write_text(json.dumps(batch), encoding="utf-8")  # ASCII escapes: lone surrogates survive
        files.append(p)
    return files


def _jsonl_gz(path: Path, records) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=5))


def export_bulk(batch_files, out_dir, *, creator_name: str = "jsae", release_id: str = "jsae",
                release_title: str = "jsae dictionary", url: str = "", source_set: str | None = None,
                source_set_description: str = "", hook_point: str = "hook_resid_post",
                dataset: str = "", creator_id: str = "jsae") -> Path:
    """Neuronpedia's bulk-import folder from ``batch-N.json`` files (:func:`export_neuronpedia`):
    returns ``out_dir/MODEL/LAYER-SOURCESET[__SUFFIX]``."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    src_dir = None
    for n, bf in enumerate(sorted(Path(f) for f in batch_files)):
        b = json.loads(Path(bf).read_text(encoding="utf-8"))
        model_id, layer, suffix = b["model_id"], int(b["layer"]), b.get("sae_id_suffix") or ""
        sset = source_set or b["sae_set"]
        source_id = f"{layer}-{sset}" + (f"__{suffix}" if suffix else "")
        src_dir = Path(out_dir) / model_id / source_id
        (src_dir / "features").mkdir(parents=True, exist_ok=True)
        (src_dir / "activations").mkdir(parents=True, exist_ok=True)
        feats = b["features"]
        if n == 0:
            first = feats[0] if feats else {}
            recs = {
                "release": {"name": release_id, "description": release_title,
                            "descriptionShort": release_title, "urls": [url] if url else [],
                            "creatorNameShort": creator_name, "creatorName": creator_name,
                            "creatorId": creator_id, "createdAt": now},
                "model": {"id": model_id, "instruct": model_id.endswith("-it"),
                          "displayNameShort": model_id, "displayName": model_id,
                          "creatorId": creator_id, "createdAt": now, "updatedAt": now},
                "sourceset": {"modelId": model_id, "name": sset, "creatorId": creator_id,
                              "createdAt": now, "creatorName": creator_name,
                              "releaseName": release_id, "description": source_set_description,
                              "visibility": "PUBLIC"},
                "source": {"modelId": model_id, "setName": sset, "visibility": "PUBLIC",
                           "dataset": dataset or first.get("dataset", ""), "id": source_id,
                           "num_prompts": first.get("n_prompts_total"),
                           "num_tokens_in_prompt": first.get("n_tokens_in_prompt"),
                           "creatorId": creator_id},
            }
            for name, rec in recs.items():
                (src_dir / f"{name}.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
        f_recs, a_recs = [], []
        for f in feats:
            mx = 0.0
            for i, a in enumerate(f["activations"]):
                v = a["values"]
                top = max(v) if v else 0.0
                mx = max(mx, top)
                a_recs.append({
                    "id": f"{source_id}-{f['feature_index']}-{i}", "tokens": a["tokens"],
                    "modelId": model_id, "layer": source_id, "index": str(f["feature_index"]),
                    "maxValue": top, "maxValueTokenIndex": v.index(top) if v else 0,
                    "minValue": min(v) if v else 0.0, "values": v, "creatorId": creator_id,
                    "createdAt": now, "binMin": a["bin_min"], "binMax": a["bin_max"],
                    "binContains": a["bin_contains"],
                    "qualifyingTokenIndex": a["qualifying_token_index"]})
            rec = {"modelId": model_id, "layer": source_id, "index": str(f["feature_index"]),
                   "creatorId": creator_id, "createdAt": now, "maxActApprox": mx,
                   "hasVector": bool(f.get("vector")), "vector": f.get("vector", []),
                   "vectorLabel": None,
                   "hookName": f"blocks.{layer}.{hook_point}" if f.get("vector") else None,
                   "topkCosSimIndices": [], "topkCosSimValues": []}
            rec.update({k: f[k] for k in BULK_FEATURE_FIELDS})
            if f.get("vector"):
                rec["vectorDefaultSteerStrength"] = mx
            f_recs.append(rec)
        stem = Path(bf).stem  # batch-N
        _jsonl_gz(src_dir / "features" / f"{stem}.jsonl.gz", f_recs)
        _jsonl_gz(src_dir / "activations" / f"{stem}.jsonl.gz", a_recs)
    if src_dir is None:
        raise ValueError("no batch files to convert")
    return src_dir


BULK_FEATURE_FIELDS = (
    "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
    "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "decoder_weights_dist")
