"""An attribution graph: the direct effects between the nodes of a frozen replacement model.

The node order is circuit-tracer's, so adjacency matrices compare index for index:
``[active features (n_feat), error nodes (n_layers * n_pos, layer-major), token embeddings
(n_pos), logit targets (n_logits)]``. Rows are targets, columns sources:
``adjacency[t, s]`` is the direct effect of a unit of source ``s`` (its activation, its error
vector, its embedding, scaled as the source is) on target ``t`` through the frozen linear paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Graph:
    """Everything `jsae circuit` computes for one prompt (NumPy arrays, host memory).

    prompt: the text attributed; tokens: int32 [n_pos] (BOS included at position 0; BOS has no
    feature or error nodes' effects attributed, as circuit-tracer does).
    active_features: int32 [n_feat, 3] rows of (layer, position, feature index).
    activations: float32 [n_feat] each active feature's activation.
    logit_tokens: int32 [n_logits] the target token ids; logit_probabilities: float32 [n_logits].
    adjacency: float32 [n_nodes, n_nodes], n_nodes = n_feat + n_layers * n_pos + n_pos + n_logits.
    n_layers: layers with a transcoder (error nodes per position).
    scan: the dictionaries' identifier (circuit-tracer's `scan`), e.g. the run's name.
    meta: free-form provenance (model, run, fingerprint, settings).
    """

    prompt: str
    tokens: np.ndarray
    active_features: np.ndarray
    activations: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    adjacency: np.ndarray
    n_layers: int
    scan: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.active_features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    def error_index(self, layer: int, pos: int) -> int:
        """Node index of the error node at (layer, pos)."""
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + pos

    def logit_index(self, i: int) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + i
