"""Languages: monolinguality and the class rule on fixed numbers, Jaccard overlaps against Python
sets, article matching on the real offline corpus, and `jsae languages` on a tiny model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_concepts import HOOK0, HOOK1, PLANT, _planted

from jsae import cli
from jsae.analysis import languages as lg


def test_monolinguality_and_classes_on_fixed_numbers():
    rates = np.array([[0.10, 0.30, 0.08, 0.0, 0.2, 0.05],
                      [0.10, 0.02, 0.01, 0.0, 0.0, 0.05],
                      [0.10, 0.01, 0.01, 0.0, 0.1, 0.0005]])
    counts = np.array([90, 50, 40, 0, 60, 3])
    m = lg.monolinguality(rates)
    np.testing.assert_allclose(m[[0, 1, 2, 4]], [1 / 3, 0.30 / 0.33, 0.08 / 0.10, 0.2 / 0.3])
    assert np.isnan(m[3])
    cls = lg.classify(rates, counts, specific=0.8, shared=0.2, min_count=5)
    # even; 91% in en; exactly 0.8 (>= is specific); never fired; absent in fr (partial); too rare
    assert cls.tolist() == ["shared", "specific", "specific", "rare", "partial", "rare"]
    # the stated rule, written out with NumPy for random rates
    rng = np.random.default_rng(0)
    r = rng.random((3, 500)) ** 3
    r[:, :50] = 0
    c = rng.integers(0, 20, 500)
    c[:40] = 0  # counts agree with zero rates (10 columns disagree: never-firing is rare anyway)
    got = lg.classify(r, c, specific=0.7, shared=0.25, min_count=4)
    mono = r.max(0) / np.maximum(r.sum(0), 1e-300)
    ref = np.where((c < 4) | (r.max(0) == 0), "rare", np.where(mono >= 0.7, "specific",
                   np.where(r.min(0) >= 0.25 * r.max(0), "shared", "partial")))
    assert (got == ref).all() and len(set(got)) == 4


def test_jaccard_and_derangement():
    rng = np.random.default_rng(1)
    a, b = rng.random((30, 40)) < 0.2, rng.random((30, 40)) < 0.3
    a[0] = b[0] = False
    ref = [len(set(np.flatnonzero(x)) & set(np.flatnonzero(y))) / max(len(set(np.flatnonzero(x)) | set(np.flatnonzero(y))), 1)
           for x, y in zip(a, b)]
    ref[0] = 1.0
    np.testing.assert_allclose(lg.jaccard(a, b), ref)
    for n in (2, 3, 17):
        p = lg.derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n)) and (p != np.arange(n)).all()


def _years(t):
    return set(re.findall(r"\b1[0-9]{3}\b|\b20[0-9]{2}\b", t))


def test_parallel_articles_match_across_en_fr_es_on_the_offline_corpus():
    try:
        arts = lg.parallel_articles(("en", "fr", "es"))
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"offline corpus not installed: {e}")
    assert len(arts) >= 1000 and len({a.title for a in arts}) == len(arts)
    by = {a.title: a for a in arts}
    assert "Freud" in by["Sigmund Freud"].texts["fr"] and "Freud" in by["Sigmund Freud"].texts["es"]
    assert "psicoan" in by["Sigmund Freud"].texts["es"] and "psychanal" in by["Sigmund Freud"].texts["fr"]
    assert len(lg.parallel_articles(("en", "fr"))) > len(arts)
    # independent check that matched texts are about the same thing: they share years (dates of
    # birth, founding, ...) far more often than an article and an unrelated one
    perm = lg.derangement(len(arts))
    same = np.mean([bool(_years(a.texts["en"]) & _years(a.texts["es"])) for a in arts])
    other = np.mean([bool(_years(a.texts["en"]) & _years(arts[p].texts["es"])) for a, p in zip(arts, perm)])
    assert same > 0.15 and same > 10 * other, (same, other)  # measured 0.21 vs 0.004
    first = lg.parallel_articles(("en", "fr", "es"), 5, seed=3)
    assert [a.title for a in first] == [a.title for a in lg.parallel_articles(("en", "fr", "es"), 5, seed=3)]


def _fake_articles():
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnop ")
    arts = []
    for i in range(12):
        base = "k" + "".join(rng.choice(letters, 20)) + "k"
        texts = {"en": base + "Z" + base[:5], "fr": base[::-1] + "qr", "es": base + "st"}
        arts.append(lg.ParallelArticle(f"t{i}", {k: v.strip() for k, v in texts.items()}))
    return arts


def test_analyse_languages_matches_direct_computation():
    from jsae.concepts import example_codes

    model, sae = _planted()
    arts = _fake_articles()
    rep = lg.analyse_languages(model, {HOOK0: sae}, arts, batch_size=5, min_count=1)
    r = rep.hooks[HOOK0]
    assert r.classes[PLANT] == "specific" and r.monolinguality[PLANT] == 1.0 and r.rates[0, PLANT] > 0
    langs = ["en", "fr", "es"]
    for li, lang in enumerate(langs):
        c = example_codes(model, sae, [a.texts[lang] for a in arts], hook=HOOK0, active=True)[HOOK0]
        np.testing.assert_allclose(r.rates[li], c.count.sum(0) / c.n_tokens.sum(), atol=1e-12)
        np.testing.assert_array_equal(r.active[li], c.max > 0)
    perm = lg.derangement(len(arts), 0)
    a, b = r.active[0], r.active[2]
    e = r.overlap["pairs"]["en-es"]["all"]
    assert e["parallel"] == pytest.approx(lg.jaccard(a, b).mean())
    assert e["unrelated"] == pytest.approx(lg.jaccard(a, b[perm]).mean())
    # distinct tokens: drop positions whose token occurs in the partner text, by hand
    ca = example_codes(model, sae, [x.texts["en"] for x in arts], hook=HOOK0, active=True)[HOOK0]
    cb = example_codes(model, sae, [x.texts["es"] for x in arts], hook=HOOK0, active=True)[HOOK0]
    vals = []
    for k in range(len(arts)):
        ia, ib = ca.ids[k], cb.ids[k]
        sa = {int(f) for p, f in ca.active[k] if ia[p] not in set(ib[1:].tolist())}
        sb = {int(f) for p, f in cb.active[k] if ib[p] not in set(ia[1:].tolist())}
        vals.append(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
    assert r.overlap["pairs"]["en-es"]["distinct_tokens"]["parallel"] == pytest.approx(np.mean(vals))
    assert "en-fr" in r.overlap["pairs"] and rep.n_tokens["en"] == sum(len(a.texts["en"]) for a in arts)
    j = rep.to_json()
    assert j["hooks"][HOOK0]["top_specific"][0]["monolinguality"] == 1.0
    assert "parallel articles" in lg.format_report(rep)


@pytest.fixture
def tiny_run(monkeypatch, tmp_path):
    from test_steering_helpers import random_sae

    import jsae.models
    from jsae.config import RunConfig, dump
    from jsae.sae.io import save_sae

    model, sae = _planted()
    cfg = RunConfig()
    cfg.model.name = "tiny-test-model"
    cfg.model.hooks = [HOOK0, HOOK1]
    dump(cfg, tmp_path / "config.yaml")
    save_sae(sae, tmp_path / "saes" / HOOK0, metadata={"hook_name": HOOK0})
    save_sae(random_sae("topk", model.cfg.d_model, 16, k=2), tmp_path / "saes" / HOOK1, metadata={"hook_name": HOOK1})
    monkeypatch.setattr(jsae.models, "load", lambda name, dtype="float32": model)
    monkeypatch.setattr(lg, "parallel_articles", lambda langs, n=None, seed=0: _fake_articles()[:n])
    return tmp_path


def test_languages_cli_writes_table_json_png(tiny_run, capsys):
    d = tiny_run
    assert cli.main(["languages", str(d), "--articles", "8", "--min-count", "1"]) == 0
    out = capsys.readouterr().out
    assert "Jaccard overlap" in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("blocks.0.", "blocks.1.")) and "%" in ln]
    assert len(rows) == 2  # the share of shared / specific features, one row per hook (layer)
    rep = json.loads((d / "languages" / "languages.json").read_text())
    assert rep["n_articles"] == 8 and set(rep["hooks"]) == {HOOK0, HOOK1}
    assert set(rep["hooks"][HOOK0]["overlap"]["pairs"]) == {"en-fr", "en-es", "fr-es"}
    fr = rep["hooks"][HOOK1]["classes"]
    assert fr["n_shared"] + fr["n_specific"] + fr["n_partial"] + fr["n_rare"] == 16
    assert (d / "languages" / "languages.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, needle", [
    (["--langs", "en"], "at least two distinct languages"),
    (["--specific", "0.3"], "--specific must be in (0.333, 1]"),
    (["--shared", "nan"], "--shared must be in (0, 1]"),
    (["--articles", "1"], "--articles must be >= 2"),
])
def test_languages_cli_bad_args_are_one_line(tiny_run, capsys, argv, needle):
    rc = cli.main(["languages", str(tiny_run), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("jsae languages: ") and needle in err[-1], err
