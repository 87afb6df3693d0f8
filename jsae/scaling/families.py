"""Feature splitting across dictionary sizes: match each dictionary's features to the next
smaller one's and build the trees (a feature of the smallest dictionary and the features of the
larger ones that refine it).

Matching is by decoder cosine, exact: every child feature's best parent is the argmax of its
unit decoder row against all of the smaller dictionary's (chunked matmuls on the device, so
``[chunk, d_sae_small]`` is the largest array). A feature's decoder row is its whole output
(a dictionary writing several hooks: their rows flattened). A child whose best cosine is below
``min_cos`` has no parent (a new feature, not a refinement).

With an activation sample ``x [T, d_in]`` the match is also read from co-activation: for each
child, the parent that fires most often on the tokens where the child fires
(``P(parent | child)``, exact co-occurrence counts, chunked over children), and, per parent,
the coverage of its firing by the union of its children (``|parent and any child| / |parent|``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 2048  # child features per matmul


def unit_rows(w_dec) -> np.ndarray:
    """``W_dec [d_sae, ...]`` as unit rows ``[d_sae, D]`` float32 (a zero row stays zero)."""
    w = np.asarray(w_dec, np.float32).reshape(np.shape(w_dec)[0], -1)
    n = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.where(n > 0, n, 1.0)


@jax.jit
def _best(children, parents):
    cos = children @ parents.T  # [c, m]
    return jnp.argmax(cos, axis=1), jnp.max(cos, axis=1)


def match_by_cosine(w_small, w_large, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``w_large [n, ...]``: the index of its most similar row of
    ``w_small [m, ...]`` by cosine and that cosine (ties: the lowest index). Returns
    ``(parent [n] int64, cos [n] float32)``."""
    small, large = jnp.asarray(unit_rows(w_small)), unit_rows(w_large)
    idx, val = [], []
    for s in range(0, len(large), chunk):
        block = large[s : s + chunk]
        if len(block) < chunk and len(large) > chunk:  # one compiled shape: pad the last block
            block = np.concatenate([block, np.zeros((chunk - len(block), block.shape[1]),
                                                    np.float32)])
        i, v = _best(jnp.asarray(block), small)
        n = min(chunk, len(large) - s)
        idx.append(np.asarray(i)[:n])
        val.append(np.asarray(v)[:n])
    return np.concatenate(idx).astype(np.int64), np.concatenate(val).astype(np.float32)


def fired(sae, x, batch: int = 4096) -> np.ndarray:
    """``[T, d_sae]`` bool: where each feature's code is > 0 on the sample ``x [T, d_in]``."""
    from jsae.sae.core import encode

    enc = jax.jit(lambda xb: encode(sae, xb) > 0)
    return np.concatenate([np.asarray(enc(jnp.asarray(x[s : s + batch])))
                           for s in range(0, len(x), batch)])


@jax.jit
def _coact_block(child_fired, parent_fired):
    counts = child_fired.T @ parent_fired  # [c, m] co-occurrences, exact in float32 below 2^24
    return jnp.argmax(counts, axis=1), jnp.max(counts, axis=1)


def coactivation(f_small: np.ndarray, f_large: np.ndarray, parent: np.ndarray,
                 valid: np.ndarray, chunk: int = CHUNK) -> dict:
    """Co-activation of the match on a sample, from ``f_small [T, m]`` and ``f_large [T, n]``
    (bool firing). Returns per child ``p_parent`` (P(its cosine parent fires | it fires); nan
    if it never fires), ``coact_parent`` (the parent firing most often with it; -1 if it never
    fires) and per parent ``coverage`` (fraction of its firing covered by its ``valid``
    children's union; nan if it never fires)."""
    fs, fl = f_small.astype(np.float32), f_large.astype(np.float32)
    n_child = fl.sum(0)
    both = (fl * fs[:, parent]).sum(0)
    best = []
    small_dev = jnp.asarray(fs)
    for s in range(0, fl.shape[1], chunk):
        i, v = _coact_block(jnp.asarray(fl[:, s : s + chunk]), small_dev)
        best.append(np.where(np.asarray(v) > 0, np.asarray(i), -1))
    any_child = np.zeros(f_small.shape[::-1], bool)  # [m, T]: union of each parent's children
    np.logical_or.at(any_child, parent[valid], f_large[:, valid].T)
    any_child = any_child.T
    n_parent = f_small.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_parent = np.where(n_child > 0, both / n_child, np.nan)
        coverage = np.where(n_parent > 0, (any_child & f_small).sum(0) / n_parent, np.nan)
    return {"p_parent": p_parent, "coact_parent": np.concatenate(best).astype(np.int64),
            "coverage": coverage}


def decoder(sae) -> np.ndarray:
    """Every feature's decoder rows at every hook it writes, ``[d_sae, ...]`` (the arch's)."""
    from jsae.sae.archs import get_arch

    rows = get_arch(sae.spec.architecture).decoder_rows(sae.params, jnp.arange(sae.spec.d_sae))
    return np.asarray(rows, np.float32)


def split_level(w_small, w_large, min_cos: float, f_small=None, f_large=None) -> dict:
    """One level (a dictionary and the next larger one): the cosine match, which matches count
    (``cos >= min_cos``), children per parent and, with firing samples, the co-activation."""
    parent, cos = match_by_cosine(w_small, w_large)
    valid = cos >= min_cos
    per_parent = np.bincount(parent[valid], minlength=len(w_small))
    lv = {"parent": parent, "cos": cos, "valid": valid, "children_per_parent": per_parent,
          "matched_frac": float(valid.mean()),
          "split_frac": float((per_parent >= 2).mean()),
          "mean_children": float(per_parent[per_parent > 0].mean()) if valid.any() else 0.0}
    if f_small is not None:
        co = coactivation(f_small, f_large, parent, valid)
        lv.update(co)
        fires = f_large.any(0) & valid
        lv["coact_agreement"] = (float((co["coact_parent"][fires] == parent[fires]).mean())
                                 if fires.any() else None)
        cov = co["coverage"][per_parent > 0]
        lv["coverage_mean"] = float(np.nanmean(cov)) if np.isfinite(cov).any() else None
    return lv


def trees(levels: list[dict], n_roots: int) -> list[dict]:
    """Nested trees from the smallest dictionary's features: ``{"feature", "children": [...]}``
    through every level's valid matches (``levels[i]["parent"]``, ``["valid"]``)."""
    kids = []
    for lv in levels:
        by_parent: dict[int, list[int]] = {}
        for j in np.flatnonzero(lv["valid"]):
            by_parent.setdefault(int(lv["parent"][j]), []).append(int(j))
        kids.append(by_parent)

    def grow(feature: int, depth: int) -> dict:
        node: dict = {"feature": feature}
        if depth < len(kids):
            node["children"] = [grow(c, depth + 1) for c in kids[depth].get(feature, [])]
        return node

    return [grow(f, 0) for f in range(n_roots)]


def descendants(node: dict) -> int:
    return sum(1 + descendants(c) for c in node.get("children", []))


__all__ = ["coactivation", "decoder", "descendants", "fired", "match_by_cosine", "split_level",
           "trees", "unit_rows"]
