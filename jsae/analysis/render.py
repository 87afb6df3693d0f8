"""Text of token contexts with chosen tokens marked: «token» (plain) or ANSI colours (terminal)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ANSI_ON, ANSI_OFF = "\x1b[1;30;43m", "\x1b[0m"  # bold black on yellow
ANSI_SPAN_ON = "\x1b[4;1;33m"  # bold underlined yellow (monitor spans)
MARKS = {"plain": ("«", "»"), "ansi": (ANSI_ON, ANSI_OFF), "brackets": ("[[", "]]")}


def token_pieces(tokenizer, ids: Sequence[int], window: int = 8) -> list[str]:
    """The text each token contributes, such that ``"".join(pieces) == decode(ids)``.

    Decodes growing prefixes and takes differences, which keeps the spaces that decoding a
    lone SentencePiece token drops; special tokens (BOS, padding) give ``""``."""
    ids = [int(i) for i in ids]
    pieces = []
    for n in range(len(ids)):
        a = max(0, n - window)  # a few tokens of left context are enough, and keep this O(n)
        prev, cur = tokenizer.decode(ids[a:n]), tokenizer.decode(ids[a : n + 1])
        if cur.startswith(prev):
            pieces.append(cur[len(prev):])
        else:  # a multi-token character finished: attribute the rewrite to this token
            pieces.append(cur[len(_common_prefix(prev, cur)):])
    return pieces


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _clean(s: str) -> str:
    return s.replace("\r", "").replace("\n", "⏎").replace("\t", " ")


def render_snippet(tokenizer, ids: Sequence[int], position: int, *, left: int = 12, right: int = 4,
                   style: str = "plain") -> str:
    """One line: ``left`` tokens before ``ids[position]``, the token marked, ``right`` after."""
    on, off = MARKS[style]
    a, b = max(0, position - left), min(len(ids), position + right + 1)
    a0 = max(0, a - 4)  # decode with a little more left context so the first piece keeps its space
    pieces = token_pieces(tokenizer, ids[a0:b])[a - a0 :]
    k = position - a
    before, tok, after = "".join(pieces[:k]), pieces[k], "".join(pieces[k + 1 :])
    return f"{_clean(before)}{on}{_clean(tok)}{off}{_clean(after)}"


def render_snippets(tokenizer, contexts: np.ndarray, top, feature: int, *, n: int | None = None,
                    left: int = 12, right: int = 4, style: str = "plain", with_values: bool = True) -> list[str]:
    """The top-activating snippets of ``feature`` from a :class:`TopActivations` over ``contexts``,
    best first, each ``"  7.31  ... the Golden «Gate» Bridge ..."``."""
    lines = []
    for c, p, v in top.examples(feature)[: n or None]:
        s = render_snippet(tokenizer, contexts[c], p, left=left, right=right, style=style)
        lines.append(f"{v:7.2f}  {s}" if with_values else s)
    return lines


def highlight(pieces: Sequence[str], spans: Sequence[tuple[int, int]], *, style: str = "plain",
              labels: Sequence[str] | None = None) -> str:
    """Join token ``pieces`` with each ``[start, end)`` token span marked (``labels``, if given,
    follow each span as ``«text»[label]``)."""
    on, off = (ANSI_SPAN_ON, ANSI_OFF) if style == "ansi" else MARKS[style]
    out, t = [], 0
    order = sorted(range(len(spans)), key=lambda j: spans[j])
    for j in order:
        s, e = spans[j]
        if s < t:  # overlapping span (another feature): mark from where the last one ended
            s = t
            if s >= e:
                continue
        out.append("".join(pieces[t:s]))
        label = f"[{labels[j]}]" if labels else ""
        out.append(f"{on}{''.join(pieces[s:e])}{off}{label}")
        t = e
    out.append("".join(pieces[t:]))
    return "".join(out)
