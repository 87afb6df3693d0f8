"""Evaluation metrics for trained dictionaries (formulas and sources: docs/metrics.md).

- :mod:`jsae.evals.reconstruction`: L0, L1, FVU / explained variance, MSE, cosine similarity,
  relative reconstruction bias, L2 norm ratio, dead / dense latents (streaming, exact totals);
- :mod:`jsae.evals.downstream`: next-token CE and KL with the SAE spliced in, against the clean
  model and zero / mean ablation (CE loss recovered, KL score);
- :mod:`jsae.evals.health`: latent health and the log10 feature-density histogram;
- :mod:`jsae.evals.evaluate`: the ``Evaluator`` over held-out text, ``make_eval_fn`` for the
  training loop and ``evaluate_path`` behind ``jsae eval``.
"""

from jsae.evals.downstream import DownstreamStats, downstream_metrics, splice_intervention
from jsae.evals.evaluate import (
    EvalResult,
    Evaluator,
    eval_contexts,
    evaluate_path,
    format_table,
    load_run_saes,
    make_eval_fn,
    texts_to_contexts,
)
from jsae.evals.health import latent_health, plot_feature_density
from jsae.evals.reconstruction import (
    ReconstructionStats,
    dictionary_recovery,
    reconstruction_metrics,
)

__all__ = [
    "DownstreamStats", "EvalResult", "Evaluator", "ReconstructionStats", "dictionary_recovery",
    "downstream_metrics", "eval_contexts", "evaluate_path", "format_table", "latent_health",
    "load_run_saes", "make_eval_fn", "plot_feature_density", "reconstruction_metrics",
    "splice_intervention", "texts_to_contexts",
]
