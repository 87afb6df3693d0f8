"""Read GGUF files (llama.cpp) with the `gguf` package: metadata, dequantised tensors, model config.

GGUF metadata lacks a few facts the HF configs state; they are filled in here the way llama.cpp
does: Gemma 3 uses rope base 1e4 on its sliding-window layers and puts a global layer every 6th
layer; Gemma's attention scale is head_dim**-0.5 except for the 27B models (d_model / n_heads);
Gemma scales embeddings by sqrt(d_model).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from jsae.models.config import TransformerConfig, gemma3_layer_types

GGUF_ARCHS = ("gemma3", "gemma2", "gemma", "llama", "qwen2", "qwen3", "mistral")


def _field_value(field) -> Any:
    import gguf

    types = list(field.types)
    if not types:
        return None

    def to_str(part):
        return bytes(part).decode("utf-8", errors="replace")

    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [to_str(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if types[0] == gguf.GGUFValueType.STRING:
        return to_str(field.parts[-1])
    return field.parts[-1].tolist()[0]


def read_gguf(path: str | os.PathLike, *, tensors: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata dict, {tensor name: float32 numpy array in torch [out, in] layout})."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = gguf.GGUFReader(str(path))
    meta = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    out: dict[str, np.ndarray] = {}
    if tensors:
        from tqdm.auto import tqdm

        for t in tqdm(reader.tensors, desc=f"dequantise {Path(path).name}", unit="tensor",
                      leave=False, disable=len(reader.tensors) < 32):
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            out[t.name] = np.asarray(a, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    return meta, out


def config_from_gguf(meta: dict, tensor_names) -> TransformerConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"unknown architecture in GGUF: general.architecture={arch!r}; supported: {', '.join(GGUF_ARCHS)}")

    def g(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    d = g("embedding_length")
    n = g("block_count")
    heads = g("attention.head_count")
    kv = g("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv, list):
        raise ValueError("GGUF with per-layer head counts is not supported")
    head_dim = g("attention.key_length") or d // heads
    vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else g("vocab_size")
    tied = "output.weight" not in set(tensor_names)
    eps = g("attention.layer_norm_rms_epsilon", 1e-6)
    eps = float(np.float32(eps))
    scaling: tuple = ()
    stype = g("rope.scaling.type")
    if stype == "linear":
        scaling = (("factor", float(g("rope.scaling.factor"))), ("rope_type", "linear"))
    elif stype not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {stype!r} is not supported")
    if "rope_freqs.weight" in set(tensor_names):
        raise ValueError("GGUF with a rope_freqs tensor (Llama 3.1 rope scaling) is not supported; use the HF checkpoint")
    common = dict(
        vocab_size=vocab,
        d_model=d,
        n_layers=n,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=head_dim,
        d_mlp=g("feed_forward_length"),
        max_position=g("context_length", 8192),
        norm_eps=eps,
        tie_embeddings=tied,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if arch.startswith("gemma"):
        big = (arch == "gemma3" and n == 62) or (arch == "gemma2" and n == 46)  # the 27B models
        scale = (d / heads) ** -0.5 if big else head_dim**-0.5
        window = g("attention.sliding_window")
        if arch == "gemma3":
            lt = gemma3_layer_types(n)
            rope_base, local_base = g("rope.freq_base", 1_000_000.0), 10_000.0
        elif arch == "gemma2":
            lt = tuple("local" if i % 2 == 0 else "global" for i in range(n))
            rope_base, local_base = g("rope.freq_base", 10_000.0), None
        else:
            lt, window = (), None
            rope_base, local_base = g("rope.freq_base", 10_000.0), None
        return TransformerConfig(
            arch=arch,
            rope_base=float(rope_base),
            rope_local_base=local_base,
            rope_scaling=scaling,
            sliding_window=window,
            layer_types=lt,
            attn_scale=scale,
            qk_norm=arch == "gemma3",
            act="gelu_tanh",
            post_norms=arch != "gemma",
            embed_scale=math.sqrt(d),
            attn_softcap=g("attn_logit_softcapping") if arch == "gemma2" else None,
            final_softcap=g("final_logit_softcapping") if arch == "gemma2" else None,
            **common,
        )
    window = g("attention.sliding_window")
    return TransformerConfig(
        arch=arch,
        rope_base=float(g("rope.freq_base", 10_000.0)),
        rope_scaling=scaling,
        sliding_window=window,
        layer_types=("local",) * n if window else (),
        qk_norm=arch == "qwen3",
        qkv_bias=arch == "qwen2",
        act="silu",
        **common,
    )
