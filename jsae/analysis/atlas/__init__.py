"""The feature atlas: every feature's card, its neighbourhood, and maps of all of them.

    >>> from jsae.analysis.atlas import atlas, save_atlas
    >>> data = atlas("runs/quickstart", tokens=200_000)   # one streaming pass, then the analyses
    >>> save_atlas(data, "atlas/atlas.npz")

Modules: ``types`` (AtlasData, the errors); the one pass over the corpus in ``state`` (its
state and jitted update), ``persist`` (saving and resuming it) and ``stream`` (the driver);
``neighbours`` (decoder cosine, co-activation), ``labels``, ``maps`` (UMAP + HDBSCAN, PNGs),
``explain`` (an LLM explainer behind an OpenAI-compatible endpoint), ``neuronpedia`` (export),
``build`` (all of it), ``site`` (the static browser site).
"""

from jsae.analysis.atlas.build import add_local_map, atlas, from_stream, load_atlas, save_atlas
from jsae.analysis.atlas.state import StreamConfig
from jsae.analysis.atlas.stream import stream_text
from jsae.analysis.atlas.types import AtlasData, AtlasError, LocalMap

__all__ = ["AtlasData", "AtlasError", "LocalMap", "StreamConfig", "add_local_map", "atlas",
           "from_stream", "load_atlas", "save_atlas", "stream_text"]
