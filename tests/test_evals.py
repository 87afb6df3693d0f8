"""Evaluation metrics against NumPy references; CE recovered on a tiny random LM."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sae_reference import np_forward, np_params
from test_steering_helpers import TinyModel, random_sae, tiny_config

from jsae.evals import (
    DownstreamStats,
    Evaluator,
    ReconstructionStats,
    latent_health,
    make_eval_fn,
    plot_feature_density,
    texts_to_contexts,
)
from jsae.evals.downstream import downstream_metrics, variant_plan
from jsae.models.transformer import forward
from jsae.sae import SAE, SAESpec

HOOK = "blocks.1.hook_resid_post"
TEXTS = [
    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate strait.",
    "Paris is the capital and most populous city of France.",
    "A sparse autoencoder learns an overcomplete dictionary of features.",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
] * 2


# ---- NumPy references ------------------------------------------------------------------------


def np_recon_metrics(x, x_hat, z, dense=0.1):
    x, x_hat, z = (np.asarray(a, np.float64) for a in (x, x_hat, z))
    n, d = x.shape
    resid = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    nx, nxh = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    dens = (z != 0).mean(0)
    return {
        "fvu": resid / total,
        "explained_variance": 1 - resid / total,
        "mse": resid / (n * d),
        "l0": (z != 0).sum(1).mean(),
        "l1": np.abs(z).sum(1).mean(),
        "cos_sim": ((x * x_hat).sum(1) / (nx * nxh)).mean(),
        "rel_recon_bias": (nxh**2).mean() / (x * x_hat).sum(1).mean(),
        "l2_ratio": (nxh / nx).mean(),
        "l2_norm_in": nx.mean(),
        "l2_norm_out": nxh.mean(),
        "dead_frac": (dens == 0).mean(),
        "dense_frac": (dens > dense).mean(),
        "tokens": n,
    }


def np_sae_outputs(sae, x):
    p = np_params(sae)
    s = float(sae.norm_scale)
    _, z, xh_n = np_forward(p, sae.spec.architecture, np.asarray(x, np.float64) * s, k=getattr(sae.spec.options, "k", None))
    return z, xh_n / s


def identity_sae(d: int) -> SAE:
    """relu(x) - relu(-x) = x: a 2d-latent ReLU SAE that reconstructs exactly."""
    eye = np.eye(d, dtype=np.float32)
    params = {
        "W_enc": jnp.asarray(np.concatenate([eye, -eye], 1)),
        "b_enc": jnp.zeros(2 * d),
        "W_dec": jnp.asarray(np.concatenate([eye, -eye], 0)),
        "b_dec": jnp.zeros(d),
    }
    return SAE(params, jnp.float32(1.0), SAESpec("relu", d, 2 * d))


def constant_sae(c: np.ndarray) -> SAE:
    """An SAE whose reconstruction is always ``c`` (W_dec = 0, b_dec = c); shaped like
    ``identity_sae`` so both run through the same compiled program."""
    d = len(c)
    d_sae = 2 * d
    rng = np.random.default_rng(0)
    params = {
        "W_enc": jnp.asarray(rng.normal(size=(d, d_sae)), jnp.float32),
        "b_enc": jnp.zeros(d_sae),
        "W_dec": jnp.zeros((d_sae, d)),
        "b_dec": jnp.asarray(c, jnp.float32),
    }
    return SAE(params, jnp.float32(1.0), SAESpec("relu", d, d_sae))


# ---- reconstruction and sparsity ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_reconstruction_metrics_match_numpy(arch):
    rng = np.random.default_rng(1)
    d, n = 16, 300
    # a large common offset: FVU must subtract the mean exactly (no cancellation)
    x = (rng.normal(size=(n, d)) * 2 + 40.0).astype(np.float32)
    sae = random_sae(arch, d, 64, seed=3, k=5, sample=x[:128])
    sae = sae.replace(norm_scale=jnp.float32(0.37))
    mask = rng.random(n) > 0.25
    stats = ReconstructionStats()
    for s, e in [(0, 100), (100, 200), (200, 300)]:  # batches of different masked counts
        stats.add(sae, x[s:e], mask[s:e])
    got = stats.result()
    z, x_hat = np_sae_outputs(sae, x[mask])
    ref = np_recon_metrics(x[mask], x_hat, z)
    assert set(ref) <= set(got)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=2e-4, abs=1e-6), k
    assert got["dead_frac"] > 0 and got["dense_frac"] > 0  # both branches exercised
    np.testing.assert_allclose(stats.feature_counts, (z != 0).sum(0))
    np.testing.assert_allclose(stats.mean, x[mask].astype(np.float64).mean(0), rtol=1e-6)


def test_reconstruction_stats_batch_invariant_and_3d():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 10, 8)).astype(np.float32)
    mask = rng.random((4, 10)) > 0.3
    sae = random_sae("topk", 8, 32, seed=0, k=3)
    a = ReconstructionStats()
    a.add(sae, x, mask)
    b = ReconstructionStats()
    for i in range(4):
        b.add(sae, x[i], mask[i])
    c = ReconstructionStats(max_elements=32 * 7)  # a "big dictionary": chunks of 7 rows
    c.add(sae, x, mask)
    ra, rb, rc = a.result(), b.result(), c.result()
    for k in ra:
        assert ra[k] == pytest.approx(rb[k], rel=1e-5), k
        assert ra[k] == pytest.approx(rc[k], rel=1e-5), k
    np.testing.assert_array_equal(a.feature_counts, c.feature_counts)
    assert ra["tokens"] == mask.sum()
    with pytest.raises(ValueError):
        ReconstructionStats().result()


def test_latent_health_and_plot(tmp_path):
    counts = np.array([0, 0, 1, 5, 50, 200, 999, 0])
    h = latent_health(counts, 1000)
    assert h["dead"] == 3 and h["dense"] == 2  # 200/1000 and 999/1000 > 10%
    assert h["dead_frac"] == pytest.approx(3 / 8) and h["dense_frac"] == pytest.approx(2 / 8)
    alive = np.log10(counts[counts > 0] / 1000)
    assert h["log10_density_median"] == pytest.approx(np.median(alive))
    png = plot_feature_density({"a": counts / 1000, "b/c": np.zeros(4)}, tmp_path / "d.png",
                               n_tokens={"a": 1000})
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


# ---- downstream: CE / KL with the SAE spliced in ------------------------------------------------


BATCH = 4  # contexts per LM pass in every test: the jitted programs compile once


def tiny_model():
    return TinyModel(tiny_config(layers=2))


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    tokens, mask = texts_to_contexts(model, TEXTS, 32)
    assert mask[:, 0].sum() == 0 and mask.sum() > 200  # BOS excluded
    return model, tokens, mask


def _np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def test_downstream_matches_independent_forwards(tiny):
    """CE / KL / recovered from separate forward calls and NumPy log-softmax."""
    model, tokens, mask = tiny
    sae = random_sae("topk", model.cfg.d_model, 64, seed=5, k=4)
    acts = forward(model.cfg, model.params, tokens, capture=[HOOK]).activations[HOOK]
    mean = np.asarray(acts, np.float64)[mask].mean(0)
    m3 = jnp.asarray(mask)[..., None]

    def run(fn):
        iv = None if fn is None else {HOOK: fn}
        return _np_log_softmax(forward(model.cfg, model.params, tokens, interventions=iv).logits)

    from jsae.sae import reconstruct

    def set_to(value, a):
        return jnp.where(m3, value, a)

    def sae_fn(sae, a):
        return jnp.where(m3, reconstruct(sae, a), a)

    P = jax.tree_util.Partial
    lps = {
        "clean": run(None),
        "sae": run(P(sae_fn, sae)),
        "zero": run(P(set_to, jnp.zeros(model.cfg.d_model))),
        "mean": run(P(set_to, jnp.asarray(mean, jnp.float32))),
    }
    ce_mask = mask[:, :-1] & mask[:, 1:]
    tgt = tokens[:, 1:]
    ce = {k: -np.take_along_axis(lp[:, :-1], tgt[..., None], -1)[..., 0][ce_mask].mean()
          for k, lp in lps.items()}
    kl = {k: (np.exp(lps["clean"]) * (lps["clean"] - lp)).sum(-1)[mask].mean() for k, lp in lps.items()}

    batches = Evaluator(model, [HOOK], tokens, mask, forward=forward, batch_size=BATCH).batches()
    got = downstream_metrics(model, {HOOK: sae}, batches, {HOOK: mean}, forward=forward)[HOOK]
    assert got["ce_clean"] == pytest.approx(ce["clean"], rel=1e-5)
    assert got["ce_spliced"] == pytest.approx(ce["sae"], rel=1e-5)
    assert got["ce_zero_abl"] == pytest.approx(ce["zero"], rel=1e-5)
    assert got["ce_mean_abl"] == pytest.approx(ce["mean"], rel=1e-5)
    rec = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    assert got["ce_recovered_zero"] == pytest.approx(rec, rel=1e-4)
    rec_m = (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"])
    assert got["ce_recovered_mean"] == pytest.approx(rec_m, rel=1e-4)
    assert got["kl_spliced"] == pytest.approx(kl["sae"], rel=1e-4)
    assert got["kl_zero_abl"] == pytest.approx(kl["zero"], rel=1e-4)
    assert got["kl_score_zero"] == pytest.approx((kl["zero"] - kl["sae"]) / kl["zero"], rel=1e-4)
    assert got["ce_tokens"] == ce_mask.sum() and got["kl_tokens"] == mask.sum()


def test_ce_recovered_identity_is_one_and_ablation_value_is_zero(tiny):
    model, tokens, mask = tiny
    d = model.cfg.d_model
    ev = Evaluator(model, [HOOK], tokens, mask, forward=forward, batch_size=BATCH)
    mean = ev.means()[HOOK]
    r = ev.evaluate({HOOK: identity_sae(d)}).metrics[HOOK]
    assert r["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert r["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert r["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert r["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert abs(r["ce_zero_abl"] - r["ce_clean"]) > 0.01  # the ablation matters: the ratio is meaningful
    r0 = ev.evaluate({HOOK: constant_sae(np.zeros(d))}).metrics[HOOK]
    assert r0["ce_recovered_zero"] == pytest.approx(0.0, abs=1e-4)
    assert r0["kl_score_zero"] == pytest.approx(0.0, abs=1e-4)
    rm = ev.evaluate({HOOK: constant_sae(mean)}).metrics[HOOK]
    assert rm["ce_recovered_mean"] == pytest.approx(0.0, abs=1e-4)
    assert rm["fvu"] == pytest.approx(1.0, rel=1e-4)  # predicting the mean explains nothing


def test_splice_keeps_bos_and_padding(tiny):
    """With every position masked out, all variants equal the clean model."""
    model, tokens, _ = tiny
    tokens = tokens[:BATCH]
    none = np.zeros(tokens.shape, bool)
    none[:, 5] = True  # one position per row, so some CE/KL positions exist
    hooks = (HOOK,)
    s, use, const, everywhere = variant_plan(hooks, {HOOK: np.ones(model.cfg.d_model)})
    from jsae.evals.downstream import variant_losses

    ce, kl = variant_losses(model.params, jnp.asarray(tokens), jnp.asarray(none), None,
                            {HOOK: constant_sae(np.zeros(model.cfg.d_model))}, jnp.asarray(s),
                            jnp.asarray(use), jnp.asarray(const), jnp.asarray(everywhere),
                            forward=forward, model_cfg=model.cfg, hooks=hooks)
    ce, kl = np.asarray(ce), np.asarray(kl)
    # causal model: positions before 5 are untouched by the sae/zero/mean variants (1-3),
    # position 5 on is changed; zero_all (4, SAELens' baseline) changes BOS and every position.
    np.testing.assert_array_equal(ce[1:4, :, :5], np.broadcast_to(ce[0, :, :5], ce[1:4, :, :5].shape))
    assert np.all(kl[:4, :, :5] == 0) and np.all(kl[1:, :, 5] > 0)
    assert np.all(kl[4, :, 0] > 0)


def test_downstream_stats_several_hooks():
    st = DownstreamStats(["a", "b"])
    ce = np.zeros((9, 1, 3))
    kl = np.zeros((9, 1, 4))
    # clean, then per hook: sae, zero (SAE positions), mean, zero_all (every position)
    ce[:, 0, :] = np.array([1.0, 1.5, 3.0, 2.0, 3.5, 1.2, 4.0, 2.0, 5.0])[:, None]
    kl[:, 0, :] = np.array([0.0, 0.1, 1.0, 0.5, 1.5, 0.2, 2.0, 1.0, 3.0])[:, None]
    st.add(ce, kl, np.ones((1, 4), bool))
    r = st.result()
    assert r["a"]["ce_recovered_zero"] == pytest.approx((3 - 1.5) / (3 - 1))
    assert r["a"]["ce_recovered_mean"] == pytest.approx((2 - 1.5) / (2 - 1))
    assert r["b"]["ce_recovered_zero"] == pytest.approx((4 - 1.2) / (4 - 1))
    assert r["b"]["kl_score_mean"] == pytest.approx((1 - 0.2) / 1)
    # SAELens' ce_loss_score / kl_div_score: the all-position zero ablation as the baseline
    assert r["a"]["ce_loss_score"] == pytest.approx((3.5 - 1.5) / (3.5 - 1))
    assert r["b"]["kl_div_score"] == pytest.approx((3 - 0.2) / 3)


def test_evaluator_several_hooks_match_single(tiny):
    model, tokens, mask = tiny
    hooks = [HOOK, "blocks.0.hook_mlp_out"]
    saes = {h: random_sae("topk", model.cfg.d_model, 48, seed=i, k=3) for i, h in enumerate(hooks)}
    both = Evaluator(model, hooks, tokens, mask, forward=forward, batch_size=BATCH).evaluate(saes)
    one = Evaluator(model, [hooks[1]], tokens, mask, forward=forward, batch_size=BATCH).evaluate(
        {hooks[1]: saes[hooks[1]]})
    for k, v in one.metrics[hooks[1]].items():
        assert both.metrics[hooks[1]][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    flat = both.flat()
    assert f"{HOOK}/ce_recovered_zero" in flat and "blocks.0.hook_mlp_out/l0" in flat
    assert both.density[HOOK].shape == (48,)


def test_evaluator_splices_one_family_member_at_a_time(tiny):
    """A family's members replace the same hook: CE/KL run one member per round, each as it
    would alone (keys <hook>@<name>, jsae.runs.member_key)."""
    model, tokens, mask = tiny
    saes = {f"{HOOK}@{n}": random_sae("topk", model.cfg.d_model, 48, seed=i, k=3)
            for i, n in enumerate("ab")}
    ev = Evaluator(model, [HOOK], tokens, mask, forward=forward, batch_size=BATCH)
    both = ev.evaluate(saes).metrics
    for key, sae in saes.items():
        alone = ev.evaluate({HOOK: sae}).metrics[HOOK]
        assert "ce_loss_score" in alone
        for k, v in alone.items():
            assert both[key][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (key, k)
    assert both[f"{HOOK}@a"]["ce_loss_score"] != both[f"{HOOK}@b"]["ce_loss_score"]


# ---- the training loop and the CLI ------------------------------------------------------------


def _text_cfg(tmp_path, **eval_kw):
    from jsae import config

    return config.from_dict({
        "run_dir": str(tmp_path / "run"),
        "model": {"hooks": [HOOK], "batch_size": 4},
        "data": {"source": "text", "dataset": "files", "context_length": 32, "shuffle_buffer": 512,
                 "holdout_fraction": 0.25},
        "sae": {"architecture": "topk", "d_sae": 64, "k": 4, "init_sample": 256},
        "train": {"steps": 6, "batch_size": 128, "log_every": 3, "progress": False},
        "eval": {"every_steps": 3, "tokens": 200, "batch_size": BATCH, **eval_kw},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    })


def test_make_eval_fn_in_training_loop(tmp_path):
    from jsae.data.lm_source import TextActivationSource
    from jsae.data.text import ListDocuments
    from jsae.train.loop import Trainer
    from jsae.train.run import Run

    model = tiny_model()
    docs = ListDocuments(TEXTS * 4)
    cfg = _text_cfg(tmp_path)
    src = TextActivationSource(cfg, model, documents=docs, forward=forward)
    eval_fn = make_eval_fn(cfg, forward=forward, documents=docs)
    calls = []

    def recording(trainer, states):
        calls.append(eval_fn(trainer, states))
        return calls[-1]

    trainer = Trainer(cfg, src)
    Run(cfg, log=lambda s: None).train(trainer, eval_fn=recording)
    assert len(calls) == 1 and calls[0]["ce_clean"] > 0  # at step 3 of 6 (not at the end)
    direct = eval_fn(trainer, trainer.states)
    assert set(direct) >= {"ce_recovered_zero", "ce_recovered_mean", "kl_spliced", "l0", "fvu",
                           "rel_recon_bias", "dense_frac"}
    assert direct["l0"] <= 4.0

    # jsae eval on the finished run directory (the tiny model stands in for the LM)
    from jsae.evals import evaluate_path

    out = evaluate_path(tmp_path / "run", n_tokens=150, model=model, forward=forward,
                        documents=docs, print_fn=None)
    doc = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert doc["metrics"][HOOK]["ce_clean"] == pytest.approx(out["metrics"][HOOK]["ce_clean"])
    assert doc["info"]["kind"] == "run" and doc["tokens"] >= 150
    sb = doc["saebench"][HOOK]
    m = doc["metrics"][HOOK]
    # SAELens' names carry SAELens' definitions: the ablation zeroes every position (BOS too)
    assert sb["model_performance_preservation"]["ce_loss_score"] == m["ce_loss_score"]
    assert m["ce_loss_score"] == pytest.approx(
        (m["ce_zero_abl_all"] - m["ce_spliced_saelens"])
        / (m["ce_zero_abl_all"] - m["ce_clean_saelens"]))
    assert sb["model_behavior_preservation"]["kl_div_score"] == pytest.approx(
        (m["kl_zero_abl_all"] - m["kl_spliced"]) / m["kl_zero_abl_all"])
    assert sb["reconstruction_quality"]["mse"] == pytest.approx(m["mse"] * model.cfg.d_model)
    assert sb["shrinkage"]["relative_reconstruction_bias"] == doc["metrics"][HOOK]["rel_recon_bias"]
    assert (tmp_path / "run" / "eval" / "feature_density.png").exists()
    dens = np.load(tmp_path / "run" / "eval" / f"feature_density_{HOOK}.npy")
    assert dens.shape == (64,)


def test_cli_eval_synthetic_run(tmp_path, capsys):
    """A run without an LM (synthetic data): reconstruction metrics from the CLI."""
    from jsae import config
    from jsae.cli import main
    from jsae.runner import run_training

    cfg = config.from_dict({
        "run_dir": str(tmp_path / "syn"),
        "data": {"source": "synthetic", "d_in": 16, "n_features": 64, "active_per_sample": 2},
        "sae": {"architecture": "topk", "d_sae": 64, "k": 2},
        "train": {"steps": 20, "batch_size": 256, "progress": False, "log_every": 10},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    })
    run_training(cfg, print_fn=lambda s: None)
    out = tmp_path / "m.json"
    assert main(["eval", str(tmp_path / "syn"), "--tokens", "2048", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FVU" in text and "L0" in text
    doc = json.loads(out.read_text())
    m = doc["metrics"]["synthetic"]
    assert m["tokens"] == 2048 and m["l0"] <= 2.0 and 0 <= m["fvu"] < 1.5
    assert (tmp_path / "feature_density.png").exists()


def test_cli_eval_arguments_and_errors(tmp_path, capsys):
    from jsae.cli import build_parser, main

    p = build_parser()
    args = p.parse_args(["eval", "some/run", "--tokens", "100", "--hook", "blocks.3.hook_resid_post"])
    assert args.tokens == 100 and args.hook == "blocks.3.hook_resid_post"
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a jsae run" in capsys.readouterr().err


def test_splice_intervention_in_forward(tiny):
    from jsae.evals import splice_intervention

    model, tokens, mask = tiny
    d = model.cfg.d_model
    clean = forward(model.cfg, model.params, tokens).logits
    spliced = forward(model.cfg, model.params, tokens,
                      interventions={HOOK: splice_intervention(identity_sae(d), mask)}).logits
    np.testing.assert_allclose(np.asarray(spliced), np.asarray(clean), atol=1e-4)
    zeroed = forward(model.cfg, model.params, tokens,
                     interventions={HOOK: splice_intervention(constant_sae(np.zeros(d)))}).logits
    assert not np.allclose(np.asarray(zeroed), np.asarray(clean), atol=1e-3)


def test_eval_imported_saelens_and_gemmascope(tiny, tmp_path):
    """SAELens / Gemma Scope folders (jsae.export) evaluate to the same numbers as the SAE."""
    from jsae.data.text import ListDocuments
    from jsae.evals import evaluate_path
    from jsae.export import save_gemmascope, save_saelens

    model, _, _ = tiny
    d = model.cfg.d_model
    docs = ListDocuments(TEXTS * 4)
    common = dict(n_tokens=150, batch_size=BATCH, model=model, forward=forward, documents=docs,
                  overrides=["data.context_length=32", "data.holdout_fraction=0.25"], print_fn=None)
    sae = random_sae("jumprelu", d, 64, seed=7)
    save_saelens(sae, tmp_path / "sl", hook_name=HOOK, model_name="tiny")
    a = evaluate_path(tmp_path / "sl", **common)
    assert a["info"]["kind"] == "saelens" and (tmp_path / "sl" / "eval" / "eval.json").exists()
    save_gemmascope(sae, tmp_path / "gs" / "layer_1" / "width_64")
    b = evaluate_path(tmp_path / "gs" / "layer_1" / "width_64", hook=HOOK, **common)
    assert b["info"]["kind"] == "gemmascope"
    # the reference: the original SAE on the same contexts
    from jsae import config
    from jsae.evals import eval_contexts

    cfg = config.from_dict(
        {"train": {"steps": 1}, "sae": {"expansion": 1, "k": 1},
         "data": {"context_length": 32, "holdout_fraction": 0.25}})
    toks, mask = eval_contexts(model, cfg.data, 150, documents=docs)
    ref = Evaluator(model, [HOOK], toks, mask, forward=forward, batch_size=BATCH).evaluate(
        {HOOK: sae}).metrics[HOOK]
    for key in ("fvu", "l0", "ce_spliced", "ce_recovered_zero", "kl_spliced"):
        assert a["metrics"][HOOK][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
        assert b["metrics"][HOOK][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
