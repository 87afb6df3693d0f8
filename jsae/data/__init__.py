"""Activation sources: where SAE training batches come from."""

from __future__ import annotations

from jsae.config import RunConfig
from jsae.data.sources import ArraySource, SyntheticSource


def make_source(cfg: RunConfig, process_index: int = 0, process_count: int = 1, model=None):
    """The ActivationSource that ``cfg.data.source`` asks for, for this process's share."""
    d = cfg.data
    if d.source == "synthetic":
        return SyntheticSource(
            d.d_in,
            d.n_features,
            d.active_per_sample,
            noise_std=d.noise_std,
            seed=cfg.seed,
            process_index=process_index,
            process_count=process_count,
        )
    if d.source == "array":
        return ArraySource(
            d.path,
            cfg.model.hooks[0],
            seed=cfg.seed,
            holdout_fraction=d.holdout_fraction,
            process_index=process_index,
            process_count=process_count,
        )
    if d.source == "text":
        from jsae.data.lm_source import TextActivationSource

        if model is None:
            from jsae.models import load

            model = load(cfg.model.path or cfg.model.name, dtype=cfg.model.dtype)
        return TextActivationSource(cfg, model, process_index, process_count)
    if d.source == "cache":
        from jsae.data.cache import CacheActivationSource

        return CacheActivationSource(cfg, process_index, process_count)
    if d.source == "images":
        from jsae.data.images import ImageTextActivationSource

        if model is None:
            from jsae.models import load

            model = load(cfg.model.path or cfg.model.name, dtype=cfg.model.dtype)
        return ImageTextActivationSource(cfg, model, process_index, process_count)
    raise ValueError(f"data.source: unknown source {d.source!r}")


__all__ = ["ArraySource", "SyntheticSource", "make_source"]
