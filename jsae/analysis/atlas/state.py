"""The state of the atlas's streaming pass and its algebra: one jitted update merges a batch.

For every feature ``f`` of a dictionary (``F`` features, state on the device, memory
``O(F * (K + Q * S) * W)``, never proportional to the corpus) the update keeps:

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
  most frequent partners in the sample become its candidates (:func:`set_candidates`), and
  from then on every later token adds to the exact co-activation count of each (feature,
  candidate) pair, beside every feature's count of active tokens. Jaccard scores of candidate
  pairs are therefore exact over the whole pass
  (:func:`jsae.analysis.atlas.neighbours.coactivation_from_pass`); a pair is missed only if it
  never co-fires among the sample's most frequent partners.

Everything is held in one :class:`AtlasState` pytree. Features are the leading axis of every
per-feature field, so the state may be sharded over ``mesh.model`` with the SAE's latents
(:meth:`AtlasState.shardings`). Saving and resuming it: ``persist.py``; the batch loop:
``stream.py``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array | np.ndarray
EMPTY_PRIO = np.uint32(0xFFFFFFFF)


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Sizes of the streaming pass (hashable: a static argument of the jitted update).

    Its ``repr`` is part of a saved pass's fingerprint (``persist.py``): renaming, reordering
    or adding a field makes every saved partial pass start over."""

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


def _per_feature():
    """A field whose leading axis is the features (sharded over ``mesh.model``)."""
    return struct.field(metadata={"per_feature": True})


@struct.dataclass
class AtlasState:
    """Everything the pass keeps for one dictionary: ``F`` features, ``K = top_k``,
    ``W = window``, ``Q = bands``, ``S = band_samples``, ``H = hist_bins``,
    ``C = coact_tokens``, ``k = min(coact_k, F)``, ``M = max(1, min(coact_candidates, F - 1))``
    (:class:`StreamConfig`). Leaves are device arrays during the pass, NumPy on the host after it.

    Examples (``top_*``, ``band_*``) are windows of ``W`` tokens whose anchor, the token that
    made the example, is at index ``cfg.left_``; tokens outside the context are ``-1``. Empty
    slots: ``top_ctx``/``band_ctx`` ``-1``, value 0, tokens ``-1``, ``band_prio`` ``EMPTY_PRIO``.
    The field names are those of a saved pass's arrays (``persist.py``): renaming one makes
    older saved passes unreadable."""

    fires: Array = _per_feature()  # [F] int32, counted tokens where the code is > 0
    total: Array = _per_feature()  # [F] float32, sum of the code over counted tokens
    max: Array = _per_feature()  # [F] float32, largest code so far (0: silent)
    hist: Array = _per_feature()  # [F, H] int32, positive codes per bin (cfg.hist_edges())
    top_val: Array = _per_feature()  # [F, K] float32, largest maxima of a context, descending
    top_ctx: Array = _per_feature()  # [F, K] int32, corpus index of each of those contexts
    top_pos: Array = _per_feature()  # [F, K] int32, position of the maximum in the context
    top_tok: Array = _per_feature()  # [F, K, W] int32, tokens of the window
    top_act: Array = _per_feature()  # [F, K, W] float16, the feature's code at each of them
    band_exp: Array = _per_feature()  # [F] int32, e: bands split [0, 2^e), 2^(e-1) <= max < 2^e
    band_count: Array = _per_feature()  # [F, Q] int32, counted tokens whose code fell in a band
    band_prio: Array = _per_feature()  # [F, Q, S] uint32, hash priority, ascending in a band
    band_val: Array = _per_feature()  # [F, Q, S] float32, the sample's code
    band_ctx: Array = _per_feature()  # [F, Q, S] int32, its context in the corpus
    band_pos: Array = _per_feature()  # [F, Q, S] int32, its position in the context
    band_tok: Array = _per_feature()  # [F, Q, S, W] int32, tokens of its window
    band_act: Array = _per_feature()  # [F, Q, S, W] float16, the feature's code at each
    coact: Array  # [C, k] int32, active features of the first C counted tokens (-1: none)
    coact_n: Array  # [] int32, rows of `coact` filled
    coact_cand: Array = _per_feature()  # [F, M] int32, each feature's partners (-1: none)
    coact_cnt: Array = _per_feature()  # [F, M] int32, tokens past the sample where the feature
    #                                    and coact_cand[f, m] are both active
    coact_fires: Array = _per_feature()  # [F] int32, counted tokens where the feature is active
    coact_ready: Array  # [] int32, 1 once the sample is full and coact_cand is set
    n_tokens: Array  # [] int32, counted tokens so far

    def arrays(self) -> dict[str, Array]:
        """``{field name: array}`` in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def per_feature(cls) -> tuple[str, ...]:
        """Fields whose leading axis is the features."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("per_feature"))

    def shardings(self, mesh) -> AtlasState:
        """Per-feature fields split over ``mesh.model`` (with the SAE's latents), the rest
        replicated: a pytree of ``NamedSharding`` for ``jax.device_put``."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from jsae.parallel import MODEL

        return AtlasState(**{f.name: NamedSharding(mesh, P(MODEL) if f.metadata.get("per_feature")
                                                   else P()) for f in dataclasses.fields(self)})


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


def n_candidates(cfg: StreamConfig, F: int) -> int:
    """``M``: co-activation partners counted per feature."""
    return max(1, min(cfg.coact_candidates, F - 1))


def init_state(d_sae: int, cfg: StreamConfig) -> AtlasState:
    """The empty pass (NumPy, on the host): also the template a saved pass must fit."""
    F, K, W, Q, S, H = d_sae, cfg.top_k, cfg.window, cfg.bands, cfg.band_samples, cfg.hist_bins
    M = n_candidates(cfg, F)
    return AtlasState(
        fires=np.zeros((F,), np.int32),
        total=np.zeros((F,), np.float32),
        max=np.zeros((F,), np.float32),
        hist=np.zeros((F, H), np.int32),
        top_val=np.zeros((F, K), np.float32),
        top_ctx=np.full((F, K), -1, np.int32),
        top_pos=np.zeros((F, K), np.int32),
        top_tok=np.full((F, K, W), -1, np.int32),
        top_act=np.zeros((F, K, W), np.float16),
        band_exp=np.zeros((F,), np.int32),
        band_count=np.zeros((F, Q), np.int32),
        band_prio=np.full((F, Q, S), EMPTY_PRIO, np.uint32),
        band_val=np.zeros((F, Q, S), np.float32),
        band_ctx=np.full((F, Q, S), -1, np.int32),
        band_pos=np.zeros((F, Q, S), np.int32),
        band_tok=np.full((F, Q, S, W), -1, np.int32),
        band_act=np.zeros((F, Q, S, W), np.float16),
        coact=np.full((cfg.coact_tokens, min(cfg.coact_k, F)), -1, np.int32),
        coact_n=np.zeros((), np.int32),
        coact_cand=np.full((F, M), -1, np.int32),
        coact_cnt=np.zeros((F, M), np.int32),
        coact_fires=np.zeros((F,), np.int32),
        coact_ready=np.zeros((), np.int32),
        n_tokens=np.zeros((), np.int32),
    )


@dataclasses.dataclass
class StreamResult:
    """The finished pass for one dictionary, on the host (rows = all ``d_sae`` features)."""

    cfg: StreamConfig
    n_tokens: int
    n_contexts: int
    context_length: int
    state: AtlasState  # NumPy leaves

    @property
    def density(self) -> np.ndarray:
        """``[F]`` float64: fraction of counted tokens where the code is > 0."""
        return self.state.fires.astype(np.float64) / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> np.ndarray:
        """``[F]`` float32: mean code over the tokens where it fires."""
        f = self.state.fires
        return (self.state.total / np.maximum(f, 1)).astype(np.float32)

    @property
    def band_edges(self) -> np.ndarray:
        """``[F, Q + 1]``: bands are ``[edges[q], edges[q+1])``; all zero for silent features."""
        s = self.state
        top = np.where(s.max > 0, np.ldexp(np.float32(1), s.band_exp), 0).astype(np.float32)
        return (top[:, None] * np.linspace(0, 1, self.cfg.bands + 1, dtype=np.float32)).astype(np.float32)

    def coact_rows(self) -> np.ndarray:
        """``[n, k]`` active features of the sampled tokens (-1 = none)."""
        return self.state.coact[: int(self.state.coact_n)]


# ---- one batch's contribution ---------------------------------------------------------------
class _Batch(NamedTuple):
    """What one batch of ``B`` contexts of ``T`` tokens adds, before it is merged."""

    fires: jax.Array  # [F] int32
    total: jax.Array  # [F] float32
    hist: jax.Array  # [F, H] int32
    ctx_max: jax.Array  # [F, B] float32, the feature's maximum in each context
    ctx_pos: jax.Array  # [F, B] int32, its first argmax (0 where the feature is silent)
    band_n: jax.Array  # [F, Q, S] int32, flat token index b * T + t of each band's S
    #                    lowest-priority tokens of the batch
    band_ok: jax.Array  # [F, Q, S] bool, which of those exist
    band_count: jax.Array  # [F, Q] int32, tokens of the batch in each band
    max: jax.Array  # [F] float32, the running max with this batch
    e_new: jax.Array  # [F] int32, its band exponent (0: silent)


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


def _batch_dense(z, old_max, prio_n, cfg: StreamConfig) -> _Batch:
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
    return _Batch(fires=fires.sum(1, dtype=jnp.int32), total=zf.sum(1), hist=hist,
                  ctx_max=zt.max(2), ctx_pos=jnp.argmax(zt, axis=2).astype(jnp.int32),
                  band_n=sel, band_ok=valid, band_count=count, max=mx, e_new=e_new)


def _batch_sparse(z, cv, ci, old_max, prio_n, cfg: StreamConfig) -> _Batch:
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
    return _Batch(fires=fires, total=total, hist=hist, ctx_max=cm, ctx_pos=cp,
                  band_n=n[es[jnp.clip(pos, 0, N * A - 1)]], band_ok=s < count[..., None],
                  band_count=count, max=mx, e_new=e_new)


# ---- the update -----------------------------------------------------------------------------
def active_width(cfg: StreamConfig, state: AtlasState, F: int) -> int:
    """How many of each token's largest codes the update reads: one more than the cap, so
    that a zero in the last column proves no token has more active features."""
    return int(min(max(cfg.sparse_cap, state.coact.shape[1]) + 1, F))


@partial(jax.jit, static_argnames=("A",))
def active_codes(z, A: int):
    """Each token's ``A`` largest codes ``(values, ids) [N, A]`` of ``z [..., F]``. A jit of
    its own: inside the big update XLA:CPU lowers ``top_k`` to a full sort, alone to its fast
    TopK call."""
    return jax.lax.top_k(z.reshape(-1, z.shape[-1]), A)


def update_state(state: AtlasState, z, tokens, mask, ctx0, *, cfg: StreamConfig) -> AtlasState:
    """Merge one batch into the state. ``z [B, T, F]`` codes (>= 0), ``tokens [B, T]`` int32,
    ``mask [B, T]`` bool (positions that count), ``ctx0``: corpus index of context 0.

    Each token's ``cfg.sparse_cap`` largest codes are taken first; when no token has more
    active features than that (TopK SAEs with k <= cap, always), every statistic is computed
    from those entries (cost ~ tokens x cap); otherwise from the dense codes (same results)."""
    cv, ci = active_codes(z, active_width(cfg, state, z.shape[-1]))
    return update_from_active(state, z, cv, ci, tokens, mask, ctx0, cfg=cfg)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def update_from_active(state: AtlasState, z, cv, ci, tokens, mask, ctx0, *,
                       cfg: StreamConfig) -> AtlasState:
    """:func:`update_state` given each token's largest codes ``(cv, ci) [B * T, A]``
    (:func:`active_codes` with ``A = active_width(...)``)."""
    B, T, F = z.shape
    K, W, Q, S, left = cfg.top_k, cfg.window, cfg.bands, cfg.band_samples, cfg.left_
    tokens = tokens.astype(jnp.int32)
    mflat = mask.reshape(-1)
    A = cv.shape[1]
    cv = jnp.where(mflat[:, None], cv, 0.0)
    sparse_ok = (A == F) | jnp.all(cv[:, -1] <= 0)
    z = jnp.where(mask[..., None], z.astype(jnp.float32), 0.0)
    had = state.max > 0
    gid = (ctx0 + jnp.arange(B, dtype=jnp.int32))[:, None] * T + jnp.arange(T, dtype=jnp.int32)
    prio_n = token_priority(gid).reshape(-1)  # [N]
    c = jax.lax.cond(sparse_ok, lambda: _batch_sparse(z, cv, ci, state.max, prio_n, cfg),
                     lambda: _batch_dense(z, state.max, prio_n, cfg))
    mx, e_new = c.max, c.e_new
    rows = jnp.arange(F, dtype=jnp.int32)[:, None]

    # top-K contexts: merge by value; windows gathered only for the winners from this batch
    vals = jnp.concatenate([state.top_val, c.ctx_max], 1)
    top_v, i = jax.lax.top_k(vals, K)
    from_batch = i >= K
    bi = jnp.clip(i - K, 0, B - 1)
    old_i = jnp.minimum(i, K - 1)
    pos_b = jnp.take_along_axis(c.ctx_pos, bi, 1)
    wt, wa = _gather_windows(z, tokens, bi, pos_b, left, W)
    fb = from_batch[..., None]
    top_ctx = jnp.where(from_batch, jnp.where(top_v > 0, ctx0 + bi, -1),
                        jnp.take_along_axis(state.top_ctx, old_i, 1))
    top_pos = jnp.where(from_batch, pos_b, jnp.take_along_axis(state.top_pos, old_i, 1))
    top_tok = jnp.where(fb, wt, jnp.take_along_axis(state.top_tok, old_i[..., None], 1))
    top_act = jnp.where(fb, wa, jnp.take_along_axis(state.top_act, old_i[..., None], 1))

    # quantile bands over [0, 2^e): rebin the kept samples when the max grows (old band q lies
    # inside new band q >> d), then keep the S lowest priorities of each band over old + new
    d = jnp.clip(jnp.where(had, e_new - state.band_exp, 0), 0, 30)  # doublings
    old_band = jnp.arange(Q, dtype=jnp.int32)[None, :] >> d[:, None]  # [F, Q]
    onehot = old_band[..., None] == jnp.arange(Q, dtype=jnp.int32)  # [F, Q_old, Q_new]
    count = jnp.sum(jnp.where(onehot, state.band_count[..., None], 0), axis=1)
    P = 2 * Q * S
    old_b = jnp.where(state.band_prio != EMPTY_PRIO, old_band[..., None], Q).reshape(F, Q * S)
    new_b = jnp.where(c.band_ok, jnp.arange(Q, dtype=jnp.int32)[None, :, None], Q).reshape(F, Q * S)
    bn = c.band_n.reshape(F, Q * S)
    pb = jnp.concatenate([old_b, new_b], 1)  # [F, P]
    pp = jnp.concatenate([state.band_prio.reshape(F, Q * S),
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

    def pick(old_field, new_v, fill):  # each kept slot from the old samples or the batch's
        old = old_field.reshape(F, Q * S, *old_field.shape[3:])
        old = jnp.take_along_axis(old, oi.reshape(F, Q * S, *[1] * (old.ndim - 2)), 1)
        m = from_new.reshape(F, Q * S, *[1] * (old.ndim - 2))
        f = filled.reshape(F, Q * S, *[1] * (old.ndim - 2))
        out = jnp.where(f, jnp.where(m, new_v.astype(old.dtype), old), jnp.asarray(fill, old.dtype))
        return out.reshape(old_field.shape)

    # co-activation sample: the active features of the first coact_tokens counted tokens
    C, ck = state.coact.shape
    cix = jnp.where(cv[:, :ck] > 0, ci[:, :ck], -1).astype(jnp.int32)
    cslot = state.coact_n + jnp.cumsum(mflat.astype(jnp.int32)) - 1
    cslot = jnp.where(mflat, cslot, C)  # out of range: dropped
    # ... and past the sample, the exact counts of each feature's candidate partners
    coact_fires, coact_cnt = _coact_count(state, cix, mflat, mflat & (cslot >= C))
    return AtlasState(
        fires=state.fires + c.fires,
        total=state.total + c.total,
        max=mx,
        hist=state.hist + c.hist,
        top_val=top_v,
        top_ctx=top_ctx,
        top_pos=top_pos,
        top_tok=top_tok,
        top_act=top_act,
        band_exp=jnp.where(mx > 0, e_new, state.band_exp),
        band_count=count + c.band_count,
        band_prio=pick(state.band_prio, prio_n[ni], EMPTY_PRIO),
        band_val=pick(state.band_val, new_val, 0.0),
        band_ctx=pick(state.band_ctx, ctx0 + nb, -1),
        band_pos=pick(state.band_pos, nt, 0),
        band_tok=pick(state.band_tok, wt, -1),
        band_act=pick(state.band_act, wa, 0.0),
        coact=state.coact.at[cslot].set(cix, mode="drop"),
        coact_n=jnp.minimum(state.coact_n + mflat.sum(dtype=jnp.int32), C),
        coact_cand=state.coact_cand,
        coact_cnt=coact_cnt,
        coact_fires=coact_fires,
        coact_ready=state.coact_ready,
        n_tokens=state.n_tokens + mask.sum(dtype=jnp.int32),
    )


def _coact_count(state: AtlasState, cix, counted, past_sample):
    """``(coact_fires, coact_cnt)`` after a batch: ``coact_fires`` += active features of
    ``counted`` tokens; once the candidates are set, ``coact_cnt[f, m]`` += tokens of
    ``past_sample`` where ``f`` and ``cand[f, m]`` are both active. ``cix [N, k]``: active ids
    (-1 none). Cost ``N k M log k``, no ``[F, F]``."""
    F, M = state.coact_cand.shape
    ok = (cix >= 0) & counted[:, None]
    fires = state.coact_fires.at[jnp.where(ok, cix, F)].add(1, mode="drop")

    def count():
        live = (cix >= 0) & past_sample[:, None]
        cand = state.coact_cand[jnp.clip(cix, 0, F - 1)]  # [N, k, M]
        srt = jnp.sort(jnp.where(cix >= 0, cix, F), axis=1)  # each token's active set, sorted
        q = cand.reshape(cand.shape[0], -1)
        at = jax.vmap(jnp.searchsorted)(srt, q)  # membership by binary search: N k M log k
        found = jnp.take_along_axis(srt, jnp.clip(at, 0, srt.shape[1] - 1), 1) == q
        hit = found.reshape(cand.shape) & (cand >= 0) & live[..., None]
        f = jnp.broadcast_to(jnp.where(live, cix, F)[..., None], hit.shape)
        m = jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), hit.shape)
        return state.coact_cnt.at[f, m].add(hit.astype(jnp.int32), mode="drop")

    cnt = jax.lax.cond(state.coact_ready > 0, count, lambda: state.coact_cnt)
    return fires, cnt


# ---- when the co-activation sample is full --------------------------------------------------
@partial(jax.jit, static_argnames=("ck",), donate_argnames=("state",))
def _boundary_count(state: AtlasState, cv, ci, mask, n_before, *, ck: int) -> AtlasState:
    """The batch that filled the sample, counted again for its tokens past the sample (the
    candidates were set after its update); ``coact_fires`` is already counted."""
    mflat = mask.reshape(-1)
    cix = jnp.where(cv[:, :ck] > 0, ci[:, :ck], -1).astype(jnp.int32)
    idx = n_before + jnp.cumsum(mflat.astype(jnp.int32)) - 1
    C = state.coact.shape[0]
    _, cnt = _coact_count(state, cix, jnp.zeros_like(mflat), mflat & (idx >= C))
    return state.replace(coact_cnt=cnt)


def set_candidates(state: AtlasState, z, mask, n_before: int, cfg: StreamConfig) -> AtlasState:
    """After the update of the batch that filled the sample (``z [B, T, F]`` its codes,
    ``mask [B, T]``, ``n_before`` counted tokens before it): each feature's candidate partners
    from the full sample (NumPy, on the host, once per pass), then that batch's tokens past the
    sample counted."""
    from jsae.analysis.atlas.neighbours import sample_candidates

    F, M = state.coact_cand.shape
    cand = sample_candidates(np.asarray(jax.device_get(state.coact)), F, M)
    state = state.replace(coact_cand=jax.device_put(cand, state.coact_cand.sharding),
                          coact_ready=jnp.ones((), jnp.int32))
    cv, ci = active_codes(z, active_width(cfg, state, F))
    return _boundary_count(state, cv, ci, jnp.asarray(mask), jnp.int32(n_before),
                           ck=state.coact.shape[1])
