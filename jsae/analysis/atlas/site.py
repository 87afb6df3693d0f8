"""The atlas as a static website: a map of every feature and one card per feature.

:func:`write_site` writes a self-contained folder that works from ``file://`` (no server, no
network, no CDN) and from any static server::

    index.html              the map of all features (canvas), search, and the card panel
    around-<id>.html        one page per local map (``AtlasData.local_maps``)
    atlas.js, atlas.css     the viewer (copied from ``site_assets/``)
    data/atlas.js           meta, ids, labels, map positions and clusters of every feature
    data/shard-0003.js      full records of features in rows 768..1023, as columns (loaded
                            when one of them is opened; the first card of a shard ~0.2 s)
    data/tokens.js          the token index behind "which features fire on this text"
    data/around-<id>.js     the positions of one local map

Chromium refuses ``fetch()`` of local files, so every data file is a script that hands its JSON
to a callback (``window.__atlas_shard(3, {...})``); the viewer injects the script tags on demand.
All text is escaped by construction (the viewer only sets ``textContent``; :func:`card_html`
escapes with :func:`html.escape`), and whitespace in tokens is shown visibly (⏎, ⇥, ⍽, ·).

Search: a number is a feature id; words match labels (all words, any order, case-insensitive);
any other text is cut into the index's token strings by greedy longest match (lower-cased,
whitespace skipped, unknown characters dropped) and a feature scores the sum over those tokens
of its weight (:func:`token_index`) times ``ln(1 + n / df)``.

:func:`card_html` renders one card as plain HTML (inline styles, no script) for notebooks
(:func:`show_card` wraps it for display); :func:`screenshot` saves a PNG of a page.
"""

from __future__ import annotations

import concurrent.futures
import html
import json
import math
import re
import shlex
import shutil
from pathlib import Path

import numpy as np

from jsae.analysis.atlas.types import AtlasData
from jsae.errors import require

ASSETS = Path(__file__).with_name("site_assets")
SHARD_SIZE = 256
ACT_LEVELS = 1000  # activations are stored as integers 0..ACT_LEVELS of the feature's max
TOKENS_PER_KEY = 40  # features kept per token string in the token index


# ---------------------------------------------------------------------------------------------
# Numbers and strings


def _num(a, digits: int = 4):
    """Floats rounded to ``digits`` significant digits (NaN/inf -> None), as (nested) lists.

    Vectorised: the integer mantissa is divided (or multiplied) by an exact power of ten, so each
    value is the double nearest its rounded decimal and JSON prints it short."""
    a = np.asarray(a, np.float64)
    ok = np.isfinite(a) & (a != 0)
    e = np.floor(np.log10(np.abs(np.where(ok, a, 1.0))))
    k = np.where(ok, digits - 1 - e, 0)
    up, down = 10.0 ** np.clip(k, 0, None), 10.0 ** np.clip(-k, 0, None)
    r = np.where(k >= 0, np.round(a * up) / up, np.round(a / down) * down)
    r = np.where(np.isfinite(a), r, np.nan)
    out = r.tolist()
    if not np.isfinite(a).all():
        out = _nan_to_none(out)
    return out


def _nan_to_none(x):
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if x != x else x


def _clean_str(s: str) -> str:
    """A string that survives UTF-8 (lone surrogates from byte tokens become U+FFFD)."""
    return s.encode("utf-8", "replace").decode("utf-8") if isinstance(s, str) else str(s)


def _js(name: str, *args) -> str:
    body = ",".join(json.dumps(a, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
                    for a in args)
    return f"{name}({body});\n"


def normalize_token(s: str) -> str:
    """The key of a token string in the token index: SentencePiece's ▁ as a space, surrounding
    whitespace removed, lower case ("" for whitespace-only tokens, which are not indexed)."""
    return s.replace("\u2581", " ").strip().lower()


def visible_token(s: str, context: bool = False) -> str:
    """A token's text with whitespace and control characters made visible: newline ⏎, tab ⇥,
    carriage return ␍, no-break space ⍽, other control characters as \\xNN; SentencePiece's ▁ as
    a space; a token of spaces only as · (except in running text, ``context``, where a space is
    a space; the highlight behind it shows it)."""
    out = []
    for ch in s.replace("\u2581", " "):
        if ch == "\n":
            out.append("⏎")
        elif ch == "\u00a0":
            out.append("⍽")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("␍")
        elif ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else "\ufffd")
        elif ch in "\u2028\u2029":
            out.append("⏎")
        else:
            out.append(ch)
    text = "".join(out)
    if text.strip() or (context and text):
        return text
    return text.replace(" ", "·") or "∅"


# ---------------------------------------------------------------------------------------------
# Examples, records and the token index


def _examples(values: list, tokens: list, q: list, anchors: list) -> list:
    """Compact examples ``[value, anchor, [token ids], [acts as 0..ACT_LEVELS of the feature's
    max]]`` with padding (-1) dropped and empty slots skipped (one feature's [E] / [E, W] lists)."""
    out = []
    for v, toks, qa, a in zip(values, tokens, q, anchors):
        if v is None or not v > 0:
            continue
        a = min(max(a, 0), len(toks) - 1)
        if min(toks) < 0:
            keep = [j for j, t in enumerate(toks) if t >= 0]
            if not keep:
                continue
            a = sum(1 for j in keep if j < a)
            toks, qa = [toks[j] for j in keep], [qa[j] for j in keep]
        out.append([v, a, toks, qa])
    return out


def _pairs(ids: list, vals: list) -> list:
    """``[[ids], [values]]`` without the -1 (none) slots."""
    if not ids or min(ids) >= 0:
        return [ids, vals]
    keep = [j for j, i in enumerate(ids) if i >= 0]
    return [[ids[j] for j in keep], [vals[j] for j in keep]]


def _quantized(acts, peak) -> list:
    """acts [R, ...] as integers 0..ACT_LEVELS of each row's peak [R]."""
    acts = np.asarray(acts, np.float32)
    scale = np.where(peak > 0, ACT_LEVELS / np.where(peak > 0, peak, 1), 0).astype(np.float32)
    scale = scale.reshape((-1,) + (1,) * (acts.ndim - 1))
    return np.clip(np.rint(acts * scale), 0, ACT_LEVELS).astype(np.int32).tolist()


def profile_text(profile, hooks) -> str:
    """A crosscoder feature's layer profile as ``"L3 12% · L6 70% · L9 18%"`` (the layer
    number of each hook when it has one, else the hook's name)."""
    names = []
    for h in hooks or [f"hook {i}" for i in range(len(profile))]:
        m = re.search(r"blocks\.(\d+)\.", str(h))
        names.append(f"L{m.group(1)}" if m else str(h))
    return " · ".join(f"{n} {100 * float(v):.0f}%" for n, v in zip(names, profile))


def feature_records(data: AtlasData, lo: int, hi: int) -> list[dict]:
    """Everything a card shows about the features in rows ``lo:hi``, JSON-ready (the viewer's
    record format), computed a block at a time."""
    sl = slice(lo, hi)
    peak = np.asarray(data.max_act[sl], np.float64)
    ids = np.asarray(data.feature_ids[sl]).astype(np.int64).tolist()
    expl = data.explanations[sl] if data.explanations is not None else [None] * (hi - lo)
    score = (_num(data.explanation_scores[sl]) if data.explanation_scores is not None
             else [None] * (hi - lo))
    density, mean, mx = _num(data.density[sl]), _num(data.mean_act[sl]), _num(peak)
    cluster = np.asarray(data.cluster[sl]).astype(np.int64).tolist()
    hist = np.asarray(data.hist_counts[sl]).astype(np.int64).tolist()
    top = (_num(data.top_value[sl]), np.asarray(data.top_tokens[sl]).tolist(),
           _quantized(data.top_acts[sl], peak), np.asarray(data.top_anchor[sl]).tolist())
    band = (_num(data.band_value[sl]), np.asarray(data.band_tokens[sl]).tolist(),
            _quantized(data.band_acts[sl], peak), np.asarray(data.band_anchor[sl]).tolist())
    edges, counts = _num(data.band_edges[sl]), np.asarray(data.band_count[sl]).astype(np.int64).tolist()
    pairs = {k: (np.asarray(getattr(data, f"{a}_ids")[sl]).astype(np.int64).tolist(),
                 _num(getattr(data, f"{a}_vals")[sl])) for k, a in _PAIRS}
    profile = None if data.layer_profile is None else _num(data.layer_profile[sl])
    fam = _family_columns(data, sl)
    recs = []
    for j in range(hi - lo):
        bands = [[edges[j][b], edges[j][b + 1], counts[j][b],
                  _examples(band[0][j][b], band[1][j][b], band[2][j][b], band[3][j][b])]
                 for b in range(len(counts[j]))]
        recs.append({
            "id": ids[j], "row": lo + j, "label": _clean_str(data.labels[lo + j]),
            "expl": _clean_str(expl[j]) if expl[j] else None, "score": score[j],
            "density": density[j], "mean": mean[j], "max": mx[j], "cluster": cluster[j],
            "hist": hist[j], "top": _examples(top[0][j], top[1][j], top[2][j], top[3][j]),
            "bands": bands, **{k: _pairs(v[0][j], v[1][j]) for k, v in pairs.items()},
            "profile": profile[j] if profile is not None else None,
            "family": _family_record(fam, j),
        })
    return recs


def _family_columns(data: AtlasData, sl: slice) -> dict:
    """The family links of rows ``sl`` as JSON-ready columns (None where the atlas has none)."""
    def ids(a):
        return None if a is None else np.asarray(a[sl]).astype(np.int64).tolist()

    def vals(a):
        return None if a is None else _num(a[sl])

    return {"fam_parent": ids(data.family_parent), "fam_parent_cos": vals(data.family_parent_cos),
            "fam_children_ids": ids(data.family_children),
            "fam_children_vals": vals(data.family_children_cos)}


def _family_record(cols: dict, j: int) -> dict | None:
    """A card's family links: ``parent`` [id (-1: below min_cos), best cosine] in the next
    smaller dictionary and ``children`` [[ids], [cosines]] in the next larger (either None
    where there is no such dictionary); None for an atlas without families (atlas.js's
    ``familyAt`` is the same rule)."""
    if cols["fam_parent"] is None and cols["fam_children_ids"] is None:
        return None
    parent = children = None
    if cols["fam_parent"] is not None:
        parent = [cols["fam_parent"][j], cols["fam_parent_cos"][j]]
    if cols["fam_children_ids"] is not None:
        children = _pairs(cols["fam_children_ids"][j], cols["fam_children_vals"][j])
    return {"parent": parent, "children": children}


def feature_record(data: AtlasData, row: int) -> dict:
    """The card record of the feature in ``row`` (see :func:`feature_records`)."""
    return feature_records(data, row, row + 1)[0]


def shard_payload(data: AtlasData, lo: int, hi: int) -> dict:
    """The features in rows ``lo:hi`` as columns (one list per field, rows in order; an empty
    example slot's tokens and acts are a bare 0), plus the text of every token they mention. The viewer assembles a card's record from row ``j`` of
    these columns (``recordAt`` in atlas.js: the same format as :func:`feature_records`); keeping
    the arrays whole makes writing 10^5 features a matter of ``tolist`` and ``json``."""
    sl = slice(lo, hi)
    peak = np.asarray(data.max_act[sl], np.float64)
    ids = lambda a: np.asarray(a[sl]).astype(np.int64).tolist()  # noqa: E731
    used = np.concatenate([np.asarray(a[sl]).ravel() for a in (
        data.top_tokens, data.band_tokens, data.logit_top_ids, data.logit_bottom_ids)])
    used = np.unique(used[used >= 0]).tolist()
    expl = data.explanations[sl] if data.explanations is not None else None
    top_v, band_v = _num(data.top_value[sl]), _num(data.band_value[sl])
    top_t, top_q = ids(data.top_tokens), _quantized(data.top_acts[sl], peak)
    band_t, band_q = ids(data.band_tokens), _quantized(data.band_acts[sl], peak)
    for j in range(hi - lo):  # empty example slots (dead features, thin bands) become a bare 0
        for k, v in enumerate(top_v[j]):
            if not (v or 0) > 0:
                top_t[j][k] = top_q[j][k] = 0
        for b, vs in enumerate(band_v[j]):
            for k, v in enumerate(vs):
                if not (v or 0) > 0:
                    band_t[j][b][k] = band_q[j][b][k] = 0
    return {
        "lo": lo, "ids": ids(data.feature_ids),
        "labels": [_clean_str(t) for t in data.labels[lo:hi]],
        "expl": [_clean_str(e) if e else None for e in expl] if expl is not None else None,
        "score": _num(data.explanation_scores[sl]) if data.explanation_scores is not None else None,
        "density": _num(data.density[sl]), "mean": _num(data.mean_act[sl]), "max": _num(peak),
        "cluster": ids(data.cluster), "hist": ids(data.hist_counts),
        "top_value": top_v, "top_anchor": ids(data.top_anchor), "top_tokens": top_t, "top_q": top_q,
        "band_edges": _num(data.band_edges[sl]), "band_count": ids(data.band_count),
        "band_value": band_v, "band_anchor": ids(data.band_anchor), "band_tokens": band_t,
        "band_q": band_q,
        **{f"{k}_ids": ids(getattr(data, f"{a}_ids")) for k, a in _PAIRS},
        **{f"{k}_vals": _num(getattr(data, f"{a}_vals")[sl]) for k, a in _PAIRS},
        "profile": None if data.layer_profile is None else _num(data.layer_profile[sl]),
        **_family_columns(data, sl),
        "tokens": {str(t): _token_text(data, t) for t in used},
    }


_PAIRS = (("lt", "logit_top"), ("lb", "logit_bottom"), ("cos", "cos"), ("coact", "coact"))


def _record_tokens(rec: dict) -> set[int]:
    ids = {i for ex in rec["top"] for i in ex[2]}
    ids |= {i for band in rec["bands"] for ex in band[3] for i in ex[2]}
    ids.update(rec["lt"][0], rec["lb"][0])
    return ids


def _token_text(data: AtlasData, i: int) -> str:
    s = data.token_str.get(int(i))
    return _clean_str(s) if s is not None else f"<{int(i)}>"


def token_index(data: AtlasData, per_token: int = TOKENS_PER_KEY) -> dict[str, list[list]]:
    """``normalized token string -> [[feature id, weight], ...]`` (heaviest first, at most
    ``per_token``): a feature's weight for a token is the sum, over its top examples whose anchor
    is that token, of ``value / max_act``, divided by the number of top-example slots (so a
    feature whose every top example peaks on the token has weight 1)."""
    return _token_tables(data, per_token)[0]


def _token_tables(data: AtlasData, per_token: int = TOKENS_PER_KEY):
    """(:func:`token_index`, ``key -> number of features weighted on it`` before the cut)."""
    F, K = data.top_value.shape
    if F == 0 or K == 0:
        return {}, {}
    anchors = np.clip(data.top_anchor, 0, data.top_tokens.shape[2] - 1)
    tok = np.take_along_axis(data.top_tokens, anchors[..., None], axis=2)[..., 0]  # [F, K]
    peak = np.where(data.max_act > 0, data.max_act, 1.0).astype(np.float64)
    weight = np.asarray(data.top_value, np.float64) / peak[:, None] / K
    valid = (tok >= 0) & (data.top_value > 0)
    keys: dict[int, str] = {}
    acc: dict[str, dict[int, float]] = {}
    rows, ks = np.nonzero(valid)
    for r, k in zip(rows.tolist(), ks.tolist()):
        t = int(tok[r, k])
        if t not in keys:
            keys[t] = normalize_token(_token_text(data, t)) if t in data.token_str else ""
        key = keys[t]
        if not key:
            continue
        fid = int(data.feature_ids[r])
        d = acc.setdefault(key, {})
        d[fid] = d.get(fid, 0.0) + float(weight[r, k])
    out = {}
    for key, d in acc.items():
        best = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:per_token]
        out[key] = [[f, float(f"{w:.4g}")] for f, w in best]
    return out, {key: len(d) for key, d in acc.items()}


def _token_payload(data: AtlasData) -> dict:
    """tokens.js: the index, each key's document frequency ``df`` (features with a top example
    on it, before the ``per_token`` cut) and ``n`` (features with any top example). The viewer
    scores a feature by ``sum over the query's tokens of weight * ln(1 + n / df)``, so words
    that peak many features ("the", ",") count for less than rare ones."""
    index, df = _token_tables(data)
    return {"n": int((np.asarray(data.top_value)[:, :1] > 0).sum()), "df": df, "index": index}


def steer_command(meta: dict, feature: int, value: str = "5x",
                  prompt: str = "My favourite place is") -> str:
    """The ``jsae steer`` line that clamps ``feature`` (shell-quoted; a crosscoder's adds
    its decoder rows)."""
    parts = ["jsae", "steer", str(meta.get("run") or "RUN_DIR")]
    if meta.get("hook"):
        parts += ["--hook", str(meta["hook"])]
    parts += ["--feature", str(int(feature)), "--value", value]
    if meta.get("layer_hooks"):  # a crosscoder steers by adding its rows (clamp is acausal)
        parts += ["--mode", "add"]
    parts += ["--prompt", prompt]
    return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------------------------------------
# The map files


def _cluster_table(xy: np.ndarray, cluster: np.ndarray, labels: dict) -> list:
    """``[[cluster id, label, x, y, size], ...]`` with the label placed at the members' median,
    largest clusters first."""
    out = []
    ok = np.isfinite(xy).all(1)
    for c in sorted({int(c) for c in np.asarray(cluster).tolist() if c >= 0}):
        m = ok & (cluster == c)
        if not m.any():
            continue
        x, y = np.median(xy[m], axis=0)
        out.append([c, _clean_str(str(labels.get(c, f"cluster {c}"))), *_num([x, y], 5), int(m.sum())])
    return sorted(out, key=lambda r: -r[4])


def _index_payload(data: AtlasData, shard_size: int) -> dict:
    xy = np.asarray(data.map_xy, np.float64).reshape(-1, 2)
    meta = {}
    for k, v in data.meta.items():
        if k == "family":  # its own entry below
            continue
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, (list, tuple)):  # e.g. a crosscoder's layer_hooks
            v = [str(x) for x in v]
        elif not (isinstance(v, (int, float, str, bool)) or v is None):
            v = str(v)
        meta[str(k)] = v
        if isinstance(v, float) and not math.isfinite(v):
            meta[str(k)] = None
    return {
        "meta": meta, "n": data.n_features, "shard_size": shard_size,
        "ids": np.asarray(data.feature_ids).astype(np.int64).tolist(),
        "labels": [_clean_str(s) for s in data.labels],
        "x": _num(xy[:, 0], 5), "y": _num(xy[:, 1], 5),
        "cluster": np.asarray(data.cluster).astype(np.int64).tolist(),
        "clusters": _cluster_table(xy, np.asarray(data.cluster), data.cluster_labels),
        "hist_edges": _num(data.hist_edges),
        "local_maps": [[int(m.center), float(m.radius), int(len(m.ids))] for m in data.local_maps],
        "has_tokens": True,
        "family": _family_index(data),
    }


def _family_index(data: AtlasData) -> dict | None:
    """The families meta (the dictionaries, their atlases' hrefs) and every feature's parent
    (``parents``, for colouring its siblings on the map; None for the smallest dictionary)."""
    fam = data.meta.get("family")
    if not isinstance(fam, dict):
        return None
    keep = ("name", "d_sae", "href", "most")
    side = {k: ({x: fam[k][x] for x in keep if x in fam[k]} if isinstance(fam.get(k), dict)
                else None) for k in ("this", "parent", "children")}
    parents = (None if data.family_parent is None
               else np.asarray(data.family_parent).astype(np.int64).tolist())
    return {**side, "min_cos": fam.get("min_cos"), "file": str(fam.get("file", "")),
            "parents": parents}


def _local_payload(lm) -> dict:
    xy = np.asarray(lm.xy, np.float64).reshape(-1, 2)
    return {
        "center": int(lm.center), "radius": float(lm.radius),
        "ids": np.asarray(lm.ids).astype(np.int64).tolist(),
        "x": _num(xy[:, 0], 5), "y": _num(xy[:, 1], 5),
        "cluster": np.asarray(lm.cluster).astype(np.int64).tolist(),
        "clusters": _cluster_table(xy, np.asarray(lm.cluster), lm.cluster_labels),
    }


def _page(title: str, page: dict) -> str:
    tpl = (ASSETS / "index.html").read_text(encoding="utf-8")
    cfg = json.dumps(page, ensure_ascii=True).replace("<", "\\u003c")
    return tpl.replace("{{TITLE}}", html.escape(title)).replace("{{PAGE}}", cfg)


def check_atlas(data: AtlasData) -> None:
    """Raise :class:`~jsae.errors.FileFormatError` naming the first field whose shape does not
    fit the others (every per-feature field has ``F`` rows; see :class:`AtlasData`)."""
    from jsae.errors import FileFormatError

    F = data.n_features
    K, Q, H = data.top_value.shape[1], data.band_value.shape[1], data.hist_counts.shape[1]
    want = {
        "density": (F,), "mean_act": (F,), "max_act": (F,), "hist_counts": (F, H),
        "hist_edges": (H + 1,), "top_value": (F, K), "top_anchor": (F, K), "band_edges": (F, Q + 1),
        "band_count": (F, Q), "band_anchor": data.band_value.shape, "map_xy": (F, 2), "cluster": (F,),
        "cos_vals": data.cos_ids.shape, "coact_vals": data.coact_ids.shape,
        "logit_top_vals": data.logit_top_ids.shape, "logit_bottom_vals": data.logit_bottom_ids.shape,
    }
    if data.layer_profile is not None:
        want["layer_profile"] = (F, len(data.meta.get("layer_hooks") or data.layer_profile[0]))
    for name in ("top_tokens", "top_acts"):
        want[name] = (F, K, data.top_tokens.shape[-1])
    for name in ("band_tokens", "band_acts"):
        want[name] = data.band_value.shape + (data.band_tokens.shape[-1],)
    for name in ("cos_ids", "coact_ids", "logit_top_ids", "logit_bottom_ids", "band_value"):
        want[name] = (F,) + tuple(np.shape(getattr(data, name))[1:])
    fam = data.meta.get("family") if isinstance(data.meta.get("family"), dict) else {}
    for ids, vals, side in (("family_parent", "family_parent_cos", "parent"),
                            ("family_children", "family_children_cos", "children")):
        a = getattr(data, ids)
        if (a is None) != (getattr(data, vals) is None) or (a is not None) != isinstance(
                fam.get(side), dict):
            raise FileFormatError(f"atlas data: {ids}, {vals} and meta family.{side} must be "
                                  "present together")
        if a is None:
            continue
        want[ids] = (F,) + ((np.shape(a)[1],) if ids == "family_children" else ())
        want[vals] = want[ids]
        n = fam[side].get("d_sae")
        if a.size and (not isinstance(n, int) or a.min() < -1 or a.max() >= n):
            raise FileFormatError(f"atlas data: {ids} holds ids outside -1..{n}-1 (the "
                                  f"{side} dictionary's features)")
    for name, shape in want.items():
        got = tuple(np.shape(getattr(data, name)))
        if got != tuple(shape):
            raise FileFormatError(f"atlas data: {name} has shape {list(got)}, expected {list(shape)} "
                                  f"({F} features, {K} top examples, {Q} bands, {H} histogram bins)")
    for name in ("labels", "explanations", "explanation_scores"):
        v = getattr(data, name)
        if v is not None and len(v) != F:
            raise FileFormatError(f"atlas data: {name} has {len(v)} entries, expected {F} (one per feature)")
    for lm in data.local_maps:
        M = len(lm.ids)
        if np.shape(lm.xy) != (M, 2) or np.shape(lm.cluster) != (M,):
            raise FileFormatError(f"atlas data: the local map around {lm.center} has {M} ids but xy "
                                  f"{list(np.shape(lm.xy))} and cluster {list(np.shape(lm.cluster))}")


SITE_OWNER = "jsae atlas"  # the command jsae.outputs records as the site folder's writer


def write_site(out_dir, data: AtlasData, *, shard_size: int = SHARD_SIZE,
               progress: bool = True) -> Path:
    """Write the static site of ``data`` into ``out_dir`` (created; files of an older site in
    ``data/`` are replaced) and return the path of its ``index.html``."""
    check_atlas(data)
    out = _start_site(out_dir)
    written = ["atlas.js", "atlas.css", "index.html"]
    written += _write_data(out, "data", data, shard_size, progress)

    meta = data.meta
    name = " · ".join(str(meta[k]) for k in ("model", "hook") if meta.get(k)) or "features"
    (out / "index.html").write_text(_page(f"jsae atlas: {name}", {"kind": "global"}), encoding="utf-8")
    for lm in data.local_maps:
        c = int(lm.center)
        (out / "data" / f"around-{c}.js").write_text(_js("window.__atlas_local", c, _local_payload(lm)),
                                            encoding="ascii")
        (out / f"around-{c}.html").write_text(
            _page(f"jsae atlas: around feature {c}", {"kind": "local", "center": c}), encoding="utf-8")
        written += [f"data/around-{c}.js", f"around-{c}.html"]
    _finish_site(out, written)
    return out / "index.html"


def write_layer_site(out_dir, layers, *, shard_size: int = SHARD_SIZE, progress: bool = True
                     ) -> Path:
    """One site of several layers' atlases (``layers``: :class:`~jsae.analysis.atlas.layers.
    LayerAtlas`, each with ``layer``, ``hook``, ``data``): each layer's map, cards and token
    index in ``data/L<layer>/``, one ``index.html`` with a layer selector (``#l=LAYER&f=ID``)."""
    layers = list(layers)
    if not layers or len({la.layer for la in layers}) != len(layers):
        raise ValueError(f"write_layer_site needs distinct layers, got {[la.layer for la in layers]}")
    for la in layers:
        check_atlas(la.data)
    out = _start_site(out_dir)
    written = ["atlas.js", "atlas.css", "index.html"]
    for la in layers:
        written += _write_data(out, f"data/L{int(la.layer)}", la.data, shard_size, progress)
    meta = layers[0].data.meta
    name = " · ".join(str(meta[k]) for k in ("model",) if meta.get(k)) or "features"
    page = {"kind": "global", "layers": [[int(la.layer), f"{int(la.layer)} ({la.hook}, "
                                          f"{la.data.n_features:,} features)"] for la in layers]}
    (out / "index.html").write_text(_page(f"jsae atlas: {name}, {len(layers)} layers", page),
                                    encoding="utf-8")
    _finish_site(out, written)
    return out / "index.html"


def _start_site(out_dir) -> Path:
    """The site folder, created, with an older site's data scripts and local maps removed
    (only files the marker lists: never a file this writer did not write), viewer copied."""
    from jsae import outputs

    out = Path(out_dir)
    for name in outputs.marked_files(out, SITE_OWNER):
        if _is_data_file(name):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("atlas.js", "atlas.css"):
        shutil.copyfile(ASSETS / name, out / name)
    return out


def _is_data_file(name: str) -> bool:
    return (name.startswith("data/") and name.endswith(".js")) or name.startswith("around-")


def _finish_site(out: Path, written: list[str]) -> None:
    from jsae import outputs

    keep = [f for f in outputs.marked_files(out, SITE_OWNER) if not _is_data_file(f)]
    outputs.write_marker(out, SITE_OWNER, [*keep, *written])


def _write_data(out: Path, sub: str, data: AtlasData, shard_size: int, progress: bool) -> list[str]:
    """``sub/atlas.js`` (the index), ``sub/shard-NNNN.js`` and ``sub/tokens.js`` of ``data``;
    returns their names relative to ``out``."""
    from tqdm.auto import tqdm

    ddir = out / sub
    ddir.mkdir(parents=True, exist_ok=True)
    F = data.n_features
    (ddir / "atlas.js").write_text(_js("window.__atlas_index", _index_payload(data, shard_size)),
                                   encoding="ascii")
    written = [f"{sub}/atlas.js", f"{sub}/tokens.js"]
    n_shards = (F + shard_size - 1) // shard_size
    for s in tqdm(range(n_shards), desc="atlas site", unit="shard", disable=not progress or n_shards < 8,
                  leave=False):
        payload = shard_payload(data, s * shard_size, min(F, (s + 1) * shard_size))
        (ddir / f"shard-{s:04d}.js").write_text(_js("window.__atlas_shard", s, payload), encoding="ascii")
        written.append(f"{sub}/shard-{s:04d}.js")
    (ddir / "tokens.js").write_text(_js("window.__atlas_tokens", _token_payload(data)), encoding="ascii")
    return written


# ---------------------------------------------------------------------------------------------
# One card as HTML, for notebooks


def _fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    a = abs(v)
    if a and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    return f"{v:.3g}" if a < 100 else f"{v:,.0f}"


def _density_text(d: float | None) -> str:
    if not d:
        return "never fired"
    return f"{100 * d:.3g}% of tokens (1 in {1 / d:,.0f})"


def _tok_span(text: str | None, alpha: float, act: float, anchor: bool) -> str:
    if text is None:  # the tail of a byte run (see merge_bytes)
        return f'<span class="tok cont" title="{act:.3g}"></span>'
    style = f"background:rgba(255,106,0,{alpha:.3f})" if alpha > 0 else ""
    cls = "tok anchor" if anchor else "tok"
    special = re.fullmatch(r"<[^<>\s]{1,24}>", text) is not None  # <bos>, byte tokens: muted
    ws = " ws" if special or not text.strip() or any(c in text for c in "\n\t\r") else ""
    return (f'<span class="{cls}{ws}" style="{style}" title="{act:.3g}">'
            f"{html.escape(visible_token(text, context=True))}</span>")


_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def merge_bytes(texts: list[str]) -> list[str | None]:
    """Byte-fallback tokens that together spell characters (``<0xC2><0xA0>`` = U+00A0): the
    text on the first token of each run, None on the others; runs that do not decode stay raw."""
    out: list[str | None] = list(texts)
    i = 0
    while i < len(texts):
        if not _BYTE.fullmatch(texts[i]):
            i += 1
            continue
        j = i
        while j < len(texts) and _BYTE.fullmatch(texts[j]):
            j += 1
        s = bytes(int(_BYTE.fullmatch(t).group(1), 16) for t in texts[i:j]).decode("utf-8", "replace")
        if "\ufffd" not in s:
            out[i:j] = [s] + [None] * (j - i - 1)
        i = j
    return out


def _example_html(ex, tokens: dict[int, str], peak: float) -> str:
    value, anchor, ids, q = ex
    texts = merge_bytes([tokens.get(i, f"<{i}>") for i in ids])
    spans = [_tok_span(t, a / ACT_LEVELS, a / ACT_LEVELS * peak, j == anchor)
             for j, (t, a) in enumerate(zip(texts, q))]
    return (f'<div class="ex"><span class="exv">{_fmt(value)}</span>'
            f'<span class="ctx">{"".join(spans)}</span></div>')


def hist_range(counts, min_bins: int = 8) -> tuple[int, int]:
    """``(a, b)``: the histogram bins a card shows, from one before the first non-empty bin to
    one after the last, widened to at least ``min_bins`` (all bins when none is filled)."""
    counts = list(counts)
    n = len(counts)
    nz = [i for i, c in enumerate(counts) if c > 0]
    if not nz:
        return 0, n
    a, b = max(0, nz[0] - 1), min(n, nz[-1] + 2)
    while b - a < min_bins and (a > 0 or b < n):
        if a > 0:
            a -= 1
        if b - a < min_bins and b < n:
            b += 1
    return a, b


def _hist_svg(counts: list[int], edges: list, width: int = 460, height: int = 90) -> str:
    a, b = hist_range(counts)
    counts, edges = counts[a:b], edges[a:b + 1]
    n = len(counts)
    top = max(counts) if counts and max(counts) > 0 else 1
    bw = width / max(n, 1)
    bars = []
    for i, c in enumerate(counts):
        h = (height - 16) * c / top
        lo, hi = _fmt(edges[i]), _fmt(edges[i + 1])
        bars.append(f'<rect x="{i * bw + 0.5:.1f}" y="{height - 16 - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                    f'height="{h:.1f}" fill="#f08a3c"><title>{lo} to {hi}: {c:,}</title></rect>')
    ticks = "".join(
        f'<text x="{i * bw:.1f}" y="{height - 3}" '
        f'text-anchor="{"start" if i == 0 else "end" if i == n else "middle"}">'
        f"{_fmt(edges[i])}</text>" for i in range(0, n + 1, max(1, n // 4)))
    return (f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="activation histogram">{"".join(bars)}{ticks}</svg>')


def _profile_svg(profile: list, hooks, width: int = 460, height: int = 78) -> str:
    """A feature's layer profile (share of decoder norm per layer written) as bars."""
    n = len(profile)
    bw, base = width / max(n, 1), height - 14
    parts = []
    for i, v in enumerate(profile):
        h = str(hooks[i]) if hooks and i < len(hooks) else f"hook {i}"
        m = re.search(r"blocks\.(\d+)\.", h)
        bar = (base - 2) * max(0.0, float(v or 0))
        parts.append(f'<rect x="{i * bw + 1:.1f}" y="{base - bar:.1f}" width="{max(bw - 2, 0.5):.1f}" '
                     f'height="{bar:.1f}" fill="#3b82f6"><title>{html.escape(h)}: '
                     f'{100 * float(v or 0):.1f}%</title></rect>'
                     f'<text x="{(i + 0.5) * bw:.1f}" y="{height - 3}" text-anchor="middle">'
                     f'{f"L{m.group(1)}" if m else i}</text>')
    return (f'<svg class="hist profile" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="layer profile">{"".join(parts)}</svg>')


def _pairs_html(pairs, name_of, cls: str) -> str:
    pairs = list(zip(*pairs))
    if not pairs:
        return '<div class="muted">none</div>'
    return "".join(f'<div class="{cls}"><span class="pname">{html.escape(name_of(i))}</span>'
                   f'<span class="pval">{_fmt(v)}</span></div>' for i, v in pairs)


def family_lines(fam: dict, meta: dict) -> list[str]:
    """A card's family row as text lines: the parent in the next smaller dictionary and the
    children in the next larger one (``fam``: a record's ``family``; ``meta``: the atlas's
    ``meta["family"]``)."""
    lines = []
    if fam["parent"] is not None:
        p, c = fam["parent"]
        side = meta["parent"]
        what = (f"#{p} (cos {_fmt(c)})" if p >= 0 else
                f"none (best cos {_fmt(c)} < {_fmt(meta.get('min_cos'))})")
        lines.append(f"parent in {side['name']} ({side['d_sae']:,} features): {what}")
    if fam["children"] is not None:
        ids, cos = fam["children"]
        side = meta["children"]
        what = ", ".join(f"#{i} (cos {_fmt(c)})" for i, c in zip(ids, cos)) or "none"
        lines.append(f"children in {side['name']} ({side['d_sae']:,} features): {what}")
    return lines


def _family_html(fam: dict, meta: dict) -> str:
    return "".join(f'<div class="famrow">{html.escape(t)}</div>' for t in family_lines(fam, meta))


def card_html(data: AtlasData, feature: int, *, max_examples: int = 10, style: bool = True) -> str:
    """One feature's card as a self-contained HTML fragment (a ``<style>`` block and inline
    styles, no script), e.g. ``IPython.display.HTML(card_html(data, 1838))`` in a notebook."""
    row = data.row(feature)
    rec = feature_record(data, row)
    tokens = {t: _token_text(data, t) for t in _record_tokens(rec)}
    peak = rec["max"] or 0.0
    labels = {int(i): data.labels[r] for r, i in enumerate(np.asarray(data.feature_ids).tolist())}

    def label_of(i: int) -> str:
        return f"#{i} {labels.get(i, '')}".strip()

    def tok_name(i: int) -> str:
        return visible_token(tokens.get(i, f"<{i}>"))

    parts = ['<div class="jsae-card">']
    if style:
        css = (ASSETS / "atlas.css").read_text(encoding="utf-8")
        parts.insert(0, f"<style>{_scoped_card_css(css)}</style>")
    parts.append(f'<div class="card-head"><span class="fid">Feature {rec["id"]}</span>'
                 f'<span class="flabel">{html.escape(rec["label"])}</span></div>')
    if rec["expl"]:
        sc = f' <span class="muted">(detection score {_fmt(rec["score"])})</span>' if rec["score"] is not None else ""
        parts.append(f'<p class="expl">{html.escape(rec["expl"])}{sc}</p>')
    clabel = data.cluster_labels.get(rec["cluster"]) if rec["cluster"] >= 0 else None
    stats = [("density", _density_text(rec["density"])), ("mean act", _fmt(rec["mean"])),
             ("max act", _fmt(rec["max"]))]
    if clabel:
        stats.append(("cluster", _clean_str(str(clabel))))
    if rec["profile"] is not None:
        stats.append(("writes to", profile_text(rec["profile"], data.meta.get("layer_hooks"))))
    parts.append('<div class="stats">' + "".join(
        f'<div class="stat"><div class="k">{k}</div><div class="v">{html.escape(v)}</div></div>'
        for k, v in stats) + "</div>")
    if rec["family"] is not None:
        parts.append("<h3>Family across sizes</h3>" + _family_html(rec["family"], data.meta["family"]))
    if rec["profile"] is not None:
        parts.append("<h3>Layer profile</h3>" + _profile_svg(rec["profile"], data.meta.get("layer_hooks")))
    parts.append('<h3>Activation histogram</h3>' + _hist_svg(rec["hist"], _num(data.hist_edges)))
    parts.append('<div class="cols"><div><h3>Promotes</h3>'
                 + _pairs_html(rec["lt"], tok_name, "pair pos") + '</div><div><h3>Suppresses</h3>'
                 + _pairs_html(rec["lb"], tok_name, "pair neg") + "</div></div>")
    parts.append("<h3>Top activations</h3>")
    parts += [_example_html(ex, tokens, peak) for ex in rec["top"][:max_examples]] or \
        ['<div class="muted">no activations</div>']
    for lo, hi, count, exs in reversed(rec["bands"]):
        if not exs:
            continue
        parts.append(f'<h4>{_fmt(lo)} – {_fmt(hi)} <span class="muted">({count:,} tokens)</span></h4>')
        parts += [_example_html(ex, tokens, peak) for ex in exs[:max_examples]]
    parts.append('<div class="cols"><div><h3>Decoder-cosine neighbours</h3>'
                 + _pairs_html(rec["cos"], label_of, "pair") + "</div><div><h3>Co-activation</h3>"
                 + _pairs_html(rec["coact"], label_of, "pair") + "</div></div>")
    parts.append(f'<h3>Steer with it</h3><pre class="cmd">{html.escape(steer_command(data.meta, rec["id"]))}</pre>')
    parts.append("</div>")
    return "\n".join(parts)


def show_card(data: AtlasData, feature: int, **kw):
    """``IPython.display.HTML`` of :func:`card_html` (the last line of a notebook cell shows it)."""
    display = require("IPython.display", "notebook", "showing a card in a notebook")
    return display.HTML(card_html(data, feature, **kw))


def _scoped_card_css(css: str) -> str:
    """The card rules of atlas.css (between the CARD markers; each is scoped to ``.jsae-card``)."""
    m = re.search(r"/\* CARD START \*/(.*)/\* CARD END \*/", css, re.S)
    return m.group(1) if m else ""


# ---------------------------------------------------------------------------------------------
# Screenshots (README, papers): headless Chromium through playwright


BROWSER_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run")


def screenshot(page_html, png, *, feature: int | None = None, card_only: bool = False,
               size: tuple[int, int] = (1400, 820), executable: str | None = None,
               colors: int | None = 256, layer: int | None = None) -> Path:
    """Save a PNG of a written site page (``index.html`` or ``around-<id>.html``) in headless
    Chromium, with ``feature``'s card open; ``card_only`` keeps just the card panel (the page
    made tall enough to show the top activations). ``colors`` quantises the PNG (pillow) to keep
    it small. ``layer``: the layer shown by a site of several (:func:`write_layer_site`).
    Needs ``playwright`` and a Chromium (``executable``, default the system's)."""
    sync_playwright = require("playwright.sync_api", "test", "site screenshots").sync_playwright
    exe = executable or shutil.which("chromium") or shutil.which("chromium-browser")
    route = ([f"l={int(layer)}"] if layer is not None else []) + (
        [f"f={int(feature)}"] if feature is not None else [])
    url = Path(page_html).resolve().as_uri() + ("#" + "&".join(route) if route else "")
    w, h = size

    def shoot():
        with sync_playwright() as pw:
            _shoot(pw, exe, url, png, feature, card_only, w, h)

    # playwright's sync API refuses a thread with a running asyncio loop (Jupyter, other
    # playwright sessions): run it in a thread of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(shoot).result()
    if colors:
        try:
            from PIL import Image
        except ImportError:
            return Path(png)
        Image.open(png).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                                dither=Image.Dither.NONE).save(png, optimize=True)
    return Path(png)


def _shoot(pw, exe, url, png, feature, card_only, w, h) -> None:
    browser = pw.chromium.launch(executable_path=exe, args=list(BROWSER_ARGS))
    try:
        page = browser.new_page(viewport={"width": w, "height": h})
        page.goto(url)
        wait = "window.atlas && atlas.ready && atlas.cardReady"
        if feature is not None:
            wait += f" && atlas.current === {int(feature)}"
        page.wait_for_function(wait, timeout=120_000)
        page.wait_for_timeout(300)  # one more frame for the canvas
        if card_only:
            page.screenshot(path=str(png), clip=page.locator("#panel").bounding_box())
        else:
            page.screenshot(path=str(png))
    finally:
        browser.close()
