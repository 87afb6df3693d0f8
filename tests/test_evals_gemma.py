"""Real model: a small TopK dictionary trained on Gemma 3 270M, then `jsae eval` on its run."""

from __future__ import annotations

import json

import pytest

HOOK = "blocks.3.hook_resid_post"
K = 16


@pytest.mark.slow
def test_gemma_trained_dictionary_recovers_loss(tmp_path):
    import jax

    from jsae import config
    from jsae.data.lm_source import TextActivationSource
    from jsae.evals import evaluate_path
    from jsae.models import load
    from jsae.train.loop import Trainer
    from jsae.train.run import Run

    lm = load("gemma-3-270m")
    cfg = config.from_dict({
        "run_dir": str(tmp_path / "run"),
        "model": {"name": "gemma-3-270m", "hooks": [HOOK], "batch_size": 16},
        "data": {"source": "text", "dataset": "offline", "context_length": 64,
                 "shuffle_buffer": 4096},
        "sae": {"architecture": "topk", "d_sae": 2048, "k": K, "init_sample": 1024},
        "train": {"steps": 120, "batch_size": 256, "lr": 2e-3, "lr_warmup_steps": 10,
                  "log_every": 40, "progress": False},
        "eval": {"tokens": 512, "batch_size": 4},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    })
    src = TextActivationSource(cfg, lm)
    Run(cfg, log=lambda s: None).train(Trainer(cfg, src))
    jax.clear_caches()

    out = evaluate_path(tmp_path / "run", model=lm, print_fn=print)
    m = out["metrics"][HOOK]
    print(json.dumps(m, indent=1))
    assert 0.0 < m["ce_recovered_zero"] <= 1.0
    assert 0.0 < m["ce_recovered_mean"] <= 1.0
    assert m["ce_clean"] < m["ce_spliced"] < m["ce_mean_abl"] <= m["ce_zero_abl"] + 1.0
    assert m["l0"] == pytest.approx(K, abs=0.5)  # TopK: exactly k unless a top value is <= 0
    assert 0.0 < m["fvu"] < 0.6 and m["kl_spliced"] > 0
    # SAELens' baseline zeroes BOS too (an attention sink): a worse ablation, so both scores
    # exist, differ, and the field's ce_loss_score is reported under its own name.
    assert m["ce_zero_abl_all"] > m["ce_clean"] and 0.0 < m["ce_loss_score"] <= 1.0
    assert m["ce_loss_score"] != pytest.approx(m["ce_recovered_zero"], abs=1e-4)
    sb = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["saebench"][HOOK]
    assert sb["model_performance_preservation"]["ce_loss_score"] == m["ce_loss_score"]
    assert m["tokens"] >= 512
    assert (tmp_path / "run" / "eval" / "feature_density.png").exists()
