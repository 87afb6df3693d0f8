"""Bad input, tried as a careless or hostile user would: every case is refused with exit code 2
and one line naming the key or file, before any work, and leaves the run directory as it was.

Also the regressions of issue 13: a refused `jsae train` must not rewrite config.yaml (problem
1); a finished dictionary is never replaced by a different config, a restart without
checkpoints does not double metrics.csv, two runs cannot share a directory (problem 2);
validation happens before training (problem 3); non-finite and absurd values never pass
silently (problem 5).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jsae.cli import main
from jsae.train import rundir

TINY = """\
seed: 0
data: {source: synthetic, d_in: 16, n_features: 64, active_per_sample: 2}
sae: {architecture: topk, d_sae: 64, k: 2, init_sample: 256, dead_after_tokens: 20000}
train: {steps: 20, batch_size: 128, lr: 3.0e-3, lr_warmup_steps: 2, log_every: 5,
        progress: false}
checkpoint: {every_steps: 10, keep: 2}
eval: {tokens: 256}
mesh: {data: 1}
"""


def tree_hash(path: Path) -> str:
    """Hash of every file's relative path and bytes under ``path`` ('' when it is absent)."""
    if not path.exists():
        return ""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `jsae ARGV` run in this process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 2
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny config, a finished run of it (with checkpoints) and small .npy files."""
    root = tmp_path_factory.mktemp("bad")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    finished = root / "finished"
    assert main(["train", str(cfg), "--run-dir", str(finished)]) == 0
    (root / "adir").mkdir()
    (root / "latin1.yaml").write_bytes(b"seed: 0\nrun_dir: caf\xe9\n")
    rng = np.random.default_rng(0)
    np.save(root / "acts.npy", rng.normal(size=(4096, 16)).astype(np.float32))
    np.save(root / "few.npy", rng.normal(size=(25, 16)).astype(np.float32))
    np.save(root / "complex.npy", (rng.normal(size=(256, 16)) + 1j).astype(np.complex64))
    return root, cfg, finished


# (case id, extra argv after `train CONFIG --run-dir RUN`, text the message must contain)
CONFIG_CASES = [
    ("mesh-model", ["--set", "mesh.model=3"], "mesh.model"),
    ("mesh-data", ["--set", "mesh.data=16"], "mesh.data"),
    ("batch-split", ["--set", "mesh.data=-1", "--set", "train.batch_size=100"],
     "train.batch_size"),
    ("d_sae-split", ["--set", "mesh.model=4", "--set", "sae.d_sae=66"], "sae.d_sae"),
    ("seed", ["--set", "seed=-1"], "'seed'"),
    ("lr-inf", ["--set", "train.lr=.inf"], "train.lr"),
    ("lr-nan", ["--set", "train.lr=.nan"], "train.lr"),
    ("lr-huge", ["--set", "train.lr=1e3"], "train.lr"),
    ("lr-zero", ["--set", "train.lr=0"], "train.lr"),
    ("d_sae-memory", ["--set", "sae.d_sae=1e12"], "bytes"),
    ("k-over-d_sae", ["--set", "sae.k=100"], "sae.k"),
    ("eval-tokens", ["--set", "eval.tokens=-5"], "eval.tokens"),
    ("unknown-key", ["--set", "train.lrr=1e-3"], "train.lrr"),
    ("bad-yaml-value", ["--set", "train.lr=["], "train.lr"),
    ("wrong-type", ["--set", "train.steps=many"], "train.steps"),
    ("noise", ["--set", "data.noise_std=-1"], "data.noise_std"),
    ("holdout-0-array", ["--set", "data.source=array", "--set", "data.path=ACTS",
                         "--set", "data.holdout_fraction=0"], "data.holdout_fraction"),
    ("holdout-too-few-rows", ["--set", "data.source=array", "--set", "data.path=FEW"],
     "data.holdout_fraction"),
    ("array-missing", ["--set", "data.source=array", "--set", "data.path=NOPE"], "nope.npy"),
    ("array-complex", ["--set", "data.source=array", "--set", "data.path=CPLX"], "complex64"),
]


def _subst(argv, root):
    return [a.replace("ACTS", str(root / "acts.npy")).replace("FEW", str(root / "few.npy"))
            .replace("NOPE", str(root / "nope.npy")).replace("CPLX", str(root / "complex.npy"))
            for a in argv]


@pytest.mark.parametrize("case,extra,needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_before_work(work, capsys, case, extra, needle):
    root, cfg, finished = work
    new_dir = root / f"new-{case}"
    before = tree_hash(finished)
    for run_dir in (new_dir, finished):  # a fresh directory, and one holding a finished run
        rc, out, err = cli(["train", cfg, "--run-dir", run_dir, *_subst(extra, root)], capsys)
        assert rc == 2, (case, out[-800:], err[-800:])
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("jsae train: "), err
        # Against the finished run, a data problem may be refused first as "a different run".
        assert needle in lines[0] or (run_dir == finished and "finished" in lines[0]), lines[0]
    assert not new_dir.exists()  # not even an empty directory
    assert tree_hash(finished) == before


FILE_CASES = [
    ("config-is-directory", "adir", "adir"),
    ("config-not-utf8", "latin1.yaml", "latin1.yaml"),
    ("config-missing", "missing.yaml", "missing.yaml"),
]


@pytest.mark.parametrize("case,name,needle", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(work, capsys, case, name, needle):
    root, _, finished = work
    before = tree_hash(finished)
    rc, _, err = cli(["train", root / name, "--run-dir", finished], capsys)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert tree_hash(finished) == before


# CLI numeric arguments: refused by argparse (exit 2) before anything is loaded.
ARG_CASES = [
    ("eval-tokens", ["eval", "RUN", "--tokens", "-5"], "--tokens"),
    ("eval-batch", ["eval", "RUN", "--batch-size", "0"], "--batch-size"),
    ("features-top", ["features", "RUN", "--search", "x", "--top", "-3"], "--top"),
    ("features-contexts", ["features", "RUN", "--feature", "1", "--contexts", "0"], "--contexts"),
    ("steer-nan", ["steer", "RUN", "--feature", "1", "--value", "nan", "--prompt", "a"], "--value"),
    ("steer-inf-x", ["steer", "RUN", "--feature", "1", "--value", "infx", "--prompt", "a"],
     "--value"),
    ("steer-top-p", ["steer", "RUN", "--feature", "1", "--value", "3", "--prompt", "a",
                     "--top-p", "1.5"], "--top-p"),
    ("steer-feature", ["steer", "RUN", "--feature", "-1", "--value", "3", "--prompt", "a"],
     "--feature"),
    ("harvest-tokens", ["harvest", "CFG", "--out", "OUT", "--tokens", "-5"], "--tokens"),
    ("generate-tokens", ["generate", "--prompt", "a", "--max-new-tokens", "0"],
     "--max-new-tokens"),
    ("generate-temp", ["generate", "--prompt", "a", "--temperature", "nan"], "--temperature"),
    ("export-step", ["export", "RUN", "--format", "saelens", "OUT", "--step", "-1"], "--step"),
    ("plan-d-in", ["plan", "CFG", "--d-in", "-5"], "--d-in"),
]


@pytest.mark.parametrize("case,argv,needle", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_bad_cli_numbers(work, capsys, case, argv, needle):
    root, cfg, finished = work
    out_dir = root / f"out-{case}"
    argv = [str(finished) if a == "RUN" else str(cfg) if a == "CFG" else
            str(out_dir) if a == "OUT" else a for a in argv]
    before = tree_hash(finished)
    rc, _, err = cli(argv, capsys)
    assert rc == 2, err
    assert needle in err.splitlines()[-1], err
    assert tree_hash(finished) == before and not out_dir.exists()


def test_plan_refuses_bad_budget_and_int32_overflow(work, capsys):
    _, cfg, _ = work
    rc, _, err = cli(["plan", cfg, "--fit", "-5GB"], capsys)
    assert rc == 2 and "--fit" in err, err
    rc, _, err = cli(["plan", cfg, "--set", "sae.d_sae=3e9", "--mesh", "model=2"], capsys)
    assert rc == 2 and "sae.d_sae" in err and "int32" in err, err
    rc, _, err = cli(["plan", cfg, "--mesh", "model=x"], capsys)
    assert rc == 2 and "--mesh" in err, err


# ---- problem 1: a refused run must not rewrite the config --------------------------------


def _copy_run(src: Path, dst: Path, drop=()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        p = dst / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dst


def test_refused_checkpoint_mismatch_leaves_config_yaml(work, tmp_path, capsys):
    """Problem 1: an interrupted run (checkpoints, no saes/) asked to resume with another k."""
    _, cfg, finished = work
    run = _copy_run(finished, tmp_path / "run", drop=("saes", "summary.json"))
    before = tree_hash(run)
    rc, out, err = cli(["train", cfg, "--run-dir", run, "--set", "sae.k=3",
                        "--set", "data.exclude_bos=false"], capsys)
    assert rc == 2 and "k=2 in the checkpoint" in err, (out[-500:], err)
    assert tree_hash(run) == before  # config.yaml untouched, no lock, no tb/ files


def test_refused_finished_run_with_other_config(work, capsys):
    """Problem 2: saes/ present, a different config -> refused, naming what differs."""
    _, cfg, finished = work
    before = tree_hash(finished)
    rc, _, err = cli(["train", cfg, "--run-dir", finished, "--set", "sae.d_sae=128",
                      "--set", "train.steps=8"], capsys)
    assert rc == 2, err
    assert "finished dictionary" in err and "sae.d_sae: 64 -> 128" in err and "--fresh" in err
    assert tree_hash(finished) == before


def test_finished_without_checkpoints_is_refused_then_fresh_moves_it_aside(work, tmp_path,
                                                                          capsys):
    _, cfg, finished = work
    run = _copy_run(finished, tmp_path / "run", drop=("checkpoints",))
    before = tree_hash(run)
    rc, _, err = cli(["train", cfg, "--run-dir", run, "--set", "sae.d_sae=128"], capsys)
    assert rc == 2 and "finished dictionary" in err
    assert tree_hash(run) == before
    # The same config again: nothing to do, nothing changed.
    rc, out, _ = cli(["train", cfg, "--run-dir", run], capsys)
    assert rc == 0 and "nothing to do" in out
    assert tree_hash(run) == before
    # --fresh keeps the old run beside the new one, byte for byte.
    rc, out, err = cli(["train", cfg, "--run-dir", run, "--set", "sae.d_sae=128",
                        "--set", "train.steps=5", "--fresh"], capsys)
    assert rc == 0, err
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and tree_hash(old[0]) == before
    assert (run / "saes").is_dir()
    assert rundir.read_run_config(run)["sae"]["d_sae"] == 128


def _steps(csv_path: Path) -> list[int]:
    with csv_path.open() as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("loss")]


def test_restart_without_checkpoints_says_so_and_keeps_metrics_single(work, tmp_path, capsys):
    """Problem 2: an interrupted run without checkpoints restarts from 0, says so, and
    metrics.csv holds each step once (the earlier rows are kept in history/)."""
    _, cfg, finished = work
    run = _copy_run(finished, tmp_path / "run", drop=("saes", "summary.json", "checkpoints"))
    old_rows = (run / "metrics.csv").read_text()
    rc, out, err = cli(["train", cfg, "--run-dir", run, "--no-checkpoint"], capsys)
    assert rc == 0, err
    assert "no checkpoint to resume from" in out and "step 0" in out
    steps = _steps(run / "metrics.csv")
    assert steps == sorted(set(steps)) == [5, 10, 15, 20]
    kept = list((run / "history").glob("*/metrics.csv"))
    assert len(kept) == 1 and kept[0].read_text() == old_rows


@pytest.mark.slow
def test_resume_trims_metrics_past_the_checkpoint(work, tmp_path, capsys):
    """Rows logged after the last checkpoint (steps 15, 20 here) are logged again on resume,
    not duplicated; the config is kept in history only when it changed."""
    _, cfg, finished = work
    run = _copy_run(finished, tmp_path / "run", drop=("saes", "summary.json"))
    shutil.rmtree(run / "checkpoints" / "20")
    rc, out, err = cli(["train", cfg, "--run-dir", run], capsys)
    assert rc == 0, err
    assert "resuming from step 10" in out
    assert _steps(run / "metrics.csv") == [5, 10, 15, 20]
    rc, out, err = cli(["train", cfg, "--run-dir", run, "--set", "train.steps=25"], capsys)
    assert rc == 0, err
    hist = list((run / "history").glob("*/config.yaml"))
    assert len(hist) == 1 and "steps: 20" in hist[0].read_text()
    assert list((run / "history").glob("*/saes"))  # the 20-step dictionary is kept
    assert _steps(run / "metrics.csv") == [5, 10, 15, 20, 25]


# ---- problem 2: one run per directory -----------------------------------------------------


def test_second_run_is_refused_naming_the_holder(work, capsys):
    _, cfg, finished = work
    lock = finished / rundir.LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": "2026-12-02 06:00:00 UTC", "token": "x"}))
    try:
        before = tree_hash(finished)
        rc, _, err = cli(["train", cfg, "--run-dir", finished], capsys)
        assert rc == 2, err
        assert f"pid {os.getpid()}" in err and socket.gethostname() in err
        assert "2026-12-02 06:00:00" in err
        assert tree_hash(finished) == before
    finally:
        lock.unlink()


def test_stale_lock_of_a_dead_process_is_taken_over(work, capsys):
    _, cfg, finished = work
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = finished / rundir.LOCK_NAME
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                "started": "2026-12-01 00:00:00 UTC", "token": "old"}))
    rc, out, err = cli(["train", cfg, "--run-dir", finished], capsys)
    assert rc == 0, err
    assert f"pid {dead.pid}" in out and "no longer running" in out
    assert not lock.exists()  # released at the end


def test_lock_is_exclusive_in_process(tmp_path):
    with rundir.acquire_lock(tmp_path / "r"):
        with pytest.raises(rundir.RunDirError, match=f"pid {os.getpid()}"):
            rundir.acquire_lock(tmp_path / "r")
    assert not (tmp_path / "r").exists()  # the lock created the folder, and removed it


# ---- problem 5: non-finite and absurd values ---------------------------------------------


@pytest.mark.slow
def test_nan_in_heldout_row_is_null_in_summary(work, tmp_path, capsys):
    root, cfg, _ = work
    x = np.load(root / "acts.npy")
    n = len(x)
    order = np.random.default_rng([0, 104729]).permutation(n)  # ArraySource's held-out split
    x[np.sort(order[: int(round(n * 0.02))])[0], 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    run = tmp_path / "run"
    rc, out, err = cli(["train", cfg, "--run-dir", run, "--set", "data.source=array",
                        "--set", f"data.path={tmp_path / 'nan.npy'}"], capsys)
    assert rc == 0, err
    assert "not finite" in out
    text = (run / "summary.json").read_text()
    assert "NaN" not in text
    summary = json.loads(text)
    assert summary["heldout"]["blocks.6.hook_resid_post"]["fvu"] is None
    sae_json = json.loads((run / "saes" / "blocks.6.hook_resid_post" / "sae.json").read_text())
    assert sae_json["metadata"]["heldout"]["fvu"] is None


def test_divergence_guard_names_the_step():
    from jsae.train.divergence import DivergenceGuard, TrainingDiverged

    g = DivergenceGuard()
    assert g.problem(5, {"loss": 2.0, "fvu": 0.5}) is None
    assert "step 10" in g.problem(10, {"loss": 1e5, "fvu": 0.5})
    assert "fvu" in DivergenceGuard().problem(7, {"loss": 1.0, "fvu": 4e14})
    with pytest.raises(TrainingDiverged, match="step 3"):
        DivergenceGuard().check(3, {"loss": float("nan")})


@pytest.mark.slow
def test_diverging_run_stops_at_the_first_logged_step(work, tmp_path, capsys):
    """A learning rate that passes validation (< 10) but explodes: stopped at the first
    logged step, exit 2, no saes/ (train.lr=1e3 is refused before work)."""
    _, cfg, _ = work
    run = tmp_path / "run"
    rc, _, err = cli(["train", cfg, "--run-dir", run, "--set", "train.lr=9"], capsys)
    assert rc == 2 and "diverged at step 5" in err and "train.lr" in err, err
    assert "checkpoint" in err  # where to resume from (none saved yet here)
    assert not (run / "saes").exists()
