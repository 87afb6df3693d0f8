"""`jsae scaling`'s analysis: members' held-out points -> the paper's fits and a recommendation.

Each member contributes the points its training recorded at ``eval.at_tokens`` (tokens seen,
training FLOPs, held-out metrics). The result (:func:`scaling_laws`, JSON-ready) holds, for the
chosen metric: every point; per dictionary size the fit ``L(C) = a C^-b + c``; the
compute-efficient frontier with log-log fits of its features and tokens against compute; the
joint fit ``L(N, D)`` with the optimal-allocation exponents and their bootstrap spread; and,
for a compute budget, the recommended size and tokens.
"""

from __future__ import annotations

import math

import numpy as np

from jsae import validate as v
from jsae.errors import BadInput
from jsae.scaling import fit
from jsae.scaling.flops import flops_per_token
from jsae.scaling.members import Member


def member_points(m: Member, metric: str) -> list[dict]:
    """``m``'s recorded points as {tokens, flops, value} (checked: one line naming the file)."""
    where = (m.folder or m.path) / "sae.json"
    rec = m.meta.get("scaling")
    if rec is None:
        raise BadInput(f"{m.path} has no held-out points at eval.at_tokens (train it with "
                       "eval.at_tokens, e.g. 'log:8', to record them)")
    rec = v.mapping(rec, "field 'metadata.scaling'", where)
    pts = rec.get("points")
    if not isinstance(pts, list) or not pts:
        raise v.bad(where, "field 'metadata.scaling.points'", "is not a non-empty list")
    per_token = flops_per_token(m.spec)
    out = []
    for i, p in enumerate(pts):
        name = f"field 'metadata.scaling.points[{i}]'"
        p = v.mapping(p, name, where)
        tokens, value = p.get("tokens"), p.get(metric)
        if metric not in p:
            raise BadInput(f"{where}: the recorded points have no metric {metric!r} (they "
                           f"have {', '.join(k for k in p if k not in ('step', 'tokens', 'flops'))})")
        if not isinstance(tokens, (int, float)) or not tokens > 0:
            raise v.bad(where, f"{name}.tokens", f"is {tokens!r}; expected a count > 0")
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue  # a non-finite held-out metric (written as null) is no evidence
        if value <= 0:
            raise BadInput(f"{where}: {metric} {value} at {tokens} tokens is not > 0; a power "
                           "law needs a positive loss (choose another --metric)")
        out.append({"tokens": float(tokens), "flops": float(tokens) * per_token,
                    "value": float(value)})
    return out


def _affine_flops(members: list[Member]):
    """FLOPs per token as a function of the number of features N, from the members' specs
    (exactly affine in N for one architecture and k: 12dN dense, 2dN + 8dk k-sparse)."""
    n = np.asarray([m.d_sae for m in members], np.float64)
    f = np.asarray([flops_per_token(m.spec) for m in members], np.float64)
    if np.ptp(n) == 0:
        slope, icpt = f[0] / n[0], 0.0
    else:
        slope, icpt = np.polyfit(n, f, 1)
    return lambda x: slope * np.asarray(x, np.float64) + icpt, (float(slope), float(icpt))


def scaling_laws(members: list[Member], metric: str = "fvu", *, compute: float | None = None,
                 bootstrap: int = 100, seed: int = 0, min_tokens: float = 0) -> dict:
    """The fits over ``members`` (see the module docstring); BadInput for too few points.
    ``min_tokens``: fit only the points recorded at or after that many training tokens (the
    first steps are a transient, not a power law; the paper fits trained dictionaries)."""
    rows = []
    for m in members:
        for p in member_points(m, metric):
            if p["tokens"] >= min_tokens:
                rows.append({"member": str(m.path), "d_sae": m.d_sae, **p})
    if len(rows) < fit.MIN_POINTS:
        after = f" at or after {min_tokens:,.0f} tokens" if min_tokens else ""
        raise BadInput(f"a scaling fit needs at least {fit.MIN_POINTS} held-out points, the "
                       f"runs recorded {len(rows)}{after}; record more (eval.at_tokens: 'log:8')")
    fpt, (slope, icpt) = _affine_flops(members)
    n = np.asarray([r["d_sae"] for r in rows], np.float64)
    d = np.asarray([r["tokens"] for r in rows], np.float64)
    c = np.asarray([r["flops"] for r in rows], np.float64)
    y = np.asarray([r["value"] for r in rows], np.float64)
    out: dict = {"metric": metric, "hook": members[0].hook, "model": members[0].model,
                 "min_tokens": min_tokens,
                 "flops_per_token": {"per_feature": slope, "constant": icpt,
                                     "formula": "see jsae/scaling/flops.py"},
                 "members": [{"path": str(m.path), "d_sae": m.d_sae,
                              "flops_per_token": flops_per_token(m.spec)} for m in members],
                 "points": rows}
    per_size = {}
    for size in sorted({r["d_sae"] for r in rows}):
        sel = n == size
        try:
            per_size[str(size)] = fit.fit_power_law(c[sel], y[sel])
        except BadInput as e:
            per_size[str(size)] = {"skipped": str(e)}
    out["per_size"] = per_size
    front = fit.pareto_frontier(c, y)
    out["frontier"] = [rows[i] for i in front]
    try:
        out["frontier_fit"] = {"features": fit.fit_loglog(c[front], n[front]),
                               "tokens": fit.fit_loglog(c[front], d[front])}
    except BadInput as e:
        out["frontier_fit"] = {"skipped": str(e)}
    try:
        out["joint"] = fit.fit_joint(n, d, y, fpt, (c.min(), c.max()), bootstrap=bootstrap,
                                     seed=seed)
    except BadInput as e:
        out["joint"] = {"skipped": str(e)}
    if compute is not None:
        out["recommendation"] = recommend(out, compute, fpt)
    return out


def recommend(result: dict, compute: float, fpt) -> dict:
    """Features and tokens for ``compute`` FLOPs: the joint fit's optimum, or else the
    frontier's log-log fits; with the predicted metric where the joint fit exists."""
    j = result.get("joint") or {}
    if "alpha" in j:
        no, do = fit.optimal_allocation(j, fpt, [compute])
        n_opt, d_opt = float(no[0]), float(do[0])
        pred = float(fit.joint_loss(j, n_opt, d_opt))
        source = "joint fit L(N, D)"
    elif "features" in result.get("frontier_fit", {}):
        ff = result["frontier_fit"]["features"]
        n_opt = ff["coefficient"] * compute ** ff["exponent"]
        d_opt = compute / float(fpt(np.asarray([n_opt]))[0])
        pred, source = None, "frontier power laws"
    else:
        raise BadInput("no fit to recommend from: "
                       + (j.get("skipped") or result["frontier_fit"]["skipped"]))
    lo, hi = min(p["flops"] for p in result["points"]), max(p["flops"] for p in result["points"])
    return {"compute": compute, "features": n_opt, "tokens": d_opt, "predicted": pred,
            "from": source, "extrapolated": not lo <= compute <= hi}


__all__ = ["member_points", "recommend", "scaling_laws"]
