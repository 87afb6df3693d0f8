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
- co-activation: the active features (largest ``coact_k`` codes) of the first ``coact_tokens``
  counted tokens, for :mod:`jsae.analysis.atlas.neighbours`.

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
        "n_tokens": np.zeros((), np.int32),
    }


PER_FEATURE = ("fires", "total", "max", "hist", "top_val", "top_ctx", "top_pos", "top_tok",
               "top_act", "band_exp", "band_count", "band_prio", "band_val", "band_ctx",
               "band_pos", "band_tok", "band_act")


def _windows(zt, tok_pad, b, t, left: int, W: int):
    """Windows of ``W`` tokens starting ``left`` before position ``t`` of context ``b``.

    ``zt [F, B, T]`` codes, ``tok_pad [B, T + W]`` tokens padded with -1 on both sides,
    ``b, t [F, M]`` -> (tokens [F, M, W] int32, codes [F, M, W] float16)."""
    F, B, T = zt.shape
    Tp = T + W
    z_pad = jnp.pad(zt, ((0, 0), (0, 0), (left, Tp - T - left))).reshape(F, B * Tp)
    j = jnp.arange(W, dtype=jnp.int32)
    flat = (b * Tp + t)[..., None] + j  # [F, M, W] in padded coordinates (t - left + left + j)
    acts = jnp.take_along_axis(z_pad, flat.reshape(F, -1), axis=1).reshape(flat.shape)
    toks = tok_pad.reshape(-1)[flat]
    return toks, acts.astype(jnp.float16)


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


def _take(x, sel):
    """``x [F, N, ...]`` at ``sel [F, ...idx]`` along axis 1."""
    F = x.shape[0]
    flat = sel.reshape(F, -1)
    out = jnp.take_along_axis(x.reshape(F, x.shape[1], -1), flat[..., None], axis=1)
    return out.reshape(*sel.shape, *x.shape[2:])


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def update_state(state: dict, z, tokens, mask, ctx0, *, cfg: StreamConfig) -> dict:
    """Merge one batch into the state. ``z [B, T, F]`` codes (>= 0), ``tokens [B, T]`` int32,
    ``mask [B, T]`` bool (positions that count), ``ctx0``: corpus index of context 0."""
    B, T, F = z.shape
    K, W, Q, S, H, left = cfg.top_k, cfg.window, cfg.bands, cfg.band_samples, cfg.hist_bins, cfg.left_
    z = jnp.where(mask[..., None], z.astype(jnp.float32), 0.0)
    zt = jnp.transpose(z, (2, 0, 1))  # [F, B, T]
    tok_pad = jnp.pad(tokens.astype(jnp.int32), ((0, 0), (left, W - left)), constant_values=-1)
    fires_bt = zt > 0
    new = dict(state)
    new["fires"] = state["fires"] + fires_bt.sum((1, 2), dtype=jnp.int32)
    new["total"] = state["total"] + zt.sum((1, 2))
    bmax = zt.max((1, 2))
    mx = jnp.maximum(state["max"], bmax)
    new["max"] = mx
    new["n_tokens"] = state["n_tokens"] + mask.sum(dtype=jnp.int32)

    # histogram of positive codes, log-spaced bins (scatter-add into [F, H], misses dropped)
    lo, hi = np.log10(cfg.hist_min), np.log10(cfg.hist_max)
    hb = jnp.floor((jnp.log10(jnp.maximum(zt, 1e-30)) - lo) * (H / (hi - lo)))
    hb = jnp.clip(hb, 0, H - 1).astype(jnp.int32)
    seg = jnp.where(fires_bt, jnp.arange(F, dtype=jnp.int32)[:, None, None] * H + hb, F * H)
    new["hist"] = state["hist"] + jax.ops.segment_sum(
        fires_bt.astype(jnp.int32).reshape(-1), seg.reshape(-1), num_segments=F * H + 1
    )[: F * H].reshape(F, H)

    # top-K contexts by the context maximum
    ctx_max = zt.max(2)  # [F, B]
    ctx_pos = jnp.argmax(zt, axis=2).astype(jnp.int32)
    bidx = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32), (F, B))
    wt, wa = _windows(zt, tok_pad, bidx, ctx_pos, left, W)
    vals = jnp.concatenate([state["top_val"], ctx_max], 1)
    _, i = jax.lax.top_k(vals, K)
    cand = {
        "top_val": vals,
        "top_ctx": jnp.concatenate([state["top_ctx"], jnp.where(ctx_max > 0, ctx0 + bidx, -1)], 1),
        "top_pos": jnp.concatenate([state["top_pos"], ctx_pos], 1),
        "top_tok": jnp.concatenate([state["top_tok"], wt], 1),
        "top_act": jnp.concatenate([state["top_act"], wa], 1),
    }
    for k, v in cand.items():
        new[k] = _take(v, i)

    # quantile bands over [0, 2^e): rebin the kept samples when the max grows, then merge
    had = state["max"] > 0
    e_new = jnp.where(mx > 0, band_exponent(mx), 0)
    d = jnp.clip(jnp.where(had, e_new - state["band_exp"], 0), 0, 30)  # doublings
    old_band = jnp.arange(Q, dtype=jnp.int32)[None, :] >> d[:, None]  # [F, Q]
    onehot = old_band[..., None] == jnp.arange(Q, dtype=jnp.int32)  # [F, Q_old, Q_new]
    count = jnp.sum(jnp.where(onehot, state["band_count"][..., None], 0), axis=1)
    old_b = jnp.where(state["band_prio"] != EMPTY_PRIO, old_band[..., None], Q).reshape(F, Q * S)

    gid = (ctx0 + jnp.arange(B, dtype=jnp.int32))[:, None] * T + jnp.arange(T, dtype=jnp.int32)
    prio_bt = jnp.broadcast_to(token_priority(gid).reshape(-1), (F, B * T))
    zf = zt.reshape(F, B * T)
    band_bt = jnp.where(zf > 0, band_index(zf, e_new[:, None], Q), Q)
    sel, valid, bcount = _bottom_per_band(band_bt, prio_bt, Q, S)
    count = count + bcount
    sb, st = sel // T, sel % T
    btok, bact = _windows(zt, tok_pad, sb.reshape(F, -1), st.reshape(F, -1), left, W)
    batch = {
        "b": jnp.where(valid, jnp.arange(Q, dtype=jnp.int32)[None, :, None], Q).reshape(F, -1),
        "band_prio": jnp.where(valid, _take(prio_bt, sel), EMPTY_PRIO).reshape(F, -1),
        "band_val": _take(zf, sel).reshape(F, -1),
        "band_ctx": (ctx0 + sb).reshape(F, -1),
        "band_pos": st.reshape(F, -1),
        "band_tok": btok,
        "band_act": bact,
    }
    pool = {"b": jnp.concatenate([old_b, batch["b"]], 1)}
    for k in ("band_prio", "band_val", "band_ctx", "band_pos", "band_tok", "band_act"):
        old = state[k].reshape(F, Q * S, *state[k].shape[3:])
        pool[k] = jnp.concatenate([old, batch[k]], 1)
    psel, pvalid, _ = _bottom_per_band(pool["b"], pool["band_prio"], Q, S)
    empty = {"band_prio": EMPTY_PRIO, "band_val": 0.0, "band_ctx": -1, "band_pos": 0,
             "band_tok": -1, "band_act": 0.0}
    for k, fill in empty.items():
        v = _take(pool[k], psel)
        m = pvalid.reshape(*pvalid.shape, *[1] * (v.ndim - 3))
        new[k] = jnp.where(m, v, jnp.asarray(fill, v.dtype))
    new["band_count"] = count
    new["band_exp"] = jnp.where(mx > 0, e_new, state["band_exp"])

    # co-activation sample: the active features of the first coact_tokens counted tokens
    C, ck = state["coact"].shape
    zr = z.reshape(B * T, F)
    cv, ci = jax.lax.top_k(zr, ck)
    ci = jnp.where(cv > 0, ci, -1).astype(jnp.int32)
    mflat = mask.reshape(-1)
    slot = state["coact_n"] + jnp.cumsum(mflat.astype(jnp.int32)) - 1
    slot = jnp.where(mflat, slot, C)  # out of range: dropped
    new["coact"] = state["coact"].at[slot].set(ci, mode="drop")
    new["coact_n"] = jnp.minimum(state["coact_n"] + mflat.sum(dtype=jnp.int32), C)
    return new


def _hash_arrays(h, arrays) -> None:
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())


def sae_fingerprint(sae) -> str:
    """Short hash of an SAE's spec, normalisation and parameters."""
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
    tmp = path.with_name(path.name + ".tmp.npz")
    host = {k: np.asarray(jax.device_get(v)) for k, v in state.items()}
    np.savez(tmp, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **host)
    tmp.replace(path)


def load_state(path: str | Path, expect: Mapping) -> tuple[dict, dict] | None:
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
    return state, meta


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


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def _encode_update(state, sae, acts, tokens, mask, ctx0, *, cfg):
    from jsae.sae.core import encode

    z = encode(sae, acts.astype(jnp.float32))
    return update_state(state, z, tokens, mask, ctx0, cfg=cfg)


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
    batch_size: int = 8,
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
    N, T = tokens.shape
    if mask.shape != tokens.shape:
        raise AtlasError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
    if N < cfg.top_k:
        raise AtlasError(f"the corpus has {N} contexts, fewer than the top-k ({cfg.top_k}): "
                         "give more tokens or a smaller top_k")
    if cfg.window > T:
        raise AtlasError(f"example window {cfg.window} is longer than the contexts ({T} tokens)")
    hooks = list(saes)
    corpus_fp = corpus_fingerprint(tokens, mask)
    states, expects, paths = {}, {}, {}
    start = 0
    for h in hooks:
        sae = saes[h]
        expects[h] = {"sae": sae_fingerprint(sae), "corpus": corpus_fp, "hook": h,
                      "cfg": repr(cfg), "batch_size": batch_size}
        st = init_state(sae.spec.d_sae, cfg)
        if state_dir is not None:
            paths[h] = Path(state_dir) / f"{h}.state.npz"
            got = load_state(paths[h], expects[h])
            if got is not None:
                st, meta = got
                start = meta["next_context"]
        states[h] = st
    placed = {h: _place(states[h], mesh, saes[h]) for h in hooks}
    states = {h: placed[h][0] for h in hooks}
    sae_dev = {h: placed[h][1] for h in hooks}
    harvester = Harvester(model, hooks, forward=forward)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(mask.sum()), initial=int(mask[:start].sum()), unit="tok",
                   desc="atlas", smoothing=0.1)
    done = 0
    try:
        for s in range(start, N, batch_size):
            tok, msk = tokens[s : s + batch_size], mask[s : s + batch_size]
            if tok.shape[0] < batch_size:  # one compiled shape: pad with masked-out rows
                pad = batch_size - tok.shape[0]
                tok = np.concatenate([tok, np.repeat(tok[-1:], pad, 0)])
                msk = np.concatenate([msk, np.zeros((pad, T), bool)])
            acts = harvester.activations(tok)
            tj, mj = jnp.asarray(tok), jnp.asarray(msk)
            for h in hooks:
                states[h] = _encode_update(states[h], sae_dev[h], acts[h][:batch_size], tj, mj,
                                           jnp.int32(s), cfg=cfg)
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


def stream_arrays(z_batches, cfg: StreamConfig = StreamConfig()) -> StreamResult:
    """The pass over precomputed codes: an iterable of ``(z [B, T, F], tokens, mask, ctx0)``
    (tests, and sources that already hold codes)."""
    state = None
    n_ctx, T = 0, 0
    for z, tok, msk, ctx0 in z_batches:
        if state is None:
            state = jax.device_put(init_state(z.shape[-1], cfg))
        T = z.shape[1]
        state = update_state(state, jnp.asarray(z), jnp.asarray(tok, jnp.int32),
                             jnp.asarray(msk, bool), jnp.int32(ctx0), cfg=cfg)
        n_ctx = max(n_ctx, int(ctx0) + z.shape[0])
    host = {k: np.asarray(v) for k, v in jax.device_get(state).items()}
    return StreamResult(cfg, int(host["n_tokens"]), n_ctx, T, host)
