"""`jsae families`'s analysis: members of growing size -> levels, trees and splitting scores
(JSON-ready). The matching itself is `jsae.scaling.families`."""

from __future__ import annotations

import numpy as np

from jsae.errors import BadInput
from jsae.scaling import families as fam
from jsae.scaling.members import Member

CACHE_SAMPLE = 16384  # held-out rows read from a cache when --sample is not given


def cache_sample(path, key: str, n: int | None) -> np.ndarray:
    """The first ``n`` held-out rows of a `jsae harvest` cache for the dictionary keyed ``key``
    (one hook ``[n, d]``; several stacked ``[n, L, d]``), read as training reads them."""
    from jsae.config import DataConfig, ModelConfig, RunConfig
    from jsae.data.cache import CacheActivationSource
    from jsae.runs import input_hooks, stack_hooks

    cfg = RunConfig(data=DataConfig(source="cache", path=str(path)),  # what the source reads
                    model=ModelConfig(hooks=input_hooks(key)))
    want = n or CACHE_SAMPLE
    parts = [stack_hooks(b, key) for b in CacheActivationSource(cfg).eval_batches(want, 4096)]
    if not parts:
        raise BadInput(f"{path}: the cache has no held-out rows")
    return np.concatenate(parts).astype(np.float32)


def read_sample(path, token_shape: tuple[int, ...], n: int | None) -> np.ndarray:
    """An activation sample ``[T, *token_shape]`` (``[T, d_in]``; a dictionary reading several
    hooks: ``[T, L, d_in]``) from a ``.npy`` file (the first ``n`` rows); one line naming the
    file when it is not a finite float array of that shape."""
    from jsae import validate as v

    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable .npy array ({' '.join(str(e).split())})") from None
    if tuple(x.shape[1:]) != tuple(token_shape) or not np.issubdtype(x.dtype, np.floating):
        want = ", ".join(map(str, token_shape))
        raise BadInput(f"{path}: shape {x.shape} {x.dtype}; expected float rows [tokens, {want}] "
                       "(activations of the dictionaries' hook)")
    x = np.asarray(x[:n] if n else x, np.float32)
    v.finite_array(x, "activations", path)
    if not len(x):
        raise BadInput(f"{path}: no rows")
    return x


def _members_record(members: list[Member]) -> list[dict]:
    return [{"path": str(m.path), "d_sae": m.d_sae} for m in members]


def families(members: list[Member], saes: list, x: np.ndarray | None = None, *,
             min_cos: float = 0.5, top: int = 20) -> dict:
    """Levels (each member against the next smaller), the trees rooted at the smallest
    dictionary's features, and the ``top`` families with the most descendants."""
    dec = [fam.decoder(s) for s in saes]
    fired = [fam.fired(s, x) for s in saes] if x is not None else [None] * len(saes)
    levels = [fam.split_level(dec[i], dec[i + 1], min_cos, fired[i], fired[i + 1])
              for i in range(len(saes) - 1)]
    roots = fam.trees(levels, members[0].d_sae)
    ranked = sorted(roots, key=lambda t: (-fam.descendants(t), t["feature"]))[:top]

    def annotate(node: dict, depth: int) -> dict:
        """A tree node with its match cosine and co-activation (from its level)."""
        out = dict(node)
        kids = [annotate(c, depth + 1) for c in node.get("children", [])]
        for c in kids:
            lv = levels[depth]
            c["cos"] = float(lv["cos"][c["feature"]])
            if "p_parent" in lv:
                c["p_parent"] = _num(lv["p_parent"][c["feature"]])
        out["children"] = kids
        if depth < len(levels) and "coverage" in levels[depth]:
            out["coverage"] = _num(levels[depth]["coverage"][node["feature"]])
        return out

    result = {
        "hook": members[0].hook, "model": members[0].model, "min_cos": min_cos,
        "members": _members_record(members),
        "sample_tokens": None if x is None else len(x),
        "levels": [_level_record(lv, members[i], members[i + 1]) for i, lv in enumerate(levels)],
        "families": [annotate(t, 0) for t in ranked],
    }
    return result


def _num(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def _level_record(lv: dict, small: Member, large: Member) -> dict:
    rec = {"parent_d_sae": small.d_sae, "child_d_sae": large.d_sae,
           "parent_path": str(small.path), "child_path": str(large.path),
           "matched_frac": lv["matched_frac"], "split_frac": lv["split_frac"],
           "mean_children": lv["mean_children"],
           "parent": lv["parent"].tolist(), "cos": [round(float(c), 5) for c in lv["cos"]],
           "matched": lv["valid"].tolist(),
           "children_per_parent": lv["children_per_parent"].tolist()}
    if "coverage" in lv:
        rec.update({"coverage": [_num(c) for c in lv["coverage"]],
                    "coverage_mean": lv["coverage_mean"],
                    "p_parent": [_num(c) for c in lv["p_parent"]],
                    "coact_parent": lv["coact_parent"].tolist(),
                    "coact_agreement": lv["coact_agreement"]})
    return rec


__all__ = ["cache_sample", "families", "read_sample"]
