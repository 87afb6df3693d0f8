"""Shuffle buffer: mixing, exactly-once per epoch, exact resume by replay."""

import json

import numpy as np
import pytest

from jsae.data.shuffle import ShuffleMixer


class Upstream:
    """Finite deterministic row stream in pushes of uneven sizes; position = push index."""

    def __init__(self, n_rows=5000, ctx=50, seed=0):
        rng = np.random.default_rng(seed)
        sizes = []
        total = 0
        while total < n_rows:
            s = int(min(rng.integers(1, 4) * ctx, n_rows - total))
            sizes.append(s)
            total += s
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)])

    def push_from(self, mixer, i):
        a, b = self.starts[i], self.starts[i + 1]
        ids = np.arange(a, b)
        mixer.push(
            {"a": ids.astype(np.int64), "b": (ids * 10).astype(np.float32)[:, None]}, {"push": i}
        )


def drain(mixer, up, batch, start_push=0, max_batches=None):
    """Pop batches, pushing upstream as needed. Returns (batches, states after each)."""
    batches, states = [], []
    i = start_push
    while max_batches is None or len(batches) < max_batches:
        b = mixer.pop(batch)
        if b is None:
            if i < len(up.sizes):
                up.push_from(mixer, i)
                i += 1
                continue
            if mixer._finished:
                break
            mixer.finish()
            continue
        batches.append(b)
        states.append(json.loads(json.dumps(mixer.state())))
    return batches, states


def test_every_row_exactly_once_and_aligned():
    up = Upstream(5000)
    m = ShuffleMixer(capacity=800, seed=3)
    batches, _ = drain(m, up, 64)
    ids = np.concatenate([b["a"] for b in batches])
    assert len(ids) == 5000
    assert np.array_equal(np.sort(ids), np.arange(5000))  # no loss, no duplicate
    for b in batches:  # hooks stay aligned row by row
        np.testing.assert_array_equal(b["b"][:, 0], b["a"] * 10)
    assert all(len(b["a"]) == 64 for b in batches[:-1])


def test_context_tokens_spread_across_batches():
    ctx = 50
    up = Upstream(20000, ctx=ctx)
    m = ShuffleMixer(capacity=4000, seed=0)
    batches, _ = drain(m, up, 100)
    ids = np.concatenate([b["a"] for b in batches])
    batch_of = np.empty(len(ids), int)
    batch_of[ids] = np.repeat(np.arange(len(batches)), [len(b["a"]) for b in batches])
    # tokens of one context (50 consecutive rows) land in many different batches
    spread = [len(np.unique(batch_of[c * ctx : (c + 1) * ctx])) for c in range(len(ids) // ctx)]
    assert np.median(spread) >= 15
    # and one batch draws from many contexts
    ctxs_per_batch = [len(np.unique(b["a"] // ctx)) for b in batches[:-1]]
    assert np.median(ctxs_per_batch) >= 50
    # consecutive tokens are not adjacent in the output
    assert np.mean(np.abs(np.diff(ids)) == 1) < 0.01


@pytest.mark.parametrize("stop_at", [0, 1, 5, 12, 13, 40, 77])
def test_resume_reproduces_exact_batches(stop_at):
    up = Upstream(5000, ctx=37)  # chunk boundaries fall inside pushes
    full, states = drain(ShuffleMixer(800, seed=7), up, 64)
    assert stop_at < len(full)
    assert any(s["replay"]["offset"] > 0 for s in states)  # replays start mid-push too
    m2 = ShuffleMixer(800, seed=7)
    replay = m2.restore(states[stop_at])
    assert m2.state() == states[stop_at]  # restored, nothing read yet: the same position
    start = 0 if replay is None else replay["pos"]["push"]
    rest, _ = drain(m2, up, 64, start_push=start)
    assert len(rest) == len(full) - stop_at - 1
    for a, b in zip(full[stop_at + 1 :], rest):
        np.testing.assert_array_equal(a["a"], b["a"])
        np.testing.assert_array_equal(a["b"], b["b"])


def test_resume_from_fresh_state_and_capacity_check():
    up = Upstream(1000)
    m = ShuffleMixer(200, seed=1)
    s0 = m.state()
    full, _ = drain(m, up, 32)
    m2 = ShuffleMixer(200, seed=1)
    assert m2.restore(s0) is None
    again, _ = drain(m2, up, 32)
    assert all(np.array_equal(a["a"], b["a"]) for a, b in zip(full, again))
    with pytest.raises(ValueError, match="capacity"):
        ShuffleMixer(400).restore(s0)
