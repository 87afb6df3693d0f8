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
