"""JumpReLU and Heaviside step with straight-through threshold gradients.

From "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders"
(Rajamanoharan et al. 2024), as used for Gemma Scope. With the rectangle kernel
K(u) = 1[|u| < 1/2] and bandwidth eps:

    jumprelu(pre, t) = pre * H(pre - t)
      d/d pre = H(pre - t)                 d/d t = -(t / eps) K((pre - t) / eps)
    H(pre - t)  (the L0 term)
      d/d pre = 0                          d/d t = -(1 / eps) K((pre - t) / eps)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _rect(u):
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu_ste(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """pre [..., d_sae] gated by per-latent threshold [d_sae]."""
    return jnp.where(pre > threshold, pre, 0.0)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu_ste(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    pre, threshold = res
    g_pre = g * (pre > threshold).astype(g.dtype)
    g_t = -(threshold / bandwidth) * _rect((pre - threshold) / bandwidth) * g
    g_t = g_t.reshape(-1, g_t.shape[-1]).sum(0)
    return g_pre, g_t


jumprelu_ste.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside_ste(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """H(pre - threshold) in {0, 1}, with the pseudo-derivative towards the threshold."""
    return (pre > threshold).astype(pre.dtype)


def _heaviside_fwd(pre, threshold, bandwidth):
    return heaviside_ste(pre, threshold, bandwidth), (pre, threshold)


def _heaviside_bwd(bandwidth, res, g):
    pre, threshold = res
    g_t = -(1.0 / bandwidth) * _rect((pre - threshold) / bandwidth) * g
    return jnp.zeros_like(pre), g_t.reshape(-1, g_t.shape[-1]).sum(0)


heaviside_ste.defvjp(_heaviside_fwd, _heaviside_bwd)
