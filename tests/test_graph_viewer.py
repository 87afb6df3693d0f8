"""jsae's attribution-graph viewer in headless Chromium, from file://, beside a layered atlas.

A synthetic graph (tests/circuit_fixtures.py) and random per-layer atlases; expected values
(node and link counts, labels, summed supernode links, card URLs) come from the graph JSON,
computed here, never from the page. Screenshots go to the test's tmp folder and, when
``JSAE_ARTIFACTS`` is set, are copied there (docs/images/circuit_graph.png is one).
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from atlas_fixtures import random_atlas_data
from circuit_fixtures import keep_all, logit_strings, random_graph, token_strings
from test_atlas_site import ARGS, CHROMIUM, Watch, _playwright, needs_browser

from jsae.analysis.atlas.layers import LayerAtlas
from jsae.analysis.atlas.site import write_layer_site
from jsae.circuits.graph_json import graph_json
from jsae.circuits.viewer import FILES, card_url, write_graph_page


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuit_site")
    g = random_graph(4, n_layers=3, n_pos=6, n_feat=26, d_sae=40)
    layers = [LayerAtlas(L, f"blocks.{L}.hook_mlp_in", random_atlas_data(40, seed=L, n_local_maps=0))
              for L in range(3)]
    write_layer_site(root / "atlas", layers, progress=False)
    ids = {la.layer: set(la.data.feature_ids.tolist()) for la in layers}
    clerps = {(int(L), int(f)): f"says <b>{f}</b> & co" for L, _, f in g.active_features[::2]}
    L, _, f = g.active_features[0]
    clerps[(int(L), int(f))] = "<img src=x onerror=window.__xss=1></script>"  # shown as text
    nm, em, cs = keep_all(g, 0.6)
    doc = graph_json(g, nm, em, cs, token_strings(g), slug="test", logit_strings=logit_strings(g),
                     clerps=clerps)
    cards = {}
    for n in doc["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, f, _ = n["node_id"].split("_")
            if int(f) in ids[int(layer)]:
                cards[n["node_id"]] = card_url("../atlas/index.html", int(layer), int(f))
    page = write_graph_page(root / "graph", doc, cards=cards, atlas_href="../atlas/index.html")
    return page, doc, cards, clerps


@pytest.fixture(scope="module")
def browser():
    with _playwright()() as pw:
        exe = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
        b = pw.chromium.launch(executable_path=exe, args=ARGS)
        yield b
        b.close()


def _save(w: Watch, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    w.page.screenshot(path=str(path))
    if os.environ.get("JSAE_ARTIFACTS"):
        dest = Path(os.environ["JSAE_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / name)


def test_page_files_are_self_contained(built):
    page, doc, _, _ = built
    assert sorted(p.name for p in page.parent.iterdir()) == sorted(FILES)
    for name in FILES:
        text = (page.parent / name).read_text(encoding="utf-8")
        assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text
    assert "<b>" not in (page.parent / "graph-data.js").read_text()  # escaped inside the script


@needs_browser
def test_graph_viewer_hover_pin_group_card(built, browser, tmp_path):
    page, doc, cards, clerps = built
    w = Watch(browser, 1500, 900)
    w.page.goto(page.resolve().as_uri())
    w.page.wait_for_function("window.graphView && graphView.ready", timeout=20_000)
    p = w.page
    assert p.locator("g.node").count() == len(doc["nodes"])
    assert p.locator("path.link").count() == len(doc["links"])

    # layout: logits above the layers, embeddings below them; columns follow positions
    ys = {n["node_id"]: p.locator(f'g.node[data-id="{n["node_id"]}"]').bounding_box()["y"]
          for n in doc["nodes"]}
    logit = next(n for n in doc["nodes"] if n["feature_type"] == "logit")
    emb = next(n for n in doc["nodes"] if n["feature_type"] == "embedding")
    feats = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert all(ys[logit["node_id"]] < ys[f["node_id"]] < ys[emb["node_id"]] for f in feats)
    lo = min(feats, key=lambda n: int(n["layer"]))
    hi = max(feats, key=lambda n: int(n["layer"]))
    if int(hi["layer"]) > int(lo["layer"]):
        assert ys[hi["node_id"]] < ys[lo["node_id"]]

    # hover: the label (clerp, token, logit)
    labelled = next(n for n in feats if n["clerp"])
    p.hover(f'g.node[data-id="{labelled["node_id"]}"] .shape')
    tip = p.inner_text("#tooltip")
    assert labelled["clerp"] in tip and f"L{labelled['layer']}" in tip
    p.hover(f'g.node[data-id="{logit["node_id"]}"] .shape')
    assert p.inner_text("#tooltip").startswith(logit["clerp"])
    p.hover(f'g.node[data-id="{emb["node_id"]}"] .shape')
    assert doc["metadata"]["prompt_tokens"][emb["ctx_idx"]].strip() in p.inner_text("#tooltip")
    _save(w, tmp_path, "circuit_hover.png")

    # pin both ends of the strongest feature-to-feature link: that link is highlighted
    ff = [e for e in doc["links"] if e["source"].count("_") == 2 and not e["source"].startswith(("E_", "0_"))
          and any(f["node_id"] == e["target"] for f in feats)]
    best = max(ff, key=lambda e: abs(e["weight"]))
    for nid in (best["source"], best["target"]):
        p.click(f'g.node[data-id="{nid}"] .shape')
        assert "pinned" in p.get_attribute(f'g.node[data-id="{nid}"]', "class")
    hl = p.locator("path.link.hl")
    pair = {(e["source"], e["target"]) for e in doc["links"]}
    assert hl.count() == len(pair & {(best["source"], best["target"]), (best["target"], best["source"])})
    assert hl.first.get_attribute("data-source") == best["source"]
    p.click(f'g.node[data-id="{best["source"]}"] .shape')  # click again: unpinned
    assert "pinned" not in p.get_attribute(f'g.node[data-id="{best["source"]}"]', "class")
    p.click(f'g.node[data-id="{best["source"]}"] .shape')

    # a third member, then group: one supernode; its links are the sums of its members'
    third = next(f["node_id"] for f in feats if f["node_id"] not in (best["source"], best["target"]))
    p.click(f'g.node[data-id="{third}"] .shape')
    members = {best["source"], best["target"], third}
    _save(w, tmp_path, "circuit_graph.png")  # the README's picture
    p.click("#group")
    assert p.locator("g.node.supernode").count() == 1
    sid = p.get_attribute("g.node.supernode", "data-id")
    for m in members:
        assert p.locator(f'g.node[data-id="{m}"]').count() == 0
    out, inc = defaultdict(float), defaultdict(float)
    for e in doc["links"]:
        if e["source"] in members and e["target"] not in members:
            out[e["target"]] += e["weight"]
        if e["target"] in members and e["source"] not in members:
            inc[e["source"]] += e["weight"]
    shown = {(el.get_attribute("data-source"), el.get_attribute("data-target")):
             float(el.get_attribute("data-weight")) for el in p.locator("path.link").all()}
    assert len(shown) == len(doc["links"]) - sum(
        1 for e in doc["links"] if e["source"] in members or e["target"] in members) + len(out) + len(inc)
    for t, v in out.items():
        assert shown[(sid, t)] == pytest.approx(v, rel=1e-6, abs=1e-9)
    for s, v in inc.items():
        assert shown[(s, sid)] == pytest.approx(v, rel=1e-6, abs=1e-9)
    assert set(p.evaluate("graphView.supernodes()")[0][1:]) == members
    _save(w, tmp_path, "circuit_group.png")
    url = p.url  # the view is in the URL: a reload shows the same group and pins
    assert "#pins=" in url and "groups=G1:" in url
    p.goto("about:blank")
    p.goto(url)
    p.wait_for_function("window.graphView && graphView.ready", timeout=20_000)
    assert p.locator("g.node.supernode.pinned").count() == 1
    assert set(p.evaluate("graphView.supernodes()")[0][1:]) == members
    p.click("#ungroup")
    assert p.locator("g.node.supernode").count() == 0
    assert p.locator("g.node").count() == len(doc["nodes"])
    p.click("#clear")

    # a feature with an atlas card: the panel links to it and shows it
    nid, url = next((k, v) for k, v in cards.items() if any(f["node_id"] == k and f["clerp"] for f in feats))
    p.click(f'g.node[data-id="{nid}"] .shape')
    assert p.get_attribute("#cardlink", "href") == url
    layer, f, _ = nid.split("_")
    assert url == f"../atlas/index.html#l={layer}&f={f}"
    frame = p.frame_locator("#card")
    frame.locator("#panel .card-head .fid").wait_for(timeout=20_000)
    assert frame.locator("#panel .card-head .fid").inner_text() == f"Feature {f}"
    nasty = next(n for n in feats if n["clerp"].startswith("<img"))
    p.hover(f'g.node[data-id="{nasty["node_id"]}"] .shape')
    assert nasty["clerp"] in p.inner_text("#tooltip")
    p.click(f'g.node[data-id="{nasty["node_id"]}"] .shape')
    assert nasty["clerp"] in p.inner_text("#panel h2")
    assert p.evaluate("window.__xss") is None and p.locator("img").count() == 0
    p.click(f'g.node[data-id="{nasty["node_id"]}"] .shape')
    p.click(f'g.node[data-id="{nid}"] .shape')
    frame.locator("#panel .card-head .fid").wait_for(timeout=20_000)
    _save(w, tmp_path, "circuit_card.png")
    assert not w.problems, w.problems
