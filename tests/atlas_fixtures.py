"""Random but plausible :class:`AtlasData` for the atlas site tests (no LM, no SAE needed).

Each feature has a *theme* token: its top examples are anchored on that token (with a few
strays), activations decay around the anchor, features sit in Gaussian blobs on the map (one
blob per cluster) and a few are dead (NaN position, no examples). The vocabulary mixes plain
words with nasty strings: HTML, quotes, newlines, tabs, SentencePiece's "▁", byte tokens,
control characters and a lone surrogate.
"""

from __future__ import annotations

import numpy as np

from jsae.analysis.atlas.types import AtlasData, LocalMap

WORDS = (
    "the of and to in is was for on that with as by at from his her an which or are were be "
    "this has had it not but their also its first after new one two who have been city war "
    "music river bridge golden gate state king church film song team party law science water "
    "island mountain school language fluid study marked senate novel poet painter theory "
    "energy light animal plant cell blood heart brain ocean forest desert winter summer night "
    "money trade market bank price tax oil gas coal iron gold silver stone glass wood paper"
).split()
NASTY = [
    "<script>window.__xss=1</script>", "<img src=x onerror=window.__xss=1>", '"quoted"',
    "it's", "a&amp;b", "\n", "\n\n", "\t", " ", "▁the", "▁Golden", "<0x0A>", "\x00", "\x1b[1m",
    "\u2028", "\ud800", "}</style>", "${x}", "\\", "日本", "😀", "&lt;tag&gt;", "<0xC2>", "<0xA0>",
]


def random_atlas_data(n_features: int = 300, seed: int = 0, *, k: int = 8, q: int = 4, s: int = 3,
                      w: int = 16, h: int = 24, n_logits: int = 6, n_neighbours: int = 6,
                      n_clusters: int = 6, dead_fraction: float = 0.04, d_sae: int | None = None,
                      n_local_maps: int = 1, explanations: bool = True) -> AtlasData:
    """An atlas of ``n_features`` features with ids ``0, 2, 4, ...`` (not contiguous on purpose,
    so code that confuses ids with rows fails) out of ``d_sae`` (default ``2 * n_features``)."""
    rng = np.random.default_rng(seed)
    vocab = [(" " + t) if i % 3 else t for i, t in enumerate(WORDS)] + NASTY
    V = len(vocab)
    token_str = dict(enumerate(vocab))
    F = n_features
    ids = np.arange(F, dtype=np.int64) * 2
    dead = rng.random(F) < dead_fraction
    dead[:3] = False  # the first few are always alive (tests look at them)

    theme = rng.integers(0, len(WORDS), F)
    n_nasty = min(F, len(NASTY))
    theme[:n_nasty] = len(WORDS) + np.arange(n_nasty)  # the nasty tokens are themes too
    max_act = rng.lognormal(0.5, 0.5, F).astype(np.float32)
    top_value = np.sort(rng.uniform(0.2, 1.0, (F, k)), axis=1)[:, ::-1] * max_act[:, None]
    top_value[:, 0] = max_act
    top_value = top_value.astype(np.float32)

    def windows(values):  # [..] peak values -> tokens, acts, anchor
        shape = values.shape
        toks = rng.integers(0, len(WORDS), shape + (w,)).astype(np.int32)
        anchor = rng.integers(min(2, w - 1), max(w - 2, min(2, w - 1) + 1), shape).astype(np.int32)
        is_theme = rng.random(shape) < 0.85
        peak_tok = np.where(is_theme, theme.reshape((F,) + (1,) * (len(shape) - 1)),
                            rng.integers(0, V, shape))
        np.put_along_axis(toks, anchor[..., None], peak_tok[..., None].astype(np.int32), -1)
        dist = np.abs(np.arange(w) - anchor[..., None])
        acts = values[..., None] * np.exp(-dist) * (rng.random(shape + (w,)) < 0.6)
        np.put_along_axis(acts, anchor[..., None], values[..., None], -1)
        pad = rng.integers(0, min(3, w // 4 + 1), shape)  # some windows start at the context's beginning
        left = np.arange(w) < pad[..., None]
        toks[left] = -1
        acts[left] = 0
        return toks, acts.astype(np.float16), anchor

    top_tokens, top_acts, top_anchor = windows(top_value)
    band_edges = (np.linspace(0, 1, q + 1)[None, :] * max_act[:, None]).astype(np.float32)
    lo, hi = band_edges[:, :-1, None], band_edges[:, 1:, None]
    band_value = (lo + (hi - lo) * rng.uniform(0.05, 0.95, (F, q, s))).astype(np.float32)
    band_tokens, band_acts, band_anchor = windows(band_value)
    band_count = rng.integers(1, 5000, (F, q)).astype(np.int64)
    density = rng.lognormal(-6, 1.5, F).clip(1e-7, 0.5)
    hist_edges = np.geomspace(1e-3, float(max_act.max()) * 1.01, h + 1).astype(np.float32)
    hist_counts = rng.poisson(rng.uniform(5, 300, (F, 1)) * np.exp(-((np.arange(h) - h * 0.6) / 5) ** 2))

    # Dead features: nothing fired.
    for a in (top_value, band_value, density, max_act):
        a[dead] = 0
    top_tokens[dead], band_tokens[dead] = -1, -1
    top_acts[dead], band_acts[dead] = 0, 0
    hist_counts[dead], band_count[dead] = 0, 0
    mean_act = (max_act * rng.uniform(0.2, 0.5, F)).astype(np.float32)

    logit_top_ids = rng.integers(0, V, (F, n_logits)).astype(np.int32)
    logit_top_vals = np.sort(rng.uniform(0.1, 2, (F, n_logits)), 1)[:, ::-1].astype(np.float32)
    logit_bottom_ids = rng.integers(0, V, (F, n_logits)).astype(np.int32)
    logit_bottom_vals = -np.sort(rng.uniform(0.1, 2, (F, n_logits)), 1)[:, ::-1].astype(np.float32)

    cluster = rng.integers(0, n_clusters, F).astype(np.int64)
    cluster[rng.random(F) < 0.1] = -1
    centers = rng.normal(0, 6, (n_clusters, 2))
    map_xy = (np.where(cluster[:, None] >= 0, centers[cluster.clip(0)], 0)
              + rng.normal(0, 1, (F, 2))).astype(np.float32)
    map_xy[dead] = np.nan
    cluster[dead] = -1
    cluster_labels = {c: f"cluster {c}: {WORDS[(7 * c) % len(WORDS)]}" for c in range(n_clusters)}

    def neighbours():
        rows = rng.integers(1, F, (F, n_neighbours))
        nid = ids[(np.arange(F)[:, None] + rows) % F]  # never the feature itself
        vals = np.sort(rng.uniform(0.1, 0.9, (F, n_neighbours)), 1)[:, ::-1].astype(np.float32)
        nid[:, -1:][rng.random((F, 1)) < 0.2] = -1  # some lists are short
        return nid.astype(np.int64), vals

    cos_ids, cos_vals = neighbours()
    coact_ids, coact_vals = neighbours()
    labels = ["(dead)" if dead[i] else f"{vocab[theme[i]].strip() or repr(vocab[theme[i]])} #{i}"
              for i in range(F)]
    expl = None
    scores = None
    if explanations:
        expl = [None if (dead[i] or i % 3) else f"Fires on the word {vocab[theme[i]]!r} and its <kin> & co."
                for i in range(F)]
        scores = np.where([e is not None for e in expl], rng.uniform(0.5, 1, F), np.nan).astype(np.float32)

    local_maps = []
    for j in range(n_local_maps):
        c = int(ids[j])
        m = np.concatenate([[c], rng.choice(ids[1:], min(F - 1, 40), replace=False)])
        m = np.unique(m)
        m = np.concatenate([[c], m[m != c]])
        lc = rng.integers(-1, 3, len(m)).astype(np.int64)
        local_maps.append(LocalMap(center=c, radius=0.3, ids=m.astype(np.int64),
                                   xy=rng.normal(0, 1, (len(m), 2)).astype(np.float32), cluster=lc,
                                   cluster_labels={i: f"local {i}" for i in range(3)}))

    meta = {
        "run": "runs/my quickstart", "hook": "blocks.6.hook_resid_post", "model": "gemma-3-270m",
        "d_sae": int(d_sae or 2 * F), "d_in": 640, "n_tokens": 1_000_000, "n_contexts": 7812,
        "context_length": 128, "source": "text", "logit_method": "W_dec @ W_U (final norm's scale)",
        "created": "2026-12-02T07:00:00Z",
    }
    return AtlasData(
        meta=meta, feature_ids=ids, density=density, mean_act=mean_act, max_act=max_act,
        hist_edges=hist_edges, hist_counts=hist_counts.astype(np.int64), top_value=top_value,
        top_tokens=top_tokens, top_acts=top_acts, top_anchor=top_anchor, band_edges=band_edges,
        band_value=band_value, band_tokens=band_tokens, band_acts=band_acts, band_anchor=band_anchor,
        band_count=band_count, logit_top_ids=logit_top_ids, logit_top_vals=logit_top_vals,
        logit_bottom_ids=logit_bottom_ids, logit_bottom_vals=logit_bottom_vals, cos_ids=cos_ids,
        cos_vals=cos_vals, coact_ids=coact_ids, coact_vals=coact_vals, map_xy=map_xy,
        cluster=cluster, cluster_labels=cluster_labels, labels=labels, token_str=token_str,
        explanations=expl, explanation_scores=scores, local_maps=local_maps,
    )
