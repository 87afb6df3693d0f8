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

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SAESpec:
    """Static description of an SAE (hashable; part of the pytree's structure)."""

    architecture: str  # a name registered in jsae.sae.archs
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
    # matryoshka: prefix sizes (ascending, the last is d_sae) and one loss weight per prefix
    matryoshka_groups: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    jumprelu_sparsity: str = "step"  # jumprelu: step (L0) | tanh (Anthropic 2025) | quadratic
    jumprelu_tanh_scale: float = 4.0  # jumprelu tanh: c in tanh(c |f_i| ||W_dec_i||)
    target_l0: float | None = None  # jumprelu quadratic: the L0 the penalty pulls towards
    jumprelu_threshold: str = "log"  # jumprelu: the threshold is stored as log (Gemma Scope) | linear
    n_layers: int = 1  # crosscoder: hooks read and reconstructed at once (x [..., n_layers, d_in])

    def __post_init__(self):  # specs read back from JSON carry lists: keep the spec hashable
        for name in ("matryoshka_groups", "matryoshka_weights"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def unit_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm during training."""
        return get_arch(self.architecture).unit_decoder(self)

    @property
    def aux_k_resolved(self) -> int:
        return min(self.aux_k or max(1, self.d_in // 2), self.d_sae)

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


@struct.dataclass
class SAE:
    """Parameters (trainable dict), normalisation scale (not trained) and static spec.

    params: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus the
    architecture's own (`jsae.sae.archs`: e.g. jumprelu's log_threshold [d_sae]).
    """

    params: dict[str, Array]
    norm_scale: Array  # scalar float32
    spec: SAESpec = struct.field(pytree_node=False)

    @property
    def threshold(self) -> Array | None:
        """Per-latent inference threshold where the architecture has one (normalised units)."""
        return get_arch(self.spec.architecture).threshold(self.params)


def _mm(a: Array, b: Array, dtype) -> Array:
    """Matmul in the compute dtype with float32 accumulation and result."""
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


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
    Thresholds and biases of the latents are unchanged.
    """
    s = sae.norm_scale
    p = dict(sae.params)
    p["W_enc"] = p["W_enc"] * s
    p["b_dec"] = p["b_dec"] / s
    p["W_dec"] = p["W_dec"] / s
    return sae.replace(params=p, norm_scale=jnp.ones_like(s))


# at the end: the architecture modules import this one (SAE, _mm) when they load
from jsae.sae.archs import get_arch  # noqa: E402
