"""Partition specs for LM params over a mesh with axes ("data", "model").

Data parallel: params replicated, batches split over "data". Tensor parallel (Megatron style):
attention heads and MLP hidden units split over "model" (q/k/v and gate/up column-wise, o and down
row-wise), the embedding split over the vocabulary; norms replicated. A dimension that the "model"
axis does not divide stays replicated.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# leaf name -> which axis of the array is split over "model" (None: replicated)
_TP_AXIS = {
    "embed": 0,  # [V, D]
    "unembed": 1,  # [D, V]
    "q": 1,  # [D, H, Dh]
    "k": 1,  # [D, K, Dh]
    "v": 1,
    "o": 0,  # [H, Dh, D]
    "bq": 0,  # [H, Dh]
    "bk": 0,
    "bv": 0,
    "gate": 1,  # [D, F]
    "up": 1,
    "down": 0,  # [F, D]
    "b_gate": 0,
    "b_up": 0,
}


def partition_specs(
    params,
    *,
    tensor_parallel: bool = True,
    mesh: Optional[jax.sharding.Mesh] = None,
    model_axis: str = "model",
):
    """A pytree of `PartitionSpec` matching `params`. Without tensor parallelism every leaf is
    replicated (`P()`). With a `mesh`, dimensions the model axis does not divide stay replicated."""
    size = None
    if mesh is not None:
        size = dict(zip(mesh.axis_names, mesh.devices.shape)).get(model_axis, 1)

    def spec(path, leaf):
        if not tensor_parallel:
            return P()
        keys = [getattr(k, "key", None) for k in path]
        name = keys[-1]
        if any(k in ("ln1", "ln2", "ln1_post", "ln2_post", "final_norm") for k in keys):
            return P()
        ax = _TP_AXIS.get(name)
        if ax is None or ax >= leaf.ndim:
            return P()
        if size is not None and leaf.shape[ax] % size:
            return P()
        parts = [None] * leaf.ndim
        parts[ax] = model_axis
        return P(*parts)

    return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(params, mesh: jax.sharding.Mesh, specs=None, *, tensor_parallel: bool = True):
    """Place params on `mesh` according to `specs` (default: `partition_specs(params, mesh=mesh)`)."""
    if specs is None:
        specs = partition_specs(params, tensor_parallel=tensor_parallel, mesh=mesh)
    return jax.tree_util.tree_map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
