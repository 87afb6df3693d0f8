"""Transcoders from a config: `sae.input_hook` -> `sae.output_hook` harvested from one LM pass,
trained by the loop, evaluated against the output hook, and spliced in place of the MLP for
CE / KL (checked against separate forward passes), on a tiny Gemma-3-shaped model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mesh_check import assert_meshes_match
from sae_reference import sae_section
from test_evals import BATCH, TEXTS, tiny_model

from jsae import config
from jsae.config import ConfigError
from jsae.models.transformer import ReadsHook, forward, mlp, norm

IN, OUT = "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"


def _cfg(tmp_path, arch="skip_transcoder", **sae):
    return config.from_dict({
        "run_dir": str(tmp_path / "run"),
        "model": {"batch_size": 4},
        "data": {"source": "text", "dataset": "files", "context_length": 32,
                 "shuffle_buffer": 512, "holdout_fraction": 0.25},
        "sae": sae_section({"architecture": arch, "input_hook": IN, "output_hook": OUT,
                            "d_sae": 64, "k": 4, "init_sample": 256, **sae}),
        "train": {"steps": 8, "batch_size": 128, "log_every": 4, "progress": False,
                  "lr": 3e-3},
        "eval": {"tokens": 200, "batch_size": BATCH},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    })


def _source(cfg, model):
    from jsae.data.lm_source import TextActivationSource
    from jsae.data.text import ListDocuments

    docs = ListDocuments(TEXTS * 4)
    return TextActivationSource(cfg, model, documents=docs, forward=forward), docs


def test_config_pairs_the_hooks_and_rejects_what_does_not_fit(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.model.hooks == [IN, OUT]
    assert config.from_dict(config.to_dict(cfg)).model.hooks == [IN, OUT]  # config.yaml re-reads

    def bad(match, **over):
        raw = config.to_dict(_cfg(tmp_path))
        for key, v in over.items():
            sec, name = key.split("__")
            raw[sec][name] = v
        with pytest.raises(ConfigError, match=match):
            config.from_dict(raw)

    bad("sae.output_hook.*is required", sae__output_hook=None, model__hooks=["x"])
    bad("sae.output_hook.*must differ", sae__output_hook=IN, model__hooks=[IN, IN])
    bad("model.hooks.*leave", model__hooks=["blocks.0.hook_resid_post"])
    bad("sae.input_hook.*only transcoders", sae__architecture="topk")


def test_pairs_stay_aligned_through_the_shuffle(tmp_path):
    """Every training row's output-hook vector is the MLP (with Gemma's norms) of its
    input-hook vector: the two hooks are shuffled together."""
    model = tiny_model()
    src, _ = _source(_cfg(tmp_path), model)
    batch = src.next_batch(256)
    p = model.params["blocks"][1]
    x = jnp.asarray(batch[IN])
    want = norm(model.cfg, p["ln2_post"], mlp(model.cfg, p["mlp"], norm(model.cfg, p["ln2"], x)))
    np.testing.assert_allclose(batch[OUT], np.asarray(want), rtol=1e-4, atol=1e-5)
    assert not np.allclose(batch[OUT][1:], np.asarray(want)[:-1], atol=1e-3)  # rows do differ


@pytest.mark.parametrize("arch", ["skip_transcoder", "jumprelu_transcoder"])
def test_train_saves_evaluates_and_splices_in_place_of_the_mlp(tmp_path, arch):
    from jsae.evals import evaluate_path
    from jsae.evals.reconstruction import ReconstructionStats
    from jsae.runs import output_hooks, sae_from_run
    from jsae.sae import reconstruct
    from jsae.train.loop import Trainer
    from jsae.train.run import Run

    model = tiny_model()
    cfg = _cfg(tmp_path, arch, l0_coef=1e-4)
    src, docs = _source(cfg, model)
    trainer = Trainer(cfg, src)
    assert trainer.hooks == [IN] and trainer.targets == {IN: OUT}
    summary = Run(cfg, log=lambda s: None).train(trainer)
    run = tmp_path / "run"
    meta = json.loads((run / "saes" / IN / "sae.json").read_text())["metadata"]
    assert meta["hook_name"] == IN and meta["hook_name_out"] == OUT
    assert output_hooks(run) == {IN: OUT}
    sae, info = sae_from_run(run)
    assert info["hook_name_out"] == OUT

    # held-out FVU is measured against the output hook (NumPy over the same rows)
    rows = list(src.eval_batches(200, 4096))
    x_in = np.concatenate([b[IN] for b in rows])
    y = np.concatenate([b[OUT] for b in rows]).astype(np.float64)
    y_hat = np.asarray(reconstruct(sae, jnp.asarray(x_in)), np.float64)
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert summary["heldout"][IN]["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert fvu < 1.0  # it learned something about the MLP's output in 8 steps
    st = ReconstructionStats()
    st.add(sae, x_in, x_target=y.astype(np.float32))
    assert st.result()["fvu"] == pytest.approx(fvu, rel=1e-4)

    # jsae eval: CE with the transcoder in place of the MLP == two separate forwards
    out = evaluate_path(run, n_tokens=150, downstream_tokens=150, model=model, forward=forward,
                        documents=docs, print_fn=None)
    m = out["metrics"][IN]
    assert out["info"]["output_hooks"] == {IN: OUT}
    from jsae.evals.evaluate import eval_contexts

    toks, mask = eval_contexts(model, cfg.data, 150, seed=cfg.seed, documents=docs)
    n = len(toks)
    toks, mask = toks[:n], mask[:n]
    clean = forward(model.cfg, model.params, toks, capture=[IN, OUT])
    pred = reconstruct(sae, clean.activations[IN])
    m3 = jnp.asarray(mask)[..., None]

    def ce(iv):
        lp = jax.nn.log_softmax(forward(model.cfg, model.params, toks, interventions=iv).logits)
        lp = np.asarray(lp, np.float64)
        nll = -np.take_along_axis(lp[:, :-1], toks[:, 1:, None], -1)[..., 0]
        keep = mask[:, :-1] & mask[:, 1:]
        return nll[keep].mean()

    P = jax.tree_util.Partial
    spliced = ce({OUT: P(lambda v, a: jnp.where(m3, v, a), pred)})
    zero = ce({OUT: P(lambda a: jnp.where(m3, 0.0, a))})
    assert m["ce_spliced"] == pytest.approx(spliced, rel=1e-5)
    assert m["ce_zero_abl"] == pytest.approx(zero, rel=1e-5)
    assert m["ce_clean"] == pytest.approx(ce(None), rel=1e-5)
    assert m["fvu"] < 1.0 and np.isfinite(m["ce_recovered_zero"])


def test_reads_hook_is_a_traced_pytree():
    """A ReadsHook's arrays are jit arguments (no recompile for new values) and it sees the
    source hook of the same forward; reading a later hook is refused."""
    model = tiny_model()
    toks = np.array([[2, 5, 7, 9, 11, 13]], np.int32)
    P = jax.tree_util.Partial
    acts = forward(model.cfg, model.params, toks, capture=[IN]).activations[IN]

    def copy_scaled(c, a, src):
        return (c * src).astype(a.dtype)

    out = forward(model.cfg, model.params, toks, capture=[OUT],
                  interventions={OUT: ReadsHook(IN, P(copy_scaled, jnp.float32(2.0)))})
    np.testing.assert_allclose(out.activations[OUT], 2 * np.asarray(acts), rtol=1e-6)
    assert IN not in out.activations  # read, not captured
    with pytest.raises(ValueError, match="has not reached"):
        forward(model.cfg, model.params, toks,
                interventions={IN: ReadsHook(OUT, P(copy_scaled, jnp.float32(1.0)))})


def test_steering_a_transcoder_feature_edits_the_output_hook():
    """clamp(reads=IN) at OUT: mlp_out + (v - z_f(resid_mid)) W_dec[f] / s, from one forward;
    greedy generate_pair (the batched, position-masked path) runs it too."""
    from jsae import steering
    from jsae.sae import SAESpec, encode, init_sae

    model = tiny_model()
    tc = init_sae(jax.random.key(3), SAESpec("skip_transcoder", 32, 64, k=4), None)
    tc = tc.replace(norm_scale=jnp.asarray(0.7, jnp.float32))
    toks = np.array([[2, 5, 7, 9, 11, 13, 17, 19]], np.int32)
    clean = forward(model.cfg, model.params, toks, capture=[IN, OUT]).activations
    f, v = 5, 3.0
    fns = steering.interventions_for(tc, IN, steering.clamp, f, v, output_hook=OUT)
    assert list(fns) == [OUT]
    got = forward(model.cfg, model.params, toks, capture=[OUT], interventions=fns).activations[OUT]
    z = np.asarray(encode(tc, clean[IN]))[..., f]
    want = np.asarray(clean[OUT]) + (v - z)[..., None] * np.asarray(tc.params["W_dec"][f]) / 0.7
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="reads=<its input hook>"):
        steering.clamp(tc, f, v)

    from jsae.analysis.run import Run
    from jsae.commands.steer import build_interventions

    run = Run(None, model, tc, IN, "tiny", output_hook=OUT)
    cli_fns, desc = build_interventions(run, [f], ["3.0"], "clamp", True)
    assert list(cli_fns) == [OUT] and "f5 := 3" in desc
    add_fns, _ = build_interventions(run, [f], ["2.0"], "add", True)
    assert list(add_fns) == [OUT]  # decoder rows are output-hook directions


def test_at_positions_keeps_a_transcoder_edit_to_its_rows():
    from jsae import steering
    from jsae.sae import SAESpec, init_sae

    model = tiny_model()
    tc = init_sae(jax.random.key(4), SAESpec("transcoder", 32, 64, k=4), None)
    toks = np.array([[2, 5, 7, 9, 11, 13]] * 2, np.int32)
    edit = steering.clamp(tc, [1, 2], 4.0, reads=IN)
    masked = {OUT: steering.at_positions(edit, jnp.asarray([False, True]))}
    got = forward(model.cfg, model.params, toks, capture=[OUT], interventions=masked)
    clean = forward(model.cfg, model.params, toks[:1], capture=[OUT]).activations[OUT]
    full = forward(model.cfg, model.params, toks[:1], capture=[OUT],
                   interventions={OUT: edit}).activations[OUT]
    np.testing.assert_allclose(got.activations[OUT][0], clean[0], rtol=1e-6)
    np.testing.assert_allclose(got.activations[OUT][1], full[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(clean, full)


class _PairSource:
    """x -> y = x A + sparse codes D: a two-hook source (rows aligned) for the mesh test."""

    hooks = ["in", "out"]

    def __init__(self, d=16, n=64, seed=0):
        rng = np.random.default_rng(seed)
        self.d_in = {"in": d, "out": d}
        self.A = rng.standard_normal((d, d)).astype(np.float32) * 0.3
        self.D = rng.standard_normal((n, d)).astype(np.float32)
        self.rng = np.random.default_rng(seed + 1)

    def next_batch(self, n):
        x = self.rng.standard_normal((n, self.A.shape[0])).astype(np.float32)
        c = (self.rng.random((n, len(self.D))) < 0.05) * self.rng.random((n, len(self.D)))
        return {"in": x, "out": (x @ self.A + c.astype(np.float32) @ self.D).astype(np.float32)}

    def eval_batches(self, n_tokens, rows):
        for s in range(0, n_tokens, rows):
            yield self.next_batch(min(rows, n_tokens - s))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")
@pytest.mark.parametrize("arch", ["skip_transcoder", "jumprelu_skip_transcoder"])
def test_meshes_match_single_device(arch):
    from jsae import parallel
    from jsae.train.loop import Trainer

    def train(data, model):
        cfg = config.from_dict({
            "sae": sae_section({"architecture": arch, "input_hook": "in", "output_hook": "out",
                                "d_sae": 128, "k": 4, "dead_after_tokens": 2048,
                                "l0_coef": 1e-3}),
            "train": {"steps": 4, "batch_size": 128, "lr": 1e-2, "lr_warmup_steps": 0,
                      "log_every": 2, "progress": False},
            "checkpoint": {"enabled": False},
        })
        tr = Trainer(cfg, _PairSource(seed=3), mesh=parallel.make_mesh(data, model))
        states = tr.init_states()
        for _ in range(cfg.train.steps):
            states, m = tr.step(states, tr.source.next_batch(cfg.train.batch_size))
        m = {**jax.device_get(m["in"]), "heldout_fvu": tr.evaluate(states, 512)["in"]["fvu"]}
        return jax.device_get(states["in"]), m

    ref, _ = assert_meshes_match(train)
    assert "W_skip" in ref.sae.params and float(np.abs(ref.sae.params["W_skip"]).max()) > 0
    assert_meshes_match(train, meshes=((8, 1),), metric="heldout_fvu")
