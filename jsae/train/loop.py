"""The training loop: one jitted, sharded step over one SAE per hook point (a transcoder: one
per input hook, reconstructing its output hook from the same LM pass); a family (``family``)
trains several dictionaries per hook from the same batches, one jitted step per member.

``Trainer`` owns the mesh, the jitted step and the states. ``Trainer.start`` asks the
checkpointer for the states to continue from (or makes fresh ones); ``Trainer.fit`` pulls
batches from an ActivationSource, steps, hands metrics to a callback, stops a diverging run,
saves checkpoints and returns the final states with their held-out metrics. It writes nothing
in the run directory but checkpoints: the run directory's life is `jsae.train.run.Run`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from jsae import parallel
from jsae.config import ConfigError, RunConfig, member_config, template_layer, transcoder_pairs
from jsae.errors import JsaeError
from jsae.evals.reconstruction import ReconstructionStats, batch_sums
from jsae.runs import KEY_JOIN, input_hooks, member_key, split_member
from jsae.sae.archs import get_arch
from jsae.sae.core import SAESpec
from jsae.sae.init import init_sae
from jsae.train.divergence import DivergenceGuard, TrainingDiverged
from jsae.train.eval_points import at_steps
from jsae.train.metrics_log import flatten_metrics
from jsae.train.optim import lr_schedule, make_optimizer, sparsity_schedule
from jsae.train.state import TrainState, init_state
from jsae.train.step import make_train_step

States = dict[str, TrainState]
MetricsFn = Callable[[int, dict[str, float]], None]  # (step, flat metrics) -> None


class DataPositionError(JsaeError, ValueError):
    """A checkpoint's saved data position that does not fit the configured data source."""


class Checkpointer(Protocol):
    """What the loop needs from a checkpoint manager (`jsae.train.checkpoint.RunCheckpointer`;
    :class:`NoCheckpoints` for a run that keeps none). It owns stop requests too: SIGTERM
    means "save and stop", which only a run with checkpoints can honour."""

    def restore(self, template: States) -> tuple[States, dict] | None:
        """(states, this process's data position) of the newest good checkpoint, or None."""
    def save(self, step: int, states: States, data_state: dict | Callable[[], dict], *,
             force: bool = False) -> None:
        """Save when ``step`` is due (always with ``force``); a callable ``data_state`` is only
        called for a step that is saved."""
    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (a collective on several hosts)."""
    def describe_last_good(self) -> str:
        """Where the last good checkpoint is, for an error message ('' when there is none)."""
    def close(self) -> None:
        """Finish saves in flight; give back what the checkpointer holds (signal handlers)."""


class NoCheckpoints:
    """The :class:`Checkpointer` of a run without checkpoints: nothing to restore or save, never
    asked to stop (SIGTERM keeps its default action: the process ends)."""

    def restore(self, template: States) -> None:
        return None

    def save(self, step: int, states: States, data_state, *, force: bool = False) -> None:
        return None

    def stop_requested(self) -> bool:
        return False

    def describe_last_good(self) -> str:
        return ""

    def close(self) -> None:
        return None


NO_CHECKPOINTS = NoCheckpoints()


class Fitted(NamedTuple):
    """What :meth:`Trainer.fit` returns: the final states and their held-out metrics per key."""

    states: States
    heldout: dict[str, dict[str, float]]


def _check_finite_loss(losses, step: int, bar, last_good: Callable[[], str] | None) -> None:
    """Stop at the first step whose loss is not finite, not at the next logging step. Called
    after the following step is queued, so reading the scalar does not stall the device.
    ``last_good`` (the checkpointer's ``describe_last_good``) is only called then."""
    if all(np.isfinite(float(x)) for x in losses):
        return
    bar.close()
    hint = last_good() if last_good is not None else ""
    raise TrainingDiverged(f"non-finite loss at step {step}; lower train.lr or check the input "
                           "activations" + (f"; {hint}" if hint else ""))


INT32_MAX = 2**31 - 1


def check_index_range(d_sae: int, model: int = 1) -> None:
    """Latent ids are int32 (`lax.top_k`, scatter indices): at most 2^31 - 1 latents."""
    if d_sae > INT32_MAX:
        raise ConfigError(
            f"config key 'sae.d_sae': {d_sae:,} latents is beyond the int32 latent index that "
            f"jsae's top-k and sparse decoder use (at most {INT32_MAX:,}, on any mesh); use a "
            "smaller sae.d_sae")


def spec_from_config(cfg: RunConfig, d_in: int, n_hooks: int = 1) -> SAESpec:
    """The spec of one dictionary over ``n_hooks`` hooks of width ``d_in``."""
    s = cfg.sae
    arch = get_arch(s.architecture)
    options = arch.config_options(s.options, n_hooks=n_hooks)
    d_sae = cfg.resolved_d_sae(d_in)
    try:
        arch.check(options, d_sae)
    except ValueError as e:  # an OptionError names its key
        raise ConfigError(f"config key {e}") from None
    return SAESpec(s.architecture, d_in, d_sae, options, aux_k=s.aux_k, dtype=s.dtype,
                   fast_path=s.fast_path, topk_recall=s.topk_recall, topk_chunk=s.topk_chunk)


def _sparsity_coef(cfg: RunConfig) -> float:
    return get_arch(cfg.sae.architecture).sparsity_coef(cfg.sae.options)


def _gather_sample(local: np.ndarray) -> np.ndarray:
    """Every process initialises from the same sample (the union of local samples)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


class Trainer:
    def __init__(self, cfg: RunConfig, source, *, mesh=None):
        self.cfg, self.source = cfg, source
        self.source_hooks: list[str] = list(source.hooks)
        # one dictionary per key: inputs[key] the hooks it reads (one; a crosscoder's several,
        # stacked [B, L, d]), targets[key] the hook it reconstructs (a transcoder's other one;
        # a cross-layer transcoder's several, joined); a set: one transcoder per layer
        inputs, targets = _layout(cfg, self.source_hooks, source.d_in)
        # a family: each member's keys (`member_key`: its hook's key @ its name), its config;
        # one dictionary: the group None, the run's config. base_index[key]: the position of
        # its hook's key in the layout, which picks its init key as in a run of it alone
        self.member_cfgs: dict[str | None, RunConfig] = (
            {m.name: member_config(cfg, i) for i, m in enumerate(cfg.family)}
            if cfg.family else {None: cfg})
        self.members: dict[str | None, list[str]] = {}
        self.inputs, self.targets, self.base_index = {}, {}, {}
        for name in self.member_cfgs:
            for i, h in enumerate(inputs):
                k = h if name is None else member_key(h, name)
                self.members.setdefault(name, []).append(k)
                self.inputs[k] = inputs[h]
                self.targets[k] = k if targets[h] == h else targets[h]
                self.base_index[k] = i
        self.hooks: list[str] = list(self.targets)
        self.layers = _set_layers(cfg, self.inputs)
        self.mesh = mesh or parallel.make_mesh(cfg.mesh.data, cfg.mesh.model)
        self.total_steps = cfg.resolved_steps()
        # steps of eval.at_tokens: held-out points for scaling laws (the last is the final eval)
        self.eval_at = set(at_steps(cfg.eval.at_tokens, cfg.train.batch_size, self.total_steps))
        self.specs = {h: spec_from_config(self.cfg_of(h), source.d_in[self.inputs[h][0]],
                                          n_hooks=len(self.inputs[h])) for h in self.hooks}
        _check_widths(cfg, self.inputs, self.targets, source.d_in)
        for spec in self.specs.values():
            try:
                parallel.check_divisible(self.mesh, batch_size=cfg.train.batch_size,
                                         d_sae=spec.d_sae)
            except ValueError as e:
                raise ConfigError(f"{e}; change the config or the mesh") from None
            check_index_range(spec.d_sae, self.mesh.shape[parallel.MODEL])
        self.local_batch = cfg.train.batch_size // jax.process_count()
        # each member its own optimizer and schedules (the run's own for one dictionary)
        self.optimizers, step_fns = {}, {}
        for name, mcfg in self.member_cfgs.items():
            optimizer = make_optimizer(mcfg, self.total_steps)
            step_fn = make_train_step(
                optimizer,
                sparsity_schedule(_sparsity_coef(mcfg), mcfg.train.sparsity_warmup_steps),
                lr_schedule(mcfg, self.total_steps),
                dead_after_tokens=mcfg.sae.dead_after_tokens, aux_coef=mcfg.sae.aux_coef,
                mesh=self.mesh,
            )
            for k in self.members[name]:
                self.optimizers[k], step_fns[k] = optimizer, step_fn
        self.optimizer = self.optimizers[self.hooks[0]]

        targets, inputs = self.targets, self.inputs

        def multi_step(states: States, batches: dict[str, jax.Array]):
            out = {h: step_fns[h](states[h], _rows(batches, inputs[h], jax.numpy),
                                  None if targets[h] == h
                                  else _rows(batches, input_hooks(targets[h]), jax.numpy))
                   for h in states}
            return {h: o[0] for h, o in out.items()}, {h: o[1] for h, o in out.items()}

        # one dictionary: one jitted step over every key; a family: one per member, over its
        # keys, the very program a run of that member alone compiles (so its parameters are
        # bitwise the same), all fed the one batch
        self._multi_step = multi_step
        self._jitted = None
        self._eval_fns: dict | None = None  # per hook, built on first evaluation
        self.states: States | None = None

    # ---- state ------------------------------------------------------------------------
    def cfg_of(self, key: str) -> RunConfig:
        """The config dictionary ``key`` trains with (a family member's own)."""
        return self.member_cfgs[split_member(key)[1] if self.cfg.family else None]

    @property
    def family(self) -> list[str]:
        """The members' names ([] for a run of one dictionary)."""
        return [n for n in self.member_cfgs if n is not None]

    def init_states(self) -> States:
        """Fresh states: normalisation and b_dec from a sample of the source's data (one
        sample for every member of a family; each member's init key as in a run of it alone)."""
        cfg = self.cfg
        sample = self.source.next_batch(max(cfg.sae.init_sample // jax.process_count(), 1))
        key = jax.random.key(cfg.seed)
        states = {}
        for h in self.hooks:
            k_init, k_state = jax.random.split(jax.random.fold_in(key, self.base_index[h]))
            # The width folded in: with JAX's partitionable threefry, normal(key, (N, d)) is the
            # first N rows of normal(key, (2N, d)), so dictionaries of different widths from one
            # seed (a family's members) would start with shared rows and `jsae families` would
            # match their initialisation, not what they learned.
            k_init = jax.random.fold_in(k_init, self.specs[h].d_sae)
            t, s = self.targets[h], self.cfg_of(h).sae
            sae = init_sae(
                k_init, self.specs[h], _gather_sample(_rows(sample, self.inputs[h])),
                normalize=s.normalize,
                b_dec_init=s.b_dec_init,
                target_sample=None if t == h else _gather_sample(_rows(sample, input_hooks(t))),
            )
            states[h] = init_state(sae, self.optimizers[h], k_state)
        return self.place(states)

    def state_shardings(self, states: States):
        return parallel.tree_shardings(states, self.mesh)

    def place(self, states: States) -> States:
        """Put states on the mesh with the shardings from `jsae.parallel`."""
        return jax.device_put(states, self.state_shardings(states))

    def _jit_step(self, states: States):
        """The jitted step over ``states``' keys (shardings from them; states donated)."""
        st_sh = self.state_shardings(states)
        b_sh = {h: parallel.batch_sharding(self.mesh) for h in self.source_hooks}
        return jax.jit(
            self._multi_step,
            in_shardings=(st_sh, b_sh),
            out_shardings=(st_sh, parallel.replicated(self.mesh)),
            donate_argnums=(0,),
        )

    def member_steps(self, states: States) -> dict:
        """A family's jitted step per member (over that member's keys of ``states``)."""
        return {name: self._jit_step({k: states[k] for k in keys})
                for name, keys in self.members.items()}

    def _compiled(self, states: States):
        if self._jitted is None:
            if not self.family:
                self._jitted = self._jit_step(states)
            else:
                steps, members = self.member_steps(states), self.members

                def family_step(states: States, batches):
                    new, metrics = {}, {}
                    for name, keys in members.items():  # dispatched asynchronously, in turn
                        s, m = steps[name]({k: states[k] for k in keys}, batches)
                        new.update(s)
                        metrics.update(m)
                    return new, metrics

                self._jitted = family_step
        return self._jitted

    def step(self, states: States, local_batches: dict[str, np.ndarray]):
        batches = {h: parallel.global_batch(local_batches[h], self.mesh)
                   for h in self.source_hooks}
        return self._compiled(states)(states, batches)

    # ---- evaluation -------------------------------------------------------------------
    def host_saes(self, states: States) -> dict:
        """Each hook's SAE as NumPy arrays on every process (a collective on several hosts)."""
        return {h: parallel.to_host(states[h].sae) for h in self.hooks}

    def evaluate(self, states: States, n_tokens: int | None = None
                 ) -> dict[str, dict[str, float]]:
        """Held-out reconstruction metrics per hook (FVU, L0, ...), computed on the mesh.

        The SAEs stay sharded as they train (no host copy, so a dictionary bigger than one
        chip evaluates too); each process feeds its own share of ``n_tokens`` held-out rows
        (zero-weight padding once a share runs out, so every process makes the same calls),
        and the sums over the global batch come back replicated to every process.
        """
        n_tokens = n_tokens or self.cfg.eval.tokens
        procs, n_data = jax.process_count(), self.mesh.shape[parallel.DATA]
        share = max(n_tokens // procs, 1)  # held-out rows per process
        rows = min(self.local_batch, 4096)  # per process and call; the mesh must split them
        while rows > 1 and (rows * procs) % n_data:
            rows -= 1
        if (rows * procs) % n_data:  # a data axis of over 4096: whole local batches
            rows = self.local_batch
        n_batches = -(-share // rows)
        stats = {h: ReconstructionStats() for h in self.hooks}
        fn = self._eval_sums(states)
        it = self.source.eval_batches(share, rows)
        for _ in range(n_batches):
            batch = next(it, None)
            for h in self.hooks:
                ins, outs = self.inputs[h], input_hooks(self.targets[h])
                d = self.source.d_in[ins[0]]
                x = np.zeros((rows, *((len(ins),) if len(ins) > 1 else ()), d), np.float32)
                y = (np.zeros((rows, *((len(outs),) if len(outs) > 1 else ()), d), np.float32)
                     if self.targets[h] != h else None)
                w = np.zeros((rows,), bool)
                if batch is not None:
                    n = len(batch[ins[0]])
                    x[:n], w[:n] = _rows(batch, ins), True
                    if y is not None:
                        y[:n] = _rows(batch, outs)
                args = [states[h].sae, parallel.global_batch(x, self.mesh),
                        parallel.global_batch(w, self.mesh)]
                if y is not None:
                    args.append(parallel.global_batch(y, self.mesh))
                stats[h].add_sums(fn[h](*args))
        return {h: s.result() for h, s in stats.items()}

    def _eval_sums(self, states: States) -> dict:
        """Per hook, `batch_sums` jitted with the training shardings (sharded top-k for TopK);
        a transcoder's takes its output hook's rows as a fourth argument."""
        if self._eval_fns is None:
            topk_fn = parallel.sharded_topk_fn(self.mesh)
            self._eval_fns = {}
            for h in self.hooks:
                sae_sh = parallel.tree_shardings(states[h].sae, self.mesh)
                rows_sh = parallel.batch_sharding(self.mesh)
                in_sh = (sae_sh, rows_sh, parallel.batch_sharding(self.mesh, 1))
                if self.targets[h] != h:
                    in_sh = (*in_sh, rows_sh)

                def sums(sae, x, w, x_target=None):
                    return batch_sums(sae, x, w, topk_fn=topk_fn, x_target=x_target)

                self._eval_fns[h] = jax.jit(sums, in_shardings=in_sh,
                                            out_shardings=parallel.replicated(self.mesh))
        return self._eval_fns

    # ---- the loop ---------------------------------------------------------------------
    def start(self, checkpointer: Checkpointer = NO_CHECKPOINTS, *,
              log: Callable[[str], None] = print) -> States:
        """The states to train from: the checkpointer's newest (the source moved to its saved
        data position) or, when there is none, fresh ones. Writes nothing but what restoring
        does (a damaged checkpoint moved aside)."""
        restored = checkpointer.restore(self._template())
        if restored is None:
            return self.init_states()
        states, data_state = restored
        where = Path(self.cfg.run_dir)
        try:
            self.source.restore(data_state)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise DataPositionError(
                f"the checkpoint in {where / 'checkpoints'} cannot resume this data "
                f"source: {' '.join(str(e).split())}; restore the config's data section, "
                "or start over with `jsae train --fresh` (the old run is moved aside)"
            ) from e
        log(f"resuming from step {int(states[self.hooks[0]].step)} (checkpoint in {where})"
            + (f" for the family {', '.join(self.family)}" if self.family else ""))
        return states

    def step_of(self, states: States) -> int:
        """The step ``states`` have reached (every key's is the same)."""
        return int(jax.device_get(states[self.hooks[0]].step))

    def fit(
        self,
        states: States | None = None,
        *,
        checkpointer: Checkpointer = NO_CHECKPOINTS,
        eval_fn: Callable[[Trainer, States], dict[str, float]] | None = None,
        on_metrics: MetricsFn | None = None,
        log: Callable[[str], None] = print,
    ) -> Fitted:
        """Train from ``states`` (default: :meth:`start`) to the configured step.

        Every ``train.log_every`` steps the flat metrics (with ``tokens_per_s``) go to
        ``on_metrics(step, metrics)`` after the divergence check, and every
        ``eval.every_steps`` the periodic evaluation (``eval_fn``, or held-out reconstruction)
        as ``eval_*`` keys. The checkpointer saves as it is due and once at the end; a stop
        request saves and raises :class:`TrainingStopped`. Returns the final states and their
        held-out metrics; ``self.states`` holds the states reached (also after a stop).
        """
        cfg = self.cfg
        if states is None:
            states = self.start(checkpointer, log=log)
        start = self.step_of(states)
        is_main = jax.process_index() == 0
        divergence = DivergenceGuard()

        multi = len(self.hooks) > 1
        bar = tqdm(
            total=self.total_steps, initial=start, unit="step", dynamic_ncols=True,
            disable=not (cfg.train.progress and is_main), desc="train",
        )
        t_last, step_last = time.perf_counter(), start
        metrics = None
        last_losses = None  # the previous step's losses, checked once the next step is queued
        for step in range(start, self.total_steps):
            batch = self.source.next_batch(self.local_batch)
            states, metrics = self.step(states, batch)
            done = step + 1
            if last_losses is not None:
                _check_finite_loss(last_losses, done - 1, bar, checkpointer.describe_last_good)
            last_losses = [metrics[h]["loss"] for h in self.hooks]
            bar.update(1)
            if done % cfg.train.log_every == 0 or done == self.total_steps:
                m = jax.device_get(metrics)
                now = time.perf_counter()
                tok_s = (done - step_last) * cfg.train.batch_size / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                flat = flatten_metrics(m, multi)
                flat["tokens_per_s"] = tok_s
                try:
                    divergence.check(done, flat, hint=checkpointer.describe_last_good)
                except TrainingDiverged:
                    bar.close()
                    raise
                if on_metrics is not None:
                    on_metrics(done, flat)
                if self.family:  # each member's figures on the one line (a set's: means
                    #               over its layers, each layer's are in metrics.csv)
                    n = len(self.members[self.family[0]])

                    def avg(keys, x, m=m):
                        return sum(float(m[k][x]) for k in keys) / len(keys)

                    bar.set_postfix_str(" | ".join(
                        f"{name}: fvu {avg(keys, 'fvu'):.3f} l0 {avg(keys, 'l0'):.1f} dead "
                        f"{avg(keys, 'dead_frac'):.2f}" for name, keys in self.members.items())
                        + (f" (means of {n} dictionaries)" if n > 1 else "")
                        + f" | tok/s {tok_s:,.0f}")
                else:
                    h0 = m[self.hooks[0]]
                    bar.set_postfix(
                        loss=f"{float(h0['loss']):.4g}", fvu=f"{float(h0['fvu']):.3f}",
                        l0=f"{float(h0['l0']):.1f}", dead=f"{float(h0['dead_frac']):.2f}",
                        tok_s=f"{tok_s:,.0f}",
                    )
            periodic = bool(cfg.eval.every_steps) and done % cfg.eval.every_steps == 0
            if (periodic or done in self.eval_at) and done < self.total_steps:
                # every process evaluates (collectives); the callback decides who writes
                ev = eval_fn(self, states) if eval_fn else flatten_metrics(self.evaluate(states), multi)
                if on_metrics is not None:
                    on_metrics(done, {f"eval_{k}": v for k, v in ev.items()})
            checkpointer.save(done, states, self.source.state)
            if done < self.total_steps and checkpointer.stop_requested():
                checkpointer.save(done, states, self.source.state, force=True)
                bar.close()
                self.states = states
                raise TrainingStopped(done)
        if last_losses is not None:
            _check_finite_loss(last_losses, self.total_steps, bar, checkpointer.describe_last_good)
        bar.close()
        checkpointer.save(self.total_steps, states, self.source.state, force=True)
        self.states = states
        return Fitted(states, self.evaluate(states))

    # ---- what is saved with each dictionary ------------------------------------------------
    def metadata(self, h: str) -> dict[str, Any]:
        """Dictionary ``h``'s sae.json metadata: its hooks (``hook_names`` / ``hook_names_out``
        when it reads / writes several, ``hook_name_out`` a transcoder's output) and layers; a
        family member's hook_name is its hook's key, ``family_member`` its name and ``family``
        every member's."""
        base, member = split_member(h)
        meta: dict[str, Any] = {"hook_name": base, "model_name": self.cfg.model.name}
        if member is not None:
            meta["family_member"], meta["family"] = member, self.family
        outs = input_hooks(self.targets[h])
        if len(self.inputs[h]) > 1:
            meta["hook_names"] = list(self.inputs[h])
        if self.targets[h] != h:
            meta["hook_name_out"] = self.targets[h]
            if len(outs) > 1:
                meta["hook_names_out"] = outs
        layers = self.layers.get(h)  # a set's: one transcoder's layer, or a CLT's layers
        if layers is not None and len(layers) > 1:
            meta["layers"] = layers
        elif layers is not None:
            meta["layer"] = layers[0]
        return meta

    def set_record(self) -> dict[str, Any] | None:
        """``saes/set.json`` of a set (``sae.layers``): its layers and, per layer, the
        dictionary key and the hooks it reads and writes; a family of sets: the keys of its
        hooks, the members' names (``family``) and architectures; None for any other run."""
        if self.cfg.sae.layers is None:
            return None
        first = self.members[next(iter(self.members))]  # a family's members share the layout
        bases = [split_member(h)[0] for h in first]
        keys = {L: b for h, b in zip(first, bases) for L in self.layers[h]}
        per_layer = [{"layer": template_layer(self.cfg.sae.input_hook, i), "input_hook": i,
                      "output_hook": o} for i, o in transcoder_pairs(self.cfg, self.source_hooks)]
        out = {"architecture": self.cfg.sae.architecture, "model_name": self.cfg.model.name,
               "layers": [p["layer"] for p in per_layer], "dictionaries": bases,
               "per_layer": [{**p, "key": keys[p["layer"]]} for p in per_layer]}
        if self.family:  # one set per member: its keys are these keys @ its name (`read_set`)
            out["family"] = self.family
            out["architectures"] = {n: c.sae.architecture for n, c in self.member_cfgs.items()}
        return out

    def _template(self) -> States:
        """Abstract states (shapes, dtypes, shardings) for restoring a checkpoint."""
        key = jax.random.key(self.cfg.seed)

        def make():
            out = {}
            for h in self.hooks:
                sae = init_sae(key, self.specs[h], None)
                out[h] = init_state(sae, self.optimizers[h], key)
            return out

        shapes = jax.eval_shape(make)
        shardings = self.state_shardings(shapes)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )


class TrainingStopped(Exception):
    """The run was asked to stop (SIGTERM) and saved a checkpoint at ``step``."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} on request (SIGTERM); checkpoint saved")
        self.step = step


def _rows(batch: dict, hooks: list[str], xp=np):
    """One hook's rows [B, d], or several hooks' stacked [B, L, d] (a crosscoder's input)."""
    return batch[hooks[0]] if len(hooks) == 1 else xp.stack([batch[h] for h in hooks], axis=1)


def _layout(cfg: RunConfig, source_hooks: list[str], d_in: dict[str, int]):
    """(inputs, targets): dictionary key -> the hooks it reads, and -> what it reconstructs
    (a key: one hook, or several joined with `KEY_JOIN`, read / written stacked [B, L, d]).

    An SAE per hook; a crosscoder (`multi_hook`) over every hook; a transcoder (`transcoder`)
    per (input, output) pair, one per layer of a set (``sae.layers``); a cross-layer transcoder
    (`transcoder` and `multi_hook`) reads every layer's input and writes every layer's output."""
    arch = get_arch(cfg.sae.architecture)
    if arch.transcoder:
        targets = _targets(cfg, source_hooks)
        if not arch.multi_hook:
            return {h: [h] for h in targets}, targets
        key, out = KEY_JOIN.join(targets), KEY_JOIN.join(targets.values())
        return {key: list(targets)}, {key: out}
    if arch.multi_hook:
        widths = {d_in[h] for h in source_hooks}
        if len(widths) > 1:
            raise ConfigError(f"config key 'model.hooks': the hooks that "
                              f"{cfg.sae.architecture} reads at once must have one width; got {dict((h, d_in[h]) for h in source_hooks)}")
        key = KEY_JOIN.join(source_hooks)
        return {key: list(source_hooks)}, {key: key}
    targets = _targets(cfg, source_hooks)
    return {h: [h] for h in targets}, targets


def _targets(cfg: RunConfig, source_hooks: list[str]) -> dict[str, str]:
    """Input hook -> the hook it reconstructs: a transcoder's pair, or every layer's of a set."""
    if not get_arch(cfg.sae.architecture).transcoder:
        return {h: h for h in source_hooks}
    pairs = transcoder_pairs(cfg, source_hooks)
    missing = [h for p in pairs for h in p if h not in source_hooks]
    if missing or not pairs:
        keys = "sae.layers" if cfg.sae.layers is not None else "sae.input_hook'/'sae.output_hook"
        raise ConfigError(
            f"config key '{keys}': the data source has no {', '.join(missing) or 'layer'} "
            f"(it has {', '.join(source_hooks)}); harvest both hooks of every layer "
            "(model.hooks, or the cache's hooks)")
    return dict(pairs)


def _check_widths(cfg: RunConfig, inputs: dict, targets: dict, d_in: dict[str, int]) -> None:
    """A transcoder maps a width to itself (an MLP's input and output), and a set's layers
    share one width (one spec, one export): else one line naming the key, before any work."""
    for h, t in targets.items():
        hooks = [*inputs[h], *input_hooks(t)]
        if len({d_in[x] for x in hooks}) > 1:
            key = "sae.layers" if cfg.sae.layers is not None else "sae.output_hook"
            raise ConfigError(f"config key '{key}': the hooks disagree in width ("
                              + ", ".join(f"{x} {d_in[x]}" for x in dict.fromkeys(hooks))
                              + "); jsae's transcoders map a width to itself (an MLP's input "
                              "and output)")
    if cfg.sae.layers is not None and len({d_in[inputs[h][0]] for h in targets}) > 1:
        raise ConfigError("config key 'sae.layers': the set's layers disagree in width ("
                          + ", ".join(f"{inputs[h][0]} {d_in[inputs[h][0]]}" for h in targets)
                          + "); a set has one width")


def _set_layers(cfg: RunConfig, inputs: dict) -> dict[str, list[int]]:
    """Dictionary key -> the layers it covers (a set's; empty for any other run)."""
    if cfg.sae.layers is None:
        return {}
    return {h: [template_layer(cfg.sae.input_hook, x) for x in ins] for h, ins in inputs.items()}


__all__ = ["Checkpointer", "Fitted", "NO_CHECKPOINTS", "NoCheckpoints", "Trainer",
           "TrainingStopped", "spec_from_config"]
