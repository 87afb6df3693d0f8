"""Training state: a pytree holding everything a step changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jsae.sae.core import SAE


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    sae: SAE
    opt_state: optax.OptState
    fired_ago: jax.Array  # [d_sae] int32: tokens since each latent last fired
    rng: jax.Array  # uint32 [2] raw key data, for stochastic parts of future losses


def init_state(sae: SAE, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        sae=sae,
        opt_state=optimizer.init(sae.params),
        fired_ago=jnp.zeros((sae.spec.d_sae,), jnp.int32),
        rng=jax.random.key_data(key),
    )
