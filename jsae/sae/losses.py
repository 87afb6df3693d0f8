"""Per-architecture training losses, in normalised activation space.

Reconstruction is the squared error summed over d_in and averaged over tokens
(the convention of Anthropic and Gemma Scope); sparsity coefficients are relative to it.

- relu:      + l1 * sum_i z_i * ||W_dec_i||  (April-2024 "anthropic" variant; "standard"
             uses sum_i z_i with unit decoder rows)
- topk / batchtopk: + aux_coef * AuxK (Gao et al. 2024): the top aux_k *dead* latents
             reconstruct the residual e = x - x_hat (treated as a constant target)
- jumprelu:  + l0 * sum_i H(pre_i - theta_i)   (straight-through threshold gradient)
- gated:     + l1 * sum_i relu(pi_gate_i) * ||W_dec_i||
             + || x - (relu(pi_gate) sg(W_dec) + sg(b_dec)) ||^2   (Rajamanoharan et al. 2024)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsae.sae.core import SAE, _mm, activate, decode_normalized, pre_activations
from jsae.sae.jumprelu import heaviside_ste
from jsae.sae.topk import scatter_rows

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
) -> tuple[Array, dict[str, Array]]:
    """Total loss and its parts for normalised inputs ``x_n [B, d_in]``.

    Returns (loss, aux) where aux holds the loss terms, the codes ``z [B, d_sae]`` and
    ``pre [B, d_sae]`` for metrics and dead-latent tracking.  ``mesh`` (the training mesh)
    lets a TopK SAE whose latents are split over ``model`` take the sharded fast path;
    ``batch_topk_fn`` (a mesh of several devices) makes BatchTopK select without gathering.
    """
    spec, p = sae.spec, sae.params
    from jsae.sae import fast, fast_sharded

    if fast.fast_applies(sae, topk_fn, batch_topk_fn):  # same values/gradients; aux["z"] is SparseCodes
        return fast.fast_sae_loss(sae, x_n, dead_mask=dead_mask, aux_coef=aux_coef)
    if fast_sharded.applies(sae, mesh):
        return fast_sharded.sharded_fast_sae_loss(sae, x_n, mesh, dead_mask=dead_mask,
                                                  aux_coef=aux_coef)
    pre = pre_activations(sae, x_n)
    z = activate(sae, pre, x_n, train=True, topk_fn=topk_fn, batch_topk_fn=batch_topk_fn)
    x_hat = decode_normalized(sae, z)
    recon = jnp.sum((x_hat - x_n) ** 2, axis=-1).mean()
    terms: dict[str, Array] = {"recon": recon}
    arch = spec.architecture
    dec_norm = jnp.linalg.norm(p["W_dec"], axis=-1)  # [d_sae]
    if arch == "relu":
        weight = dec_norm if spec.l1_variant == "anthropic" else 1.0
        terms["sparsity"] = sparsity_coef * jnp.sum(z * weight, axis=-1).mean()
    elif arch in ("topk", "batchtopk"):
        if dead_mask is None:
            dead_mask = jnp.zeros((spec.d_sae,), bool)
        terms["auxk"] = aux_coef * auxk_loss(sae, pre, x_n - x_hat, dead_mask, topk_fn)
    elif arch == "jumprelu":
        l0 = heaviside_ste(pre, jnp.exp(p["log_threshold"]), spec.jumprelu_bandwidth)
        terms["sparsity"] = sparsity_coef * jnp.sum(l0, axis=-1).mean()
    elif arch == "gated":
        gate_act = jax.nn.relu(pre)
        terms["sparsity"] = sparsity_coef * jnp.sum(gate_act * dec_norm, axis=-1).mean()
        frozen = _mm(gate_act, jax.lax.stop_gradient(p["W_dec"]), spec.compute_dtype)
        frozen = frozen + jax.lax.stop_gradient(p["b_dec"])
        terms["gate_aux"] = jnp.sum((frozen - x_n) ** 2, axis=-1).mean()
    else:
        raise ValueError(f"unknown SAE architecture {arch!r}")
    loss = sum(terms.values())
    return loss, {**terms, "z": z, "x_hat": x_hat, "pre": pre}
