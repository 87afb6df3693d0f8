"""SAEBench's absorption formulas (Chanin et al. 2024, as in ``sae_bench/evals/absorption``), in NumPy.

For one letter with unit probe direction ``p``, the letter's main ("split") features ``M`` and,
per word, its activation ``a`` at the hook and its codes ``z``:

- probe projection ``P = a @ p``; each feature's projection ``q_f = z_f * cos(p, W_dec[f])``;
- **absorption fraction**: 0 when ``sum_M q >= P`` or when the (at most 3) largest positive
  projections of other features with cosine >= 0.1 explain less than 0.4 of ``P``; 1 when
  ``sum_M q <= 0``; else ``min(A, P - sum_M q) / (min(A, P - sum_M q) + sum_M q)`` (``A``: those
  features' sum), clipped to [0, 1];
- **full absorption**: no main feature fires (code < 1e-8), the feature with the largest
  projection has cosine >= 0.025 with the probe, ``P >= 0``, and that feature's projection is at
  least 0.4 of ``P``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

FULL_COS = 0.025  # FULL_ABSORPTION_PROBE_COS_THRESHOLD
FRACTION_COS = 0.1  # ABSORPTION_FRACTION_PROBE_COS_THRESHOLD
PROPORTION = 0.4  # ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD
MAX_ABSORBERS = 3  # ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS
EPS = 1e-8


def cosines(direction: np.ndarray, W_dec: np.ndarray) -> np.ndarray:
    """``[F]`` cosine of ``direction [D]`` with every decoder row ``W_dec [F, D]``."""
    d = np.asarray(direction, np.float64)
    W = np.asarray(W_dec, np.float64)
    return (W @ d) / np.maximum(np.linalg.norm(W, axis=1) * np.linalg.norm(d), EPS)


def absorption(acts: np.ndarray, codes: np.ndarray, direction: np.ndarray, cos: np.ndarray,
               main: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per word ``(absorption_fraction [N], is_full_absorption [N])`` for ``acts [N, D]``,
    ``codes [N, F]``, the probe ``direction [D]`` (normalised here), ``cos [F]`` and the main
    feature ids."""
    p = np.asarray(direction, np.float64)
    p = p / np.linalg.norm(p)
    P = np.asarray(acts, np.float64) @ p
    q = np.asarray(codes, np.float64) * cos[None, :]
    main = np.asarray(main, np.int64)
    main_q = q[:, main].sum(1)
    other = np.ones(q.shape[1], bool)
    other[main] = False
    cand = np.where(other[None, :] & (cos >= FRACTION_COS)[None, :] & (q > 0), q, 0.0)
    k = min(MAX_ABSORBERS, cand.shape[1])
    top = -np.sort(-cand, axis=1)[:, :k].sum(1)  # zeros stand in for missing candidates
    with np.errstate(divide="ignore", invalid="ignore"):
        share = top / P
    absorbed = np.minimum(top, P - main_q)
    with np.errstate(divide="ignore", invalid="ignore"):
        partial = np.clip(absorbed / (absorbed + main_q), 0.0, 1.0)
    frac = np.where((main_q >= P) | (share < PROPORTION), 0.0, np.where(main_q <= 0.0, 1.0, partial))
    best = np.argmax(q, axis=1)
    best_q = q[np.arange(len(q)), best]
    with np.errstate(divide="ignore", invalid="ignore"):
        full = ((np.asarray(codes)[:, main] < EPS).all(1) & (cos[best] >= FULL_COS) & (P >= 0)
                & ~(best_q / P < PROPORTION))
    return np.nan_to_num(frac), full


def split_features(f1_by_k: Sequence[float], feats_by_k: Sequence[Sequence[int]],
                   jump: float = 0.03) -> list[int]:
    """SAEBench's feature splitting: grow k while the k-sparse probe's F1 rises by more than
    ``jump`` over the best so far; the features of the last such k."""
    best, split = -100.0, []
    for score, feats in zip(f1_by_k, feats_by_k):
        if score > best + jump:
            best, split = score, list(feats)
        else:
            break
    return split


def summarise(rows: Sequence[dict], min_probe_f1: float) -> dict:
    """SAEBench's means (and sample standard deviations) over the letters whose probe F1 is
    above ``min_probe_f1`` and that have probe true positives."""
    kept = [r for r in rows if r["num_probe_true_positives"] > 0 and r["f1_probe"] > min_probe_f1]

    def stat(key, fn):
        vals = [float(r[key]) for r in kept]
        if fn is statistics.stdev:
            return fn(vals) if len(vals) > 1 else float("nan")
        return fn(vals) if vals else float("nan")

    return {"mean_absorption_fraction_score": stat("mean_absorption_fraction", statistics.mean),
            "mean_full_absorption_score": stat("full_absorption_rate", statistics.mean),
            "mean_num_split_features": stat("num_split_features", statistics.mean),
            "std_dev_absorption_fraction_score": stat("mean_absorption_fraction", statistics.stdev),
            "std_dev_full_absorption_score": stat("full_absorption_rate", statistics.stdev),
            "std_dev_num_split_features": stat("num_split_features", statistics.stdev)}
