"""The pure training step: loss, gradients, decoder-norm handling, optimizer, bookkeeping."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jsae import parallel
from jsae.sae import fast
from jsae.sae.archs import get_arch
from jsae.sae.core import SAE
from jsae.sae.losses import sae_loss
from jsae.train.state import TrainState

Array = jax.Array

def _remove_parallel_grad(g_dec: Array, w_dec: Array) -> Array:
    """Drop the gradient component along each (unit) decoder row: rows stay on the sphere."""
    w_unit = w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)
    return g_dec - jnp.sum(g_dec * w_unit, axis=-1, keepdims=True) * w_unit


def _unit_rows(w: Array) -> Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def batch_metrics(x_n: Array, x_hat: Array, z: Array) -> dict[str, Array]:
    """L0, FVU and normalised MSE of one batch (all scalars)."""
    resid = jnp.sum((x_n - x_hat) ** 2)
    total = jnp.sum((x_n - x_n.mean(0)) ** 2)
    return {
        "l0": fast.l0(z),  # z: dense codes or fast.SparseCodes
        "fvu": resid / jnp.maximum(total, 1e-12),
        "mse": resid / x_n.size,
    }


def make_train_step(
    optimizer: optax.GradientTransformation,
    sparsity_schedule: optax.Schedule,
    lr_schedule: optax.Schedule,
    *,
    dead_after_tokens: int,
    aux_coef: float = 1.0 / 32.0,
    mesh=None,
) -> Callable[[TrainState, Array], tuple[TrainState, dict[str, Array]]]:
    """Build ``train_step(state, x [B, d_in] raw activations, x_target=None) -> (state,
    metrics)`` (pure). ``x_target [B, d_in]`` (raw): what a transcoder reconstructs (its output
    hook), scaled by the same ``norm_scale`` as ``x``; metrics then measure against it.

    ``mesh``: the training mesh; when it splits the latents over ``model`` the step uses the
    sharded selections of `jsae.parallel` and the sharded fast path.
    """
    topk_fn = None if mesh is None else parallel.sharded_topk_fn(mesh)
    batch_topk_fn = None if mesh is None else parallel.sharded_batch_topk_fn(mesh)

    def train_step(state: TrainState, x: Array, x_target: Array | None = None
                   ) -> tuple[TrainState, dict[str, Array]]:
        sae: SAE = state.sae
        spec = sae.spec
        arch = get_arch(spec.architecture)
        x_n = x.astype(jnp.float32) * sae.norm_scale
        y_n = None if x_target is None else x_target.astype(jnp.float32) * sae.norm_scale
        dead = state.fired_ago >= dead_after_tokens
        coef = sparsity_schedule(state.step)

        def loss_of(params):
            return sae_loss(
                sae.replace(params=params), x_n, sparsity_coef=coef, dead_mask=dead,
                aux_coef=aux_coef, topk_fn=topk_fn, mesh=mesh,
                batch_topk_fn=batch_topk_fn, x_target=y_n,
            )

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(sae.params)
        if spec.unit_decoder:
            grads = {**grads, "W_dec": _remove_parallel_grad(grads["W_dec"], sae.params["W_dec"])}
        for name in arch.frozen_params:  # set by arch.after_update or the init sample
            if name in grads:  # (a dictionary read from an older folder may lack it)
                grads = {**grads, name: jnp.zeros_like(grads[name])}
        grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        updates, opt_state = optimizer.update(grads, state.opt_state, sae.params)
        params = optax.apply_updates(sae.params, updates)
        if spec.unit_decoder:
            params["W_dec"] = _unit_rows(params["W_dec"])
        z = aux["z"]
        params = arch.after_update(params, z, state.step)
        fired = fast.fired(z)
        n_tok = jnp.int32(x.shape[0])
        fired_ago = jnp.where(
            fired, 0, jnp.minimum(state.fired_ago + n_tok, jnp.iinfo(jnp.int32).max - n_tok)
        )
        metrics = {
            "loss": loss,
            **{k: v for k, v in aux.items() if k not in ("z", "x_hat", "pre")},
            **batch_metrics(x_n if y_n is None else y_n, aux["x_hat"], z),
            "dead_frac": jnp.mean((fired_ago >= dead_after_tokens).astype(jnp.float32)),
            "grad_norm": grad_norm,
            "lr": lr_schedule(state.step),
            "sparsity_coef": jnp.asarray(coef, jnp.float32),
        }
        new_state = state.replace(
            step=state.step + 1,
            sae=sae.replace(params=params),
            opt_state=opt_state,
            fired_ago=fired_ago,
        )
        return new_state, metrics

    return train_step
