"""SAE initialisation from a data sample: normalisation scale, geometric-median b_dec."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae.archs import get_arch
from jsae.sae.core import SAE, SAESpec


def norm_scale_for(x: np.ndarray) -> float:
    """Scalar s with E||s x||^2 = d_in, estimated from ``x [N, d_in]``."""
    x = np.asarray(x, np.float64)
    mean_sq = float(np.mean(np.sum(x * x, axis=-1)))
    if not np.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError(f"cannot normalise activations with mean squared norm {mean_sq}")
    return float(np.sqrt(x.shape[-1] / mean_sq))


def geometric_median(
    x: np.ndarray, *, max_iter: int = 200, tol: float = 1e-7, eps: float = 1e-8
) -> np.ndarray:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``x [N, d]``."""
    x = np.asarray(x, np.float64)
    y = x.mean(axis=0)
    for _ in range(max_iter):
        dist = np.maximum(np.linalg.norm(x - y, axis=-1), eps)
        w = 1.0 / dist
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if np.linalg.norm(y_new - y) <= tol * max(1.0, np.linalg.norm(y)):
            y = y_new
            break
        y = y_new
    return y


def init_sae(
    key: jax.Array,
    spec: SAESpec,
    sample: np.ndarray | None = None,
    *,
    normalize: bool = True,
    b_dec_init: str = "geometric_median",
    target_sample: np.ndarray | None = None,
    **arch_options,
) -> SAE:
    """A fresh SAE. ``sample [N, d_in]`` (raw activations) sets norm_scale and b_dec.

    ``target_sample [N, d_in]``: a transcoder's output-hook rows for the same tokens; b_dec
    (its output bias) then starts at their median / mean, norm_scale still comes from ``sample``,
    and b_enc at ``-mean(sample) W_enc`` (its input is never centred by b_dec).

    ``arch_options`` go to the architecture's `Arch.extra_params` (e.g. jumprelu's
    ``jumprelu_init_threshold``).  Decoder rows are random unit directions (norm 0.1 for the anthropic relu variant,
    which has no norm constraint); W_enc = W_dec^T; b_enc = 0.
    """
    d_in, d_sae = spec.d_in, spec.d_sae
    arch = get_arch(spec.architecture)
    if sample is not None and np.asarray(sample).shape[-1] != d_in:
        raise ValueError(f"init sample has d_in={np.asarray(sample).shape[-1]}, SAE expects {d_in}")
    w = jax.random.normal(key, (d_sae, d_in), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    if not spec.unit_decoder:
        w = 0.1 * w
    scale = norm_scale_for(sample) if (normalize and sample is not None) else 1.0
    b_dec = np.zeros((d_in,), np.float32)
    if sample is not None and b_dec_init != "zeros":
        xs = np.asarray(sample if target_sample is None else target_sample, np.float64) * scale
        centre = geometric_median if b_dec_init == "geometric_median" else (lambda v: v.mean(0))
        # one centre per hook the dictionary reconstructs, in its token shape
        per_hook = xs.reshape(len(xs), -1, xs.shape[-1])
        b_dec = np.stack([centre(per_hook[:, i]) for i in range(per_hook.shape[1])])
        b_dec = b_dec.reshape(arch.token_shape(spec)[:-1] + (xs.shape[-1],))
    params = {
        "W_enc": w.T * arch.encoder_init_scale,
        "b_enc": jnp.zeros((d_sae,), jnp.float32),
        "W_dec": w,
        "b_dec": jnp.asarray(b_dec, jnp.float32),
    }
    params.update(arch.extra_params(spec, key=jax.random.fold_in(key, 1), **arch_options))
    if target_sample is not None and sample is not None:
        # a transcoder's input is not centred by b_dec (another space): start b_enc at
        # -mean(x_in) W_enc so the first codes do not all follow the input's mean direction
        # (asked of the architecture: the encoder's shape is its own)
        mean_in = jnp.asarray(np.asarray(sample, np.float64).mean(0) * scale, jnp.float32)
        zero_b = {**params, "b_enc": jnp.zeros_like(params["b_enc"])}
        probe = SAE(params=zero_b, norm_scale=jnp.asarray(scale, jnp.float32), spec=spec)
        params["b_enc"] = -arch.pre_activations(probe, mean_in[None])[0]
    if sample is not None and b_dec_init != "zeros" and np.shape(b_dec) == params["b_dec"].shape:
        params["b_dec"] = jnp.asarray(b_dec, jnp.float32)
    return SAE(params=params, norm_scale=jnp.asarray(scale, jnp.float32), spec=spec)
