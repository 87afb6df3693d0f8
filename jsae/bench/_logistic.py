"""L2-penalised logistic regression in NumPy: the probe of sparse probing.

The same objective as scikit-learn's ``LogisticRegression(penalty="l2", C=C)`` (SAEBench's
probe): ``sum_i log(1 + exp(-s_i (x_i w + b))) + ||w||^2 / (2 C)`` with ``s_i = +-1`` and the
intercept ``b`` not penalised, solved by Newton's method with a backtracking line search. With
more columns than rows the problem is solved in the row space of ``x`` (the optimum lies there:
a component of ``w`` orthogonal to every row leaves the loss unchanged and only adds to the
penalty), so a probe on 10,000 dictionary features costs one thin SVD plus a small Newton solve.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # stable for any |t|


def fit_logistic(x, y, *, C: float = 1.0, max_iter: int = 100, tol: float = 1e-9
                 ) -> tuple[np.ndarray, float]:
    """``(coef [d], intercept)`` of the penalised logistic regression of ``y [n]`` (bool) on
    ``x [n, d]``."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y).astype(bool).astype(np.float64)
    n, d = x.shape
    basis = None
    if d > n:
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        keep = s > (s[0] if len(s) else 0.0) * 1e-12
        x, basis = u[:, keep] * s[keep], vt[keep]  # x = (u s) vt: coordinates in the row space
    z = np.concatenate([x, np.ones((n, 1))], axis=1)
    reg = np.r_[np.full(z.shape[1] - 1, 1.0 / C), 0.0]
    w = np.zeros(z.shape[1])

    def objective(v):
        t = z @ v
        return float(np.sum(np.logaddexp(0.0, t) - y * t) + 0.5 * np.sum(reg * v * v))

    f = objective(w)
    for _ in range(max_iter):
        p = _sigmoid(z @ w)
        g = z.T @ (p - y) + reg * w
        if np.max(np.abs(g)) < tol * max(n, 1):
            break
        h = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg)
        h[-1, -1] += 1e-12 * n  # the intercept alone is unpenalised: keep h invertible on separable data
        step = np.linalg.solve(h, g)
        a, slope = 1.0, float(g @ step)
        while True:
            w_new = w - a * step
            f_new = objective(w_new)
            if f_new <= f - 1e-4 * a * slope or a < 1e-12:
                break
            a *= 0.5
        if f - f_new <= 1e-15 * max(abs(f), 1.0):
            w, f = w_new, f_new
            break
        w, f = w_new, f_new
    coef = w[:-1] if basis is None else basis.T @ w[:-1]
    return coef, float(w[-1])


def accuracy(coef: np.ndarray, intercept: float, x, y) -> float:
    """Share of rows whose predicted class (``x @ coef + intercept > 0``) equals ``y``."""
    pred = np.asarray(x, np.float64) @ coef + intercept > 0
    return float(np.mean(pred == np.asarray(y).astype(bool)))


def top_k_mean_diff(x, y, k: int) -> np.ndarray:
    """The ``k`` columns of ``x [n, d]`` with the largest ``|mean over positives - mean over
    negatives|`` (SAEBench's selection; ties in column order), best first."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y).astype(bool)
    diff = np.abs(x[y].mean(0) - x[~y].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


__all__ = ["accuracy", "fit_logistic", "top_k_mean_diff"]
