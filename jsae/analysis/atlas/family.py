"""Feature families across dictionary sizes on an atlas's cards (``jsae atlas --families``).

``jsae families`` (:mod:`jsae.scaling.splitting`) writes ``families.json``: the dictionaries it
compared (``members``: ``path``, ``d_sae``, smallest first) and, per ``levels[i]``, the match of
every feature of ``members[i + 1]`` to its best parent in ``members[i]`` by decoder cosine
(``parent``, ``cos``, ``matched`` = ``cos >= min_cos``). An atlas holds one of those
dictionaries; :func:`family_links` finds which (by its folder, else by its width on the same
hook) and reads, for each of its features, its parent in the next smaller dictionary and its
children (matched features whose parent it is) in the next larger one.

Link targets: the sibling dictionaries' atlases (``--family-atlas NAME=DIR``); a dictionary's
NAME is the last part of its path in ``families.json`` (a family member's name).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from jsae.analysis.atlas.types import AtlasError

MAX_CHILDREN = 64  # children kept per feature (most similar first); the count says how many


@dataclasses.dataclass
class FamilyLinks:
    """One dictionary's place in ``families.json``. ``F`` = its d_sae, ``C`` children slots.

    ``parent [F]`` int64 the matched parent in the next smaller dictionary (-1: its best
    cosine is below ``min_cos``), ``parent_cos [F]`` float32 that best cosine (both None for
    the smallest dictionary); ``children [F, C]`` int64 (-1 = empty slot) and
    ``children_cos [F, C]`` float32, most similar first (None for the largest);
    ``meta``: ``file``, ``min_cos``, ``this``/``parent``/``children`` (``name``, ``d_sae``,
    ``href``: the sibling atlas's index.html relative to the atlas folder, or None)."""

    meta: dict
    parent: np.ndarray | None
    parent_cos: np.ndarray | None
    children: np.ndarray | None
    children_cos: np.ndarray | None


def member_name(path: str) -> str:
    """A dictionary's name in families.json: the last part of its path."""
    return Path(path).name or str(path)


def read_families(path) -> dict:
    """``families.json`` checked (one line naming the file otherwise): members of distinct
    paths with positive widths, smallest first; one level per pair, each with a parent in
    range, a finite cosine and a match flag for every feature of the larger dictionary."""
    from jsae import validate as v

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such families file (write it with jsae families "
                                "RUN... --out DIR)")
    d = v.mapping(v.read_json(path, "families file"), "", path)
    v.field(d, "hook", str, path)
    min_cos = v.field(d, "min_cos", float, path, lo=-1, hi=1)
    members = v.field(d, "members", list, path)
    if len(members) < 2:
        raise v.bad(path, "field 'members'", f"lists {len(members)} dictionaries; expected at "
                    "least 2")
    for i, m in enumerate(members):
        m = v.mapping(m, f"members[{i}]", path)
        v.field(m, "path", str, path, prefix=f"members[{i}].")
        v.field(m, "d_sae", int, path, prefix=f"members[{i}].", lo=1)
    widths = [m["d_sae"] for m in members]
    if widths != sorted(widths):
        raise v.bad(path, "field 'members'", f"is not sorted by d_sae ({widths})")
    levels = v.field(d, "levels", list, path)
    if len(levels) != len(members) - 1:
        raise v.bad(path, "field 'levels'", f"has {len(levels)} entries; expected "
                    f"{len(members) - 1} (one per pair of consecutive members)")
    for i, lv in enumerate(levels):
        p = f"levels[{i}]."
        lv = v.mapping(lv, f"levels[{i}]", path)
        small, large = widths[i], widths[i + 1]
        v.field(lv, "parent_d_sae", int, path, prefix=p, choices=[small])
        v.field(lv, "child_d_sae", int, path, prefix=p, choices=[large])
        parent = _array(lv, "parent", path, p, large, "i")
        if parent.size and (parent.min() < 0 or parent.max() >= small):
            raise v.bad(path, f"field '{p}parent'", f"holds ids outside 0..{small - 1}")
        cos = _array(lv, "cos", path, p, large, "f")
        if cos.size and np.abs(cos).max() > 1 + 1e-3:
            raise v.bad(path, f"field '{p}cos'", "holds values outside [-1, 1]")
        _array(lv, "matched", path, p, large, "b")
    d["min_cos"] = float(min_cos)
    return d


def _array(lv: dict, key: str, path, prefix: str, n: int, kind: str) -> np.ndarray:
    from jsae import validate as v

    raw = v.field(lv, key, list, path, prefix=prefix)
    try:
        a = np.asarray(raw)
    except ValueError:
        a = np.asarray([], object)
    if kind == "b" and a.dtype != bool or kind == "i" and (a.dtype.kind not in "iu") or (
            kind == "f" and a.dtype.kind not in "fiu"):
        want = {"b": "true/false", "i": "integer", "f": "number"}[kind]
        raise v.bad(path, f"field '{prefix}{key}'", f"is not a flat list of {want} values")
    return v.finite_array(a, f"field '{prefix}{key}'", path, shape=(n,), kind=kind)


def locate(fam: dict, path, *, hook: str, d_sae: int, folders) -> int:
    """The index in ``fam["members"]`` of the atlas's dictionary: the member whose path is one
    of ``folders`` (its SAE folder, its run), else the only member of width ``d_sae``; one
    line naming the file when there is none, the hook differs or the width is ambiguous."""
    from jsae.runs import split_member

    base = split_member(hook)[0]
    if fam["hook"] != base:
        raise AtlasError(f"{path} compares dictionaries on {fam['hook']!r}, not on this "
                         f"atlas's hook {base!r}")
    mine = {_resolved(f) for f in folders}
    members = fam["members"]
    by_path = [i for i, m in enumerate(members) if _resolved(m["path"]) in mine]
    by_width = [i for i, m in enumerate(members) if m["d_sae"] == d_sae]
    hits = [i for i in by_path if members[i]["d_sae"] == d_sae] or (
        by_width if len(by_width) == 1 else [])
    if len(hits) != 1:
        sizes = ", ".join(f"{member_name(m['path'])} ({m['d_sae']})" for m in members)
        why = (f"{len(by_width)} of its dictionaries have {d_sae} features and none is at this "
               "dictionary's path" if len(by_width) > 1 else
               f"it holds {sizes}, none with this dictionary's {d_sae} features")
        raise AtlasError(f"{path} does not contain the dictionary {hook} ({why}); run jsae "
                         "families over this dictionary")
    return hits[0]


def _resolved(p) -> str:
    return os.path.realpath(os.path.abspath(str(p)))


def _href(atlases: dict, name: str, out) -> str | None:
    """The sibling atlas's index.html relative to the atlas folder ``out`` (POSIX), or None."""
    if name not in atlases:
        return None
    rel = os.path.relpath(os.path.abspath(Path(atlases[name]) / "index.html"),
                          os.path.abspath(out))
    return Path(rel).as_posix()


def parse_family_atlases(specs) -> dict[str, str]:
    """``["NAME=DIR", ...]`` (``--family-atlas``) as ``{NAME: DIR}``; one line on a bad one."""
    out = {}
    for s in specs or []:
        name, sep, folder = s.partition("=")
        if not sep or not name or not folder:
            raise AtlasError(f"--family-atlas {s!r}: expected NAME=DIR (a dictionary's name in "
                             "families.json and the folder of its atlas)")
        if name in out:
            raise AtlasError(f"--family-atlas names {name!r} twice")
        out[name] = folder
    return out


def family_links(path, *, hook: str, d_sae: int, folders, out, atlases=None,
                 max_children: int = MAX_CHILDREN) -> FamilyLinks:
    """The links of the dictionary (``hook``, ``d_sae`` features, at one of ``folders``) in
    the families file ``path``: parent and children per feature (:class:`FamilyLinks`), with
    hrefs to the sibling ``atlases`` ({name: atlas folder}) relative to the atlas folder
    ``out``. Every name in ``atlases`` must be a dictionary of the file."""
    fam = read_families(path)
    i = locate(fam, path, hook=hook, d_sae=d_sae, folders=folders)
    members, levels = fam["members"], fam["levels"]
    names = [member_name(m["path"]) for m in members]
    atlases = dict(atlases or {})
    unknown = sorted(set(atlases) - set(names))
    if unknown:
        raise AtlasError(f"--family-atlas {', '.join(unknown)}: no such dictionary in {path} "
                         f"(its names: {', '.join(names)})")

    def side(j: int) -> dict:
        return {"name": names[j], "d_sae": members[j]["d_sae"], "path": members[j]["path"],
                "href": _href(atlases, names[j], out)}

    meta = {"file": str(path), "min_cos": fam["min_cos"], "this": side(i) | {"href": None},
            "parent": side(i - 1) if i > 0 else None,
            "children": side(i + 1) if i + 1 < len(members) else None}
    parent = parent_cos = children = children_cos = None
    if i > 0:
        lv = levels[i - 1]
        parent_cos = np.asarray(lv["cos"], np.float32)
        parent = np.where(np.asarray(lv["matched"], bool), np.asarray(lv["parent"], np.int64), -1)
    if i + 1 < len(members):
        lv = levels[i]
        children, children_cos = _children(np.asarray(lv["parent"], np.int64),
                                           np.asarray(lv["cos"], np.float32),
                                           np.asarray(lv["matched"], bool), d_sae, max_children)
        meta["children"]["most"] = int((children >= 0).sum(1).max()) if d_sae else 0
    return FamilyLinks(meta, parent, parent_cos, children, children_cos)


def _children(parent, cos, matched, n_parents: int, cap: int):
    """``(ids [n_parents, C], cos [n_parents, C])``: each parent's matched children, most
    similar first (ties: lower id), -1 / NaN padded; ``C`` = the most any parent has (at
    most ``cap``, at least 1)."""
    kids = np.flatnonzero(matched)
    order = kids[np.lexsort((kids, -cos[kids], parent[kids]))]  # by parent, then cosine
    counts = np.bincount(parent[order], minlength=n_parents)
    C = int(max(1, min(cap, counts.max(initial=0))))
    ids = np.full((n_parents, C), -1, np.int64)
    vals = np.full((n_parents, C), np.nan, np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - starts[parent[order]]
    keep = rank < C
    ids[parent[order][keep], rank[keep]] = order[keep]
    vals[parent[order][keep], rank[keep]] = cos[order][keep]
    return ids, vals


def attach(data, links: FamilyLinks) -> None:
    """Put ``links`` into the atlas ``data`` (rows follow ``data.feature_ids``)."""
    rows = np.asarray(data.feature_ids, np.int64)
    data.family_parent = None if links.parent is None else links.parent[rows]
    data.family_parent_cos = None if links.parent_cos is None else links.parent_cos[rows]
    data.family_children = None if links.children is None else links.children[rows]
    data.family_children_cos = None if links.children_cos is None else links.children_cos[rows]
    data.meta["family"] = links.meta


def siblings(parent: np.ndarray, feature_ids: np.ndarray, feature: int) -> np.ndarray:
    """The ids in ``feature_ids`` that share ``feature``'s matched parent, ``feature``
    included (only itself when it has none): what the map colours."""
    parent, ids = np.asarray(parent), np.asarray(feature_ids)
    p = parent[np.flatnonzero(ids == feature)[0]]
    return np.sort(ids[parent == p]) if p >= 0 else np.asarray([feature])


__all__ = ["FamilyLinks", "MAX_CHILDREN", "attach", "family_links", "locate", "member_name",
           "parse_family_atlases", "read_families", "siblings"]
