"""Synthetic and .npy activation sources: exact resume, holdout, per-process shares."""

import numpy as np
import pytest

from jsae.data.sources import ArraySource, SyntheticSource


def test_synthetic_restore_replays_exactly():
    a = SyntheticSource(16, 64, 3, seed=5)
    for _ in range(3):
        a.next_batch(32)
    saved = a.state()
    expected = [a.next_batch(32)["synthetic"] for _ in range(2)]
    b = SyntheticSource(16, 64, 3, seed=5)
    b.restore(saved)
    for e in expected:
        np.testing.assert_array_equal(b.next_batch(32)["synthetic"], e)


def test_synthetic_samples_have_exactly_k_features():
    # with fewer features than dimensions the dictionary is invertible, so the codes are exact
    s = SyntheticSource(64, 32, 4, seed=0)
    x = s.next_batch(64)["synthetic"].astype(np.float64)
    coef = np.linalg.lstsq(s.features.T.astype(np.float64), x.T, rcond=None)[0].T
    active = np.abs(coef) > 1e-4
    assert np.all(active.sum(-1) == 4)
    assert np.all((coef[active] >= 0.5 - 1e-4) & (coef[active] < 1.5 + 1e-4))


@pytest.fixture
def npy_files(tmp_path):
    a = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
    b = np.arange(300 * 4, 500 * 4, dtype=np.float32).reshape(200, 4)
    np.save(tmp_path / "acts_0.npy", a)
    np.save(tmp_path / "acts_1.npy", b)
    return tmp_path


def test_array_source_epoch_covers_every_train_row_once(npy_files):
    src = ArraySource(str(npy_files / "acts_*.npy"), "h", holdout_fraction=0.1, seed=1)
    n_train = len(src.train_rows)
    assert n_train == 450
    rows = np.concatenate([src.next_batch(50)["h"] for _ in range(n_train // 50)])
    ids = rows[:, 0] / 4
    assert len(np.unique(ids)) == n_train  # no duplicates within the epoch
    held = np.concatenate([b["h"] for b in src.eval_batches(1000, 16)])[:, 0] / 4
    assert len(held) == 50 and not set(held) & set(ids)  # held-out rows never train


def test_array_source_restore_and_processes(npy_files):
    path = str(npy_files / "acts_*.npy")
    src = ArraySource(path, "h", seed=2)
    for _ in range(7):
        src.next_batch(64)  # crosses an epoch boundary
    saved = src.state()
    want = src.next_batch(64)["h"]
    again = ArraySource(path, "h", seed=2)
    again.restore(saved)
    np.testing.assert_array_equal(again.next_batch(64)["h"], want)
    shares = [ArraySource(path, "h", seed=2, process_index=i, process_count=3) for i in range(3)]
    sets = [set(s.train_rows.tolist()) for s in shares]
    assert sum(len(s) for s in sets) == len(src.train_rows)
    assert set().union(*sets) == set(src.train_rows.tolist())
    with pytest.raises(ValueError, match="'synthetic' source"):
        again.restore({"kind": "synthetic", "batches": 1})


def test_array_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        ArraySource(str(tmp_path / "missing.npy"), "h")
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected \[N, d_in\]"):
        ArraySource(str(tmp_path / "bad.npy"), "h")
