"""One training run in its directory, from the claim to ``summary.json``.

`Run` owns the run directory's life; ``jsae train`` (`jsae.runner`) walks it in this order:

- :meth:`Run.open` - the path claimed (`jsae.outputs.claim_run_dir`), the lock held and the
  run admitted: fresh, resumed, or already finished (`jsae.train.rundir`). Nothing is written
  but the lock (and, with ``fresh``, the old run moved aside).
- :meth:`Run.train` - the states to start from (`Trainer.start`: the newest checkpoint, or
  fresh ones), then :meth:`Run.accept` (only now does the directory change: the config
  written, metrics.csv trimmed past the start step, the metrics logger opened),
  `Trainer.fit` (its metrics logged through :meth:`Run.log_metrics`) and :meth:`Run.finish`:
  each dictionary with its metadata under ``saes/``, the final held-out row of metrics.csv,
  the plot and, last, ``summary.json`` (a run killed before it is not finished, it resumes).
- :meth:`Run.close` (leaving the ``with`` block) - the logger closed, the lock released.

On several hosts process 0 writes and every process takes part in the collectives (the sync
after admission, the dictionaries' fetches). ``Run(cfg).train(trainer)`` without
:meth:`Run.open` is the Python API's unguarded run (no lock, no admission): the same files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jsae import jsonsafe
from jsae.config import RunConfig
from jsae.runs import sae_dirname, write_set_record
from jsae.sae.io import save_sae_from_mesh
from jsae.train import rundir
from jsae.train.loop import NO_CHECKPOINTS, Checkpointer, Fitted, States, Trainer
from jsae.train.metrics_log import MetricsLogger, flatten_metrics, plot_metrics


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Run:
    """``cfg.run_dir`` for one run of ``cfg`` (see the module docstring)."""

    def __init__(self, cfg: RunConfig, *, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.dir = Path(cfg.run_dir)
        self.is_main = jax.process_index() == 0  # the one process that writes
        self._lock: rundir.RunLock | None = None
        self._logger: MetricsLogger | None = None

    # ---- before any work ------------------------------------------------------------------
    def open(self, *, fresh: bool = False) -> rundir.Admission:
        """Claim, lock (process 0) and admit; the lock is released by :meth:`close`."""
        from jsae import outputs

        outputs.claim_run_dir(self.dir)
        if self.is_main:
            self._lock = rundir.acquire_lock(self.dir, log=self.log)
        admission = rundir.admit(self.cfg, fresh=fresh, write=self.is_main, log=self.log)
        _sync("jsae run directory admitted")
        return admission

    def summary(self) -> dict:
        """What ``summary.json`` holds ({} when it cannot be read)."""
        try:
            return json.loads((self.dir / "summary.json").read_text())
        except (OSError, ValueError):
            return {}

    # ---- the run --------------------------------------------------------------------------
    def train(self, trainer: Trainer, *, checkpointer: Checkpointer = NO_CHECKPOINTS,
              eval_fn: Callable[[Trainer, States], dict[str, float]] | None = None
              ) -> dict[str, Any]:
        """Start (or resume), accept, fit and finish; returns the summary.

        `TrainingStopped` (a stop request) and every error pass through before :meth:`finish`
        writes anything of this run under ``saes/`` or ``summary.json``; an error before
        :meth:`accept` (a checkpoint that does not fit, a data position the source cannot
        take) leaves the directory as it was.
        """
        states = trainer.start(checkpointer, log=self.log)
        self.accept(trainer.step_of(states), trainer.total_steps)
        fitted = trainer.fit(states, checkpointer=checkpointer, eval_fn=eval_fn,
                             on_metrics=self.log_metrics, log=self.log)
        return self.finish(trainer, fitted)

    def accept(self, start_step: int, total_steps: int) -> None:
        """The run is accepted from ``start_step``: process 0 writes the config, trims
        metrics.csv (`rundir.accept`) and opens the metrics logger."""
        if self.is_main:
            rundir.accept(self.cfg, start_step, total_steps, log=self.log)
            self._logger = MetricsLogger(self.dir)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One row of metrics.csv (and TensorBoard), written by process 0 once accepted."""
        if self._logger is not None:
            self._logger.log(step, metrics)

    def finish(self, trainer: Trainer, fitted: Fitted) -> dict[str, Any]:
        """Save every dictionary with its metadata (a collective), then, on process 0, the
        final held-out row, the plot and ``summary.json``, the run's last act."""
        final, steps = fitted.heldout, trainer.total_steps
        bad = jsonsafe.non_finite_keys(final)
        if bad:  # written as null, never as NaN; said out loud
            self.log(f"warning: held-out {', '.join(bad)} not finite: the held-out activations "
                     "or the SAE's reconstruction are not finite, or no held-out token was "
                     "evaluated; written as null")
        summary: dict[str, Any] = {"steps": steps, "heldout": final}
        scaling = self._scaling_points(trainer, final) if self.is_main else {}
        if scaling:
            summary["scaling"] = scaling
        for h in trainer.hooks:  # every process takes part in the fetches; process 0 writes
            meta = {**trainer.metadata(h), "steps": steps, "heldout": final[h]}
            if h in scaling:  # the points travel with the dictionary (`jsae scaling` on a folder)
                meta["scaling"] = scaling[h]
            save_sae_from_mesh(fitted.states[h].sae, self.dir / "saes" / sae_dirname(h),
                               write=self.is_main, metadata=meta)
        record = trainer.set_record()
        if self.is_main and record is not None:
            write_set_record(self.dir, record)
        if self.is_main:
            if self._logger is not None:
                multi = len(trainer.hooks) > 1
                self._logger.log(steps, {f"eval_{k}": v
                                         for k, v in flatten_metrics(final, multi).items()})
                self._logger.close()
                csv_path, self._logger = self._logger.csv_path, None
                png = plot_metrics(csv_path, self.dir / "plots" / "training.png")
                summary["plot"] = str(png) if png else None
            jsonsafe.write(self.dir / "summary.json", summary)
        return summary

    def _scaling_points(self, trainer: Trainer, final: dict) -> dict[str, dict]:
        """Per dictionary, its held-out points at ``eval.at_tokens`` (`jsae scaling`): the
        eval_* rows of metrics.csv at those steps (also those logged before a resume) and the
        final held-out metrics, each with its tokens and training FLOPs; {} without
        ``eval.at_tokens``."""
        if not trainer.eval_at:
            return {}
        from jsae.scaling.flops import flops_per_token
        from jsae.train.metrics_log import read_metrics

        csv_path = self.dir / "metrics.csv"
        cols = read_metrics(csv_path) if csv_path.is_file() else {}
        multi, bs, steps = len(trainer.hooks) > 1, self.cfg.train.batch_size, trainer.total_steps
        out = {}
        for h in trainer.hooks:
            per_token = flops_per_token(trainer.specs[h])
            prefix = f"eval_{h}/" if multi else "eval_"
            names = [c for c in cols if c.startswith(prefix) and "/" not in c[len(prefix):]]
            rows = {}
            for i, step in enumerate(cols.get("step", [])):
                vals = {c[len(prefix):]: cols[c][i] for c in names}
                if int(step) in trainer.eval_at and int(step) < steps and vals and \
                        any(v == v for v in vals.values()):  # all nan: a training row
                    rows[int(step)] = vals
            rows[steps] = {k: float(v) for k, v in final[h].items()}
            for r in rows.values():  # the held-out rows evaluated, not the tokens trained on
                r["eval_tokens"] = r.pop("tokens", None)
            out[h] = {"batch_size": bs, "flops_per_token": per_token,
                      "points": [{**rows[s], "step": s, "tokens": s * bs,
                                  "flops": s * bs * per_token} for s in sorted(rows)]}
        return out

    # ---- after ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the metrics logger (a run that stopped early) and release the lock."""
        logger, self._logger = self._logger, None
        lock, self._lock = self._lock, None
        try:
            if logger is not None:
                logger.close()
        finally:
            if lock is not None:
                lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Run"]
