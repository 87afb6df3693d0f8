"""An attribution graph as the JSON that circuit-tracer's frontend and Neuronpedia's graph viewer read.

The schema is circuit-tracer's (``circuit_tracer/frontend/graph_models.py``, written by its
``create_graph_files``): ``metadata`` (slug, scan, transcoder_list, prompt_tokens, prompt,
node_threshold, schema_version), ``qParams`` (the viewer's initial state: pinned ids,
supernodes, ...), ``nodes`` and ``links`` (``{source, target, weight}``; a link's source and
target are node ids). Node ids are formed as circuit-tracer forms them, so a graph from jsae
and one from circuit-tracer over the same features name every node alike:

- feature: ``"{layer}_{feature}_{pos}"``, ``feature`` = Cantor pairing of (layer, feature) (the
  index of its feature-detail file), ``jsNodeId`` ``"{layer}_{feature}-0"``;
- error: ``"0_{layer}_{pos}"``, feature -1;
- token embedding: ``"E_{token id}_{pos}"``, layer ``"E"``, feature = pos;
- logit: ``"{n_layers + 1}_{token id}_{last pos}"``, jsNodeId ``"L_{token id}-{last pos}"``,
  clerp ``Output "tok" (p=0.123)``; the first logit is the target.

Which nodes and links appear is decided by the pruning's masks (``node_mask [n_nodes]``,
``edge_mask [n_nodes, n_nodes]``, rows targets) as circuit-tracer decides it: kept nodes, links
kept by the edge mask between kept nodes, then only nodes with a link (plus every embedding and
logit). Nodes are listed in graph order, links row by row (target-major), weights read from
the adjacency (float32 values as JSON doubles).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jsae.circuits.graph import Graph
from jsae.errors import BadInput

FEATURE_TYPE = "cross layer transcoder"  # circuit-tracer names every feature node so
ERROR_TYPE = "mlp reconstruction error"
SCHEMA_VERSION = 1


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's feature index of (layer, feature): the Cantor pairing."""
    x, y = int(layer), int(feature)
    return (x + y) * (x + y + 1) // 2 + y


def uncantor(z: int) -> tuple[int, int]:
    """(layer, feature) of a Cantor-paired index (the inverse of :func:`cantor`)."""
    w = (math.isqrt(8 * int(z) + 1) - 1) // 2
    y = int(z) - w * (w + 1) // 2
    return w - y, y


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js: str, *,
          token_prob: float = 0.0, is_target_logit: bool = False, clerp: str = "",
          influence: float | None = None, activation: float | None = None) -> dict[str, Any]:
    # every field of circuit-tracer's Node, in its order (so a dump compares key for key)
    return {"node_id": node_id, "feature": int(feature), "layer": layer, "ctx_idx": int(ctx_idx),
            "feature_type": feature_type, "token_prob": float(token_prob),
            "is_target_logit": bool(is_target_logit), "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js, "clerp": clerp, "influence": influence, "activation": activation}


def _check(graph: Graph, node_mask, edge_mask, cumulative_scores, token_strings,
           logit_strings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = graph.adjacency.shape[0]
    want = graph.n_features + (graph.n_layers + 1) * graph.n_pos + graph.n_logits
    if graph.adjacency.shape != (want, want):
        raise BadInput(f"graph adjacency has shape {list(graph.adjacency.shape)}, expected "
                       f"[{want}, {want}] ({graph.n_features} features, {graph.n_layers} layers x "
                       f"{graph.n_pos} positions of errors, {graph.n_pos} tokens, "
                       f"{graph.n_logits} logits)")
    node_mask = np.asarray(node_mask, bool).reshape(-1)
    edge_mask = np.asarray(edge_mask, bool)
    scores = np.asarray(cumulative_scores, np.float32).reshape(-1)
    for name, a, shape in (("node_mask", node_mask, (n,)), ("edge_mask", edge_mask, (n, n)),
                           ("cumulative_scores", scores, (n,))):
        if a.shape != shape:
            raise BadInput(f"{name} has shape {list(a.shape)}, expected {list(shape)} (the graph's "
                           f"{n} nodes)")
    if len(token_strings) != graph.n_pos:
        raise BadInput(f"token_strings has {len(token_strings)} entries, expected {graph.n_pos} "
                       "(one per prompt token)")
    if logit_strings is not None and len(logit_strings) != graph.n_logits:
        raise BadInput(f"logit_strings has {len(logit_strings)} entries, expected "
                       f"{graph.n_logits} (one per logit target)")
    return node_mask, edge_mask, scores


def graph_nodes(graph: Graph, node_mask, cumulative_scores, token_strings: Sequence[str],
                logit_strings: Sequence[str] | None = None,
                clerps: Mapping[tuple[int, int], str] | None = None) -> dict[int, dict]:
    """node index -> node record for every node in ``node_mask`` (circuit-tracer's
    ``create_nodes``). ``clerps``: a label per (layer, feature) (e.g. the atlas's)."""
    feats = np.asarray(graph.active_features, np.int64).reshape(-1, 3)
    acts = np.asarray(graph.activations, np.float32)
    probs = np.asarray(graph.logit_probabilities, np.float32)
    tokens = np.asarray(graph.tokens, np.int64)
    logit_ids = np.asarray(graph.logit_tokens, np.int64)
    scores = np.asarray(cumulative_scores, np.float32)
    logit_strings = list(logit_strings) if logit_strings is not None else [
        f"<{int(t)}>" for t in logit_ids]
    n_feat, n_pos, L = graph.n_features, graph.n_pos, graph.n_layers
    err_end = n_feat + L * n_pos
    tok_end = err_end + n_pos
    logit_layer = str(L + 1)
    nodes: dict[int, dict] = {}
    for i in np.flatnonzero(node_mask).tolist():
        infl = float(scores[i]) if np.isfinite(scores[i]) else None
        if i < n_feat:
            layer, pos, f = (int(v) for v in feats[i])
            nodes[i] = _node(f"{layer}_{f}_{pos}", cantor(layer, f), str(layer), pos, FEATURE_TYPE,
                             f"{layer}_{f}-0", clerp=(clerps or {}).get((layer, f), ""),
                             influence=infl, activation=float(acts[i]))
        elif i < err_end:
            layer, pos = divmod(i - n_feat, n_pos)
            nodes[i] = _node(f"0_{layer}_{pos}", -1, str(layer), pos, ERROR_TYPE, f"{layer}_{pos}-0",
                             influence=infl)
        elif i < tok_end:
            pos = i - err_end
            t = int(tokens[pos])
            nodes[i] = _node(f"E_{t}_{pos}", pos, "E", pos, "embedding", f"E_{t}-{pos}", influence=infl)
        else:
            k = i - tok_end
            t, p, last = int(logit_ids[k]), float(probs[k]), n_pos - 1
            nodes[i] = _node(f"{logit_layer}_{t}_{last}", t, logit_layer, last, "logit",
                             f"L_{t}-{last}", token_prob=p, is_target_logit=k == 0,
                             clerp=f'Output "{logit_strings[k]}" (p={p:.3f})')
    return nodes


def graph_links(graph: Graph, nodes: dict[int, dict], edge_mask) -> list[dict]:
    """``{source, target, weight}`` for every kept edge between kept nodes, target-major."""
    dsts, srcs = np.nonzero(np.asarray(edge_mask, bool))
    weights = np.asarray(graph.adjacency, np.float32)[dsts, srcs].tolist()
    return [{"source": nodes[s]["node_id"], "target": nodes[d]["node_id"], "weight": w}
            for s, d, w in zip(srcs.tolist(), dsts.tolist(), weights) if s in nodes and d in nodes]


def graph_json(graph: Graph, node_mask, edge_mask, cumulative_scores,
               token_strings: Sequence[str], *, slug: str, scan: str | None = None,
               node_threshold: float | None = 0.8, logit_strings: Sequence[str] | None = None,
               clerps: Mapping[tuple[int, int], str] | None = None) -> dict[str, Any]:
    """The graph file (a dict; :func:`dumps` writes it) of ``graph`` pruned by the masks.

    node_mask: bool [n_nodes]; edge_mask: bool [n_nodes, n_nodes] (rows targets);
    cumulative_scores: float [n_nodes] each node's cumulative influence (a node's ``influence``);
    token_strings: the decoded prompt tokens [n_pos]; logit_strings: the decoded logit targets
    [n_logits]; scan: the dictionaries' identifier (default ``graph.scan``); clerps: labels of
    features by (layer, feature).
    """
    node_mask, edge_mask, scores = _check(graph, node_mask, edge_mask, cumulative_scores,
                                          token_strings, logit_strings)
    nodes = graph_nodes(graph, node_mask, scores, token_strings, logit_strings, clerps)
    links = graph_links(graph, nodes, edge_mask)
    connected = {e["source"] for e in links} | {e["target"] for e in links}
    used = [n for n in nodes.values()
            if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    meta = {"slug": str(slug), "scan": str(scan if scan is not None else graph.scan),
            "transcoder_list": [], "prompt_tokens": [str(t) for t in token_strings],
            "prompt": graph.prompt,
            "node_threshold": None if node_threshold is None else float(node_threshold),
            "schema_version": SCHEMA_VERSION}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": used, "links": links}


def dumps(doc: dict) -> str:
    """The graph file's text (indented like circuit-tracer's; non-finite numbers refused)."""
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False)


def graph_metadata(doc: dict) -> dict:
    """``graph-metadata.json`` of a folder holding this one graph (circuit-tracer's list)."""
    return {"graphs": [doc["metadata"]]}


__all__ = ["cantor", "dumps", "graph_json", "graph_links", "graph_metadata", "graph_nodes",
           "uncantor"]
