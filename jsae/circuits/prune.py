"""Pruning an attribution graph and scoring it, as circuit-tracer 0.5.0 does (``graph.py``:
``normalize_matrix``, ``compute_influence``, ``prune_graph``, ``compute_graph_scores``), in NumPy.

Influence: rows of |A| normalised to sum 1 (each target's inputs as shares), and a node's
influence on the logits is ``w (B + B^2 + ...)`` with ``w`` the logit nodes' probabilities: the
indirect effects through every path (the series ends: the graph is acyclic). Nodes are kept by
influence up to a cumulative share (default 0.8; tokens and logits always), edges by influence
``B_ij * (influence_i + w_i)`` up to 0.98 of the total, then nodes left without an outgoing edge
(features, errors) or an incoming one (features) are dropped until nothing changes.

Scores: the *replacement score* is the share of the tokens' and errors' influence that is the
tokens' (token -> logit influence that does not end in an error node); the *completeness score*
the influence-weighted share of every node's inputs that are not error nodes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jsae.circuits.graph import Graph


def normalize_matrix(matrix: np.ndarray) -> np.ndarray:
    """|A| with each row divided by its sum (rows of zeros stay zero)."""
    a = np.abs(np.asarray(matrix, np.float32))
    return a / np.maximum(a.sum(1, keepdims=True), np.float32(1e-10))


def compute_influence(A: np.ndarray, logit_weights: np.ndarray, max_iter: int = 1000
                      ) -> np.ndarray:
    """``w A + w A^2 + ...`` until a power is zero (A nilpotent: an acyclic graph)."""
    current = np.asarray(logit_weights, A.dtype) @ A
    influence = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ A
        influence += current
    raise RuntimeError(f"influence did not converge after {max_iter} iterations (a cyclic graph?)")


def logit_weights(graph: Graph) -> np.ndarray:
    """``[n_nodes]``: the logit nodes' probabilities, zero elsewhere."""
    w = np.zeros(graph.adjacency.shape[0], np.float32)
    if graph.n_logits:
        w[-graph.n_logits:] = graph.logit_probabilities
    return w


def node_influence(adjacency: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return compute_influence(normalize_matrix(adjacency), weights)


def edge_influence(pruned: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[n, n]``: each normalised edge times its target's influence plus logit weight."""
    b = normalize_matrix(pruned)
    influence = compute_influence(b, weights) + weights
    return b * influence[:, None]


def find_threshold(scores: np.ndarray, threshold: float) -> float:
    """The score above which the largest scores hold ``threshold`` of the total."""
    s = np.sort(np.asarray(scores).reshape(-1))[::-1]
    cum = np.cumsum(s) / np.sum(s)
    i = min(int(np.searchsorted(cum, threshold)), len(cum) - 1)
    return s[i]


class PruneResult(NamedTuple):
    node_mask: np.ndarray  # [n_nodes] bool
    edge_mask: np.ndarray  # [n_nodes, n_nodes] bool (rows: targets)
    cumulative_scores: np.ndarray  # [n_nodes] each node's cumulative influence share


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98
          ) -> PruneResult:
    """The nodes and edges kept (module docstring)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] (got {v})")
    A = np.asarray(graph.adjacency, np.float32)
    n_tok, n_log, n_feat = graph.n_pos, graph.n_logits, graph.n_features
    w = logit_weights(graph)
    infl = node_influence(A, w)
    node_mask = infl >= find_threshold(infl, node_threshold)
    node_mask[-n_log - n_tok:] = True
    pruned = A.copy()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    scores = edge_influence(pruned, w)
    edge_mask = scores >= find_threshold(scores, edge_threshold)
    inner = slice(0, A.shape[0] - n_log - n_tok)  # features and errors
    old = node_mask.copy()
    node_mask[inner] &= edge_mask[:, inner].any(0)
    node_mask[:n_feat] &= edge_mask[:n_feat].any(1)
    while not np.array_equal(node_mask, old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[inner] &= edge_mask[:, inner].any(0)
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)
    order = np.argsort(-infl, kind="stable")
    cum = np.cumsum(infl[order]) / np.sum(infl)
    final = np.zeros_like(infl)
    final[order] = cum
    return PruneResult(node_mask, edge_mask, final)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score) of the unpruned graph (module docstring)."""
    n_feat, n_tok = graph.n_features, graph.n_pos
    err0, err1 = n_feat, n_feat + n_tok * graph.n_layers
    w = logit_weights(graph)
    b = normalize_matrix(graph.adjacency)
    infl = compute_influence(b, w)
    tok, err = infl[err1:err1 + n_tok].sum(), infl[err0:err1].sum()
    replacement = tok / (tok + err)
    non_error = 1 - b[:, err0:err1].sum(-1)
    out = infl + w
    completeness = (non_error * out).sum() / out.sum()
    return float(replacement), float(completeness)


__all__ = ["PruneResult", "compute_influence", "edge_influence", "find_threshold",
           "graph_scores", "logit_weights", "node_influence", "normalize_matrix", "prune"]
