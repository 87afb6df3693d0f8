"""Reconstruction and sparsity metrics over many batches (exact totals, not batch means).

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all evaluated tokens, in raw units
(the normalisation scale cancels); explained variance = 1 - FVU.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae.core import SAE, decode, encode


@jax.jit
def _batch_sums(sae: SAE, x: jax.Array) -> dict[str, jax.Array]:
    x = x.astype(jnp.float32)
    z = encode(sae, x)
    x_hat = decode(sae, z)
    err = x - x_hat
    dot = jnp.sum(x * x_hat, -1)
    cos = dot / jnp.maximum(jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(x_hat, axis=-1), 1e-12)
    return {
        "n": jnp.asarray(x.shape[0], jnp.float32),
        "sum_x": x.sum(0),
        "sum_x2": jnp.sum(x * x),
        "resid": jnp.sum(err * err),
        "l0": jnp.sum(jnp.sum(z > 0, -1).astype(jnp.float32)),
        "cos": jnp.sum(cos),
        "fired": jnp.sum((z > 0).astype(jnp.float32), 0),
    }


class ReconstructionStats:
    """Streaming accumulator; ``add(sae, x [B, d_in])`` per batch, ``result()`` at the end."""

    def __init__(self):
        self.tot: dict[str, np.ndarray] | None = None

    def add(self, sae: SAE, x) -> None:
        sums = jax.device_get(_batch_sums(sae, jnp.asarray(x)))
        sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
        self.tot = sums if self.tot is None else {k: self.tot[k] + sums[k] for k in sums}

    def result(self) -> dict[str, float]:
        t = self.tot
        if t is None or t["n"] == 0:
            raise ValueError("no tokens were evaluated")
        n = t["n"]
        mean = t["sum_x"] / n
        total_var = t["sum_x2"] - n * float(mean @ mean)
        fvu = float(t["resid"] / max(total_var, 1e-12))
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": float(t["resid"] / (n * len(mean))),
            "l0": float(t["l0"] / n),
            "cos_sim": float(t["cos"] / n),
            "dead_frac": float(np.mean(t["fired"] == 0)),
            "tokens": float(n),
        }

    @property
    def feature_counts(self) -> np.ndarray:
        return np.zeros(0) if self.tot is None else self.tot["fired"]


def reconstruction_metrics(sae: SAE, batches: Iterable) -> dict[str, float]:
    stats = ReconstructionStats()
    for x in batches:
        stats.add(sae, x)
    return stats.result()


def dictionary_recovery(sae: SAE, true_features: np.ndarray) -> float:
    """Mean over true features [n, d_in] of the best cosine with a learned decoder row."""
    w = np.asarray(jax.device_get(sae.params["W_dec"]), np.float64)
    w = w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    f = np.asarray(true_features, np.float64)
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    return float(np.mean(np.max(f @ w.T, axis=1)))
