"""The SAE as a pytree, and its pure encode / decode.

Shapes: ``x [..., d_in]`` raw model activations, ``z [..., d_sae]`` latent codes.
Inputs are multiplied by ``norm_scale`` (so that E||x||^2 = d_in) before encoding and outputs
divided by it after decoding, so callers always see raw activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jsae.sae.jumprelu import jumprelu_ste
from jsae.sae.topk import topk_dense

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SAESpec:
    """Static description of an SAE (hashable; part of the pytree's structure)."""

    architecture: str  # relu | topk | batchtopk | jumprelu | gated
    d_in: int
    d_sae: int
    k: int | None = None
    l1_variant: str = "anthropic"  # relu: "standard" (unit decoder rows) or "anthropic"
    jumprelu_bandwidth: float = 1e-3
    aux_k: int | None = None
    dtype: str = "float32"  # matmul compute dtype; params stay float32
    fast_path: bool = False  # topk/batchtopk: sparse decoder + sparse encoder backward (jsae.sae.fast)
    topk_recall: float = 1.0  # < 1: fast-path top-k via lax.approx_max_k (approximate on TPU only)
    topk_chunk: int = 0  # > 0: fast-path top-k in two exact stages over chunks of this many latents

    @property
    def unit_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm during training."""
        return not (self.architecture == "relu" and self.l1_variant == "anthropic")

    @property
    def aux_k_resolved(self) -> int:
        return min(self.aux_k or max(1, self.d_in // 2), self.d_sae)

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


@struct.dataclass
class SAE:
    """Parameters (trainable dict), normalisation scale (not trained) and static spec.

    params: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in];
    jumprelu adds log_threshold [d_sae]; batchtopk adds threshold [d_sae] (set by EMA, not
    by gradients); gated adds r_mag [d_sae], b_mag [d_sae] (gate weights are W_enc, b_enc).
    """

    params: dict[str, Array]
    norm_scale: Array  # scalar float32
    spec: SAESpec = struct.field(pytree_node=False)

    @property
    def threshold(self) -> Array | None:
        """Per-latent JumpReLU threshold (jumprelu, batchtopk), in normalised units."""
        if "log_threshold" in self.params:
            return jnp.exp(self.params["log_threshold"])
        return self.params.get("threshold")


def _mm(a: Array, b: Array, dtype) -> Array:
    """Matmul in the compute dtype with float32 accumulation and result."""
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def pre_activations(sae: SAE, x_n: Array) -> Array:
    """Encoder pre-activations from normalised inputs: (x_n - b_dec) W_enc + b_enc."""
    p = sae.params
    return _mm(x_n - p["b_dec"], p["W_enc"], sae.spec.compute_dtype) + p["b_enc"]


def encode_normalized(sae: SAE, x_n: Array, *, train: bool = False, topk_fn=None) -> Array:
    """Latent codes from normalised inputs ``x_n [..., d_in] -> z [..., d_sae]``.

    ``train`` selects the batch-level rule of batchtopk (top k*B over the batch) instead of
    its learned inference threshold. ``topk_fn(pre, k) -> z`` replaces the top-k selection
    (the sharded merge in `jsae.parallel` uses it).
    """
    return activate(sae, pre_activations(sae, x_n), x_n, train=train, topk_fn=topk_fn)


def activate(sae: SAE, pre: Array, x_n: Array, *, train: bool = False, topk_fn=None,
             batch_topk_fn=None) -> Array:
    """The architecture's nonlinearity applied to pre-activations ``pre [..., d_sae]``.

    ``topk_fn`` / ``batch_topk_fn`` replace the TopK / BatchTopK (training) selections with
    the sharded ones of `jsae.parallel`.
    """
    spec, p = sae.spec, sae.params
    arch = spec.architecture
    if arch == "relu":
        return jax.nn.relu(pre)
    if arch == "topk":
        return jax.nn.relu((topk_fn or topk_dense)(pre, spec.k))
    if arch == "batchtopk":
        if train:
            return (batch_topk_fn or batch_topk)(jax.nn.relu(pre), spec.k)
        return jnp.where(pre > p["threshold"], pre, 0.0)
    if arch == "jumprelu":
        return jumprelu_ste(pre, jnp.exp(p["log_threshold"]), spec.jumprelu_bandwidth)
    if arch == "gated":
        gate = (pre > 0).astype(pre.dtype)  # hard gate; trained through the aux loss
        mag = _mm(x_n - p["b_dec"], p["W_enc"] * jnp.exp(p["r_mag"]), spec.compute_dtype)
        return gate * jax.nn.relu(mag + p["b_mag"])
    raise ValueError(f"unknown SAE architecture {arch!r}")


def batch_topk(acts: Array, k: int) -> Array:
    """Keep the k * n_tokens largest entries of ``acts [n_tokens, d_sae]`` over the batch."""
    flat = acts.reshape(-1)
    n_keep = min(k * acts.shape[0], flat.shape[0])
    vals, idx = jax.lax.top_k(flat, n_keep)
    return jnp.zeros_like(flat).at[idx].set(vals).reshape(acts.shape)


def decode_normalized(sae: SAE, z: Array) -> Array:
    """Normalised reconstruction ``z [..., d_sae] -> x_hat_n [..., d_in]``."""
    p = sae.params
    return _mm(z, p["W_dec"], sae.spec.compute_dtype) + p["b_dec"]


def encode(sae: SAE, x: Array, **kw: Any) -> Array:
    """Latent codes of raw activations ``x [..., d_in] -> z [..., d_sae]``."""
    return encode_normalized(sae, x.astype(jnp.float32) * sae.norm_scale, **kw)


def decode(sae: SAE, z: Array) -> Array:
    """Raw-activation reconstruction ``z [..., d_sae] -> x_hat [..., d_in]``."""
    return decode_normalized(sae, z) / sae.norm_scale


def reconstruct(sae: SAE, x: Array) -> Array:
    """decode(encode(x)) in raw activation units."""
    return decode(sae, encode(sae, x))


def fold_norm(sae: SAE) -> SAE:
    """An equivalent SAE with norm_scale == 1 (the scale folded into the weights).

    encode: (x s - b_dec) W_enc = (x - b_dec / s)(s W_enc); decode: (z W_dec + b_dec) / s.
    Thresholds and biases of the latents are unchanged.
    """
    s = sae.norm_scale
    p = dict(sae.params)
    p["W_enc"] = p["W_enc"] * s
    p["b_dec"] = p["b_dec"] / s
    p["W_dec"] = p["W_dec"] / s
    return sae.replace(params=p, norm_scale=jnp.ones_like(s))
