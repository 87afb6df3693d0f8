"""A whole atlas of a tiny random model: logit effects against NumPy, labels, maps, local maps,
save/load round trip, and one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from test_steering_helpers import TinyModel, random_sae

from jsae.analysis.atlas import AtlasData, atlas, load_atlas, save_atlas
from jsae.analysis.atlas.build import logit_table
from jsae.analysis.atlas.labels import auto_label, cluster_labels, token_strings
from jsae.analysis.atlas.stream import AtlasError, StreamConfig

HOOK = "blocks.1.hook_resid_post"
TEXTS = [f"The {w} of the {v} is {u}." for w in ("river", "bridge", "city", "song", "king")
         for v in ("north", "south", "golden gate", "sea") for u in ("long", "old", "red")] * 2
CFG = StreamConfig(top_k=4, window=8, bands=3, band_samples=2, hist_bins=10, coact_tokens=256)


@pytest.fixture(scope="module")
def tiny():
    model = TinyModel()
    sample = np.random.default_rng(0).normal(size=(256, model.cfg.d_model)).astype(np.float32)
    sae = random_sae("topk", model.cfg.d_model, 64, k=6, sample=sample)
    data = atlas((model, sae, HOOK), tokens=4000, context_length=32, cfg=CFG, texts=TEXTS,
                 around=[3], radius=0.9, progress=False, n_logits=5, n_neighbours=4,
                 map_method="pca")
    return model, sae, data


def test_atlas_fields_and_shapes(tiny):
    model, sae, data = tiny
    F = 64
    assert isinstance(data, AtlasData) and data.n_features == F
    assert data.top_tokens.shape == (F, 4, 8) and data.band_tokens.shape == (F, 3, 2, 8)
    assert data.hist_counts.shape == (F, 10) and data.cos_ids.shape == (F, 4)
    live = data.density > 0
    assert live.sum() > 10
    np.testing.assert_array_equal(np.isfinite(data.map_xy).all(1), live)
    assert all(data.labels[i] for i in np.flatnonzero(live))
    # every token id shown has a text
    shown = np.concatenate([data.top_tokens.ravel(), data.band_tokens.ravel(), data.logit_top_ids.ravel()])
    assert {int(i) for i in shown if i >= 0} <= set(data.token_str)
    assert data.meta["logit_method"] and data.meta["coact_score"].startswith("jaccard")
    assert len(data.local_maps) == 1 and data.local_maps[0].ids[0] == 3
    # decoder neighbours are live features only
    assert live[data.cos_ids[data.cos_ids >= 0]].all()


def test_logit_table_equals_numpy(tiny):
    model, sae, _ = tiny
    vocab = np.arange(3, 97)
    ti, tv, bi, bv = logit_table(model, sae, vocab, k=5, chunk=16)
    E = np.asarray(model.params["embed"], np.float64)
    dirs = np.asarray(sae.params["W_dec"], np.float64) / float(sae.norm_scale)
    dirs = dirs * np.asarray(model.params["final_norm"]["scale"], np.float64)
    logits = dirs @ E[vocab].T
    ref_top = vocab[np.argsort(-logits, axis=1)[:, :5]]
    ref_bot = vocab[np.argsort(logits, axis=1)[:, :5]]
    assert (ti == ref_top).mean() > 0.99 and (bi == ref_bot).mean() > 0.99
    np.testing.assert_allclose(tv, np.take_along_axis(logits, np.argsort(-logits, 1)[:, :5], 1), rtol=1e-4)


def test_save_load_round_trip(tiny, tmp_path):
    _, _, data = tiny
    p = save_atlas(data, tmp_path / "atlas.npz")
    back = load_atlas(p)
    for name in ("top_tokens", "band_value", "cos_ids", "map_xy", "hist_counts", "density"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
    assert back.labels == data.labels and back.token_str == data.token_str
    assert back.cluster_labels == data.cluster_labels and back.meta == data.meta
    assert back.local_maps[0].center == 3
    np.testing.assert_array_equal(back.local_maps[0].ids, data.local_maps[0].ids)


def test_labels():
    tok = {1: " San", 2: " Francisco", 3: " Santa", 4: "study", 5: " of"}
    t = np.array([[9, 1, 2], [9, 1, 2], [9, 3, 2], [9, 1, 5]])
    assert auto_label(t, np.full(4, 1), np.array([3.0, 1.0, 2.0, 1.0]), tok) == "San · Santa"
    t2 = np.array([[9, 4, 5], [9, 4, 5], [9, 4, 2]])
    assert auto_label(t2, np.full(3, 1), np.array([1.0, 1.0, 1.0]), tok) == "study (of)"
    assert auto_label(t2, np.full(3, 1), np.zeros(3), tok) == ""
    assert cluster_labels(np.array([0, 0, 1, -1]), ["San · Los", "San", "x", "y"]) == {0: "San · Los", 1: "x"}

    class Sp:
        def id_to_token(self, i):
            return {0: "▁Golden", 1: "<0x0A>", 2: "Gate"}[i]

    assert token_strings(Sp(), [0, 1, 2, -1]) == {0: " Golden", 1: "\n", 2: "Gate"}


def test_labels_decode_byte_tokens():
    """Byte-fallback pieces are decoded as UTF-8 around the anchor (the label never shows
    '<0xC3>'); a byte run that is no text (cut by the window) is left out, unless nothing else
    is left: then the byte token itself labels the feature."""
    tok = {1: " caf", 2: "<0xC3>", 3: "<0xA9>", 4: "<0xE2>", 5: "<0x82>", 6: "<0xAC>", 7: " x"}
    t = np.array([[1, 2, 3, 7], [1, 2, 3, 7], [7, 4, 5, 6], [7, 7, 2, 3]])
    lab = auto_label(t, np.array([1, 2, 2, 3]), np.array([3.0, 2.0, 2.0, 0.5]), tok)
    assert lab == "é · €" and "<0x" not in lab
    cut = np.array([[5, 6, 7, 7], [1, 1, 1, 1]])  # the euro's lead byte fell outside the window
    assert auto_label(cut, np.array([0, 0]), np.array([5.0, 1.0]), tok) == "caf"
    assert auto_label(np.array([[4, 5, 7]]), np.array([0]), np.array([1.0]), tok) == "<0xE2>"


def test_bad_input_one_line(tiny, tmp_path):
    model, sae, _ = tiny
    with pytest.raises(AtlasError, match="out of range") as e:
        atlas((model, sae, HOOK), tokens=4000, context_length=32, cfg=CFG, texts=TEXTS,
              around=[64], progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(AtlasError, match="fewer than the top-k"):
        atlas((model, sae, HOOK), tokens=64, context_length=32, cfg=CFG, texts=TEXTS[:1],
              progress=False)
    with pytest.raises(FileNotFoundError, match="no saved SAEs"):
        (tmp_path / "run").mkdir()
        atlas(tmp_path / "run")


# the keys of a feature and of an activation in a batch file of SAEDashboard's neuronpedia_runner
# (sae_dashboard/neuronpedia/neuronpedia_dashboard.py, NeuronpediaDashboardFeature.to_dict, with
# the newer `vector` field; Neuronpedia's importer reads these names)
NP_FEATURE_KEYS = {
    "feature_index", "vector", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_l1",
    "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total",
    "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations",
}
NP_ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"}


def test_neuronpedia_batches_have_the_exporters_fields(tiny, tmp_path):
    import json

    from jsae.analysis.atlas.neuronpedia import export_neuronpedia

    _, sae, data = tiny
    vec = np.asarray(sae.params["W_dec"]) / float(sae.norm_scale)
    files = export_neuronpedia(data, tmp_path / "np", vectors=vec, features_per_batch=16)
    live = np.flatnonzero(data.density > 0)
    assert len(files) == -(-len(live) // 16) and files[0].name == "batch-0.json"
    batches = [json.loads(f.read_text()) for f in files]
    feats = [f for b in batches for f in b["features"]]
    assert [f["feature_index"] for f in feats] == live.tolist()
    b = batches[0]
    assert set(b) == {"model_id", "layer", "sae_set", "sae_id_suffix", "features"}
    assert b["layer"] == 1 and isinstance(b["sae_set"], str)
    for f in feats:
        assert set(f) == NP_FEATURE_KEYS
        r = data.row(f["feature_index"])
        assert len(f["vector"]) == vec.shape[1]
        np.testing.assert_allclose(f["vector"], vec[r], atol=1e-5)
        assert len(f["pos_str"]) == len(f["pos_values"]) == 5 == len(f["neg_str"])
        assert all(isinstance(s, str) for s in f["pos_str"] + f["neg_str"])
        assert f["pos_values"] == sorted(f["pos_values"], reverse=True)
        assert len(f["freq_hist_data_bar_heights"]) == len(f["freq_hist_data_bar_values"])
        assert sum(f["freq_hist_data_bar_heights"]) == data.hist_counts[r].sum()
        assert abs(f["frac_nonzero"] - data.density[r]) < 1e-9
        assert len(f["correlated_features_indices"]) == len(f["correlated_features_l1"])
        assert f["activations"]
        top = [a for a in f["activations"] if a["bin_min"] == -1]
        assert len(top) == (data.top_value[r] > 0).sum()
        for a in f["activations"]:
            assert set(a) == NP_ACTIVATION_KEYS
            assert len(a["tokens"]) == len(a["values"]) and 0 <= a["qualifying_token_index"] < len(a["tokens"])
            peak = a["values"][a["qualifying_token_index"]]
            assert peak == pytest.approx(max(a["values"]), rel=1e-2, abs=1e-3) or a["bin_min"] >= 0
            if a["bin_min"] >= 0:
                assert a["bin_min"] <= peak <= a["bin_max"] + 1e-3
        assert top[0]["values"][top[0]["qualifying_token_index"]] == pytest.approx(
            float(data.max_act[r]), rel=1e-2)


# Field names of Neuronpedia's importer records (hijohnnylin/neuronpedia,
# utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py, and what
# convert-saedashboard-to-neuronpedia-export.py fills in)
NP_DB_FEATURE = {
    "modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector",
    "vectorLabel", "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices",
    "topkCosSimValues", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_pearson",
    "correlated_neurons_l1", "correlated_features_indices", "correlated_features_pearson",
    "correlated_features_l1", "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "decoder_weights_dist"}
NP_DB_ACTIVATION = {
    "id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue",
    "values", "creatorId", "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex",
    "dfaMaxValue", "createdAt", "lossValues", "logitContributions", "binMin", "binMax",
    "binContains", "qualifyingTokenIndex"}
NP_DB_SOURCE = {
    "id", "modelId", "setName", "creatorId", "hasDashboards", "inferenceEnabled",
    "inferenceHosts", "saelensConfig", "saelensRelease", "saelensSaeId", "hfRepoId",
    "hfFolderId", "visibility", "defaultOfModelId", "hasUmap", "hasUmapLogSparsity",
    "hasUmapClusters", "num_prompts", "num_tokens_in_prompt", "dataset", "notes", "createdAt"}
NP_DB_REQUIRED = {"feature": {"modelId", "layer", "index"},
                  "activation": {"id", "tokens", "index", "layer", "modelId", "maxValue",
                                 "maxValueTokenIndex", "minValue", "values", "creatorId"},
                  "source": {"id", "modelId", "setName", "creatorId"},
                  "sourceset": {"modelId", "name", "creatorId"},
                  "release": {"name", "description", "creatorName", "creatorId"},
                  "model": {"id", "instruct", "creatorId"}}


def test_neuronpedia_logit_histograms_and_bulk_layout(tiny, tmp_path):
    """Logit histograms equal NumPy's over the whole vocabulary; the bulk-import folder has the
    converter's layout and only field names of Neuronpedia's db models (required ones present)."""
    import gzip
    import json

    from jsae.analysis.atlas.neuronpedia import LOGIT_HIST_BINS, export_bulk, export_neuronpedia

    model, sae, data = tiny
    files = export_neuronpedia(data, tmp_path / "np", features_per_batch=16, logit_hist=(model, sae))
    feats = [f for p in files for f in json.loads(p.read_text())["features"]]
    p = model.params
    E = np.asarray(p["embed"] if model.cfg.tie_embeddings else np.asarray(p["unembed"]).T, np.float64)
    scale = np.asarray(p["final_norm"]["scale"], np.float64)
    W = np.asarray(sae.params["W_dec"], np.float64) / float(sae.norm_scale)
    for f in feats[:5]:
        logits = (W[f["feature_index"]] * scale) @ E.T
        h, edges = np.histogram(logits, LOGIT_HIST_BINS)
        assert len(f["logits_hist_data_bar_heights"]) == LOGIT_HIST_BINS
        assert np.abs(np.asarray(f["logits_hist_data_bar_heights"]) - h).sum() <= 2  # edge ties
        np.testing.assert_allclose(f["logits_hist_data_bar_values"], (edges[:-1] + edges[1:]) / 2,
                                   rtol=1e-3, atol=1e-3)
    src = export_bulk(files, tmp_path / "bulk", source_set="res-jsae", hook_point="hook_resid_post")
    assert src == tmp_path / "bulk" / data.meta["model"].split("/")[-1] / "1-res-jsae"
    for name in ("release", "model", "sourceset", "source"):
        rec = json.loads((src / f"{name}.jsonl").read_text())
        assert NP_DB_REQUIRED[name] <= set(rec), name
    assert set(json.loads((src / "source.jsonl").read_text())) <= NP_DB_SOURCE
    assert sorted(x.name for x in (src / "features").iterdir()) == sorted(
        f.stem + ".jsonl.gz" for f in files)
    fr = [json.loads(line) for x in sorted((src / "features").iterdir())
          for line in gzip.decompress(x.read_bytes()).decode().splitlines()]
    ar = [json.loads(line) for x in sorted((src / "activations").iterdir())
          for line in gzip.decompress(x.read_bytes()).decode().splitlines()]
    assert len(fr) == len(feats) and len(ar) == sum(len(f["activations"]) for f in feats)
    for r in fr:
        assert NP_DB_REQUIRED["feature"] <= set(r) <= NP_DB_FEATURE
    for a in ar:
        assert NP_DB_REQUIRED["activation"] <= set(a) <= NP_DB_ACTIVATION
        assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"]


def test_cli_atlas_then_around(tmp_path, monkeypatch, capsys):
    """`jsae atlas RUN` on a run folder of the tiny model, then `--around` on the saved atlas
    (no LM pass), and a bad feature id / a run without an SAE as one line, exit 2."""
    from jsae import cli
    from jsae.sae.io import save_sae

    model = TinyModel()
    sample = np.random.default_rng(0).normal(size=(256, model.cfg.d_model)).astype(np.float32)
    sae = random_sae("topk", model.cfg.d_model, 64, k=6, sample=sample)
    run = tmp_path / "run"
    save_sae(sae, run / "saes" / HOOK, {"hook": HOOK})
    (run / "config.yaml").write_text(f"model:\n  name: tiny\n  hooks: [{HOOK}]\n")
    monkeypatch.setattr("jsae.models.load", lambda name, dtype="float32": model)  # "tiny"
    (tmp_path / "a.txt").write_text(" ".join(TEXTS[:60]))
    (tmp_path / "b.txt").write_text(" ".join(TEXTS[60:]))
    out = tmp_path / "atlas"
    rc = cli.main(["atlas", str(run), "--out", str(out), "--tokens", "3000", "--context-length", "32",
                   "--window", "8", "--top-k", "4", "--map", "pca", "--text", str(tmp_path / "*.txt"),
                   "--neuronpedia", str(tmp_path / "np")])
    assert rc == 0
    assert (out / "atlas.npz").exists() and (out / "map.png").exists()
    assert (out / "index.html").exists() and (tmp_path / "np" / "batch-0.json").exists()
    assert list((tmp_path / "np" / "bulk").glob("*/*/features/batch-0.jsonl.gz"))  # bulk import
    text = capsys.readouterr().out
    assert "features fired" in text
    rc = cli.main(["atlas", str(run), "--out", str(out), "--around", "5", "--radius", "0.9",
                   "--map", "pca"])
    assert rc == 0 and (out / "local_5.png").exists()
    assert "local map of feature 5" in capsys.readouterr().out
    assert load_atlas(out / "atlas.npz").local_maps[0].center == 5
    rc = cli.main(["atlas", str(run), "--out", str(out), "--around", "64"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "out of range" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    rc = cli.main(["atlas", str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no saved SAEs" in err and len(err.splitlines()) == 1


def test_crosscoder_atlas_stacks_its_hooks_and_shows_where_features_write(tmp_path):
    """A crosscoder over two hooks: the pass reads both from one LM forward (stacked
    [B, T, L, d]), so its top activations equal the codes of the stacked activations; logit
    effects use each feature's row at the last hook, decoder neighbours compare all hooks'
    rows together, and every card says how much of its decoder norm goes to each hook."""
    import jax
    import jax.numpy as jnp

    from jsae.analysis.atlas.site import card_html, write_site
    from jsae.models.transformer import forward
    from jsae.sae import SAESpec, encode, init_sae
    from jsae.sae.archs.crosscoder import layer_profile

    model = TinyModel()
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    key = "+".join(hooks)
    d = model.cfg.d_model
    sae = init_sae(jax.random.key(0), SAESpec("crosscoder", d, 48, n_layers=2), None)
    rng = np.random.default_rng(0)
    W = np.asarray(sae.params["W_dec"]) * rng.uniform(0.2, 2.0, (48, 2, 1))  # uneven profiles
    sae = sae.replace(params={**sae.params, "W_dec": jnp.asarray(W, jnp.float32),
                              "b_enc": jnp.asarray(rng.normal(0, 0.1, 48), jnp.float32)})
    data = atlas((model, sae, key), tokens=3000, context_length=32, cfg=CFG, texts=TEXTS,
                 progress=False, n_logits=5, n_neighbours=4, map_method="pca")
    assert data.meta["layer_hooks"] == hooks
    np.testing.assert_allclose(data.layer_profile, layer_profile(sae), rtol=1e-6)
    # top activation of each feature = the max code of the stacked activations
    from jsae.analysis.corpus import pack_texts

    tok, msk = pack_texts(model.tokenizer, TEXTS, 32)
    tok, msk = tok[: data.meta["n_contexts"]], msk[: data.meta["n_contexts"]]
    acts = forward(model.cfg, model.params, jnp.asarray(tok), capture=hooks).activations
    z = np.asarray(encode(sae, jnp.stack([acts[h] for h in hooks], axis=-2)))
    zmax = np.where(msk[..., None], z, 0).reshape(-1, 48).max(0)
    np.testing.assert_allclose(data.top_value[:, 0], zmax, rtol=1e-5, atol=1e-6)
    # logit effects from the last hook's rows
    vocab = np.unique(data.top_tokens[data.top_tokens >= 0])
    vocab = vocab[vocab > 2]
    dirs = W[:, -1] / float(sae.norm_scale) * np.asarray(model.params["final_norm"]["scale"])
    logits = dirs @ np.asarray(model.params["embed"], np.float64)[vocab].T
    assert (data.logit_top_ids[:, 0] == vocab[np.argmax(logits, 1)]).mean() > 0.97
    # decoder neighbours over both hooks' rows (live features are the candidates)
    flat = W.reshape(48, -1)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    cos = unit @ unit.T
    live = data.density > 0
    cos[:, ~live] = -np.inf
    np.fill_diagonal(cos, -np.inf)
    f = int(np.flatnonzero(live)[0])
    assert data.cos_ids[f, 0] == int(np.argmax(cos[f]))
    html = card_html(data, f)
    assert "writes to" in html and f"L0 {100 * data.layer_profile[f, 0]:.0f}%" in html
    write_site(tmp_path / "site", data)
    assert (tmp_path / "site" / "index.html").exists()


def test_a_feature_seen_only_on_a_lone_byte_token_still_has_a_label():
    """Its only example's anchor is a UTF-8 continuation byte (0xA0 of a non-breaking space,
    no text alone): the label is the byte token itself, never empty."""
    token_str = {5: "<0xA0>", 6: " word"}
    tokens = np.array([[6, 5, -1], [-1, -1, -1]])
    assert auto_label(tokens, np.array([1, 0]), np.array([0.5, 0.0]), token_str) == "<0xA0>"
    assert auto_label(tokens, np.array([1, 0]), np.array([0.0, 0.0]), token_str) == ""
