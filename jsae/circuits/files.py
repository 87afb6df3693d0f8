"""What `jsae circuit` writes into its folder, from a graph and its pruning.

    <slug>.json             the graph in circuit-tracer's frontend schema (graph_json.py)
    graph-metadata.json     circuit-tracer's list of the graphs in the folder
    features/<scan>/<i>.json  feature-detail files of the graph's features that the atlas
                            holds (i = Cantor pairing of layer and feature; feature_json.py)
    graph.html, graph.js, graph.css, graph-data.js   jsae's viewer (viewer.py)
    circuit.json            jsae's summary: prompt, tokens, targets, scores, settings

So the folder serves both circuit-tracer's own frontend (its local server reads ``<slug>.json``
and ``graph-metadata.json``; its feature panel reads ``features/<scan>/<i>.json``) and
jsae's viewer opened from disk, whose feature nodes open their atlas cards.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jsae.circuits.feature_json import feature_json
from jsae.circuits.graph import Graph
from jsae.circuits.graph_json import dumps, graph_json, graph_metadata
from jsae.circuits.viewer import card_url, write_graph_page

FEATURE_TYPE = "cross layer transcoder"


@dataclass
class LayerAtlases:
    """The atlas of the dictionaries' features: per model layer, its AtlasData; ``index``: the
    site's index.html; ``layered``: a site of several layers (cards at ``#l=L&f=ID``);
    ``offset[layer]``: added to a layer's feature index to get its atlas id (a cross-layer
    transcoder's atlas keeps the latent index ``layer * n + i``)."""

    layers: dict[int, Any]
    index: Path
    layered: bool
    offset: dict[int, int]

    def atlas_id(self, layer: int, feature: int) -> int | None:
        data = self.layers.get(int(layer))
        if data is None:
            return None
        fid = int(feature) + self.offset.get(int(layer), 0)
        return fid if np.any(data.feature_ids == fid) else None


def read_atlases(folder, *, features_per_layer: int | None = None,
                 cross_layer: bool = False) -> LayerAtlases | None:
    """The atlas in ``folder`` (`jsae atlas`'s output: ``atlas-L<layer>.npz`` per layer, or one
    ``atlas.npz`` of one hook), None when there is none."""
    from jsae.analysis.atlas.build import load_atlas

    folder = Path(folder)
    layered = sorted(folder.glob("atlas-L*.npz"))
    layers: dict[int, Any] = {}
    for f in layered:
        m = re.fullmatch(r"atlas-L(\d+)\.npz", f.name)
        if m:
            layers[int(m.group(1))] = load_atlas(f)
    if not layers and (folder / "atlas.npz").is_file():
        data = load_atlas(folder / "atlas.npz")
        m = re.search(r"blocks\.(\d+)\.", str(data.meta.get("hook", "")))
        if m:
            layers[int(m.group(1))] = data
    if not layers:
        return None
    offset = {L: L * int(features_per_layer) for L in layers} if cross_layer and features_per_layer else {}
    return LayerAtlases(layers, folder / "index.html", bool(layered), offset)


def _label(data, fid: int) -> str:
    r = data.row(fid)
    expl = data.explanations[r] if data.explanations is not None else None
    return str(expl or data.labels[r])


def write_circuit(out, graph: Graph, *, node_mask, edge_mask, cumulative_scores,
                  token_strings: Sequence[str], logit_strings: Sequence[str], slug: str = "graph",
                  node_threshold: float = 0.8, atlas: LayerAtlases | None = None,
                  page_dir: Path | None = None, summary: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Write everything above into the folder ``out`` (the command gives a temporary folder
    that becomes ``page_dir``: card links are relative to where the page will live). Returns
    the graph file's dict."""
    out = Path(out)
    page_dir = Path(page_dir or out)
    clerps = {}
    feats = np.asarray(graph.active_features).reshape(-1, 3)
    if atlas is not None:
        for layer, _, f in feats.tolist():
            fid = atlas.atlas_id(layer, f)
            if fid is not None:
                clerps[(layer, f)] = _label(atlas.layers[layer], fid)
    doc = graph_json(graph, node_mask, edge_mask, cumulative_scores, token_strings, slug=slug,
                     node_threshold=node_threshold, logit_strings=logit_strings, clerps=clerps)
    (out / f"{slug}.json").write_text(dumps(doc), encoding="utf-8")
    (out / "graph-metadata.json").write_text(json.dumps(graph_metadata(doc), indent=2),
                                             encoding="utf-8")
    cards: dict[str, str] = {}
    atlas_href = None
    if atlas is not None:
        atlas_href = os.path.relpath(atlas.index, page_dir).replace(os.sep, "/")
        fdir = out / "features" / str(doc["metadata"]["scan"] or "scan")
        for n in doc["nodes"]:
            if n["feature_type"] != FEATURE_TYPE:
                continue
            layer, f = int(n["layer"]), int(n["node_id"].split("_")[1])
            fid = atlas.atlas_id(layer, f)
            if fid is None:
                continue
            cards[n["node_id"]] = card_url(atlas_href, layer if atlas.layered else None, fid)
            fdir.mkdir(parents=True, exist_ok=True)
            detail = feature_json(atlas.layers[layer], fid, layer=layer, index_feature=f,
                                  transcoder_id=doc["metadata"]["scan"])
            (fdir / f"{detail['index']}.json").write_text(json.dumps(detail), encoding="utf-8")
    write_graph_page(out, doc, cards=cards, atlas_href=atlas_href)
    if summary is not None:
        from jsae import jsonsafe

        jsonsafe.write(out / "circuit.json", {
            **summary, "nodes": len(doc["nodes"]), "links": len(doc["links"]),
            "feature_nodes_with_cards": len(cards)})
    return doc


__all__ = ["LayerAtlases", "read_atlases", "write_circuit"]
