"""Neighbourhoods of features: nearest decoder directions (exact cosine, blocked on the device)
and co-activation (features that fire on the same tokens).

Decoder neighbours never build a ``[d_sae, d_sae]`` matrix: rows are taken ``row_block`` at a
time and scanned against ``col_block`` columns at a time with a running ``lax.top_k`` merge,
so memory is ``row_block * (col_block + n)`` whatever ``d_sae`` (10^6 features fit on one chip;
time is ``d_sae^2 * d_in`` multiply-adds). Ties go to the lower feature id, as a stable sort.

Co-activation: the score of ``g`` for ``f`` is the Jaccard index ``|f & g| / |f | g|`` of the
sets of tokens on which each is active (among a token's ``coact_k`` largest positive codes).
:func:`coactivation_from_pass` scores over the whole pass: the streaming pass counts, for
each feature, its co-activations with its ``coact_candidates`` most frequent partners in the
first ``coact_tokens`` tokens (the sample), exactly, over every token; a partner outside that
list is not scored. :func:`coactivation_neighbours` scores over the sample alone.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jsae.analysis.atlas.state import AtlasState

COACT_SCORE = "jaccard"


def decoder_rows(sae) -> np.ndarray:
    """``[F, d]`` the decoder rows that neighbours and maps compare: ``W_dec``; a crosscoder's
    rows at all its hooks concatenated ``[F, L * d]`` (two features are near when they write
    the same directions at every layer, weighted by how much they write at each)."""
    W = np.asarray(jax.device_get(sae.params["W_dec"]), np.float32)
    return W.reshape(W.shape[0], -1)


def _unit(w):
    w = jnp.asarray(w, jnp.float32)
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


@partial(jax.jit, static_argnames=("n", "col_block"))
def _block_topk(rows, row_ids, cols, col_ok, *, n: int, col_block: int):
    """Top-``n`` cosine of ``rows [b, d]`` (unit) against ``cols [Fp, d]`` (unit, padded to a
    multiple of ``col_block``; ``col_ok [Fp]`` False = never a neighbour)."""
    b = rows.shape[0]
    n_blocks = cols.shape[0] // col_block

    def body(carry, j):
        tv, ti = carry
        c = jax.lax.dynamic_slice_in_dim(cols, j * col_block, col_block)
        ok = jax.lax.dynamic_slice_in_dim(col_ok, j * col_block, col_block)
        ids = j * col_block + jnp.arange(col_block, dtype=jnp.int32)
        s = jnp.einsum("bd,cd->bc", rows, c, precision=jax.lax.Precision.HIGHEST)
        s = jnp.where(ok[None, :] & (ids[None, :] != row_ids[:, None]), s, -jnp.inf)
        v = jnp.concatenate([tv, s], 1)
        i = jnp.concatenate([ti, jnp.broadcast_to(ids, (b, col_block))], 1)
        tv2, pos = jax.lax.top_k(v, n)
        return (tv2, jnp.take_along_axis(i, pos, 1)), None

    init = (jnp.full((b, n), -jnp.inf, jnp.float32), jnp.full((b, n), -1, jnp.int32))
    (tv, ti), _ = jax.lax.scan(body, init, jnp.arange(n_blocks))
    return tv, jnp.where(jnp.isfinite(tv), ti, -1)


def decoder_neighbours(W_dec, n: int = 10, *, features=None, candidates=None,
                       row_block: int = 1024, col_block: int = 8192, progress: bool = False
                       ) -> tuple[np.ndarray, np.ndarray]:
    """For each feature in ``features`` (default all rows of ``W_dec [F, d]``): the ``n``
    other features with the largest decoder cosine, ``(ids [R, n] int64, cos [R, n] float32)``,
    descending; ``-1`` / NaN where fewer than ``n`` candidates exist. ``candidates [F]`` bool:
    features allowed as neighbours (e.g. live ones)."""
    W = _unit(W_dec)
    F = W.shape[0]
    n = int(min(n, max(F - 1, 1)))
    col_block = int(min(col_block, F))
    pad = (-F) % col_block
    ok = np.ones(F, bool) if candidates is None else np.asarray(candidates, bool)
    cols = jnp.pad(W, ((0, pad), (0, 0)))
    col_ok = jnp.asarray(np.concatenate([ok, np.zeros(pad, bool)]))
    feats = np.arange(F) if features is None else np.asarray(features, np.int64).reshape(-1)
    out_i, out_v = [], []
    it = range(0, len(feats), row_block)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="neighbours", unit="block")
    rb = int(min(row_block, len(feats)))
    for s in it:
        ids = feats[s : s + rb]
        m = len(ids)
        ids_p = np.concatenate([ids, np.repeat(ids[-1:], rb - m)])  # one compiled shape
        rows = W[jnp.asarray(ids_p, jnp.int32)]
        v, i = _block_topk(rows, jnp.asarray(ids_p, jnp.int32), cols, col_ok, n=n,
                           col_block=col_block)
        out_v.append(np.asarray(v)[:m])
        out_i.append(np.asarray(i)[:m])
    vals = np.concatenate(out_v).astype(np.float32)
    idx = np.concatenate(out_i).astype(np.int64)
    vals[idx < 0] = np.nan
    return idx, vals


def features_within(W_dec, center: int, radius: float, *, candidates=None) -> tuple[np.ndarray, np.ndarray]:
    """Features whose decoder cosine distance ``1 - cos`` to ``center`` is at most ``radius``
    (the center first, then by distance): ``(ids, cos)``. One ``[F]`` vector, no matrix."""
    W = _unit(W_dec)
    cos = np.asarray(jnp.einsum("fd,d->f", W, W[int(center)], precision=jax.lax.Precision.HIGHEST))
    keep = (1.0 - cos) <= radius
    if candidates is not None:
        keep &= np.asarray(candidates, bool)
    keep[int(center)] = True
    ids = np.flatnonzero(keep)
    order = np.lexsort((ids, ids != center, -cos[ids]))
    ids = ids[order]
    return ids.astype(np.int64), cos[ids].astype(np.float32)


def _sample_pairs(coact_rows: np.ndarray, d_sae: int):
    """Ordered pairs ``(f, g, count)`` (f != g) active together on the sample's tokens, sorted
    by ``f * d_sae + g``, and each feature's count of active tokens ``[d_sae]``."""
    rows = np.sort(np.asarray(coact_rows, np.int64), axis=1)
    if rows.ndim != 2 or rows.size == 0:
        rows = np.full((0, 1), -1, np.int64)
    dup = np.zeros(rows.shape, bool)
    dup[:, 1:] = rows[:, 1:] == rows[:, :-1]  # a feature listed twice on one token counts once
    rows = np.where(dup, -1, rows)
    valid = rows >= 0
    count = np.bincount(rows[valid], minlength=d_sae)[:d_sae]
    a, b = rows[:, :, None], rows[:, None, :]
    ok = (a >= 0) & (b >= 0) & (a != b)
    keys = (np.broadcast_to(a, ok.shape)[ok] * d_sae + np.broadcast_to(b, ok.shape)[ok])
    pair, both = np.unique(keys, return_counts=True)
    return pair // d_sae, pair % d_sae, both, count


def sample_candidates(coact_rows: np.ndarray, d_sae: int, m: int) -> np.ndarray:
    """``[d_sae, m]`` int32: each feature's ``m`` most frequent partners in the sample
    (count descending, ties to the lower id; -1 = none)."""
    f, g, both, _ = _sample_pairs(coact_rows, d_sae)
    return _rank_rows(f, g, both.astype(np.float64), d_sae, m)[0].astype(np.int32)


def _rank_rows(f, g, score, d_sae: int, n: int):
    """Per row ``f``, the ``n`` best ``g`` by score (descending, ties to the lower id)."""
    order = np.lexsort((g, -score, f))
    f, g, score = f[order], g[order], score[order]
    start = np.searchsorted(f, np.arange(d_sae))
    rank = np.arange(len(f)) - start[f]
    sel = rank < n
    ids = np.full((d_sae, n), -1, np.int64)
    vals = np.full((d_sae, n), np.nan, np.float32)
    ids[f[sel], rank[sel]] = g[sel]
    vals[f[sel], rank[sel]] = score[sel]
    return ids, vals


def coactivation_from_pass(state: AtlasState, n: int = 10, *, min_count: int = 2
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Whole-pass Jaccard neighbours from a finished streaming pass's state (its ``coact``,
    ``coact_n``, ``coact_cand``, ``coact_cnt``, ``coact_fires``, ``coact_ready``): ``(ids, scores)``
    ``[d_sae, n]``, as :func:`coactivation_neighbours`. Counts of a candidate pair are those
    in the sample plus those the pass counted after it."""
    cand = np.asarray(state.coact_cand, np.int64)
    F, M = cand.shape
    rows = np.asarray(state.coact)[: int(state.coact_n)]
    if not int(state.coact_ready):  # the sample holds the whole pass
        return coactivation_neighbours(rows, F, n, min_count=min_count)
    sf, sg, sboth, _ = _sample_pairs(rows, F)
    keys = sf * F + sg
    f = np.repeat(np.arange(F, dtype=np.int64), M)
    g = cand.reshape(-1)
    ok = g >= 0
    f, g = f[ok], g[ok]
    q = f * F + g
    in_sample = np.zeros(len(q), np.int64)
    if len(keys):
        j = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
        in_sample = np.where(keys[j] == q, sboth[j], 0)
    both = in_sample + np.asarray(state.coact_cnt, np.int64).reshape(-1)[ok]
    fires = np.asarray(state.coact_fires, np.int64)
    keep = both >= min_count
    f, g, both = f[keep], g[keep], both[keep]
    return _rank_rows(f, g, both / (fires[f] + fires[g] - both), F, n)


def coactivation_neighbours(coact_rows: np.ndarray, d_sae: int, n: int = 10, *, min_count: int = 2
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Jaccard co-activation neighbours from the pass's token sample ``coact_rows [tokens, k]``
    (active feature ids, -1 = none): ``(ids [d_sae, n] int64, scores [d_sae, n] float32)``,
    descending, ties to the lower id; pairs seen together on fewer than ``min_count`` tokens
    are left out (-1 / NaN). Memory ``tokens * k^2`` pairs (NumPy, no dense [F, F])."""
    f, g, both, count = _sample_pairs(coact_rows, d_sae)
    keep = both >= min_count
    f, g, both = f[keep], g[keep], both[keep]
    return _rank_rows(f, g, both / (count[f] + count[g] - both), d_sae, n)
