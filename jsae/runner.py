"""`run_training(cfg)`: the whole `jsae train` job.

The walk, each module once: `jsae.train.preflight` (the config against the devices), the run
directory opened (`jsae.train.run.Run`: claim, lock, admission), the source
(`jsae.data.make_source`), the `Trainer` and its checkpointer (`jsae.train.checkpoint`),
`Run.train` (start or resume, accept, `Trainer.fit`, the dictionaries and ``summary.json``),
then the report printed here, and the lock released.
"""

from __future__ import annotations

import jax

from jsae import parallel
from jsae.config import ConfigError, RunConfig
from jsae.data import make_source
from jsae.data.sources import SyntheticSource
from jsae.evals.reconstruction import dictionary_recovery
from jsae.runs import split_member
from jsae.train.loop import NO_CHECKPOINTS, Checkpointer, Trainer, TrainingStopped
from jsae.train.preflight import preflight
from jsae.train.run import Run


def _make_checkpointer(cfg: RunConfig, trainer: Trainer) -> Checkpointer:
    if not cfg.checkpoint.enabled:
        return NO_CHECKPOINTS
    try:
        from jsae.train.checkpoint import RunCheckpointer
    except ImportError:
        return NO_CHECKPOINTS
    return RunCheckpointer(cfg, trainer)


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal, checkpoint saved, rerun to resume


def run_training(cfg: RunConfig, *, fresh: bool = False, print_fn=print) -> dict:
    """Train as ``cfg`` says in its run directory, guarded (see `jsae.train.run`).

    Everything that can be checked before work is checked first (config against the devices,
    the run directory's lock and contents, the held-out data), and nothing in the run
    directory changes until the run is accepted. Returns the summary; ``{"stopped_at": step}``
    after a SIGTERM, ``{"finished": True, ...}`` when the same run had already finished.
    """
    preflight(cfg)
    with Run(cfg, log=print_fn) as run:
        admission = run.open(fresh=fresh)
        if admission.finished:
            print_fn(f"jsae train: {run.dir} already holds this run, finished (saes/ with the "
                     "same config): nothing to do; `--fresh` trains it again (the old run is "
                     "moved aside)")
            return {"finished": True, **run.summary()}
        for note in admission.notes:
            print_fn(f"note: {note}")
        return _train(cfg, run, print_fn)


def check_heldout(cfg: RunConfig, source) -> None:
    """Fail at the start, not after training, when there is nothing to evaluate on."""
    batch = next(iter(source.eval_batches(1, 1)), None)
    if batch is None or not len(next(iter(batch.values()))):
        where = f" of {cfg.data.path}" if cfg.data.path else ""
        raise ConfigError(
            f"config key 'data.holdout_fraction': {cfg.data.holdout_fraction} of the "
            f"{cfg.data.source} data{where} leaves no held-out activations to evaluate on; "
            "raise data.holdout_fraction (e.g. 0.02) or use more data")


def _train(cfg: RunConfig, run: Run, print_fn) -> dict:
    if cfg.family:
        what = "transcoder sets" if cfg.sae.layers is not None else "dictionaries"
        print_fn(f"jsae train: a family of {len(cfg.family)} {what} from one pass: "
                 + ", ".join(m.name for m in cfg.family))
    print_fn(
        f"jsae train: {cfg.sae.architecture} SAE on {cfg.data.source} data, "
        f"{cfg.resolved_steps()} steps x {cfg.train.batch_size} tokens, "
        f"{jax.device_count()} {jax.default_backend()} device(s), mesh data={cfg.mesh.data} "
        f"model={cfg.mesh.model}, run dir {run.dir}"
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
        summary = run.train(trainer, checkpointer=checkpointer, eval_fn=eval_fn)
    except TrainingStopped as stop:
        if getattr(checkpointer, "interrupted", False):  # Ctrl-C: saved; ends as an interrupt
            raise KeyboardInterrupt from None
        print_fn(f"stopped at step {stop.step} (SIGTERM): checkpoint saved in "
                 f"{run.dir / 'checkpoints'}; run the same command again to resume")
        return {"stopped_at": stop.step}
    finally:
        checkpointer.close()
    _report(cfg, trainer, source, summary, print_fn)
    print_fn(f"saved SAEs under {run.dir / 'saes'}; metrics in {run.dir / 'metrics.csv'}")
    return summary


def _report(cfg: RunConfig, trainer: Trainer, source, summary: dict, print_fn) -> None:
    """What the run learned, printed once: ground-truth recovery (synthetic data), a few
    features' top snippets (an LM source), then the held-out metrics of each dictionary.
    ``summary`` gains ``recovery`` (not written to summary.json)."""
    if isinstance(source, SyntheticSource):
        hook = trainer.hooks[0]
        rec = dictionary_recovery(parallel.to_host(trainer.states[hook].sae), source.features)
        summary["recovery"] = rec
        print_fn(f"ground-truth recovery (mean best cosine of true features): {rec:.3f}")
    model = getattr(source, "model", None)
    if model is not None and cfg.eval.show_features > 0:
        for hook in trainer.hooks:
            sae = parallel.to_host(trainer.states[hook].sae)  # collective: every process
            if jax.process_index() == 0:  # a family member reads its hook's activations
                show_features(cfg, model, sae, split_member(hook)[0], print_fn)
    for hook, m in summary["heldout"].items():
        print_fn(
            f"[{hook}] held-out: FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  "
            f"dead {m['dead_frac']:.3f}  cos {m['cos_sim']:.3f}  ({int(m['tokens'])} tokens)"
        )


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
