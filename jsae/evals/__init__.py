"""Evaluation metrics for trained dictionaries."""

from jsae.evals.reconstruction import (
    ReconstructionStats,
    dictionary_recovery,
    reconstruction_metrics,
)

__all__ = ["ReconstructionStats", "dictionary_recovery", "reconstruction_metrics"]
