"""The atlas of every layer: a transcoder set (one dictionary per layer, saes/set.json) and a
cross-layer transcoder (one dictionary whose latents read one layer each) give one site with a
layer selector, from one pass over the corpus. Expected codes are recomputed here from the
tiny model's captured activations (the encoder on the stacked inputs for the CLT), and the
layer profile from the decoder with NumPy."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_atlas_site import CHROMIUM, needs_browser
from test_evals import TEXTS
from test_steering_helpers import TinyModel, random_sae, tiny_config

from jsae.analysis.atlas.layers import layer_atlases, layer_plan
from jsae.analysis.atlas.stream import StreamConfig
from jsae.runs import KEY_JOIN, write_set_record
from jsae.sae.io import save_sae

IN, OUT = "blocks.{}.mlp.hook_in", "blocks.{}.hook_mlp_out"
LAYERS = [0, 2]
CFG = StreamConfig(top_k=4, window=8, bands=4, band_samples=2, coact_tokens=512)
N = 16  # features per layer


def _record(key_of):
    return {"architecture": "test", "model_name": "tiny", "layers": LAYERS,
            "dictionaries": list(dict.fromkeys(key_of(L) for L in LAYERS)),
            "per_layer": [{"layer": L, "key": key_of(L), "input_hook": IN.format(L),
                           "output_hook": OUT.format(L)} for L in LAYERS]}


def _clt_sae(d):
    from jsae.sae import SAESpec, init_sae

    L = len(LAYERS)
    spec = SAESpec("clt", d, L * N, n_layers=L, activation="topk", k=4)
    sae = init_sae(jax.random.key(1), spec, None)
    rng = np.random.default_rng(3)
    mask = np.repeat(np.triu(np.ones((L, L))), N, axis=0)[:, :, None]
    W = np.asarray(sae.params["W_dec"]) * rng.uniform(0.2, 2.0, (L * N, L, 1)) * mask  # uneven
    return sae.replace(params={**sae.params, "W_dec": jnp.asarray(W, jnp.float32),
                               "out_scale": jnp.asarray([1.0, 3.0], jnp.float32),
                               "b_enc": jnp.asarray(rng.normal(0, 0.1, L * N), jnp.float32)})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A set of two random dictionaries (layers 0 and 2) and a two-layer CLT, as run folders."""
    model = TinyModel(tiny_config(layers=3))
    d = model.cfg.d_model
    root = tmp_path_factory.mktemp("layers")
    s = root / "set"
    saes = {}
    for i, L in enumerate(LAYERS):
        saes[L] = random_sae("topk", d, N + 8 * i, seed=i, k=4)  # layers of different widths
        save_sae(saes[L], s / "saes" / IN.format(L), {"hook_name": IN.format(L), "layer": L})
    write_set_record(s, _record(IN.format))
    c = root / "clt"
    key = KEY_JOIN.join(IN.format(L) for L in LAYERS)
    clt = _clt_sae(d)
    save_sae(clt, c / "saes" / key, {"hook_name": key, "layers": LAYERS})
    write_set_record(c, _record(lambda L: key))
    for r in (s, c):
        (r / "config.yaml").write_text("model:\n  name: tiny\n")
    return model, {"set": (s, saes), "clt": (c, clt, key)}


def _acts(model, data, hooks):
    from jsae.analysis.corpus import pack_texts
    from jsae.models.transformer import forward

    tok, msk = pack_texts(model.tokenizer, TEXTS, 32)
    tok, msk = tok[: data.meta["n_contexts"]], msk[: data.meta["n_contexts"]]
    acts = forward(model.cfg, model.params, jnp.asarray(tok), capture=hooks).activations
    return acts, msk


def _max_codes(sae, x, msk):
    from jsae.sae import encode

    z = np.asarray(encode(sae, x))
    return np.where(msk[..., None], z, 0).reshape(-1, z.shape[-1]).max(0)


def _build(model, run):
    return layer_atlases(run, model=model, tokens=3000, context_length=32, cfg=CFG, texts=TEXTS,
                         progress=False, n_neighbours=4, map_method="pca")


def test_a_set_gives_every_layer_its_own_features_from_one_pass(runs):
    model, r = runs
    run, saes = r["set"]
    layers = _build(model, run)
    assert [la.layer for la in layers] == LAYERS
    hooks = [IN.format(L) for L in LAYERS]
    acts, msk = _acts(model, layers[0].data, hooks)
    for la in layers:  # layer L's cards are its own dictionary's, reading its own input hook
        sae = saes[la.layer]
        assert la.hook == IN.format(la.layer) and la.data.meta["hook"] == la.hook
        np.testing.assert_array_equal(la.data.feature_ids, np.arange(sae.spec.d_sae))
        zmax = _max_codes(sae, acts[la.hook], msk)
        np.testing.assert_allclose(la.data.top_value[:, 0], zmax, rtol=1e-5, atol=1e-6)
        assert la.data.layer_profile is None
    assert layers[0].data.meta["n_tokens"] == layers[1].data.meta["n_tokens"] > 0


def test_a_clt_splits_by_the_layer_read_and_carries_each_features_layer_profile(runs, tmp_path):
    from jsae.analysis.atlas.site import card_html, write_layer_site
    from jsae.sae.archs import get_arch

    model, r = runs
    run, sae, key = r["clt"]
    plan = layer_plan(run)
    assert list(plan.saes) == [key] and [x[0] for x in plan.layers] == LAYERS
    layers = _build(model, run)
    hooks = [IN.format(L) for L in LAYERS]
    acts, msk = _acts(model, layers[0].data, hooks)
    zmax = _max_codes(sae, jnp.stack([acts[h] for h in hooks], axis=-2), msk)  # encoder on [.., L, d]
    # the profile by NumPy: each target layer's decoder-row norm over the feature's total
    W = np.asarray(sae.params["W_dec"], np.float64)
    norms = np.linalg.norm(W, axis=-1) * np.repeat(np.triu(np.ones((2, 2))), N, axis=0)
    want = norms / norms.sum(1, keepdims=True)
    np.testing.assert_allclose(get_arch("clt").layer_profile(sae), want, rtol=1e-6)
    for i, la in enumerate(layers):
        rows = np.arange(i * N, (i + 1) * N)
        np.testing.assert_array_equal(la.data.feature_ids, rows)  # ids are the CLT's latents
        np.testing.assert_allclose(la.data.top_value[:, 0], zmax[rows], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(la.data.layer_profile, want[rows], rtol=1e-5, atol=1e-7)
        assert la.data.meta["layer_hooks"] == [OUT.format(L) for L in LAYERS]
    assert (layers[1].data.layer_profile[:, 0] == 0).all()  # layer 2's features write no earlier
    f = int(layers[0].data.feature_ids[np.argmax(layers[0].data.layer_profile[:, 1])])
    html = card_html(layers[0].data, f)
    assert 'aria-label="layer profile"' in html and ">L2</text>" in html
    index = write_layer_site(tmp_path / "site", layers)
    for i, la in enumerate(layers):  # each layer's data: every one of its features
        text = (tmp_path / "site" / "data" / f"L{la.layer}" / "atlas.js").read_text()
        ix = json.loads(text[text.index("(") + 1: text.rindex(")")])
        assert ix["ids"] == list(range(i * N, (i + 1) * N)) and ix["meta"]["layer"] == la.layer
        shard = (tmp_path / "site" / "data" / f"L{la.layer}" / "shard-0000.js").read_text()
        sh = json.loads(shard[shard.index(",") + 1: shard.rindex(")")])
        np.testing.assert_allclose(sh["profile"], want[i * N:(i + 1) * N], rtol=1e-3, atol=1e-4)
    assert '"layers": [[0, ' in index.read_text()


def _cli(run, out, *extra):
    from jsae import cli

    return cli.main(["atlas", str(run), "--out", str(out), "--tokens", "3000",
                     "--context-length", "32", "--window", "8", "--top-k", "4", "--map", "pca",
                     "--text", str(out.parent / "corpus.txt"), *extra])


def test_cli_writes_one_site_reruns_into_it_and_refuses_a_foreign_folder(runs, tmp_path,
                                                                          monkeypatch, capsys):
    from jsae import outputs

    model, r = runs
    monkeypatch.setattr("jsae.models.load", lambda name, dtype="float32": model)
    (tmp_path / "corpus.txt").write_text(" ".join(TEXTS))
    run = r["clt"][0]
    out = tmp_path / "atlas"
    assert _cli(run, out) == 0
    assert "atlas of 2 layers" in capsys.readouterr().out
    assert {"atlas-L0.npz", "atlas-L2.npz", "data/L0/atlas.js", "data/L2/shard-0000.js",
            "index.html"} <= set(outputs.marked_files(out, "jsae atlas"))
    (out / "data" / "mine.js").write_text("// not the atlas's")
    assert _cli(run, out) == 0  # the same folder again: allowed, only its own files replaced
    assert (out / "data" / "mine.js").exists() and (out / "data" / "L2" / "tokens.js").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _cli(run, foreign) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert _cli(run, tmp_path / "a2", "--around", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "--around" in err and "--hook" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a2").exists()


@needs_browser
def test_browser_switches_layer_and_opens_a_card_of_the_other_layer(runs, tmp_path):
    from playwright.sync_api import sync_playwright

    from jsae.analysis.atlas.site import BROWSER_ARGS, write_layer_site

    model, r = runs
    layers = _build(model, r["clt"][0])
    index = write_layer_site(tmp_path / "site", layers, progress=False)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=list(BROWSER_ARGS))
        page = browser.new_page(viewport={"width": 1300, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(index.resolve().as_uri() + "#f=3")
        page.wait_for_function("window.atlas && atlas.ready && atlas.cardReady && atlas.current === 3")
        assert page.evaluate("atlas.layer") == 0
        assert page.locator("#layer option").count() == 2
        assert page.locator("#panel svg.profile rect").count() == 2  # the layer profile's bars
        assert "l=0" in page.evaluate("location.hash")  # the layer is named in the address
        page.select_option("#layer", "2")
        page.wait_for_function("window.atlas && atlas.ready && atlas.layer === 2")
        page.evaluate(f"atlas.open({N + 5})")
        page.wait_for_function(f"atlas.cardReady && atlas.current === {N + 5}")
        assert page.locator("#panel .fid").inner_text() == f"Feature {N + 5}"
        assert page.evaluate("atlas.nPoints") == N
        assert "l=2" in page.evaluate("location.hash")
        page.screenshot(path=str(tmp_path / "layers.png"))
        browser.close()
    assert not errors
    from jsae.analysis.atlas.site import screenshot

    png = screenshot(index, tmp_path / "card.png", feature=N + 5, layer=2)  # waits for that card
    assert png.stat().st_size > 10_000
