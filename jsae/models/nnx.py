"""The transformer as Flax NNX modules, for inspecting (treescope) and editing (surgery) a model.

    >>> lm = jsae.models.load("gemma-3-270m")
    >>> model = lm.model                       # jsae.models.nnx.Transformer, sharing lm.params' arrays
    >>> model.blocks[6].mlp = MyTranscoder(...)     # any callable nnx.Module: h [B, T, D] -> [B, T, D]
    >>> out = jsae.models.nnx.forward(model, tokens, capture=["blocks.6.hook_mlp_out"])

Module tree (each `nnx.Param` is the array at the same path in the params dict of
`jsae.models.transformer`, so `params_of(Transformer.from_params(cfg, p))` is `p`, leaf for leaf):

    Transformer  embed [V, D]  (pos_embed [P, D])  (unembed [D, V])  (unembed_bias [V])
      blocks: nnx.List[Block]
        Block  ln1, ln2 (ln1_post, ln2_post): Norm  scale [D] (bias [D])
               attn: Attention  q [D, H, Dh]  k, v [D, K, Dh]  o [H, Dh, D]  (bq, bk, bv, bo, q_norm, k_norm)
               mlp:  MLP        (gate [D, F])  up [D, F]  down [F, D]  (b_gate, b_up, b_down)
      final_norm: Norm

The arithmetic lives once, in `jsae.models.transformer` (`attention`, `mlp`, `norm`, `block`, `run`);
each module's `__call__` hands its own params (and its sublayers, as callables) to those functions,
so an unedited module computes exactly what the pure `transformer.forward(cfg, params, ...)` does.
The pure path stays the one the SAE pipeline jits and shards; `forward(model, ...)` here splits the
module into (graphdef, state) and jits a pure function of the state (interventions as in
`transformer.forward`: `jax.tree_util.Partial` arrays are traced, so new values do not recompile).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jsae.models import transformer as T
from jsae.models.config import TransformerConfig, parse_hook

# nnx.List arrived in flax 0.12 (Python >= 3.11); before it a plain list of Modules is a graph node
_ModuleList = getattr(nnx, "List", list)

Array = jax.Array

_ATTN_KEYS = ("q", "k", "v", "o", "bq", "bk", "bv", "bo", "q_norm", "k_norm")
_MLP_KEYS = ("gate", "up", "down", "b_gate", "b_up", "b_down")
_TOP_KEYS = ("embed", "pos_embed", "unembed", "unembed_bias")


def _params(module: nnx.Module, keys: Sequence[str]) -> dict:
    """The module's `nnx.Param` values among `keys`, as the dict the pure functions take."""
    return {k: getattr(module, k).get_value() for k in keys if isinstance(getattr(module, k, None), nnx.Param)}


def _set_params(module: nnx.Module, p: Mapping[str, Array], keys: Sequence[str], where: str) -> None:
    unknown = set(p) - set(keys)
    if unknown:
        raise ValueError(f"{where}: unknown params {sorted(unknown)}; expected some of {list(keys)}")
    for k in keys:
        if k in p:
            setattr(module, k, nnx.Param(p[k]))  # wraps the array itself: no copy


class Norm(nnx.Module):
    """RMSNorm / LayerNorm (cfg.norm); `scale` is the multiplier (Gemma's +1 already folded in)."""

    def __init__(self, cfg: TransformerConfig, scale: Array, bias: Optional[Array] = None):
        self.cfg = cfg
        self.scale = nnx.Param(scale)
        if bias is not None:
            self.bias = nnx.Param(bias)

    def params(self) -> dict:
        return _params(self, ("scale", "bias"))

    def __call__(self, x: Array) -> Array:
        return T.norm(self.cfg, self.params(), x)


class Attention(nnx.Module):
    """Grouped-query self-attention of one layer (RoPE, QK-norm, sliding window, soft-capping per cfg)."""

    def __init__(self, cfg: TransformerConfig, layer: int, p: Mapping[str, Array]):
        self.cfg, self.layer = cfg, layer
        _set_params(self, p, _ATTN_KEYS, f"blocks.{layer}.attn")

    def params(self) -> dict:
        return _params(self, _ATTN_KEYS)

    def __call__(self, h, positions, k_pos, k_valid, cache_kv=None, cache_index=None, extra_mask=None):
        """h [B, T, D] (normed) -> (out [B, T, D], (k, v) cache slots or None)."""
        return T.attention(self.cfg, self.layer, self.params(), h, positions, k_pos, k_valid, cache_kv,
                           cache_index, extra_mask)


class MLP(nnx.Module):
    """GLU (`act(h @ gate) * (h @ up)`) or plain (`act(h @ up)`) MLP, then `@ down`."""

    def __init__(self, cfg: TransformerConfig, layer: int, p: Mapping[str, Array]):
        self.cfg, self.layer = cfg, layer
        _set_params(self, p, _MLP_KEYS, f"blocks.{layer}.mlp")

    def params(self) -> dict:
        return _params(self, _MLP_KEYS)

    def __call__(self, h: Array) -> Array:
        """h [B, T, D] (normed) -> [B, T, D]."""
        return T.mlp(self.cfg, self.params(), h)


class Block(nnx.Module):
    """Pre-norm residual block; hooks `blocks.{layer}.hook_*` fire inside `transformer.block`."""

    def __init__(self, cfg: TransformerConfig, layer: int, p: Mapping[str, Mapping]):
        self.cfg, self.layer = cfg, layer
        for name in ("ln1", "ln2", "ln1_post", "ln2_post"):
            if name in p:
                setattr(self, name, Norm(cfg, p[name]["scale"], p[name].get("bias")))
        self.attn = Attention(cfg, layer, p["attn"])
        self.mlp = MLP(cfg, layer, p["mlp"])

    def norms(self) -> dict:
        return {n: getattr(self, n).params() for n in ("ln1", "ln2", "ln1_post", "ln2_post") if hasattr(self, n)}

    def __call__(self, x, positions, k_pos, k_valid, fns, acts, capture, cache_kv=None, cache_index=None,
                 upto: str = "hook_resid_post", extra_mask=None):
        return T.block(self.cfg, self.layer, self.norms(), x, positions, k_pos, k_valid, fns, acts, capture,
                       cache_kv, cache_index, upto, extra_mask, attn_fn=self.attn, mlp_fn=self.mlp)


class Transformer(nnx.Module):
    """The whole decoder-only LM. Build it from a params dict with `from_params` (no copy)."""

    def __init__(self, cfg: TransformerConfig, params: Mapping):
        self.cfg = cfg
        for k in _TOP_KEYS:
            if k in params:
                setattr(self, k, nnx.Param(params[k]))
        if len(params["blocks"]) != cfg.n_layers:
            raise ValueError(f"params have {len(params['blocks'])} blocks; the config says {cfg.n_layers} layers")
        self.blocks = _ModuleList([Block(cfg, i, b) for i, b in enumerate(params["blocks"])])
        fn = params["final_norm"]
        self.final_norm = Norm(cfg, fn["scale"], fn.get("bias"))

    @classmethod
    def from_params(cls, cfg: TransformerConfig, params: Mapping) -> Transformer:
        """Wrap a params dict of `jsae.models.transformer` (its arrays become the `nnx.Param`s)."""
        return cls(cfg, params)

    def top_params(self) -> dict:
        """Embedding, unembedding and final norm: what `transformer.run` reads outside the blocks."""
        return {**_params(self, _TOP_KEYS), "final_norm": self.final_norm.params()}

    def __call__(self, tokens: Array, **kw):
        """`transformer.run` with these modules as the blocks -> (logits | None, activations, cache)."""
        return T.run(self.cfg, self.top_params(), tokens, block_fns=list(self.blocks), **kw)


def params_of(model: Transformer) -> dict:
    """The params dict of `jsae.models.transformer` held by `model` (the same arrays, no copy).

    Raises if a block's attn/mlp was replaced by another module: such a model runs only through
    `forward` here, not through the pure `transformer.forward`."""
    blocks = []
    for i, b in enumerate(model.blocks):
        if type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not MLP:
            raise ValueError(f"blocks.{i} holds a replaced module; run it with jsae.models.nnx.forward(model, ...)")
        blocks.append({**b.norms(), "attn": b.attn.params(), "mlp": b.mlp.params()})
    return {**model.top_params(), "blocks": blocks}


def _forward_impl(graphdef, state, tokens, attention_mask, dyn, static, capture, stop_after_capture):
    model = nnx.merge(graphdef, state)
    fns = T.merge_interventions(static, dyn)
    logits, acts, _ = model(tokens, attention_mask=attention_mask, interventions=fns, capture=capture,
                            stop_after_capture=stop_after_capture)
    return T.ForwardOutput(logits, acts)


_forward_jit = jax.jit(_forward_impl, static_argnums=(0, 5, 6, 7))


def forward(
    model: Transformer,
    tokens,
    *,
    interventions: Optional[Mapping[str, Callable]] = None,
    capture: Sequence[str] = (),
    stop_after_capture: bool = False,
    attention_mask=None,
) -> T.ForwardOutput:
    """`transformer.forward` for an NNX model (edited or not): `nnx.split` -> jitted pure function of
    the state. Same arguments and results; tokens [B, T] -> logits [B, T, V] float32 | None."""
    if isinstance(capture, str):
        capture = (capture,)
    capture = tuple(sorted(set(capture)))
    for name in (*capture, *(interventions or {})):
        parse_hook(name, model.cfg)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
    static, dyn = T.split_interventions(interventions)
    graphdef, state = nnx.split(model)
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return _forward_jit(graphdef, state, tokens, mask, dyn, static, capture, bool(stop_after_capture))
