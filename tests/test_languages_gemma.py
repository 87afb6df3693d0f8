"""Real model: a small TopK dictionary on Gemma 3 270M; parallel en/fr/es Wikipedia summaries
share more active features than unrelated articles do (the ratio is printed)."""

from __future__ import annotations

import json

import pytest

HOOK = "blocks.3.hook_resid_post"


@pytest.mark.slow
def test_parallel_articles_share_more_features_than_unrelated(tmp_path):
    import jax

    from jsae import config
    from jsae.analysis import languages as lg
    from jsae.data.lm_source import TextActivationSource
    from jsae.models import load
    from jsae.sae.io import load_sae
    from jsae.train.loop import Trainer
    from jsae.train.run import Run

    try:
        arts = lg.parallel_articles(("en", "fr", "es"), 24, seed=1)
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"offline corpus not installed: {e}")
    lm = load("gemma-3-270m")
    cfg = config.from_dict({
        "run_dir": str(tmp_path / "run"),
        "model": {"name": "gemma-3-270m", "hooks": [HOOK], "batch_size": 16},
        "data": {"source": "text", "dataset": "offline", "context_length": 64, "shuffle_buffer": 4096},
        "sae": {"architecture": "topk", "d_sae": 2048, "k": 16, "init_sample": 1024},
        "train": {"steps": 80, "batch_size": 256, "lr": 2e-3, "lr_warmup_steps": 10, "log_every": 40,
                  "progress": False},
        "eval": {"tokens": 256, "batch_size": 4},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    })
    Run(cfg, log=lambda s: None).train(Trainer(cfg, TextActivationSource(cfg, lm)))
    jax.clear_caches()
    sae, _ = load_sae(tmp_path / "run" / "saes" / HOOK)
    rep = lg.analyse_languages(lm, {HOOK: sae}, arts, context_length=64, batch_size=8, progress=False)
    ov = rep.hooks[HOOK].overlap
    print(json.dumps(ov["mean_over_pairs"], indent=1))
    for pair, e in ov["pairs"].items():
        assert e["all"]["parallel"] > e["all"]["unrelated"], (pair, e["all"])
        assert e["all"]["frac_parallel_higher"] > 0.5, (pair, e["all"])
    assert ov["mean_over_pairs"]["all"]["ratio"] > 1.05
    fr = rep.hooks[HOOK].fractions()
    assert fr["n_shared"] > 0 and fr["n_specific"] > 0
