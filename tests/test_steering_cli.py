"""`jsae steer | features | monitor` on a run folder holding a tiny model's SAE."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_steering_helpers import TinyModel, random_sae

from jsae import cli, steering
from jsae.config import RunConfig, dump
from jsae.models.transformer import forward
from jsae.sae.io import save_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model = TinyModel()
    d = tmp_path_factory.mktemp("run")
    cfg = RunConfig()
    cfg.model.name = "tiny-test-model"
    cfg.model.hooks = [HOOK]
    dump(cfg, d / "config.yaml")
    toks = np.random.default_rng(0).integers(3, 97, (4, 16))
    acts = forward(model.cfg, model.params, jnp.asarray(toks), capture=(HOOK,)).activations[HOOK]
    sae = random_sae("relu", model.cfg.d_model, 24, sample=np.asarray(acts).reshape(-1, model.cfg.d_model))
    save_sae(sae, d / "saes" / HOOK, metadata={"hook_name": HOOK})
    return d, model


@pytest.fixture
def tiny(monkeypatch, run_dir):
    d, model = run_dir
    import jsae.analysis.corpus as corpus
    import jsae.models

    monkeypatch.setattr(jsae.models, "load", lambda name, dtype="float32": model)
    texts = ["the golden gate bridge", "fog rolls over the bay", "a suspension bridge", "red paint"] * 6
    monkeypatch.setattr(corpus, "offline_texts", lambda n=None, seed=0, sotu=False: texts)
    return d, model


def test_load_run_reads_config_and_sae(tiny):
    from jsae.analysis.run import load_run, run_hooks

    d, model = tiny
    assert run_hooks(d) == [HOOK]
    r = load_run(d)
    assert r.hook == HOOK and r.model is model and r.sae.spec.d_sae == 24 and r.model_name == "tiny-test-model"
    with pytest.raises(FileNotFoundError, match="no SAE for hook"):
        load_run(d, "blocks.0.hook_resid_post")


def test_steer_prints_baseline_and_steered_side_by_side(tiny, capsys):
    from jsae.analysis.run import load_run

    d, model = tiny
    assert cli.main([ "steer", str(d), "--feature", "3", "--feature", "5", "--value", "40", "--value", "-5",
                     "--prompt", "the bridge", "--tokens", "6"]) == 0
    out = capsys.readouterr().out
    r = load_run(d)
    fns = {HOOK: steering.clamp(r.sae, [3, 5], [40.0, -5.0])}
    (base,), (steered,) = steering.generate_pair(model, ["the bridge"], fns, 6)  # same program: no recompile
    assert base != steered
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("baseline"))
    assert "steered (f3 := 40, f5 := -5)" in lines[row]
    left = "".join(line.split(" | ")[0].rstrip() for line in lines[row + 2 :] if " | " in line)
    right = "".join(line.split(" | ")[1] for line in lines[row + 2 :] if " | " in line)
    def squash(s):
        return s.replace("\n", "⏎").replace(" ", "")

    assert left.replace(" ", "") == squash("the bridge" + base)
    assert right.replace(" ", "") == squash("the bridge" + steered)


def test_steer_relative_value_uses_corpus_max(tiny, capsys):
    from jsae.analysis.run import corpus_stats, load_run

    d, _ = tiny
    r = load_run(d)
    top, _ = corpus_stats(r, 16, 64)
    f = int(np.argmax(top.max))
    assert cli.main(["steer", str(d), "--feature", str(f), "--value", "3x", "--prompt", "abc", "--tokens", "3",
                     "--contexts", "16"]) == 0
    assert f"f{f} := {3 * top.max[top.row(f)]:.3g}" in capsys.readouterr().out
    assert list((d / "analysis" / HOOK).glob("*.npz"))  # cached


def test_features_search_and_describe(tiny, capsys):
    d, _ = tiny
    assert cli.main(["features", str(d), "--search", "golden gate", "--top", "3", "--contexts", "16",
                     "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("promotes:") == 3 and "top-activating snippets" in out and "«" in out
    assert cli.main(["features", str(d), "--feature", "2", "--contexts", "16"]) == 0
    assert "feature 2" in capsys.readouterr().out


def test_monitor_cli_highlights(tiny, capsys):
    d, model = tiny
    from jsae.analysis.run import load_run
    from jsae.monitor import render, scan

    r = load_run(d)
    res = scan(model, r.sae, HOOK, ["fog over the golden gate"], [1, 2], [0.05])
    assert cli.main(["monitor", str(d), "--feature", "1", "--feature", "2", "--threshold", "0.05",
                     "--text", "fog over the golden gate", "--color", "never", "--spans"]) == 0
    out = capsys.readouterr().out
    assert render(res, 0) in out and f"{len(res.spans[0])} span(s)" in out
