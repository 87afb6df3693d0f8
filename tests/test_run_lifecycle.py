"""One run lifecycle (issue 26): `Trainer.fit` trains and returns, `jsae.train.run.Run` owns the
run directory, the checkpointer is asked through its protocol, held-out metrics print once."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from sae_reference import sae_section

from jsae import parallel
from jsae.config import from_dict
from jsae.data.sources import SyntheticSource
from jsae.evals.reconstruction import reconstruction_metrics
from jsae.train.divergence import TrainingDiverged
from jsae.train.loop import Fitted, Trainer, TrainingStopped
from jsae.train.run import Run

STEPS = 6


def _cfg(run_dir, **train):
    return from_dict({
        "run_dir": str(run_dir),
        "data": {"source": "synthetic", "d_in": 16, "n_features": 64, "active_per_sample": 3},
        "sae": sae_section({"architecture": "topk", "d_sae": 64, "k": 3, "init_sample": 256}),
        "train": {"steps": STEPS, "batch_size": 64, "lr": 3e-3, "lr_warmup_steps": 1,
                  "log_every": 2, "progress": False, **train},
        "eval": {"tokens": 128, "every_steps": 4},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    })


_JITTED: dict = {}


def _trainer(cfg):
    """A Trainer on one device that reuses the first one's compiled step (same shapes)."""
    tr = Trainer(cfg, SyntheticSource(16, 64, 3, seed=cfg.seed),
                 mesh=parallel.make_mesh(1, 1, jax.devices()[:1]))
    if "step" in _JITTED:
        tr._jitted = _JITTED["step"]
    else:
        orig = tr._compiled

        def compiled(states):
            _JITTED["step"] = orig(states)
            return _JITTED["step"]

        tr._compiled = compiled
    return tr


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr("jsae.train.run.plot_metrics", lambda *a, **k: None)


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_fit_trains_and_returns_writing_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tr = _trainer(_cfg(run_dir))
    rows = []
    fitted = tr.fit(on_metrics=lambda step, m: rows.append((step, dict(m))), log=rows.append)
    assert isinstance(fitted, Fitted) and tr.step_of(fitted.states) == STEPS
    assert _files(run_dir) == []  # no config, metrics, saes/ or summary.json: the Run's job
    # the metrics went to the callback: training rows every 2 steps, the eval row at step 4
    assert [s for s, m in rows if "loss" in m] == [2, 4, 6]
    assert [s for s, m in rows if "eval_fvu" in m] == [4]
    # the held-out metrics are those of the returned states, on the source's held-out rows
    sae = jax.device_get(fitted.states["synthetic"].sae)
    ref = reconstruction_metrics(sae, (b["synthetic"] for b in tr.source.eval_batches(128, 64)))
    assert fitted.heldout["synthetic"]["fvu"] == pytest.approx(ref["fvu"], rel=1e-5)


class _Recorder:
    """A Checkpointer by its protocol alone: records saves, asks to stop after step 3."""

    def __init__(self):
        self.saves = []

    def restore(self, template):
        return None

    def save(self, step, states, data_state, *, force=False):
        if self.saves and self.saves[-1][0] == step:  # as RunCheckpointer: saved already
            return
        if force or step % 2 == 0:
            self.saves.append((step, force, data_state() if callable(data_state) else data_state))

    def stop_requested(self):
        return len(self.saves) > 0 and self.saves[-1][0] >= 3

    def describe_last_good(self):
        return f"the last good checkpoint is step {self.saves[-1][0]}" if self.saves else ""

    def close(self):
        pass


def test_stop_request_through_the_protocol(tmp_path):
    tr = _trainer(_cfg(tmp_path / "run"))
    ck = _Recorder()
    with pytest.raises(TrainingStopped) as stop:
        tr.fit(checkpointer=ck, log=lambda s: None)
    # step 2 due, not asked to stop; step 3 not due, so nothing new; step 4 due -> stop
    assert stop.value.step == 4
    assert [(s, f) for s, f, _ in ck.saves] == [(2, False), (4, False)]
    assert ck.saves[-1][2] == {"kind": "synthetic", "batches": 5}  # read when saved only
    assert tr.step_of(tr.states) == 4


def test_divergence_hint_comes_from_the_checkpointer(tmp_path):
    tr = _trainer(_cfg(tmp_path / "run"))
    starts = [tr.init_states(), tr.init_states()]  # from clean samples
    orig = tr.source.next_batch
    tr.source.next_batch = lambda n: {k: v * np.nan for k, v in orig(n).items()}
    with pytest.raises(TrainingDiverged) as err:  # no checkpoints: no hint
        tr.fit(starts[0], log=lambda s: None)
    assert str(err.value) == ("non-finite loss at step 1; lower train.lr or check the input "
                              "activations"), err.value
    ck = _Recorder()
    ck.saves.append((2, False, {}))
    with pytest.raises(TrainingDiverged) as err:
        tr.fit(starts[1], checkpointer=ck, log=lambda s: None)
    assert str(err.value).endswith("activations; the last good checkpoint is step 2"), err.value


def test_run_writes_the_directory_and_summary_last(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir)
    from jsae.train import run as run_module

    class Killed(BaseException):
        pass

    def killed(*a, **k):
        raise Killed  # the process dies inside the final save

    monkeypatch.setattr(run_module, "save_sae_from_mesh", killed)
    with pytest.raises(Killed):
        Run(cfg, log=lambda s: None).train(_trainer(cfg))
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.csv").exists()
    assert not (run_dir / "summary.json").exists()  # not finished: it would resume
    monkeypatch.undo()

    monkeypatch.setattr("jsae.train.run.plot_metrics", lambda *a, **k: None)
    summary = Run(cfg, log=lambda s: None).train(_trainer(cfg))
    assert json.loads((run_dir / "summary.json").read_text())["heldout"] == summary["heldout"]
    meta = json.loads((run_dir / "saes" / "synthetic" / "sae.json").read_text())["metadata"]
    assert meta["hook_name"] == "synthetic" and meta["steps"] == STEPS
    assert meta["heldout"]["fvu"] == pytest.approx(summary["heldout"]["synthetic"]["fvu"])
    with open(run_dir / "metrics.csv") as f:
        last = f.read().splitlines()[-1].split(",")
    assert last[0] == str(STEPS)  # the final held-out row closes metrics.csv


def test_jsae_train_walks_each_stage_once_in_order_and_prints_held_out_once(tmp_path,
                                                                            monkeypatch):
    from jsae import runner

    cfg = _cfg(tmp_path / "run")
    calls = []

    def record(cls, name):
        orig = getattr(cls, name)

        def wrapped(self, *a, **k):
            calls.append(f"{cls.__name__}.{name}")
            return orig(self, *a, **k)

        monkeypatch.setattr(cls, name, wrapped)

    for cls, name in [(Run, "open"), (Trainer, "start"), (Run, "accept"), (Trainer, "fit"),
                      (Run, "finish"), (Run, "close")]:
        record(cls, name)
    monkeypatch.setattr(runner, "Trainer", lambda c, s: _trainer(c))
    lines = []
    summary = runner.run_training(cfg, print_fn=lines.append)
    assert calls == ["Run.open", "Trainer.start", "Run.accept", "Trainer.fit", "Run.finish",
                     "Run.close"]
    held = [ln for ln in lines if "held-out" in ln]
    fvu = summary["heldout"]["synthetic"]["fvu"]
    assert held == [ln for ln in lines if f"held-out: FVU {fvu:.4f}" in ln] and len(held) == 1
    assert lines[-1].startswith("saved SAEs under")
