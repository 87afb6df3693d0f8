"""Multilingual concepts (`jsae bench --only languages`): AUROC by ranks against the pairwise
definition, the "works" rule and the cross-lingual count on fixed numbers, name spans, the
lexicon from CLDR, and the measure on a tiny run, where a feature planted on one token works in
every language but is not cross-lingual (the token is shared)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_concepts import HOOK0, PLANT, _planted

from jsae import cli
from jsae.bench import languages as ml


def _pairwise_auroc(s, pos):
    p, n = s[pos], s[~pos]
    return (np.sum(p[:, None] > n[None]) + 0.5 * np.sum(p[:, None] == n[None])) / (len(p) * len(n))


def test_grouped_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    x = np.round(rng.random((30, 6)), 1)  # ties on purpose
    x[:, 5] = 0.0
    g = rng.integers(0, 4, 30)
    got = ml.grouped_auroc(x, g, 4)
    for k in range(4):
        for j in range(6):
            assert got[k, j] == pytest.approx(_pairwise_auroc(x[:, j], g == k))
    assert (got[:, 5] == 0.5).all()


def _fixed_scores():
    """x [C=4, L=3, T=3, F=5]: f0 fires on concept 0 in every language; f1 on concept 1 in
    language 0 only; f2 on everything; f3 never; f4 on concept 2 in languages 0 and 2, and weakly on
    one sentence of concept 3 in language 2."""
    x = np.zeros((4, 3, 3, 5))
    x[0, :, :, 0] = 2.0
    x[1, 0, :, 1] = 1.0
    x[..., 2] = np.random.default_rng(0).random((4, 3, 3)) + 0.5
    x[2, 0, :, 4] = 1.0
    x[2, 2, :, 4] = 1.0
    x[3, 2, 0, 4] = 0.5
    return x


def test_works_rule_and_cross_lingual_count_on_fixed_numbers():
    x = _fixed_scores()
    st = ml.category_stats(x, auroc_min=0.9, max_negative=0.1)
    w = st["works"]
    assert w[0, :, 0].all() and w[:, :, 0].sum() == 3
    assert w[1, 0, 1] and w[:, :, 1].sum() == 1
    assert not w[..., 2].any()  # fires on every concept: too many negatives
    assert not w[..., 3].any() and (st["auroc"][..., 3] == 0.5).all() and (st["pooled"][:, 3] == 0.5).all()
    assert w[2, 0, 4] and not w[2, 2, 4] and st["auroc"][2, 2, 4] == 1.0  # 1 of 9 negatives fires: > 0.1
    assert st["neg_rate"][2, 2, 4] == pytest.approx(1 / 9) and st["neg_rate"][0, 2, 4] == pytest.approx(4 / 9)
    assert st["pos_rate"][2, 2, 4] == 1.0 and st["pos_rate"][3, 2, 4] == pytest.approx(1 / 3)
    w = ml.category_stats(x, auroc_min=0.9, max_negative=0.12)["works"]
    assert w[2, 2, 4] and not w[2, 1, 4]
    # pooled AUROC: concept 0's 9 sentences against the other 27, directly
    xf = x.reshape(36, 5)
    assert st["pooled"][0, 0] == 1.0
    assert st["pooled"][2, 4] == pytest.approx(_pairwise_auroc(xf[:, 4], np.repeat(np.arange(4), 9) == 2))
    # language 0 is English; language 1 shares concept 0's tokens with English, language 2 does not
    distinct = np.ones((4, 3), bool)
    distinct[0, 1] = False
    fc = ml.feature_concepts(w, distinct, en=0, min_distinct=1)
    assert fc["concept"].tolist() == [0, 1, -1, -1, 2]
    assert fc["n_langs"].tolist() == [3, 1, 0, 0, 2]
    assert fc["n_distinct"].tolist() == [1, 0, 0, 0, 1]  # f0: language 1 does not count
    assert fc["cross"].tolist() == [True, False, False, False, True]
    strict = ml.feature_concepts(w, distinct, en=0, min_distinct=2)
    assert not strict["cross"].any()
    distinct[0, 2] = False  # f0 now works only where the tokens are shared: not cross-lingual
    assert not ml.feature_concepts(w, distinct, en=0, min_distinct=1)["cross"][0]
    # the control: permuting concepts per non-English language breaks the correspondence
    ctrl = ml.feature_concepts(ml.derange(w, 0, seed=0), np.ones((4, 3), bool), en=0, min_distinct=1)
    assert not ctrl["cross"][0] and not ctrl["cross"][4]
    d = ml.derange(w, 0, seed=0)
    assert (d[:, 0] == w[:, 0]).all() and (d.sum(0) == w.sum(0)).all()


class _CharMerge:
    """Characters, except "ab" which is one token (to test a token straddling the boundary)."""

    bos_id = 2

    def encode(self, text, add_bos=True):
        out, i = [], 0
        while i < len(text):
            if text[i:i + 2] == "ab":
                out.append(1000)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return [self.bos_id, *out] if add_bos else out


def test_name_span_covers_the_name_and_straddling_tokens():
    tok = _CharMerge()
    ids, a, b = ml.name_span(tok, "Hi ", "Bob", ".")
    assert [chr(i) for i in ids[a:b]] == list("Bob")
    ids, a, b = ml.name_span(tok, "", "Zoa", "b!")  # "a" + "b" of the suffix merge
    assert ids[a:b] == [ord("Z"), ord("o"), 1000]
    ids, a, b = ml.name_span(tok, "xa", "bc", ".")  # the prefix's "a" merges with the name's "b"
    assert ids[a:b] == [1000, ord("c")]


def test_lexicon_names_come_from_cldr():
    pytest.importorskip("babel")
    from jsae.bench import _lexicon as lx

    lex = lx.names(("en", "de", "ja"), ("countries", "months", "weekdays"))
    assert lex["countries"]["FR"] == {"en": "France", "de": "Frankreich", "ja": "フランス"}
    assert lex["months"][1]["en"] == "January" and lex["weekdays"][0]["de"] == "Montag"
    assert len(lex["countries"]) == len(lx.CONCEPTS["countries"]) and len(lex["months"]) == 12
    assert set(lx.TEMPLATES) == set(lx.LANGS)
    for lang, cats in lx.TEMPLATES.items():
        assert set(cats) == set(lx.CATEGORIES), lang
        assert all(len(t) == 3 and all(s.count("{}") == 1 for s in t) for t in cats.values()), lang
    assert lx.sentence("{} est un mois.", "janvier") == ("", "Janvier", " est un mois.")


@pytest.fixture
def tiny_run(monkeypatch, tmp_path):
    import jsae.models
    from jsae.bench import _lexicon
    from jsae.config import RunConfig, dump
    from jsae.sae.io import save_sae

    model, sae = _planted()
    cfg = RunConfig()
    cfg.model.name = "tiny-test-model"
    cfg.model.hooks = [HOOK0]
    dump(cfg, tmp_path / "config.yaml")
    save_sae(sae, tmp_path / "saes" / HOOK0, metadata={"hook_name": HOOK0})
    monkeypatch.setattr(jsae.models, "load", lambda name, dtype="float32": model)
    # concept "z" has a "Z" in every language (the planted feature's token, shared by all)
    lex = {"months": {"z": {"en": "Zed", "fr": "Zoo", "de": "Zap"}, "b": {"en": "bob", "fr": "bee", "de": "bix"},
                      "c": {"en": "cat", "fr": "cim", "de": "cox"}, "d": {"en": "dog", "fr": "dav", "de": "dun"}}}
    monkeypatch.setattr(_lexicon, "names", lambda langs, cats: {c: v for c, v in lex.items() if c in cats})
    return tmp_path, model, sae


def test_bench_languages_on_a_tiny_run(tiny_run, tmp_path):
    from jsae.bench._lexicon import TEMPLATES, sentence
    from jsae.models.transformer import forward
    from jsae.sae import encode

    d, model, sae = tiny_run
    out = tmp_path / "bench"
    assert cli.main(["bench", str(d), "--only", "languages", "--out", str(out), "--languages-langs", "en,fr,de",
                     "--languages-categories", "months"]) == 0
    doc = json.loads((out / "multilingual_concepts.json").read_text())
    assert doc["eval_type_id"] == "multilingual_concepts"
    m = doc["eval_result_metrics"]
    assert set(m) == {"all", "months"} and m["all"]["n_languages"] == 3 and m["all"]["n_concepts"] == 4
    # the planted feature works for "z" in all three languages, on the same token: a concept
    # feature, never a cross-lingual one (the months category's distinct-token share is 0 for "z")
    assert m["all"]["n_concept_features"] >= 1
    top = doc["eval_result_unstructured"]["top_cross_lingual_features"]["months"]
    assert PLANT not in [r["feature"] for r in top]
    claim = doc["eval_result_unstructured"]["claim"]
    assert claim["months"].endswith("does not hold here") and len(claim["languages_by_transfer"]) == 2
    # the scores behind it, for one sentence, against a direct forward
    pre, name, post = sentence(TEMPLATES["fr"]["months"][2], "Zoo")
    ids = np.asarray(model.tokenizer.encode(pre + name + post))
    a = forward(model.cfg, model.params, jnp.asarray(ids[None]), capture=(HOOK0,)).activations[HOOK0]
    z = np.asarray(encode(sae, a))[0]
    _, s0, s1 = ml.name_span(model.tokenizer, pre, name, post)
    assert s1 - s0 == 3 and z[s0:s1, PLANT].max() > 0 and z[s1:, PLANT].max() == 0
    st = ml.category_stats(np.zeros((4, 3, 3, 2)), auroc_min=0.9, max_negative=0.1)
    assert not st["works"].any()
    rows = {r["language"]: r for r in doc["eval_result_details"]}
    assert set(rows) == {"fr", "de"} and 0 <= rows["fr"]["transfer_from_english"] <= 1
    assert "cross_lingual_share_random_directions" not in m["all"]
    assert cli.main(["bench", str(d), "--only", "languages", "--out", str(out), "--languages-langs", "en,fr,de",
                     "--languages-categories", "months", "--languages-baseline"]) == 0
    base = json.loads((out / "multilingual_concepts.json").read_text())
    assert base["eval_result_metrics"]["all"]["n_concept_features"] == m["all"]["n_concept_features"]
    assert 0 <= base["eval_result_metrics"]["months"]["cross_lingual_share_random_directions"] <= 1
    assert "random encoder directions" in base["eval_result_unstructured"]["claim"]["months"]


def test_random_directions_keep_norms_and_everything_else():
    from test_steering_helpers import random_sae

    sae = random_sae("relu", 16, 24, seed=2)
    r = ml.random_directions(sae, seed=0)
    w, rw = np.asarray(sae.params["W_enc"]), np.asarray(r.params["W_enc"])
    np.testing.assert_allclose(np.linalg.norm(rw, axis=0), np.linalg.norm(w, axis=0), rtol=1e-5)
    cos = np.abs((w * rw).sum(0)) / np.linalg.norm(w, axis=0) ** 2
    assert cos.mean() < 0.5  # new directions (random in 16 dimensions)
    for k in sae.params:
        if k != "W_enc":
            np.testing.assert_array_equal(np.asarray(r.params[k]), np.asarray(sae.params[k]))
    assert np.array_equal(np.asarray(ml.random_directions(sae, seed=0).params["W_enc"]), rw)


def test_planted_feature_is_a_concept_feature_but_not_cross_lingual(tiny_run):
    from jsae.bench._texts import reduce_texts

    d, model, sae = tiny_run
    from jsae.bench import _lexicon

    lex = _lexicon.names(("en", "fr", "de"), ("months",))
    s = ml.build_sentences(model.tokenizer, lex, ["en", "fr", "de"])["months"]
    masks = []
    for x, (a, b) in zip(s["ids"], s["spans"]):
        m = np.zeros(len(x), bool)
        m[a:b] = True
        masks.append(m)

    class R:
        pass

    r = R()
    r.model, r.sae, r.hook = model, sae, HOOK0
    import jax

    x = reduce_texts(r, [np.asarray(i) for i in s["ids"]], masks, jax.jit(ml._span_max), batch_size=5)["max"]
    x = x.reshape(4, 3, 3, -1)
    assert (x[0, :, :, PLANT] > 0).all() and (x[1:, :, :, PLANT] == 0).all()
    st = ml.category_stats(x, auroc_min=0.9, max_negative=0.1)
    assert st["works"][0, :, PLANT].all() and st["pooled"][0, PLANT] == 1.0
    distinct = np.array([[not (s["name_tokens"][c, lang] & s["name_tokens"][c, "en"]) for lang in ("en", "fr", "de")]
                         for c in s["concepts"]])
    assert not distinct[0].any()  # "Z" is in every language's name
    fc = ml.feature_concepts(st["works"], distinct, en=0, min_distinct=1)
    assert fc["concept"][PLANT] == 0 and fc["n_langs"][PLANT] == 3 and not fc["cross"][PLANT]


@pytest.mark.parametrize("argv, needle", [
    (["--languages-langs", "fr,de"], "--languages-langs must include en"),
    (["--languages-langs", "en,xx"], "--languages-langs: unknown value(s) xx"),
    (["--languages-categories", "cities"], "--languages-categories: unknown value(s) cities"),
    (["--languages-auroc", "0.4"], "--languages-auroc must be in (0.5, 1]"),
    (["--languages-min-distinct", "0"], "--languages-min-distinct must be in [1, 12]"),
])
def test_bench_languages_bad_options_are_one_line(tiny_run, tmp_path, capsys, argv, needle):
    d, _, _ = tiny_run
    rc = cli.main(["bench", str(d), "--only", "languages", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and needle in err[-1], err
    assert not (tmp_path / "o").exists()


def test_verdict_needs_twice_the_control_and_the_random_directions():
    m = {"n_cross_lingual_features": 10, "n_concept_features": 100, "cross_lingual_share": 0.10,
         "cross_lingual_share_control": 0.04}
    assert ml._verdict("c", m, 1).endswith(": holds")
    assert ml._verdict("c", {**m, "cross_lingual_share_control": 0.06}, 1).endswith("does not hold here")
    assert ml._verdict("c", {**m, "cross_lingual_share_random_directions": 0.05}, 1).endswith(": holds")
    assert ml._verdict("c", {**m, "cross_lingual_share_random_directions": 0.06}, 1).endswith("does not hold here")
    assert ml._verdict("c", {**m, "n_cross_lingual_features": 4}, 1).endswith("does not hold here")
