"""Shuffle buffer: mixes activation rows across many contexts before batching.

Rows (one per token, aligned across hooks: row i of every hook is the same token) arrive in
data order, a context's tokens together. The mixer cuts the stream into *chunks* of
``K = capacity // 2`` rows and emits *rounds*:

    round r = permute( carry[r-1]  +  now[r] ),   (now[r], carry[r]) = random halves of chunk r

so each output round mixes two consecutive chunks (``capacity`` rows of data), a token waits
at most one round, and every row is emitted exactly once (the last round of a finite stream
also flushes the carry). Permutations come from ``numpy.random.default_rng([seed, r])``.

Exact resume by replay (chosen over saving the buffer, which is ``capacity x d x hooks``
floats and would not fit the JSON-able ``state()`` of an ActivationSource): ``state()`` holds
the round number, the rows already emitted from it, and the upstream position where chunk
``r - 1`` began. ``restore()`` + re-pushing the upstream from that position rebuilds
``carry[r-1]`` and round ``r`` bit for bit (as long as the upstream replays the same rows, which
a deterministic harvest does), then skips the emitted rows. Cost of a resume: re-reading at most
``capacity`` rows (one LM pass over ~capacity tokens for the text source).

Upstream positions are opaque JSON values given with each ``push``; the position of a row is
``(pos of its push, row offset within that push)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Rows = dict[str, np.ndarray]


def _n(rows: Rows) -> int:
    return len(next(iter(rows.values()))) if rows else 0


def _cat(parts: list[Rows]) -> Rows:
    parts = [p for p in parts if p and _n(p) > 0]
    if not parts:
        return {}
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _take(rows: Rows, idx) -> Rows:
    return {k: v[idx] for k, v in rows.items()}


class ShuffleMixer:
    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 2:
            raise ValueError("shuffle capacity must be >= 2 rows")
        self.capacity = int(capacity)
        self.K = self.capacity // 2
        self.seed = int(seed)
        self._reset()

    def _reset(self) -> None:
        self._segs: list[list] = []  # [rows, pos, offset of rows[0] within its push]
        self._n_pending = 0
        self._carry: Rows = {}
        self._queue: list[list] = []  # formed rounds not fully emitted: [round, rows, emitted]
        self._round = -1  # last formed round
        self._finished = False
        self._chunk_start: dict | None = None  # start of the chunk being accumulated
        self._chunk_starts: dict[int, dict | None] = {}  # round -> start of its chunk
        self._skip_rows = 0  # restore: rows to drop from the next pushes
        self._discard_round: int | None = None  # restore: rebuild only the carry of this round
        self._resume: tuple[int, int] | None = None  # restore: (round, rows already emitted)
        self._restored: dict | None = None  # restore: the state itself, until a row is emitted

    # ---- input ----------------------------------------------------------------------
    def push(self, rows: Rows, pos: Any) -> None:
        n = _n(rows)
        off = 0
        if self._skip_rows:
            off = min(self._skip_rows, n)
            self._skip_rows -= off
            rows = _take(rows, slice(off, None))
            n -= off
        if n == 0:
            return
        if self._n_pending == 0:
            self._chunk_start = {"pos": pos, "offset": off}
        self._segs.append([rows, pos, off])
        self._n_pending += n

    def finish(self) -> None:
        """The upstream is exhausted: the remaining rows are emitted in the final round."""
        self._finished = True

    # ---- rounds ---------------------------------------------------------------------
    def _take_chunk(self, k: int) -> list[Rows]:
        """The next ``k`` pending rows, as a list of pieces (no copy yet)."""
        parts, need = [], k
        while need > 0:
            rows, pos, off = self._segs[0]
            m = _n(rows)
            if m <= need:
                parts.append(rows)
                self._segs.pop(0)
                need -= m
            else:
                parts.append(_take(rows, slice(0, need)))
                self._segs[0] = [_take(rows, slice(need, None)), pos, off + need]
                need = 0
        self._n_pending -= k
        self._chunk_start = (
            {"pos": self._segs[0][1], "offset": self._segs[0][2]} if self._segs else None
        )
        return parts

    def _form_round(self) -> bool:
        """Form the next round if possible; False if more input is needed or all is done."""
        start = self._chunk_start
        if self._n_pending >= self.K:
            m, final = self.K, False
        elif self._finished and (self._n_pending > 0 or _n(self._carry) > 0):
            m, final = self._n_pending, True
        else:
            return False
        parts = self._take_chunk(m) if m else []
        r = self._round + 1
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, r, 0x5FF1E])
        # pool = [carry of the previous round | this chunk]; two gathers, no other copy:
        # out = permute(carry_prev + now), carry = the other half of the chunk.
        c = _n(self._carry)
        pool = _cat([self._carry, *parts])
        if final:
            now_idx, carry_idx = np.arange(m), np.arange(0)
        else:
            perm = rng.permutation(m)
            now_idx, carry_idx = perm[: m // 2], perm[m // 2 :]
        out_idx = np.concatenate([np.arange(c), c + now_idx])
        out_idx = out_idx[rng.permutation(len(out_idx))]
        carry = _take(pool, c + carry_idx) if len(carry_idx) else {}
        discard = self._discard_round == r
        out = _take(pool, out_idx) if (len(out_idx) and not discard) else {}
        del pool
        self._carry = carry
        self._round = r
        self._chunk_starts[r] = start
        if discard:  # restore: only the carry of this round was needed
            self._discard_round = None
            return True
        emitted = 0
        if self._resume is not None and self._resume[0] == r:
            emitted, self._resume = self._resume[1], None
        if _n(out) > emitted:
            self._queue.append([r, out, emitted])
        return True

    def available(self) -> int:
        return sum(_n(rows) - e for _, rows, e in self._queue)

    def pop(self, n: int) -> Rows | None:
        """``n`` mixed rows; None if more input must be pushed first (or, once finished,
        nothing is left). After ``finish()`` the last batch may be shorter than ``n``."""
        while self.available() < n:
            if not self._form_round():
                if self._finished and self.available() > 0:
                    break
                return None
        parts, need = [], n
        while need > 0 and self._queue:
            item = self._queue[0]
            _, rows, e = item
            k = min(need, _n(rows) - e)
            parts.append(_take(rows, slice(e, e + k)))
            item[2] += k
            need -= k
            if item[2] >= _n(rows):
                self._queue.pop(0)
        front = self._queue[0][0] if self._queue else self._round + 1
        for r in [r for r in self._chunk_starts if r < front - 1]:
            del self._chunk_starts[r]  # only the chunk before the front round is ever replayed
        out = _cat(parts)
        self._restored = None
        return {key: np.ascontiguousarray(v) for key, v in out.items()}

    # ---- resume ---------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able position: the first round with rows not yet emitted, how many of its
        rows were emitted, and the upstream position to replay from to rebuild it."""
        if self._restored is not None:  # nothing emitted since restore(): same position
            return dict(self._restored)
        if self._queue:
            front, emitted = self._queue[0][0], self._queue[0][2]
        else:
            front, emitted = self._round + 1, 0
        if front == 0:
            replay = self._chunk_starts.get(0, self._chunk_start)
        else:
            replay = self._chunk_starts[front - 1]
        return {
            "round": int(front),
            "emitted": int(emitted),
            "replay": replay,
            "seed": self.seed,
            "capacity": self.capacity,
        }

    def restore(self, state: dict) -> Any:
        """Prepare to replay; returns ``{"pos", "offset"}`` (or None: from the very start).

        The caller then pushes rows from upstream position ``pos`` on, exactly as it did the
        first time; the mixer drops the first ``offset`` rows itself."""
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"shuffle capacity changed ({state['capacity']} -> {self.capacity}); "
                "cannot resume exactly"
            )
        self.seed = int(state["seed"])
        self._reset()
        r = int(state["round"])
        replay = state["replay"]
        self._round = r - 2 if r >= 1 else -1
        if r >= 1:
            self._discard_round = r - 1
        self._resume = (r, int(state["emitted"]))
        self._restored = dict(state)
        if replay is not None:
            self._skip_rows = int(replay["offset"])
        return replay
