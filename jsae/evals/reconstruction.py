"""Reconstruction and sparsity metrics over many batches (exact totals, not batch means).

Every metric is a ratio of sums over *all* evaluated tokens, accumulated in float64 on the
host, so the result does not depend on how the tokens were split into batches. Formulas and
sources are in ``docs/metrics.md``; in short, over tokens ``x`` (raw activations) with
reconstruction ``x_hat = decode(encode(x))`` and codes ``z``:

- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (the normalisation scale cancels);
  explained variance = 1 - FVU;
- MSE = sum ||x - x_hat||^2 / (n d_in) (per element);
- L0 = mean #{z != 0}; L1 = mean sum z;
- cos_sim = mean cos(x, x_hat);
- rel_recon_bias = sum ||x_hat||^2 / sum <x, x_hat> (SAEBench; Rajamanoharan et al. 2024
  eq. 10): < 1 means shrinkage;
- l2_ratio = mean ||x_hat|| / ||x|| (SAEBench/SAELens; ||x|| < 1e-4 counts as 1);
- dead_frac = fraction of latents that never fired; dense_frac = fraction firing on more
  than ``dense_threshold`` (10%) of tokens.

``ReconstructionStats.add(sae, x, mask)`` takes ``x [..., d_in]`` and an optional boolean
``mask [...]`` (True = evaluate this token), so fixed-shape batches with masked positions do
not recompile.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae.core import SAE, decode, encode
from jsae.sae.registry import get_arch

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens is "dense"


def batch_sums(sae: SAE, x: jax.Array, w: jax.Array, topk_fn=None,
               x_target: jax.Array | None = None) -> dict[str, jax.Array]:
    """Sums over the rows of ``x [N, d]`` weighted by ``w [N]`` (0/1), for
    `ReconstructionStats.add_sums`.  ``topk_fn``: the sharded top-k of `jsae.parallel`, for
    an SAE whose latents are split over a mesh (pure; jit it with the mesh's shardings).
    ``x_target [N, d]``: what is reconstructed when it is not ``x`` (a transcoder's output
    hook); every reconstruction metric is then measured against it."""
    x_in = x.astype(jnp.float32)
    w = w.astype(jnp.float32)
    z = encode(sae, x_in, topk_fn=topk_fn)
    x_hat = decode(sae, z, x_in)
    x = x_in if x_target is None else x_target.astype(jnp.float32)
    # a crosscoder's rows are [N, L, d]: metrics over the concatenated hooks
    x, x_hat = x.reshape(x.shape[0], -1), x_hat.reshape(x_hat.shape[0], -1)
    # Squares of activations near 1e20 overflow float32: every sum is taken of x / s and
    # x_hat / s, s a power of two near the batch's largest magnitude (exact: no rounding
    # changes), and scaled back in float64 on the host (`ReconstructionStats._merge`).
    # The spread of x alone (mean, m2, ||x||) has its own scale: a reconstruction far larger
    # than x (tiny inputs, large biases) must not push x's squares below float32's range.
    ax = _masked_absmax(x, w)
    sx = _pow2_scale(ax)
    s = _pow2_scale(jnp.maximum(ax, _masked_absmax(x_hat, w)))
    n = jnp.sum(w)
    xx = x / sx
    mean = jnp.sum(xx * w[:, None], 0) / jnp.maximum(n, 1.0)
    centred = (xx - mean) * w[:, None]
    l2_in = jnp.linalg.norm(xx, axis=-1)
    x, x_hat = x / s, x_hat / s
    err = x - x_hat
    dot = jnp.sum(x * x_hat, -1)
    nx = jnp.linalg.norm(x, axis=-1)
    nxh = jnp.linalg.norm(x_hat, axis=-1)
    # the guards of the unscaled formulas, moved to the scaled units
    cos = dot / jnp.maximum(nx * nxh, jnp.maximum(1e-12 / s / s, jnp.finfo(jnp.float32).tiny))
    small = nx < 1e-4 / s  # SAEBench's guard: ||x|| < 1e-4 counts as 1
    ratio = jnp.where(small, nxh * s, nxh / jnp.where(small, 1.0, nx))
    fired = (z != 0).astype(jnp.float32) * w[:, None]

    def wsum(v):
        return jnp.sum(v * w)

    return {
        "n": n,
        "scale": s,  # the sums below marked s or s^2 are in units of s (sx: of sx)
        "scale_x": sx,
        "mean": mean,  # sx
        "m2": jnp.sum(centred * centred),  # sx^2; sum ||x - batch mean||^2 (Chan's rule)
        "resid": wsum(jnp.sum(err * err, -1)),  # s^2
        "xhat2": wsum(nxh * nxh),  # s^2
        "dot": wsum(dot),  # s^2
        "l2_in": wsum(l2_in),  # sx
        "l2_out": wsum(nxh),  # s
        "l2_ratio": wsum(ratio),
        "l0": jnp.sum(fired),
        "l1": wsum(jnp.sum(jnp.abs(z), -1)),
        "cos": wsum(cos),
        "fired": jnp.sum(fired, 0),
    }


_SCALED = {"l2_out": 1, "resid": 2, "xhat2": 2, "dot": 2}  # units of "scale"
_SCALED_X = {"mean": 1, "l2_in": 1, "m2": 2}  # units of "scale_x"


def _masked_absmax(a: jax.Array, w: jax.Array) -> jax.Array:
    """Largest finite ``|a|`` over the rows with weight (0 when none)."""
    v = jnp.where((w[:, None] > 0) & jnp.isfinite(a), jnp.abs(a), 0.0)
    return jnp.max(v) if v.size else jnp.zeros((), a.dtype)


def _pow2_scale(m: jax.Array) -> jax.Array:
    """A power of two in ``(m / 2, m]`` (1 when ``m`` is 0): dividing by it is exact."""
    _, e = jnp.frexp(m)
    return jnp.where(m > 0, jnp.ldexp(jnp.float32(1.0), e - 1), jnp.float32(1.0))


_batch_sums = jax.jit(batch_sums)

# The sufficient statistics ReconstructionStats keeps (see batch_sums).
_KEYS = ("n", "mean", "m2", "resid", "l0", "l1", "cos", "xhat2", "dot", "l2_ratio", "l2_in",
         "l2_out", "fired")


class ReconstructionStats:
    """Streaming accumulator; ``add(sae, x [..., d_in], mask=None)`` per batch, ``result()``.

    The mean and centred sum of squares are merged across batches with Chan et al.'s
    parallel update, in float64, so FVU stays exact for activations with a large mean.
    """

    def __init__(self, dense_threshold: float = DENSE_THRESHOLD, max_elements: int = 1 << 27):
        self.tot: dict[str, np.ndarray] | None = None
        self.dense_threshold = dense_threshold
        self.max_elements = max_elements  # rows x d_sae per jitted call (bounds memory)

    def add(self, sae: SAE, x, mask=None, x_target=None) -> None:
        """``x_target [..., d]``: a transcoder's output-hook activations (default: ``x``)."""
        x = jnp.asarray(x)
        d = x.shape[-1]
        row = get_arch(sae.spec.architecture).token_shape(sae.spec)[:-1] + (d,)  # [L, d]: hooks
        x = x.reshape(-1, *row)
        # a transcoder's target rows: [d], or a multi-hook transcoder's [L, d] like its input
        y = None if x_target is None else jnp.asarray(x_target).reshape(-1, *row)
        if y is not None and y.shape != x.shape:  # noqa: SIM102 - a transcoder's rows
            raise ValueError(f"x_target has shape {y.shape}, the input {x.shape}")
        w = jnp.ones(x.shape[0], bool) if mask is None else jnp.asarray(mask, bool).reshape(-1)
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"mask has {w.shape[0]} entries for {x.shape[0]} tokens")
        n = x.shape[0]
        rows = max(1, min(n, self.max_elements // max(sae.spec.d_sae, 1)))
        if rows < n:  # big dictionary: equal-sized chunks (the last padded with weight 0)
            pad = -n % rows
            x = jnp.concatenate([x, jnp.zeros((pad, *row), x.dtype)])
            w = jnp.concatenate([w, jnp.zeros(pad, bool)])
            if y is not None:
                y = jnp.concatenate([y, jnp.zeros((pad, *row), y.dtype)])
            for s in range(0, n + pad, rows):
                part = None if y is None else y[s : s + rows]
                self._merge(jax.device_get(
                    _batch_sums(sae, x[s : s + rows], w[s : s + rows], x_target=part)))
            return
        self._merge(jax.device_get(_batch_sums(sae, x, w, x_target=y)))

    def add_sums(self, sums: dict) -> None:
        """Merge the output of `batch_sums` (e.g. computed on a mesh by the trainer)."""
        self._merge(jax.device_get(sums))

    def _merge(self, sums) -> None:
        sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
        for key, which in (("scale", _SCALED), ("scale_x", _SCALED_X)):
            scale = sums.pop(key, None)  # batch_sums' sums in units of a power of two
            if scale is not None:
                for k, p in which.items():
                    sums[k] = sums[k] * scale**p
        if sums["n"] == 0:
            return
        if self.tot is None:
            self.tot = sums
            return
        t = self.tot
        na, nb = t["n"], sums["n"]
        n = na + nb
        delta = sums["mean"] - t["mean"]
        merged = {k: t[k] + sums[k] for k in sums if k not in ("mean", "m2")}
        merged["mean"] = t["mean"] + delta * (nb / n)
        merged["m2"] = t["m2"] + sums["m2"] + float(delta @ delta) * na * nb / n
        self.tot = merged

    def merge_processes(self, d_in: int, d_sae: int) -> None:
        """Combine the statistics of every process (multi-host evaluation of per-process
        shares); a collective, so every process calls it, and all end with the same totals
        (merged in process order)."""
        if jax.process_count() == 1:
            return
        from jsae.parallel import process_allgather_f64

        sizes = {k: d_in if k == "mean" else d_sae if k == "fired" else 1 for k in _KEYS}
        t = self.tot or {k: np.zeros(sizes[k] if k in ("mean", "fired") else ()) for k in _KEYS}
        flat = np.concatenate([np.asarray(t[k], np.float64).reshape(-1) for k in _KEYS])
        self.tot = None
        for proc in process_allgather_f64(flat):
            vals, pos = {}, 0
            for k in _KEYS:
                v = proc[pos:pos + sizes[k]]
                vals[k] = v if k in ("mean", "fired") else v[0]
                pos += sizes[k]
            self._merge(vals)

    def result(self) -> dict[str, float]:
        t = self.tot
        if t is None or t["n"] == 0:
            raise ValueError("no tokens were evaluated")
        n = t["n"]
        d = len(t["mean"])
        fvu = float(t["resid"] / (t["m2"] if t["m2"] > 0 else 1e-30))  # tiny inputs: exact
        density = t["fired"] / n
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": float(t["resid"] / (n * d)),  # per element
            "mse_per_token": float(t["resid"] / n),  # SAELens' mse: sum over d_in, mean over tokens
            "l0": float(t["l0"] / n),
            "l1": float(t["l1"] / n),
            "cos_sim": float(t["cos"] / n),
            "rel_recon_bias": float(t["xhat2"] / t["dot"]) if t["dot"] != 0 else float("nan"),
            "l2_ratio": float(t["l2_ratio"] / n),
            "l2_norm_in": float(t["l2_in"] / n),
            "l2_norm_out": float(t["l2_out"] / n),
            "dead_frac": float(np.mean(t["fired"] == 0)),
            "dense_frac": float(np.mean(density > self.dense_threshold)),
            "tokens": float(n),
        }

    @property
    def feature_counts(self) -> np.ndarray:
        """How many evaluated tokens each latent fired on ([d_sae], float64)."""
        return np.zeros(0) if self.tot is None else self.tot["fired"]

    @property
    def n_tokens(self) -> int:
        return 0 if self.tot is None else int(self.tot["n"])

    @property
    def feature_density(self) -> np.ndarray:
        """Fraction of evaluated tokens on which each latent fired ([d_sae])."""
        if self.tot is None or self.tot["n"] == 0:
            return np.zeros(0)
        return self.tot["fired"] / self.tot["n"]

    @property
    def mean(self) -> np.ndarray:
        """Mean activation over the evaluated tokens ([d_in], float64)."""
        return np.zeros(0) if self.tot is None else self.tot["mean"]


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
