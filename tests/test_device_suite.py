"""benchmarks/device_suite.py (issue 31): `--small` runs every part at toy size on the CPU, once for
the module, as a user runs it (a subprocess); results.json has every part with a status, the
numbers of the parts that ran are positive and finite, ratios are there, part 4's float16
dictionary loads back with jsae and its atlas site exists. A non-empty --out is refused in one
line, exit 2, nothing written. It is also the suite's smoke test (tests/test_benchmarks.py).

SAELens (part 1) runs under $JSAE_SAELENS_PYTHON and circuit-tracer (part 5) under
$JSAE_CIRCUIT_TRACER_PYTHON when they are set (CI's side venvs); otherwise those peers are
recorded as unavailable / skipped, which is checked too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "device_suite.py"
PARTS = {"1": "sae_step", "2": "harvest", "3": "atlas_pass", "4": "dictionary", "5": "attribution"}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it (not conftest's 8 simulated)
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1200)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "out"
    r = _run("--small", "--out", str(out))
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out, r.stdout, json.loads((out / "results.json").read_text())


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_part_ran_and_says_so(suite):
    out, stdout, doc = suite
    assert set(doc["parts"]) == set(PARTS)
    for n, name in PARTS.items():
        p = doc["parts"][n]
        assert p["name"] == name and p["status"] in ("ok", "partial"), (n, p.get("reason"), p)
        assert (out / p["log"]).is_file()
        assert "hardware" in p and "versions" in p and f"device_suite.py --worker {n} " in p["command"]
        assert f"part {n} ({name}): start" in stdout and f"part {n} ({name}): ok" in stdout
    assert doc["suite"]["non_finite"] == [], doc["suite"]["non_finite"]
    assert doc["suite"]["small"] is True and (out / "results.md").is_file()
    md = (out / "results.md").read_text()
    for title in ("## 1. Training step", "## 2. Harvest", "## 3. Atlas pass", "## 4. A real",
                  "## 5. Attribution"):
        assert title in md, title


@pytest.mark.slow
def test_step_harvest_and_atlas_numbers(suite):
    _, _, doc = suite
    p1 = doc["parts"]["1"]["results"]
    archs = {(r["arch"], r["dtype"]) for r in p1["rows"]}
    assert {("topk", "float32"), ("batchtopk", "float32"), ("jumprelu", "float32"),
            ("matryoshka", "float32"), ("topk", "bfloat16")} <= archs, archs
    for r in p1["rows"]:
        assert all(_positive_finite(v) for v in r["ms"].values()), r
        assert _positive_finite(r["floor_ms"]) and _positive_finite(r["jsae_over_floor"])
        # every peer that ran has its ratio; one that could not run says why
        for peer in r["ms"]:
            if peer != r["jsae"]:
                assert _positive_finite(r["ratios"][peer]), r
        if r["arch"] == "topk":
            assert "torch-topk-embbag" in r["ratios"], r
        if "saelens" not in r["ms"]:
            assert "saelens" in r["unavailable"], r
        # the arithmetic: ratio = peer ms / jsae ms
        for peer, x in r["ratios"].items():
            assert x == pytest.approx(r["ms"][peer] / r["ms"][r["jsae"]])
    if os.environ.get("JSAE_SAELENS_PYTHON"):
        assert all("saelens" in r["ratios"] for r in p1["rows"]), p1["rows"]
    p2 = doc["parts"]["2"]["results"]
    assert {(r["dtype"], r["layer"]) for r in p2["rows"]} == {
        (d, n) for d in ("bfloat16", "float32") for n in p2["layers"]}
    for r in p2["rows"]:
        assert _positive_finite(r["tok_s"]["jax"]) and _positive_finite(r["tok_s"]["torch"])
        assert r["ratio_jsae_over_transformers"] == pytest.approx(
            r["tok_s"]["jax"] / r["tok_s"]["torch"])
    p3 = doc["parts"]["3"]["results"]
    assert len(p3["rows"]) == 2 and p3["rows"][0]["d_sae"] < p3["rows"][1]["d_sae"]
    for r in p3["rows"]:
        assert _positive_finite(r["harvest_tok_s"]) and _positive_finite(r["atlas_tok_s"])
        assert r["ratio_atlas_over_harvest"] == pytest.approx(r["atlas_tok_s"] / r["harvest_tok_s"])


@pytest.mark.slow
def test_the_dictionary_loads_back_and_its_site_exists(suite):
    import jax.numpy as jnp

    from jsae.runs import sae_dirname
    from jsae.sae import encode
    from jsae.sae.io import load_sae

    out, stdout, doc = suite
    p4 = doc["parts"]["4"]["results"]
    assert p4["d_sae"] == 512 and p4["train_tokens"] >= 100_000
    assert _positive_finite(p4["epochs"])
    assert p4["epochs"] == pytest.approx(p4["train_tokens"] / p4["corpus_train_tokens"])
    assert 0 < p4["eval"]["fvu"] < 1 and _positive_finite(p4["eval"]["l0"])
    at = p4["atlas"]
    assert 0 < at["live"] <= 512 and -1 <= at["median_nn_cos"] <= 1
    assert (out / "dictionary" / "site" / "index.html").is_file()
    assert (out / "dictionary" / "config.yaml").is_file()
    assert "median nearest-neighbour decoder cosine" in stdout and "(quickstart 0.20)" in stdout
    fp16, _ = load_sae(out / "dictionary" / "sae-fp16")
    full, _ = load_sae(out / "dictionary" / "run" / "saes" / sae_dirname(p4["hook"]))
    assert fp16.params["W_dec"].dtype == jnp.float16 and fp16.spec.d_sae == 512
    np.testing.assert_allclose(np.asarray(fp16.params["W_dec"], np.float32),
                               np.asarray(full.params["W_dec"]), rtol=1e-3, atol=1e-3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, fp16.spec.d_in)), jnp.float32)
    assert np.isfinite(np.asarray(encode(fp16, x))).all()


@pytest.mark.slow
def test_attribution_part_reports_each_side(suite):
    _, _, doc = suite
    p5 = doc["parts"]["5"]["results"]
    js = p5["jsae"]
    assert js["status"] == "ok", js
    assert _positive_finite(js["seconds"]) and _positive_finite(js["seconds_cold"])
    assert js["active_features"] > 0
    ct = p5["circuit_tracer"]
    if os.environ.get("JSAE_CIRCUIT_TRACER_PYTHON"):
        assert ct["status"] == "ok", ct
        assert _positive_finite(ct["seconds"]) and _positive_finite(ct["peak_rss_mb"])
        # the same transcoders on the same activations: the same graph size on both sides
        assert ct["active_features"] == js["active_features"], (ct, js)
    else:
        assert ct["status"].startswith("skipped"), ct


def test_a_non_empty_out_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _run("--small", "--out", str(out))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "not empty" in err[0], r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
