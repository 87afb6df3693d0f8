"""`run_training(cfg)`: the whole `jsae train` job (source, trainer, checkpoints, report)."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax

from jsae.config import RunConfig
from jsae.data import make_source
from jsae.data.sources import SyntheticSource
from jsae.evals.reconstruction import dictionary_recovery
from jsae.train.loop import Trainer, TrainingStopped


def _make_checkpointer(cfg: RunConfig, trainer: Trainer):
    if not cfg.checkpoint.enabled:
        return None
    try:
        from jsae.train.checkpoint import RunCheckpointer
    except ImportError:
        return None
    return RunCheckpointer(cfg, trainer)


def run_training(cfg: RunConfig, *, fresh: bool = False, print_fn=print) -> dict:
    run_dir = Path(cfg.run_dir)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "metrics.csv").unlink(missing_ok=True)
    print_fn(
        f"jsae train: {cfg.sae.architecture} SAE on {cfg.data.source} data, "
        f"{cfg.resolved_steps()} steps x {cfg.train.batch_size} tokens, "
        f"{jax.device_count()} {jax.default_backend()} device(s), mesh data={cfg.mesh.data} "
        f"model={cfg.mesh.model}, run dir {run_dir}"
    )
    source = make_source(cfg, jax.process_index(), jax.process_count())
    trainer = Trainer(cfg, source)
    checkpointer = _make_checkpointer(cfg, trainer)
    try:
        summary = trainer.fit(checkpointer=checkpointer, log=print_fn)
    except TrainingStopped as stop:
        print_fn(f"stopped at step {stop.step} (SIGTERM): checkpoint saved in "
                 f"{run_dir / 'checkpoints'}; run the same command again to resume")
        return {"stopped_at": stop.step}
    finally:
        if checkpointer is not None:
            checkpointer.close()
    for hook, m in summary["heldout"].items():
        print_fn(
            f"[{hook}] held-out: FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  "
            f"dead {m['dead_frac']:.3f}  cos {m['cos_sim']:.3f}  ({int(m['tokens'])} tokens)"
        )
    if isinstance(source, SyntheticSource):
        hook = trainer.hooks[0]
        rec = dictionary_recovery(jax.device_get(trainer.states[hook].sae), source.features)
        summary["recovery"] = rec
        print_fn(f"ground-truth recovery (mean best cosine of true features): {rec:.3f}")
    print_fn(f"saved SAEs under {run_dir / 'saes'}; metrics in {run_dir / 'metrics.csv'}")
    return summary
