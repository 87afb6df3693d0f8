"""Device mesh and partition specs: the one place that decides how things are sharded.

Mesh axes are ``("data", "model")``: activation batches split over ``data``; dictionary
latents (W_enc columns, b_enc, W_dec rows, per-latent state and their optimizer state)
split over ``model``.  The same code runs on 1 CPU, simulated CPU devices, a GPU, a TPU
slice, and several hosts (each feeding its own rows of the global batch).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jsae.sae import archs
from jsae.sae.selection import DATA, MODEL, merge_model_topk

# Per-latent train state beyond the architectures' parameters (`Arch.latent_axes`).
_STATE_LATENT_AXES = {"fired_ago": 0}


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """Mesh of shape (data, model); ``data=-1`` takes every device not used by ``model``."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if model <= 0 or n % model:
        raise ValueError(f"mesh.model={model} does not divide the {n} available devices")
    if data == -1:
        data = n // model
    if data * model > n:
        raise ValueError(
            f"mesh data={data} x model={model} = {data * model} devices, but {n} are available"
        )
    devices = devices[: data * model]  # an explicit smaller mesh uses the first devices
    # Auto axes: jax>=0.7's make_mesh defaults to Explicit, which breaks sharding constraints.
    return Mesh(np.array(devices).reshape(data, model), (DATA, MODEL))


def _latent_spec(axis: int, ndim: int) -> P:
    dims = [None] * ndim
    dims[axis] = MODEL
    return P(*dims)


def spec_for_path(path, leaf=None) -> P:
    """PartitionSpec for a leaf of an SAE / train-state / optimizer-state pytree.

    Per-latent parameters (every architecture's `Arch.latent_axes`, by name) are split over
    ``model`` along their latent axis; without ``leaf`` a negative (encoder) axis is taken
    to be of a 2-d array.
    """
    axes = {**archs.latent_axes(), **_STATE_LATENT_AXES}
    for entry in reversed(path):
        name = getattr(entry, "key", None) or getattr(entry, "name", None)
        if name in axes:
            axis = axes[name]
            ndim = getattr(leaf, "ndim", None) or (axis + 1 if axis >= 0 else 2)
            return _latent_spec(axis, ndim)
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every leaf of ``tree`` (params, optimizer state, train state)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for_path(path, leaf)), tree
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Activation batches [B, d_in] (or any [B, ...] with ``ndim`` axes): rows over ``data``."""
    return NamedSharding(mesh, P(DATA, *[None] * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_divisible(mesh: Mesh, *, batch_size: int, d_sae: int) -> None:
    """Clear errors for shapes that the mesh cannot split evenly."""
    d, m = mesh.shape[DATA], mesh.shape[MODEL]
    if batch_size % d:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by mesh data={d}")
    if batch_size % jax.process_count():  # each process feeds an equal share of rows
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by the {jax.process_count()} processes"
        )
    if d_sae % m:
        raise ValueError(f"sae.d_sae={d_sae} is not divisible by mesh model={m}")


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assemble the global batch from each process's local rows [B_local, ...].

    The global batch is the processes' rows in process order.  When the mesh's data axis
    gives each process rows of its own (the usual layout), each process places just its
    rows.  When it does not (e.g. ``data=1`` with the model axis spanning hosts, so every
    device sees every row), the local rows are first gathered from all processes.
    """
    sharding = batch_sharding(mesh, local.ndim)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    slices = {idx[0].indices(global_shape[0])
              for idx in sharding.addressable_devices_indices_map(global_shape).values()}
    if sum(len(range(*sl)) for sl in slices) == local.shape[0]:
        return jax.make_array_from_process_local_data(sharding, local, global_shape)
    from jax.experimental import multihost_utils

    full = np.asarray(multihost_utils.process_allgather(local, tiled=True))
    return jax.make_array_from_callback(global_shape, sharding, lambda idx: full[idx])


def to_host(tree):
    """NumPy copy of a pytree of arrays, on every process, however the arrays are sharded.

    One process: `jax.device_get`.  Several (a pod slice): arrays whose shards live on other
    hosts (latents split over a ``model`` axis that spans hosts) are gathered with
    `multihost_utils.process_allgather`, a collective: every process must call this, and
    each host then holds the whole tree in memory.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(get, tree)


def process_allgather_f64(x) -> np.ndarray:
    """``[P, *x.shape]`` float64: every process's ``x`` (a collective: all processes call it
    with the same shape).  JAX moves float32, so each value travels as a float32 (hi, lo)
    pair, exact to ~48 bits: sums of many float64 statistics stay exact."""
    x = np.asarray(x, np.float64)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    hi = x.astype(np.float32)
    lo = (x - hi).astype(np.float32)
    both = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo])), np.float64)
    return both[:, 0] + both[:, 1]


def process_sum(x) -> np.ndarray:
    """The sum over processes of each process's float64 ``x`` (a collective)."""
    return process_allgather_f64(x).sum(0)


def sharded_topk_fn(mesh: Mesh) -> Callable[[jax.Array, int], jax.Array] | None:
    """Exact top-k over latents sharded on ``model``: local top-k, all-gather, merge.

    Returns ``fn(pre [B, d_sae], k) -> z [B, d_sae]`` (kept values, zeros elsewhere), or None
    when the mesh has a single model shard (the plain path is then used). Ties go to the
    lower latent index, as in `jax.lax.top_k`, so the result equals the unsharded one.
    """
    m = mesh.shape[MODEL]
    if m == 1:
        return None

    def fn(pre: jax.Array, k: int) -> jax.Array:
        width = pre.shape[-1] // m

        def local(pre_shard):  # [b, width]
            top_vals, top_idx = merge_model_topk(*jax.lax.top_k(pre_shard, min(k, width)), k,
                                                 width)
            shard = jax.lax.axis_index(MODEL)
            mine = (top_idx >= shard * width) & (top_idx < (shard + 1) * width)
            local_idx = jnp.where(mine, top_idx - shard * width, 0)
            rows = jnp.arange(pre_shard.shape[0])[:, None]
            out = jnp.zeros_like(pre_shard)
            return out.at[rows, local_idx].add(jnp.where(mine, top_vals, 0.0))

        return jax.shard_map(
            local, mesh=mesh, in_specs=P(DATA, MODEL), out_specs=P(DATA, MODEL),
            check_vma=False,
        )(pre)

    return fn



def sharded_batch_topk_fn(mesh: Mesh) -> Callable[[jax.Array, int], jax.Array] | None:
    """Exact BatchTopK selection over a batch and latents sharded on ``(data, model)``.

    Returns ``fn(acts [B, d_sae] >= 0, k) -> z`` keeping the ``k * B`` largest entries of the
    whole global batch (zeros elsewhere), equal to `jsae.sae.selection.batch_topk` (one flat
    `lax.top_k`, ties to the lower flat index).  No device gathers the batch: the threshold
    is found by bisection on the float bits with a global count per step (32 scalar
    all-reduces), and ties at the threshold are ranked in flat order from per-row tie counts.

    None when the latents are not split (``model == 1``): flattening row-sharded codes keeps
    each device's part contiguous and XLA partitions the flat top-k itself (planned scratch
    for batchtopk at d_sae 262,144, B 4096 on data=8: 6.5 GiB with the flat top-k of the fast
    path; on data=2, model=4 the flat top-k needed 15.0 GiB and this function 3.8 GiB).
    """
    if mesh.shape[MODEL] == 1:
        return None
    n_data, n_model = mesh.shape[DATA], mesh.shape[MODEL]

    def fn(acts: jax.Array, k: int) -> jax.Array:
        n_rows, width = acts.shape
        n_keep = min(k * n_rows, n_rows * width)

        # Counts only matter up to n_keep, and B * d_sae can exceed int32 (4096 x 16M), so
        # every count is saturated at `cap` before it is summed further (n_keep < cap < 2^30).
        cap = n_keep + 1
        if cap * mesh.size >= 1 << 31:  # the all-reduced sums of saturated counts
            raise ValueError(f"k * batch = {n_keep} on {mesh.size} devices is too large for "
                             "the sharded BatchTopK's int32 counts")

        def sat_add(x, y):  # associative: min(x + y, cap) for x, y in [0, cap]
            return jnp.minimum(x + y, cap)

        def sat_sum(x, axis=None):  # saturating sum of non-negative int32 counts
            x = jnp.minimum(x, cap)
            dims = tuple(range(x.ndim)) if axis is None else (axis,)
            return jax.lax.reduce(x, jnp.int32(0), sat_add, dims)

        def local(a):  # [b, f]: rows of this data shard, latents of this model shard
            # bits of floats >= 0 are ordered like the floats; -0.0 (bits INT_MIN) counts as 0
            bits = jnp.maximum(jax.lax.bitcast_convert_type(jax.lax.stop_gradient(a), jnp.int32),
                               0)

            def count_ge(t):  # saturated global count of entries >= t
                per_row = jnp.sum(bits >= t, axis=1, dtype=jnp.int32)  # <= f each
                return jax.lax.psum(sat_sum(per_row), (DATA, MODEL))

            def step(_, lohi):  # invariant: count_ge(lo) >= n_keep > count_ge(hi)
                lo, hi = lohi
                mid = lo + (hi - lo) // 2
                ok = count_ge(mid) >= n_keep
                return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

            lo, _ = jax.lax.fori_loop(0, 32, step, (jnp.int32(0), jnp.int32(0x7F800001)))
            above, tie = bits > lo, bits == lo
            # fewer than n_keep entries are above the threshold: this count is exact
            need = n_keep - jax.lax.psum(jnp.sum(above, dtype=jnp.int32), (DATA, MODEL))
            # rank of each tie in flat (row-major) order of the global [B, d_sae] array,
            # saturated at cap (only ranks below need <= n_keep decide anything)
            per_row = jnp.sum(tie, axis=1, dtype=jnp.int32)  # [b], <= f
            rows_all = jax.lax.all_gather(per_row, MODEL)  # [model, b]
            shard = jax.lax.axis_index(MODEL)
            before_in_row = sat_sum(jnp.where(jnp.arange(n_model)[:, None] < shard, rows_all, 0),
                                    axis=0)
            row_total = sat_sum(rows_all, axis=0)  # [b]
            totals = jax.lax.all_gather(sat_sum(row_total), DATA)  # [data]
            offset = sat_sum(jnp.where(jnp.arange(n_data) < jax.lax.axis_index(DATA), totals, 0))
            upto = jax.lax.associative_scan(sat_add, row_total)  # inclusive, saturated
            before_row = sat_add(offset, jnp.concatenate([jnp.zeros((1,), jnp.int32), upto[:-1]]))
            in_row = jnp.cumsum(tie, axis=1, dtype=jnp.int32) - tie  # < f
            rank = jnp.minimum(before_row + before_in_row, cap)[:, None] + in_row
            return above | (tie & (rank < need))

        keep = jax.shard_map(local, mesh=mesh, in_specs=P(DATA, MODEL),
                             out_specs=P(DATA, MODEL), check_vma=False)(acts)
        return jnp.where(keep, acts, 0.0)

    return fn
