"""Atlas neighbourhoods against dense NumPy: decoder-cosine top-n (blocked, ties to the lower
id), features within a radius, Jaccard co-activation."""

from __future__ import annotations

import numpy as np

from jsae.analysis.atlas.neighbours import (
    coactivation_neighbours,
    decoder_neighbours,
    features_within,
)


def _dense(W, n, ok=None):
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    cos = (U.astype(np.float64) @ U.T.astype(np.float64))
    np.fill_diagonal(cos, -np.inf)
    if ok is not None:
        cos[:, ~ok] = -np.inf
    order = np.argsort(-cos, axis=1, kind="stable")[:, :n]
    return order, np.take_along_axis(cos, order, 1)


def test_decoder_neighbours_equal_dense_topk():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(203, 16)).astype(np.float32)
    W[150] = W[20] * 2.0  # same direction: cosine 1, and ties for everyone else
    W[151] = W[20]
    ids, vals = decoder_neighbours(W, 7, row_block=32, col_block=48)  # ragged blocks on both axes
    ref_i, ref_v = _dense(W, 7)
    np.testing.assert_allclose(vals, ref_v, atol=2e-6)
    gaps = np.abs(np.diff(ref_v, axis=1)) > 1e-5  # where the order is not a near-tie
    same = ids == ref_i
    assert same[:, 0][gaps[:, 0]].all() and same.mean() > 0.99
    assert list(ids[20, :2]) == [150, 151] and list(ids[151, :2]) == [20, 150]
    for f in range(len(W)):  # a feature with equal cosine to 20, 150, 151 lists them in id order
        pos = [list(ids[f]).index(g) for g in (20, 150, 151) if g in ids[f] and g != f]
        assert pos == sorted(pos)


def test_candidates_and_subset_rows():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(64, 8)).astype(np.float32)
    ok = rng.random(64) < 0.5
    ids, vals = decoder_neighbours(W, 5, features=[3, 10, 40], candidates=ok, row_block=2,
                                   col_block=16)
    ref_i, ref_v = _dense(W, 5, ok)
    np.testing.assert_array_equal(ids, ref_i[[3, 10, 40]])
    np.testing.assert_allclose(vals, ref_v[[3, 10, 40]], atol=2e-6)
    assert ok[ids].all()


def test_features_within_radius():
    rng = np.random.default_rng(2)
    W = rng.normal(size=(300, 4)).astype(np.float32)
    ids, cos = features_within(W, 17, 0.2)
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    ref = np.flatnonzero(1 - U @ U[17] <= 0.2)
    assert ids[0] == 17 and set(ids) == set(ref) and len(ids) > 5
    assert np.all(np.diff(cos[1:]) <= 1e-7)


def test_coactivation_jaccard_equals_dense():
    rng = np.random.default_rng(3)
    F, n_tok = 30, 400
    fires = rng.random((n_tok, F)) < rng.uniform(0.01, 0.3, F)
    fires[:, 5] = fires[:, 4]  # 4 and 5 always fire together: Jaccard 1
    rows = np.full((n_tok, F), -1, np.int64)
    for t in range(n_tok):
        on = np.flatnonzero(fires[t])
        rows[t, : len(on)] = rng.permutation(on)
    ids, vals = coactivation_neighbours(rows, F, 6, min_count=1)
    A = fires.astype(np.float64)
    both = A.T @ A
    cnt = A.sum(0)
    J = both / (cnt[:, None] + cnt[None, :] - both)
    np.fill_diagonal(J, -1)
    J[both < 1] = -1
    for f in range(F):
        order = np.lexsort((np.arange(F), -J[f]))[:6]
        order = order[J[f, order] >= 0]
        np.testing.assert_array_equal(ids[f, : len(order)], order)
        np.testing.assert_allclose(vals[f, : len(order)], J[f, order], rtol=1e-6)
    assert ids[4, 0] == 5 and vals[4, 0] == 1.0
