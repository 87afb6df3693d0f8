"""The scaling-law fits of Scaling Monosemanticity (pure NumPy / SciPy, no jsae state).

- :func:`fit_power_law` - one dictionary size's loss against training compute,
  ``L(C) = a * C^-b + c`` (a power law plus the irreducible loss that size reaches).
- :func:`pareto_frontier` - the compute-efficient frontier: the points no cheaper point beats.
- :func:`fit_joint` - ``L(N, D) = E + A N^-alpha + B D^-beta`` over every (features N, tokens D)
  point; with the compute ``C = f(N) * D`` (``f``: training FLOPs per token of a dictionary of
  N features, `jsae.scaling.flops`) it gives the optimal allocation ``N*(C)``, ``D*(C)``
  (minimise L on the line C = f(N) D), whose slopes in log-log are the exponents the paper
  reports (for dense f, analytically ``beta / (alpha + beta)`` and ``alpha / (alpha + beta)``).
- :func:`fit_loglog` - a power law ``y = k x^s`` by least squares in log-log, with the slope's
  standard error (the empirical frontier's N and D against compute).

Uncertainty: the joint fit's exponents come with a bootstrap over points (resampled with
replacement, refitted; the standard deviation of each quantity), the per-size fits with the
standard errors of the Gauss-Newton covariance.
"""

from __future__ import annotations

import numpy as np

from jsae.errors import BadInput

MIN_POINTS = 3


def _need(n: int, at_least: int, what: str) -> None:
    if n < at_least:
        raise BadInput(f"{what} needs at least {at_least} points, got {n}; record more held-out "
                       "points (eval.at_tokens, e.g. 'log:8') or add runs")


def _se(res) -> np.ndarray:
    """Standard errors of a least_squares result's parameters (residual variance * (J^T J)^-1)."""
    j, r = res.jac, res.fun
    dof = max(len(r) - len(res.x), 1)
    try:
        cov = np.linalg.pinv(j.T @ j) * float(r @ r) / dof
    except np.linalg.LinAlgError:
        return np.full(len(res.x), np.nan)
    return np.sqrt(np.clip(np.diag(cov), 0, None))


def fit_power_law(x, y) -> dict:
    """``y = a x^-b + c`` (b > 0, 0 <= c < min y), fitted on relative residuals. Returns
    a, b, c, their standard errors (``*_se``) and the relative RMS error."""
    from scipy.optimize import least_squares

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    _need(len(x), MIN_POINTS, "a power law plus a constant")
    lx = np.log(x)
    best = None
    for c in np.linspace(0.0, 0.99, 34) * y.min():  # c on a grid, then (log a, b) linear
        s, i = np.polyfit(lx, np.log(y - c), 1)
        err = np.sum((np.exp(i + s * lx) + c - y) ** 2 / y**2)
        if best is None or err < best[0]:
            best = (err, i, -s, c)
    _, i0, b0, c0 = best
    scale = np.median(lx)  # a at the median x: keeps the problem well conditioned

    def resid(p):
        la, b, c = p
        return (np.exp(la - b * (lx - scale)) + c) / y - 1.0

    p0 = [i0 - b0 * scale, max(b0, 1e-6), c0]
    res = least_squares(resid, p0, bounds=([-np.inf, 0.0, 0.0], [np.inf, 10.0, y.min()]))
    la, b, c = res.x
    se = _se(res)
    a = float(np.exp(la + b * scale))
    return {"a": a, "b": float(b), "c": float(c), "b_se": float(se[1]), "c_se": float(se[2]),
            "a_se": float(a * se[0]), "rel_rmse": float(np.sqrt(np.mean(res.fun**2)))}


def power_law_value(fit: dict, x) -> np.ndarray:
    return fit["a"] * np.asarray(x, np.float64) ** -fit["b"] + fit["c"]


def pareto_frontier(compute, loss) -> np.ndarray:
    """Indices of the compute-efficient frontier, by increasing compute: each point's loss is
    below that of every point of less or equal compute."""
    compute, loss = np.asarray(compute), np.asarray(loss)
    order = np.lexsort((loss, compute))
    out, best = [], np.inf
    for i in order:
        if loss[i] < best:
            out.append(int(i))
            best = loss[i]
    return np.asarray(out, np.int64)


def fit_loglog(x, y) -> dict:
    """``y = k x^s`` by least squares on logs: slope ``s``, its standard error, ``k``."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    _need(len(lx), MIN_POINTS, "a log-log power law")
    if np.ptp(lx) == 0:
        raise BadInput("a log-log power law needs points at more than one x")
    a = np.vstack([lx, np.ones_like(lx)]).T
    coef, *_ = np.linalg.lstsq(a, ly, rcond=None)
    r = ly - a @ coef
    dof = max(len(lx) - 2, 1)
    cov = np.linalg.inv(a.T @ a) * float(r @ r) / dof
    return {"exponent": float(coef[0]), "exponent_se": float(np.sqrt(max(cov[0, 0], 0.0))),
            "coefficient": float(np.exp(coef[1]))}


JOINT_PARAMS = ("E", "A", "alpha", "B", "beta")
EXP_MAX = 3.0  # the joint fit's exponents lie in [0, EXP_MAX]


def _joint_once(ln, ld, loss, starts) -> np.ndarray:
    """(log E, log A, alpha, log B, beta) minimising the squared log error, best of ``starts``."""
    from scipy.optimize import least_squares

    ly = np.log(loss)

    def resid(p):
        le, la, al, lb, be = p
        return np.logaddexp(np.logaddexp(le, la - al * ln), lb - be * ld) - ly

    best = None
    for p0 in starts:
        res = least_squares(resid, p0, bounds=([-np.inf, -np.inf, 0.0, -np.inf, 0.0],
                                               [np.inf, np.inf, EXP_MAX, np.inf, EXP_MAX]))
        if best is None or res.cost < best.cost:
            best = res
    return best.x


def _starts(ln, ld, loss):
    le = np.log(0.5 * loss.min())
    mid = np.log(loss.max())
    return [[le, mid + al * ln.mean(), al, mid + be * ld.mean(), be]
            for al in (0.2, 0.6) for be in (0.2, 0.6)]


def optimal_allocation(params: dict, flops_per_token, compute) -> tuple[np.ndarray, np.ndarray]:
    """(N*, D*) minimising ``L(N, D)`` on ``C = flops_per_token(N) * D`` for each ``compute``:
    a fine log grid of N, refined by a parabola through the best grid point's neighbours."""
    c = np.atleast_1d(np.asarray(compute, np.float64))
    grid = np.exp(np.linspace(np.log(1.0), np.log(1e15), 6001))
    f = flops_per_token(grid)
    e, a, al, b, be = (params[k] for k in JOINT_PARAMS)
    n_opt, d_opt = [], []
    for ci in c:
        d = ci / f
        ok = d >= 1
        ll = np.where(ok, np.log(e + a * grid**-al + b * np.maximum(d, 1) ** -be), np.inf)
        i = int(np.argmin(ll))
        li = np.log(grid)
        if 0 < i < len(grid) - 1 and np.isfinite(ll[i - 1 : i + 2]).all():
            y0, y1, y2 = ll[i - 1 : i + 2]
            den = y0 - 2 * y1 + y2
            shift = 0.5 * (y0 - y2) / den if den > 0 else 0.0
            n = float(np.exp(li[i] + shift * (li[1] - li[0])))
        else:
            n = float(grid[i])
        n_opt.append(n)
        d_opt.append(ci / float(flops_per_token(np.asarray([n]))[0]))
    return np.asarray(n_opt), np.asarray(d_opt)


def joint_loss(params: dict, n, d) -> np.ndarray:
    e, a, al, b, be = (params[k] for k in JOINT_PARAMS)
    return e + a * np.asarray(n, np.float64) ** -al + b * np.asarray(d, np.float64) ** -be


def fit_joint(n, d, loss, flops_per_token, compute_range, *, bootstrap: int = 100,
              seed: int = 0) -> dict:
    """Fit ``L(N, D) = E + A N^-alpha + B D^-beta`` and the optimal-allocation exponents.

    ``flops_per_token(N_array)`` gives the training FLOPs per token of a dictionary of N
    features; ``compute_range`` (lo, hi) the compute over which the slopes of ``N*(C)`` and
    ``D*(C)`` are read. Returns the parameters, ``n_exponent`` / ``d_exponent`` (N* ~ C^a,
    D* ~ C^b), and for each a bootstrap standard deviation (``*_sd``; ``bootstrap`` refits)."""
    n, d, loss = (np.asarray(v, np.float64) for v in (n, d, loss))
    _need(len(n), len(JOINT_PARAMS), "the joint fit L(N, D) = E + A/N^alpha + B/D^beta")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise BadInput("the joint fit needs at least two dictionary sizes and two token counts")
    ln, ld = np.log(n), np.log(d)
    grid_c = np.exp(np.linspace(np.log(compute_range[0]), np.log(compute_range[1]), 9))

    def solve(idx, starts):
        p = _joint_once(ln[idx], ld[idx], loss[idx], starts)
        params = dict(zip(JOINT_PARAMS, [np.exp(p[0]), np.exp(p[1]), p[2], np.exp(p[3]), p[4]]))
        no, do = optimal_allocation(params, flops_per_token, grid_c)
        params["n_exponent"] = float(np.polyfit(np.log(grid_c), np.log(no), 1)[0])
        params["d_exponent"] = float(np.polyfit(np.log(grid_c), np.log(do), 1)[0])
        return params, p

    everything = np.arange(len(n))
    params, p = solve(everything, _starts(ln, ld, loss))
    out = {k: float(v) for k, v in params.items()}
    resid = np.log(joint_loss(params, n, d)) - np.log(loss)
    out["rel_rmse"] = float(np.sqrt(np.mean(resid**2)))
    # an exponent on its bound (0 or EXP_MAX) is not measured: the points do not constrain it
    out["at_bound"] = [k for k in ("alpha", "beta") if not 1e-6 < out[k] < EXP_MAX - 1e-3]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < 2 or len(np.unique(d[idx])) < 2:
            continue
        draws.append(solve(idx, [p])[0])
    for k in ("alpha", "beta", "n_exponent", "d_exponent", "E"):
        vals = np.asarray([dr[k] for dr in draws])
        out[f"{k}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    out["bootstrap"] = len(draws)
    return out


__all__ = ["JOINT_PARAMS", "MIN_POINTS", "fit_joint", "fit_loglog", "fit_power_law",
           "joint_loss", "optimal_allocation", "pareto_frontier", "power_law_value"]
