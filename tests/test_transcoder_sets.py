"""Transcoder sets (`sae.layers` with hook templates): one transcoder per layer from one LM pass,
each with its own optimizer state and held-out metrics, saved as one set (saes/<one folder per
layer> + saes/set.json); and the same layout feeding a cross-layer transcoder (an architecture
with the `transcoder` and `multi_hook` capabilities reads every layer's input stacked [B, L, d]
and reconstructs every layer's output stacked [B, L, d]), on a tiny Gemma-3-shaped model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sae_reference import sae_section
from test_evals import TEXTS
from test_steering_helpers import TinyModel, tiny_config

from jsae import config
from jsae.config import ConfigError
from jsae.models.transformer import forward, mlp, norm
from jsae.runs import KEY_JOIN
from jsae.train.run import Run

IN, OUT = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"
N_LAYERS = 3


@pytest.fixture(scope="module")
def model():
    return TinyModel(tiny_config(layers=N_LAYERS))


def _raw(tmp_path, arch="skip_transcoder", layers="all", **sae):
    return {
        "run_dir": str(tmp_path / "run"),
        "model": {"batch_size": 4},
        "data": {"source": "text", "dataset": "files", "context_length": 32,
                 "shuffle_buffer": 512, "holdout_fraction": 0.25},
        "sae": sae_section({"architecture": arch, "input_hook": IN, "output_hook": OUT,
                            "layers": layers, "d_sae": 64, "k": 4, "init_sample": 256,
                            "l1_coef": 1e-3, **sae}),
        "train": {"steps": 6, "batch_size": 128, "log_every": 3, "progress": False,
                  "lr": 3e-3},
        "eval": {"tokens": 200, "batch_size": 4},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    }


def _source(cfg, model, calls=None):
    from jsae.data.lm_source import TextActivationSource
    from jsae.data.text import ListDocuments

    def counting_forward(*a, **kw):
        if calls is not None:
            calls.append(tuple(sorted(kw.get("capture") or ())))
        return forward(*a, **kw)

    return TextActivationSource(cfg, model, documents=ListDocuments(TEXTS * 4),
                                forward=counting_forward)


def _hook(template, layer):
    return config.layer_hook(template, layer)


def test_config_derives_the_hooks_and_refuses_what_does_not_fit(tmp_path):
    cfg = config.from_dict(_raw(tmp_path, layers=[2, 0]))
    assert cfg.model.hooks == [_hook(IN, 2), _hook(IN, 0), _hook(OUT, 2), _hook(OUT, 0)]
    assert "hooks" not in config.to_dict(cfg)["model"]  # derived: not written, not compared
    assert config.from_dict(config.to_dict(cfg)).model.hooks == cfg.model.hooks
    every = config.from_dict(_raw(tmp_path))
    assert every.model.hooks == []  # until the model's depth is known
    config.resolve_layers(every, N_LAYERS)
    assert config.transcoder_pairs(every, every.model.hooks) == [
        (_hook(IN, L), _hook(OUT, L)) for L in range(N_LAYERS)]
    assert config.validate(every).model.hooks == every.model.hooks  # the resolved list re-reads
    assert config.template_layer(IN, "blocks.12.mlp.hook_in") == 12
    assert config.template_layer(IN, "blocks.x.mlp.hook_in") is None
    with pytest.raises(ConfigError, match="'sae.layers': layer 5 does not exist .*3 layers"):
        config.resolve_layers(config.from_dict(_raw(tmp_path, layers=[0, 5])), N_LAYERS)

    def bad(match, **sae):
        raw = _raw(tmp_path)
        raw["sae"].update(sae)
        with pytest.raises(ConfigError, match=match) as e:
            config.from_dict(raw)
        assert "\n" not in str(e.value)

    bad(r"'sae.layers': each layer once", layers=[1, 1])
    bad(r"'sae.layers': give all", layers=[])
    bad(r"'sae.layers': expected one of 'all'", layers="most")
    bad(r"'sae.input_hook': with sae.layers, a template", input_hook="blocks.1.mlp.hook_in")
    bad(r"'sae.output_hook': must differ", output_hook=IN)
    bad(r"'sae.layers': .*only transcoders", architecture="topk", k=4, input_hook=None,
        output_hook=None)
    raw = _raw(tmp_path, layers=[0, 1])
    raw["model"]["hooks"] = ["blocks.0.hook_resid_post"]
    with pytest.raises(ConfigError, match="'model.hooks': a set harvests"):
        config.from_dict(raw)


def test_one_pass_trains_a_transcoder_per_layer_saved_as_one_set(tmp_path, model):
    from jsae.runs import output_hooks, read_set, run_hooks, sae_from_run
    from jsae.sae import reconstruct
    from jsae.train.loop import Trainer

    cfg = config.from_dict(_raw(tmp_path))
    calls = []
    src = _source(cfg, model, calls)
    ins = [_hook(IN, L) for L in range(N_LAYERS)]
    outs = [_hook(OUT, L) for L in range(N_LAYERS)]
    assert src.hooks == ins + outs

    # the rows of each layer's two hooks are aligned: out_L = post_norm(mlp(in_L))
    batch = src.next_batch(128)
    for L in range(N_LAYERS):
        p = model.params["blocks"][L]
        want = norm(model.cfg, p["ln2_post"], mlp(model.cfg, p["mlp"], jnp.asarray(batch[ins[L]])))
        np.testing.assert_allclose(batch[outs[L]], np.asarray(want), rtol=1e-4, atol=1e-5)
    # one LM pass per LM batch captures every layer's two hooks
    assert calls and all(c == tuple(sorted(ins + outs)) for c in calls)

    trainer = Trainer(cfg, src)
    assert trainer.hooks == ins and trainer.targets == dict(zip(ins, outs))
    summary = Run(cfg, log=lambda s: None).train(trainer)
    # each layer: its own optimizer state (moments differ) and its own metrics
    mu = [jax.tree.leaves(trainer.states[h].opt_state)[1] for h in ins]
    assert not np.allclose(np.asarray(mu[0]), np.asarray(mu[1]))
    assert set(summary["heldout"]) == set(ins)
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"{h}/fvu" in header for h in ins)

    run = tmp_path / "run"
    rec = read_set(run)
    assert rec["layers"] == list(range(N_LAYERS)) and rec["dictionaries"] == ins
    assert [(p["input_hook"], p["output_hook"], p["key"]) for p in rec["per_layer"]] == list(
        zip(ins, outs, ins))
    assert sorted(run_hooks(run)) == sorted(ins)
    assert output_hooks(run) == dict(zip(ins, outs))
    rows = list(src.eval_batches(200, 4096))
    for L, (h, o) in enumerate(zip(ins, outs)):
        meta = json.loads((run / "saes" / h / "sae.json").read_text())["metadata"]
        assert (meta["hook_name"], meta["hook_name_out"], meta["layer"]) == (h, o, L)
        sae, info = sae_from_run(run, h)
        assert info["hook_name_out"] == o
        x = np.concatenate([b[h] for b in rows])
        y = np.concatenate([b[o] for b in rows]).astype(np.float64)
        y_hat = np.asarray(reconstruct(sae, jnp.asarray(x)), np.float64)
        fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        assert summary["heldout"][h]["fvu"] == pytest.approx(fvu, rel=1e-4)
    # jsae eval finds the set: each layer's transcoder spliced in place of its MLP
    from jsae.data.text import ListDocuments
    from jsae.evals import evaluate_path

    out = evaluate_path(run, n_tokens=100, downstream_tokens=100, model=model, forward=forward,
                        documents=ListDocuments(TEXTS * 4), print_fn=None)
    assert out["info"]["output_hooks"] == dict(zip(ins, outs))
    layers = out["replacement"]["layers"]  # every MLP spliced: per layer and all together
    assert len(layers) == len(ins) and all(np.isfinite(r["ce_spliced"]) for r in layers)
    assert np.isfinite(out["replacement"]["all"]["ce_spliced"])


class _WidthSource:
    """Every layer's two hooks, layer 1 narrower than the others."""

    def __init__(self, widths):
        self.hooks = ([_hook(IN, L) for L in range(len(widths))]
                      + [_hook(OUT, L) for L in range(len(widths))])
        self.d_in = {h: widths[config.template_layer(IN, h) if "mlp.hook_in" in h
                                else config.template_layer(OUT, h)] for h in self.hooks}


def test_a_set_whose_layers_disagree_in_width_is_one_line_and_writes_nothing(tmp_path):
    from jsae.train.loop import Trainer

    cfg = config.from_dict(_raw(tmp_path))
    with pytest.raises(ConfigError, match=r"^config key 'sae.layers': the set's layers disagree "
                       r"in width \(blocks.0.mlp.hook_in 32, blocks.1.mlp.hook_in 16") as e:
        Trainer(cfg, _WidthSource([32, 16, 32]))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def throwaway_clt(monkeypatch):
    """A cross-layer-transcoder-shaped architecture registered for this test only: the
    crosscoder's maths (one code from every layer's input, a decoder row per layer) with the
    `transcoder` capability, so it reconstructs the output hooks, not its inputs."""
    from jsae.sae import registry
    from jsae.sae.archs.crosscoder import Crosscoder

    class TestCLT(Crosscoder):
        name = "test_clt_layout"
        transcoder = True
        rank = 999

    registry._discover()
    monkeypatch.setitem(registry._REGISTRY, TestCLT.name, TestCLT())
    return TestCLT.name


def test_the_set_layout_feeds_a_cross_layer_transcoder(tmp_path, model, throwaway_clt):
    from jsae.runs import input_hooks, output_hooks, read_set, sae_from_run, stack_hooks
    from jsae.sae import reconstruct
    from jsae.train.loop import Trainer

    raw = _raw(tmp_path, throwaway_clt, layers=[0, 2])
    with pytest.raises(ConfigError, match="'sae.layers': sae.architecture 'test_clt_layout' "
                                          "reads every layer"):
        config.from_dict({**raw, "sae": {**raw["sae"], "layers": None}})
    cfg = config.from_dict(raw)
    src = _source(cfg, model)
    trainer = Trainer(cfg, src)
    ins, outs = [_hook(IN, 0), _hook(IN, 2)], [_hook(OUT, 0), _hook(OUT, 2)]
    key, out_key = KEY_JOIN.join(ins), KEY_JOIN.join(outs)
    assert trainer.hooks == [key] and trainer.inputs == {key: ins}
    assert trainer.targets == {key: out_key}
    assert trainer.specs[key].options.n_layers == 2
    summary = Run(cfg, log=lambda s: None).train(trainer)

    run = tmp_path / "run"
    meta = json.loads((run / "saes" / key / "sae.json").read_text())["metadata"]
    assert meta["hook_names"] == ins and meta["hook_names_out"] == outs
    assert meta["hook_name_out"] == out_key and meta["layers"] == [0, 2]
    rec = read_set(run)
    assert rec["layers"] == [0, 2] and [p["key"] for p in rec["per_layer"]] == [key, key]
    assert output_hooks(run) == {key: out_key}
    sae, info = sae_from_run(run)
    assert info["hook_name_out"] == out_key
    # held-out FVU against the stacked output hooks [N, 2, d] (NumPy over the same rows)
    rows = list(src.eval_batches(200, 4096))
    x = np.concatenate([stack_hooks(b, key) for b in rows])
    y = np.concatenate([stack_hooks(b, out_key) for b in rows]).astype(np.float64)
    assert x.shape[1:] == (2, model.cfg.d_model) and len(input_hooks(out_key)) == 2
    y_hat = np.asarray(reconstruct(sae, jnp.asarray(x)), np.float64)
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert summary["heldout"][key]["fvu"] == pytest.approx(fvu, rel=1e-4)
