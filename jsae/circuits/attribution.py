"""Attribution graphs: the Jacobian of the frozen replacement model (`jsae.circuits.replacement`)
computed a batch of target rows at a time.

A target (an active feature's pre-activation or a logit target's demeaned logit) gets its row
``d target / d c_s`` from one reverse pass through the frozen blocks (`_rows`): its cotangent
enters where it reads, and each source's entry is the gradient at the residual it writes,
against its vector (as circuit-tracer's backward hooks read it). A batch of targets runs at
once, jitted, the targets padded to ``batch_size``; targets go in circuit-tracer's feature
order (layer, then position), so a batch reads few layers and positions and runs only that
prefix of the model (the layers above skipped at run time, the positions cut to one of at most
four compiled prefix lengths). With a ``mesh``, the targets of a batch are split over its
devices (the frozen model replicated): long prompts spread their rows over chips and the
result is the same.

Rows are circuit-tracer's: ``adjacency[t, s]`` for sources s in node order ``[features, error
nodes (layer-major), tokens]``, logit nodes as sources have zero columns, error and token
nodes zero rows.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsae.circuits import dictionaries as dicts
from jsae.circuits.graph import Graph
from jsae.circuits.replacement import (
    Frozen,
    block_attention,
    final_readout,
    freeze,
    mlp_input,
    stacked_blocks,
    truncate,
)
from jsae.errors import BadInput


def write_table(fz: Frozen) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every feature write grouped by the layer it adds to: (feature ``[L, M]`` int32, its
    position ``[L, M]`` int32, its decoder row ``[L, M, d]``), M the most writes to one layer;
    padding: feature ``n_pad`` (dropped), a zero row. Decoder rows that are all zero (a CLT's
    masked layers, padded features) add nothing and are left out."""
    write = np.asarray(jax.device_get(fz.write))
    dec = np.asarray(jax.device_get(fz.dec), np.float32)
    n_pad, D, L, T = dec.shape[0], dec.shape[-1], fz.n_layers, fz.n_pos
    s, w = np.nonzero(np.any(dec != 0, axis=-1))
    order = np.argsort(write[s, w] // T, kind="stable")
    s, w = s[order], w[order]
    lay, pos = write[s, w] // T, write[s, w] % T
    counts = np.bincount(lay, minlength=L)
    slot = np.arange(len(s)) - np.repeat(np.cumsum(counts) - counts, counts)
    M = max(1, int(counts.max(initial=0)))
    feat = np.full((L, M), n_pad, np.int32)
    at = np.zeros((L, M), np.int32)
    rows = np.zeros((L, M, D), np.float32)
    feat[lay, slot], at[lay, slot], rows[lay, slot] = s, pos, dec[s, w]
    return feat, at, rows


def _rows(cfg, params, fz: Frozen, table, ids, depth, n_pos: int):
    """``[B, n_pad + L*T + T]``: the adjacency rows of targets ``ids [B]`` (``< n_pad``: an
    active feature, else logit target ``id - n_pad``) by one reverse pass through the frozen
    blocks (`frozen_blocks`, an affine map, so each block's transpose is its vjp at zero),
    as circuit-tracer's backward hooks read it: the gradient ``g [B, T, d]`` at the residual
    after each layer's MLP, against every vector written there (a feature's decoder row
    (`write_table`) times its activation, the error vector), then against the embeddings
    below the first block; a target's own cotangent (its encoder row at its layer and
    position, a logit's demeaned unembedding through the final norm) enters where it reads.
    Only the first ``depth`` layers (a traced scalar: the layers above are skipped, not
    compiled apart) and ``n_pos`` positions (static) run, for targets reading layers < depth
    at positions < n_pos (all of both for logits): the model is causal, so nothing outside
    reaches a target, as circuit-tracer starts each backward at its batch's highest layer."""
    T_all = fz.n_pos
    fz, params = truncate(fz, params, fz.n_layers, n_pos)
    n_pad, L, T = fz.act.shape[0], fz.n_layers, fz.n_pos
    D, B = fz.emb.shape[-1], ids.shape[0]
    w_feat, w_pos, w_dec = table
    zero = jnp.zeros((T, D), jnp.float32)
    is_logit = ids >= n_pad
    f = jnp.minimum(ids, n_pad - 1)
    k = jnp.clip(ids - n_pad, 0, fz.logit_vecs.shape[0] - 1)
    t_layer = jnp.where(is_logit, -1, fz.layer[f])
    # position-major [T, B, d] throughout: attention's transpose contracts over positions
    t_in = jax.nn.one_hot(fz.pos[f], T, dtype=jnp.float32).T[:, :, None] * fz.enc[f][None]
    _, readout_t = jax.vjp(lambda v: final_readout(cfg, params, fz, v), zero[0])
    g_top = jax.vmap(readout_t)(fz.logit_vecs[k])[0]  # [B, d]
    g = jnp.zeros((T, B, D), jnp.float32).at[T - 1].set(
        jnp.where(is_logit[:, None], g_top, 0.0))
    per_row = functools.partial(jax.vmap, in_axes=1, out_axes=1)

    def block_t(g, xs):  # the transpose of one block
        l, p, pattern, r1, r1_post, r2, err, skip, pos_l, dec_l = xs
        g_err = jnp.sum(g * err[:, None], -1)  # [T, B]
        g_write = jnp.sum(jnp.take(g, pos_l, axis=0, mode="fill", fill_value=0.0)
                          * dec_l[:, None], -1)  # [M, B]
        g_in = jnp.where((t_layer == l)[None, :, None], t_in, 0.0)  # targets reading here
        if skip is not None:
            g_in = g_in + g @ skip.T
        _, mlp_t = jax.vjp(lambda x: mlp_input(cfg, fz, p, r2, x), zero)
        g = g + per_row(mlp_t)(g_in)[0]
        _, attn_t = jax.vjp(lambda x: block_attention(cfg, p, pattern, r1, r1_post, x), zero)
        return g + per_row(attn_t)(g)[0], (g_err, g_write)

    def layer(g, xs):  # top down; above ``depth`` the gradient is still zero
        zeros = (jnp.zeros((T, B), jnp.float32), jnp.zeros((xs[-1].shape[0], B), jnp.float32))
        return jax.lax.cond(xs[0] < depth, block_t, lambda g, _: (g, zeros), g, xs)

    xs = (jnp.arange(L), stacked_blocks(cfg, params), fz.patterns, fz.r1, fz.r1_post, fz.r2,
          fz.err, fz.skip, w_pos, w_dec)
    g, (g_err, g_write) = jax.lax.scan(layer, g, xs, reverse=True)  # [L, T, B], [L, M, B]
    g_feat = jnp.zeros((n_pad, B), jnp.float32).at[w_feat.reshape(-1)].add(
        g_write.reshape(-1, B), mode="drop").T * fz.act
    g_err = jnp.pad(jnp.transpose(g_err, (2, 0, 1)), ((0, 0), (0, 0), (0, T_all - T)))
    g_emb = jnp.pad(jnp.sum(g * fz.emb[:, None], -1).T, ((0, 0), (0, T_all - T)))
    return jnp.concatenate([g_feat, g_err.reshape(B, -1), g_emb], axis=1)  # positions not run


_rows_jit = jax.jit(_rows, static_argnums=(0, 6))


def _sharded_rows(mesh):
    """`_rows` with the target axis split over every device of ``mesh``."""
    from jax.sharding import NamedSharding, PartitionSpec

    split = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.jit(_rows, static_argnums=(0, 6), in_shardings=(rep, rep, rep, split, rep),
                   out_shardings=split)


@functools.lru_cache(maxsize=8)
def _sharded_cached(mesh):
    return _sharded_rows(mesh)


def _progress_fn(progress, total: int):
    if callable(progress):
        return progress, None
    if not progress:
        return (lambda done, total: None), None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="attribution", unit="row")
    state = {"done": 0}

    def update(done, total):
        bar.update(done - state["done"])
        state["done"] = done

    return update, bar


def _round_up(need: int, total: int, parts: int, least: int = 1) -> int:
    """``need`` rounded up to a multiple of ``total / parts`` (at least ``least``), at most
    ``total``: a few sizes, so a few compiled variants."""
    step = max(least, -(-total // parts))
    return min(total, -(-need // step) * step)


# positions per step of a batch's prefix: below this a shorter prefix saves less than a
# compilation costs
POS_STEP_MIN = 32


def extent(layer: np.ndarray, pos: np.ndarray, chunk: np.ndarray, n_pad: int, n_layers: int,
           n_pos: int) -> tuple[int, int]:
    """(layers, positions) a batch of targets ``chunk`` needs: its highest layer read + 1 and
    highest position + 1 (all of both with a logit), the positions rounded up to a quarter of
    the prompt (in steps of at least `POS_STEP_MIN`): at most 4 compiled variants (the depth
    is traced). ``layer``, ``pos``: the active features' [n_pad] on the host."""
    if (chunk >= n_pad).any():
        return n_layers, n_pos
    depth = int(layer[chunk].max()) + 1
    return depth, _round_up(int(pos[chunk].max()) + 1, n_pos, 4, POS_STEP_MIN)


def compute_rows(cfg, params, fz: Frozen, n_features: int, n_logits: int, *, batch_size: int = 64,
                 mesh=None, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(feature rows [n, n_sources_padded], logit rows [k, ...]) of the frozen model ``fz``.
    Targets run in circuit-tracer's feature order (layer, then position), so a batch spans few
    layers and positions and runs only the prefix of the model it reads (`extent`); the logits
    come last, with the deepest features."""
    n_pad = int(fz.act.shape[0])
    ids = np.concatenate([np.arange(n_features), np.arange(n_logits) + n_pad]).astype(np.int32)
    layer, pos = (np.asarray(jax.device_get(a)) for a in (fz.layer, fz.pos))
    table = tuple(jnp.asarray(a) for a in write_table(fz))
    if mesh is not None:
        batch_size = -(-batch_size // mesh.size) * mesh.size
        run = _sharded_cached(mesh)
    else:
        run = _rows_jit
    total = len(ids)
    update, bar = _progress_fn(progress, total)
    out = []
    try:
        for start in range(0, total, batch_size):
            chunk = ids[start:start + batch_size]
            batch = np.zeros(batch_size, np.int32)  # padded with target 0; its rows dropped
            batch[:len(chunk)] = chunk
            depth, n_pos = extent(layer, pos, chunk, n_pad, fz.n_layers, fz.n_pos)
            rows = run(cfg, params, fz, table, jnp.asarray(batch), np.int32(depth), n_pos)
            out.append(np.asarray(jax.device_get(rows))[:len(chunk)])
            update(min(start + batch_size, total), total)
    finally:
        if bar is not None:
            bar.close()
    rows = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return rows[:n_features], rows[n_features:]


def assemble(feature_rows: np.ndarray, logit_rows: np.ndarray, n_features: int, n_pad: int,
             n_layers: int, n_pos: int) -> np.ndarray:
    """The dense ``[n_nodes, n_nodes]`` adjacency from rows over padded sources."""
    n_src = n_features + (n_layers + 1) * n_pos
    k = logit_rows.shape[0]
    adj = np.zeros((n_src + k, n_src + k), np.float32)

    def cols(rows):
        return np.concatenate([rows[:, :n_features], rows[:, n_pad:]], axis=1)

    if n_features:
        adj[:n_features, :n_src] = cols(feature_rows)
    if k:
        adj[n_src:, :n_src] = cols(logit_rows)
    return adj


def prompt_tokens(model_cfg, tokenizer, prompt) -> np.ndarray:
    """``[T]`` int32 with a BOS at position 0 (prepended where missing, as circuit-tracer
    does); a prompt longer than the model's context is one line."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise BadInput("a text prompt needs the model's tokenizer; pass token ids instead")
        toks = np.asarray(tokenizer.encode(prompt, add_bos=True), np.int32)
    else:
        toks = np.asarray(prompt, np.int32).reshape(-1)
        bos = model_cfg.bos_id
        if bos is not None and (len(toks) == 0 or toks[0] != bos):
            toks = np.concatenate([[bos], toks]).astype(np.int32)
    if len(toks) < 2:
        raise BadInput("the prompt is empty: attribution needs at least one token after BOS")
    if len(toks) > model_cfg.max_position:
        raise BadInput(f"the prompt has {len(toks)} tokens; the model's context is "
                       f"{model_cfg.max_position}")
    if toks.min() < 0 or toks.max() >= model_cfg.vocab_size:
        raise BadInput(f"token ids must lie in [0, {model_cfg.vocab_size}); got "
                       f"{int(toks.min())}..{int(toks.max())}")
    return toks


def attribute(model, saes, prompt, *, outputs: Mapping[str, str] | None = None,
              target_tokens: Sequence[int] | None = None, max_logits: int = 10,
              logit_prob: float = 0.95, batch_size: int = 64, mesh=None,
              progress: bool | Callable[[int, int], None] = False, scan: str = "") -> Graph:
    """The attribution graph of ``prompt`` (text, or token ids) on ``model`` (a
    `jsae.models.LanguageModel`, or anything with ``cfg``, ``params`` and ``tokenizer``) with
    every MLP replaced by ``saes``: a run folder (a transcoder set or a CLT), a circuit-tracer
    folder, a mapping input hook key -> SAE (``outputs``: key -> the hook it writes; default
    each layer's ``hook_mlp_out``) or `jsae.circuits.dictionaries.Dictionaries`.

    Logit targets: ``target_tokens``, or circuit-tracer's salient logits (``max_logits``,
    ``logit_prob``). ``batch_size`` target rows per jitted step (split over ``mesh``'s
    devices when given). ``progress``: True (a bar) or ``fn(done, total)``.
    """
    cfg, params = model.cfg, model.params
    dic = dicts.load(saes, outputs, model_cfg=cfg)
    tokens = prompt_tokens(cfg, getattr(model, "tokenizer", None), prompt)
    if target_tokens is not None:
        bad = [int(t) for t in np.asarray(target_tokens).reshape(-1)
               if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise BadInput(f"target token {bad[0]} is not in the vocabulary [0, {cfg.vocab_size})")
    if max_logits < 1 or not 0 < logit_prob <= 1:
        raise BadInput(f"max_logits must be >= 1 and logit_prob in (0, 1]; got {max_logits}, "
                       f"{logit_prob}")
    t0 = time.perf_counter()
    fz, info = freeze(cfg, params, dic, tokens, max_logits=max_logits, logit_prob=logit_prob,
                      target_tokens=target_tokens)
    n, k = len(info["activations"]), len(info["logit_tokens"])
    f_rows, l_rows = compute_rows(cfg, params, fz, n, k, batch_size=batch_size, mesh=mesh,
                                  progress=progress)
    adj = assemble(f_rows, l_rows, n, int(fz.act.shape[0]), cfg.n_layers, len(tokens))
    text = prompt if isinstance(prompt, str) else ""
    return Graph(prompt=text, tokens=tokens, active_features=info["features"],
                 activations=info["activations"], logit_tokens=info["logit_tokens"],
                 logit_probabilities=info["logit_probabilities"], adjacency=adj,
                 n_layers=cfg.n_layers, scan=scan,
                 meta={"seconds": time.perf_counter() - t0, "site_in": dic.site_in,
                       "cross_layer": dic.cross_layer, "batch_size": batch_size,
                       "max_logits": max_logits, "logit_prob": logit_prob})


def memory_plan(model, saes, prompt, *, outputs: Mapping[str, str] | None = None,
                batch_size: int = 64, max_logits: int = 10, logit_prob: float = 0.95) -> dict:
    """What `attribute` will hold for ``prompt``, before computing any row (it runs the one
    forward that finds the active features, and compiles one batch of rows): XLA's memory
    analysis of the deepest row step (``step_*_bytes``: its temporaries, arguments (the
    weights and the frozen model) and output, on the device) and the host arrays (the rows of
    every target over padded sources, then the dense ``[n_nodes, n_nodes]`` float32
    adjacency), with ``active_features`` and ``n_nodes``."""
    cfg, params = model.cfg, model.params
    dic = dicts.load(saes, outputs, model_cfg=cfg)
    tokens = prompt_tokens(cfg, getattr(model, "tokenizer", None), prompt)
    fz, info = freeze(cfg, params, dic, tokens, max_logits=max_logits, logit_prob=logit_prob)
    n, k, T = len(info["activations"]), len(info["logit_tokens"]), len(tokens)
    table = tuple(jnp.asarray(a) for a in write_table(fz))
    mem = _rows_jit.lower(cfg, params, fz, table, jnp.zeros(batch_size, jnp.int32),
                          np.int32(fz.n_layers), fz.n_pos).compile().memory_analysis()

    def size(field):  # None where the backend gives no analysis
        return None if mem is None else int(getattr(mem, field))

    n_src_pad = int(fz.act.shape[0]) + (cfg.n_layers + 1) * T
    n_nodes = n + (cfg.n_layers + 1) * T + k
    return {"active_features": n, "n_nodes": n_nodes,
            "step_temp_bytes": size("temp_size_in_bytes"),
            "step_argument_bytes": size("argument_size_in_bytes"),
            "step_output_bytes": size("output_size_in_bytes"),
            "rows_bytes": 4 * (n + k) * n_src_pad, "adjacency_bytes": 4 * n_nodes * n_nodes}


__all__ = ["assemble", "attribute", "compute_rows", "memory_plan", "prompt_tokens"]
