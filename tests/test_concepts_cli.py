"""`jsae concept`: the planted feature ranks first from example files; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_concepts import HOOK0, PLANT, _planted, _texts
from test_steering_helpers import random_sae

from jsae import cli
from jsae.config import RunConfig, dump
from jsae.sae.io import save_sae

HOOK1 = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    model, sae = _planted()
    d = tmp_path_factory.mktemp("run")
    cfg = RunConfig()
    cfg.model.name = "tiny-test-model"
    cfg.model.hooks = [HOOK0, HOOK1]
    dump(cfg, d / "config.yaml")
    save_sae(sae, d / "saes" / HOOK0, metadata={"hook_name": HOOK0})
    save_sae(random_sae("topk", model.cfg.d_model, 16, k=2), d / "saes" / HOOK1, metadata={"hook_name": HOOK1})
    rng = np.random.default_rng(2)
    (d / "pos.txt").write_text("\n".join(_texts(rng, 20, True)) + "\n")
    (d / "neg.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _texts(rng, 20, False)) + "\n")
    return d, model


@pytest.fixture
def tiny(monkeypatch, planted_run):
    import jsae.analysis.corpus as corpus
    import jsae.models

    d, model = planted_run
    monkeypatch.setattr(jsae.models, "load", lambda name, dtype="float32": model)
    monkeypatch.setattr(corpus, "offline_texts", lambda n=None, seed=0, sotu=False: ["abZc def", "ghi jkl"] * 8)
    return planted_run


def test_concept_cli_ranks_the_planted_feature_first(tiny, tmp_path, capsys):
    d, _ = tiny
    out = tmp_path / "c.json"
    assert cli.main(["concept", str(d), "--positive", str(d / "pos.txt"), "--negative", str(d / "neg.jsonl"),
                     "--top", "3", "--contexts", "8", "--json", str(out), "--color", "never"]) == 0
    o = capsys.readouterr().out
    assert f"{HOOK0}:" in o and f"{HOOK1}:" in o and "sparse probe" in o and "«Z»" in o
    rep = json.loads(out.read_text())
    assert set(rep["hooks"]) == {HOOK0, HOOK1}
    first = rep["hooks"][HOOK0]["ranking"][0]
    assert first["feature"] == PLANT and first["auroc"] == 1.0 and first["rate_neg"] == 0.0
    assert rep["hooks"][HOOK0]["probe"]["features"][0] == PLANT
    assert first["best_positive"]["origin"].startswith(str(d / "pos.txt") + ":")


@pytest.mark.parametrize("content, needle", [
    ("", "empty.txt: no examples"),
    ('{"text": 3}\n', "bad.jsonl:1: expected an object with a string field 'text'"),
])
def test_concept_cli_bad_files_are_one_line(tiny, tmp_path, capsys, content, needle):
    d, _ = tiny
    name = "bad.jsonl" if "jsonl" in needle else "empty.txt"
    (tmp_path / name).write_text(content)
    rc = cli.main(["concept", str(d), "--positive", str(d / "pos.txt"), "--negative", str(tmp_path / name)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("jsae concept: ") and needle in err[-1], err
    rc = cli.main(["concept", str(d), "--positive", str(d / "pos.txt"), "--negative", str(d / "pos.txt"),
                   "--top", "0"])
    assert rc == 2 and "--top must be >= 1" in capsys.readouterr().err
