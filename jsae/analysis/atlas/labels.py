"""Short automatic labels from the tokens a feature fires on (offline, no model needed), the
text of token ids, and cluster labels built from members' labels.

A feature's label lists the distinct tokens at the anchors of its top examples, heaviest first
(weight: the sum of the examples' values), e.g. ``San · Santa · Los``; when one token carries
almost all the weight, the most frequent next token is added in brackets (``study (of)``).
Byte-fallback tokens (``<0xC3>``, pieces of one UTF-8 character) are never shown as such: the
run of byte tokens around an anchor is decoded as UTF-8 (``<0xC3><0xA9>`` -> ``é``), and an
anchor whose run does not decode to text is left out of the label.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_strings(tokenizer, ids) -> dict[int, str]:
    """``id -> text`` of each token, with SentencePiece's leading ``▁`` as a space and byte
    tokens (``<0x0A>``) as their character when it is ASCII. Ids < 0 are skipped."""
    out = {}
    to_tok = getattr(tokenizer, "id_to_token", None)
    for i in sorted({int(i) for i in np.asarray(list(ids)).ravel() if int(i) >= 0}):
        s = to_tok(i) if to_tok is not None else None
        if s is None:
            s = tokenizer.decode([i])
        else:
            m = _BYTE.match(s)
            if m and int(m.group(1), 16) < 128:
                s = chr(int(m.group(1), 16))
            else:
                s = s.replace("▁", " ")
        out[i] = s
    return out


def _byte(s: str | None) -> int | None:
    m = _BYTE.match(s) if s else None
    return int(m.group(1), 16) if m else None


def _anchor_text(t: np.ndarray, a: int, token_str: dict[int, str]) -> str | None:
    """Text of token ``t[a]`` of a window; for a byte token, the UTF-8 decoding of the run of
    byte tokens around it (None when that run is not valid text, e.g. cut by the window)."""
    raw = token_str.get(int(t[a]), f"<{int(t[a])}>")
    if _byte(raw) is None:
        return raw
    lo, hi = a, a + 1
    while lo > 0 and t[lo - 1] >= 0 and _byte(token_str.get(int(t[lo - 1]))) is not None:
        lo -= 1
    while hi < len(t) and t[hi] >= 0 and _byte(token_str.get(int(t[hi]))) is not None:
        hi += 1
    data = bytes(_byte(token_str[int(i)]) for i in t[lo:hi])
    # the character holding the anchor's byte: decode up to each boundary around it
    start = a - lo
    for b0 in range(start, max(start - 4, -1), -1):  # a UTF-8 character is at most 4 bytes
        for b1 in range(start + 1, min(start + 4, len(data)) + 1):
            try:
                text = data[b0:b1].decode("utf-8")
            except UnicodeDecodeError:
                continue
            return text if text.strip() else None
    return None


def auto_label(tokens: np.ndarray, anchor: np.ndarray, values: np.ndarray, token_str: dict[int, str],
               n: int = 3) -> str:
    """Label of one feature from its top examples: ``tokens [K, W]``, ``anchor [K]``,
    ``values [K]`` (0 = empty slot)."""
    weight: Counter = Counter()
    nxt: Counter = Counter()
    for t, a, v in zip(tokens, anchor, values):
        if v <= 0 or t[a] < 0:
            continue
        raw = _anchor_text(t, a, token_str)
        if raw is None:  # a byte token that is no text on its own
            continue
        key = raw.strip().lower() or raw
        weight[key] += float(v)
        if a + 1 < len(t) and t[a + 1] >= 0 and _byte(token_str.get(int(t[a + 1]))) is None:
            nxt[(key, token_str.get(int(t[a + 1]), "").strip())] += 1
    if not weight:  # only byte tokens that are no text alone (e.g. half of a UTF-8 NBSP)
        fired = [(float(v), int(t[a])) for t, a, v in zip(tokens, anchor, values) if v > 0 and t[a] >= 0]
        if not fired:
            return ""
        tid = max(fired)[1]
        return token_str.get(tid, f"<{tid}>")
    shown = {}
    for t, a, v in zip(tokens, anchor, values):  # the casing of the heaviest example
        raw = _anchor_text(t, a, token_str) if v > 0 and t[a] >= 0 else None
        if raw is not None:
            shown.setdefault(raw.strip().lower() or raw, _visible(raw))
    total = sum(weight.values())
    top = weight.most_common(n)
    if top[0][1] >= 0.8 * total:
        follow = [(nx, c) for (k, nx), c in nxt.items() if k == top[0][0] and nx]
        label = shown[top[0][0]]
        if follow:
            nx, c = max(follow, key=lambda p: (p[1], p[0]))
            if c >= 2:
                label += f" ({nx})"
        return label
    return " · ".join(shown[k] for k, _ in top)


def _visible(s: str) -> str:
    t = s.strip()
    if t:
        return t
    return "⏎" if "\n" in s else "␣"


def auto_labels(top_tokens: np.ndarray, top_anchor: np.ndarray, top_value: np.ndarray,
                token_str: dict[int, str], n: int = 3) -> list[str]:
    """Labels of every feature (``[F, K, W]``, ``[F, K]``, ``[F, K]``); ``""`` for a feature
    that never fired."""
    return [auto_label(top_tokens[f], top_anchor[f], top_value[f], token_str, n)
            for f in range(len(top_tokens))]


def _words(label: str) -> set[str]:
    return {w.strip() for w in re.split(r"\s*·\s*|[()]", label) if w.strip()}


def cluster_labels(cluster: np.ndarray, labels: list[str], n: int = 3) -> dict[int, str]:
    """A label per cluster id (>= 0): the words of its members' labels that are frequent in the
    cluster and rare elsewhere (count in the cluster x log(labels / labels with the word)), so
    function words that label many features ("of", "the") do not name every cluster."""
    cluster = np.asarray(cluster)
    everywhere: Counter = Counter()
    for lab in labels:
        everywhere.update(_words(lab))
    total = max(len(labels), 1)
    out = {}
    for c in sorted({int(c) for c in cluster.tolist() if c >= 0}):
        words: Counter = Counter()
        for i in np.flatnonzero(cluster == c):
            words.update(_words(labels[i]))
        score = {w: k * np.log(1.0 + total / everywhere[w]) for w, k in words.items()}
        top = sorted(score, key=lambda w: (-score[w], w))[:n]
        out[c] = " · ".join(top) or f"cluster {c}"
    return out
