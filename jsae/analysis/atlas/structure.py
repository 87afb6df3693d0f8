"""How much structure an atlas shows, in three numbers a reader can compare across dictionaries.

A young dictionary's decoder directions are nearly orthogonal and its map is one blob whose
cluster labels are function words; a trained one has close neighbours and clusters named by
what they are about. :func:`structure` measures both from an :class:`AtlasData`:

- ``median_nn_cos``: the median, over live features, of the decoder cosine to the nearest other
  feature (the atlas's first decoder neighbour);
- ``clusters`` and ``content_clusters``: the map's clusters, and those whose label's leading word
  is a content word (alphabetic, three letters or more, not an English function word; None
  without scikit-learn, whose stop-word list this uses);
- ``live``: features that fired in the atlas pass.
"""

from __future__ import annotations

import re

import numpy as np

from jsae.analysis.atlas.types import AtlasData


def _function_words() -> frozenset[str] | None:
    """scikit-learn's English stop words (318, a kept list); None without the atlas extra (an
    atlas built with ``--map none`` needs no sklearn, and its figures must not fail at the end)."""
    try:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    except ImportError:
        return None
    return frozenset(ENGLISH_STOP_WORDS)


def is_content_word(word: str, function_words: frozenset[str] | None = None) -> bool:
    """An alphabetic word of three letters or more that is not an English function word."""
    w = word.strip().lower()
    stop = _function_words() if function_words is None else function_words
    if stop is None:
        from jsae.errors import require

        require("sklearn", "atlas", "telling content words from function words")
    return len(w) >= 3 and w.isalpha() and w not in stop


def label_words(label: str) -> list[str]:
    """The words of a cluster label ("war · battle · army"), most characteristic first."""
    return [w.strip() for w in re.split(r"\s*·\s*", label) if w.strip()]


def structure(data: AtlasData) -> dict:
    """``{"live", "median_nn_cos", "clusters", "content_clusters", "content_share"}`` of an
    atlas; ``median_nn_cos`` is None when it has no decoder neighbours."""
    live = np.asarray(data.density) > 0
    nn = np.zeros(0, np.float32)
    if data.cos_vals.ndim == 2 and data.cos_vals.shape[1]:
        nn = data.cos_vals[live, 0]
        nn = nn[np.isfinite(nn) & (data.cos_ids[live, 0] >= 0)]
    stop = _function_words()
    labels = list(data.cluster_labels.values())
    content = None if stop is None else sum(
        1 for lab in labels if (ws := label_words(lab)) and is_content_word(ws[0], stop))
    return {"live": int(live.sum()),
            "median_nn_cos": float(np.median(nn)) if len(nn) else None,
            "clusters": len(labels), "content_clusters": content,
            "content_share": content / len(labels) if labels and content is not None else None}


def describe(s: dict) -> str:
    """One line: the structure figures of :func:`structure`."""
    cos = "n/a" if s["median_nn_cos"] is None else f"{s['median_nn_cos']:.3f}"
    named = ("" if s["content_clusters"] is None else
             f", {s['content_clusters']} named by a content word")
    return f"structure: median nearest-neighbour decoder cosine {cos}; {s['clusters']} clusters{named}"
