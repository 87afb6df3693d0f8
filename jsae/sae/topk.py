"""Top-k selection over the latent axis (reference path).

``topk_dense(pre [..., d_sae], k) -> [..., d_sae]`` keeps the k largest entries of each row
and zeroes the rest; gradients flow to the kept entries only.  Ties are broken towards the
lower index (as `jax.lax.top_k` does), so sharded merges can reproduce it exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_dense(pre: jax.Array, k: int) -> jax.Array:
    vals, idx = jax.lax.top_k(pre, k)
    return scatter_rows(vals, idx, pre.shape[-1])


def scatter_rows(vals: jax.Array, idx: jax.Array, width: int) -> jax.Array:
    """Dense [..., width] rows holding ``vals [..., k]`` at ``idx [..., k]``, zeros elsewhere."""
    lead = vals.shape[:-1]
    flat_v = vals.reshape(-1, vals.shape[-1])
    flat_i = idx.reshape(-1, idx.shape[-1])
    rows = jnp.arange(flat_v.shape[0])[:, None]
    out = jnp.zeros((flat_v.shape[0], width), vals.dtype).at[rows, flat_i].set(flat_v)
    return out.reshape(*lead, width)
