"""Activation sources that need no language model: a synthetic sparse dictionary and .npy files.

Both follow the ActivationSource protocol (docs/architecture.md): ``next_batch``,
``eval_batches``, ``state`` and ``restore``; batches are ``{hook: float32 [B, d_in]}``.
Every batch is a pure function of (seed, process, position), so restoring the position
replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jsae.config import ConfigError
from jsae.errors import FileFormatError

SYNTHETIC_HOOK = "synthetic"


class SyntheticSource:
    """Samples ``x = sum_i a_i f_i + noise`` from a known dictionary of unit vectors.

    ``n_features`` ground-truth directions in ``d_in``; each sample has exactly
    ``active_per_sample`` of them active with magnitudes in [0.5, 1.5); features have
    Zipf-like frequencies, as real features do.
    """

    def __init__(
        self,
        d_in: int,
        n_features: int,
        active_per_sample: int,
        *,
        noise_std: float = 0.0,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        rng = np.random.default_rng([seed, 7919])
        f = rng.standard_normal((n_features, d_in))
        self.features = (f / np.linalg.norm(f, axis=-1, keepdims=True)).astype(np.float32)
        freq = 1.0 / (np.arange(n_features) + 10.0) ** 0.5
        self.freq = freq / freq.sum()
        self.active, self.noise_std, self.seed = active_per_sample, noise_std, seed
        self.process_index, self.process_count = process_index, process_count
        self.hooks = [SYNTHETIC_HOOK]
        self.d_in = {SYNTHETIC_HOOK: d_in}
        self._batches = 0

    def _sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # Gumbel top-k: `active` distinct features per row, drawn with probabilities freq.
        g = np.log(self.freq)[None, :] - np.log(-np.log(rng.random((n, len(self.freq)))))
        idx = np.argpartition(-g, self.active, axis=1)[:, : self.active]
        mags = rng.uniform(0.5, 1.5, (n, self.active)).astype(np.float32)
        x = np.einsum("nk,nkd->nd", mags, self.features[idx])
        if self.noise_std > 0:
            x = x + self.noise_std * rng.standard_normal(x.shape).astype(np.float32)
        return x.astype(np.float32)

    def next_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.process_index, self._batches])
        self._batches += 1
        return {SYNTHETIC_HOOK: self._sample(rng, batch_size)}

    def eval_batches(self, n_tokens: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.seed, self.process_index, 2**31 - 1])
        for start in range(0, n_tokens, batch_size):
            yield {SYNTHETIC_HOOK: self._sample(rng, min(batch_size, n_tokens - start))}

    def state(self) -> dict:
        return {"kind": "synthetic", "batches": self._batches}

    def restore(self, state: dict) -> None:
        _expect_kind(state, "synthetic")
        self._batches = int(state["batches"])


class ArraySource:
    """Activations already on disk as ``.npy`` files of shape [N, d_in] (memory-mapped).

    Rows are visited in a seeded random order, a fresh one each epoch; a fixed fraction of
    rows is held out for evaluation; process p of P takes every P-th row of each order.
    """

    def __init__(
        self,
        path: str,
        hook: str,
        *,
        seed: int = 0,
        holdout_fraction: float = 0.02,
        process_index: int = 0,
        process_count: int = 1,
    ):
        files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
        if not files or not all(Path(f).is_file() for f in files):
            raise FileNotFoundError(f"data.path: no .npy file found at {path!r}")
        self.arrays = []
        for f in files:
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:  # not .npy, truncated, pickled objects
                raise FileFormatError(f"data.path: {f} is not a readable .npy array file "
                                      f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
                                      ) from e
            if not isinstance(a, np.ndarray):  # an .npz archive
                raise FileFormatError(f"data.path: {f} is an .npz archive; expected .npy files "
                                      "of shape [N, d_in]")
            if a.ndim != 2:
                raise ConfigError(f"config key 'data.path': {f} has shape {list(a.shape)}; "
                                  "expected [N, d_in] (one row per token)")
            if a.dtype.kind not in "fiu":  # complex would silently lose its imaginary part
                raise ConfigError(f"config key 'data.path': {f} holds {a.dtype} values; "
                                  "expected real numbers (float32, float16, ...)")
            if a.shape[0] == 0 or a.shape[1] == 0:
                raise ConfigError(f"config key 'data.path': {f} is empty (shape {list(a.shape)}); "
                                  "expected [N, d_in] with N, d_in > 0")
            self.arrays.append(a)
        dims = {a.shape[1] for a in self.arrays}
        if len(dims) != 1:
            raise ConfigError("config key 'data.path': the files disagree on d_in: "
                              + ", ".join(f"{f} has {a.shape[1]}" for f, a in zip(files, self.arrays)))
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.arrays])
        n = int(self.offsets[-1])
        order = np.random.default_rng([seed, 104729]).permutation(n)
        n_eval = int(round(n * holdout_fraction))
        self.eval_rows, self.train_rows = np.sort(order[:n_eval]), order[n_eval:]
        self.train_rows = self.train_rows[process_index::process_count]
        self.eval_rows = self.eval_rows[process_index::process_count]
        if len(self.train_rows) == 0:
            raise ConfigError(f"config key 'data.path': {path!r} has too few rows ({n}) to train "
                              "on")
        self.hooks = [hook]
        self.d_in = {hook: dims.pop()}
        self.seed, self.process_index = seed, process_index
        self._epoch, self._offset = 0, 0
        self._perm = self._epoch_perm(0)

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.process_index, epoch])
        return self.train_rows[rng.permutation(len(self.train_rows))]

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows)  # read each file in increasing row order (mmap friendly)
        out = np.empty((len(rows), next(iter(self.d_in.values()))), np.float32)
        file_of = np.searchsorted(self.offsets, rows[order], side="right") - 1
        for fi in np.unique(file_of):
            sel = order[file_of == fi]
            out[sel] = self.arrays[fi][rows[sel] - self.offsets[fi]]
        return out

    def next_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        picked = []
        need = batch_size
        while need > 0:
            take = self._perm[self._offset : self._offset + need]
            picked.append(take)
            self._offset += len(take)
            need -= len(take)
            if self._offset >= len(self._perm):
                self._epoch += 1
                self._offset = 0
                self._perm = self._epoch_perm(self._epoch)
        return {self.hooks[0]: self._rows(np.concatenate(picked))}

    def eval_batches(self, n_tokens: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        rows = self.eval_rows[:n_tokens]
        for start in range(0, len(rows), batch_size):
            yield {self.hooks[0]: self._rows(rows[start : start + batch_size])}

    def state(self) -> dict:
        return {"kind": "array", "epoch": self._epoch, "offset": self._offset}

    def restore(self, state: dict) -> None:
        _expect_kind(state, "array")
        self._epoch, self._offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._epoch_perm(self._epoch)


def _expect_kind(state: dict, kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise FileFormatError(
            f"saved data position is for a {getattr(state, 'get', lambda k: None)('kind')!r} "
            f"source, but data.source is {kind!r}"
        )
