"""An atlas of a small dictionary on the real Gemma 3 270M (offline GGUF), checked against a
direct computation: densities and maxima from encoding the same contexts, the top example's
anchor token, logit effects from jsae.analysis.logit_effects, and the UMAP map and site."""

from __future__ import annotations

import numpy as np
import pytest

HOOK = "blocks.6.hook_resid_post"


@pytest.mark.slow
def test_atlas_of_a_small_gemma_dictionary(tmp_path):
    import jax.numpy as jnp
    from test_steering_real import _train_sae

    from jsae.analysis import hook_activations, logit_effects
    from jsae.analysis.atlas import atlas, save_atlas
    from jsae.analysis.atlas.build import _corpus
    from jsae.analysis.atlas.stream import StreamConfig
    from jsae.models import load
    from jsae.sae import encode

    lm = load("gemma-3-270m")
    tok, msk = _corpus(lm, 64 * 96, 64, 0)
    A = np.concatenate([np.asarray(hook_activations(lm, HOOK, tok[i : i + 32]))
                        for i in range(0, len(tok), 32)])
    sae = _train_sae(A[msk], steps=120)
    cfg = StreamConfig(top_k=8, window=16, bands=5, band_samples=3)
    data = atlas((lm, sae, HOOK), tokens=64 * 96, context_length=64, cfg=cfg, batch_size=32,
                 progress=False, around=[0], radius=0.5)

    Z = np.asarray(encode(sae, jnp.asarray(A))) * msk[..., None]  # [N, T, F], the same contexts
    n = msk.sum()
    np.testing.assert_allclose(data.density, (Z > 0).sum((0, 1)) / n, atol=2 / n)
    live = np.flatnonzero(data.density > 0)
    assert len(live) > 200
    np.testing.assert_allclose(data.max_act[live], Z.max((0, 1))[live], rtol=2e-3, atol=2e-3)
    for f in live[:50]:  # the top example is anchored on the token of the feature's maximum
        c, t = np.unravel_index(np.argmax(Z[..., f]), Z.shape[:2])
        L = cfg.left_
        assert data.top_tokens[f, 0, L] == tok[c, t] or np.isclose(
            Z[..., f].max(), np.sort(Z[..., f].ravel())[-2], rtol=1e-3)  # near-tie
    vocab = np.unique(data.top_tokens[data.top_tokens >= 0])
    vocab = np.setdiff1d(vocab, [lm.tokenizer.bos_id, lm.tokenizer.eos_id, lm.tokenizer.pad_id])
    le = logit_effects(lm, sae, live[:20], k=10, vocab=vocab)
    agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(le.top_ids, data.logit_top_ids[live[:20]])])
    assert agree > 0.9
    assert np.isfinite(data.map_xy[live]).all() and data.cluster.max() >= 1
    assert len(data.local_maps) == 1 and data.local_maps[0].ids[0] == 0
    assert all(data.labels[f] for f in live)
    save_atlas(data, tmp_path / "atlas.npz")
    from jsae.analysis.atlas.site import write_site

    assert write_site(tmp_path / "site", data, progress=False).exists()
