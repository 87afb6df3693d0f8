"""A family of transcoder sets (config keys ``family`` and ``sae.layers``): several sets of
per-layer transcoders from one LM pass, each member a whole set (one transcoder per layer) with
its own width, optimizer and schedule, saved as ``saes/<layer hook>/<name>/`` with one
``saes/set.json`` naming the members. The reference is the member trained alone (its config,
same seed, same text): bitwise the same parameters. Every command that reads a set reads one
member at a time (``--member NAME``); without one, a family is one line, exit 2."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from sae_reference import sae_section
from test_evals import TEXTS
from test_steering_helpers import TinyModel, tiny_config

from jsae import config, runs
from jsae.cli import main
from jsae.config import member_config
from jsae.errors import BadInput
from jsae.models.transformer import forward
from jsae.train.loop import Trainer
from jsae.train.run import Run

IN, OUT = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"
N_LAYERS = 3
MEMBERS = [{"name": "n64"},
           {"name": "n128", "sae": {"d_sae": 128}, "train": {"lr": 1e-3, "lr_warmup_steps": 2}}]


def _raw(run_dir, family=MEMBERS):
    raw = {
        "run_dir": str(run_dir),
        "model": {"batch_size": 4},
        "data": {"source": "text", "dataset": "files", "context_length": 32,
                 "shuffle_buffer": 512, "holdout_fraction": 0.25},
        "sae": sae_section({"architecture": "jumprelu_transcoder", "input_hook": IN,
                            "output_hook": OUT, "layers": "all", "d_sae": 64,
                            "init_sample": 256}),
        "train": {"steps": 6, "batch_size": 128, "log_every": 3, "progress": False, "lr": 3e-3},
        "eval": {"tokens": 200, "batch_size": 4},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    }
    if family is not None:
        raw["family"] = family
    return raw


def _hosted(states):
    return jax.tree.map(np.asarray, jax.device_get(states))


def _train(cfg, model):
    from jsae.data.lm_source import TextActivationSource
    from jsae.data.text import ListDocuments

    src = TextActivationSource(cfg, model, documents=ListDocuments(TEXTS * 4), forward=forward)
    trainer = Trainer(cfg, src)
    Run(cfg, log=lambda s: None).train(trainer)
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The family (two sets of three layers) and its wider member trained alone."""
    model = TinyModel(tiny_config(layers=N_LAYERS))
    root = tmp_path_factory.mktemp("setfamily")
    cfg = config.from_dict(_raw(root / "family"))
    fam = _train(cfg, model)
    alone = member_config(cfg, 1)
    alone.run_dir = str(root / "alone")
    assert alone.family is None and alone.sae.d_sae == 128
    solo = _train(alone, model)
    return model, root, _hosted(fam.states), _hosted(solo.states)


def _ins():
    return [config.layer_hook(IN, L) for L in range(N_LAYERS)]


def test_each_member_is_a_whole_set_equal_to_the_set_trained_alone(trained):
    _, root, fam, solo = trained
    ins = _ins()
    assert sorted(fam) == sorted(f"{h}@{n}" for h in ins for n in ("n64", "n128"))
    for h in ins:  # the wider member, bitwise the set trained alone with its config
        leaves = jax.tree_util.tree_leaves_with_path(fam[f"{h}@n128"])
        for (path, x), y in zip(leaves, jax.tree.leaves(solo[h])):
            np.testing.assert_array_equal(x, np.asarray(y), err_msg=f"{h} {jax.tree_util.keystr(path)}")
        assert fam[f"{h}@n128"].sae.params["W_enc"].shape[-1] == 128
        assert fam[f"{h}@n64"].sae.params["W_enc"].shape[-1] == 64
    run = root / "family"
    for h in ins:  # each layer's member under its hook's folder
        for n in ("n64", "n128"):
            meta = json.loads((run / "saes" / h / n / "sae.json").read_text())["metadata"]
            assert meta["family_member"] == n and meta["hook_name"] == h
            assert meta["layer"] == config.template_layer(IN, h)


def test_set_json_names_the_members_and_is_read_one_member_at_a_time(trained):
    _, root, _, _ = trained
    run, ins = root / "family", _ins()
    raw = json.loads((run / "saes" / "set.json").read_text())
    assert raw["family"] == ["n64", "n128"] and raw["dictionaries"] == ins
    rec = runs.read_set(run, "n128")
    assert rec["dictionaries"] == [f"{h}@n128" for h in ins]
    assert [p["key"] for p in rec["per_layer"]] == [f"{h}@n128" for h in ins]
    assert rec["per_layer"] == [{**p, "key": f"{p['input_hook']}@n128"}
                                for p in runs.read_set(root / "alone")["per_layer"]]
    for member, match in ((None, r"holds a family \(n64, n128\); name one member with --member"),
                          ("n32", "--member 'n32': .* no such member; its family: n64, n128")):
        with pytest.raises(BadInput, match=match):
            runs.read_set(run, member)
    with pytest.raises(BadInput, match="is not a family"):
        runs.read_set(root / "alone", "n128")
    assert runs.member_hooks(run, "n64") == [f"{h}@n64" for h in ins]


def test_circuit_formats_and_attribution_take_a_member(trained, tmp_path, capsys):
    from jsae.circuits import dictionaries as dicts
    from jsae.export.circuit_tracer import load_circuit_tracer

    _, root, _, _ = trained
    run = root / "family"
    a, b = dicts.from_path(run, member="n128"), dicts.from_path(root / "alone")
    for f in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    with pytest.raises(BadInput, match="--member NAME"):
        dicts.from_path(run)
    out, ref = tmp_path / "ct", tmp_path / "ct_alone"
    assert main(["export", str(run), str(out), "--format", "circuit-tracer",
                 "--member", "n128"]) == 0
    assert main(["export", str(root / "alone"), str(ref), "--format", "circuit-tracer"]) == 0
    got, want = load_circuit_tracer(out)[0], load_circuit_tracer(ref)[0]
    assert sorted(got) == sorted(want)
    for k in want:
        for p in want[k].params:
            np.testing.assert_array_equal(np.asarray(got[k].params[p]),
                                          np.asarray(want[k].params[p]))
    capsys.readouterr()
    bad = tmp_path / "ct_bad"
    assert main(["export", str(run), str(bad), "--format", "circuit-tracer"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--member NAME" in err and not bad.exists()


def test_circuit_command_needs_a_member_and_matches_the_set_alone(trained, tmp_path, capsys,
                                                                  monkeypatch):
    import jsae.commands.circuit as circuit_cmd

    model, root, _, _ = trained
    monkeypatch.setattr(circuit_cmd, "load_model", lambda name: model)
    args = ["--prompt", "the cat sat", "--max-logits", "3"]
    out = tmp_path / "g"
    assert main(["circuit", str(root / "family"), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("jsae circuit: ") and "--member NAME" in err
    assert not out.exists()
    assert main(["circuit", str(root / "family"), "--member", "n128", "--out", str(out),
                 *args]) == 0
    assert main(["circuit", str(root / "alone"), "--out", str(tmp_path / "g2"), *args]) == 0
    got, want = (json.loads((d / "graph.json").read_text()) for d in (out, tmp_path / "g2"))
    assert [n["node_id"] for n in got["nodes"]] == [n["node_id"] for n in want["nodes"]]
    np.testing.assert_allclose([x["weight"] for x in got["links"]],
                               [x["weight"] for x in want["links"]], rtol=1e-5, atol=1e-7)


def test_eval_gives_each_member_its_replacement_model(trained):
    from jsae.data.text import ListDocuments
    from jsae.evals import evaluate_path

    model, root, _, _ = trained
    kw = dict(n_tokens=100, downstream_tokens=100, model=model, forward=forward,
              documents=ListDocuments(TEXTS * 4), print_fn=None)
    fam = evaluate_path(root / "family", **kw)
    solo = evaluate_path(root / "alone", **kw)
    reps = fam["replacement"]["members"]
    assert sorted(reps) == ["n128", "n64"]
    want = solo["replacement"]
    for k in ("ce_spliced", "kl_spliced", "top1_agreement", "resid_explained", "l0"):
        assert reps["n128"]["all"][k] == pytest.approx(want["all"][k], rel=1e-5, abs=1e-7), k
    assert [r["layer"] for r in reps["n64"]["layers"]] == list(range(N_LAYERS))
    assert reps["n64"]["all"]["l0"] != pytest.approx(reps["n128"]["all"]["l0"])


def test_atlas_of_one_member_is_every_layer_of_its_set(trained, tmp_path, monkeypatch, capsys):
    from jsae.analysis.atlas.layers import layer_plan

    model, root, _, _ = trained
    run = root / "family"
    plan = layer_plan(run, "n64")
    assert [(L, key) for L, _, key, _ in plan.layers] == [
        (L, f"{config.layer_hook(IN, L)}@n64") for L in range(N_LAYERS)]
    with pytest.raises(BadInput, match="--member NAME"):
        layer_plan(run)
    monkeypatch.setattr("jsae.models.load", lambda name, dtype="float32": model)
    (tmp_path / "corpus.txt").write_text(" ".join(TEXTS))
    argv = ["atlas", str(run), "--tokens", "2000", "--context-length", "32", "--window", "8",
            "--top-k", "4", "--map", "pca", "--text", str(tmp_path / "corpus.txt")]
    assert main([*argv, "--member", "n64"]) == 0
    assert f"atlas of {N_LAYERS} layers" in capsys.readouterr().out
    site = run / "atlas-n64"  # a member's default folder
    assert {f"atlas-L{L}.npz" for L in range(N_LAYERS)} <= {p.name for p in site.iterdir()}
    assert main([*argv, "--member", "n64", "--hook", f"{_ins()[0]}@n64"]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_family_of_cross_layer_transcoders(trained, tmp_path):
    """One CLT per member (its key: every layer's input hook joined, @ its name), read by
    member as a set's are."""
    from jsae.analysis.atlas.layers import layer_plan
    from jsae.circuits import dictionaries as dicts

    model = trained[0]
    raw = _raw(tmp_path / "clt", family=[{"name": "a"}, {"name": "b", "sae": {"d_sae": 96}}])
    raw["sae"] = {"architecture": "clt", "input_hook": IN, "output_hook": OUT, "layers": "all",
                  "d_sae": 48, "activation": "jumprelu", "init_sample": 256}
    raw["train"]["steps"] = 2
    cfg = config.from_dict(raw)
    tr = _train(cfg, model)
    key = "+".join(_ins())
    assert tr.hooks == [f"{key}@a", f"{key}@b"]
    rec = runs.read_set(cfg.run_dir, "b")
    assert {p["key"] for p in rec["per_layer"]} == {f"{key}@b"}
    plan = layer_plan(cfg.run_dir, "b")
    assert [L for L, *_ in plan.layers] == list(range(N_LAYERS)) and list(plan.saes) == [f"{key}@b"]
    dic = dicts.from_path(cfg.run_dir, member="b")
    assert dic.cross_layer and dic.W_dec.shape == (N_LAYERS, 96 // N_LAYERS, N_LAYERS, 32)
    assert dic.W_enc.shape == (N_LAYERS, 32, 96 // N_LAYERS)  # per layer: d_model -> n
