"""Circuits: attribution graphs over a replacement model of transcoders or a cross-layer transcoder.

`attribute` (the graph of a prompt: `jsae.circuits.attribution`), `prune` / `graph_scores`
(circuit-tracer's pruning and replacement / completeness scores: `jsae.circuits.prune`),
`intervene` (set features on the real model: `jsae.circuits.intervene`); the frozen replacement
model itself is `jsae.circuits.replacement`, the transcoders' one form `jsae.circuits.dictionaries`.
"""

from jsae.circuits.attribution import attribute
from jsae.circuits.dictionaries import Dictionaries
from jsae.circuits.graph import Graph
from jsae.circuits.intervene import intervene
from jsae.circuits.prune import PruneResult, graph_scores, prune

__all__ = ["Dictionaries", "Graph", "PruneResult", "attribute", "graph_scores", "intervene",
           "prune"]
