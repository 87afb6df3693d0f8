"""What an atlas holds: per-feature statistics, examples, logit effects, neighbours and maps.

:class:`AtlasData` is the one exchange type of the atlas: the streaming pass and the analyses
fill it (``jsae.analysis.atlas.build``), the static site (``site.py``), the Neuronpedia export
and notebooks read it. Everything is NumPy; ``F`` is the number of features in the atlas (rows
follow ``feature_ids``), ``K`` top examples per feature, ``Q`` quantile bands, ``S`` samples per
band, ``W`` tokens per example window, ``H`` histogram bins, ``L`` logit tokens per side,
``N`` neighbours per feature.

An *example* is a window of ``W`` token ids (``-1`` = padding, outside the context) with the
feature's activation at every token of the window; ``*_anchor`` is the index in the window of the
token whose activation made the example (its maximum in the context). Empty example slots have
value 0 and all tokens ``-1``.

The atlas's errors live here too, so that every atlas module can raise them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jsae.errors import JsaeError


class AtlasError(JsaeError, ValueError):
    """Bad input to the atlas (a feature out of range, a corpus too short, ...)."""


class AtlasStateMismatch(AtlasError):
    """A saved partial pass belongs to another dictionary, corpus or setting."""


@dataclasses.dataclass
class LocalMap:
    """The neighbourhood of one feature (``--around``): features within a decoder-cosine radius,
    laid out in 2-D and clustered, like the paper's map around "Inner Conflict"."""

    center: int  # feature id
    radius: float  # cosine distance 1 - cos
    ids: np.ndarray  # [M] feature ids (the center included)
    xy: np.ndarray  # [M, 2]
    cluster: np.ndarray  # [M] int, -1 = unclustered
    cluster_labels: dict[int, str]


@dataclasses.dataclass
class AtlasData:
    meta: dict[str, Any]  # run, hook, model, d_sae, d_in, n_tokens, n_contexts, context_length,
    #                       source ("text" | "cache"), logit_method, created (ISO time)
    feature_ids: np.ndarray  # [F] int64
    density: np.ndarray  # [F] float64, fraction of counted tokens where the code is > 0
    mean_act: np.ndarray  # [F] float32, mean code over the tokens where it fires
    max_act: np.ndarray  # [F] float32
    hist_edges: np.ndarray  # [H + 1] float32, log-spaced, shared by every feature
    hist_counts: np.ndarray  # [F, H] int64, counts of positive codes per bin
    top_value: np.ndarray  # [F, K] float32, descending
    top_tokens: np.ndarray  # [F, K, W] int32
    top_acts: np.ndarray  # [F, K, W] float16
    top_anchor: np.ndarray  # [F, K] int32
    band_edges: np.ndarray  # [F, Q + 1] float32, activation bounds of each quantile band
    band_value: np.ndarray  # [F, Q, S] float32
    band_tokens: np.ndarray  # [F, Q, S, W] int32
    band_acts: np.ndarray  # [F, Q, S, W] float16
    band_anchor: np.ndarray  # [F, Q, S] int32
    band_count: np.ndarray  # [F, Q] int64, tokens whose code fell in the band
    logit_top_ids: np.ndarray  # [F, L] int32, tokens the decoder direction promotes most
    logit_top_vals: np.ndarray  # [F, L] float32
    logit_bottom_ids: np.ndarray  # [F, L] int32, suppresses most
    logit_bottom_vals: np.ndarray  # [F, L] float32
    cos_ids: np.ndarray  # [F, N] int64 nearest features by decoder cosine (-1 = none)
    cos_vals: np.ndarray  # [F, N] float32
    coact_ids: np.ndarray  # [F, N] int64 features that fire on the same tokens (-1 = none)
    coact_vals: np.ndarray  # [F, N] float32 (the co-activation score; meta["coact_score"] names it)
    map_xy: np.ndarray  # [F, 2] float32 (NaN = not on the map, e.g. dead)
    cluster: np.ndarray  # [F] int64, -1 = unclustered
    cluster_labels: dict[int, str]
    labels: list[str]  # [F] short automatic labels
    token_str: dict[int, str]  # id -> text of every token id that appears above
    explanations: list[str | None] | None = None  # [F] written by an explainer LLM
    explanation_scores: np.ndarray | None = None  # [F] detection score of each explanation
    local_maps: list[LocalMap] = dataclasses.field(default_factory=list)
    layer_profile: np.ndarray | None = None  # [F, L] a crosscoder's decoder norm per hook
    #                                          (meta["layer_hooks"]), each row summing to 1
    # feature families across sizes (``--families``; meta["family"] names the dictionaries):
    family_parent: np.ndarray | None = None  # [F] int64 parent in the next smaller (-1 = none)
    family_parent_cos: np.ndarray | None = None  # [F] float32 best cosine to the next smaller
    family_children: np.ndarray | None = None  # [F, C] int64 in the next larger (-1 = empty)
    family_children_cos: np.ndarray | None = None  # [F, C] float32, most similar first

    @property
    def n_features(self) -> int:
        return int(len(self.feature_ids))

    def row(self, feature: int) -> int:
        """Row of a feature id in the arrays."""
        hits = np.flatnonzero(self.feature_ids == int(feature))
        if not len(hits):
            raise KeyError(f"feature {feature} is not in this atlas")
        return int(hits[0])
