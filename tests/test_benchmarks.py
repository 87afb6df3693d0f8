"""Every script in benchmarks/ runs in CI (issue 32): each in its ``--smoke`` mode (toy sizes, a toy
random Gemma 3 where it needs a model, every peer that is installed), as a subprocess, as a user
would run it, and prints its ratio lines. Timings are not checked: they mean nothing at toy size.

The SAELens peer runs under $JSAE_SAELENS_PYTHON (CI's side venv, which sees this environment's
jax, torch and jsae) when it is set; otherwise its part is reported unavailable by the benchmark
and skipped here. PyTorch and transformers are always installed by tools/test.sh and must run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HELPERS = {"toy.py", "machine.py"}  # imported by the scripts, not benchmarks
SMOKED = {"harvest.py", "sae_step.py", "architectures.py", "atlas.py", "transcoder_sets.py",  # below
          "family.py", "attribution_memory.py", "structure_vs_budget.py",
          "device_suite.py"}  # its --small (alias --smoke): tests/test_device_suite.py
RATIO = r"\d+\.\d\dx"


def run_smoke(script: str, *args: str, python: str = sys.executable) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it (not conftest's 8 simulated)
    r = subprocess.run([python, str(BENCH / script), "--smoke", *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, f"{script} --smoke failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def test_every_benchmark_has_a_smoke_test():
    scripts = {p.name for p in BENCH.glob("*.py")} - HELPERS
    assert scripts == SMOKED, f"benchmarks without a smoke test here: {sorted(scripts - SMOKED)}"
    for name in scripts:
        assert "--smoke" in (BENCH / name).read_text(), name


def test_harvest_smoke():
    """jax, the NNX view and transformers on the toy Gemma 3: they agree, and both ratio lines
    print (the NNX lambdas once read a name the torch branch had rebound: issue 32)."""
    pytest.importorskip("transformers")
    out = run_smoke("harvest.py")
    assert re.search(r"^harvest activations torch vs jax: max \|difference\| ", out, re.M), out
    for impl in ("jax", "nnx", "torch"):
        for mode in ("harvest", "body", "full"):
            assert re.search(rf"^  {impl}\s+{mode}\s+\d+ tok/s", out, re.M), (impl, mode, out)
    assert re.search(rf"^ratios nnx / jax:  harvest {RATIO}, body {RATIO}, full {RATIO}$", out, re.M), out
    assert re.search(rf"^ratios jax / torch:  harvest {RATIO}, body {RATIO}, full {RATIO}$", out, re.M), out


def _saelens_python() -> str | None:
    exe = os.environ.get("JSAE_SAELENS_PYTHON")
    if not exe and importlib.util.find_spec("sae_lens"):
        exe = sys.executable
    return exe


def test_sae_step_smoke():
    """Every architecture's jsae step(s) against SAELens (where installed) and the plain PyTorch
    step, and the pieces."""
    exe = _saelens_python()
    out = run_smoke("sae_step.py", python=exe or sys.executable)
    archs = ["topk", "batchtopk", "relu", "jumprelu", "gated"]
    for arch in archs:
        assert f"\n== {arch} ==\n" in out, arch
    assert len(re.findall(r"^jsae-fast\s+[\d.]+ ms/step", out, re.M)) == 2, out
    assert len(re.findall(r"^jsae-reference\s+[\d.]+ ms/step", out, re.M)) == 2, out
    assert len(re.findall(r"^jsae\s+[\d.]+ ms/step", out, re.M)) == 3, out
    assert re.search(r"^torch-topk-embbag\s+[\d.]+ ms/step", out, re.M), out
    assert re.search(r"^lax.top_k\s+[\d.]+ ms$", out, re.M), out
    assert "hardware:" in out and "dense-FLOP floor" in out
    for piece in ("encoder matmul", "chunked top-k (32)", "sparse decode backward (group 1)",
                  "sparse encoder backward (group 16)"):
        assert re.search(rf"^{re.escape(piece)}\s+[\d.]+ ms$", out, re.M), (piece, out)
    assert re.search(r"^topk: ratio jsae/\S+ tokens_per_s: \d+\.\d\d$", out, re.M), out
    assert re.search(r"^ratio jsae/peer tokens_per_s: \d+\.\d\d$", out.strip().splitlines()[-1]), out
    if exe is None:
        assert "(saelens unavailable: ModuleNotFoundError" in out, out
        pytest.skip("sae_lens is not installed (JSAE_SAELENS_PYTHON): the SAELens peer was not run")
    assert len(re.findall(r"^saelens\s+[\d.]+ ms/step", out, re.M)) == len(archs), out
    for arch in archs[1:]:  # SAELens is their only peer
        assert re.search(rf"^{arch}: ratio jsae/saelens tokens_per_s: \d+\.\d\d$", out, re.M), out


def test_architectures_smoke():
    """One harvest, then `jsae train` + `jsae eval` of every architecture's config on the toy model."""
    # One SAE and one transcoder row: each kind of table row, the harvest, and eval of a run
    # trained from a cache. The other six rows differ from these only in `--set` overrides, and
    # every architecture trains in the unit tests; all eight here would add a minute of CI.
    # --bench: `jsae bench` on the SAE row only (SAEBench's measures are of SAEs), its table
    out = run_smoke("architectures.py", "--archs", "topk,skip_transcoder", "--bench", "autointerp")
    rows = re.findall(r"^\| (\w+) \| blocks\.6\.[^|]+\| [\d.]+ \| [\d.]+ \|", out, re.M)
    assert rows == ["topk", "skip_transcoder"], out
    assert re.search(r"^\| architecture \| autointerp\.label_detection_balanced_accuracy \|$", out, re.M), out
    assert re.search(r"^\| topk \| [\d.]+ \|$", out, re.M) and "| skip_transcoder | 0." not in out, out
    assert re.search(rf"^train time ratio ARCH / topk: topk {RATIO}, skip_transcoder {RATIO}", out,
                     re.M), out
    assert "smoke: 2 architectures trained and evaluated" in out, out


def test_atlas_smoke():
    """A toy run and cache, then the pass, the pass from the cache, the pieces, neighbours and maps."""
    pytest.importorskip("sklearn")  # the atlas extra (HDBSCAN); the smoke map is PCA, not UMAP
    out = run_smoke("atlas.py")
    assert re.search(rf"^ratio atlas pass / plain harvest tok/s: {RATIO}", out, re.M), out
    assert re.search(rf"^ratio atlas pass from the cache / reading the cache alone tok/s: {RATIO}$",
                     out, re.M), out
    assert '"lm_s"' in out and '"update_s"' in out, out
    assert re.search(r'^\{"features": 512, .*"pca_map_s".*"hdbscan_s"', out, re.M), out
    assert re.search(r'^\{"features": 1000000, "planned": true', out, re.M), out


def test_transcoder_sets_smoke():
    """(a) one LM pass feeding three toy layers' transcoders, then one pass per layer; (b) the
    CLT step and per-layer transcoders of the same parameter count, with compiled peak memory."""
    out = run_smoke("transcoder_sets.py")
    assert re.search(r"^one pass\s+[\d.]+ s\s+[\d,]+ tok/s", out, re.M), out
    per_layer = re.search(r"^3 passes\s+[\d.]+ s\s+[\d,]+ tok/s .*per layer s: ([\d., ]+)\)$",
                          out, re.M)
    assert per_layer and len(per_layer.group(1).split(",")) == 3, out
    assert re.search(rf"^ratio one pass / separate passes tokens_per_s: {RATIO}$", out, re.M), out
    # the per-layer transcoders hold the CLT's parameter count to within one 8-latent step
    counts = re.search(r"([\d,]+) parameters; 8 transcoders: d_sae \d+ each, TopK k \d+, "
                       r"([\d,]+) parameters", out)
    assert counts, out
    clt, tcs = (int(c.replace(",", "")) for c in counts.groups())
    assert abs(clt - tcs) <= 8 * 8 * (2 * 160 + 1), (clt, tcs)
    for name in ("clt", "transcoders"):
        assert re.search(rf"^{name}\s+[\d.]+ ms/step\s+[\d,]+ tok/s\s+peak\s+[\d.]+ MiB", out,
                         re.M), (name, out)
    assert re.search(rf"^ratio clt / transcoders step tokens_per_s: {RATIO}$", out, re.M), out
    assert re.search(rf"^ratio clt / transcoders peak memory: {RATIO}$", out, re.M), out
    assert "load average before:" in out and "load average after:" in out, out


def test_family_smoke():
    """A toy family of two widths from one LM pass, then one run per width; the same from a
    cache harvested first; then configs/transcoder_family.yaml's three sets (every layer of the
    toy) from one LM pass against one run per set."""
    out = run_smoke("family.py")
    for label in ("from text", "from a cache"):
        assert f"== {label}: one pass feeding 2 dictionaries vs 2 runs ==" in out, out
        assert re.search(rf"^ratio family / separate runs tokens_per_s \({label}\): {RATIO}$",
                         out, re.M), out
    assert len(re.findall(r"^family\s+[\d.]+ s\s+[\d,]+ tok/s$", out, re.M)) == 3, out
    assert len(re.findall(r"^2 runs\s+[\d.]+ s\s+[\d,]+ tok/s  \(per run s: [\d.]+, [\d.]+\)$",
                          out, re.M)) == 2, out
    assert "== sets from text: one pass feeding 3 transcoder sets vs 3 runs ==" in out, out
    assert "sets of every layer, members t640, t1280, t2560" in out, out
    assert re.search(rf"^ratio family / separate runs tokens_per_s \(sets from text\): {RATIO}$",
                     out, re.M), out
    assert "load average before:" in out and "load average after:" in out, out


def test_structure_vs_budget_smoke():
    """Every member of a synthetic family at every kept checkpoint, each with a cosine."""
    out = run_smoke("structure_vs_budget.py")
    rows = re.findall(r"^synthetic@(w256|w512)\s+([\d,]+) features  step\s+(\d+)\s+([\d,]+) tokens  "
                      r"median nn cos (\d\.\d+)$", out, re.M)
    assert sorted((m, int(st)) for m, _, st, _, _ in rows) == [
        (m, st) for m in ("w256", "w512") for st in (10, 20, 30, 40)], out
    assert all(0 < float(c) <= 1 and int(t.replace(",", "")) == 256 * int(st)
               for _, _, st, t, c in rows), out


def test_attribution_memory_smoke(tmp_path):
    """Peak memory of attribution at two toy prompt lengths, in its own process per call: the
    JSON has rising token counts, positive peaks and times, jsae's plan sized from its own graph
    (the dense adjacency is n_nodes^2 float32); the circuit-tracer side says it was skipped."""
    import json

    # jsae's side only: circuit-tracer's four processes doubled this test's time (CI's budget),
    # and its graphs are checked against jsae's in tests/test_attribution.py
    out = run_smoke("attribution_memory.py", "--json", str(tmp_path / "m.json"), "--no-circuit-tracer")
    doc = json.loads((tmp_path / "m.json").read_text())
    rows = doc["rows"]
    assert [r["tokens"] for r in rows] == [8, 16], rows
    for r in rows:
        j, c = r["jsae"], r["circuit_tracer"]
        assert j["status"] == "ok", j
        assert j["n_pos"] == r["tokens"] and j["active_features"] > 0, j
        for call in j["calls"]:
            assert call["peak_rss_mb"] > 0 and call["seconds"] > 0 and call["growth_mb"] > 0, j
        p = j["plan"]
        assert p["active_features"] == j["active_features"] and p["n_nodes"] == j["n_nodes"], p
        assert p["adjacency_bytes"] == 4 * j["n_nodes"] ** 2 and j["plan_mb"] > 0, p
        assert c["status"].startswith("skipped"), c
    assert rows[1]["jsae"]["active_features"] > rows[0]["jsae"]["active_features"], rows
    assert re.search(r"^\| 16 \| \d+ \| \d+ \(\+\d+\) \|", out, re.M), out
    assert "load average before:" in out and "load average after:" in out, out
