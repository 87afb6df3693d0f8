"""Feature search: which features fire on the tokens of a given text."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jsae.analysis.top import TopActivations, hook_activations
from jsae.sae.core import SAE, encode


@dataclasses.dataclass
class SearchResult:
    """Best features first: ``features [k]``, ``scores [k]``, ``text_max [k]`` and
    ``text_mean [k]`` (over the counted tokens), ``codes [T, k]`` per token of the text,
    ``ids [T]`` the text's tokens (BOS first), ``counted [T]`` the positions that were scored."""

    features: np.ndarray
    scores: np.ndarray
    text_max: np.ndarray
    text_mean: np.ndarray
    codes: np.ndarray
    ids: np.ndarray
    counted: np.ndarray


@jax.jit
def _text_codes(sae, acts):
    return encode(sae, acts)[0]  # [T, F]


def rank_scores(text_max: np.ndarray, text_mean: np.ndarray, corpus: TopActivations | None,
                rank: str) -> np.ndarray:
    """Score per feature (all features, ``[F]``).

    - ``max``: the largest code on the text;
    - ``mean``: the mean code over the text's tokens;
    - ``specific`` (needs corpus statistics over every feature): the text's max code relative to
      the largest code the feature reached on the corpus, weighted by how rare the feature is
      (``-log10`` of its firing frequency): high for features that fire near their peak on this
      text and seldom elsewhere, low for features that fire on most tokens.
    """
    if rank == "max":
        return text_max
    if rank == "mean":
        return text_mean
    if rank == "specific":
        if corpus is None or len(corpus.features) != len(text_max):
            raise ValueError("rank='specific' needs corpus statistics for every feature")
        peak = np.maximum(corpus.max, text_max)
        rel = np.where(peak > 0, text_max / np.maximum(peak, 1e-12), 0.0)
        freq = np.clip(corpus.frequency, 1.0 / max(corpus.n_tokens, 1), 1.0)
        return rel * -np.log10(freq) * (text_max > 0)
    raise ValueError(f"rank must be max, mean or specific; got {rank!r}")


def search_features(
    model,
    sae: SAE,
    hook: str,
    text: str,
    *,
    k: int = 10,
    corpus: TopActivations | None = None,
    rank: str = "auto",
    forward=None,
) -> SearchResult:
    """The ``k`` features that fire most on the tokens of ``text`` (BOS not counted).

    ``rank="auto"`` is ``"specific"`` when ``corpus`` statistics cover every feature (see
    :func:`rank_scores`), else ``"max"``."""
    ids = np.asarray(model.tokenizer.encode(text), np.int32)
    acts = hook_activations(model, hook, ids[None], forward=forward)
    codes = np.asarray(_text_codes(sae, jnp.asarray(acts)))
    bos = model.tokenizer.bos_id
    counted = ids != bos if bos is not None else np.ones(len(ids), bool)
    if not counted.any():
        raise ValueError("the search text has no tokens")
    z = codes[counted]
    text_max, text_mean = z.max(0), z.mean(0)
    if rank == "auto":
        rank = "specific" if corpus is not None and len(corpus.features) == sae.spec.d_sae else "max"
    scores = rank_scores(text_max, text_mean, corpus, rank)
    order = np.argsort(-scores, kind="stable")[:k]
    order = order[scores[order] > 0]
    return SearchResult(order, scores[order], text_max[order], text_mean[order], codes[:, order], ids, counted)
