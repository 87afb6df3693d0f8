"""`jsae circuit`: its arguments, its bad-input paths (one line, exit 2, nothing written) and
what it writes from a graph (files.py), on a tiny model and random transcoders in
circuit-tracer's layout; end to end on a tiny model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np
import pytest
from atlas_fixtures import random_atlas_data
from circuit_fixtures import keep_all, logit_strings, random_graph, token_strings
from test_circuit_formats import _transcoder
from test_steering_helpers import TinyModel, tiny_config

import jsae.commands.circuit as circuit_cmd
from jsae.analysis.atlas.build import save_atlas
from jsae.analysis.atlas.layers import LayerAtlas
from jsae.analysis.atlas.site import write_layer_site
from jsae.circuits.files import read_atlases, write_circuit
from jsae.circuits.graph_json import cantor
from jsae.cli import main
from jsae.commands.circuit import intervention
from jsae.export import gather, save_circuit_tracer
from jsae.sae import SAESpec
from jsae.sae.init import init_sae
from jsae.sae.io import save_sae

D, LAYERS = 8, 3


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(tiny_config(d=D * 4, layers=LAYERS), d_model=D, head_dim=2,
                              max_position=24)
    return TinyModel(cfg)


@pytest.fixture
def uses_tiny(monkeypatch, tiny):
    monkeypatch.setattr(circuit_cmd, "load_model", lambda name: tiny)
    return tiny


def _ct_folder(root, layers=range(LAYERS), d=D, model="tiny"):
    triples = [(f"blocks.{i}.hook_resid_mid", f"blocks.{i}.hook_mlp_out", _transcoder("jumprelu_transcoder", i))
               for i in layers]
    if d != D:  # transcoders of a wider model
        triples = [(k, o, s.replace(spec=SAESpec(s.spec.architecture, d, s.spec.d_sae),
                                    params={**s.params, "W_enc": np.ones((d, s.spec.d_sae), np.float32),
                                            "W_dec": np.ones((s.spec.d_sae, d), np.float32),
                                            "b_dec": np.zeros(d, np.float32)}))
                   for k, o, s in triples]
    save_circuit_tracer(gather(triples, model), root)
    return root


def _fails(capsys, argv, match, out=None):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if not ln.startswith(("loading ", "warning: "))]
    assert len(lines) == 1 and lines[0].startswith("jsae circuit: "), err
    assert match in lines[0], err
    if out is not None:
        assert not out.exists() or out.is_dir() and [p.name for p in out.iterdir()] == ["keep.txt"]
    return err


def test_intervention_argument():
    assert intervention("3:1207@-1=0") == (3, 1207, -1, 0.0)
    assert intervention(" 0:5@2=-1.5e1 ") == (0, 5, 2, -15.0)
    for bad in ("3:1207=0", "3:x@1=0", "3:1@1=nan", "3:1@1=abc", "-1:2@0=1", "3:1@1"):
        with pytest.raises(argparse.ArgumentTypeError):
            intervention(bad)


@pytest.mark.parametrize("argv,match", [
    (["--intervene", "3:12=4"], "argument --intervene: expected LAYER:FEATURE@POSITION=VALUE"),
    (["--intervene", "1:2@3=inf"], "must be finite"),
    (["--node-threshold", "1.5"], "argument --node-threshold: must be in [0, 1]"),
    (["--max-logits", "0"], "argument --max-logits"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["circuit", str(tmp_path), "--prompt", "hi", "--out", str(out), *argv])
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, uses_tiny):
    ct = _ct_folder(tmp_path / "ct")
    out = tmp_path / "out"
    base = ["circuit", str(ct), "--out", str(out)]
    _fails(capsys, [*base, "--prompt", "x" * 40], "--prompt has 41 tokens; the model's context is 24", out)
    _fails(capsys, [*base, "--prompt", "ab", "--target", "xyz"],
           "--target 'xyz' is not one token of the model's vocabulary (it encodes as 3 tokens)", out)
    _fails(capsys, [*base, "--prompt", "abc", "--intervene", "7:1@1=0"], "layer 7 does not exist", out)
    _fails(capsys, [*base, "--prompt", "abc", "--intervene", "1:99@1=0"], "feature 99 does not exist", out)
    _fails(capsys, [*base, "--prompt", "abc", "--intervene", "1:2@4=0"],
           "position 4 is outside the prompt's 4 tokens", out)
    _fails(capsys, [*base, "--prompt", "abc", "--intervene", "1:2@-5=0"], "position -5 is outside", out)
    err = _fails(capsys, [*base, "--prompt", "x" * 40, "--model", "gemma-3-270m"], "--prompt has 41", out)
    assert "warning: " in err and "names its model tiny, not gemma-3-270m" in err
    wide = _ct_folder(tmp_path / "wide", d=2 * D)
    _fails(capsys, ["circuit", str(wide), "--out", str(out), "--prompt", "abc"],
           f"reads {2 * D}-dimensional inputs but the model has d_model {D}: transcoders of another model", out)
    two = _ct_folder(tmp_path / "two", layers=range(2))
    _fails(capsys, ["circuit", str(two), "--out", str(out), "--prompt", "abc"],
           "no transcoder for layer(s) 2 of the model's 3", out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, [*base, "--prompt", "abc"], "is not empty", out)
    assert (out / "keep.txt").read_text() == "mine"
    _fails(capsys, ["circuit", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2"), "--prompt", "a"],
           "no such run or folder", tmp_path / "o2")


def test_a_run_of_plain_saes_is_refused(tmp_path, capsys, uses_tiny):
    run = tmp_path / "run"
    sae = init_sae(jax.random.key(0), SAESpec("relu", D, 16), np.random.default_rng(0).normal(size=(64, D)))
    save_sae(sae, run / "saes" / "blocks.1.hook_resid_post",
             {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny"})
    _fails(capsys, ["circuit", str(run), "--out", str(tmp_path / "o"), "--prompt", "abc"],
           "blocks.1.hook_resid_post is not a transcoder attribution can use", tmp_path / "o")


def test_write_circuit_with_a_layered_atlas(tmp_path):
    """What the command writes from a graph: the graph file, circuit-tracer's metadata list,
    feature files of exactly the graph's features that the atlas holds, the page, the
    summary; card links relative to the page."""
    g = random_graph(5, n_layers=3, n_pos=6, n_feat=24, d_sae=40)
    atlas_dir = tmp_path / "atlas"
    layers = [LayerAtlas(L, f"blocks.{L}.hook_resid_mid", random_atlas_data(30, seed=L, n_local_maps=0))
              for L in range(2)]  # layer 2 has no atlas
    atlas_dir.mkdir()
    for la in layers:
        save_atlas(la.data, atlas_dir / f"atlas-L{la.layer}.npz")
    write_layer_site(atlas_dir, layers, progress=False)
    atlas = read_atlases(atlas_dir)
    assert sorted(atlas.layers) == [0, 1] and atlas.layered
    out = tmp_path / "out"
    out.mkdir()
    nm, em, cs = keep_all(g, 0.5)
    doc = write_circuit(out, g, node_mask=nm, edge_mask=em, cumulative_scores=cs,
                        token_strings=token_strings(g), logit_strings=logit_strings(g), atlas=atlas,
                        summary={"replacement_score": 0.5})
    assert json.loads((out / "graph.json").read_text()) == doc
    assert json.loads((out / "graph-metadata.json").read_text())["graphs"][0]["slug"] == "graph"
    want, held_nodes = set(), 0
    for n in doc["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            L, f, _ = (int(v) for v in n["node_id"].split("_"))
            held = L in atlas.layers and f in set(atlas.layers[L].feature_ids.tolist())
            if held:
                want.add(cantor(L, f))
                held_nodes += 1
                r = atlas.layers[L].row(f)
                assert n["clerp"] == (atlas.layers[L].explanations[r] or atlas.layers[L].labels[r])
            else:
                assert n["clerp"] == ""
    assert want
    got = {int(p.stem) for p in (out / "features" / "test-scan").glob("*.json")}
    assert got == want
    data = (out / "graph-data.js").read_text()
    assert "../atlas/index.html#l=" in data
    s = json.loads((out / "circuit.json").read_text())
    assert s["nodes"] == len(doc["nodes"]) and s["feature_nodes_with_cards"] == held_nodes
    assert (out / "graph.html").is_file()


@pytest.fixture
def fake_attribution(monkeypatch):
    """Stand-ins for jsae.circuits' attribute / prune / intervene (a random graph over
    the prompt's tokens), to test what the command does around them; they record their calls."""
    import types

    calls = {}

    def attribute(model, saes, prompt, **kw):
        calls["attribute"] = (sorted(saes), prompt, kw)
        toks = np.asarray(model.tokenizer.encode(prompt), np.int32)
        g = random_graph(7, n_layers=model.cfg.n_layers, n_pos=len(toks), n_feat=12, d_sae=24)
        return dataclasses.replace(g, prompt=prompt, tokens=toks, scan=kw["scan"])

    def prune(graph, node_threshold, edge_threshold):
        calls["prune"] = (node_threshold, edge_threshold)
        return types.SimpleNamespace(**dict(zip(("node_mask", "edge_mask", "cumulative_scores"),
                                                keep_all(graph, 0.5))))

    def intervene(model, saes, prompt, settings, **kw):
        calls["intervene"] = settings
        return {"top": [(40, 1.5, 0.5, 0.4, 0.1), (41, 0.5, 2.0, 0.1, 0.6)]}

    import jsae.circuits

    for name, fn in (("attribute", attribute), ("prune", prune), ("intervene", intervene),
                     ("graph_scores", lambda g: (0.25, 0.75))):
        monkeypatch.setattr(jsae.circuits, name, fn)
    return calls


def test_command_around_the_attribution(tmp_path, capsys, uses_tiny, fake_attribution):
    """The command's own work with the attribution stood in: arguments passed on, the target
    token, interventions resolved, everything written into --out atomically, printed."""
    ct = _ct_folder(tmp_path / "ct")
    out = tmp_path / "out"
    argv = ["circuit", str(ct), "--prompt", "Hi there", "--out", str(out), "--target", "!",
            "--max-logits", "4", "--node-threshold", "0.7", "--intervene", "2:5@-1=3",
            "--intervene", "0:1@1=0"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    keys, prompt, kw = fake_attribution["attribute"]
    assert keys == [f"blocks.{i}.hook_resid_mid" for i in range(LAYERS)] and prompt == "Hi there"
    assert kw["target_tokens"] == uses_tiny.tokenizer.encode("!", add_bos=False)
    assert kw["max_logits"] == 4 and kw["outputs"]["blocks.1.hook_resid_mid"] == "blocks.1.hook_mlp_out"
    assert fake_attribution["prune"] == (0.7, 0.98)
    assert fake_attribution["intervene"] == {(2, 5, 8): 3.0, (0, 1, 1): 0.0}  # -1: the 9th token
    assert "1.500 ->    0.500" in printed and "replacement score 0.250" in printed
    names = {p.name for p in out.iterdir()}
    assert names == {"graph.json", "graph-metadata.json", "graph.html", "graph.js", "graph.css",
                     "graph-data.js", "circuit.json", ".jsae-output.json"}
    doc = json.loads((out / "graph.json").read_text())
    assert doc["metadata"]["scan"] == "ct" and doc["metadata"]["node_threshold"] == 0.7
    assert doc["metadata"]["prompt_tokens"][1:] == list("Hi there")
    s = json.loads((out / "circuit.json").read_text())
    assert s["replacement_score"] == 0.25 and s["interventions"]["set"][0] == [2, 5, 8, 3.0]
    assert main(argv) == 0  # its own folder: written again
    capsys.readouterr()


def test_a_cross_layer_atlas_keeps_latent_ids(tmp_path):
    """A CLT's layered atlas keeps each feature's latent index (layer * n + i): the graph's
    (layer, i) finds it there."""
    data = random_atlas_data(12, seed=1, n_local_maps=0)  # ids 0, 2, ..., 22
    data.feature_ids = data.feature_ids + 48  # layer 2 of n = 24: latents 48..71
    data.meta["d_sae"] = 4 * 24
    save_atlas(data, tmp_path / "atlas-L2.npz")
    atlas = read_atlases(tmp_path, features_per_layer=24, cross_layer=True)
    assert atlas.atlas_id(2, 0) == 48 and atlas.atlas_id(2, 4) == 52
    assert atlas.atlas_id(2, 1) is None and atlas.atlas_id(1, 0) is None
    assert read_atlases(tmp_path).atlas_id(2, 0) is None  # a set's ids are the features
    assert read_atlases(tmp_path / "none") is None


def test_end_to_end(tmp_path, capsys, uses_tiny):
    ct = _ct_folder(tmp_path / "ct")
    out = tmp_path / "out"
    rc = main(["circuit", str(ct), "--prompt", "Hello wor", "--out", str(out), "--max-logits", "3",
               "--intervene", "1:3@-1=2"])
    assert rc == 0, capsys.readouterr().err
    assert "intervention: the last position's top tokens" in capsys.readouterr().out
    doc = json.loads((out / "graph.json").read_text())
    assert doc["metadata"]["prompt"] == "Hello wor"
    assert len(doc["metadata"]["prompt_tokens"]) == 10
    assert {n["feature_type"] for n in doc["nodes"]} >= {"embedding", "logit"}
    s = json.loads((out / "circuit.json").read_text())
    assert 0 <= s["replacement_score"] <= 1 and 0 <= s["completeness_score"] <= 1
    assert (out / "graph.html").is_file()
    rc = main(["circuit", str(ct), "--prompt", "Hello wor", "--out", str(out), "--max-logits", "3"])
    assert rc == 0  # its own folder: rewritten
