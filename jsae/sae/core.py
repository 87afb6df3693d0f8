"""The SAE as a pytree, and its pure encode / decode.

Shapes: ``x [..., d_in]`` raw model activations, ``z [..., d_sae]`` latent codes.
Inputs are multiplied by ``norm_scale`` (so that E||x||^2 = d_in) before encoding and outputs
divided by it after decoding, so callers always see raw activations.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jsae.sae.registry import get_arch
from jsae.sae.spec import SAE, SAESpec, mm  # noqa: F401 - SAESpec: re-exported

Array = jax.Array
_mm = mm  # the older private name


def pre_activations(sae: SAE, x_n: Array) -> Array:
    """Encoder pre-activations from normalised inputs (plain SAE: (x_n - b_dec) W_enc + b_enc)."""
    return get_arch(sae.spec.architecture).pre_activations(sae, x_n)


def encode_normalized(sae: SAE, x_n: Array, *, train: bool = False, topk_fn=None) -> Array:
    """Latent codes from normalised inputs ``x_n [..., d_in] -> z [..., d_sae]``.

    ``train`` selects a batch-level training rule (batchtopk: top k*B over the batch) instead
    of the inference rule. ``topk_fn(pre, k) -> z`` replaces the top-k selection (the sharded
    merge in `jsae.parallel` uses it).
    """
    return activate(sae, pre_activations(sae, x_n), x_n, train=train, topk_fn=topk_fn)


def activate(sae: SAE, pre: Array, x_n: Array, *, train: bool = False, topk_fn=None,
             batch_topk_fn=None) -> Array:
    """The architecture's nonlinearity applied to pre-activations ``pre [..., d_sae]``.

    ``topk_fn`` / ``batch_topk_fn`` replace the TopK / BatchTopK (training) selections with
    the sharded ones of `jsae.parallel`.
    """
    return get_arch(sae.spec.architecture).activate(sae, pre, x_n, train=train, topk_fn=topk_fn,
                                                    batch_topk_fn=batch_topk_fn)


def decode_normalized(sae: SAE, z: Array, x_n: Array | None = None) -> Array:
    """Normalised reconstruction ``z [..., d_sae] -> x_hat_n [..., d_in]`` (``x_n``: the
    encoded input, for architectures whose output also reads it)."""
    return get_arch(sae.spec.architecture).decode(sae, z, x_n)


def encode(sae: SAE, x: Array, **kw: Any) -> Array:
    """Latent codes of raw activations ``x [..., d_in] -> z [..., d_sae]``."""
    return encode_normalized(sae, x.astype(jnp.float32) * sae.norm_scale, **kw)


def decode(sae: SAE, z: Array, x: Array | None = None) -> Array:
    """Raw-activation reconstruction ``z [..., d_sae] -> x_hat [..., d_in]`` (``x``: the raw
    encoded input, for a skip transcoder)."""
    x_n = None if x is None else x.astype(jnp.float32) * sae.norm_scale
    return decode_normalized(sae, z, x_n) / sae.norm_scale


def reconstruct(sae: SAE, x: Array, **kw: Any) -> Array:
    """decode(encode(x)) in raw activation units: for a transcoder, its output hook's
    prediction from the input hook's ``x``."""
    x_n = x.astype(jnp.float32) * sae.norm_scale
    return decode_normalized(sae, encode_normalized(sae, x_n, **kw), x_n) / sae.norm_scale


def fold_norm(sae: SAE) -> SAE:
    """An equivalent SAE with norm_scale == 1 (the scale folded into the weights).

    encode: (x s - b_dec) W_enc = (x - b_dec / s)(s W_enc); decode: (z W_dec + b_dec) / s.
    Thresholds and biases of the latents are unchanged; scales an architecture keeps of its
    own (`Arch.fold_params`) are folded too.
    """
    s = sae.norm_scale
    p = dict(sae.params)
    p["W_enc"] = p["W_enc"] * s
    p["b_dec"] = p["b_dec"] / s
    p["W_dec"] = p["W_dec"] / s
    p = get_arch(sae.spec.architecture).fold_params(p)  # the architecture's own scales
    return sae.replace(params=p, norm_scale=jnp.ones_like(s))
