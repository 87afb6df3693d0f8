"""The graph JSON and feature-detail JSON in circuit-tracer's frontend schema.

The reference is circuit-tracer itself (side venv, tests/circuit_tracer_side.py): from the same
arrays it builds its own Graph, prunes it with its own `prune_graph` and writes the file with
its own `create_graph_files`; jsae's file from the same masks must be the same JSON, node for
node and link for link. jsae's feature files are validated by circuit-tracer's pydantic model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from atlas_fixtures import random_atlas_data
from circuit_fixtures import keep_all, logit_strings, random_graph, token_strings
from circuit_tracer_side import run_circuit_tracer

from jsae.circuits.feature_json import feature_json, linear_histogram, percentiles
from jsae.circuits.graph_json import cantor, dumps, graph_json, uncantor
from jsae.errors import BadInput

CT_SCRIPT = r'''
import json, sys
from pathlib import Path
import numpy as np, torch
import circuit_tracer.utils.create_graph_files
cgf = sys.modules['circuit_tracer.utils.create_graph_files']  # the package re-exports the function
from circuit_tracer.attribution.targets import LogitTarget
from circuit_tracer.frontend.feature_models import Model as FeatureModel
from circuit_tracer.graph import Graph, prune_graph
from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

root = Path(sys.argv[1])
a = np.load(root / "graph.npz")
side = json.loads((root / "strings.json").read_text())

class Tok:  # the prompt's token strings, as a tokenizer would decode them
    def decode(self, t):
        return side["tokens"][side["ids"].index(int(t))]

cgf.AutoTokenizer = type("AT", (), {"from_pretrained": staticmethod(lambda name: Tok())})
cfg = UnifiedConfig(n_layers=int(a["n_layers"]), d_model=8, d_head=4, n_heads=2, d_mlp=16,
                    d_vocab=100, tokenizer_name="none", model_name="none",
                    original_architecture="none")
n_feat = len(a["active"])
g = Graph(input_string=side["prompt"], input_tokens=torch.tensor(a["tokens"]),
          active_features=torch.tensor(a["active"]), adjacency_matrix=torch.tensor(a["adj"]),
          cfg=cfg, selected_features=torch.arange(n_feat),
          activation_values=torch.tensor(a["acts"]),
          logit_targets=[LogitTarget(s, int(t)) for s, t in zip(side["logits"], a["logit_tokens"])],
          logit_probabilities=torch.tensor(a["probs"]), scan="test-scan")
nm, em, cs = prune_graph(g, 0.8, 0.98)
np.savez(root / "masks.npz", node_mask=nm.numpy(), edge_mask=em.numpy(), scores=cs.numpy())
cgf.create_graph_files(g, "ct-slug", str(root / "ct"), node_threshold=0.8, edge_threshold=0.98)
n_ok = 0
for f in sorted((root / "features").glob("*.json")):
    m = FeatureModel.model_validate_json(f.read_text())
    assert json.loads(m.model_dump_json()) == json.loads(f.read_text()), f
    n_ok += 1
print(json.dumps({"features": n_ok, "kept": int(nm.sum()), "edges": int(em.sum())}))
'''


@pytest.fixture(scope="module")
def atlas_data():
    return random_atlas_data(40, seed=3)


def test_cantor():
    for x, y in [(0, 0), (3, 17), (25, 16383), (1, 0), (0, 1)]:
        z = cantor(x, y)
        assert uncantor(z) == (x, y)
    assert [cantor(0, 0), cantor(1, 0), cantor(0, 1), cantor(2, 0)] == [0, 1, 2, 3]


def test_graph_json_matches_circuit_tracer(tmp_path, atlas_data):
    g = random_graph(1, n_layers=3, n_pos=6, n_feat=30)
    toks, logits = token_strings(g), logit_strings(g)
    np.savez(tmp_path / "graph.npz", adj=g.adjacency, active=g.active_features.astype(np.int64),
             acts=g.activations, tokens=g.tokens.astype(np.int64),
             logit_tokens=g.logit_tokens.astype(np.int64), probs=g.logit_probabilities,
             n_layers=g.n_layers)
    (tmp_path / "strings.json").write_text(json.dumps(
        {"prompt": g.prompt, "tokens": toks, "ids": g.tokens.tolist(), "logits": logits}))
    (tmp_path / "features").mkdir()
    for j, fid in enumerate(atlas_data.feature_ids[:6].tolist()):
        doc = feature_json(atlas_data, fid, layer=j % 3, transcoder_id="test-scan")
        (tmp_path / "features" / f"{doc['index']}.json").write_text(json.dumps(doc))
    res = run_circuit_tracer(CT_SCRIPT, tmp_path)
    assert res["features"] == 6
    m = np.load(tmp_path / "masks.npz")
    assert 0 < res["kept"] < len(m["node_mask"])  # the pruning dropped some and kept some
    ours = graph_json(g, m["node_mask"], m["edge_mask"], m["scores"], toks, slug="ct-slug",
                      logit_strings=logits)
    theirs = json.loads((tmp_path / "ct" / "ct-slug.json").read_text())
    assert ours["metadata"] == theirs["metadata"]
    assert ours["qParams"] == theirs["qParams"]
    assert [n["node_id"] for n in ours["nodes"]] == [n["node_id"] for n in theirs["nodes"]]
    assert ours["nodes"] == theirs["nodes"]
    assert len(ours["links"]) > 10
    assert ours["links"] == theirs["links"]
    assert json.loads(dumps(ours)) == theirs
    kinds = {n["feature_type"] for n in ours["nodes"]}
    assert {"cross layer transcoder", "embedding", "logit"} <= kinds


def test_graph_json_node_ids_by_hand():
    """Ids and fields computed here from the Graph's documented order, not from the code."""
    g = random_graph(2, n_layers=2, n_pos=3, n_feat=4, n_logits=2)
    n = g.adjacency.shape[0]
    doc = graph_json(g, np.ones(n, bool), np.abs(g.adjacency) > 0, np.linspace(0, 1, n),
                     token_strings(g), slug="s", logit_strings=logit_strings(g))
    by_id = {d["node_id"]: d for d in doc["nodes"]}
    L, P = g.n_layers, g.n_pos
    for i, (layer, pos, f) in enumerate(g.active_features.tolist()):
        d = by_id.get(f"{layer}_{f}_{pos}")
        if d is not None:
            assert d["feature"] == (layer + f) * (layer + f + 1) // 2 + f
            assert d["activation"] == pytest.approx(float(g.activations[i]))
    for p, t in enumerate(g.tokens.tolist()):
        assert by_id[f"E_{t}_{p}"]["layer"] == "E"
    top = by_id[f"{L + 1}_{int(g.logit_tokens[0])}_{P - 1}"]
    assert top["is_target_logit"] and top["clerp"].startswith(f'Output "{logit_strings(g)[0]}"')
    assert doc["metadata"]["prompt_tokens"] == token_strings(g)
    w = {(e["source"], e["target"]): e["weight"] for e in doc["links"]}
    e0 = g.error_index(1, 2)
    tgt = g.logit_index(0)
    if g.adjacency[tgt, e0] != 0:
        assert w[("0_1_2", top["node_id"])] == pytest.approx(float(g.adjacency[tgt, e0]))


def test_graph_json_bad_shapes():
    g = random_graph(0)
    nm, em, cs = keep_all(g)
    with pytest.raises(BadInput, match="edge_mask has shape"):
        graph_json(g, nm, em[:-1], cs, token_strings(g), slug="s")
    with pytest.raises(BadInput, match="token_strings has 2 entries"):
        graph_json(g, nm, em, cs, ["a", "b"], slug="s")


def test_feature_percentiles_and_histogram():
    rng = np.random.default_rng(0)
    x = rng.lognormal(0, 0.7, 20_000)
    edges = np.geomspace(1e-2, 50, 65)
    counts, _ = np.histogram(x, edges)
    q = np.asarray(percentiles(counts, edges))
    ref = np.percentile(x, np.arange(1, 101))
    assert len(q) == 100 and np.all(np.diff(q) >= 0)
    ratio = edges[1] / edges[0]  # exact to one log bin
    assert np.all(q / ref < ratio * 1.001) and np.all(ref / q < ratio * 1.001)
    h = np.asarray(linear_histogram(counts, edges, 0.0, 10.0, 20))
    assert h.sum() == counts.sum()
    ref_h, _ = np.histogram(np.clip(x, 0, 10 - 1e-9), np.linspace(0, 10, 21))
    assert np.abs(h - ref_h).sum() / len(x) < 0.15  # bins agree up to one log bin's spread
    assert percentiles(np.zeros(5), np.geomspace(1, 2, 6)) == []


def test_feature_json_fields(atlas_data):
    fid = int(atlas_data.feature_ids[1])
    doc = feature_json(atlas_data, fid, layer=4, transcoder_id="scan", index_feature=7)
    r = atlas_data.row(fid)
    assert doc["index"] == cantor(4, 7)
    assert doc["act_max"] == pytest.approx(float(atlas_data.max_act[r]))
    assert doc["activation_frequency"] == pytest.approx(float(atlas_data.density[r]))
    top = doc["examples_quantiles"][0]
    assert top["quantile_name"] == "Top activations"
    ex = top["examples"][0]
    k = atlas_data.top_anchor[r, 0]
    assert ex["tokens"][ex["train_token_ind"]] == atlas_data.token_str[int(atlas_data.top_tokens[r, 0, k])]
    assert max(ex["tokens_acts_list"]) == pytest.approx(float(atlas_data.top_value[r, 0]), rel=1e-3)
    assert doc["top_logits"][0] == atlas_data.token_str[int(atlas_data.logit_top_ids[r, 0])]
