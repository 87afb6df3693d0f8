"""Monitoring: where chosen features fire on incoming text.

The core is pure and jit-friendly: :func:`firing` turns activations ``[B, T, d_model]`` into
``(fires [B, T, K] bool, codes [B, T, K])`` for K features and thresholds, and
:func:`span_edges` marks where each run of firing tokens starts and ends, so it can sit inside a
jitted serving step. :func:`scan` runs a model over texts and returns the spans on the host, and
:func:`render` prints a text with them highlighted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae.core import SAE
from jsae.steering import _as_features, _as_values, feature_codes

Array = jax.Array


def firing(sae: SAE, acts: Array, features: Array, thresholds: Array, mask: Array | None = None
           ) -> tuple[Array, Array]:
    """``(fires, codes)``: ``codes [..., K]`` of ``features [K]`` and ``fires = codes > thresholds``
    (and ``mask [...]`` where given). Pure; safe under ``jax.jit``."""
    codes = feature_codes(sae, acts, jnp.asarray(features, jnp.int32))
    fires = codes > jnp.asarray(thresholds, codes.dtype)
    if mask is not None:
        fires = fires & jnp.asarray(mask, bool)[..., None]
    return fires, codes


def span_edges(fires: Array) -> tuple[Array, Array]:
    """``(starts, ends)`` for ``fires [B, T, K]`` (time on axis 1): ``starts`` is true on the
    first token of each run of firing tokens, ``ends`` on its last token. Pure."""
    f = jnp.asarray(fires, bool)
    pad = jnp.zeros_like(f[:, :1])
    prev = jnp.concatenate([pad, f[:, :-1]], axis=1)
    nxt = jnp.concatenate([f[:, 1:], pad], axis=1)
    return f & ~prev, f & ~nxt


def runs(fires_1d: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` token spans (end exclusive) of a 1-D boolean array."""
    f = np.concatenate([[False], np.asarray(fires_1d, bool), [False]])
    d = np.diff(f.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


@dataclasses.dataclass
class Span:
    """A run of tokens ``[start, end)`` of text ``text_index`` where ``feature`` fired;
    ``peak`` is its largest code there, ``text`` the covered text, ``char_start/char_end`` its
    offsets in the decoded token text."""

    text_index: int
    feature: int
    start: int
    end: int
    peak: float
    text: str
    char_start: int
    char_end: int


@dataclasses.dataclass
class ScanResult:
    """Per text: ``ids`` (token ids, BOS first), ``pieces`` (text of each token), ``codes
    [T, K]``, and the ``spans`` where each feature fired."""

    features: np.ndarray
    thresholds: np.ndarray
    ids: list[np.ndarray]
    pieces: list[list[str]]
    codes: list[np.ndarray]
    spans: list[list[Span]]


@jax.jit
def _scan_batch(sae, acts, features, thresholds, mask):
    fires, codes = firing(sae, acts, features, thresholds, mask)
    return fires, codes


def scan(model, sae: SAE, hook: str, texts: Sequence[str] | str, features, thresholds=0.0, *,
         batch_size: int = 8, forward=None) -> ScanResult:
    """Run ``model`` over ``texts`` and return where each of ``features`` fires above its
    threshold (BOS and padding never count)."""
    from jsae.analysis.render import token_pieces
    from jsae.analysis.top import hook_activations

    if isinstance(texts, str):
        texts = [texts]
    feats = _as_features(sae, features)
    thr = _as_values(thresholds, int(feats.shape[0]), "thresholds")
    tok = model.tokenizer
    all_ids = tok.encode_batch(list(texts)) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    out = ScanResult(np.asarray(feats), np.asarray(thr), [], [], [], [])
    special = {tok.bos_id, tok.pad_id, tok.eos_id} - {None}
    for b in range(0, len(texts), batch_size):
        chunk = all_ids[b : b + batch_size]
        T = max(len(x) for x in chunk)
        ids = np.full((len(chunk), T), tok.pad_id or 0, np.int32)
        valid = np.zeros((len(chunk), T), bool)
        for i, x in enumerate(chunk):
            ids[i, : len(x)] = x  # right padding: causal attention keeps real tokens exact
            valid[i, : len(x)] = True
        mask = valid & ~np.isin(ids, list(special))
        acts = hook_activations(model, hook, ids, forward=forward)
        fires, codes = jax.device_get(_scan_batch(sae, acts, feats, thr, jnp.asarray(mask)))
        for i, x in enumerate(chunk):
            n, ti = len(x), b + i
            pieces = token_pieces(tok, x)
            offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
            spans = []
            for j, f in enumerate(out.features):
                for s, e in runs(fires[i, :n, j]):
                    spans.append(Span(ti, int(f), s, e, float(codes[i, s:e, j].max()),
                                      "".join(pieces[s:e]), int(offsets[s]), int(offsets[e])))
            spans.sort(key=lambda sp: (sp.start, sp.feature))
            out.ids.append(np.asarray(x))
            out.pieces.append(pieces)
            out.codes.append(np.asarray(codes[i, :n]))
            out.spans.append(spans)
    return out


def render(result: ScanResult, index: int = 0, *, style: str = "plain") -> str:
    """Text ``index`` with firing tokens marked and labelled with the features firing there:
    ``the «Golden Gate»[f123] «Bridge»[f123,f7]`` (runs of tokens with the same set of
    features form one mark)."""
    from jsae.analysis.render import highlight

    n = len(result.pieces[index])
    active: list[tuple[int, ...]] = [()] * n
    for sp in result.spans[index]:
        for t in range(sp.start, sp.end):
            active[t] = tuple(sorted({*active[t], sp.feature}))
    marks, labels, t = [], [], 0
    while t < n:
        if active[t]:
            s = t
            while t < n and active[t] == active[s]:
                t += 1
            marks.append((s, t))
            labels.append(",".join(f"f{f}" for f in active[s]))
        else:
            t += 1
    return highlight(result.pieces[index], marks, style=style, labels=labels)


__all__ = ["ScanResult", "Span", "firing", "render", "runs", "scan", "span_edges"]
