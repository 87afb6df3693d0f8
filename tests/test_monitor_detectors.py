"""Measured detectors: thresholds fitted on labelled texts, held-out metrics, the saved JSON with
the dictionary's hash (refused on another SAE), and `jsae monitor` argument checks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_concepts import HOOK0, PLANT, TOKEN_CHAR, _planted, _texts

from jsae import cli, monitor
from jsae.config import RunConfig, dump
from jsae.sae.io import save_sae


def _f1(pred, y):
    tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def test_fit_thresholds_is_the_best_train_f1_of_one_feature():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.5
    v = np.round(np.abs(rng.normal(size=60) + 1.2 * y), 2)
    (t,) = monitor.fit_thresholds(v[:, None], y)
    brute = max(_f1(v > c, y) for c in np.r_[0.0, np.unique(v)])
    assert _f1(v > t, y) == pytest.approx(brute)
    # two features, each catching half of the positives: the OR rule catches both halves
    y2 = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    a = np.r_[np.ones(10), np.zeros(30)] * 2.0
    b = np.r_[np.zeros(10), np.ones(10), np.zeros(20)] * 3.0
    ta, tb = monitor.fit_thresholds(np.c_[a, b], y2)
    assert 0 <= ta < 2 and 0 <= tb < 3
    assert monitor.fit_thresholds(np.c_[np.zeros(40)], y2) == [None]  # never fires: off


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    model, sae = _planted()
    d = tmp_path_factory.mktemp("run")
    cfg = RunConfig()
    cfg.model.name = "tiny-test-model"
    cfg.model.hooks = [HOOK0]
    dump(cfg, d / "config.yaml")
    save_sae(sae, d / "saes" / HOOK0, metadata={"hook_name": HOOK0})
    rng = np.random.default_rng(1)
    files = {}
    for split, n in (("train", 20), ("test", 16)):
        for lab, flag in (("pos", True), ("neg", False)):
            f = d / f"{split}_{lab}.txt"
            f.write_text("\n".join(_texts(rng, n, flag)) + "\n")
            files[f"{split}_{lab}"] = f
    return d, model, sae, files


@pytest.fixture
def tiny(monkeypatch, planted_run):
    import jsae.models

    d, model, sae, files = planted_run
    monkeypatch.setattr(jsae.models, "load", lambda name, dtype="float32": model)
    return planted_run


def test_detector_fits_measures_saves_and_flags(tiny, tmp_path):
    d, model, sae, files = tiny
    for kind in ("threshold", "probe"):
        det = monitor.fit_detector(model, sae, HOOK0, [PLANT, 3], files["train_pos"], files["train_neg"], kind=kind)
        m = monitor.evaluate_detector(det, model, sae, files["test_pos"], files["test_neg"])
        assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["auroc"] == 1.0, (kind, m)
        assert m["n_pos"] == 16 and m["tp"] + m["fn"] == 16
        path = det.save(tmp_path / f"{kind}.json")
        raw = json.loads(path.read_text())
        assert raw["format"] == "jsae-detector" and raw["sae_sha256"] == monitor.decoder_sha256(sae)
        assert raw["features"] == [PLANT, 3] and raw["hook"] == HOOK0 and raw["test"]["f1"] == 1.0
        back = monitor.Detector.load(path)
        flags, scores, res = monitor.apply_detector(back, model, sae, ["abc Zde", "abcde"])
        assert flags.tolist() == [True, False] and scores[0] > 0 > scores[1]
        out = monitor.render(res, 0)
        assert re.search(rf"«{TOKEN_CHAR}»\[[^\]]*f{PLANT}\b", out), out
    # precomputed codes (as contrast() returns them) give the same detector without a model pass
    from jsae.concepts import contrast

    c = contrast(model, {HOOK0: sae}, files["train_pos"], files["train_neg"], probe_features=0)[HOOK0]
    again = monitor.fit_detector(None, sae, HOOK0, [PLANT, 3], files["train_pos"], files["train_neg"], codes=c.codes)
    plain = monitor.fit_detector(model, sae, HOOK0, [PLANT, 3], files["train_pos"], files["train_neg"])
    assert again.thresholds == plain.thresholds and again.train == plain.train
    # the metrics are the sklearn ones on the detector's own predictions
    metrics = pytest.importorskip("sklearn.metrics")
    from jsae.concepts import example_codes

    det = monitor.fit_detector(model, sae, HOOK0, [3, 5], files["train_pos"], files["train_neg"])
    m = monitor.evaluate_detector(det, model, sae, files["test_pos"], files["test_neg"])
    pos, neg = files["test_pos"].read_text().split("\n")[:-1], files["test_neg"].read_text().split("\n")[:-1]
    v = example_codes(model, sae, pos + neg, hook=HOOK0)[HOOK0].max[:, [3, 5]]
    y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    s = det.scores(v)
    assert m["precision"] == pytest.approx(metrics.precision_score(y, s > 0, zero_division=0))
    assert m["recall"] == pytest.approx(metrics.recall_score(y, s > 0))
    assert m["auroc"] == pytest.approx(metrics.roc_auc_score(y, np.where(np.isfinite(s), s, -1e30)))


def test_detector_refused_on_another_sae(tiny, tmp_path, capsys):
    d, model, sae, files = tiny
    det = monitor.fit_detector(model, sae, HOOK0, [PLANT], files["train_pos"], files["train_neg"])
    other = sae.replace(params={**sae.params, "W_dec": sae.params["W_dec"].at[0, 0].add(1e-3)})
    with pytest.raises(monitor.DetectorMismatchError, match="another dictionary"):
        monitor.apply_detector(det, model, other, "Z")
    with pytest.raises(monitor.DetectorMismatchError, match="hook"):
        monitor.check_detector(det, sae, "blocks.1.hook_resid_post")
    det.sae_sha256 = "0" * 64
    det.save(tmp_path / "bad.json")
    assert cli.main(["monitor", str(d), "--detector", str(tmp_path / "bad.json"), "--text", "Z"]) == 2
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("jsae ")]
    assert len(err) == 1 and "another dictionary" in err[0] and "bad.json" in err[0]


def test_single_class_is_refused(tiny):
    from jsae.concepts import ExampleError

    d, model, sae, files = tiny
    with pytest.raises(ExampleError, match=r"negative: no examples"):
        monitor.fit_detector(model, sae, HOOK0, [PLANT], files["train_pos"], [])


def test_monitor_cli_fits_tests_saves_and_applies(tiny, tmp_path, capsys):
    d, model, sae, files = tiny
    out = tmp_path / "det.json"
    assert cli.main(["monitor", str(d), "--features", f"{PLANT},3", "--train", str(files["train_pos"]),
                     str(files["train_neg"]), "--test", str(files["test_pos"]), str(files["test_neg"]),
                     "--out", str(out), "--text", "xyZ", "--color", "never"]) == 0
    o = capsys.readouterr().out
    assert "test   precision 1.000  recall 1.000  F1 1.000  AUROC 1.000" in o and "FLAGGED" in o
    assert cli.main(["monitor", str(d), "--detector", str(out), "--text", "plain", "--text", "aZa",
                     "--color", "never"]) == 0
    o = capsys.readouterr().out
    assert "[text 0] not flagged" in o and "[text 1] FLAGGED" in o and f"«Z»[f{PLANT}]" in o


@pytest.mark.parametrize("argv, needle", [
    (["--feature", "1", "--threshold", "nan", "--text", "a"], "--threshold must be a finite number"),
    (["--feature", "1", "--threshold", "inf", "--text", "a"], "--threshold must be a finite number"),
    (["--features", "1,x", "--text", "a"], "'x' is not a feature id"),
    (["--feature", "-2", "--text", "a"], "must be >= 0"),
    (["--feature", "999", "--text", "a"], "unknown feature id(s) [999]: the SAE has 40 features"),
    (["--feature", "1", "--feature", "2", "--threshold", "1", "--threshold", "2", "--threshold", "3",
      "--text", "a"], "one per feature (2)"),
    (["--text", "a"], "give --feature/--features"),
    (["--feature", "1"], "give --text or --file"),
    (["--feature", "1", "--test", "a.txt", "b.txt"], "--test needs --train"),
    (["--feature", "1", "--train", "EMPTY", "NEG"], "empty.txt: no examples"),
])
def test_monitor_cli_bad_input_is_one_line(tiny, tmp_path, capsys, argv, needle):
    d, *_ = tiny
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "neg.txt").write_text("abc\n")
    subs = {"EMPTY": tmp_path / "empty.txt", "NEG": tmp_path / "neg.txt"}
    argv = [str(subs.get(a, a)) for a in argv]
    rc = cli.main(["monitor", str(d), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("jsae monitor: ") and needle in err[-1], err
    assert not any(e.startswith("Traceback") for e in err)
