"""Real model: absorption on Gemma 3 270M with a small TopK dictionary trained here: SAEBench's
template reads every sampled word at its own token, the probes learn the first letter far above
chance, and the measure's numbers are complete (the quickstart figures are in the report)."""

from __future__ import annotations

import math

import pytest

HOOK = "blocks.3.hook_resid_post"


@pytest.mark.slow
def test_absorption_on_gemma(tmp_path):
    import jax

    from jsae import config
    from jsae.bench.absorption import measure
    from jsae.data.lm_source import TextActivationSource
    from jsae.models import load
    from jsae.sae.io import load_sae
    from jsae.train.loop import Trainer
    from jsae.train.run import Run

    lm = load("gemma-3-270m")
    cfg = config.from_dict({
        "run_dir": str(tmp_path / "run"),
        "model": {"name": "gemma-3-270m", "hooks": [HOOK], "batch_size": 16},
        "data": {"source": "text", "dataset": "offline", "context_length": 64, "shuffle_buffer": 4096},
        "sae": {"architecture": "topk", "d_sae": 2048, "k": 16, "init_sample": 1024},
        "train": {"steps": 60, "batch_size": 256, "lr": 2e-3, "lr_warmup_steps": 10, "log_every": 30,
                  "progress": False},
        "eval": {"tokens": 256, "batch_size": 4},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    })
    Run(cfg, log=lambda s: None).train(Trainer(cfg, TextActivationSource(cfg, lm)))
    jax.clear_caches()
    sae, _ = load_sae(tmp_path / "run" / "saes" / HOOK)
    res = measure(lm, sae, HOOK, n_words=600, seed=0, batch_size=16, min_letters=1, log=print)
    w = res["words"]
    assert w["vocabulary"] > 100_000 and w["sampled"] == 600 and w["read_at_own_token"] == 1.0
    first = res["metrics"]["first_letter"]
    print(res["metrics"])
    assert first["mean_probe_f1"] > 0.3  # chance for one letter of 26 is ~0.07
    assert first["num_letters_evaluated"] >= 3
    mean = res["metrics"]["mean"]
    assert all(math.isfinite(v) for k, v in mean.items() if not k.startswith("std"))
    assert 0 <= mean["mean_absorption_fraction_score"] <= 1 and mean["mean_num_split_features"] >= 1
