"""Sparse probing (`jsae bench --only probing`): the logistic probe against sklearn, SAEBench's
top-k selection and task layout against direct Python, pooled activations against one forward
per text, and the measure on a tiny run where a planted feature is the concept."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_concepts import HOOK0, HOOK1, PLANT, _planted, _texts
from test_steering_helpers import random_sae

from jsae import cli
from jsae.bench import _logistic, probing


@pytest.mark.parametrize("n, d, scale", [(120, 8, 1.0), (60, 150, 3.0)])  # d < n and d > n (row space)
def test_logistic_probe_matches_sklearn(n, d, scale):
    lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(d)
    x = rng.normal(size=(n, d)) * scale + 0.5
    y = x @ rng.normal(size=d) + rng.normal(size=n) * scale * 2 > 0
    coef, b = _logistic.fit_logistic(x, y, C=1.0)
    ref = lm.LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(x, y)
    np.testing.assert_allclose(coef, ref.coef_[0], atol=1e-5 * np.abs(ref.coef_[0]).max())
    assert b == pytest.approx(ref.intercept_[0], abs=1e-4)
    xt = rng.normal(size=(200, d)) * scale
    yt = rng.random(200) < 0.5
    assert _logistic.accuracy(coef, b, xt, yt) == pytest.approx(float(np.mean(ref.predict(xt) == yt)), abs=0.01)
    # separable data: the penalty keeps the weights finite and the training rows right
    xs = np.r_[rng.normal(2, 1, (30, 3)), rng.normal(-2, 1, (30, 3))]
    ys = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    c2, b2 = _logistic.fit_logistic(xs, ys)
    assert np.isfinite(c2).all() and _logistic.accuracy(c2, b2, xs, ys) == 1.0


def test_probe_accuracy_standardises_on_the_training_rows():
    lm = pytest.importorskip("sklearn.linear_model")
    pre = pytest.importorskip("sklearn.preprocessing")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(90, 6)) * [1e-3, 1e-2, 1.0, 10.0, 1e3, 0.0] + 2.0  # last column constant
    w = np.array([400.0, -50.0, 1.0, 0.1, 1e-3])
    s = x[:, :5] @ w + rng.normal(size=90)
    y = s > np.median(s)
    xt = rng.normal(size=(70, 6)) * [1e-3, 1e-2, 1.0, 10.0, 1e3, 0.0] + 2.0
    yt = xt[:, :5] @ w > np.median(s)
    sc = pre.StandardScaler().fit(x)
    ref = lm.LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(sc.transform(x), y)
    got = probing.probe_accuracy(x, y, xt, yt)
    assert got == pytest.approx(float(np.mean(ref.predict(sc.transform(xt)) == yt)), abs=1.5 / 70)
    assert probing.probe_accuracy(x * 1e-4, y, xt * 1e-4, yt) == pytest.approx(got)  # units do not matter


def test_top_k_mean_diff_is_saebench_selection():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = rng.random(40) < 0.5
    x[y, 3] += 5.0
    x[y, 7] -= 3.0  # a large negative difference counts (absolute value)
    diffs = [abs(np.mean([r[j] for r, t in zip(x, y) if t]) - np.mean([r[j] for r, t in zip(x, y) if not t]))
             for j in range(12)]
    ref = sorted(range(12), key=lambda j: -diffs[j])[:4]
    assert _logistic.top_k_mean_diff(x, y, 4).tolist() == ref and ref[:2] == [3, 7]


def test_tasks_binary_and_one_vs_rest_balanced():
    three = {c: ([f"{c}{i}" for i in range(10)], [f"{c}t{i}" for i in range(4)]) for c in "abc"}
    rows = [t for c in "abc" for t in three[c][0]]
    ts = probing.tasks(three, 0, seed=1)
    assert [t[0] for t in ts] == ["a", "b", "c"]
    for c, idx, y in ts:
        pos = [rows[i] for i, v in zip(idx, y) if v]
        neg = [rows[i] for i, v in zip(idx, y) if not v]
        assert sorted(pos) == sorted(three[c][0]) and len(neg) == 10 and len(set(neg)) == 10
        assert all(r[0] != c for r in neg)
        counts = [sum(r[0] == o for r in neg) for o in "abc" if o != c]
        assert max(counts) <= 5  # drawn evenly: ceil(10 / 2) per other class
    test_rows = [t for c in "abc" for t in three[c][1]]
    for _, idx, y in probing.tasks(three, 1, seed=1):
        assert all(test_rows[i].startswith(tuple("abc")) for i in idx) and sum(y) == 4 and len(y) == 8
    two = {"p": (["x"] * 3, ["y"]), "n": (["z"] * 2, ["w"] * 2)}
    (name, idx, y), = probing.tasks(two, 0, seed=0)
    assert name == "p" and idx == [0, 1, 2, 3, 4] and y == [True] * 3 + [False] * 2


class _Run:
    def __init__(self, model, sae, hook):
        self.model, self.sae, self.hook = model, sae, hook


def test_pooled_means_match_one_forward_per_text():
    from jsae.models.transformer import forward
    from jsae.sae import encode

    model, _ = _planted()
    sae = random_sae("topk", model.cfg.d_model, 24, k=3)
    texts = ["abc de", "x", "a much longer text of several words here", "Zz Z z"]
    llm, codes = probing.pooled(_Run(model, sae, HOOK1), texts, context_length=20, batch_size=3)
    assert llm.shape == (4, model.cfg.d_model) and codes.shape == (4, 24)
    for i, t in enumerate(texts):
        ids = np.asarray(model.tokenizer.encode(t))[:20]
        a = np.asarray(forward(model.cfg, model.params, jnp.asarray(ids[None]), capture=(HOOK1,)).activations[HOOK1])[0]
        keep = ids != model.tokenizer.bos_id
        np.testing.assert_allclose(llm[i], a[keep].mean(0), rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(codes[i], np.asarray(encode(sae, jnp.asarray(a)))[keep].mean(0), rtol=2e-4, atol=1e-5)


@pytest.fixture
def tiny_run(monkeypatch, tmp_path):
    import jsae.models
    from jsae.config import RunConfig, dump
    from jsae.sae.io import save_sae

    model, sae = _planted()
    cfg = RunConfig()
    cfg.model.name = "tiny-test-model"
    cfg.model.hooks = [HOOK0]
    dump(cfg, tmp_path / "config.yaml")
    save_sae(sae, tmp_path / "saes" / HOOK0, metadata={"hook_name": HOOK0})
    monkeypatch.setattr(jsae.models, "load", lambda name, dtype="float32": model)
    rng = np.random.default_rng(3)

    def fake(names, n_train, n_test, seed):  # the planted feature fires on "Z": one dataset is about it
        z = {"positive": (_texts(rng, n_train, True), _texts(rng, n_test, True)),
             "negative": (_texts(rng, n_train, False), _texts(rng, n_test, False))}
        three = {c: ([c * 3 + t for t in _texts(rng, n_train, False)], [c * 3 + t for t in _texts(rng, n_test, False)])
                 for c in ("k", "m", "q")}
        return {"toy/has_z": z, "toy/prefix": three}

    monkeypatch.setattr(probing, "load_datasets", fake)
    return tmp_path


def test_bench_probing_on_a_tiny_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", str(tiny_run), "--only", "probing", "--out", str(out), "--probing-k", "1,2",
                     "--probing-train", "24", "--probing-test", "16", "--json", str(tmp_path / "s.json")]) == 0
    doc = json.loads((out / "sparse_probing.json").read_text())
    assert doc["eval_type_id"] == "sparse_probing"
    m = doc["eval_result_metrics"]
    assert set(m["llm"]) == {"llm_test_accuracy", "llm_top_1_test_accuracy", "llm_top_2_test_accuracy"}
    assert set(m["sae"]) == {"sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy"}
    det = {d["dataset_name"]: d for d in doc["eval_result_details"]}
    assert set(det) == {"toy/has_z", "toy/prefix"}
    assert det["toy/has_z"]["sae_top_1_test_accuracy"] == 1.0  # the planted feature alone separates it
    un = doc["eval_result_unstructured"]
    assert un["top_features"]["toy/has_z/positive"][0] == PLANT
    assert set(un["toy/prefix_results"]["sae_top_1_test_accuracy"]) == {"k", "m", "q"}
    for key in m["sae"]:  # metrics = mean over datasets of the mean over tasks
        assert m["sae"][key] == pytest.approx(np.mean([d[key] for d in det.values()]))
        per = un["toy/prefix_results"][key]
        assert det["toy/prefix"][key] == pytest.approx(np.mean(list(per.values())))
    assert doc["eval_config"]["k_values"] == [1, 2]
    assert "sparse_probing" in json.loads((tmp_path / "s.json").read_text())["measures"]["probing"]["eval_type_id"]


@pytest.mark.parametrize("argv, needle", [
    (["--probing-k", "0,2"], "--probing-k must be comma-separated integers >= 1"),
    (["--probing-datasets", "language,nope"], "--probing-datasets: unknown value(s) nope"),
    (["--probing-train", "1"], "--probing-train must be >= 2"),
])
def test_bench_probing_bad_options_are_one_line(tiny_run, tmp_path, capsys, argv, needle):
    rc = cli.main(["bench", str(tiny_run), "--only", "probing", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and needle in err[-1], err
    assert not (tmp_path / "o").exists()


def test_offline_datasets_are_disjoint_and_seeded():
    try:
        d = probing.load_datasets(["language", "source", "concepts"], 20, 10, seed=4)
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"offline corpus not installed: {e}")
    assert set(d) >= {"wikipedia_summaries/language", "offline_corpus/source", "jsae_examples/bridges"}
    for classes in d.values():
        for tr, te in classes.values():
            assert not set(tr) & set(te)
    lang = d["wikipedia_summaries/language"]
    assert [len(lang[c][0]) for c in ("en", "fr", "es")] == [20, 20, 20]
    again = probing.load_datasets(["language"], 20, 10, seed=4)["wikipedia_summaries/language"]
    assert again["fr"] == lang["fr"]
    assert probing.load_datasets(["language"], 20, 10, seed=5)["wikipedia_summaries/language"]["fr"] != lang["fr"]
    from jsae.config import ConfigError

    with pytest.raises(ConfigError, match=r"--probing-train / --probing-test: summaries in es has \d+ texts"):
        probing.load_datasets(["language"], 6000, 1000, seed=0)
