"""The decoder-only transformer as plain `jax.numpy` functions over a params pytree.

Params layout (nested dicts of arrays; matrices are `[in, out]` so `x @ W`):

    embed            [V, D]
    pos_embed        [P, D]                          (learned positions: GPT-2)
    blocks[i]        one dict per layer:
      ln1, ln2       {"scale": [D] (, "bias": [D])}   norm scales are stored *as multipliers*
      ln1_post, ln2_post                              (Gemma 2/3 sandwich norms; Gemma's +1 folded in)
      attn  q [D, H, Dh]  k, v [D, K, Dh]  o [H, Dh, D]
            (bq [H, Dh], bk, bv [K, Dh], bo [D])  (q_norm, k_norm [Dh])
      mlp   gate, up [D, F]  down [F, D]  (b_up [F], b_down [D])   ("gate" only for GLU MLPs)
    final_norm       {"scale": [D] (, "bias")}
    unembed          [D, V]                          (untied models only)

Norm scales are kept in float32 whatever the dtype of the matrices; norms, softmax and the rotary
tables compute in float32 and cast back, as the HF implementations do.

Hook points (TransformerLens / SAELens names): `blocks.{L}.hook_resid_pre` (block input),
`hook_attn_out` (what attention adds to the residual, after Gemma's post-norm), `hook_resid_mid`,
`ln2.hook_normalized` (the MLP's norm before its learned scale), `mlp.hook_in` (what the MLP reads),
`hook_mlp_out` (what the MLP adds, after Gemma's post-norm), `hook_resid_post` (block output), and
`ln_final.hook_normalized`. An intervention
at a hook replaces the activation there; the captured value is the one after the intervention.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jsae.models.config import FINAL_HOOK, TransformerConfig, parse_hook

Array = jax.Array
Params = dict
# order of the hooks inside a block
HOOK_KINDS_ORDER = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_in",
                    "hook_mlp_out", "hook_resid_post")


class ForwardOutput(NamedTuple):
    logits: Optional[Array]  # [B, T, V] float32, or None when the forward stopped early
    activations: dict  # hook name -> [B, T, D]


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for `S` slots, plus the position held in each slot (-1: empty)."""

    k: tuple  # per layer [B, S, K, Dh]
    v: tuple
    pos: Array  # [B, S] int32
    index: Array  # scalar int32: next slot to write

    @staticmethod
    def init(cfg: TransformerConfig, batch: int, size: int, dtype) -> KVCache:
        shape = (batch, size, cfg.n_kv_heads, cfg.head_dim)
        z = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        z2 = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        return KVCache(z, z2, jnp.full((batch, size), -1, jnp.int32), jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# building blocks


def norm(cfg: TransformerConfig, p: Mapping[str, Array], x: Array, eps: Optional[float] = None) -> Array:
    """RMSNorm or LayerNorm in float32, result cast back to x's dtype."""
    return norm_affine(p, normalize(cfg, x, eps)).astype(x.dtype)


def normalize(cfg: TransformerConfig, x: Array, eps: Optional[float] = None) -> Array:
    """The norm without its learned scale and bias, in float32: ``x / rms(x)`` (RMSNorm) or
    ``(x - mean) / std`` (LayerNorm); TransformerLens's ``hook_normalized``."""
    eps = cfg.norm_eps if eps is None else eps
    xf = x.astype(jnp.float32)
    if cfg.norm == "layer":
        mean = xf.mean(-1, keepdims=True)
        xf = xf - mean
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def norm_affine(p: Mapping[str, Array], y: Array) -> Array:
    """The norm's learned scale (and bias) applied to a normalised ``y``, in float32."""
    y = y.astype(jnp.float32) * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y


def _rms(x: Array, scale: Array, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def activation(name: str, x: Array) -> Array:
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def rope_inv_freq(head_dim: int, base: float, scaling: Mapping[str, Any]) -> np.ndarray:
    """Inverse frequencies (float32, [head_dim/2]) with optional linear / llama3 scaling."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(base) ** exponent)).astype(np.float32)
    kind = scaling.get("rope_type", "default") if scaling else "default"
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wl, high_wl = old / low, old / high
        wl = 2 * np.pi / inv
        inv_l = np.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported")
    return inv.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotary embedding, HF ("rotate half") layout. x: [B, T, N, Dh], positions: [B, T]."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    cos = jnp.cos(ang).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(ang).astype(x.dtype)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(
    q_pos: Array, k_pos: Array, k_valid: Array, window: Optional[int], extra: Optional[Array] = None
) -> Array:
    """[B, T, S] bool: causal by position, keys valid, and within the sliding window if any.

    `extra` [B, T, S] (optional) is OR-ed into the causal part: Gemma 3 lets the tokens of one
    image attend to each other both ways (the window and key validity still apply)."""
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    causal = kp <= qp
    if extra is not None:
        causal = causal | extra
    m = causal & k_valid[:, None, :]
    if window is not None:
        m = m & (qp - kp < window)
    return m


def attention_weights(cfg: TransformerConfig, q: Array, k: Array, mask: Array) -> Array:
    """Grouped-query attention weights. q [B,T,H,Dh], k [B,S,K,Dh], mask [B,T,S] ->
    [B, K, H/K, T, S] float32 (softmax over S)."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * cfg.scale
    if cfg.attn_softcap is not None:
        s = jnp.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
    s = jnp.where(mask[:, None, None, :, :], s, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(s, axis=-1)


def attend(cfg: TransformerConfig, q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention. q [B,T,H,Dh], k/v [B,S,K,Dh], mask [B,T,S] -> [B,T,H,Dh]."""
    B, T, H, Dh = q.shape
    w = attention_weights(cfg, q, k, mask).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", w, v, preferred_element_type=jnp.float32)
    return o.astype(q.dtype).reshape(B, T, H, Dh)


def mlp(cfg: TransformerConfig, p: Mapping[str, Array], x: Array) -> Array:
    up = x @ p["up"]
    if "b_up" in p:
        up = up + p["b_up"]
    if cfg.mlp == "glu":
        gate = x @ p["gate"]
        if "b_gate" in p:
            gate = gate + p["b_gate"]
        h = activation(cfg.act, gate) * up
    else:
        h = activation(cfg.act, up)
    out = h @ p["down"]
    if "b_down" in p:
        out = out + p["b_down"]
    return out


def embed(cfg: TransformerConfig, params: Params, tokens: Array, positions: Array) -> Array:
    table = params["embed"]
    x = jnp.take(table, tokens, axis=0)
    if cfg.embed_scale is not None:
        x = x * jnp.asarray(cfg.embed_scale, dtype=table.dtype)  # HF casts the scale to the weight dtype
    if cfg.pos == "learned":
        x = x + jnp.take(params["pos_embed"], positions, axis=0)
    return x


def unembed(cfg: TransformerConfig, params: Params, x: Array) -> Array:
    x = norm(cfg, params["final_norm"], x)
    return logits_from_normed(cfg, params, x)


def logits_from_normed(cfg: TransformerConfig, params: Params, x: Array) -> Array:
    if cfg.tie_embeddings:
        logits = jnp.einsum("btd,vd->btv", x, params["embed"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", x, params["unembed"], preferred_element_type=jnp.float32)
    if "unembed_bias" in params:
        logits = logits + params["unembed_bias"].astype(jnp.float32)
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


# ----------------------------------------------------------------------------------------------
# the forward pass


@flax.struct.dataclass
class ReadsHook:
    """An intervention that also reads an earlier hook of the same forward: at its own hook it
    returns ``fn(act, activations[source])``. A transcoder spliced in place of an MLP is one
    (``{"blocks.6.hook_mlp_out": ReadsHook("blocks.6.hook_resid_mid", fn)}``). ``source`` may
    be a tuple of hooks: ``fn`` then gets a tuple of their activations (a cross-layer
    transcoder's output at one layer reads every earlier layer's input). A pytree: arrays
    inside ``fn`` (a `jax.tree_util.Partial`) travel as jit arguments."""

    source: str | tuple = flax.struct.field(pytree_node=False)
    fn: Callable

    @property
    def sources(self) -> tuple:
        """The hooks read, as a tuple."""
        return self.source if isinstance(self.source, tuple) else (self.source,)

    def __call__(self, x: Array, src: Array) -> Array:
        return self.fn(x, src)


def _hook(name: str, x: Array, fns: Mapping[str, Callable], acts: dict, capture: frozenset) -> Array:
    fn = fns.get(name)
    if isinstance(fn, ReadsHook):
        missing = [h for h in fn.sources if h not in acts]
        if missing:
            raise ValueError(f"the intervention at {name} reads {', '.join(missing)}, which the "
                             "forward has not reached yet (it must come earlier)")
        src = tuple(acts[h] for h in fn.sources)
        y = fn(x, src if isinstance(fn.source, tuple) else src[0])
        if y.shape != x.shape:
            raise ValueError(f"intervention at {name} changed the shape {x.shape} -> {y.shape}")
        x = y.astype(x.dtype)
    elif fn is not None:
        y = fn(x)
        if y.shape != x.shape:
            raise ValueError(f"intervention at {name} changed the shape {x.shape} -> {y.shape}")
        x = y.astype(x.dtype)
    if name in capture:
        acts[name] = x
    return x


def qkv(cfg: TransformerConfig, layer: int, a: Mapping[str, Array], h: Array, positions: Array):
    """(q, k, v) ``[B, T, heads, head_dim]`` of layer ``layer`` on its normed input ``h [B, T, D]``:
    projections, biases, q/k norms and the layer's rotary embedding."""
    q = jnp.einsum("btd,dhk->bthk", h, a["q"])
    k = jnp.einsum("btd,dhk->bthk", h, a["k"])
    v = jnp.einsum("btd,dhk->bthk", h, a["v"])
    if cfg.qkv_bias:
        q, k, v = q + a["bq"], k + a["bk"], v + a["bv"]
    if cfg.qk_norm:
        q = _rms(q, a["q_norm"], cfg.norm_eps)
        k = _rms(k, a["k_norm"], cfg.norm_eps)
    if cfg.pos == "rope":
        inv = rope_inv_freq(cfg.head_dim, cfg.rope_base_for(layer), cfg.rope_scaling_for(layer))
        q = apply_rope(q, positions, inv)
        k = apply_rope(k, positions, inv)
    return q, k, v


def attention(
    cfg: TransformerConfig,
    layer: int,
    a: Mapping[str, Array],
    h: Array,
    positions: Array,
    k_pos: Array,
    k_valid: Array,
    cache_kv: Optional[tuple] = None,
    cache_index: Optional[Array] = None,
    extra_mask: Optional[Array] = None,
):
    """Self-attention of layer `layer` on the normed input `h [B, T, D]` -> (out [B, T, D] before any
    post-norm, (k, v) written into the cache or None). `a` holds q, k, v, o (+ biases, q/k norms)."""
    q, k, v = qkv(cfg, layer, a, h, positions)
    new_kv = None
    if cache_kv is not None:
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
        new_kv = (ck, cv)
        k, v = ck, cv
    mask = attention_mask(positions, k_pos, k_valid, cfg.window(layer), extra_mask)
    o = attend(cfg, q, k.astype(q.dtype), v.astype(q.dtype), mask)
    out = jnp.einsum("bthk,hkd->btd", o, a["o"])
    if cfg.out_bias:
        out = out + a["bo"]
    return out, new_kv


def block(
    cfg: TransformerConfig,
    layer: int,
    p: Params,
    x: Array,
    positions: Array,
    k_pos: Array,
    k_valid: Array,
    fns: Mapping[str, Callable],
    acts: dict,
    capture: frozenset,
    cache_kv: Optional[tuple] = None,
    cache_index: Optional[Array] = None,
    upto: str = "hook_resid_post",
    extra_mask: Optional[Array] = None,
    *,
    attn_fn: Optional[Callable] = None,
    mlp_fn: Optional[Callable] = None,
):
    """One transformer block. Returns (x, (k, v) written into the cache or None).

    `p` holds the block's norms (and its attn/mlp weights unless `attn_fn`/`mlp_fn` are given: the
    NNX modules pass their own sublayers, so a replaced `model.blocks[i].mlp` runs here).
    `attn_fn(h, positions, k_pos, k_valid, cache_kv, cache_index, extra_mask) -> (out, new_kv)`,
    `mlp_fn(h) -> out`, both on normed inputs and before the post-norms.
    `upto` stops the block right after that hook (harvesting `hook_resid_pre` of the last layer
    needed skips the block entirely, `hook_attn_out` ... `mlp.hook_in` skip its MLP)."""
    pre = f"blocks.{layer}."
    x = _hook(pre + "hook_resid_pre", x, fns, acts, capture)
    if upto == "hook_resid_pre":
        return x, None
    h = norm(cfg, p["ln1"], x)
    if attn_fn is None:
        attn_out, new_kv = attention(cfg, layer, p["attn"], h, positions, k_pos, k_valid, cache_kv,
                                     cache_index, extra_mask)
    else:
        attn_out, new_kv = attn_fn(h, positions, k_pos, k_valid, cache_kv, cache_index, extra_mask)
    if cfg.post_norms:
        attn_out = norm(cfg, p["ln1_post"], attn_out)
    attn_out = _hook(pre + "hook_attn_out", attn_out, fns, acts, capture)
    x = x + attn_out
    x = _hook(pre + "hook_resid_mid", x, fns, acts, capture)
    if upto in ("hook_attn_out", "hook_resid_mid"):
        return x, new_kv
    h2 = _mlp_input(cfg, p["ln2"], x, pre, fns, acts, capture)
    if upto in ("ln2.hook_normalized", "mlp.hook_in"):
        return x, new_kv
    m = mlp(cfg, p["mlp"], h2) if mlp_fn is None else mlp_fn(h2)
    if cfg.post_norms:
        m = norm(cfg, p["ln2_post"], m)
    m = _hook(pre + "hook_mlp_out", m, fns, acts, capture)
    x = x + m
    x = _hook(pre + "hook_resid_post", x, fns, acts, capture)
    return x, new_kv


def _mlp_input(cfg: TransformerConfig, p: Mapping[str, Array], x: Array, pre: str,
               fns: Mapping[str, Callable], acts: dict, capture: frozenset) -> Array:
    """``ln2(x)`` with its two hooks: ``ln2.hook_normalized`` (before the learned scale) and
    ``mlp.hook_in`` (the MLP's input). The norm runs in one piece unless the first hook is
    asked for, and without an intervention there the float32 value carries on (so capturing
    it changes nothing downstream, in any dtype)."""
    name = pre + "ln2.hook_normalized"
    if name not in fns and name not in capture:
        h = norm(cfg, p, x)
    else:
        y = normalize(cfg, x)
        seen = _hook(name, y.astype(x.dtype), fns, acts, capture)
        h = norm_affine(p, seen if name in fns else y).astype(x.dtype)
    return _hook(pre + "mlp.hook_in", h, fns, acts, capture)


def positions_from_mask(attention_mask: Optional[Array], B: int, T: int) -> Array:
    """Positions of each token: `arange(T)`, or with a padding mask the count of real tokens before it
    (so a left-padded row computes exactly what the unpadded row would)."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def last_layer_needed(cfg: TransformerConfig, names) -> int:
    """Index of the last block any of these hooks lives in (n_layers for the final-norm hook)."""
    return max((parse_hook(n, cfg)[0] for n in names), default=-1)


def run(
    cfg: TransformerConfig,
    params: Params,
    tokens: Array,
    *,
    positions: Optional[Array] = None,
    attention_mask: Optional[Array] = None,
    interventions: Optional[Mapping[str, Callable]] = None,
    capture: Sequence[str] = (),
    stop_after_capture: bool = False,
    cache: Optional[KVCache] = None,
    last_only: bool = False,
    inputs_embeds: Optional[Array] = None,
    bidirectional_groups: Optional[Array] = None,
    block_fns: Optional[Sequence[Callable]] = None,
) -> tuple[Optional[Array], dict, Optional[KVCache]]:
    """Traceable forward: (logits | None, activations, updated cache | None).

    `inputs_embeds [B, T, D]` replaces the token embedding (multimodal models merge image soft
    tokens into it); `bidirectional_groups [B, T]` int (-1: none) lets tokens of the same group
    attend to each other in both directions (Gemma 3's images; not with a cache).

    With a cache, the new tokens' keys/values are written at `cache.index` and attention runs over
    every filled slot. `last_only` computes logits for the last position only ([B, 1, V]).

    `block_fns[i]` (the NNX `Block` modules) replaces `block(cfg, i, params["blocks"][i], ...)`:
    called with `block`'s arguments after `p`; `params` then needs no "blocks".
    """
    fns = dict(interventions or {})
    capture = frozenset(capture)
    read = frozenset(h for f in fns.values() if isinstance(f, ReadsHook) for h in f.sources)
    for name in list(fns) + list(capture) + list(read):
        parse_hook(name, cfg)
    B, T = tokens.shape
    valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
        positions = positions_from_mask(attention_mask, B, T)
    stopping = bool(stop_after_capture and capture)
    n_run = cfg.n_layers
    upto = "hook_resid_post"  # how far the last block runs
    if stopping:
        last = last_layer_needed(cfg, capture)
        n_run = min(last + 1, cfg.n_layers)
        if last < cfg.n_layers:
            kinds = [parse_hook(n, cfg)[1] for n in capture if parse_hook(n, cfg)[0] == last]
            upto = max(kinds, key=HOOK_KINDS_ORDER.index)
    if cache is not None and n_run < cfg.n_layers:
        raise ValueError("a cached forward must run every layer (stop_after_capture is not allowed)")
    acts: dict = {}
    x = embed(cfg, params, tokens, positions) if inputs_embeds is None else inputs_embeds
    extra = None
    if bidirectional_groups is not None:
        if cache is not None:
            raise ValueError("bidirectional_groups is not supported with a KV cache")
        g = bidirectional_groups
        extra = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] >= 0)
    if cache is not None:
        idx = cache.index
        k_pos = jax.lax.dynamic_update_slice(cache.pos, jnp.where(valid, positions, -1), (0, idx))
        k_valid = k_pos >= 0
    else:
        idx, k_pos, k_valid = None, positions, valid
    new_k, new_v = [], []
    kept = capture | read  # what the blocks record: the captures and what interventions read
    for i in range(n_run):
        kv = (cache.k[i], cache.v[i]) if cache is not None else None
        args = (x, positions, k_pos, k_valid, fns, acts, kept, kv, idx)
        last_upto = upto if i == n_run - 1 else "hook_resid_post"
        if block_fns is None:
            x, nkv = block(cfg, i, params["blocks"][i], *args, upto=last_upto, extra_mask=extra)
        else:
            x, nkv = block_fns[i](*args, upto=last_upto, extra_mask=extra)
        if nkv is not None:
            new_k.append(nkv[0])
            new_v.append(nkv[1])
    new_cache = None
    if cache is not None:
        new_cache = KVCache(tuple(new_k), tuple(new_v), k_pos, cache.index + T)
    for name in read - capture:
        acts.pop(name, None)
    if stopping and FINAL_HOOK not in capture:
        return None, acts, new_cache  # harvesting never pays for the unembedding
    if last_only:
        x = x[:, -1:]
    h = norm(cfg, params["final_norm"], x)
    h = _hook(FINAL_HOOK, h, fns, acts, capture)
    if stopping:
        return None, acts, new_cache
    return logits_from_normed(cfg, params, h), acts, new_cache


# ----------------------------------------------------------------------------------------------
# jitted entry point; interventions may close over arrays (static, hashed by identity) or be
# pytrees such as `jax.tree_util.Partial(fn, array)` whose arrays are passed as dynamic arguments.


def split_interventions(interventions: Optional[Mapping[str, Callable]]):
    """-> (static, dynamic): array leaves travel as jit arguments, everything else is static."""
    if not interventions:
        return None, ()
    leaves, treedef = jax.tree_util.tree_flatten(dict(interventions))
    is_arr = tuple(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_arr))
    dynamic = tuple(leaf for leaf, a in zip(leaves, is_arr) if a)
    return (treedef, static, is_arr), dynamic


def merge_interventions(static, dynamic):
    if static is None:
        return None
    treedef, leaves, is_arr = static
    it = iter(dynamic)
    merged = [next(it) if a else leaf for leaf, a in zip(leaves, is_arr)]
    return jax.tree_util.tree_unflatten(treedef, merged)


def _forward_impl(cfg, params, tokens, attention_mask, dyn, static, capture, stop_after_capture):
    fns = merge_interventions(static, dyn)
    logits, acts, _ = run(
        cfg,
        params,
        tokens,
        attention_mask=attention_mask,
        interventions=fns,
        capture=capture,
        stop_after_capture=stop_after_capture,
    )
    return ForwardOutput(logits, acts)


_forward_jit = jax.jit(_forward_impl, static_argnums=(0, 5, 6, 7))


def forward(
    cfg: TransformerConfig,
    params: Params,
    tokens,
    *,
    interventions: Optional[Mapping[str, Callable]] = None,
    capture: Sequence[str] = (),
    stop_after_capture: bool = False,
    attention_mask=None,
) -> ForwardOutput:
    """Run the model on `tokens [B, T]` (jitted; `cfg` is static).

    - `capture`: hook names whose activations are returned in `.activations` ([B, T, D]).
    - `stop_after_capture`: run only up to the last captured hook; `.logits` is then None.
    - `interventions`: hook name -> pure `fn(act) -> act`, applied inside the jitted forward. Plain
      closures are static (a new closure recompiles); `jax.tree_util.Partial(fn, *arrays)` passes
      its arrays as traced arguments (no recompile when only the arrays change).
    - `attention_mask [B, T]` (1 = token, 0 = padding): padded keys are ignored and positions count
      real tokens only, so left padding gives the unpadded results.
    """
    if isinstance(capture, str):
        capture = (capture,)
    capture = tuple(sorted(set(capture)))
    for name in capture:
        parse_hook(name, cfg)
    for name in interventions or {}:
        parse_hook(name, cfg)
    static, dyn = split_interventions(interventions)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
    if cfg.pos == "learned" and tokens.shape[1] > cfg.max_position:
        raise ValueError(f"{tokens.shape[1]} tokens exceed the model's {cfg.max_position} learned positions")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
    return _forward_jit(
        cfg, params, tokens, attention_mask, dyn, static, capture, bool(stop_after_capture)
    )
