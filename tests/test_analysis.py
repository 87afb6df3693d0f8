"""Analysis against brute-force NumPy: top-activating contexts, logit effects, feature search,
and snippet rendering."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_steering_helpers import TinyModel, TinyTokenizer, random_sae

from jsae.analysis import (
    TopActivations,
    highlight,
    logit_effects,
    rank_scores,
    render_snippet,
    render_snippets,
    search_features,
    token_pieces,
    top_activations,
)
from jsae.models.transformer import forward
from jsae.sae import encode

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup():
    model = TinyModel()
    rng = np.random.default_rng(0)
    contexts = rng.integers(3, 97, (11, 12)).astype(np.int32)
    contexts[:, 0] = 2  # BOS
    contexts[-1, 9:] = 0  # padding at the end of the last context
    acts = np.asarray(forward(model.cfg, model.params, jnp.asarray(contexts), capture=(HOOK,)).activations[HOOK])
    sae = random_sae("relu", model.cfg.d_model, 40, sample=acts.reshape(-1, model.cfg.d_model))
    z = np.asarray(encode(sae, jnp.asarray(acts)), np.float64)  # [N, T, F]
    return model, sae, contexts, z


def _reference(z, mask, top_n):
    zm = np.where(mask[..., None], z, 0.0)
    ctx_max = zm.max(1).T  # [F, N]
    ctx_pos = zm.argmax(1).T
    order = np.argsort(-ctx_max, axis=1, kind="stable")[:, :top_n]
    vals = np.take_along_axis(ctx_max, order, 1)
    pos = np.take_along_axis(ctx_pos, order, 1)
    n = mask.sum()
    return vals, order, pos, (zm > 0).sum((0, 1)) / n, zm.sum((0, 1)) / n


def test_top_activations_match_brute_force(setup):
    model, sae, contexts, z = setup
    mask = ~np.isin(contexts, [0, 2])
    top = top_activations(model, sae, HOOK, contexts, top_n=4, batch_size=3)  # 11 = 3+3+3+2: padded batch
    vals, ctx, pos, freq, mean = _reference(z, mask, 4)
    np.testing.assert_allclose(top.values, vals, rtol=1e-4, atol=1e-5)
    live = vals > 0
    np.testing.assert_array_equal(top.context[live], ctx[live])
    np.testing.assert_array_equal(top.position[live], pos[live])
    assert (top.context[~live] == -1).all()
    np.testing.assert_allclose(top.frequency, freq, rtol=1e-6)
    np.testing.assert_allclose(top.mean, mean, rtol=1e-4, atol=1e-6)
    assert top.n_tokens == mask.sum()
    assert live.any() and (~mask[top.context[live], top.position[live]]).sum() == 0  # never BOS/pad


def test_top_activations_subset_custom_mask_and_roundtrip(setup, tmp_path):
    model, sae, contexts, z = setup
    mask = np.zeros(contexts.shape, bool)
    mask[:, 5:8] = True
    feats = [7, 3, 30]
    top = top_activations(model, sae, HOOK, contexts, mask, features=feats, top_n=3, batch_size=4)
    vals, ctx, pos, freq, _ = _reference(z[..., feats], mask, 3)
    np.testing.assert_allclose(top.values, vals, rtol=1e-4, atol=1e-5)
    assert ((top.position[top.values > 0] >= 5) & (top.position[top.values > 0] < 8)).all()
    assert top.examples(3)[0] == (int(ctx[1, 0]), int(pos[1, 0]), pytest.approx(float(vals[1, 0]), rel=1e-4))
    top.save(tmp_path / "t.npz")
    back = TopActivations.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.context, top.context)
    assert back.n_tokens == top.n_tokens
    with pytest.raises(KeyError):
        top.row(5)


def test_logit_effects_match_numpy(setup):
    model, sae, _, _ = setup
    feats = [0, 9, 33]
    le = logit_effects(model, sae, feats, k=5)
    W = np.asarray(sae.params["W_dec"], np.float64)[feats] / float(sae.norm_scale)
    W = W * np.asarray(model.params["final_norm"]["scale"], np.float64)
    logits = W @ np.asarray(model.params["embed"], np.float64).T
    np.testing.assert_array_equal(le.top_ids, np.argsort(-logits, 1)[:, :5])
    np.testing.assert_array_equal(le.bottom_ids, np.argsort(logits, 1)[:, :5])
    np.testing.assert_allclose(le.top_values, -np.sort(-logits, 1)[:, :5], rtol=1e-4)
    np.testing.assert_allclose(le.bottom_values, np.sort(logits, 1)[:, :5], rtol=1e-4)


def test_search_features_ranks_by_activation_on_the_text(setup):
    model, sae, _, _ = setup
    text = "golden gate"
    res = search_features(model, sae, HOOK, text, k=5, rank="max")
    ids = np.asarray(model.tokenizer.encode(text))
    acts = forward(model.cfg, model.params, jnp.asarray(ids[None]), capture=(HOOK,)).activations[HOOK]
    z = np.asarray(encode(sae, acts))[0, 1:]  # BOS excluded
    expected = np.argsort(-z.max(0), kind="stable")[:5]
    np.testing.assert_array_equal(res.features, expected)
    np.testing.assert_allclose(res.text_max, z.max(0)[expected], rtol=1e-5)
    assert res.codes.shape == (len(ids), 5) and not res.counted[0]


def test_rank_specific_prefers_rare_features_near_their_peak():
    corpus = TopActivations(
        features=np.arange(3), values=np.array([[5.0], [5.0], [5.0]]), context=np.zeros((3, 1), int),
        position=np.zeros((3, 1), int), frequency=np.array([0.5, 0.001, 0.001]), mean=np.zeros(3), n_tokens=10_000)
    text_max = np.array([5.0, 4.0, 1.0])
    s = rank_scores(text_max, text_max, corpus, "specific")
    assert s[1] > s[0] and s[1] > s[2]  # rare + near peak beats common or weak
    np.testing.assert_allclose(s, [1.0 * np.log10(2), 0.8 * 3, 0.2 * 3])
    with pytest.raises(ValueError):
        rank_scores(text_max, text_max, None, "specific")


class _SpaceTokenizer:
    """Word-level tokenizer whose lone-token decode drops the leading space (as SentencePiece)."""

    bos_id, pad_id, eos_id = 0, None, None
    words = ["<bos>", "The", " Golden", " Gate", " Bridge", " is", "\n", " red"]

    def decode(self, ids):
        return "".join(self.words[i] for i in ids if i != 0).lstrip(" ")


def test_token_pieces_and_snippets():
    tok = _SpaceTokenizer()
    ids = [0, 1, 2, 3, 4, 5, 7, 6]
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[3] == " Gate"  # keeps the space a lone decode would drop
    assert render_snippet(tok, ids, 3, left=2, right=1) == "The Golden« Gate» Bridge"
    assert render_snippet(tok, ids, 7, left=1, right=3) == " red«⏎»"
    ansi = render_snippet(tok, ids, 3, left=0, right=0, style="ansi")
    assert ansi.startswith("\x1b[") and " Gate" in ansi and ansi.endswith("\x1b[0m")
    top = TopActivations(np.array([4]), np.array([[3.5, 1.25, 0.0]]), np.array([[1, 0, -1]]),
                         np.array([[2, 3, 0]]), np.zeros(1), np.zeros(1), 10)
    ctxs = np.array([ids, [0, 2, 3, 4, 5, 1, 6, 7]])
    lines = render_snippets(tok, ctxs, top, 4, left=1, right=1)
    assert lines == ["   3.50  Golden« Gate» Bridge", "   1.25   Golden« Gate» Bridge"]
    assert highlight(pieces, [(2, 5)], labels=["f1"]) == "The« Golden Gate Bridge»[f1] is red\n"


def test_tiny_tokenizer_pieces_roundtrip():
    tok = TinyTokenizer()
    ids = tok.encode("hello world")
    assert "".join(token_pieces(tok, ids)) == tok.decode(ids) == "hello world"
