"""Circuits: attribution graphs over a replacement model of transcoders or a cross-layer transcoder."""

from jsae.circuits.graph import Graph

__all__ = ["Graph"]
