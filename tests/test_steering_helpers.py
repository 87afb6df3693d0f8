"""Tiny random models and SAEs for the steering / analysis / monitor tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsae.models.config import TransformerConfig, gemma3_layer_types
from jsae.sae import SAESpec, init_sae


def tiny_config(vocab: int = 97, d: int = 32, layers: int = 3, window: int | None = 6) -> TransformerConfig:
    """A Gemma-3-shaped model small enough to run in milliseconds (sliding windows included)."""
    return TransformerConfig(
        arch="gemma3", vocab_size=vocab, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=2,
        head_dim=8, d_mlp=64, norm_eps=1e-6, rope_base=10_000.0, rope_local_base=100.0,
        sliding_window=window, layer_types=gemma3_layer_types(layers, 2) if window else (),
        attn_scale=8**-0.5, qk_norm=True, act="gelu_tanh", post_norms=True, embed_scale=d**0.5,
        bos_id=2, eos_id=1, pad_id=0,
    )


def tiny_params(cfg: TransformerConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def w(*shape, s=None):
        s = s if s is not None else shape[0] ** -0.5
        return jnp.asarray(rng.normal(0, s, shape), jnp.float32)

    def scale(n):
        return {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=n), jnp.float32)}

    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp
    blocks = []
    for _ in range(cfg.n_layers):
        blocks.append({
            "ln1": scale(D), "ln2": scale(D), "ln1_post": scale(D), "ln2_post": scale(D),
            "attn": {"q": w(D, H, Dh), "k": w(D, K, Dh), "v": w(D, K, Dh), "o": w(H, Dh, D, s=(H * Dh) ** -0.5),
                     "q_norm": scale(Dh)["scale"], "k_norm": scale(Dh)["scale"]},
            "mlp": {"gate": w(D, F), "up": w(D, F), "down": w(F, D)},
        })
    return {"embed": w(cfg.vocab_size, D, s=1.0 / D**0.5), "blocks": blocks, "final_norm": scale(D)}


def random_sae(arch: str, d_in: int, d_sae: int, *, seed: int = 0, k: int = 4, sample=None):
    """A random SAE whose latents fire on a fair share of tokens (biases and thresholds set)."""
    spec = SAESpec(architecture=arch, d_in=d_in, d_sae=d_sae, k=k if arch in ("topk", "batchtopk") else None)
    sae = init_sae(jax.random.PRNGKey(seed), spec, sample, b_dec_init="mean" if sample is not None else "zeros")
    rng = np.random.default_rng(seed + 1)
    p = dict(sae.params)
    p["W_dec"] = p["W_dec"] * jnp.asarray(rng.uniform(0.5, 1.5, (d_sae, 1)), jnp.float32)
    p["b_enc"] = jnp.asarray(rng.normal(0, 0.1, d_sae), jnp.float32)
    if arch == "jumprelu":
        p["log_threshold"] = jnp.full((d_sae,), np.log(0.05), jnp.float32)
    if arch == "batchtopk":
        p["threshold"] = jnp.full((d_sae,), 0.1, jnp.float32)
    if arch == "gated":
        p["r_mag"] = jnp.asarray(rng.normal(0, 0.1, d_sae), jnp.float32)
        p["b_mag"] = jnp.asarray(rng.normal(0, 0.1, d_sae), jnp.float32)
    return sae.replace(params=p)


class TinyTokenizer:
    """Character-level stand-in tokenizer: id = 3 + (ord(c) - 32) % (vocab - 3); bos 2, eos 1, pad 0
    (printable ASCII round-trips)."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def __init__(self, vocab: int = 97):
        self.vocab = vocab

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [3 + (ord(c) - 32) % (self.vocab - 3) for c in text]
        return ([self.bos_id] if add_bos else []) + ids

    def decode(self, ids) -> str:
        return "".join(chr(32 + int(i) - 3) if int(i) >= 3 else "" for i in ids)

    def encode_batch(self, texts, add_bos: bool = True) -> list[list[int]]:
        return [self.encode(t, add_bos) for t in texts]


class TinyModel:
    def __init__(self, cfg=None, seed: int = 0):
        self.cfg = cfg or tiny_config()
        self.params = tiny_params(self.cfg, seed)
        self.tokenizer = TinyTokenizer(self.cfg.vocab_size)
        self.name = "tiny"
        self.pad_id = 0
