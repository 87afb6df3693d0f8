"""``eval.at_tokens``: the token counts at which training evaluates held-out data, for scaling laws.

A list of token counts (``[65536, 262144, 1048576]``) or ``log:N`` (N points log-spaced from one
batch to the whole run). Each count becomes the first step whose tokens reach it
(``ceil(tokens / batch_size)``, at most the last step), so a point's recorded ``tokens`` is
``step * batch_size``, what the dictionary had actually seen.
"""

from __future__ import annotations

import math


def at_steps(at_tokens: list[int] | str | None, batch_size: int, total_steps: int) -> list[int]:
    """The sorted, distinct steps of ``at_tokens``; [] for None. ValueError (naming the value)
    for a bad spec: a count < 1 or past the run's tokens, or ``log:N`` with N < 2."""
    if at_tokens is None:
        return []
    total = total_steps * batch_size
    if isinstance(at_tokens, str):
        head, _, n = at_tokens.partition(":")
        if head != "log" or not n.strip().isdigit() or int(n) < 2:
            raise ValueError(f"{at_tokens!r} is neither a list of token counts nor 'log:N' "
                             "(N >= 2 log-spaced points)")
        n = int(n)
        lo, hi = math.log(batch_size), math.log(total)
        tokens = [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
    else:
        tokens = list(at_tokens)
        bad = [t for t in tokens if not 1 <= t <= total]
        if bad:
            raise ValueError(f"{bad[0]} is outside 1..{total:,} (the run's tokens: "
                             f"{total_steps} steps x batch {batch_size})")
    steps = {min(max(1, math.ceil(round(t, 6) / batch_size)), total_steps) for t in tokens}
    return sorted(steps)


__all__ = ["at_steps"]
