"""The training loss, in normalised activation space: reconstruction + the architecture's terms.

Reconstruction is the squared error summed over d_in and averaged over tokens
(the convention of Anthropic and Gemma Scope); sparsity coefficients are relative to it.
Each architecture's own terms (L1, L0, AuxK, the gate's aux loss...) are documented in its
module in `jsae.sae.archs`.  AuxK (Gao et al. 2024), shared by topk and batchtopk, lives
here: the top aux_k *dead* latents reconstruct the residual e = x - x_hat (a constant target).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsae.sae.archs import LossInputs, get_arch
from jsae.sae.core import SAE, activate, decode_normalized, pre_activations
from jsae.sae.selection import scatter_rows
from jsae.sae.spec import mm as _mm

Array = jax.Array


def auxk_loss(sae: SAE, pre: Array, residual: Array, dead_mask: Array, topk_fn=None) -> Array:
    """AuxK: reconstruct ``residual [B, d_in]`` from the top aux_k dead latents of ``pre``.

    Skipped (zero, no work) when no latent is dead.  ``topk_fn`` (the sharded top-k of
    `jsae.parallel`) keeps the selection sharded over latents instead of gathering ``pre``.
    """
    k_aux = sae.spec.aux_k_resolved

    def compute(operands):
        pre, residual, dead_mask = operands
        masked = jnp.where(dead_mask, pre, -jnp.inf)
        if topk_fn is not None:  # dense result, zeros outside the kept (finite) entries
            kept = topk_fn(masked, k_aux)
            z_aux = jnp.where(jnp.isfinite(kept), jax.nn.relu(kept), 0.0)
        else:
            vals, idx = jax.lax.top_k(masked, k_aux)
            vals = jnp.where(jnp.isfinite(vals), jax.nn.relu(vals), 0.0)
            z_aux = scatter_rows(vals, idx, pre.shape[-1])
        e_hat = _mm(z_aux, sae.params["W_dec"], sae.spec.compute_dtype)
        return jnp.sum((e_hat - jax.lax.stop_gradient(residual)) ** 2, axis=-1).mean()

    return jax.lax.cond(
        jnp.any(dead_mask), compute, lambda _: jnp.zeros((), jnp.float32),
        (pre, residual, dead_mask),
    )


def sae_loss(
    sae: SAE,
    x_n: Array,
    *,
    sparsity_coef: Array | float,
    dead_mask: Array | None = None,
    aux_coef: float = 1.0 / 32.0,
    topk_fn=None,
    mesh=None,
    batch_topk_fn=None,
    x_target: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Total loss and its parts for normalised inputs ``x_n [B, ...]``.

    ``x_target`` (normalised, default ``x_n``) is what the dictionary reconstructs: another
    hook for a transcoder.  Returns (loss, aux) where aux holds the loss terms, the codes
    ``z [B, d_sae]`` and ``pre [B, d_sae]`` for metrics and dead-latent tracking.  ``mesh``
    (the training mesh) lets a TopK SAE whose latents are split over ``model`` take the
    sharded fast path; ``batch_topk_fn`` (a mesh of several devices) makes BatchTopK select
    without gathering.
    """
    from jsae.sae import fast, fast_sharded

    arch = get_arch(sae.spec.architecture)
    if dead_mask is None:
        dead_mask = jnp.zeros((sae.spec.d_sae,), bool)
    target = x_n if x_target is None else x_target
    if fast.fast_applies(sae, topk_fn, batch_topk_fn):  # same values/gradients; aux["z"] is SparseCodes
        return fast.fast_sae_loss(sae, x_n, dead_mask=dead_mask, aux_coef=aux_coef,
                                  x_target=x_target)
    if fast_sharded.applies(sae, mesh):
        return fast_sharded.sharded_fast_sae_loss(sae, x_n, mesh, dead_mask=dead_mask,
                                                  aux_coef=aux_coef, x_target=x_target)
    pre = pre_activations(sae, x_n)
    z = activate(sae, pre, x_n, train=True, topk_fn=topk_fn, batch_topk_fn=batch_topk_fn)
    x_hat = decode_normalized(sae, z, x_n)
    terms: dict[str, Array] = {"recon": arch.recon_loss(sae, x_hat, target)}
    terms.update(arch.loss_terms(sae, LossInputs(
        x_in=x_n, x_target=target, pre=pre, z=z, x_hat=x_hat, sparsity_coef=sparsity_coef,
        dead_mask=dead_mask, aux_coef=aux_coef, topk_fn=topk_fn)))
    loss = sum(terms.values())
    return loss, {**terms, "z": z, "x_hat": x_hat, "pre": pre}
