"""The atlas from a ``jsae harvest`` cache (no LM pass) equals the atlas from text over the same
contexts: densities, means, maxima, histograms, top-k contexts and quantile-band samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data_harvest import corpus, make_cfg
from test_data_stubs import make_stub, stub_forward
from test_steering_helpers import random_sae

from jsae.analysis.atlas.stream import StreamConfig, stream_cache, stream_text
from jsae.data.cache import NoContextsError, harvest_to_cache, load_shard, read_contexts
from jsae.data.text import ListDocuments

HOOK = "blocks.1.hook_resid_post"
CFG = StreamConfig(top_k=4, window=6, left=3, bands=4, band_samples=3, hist_bins=12,
                   hist_min=1e-3, hist_max=10.0, coact_tokens=64, coact_k=5)
KEYS = ("fires", "total", "max", "hist", "top_val", "top_ctx", "top_pos", "top_tok", "top_act",
        "band_exp", "band_count", "band_prio", "band_val", "band_ctx", "band_pos", "band_tok",
        "band_act", "coact", "coact_n", "n_tokens")


def harvest(out, **data):
    return harvest_to_cache(make_cfg(**data), out, n_tokens=200, model=make_stub(),
                            shard_rows=37, eval_tokens=300, progress=False,
                            documents=ListDocuments(corpus(80)), forward=stub_forward)


@pytest.mark.parametrize("outliers", [None, 1.05])
def test_atlas_from_cache_equals_atlas_from_text(tmp_path, outliers):
    man = harvest(tmp_path / "c", exclude_norm_outliers=outliers)
    tokens, rows = read_contexts(tmp_path / "c")
    n = man["splits"]["eval"]["rows"]
    assert rows.sum() == n and n >= 250
    # row i of the held-out shards is the activation at the i-th stored position
    model = make_stub()
    acts = np.asarray(stub_forward(model.cfg, model.params, tokens, capture=(HOOK,)).activations[HOOK])
    first = load_shard(tmp_path / "c" / man["splits"]["eval"]["shards"][0]["file"], [HOOK])[HOOK]
    np.testing.assert_allclose(first, acts[rows][: len(first)], rtol=1e-5, atol=1e-5)
    if outliers is not None:  # norm outliers dropped: fewer rows than counted positions
        assert rows.sum() < (~np.isin(tokens, [0, 2])).sum()
    sae = random_sae("relu", model.cfg.d_model, 24, sample=first)
    text = stream_text(model, {HOOK: sae}, tokens, rows, CFG, batch_size=4, forward=stub_forward,
                       progress=False)[HOOK]
    cache = stream_cache({HOOK: sae}, tmp_path / "c", CFG, batch_size=4, progress=False)[HOOK]
    assert cache.n_tokens == text.n_tokens == n
    for k in KEYS:
        a, b = np.asarray(getattr(cache.state, k)), np.asarray(getattr(text.state, k))
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3,
                                       atol=1e-5, err_msg=k)
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
    np.testing.assert_allclose(cache.density, text.density)


def test_cache_pass_resumes(tmp_path):
    harvest(tmp_path / "c")
    model = make_stub()
    _, rows = read_contexts(tmp_path / "c")
    first = load_shard(tmp_path / "c" / "eval" / "shard-000000.safetensors", [HOOK])[HOOK]
    sae = random_sae("relu", model.cfg.d_model, 24, sample=first)
    full = stream_cache({HOOK: sae}, tmp_path / "c", CFG, batch_size=4, progress=False)[HOOK]
    st = tmp_path / "state"
    stream_cache({HOOK: sae}, tmp_path / "c", CFG, batch_size=4, progress=False, state_dir=st,
                 save_every=1, stop_after=3)
    res = stream_cache({HOOK: sae}, tmp_path / "c", CFG, batch_size=4, progress=False,
                       state_dir=st)[HOOK]
    for k in KEYS:
        np.testing.assert_array_equal(np.asarray(getattr(res.state, k)), np.asarray(getattr(full.state, k)), k)


def test_old_cache_without_contexts_is_one_clear_error(tmp_path):
    harvest(tmp_path / "c")
    m = tmp_path / "c" / "manifest.json"
    man = json.loads(m.read_text())
    del man["splits"]["eval"]["contexts"]
    m.write_text(json.dumps(man))
    with pytest.raises(NoContextsError, match=r"has no context tokens.*jsae harvest CONFIG --out"):
        read_contexts(tmp_path / "c")


def test_atlas_build_from_cache_with_a_tiny_transformer(tmp_path):
    """`atlas(..., cache=DIR)` on a real (tiny) transformer: the LM never runs in the pass, and
    the cards' top contexts and densities are those of the text pass over the cached contexts."""
    from test_steering_helpers import TinyModel

    from jsae.analysis.atlas.build import atlas

    model = TinyModel()
    cfg = make_cfg(dataset="list")
    cfg.model.hooks = [HOOK]
    harvest_to_cache(cfg, tmp_path / "c", n_tokens=64, model=model, shard_rows=50, eval_tokens=400,
                     progress=False, documents=ListDocuments(corpus(80)))
    tokens, rows = read_contexts(tmp_path / "c")
    first = load_shard(tmp_path / "c" / "eval" / "shard-000000.safetensors", [HOOK])[HOOK]
    sae = random_sae("relu", model.cfg.d_model, 32, sample=first)

    def no_lm(*a, **k):
        raise AssertionError("the cache pass must not run the LM")

    data = atlas((model, sae, HOOK), cache=tmp_path / "c", tokens=10**6, cfg=CFG, batch_size=4,
                 maps=False, progress=False, forward=no_lm)
    text = stream_text(model, {HOOK: sae}, tokens, rows, CFG, batch_size=4, progress=False)[HOOK]
    assert data.meta["source"].startswith("cache") and data.meta["n_tokens"] == rows.sum()
    np.testing.assert_allclose(data.density, text.density)
    np.testing.assert_allclose(data.top_value, text.state.top_val, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(data.top_tokens, text.state.top_tok)
    assert all(isinstance(lab, str) for lab in data.labels)
