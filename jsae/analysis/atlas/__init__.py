"""The feature atlas: every feature's card, its neighbourhood, and maps of all of them."""

from jsae.analysis.atlas.types import AtlasData, LocalMap

__all__ = ["AtlasData", "LocalMap"]
