"""Crosscoders: the loss against NumPy, gradients against finite differences, recovery of shared
and hook-specific features from synthetic multi-hook data (with each feature's layer profile),
and 8 simulated devices against one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mesh_check import assert_meshes_match

from jsae import config
from jsae.config import ConfigError
from jsae.sae import SAESpec, init_sae, sae_loss
from jsae.sae.archs.crosscoder import layer_profile

L, D, N = 3, 8, 24


def _cc(seed=0):
    rng = np.random.default_rng(seed)
    sae = init_sae(jax.random.key(seed), SAESpec("crosscoder", D, N, n_layers=L), None)
    p = {n: v + 0.1 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
         for n, v in sae.params.items()}
    x = rng.standard_normal((32, L, D)).astype(np.float32)
    return sae.replace(params=p), x


def _np_loss(p, x, coef):
    pre = np.einsum("bld,ldn->bn", x, p["W_enc"]) + p["b_enc"]
    z = np.maximum(pre, 0)
    x_hat = np.einsum("bn,nld->bld", z, p["W_dec"]) + p["b_dec"]
    recon = np.sum((x_hat - x) ** 2, axis=(1, 2)).mean()
    sparsity = coef * np.sum(z * np.linalg.norm(p["W_dec"], axis=-1).sum(-1), -1).mean()
    return recon + sparsity, recon, z


def test_shapes_loss_and_gradients_match_numpy():
    sae, x = _cc()
    assert sae.params["W_enc"].shape == (L, D, N) and sae.params["W_dec"].shape == (N, L, D)
    assert sae.params["b_dec"].shape == (L, D)
    loss, aux = sae_loss(sae, jnp.asarray(x), sparsity_coef=0.3)
    p = {n: np.asarray(v, np.float64) for n, v in sae.params.items()}
    ref, recon, z = _np_loss(p, x.astype(np.float64), 0.3)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert float(aux["recon"]) == pytest.approx(recon, rel=1e-5)
    assert 0 < np.mean(z > 0) < 1
    grads = jax.grad(lambda q: sae_loss(sae.replace(params=q), jnp.asarray(x),
                                        sparsity_coef=0.3)[0])(sae.params)
    rng = np.random.default_rng(1)
    h = 1e-5
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        for _ in range(4):
            idx = tuple(rng.integers(0, n) for n in p[name].shape)
            plus = {n: v.copy() for n, v in p.items()}
            minus = {n: v.copy() for n, v in p.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            fd = (_np_loss(plus, x, 0.3)[0] - _np_loss(minus, x, 0.3)[0]) / (2 * h)
            assert float(np.asarray(grads[name])[idx]) == pytest.approx(fd, rel=2e-3, abs=2e-4)


class _MultiHookSource:
    """Three hooks; 12 shared features write to all of them (a different direction at each),
    4 hook-specific features per hook write to one. Three features per token."""

    def __init__(self, seed=0, d=16):
        rng = np.random.default_rng(seed)
        self.hooks = ["h0", "h1", "h2"]
        self.d_in = {h: d for h in self.hooks}
        self.n_shared, self.n_spec = 12, 4
        n = self.n_shared + L * self.n_spec
        dirs = rng.standard_normal((n, L, d))
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
        self.owner = np.full(n, -1)
        for i in range(L):
            s = self.n_shared + i * self.n_spec
            self.owner[s:s + self.n_spec] = i
            for j in range(L):
                if j != i:
                    dirs[s:s + self.n_spec, j] = 0.0
        self.dirs = dirs.astype(np.float32)
        self.rng = np.random.default_rng(seed + 1)

    def next_batch(self, n):
        idx = np.stack([self.rng.choice(len(self.dirs), 3, replace=False) for _ in range(n)])
        c = np.zeros((n, len(self.dirs)), np.float32)
        np.put_along_axis(c, idx, self.rng.uniform(1, 2, idx.shape).astype(np.float32), 1)
        x = np.einsum("bf,fld->bld", c, self.dirs)
        return {h: x[:, i] for i, h in enumerate(self.hooks)}

    def eval_batches(self, n_tokens, rows):
        for s in range(0, n_tokens, rows):
            yield self.next_batch(min(rows, n_tokens - s))


def _cfg(steps=4, lr=1e-2, l1=0.05, **sae):
    return config.from_dict({
        "model": {"hooks": ["h0", "h1", "h2"]},
        "sae": {"architecture": "crosscoder", "d_sae": 64, "l1_coef": l1, **sae},
        "train": {"steps": steps, "batch_size": 256, "lr": lr, "lr_warmup_steps": 0,
                  "lr_decay": "constant", "log_every": 1000, "progress": False},
        "checkpoint": {"enabled": False},
    })


def test_recovers_shared_and_hook_specific_features():
    from jsae import parallel
    from jsae.train.loop import Trainer

    src = _MultiHookSource()
    tr = Trainer(_cfg(steps=600, lr=5e-3), src, mesh=parallel.make_mesh(1, 1, jax.devices()[:1]))
    assert tr.hooks == ["h0+h1+h2"] and tr.inputs["h0+h1+h2"] == ["h0", "h1", "h2"]
    states = tr.init_states()
    for _ in range(600):
        states, m = tr.step(states, src.next_batch(256))
    sae = parallel.to_host(states["h0+h1+h2"].sae)
    assert tr.evaluate(states, 2048)["h0+h1+h2"]["fvu"] < 0.1
    w = np.asarray(sae.params["W_dec"]).reshape(64, -1)
    true = src.dirs.reshape(len(src.dirs), -1)
    cos = (true / np.linalg.norm(true, axis=-1, keepdims=True)) @ (
        w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)).T
    best = cos.argmax(1)
    assert np.median(cos.max(1)) > 0.9, np.round(cos.max(1), 2)
    prof = layer_profile(sae)[best]  # [true feature, hook]
    spec = src.owner >= 0
    # hook-specific features write (almost) only to their hook, shared ones to all three
    on_owner = prof[spec, src.owner[spec]]
    assert np.median(on_owner) > 0.8, np.round(on_owner, 2)
    assert np.median(prof[~spec].max(1)) < 0.6, np.round(prof[~spec], 2)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")
def test_meshes_match_single_device():
    from jsae import parallel
    from jsae.train.loop import Trainer

    def train(data, model):
        src = _MultiHookSource(seed=3)
        tr = Trainer(_cfg(), src, mesh=parallel.make_mesh(data, model))
        states = tr.init_states()
        for _ in range(4):
            states, m = tr.step(states, src.next_batch(256))
        return jax.device_get(states["h0+h1+h2"]), jax.device_get(m["h0+h1+h2"])

    assert_meshes_match(train)


def test_one_hook_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.hooks.*two or more"):
        config.from_dict({"model": {"hooks": ["blocks.6.hook_resid_post"]},
                          "sae": {"architecture": "crosscoder", "d_sae": 64},
                          "train": {"steps": 1}})


def test_crosscoder_run_trains_evaluates_and_finds_top_contexts(tmp_path):
    """`jsae train`'s loop on a tiny LM's three hooks (one LM pass), then `jsae eval`'s
    reconstruction metrics (stacked hooks; no spliced CE for an acausal crosscoder) and
    top_activations over the stacked hooks, checked against the model's own activations."""
    from test_evals import TEXTS, tiny_model

    from jsae.analysis.top import top_activations
    from jsae.data.lm_source import TextActivationSource
    from jsae.data.text import ListDocuments
    from jsae.evals import evaluate_path
    from jsae.evals.evaluate import texts_to_contexts
    from jsae.models.transformer import forward
    from jsae.runs import sae_from_run
    from jsae.sae import encode
    from jsae.train.loop import Trainer
    from jsae.train.run import Run

    hooks = [f"blocks.{i}.hook_resid_post" for i in range(2)]
    key = "+".join(hooks)
    model = tiny_model()
    docs = ListDocuments(TEXTS * 4)
    cfg = config.from_dict({
        "run_dir": str(tmp_path / "run"), "model": {"hooks": hooks, "batch_size": 4},
        "data": {"source": "text", "dataset": "files", "context_length": 32,
                 "shuffle_buffer": 512, "holdout_fraction": 0.25},
        "sae": {"architecture": "crosscoder", "d_sae": 64, "l1_coef": 0.5, "init_sample": 256},
        "train": {"steps": 6, "batch_size": 128, "lr": 3e-3, "log_every": 3, "progress": False},
        "eval": {"tokens": 200, "batch_size": 4}, "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    })
    summary = Run(cfg, log=lambda s: None).train(
        Trainer(cfg, TextActivationSource(cfg, model, documents=docs, forward=forward)))
    assert set(summary["heldout"]) == {key}
    sae, info = sae_from_run(tmp_path / "run")
    assert info["hook_names"] == hooks and sae.spec.options.n_layers == 2
    out = evaluate_path(tmp_path / "run", n_tokens=150, model=model, forward=forward,
                        documents=docs, print_fn=None)
    m = out["metrics"][key]
    assert 0 < m["fvu"] < 2 and "ce_spliced" not in m
    toks, mask = texts_to_contexts(model, TEXTS, 32)
    top = top_activations(model, sae, key, toks, mask, top_n=3, batch_size=4, forward=forward)
    acts = forward(model.cfg, model.params, toks, capture=hooks).activations
    z = np.asarray(encode(sae, jnp.stack([acts[h] for h in hooks], axis=-2)))
    z = np.where(mask[..., None], z, 0)
    f = int(np.argmax(z.reshape(-1, 64).max(0)))
    assert top.values[f, 0] == pytest.approx(z[..., f].max(), rel=1e-5)


def test_features_text_shows_the_layer_profile():
    from test_evals import TEXTS, tiny_model

    from jsae.analysis.top import top_activations
    from jsae.commands.features import describe
    from jsae.evals.evaluate import texts_to_contexts

    model = tiny_model()
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    sae = init_sae(jax.random.key(0), SAESpec("crosscoder", 32, 16, n_layers=2), None)
    w = np.asarray(sae.params["W_dec"]).copy()
    w[3, 0] *= 3.0  # feature 3 writes 3/4 of its norm to the first hook
    sae = sae.replace(params={**sae.params, "W_dec": jnp.asarray(w)})
    assert layer_profile(sae)[3] == pytest.approx([0.75, 0.25])
    toks, mask = texts_to_contexts(model, TEXTS, 32)
    top = top_activations(model, sae, "+".join(hooks), toks, mask, top_n=2, batch_size=4)
    text = describe(model, sae, 3, top, toks, snippets=1, logits=3, style="plain",
                    key="+".join(hooks))
    assert "writes to:  blocks.0.hook_resid_post 75%  blocks.1.hook_resid_post 25%" in text
