"""One streaming pass over a corpus that gathers every feature's statistics and examples at once.

For every feature ``f`` of a dictionary (``F`` features, state on the device, memory
``O(F * (K + Q * S) * W)``, never proportional to the corpus) one jitted update per batch of
contexts keeps:

- firing count, sum and max of the code over counted tokens, and a histogram of positive codes
  in ``H`` log-spaced bins shared by all features;
- the top ``K`` contexts by the feature's maximum in the context (one entry per context, its
  first argmax), merged with ``lax.top_k`` (ties: the earlier context wins, as a stable sort of
  the whole corpus would give), each with the window of ``W`` tokens around that maximum and the
  feature's code at every token of the window;
- quantile-band samples: ``Q`` bands of equal width over ``[0, M_f)`` where ``M_f`` is the
  smallest power of two above the feature's maximum, and in each band the ``S`` tokens with the
  smallest hash priority ``h(token position in the corpus)``, with their windows, plus the
  count of tokens per band. When a batch raises ``M_f`` by ``2^d``, old band ``q`` falls
  entirely inside new band ``q >> d`` (the edges are nested), so merging the kept samples of
  those old bands by priority gives exactly the bottom-``S`` of the new band. The result is
  therefore the same as "``S`` tokens per band, chosen by priority, over the whole corpus"
  whatever the batch order: deterministic, resumable and mergeable.
- co-activation over the whole pass, in bounded memory: a token's *active* features are its
  largest ``coact_k`` positive codes. The active features of the first ``coact_tokens``
  counted tokens are kept (the sample); when it is full, each feature's ``coact_candidates``
  most frequent partners in the sample become its candidates, and from then on every later
  token adds to the exact co-activation count of each (feature, candidate) pair, beside
  every feature's count of active tokens. Jaccard scores of candidate pairs are therefore
  exact over the whole pass (:func:`jsae.analysis.atlas.neighbours.coactivation_from_pass`);
  a pair is missed only if it never co-fires among the sample's most frequent partners.

Features are the leading axis of every per-feature array, so the state may be sharded over
``mesh.model`` with the SAE's latents (:func:`jsae.parallel.tree_shardings`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jsae.errors import JsaeError
from jsae.fileio import atomic_file

EMPTY_PRIO = np.uint32(0xFFFFFFFF)


class AtlasError(JsaeError, ValueError):
    """Bad input to the atlas (a feature out of range, a corpus too short, ...)."""


class AtlasStateMismatch(AtlasError):
    """A saved partial pass belongs to another dictionary, corpus or setting."""


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Sizes of the streaming pass (hashable: a static argument of the jitted update)."""

    top_k: int = 16  # K contexts per feature
    window: int = 24  # W tokens per example
    left: int = -1  # tokens left of the anchor in a window (-1: 2/3 of the window)
    bands: int = 10  # Q quantile bands
    band_samples: int = 4  # S samples per band
    hist_bins: int = 40  # H
    hist_min: float = 1e-3  # smallest bin edge; codes below go to bin 0, above hist_max to H-1
    hist_max: float = 1e2
    coact_tokens: int = 16384
    coact_k: int = 32
    coact_candidates: int = 32  # partners per feature counted over the whole pass
    sparse_cap: int = 32  # active features per token handled sparsely (TopK: >= k)

    @property
    def left_(self) -> int:
        return self.left if self.left >= 0 else (2 * self.window) // 3

    def hist_edges(self) -> np.ndarray:
        return np.logspace(np.log10(self.hist_min), np.log10(self.hist_max),
                           self.hist_bins + 1).astype(np.float32)


def token_priority(gid):
    """Deterministic 32-bit priority of a token from its corpus position (a murmur3 finaliser;
    NumPy or JAX uint32 arrays)."""
    xp = jnp if isinstance(gid, jax.Array) else np
    x = xp.asarray(gid).astype(xp.uint32)
    x = x ^ (x >> 16)
    x = x * xp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * xp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    return xp.minimum(x, xp.uint32(0xFFFFFFFE))  # EMPTY_PRIO stays free for empty slots


def band_exponent(max_val):
    """``e`` such that ``2^(e-1) <= max < 2^e`` (bands cover ``[0, 2^e)``)."""
    xp = jnp if isinstance(max_val, jax.Array) else np
    return xp.frexp(max_val)[1].astype(xp.int32)


def band_index(a, e, Q: int):
    """Band of code ``a > 0`` for a feature whose band range is ``[0, 2^e)`` (float32 math)."""
    xp = jnp if isinstance(a, jax.Array) else np
    x = xp.floor(xp.float32(Q) * xp.ldexp(xp.asarray(a, xp.float32), -xp.asarray(e)))
    return xp.clip(x, 0, Q - 1).astype(xp.int32)


def init_state(d_sae: int, cfg: StreamConfig) -> dict[str, np.ndarray]:
    F, K, W, Q, S, H = d_sae, cfg.top_k, cfg.window, cfg.bands, cfg.band_samples, cfg.hist_bins
    return {
        "fires": np.zeros((F,), np.int32),
        "total": np.zeros((F,), np.float32),
        "max": np.zeros((F,), np.float32),
        "hist": np.zeros((F, H), np.int32),
        "top_val": np.zeros((F, K), np.float32),
        "top_ctx": np.full((F, K), -1, np.int32),
        "top_pos": np.zeros((F, K), np.int32),
        "top_tok": np.full((F, K, W), -1, np.int32),
        "top_act": np.zeros((F, K, W), np.float16),
        "band_exp": np.zeros((F,), np.int32),
        "band_count": np.zeros((F, Q), np.int32),
        "band_prio": np.full((F, Q, S), EMPTY_PRIO, np.uint32),
        "band_val": np.zeros((F, Q, S), np.float32),
        "band_ctx": np.full((F, Q, S), -1, np.int32),
        "band_pos": np.zeros((F, Q, S), np.int32),
        "band_tok": np.full((F, Q, S, W), -1, np.int32),
        "band_act": np.zeros((F, Q, S, W), np.float16),
        "coact": np.full((cfg.coact_tokens, min(cfg.coact_k, F)), -1, np.int32),
        "coact_n": np.zeros((), np.int32),
        "coact_cand": np.full((F, _n_cand(cfg, F)), -1, np.int32),
        "coact_cnt": np.zeros((F, _n_cand(cfg, F)), np.int32),
        "coact_fires": np.zeros((F,), np.int32),
        "coact_ready": np.zeros((), np.int32),
        "n_tokens": np.zeros((), np.int32),
    }


def _n_cand(cfg: StreamConfig, F: int) -> int:
    return max(1, min(cfg.coact_candidates, F - 1))


PER_FEATURE = ("fires", "total", "max", "hist", "top_val", "top_ctx", "top_pos", "top_tok",
               "top_act", "band_exp", "band_count", "band_prio", "band_val", "band_ctx",
               "band_pos", "band_tok", "band_act", "coact_cand", "coact_cnt", "coact_fires")


def _bottom_per_band(band, prio, Q: int, S: int):
    """Indices ``[F, Q, S]`` of the ``S`` smallest-priority entries of each band (stable on
    ties), a validity mask, and the count per band ``[F, Q]``. ``band [F, N]`` in ``0..Q``
    (``Q`` = no band)."""
    F, N = band.shape
    idx = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (F, N))
    b_s, _, i_s = jax.lax.sort((band, prio, idx), dimension=1, is_stable=True, num_keys=2)
    starts = jax.vmap(lambda r: jnp.searchsorted(r, jnp.arange(Q + 1, dtype=r.dtype)))(b_s)
    count = (starts[:, 1:] - starts[:, :-1]).astype(jnp.int32)  # [F, Q]
    s = jnp.arange(S, dtype=jnp.int32)
    pos = starts[:, :-1, None] + s  # [F, Q, S]
    valid = s < count[..., None]
    sel = jnp.take_along_axis(i_s, jnp.minimum(pos, N - 1).reshape(F, -1), axis=1)
    return sel.reshape(F, Q, S), valid, count


def _gather_windows(z, tokens, b, t, left: int, W: int):
    """Windows of ``W`` tokens starting ``left`` before token ``t`` of context ``b``, for the
    feature of each row: ``z [B, T, F]``, ``tokens [B, T]``, ``b, t [F, M]`` ->
    (tokens [F, M, W] int32 with -1 outside the context, codes [F, M, W] float16)."""
    B, T, F = z.shape
    tt = t[..., None] - left + jnp.arange(W, dtype=jnp.int32)  # [F, M, W]
    ok = (tt >= 0) & (tt < T)
    tc = jnp.clip(tt, 0, T - 1)
    bb = jnp.broadcast_to(b[..., None], tt.shape)
    ff = jnp.broadcast_to(jnp.arange(F, dtype=jnp.int32)[:, None, None], tt.shape)
    acts = jnp.where(ok, z[bb, tc, ff], 0.0).astype(jnp.float16)
    toks = jnp.where(ok, tokens[bb, tc], -1).astype(jnp.int32)
    return toks, acts


def _hist_bin(v, cfg: StreamConfig):
    lo, hi = np.log10(cfg.hist_min), np.log10(cfg.hist_max)
    hb = jnp.floor((jnp.log10(jnp.maximum(v, 1e-30)) - lo) * (cfg.hist_bins / (hi - lo)))
    return jnp.clip(hb, 0, cfg.hist_bins - 1).astype(jnp.int32)


def _new_max(old_max, bmax):
    mx = jnp.maximum(old_max, bmax)
    return mx, jnp.where(mx > 0, band_exponent(mx), 0)


def _batch_dense(z, old_max, prio_n, cfg: StreamConfig):
    """Per-batch candidates from dense codes (any number of active features per token)."""
    B, T, F = z.shape
    Q, S, H = cfg.bands, cfg.band_samples, cfg.hist_bins
    zt = jnp.transpose(z, (2, 0, 1))  # [F, B, T]
    zf = zt.reshape(F, B * T)
    mx, e_new = _new_max(old_max, zf.max(1))
    fires = zf > 0
    seg = jnp.where(fires, jnp.arange(F, dtype=jnp.int32)[:, None] * H + _hist_bin(zf, cfg), F * H)
    hist = jax.ops.segment_sum(fires.astype(jnp.int32).reshape(-1), seg.reshape(-1),
                               num_segments=F * H + 1)[: F * H].reshape(F, H)
    band = jnp.where(fires, band_index(zf, e_new[:, None], Q), Q)
    sel, valid, count = _bottom_per_band(band, jnp.broadcast_to(prio_n, (F, B * T)), Q, S)
    return {"fires": fires.sum(1, dtype=jnp.int32), "total": zf.sum(1), "hist": hist,
            "ctx_max": zt.max(2), "ctx_pos": jnp.argmax(zt, axis=2).astype(jnp.int32),
            "band_n": sel, "band_ok": valid, "band_count": count, "max": mx, "e_new": e_new}


def _batch_sparse(z, cv, ci, old_max, prio_n, cfg: StreamConfig):
    """The same candidates from each token's active features ``(cv, ci) [N, A]`` (exact when
    no token has more than ``A`` active features): work ~ ``N * A``, not ``N * F``."""
    B, T, F = z.shape
    Q, S, H = cfg.bands, cfg.band_samples, cfg.hist_bins
    N, A = cv.shape
    v = cv.reshape(-1)
    f = ci.reshape(-1).astype(jnp.int32)
    n = jnp.repeat(jnp.arange(N, dtype=jnp.int32), A)
    ok = v > 0
    fd = jnp.where(ok, f, F)  # F: dropped by the scatters
    fires = jnp.zeros(F, jnp.int32).at[fd].add(1, mode="drop")
    total = jnp.zeros(F, jnp.float32).at[fd].add(v, mode="drop")
    mx, e_new = _new_max(old_max, jnp.zeros(F, jnp.float32).at[fd].max(v, mode="drop"))
    hist = jnp.zeros(F * H, jnp.int32).at[jnp.where(ok, f * H + _hist_bin(v, cfg), F * H)].add(
        1, mode="drop").reshape(F, H)
    b, t = n // T, n % T
    cm = jnp.zeros((F, B), jnp.float32).at[fd, b].max(v, mode="drop")
    first = ok & (v == cm[jnp.minimum(f, F - 1), b])
    cp = jnp.full((F, B), T, jnp.int32).at[jnp.where(first, f, F), b].min(t, mode="drop")
    cp = jnp.where(cp == T, 0, cp)  # as argmax over a context where the feature is silent
    fc = jnp.minimum(f, F - 1)
    k1 = jnp.where(ok, fc * (Q + 1) + band_index(v, e_new[fc], Q), F * (Q + 1))
    k1s, _, es = jax.lax.sort((k1, prio_n[n], jnp.arange(N * A, dtype=jnp.int32)),
                              num_keys=2, is_stable=True)
    g = (jnp.arange(F, dtype=jnp.int32)[:, None] * (Q + 1) + jnp.arange(Q, dtype=jnp.int32)).ravel()
    start = jnp.searchsorted(k1s, g).reshape(F, Q).astype(jnp.int32)
    end = jnp.searchsorted(k1s, g + 1).reshape(F, Q).astype(jnp.int32)
    count = end - start
    s = jnp.arange(S, dtype=jnp.int32)
    pos = start[..., None] + s
    return {"fires": fires, "total": total, "hist": hist, "ctx_max": cm, "ctx_pos": cp,
            "band_n": n[es[jnp.clip(pos, 0, N * A - 1)]], "band_ok": s < count[..., None],
            "band_count": count, "max": mx, "e_new": e_new}


def _cap(cfg: StreamConfig, state: dict, F: int) -> int:
    # one more than the cap: a zero in the last column proves no token has more active features
    return int(min(max(cfg.sparse_cap, state["coact"].shape[1]) + 1, F))


@partial(jax.jit, static_argnames=("A",))
def _active(z, A: int):
    """Each token's ``A`` largest codes ``[N, A]``. A jit of its own: inside the big update
    XLA:CPU lowers ``top_k`` to a full sort, alone to its fast TopK call."""
    return jax.lax.top_k(z.reshape(-1, z.shape[-1]), A)


def update_state(state: dict, z, tokens, mask, ctx0, *, cfg: StreamConfig) -> dict:
    """Merge one batch into the state. ``z [B, T, F]`` codes (>= 0), ``tokens [B, T]`` int32,
    ``mask [B, T]`` bool (positions that count), ``ctx0``: corpus index of context 0.

    Each token's ``cfg.sparse_cap`` largest codes are taken first; when no token has more
    active features than that (TopK SAEs with k <= cap, always), every statistic is computed
    from those entries (cost ~ tokens x cap); otherwise from the dense codes (same results)."""
    cv, ci = _active(z, _cap(cfg, state, z.shape[-1]))
    return _update(state, z, cv, ci, tokens, mask, ctx0, cfg=cfg)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def _update(state: dict, z, cv, ci, tokens, mask, ctx0, *, cfg: StreamConfig) -> dict:
    B, T, F = z.shape
    K, W, Q, S, left = cfg.top_k, cfg.window, cfg.bands, cfg.band_samples, cfg.left_
    tokens = tokens.astype(jnp.int32)
    mflat = mask.reshape(-1)
    A = cv.shape[1]
    cv = jnp.where(mflat[:, None], cv, 0.0)
    sparse_ok = (A == F) | jnp.all(cv[:, -1] <= 0)
    z = jnp.where(mask[..., None], z.astype(jnp.float32), 0.0)
    had = state["max"] > 0
    gid = (ctx0 + jnp.arange(B, dtype=jnp.int32))[:, None] * T + jnp.arange(T, dtype=jnp.int32)
    prio_n = token_priority(gid).reshape(-1)  # [N]
    c = jax.lax.cond(sparse_ok, lambda: _batch_sparse(z, cv, ci, state["max"], prio_n, cfg),
                     lambda: _batch_dense(z, state["max"], prio_n, cfg))
    mx, e_new = c["max"], c["e_new"]
    new = dict(state)
    new["fires"] = state["fires"] + c["fires"]
    new["total"] = state["total"] + c["total"]
    new["max"] = mx
    new["hist"] = state["hist"] + c["hist"]
    new["n_tokens"] = state["n_tokens"] + mask.sum(dtype=jnp.int32)
    rows = jnp.arange(F, dtype=jnp.int32)[:, None]

    # top-K contexts: merge by value; windows gathered only for the winners from this batch
    vals = jnp.concatenate([state["top_val"], c["ctx_max"]], 1)
    top_v, i = jax.lax.top_k(vals, K)
    from_batch = i >= K
    bi = jnp.clip(i - K, 0, B - 1)
    old_i = jnp.minimum(i, K - 1)
    pos_b = jnp.take_along_axis(c["ctx_pos"], bi, 1)
    wt, wa = _gather_windows(z, tokens, bi, pos_b, left, W)
    fb = from_batch[..., None]
    new["top_val"] = top_v
    new["top_ctx"] = jnp.where(from_batch, jnp.where(top_v > 0, ctx0 + bi, -1),
                               jnp.take_along_axis(state["top_ctx"], old_i, 1))
    new["top_pos"] = jnp.where(from_batch, pos_b, jnp.take_along_axis(state["top_pos"], old_i, 1))
    new["top_tok"] = jnp.where(fb, wt, jnp.take_along_axis(state["top_tok"], old_i[..., None], 1))
    new["top_act"] = jnp.where(fb, wa, jnp.take_along_axis(state["top_act"], old_i[..., None], 1))

    # quantile bands over [0, 2^e): rebin the kept samples when the max grows (old band q lies
    # inside new band q >> d), then keep the S lowest priorities of each band over old + new
    d = jnp.clip(jnp.where(had, e_new - state["band_exp"], 0), 0, 30)  # doublings
    old_band = jnp.arange(Q, dtype=jnp.int32)[None, :] >> d[:, None]  # [F, Q]
    onehot = old_band[..., None] == jnp.arange(Q, dtype=jnp.int32)  # [F, Q_old, Q_new]
    count = jnp.sum(jnp.where(onehot, state["band_count"][..., None], 0), axis=1)
    new["band_count"] = count + c["band_count"]
    new["band_exp"] = jnp.where(mx > 0, e_new, state["band_exp"])
    P = 2 * Q * S
    old_b = jnp.where(state["band_prio"] != EMPTY_PRIO, old_band[..., None], Q).reshape(F, Q * S)
    new_b = jnp.where(c["band_ok"], jnp.arange(Q, dtype=jnp.int32)[None, :, None], Q).reshape(F, Q * S)
    bn = c["band_n"].reshape(F, Q * S)
    pb = jnp.concatenate([old_b, new_b], 1)  # [F, P]
    pp = jnp.concatenate([state["band_prio"].reshape(F, Q * S),
                          jnp.where(new_b < Q, prio_n[bn], EMPTY_PRIO)], 1)
    j = jnp.arange(P, dtype=jnp.int32)

    def ranks_all():  # [F, P]: entries of the same band ahead of each (priority, then order)
        ahead = (pb[:, None, :] == pb[:, :, None]) & ((pp[:, None, :] < pp[:, :, None]) | (
            (pp[:, None, :] == pp[:, :, None]) & (j[None, :] < j[:, None])))
        return ahead.sum(2, dtype=jnp.int32)

    def ranks_grouped():  # no feature rebinned: band q's candidates are old[q] + new[q] only
        gb = jnp.concatenate([pb[:, : Q * S].reshape(F, Q, S), pb[:, Q * S :].reshape(F, Q, S)], 2)
        gp = jnp.concatenate([pp[:, : Q * S].reshape(F, Q, S), pp[:, Q * S :].reshape(F, Q, S)], 2)
        jj = jnp.arange(2 * S, dtype=jnp.int32)
        ahead = (gb[..., None, :] == gb[..., :, None]) & ((gp[..., None, :] < gp[..., :, None]) | (
            (gp[..., None, :] == gp[..., :, None]) & (jj[None, :] < jj[:, None])))
        r = ahead.sum(-1, dtype=jnp.int32)  # [F, Q, 2S]: old S then new S of each band
        return jnp.concatenate([r[..., :S].reshape(F, Q * S), r[..., S:].reshape(F, Q * S)], 1)

    rank = jax.lax.cond(jnp.all(d == 0), ranks_grouped, ranks_all)
    slot = jnp.where((pb < Q) & (rank < S), pb * S + rank, Q * S)
    src = jnp.full((F, Q * S), -1, jnp.int32).at[
        jnp.broadcast_to(rows, slot.shape), slot].set(jnp.broadcast_to(j, slot.shape), mode="drop")
    filled = src >= 0
    from_new = src >= Q * S
    oi = jnp.clip(src, 0, Q * S - 1)
    ni = jnp.take_along_axis(bn, jnp.clip(src - Q * S, 0, Q * S - 1), 1)  # token of a new entry
    nb, nt = ni // T, ni % T
    wt, wa = _gather_windows(z, tokens, nb, nt, left, W)
    new_val = z[nb, nt, jnp.broadcast_to(rows, nb.shape)]

    def pick(key, new_v, fill):
        old = state[key].reshape(F, Q * S, *state[key].shape[3:])
        old = jnp.take_along_axis(old, oi.reshape(F, Q * S, *[1] * (old.ndim - 2)), 1)
        m = from_new.reshape(F, Q * S, *[1] * (old.ndim - 2))
        f = filled.reshape(F, Q * S, *[1] * (old.ndim - 2))
        out = jnp.where(f, jnp.where(m, new_v.astype(old.dtype), old), jnp.asarray(fill, old.dtype))
        return out.reshape(state[key].shape)

    new["band_prio"] = pick("band_prio", prio_n[ni], EMPTY_PRIO)
    new["band_val"] = pick("band_val", new_val, 0.0)
    new["band_ctx"] = pick("band_ctx", ctx0 + nb, -1)
    new["band_pos"] = pick("band_pos", nt, 0)
    new["band_tok"] = pick("band_tok", wt, -1)
    new["band_act"] = pick("band_act", wa, 0.0)

    # co-activation sample: the active features of the first coact_tokens counted tokens
    C, ck = state["coact"].shape
    cix = jnp.where(cv[:, :ck] > 0, ci[:, :ck], -1).astype(jnp.int32)
    cslot = state["coact_n"] + jnp.cumsum(mflat.astype(jnp.int32)) - 1
    cslot = jnp.where(mflat, cslot, C)  # out of range: dropped
    new["coact"] = state["coact"].at[cslot].set(cix, mode="drop")
    new["coact_n"] = jnp.minimum(state["coact_n"] + mflat.sum(dtype=jnp.int32), C)
    # ... and past the sample, the exact counts of each feature's candidate partners
    new.update(_coact_count(state, cix, mflat, mflat & (cslot >= C)))
    return new


def _coact_count(state, cix, counted, past_sample):
    """``coact_fires`` += active features of ``counted`` tokens; once the candidates are set,
    ``coact_cnt[f, m]`` += tokens of ``past_sample`` where ``f`` and ``cand[f, m]`` are both
    active. ``cix [N, k]``: active ids (-1 none). Cost ``N k M log k``, no ``[F, F]``."""
    F, M = state["coact_cand"].shape
    ok = (cix >= 0) & counted[:, None]
    fires = state["coact_fires"].at[jnp.where(ok, cix, F)].add(1, mode="drop")

    def count():
        live = (cix >= 0) & past_sample[:, None]
        cand = state["coact_cand"][jnp.clip(cix, 0, F - 1)]  # [N, k, M]
        srt = jnp.sort(jnp.where(cix >= 0, cix, F), axis=1)  # each token's active set, sorted
        q = cand.reshape(cand.shape[0], -1)
        at = jax.vmap(jnp.searchsorted)(srt, q)  # membership by binary search: N k M log k
        found = jnp.take_along_axis(srt, jnp.clip(at, 0, srt.shape[1] - 1), 1) == q
        hit = found.reshape(cand.shape) & (cand >= 0) & live[..., None]
        f = jnp.broadcast_to(jnp.where(live, cix, F)[..., None], hit.shape)
        m = jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), hit.shape)
        return state["coact_cnt"].at[f, m].add(hit.astype(jnp.int32), mode="drop")

    cnt = jax.lax.cond(state["coact_ready"] > 0, count, lambda: state["coact_cnt"])
    return {"coact_fires": fires, "coact_cnt": cnt}


@partial(jax.jit, static_argnames=("ck",), donate_argnames=("state",))
def _boundary_count(state, cv, ci, mask, n_before, *, ck: int):
    """The batch that filled the sample, counted again for its tokens past the sample (the
    candidates were set after its update); ``coact_fires`` is already counted."""
    mflat = mask.reshape(-1)
    cix = jnp.where(cv[:, :ck] > 0, ci[:, :ck], -1).astype(jnp.int32)
    idx = n_before + jnp.cumsum(mflat.astype(jnp.int32)) - 1
    C = state["coact"].shape[0]
    got = _coact_count(state, cix, jnp.zeros_like(mflat), mflat & (idx >= C))
    return dict(state, coact_cnt=got["coact_cnt"])


def _set_candidates(state, sae, acts, mask, n_before, cfg):
    """Candidates from the full sample, then the boundary batch's tokens past it counted."""
    from jsae.analysis.atlas.neighbours import sample_candidates

    F, M = state["coact_cand"].shape
    cand = sample_candidates(np.asarray(jax.device_get(state["coact"])), F, M)
    state = dict(state, coact_cand=jax.device_put(cand, state["coact_cand"].sharding),
                 coact_ready=jnp.ones((), jnp.int32))
    z = _encode(sae, acts)
    cv, ci = _active(z, _cap(cfg, state, F))
    return _boundary_count(state, cv, ci, jnp.asarray(mask), jnp.int32(n_before),
                           ck=state["coact"].shape[1])


def _hash_arrays(h, arrays) -> None:
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())


def sae_content_hash(sae) -> str:
    """Short hash of an SAE's spec, normalisation and every parameter: a saved partial pass
    resumes only with exactly this SAE (a retrained or edited one starts over)."""
    h = hashlib.sha1(repr(sae.spec).encode())
    _hash_arrays(h, [sae.norm_scale] + [sae.params[k] for k in sorted(sae.params)])
    return h.hexdigest()[:16]


def corpus_fingerprint(tokens: np.ndarray, mask: np.ndarray) -> str:
    h = hashlib.sha1()
    _hash_arrays(h, [tokens, mask])
    return h.hexdigest()[:16]


def save_state(path: str | Path, state: dict, meta: dict) -> None:
    """Atomically write a partial pass (``meta`` holds fingerprints and the position)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = {k: np.asarray(jax.device_get(v)) for k, v in state.items()}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no .npz
        np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **host)


def load_state(path: str | Path, expect: Mapping, template: Mapping | None = None,
               n_contexts: int | None = None) -> tuple[dict, dict] | None:
    """A saved partial pass, or None when there is none. Refuses a state whose fingerprint
    differs from ``expect`` (one line naming what differs)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path) as d:
            meta = json.loads(bytes(d["__meta__"]).decode())
            state = {k: d[k] for k in d.files if k != "__meta__"}
    except Exception as e:  # noqa: BLE001 - any damage means the same thing here
        raise AtlasStateMismatch(f"{path}: unreadable partial atlas state ({e}); delete it") from e
    diff = [k for k in expect if meta.get(k) != expect[k]]
    if diff:
        what = "dictionary" if "sae" in diff else "corpus or settings"
        raise AtlasStateMismatch(
            f"{path}: partial atlas state of another {what} ("
            + ", ".join(f"{k} {meta.get(k)!r} != {expect[k]!r}" for k in diff)
            + "); delete it or use another --out")
    if template is not None:  # the fingerprints match: the arrays must still fit them
        _check_state(path, state, meta, template, n_contexts)
    return state, meta


def _check_state(path: Path, state: dict, meta: dict, template: Mapping, n_contexts) -> None:
    """Every array of a saved partial pass has the name, dtype and shape `init_state` gives,
    finite values, and ``next_context`` is a position in the corpus (one-line refusal)."""
    from jsae import validate as v
    from jsae.errors import FileFormatError

    missing = sorted(set(template) - set(state))
    extra = sorted(set(state) - set(template))
    if missing or extra:
        raise AtlasStateMismatch(f"{path}: partial atlas state lacks {missing} / has unknown "
                                 f"{extra} arrays; delete it")
    for k, t in template.items():
        a = state[k]
        if a.dtype != np.asarray(t).dtype or a.shape != np.shape(t):
            raise AtlasStateMismatch(f"{path}: array {k!r} is {a.dtype} {list(a.shape)}, expected "
                                     f"{np.asarray(t).dtype} {list(np.shape(t))}; delete it")
        if a.dtype == np.float32 and not np.isfinite(a).all():  # float16 windows may overflow
            raise AtlasStateMismatch(f"{path}: array {k!r} holds non-finite values; delete it")
    hi = n_contexts if n_contexts is not None else None
    try:
        v.field(meta, "next_context", int, path, lo=0, hi=hi)
    except FileFormatError as e:
        raise AtlasStateMismatch(f"{e}; delete it") from e


@dataclasses.dataclass
class StreamResult:
    """The finished pass for one dictionary, on the host (rows = all ``d_sae`` features)."""

    cfg: StreamConfig
    n_tokens: int
    n_contexts: int
    context_length: int
    state: dict[str, np.ndarray]

    @property
    def density(self) -> np.ndarray:
        return self.state["fires"].astype(np.float64) / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> np.ndarray:
        f = self.state["fires"]
        return (self.state["total"] / np.maximum(f, 1)).astype(np.float32)

    @property
    def band_edges(self) -> np.ndarray:
        """``[F, Q + 1]``: bands are ``[edges[q], edges[q+1])``; all zero for silent features."""
        s = self.state
        top = np.where(s["max"] > 0, np.ldexp(np.float32(1), s["band_exp"]), 0).astype(np.float32)
        return (top[:, None] * np.linspace(0, 1, self.cfg.bands + 1, dtype=np.float32)).astype(np.float32)

    def coact_rows(self) -> np.ndarray:
        """``[n, coact_k]`` active features of the sampled tokens (-1 = none)."""
        return self.state["coact"][: int(self.state["coact_n"])]


@jax.jit
def _encode(sae, acts):
    from jsae.sae.core import encode

    return encode(sae, acts.astype(jnp.float32))


def _encode_update(state, sae, acts, tokens, mask, ctx0, *, cfg):
    return update_state(state, _encode(sae, acts), tokens, mask, ctx0, cfg=cfg)


def _place(state, mesh, sae):
    """State (and SAE) on the device, per-feature arrays sharded like the SAE's latents."""
    if mesh is None:
        return jax.device_put(state), sae
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jsae.parallel import MODEL, tree_shardings

    def spec(k, v):
        return NamedSharding(mesh, P(MODEL) if k in PER_FEATURE else P())

    state = {k: jax.device_put(v, spec(k, v)) for k, v in state.items()}
    sae = jax.device_put(sae, tree_shardings(sae, mesh))
    return state, sae


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
                states[h] = _encode_update(states[h], sae_dev[h], acts[h][:batch_size], tj, mj,
                                           jnp.int32(s), cfg=cfg)
                if fills:  # this batch filled the co-activation sample
                    states[h] = _set_candidates(states[h], sae_dev[h], acts[h][:batch_size], msk,
                                                n_before, cfg)
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
        host = {k: np.asarray(v) for k, v in jax.device_get(states[h]).items()}
        out[h] = StreamResult(cfg, int(host["n_tokens"]), N, T, host)
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
        expects[h] = {"sae": sae_content_hash(sae), "corpus": corpus_fp, "hook": h,
                      "cfg": repr(cfg), "batch_size": batch_size}
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
