"""The atlas's streaming pass over a corpus: batches of contexts through the LM (or read from a
``jsae harvest`` cache) and every dictionary's encoder, each batch merged into the pass's
:class:`~jsae.analysis.atlas.state.AtlasState` by one jitted update, with a progress bar, and
saved every few batches so that an interrupted pass resumes where it stopped.

The modules of the pass, by job: ``state.py`` (the state, what it keeps and the pure jitted
update), ``persist.py`` (saving it, reading it back checked, and what a saved pass must match to
resume), this one (the driver). Names the pass had before the split are importable from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jsae.analysis.atlas.persist import (
    corpus_fingerprint,
    load_state,
    pass_identity,
    sae_content_hash,
    save_state,
)
from jsae.analysis.atlas.state import (
    EMPTY_PRIO,
    AtlasState,
    StreamConfig,
    StreamResult,
    band_exponent,
    band_index,
    init_state,
    set_candidates,
    token_priority,
    update_state,
)
from jsae.analysis.atlas.types import AtlasError, AtlasStateMismatch

__all__ = ["EMPTY_PRIO", "AtlasError", "AtlasState", "AtlasStateMismatch", "StreamConfig",
           "StreamResult", "band_exponent", "band_index", "corpus_fingerprint", "encode_codes",
           "init_state", "load_state", "sae_content_hash", "save_state", "stream_cache",
           "stream_text", "token_priority", "update_state"]


@jax.jit
def encode_codes(sae, acts):
    """The dictionary's codes ``[B, T, F]`` float32 of activations ``acts [B, T, ...]``."""
    from jsae.sae.core import encode

    return encode(sae, acts.astype(jnp.float32))


def _place(state: AtlasState, mesh, sae):
    """State (and SAE) on the device, per-feature arrays sharded like the SAE's latents."""
    if mesh is None:
        return jax.device_put(state), sae
    from jsae.parallel import tree_shardings

    return jax.device_put(state, state.shardings(mesh)), jax.device_put(sae, tree_shardings(sae, mesh))


def stream_text(
    model,
    saes: Mapping[str, object],
    tokens: np.ndarray,
    mask: np.ndarray,
    cfg: StreamConfig = StreamConfig(),
    *,
    batch_size: int = 32,
    state_dir: str | Path | None = None,
    save_every: int = 64,
    mesh=None,
    forward: Callable | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, StreamResult]:
    """The streaming pass over contexts ``tokens [N, T]`` (``mask``: positions that count),
    one LM forward per batch capturing every hook in ``saes`` (``hook -> SAE``).

    ``state_dir``: save the partial state there every ``save_every`` batches and resume from
    it (a state of another dictionary or corpus is refused). ``mesh``: shard latents over
    ``mesh.model``. ``stop_after``: stop after that many batches (to test resuming)."""
    from jsae.data.harvest import Harvester

    tokens = np.asarray(tokens, np.int32)
    mask = np.asarray(mask, bool)
    cfg, states, expects, paths, start = _prepare(saes, tokens, mask, cfg, batch_size, state_dir)
    harvester = Harvester(model, _read_hooks(saes), forward=forward)
    return _run_pass(saes, tokens, mask, cfg, states, expects, paths, start,
                     lambda s, tok: _stacked(saes, harvester.activations(tok)), batch_size=batch_size,
                     save_every=save_every, mesh=mesh, progress=progress, stop_after=stop_after)


def _read_hooks(saes) -> list[str]:
    """Every hook the dictionaries read (a crosscoder's key names several), each once."""
    from jsae.runs import input_hooks

    return list(dict.fromkeys(h for key in saes for h in input_hooks(key)))


def _stacked(saes, acts) -> dict:
    """``{key: [B, T, d]}`` per dictionary; a crosscoder's hooks stacked ``[B, T, L, d]``."""
    from jsae.runs import stack_hooks

    return {key: stack_hooks(acts, key, jnp) for key in saes}


def _run_pass(saes, tokens, mask, cfg, states, expects, paths, start, acts_fn, *, batch_size,
              save_every, mesh, progress, stop_after) -> dict[str, StreamResult]:
    """The batch loop shared by the text and cache passes. ``acts_fn(s, tok [B, T])`` gives
    ``{hook: [>= B, T, d]}`` activations of contexts ``s .. s + B`` (padded rows last)."""
    hooks = list(saes)
    N, T = tokens.shape
    placed = {h: _place(states[h], mesh, saes[h]) for h in hooks}
    states = {h: placed[h][0] for h in hooks}
    sae_dev = {h: placed[h][1] for h in hooks}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(mask.sum()), initial=int(mask[:start].sum()), unit="tok",
                   desc="atlas", smoothing=0.1)
    done = 0
    counted = np.concatenate([[0], np.cumsum(mask.sum(1))])  # counted tokens before context i
    try:
        for s in range(start, N, batch_size):
            tok, msk = tokens[s : s + batch_size], mask[s : s + batch_size]
            if tok.shape[0] < batch_size:  # one compiled shape: pad with masked-out rows
                pad = batch_size - tok.shape[0]
                tok = np.concatenate([tok, np.repeat(tok[-1:], pad, 0)])
                msk = np.concatenate([msk, np.zeros((pad, T), bool)])
            acts = acts_fn(s, tok)
            tj, mj = jnp.asarray(tok), jnp.asarray(msk)
            n_before = int(counted[s])  # known on the host: no device sync per batch
            fills = n_before < cfg.coact_tokens <= n_before + int(msk.sum())
            for h in hooks:
                z = encode_codes(sae_dev[h], acts[h][:batch_size])
                states[h] = update_state(states[h], z, tj, mj, jnp.int32(s), cfg=cfg)
                if fills:  # this batch filled the co-activation sample
                    states[h] = set_candidates(states[h], z, msk, n_before, cfg)
            done += 1
            nxt = min(s + batch_size, N)
            if bar:
                bar.update(int(mask[s:nxt].sum()))
            last = nxt >= N or (stop_after is not None and done >= stop_after)
            if paths and (last or done % save_every == 0):
                for h in hooks:
                    save_state(paths[h], states[h], dict(expects[h], next_context=nxt))
            if stop_after is not None and done >= stop_after:
                break
    finally:
        if bar:
            bar.close()
    out = {}
    for h in hooks:
        host = jax.tree.map(np.asarray, jax.device_get(states[h]))
        out[h] = StreamResult(cfg, int(host.n_tokens), N, T, host)
    return out


def _prepare(saes, tokens, mask, cfg, batch_size, state_dir):
    """Checks, the effective config, and each hook's initial (or resumed) state."""
    N, T = tokens.shape
    if mask.shape != tokens.shape:
        raise AtlasError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
    if N < cfg.top_k:
        raise AtlasError(f"the corpus has {N} contexts, fewer than the top-k ({cfg.top_k}): "
                         "give more tokens or a smaller top_k")
    if cfg.window > T:
        raise AtlasError(f"example window {cfg.window} is longer than the contexts ({T} tokens)")
    hooks = list(saes)
    from jsae.sae.archs import get_arch

    ks = [get_arch(saes[h].spec.architecture).max_active(saes[h].spec) for h in hooks]
    ks = [k for k in ks if k]
    if ks and max(ks) > cfg.sparse_cap:  # e.g. TopK codes never have more than k active features
        cfg = dataclasses.replace(cfg, sparse_cap=max(ks))
    corpus_fp = corpus_fingerprint(tokens, mask)
    states, expects, paths = {}, {}, {}
    start = 0
    for h in hooks:
        sae = saes[h]
        expects[h] = pass_identity(sae, h, corpus_fp, cfg, batch_size)
        st = init_state(sae.spec.d_sae, cfg)
        if state_dir is not None:
            paths[h] = Path(state_dir) / f"{h}.state.npz"
            got = load_state(paths[h], expects[h], st, N)
            if got is not None:
                st, meta = got
                start = meta["next_context"]
        states[h] = st
    return cfg, states, expects, paths, start


def stream_cache(
    saes: Mapping[str, object],
    cache_dir,
    cfg: StreamConfig = StreamConfig(),
    *,
    batch_size: int = 32,
    max_contexts: int | None = None,
    state_dir: str | Path | None = None,
    save_every: int = 64,
    mesh=None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, StreamResult]:
    """The streaming pass over a ``jsae harvest`` cache, no LM: its held-out split (stored in
    corpus order) with the context tokens saved beside it (:func:`jsae.data.cache.read_contexts`).
    Activations are placed back at their context positions; positions without a row (BOS,
    padding, norm outliers) do not count. Same results as :func:`stream_text` on those
    contexts; ``max_contexts`` limits the pass to the first contexts."""
    from jsae.data.cache import ContextRows

    reader = ContextRows(cache_dir, _read_hooks(saes))
    tokens, mask = reader.tokens, reader.mask
    if max_contexts is not None:
        tokens, mask = tokens[:max_contexts], mask[:max_contexts]
    cfg, states, expects, paths, start = _prepare(saes, tokens, mask, cfg, batch_size, state_dir)

    counted = np.concatenate([[0], np.cumsum(mask.sum(1))])

    def acts_fn(s, tok):
        B = tok.shape[0]
        m = mask[s : s + B]
        out = {}
        for h, rows in reader.rows(int(counted[s]), int(m.sum())).items():
            a = np.zeros((B, tokens.shape[1], rows.shape[-1]), np.float32)
            a[: len(m)][m] = rows
            out[h] = jnp.asarray(a)
        return _stacked(saes, out)

    return _run_pass(saes, tokens, mask, cfg, states, expects, paths, start, acts_fn,
                     batch_size=batch_size, save_every=save_every, mesh=mesh, progress=progress,
                     stop_after=stop_after)
