"""`jsae.runs`, the one reader of run directories: every consumer (export, eval, analysis, the
CLI) sees the same hooks and the same SAE, the newest of the final folder and the checkpoints."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from jsae import runs
from jsae.cli import main
from jsae.sae.io import load_sae

CFG = """\
seed: 0
data: {source: synthetic, d_in: 16, n_features: 64, active_per_sample: 2}
sae: {architecture: topk, d_sae: 64, k: 2, init_sample: 256}
train: {steps: 8, batch_size: 128, lr: 3.0e-3, lr_warmup_steps: 2, log_every: 4, progress: false}
checkpoint: {every_steps: 4}
eval: {tokens: 256}
mesh: {data: 1}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    (d / "c.yaml").write_text(CFG)
    assert main(["train", str(d / "c.yaml"), "--run-dir", str(d / "run")]) == 0
    return d / "run"


def _same(a, b):
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]))


def test_every_reader_opens_the_same_sae(run):
    from jsae.analysis.run import run_hooks as analysis_hooks
    from jsae.evals.evaluate import load_run_saes
    from jsae.export.run import run_hooks as export_hooks

    assert runs.is_run(run) and not runs.is_run(run / "saes")
    assert runs.run_hooks(run) == analysis_hooks(run) == export_hooks(run) == ["synthetic"]
    assert runs.saved_hooks(run) == ["synthetic"] and runs.latest_step(run) == 8
    final = load_sae(run / "saes" / "synthetic")[0]
    sae, info = runs.sae_from_run(run)
    assert info["step"] == 8 and info["from"].endswith("saes/synthetic")
    _same(sae, final)
    _same(load_run_saes(run)["synthetic"], final)
    assert runs.run_config(run)["sae"]["d_sae"] == 64


def test_checkpoint_newer_than_the_final_folder_wins(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    older, info4 = runs.sae_from_checkpoint(copy, "synthetic", 4)
    assert info4["step"] == 4
    # a final folder from step 4 (a resumed run then checkpointed step 8): step 8 is read
    from jsae.sae.io import save_sae

    shutil.rmtree(copy / "saes" / "synthetic")
    save_sae(older, copy / "saes" / "synthetic", metadata={"hook_name": "synthetic", "steps": 4})
    sae, info = runs.sae_from_run(copy)
    assert info["step"] == 8 and "checkpoints" in info["from"]
    _same(sae, runs.sae_from_checkpoint(copy, "synthetic")[0])
    assert runs.sae_from_run(copy, step=4)[1]["step"] == 4


def test_unfinished_run_without_final_folder(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "saes")
    assert runs.run_hooks(copy) == ["synthetic"]
    assert runs.sae_from_run(copy)[1]["step"] == 8


def test_bad_runs_get_one_line(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAE for hook 'blocks.0.hook_x'; saved: synthetic"):
        runs.sae_from_run(run, "blocks.0.hook_x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no saved SAEs") as e:
        runs.run_hooks(tmp_path / "empty")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        runs.run_config(tmp_path / "empty")
    assert runs.model_section(tmp_path / "empty") == {}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text("model: {name: gemma-3-270m, hooks: blocks.6.hook_resid_post}\n")
    assert runs.model_section(tmp_path / "m")["hooks"] == ["blocks.6.hook_resid_post"]
    assert runs.sae_dirname("blocks.6/x") == "blocks.6_x"


def test_a_dictionary_over_many_hooks_saves_under_a_short_unique_folder(tmp_path):
    """An 18-layer CLT's key joins 18 hooks (~400 characters, over the 255-byte file-name
    limit): its folder is a short, unique name, and the run still reads it by its hooks."""
    import jax

    from jsae.sae import SAESpec, init_sae
    from jsae.sae.io import save_sae

    key = runs.KEY_JOIN.join(f"blocks.{i}.mlp.hook_in" for i in range(18))
    other = runs.KEY_JOIN.join(f"blocks.{i}.mlp.hook_in" for i in range(1, 19))
    name = runs.sae_dirname(key)
    assert len(name) <= runs.MAX_DIRNAME and name != runs.sae_dirname(other)
    assert name.startswith("blocks.0.mlp.hook_in+") and "18-hooks" in name
    assert runs.sae_dirname("blocks.6.hook_resid_post") == "blocks.6.hook_resid_post"  # as before
    sae = init_sae(jax.random.key(0), SAESpec("relu", 4, 8), None)
    save_sae(sae, tmp_path / "saes" / name, metadata={"hook_name": key, "steps": 1})
    assert runs.saved_hooks(tmp_path) == [key]
    got, info = runs.sae_from_run(tmp_path, key)
    assert info["hook_name"] == key and got.spec == sae.spec
