"""Issue 26: an architecture is one file that owns its options, and what the code before it
wrote still loads.

- A copy of relu.py with a new name and one new option, dropped into jsae/sae/archs/ of a
  scratch copy of the package, trains from YAML, saves, reloads and resumes (no other edit).
- tests/fixtures/old_format/ was written by the code before issue 26 (flat specs carrying
  every architecture's fields; a jumprelu run whose spec holds k=32 > d_sae=16): its sae
  folders, SAELens export and Orbax checkpoint load and give the same reconstructions, and the
  run resumes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / "tests" / "fixtures" / "old_format"


def _leaky_module() -> str:
    """relu.py as a contributor would copy it: new name, one new option used by activate."""
    src = (ROOT / "jsae/sae/archs/relu.py").read_text()
    for a, b in [
        ("class ReLU(Arch):", "class LeakyReLU(Arch):"),
        ('name = "relu"', 'name = "leaky_relu_test"'),
        ('saelens_name = "standard"', "saelens_name = None"),
        ('saelens_imports = ("standard",)', "saelens_imports = ()"),
        ('l1_variant: Literal["standard", "anthropic"] = "anthropic"  # standard: unit decoder rows',
         'l1_variant: Literal["standard", "anthropic"] = "anthropic"  # standard: unit decoder rows\n'
         '        leak: float = 0.0  # slope below zero'),
        ("return jax.nn.relu(pre)", "return jnp.where(pre > 0, pre, sae.spec.options.leak * pre)"),
        ("register(ReLU())", "register(LeakyReLU())"),
    ]:
        assert a in src, a
        src = src.replace(a, b)
    return src


CONFIG = """\
seed: 0
data: {source: synthetic, d_in: 16, n_features: 64, active_per_sample: 2}
sae: {architecture: leaky_relu_test, leak: 0.25, l1_coef: 0.5, d_sae: 32, init_sample: 256}
train: {steps: 4, batch_size: 64, lr: 3.0e-3, lr_warmup_steps: 1, log_every: 2, progress: false}
checkpoint: {every_steps: 2, keep: 2}
eval: {tokens: 128, show_features: 0}
mesh: {data: 1}
"""

SCRIPT = """\
import sys
from pathlib import Path
import jax.numpy as jnp
import jsae
from jsae.cli import main
from jsae.sae import reconstruct
from jsae.sae.io import load_sae
from jsae.train.checkpoint import latest_checkpoint

assert Path(jsae.__file__).parent == Path(sys.argv[1]), jsae.__file__
cfg, run = sys.argv[2], Path(sys.argv[3])
assert main(["train", cfg, "--run-dir", str(run)]) == 0
sae, meta = load_sae(run / "saes" / "synthetic")
assert sae.spec.architecture == "leaky_relu_test" and sae.spec.options.leak == 0.25, sae.spec
x = jnp.linspace(-1, 1, 32).reshape(2, 16)
assert bool(jnp.isfinite(reconstruct(sae, x)).all())
assert main(["train", cfg, "--run-dir", str(run), "--set", "train.steps=6"]) == 0
assert latest_checkpoint(run) == 6, latest_checkpoint(run)
again, _ = load_sae(run / "saes" / "synthetic")
assert again.spec == sae.spec and not bool((again.params["W_enc"] == sae.params["W_enc"]).all())
print("OK")
"""


def test_a_copied_architecture_file_trains_saves_reloads_and_resumes(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "jsae", pkg / "jsae",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (pkg / "jsae/sae/archs/leaky_relu_test.py").write_text(_leaky_module())
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    (tmp_path / "check.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(pkg), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(pkg / "jsae"),
                          str(tmp_path / "cfg.yaml"), str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr


def test_a_copied_option_is_refused_for_another_architecture(tmp_path):
    """The new option is the new architecture's key only (the message names its owner)."""
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "jsae", pkg / "jsae",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (pkg / "jsae/sae/archs/leaky_relu_test.py").write_text(_leaky_module())
    code = textwrap.dedent("""
        from jsae import config
        try:
            config.from_dict({"sae": {"architecture": "relu", "leak": 0.5, "d_sae": 8},
                              "train": {"steps": 1}})
        except config.ConfigError as e:
            print(e)
        print(config.from_dict({"sae": {"architecture": "leaky_relu_test", "d_sae": 8},
                                "train": {"steps": 1}}).sae.options)
    """)
    env = {**os.environ, "PYTHONPATH": str(pkg), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'sae.leak' belongs to sae.architecture leaky_relu_test, not 'relu'" in out.stdout
    assert "leak=0.0" in out.stdout


@pytest.mark.parametrize("name", ["topk", "matryoshka", "crosscoder", "jumprelu"])
def test_old_sae_folders_load_and_reconstruct_as_before(name):
    from jsae.sae import reconstruct
    from jsae.sae.io import load_sae

    exp = np.load(OLD / "expected.npz")
    folder = OLD / ("jumprelu_run/saes/synthetic" if name == "jumprelu" else name)
    sae, _ = load_sae(folder)
    assert sae.spec.architecture == name
    x = exp["xc" if name == "crosscoder" else "x"]
    np.testing.assert_allclose(np.asarray(reconstruct(sae, x)), exp[f"{name}_recon"],
                               rtol=1e-5, atol=1e-6)
    if name == "matryoshka":
        assert sae.spec.options.matryoshka_groups == (4, 16)
    if name == "jumprelu":  # the old spec's k=32 (> d_sae) belonged to no option of jumprelu
        assert sae.spec.options.jumprelu_sparsity == "tanh"
        assert not hasattr(sae.spec.options, "k")


def test_old_checkpoint_and_saelens_export_load():
    from jsae.export.saelens import load_saelens
    from jsae.runs import sae_from_checkpoint
    from jsae.sae import reconstruct

    exp = np.load(OLD / "expected.npz")
    sae, info = sae_from_checkpoint(OLD / "jumprelu_run", "synthetic")
    assert info["step"] == 4 and sae.spec.options.jumprelu_sparsity == "tanh"
    np.testing.assert_allclose(np.asarray(reconstruct(sae, exp["x"])), exp["jumprelu_recon"],
                               rtol=1e-5, atol=1e-6)
    sl, meta = load_saelens(OLD / "jumprelu_saelens")
    assert sl.spec.architecture == "jumprelu" and meta["hook_name"] == "synthetic"
    np.testing.assert_allclose(np.asarray(reconstruct(sl, exp["x"])), exp["jumprelu_recon"],
                               rtol=1e-4, atol=1e-5)


def test_old_run_resumes_from_its_checkpoint(tmp_path):
    """The old config.yaml (every kind's keys) and checkpoint continue to 6 steps."""
    from jsae.cli import main
    from jsae.train.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    shutil.copytree(OLD / "jumprelu_run", run)
    assert main(["train", str(run / "config.yaml"), "--run-dir", str(run),
                 "--set", "train.steps=6"]) == 0
    assert latest_checkpoint(run) == 6
