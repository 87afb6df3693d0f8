"""A real `jsae train` process killed (SIGKILL) or preempted (SIGTERM) mid-run, then started
again: it resumes from its checkpoint and ends exactly where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jsae.train.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 300
CONFIG = f"""\
seed: 0
data: {{source: synthetic, d_in: 32, n_features: 128, active_per_sample: 3}}
sae: {{architecture: topk, d_sae: 128, k: 3, init_sample: 512, dead_after_tokens: 20000}}
train: {{steps: {STEPS}, batch_size: 256, lr: 3.0e-3, lr_warmup_steps: 10, log_every: 50,
        progress: false}}
checkpoint: {{every_steps: 50, keep: 3}}
eval: {{tokens: 512}}
"""

pytestmark = pytest.mark.slow


def _cmd(cfg: Path, run_dir: Path):
    return [sys.executable, "-m", "jsae", "train", str(cfg), "--run-dir", str(run_dir)]


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_PLATFORMS="cpu")


def _train(cfg: Path, run_dir: Path) -> str:
    out = subprocess.run(_cmd(cfg, run_dir), env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _start_and_signal(cfg: Path, run_dir: Path, sig: int, when_prefix: str):
    """Start training; send `sig` as soon as a checkpoint entry named when_prefix* appears."""
    proc = subprocess.Popen(_cmd(cfg, run_dir), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ck = run_dir / "checkpoints"
    deadline = time.monotonic() + 540
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ck.is_dir() and any(p.name.startswith(when_prefix) for p in ck.iterdir()):
                proc.send_signal(sig)
                break
            time.sleep(0.005)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "cfg.yaml"
    cfg.write_text(CONFIG)
    _train(cfg, root / "reference")
    return cfg, read_checkpoint(root / "reference")


def _assert_same_final(run_dir: Path, ref: dict):
    got = read_checkpoint(run_dir)
    assert got["step"] == ref["step"] == STEPS
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got["states"]),
                                 jax.tree_util.tree_leaves_with_path(ref["states"])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # The data position continued: a restarted stream would end STEPS - resume_step batches in.
    assert got["data"] == ref["data"] == {"processes": [{"kind": "synthetic",
                                                          "batches": STEPS + 1}]}


def test_sigkill_mid_run_then_resume_matches_uninterrupted(setup, tmp_path):
    cfg, ref = setup
    run_dir = tmp_path / "killed"
    rc, out, err = _start_and_signal(cfg, run_dir, signal.SIGKILL, "100")
    assert rc == -signal.SIGKILL, (rc, out[-2000:], err[-2000:])
    assert not (run_dir / "saes").exists()  # it really died before the end
    log = _train(cfg, run_dir)
    resumed = [line for line in log.splitlines() if "resuming from step" in line]
    assert resumed and int(resumed[0].split("resuming from step ")[1].split()[0]) in (50, 100)
    _assert_same_final(run_dir, ref)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]


def test_sigterm_saves_and_exits_then_resume_matches_uninterrupted(setup, tmp_path):
    cfg, ref = setup
    run_dir = tmp_path / "preempted"
    rc, out, err = _start_and_signal(cfg, run_dir, signal.SIGTERM, "50")
    assert rc == 75, (rc, out[-2000:], err[-2000:])  # EX_TEMPFAIL: stopped, resumable
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert stopped, out[-2000:]
    step = int(stopped[0].split()[3])
    assert 50 <= step < STEPS
    assert read_checkpoint(run_dir)["step"] == step  # saved at the step where it stopped
    log = _train(cfg, run_dir)
    assert f"resuming from step {step}" in log
    _assert_same_final(run_dir, ref)
