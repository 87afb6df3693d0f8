"""`run_training(cfg)`: the whole `jsae train` job (source, trainer, checkpoints, report)."""

from __future__ import annotations

from pathlib import Path

import jax

from jsae import parallel
from jsae.config import ConfigError, RunConfig
from jsae.data import make_source
from jsae.data.sources import SyntheticSource
from jsae.evals.reconstruction import dictionary_recovery
from jsae.train import rundir
from jsae.train.loop import Trainer, TrainingStopped
from jsae.train.preflight import preflight


def _make_checkpointer(cfg: RunConfig, trainer: Trainer):
    if not cfg.checkpoint.enabled:
        return None
    try:
        from jsae.train.checkpoint import RunCheckpointer
    except ImportError:
        return None
    return RunCheckpointer(cfg, trainer)


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal, checkpoint saved, rerun to resume


def run_training(cfg: RunConfig, *, fresh: bool = False, print_fn=print) -> dict:
    """Train as ``cfg`` says in its run directory, guarded (see `jsae.train.rundir`).

    Everything that can be checked before work is checked first (config against the devices,
    the run directory's lock and contents, the held-out data), and nothing in the run
    directory changes until the run is accepted. Returns the summary; ``{"stopped_at": step}``
    after a SIGTERM, ``{"finished": True, ...}`` when the same run had already finished.
    """
    from jsae import outputs

    run_dir = Path(cfg.run_dir)
    outputs.claim_run_dir(run_dir)
    preflight(cfg)
    is_main = jax.process_index() == 0
    lock = rundir.acquire_lock(run_dir, log=print_fn) if is_main else None
    try:
        admission = rundir.admit(cfg, fresh=fresh, write=is_main, log=print_fn)
        _sync("jsae run directory admitted")
        if admission.finished:
            print_fn(f"jsae train: {run_dir} already holds this run, finished (saes/ with the "
                     "same config): nothing to do; `--fresh` trains it again (the old run is "
                     "moved aside)")
            return {"finished": True, **_read_summary(run_dir)}
        for note in admission.notes:
            print_fn(f"note: {note}")
        return _train(cfg, run_dir, print_fn)
    finally:
        if lock is not None:
            lock.release()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _read_summary(run_dir: Path) -> dict:
    import json

    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def check_heldout(cfg: RunConfig, source) -> None:
    """Fail at the start, not after training, when there is nothing to evaluate on."""
    batch = next(iter(source.eval_batches(1, 1)), None)
    if batch is None or not len(next(iter(batch.values()))):
        where = f" of {cfg.data.path}" if cfg.data.path else ""
        raise ConfigError(
            f"config key 'data.holdout_fraction': {cfg.data.holdout_fraction} of the "
            f"{cfg.data.source} data{where} leaves no held-out activations to evaluate on; "
            "raise data.holdout_fraction (e.g. 0.02) or use more data")


def _train(cfg: RunConfig, run_dir: Path, print_fn) -> dict:
    print_fn(
        f"jsae train: {cfg.sae.architecture} SAE on {cfg.data.source} data, "
        f"{cfg.resolved_steps()} steps x {cfg.train.batch_size} tokens, "
        f"{jax.device_count()} {jax.default_backend()} device(s), mesh data={cfg.mesh.data} "
        f"model={cfg.mesh.model}, run dir {run_dir}"
    )
    source = make_source(cfg, jax.process_index(), jax.process_count())
    check_heldout(cfg, source)
    trainer = Trainer(cfg, source)
    checkpointer = _make_checkpointer(cfg, trainer)
    try:
        eval_fn = None
        if cfg.eval.every_steps:
            from jsae.evals import make_eval_fn

            eval_fn = make_eval_fn(cfg)
        summary = trainer.fit(checkpointer=checkpointer, eval_fn=eval_fn, log=print_fn)
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
        rec = dictionary_recovery(parallel.to_host(trainer.states[hook].sae), source.features)
        summary["recovery"] = rec
        print_fn(f"ground-truth recovery (mean best cosine of true features): {rec:.3f}")
    model = getattr(source, "model", None)
    if model is not None and cfg.eval.show_features > 0:
        for hook in trainer.hooks:
            sae = parallel.to_host(trainer.states[hook].sae)  # collective: every process
            if jax.process_index() == 0:
                show_features(cfg, model, sae, hook, print_fn)
    for hook, m in summary["heldout"].items():
        print_fn(f"final held-out FVU [{hook}]: {m['fvu']:.4f} (L0 {m['l0']:.1f}, "
                 f"dead {m['dead_frac']:.3f})")
    print_fn(f"saved SAEs under {run_dir / 'saes'}; metrics in {run_dir / 'metrics.csv'}")
    return summary


def show_features(cfg: RunConfig, model, sae, hook: str, print_fn=print) -> list[int]:
    """Print top-activating snippets (activating token in «») for a few live features.

    Features are drawn at random (seeded) among those that fire on 0.01%-2% of the analysed
    tokens, so what is shown is typical, not hand-picked. Returns the feature ids shown.
    """
    import numpy as np

    from jsae.analysis.corpus import corpus_contexts
    from jsae.analysis.render import render_snippets
    from jsae.analysis.top import top_activations

    n_ctx = cfg.eval.show_features_contexts
    contexts, mask = corpus_contexts(model.tokenizer, n_ctx, 64, seed=cfg.seed + 1)
    top = top_activations(model, sae, hook, contexts, mask, top_n=5, batch_size=16)
    freq = top.frequency
    live = np.flatnonzero((freq > 1e-4) & (freq < 0.02))
    if len(live) == 0:
        live = np.flatnonzero(freq > 0)
    rng = np.random.default_rng(cfg.seed)
    shown = sorted(rng.choice(live, min(cfg.eval.show_features, len(live)), replace=False).tolist())
    print_fn(f"\nWhat some features of {hook} mean (top-activating snippets over "
             f"{len(contexts)} contexts of the offline corpus; activating token in «»):")
    for f in shown:
        print_fn(f"\nfeature {f}  (fires on {100 * freq[f]:.2f}% of tokens)")
        for line in render_snippets(model.tokenizer, contexts, top, f, n=4, left=10, right=3):
            print_fn("  " + line)
    return shown
