"""Reading what features mean: top-activating contexts, logit effects, feature search, and
rendering of snippets with the activating token marked.

    >>> from jsae.analysis import top_activations, render_snippets, logit_effects
    >>> top = top_activations(model, sae, "blocks.6.hook_resid_post", contexts, mask, top_n=8)
    >>> print("\\n".join(render_snippets(model.tokenizer, contexts, top, feature=123)))
"""

from jsae.analysis.corpus import corpus_contexts, offline_texts, pack_texts
from jsae.analysis.logits import LogitEffects, direction_logits, feature_directions, logit_effects
from jsae.analysis.render import highlight, render_snippet, render_snippets, token_pieces
from jsae.analysis.run import Run, corpus_stats, load_run, run_hooks
from jsae.analysis.search import SearchResult, rank_scores, search_features
from jsae.analysis.top import TopActivations, default_mask, hook_activations, top_activations

__all__ = [
    "LogitEffects", "Run", "SearchResult", "TopActivations", "corpus_contexts", "corpus_stats", "default_mask",
    "direction_logits", "feature_directions", "highlight", "hook_activations", "logit_effects",
    "load_run", "offline_texts", "pack_texts", "run_hooks", "rank_scores", "render_snippet", "render_snippets",
    "search_features", "token_pieces", "top_activations",
]
