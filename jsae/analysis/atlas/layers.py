"""The atlas of every layer of a run that replaces several layers: a transcoder set (one
dictionary per layer, ``saes/set.json``) or one dictionary whose latents are grouped by the
layer they read (``Arch.feature_layers``, e.g. a cross-layer transcoder). One streaming pass
over the corpus captures every layer's input at once (a set's dictionaries side by side, or
the grouped dictionary's encoder on all layers ``[B, T, L, d]``); the result is one
:class:`~jsae.analysis.atlas.types.AtlasData` per layer, written as one site with a layer
selector (:func:`jsae.analysis.atlas.site.write_layer_site`).

    >>> from jsae.analysis.atlas.layers import layer_atlases
    >>> for la in layer_atlases("runs/clt", tokens=100_000):
    ...     print(la.layer, la.data.n_features, la.data.layer_profile.shape)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from jsae.analysis.atlas.state import StreamConfig
from jsae.analysis.atlas.types import AtlasData, AtlasError

# AtlasData fields that are not per feature (everything else has the features as leading axis)
_SHARED = ("meta", "hist_edges", "cluster_labels", "token_str", "local_maps")


@dataclasses.dataclass
class LayerAtlas:
    layer: int  # the model layer whose input its features read
    hook: str  # that input hook
    data: AtlasData


@dataclasses.dataclass
class LayerPlan:
    """What a layered atlas reads: ``keys`` (dictionary key -> SAE) and, per layer, the key
    and, for a grouped dictionary, the latents of that layer."""

    saes: dict
    layers: list[tuple[int, str, str, np.ndarray | None]]  # (layer, input hook, key, rows)
    member: str | None = None  # a family's member, whose set it is


def _layer_of(hook: str, default: int) -> int:
    m = re.search(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else default


def layer_plan(run_dir, member: str | None = None) -> LayerPlan | None:
    """The layers of ``run_dir`` (of a family of sets: member ``member``'s) when it replaces
    several (a set of several dictionaries, or one dictionary whose latents read one layer
    each); None for any other run."""
    from jsae.runs import input_hooks, member_hooks, read_set, run_hooks, sae_from_run
    from jsae.sae.archs import get_arch

    rec = read_set(run_dir, member)
    keys = list(rec["dictionaries"]) if rec else (
        run_hooks(run_dir) if member is None else member_hooks(run_dir, member))
    if len(keys) > 1 and rec:
        saes = {k: sae_from_run(run_dir, k)[0] for k in keys}
        d_ins = {int(s.spec.d_in) for s in saes.values()}
        if len(d_ins) > 1:
            raise AtlasError(f"{run_dir}: the set's layers disagree in d_in ({sorted(d_ins)}); "
                             "atlas one with --hook")
        return LayerPlan(saes, [(int(p["layer"]), p["input_hook"], p["key"], None)
                                for p in rec["per_layer"]], member)
    if len(keys) != 1:
        return None
    sae = sae_from_run(run_dir, keys[0])[0]
    groups = get_arch(sae.spec.architecture).feature_layers(sae.spec)
    if groups is None:
        return None
    hooks = input_hooks(keys[0])
    named = {p["input_hook"]: int(p["layer"]) for p in (rec or {}).get("per_layer", [])}
    return LayerPlan({keys[0]: sae}, [
        (named.get(h, _layer_of(h, i)), h, keys[0], np.flatnonzero(groups == i))
        for i, h in enumerate(hooks)], member)


def subset(data: AtlasData, rows: np.ndarray, meta: dict | None = None) -> AtlasData:
    """The atlas of the features in ``rows`` only (ids kept; local maps and clusters shared)."""
    rows = np.asarray(rows, np.int64)
    kw = {}
    for f in dataclasses.fields(data):
        v = getattr(data, f.name)
        if f.name in _SHARED or v is None:
            kw[f.name] = v
        elif isinstance(v, list):
            kw[f.name] = [v[r] for r in rows.tolist()]
        else:
            kw[f.name] = np.asarray(v)[rows]
    kw["meta"] = {**data.meta, **(meta or {})}
    kw["local_maps"] = []
    return AtlasData(**kw)


def layer_atlases(run_dir, *, model=None, tokens: int = 200_000, context_length: int = 128,
                  cfg: StreamConfig = StreamConfig(), batch_size: int = 32, n_logits: int = 10,
                  n_neighbours: int = 10, maps: bool = True, seed: int = 0,
                  state_dir: str | Path | None = None, texts=None, cache=None,
                  map_method: str = "umap", progress: bool = True,
                  plan: LayerPlan | None = None) -> list[LayerAtlas]:
    """Every layer's atlas of a set or a layer-grouped dictionary (see the module doc), from
    one pass over ``tokens`` tokens. A grouped dictionary's features keep their ids (latent
    index) and carry their layer profile (``Arch.layer_profile``: where each writes)."""
    from jsae.analysis.atlas.build import contexts, from_stream, stream_pass
    from jsae.runs import read_set

    plan = plan or layer_plan(run_dir)
    if plan is None:
        raise AtlasError(f"{run_dir} is neither a set nor a dictionary grouped by layer; "
                         "build its atlas without the layer selector")
    if model is None:
        from jsae.analysis.run import load_run

        model = load_run(run_dir, next(iter(plan.saes))).model
    tok, msk = contexts(model, tokens, context_length, seed, texts, cache, cfg)
    res = stream_pass(model, plan.saes, tok, msk, cfg, cache=cache, batch_size=batch_size,
                      state_dir=state_dir, progress=progress)
    base = {"run": str(run_dir), "model": str(getattr(model, "name", "")),
            "source": f"cache {cache}" if cache is not None else "text", "map_method": map_method}
    rec = read_set(run_dir, plan.member) or {}
    outs = [p["output_hook"] for p in rec.get("per_layer", [])]
    whole = {}
    out = []
    for layer, hook, key, rows in plan.layers:
        meta = {**base, "layer": layer, "layer_hook": hook}
        if key not in whole:
            whole[key] = from_stream(res[key], plan.saes[key], model, hook=key, n_logits=n_logits,
                                     n_neighbours=n_neighbours, maps=maps, seed=seed, meta=meta,
                                     progress=progress, map_method=map_method)
        data = whole[key]
        if rows is not None:
            if data.layer_profile is not None and len(outs) == data.layer_profile.shape[1]:
                meta["layer_hooks"] = outs  # a profile is over the layers written
            data = subset(data, rows, meta)
        out.append(LayerAtlas(layer, hook, data))
    return out
