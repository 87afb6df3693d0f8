"""Selection of latents: one home for every top-k rule the dictionaries use.

- `topk_dense(pre [..., F], k)`: the k largest entries of each row, dense (reference path).
- `select_topk` / `chunked_top_k`: per-row top-k as (vals, idx), one- or two-stage.
- `batch_topk(acts [B, F], k)` (dense) / `batch_top_k(acts, n_keep)` (COO): the k * B largest
  entries of the whole batch (BatchTopK's training rule).
- `merge_model_topk`: inside a ``shard_map`` over the ``model`` axis, the exact top-k over all
  latent shards from each shard's own top list.  The mesh-aware wrappers (which build the
  shard_maps) live in `jsae.parallel`; this module needs only the axis names.

Ties always go to the lower (flat) index, as in `jax.lax.top_k`, so every variant and every
sharded merge reproduces the dense reference exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Mesh axis names (batch rows over DATA, dictionary latents over MODEL); `jsae.parallel`
# builds its meshes with these.
DATA, MODEL = "data", "model"


def topk_dense(pre: Array, k: int) -> Array:
    """``pre [..., F] -> [..., F]``: each row's k largest entries, zeros elsewhere; gradients
    flow to the kept entries only."""
    vals, idx = jax.lax.top_k(pre, k)
    return scatter_rows(vals, idx, pre.shape[-1])


def scatter_rows(vals: Array, idx: Array, width: int) -> Array:
    """Dense [..., width] rows holding ``vals [..., k]`` at ``idx [..., k]``, zeros elsewhere."""
    lead = vals.shape[:-1]
    flat_v = vals.reshape(-1, vals.shape[-1])
    flat_i = idx.reshape(-1, idx.shape[-1])
    rows = jnp.arange(flat_v.shape[0])[:, None]
    out = jnp.zeros((flat_v.shape[0], width), vals.dtype).at[rows, flat_i].set(flat_v)
    return out.reshape(*lead, width)


def batch_topk(acts: Array, k: int) -> Array:
    """Keep the k * n_tokens largest entries of ``acts [n_tokens, d_sae]`` over the batch."""
    flat = acts.reshape(-1)
    n_keep = min(k * acts.shape[0], flat.shape[0])
    vals, idx = jax.lax.top_k(flat, n_keep)
    return jnp.zeros_like(flat).at[idx].set(vals).reshape(acts.shape)


def select_topk(pre: Array, k: int, *, recall: float = 1.0, chunk: int = 0
                ) -> tuple[Array, Array]:
    """Top-k of each row of ``pre [B, F]`` -> (vals [B, k], idx [B, k]), no gradient.

    ``recall < 1`` uses `jax.lax.approx_max_k` (approximate only on TPU; exact elsewhere).
    ``chunk`` > 0 selects in two exact stages (`chunked_top_k`) when it divides F and exceeds k.
    """
    pre = jax.lax.stop_gradient(pre)
    if recall < 1.0:
        return jax.lax.approx_max_k(pre, k, recall_target=recall)
    if chunk and k < chunk < pre.shape[-1] and pre.shape[-1] % chunk == 0:
        return chunked_top_k(pre, k, chunk)
    return jax.lax.top_k(pre, k)


def chunked_top_k(pre: Array, k: int, chunk: int) -> tuple[Array, Array]:
    """Exact `jax.lax.top_k` of each row of ``pre [B, F]`` in two stages.

    Stage 1: the top k of each of the ``F / chunk`` chunks; stage 2: the top k of those
    ``F / chunk * k`` candidates.  Every member of a row's top k is in its chunk's top k, so
    the result is exact; candidates are laid out chunk by chunk and in index order within a
    chunk, so equal values still go to the lower latent index.  Sorting many short rows can
    be much cheaper than sorting one long row (GPU top-k is sort based for k > 16); whether it
    is depends on the device: measure with ``benchmarks/sae_step.py --pieces``.
    """
    b, f = pre.shape
    n = f // chunk
    v1, i1 = jax.lax.top_k(pre.reshape(b, n, chunk), k)  # [B, n, k]
    i1 = i1.astype(jnp.int32) + (jnp.arange(n, dtype=jnp.int32) * chunk)[:, None]
    v, pos = jax.lax.top_k(v1.reshape(b, n * k), k)
    return v, jnp.take_along_axis(i1.reshape(b, n * k), pos, axis=1)


def batch_top_k(acts: Array, n_keep: int, per_row: int | None = None) -> tuple[Array, Array, Array]:
    """The ``n_keep`` largest entries of ``acts [B, F]`` as (vals, rows, cols), in the order
    of ``jax.lax.top_k(acts.reshape(-1), n_keep)`` (ties to the lower flat index).

    Two stages: each row's top ``per_row``, then the top ``n_keep`` of those B * per_row
    candidates (row-major, so ties still go to the lower flat index).  When some row's smallest
    kept value is not strictly below the selected threshold, a row might hold more selected
    entries than it kept, and the exact flat top-k runs instead (lax.cond): the result always
    equals the flat one, at a fraction of the cost of a flat top-k over B*F entries.
    """
    b, f = acts.shape

    def flat_top(a):
        v, i = jax.lax.top_k(a.reshape(-1), n_keep)
        i = i.astype(jnp.int32)
        return v, i // f, i % f

    if per_row is None or per_row >= f or b * per_row < n_keep:
        return flat_top(acts)
    rv, ri = jax.lax.top_k(acts, per_row)
    # stage 2 by a stable sort (XLA:CPU's top_k is very slow for k in the 100,000s); sorting
    # -v (with -0.0 made +0.0) keeps equal values in candidate, i.e. flat-index, order
    cand = rv.reshape(-1)
    neg, pos = jax.lax.sort((-cand + 0.0, jnp.arange(cand.shape[0], dtype=jnp.int32)),
                            num_keys=1, is_stable=True)
    v, pos = -neg[:n_keep], pos[:n_keep]
    rows = (pos // per_row).astype(jnp.int32)
    cols = ri.reshape(-1)[pos].astype(jnp.int32)
    exact = jnp.all(rv[:, -1] < v[-1])
    return jax.lax.cond(exact, lambda a: (v, rows, cols), flat_top, acts)


def merge_model_topk(vals: Array, idx: Array, k: int, width: int) -> tuple[Array, Array]:
    """Inside a shard_map over ``model``: the exact per-row top-k over all latent shards
    from each shard's own top list (``vals``, local ``idx`` [b, k_local], ``width`` latents
    per shard) -> (vals [b, k], global idx [b, k]).  Candidates are gathered in shard order,
    so equal values go to the lower latent index, as in `jax.lax.top_k`."""
    idx = idx.astype(jnp.int32) + jax.lax.axis_index(MODEL) * width
    all_v = jax.lax.all_gather(vals, MODEL, axis=1, tiled=True)  # [b, model * k_local]
    all_i = jax.lax.all_gather(idx, MODEL, axis=1, tiled=True)
    top_v, pos = jax.lax.top_k(all_v, k)
    return top_v, jnp.take_along_axis(all_i, pos, axis=1)


__all__ = ["DATA", "MODEL", "batch_top_k", "batch_topk", "chunked_top_k", "merge_model_topk",
           "scatter_rows", "select_topk", "topk_dense"]
