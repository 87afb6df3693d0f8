"""Autointerp: balanced accuracy and its bootstrap interval against NumPy loops, the context split
and fuzzing marks, then the whole measure through `jsae bench` against scripted OpenAI-compatible
servers on 127.0.0.1 (known replies give known scores; a rerun is answered from the cache) and
against `jsae serve`'s own server on a tiny model (gibberish explanations, real plumbing)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from test_concepts import HOOK0, PLANT, _planted
from test_steering_helpers import TinyModel

from jsae import cli
from jsae.analysis.atlas.explain import (
    DETECT_SYSTEM,
    EXPLAIN_SYSTEM,
    FUZZ_SYSTEM,
    balanced_accuracy,
)
from jsae.bench.autointerp import fuzz_marks, pooled_balanced_accuracy, split_contexts
from jsae.config import RunConfig, dump
from jsae.sae.io import save_sae
from jsae.serve import ChatModel, make_server


def test_balanced_accuracy_and_bootstrap_match_numpy_loops():
    assert balanced_accuracy([1, 1, 0, 0, 0], [1, 0, 0, 0, 1]) == pytest.approx(0.5 * (1 / 2 + 2 / 3))
    assert np.isnan(balanced_accuracy([1, 1], [1, 0]))
    rng = np.random.default_rng(3)
    items = []
    for _ in range(9):
        n = int(rng.integers(2, 12))
        y = rng.random(n) < 0.5
        y[0], y[1] = True, False
        items.append((y, np.where(rng.random(n) < 0.75, y, ~y)))
    got = pooled_balanced_accuracy(items, n_boot=300, seed=5)
    Y = np.concatenate([y for y, _ in items])
    P = np.concatenate([p for _, p in items])
    assert got["balanced_accuracy"] == pytest.approx(0.5 * (np.mean(P[Y]) + np.mean(~P[~Y])))
    assert got["n_features"] == 9 and got["n_items"] == len(Y)
    draws = np.random.default_rng(5).integers(0, 9, (300, 9))
    boot = []
    for d in draws:  # each draw: the chosen features' items concatenated, then the formula
        y = np.concatenate([items[i][0] for i in d])
        p = np.concatenate([items[i][1] for i in d])
        boot.append(0.5 * (np.mean(p[y]) + np.mean(~p[~y])))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert got["ci_low"] == pytest.approx(lo) and got["ci_high"] == pytest.approx(hi)
    assert lo < got["balanced_accuracy"] < hi
    assert np.isnan(pooled_balanced_accuracy([])["balanced_accuracy"])


def test_split_contexts_and_fuzz_marks():
    rng = np.random.default_rng(0)
    z = np.where(rng.random((40, 12)) < 0.08, rng.random((40, 12)) * 5, 0.0)
    thr = 0.05 * z.max()
    sp = split_contexts(z, thr, n_explain=4, n_score=3, rng=np.random.default_rng(1))
    active = np.flatnonzero(z.max(1) > thr)
    strongest = active[np.argsort(-z.max(1)[active])]
    assert len(sp["explain"]) == 4 and len(sp["pos"]) == 3 and len(sp["neg"]) == 3
    assert set(sp["explain"]) <= set(strongest[:5])  # drawn from the top 4 + 3 // 2
    assert (np.diff(z.max(1)[sp["explain"]]) <= 0).all()
    assert not set(sp["explain"]) & set(sp["pos"]) and set(sp["pos"]) <= set(active)
    assert (z[sp["neg"]].max(1) <= thr).all()
    assert split_contexts(np.zeros((5, 4)), 0.0, 4, 3, rng) is None
    act = np.array([0, 1, 1, 0, 0, 0, 1, 0], bool)
    vis = np.array([1, 1, 1, 1, 0, 1, 1, 1], bool)
    m = fuzz_marks(act, vis, np.random.default_rng(2))
    assert m.sum() == 3 and not (m & act).any() and not (m & ~vis).any()
    assert fuzz_marks(act, act, np.random.default_rng(2)).sum() == 0  # nothing inactive to mark


# --- the whole measure on a tiny run ------------------------------------------------------------

LETTERS = list("abcdefghijklmnopqrstuvwxy ")


def _corpus(n=160, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice(LETTERS, int(rng.integers(15, 40))))
        if rng.random() < 0.3:
            i = int(rng.integers(0, len(s)))
            s = s[:i] + "Z" + s[i:]
        out.append(s)
    return out


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A run whose dictionary reads the token embedding (every feature is a set of tokens);
    feature PLANT fires on "Z" only."""
    model, sae = _planted()
    d = tmp_path_factory.mktemp("run")
    cfg = RunConfig()
    cfg.model.name = "tiny-test-model"
    cfg.model.hooks = [HOOK0]
    dump(cfg, d / "config.yaml")
    save_sae(sae, d / "saes" / HOOK0, metadata={"hook_name": HOOK0})
    return d, model


@pytest.fixture
def tiny(monkeypatch, planted_run):
    import jsae.analysis.corpus as corpus
    import jsae.models

    d, model = planted_run
    monkeypatch.setattr(jsae.models, "load", lambda name, dtype="float32": model)
    monkeypatch.setattr(corpus, "offline_texts", lambda n=None, seed=0, sotu=False: _corpus())
    return planted_run


class Scripted(BaseHTTPRequestHandler):
    """Explanation: the marked tokens, sorted. Detection: 1 where an excerpt holds one of them.
    Fuzzing: 1 where every marked token is one of them. ``mode`` "constant": always all 1s for
    detection and all 0s for fuzzing; "nonsense": never a list."""

    log: list = []
    mode = "oracle"

    def do_GET(self):  # noqa: N802
        self._reply({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Scripted.log.append(body)
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system == EXPLAIN_SYSTEM:
            answer = "".join(sorted(set("".join(re.findall(r"<<(.+?)>>", user)))))
        else:
            expl = re.search(r"Feature description: (.*)", user).group(1)
            ex = re.findall(r"Excerpt \d+: (.*)", user)
            if Scripted.mode == "nonsense":
                answer = "I cannot tell."
            elif Scripted.mode == "constant":
                answer = json.dumps([int(system == DETECT_SYSTEM)] * len(ex))
            elif system == DETECT_SYSTEM:
                answer = json.dumps([int(any(c in expl for c in e if c.strip())) for e in ex])
            else:
                assert system == FUZZ_SYSTEM
                marks = [set("".join(re.findall(r"<<(.+?)>>", e))) for e in ex]
                answer = json.dumps([int(bool(m) and m <= set(expl)) for m in marks])
        self._reply({"choices": [{"message": {"role": "assistant", "content": answer}}]})

    def _reply(self, obj):
        out = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def scripted():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _bench(d, out, extra):
    args = ["bench", str(d), "--only", "autointerp", "--out", str(out), "--batch-size", "8",
            "--autointerp-contexts", "48", "--autointerp-context-length", "32",
            "--autointerp-features", "40", "--autointerp-explain-examples", "5",
            "--autointerp-score-examples", "4", "--overwrite", *extra]
    assert cli.main(args) == 0
    return json.loads((out / "autointerp.json").read_text())


def test_measure_against_scripted_servers_and_cache(tiny, scripted, tmp_path):
    d, _ = tiny
    Scripted.mode, Scripted.log[:] = "oracle", []
    cache = tmp_path / "cache"
    extra = ["--autointerp-explainer", scripted, "--autointerp-cache", str(cache)]
    doc = _bench(d, tmp_path / "b1", extra)
    m, rows = doc["eval_result_metrics"], doc["eval_result_details"]
    n = len(rows)
    assert n >= 10 and len(Scripted.log) == 3 * n  # explain, detect, fuzz per feature
    assert doc["eval_result_unstructured"]["requests_sent"] == 3 * n
    assert all(b["model"] == "scripted" for b in Scripted.log)  # from GET /v1/models
    plant = next(r for r in rows if r["latent"] == PLANT)
    assert plant["explanation"] == "Z" and plant["label_tokens"] == ["Z"]
    assert plant["detection_score"] == 1.0 and plant["fuzzing_score"] == 1.0
    assert plant["label_detection"] == 1.0 and plant["label_token"] == 1.0
    # every feature reads one token: the marked tokens explain it well
    assert m["detection"]["balanced_accuracy"] > 0.85 and m["fuzzing"]["balanced_accuracy"] > 0.85
    for g in ("detection", "fuzzing"):
        assert m[g]["ci_low"] <= m[g]["balanced_accuracy"] <= m[g]["ci_high"]
    per = [r["detection_score"] for r in rows if r["detection_score"] is not None]
    assert len(per) >= 5  # a feature active in every context has no detection negatives: None
    assert m["autointerp"]["autointerp_score"] == pytest.approx(np.mean(per))
    assert m["autointerp"]["autointerp_std_dev"] == pytest.approx(np.std(per, ddof=1))
    # a label token fires wherever it occurs at this hook: the label never predicts wrongly
    # where the feature is silent, so each feature's balanced accuracy is at least 0.5
    assert all(r["label_token"] >= 0.5 for r in rows)
    assert all(r["label_detection"] >= 0.5 for r in rows if r["label_detection"] is not None)
    assert 0.5 < m["offline"]["label_token_balanced_accuracy"] <= 1
    # a rerun asks nothing: every reply comes from the cache, the numbers are the same
    doc2 = _bench(d, tmp_path / "b2", extra + ["--autointerp-model", "scripted"])
    assert len(Scripted.log) == 3 * n and doc2["eval_result_unstructured"]["requests_sent"] == 0
    assert doc2["eval_result_metrics"] == m
    # known replies, known scores: all-1 detection and all-0 fuzzing are exactly chance
    Scripted.mode = "constant"
    m3 = _bench(d, tmp_path / "b3", ["--autointerp-explainer", scripted,
                                     "--autointerp-cache", str(tmp_path / "c3")])["eval_result_metrics"]
    assert m3["autointerp"]["autointerp_score"] == 0.5 and m3["autointerp"]["autointerp_std_dev"] == 0
    for g in ("detection", "fuzzing"):
        assert m3[g]["balanced_accuracy"] == m3[g]["ci_low"] == m3[g]["ci_high"] == 0.5
    Scripted.mode = "nonsense"
    doc4 = _bench(d, tmp_path / "b4", ["--autointerp-explainer", scripted,
                                       "--autointerp-cache", str(tmp_path / "c4")])
    assert doc4["eval_result_metrics"]["detection"]["balanced_accuracy"] is None
    assert doc4["eval_result_unstructured"]["unparsed_replies"] == {"detection": n, "fuzzing": n}
    assert doc4["eval_result_metrics"]["offline"] == m["offline"]


def test_offline_score_needs_no_explainer(tiny, tmp_path, capsys):
    d, _ = tiny
    doc = _bench(d, tmp_path / "b", [])
    assert set(doc["eval_result_metrics"]) == {"offline"} and doc["eval_type_id"] == "autointerp"
    assert "explanation" not in doc["eval_result_details"][0]
    assert "label_token_balanced_accuracy" in capsys.readouterr().out


def test_measure_through_jsae_serve(tiny, tmp_path):
    d, _ = tiny
    srv = make_server(ChatModel(TinyModel(seed=3), "tiny-chat", max_tokens_limit=96), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        doc = _bench(d, tmp_path / "b", ["--autointerp-explainer", url, "--autointerp-features", "1",
                                         "--autointerp-explain-examples", "2",
                                         "--autointerp-cache", str(tmp_path / "c")])
    finally:
        srv.shutdown()
        srv.server_close()
    u = doc["eval_result_unstructured"]
    assert u["explainer"].startswith("tiny-chat at ") and u["requests_sent"] == 3
    assert len(doc["eval_result_details"]) == 1  # a gibberish explanation, scored or unparsed
    assert sum(u["unparsed_replies"].values()) + doc["eval_result_metrics"]["detection"]["n_features"] \
        + doc["eval_result_metrics"]["fuzzing"]["n_features"] == 2


def test_unreachable_explainer_is_one_line(tiny, tmp_path, capsys):
    import socket

    d, _ = tiny
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert cli.main(["bench", str(d), "--only", "autointerp", "--out", str(tmp_path / "o"),
                     "--autointerp-explainer", f"http://127.0.0.1:{port}/v1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("jsae bench: cannot reach http://127.0.0.1:") and "/v1/models" in err[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--autointerp-explainer", "ftp://x"], "--autointerp-explainer must be an http"),
    (["--autointerp-score-examples", "1"], "--autointerp-score-examples must be >= 2"),
    (["--autointerp-timeout", "0"], "--autointerp-timeout must be > 0"),
])
def test_bad_options_are_one_line(tiny, tmp_path, capsys, extra, needle):
    d, _ = tiny
    assert cli.main(["bench", str(d), "--only", "autointerp", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_destination_jsae_bench_did_not_write_is_refused(tiny, tmp_path, capsys):
    """A non-empty foreign --out folder or a foreign --json file: one line, exit 2, every
    existing file byte-identical and nothing new written."""
    d, _ = tiny
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    mine = tmp_path / "results.json"
    mine.write_text('{"mine": 1}')
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["bench", str(d), "--only", "autointerp"]
    assert cli.main([*args, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(tmp_path / "new"), "--json", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by jsae bench" in err[0], err
    assert (out / "notes.txt").read_text() == "mine" and mine.read_text() == '{"mine": 1}'
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
