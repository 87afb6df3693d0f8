"""Tensor-name mapping between checkpoints (HF transformers, GGUF) and the jsae params pytree.

Everything here works on numpy arrays; `to_device` turns the result into jax arrays of a dtype
(norm scales stay float32).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jsae.errors import JsaeError
from jsae.models.config import TransformerConfig

GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


class WeightError(JsaeError, ValueError):
    """A checkpoint tensor that is missing or has the wrong shape."""


class _Reader:
    def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.tensors:
            raise WeightError(f"{self.source}: tensor {name!r} is missing")
        a = np.asarray(self.tensors[name])
        if tuple(a.shape) != tuple(shape):
            raise WeightError(
                f"{self.source}: tensor {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}"
            )
        self.used.add(name)
        return a


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _hf_prefix(tensors: Mapping[str, np.ndarray], arch: str) -> str:
    suffix = "wte.weight" if arch == "gpt2" else "embed_tokens.weight"
    for name in tensors:
        if name.endswith(suffix) and "vision" not in name:
            return name[: -len(suffix)]
    raise WeightError(f"no '{suffix}' tensor found: is this a {arch} checkpoint?")


def params_from_hf(cfg: TransformerConfig, tensors: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
    """HF transformers state dict (names as in `model.safetensors`) -> jsae params (numpy)."""
    r = _Reader(tensors, source)
    if cfg.arch == "gpt2":
        return _gpt2_from_hf(cfg, r)
    p = _hf_prefix(tensors, cfg.arch)
    D, H, K, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp, cfg.vocab_size
    plus1 = cfg.arch in GEMMA_ARCHS

    def nrm(name, dim=D):
        w = _f32(r.get(name, (dim,)))
        return {"scale": w + 1.0 if plus1 else w}

    out: dict = {"embed": r.get(p + "embed_tokens.weight", (V, D)), "blocks": []}
    for i in range(cfg.n_layers):
        b = f"{p}layers.{i}."
        at = b + "self_attn."
        attn = {
            "q": r.get(at + "q_proj.weight", (H * Dh, D)).T.reshape(D, H, Dh),
            "k": r.get(at + "k_proj.weight", (K * Dh, D)).T.reshape(D, K, Dh),
            "v": r.get(at + "v_proj.weight", (K * Dh, D)).T.reshape(D, K, Dh),
            "o": r.get(at + "o_proj.weight", (D, H * Dh)).T.reshape(H, Dh, D),
        }
        if cfg.qkv_bias:
            attn["bq"] = r.get(at + "q_proj.bias", (H * Dh,)).reshape(H, Dh)
            attn["bk"] = r.get(at + "k_proj.bias", (K * Dh,)).reshape(K, Dh)
            attn["bv"] = r.get(at + "v_proj.bias", (K * Dh,)).reshape(K, Dh)
        if cfg.out_bias:
            attn["bo"] = r.get(at + "o_proj.bias", (D,))
        if cfg.qk_norm:
            attn["q_norm"] = nrm(at + "q_norm.weight", Dh)["scale"]
            attn["k_norm"] = nrm(at + "k_norm.weight", Dh)["scale"]
        m = b + "mlp."
        mlp = {
            "gate": r.get(m + "gate_proj.weight", (F, D)).T,
            "up": r.get(m + "up_proj.weight", (F, D)).T,
            "down": r.get(m + "down_proj.weight", (D, F)).T,
        }
        if cfg.mlp_bias:
            mlp["b_gate"] = r.get(m + "gate_proj.bias", (F,))
            mlp["b_up"] = r.get(m + "up_proj.bias", (F,))
            mlp["b_down"] = r.get(m + "down_proj.bias", (D,))
        blk = {"ln1": nrm(b + "input_layernorm.weight"), "attn": attn, "mlp": mlp}
        if cfg.post_norms:
            blk["ln1_post"] = nrm(b + "post_attention_layernorm.weight")
            blk["ln2"] = nrm(b + "pre_feedforward_layernorm.weight")
            blk["ln2_post"] = nrm(b + "post_feedforward_layernorm.weight")
        else:
            blk["ln2"] = nrm(b + "post_attention_layernorm.weight")
        out["blocks"].append(blk)
    out["final_norm"] = nrm(p + "norm.weight")
    if not cfg.tie_embeddings:
        head = "lm_head.weight"
        out["unembed"] = r.get(head, (V, D)).T
    return out


def _gpt2_from_hf(cfg: TransformerConfig, r: _Reader) -> dict:
    p = _hf_prefix(r.tensors, "gpt2")
    D, H, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_mlp, cfg.vocab_size

    def ln(name):
        return {"scale": _f32(r.get(name + ".weight", (D,))), "bias": _f32(r.get(name + ".bias", (D,)))}

    out: dict = {
        "embed": r.get(p + "wte.weight", (V, D)),
        "pos_embed": r.get(p + "wpe.weight", (cfg.max_position, D)),
        "blocks": [],
    }
    for i in range(cfg.n_layers):
        b = f"{p}h.{i}."
        w = r.get(b + "attn.c_attn.weight", (D, 3 * D))  # Conv1D: [in, out]
        bias = r.get(b + "attn.c_attn.bias", (3 * D,))
        wq, wk, wv = np.split(w, 3, axis=1)
        bq, bk, bv = np.split(bias, 3)
        attn = {
            "q": wq.reshape(D, H, Dh),
            "k": wk.reshape(D, H, Dh),
            "v": wv.reshape(D, H, Dh),
            "o": r.get(b + "attn.c_proj.weight", (D, D)).reshape(H, Dh, D),
            "bq": bq.reshape(H, Dh),
            "bk": bk.reshape(H, Dh),
            "bv": bv.reshape(H, Dh),
            "bo": r.get(b + "attn.c_proj.bias", (D,)),
        }
        mlp = {
            "up": r.get(b + "mlp.c_fc.weight", (D, F)),
            "b_up": r.get(b + "mlp.c_fc.bias", (F,)),
            "down": r.get(b + "mlp.c_proj.weight", (F, D)),
            "b_down": r.get(b + "mlp.c_proj.bias", (D,)),
        }
        out["blocks"].append({"ln1": ln(b + "ln_1"), "attn": attn, "ln2": ln(b + "ln_2"), "mlp": mlp})
    out["final_norm"] = ln(p + "ln_f")
    if not cfg.tie_embeddings:
        out["unembed"] = r.get("lm_head.weight", (V, D)).T
    return out


# ------------------------------------------------------------------------------------------------
# GGUF (llama.cpp names). Norm weights of Gemma files already have the +1 folded in.


def llama_gguf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rope -> HF's rotate-half layout).
    `w` is [n_head * head_dim, ...] in torch [out, in] order."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def params_from_gguf(cfg: TransformerConfig, tensors: Mapping[str, np.ndarray], source: str = "GGUF") -> dict:
    """Dequantised GGUF tensors (numpy, torch [out, in] layout) -> jsae params (numpy)."""
    r = _Reader(tensors, source)
    D, H, K, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp, cfg.vocab_size
    permuted = cfg.arch in ("llama", "mistral")

    def nrm(name, dim=D):
        return {"scale": _f32(r.get(name, (dim,)))}

    if cfg.arch == "gpt2":
        raise WeightError(f"{source}: GPT-2 GGUF files are not supported; use the HF safetensors checkpoint")
    out: dict = {"embed": r.get("token_embd.weight", (V, D)), "blocks": []}
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        wq = r.get(b + "attn_q.weight", (H * Dh, D))
        wk = r.get(b + "attn_k.weight", (K * Dh, D))
        if permuted:
            wq, wk = llama_gguf_unpermute(wq, H), llama_gguf_unpermute(wk, K)
        attn = {
            "q": wq.T.reshape(D, H, Dh),
            "k": wk.T.reshape(D, K, Dh),
            "v": r.get(b + "attn_v.weight", (K * Dh, D)).T.reshape(D, K, Dh),
            "o": r.get(b + "attn_output.weight", (D, H * Dh)).T.reshape(H, Dh, D),
        }
        if cfg.qkv_bias:
            bq = r.get(b + "attn_q.bias", (H * Dh,))
            bk = r.get(b + "attn_k.bias", (K * Dh,))
            if permuted:
                bq, bk = llama_gguf_unpermute(bq, H), llama_gguf_unpermute(bk, K)
            attn["bq"], attn["bk"] = bq.reshape(H, Dh), bk.reshape(K, Dh)
            attn["bv"] = r.get(b + "attn_v.bias", (K * Dh,)).reshape(K, Dh)
        if cfg.out_bias:
            attn["bo"] = r.get(b + "attn_output.bias", (D,))
        if cfg.qk_norm:
            attn["q_norm"] = nrm(b + "attn_q_norm.weight", Dh)["scale"]
            attn["k_norm"] = nrm(b + "attn_k_norm.weight", Dh)["scale"]
        mlp = {
            "gate": r.get(b + "ffn_gate.weight", (F, D)).T,
            "up": r.get(b + "ffn_up.weight", (F, D)).T,
            "down": r.get(b + "ffn_down.weight", (D, F)).T,
        }
        blk = {"ln1": nrm(b + "attn_norm.weight"), "attn": attn, "mlp": mlp}
        blk["ln2"] = nrm(b + "ffn_norm.weight")
        if cfg.post_norms:
            blk["ln1_post"] = nrm(b + "post_attention_norm.weight")
            blk["ln2_post"] = nrm(b + "post_ffw_norm.weight")
        out["blocks"].append(blk)
    out["final_norm"] = nrm("output_norm.weight")
    if not cfg.tie_embeddings:
        out["unembed"] = r.get("output.weight", (V, D)).T
    return out


# ------------------------------------------------------------------------------------------------


NORM_KEYS = ("ln1", "ln2", "ln1_post", "ln2_post", "final_norm", "q_norm", "k_norm")


def _is_norm_path(path) -> bool:
    return any(getattr(k, "key", None) in NORM_KEYS for k in path)


def to_device(params: dict, dtype="float32", *, consume: bool = False) -> dict:
    """numpy params -> jax arrays of `dtype`; norm parameters stay float32.

    `consume=True` converts leaf by leaf and drops each NumPy array from `params` once its copy is
    on the device (the dict then holds the jax arrays): with memory-mapped sources, at most one
    tensor exists twice, instead of the whole model (the loaders use it; measured in the docs)."""
    import jax

    dt = jnp.dtype(dtype)

    def conv(path, a):
        return jnp.asarray(a, jnp.float32 if _is_norm_path(path) else dt)

    if not consume:
        return jax.tree_util.tree_map_with_path(conv, params)

    def walk(node, path):
        keys = range(len(node)) if isinstance(node, list) else list(node)
        for k in keys:
            sub = path + (jax.tree_util.DictKey(k) if isinstance(node, dict) else jax.tree_util.SequenceKey(k),)
            if isinstance(node[k], (dict, list)):
                walk(node[k], sub)
            else:
                node[k] = conv(sub, node[k]).block_until_ready()  # the NumPy source is freed here
        return node

    return walk(params, ())


def flatten_params(params: dict) -> dict[str, np.ndarray]:
    """Nested params -> {"blocks.3.attn.q": array, ...} (for safetensors caches)."""
    out: dict[str, np.ndarray] = {}

    def rec(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                rec(f"{prefix}{k}.", v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                rec(f"{prefix}{i}.", v)
        else:
            out[prefix[:-1]] = np.ascontiguousarray(np.asarray(node))

    rec("", params)
    return out


def unflatten_params(flat: Mapping[str, np.ndarray], n_layers: int) -> dict:
    out: dict = {"blocks": [{} for _ in range(n_layers)]}
    for name, a in flat.items():
        parts = name.split(".")
        node = out
        if parts[0] == "blocks":
            node = out["blocks"][int(parts[1])]
            parts = parts[2:]
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = a
    return out


def params_to_hf(cfg: TransformerConfig, params: dict, prefix: str = "model.") -> dict[str, np.ndarray]:
    """jsae params -> HF transformers state dict (float32 numpy), the inverse of `params_from_hf`
    for the Gemma / Llama / Qwen / Mistral families (export, and building reference models)."""
    if cfg.arch == "gpt2":
        raise NotImplementedError("GPT-2 export is not implemented")
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    minus1 = 1.0 if cfg.arch in GEMMA_ARCHS else 0.0

    def a(x):
        return np.asarray(x, dtype=np.float32)

    sd = {prefix + "embed_tokens.weight": a(params["embed"])}
    for i, blk in enumerate(params["blocks"]):
        b = f"{prefix}layers.{i}."
        at = blk["attn"]
        sd[b + "self_attn.q_proj.weight"] = a(at["q"]).reshape(D, H * Dh).T
        sd[b + "self_attn.k_proj.weight"] = a(at["k"]).reshape(D, K * Dh).T
        sd[b + "self_attn.v_proj.weight"] = a(at["v"]).reshape(D, K * Dh).T
        sd[b + "self_attn.o_proj.weight"] = a(at["o"]).reshape(H * Dh, D).T
        for k, hf in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
            if k in at:
                sd[b + f"self_attn.{hf}.bias"] = a(at[k]).reshape(-1)
        if "bo" in at:
            sd[b + "self_attn.o_proj.bias"] = a(at["bo"])
        if "q_norm" in at:
            sd[b + "self_attn.q_norm.weight"] = a(at["q_norm"]) - minus1
            sd[b + "self_attn.k_norm.weight"] = a(at["k_norm"]) - minus1
        m = blk["mlp"]
        sd[b + "mlp.gate_proj.weight"] = a(m["gate"]).T
        sd[b + "mlp.up_proj.weight"] = a(m["up"]).T
        sd[b + "mlp.down_proj.weight"] = a(m["down"]).T
        for k, hf in (("b_gate", "gate_proj"), ("b_up", "up_proj"), ("b_down", "down_proj")):
            if k in m:
                sd[b + f"mlp.{hf}.bias"] = a(m[k])
        sd[b + "input_layernorm.weight"] = a(blk["ln1"]["scale"]) - minus1
        if cfg.post_norms:
            sd[b + "post_attention_layernorm.weight"] = a(blk["ln1_post"]["scale"]) - minus1
            sd[b + "pre_feedforward_layernorm.weight"] = a(blk["ln2"]["scale"]) - minus1
            sd[b + "post_feedforward_layernorm.weight"] = a(blk["ln2_post"]["scale"]) - minus1
        else:
            sd[b + "post_attention_layernorm.weight"] = a(blk["ln2"]["scale"]) - minus1
    sd[prefix + "norm.weight"] = a(params["final_norm"]["scale"]) - minus1
    sd["lm_head.weight"] = a(params["embed"]) if cfg.tie_embeddings else a(params["unembed"]).T
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def center_writing_weights(cfg: TransformerConfig, params: dict) -> tuple[TransformerConfig, dict]:
    """TransformerLens' `center_writing_weights` for LayerNorm models (GPT-2): subtract from every
    matrix/bias that writes to the residual stream its mean over d_model. The residual stream then
    has zero mean in every position (what SAEs trained with TransformerLens' default GPT-2, e.g.
    SAELens' gpt2-small ones, expect); LayerNorm removes the mean anyway, so logits are unchanged.
    Tied embeddings are untied (the unembedding keeps the original matrix). Returns (cfg, params)."""
    if cfg.norm != "layer":
        raise ValueError(f"centering the writing weights needs LayerNorm; {cfg.arch} uses {cfg.norm}")
    import jax

    def c(a):
        return a - a.mean(axis=-1, keepdims=True)

    out = jax.tree_util.tree_map(lambda a: a, params)  # shallow structural copy
    if cfg.tie_embeddings:
        out["unembed"] = params["embed"].T
        cfg = cfg.replace(tie_embeddings=False)
    out["embed"] = c(params["embed"])
    if "pos_embed" in out:
        out["pos_embed"] = c(params["pos_embed"])
    blocks = []
    for blk in params["blocks"]:
        blk = {**blk, "attn": dict(blk["attn"]), "mlp": dict(blk["mlp"])}
        blk["attn"]["o"] = c(blk["attn"]["o"])
        if "bo" in blk["attn"]:
            blk["attn"]["bo"] = c(blk["attn"]["bo"])
        blk["mlp"]["down"] = c(blk["mlp"]["down"])
        if "b_down" in blk["mlp"]:
            blk["mlp"]["b_down"] = c(blk["mlp"]["b_down"])
        blocks.append(blk)
    out["blocks"] = blocks
    return cfg, out
