"""The atlas of a family member and feature families across sizes on its cards.

A tiny run holds three family members on one hook (4, 8 and 16 features) whose decoders plant
a hierarchy: each feature of a larger member is a noisy copy of one feature of the next smaller
one, and one feature of the largest is new (orthogonal to everything smaller). `jsae families`
matches them; `jsae atlas --hook HOOK@NAME --families` must atlas each member's own dictionary
(w4 and w8 here; their maximum codes recomputed from the tiny model's activations) and give
every card the parent and children that a NumPy argmax of decoder cosines gives. One fixture
builds everything (three CLI runs, about 15 s of XLA compilation on a loaded 2-core CPU).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_atlas_layers import _max_codes
from test_atlas_site import CHROMIUM, needs_browser
from test_evals import TEXTS
from test_steering_helpers import TinyModel, random_sae, tiny_config

from jsae.runs import member_key

HOOK = "blocks.1.hook_resid_post"
WIDTHS = {"w4": 4, "w8": 8, "w16": 16}
MIN_COS = 0.5


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _planted(d: int, rng):
    """Decoder rows per member and each row's planted parent in the next smaller member."""
    rows = {"w4": _unit(rng.normal(size=(4, d)))}
    planted = {}
    for small, large in (("w4", "w8"), ("w8", "w16")):
        n = WIDTHS[large]
        parent = rng.permutation(np.repeat(np.arange(WIDTHS[small]), n // WIDTHS[small]))
        rows[large] = _unit(rows[small][parent] + 0.3 * _unit(rng.normal(size=(n, d))))
        planted[large] = parent
    # the largest member's last feature is new: orthogonal to every smaller decoder row
    q, _ = np.linalg.qr(np.concatenate([rows["w4"], rows["w8"]]).T)
    fresh = rng.normal(size=d)
    rows["w16"][-1] = _unit(fresh - q @ (q.T @ fresh))
    planted["w16"] = planted["w16"].copy()
    planted["w16"][-1] = -1
    return rows, planted


def _cli(*argv):
    from jsae import cli

    return cli.main([str(a) for a in argv])


def _atlas_args(run, name, corpus, *extra):
    return ["atlas", run, "--hook", member_key(HOOK, name), "--tokens", "3000",
            "--context-length", "32", "--window", "8", "--top-k", "4", "--bands", "4",
            "--neighbours", "4", "--map", "pca", "--text", corpus, *extra]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """The run, its families.json, and the atlases of two members: w4, and w8 with family
    links to w4's and w16's (written to the member's default folder RUN/atlas-w8)."""
    from jsae.sae.io import save_sae

    model = TinyModel(tiny_config(layers=2))
    d = model.cfg.d_model
    rng = np.random.default_rng(0)
    rows, planted = _planted(d, rng)
    root = tmp_path_factory.mktemp("family")
    run = root / "run"
    saes = {}
    for i, (name, n) in enumerate(WIDTHS.items()):
        sae = random_sae("topk", d, n, seed=10 + i, k=3)
        scale = rng.uniform(0.5, 2.0, (n, 1))  # the match is by direction, not by norm
        sae = sae.replace(params={**sae.params, "W_dec": jnp.asarray(rows[name] * scale, jnp.float32)})
        save_sae(sae, run / "saes" / HOOK / name, {"hook_name": HOOK, "model_name": "tiny",
                                                   "family_member": name, "family": list(WIDTHS)})
        saes[name] = sae
    (run / "config.yaml").write_text(f"model:\n  name: tiny\n  hooks: [{HOOK}]\n")
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(TEXTS))
    atlases = {n: root / f"atlas-{n}" for n in ("w4", "w16")}  # w16's: a link target only
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("jsae.models.load", lambda name, dtype="float32": model)
        assert _cli("families", run, "--out", root / "fam", "--min-cos", MIN_COS) == 0
        assert _cli(*_atlas_args(run, "w4", corpus, "--out", atlases["w4"])) == 0
        assert _cli(*_atlas_args(run, "w8", corpus, "--families", root / "fam" / "families.json",
                                 "--family-atlas", f"w4={atlases['w4']}",
                                 "--family-atlas", f"w16={atlases['w16']}")) == 0
    atlases["w8"] = run / "atlas-w8"
    return {"model": model, "run": run, "root": root, "saes": saes, "rows": rows,
            "planted": planted, "atlases": atlases, "corpus": corpus,
            "families": root / "fam" / "families.json"}


def _numpy_match(small, large):
    """Each row of ``large``'s best row of ``small`` by cosine, and that cosine (NumPy)."""
    cos = _unit(np.asarray(large, np.float64)) @ _unit(np.asarray(small, np.float64)).T
    return cos.argmax(1), cos.max(1)


def _acts(model, corpus, n_contexts):
    """The hook's activations on the contexts the atlas read (the corpus file packed as the
    command packs it) and the positions that count."""
    from jsae.analysis.corpus import pack_texts
    from jsae.data.text import FileDocuments
    from jsae.models.transformer import forward

    docs = FileDocuments([str(corpus)])
    tok, msk = pack_texts(model.tokenizer, [docs[i] for i in range(len(docs))], 32)
    tok, msk = tok[:n_contexts], msk[:n_contexts]
    return forward(model.cfg, model.params, jnp.asarray(tok), capture=[HOOK]).activations[HOOK], msk


def _dec(sae):
    return np.asarray(sae.params["W_dec"], np.float64)


def test_each_member_has_its_own_atlas_keyed_by_the_member(fam):
    from jsae.analysis.atlas.build import load_atlas

    model = fam["model"]
    data = {n: load_atlas(fam["atlases"][n] / "atlas.npz") for n in ("w4", "w8")}
    acts, msk = _acts(model, fam["corpus"], data["w4"].meta["n_contexts"])
    assert int(msk.sum()) == data["w4"].meta["n_tokens"]
    for name, d in data.items():
        sae = fam["saes"][name]
        assert d.meta["hook"] == member_key(HOOK, name) and d.meta["d_sae"] == WIDTHS[name]
        np.testing.assert_array_equal(d.feature_ids, np.arange(WIDTHS[name]))
        zmax = _max_codes(sae, acts, msk)  # this member's encoder, not another's
        np.testing.assert_allclose(d.max_act, zmax, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d.top_value[:, 0], zmax, rtol=1e-5, atol=1e-6)
    assert not np.allclose(data["w4"].max_act, data["w8"].max_act[:4])
    page = (fam["atlases"]["w8"] / "index.html").read_text()
    assert f"{HOOK}@w8" in page  # the page title names the member's key


def test_family_links_are_the_numpy_argmax_of_decoder_cosines(fam):
    from jsae.analysis.atlas.build import load_atlas
    from jsae.analysis.atlas.site import card_html, family_lines, feature_records

    d = load_atlas(fam["atlases"]["w8"] / "atlas.npz")
    dec = {n: _dec(s) for n, s in fam["saes"].items()}
    parent, cos = _numpy_match(dec["w4"], dec["w8"])
    np.testing.assert_array_equal(parent, fam["planted"]["w8"])  # the plant is what cosine finds
    np.testing.assert_array_equal(d.family_parent, np.where(cos >= MIN_COS, parent, -1))
    np.testing.assert_allclose(d.family_parent_cos, cos, atol=2e-5)
    kid_parent, kid_cos = _numpy_match(dec["w8"], dec["w16"])
    matched = kid_cos >= MIN_COS
    assert not matched[-1] and matched[:-1].all()  # the new feature has no parent
    np.testing.assert_array_equal(kid_parent[:-1], fam["planted"]["w16"][:-1])
    for f in range(8):
        kids = [j for j in np.argsort(-kid_cos, kind="stable") if matched[j] and kid_parent[j] == f]
        got = d.family_children[f]
        assert got[got >= 0].tolist() == kids, f
        np.testing.assert_allclose(d.family_children_cos[f][: len(kids)], kid_cos[kids], atol=2e-5)
    m = d.meta["family"]
    assert (m["this"]["name"], m["parent"]["name"], m["children"]["name"]) == ("w8", "w4", "w16")
    assert m["parent"]["href"] == "../../atlas-w4/index.html"  # from RUN/atlas-w8
    assert m["children"]["href"] == "../../atlas-w16/index.html"
    rec = feature_records(d, 0, 8)[3]["family"]
    assert rec["parent"][0] == parent[3] and rec["children"][0] == d.family_children[3][
        d.family_children[3] >= 0].tolist()
    lines = family_lines(rec, m)
    assert lines[0].startswith(f"parent in w4 (4 features): #{parent[3]} (cos ")
    assert lines[1].startswith("children in w16 (16 features): #")
    assert "Family across sizes" in card_html(d, 3)
    # the site's index carries every feature's parent for the map's sibling colouring
    text = (fam["atlases"]["w8"] / "data" / "atlas.js").read_text()
    ix = json.loads(text[text.index("(") + 1: text.rindex(")")])
    assert ix["family"]["parents"] == d.family_parent.tolist()
    # the smallest member's atlas with the same file: children only, no parent
    from jsae.analysis.atlas.family import family_links

    run = fam["run"]
    links = family_links(fam["families"], hook=member_key(HOOK, "w4"), d_sae=4,
                         folders=[run / "saes" / HOOK / "w4"], out=fam["root"] / "x")
    assert links.parent is None and links.meta["children"]["name"] == "w8"
    assert links.children[(links.children >= 0)].size == 8  # every w8 feature is some w4's child


def test_around_reuses_a_members_atlas(fam, monkeypatch, capsys):
    monkeypatch.setattr("jsae.models.load", lambda name, dtype="float32": fam["model"])
    out = fam["atlases"]["w4"]
    assert _cli(*_atlas_args(fam["run"], "w4", fam["corpus"], "--out", out, "--around", "2")) == 0
    assert "local map of feature 2" in capsys.readouterr().out
    assert (out / "local_2.png").exists()


def test_a_families_file_without_this_dictionary_is_refused_in_one_line(fam, capsys, tmp_path):
    run, H = fam["run"], HOOK
    other = tmp_path / "fam2"
    assert _cli("families", run / "saes" / H / "w4", run / "saes" / H / "w16", "--out", other) == 0
    capsys.readouterr()
    bad = json.loads(fam["families"].read_text())
    bad["levels"][0]["parent"][2] = 9  # w4 has features 0..3
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cases = [(other / "families.json", "does not contain the dictionary"),
             (tmp_path / "bad.json", "holds ids outside 0..3"),
             (tmp_path / "none.json", "no such families file")]
    for i, (f, why) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert _cli(*_atlas_args(run, "w8", fam["corpus"], "--out", out, "--families", f)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(f) in err and why in err, err
        assert not out.exists()
    assert _cli(*_atlas_args(run, "w8", fam["corpus"], "--out", tmp_path / "o", "--families",
                             fam["families"], "--family-atlas", "w32=x")) == 2
    assert "no such dictionary" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@needs_browser
def test_browser_family_row_links_to_the_sibling_atlases_and_colours_siblings(fam, tmp_path):
    from playwright.sync_api import sync_playwright

    from jsae.analysis.atlas.build import load_atlas
    from jsae.analysis.atlas.family import siblings
    from jsae.analysis.atlas.site import BROWSER_ARGS

    d = load_atlas(fam["atlases"]["w8"] / "atlas.npz")
    f = 5
    p = int(d.family_parent[f])
    kids = d.family_children[f][d.family_children[f] >= 0].tolist()
    want = siblings(d.family_parent, d.feature_ids, f).tolist()
    assert p >= 0 and kids and len(want) == 2  # the plant: two w8 features per w4 feature
    index = fam["atlases"]["w8"] / "index.html"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=list(BROWSER_ARGS))
        page = browser.new_page(viewport={"width": 1300, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(index.resolve().as_uri() + f"#f={f}")
        page.wait_for_function(f"window.atlas && atlas.ready && atlas.cardReady && atlas.current === {f}")
        row = page.locator("#panel section.family")
        assert row.locator(".famrow.parent").inner_text().startswith(f"parent in w4 (4 features): w4 #{p}")
        links = row.locator(".famrow.children a.famlink")
        assert [links.nth(i).inner_text() for i in range(links.count())] == [f"w16 #{k}" for k in kids]
        row.locator("button.famshow").click()
        page.wait_for_function("atlas.familyIds && atlas.familyIds.length > 0")
        assert page.evaluate("atlas.familyIds") == want
        page.wait_for_timeout(100)  # the map redraws on the next frame
        page.screenshot(path=str(tmp_path / "family.png"))
        colour = """(id) => { const p = atlas.screenPos(id), c = document.getElementById('map'),
            b = c.getBoundingClientRect(), r = window.devicePixelRatio || 1;
            return Array.from(c.getContext('2d').getImageData(Math.round((p.x - b.left) * r),
                Math.round((p.y - b.top) * r), 1, 1).data.slice(0, 3)); }"""
        violet = [0x7c, 0x3a, 0xed]
        for g in want:
            assert page.evaluate(colour, g) == violet, g
        pos = {g: page.evaluate(f"atlas.screenPos({g})") for g in d.feature_ids.tolist()}
        far = [g for g in pos if g not in want and all(
            (pos[g]["x"] - pos[w]["x"]) ** 2 + (pos[g]["y"] - pos[w]["y"]) ** 2 > 20 ** 2 for w in want)]
        assert far
        for g in far:
            assert page.evaluate(colour, g) != violet, g
        # the parent link opens the card in the smallest member's atlas
        row.locator(".famrow.parent a.famlink").click()
        page.wait_for_function(f"window.atlas && atlas.ready && atlas.cardReady && atlas.current === {p}")
        assert page.url.endswith(f"atlas-w4/index.html#f={p}")
        browser.close()
    assert not errors, errors


def test_a_moved_families_file_is_matched_by_width_and_a_damaged_atlas_is_refused(fam, tmp_path):
    from jsae.analysis.atlas.build import load_atlas, save_atlas
    from jsae.analysis.atlas.family import family_links
    from jsae.analysis.atlas.types import AtlasError
    from jsae.errors import FileFormatError

    moved = json.loads(fam["families"].read_text())
    for m in moved["members"]:  # written on another machine: no path is this run's
        m["path"] = "/elsewhere/" + m["path"].rsplit("/", 1)[-1]
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    key, folder = member_key(HOOK, "w8"), fam["run"] / "saes" / HOOK / "w8"
    links = family_links(tmp_path / "moved.json", hook=key, d_sae=8, folders=[folder], out=tmp_path)
    d = load_atlas(fam["atlases"]["w8"] / "atlas.npz")
    np.testing.assert_array_equal(links.parent, d.family_parent)
    np.testing.assert_array_equal(links.children, d.family_children)
    moved["members"][0]["d_sae"] = moved["levels"][0]["parent_d_sae"] = 8  # two of width 8
    moved["members"][0]["path"] = "/elsewhere/v8"
    (tmp_path / "two.json").write_text(json.dumps(moved))
    with pytest.raises(AtlasError, match="2 of its dictionaries have 8 features"):
        family_links(tmp_path / "two.json", hook=key, d_sae=8, folders=[folder], out=tmp_path)
    with pytest.raises(AtlasError, match="not on this atlas's hook"):
        family_links(fam["families"], hook=member_key("blocks.0.hook_resid_post", "w8"), d_sae=8,
                     folders=[folder], out=tmp_path)
    d.meta.pop("family")  # the links without the dictionaries they name
    save_atlas(d, tmp_path / "bad.npz")
    with pytest.raises(FileFormatError, match=f"{tmp_path / 'bad.npz'}: family_parent"):
        load_atlas(tmp_path / "bad.npz")
