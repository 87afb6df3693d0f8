"""Real model: `jsae bench`'s measures on Gemma 3 270M with one small TopK dictionary (layer 3,
2,048 features, 60 steps) trained once here for every measure.

Absorption: SAEBench's template reads every sampled word at its own token, the probes learn the
first letter far above chance, the numbers are complete. Probing, languages and the offline
autointerp score: through the CLI as a user runs it, SAEBench's layout written. (The quickstart
figures are in README.)
"""

from __future__ import annotations

import json
import math

import pytest

from jsae import cli

HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import jax

    from jsae import config
    from jsae.data.lm_source import TextActivationSource
    from jsae.models import load
    from jsae.train.loop import Trainer
    from jsae.train.run import Run

    try:
        lm = load("gemma-3-270m")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"offline model not installed: {e}")
    root = tmp_path_factory.mktemp("bench_gemma")
    cfg = config.from_dict({
        "run_dir": str(root / "run"),
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
    return lm, root


@pytest.mark.slow
def test_absorption_on_gemma(trained):
    from jsae.bench.absorption import measure
    from jsae.sae.io import load_sae

    lm, root = trained
    sae, _ = load_sae(root / "run" / "saes" / HOOK)
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


@pytest.mark.slow
def test_probing_languages_and_autointerp_through_the_cli(trained):
    pytest.importorskip("babel")
    from jsae.bench import _lexicon
    from jsae.bench import languages as ml

    lm, root = trained
    # surface tokens on the real tokenizer: "France" in French is English's token, "Frankreich" is not
    lex = _lexicon.names(["en", "fr", "de", "ja"], ["countries"])
    toks = ml.build_sentences(lm.tokenizer, lex, ["en", "fr", "de", "ja"])["countries"]["name_tokens"]
    assert toks["FR", "fr"] & toks["FR", "en"] and not toks["FR", "de"] & toks["FR", "en"]
    assert not toks["FR", "ja"] & toks["FR", "en"]
    out, summary = root / "bench", root / "bench.json"
    assert cli.main(["bench", str(root / "run"), "--only", "probing,languages,autointerp",
                     "--out", str(out), "--json", str(summary),
                     "--probing-datasets", "language,concepts", "--probing-train", "16", "--probing-test", "8",
                     "--probing-context-length", "64", "--probing-k", "1,5",
                     "--languages-langs", "en,fr,de,ja", "--languages-categories", "countries,months",
                     "--autointerp-features", "20", "--autointerp-contexts", "96"]) == 0
    probe = json.loads((out / "sparse_probing.json").read_text())
    det = {d["dataset_name"]: d for d in probe["eval_result_details"]}
    assert det["wikipedia_summaries/language"]["llm_test_accuracy"] >= 0.9  # language id is easy for the LM
    for group in probe["eval_result_metrics"].values():
        assert all(0.0 <= v <= 1.0 for v in group.values())
    langs = json.loads((out / "multilingual_concepts.json").read_text())
    m = langs["eval_result_metrics"]["all"]
    print(json.dumps(m, indent=1), json.dumps(langs["eval_result_unstructured"]["claim"], indent=1))
    assert m["n_concepts"] == 52 and m["n_languages"] == 4 and m["n_concept_features"] > 0
    assert 0 <= m["cross_lingual_share"] <= 1 and 0 <= m["cross_lingual_share_control"] <= 1
    ai = json.loads((out / "autointerp.json").read_text())
    off = ai["eval_result_metrics"]["offline"]
    assert 0 <= off["label_detection_balanced_accuracy"] <= 1 and off["n_features"] > 0
    doc = json.loads(summary.read_text())
    assert set(doc["measures"]) == {"probing", "languages", "autointerp"}
    for name, eval_id in (("probing", "sparse_probing"), ("languages", "multilingual_concepts"),
                          ("autointerp", "autointerp")):
        assert doc["measures"][name]["eval_type_id"] == eval_id
        assert json.loads((out / f"{eval_id}.json").read_text())["eval_type_id"] == eval_id
