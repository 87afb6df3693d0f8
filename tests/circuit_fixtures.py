"""A small random attribution graph (no model needed) for the graph JSON and viewer tests.

The adjacency is a DAG in the replacement model's order: tokens feed features and errors of
any layer and the logits; a layer's features and errors feed later layers' features and the
logits, at the same or later positions; nothing feeds tokens or errors. That is what
circuit-tracer's pruning needs (its influence series must terminate).
"""

from __future__ import annotations

import numpy as np

from jsae.circuits import Graph


def random_graph(seed: int = 0, *, n_layers: int = 3, n_pos: int = 5, n_feat: int = 14,
                 n_logits: int = 3, d_sae: int = 40, vocab: int = 50) -> Graph:
    rng = np.random.default_rng(seed)
    layer = np.sort(rng.integers(0, n_layers, n_feat))
    pos = rng.integers(1, n_pos, n_feat)  # BOS (position 0) has no features, as attributed
    feat = rng.integers(0, d_sae, n_feat)
    active = np.stack([layer, pos, feat], 1).astype(np.int32)
    active = np.unique(active, axis=0)  # (layer, pos, feature) sorted, as the attribution lists them
    n_feat = len(active)
    n = n_feat + (n_layers + 1) * n_pos + n_logits
    lev = np.empty(n)  # the node's layer: tokens -1, logits n_layers
    at = np.empty(n, np.int64)  # its position
    lev[:n_feat], at[:n_feat] = active[:, 0], active[:, 1]
    e = np.arange(n_layers * n_pos)
    lev[n_feat:n_feat + len(e)], at[n_feat:n_feat + len(e)] = e // n_pos, e % n_pos
    t0 = n_feat + len(e)
    lev[t0:t0 + n_pos], at[t0:t0 + n_pos] = -1, np.arange(n_pos)
    lev[t0 + n_pos:], at[t0 + n_pos:] = n_layers, n_pos - 1
    is_err = np.zeros(n, bool)
    is_err[n_feat:t0] = True
    src_ok = lev[None, :] < lev[:, None]
    src_ok &= at[None, :] <= at[:, None]
    src_ok[is_err] = False  # errors and tokens have no inputs
    src_ok[t0:t0 + n_pos] = False
    src_ok[:, t0 + n_pos:] = False  # logits feed nothing
    adj = (rng.standard_normal((n, n)) * (rng.random((n, n)) < 0.6) * src_ok).astype(np.float32)
    probs = np.sort(rng.dirichlet(np.ones(n_logits + 2)))[::-1][:n_logits].astype(np.float32)
    tokens = np.concatenate([[2], rng.integers(3, vocab, n_pos - 1)]).astype(np.int32)
    return Graph(prompt="The capital of France is", tokens=tokens, active_features=active,
                 activations=rng.uniform(0.5, 5, n_feat).astype(np.float32),
                 logit_tokens=rng.choice(np.arange(3, vocab), n_logits, replace=False).astype(np.int32),
                 logit_probabilities=probs, adjacency=adj, n_layers=n_layers, scan="test-scan")


def token_strings(graph: Graph) -> list[str]:
    return ["<bos>" if t == 2 else f" w{int(t)}" for t in graph.tokens]


def logit_strings(graph: Graph) -> list[str]:
    return [f" w{int(t)}" for t in graph.logit_tokens]


def keep_all(graph: Graph, edge_quantile: float = 0.5, seed: int = 0):
    """Masks keeping every node and the heavier half of the edges, and made-up cumulative scores
    (the viewer tests need a graph, not a faithful pruning)."""
    rng = np.random.default_rng(seed)
    n = graph.adjacency.shape[0]
    w = np.abs(graph.adjacency)
    cut = np.quantile(w[w > 0], edge_quantile)
    return np.ones(n, bool), w >= cut, rng.uniform(0, 1, n).astype(np.float32)
