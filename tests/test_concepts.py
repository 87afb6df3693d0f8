"""Concepts: example files, per-example codes, AUROC / precision / recall against sklearn, and a
contrastive search that finds a feature planted to fire on one token."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_steering_helpers import TinyModel, random_sae

from jsae import concepts
from jsae.concepts import ExampleError, auroc, binary_metrics, read_examples
from jsae.models.transformer import forward
from jsae.sae import encode

HOOK0 = "blocks.0.hook_resid_pre"  # the (scaled) token embedding: a feature can be wired to a token
HOOK1 = "blocks.1.hook_resid_post"
PLANT, TOKEN_CHAR = 7, "Z"


def test_auroc_and_binary_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    s = np.round(rng.normal(size=(200, 5)) + 0.8 * y[:, None] * np.arange(5), 1)  # ties on purpose
    s[:, 0] = 0.0  # all tied: 0.5
    got = auroc(s, y)
    ref = [metrics.roc_auc_score(y, s[:, j]) for j in range(5)]
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert got[0] == 0.5 and auroc(s[:, 4], y) == pytest.approx(ref[4])
    # fixed numbers: positives 0.9, 0.4; negatives 0.4, 0.1 -> pairs won 3 + one tie (0.5) of 4
    assert auroc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    pred = s[:, 3] > 1.0
    m = binary_metrics(pred, y)
    assert m["precision"] == pytest.approx(metrics.precision_score(y, pred))
    assert m["recall"] == pytest.approx(metrics.recall_score(y, pred))
    assert m["f1"] == pytest.approx(metrics.f1_score(y, pred))
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == 200
    assert binary_metrics([0, 0, 0], [1, 0, 1])["precision"] == 0.0  # zero_division=0
    with pytest.raises(ExampleError, match="positive and negative"):
        auroc([0.1, 0.2], [1, 1])


def test_read_examples_txt_jsonl_and_errors(tmp_path):
    f = tmp_path / "pos.txt"
    f.write_text("first example\n\n# a comment\n  second one  \n")
    ex = read_examples(f)
    assert ex.texts == ["first example", "second one"] and ex.origins == [f"{f}:1", f"{f}:4"]
    j = tmp_path / "neg.jsonl"
    j.write_text('{"text": "a"}\n{"text": "b", "label": 0}\n')
    assert read_examples(j).texts == ["a", "b"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ExampleError, match=r"empty\.txt: no examples"):
        read_examples(tmp_path / "empty.txt")
    j.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ExampleError, match=r"neg\.jsonl:2: expected an object with a string field 'text'"):
        read_examples(j)
    j.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ExampleError, match=r"neg\.jsonl:2: not valid JSON"):
        read_examples(j)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        concepts.as_examples(str(tmp_path / "nope.txt"))
    with pytest.raises(ExampleError, match=r"positive\[1\]"):
        concepts.as_examples(["ok", "  "], "positive")


def _planted():
    """A tiny LM and a ReLU SAE over its embeddings where feature PLANT fires on TOKEN_CHAR only."""
    model = TinyModel()
    tok = model.tokenizer
    vocab = np.arange(3, model.cfg.vocab_size)
    acts = forward(model.cfg, model.params, jnp.asarray(np.r_[2, vocab][None]), capture=(HOOK0,)).activations[HOOK0]
    acts = np.asarray(acts)[0, 1:]  # [V-3, D], one row per token (resid_pre of layer 0 has no context)
    sae = random_sae("relu", model.cfg.d_model, 40, sample=acts)
    p = dict(sae.params)
    x_n = acts * float(sae.norm_scale) - np.asarray(p["b_dec"])
    t = tok.encode(TOKEN_CHAR, add_bos=False)[0] - 3
    u = x_n[t] / np.linalg.norm(x_n[t])
    proj = x_n @ u
    others = np.delete(proj, t)
    assert proj[t] > others.max() + 0.1
    p["W_enc"] = p["W_enc"].at[:, PLANT].set(jnp.asarray(u, jnp.float32))
    p["b_enc"] = p["b_enc"].at[PLANT].set(-float(proj[t] + others.max()) / 2)
    return model, sae.replace(params=p)


def _texts(rng, n, with_token):
    letters = list("abcdefghijklmnopqrstuvwxy ")
    out = []
    for _ in range(n):
        s = "".join(rng.choice(letters, int(rng.integers(8, 30))))
        if with_token:
            i = int(rng.integers(0, len(s)))
            s = s[:i] + TOKEN_CHAR + s[i:]
        out.append(s.strip() or "q")
    return out


def test_example_codes_match_numpy_and_several_hooks_share_one_pass():
    model, sae0 = _planted()
    sae1 = random_sae("topk", model.cfg.d_model, 24, k=3, seed=3)
    texts = ["hello there", "a much longer example text with spaces", "Zz", "x" * 50]
    calls = []

    def counting_forward(*a, **kw):
        calls.append(kw.get("capture"))
        return forward(*a, **kw)

    res = concepts.example_codes(model, {HOOK0: sae0, HOOK1: sae1}, texts, batch_size=3,
                                 context_length=40, active=True, forward=counting_forward)
    assert len(calls) == 2 and all(c == (HOOK0, HOOK1) for c in calls)  # one forward per batch
    for hook, sae in ((HOOK0, sae0), (HOOK1, sae1)):
        c = res[hook]
        for i, t in enumerate(texts):
            ids = np.asarray(model.tokenizer.encode(t))[:40]
            a = forward(model.cfg, model.params, jnp.asarray(ids[None]), capture=(hook,)).activations[hook]
            z = np.asarray(encode(sae, a))[0, 1:]  # BOS not counted
            np.testing.assert_allclose(c.max[i], z.max(0), atol=1e-5)
            np.testing.assert_allclose(c.mean[i], z.mean(0), atol=1e-5)
            np.testing.assert_array_equal(c.count[i], (z > 0).sum(0))
            assert c.n_tokens[i] == len(ids) - 1 and len(c.ids[i]) == len(ids)
            got = {tuple(r) for r in c.active[i]}
            assert got == {(p + 1, f) for p, f in np.argwhere(z > 0)}
    assert res[HOOK0].count[2, PLANT] == 1 and res[HOOK0].max[0, PLANT] == 0


def test_overlong_examples_are_truncated_and_named(capsys):
    model, sae = _planted()
    ex = concepts.as_examples(["short", "y" * 100], "positive")
    msgs = []
    res = concepts.example_codes(model, sae, ex, hook=HOOK0, context_length=32, log=msgs.append)
    assert len(msgs) == 1 and "positive[1] (101 tokens)" in msgs[0] and "truncated" in msgs[0]
    assert res[HOOK0].n_tokens.tolist() == [5, 31]


def test_contrast_finds_the_planted_feature_first():
    pytest.importorskip("sklearn")
    model, sae = _planted()
    rng = np.random.default_rng(0)
    pos, neg = _texts(rng, 24, True), _texts(rng, 24, False)
    for reduce in ("max", "mean"):
        c = concepts.contrast(model, {HOOK0: sae}, pos, neg, reduce=reduce, probe_features=3)[HOOK0]
        assert c.ranking("auroc", 3)[0] == PLANT and c.auroc[PLANT] == 1.0
        assert c.ranking("diff", 3)[0] == PLANT and c.diff[PLANT] == 1.0
        assert c.rate_pos[PLANT] == 1.0 and c.rate_neg[PLANT] == 0.0
        assert c.probe is not None and c.probe.features[0] == PLANT and len(c.probe.features) <= 3
        assert c.probe.train_accuracy == 1.0
        assert c.examples.texts[c.best_example(PLANT)] in pos
    with pytest.raises(ExampleError, match="the negative set is empty|no examples"):
        concepts.contrast(model, {HOOK0: sae}, pos, [])


def test_average_ranks_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = np.round(np.random.default_rng(3).normal(size=(40, 6)), 1)
    x[:, 0] = 1.0
    np.testing.assert_allclose(concepts.average_ranks(x), stats.rankdata(x, axis=0))
    np.testing.assert_allclose(concepts.average_ranks([3, 1, 3, 2]), [3.5, 1, 3.5, 2])


def test_shipped_example_sets_are_balanced_and_disjoint():
    assert concepts.example_sets() == ["bridges", "flattery", "scam_emails"]
    for name in concepts.example_sets():
        tr_p, tr_n = concepts.example_set(name, "train")
        te_p, te_n = concepts.example_set(name, "test")
        assert len(tr_p) == len(tr_n) >= 50 and len(te_p) == len(te_n) >= 18
        train, test = set(tr_p.texts + tr_n.texts), set(te_p.texts + te_n.texts)
        assert not train & test and not set(tr_p.texts) & set(tr_n.texts)
        assert all(len(t) < 400 for t in train | test)
    assert (concepts.EXAMPLES_DIR / "LICENSE").read_text().count("CC0") >= 1
    with pytest.raises(ExampleError, match="shipped: bridges"):
        concepts.example_set("nope")
