"""`jsae train` end to end in a subprocess, on one device and on a (4, 2) mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]


def _train(tmp_path, name, *extra, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    run_dir = tmp_path / name
    cmd = [sys.executable, "-m", "jsae", "train", str(REPO / "configs" / "synthetic.yaml"),
           "--run-dir", str(run_dir), "--set", "train.steps=60", "--set", "train.log_every=20",
           "--set", "checkpoint.enabled=false", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out.stdout + out.stderr


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "jsae", "--help"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0 and "train" in out.stdout


def test_train_cli_and_sharded_run_agree(tmp_path):
    one, log = _train(tmp_path, "one")
    assert "held-out: FVU" in log and "ground-truth recovery" in log
    assert "step/s" in log  # the progress bar
    summary = json.loads((one / "summary.json").read_text())
    assert 0 < summary["heldout"]["synthetic"]["fvu"] < 1
    sharded, _ = _train(tmp_path, "sharded", "--set", "mesh.model=2", devices=8)
    a = load_file(str(one / "saes/synthetic/sae.safetensors"))
    b = load_file(str(sharded / "saes/synthetic/sae.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-4, err_msg=k)


def test_bad_config_exits_with_named_key(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jsae", "train", str(REPO / "configs" / "synthetic.yaml"),
         "--set", "sae.k=5000"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert "sae.k" in out.stderr and "exceeds" in out.stderr
