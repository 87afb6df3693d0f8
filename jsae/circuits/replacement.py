"""The frozen local replacement model of one prompt (Ameisen et al. 2025; circuit-tracer's
conventions, checked against its 0.5.0 source: ``attribution/attribute.py``,
``attribution/context_transformerlens.py``, ``replacement_model/replacement_model_transformerlens.py``).

`freeze` runs the real model once and records what is held fixed: every layer's attention
pattern, the 1/rms (1/std for LayerNorm) of every norm (ln1, ln1_post, ln2, final; the MLP's
post-norm sits inside the replaced MLP), every transcoder's active features at every position
but the first (position 0, the BOS circuit-tracer prepends, has neither features nor error), the
error vectors (MLP output minus reconstruction, zero at position 0) and the token embeddings.

`frozen_forward` is then a linear map of the *coefficients* ``c_feat [n]``, ``c_err [L, T]``,
``c_emb [T]`` (each source node's vector scaled by its coefficient: a feature writes
``c_s a_s W_dec_s`` at its position to every layer its decoder writes, an error node
``c err[l, p]``, a token ``c emb[p]``) plus constants (decoder biases, positional embeddings,
position 0's MLP outputs, norm biases), to every active feature's pre-activation ``W_enc_s .
x_in[l_s, p_s] + b_enc_s`` and every logit target's demeaned logit ``(W_U[:, v] - mean_v W_U) .
ln_final(x)[-1]`` (before any soft cap). A skip connection ``x_in W_skip`` stays in the linear
path, as circuit-tracer keeps it. At c = 1 it reproduces the real model's values exactly; its
Jacobian is the attribution graph: ``adjacency[t, s] = d target_t / d c_s`` (`jsae.circuits.attribution`).

Shapes (T positions, L layers, H heads, n active features padded to ``n_pad``, W decoder rows
per feature, K logit targets padded to ``k_pad``) are in `Frozen`.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jsae.circuits.dictionaries import Dictionaries
from jsae.models.config import TransformerConfig
from jsae.models.transformer import (
    attention_mask,
    attention_weights,
    forward,
    norm,
    norm_affine,
    qkv,
)

Array = jax.Array


@flax.struct.dataclass
class Frozen:
    """What the frozen forward holds fixed (device arrays, float32).

    patterns [L, H, T, T]; r1, r1_post, r2 [L, T, 1] (r1_post ones without post-norms);
    r_final [T, 1]; emb [T, d] (token embeddings, scaled as the model scales them);
    x0_const [T, d] (positional embeddings or zeros); err [L, T, d]; mlp_const [L, T, d];
    skip [L, d, d] or None; per active feature: layer, pos, index [n_pad] int32, act [n_pad],
    enc [n_pad, d], b_enc [n_pad], dec [n_pad, W, d], write [n_pad, W] int32 (the flat
    ``layer * T + pos`` each decoder row adds to); logit_vecs [k_pad, d], logit_const [k_pad]
    (padding: zero rows).
    """

    patterns: Array
    r1: Array
    r1_post: Array
    r2: Array
    r_final: Array
    emb: Array
    x0_const: Array
    err: Array
    mlp_const: Array
    skip: Array | None
    layer: Array
    pos: Array
    index: Array
    act: Array
    enc: Array
    b_enc: Array
    dec: Array
    write: Array
    logit_vecs: Array
    logit_const: Array
    site_in: str = flax.struct.field(pytree_node=False)

    @property
    def n_layers(self) -> int:
        return int(self.err.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.err.shape[1])


# ---- the frozen pieces ----------------------------------------------------------------------


def _inv_scale(cfg: TransformerConfig, x: Array) -> Array:
    """1/rms(x) (RMSNorm) or 1/std(x) (LayerNorm) per position, [..., 1] float32."""
    xf = x.astype(jnp.float32)
    if cfg.norm == "layer":
        xf = xf - xf.mean(-1, keepdims=True)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)


def frozen_norm(cfg: TransformerConfig, p, x: Array, r: Array) -> Array:
    """The norm with its scale ``r`` held fixed: linear in ``x`` (plus the norm's bias)."""
    xf = x.astype(jnp.float32)
    if cfg.norm == "layer":
        xf = xf - xf.mean(-1, keepdims=True)  # centring is linear
    return norm_affine(p, xf * r)


def attention_patterns(cfg: TransformerConfig, layer: int, a, h: Array) -> Array:
    """Layer ``layer``'s attention weights ``[H, T, T]`` on its normed input ``h [T, d]``, as
    `jsae.models.transformer.attention` computes them (one unpadded sequence)."""
    h = h[None]
    T = h.shape[1]
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    q, k, _ = qkv(cfg, layer, a, h, positions)
    mask = attention_mask(positions, positions, jnp.ones((1, T), bool), cfg.window(layer))
    return attention_weights(cfg, q, k.astype(q.dtype), mask).reshape(q.shape[2], T, T)


def frozen_attention(cfg: TransformerConfig, a, h: Array, pattern: Array) -> Array:
    """Attention with its pattern ``[H, T, T]`` held fixed: linear in ``h [T, d]``; the
    output before any post-norm."""
    f32 = jnp.float32
    v = jnp.einsum("td,dkh->tkh", h.astype(f32), a["v"].astype(f32))
    if cfg.qkv_bias:
        v = v + a["bv"].astype(f32)
    T, K = pattern.shape[-1], cfg.n_kv_heads
    # head h = k * G + g reads kv head k: grouped, so that the transpose is one matrix product
    # per kv head (a repeated v's transpose was a slow reduction on CPUs)
    o = jnp.einsum("kgts,skh->tkgh", pattern.reshape(K, -1, T, T), v)
    out = jnp.einsum("thk,hkd->td", o.reshape(T, cfg.n_heads, -1), a["o"].astype(f32))
    if cfg.out_bias:
        out = out + a["bo"].astype(f32)
    return out


def _mlp_input(cfg: TransformerConfig, site: str, p, x: Array, r2: Array) -> Array:
    """What the transcoders read at ``site`` from the residual ``x`` (ln2's scale frozen)."""
    if site == "hook_resid_mid":
        return x
    xf = x.astype(jnp.float32)
    if cfg.norm == "layer":
        xf = xf - xf.mean(-1, keepdims=True)
    y = xf * r2
    return y if site == "ln2.hook_normalized" else norm_affine(p, y)


def token_embeddings(cfg: TransformerConfig, params, tokens: Array) -> Array:
    """``[T, d]`` the token part of the embedding, scaled as the model scales it."""
    table = params["embed"]
    x = jnp.take(table, tokens, axis=0)
    if cfg.embed_scale is not None:
        x = x * jnp.asarray(cfg.embed_scale, dtype=table.dtype)
    return x.astype(jnp.float32)


def unembedding(cfg: TransformerConfig, params) -> Array:
    """``[d, V]`` W_U."""
    return params["embed"].T if cfg.tie_embeddings else params["unembed"]


@functools.partial(jax.jit, static_argnames=("cfg",))
def logit_vectors(cfg: TransformerConfig, params, ids: Array) -> Array:
    """``[k, d]`` the unembedding columns of ``ids`` minus the mean column (circuit-tracer
    demeans over the vocabulary), without transposing a tied embedding."""
    if cfg.tie_embeddings:
        table = params["embed"].astype(jnp.float32)  # [V, d]
        return table[ids] - table.mean(0)[None]
    w = params["unembed"].astype(jnp.float32)  # [d, V]
    return w[:, ids].T - w.mean(1)[None]


# ---- freezing a prompt ----------------------------------------------------------------------


def _record(cfg: TransformerConfig, params, dic: Dictionaries, tokens: Array):
    """One real forward and what `Frozen` keeps (dense: codes z [L, T, n])."""
    L = cfg.n_layers
    hooks = [f"blocks.{i}.{k}" for i in range(L)
             for k in ("hook_resid_pre", "hook_resid_mid", "hook_mlp_out")]
    hooks += [dic.input_hook(i) for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    out = forward(cfg, params, tokens[None], capture=sorted(set(hooks)))
    acts = {k: v[0].astype(jnp.float32) for k, v in out.activations.items()}
    return out.logits[0, -1].astype(jnp.float32), acts


@functools.partial(jax.jit, static_argnames=("cfg",))
def _freeze_dense(cfg: TransformerConfig, params, dic: Dictionaries, tokens: Array):
    L = cfg.n_layers
    logits, acts = _record(cfg, params, dic, tokens)
    patterns, r1, r1p, r2, x_in, mlp_out = [], [], [], [], [], []
    for i in range(L):
        p = params["blocks"][i]
        x = acts[f"blocks.{i}.hook_resid_pre"]
        r1.append(_inv_scale(cfg, x))
        h = norm(cfg, p["ln1"], x)
        pat = attention_patterns(cfg, i, p["attn"], h)
        patterns.append(pat)
        raw = frozen_attention(cfg, p["attn"], frozen_norm(cfg, p["ln1"], x, r1[-1]), pat)
        r1p.append(_inv_scale(cfg, raw) if cfg.post_norms else jnp.ones_like(r1[-1]))
        r2.append(_inv_scale(cfg, acts[f"blocks.{i}.hook_resid_mid"]))
        x_in.append(acts[dic.input_hook(i)])
        mlp_out.append(acts[f"blocks.{i}.hook_mlp_out"])
    x_in, mlp_out = jnp.stack(x_in), jnp.stack(mlp_out)  # [L, T, d]
    pre = jnp.einsum("ltd,ldn->ltn", x_in, dic.W_enc) + dic.b_enc[:, None]
    z = jnp.where(pre > dic.threshold[:, None], pre, 0.0)
    z = z.at[:, 0].set(0.0)  # position 0 (BOS): no features, as circuit-tracer
    if dic.cross_layer:
        writes = jnp.einsum("ltn,lnwd->wtd", z, dic.W_dec)
    else:
        writes = jnp.einsum("ltn,lnd->ltd", z, dic.W_dec[:, :, 0])
    skip = (jnp.einsum("ltd,lde->lte", x_in, dic.W_skip) if dic.W_skip is not None
            else jnp.zeros_like(x_in))
    err = (mlp_out - (writes + dic.b_dec[:, None] + skip)).at[:, 0].set(0.0)
    mlp_const = mlp_out - skip - writes - err  # b_dec, and position 0's whole MLP output
    r_final = _inv_scale(cfg, acts[f"blocks.{L - 1}.hook_resid_post"])
    return dict(logits=logits, z=z, pre=pre, patterns=jnp.stack(patterns), r1=jnp.stack(r1),
                r1_post=jnp.stack(r1p), r2=jnp.stack(r2), r_final=r_final, err=err,
                mlp_const=mlp_const)


def logit_targets(logits: np.ndarray, max_logits: int, logit_prob: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """circuit-tracer's salient logits: the most probable tokens until their cumulative
    probability reaches ``logit_prob``, at most ``max_logits`` -> (ids, probabilities)."""
    z = np.asarray(logits, np.float64)
    probs = np.exp(z - z.max())
    probs = (probs / probs.sum()).astype(np.float32)
    top = np.argsort(-probs, kind="stable")[:max_logits]
    cutoff = int(np.searchsorted(np.cumsum(probs[top]), logit_prob)) + 1
    ids = top[:cutoff]
    return ids.astype(np.int32), probs[ids]


def _bucket(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def freeze(cfg: TransformerConfig, params, dic: Dictionaries, tokens, *, max_logits: int = 10,
           logit_prob: float = 0.95, target_tokens=None, pad_features: int = 128):
    """(`Frozen`, info) for ``tokens [T]`` (position 0 the BOS). info: ``features [n, 3]``
    (layer, pos, index; circuit-tracer's order), ``activations [n]``, ``logit_tokens [k]``,
    ``logit_probabilities [k]``, ``logits [V]`` (the real model's last position), and the
    dense ``pre_activations [L, T, n]``."""
    tokens = jnp.asarray(np.asarray(tokens, np.int32))
    T, L = int(tokens.shape[0]), cfg.n_layers
    d = _freeze_dense(cfg, params, dic, tokens)
    z = np.asarray(jax.device_get(d["z"]))
    layer, pos, index = (a.astype(np.int32) for a in np.nonzero(z))  # (layer, pos, feature)
    act = z[layer, pos, index].astype(np.float32)
    n = len(act)
    n_pad = _bucket(n, pad_features)
    logits = np.asarray(jax.device_get(d["logits"]))
    if target_tokens is None:
        ids, probs = logit_targets(logits, max_logits, logit_prob)
    else:
        ids = np.asarray(target_tokens, np.int32).reshape(-1)
        p = np.exp(logits.astype(np.float64) - logits.max())
        probs = (p / p.sum())[ids].astype(np.float32)
    k_pad = max(max_logits, len(ids))

    def pad(a, size):
        a = np.asarray(a)
        return np.concatenate([a, np.zeros((size - len(a), *a.shape[1:]), a.dtype)])

    vecs = logit_vectors(cfg, params, jnp.asarray(ids))
    bias = params.get("unembed_bias")
    const = (np.asarray(bias, np.float32)[ids] - float(np.mean(bias)) if bias is not None
             else np.zeros(len(ids), np.float32))
    writes = dic.writes()  # [L, W]
    dec = jax.device_get(dic.W_dec[layer, index]) if n else np.zeros((0, *dic.W_dec.shape[2:]))
    write = writes[layer] * T + pos[:, None] if n else np.zeros((0, writes.shape[1]), np.int32)
    emb = token_embeddings(cfg, params, tokens)
    x0 = jnp.zeros_like(emb)
    if cfg.pos == "learned":
        x0 = jnp.take(params["pos_embed"], jnp.arange(T), axis=0).astype(jnp.float32)
    fz = Frozen(
        patterns=d["patterns"], r1=d["r1"], r1_post=d["r1_post"], r2=d["r2"],
        r_final=d["r_final"], emb=emb, x0_const=x0, err=d["err"], mlp_const=d["mlp_const"],
        skip=dic.W_skip, layer=jnp.asarray(pad(layer, n_pad)), pos=jnp.asarray(pad(pos, n_pad)),
        index=jnp.asarray(pad(index, n_pad)), act=jnp.asarray(pad(act, n_pad)),
        enc=jnp.asarray(pad(np.asarray(dic.W_enc)[layer, :, index], n_pad)) if n else
        jnp.zeros((n_pad, cfg.d_model), jnp.float32),
        b_enc=jnp.asarray(pad(np.asarray(dic.b_enc)[layer, index], n_pad)),
        dec=jnp.asarray(pad(np.asarray(dec, np.float32), n_pad)),
        write=jnp.asarray(pad(np.asarray(write, np.int32), n_pad)),
        logit_vecs=jnp.asarray(pad(np.asarray(vecs, np.float32), k_pad)),
        logit_const=jnp.asarray(pad(const, k_pad)), site_in=dic.site_in)
    info = {"features": np.stack([layer, pos, index], 1).reshape(-1, 3), "activations": act,
            "logit_tokens": ids, "logit_probabilities": probs.astype(np.float32),
            "logits": logits, "pre_activations": d["pre"], "n_layers": L, "n_pos": T}
    return fz, info


# ---- the frozen forward -----------------------------------------------------------------------


def stacked_blocks(cfg: TransformerConfig, params) -> dict:
    """The weights the frozen blocks use (norms, V and O), stacked over layers ``[L, ...]``."""
    keep = {"ln1", "ln2", "ln1_post"}
    attn = {"v", "o", "bv", "bo"}

    def pick(b):
        out = {k: v for k, v in b.items() if k in keep}
        out["attn"] = {k: v for k, v in b["attn"].items() if k in attn}
        return out

    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[pick(b) for b in params["blocks"]])


def source_writes(fz: Frozen, c_feat: Array, c_err: Array) -> Array:
    """``[L, T, d]`` what the replaced MLPs add to the residual: every feature's ``c_s a_s
    W_dec_s`` at the layers it writes, every error node's ``c err[l, p]`` and the constants."""
    L, T = fz.n_layers, fz.n_pos
    D = fz.emb.shape[-1]
    w = (c_feat * fz.act)[:, None, None] * fz.dec  # [n, W, d]
    # writes beyond the layers and positions held (a truncated model, `truncate`) are dropped
    m = jnp.zeros((L * T, D), jnp.float32).at[fz.write.reshape(-1)].add(w.reshape(-1, D),
                                                                       mode="drop")
    return m.reshape(L, T, D) + c_err[..., None] * fz.err + fz.mlp_const


def frozen_blocks(cfg: TransformerConfig, params, fz: Frozen, x: Array, m: Array
                  ) -> tuple[Array, Array]:
    """(the transcoders' inputs ``x_in [L, T, d]``, the final normed residual of the last
    position ``h [d]``) of the frozen blocks from the embedding ``x [T, d]`` and the MLPs'
    writes ``m [L, T, d]`` (`source_writes`): an affine map of (x, m)."""

    def layer(x, xs):  # one block, its weights and frozen scales sliced by lax.scan
        p, pattern, r1, r1_post, r2, m_l, skip = xs
        x = x + block_attention(cfg, p, pattern, r1, r1_post, x)
        x_in = mlp_input(cfg, fz, p, r2, x)
        out = m_l if skip is None else m_l + x_in @ skip
        return x + out, x_in

    xs = (stacked_blocks(cfg, params), fz.patterns, fz.r1, fz.r1_post, fz.r2, m, fz.skip)
    x, x_ins = jax.lax.scan(layer, x, xs)  # one compiled block, whatever the depth
    return x_ins, final_readout(cfg, params, fz, x[-1])


def block_attention(cfg: TransformerConfig, p, pattern: Array, r1: Array, r1_post: Array,
                    x: Array) -> Array:
    """What one frozen block's attention adds to the residual ``x [T, d]`` (its post-norm
    included): affine in ``x``."""
    a = frozen_attention(cfg, p["attn"], frozen_norm(cfg, p["ln1"], x, r1), pattern)
    if cfg.post_norms:
        a = frozen_norm(cfg, p["ln1_post"], a, r1_post)
    return a


def final_readout(cfg: TransformerConfig, params, fz: Frozen, x_last: Array) -> Array:
    """``h [d]``: the final norm (scale frozen) of the last position's residual ``x_last``."""
    return frozen_norm(cfg, params["final_norm"], x_last, fz.r_final[-1])


def mlp_input(cfg: TransformerConfig, fz: Frozen, p, r2: Array, x: Array) -> Array:
    """What the transcoders read (``fz.site_in``) from the residual ``x`` of one block (its
    weights ``p``, ln2's frozen scale ``r2``)."""
    return _mlp_input(cfg, fz.site_in, p["ln2"], x, r2)


def frozen_states(cfg: TransformerConfig, params, fz: Frozen, c_feat: Array, c_err: Array,
                  c_emb: Array) -> tuple[Array, Array]:
    """(the transcoders' inputs ``x_in [L, T, d]``, the final normed residual of the last
    position ``h [d]``) of the frozen model with the sources scaled by ``c_feat [n_pad]``,
    ``c_err [L, T]``, ``c_emb [T]``: what every target reads (module docstring)."""
    x = fz.x0_const + c_emb[:, None] * fz.emb
    return frozen_blocks(cfg, params, fz, x, source_writes(fz, c_feat, c_err))


def frozen_forward(cfg: TransformerConfig, params, fz: Frozen, c_feat: Array, c_err: Array,
                   c_emb: Array, *, return_inputs: bool = False):
    """(pre-activations [n_pad], demeaned logits [k_pad]) of the frozen replacement model with
    the source nodes scaled by ``c_feat``, ``c_err``, ``c_emb`` (`frozen_states`).
    ``return_inputs`` adds the transcoders' inputs ``x_in [L, T, d]``."""
    x_in, h = frozen_states(cfg, params, fz, c_feat, c_err, c_emb)
    pre = jnp.sum(fz.enc * x_in[fz.layer, fz.pos], -1) + fz.b_enc
    logit = fz.logit_vecs @ h + fz.logit_const
    return (pre, logit, x_in) if return_inputs else (pre, logit)


def truncate(fz: Frozen, params, depth: int, n_pos: int | None = None) -> tuple[Frozen, dict]:
    """The frozen model of the first ``depth`` layers and the first ``n_pos`` positions only
    (and their params): enough for targets reading layers < depth at positions < n_pos, as the
    model is causal (its final norm then reads position ``n_pos - 1``, meaningful for logits
    only when n_pos is the whole prompt). Feature writes outside are dropped."""
    T = fz.n_pos
    P = T if n_pos is None else n_pos
    cut = {k: getattr(fz, k)[:depth, :P] for k in ("r1", "r1_post", "r2", "err", "mlp_const")}
    cut["patterns"] = fz.patterns[:depth, :, :P, :P]
    cut.update(r_final=fz.r_final[:P], emb=fz.emb[:P], x0_const=fz.x0_const[:P])
    cut["skip"] = None if fz.skip is None else fz.skip[:depth]
    if P != T:  # the flat layer * T + pos of each write, for the shorter T
        lay, pos = fz.write // T, fz.write % T
        cut["write"] = jnp.where(pos < P, lay * P + pos, depth * P).astype(fz.write.dtype)
    return fz.replace(**cut), {**params, "blocks": params["blocks"][:depth]}


def ones_like_sources(fz: Frozen):
    """The coefficients of the real run: (c_feat, c_err, c_emb) all ones."""
    return (jnp.ones(fz.act.shape, jnp.float32), jnp.ones(fz.err.shape[:2], jnp.float32),
            jnp.ones(fz.emb.shape[:1], jnp.float32))


__all__ = ["Frozen", "attention_patterns", "block_attention", "final_readout", "freeze",
           "frozen_attention", "frozen_blocks", "frozen_forward", "frozen_norm", "frozen_states",
           "logit_targets", "logit_vectors", "mlp_input", "ones_like_sources", "source_writes",
           "stacked_blocks", "token_embeddings", "truncate", "unembedding"]
