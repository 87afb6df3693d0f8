"""Static description of a decoder-only transformer (hashable: a static argument to `jax.jit`).

One `TransformerConfig` covers every architecture jsae ports (Gemma 3, Gemma 2, GPT-2, Llama,
Qwen2/3); the differences between them are a handful of switches (norm type, positional scheme,
GLU or plain MLP, sandwich norms, QK-norm, biases, soft-capping, sliding windows).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

ARCHITECTURES = ("gemma3", "gemma2", "gemma", "gpt2", "llama", "qwen2", "qwen3", "mistral")

# ``ln2.hook_normalized``: the residual before the MLP after its norm's normalisation but before
# the norm's learned scale (and bias), as TransformerLens fires it and circuit-tracer names it for
# Gemma; ``mlp.hook_in``: what the MLP reads (the norm's output, scale applied): Gemma Scope 2's
# transcoders read it (``pre_feedforward_layernorm.output``), circuit-tracer calls it ``mlp.hook_in``.
HOOK_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
              "ln2.hook_normalized", "mlp.hook_in")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(map(re.escape, HOOK_KINDS)) + r")$")
FINAL_HOOK = "ln_final.hook_normalized"


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a decoder-only LM. Frozen and hashable."""

    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    max_position: int = 8192
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    pos: str = "rope"  # "rope" | "learned"
    rope_base: float = 10_000.0  # global (full-attention) layers
    rope_local_base: Optional[float] = None  # sliding-window layers; None: rope_base
    # rope scaling of global layers as sorted (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "linear"))
    rope_scaling: tuple = ()
    sliding_window: Optional[int] = None
    layer_types: tuple = ()  # per layer "global" | "local"; () means all global
    attn_scale: Optional[float] = None  # None: head_dim ** -0.5
    qk_norm: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp: str = "glu"  # "glu" (gate * up) | "mlp" (up -> act -> down)
    act: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    mlp_bias: bool = False
    post_norms: bool = False  # Gemma 2/3: norm the attention and MLP outputs before the residual add
    embed_scale: Optional[float] = None  # Gemma: sqrt(d_model), cast to the params dtype like HF
    tie_embeddings: bool = True
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        for t in self.layer_types:
            if t not in ("global", "local"):
                raise ValueError(f"layer type {t!r} is neither 'global' nor 'local'")

    # ---- derived ----
    @property
    def d_attn(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def is_local(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "local"

    def window(self, layer: int) -> Optional[int]:
        return self.sliding_window if self.is_local(layer) else None

    def rope_base_for(self, layer: int) -> float:
        if self.is_local(layer) and self.rope_local_base is not None:
            return self.rope_local_base
        return self.rope_base

    def rope_scaling_for(self, layer: int) -> dict:
        return {} if self.is_local(layer) else dict(self.rope_scaling)

    def hook_names(self) -> list[str]:
        return [f"blocks.{i}.{k}" for i in range(self.n_layers) for k in HOOK_KINDS] + [FINAL_HOOK]

    def replace(self, **kw) -> TransformerConfig:
        return dataclasses.replace(self, **kw)


def parse_hook(name: str, cfg: TransformerConfig) -> tuple[int, str]:
    """`"blocks.6.hook_resid_post"` -> `(6, "hook_resid_post")`; the final-norm hook -> `(n_layers, name)`."""
    if name == FINAL_HOOK:
        return cfg.n_layers, name
    m = _HOOK_RE.match(name)
    if not m:
        raise ValueError(
            f"unknown hook point {name!r}; expected 'blocks.{{L}}.<kind>' with kind in "
            f"{', '.join(HOOK_KINDS)}, or {FINAL_HOOK!r}"
        )
    layer = int(m.group(1))
    if layer >= cfg.n_layers:
        raise ValueError(f"hook {name!r}: layer {layer} does not exist (the model has {cfg.n_layers} layers)")
    return layer, m.group(2)


def gemma3_layer_types(n_layers: int, pattern: int = 6) -> tuple:
    """Gemma 3: five sliding-window layers, then one global layer, repeated."""
    return tuple("global" if (i + 1) % pattern == 0 else "local" for i in range(n_layers))


def _rope_scaling_tuple(d: Optional[dict]) -> tuple:
    if not d:
        return ()
    d = {k: v for k, v in d.items() if k not in ("rope_theta",)}
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return ()
    d["rope_type"] = kind
    d.pop("type", None)
    if kind not in ("linear", "llama3"):
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def from_hf_config(hf: dict) -> TransformerConfig:
    """Build a `TransformerConfig` from an HF `config.json` dict (text models; multimodal Gemma 3 reads
    its `text_config`)."""
    model_type = hf.get("model_type", "")
    if "text_config" in hf and model_type in ("gemma3", "gemma3n"):
        text = dict(hf["text_config"])
        text.setdefault("model_type", "gemma3_text")
        return from_hf_config(text)
    get = hf.get
    if model_type == "gpt2":
        d = get("n_embd", 768)
        return TransformerConfig(
            arch="gpt2",
            vocab_size=get("vocab_size", 50257),
            d_model=d,
            n_layers=get("n_layer", 12),
            n_heads=get("n_head", 12),
            n_kv_heads=get("n_head", 12),
            head_dim=d // get("n_head", 12),
            d_mlp=get("n_inner") or 4 * d,
            max_position=get("n_positions", 1024),
            norm="layer",
            norm_eps=get("layer_norm_epsilon", 1e-5),
            pos="learned",
            qkv_bias=True,
            out_bias=True,
            mlp="mlp",
            act={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}[
                get("activation_function", "gelu_new")
            ],
            mlp_bias=True,
            tie_embeddings=get("tie_word_embeddings", True),
            attn_scale=None if get("scale_attn_weights", True) else 1.0,
            bos_id=get("bos_token_id"),
            eos_id=get("eos_token_id"),
        )
    rope = get("rope_parameters") or {}
    if model_type in ("gemma3_text", "gemma3"):
        # multimodal checkpoints' text_config omits values equal to Gemma3TextConfig's defaults
        hf = {**GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k.endswith("softcapping")}}
        get = hf.get
        n = get("num_hidden_layers")
        lt = get("layer_types")
        layer_types = (
            tuple("local" if t == "sliding_attention" else "global" for t in lt)
            if lt
            else gemma3_layer_types(n, get("sliding_window_pattern", 6))
        )
        full = rope.get("full_attention") or {}
        local = rope.get("sliding_attention") or {}
        scaling = full if full else get("rope_scaling")
        d = get("hidden_size")
        return TransformerConfig(
            arch="gemma3",
            vocab_size=get("vocab_size"),
            d_model=d,
            n_layers=n,
            n_heads=get("num_attention_heads"),
            n_kv_heads=get("num_key_value_heads"),
            head_dim=get("head_dim", 256),
            d_mlp=get("intermediate_size"),
            max_position=get("max_position_embeddings", 131072),
            norm_eps=get("rms_norm_eps", 1e-6),
            rope_base=full.get("rope_theta", get("rope_theta", 1_000_000.0)),
            rope_local_base=local.get("rope_theta", get("rope_local_base_freq", 10_000.0)),
            rope_scaling=_rope_scaling_tuple(scaling),
            sliding_window=get("sliding_window", 4096),
            layer_types=layer_types,
            attn_scale=get("query_pre_attn_scalar", 256) ** -0.5,
            qk_norm=True,
            qkv_bias=get("attention_bias", False),
            out_bias=get("attention_bias", False),
            act=_act(get("hidden_activation", "gelu_pytorch_tanh")),
            post_norms=True,
            embed_scale=d**0.5,
            tie_embeddings=get("tie_word_embeddings", True),
            attn_softcap=get("attn_logit_softcapping"),
            final_softcap=get("final_logit_softcapping"),
            bos_id=get("bos_token_id", 2),
            eos_id=_first(get("eos_token_id", 1)),
            pad_id=get("pad_token_id", 0),
        )
    if model_type in ("gemma2", "gemma"):
        n = get("num_hidden_layers")
        d = get("hidden_size")
        g2 = model_type == "gemma2"
        lt = get("layer_types")
        if g2:
            layer_types = (
                tuple("local" if t == "sliding_attention" else "global" for t in lt)
                if lt
                else tuple("local" if i % 2 == 0 else "global" for i in range(n))
            )
        else:
            layer_types = ()
        return TransformerConfig(
            arch=model_type,
            vocab_size=get("vocab_size"),
            d_model=d,
            n_layers=n,
            n_heads=get("num_attention_heads"),
            n_kv_heads=get("num_key_value_heads"),
            head_dim=get("head_dim", 256),
            d_mlp=get("intermediate_size"),
            max_position=get("max_position_embeddings", 8192),
            norm_eps=get("rms_norm_eps", 1e-6),
            rope_base=(rope.get("rope_theta") if rope else None) or get("rope_theta", 10_000.0),
            sliding_window=get("sliding_window") if g2 else None,
            layer_types=layer_types,
            attn_scale=get("query_pre_attn_scalar", get("head_dim", 256)) ** -0.5,
            qkv_bias=get("attention_bias", False),
            out_bias=get("attention_bias", False),
            act=_act(get("hidden_activation") or get("hidden_act", "gelu_pytorch_tanh")),
            post_norms=g2,
            embed_scale=d**0.5,
            tie_embeddings=get("tie_word_embeddings", True),
            attn_softcap=get("attn_logit_softcapping") if g2 else None,
            final_softcap=get("final_logit_softcapping") if g2 else None,
            bos_id=get("bos_token_id", 2),
            eos_id=_first(get("eos_token_id", 1)),
            pad_id=get("pad_token_id", 0),
        )
    if model_type in ("llama", "qwen2", "qwen3", "mistral"):
        n = get("num_hidden_layers")
        d = get("hidden_size")
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or d // heads
        sw = get("sliding_window") if get("use_sliding_window", model_type == "mistral") else None
        if model_type in ("qwen2", "qwen3") and sw:
            lt = get("layer_types")
            max_window = get("max_window_layers", n)
            layer_types = (
                tuple("local" if t == "sliding_attention" else "global" for t in lt)
                if lt
                else tuple("local" if i >= max_window else "global" for i in range(n))
            )
        else:
            layer_types = ("local",) * n if sw else ()
        return TransformerConfig(
            arch=model_type,
            vocab_size=get("vocab_size"),
            d_model=d,
            n_layers=n,
            n_heads=heads,
            n_kv_heads=get("num_key_value_heads") or heads,
            head_dim=head_dim,
            d_mlp=get("intermediate_size"),
            max_position=get("max_position_embeddings", 8192),
            norm_eps=get("rms_norm_eps", 1e-6),
            rope_base=rope.get("rope_theta") or get("rope_theta", 10_000.0),
            rope_scaling=_rope_scaling_tuple(rope or get("rope_scaling")),
            sliding_window=sw,
            layer_types=layer_types,
            qk_norm=model_type == "qwen3",
            qkv_bias=get("attention_bias", model_type == "qwen2"),
            out_bias=get("attention_bias", False) and model_type != "qwen2",
            act=_act(get("hidden_act", "silu")),
            mlp_bias=get("mlp_bias", False),
            tie_embeddings=get("tie_word_embeddings", False),
            bos_id=get("bos_token_id"),
            eos_id=_first(get("eos_token_id")),
            pad_id=get("pad_token_id"),
        )
    raise ValueError(
        f"unknown architecture: config.json has model_type={model_type!r} "
        f"(architectures={hf.get('architectures')}); supported: gemma3, gemma2, gemma, gpt2, llama, "
        "qwen2, qwen3, mistral"
    )


GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "sliding_window": 4096,
    "max_position_embeddings": 131_072,
}


def _act(name: str) -> str:
    table = {
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_new": "gelu_tanh",
        "gelu_tanh": "gelu_tanh",
        "gelu": "gelu",
        "silu": "silu",
        "swish": "silu",
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(table)})")
    return table[name]


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x
