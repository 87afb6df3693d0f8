"""The CLI turns every expected error into one line `jsae CMD: ...` and exit code 2; bugs keep
their traceback, and `--debug` shows the traceback of expected errors too."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from jsae import cli
from jsae.config import ConfigError
from jsae.data.text import DataSourceError
from jsae.errors import FileFormatError, MissingDependency, ModelLoadError, require
from jsae.models.convert import WeightError
from jsae.train.checkpoint import CheckpointMismatchError, CorruptCheckpointError

EXPECTED = [
    ConfigError("train.lr: must be a positive number, got -1"),
    DataSourceError("tfds:c4 not found under /data"),
    CheckpointMismatchError("checkpoint d_sae 64 != config d_sae 128"),
    CorruptCheckpointError("/run/checkpoints/100 is truncated"),
    ModelLoadError("no model at /models/x"),
    WeightError("blk.0.attn_q.weight has shape (1, 2), expected (640, 1024)"),
    FileFormatError("/run/saes/h/sae.safetensors is truncated\n(8 of 100 bytes)"),
    MissingDependency("the atlas maps need 'umap': pip install 'jsae[atlas]'"),
    FileNotFoundError("config file not found: x.yaml"),
    IsADirectoryError("configs/ is a directory, not a config file"),
]


def _fake_cli(monkeypatch, exc):
    def add_parser(sub):
        return sub.add_parser("boom")

    def run(args):
        raise exc

    mod = types.SimpleNamespace(add_parser=add_parser, run=run)
    monkeypatch.setattr(cli, "_command_modules", lambda: iter([mod]))


@pytest.mark.parametrize("exc", EXPECTED, ids=[type(e).__name__ for e in EXPECTED])
def test_expected_errors_are_one_line_and_exit_2(monkeypatch, capsys, exc):
    _fake_cli(monkeypatch, exc)
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jsae boom: "), err
    first_word = str(exc).split()[0]
    assert first_word in err  # the message itself, not a generic one


@pytest.mark.parametrize("exc", EXPECTED[:3], ids=["config", "data", "checkpoint"])
def test_debug_shows_the_traceback(monkeypatch, exc):
    _fake_cli(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cli.main(["--debug", "boom"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    _fake_cli(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["boom"])


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # importing it now raises ImportError
    with pytest.raises(MissingDependency) as e:
        require("umap", "atlas", "the atlas map")
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'jsae[atlas]'" in msg and "the atlas map" in msg


def _jsae(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jsae", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_real_commands_config_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae:\n  architecture: topk\n  no_such_key: 3\n")
    for args, needle in [
        (["train", str(bad)], "no_such_key"),
        (["train", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["eval", str(tmp_path / "no_run")], "no_run"),
    ]:
        out = _jsae(*args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"jsae {args[0]}: ") and needle in lines[0], out.stderr
