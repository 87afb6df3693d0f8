"""Nothing lost, part 2 (issue 25): no command deletes or overwrites what it did not write, no
failed command hangs, nothing fails silently.

Every case runs the real CLI and checks the same three things: the exit code, a single stderr
line naming the path or field, and that every file that existed before is byte-identical
afterwards. The headline cases (and the ones about processes: a hang, Ctrl-C) run `python -m jsae`
as a subprocess; the rest run `jsae.cli.main` in this process, which is the same code without
the seconds of importing JAX again.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_bad_input import TINY, tree_hash
from test_bad_input import cli as jsae_in  # `jsae.cli.main` in this process

from jsae import outputs
from jsae.cli import main

SUB_TIMEOUT = 240  # a hang fails the test instead of the suite


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def jsae_sub(argv, cwd, timeout=SUB_TIMEOUT) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m jsae ARGV` in a new process."""
    p = subprocess.run([sys.executable, "-m", "jsae", *map(str, argv)], cwd=cwd, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    return lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace as a user has it: two finished runs in runs/, a folder of the user's own
    files, a config, an activation cache stand-in and a file."""
    root = tmp_path_factory.mktemp("lost")
    (root / "tiny.yaml").write_text(TINY)
    assert main(["train", str(root / "tiny.yaml"), "--run-dir", str(root / "runs" / "r")]) == 0
    shutil.copytree(root / "runs" / "r", root / "runs" / "a")
    user = root / "mine"
    (user / "data").mkdir(parents=True)
    (user / "index.html").write_text("<h1>my page</h1>")
    (user / "data" / "app.js").write_text("// my script")
    (user / "notes.txt").write_text("my notes")
    cache = root / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"format": "jsae-activation-cache"}))
    (root / "afile.txt").write_text("a file")
    np.save(root / "acts.npy", np.random.default_rng(0).normal(size=(2048, 16)).astype(np.float32))
    return root


def _refused(run, ws, argv, needle, capsys=None):
    before = tree_hash(ws)
    rc, out, err = run(argv, ws) if capsys is None else run(argv, capsys)
    assert rc == 2, (rc, out, err)
    line = one_line(err)
    assert needle in line, line
    assert tree_hash(ws) == before, f"`jsae {' '.join(map(str, argv))}` changed the workspace"
    return line


# ---------------------------------------------------------------- the data-loss cases, real CLI

SUBPROCESS_CASES = [
    # (id, argv, what the line must name)
    ("export-into-its-run", ["export", "runs/r", "runs/r"], "training run directory"),
    ("export-above-runs", ["export", "runs/a", "runs"], "holds the training run"),
    ("export-into-user-folder", ["export", "runs/r", "mine"], "mine is not empty"),
    ("export-jsae-into-user-folder", ["export", "runs/r", "mine", "--format", "jsae"],
     "mine is not empty"),
    ("atlas-into-user-folder", ["atlas", "runs/r", "--out", "mine"], "mine is not empty"),
    ("harvest-into-a-run", ["harvest", "tiny.yaml", "--set", "data.source=text", "--out",
                            "runs/r"], "training run directory"),
]


@pytest.mark.parametrize("case,argv,needle", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_data_loss_cases_are_refused_by_the_real_cli(ws, case, argv, needle):
    _refused(jsae_sub, ws, argv, needle)


IN_PROCESS_CASES = [
    ("export-into-saes", ["export", "runs/r", "runs/r/saes/new"], "own saes"),
    ("export-into-checkpoints", ["export", "runs/r", "runs/r/checkpoints/x"], "own checkpoints"),
    ("export-into-cache", ["export", "runs/r", "cache"], "activation cache"),
    ("export-inside-cache", ["export", "runs/r", "cache/out"], "inside the activation cache"),
    ("export-onto-a-file", ["export", "runs/r", "afile.txt"], "is a file"),
    ("export-under-a-file", ["export", "runs/r", "afile.txt/sub"], "is a file"),
    ("export-gemmascope-user-folder", ["export", "runs/r", "mine", "--format", "gemmascope"],
     "not empty"),
    ("atlas-into-its-run", ["atlas", "runs/r", "--out", "runs/r"], "training run directory"),
    ("atlas-above-runs", ["atlas", "runs/r", "--out", "runs"], "holds the training run"),
    ("atlas-into-cache", ["atlas", "runs/r", "--out", "cache"], "activation cache"),
    ("atlas-onto-a-file", ["atlas", "runs/r", "--out", "afile.txt"], "is a file"),
    ("atlas-neuronpedia-user-folder", ["atlas", "runs/r", "--out", "newatlas", "--neuronpedia",
                                       "mine"], "mine is not empty"),
    ("harvest-not-text", ["harvest", "tiny.yaml", "--out", "newcache"], "data.source"),
    ("harvest-into-user-folder", ["harvest", "tiny.yaml", "--set", "data.source=text",
                                  "--out", "mine"], "not empty"),
    ("harvest-above-runs", ["harvest", "tiny.yaml", "--set", "data.source=text", "--out",
                            "runs"], "holds the training run"),
    ("eval-json-is-a-folder", ["eval", "runs/r", "--json", "mine"], "is a folder"),
    ("eval-json-user-file", ["eval", "runs/r", "--json", "mine/notes.txt"], "not written by"),
    ("eval-json-run-config", ["eval", "runs/r", "--json", "runs/r/config.yaml"], "own"),
    ("concept-json-user-file", ["concept", "runs/r", "--positive", "afile.txt", "--negative",
                                "afile.txt", "--json", "mine/notes.txt"], "not written by"),
    ("monitor-out-user-file", ["monitor", "runs/r", "--feature", "1", "--train", "afile.txt",
                               "afile.txt", "--out", "mine/index.html"], "not written by"),
    ("monitor-out-in-saes", ["monitor", "runs/r", "--feature", "1", "--train", "afile.txt",
                             "afile.txt", "--out", "runs/r/saes/det.json"], "own saes"),
    ("languages-user-folder", ["languages", "runs/r", "--out", "mine"], "not empty"),
]


@pytest.mark.parametrize("case,argv,needle", IN_PROCESS_CASES, ids=[c[0] for c in IN_PROCESS_CASES])
def test_every_writing_command_follows_the_one_rule(ws, monkeypatch, capsys, case, argv, needle):
    monkeypatch.chdir(ws)
    _refused(jsae_in, ws, argv, needle, capsys)


def test_export_writes_new_and_its_own_folders_and_keeps_other_files(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws)
    before = tree_hash(ws / "mine")
    rc, out, err = jsae_in(["export", "runs/r", "exported"], capsys)
    assert rc == 0, err
    assert outputs.written_by(ws / "exported") == "jsae export"
    rc, out, err = jsae_in(["export", "runs/r", "exported"], capsys)  # its own: again is fine
    assert rc == 0, err
    rc, out, err = jsae_in(["export", "runs/r", "runs/r/export"], capsys)  # a run's free part
    assert rc == 0, err
    # --overwrite into the user's folder: the export's files are added, nothing else touched
    snapshot = {p: p.read_bytes() for p in (ws / "mine").rglob("*") if p.is_file()}
    rc, out, err = jsae_in(["export", "runs/r", "mine", "--overwrite"], capsys)
    assert rc == 0, err
    assert all(p.read_bytes() == b for p, b in snapshot.items())
    assert (ws / "mine" / "cfg.json").exists()
    # a second export (other format) removes only what the first one wrote
    rc, out, err = jsae_in(["export", "runs/r", "mine", "--format", "jsae"], capsys)
    assert rc == 0, err
    assert not (ws / "mine" / "cfg.json").exists() and (ws / "mine" / "sae.json").exists()
    assert all(p.read_bytes() == b for p, b in snapshot.items())
    for name in ("cfg.json", "sae.json", "sae.safetensors", outputs.MARKER):
        (ws / "mine" / name).unlink(missing_ok=True)
    assert tree_hash(ws / "mine") == before
    shutil.rmtree(ws / "exported")
    shutil.rmtree(ws / "runs" / "r" / "export")


# ------------------------------------------------------------------------ no hang, one line


def _chattr(path: Path, flag: str) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


def test_unwritable_checkpoint_folder_is_one_line_and_exits(ws, tmp_path):
    """`chattr +i checkpoints/` (root ignores permission bits): refused before training, exit 2,
    and the process ends (it used to print its line and wait forever on a save thread)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    if not _chattr(run / "checkpoints", "+i"):
        pytest.skip("chattr +i is not available here")
    try:
        rc, out, err = jsae_sub(["train", ws / "tiny.yaml", "--run-dir", run], tmp_path)
    finally:
        _chattr(run / "checkpoints", "-i")
    assert rc == 2, (out, err)
    assert "checkpoints cannot be written" in one_line(err)


def test_a_save_failing_in_the_background_ends_the_process(ws, tmp_path):
    """The same folder made unwritable only after the start-up check: the save fails in Orbax's
    thread; the command still says one line and exits 2 instead of hanging."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    if not _chattr(run / "checkpoints", "+i"):
        pytest.skip("chattr +i is not available here")
    driver = ("import sys; from jsae.train import checkpoint as c; "
              "c.RunCheckpointer._check_writable = lambda self: None; "
              "from jsae.cli import entry; sys.argv = ['jsae', *sys.argv[1:]]; entry()")
    try:
        p = subprocess.run([sys.executable, "-c", driver, "train", str(ws / "tiny.yaml"),
                            "--run-dir", str(run)], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=SUB_TIMEOUT)
    finally:
        _chattr(run / "checkpoints", "-i")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Operation not permitted" in one_line(p.stderr)


def test_disk_full_at_the_final_plot_is_one_line(ws, tmp_path, monkeypatch, capsys):
    from jsae.train import run as run_module

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "plots"))

    monkeypatch.setattr(run_module, "plot_metrics", full)
    rc, out, err = jsae_in(["train", ws / "tiny.yaml", "--run-dir", tmp_path / "run"], capsys)
    assert rc == 2
    assert "the disk is full" in one_line(err) and "plots" in err


def test_ctrl_c_is_one_line_exit_130_with_the_resume_hint(ws, tmp_path):
    cfg = tmp_path / "long.yaml"
    cfg.write_text(TINY.replace("steps: 20", "steps: 100000"))
    p = subprocess.Popen([sys.executable, "-m", "jsae", "train", str(cfg), "--run-dir",
                          str(tmp_path / "run")], cwd=tmp_path, env=_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + SUB_TIMEOUT
    metrics = tmp_path / "run" / "metrics.csv"
    while time.time() < deadline and p.poll() is None and not (
            metrics.exists() and metrics.stat().st_size > 200):
        time.sleep(0.2)  # training has logged a few steps
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=SUB_TIMEOUT)
    assert p.returncode == 130, (out, err)
    line = one_line(err)
    assert "interrupted" in line and "resume" in line
    # the first Ctrl-C stops at a step boundary with a checkpoint: the resume loses nothing
    from jsae.train.checkpoint import latest_checkpoint

    assert "Ctrl-C: stopping at the next safe point" in out
    assert latest_checkpoint(tmp_path / "run") is not None


# -------------------------------------------------------------------------- no silent success


def test_run_killed_during_its_final_save_is_finished_not_skipped(ws, tmp_path, capsys):
    """A finished run's state when SIGKILL came inside the final save: the final checkpoint,
    a hidden temporary under saes/, no dictionary, no summary. Rerunning must finish it."""
    run = tmp_path / "run"
    shutil.copytree(ws / "runs" / "r", run)
    (run / "saes" / ".synthetic.k1ll3d").mkdir()  # written whole but not renamed into place
    shutil.copy(run / "saes" / "synthetic" / "sae.json", run / "saes" / ".synthetic.k1ll3d")
    (run / "saes" / ".synthetic.k1ll3d" / "sae.safetensors").write_bytes(b"half")
    shutil.rmtree(run / "saes" / "synthetic")
    from jsae.runs import saved_hooks

    assert saved_hooks(run) == []  # the temporary is no dictionary
    (run / "summary.json").unlink()
    rc, out, err = jsae_in(["train", ws / "tiny.yaml", "--run-dir", run], capsys)
    assert rc == 0, err
    assert "nothing to do" not in out and "final save" in out
    assert (run / "saes" / "synthetic" / "sae.json").exists()
    assert json.loads((run / "summary.json").read_text())["heldout"]["synthetic"]["fvu"] > 0


def test_changed_data_source_on_resume_is_one_line(ws, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ws / "runs" / "r", run)
    shutil.rmtree(run / "saes")
    (run / "summary.json").unlink()
    before = tree_hash(run)
    rc, out, err = jsae_in(["train", ws / "tiny.yaml", "--run-dir", run, "--set",
                            "data.source=array", "--set", f"data.path={ws / 'acts.npy'}",
                            "--set", "model.hooks=[synthetic]"], capsys)
    assert rc == 2, (out, err)
    assert "cannot resume this data source" in one_line(err)
    assert tree_hash(run) == before


def test_tampered_data_position_is_not_trusted(ws, tmp_path, capsys):
    """The saved data position is fingerprinted: an edited one makes the checkpoint damaged
    (moved to checkpoints_corrupt/, the previous one is used), never silently resumed."""
    run = tmp_path / "run"
    shutil.copytree(ws / "runs" / "r", run)
    shutil.rmtree(run / "saes")
    (run / "summary.json").unlink()
    data = run / "checkpoints" / "20" / "data" / "metadata"
    doc = json.loads(data.read_text())
    n = doc["processes"][0]["batches"]
    doc["processes"][0]["batches"] = int(str(n)[::-1]) if str(n)[::-1] != str(n) else n + 1
    data.write_text(json.dumps(doc))  # the same size: the listing of sizes cannot tell
    rc, out, err = jsae_in(["train", ws / "tiny.yaml", "--run-dir", run], capsys)
    assert rc == 0, err
    assert "checkpoint step 20" in out and "damaged" in out and "fingerprint" in out
    assert (run / "checkpoints_corrupt" / "20").is_dir()
    assert "resuming from step 10" in out


def test_non_finite_loss_stops_at_its_own_step():
    import jax.numpy as jnp

    from jsae.train.divergence import TrainingDiverged
    from jsae.train.loop import _check_finite_loss

    class Bar:
        def close(self):
            pass

    _check_finite_loss([jnp.float32(1.0)], 3, Bar(), None)
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 7"):
        _check_finite_loss([jnp.float32(1.0), jnp.float32(np.inf)], 7, Bar(), None)


def test_steer_value_beyond_float32_is_refused(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws)
    rc, out, err = jsae_in(["steer", "runs/r", "--feature", "1", "--value", "1e39", "--prompt",
                            "hi"], capsys)
    assert rc == 2
    assert "--value" in one_line(err) and "float32" in err
