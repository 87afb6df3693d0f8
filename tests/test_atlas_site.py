"""The atlas's static site in headless Chromium, from file:// and from a local HTTP server.

The site is written from random but plausible atlas data (tests/atlas_fixtures.py, nasty token
strings included) and driven with playwright against the system chromium. Expected values come
from the data itself, computed here with NumPy, never from the page. Screenshots go to the test's
tmp folder and, when ``JSAE_ARTIFACTS`` is set, are copied there.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from atlas_fixtures import random_atlas_data

from jsae.analysis.atlas.site import (
    card_html,
    feature_record,
    hist_range,
    merge_bytes,
    normalize_token,
    screenshot,
    show_card,
    token_index,
    visible_token,
    write_site,
)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


needs_browser = pytest.mark.skipif(
    _playwright() is None or not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
    reason="needs python playwright and a chromium (apt-get install chromium; pip install playwright)")


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def atlas_data():
    return random_atlas_data(600, seed=1)


@pytest.fixture(scope="module")
def site(atlas_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas_site")
    index = write_site(out, atlas_data, progress=False)
    assert index == out / "index.html"
    return out


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        exe = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
        b = pw.chromium.launch(executable_path=exe, args=ARGS)
        yield b
        b.close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def http_url(site):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


class Watch:
    """A page with every console error, page error, failed request and HTTP error recorded."""

    def __init__(self, browser, width=1400, height=900):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(
            f"console {m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed request: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))

    def goto(self, url, timeout=30_000):
        self.page.goto(url)
        self.page.wait_for_function("window.atlas && window.atlas.ready", timeout=timeout)

    def open_card(self, fid):
        self.page.wait_for_function(f"atlas.cardReady && atlas.current === {fid}", timeout=10_000)
        assert self.page.inner_text("#panel .card-head .fid") == f"Feature {fid}"

    def shot(self, tmp_path, name):
        path = tmp_path / f"{name}.png"
        self.page.screenshot(path=str(path))
        if os.environ.get("JSAE_ARTIFACTS"):
            dest = Path(os.environ["JSAE_ARTIFACTS"])
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / path.name)
        return path

    def close(self):
        self.page.close()


def _isolated_feature(data):
    """The id of the on-map feature farthest from any other point (hovering it is unambiguous)."""
    xy = data.map_xy.astype(np.float64)
    ok = np.flatnonzero(np.isfinite(xy).all(1) & (data.top_value[:, 0] > 0))
    d = np.linalg.norm(xy[ok, None] - xy[None, ok], axis=-1)
    np.fill_diagonal(d, np.inf)
    return int(data.feature_ids[ok[np.argmax(d.min(1))]])


def _text_scores(data, query_tokens, idf=False):
    """Independent reference for the text search: per feature, the sum over its top examples
    whose anchor token (normalised) is one of the query tokens, of value / max / K; with
    ``idf``, each token's part times ln(1 + n / df) (n features with examples, df of them on it)."""
    F, K = data.top_value.shape
    per_token = {t: np.zeros(F) for t in query_tokens}
    for r in range(F):
        for k in range(K):
            v = data.top_value[r, k]
            t = int(data.top_tokens[r, k, data.top_anchor[r, k]])
            key = normalize_token(data.token_str[t]) if t >= 0 else None
            if v > 0 and key in per_token:
                per_token[key][r] += v / data.max_act[r] / K
    n = int((data.top_value[:, 0] > 0).sum())
    return sum(s * (np.log(1 + n / max((s > 0).sum(), 1)) if idf else 1) for s in per_token.values())


# --------------------------------------------------------------------------------- browser


@needs_browser
@pytest.mark.parametrize("via", ["file", "http"])
def test_site_map_card_search_neighbours(via, site, atlas_data, browser, tmp_path, request):
    data = atlas_data
    base = site.as_uri() if via == "file" else request.getfixturevalue("http_url")
    w = Watch(browser)
    page = w.page
    w.goto(f"{base}/index.html")
    # The neighbourhood maps list gives each radius as a short number (0.30, not 0.3000000119).
    radii = re.findall(r"within cosine distance (\S+)", page.inner_text("#panel"))
    assert radii and all(re.fullmatch(r"\d\.\d\d", r) for r in radii), radii

    # Every point with a position is drawn (dead features have none).
    on_map = int(np.isfinite(data.map_xy).all(1).sum())
    assert on_map < data.n_features
    assert page.evaluate("atlas.pointsDrawn") == on_map
    assert page.evaluate("atlas.nPoints") == on_map
    w.shot(tmp_path, f"atlas_map_{via}")

    # Hover shows the label; click opens that card.
    fid = _isolated_feature(data)
    row = data.row(fid)
    pos = page.evaluate(f"atlas.screenPos({fid})")
    page.mouse.move(pos["x"], pos["y"])
    page.wait_for_selector("#tooltip:not([hidden])")
    assert page.inner_text("#tooltip") == f"#{fid} {data.labels[row]}"
    page.mouse.click(pos["x"], pos["y"])
    w.open_card(fid)
    assert page.evaluate("location.hash") == f"#f={fid}"
    assert page.inner_text("#panel .flabel") == data.labels[row]

    # Top contexts: one row per non-empty example, best first, tokens highlighted by strength.
    n_top = int((data.top_value[row] > 0).sum())
    assert page.locator("#panel .top .ex").count() == n_top
    first = page.locator("#panel .top .ex").first
    anchor = first.locator(".tok.anchor")
    assert anchor.count() == 1
    a_tok = int(data.top_tokens[row, 0, data.top_anchor[row, 0]])
    assert anchor.evaluate("e => e.textContent") == visible_token(data.token_str[a_tok], context=True)
    toks = data.top_tokens[row, 0]
    assert first.locator(".tok").count() == int((toks >= 0).sum())
    bg = anchor.evaluate("e => getComputedStyle(e).backgroundColor")
    alpha = float(re.findall(r"[\d.]+", bg)[3]) if bg.count(",") == 3 else 1.0
    expect = float(data.top_acts[row, 0, data.top_anchor[row, 0]]) / float(data.max_act[row])
    assert alpha == pytest.approx(min(expect, 1.0), abs=0.01)
    n_band_rows = int((data.band_value[row] > 0).sum())
    assert page.locator("#panel .bands .ex").count() == n_band_rows
    nz = np.flatnonzero(data.hist_counts[row])  # bins shown: one either side of the filled ones
    a, b = max(0, nz[0] - 1), min(data.hist_counts.shape[1], nz[-1] + 2)
    assert b - a >= 8  # (the fixture's histograms are wide, so no widening)
    assert page.locator("#panel .hist rect").count() == b - a
    cmd = page.inner_text("#panel pre.cmd")
    assert cmd == (f"jsae steer 'runs/my quickstart' --hook blocks.6.hook_resid_post --feature {fid} "
                   "--value 5x --prompt 'My favourite place is'")
    w.shot(tmp_path, f"atlas_card_{via}")

    # Neighbour links navigate to the neighbour's card.
    nb = int(data.cos_ids[row, 0])
    page.locator("#panel .nbr.cos a.nb").first.click()
    w.open_card(nb)
    co = [int(i) for i in data.coact_ids[data.row(nb)] if i >= 0][-1]
    page.locator(f"#panel .nbr.coact a.nb[data-fid='{co}']").first.click()
    w.open_card(co)
    page.go_back()
    w.open_card(nb)
    step = 1 if data.row(nb) + 1 < data.n_features else -1
    page.keyboard.press("ArrowRight" if step > 0 else "ArrowLeft")  # the next feature in atlas order
    w.open_card(int(data.feature_ids[data.row(nb) + step]))

    # Search by id, by label words, by text.
    def search(q, kind):
        page.fill("#q", q)
        page.wait_for_function(f"atlas.searchReady && atlas.searched === {q.strip()!r}")
        page.wait_for_selector("#results:not([hidden])")
        return [int(x) for x in page.eval_on_selector_all(
            f"#results a.res.{kind}", "es => es.map(e => e.dataset.fid)")]

    r57 = next(r for r in range(57, data.n_features) if data.top_value[r, 0] > 0)
    target = int(data.feature_ids[r57])
    assert search(str(target), "byid") == [target]
    page.press("#q", "Enter")
    w.open_card(target)
    assert target in search(data.labels[r57], "bylabel")
    # Text: a plain word's features, ranked as the NumPy reference ranks them.
    r = next(r for r in range(30, data.n_features) if data.top_value[r, 0] > 0
             and data.labels[r].split()[0] in ("river", "bridge", "golden", "science", "music"))
    word = data.labels[r].split()[0]
    text_hits = search(f"Golden {word.upper()}", "bytext")
    assert page.evaluate(f"atlas.tokenize('Golden {word.upper()}')") == ["golden", word]
    ref = _text_scores(data, {"golden", word}, idf=True)
    order = np.lexsort((data.feature_ids, -np.round(ref, 3)))
    assert len(text_hits) == min(12, int((ref > 0).sum()))
    assert text_hits[0] in {int(data.feature_ids[i]) for i in order[:2]}
    assert set(text_hits) <= {int(data.feature_ids[i]) for i in np.flatnonzero(ref > 0)}
    w.shot(tmp_path, f"atlas_search_{via}")
    page.keyboard.press("Escape")

    # The viewer assembles the same card records from a shard's columns as site.py does.
    dead = int(data.feature_ids[np.flatnonzero(data.max_act == 0)[0]])
    padded = int(data.feature_ids[np.flatnonzero((data.top_tokens < 0).any((1, 2)))[0]])
    for f in (fid, dead, padded, int(data.feature_ids[-1])):
        want = json.loads(json.dumps(feature_record(data, data.row(f))))
        assert page.evaluate(f"atlas.record({f})") == want, f

    # Byte-fallback runs read as their characters, in the viewer as in site.py.
    for texts in (["<0xC2>", "<0xA0>", "a"], ["x", "<0xE2>", "<0x80>", "<0x94>"], ["<0xE2>", "<0x80>"],
                  ["<0x0A>"], ["<0xFF>", "b"]):
        assert page.evaluate("t => atlas.mergeBytes(t)", texts) == merge_bytes(texts)

    # Nasty strings are shown as text, never run: feature 0's label is a <script> tag.
    page.evaluate("atlas.open(0)")
    w.open_card(0)
    assert page.inner_text("#panel .flabel") == data.labels[0]
    assert page.inner_text("#panel .expl").startswith(data.explanations[0])
    assert page.evaluate("window.__xss") is None
    page.click("#panel button.copy")  # the steer command to the clipboard (or its fallback)
    page.wait_for_function("document.querySelector('#panel button.copy').textContent === 'copied'")

    # The local map around a feature.
    lm = data.local_maps[0]
    w.goto(f"{base}/around-{lm.center}.html")
    assert page.evaluate("atlas.pointsDrawn") == len(lm.ids)
    pos = page.evaluate(f"atlas.screenPos({lm.center})")
    assert pos is not None
    page.evaluate(f"atlas.open({lm.center})")
    w.open_card(lm.center)
    w.shot(tmp_path, f"atlas_around_{via}")
    assert w.problems == []
    w.close()


@needs_browser
def test_hundred_thousand_features(browser, tmp_path):
    data = random_atlas_data(100_000, seed=3, k=1, q=1, s=1, w=4, h=8, n_logits=2, n_neighbours=2,
                             n_local_maps=0, explanations=False)
    write_site(tmp_path / "big", data, progress=False)
    w = Watch(browser, 1200, 800)
    w.goto((tmp_path / "big" / "index.html").as_uri(), timeout=90_000)
    on_map = int(np.isfinite(data.map_xy).all(1).sum())
    assert w.page.evaluate("atlas.pointsDrawn") == on_map
    full = w.page.evaluate("atlas.drawMs")
    for _ in range(5):  # redraws (pan/zoom) of all 10^5 points: timed for the log only
        w.page.mouse.move(300, 400)
        w.page.mouse.wheel(0, -120)
        w.page.wait_for_timeout(50)
    print(f"100k points: full draw {full:.1f} ms, zoomed redraw {w.page.evaluate('atlas.drawMs'):.1f} ms")
    last = int(data.feature_ids[-1])  # a card from the last shard
    w.page.evaluate(f"atlas.open({last})")
    w.open_card(last)
    w.page.evaluate("atlas.open(7)")  # an odd id is not in this atlas (ids are even)
    w.page.wait_for_function("atlas.cardReady && atlas.current === 7")
    assert "not in this atlas" in w.page.inner_text("#panel")
    w.shot(tmp_path, "atlas_map_100k")
    assert w.problems == []
    w.close()


# --------------------------------------------------------------------------------- no browser


def test_site_is_self_contained(site, atlas_data):
    files = sorted(p for p in site.rglob("*") if p.is_file())
    names = {p.relative_to(site).as_posix() for p in files}
    n_shards = -(-atlas_data.n_features // 256)
    assert {"index.html", "atlas.js", "atlas.css", "data/atlas.js", "data/tokens.js"} <= names
    assert {f"data/shard-{i:04d}.js" for i in range(n_shards)} <= names
    assert f"around-{atlas_data.local_maps[0].center}.html" in names
    for p in files:
        text = p.read_text(encoding="utf-8")
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{p.name} refers to the network: {urls}"
        assert "fetch(" not in text and "XMLHttpRequest" not in text and "@import" not in text
    shard = (site / "data" / "shard-0001.js").read_text()
    assert shard.startswith("window.__atlas_shard(1,")
    assert shard.isascii()  # non-ASCII and lone surrogates are \u-escaped


def test_token_index_matches_reference(atlas_data):
    data = atlas_data
    index = token_index(data)
    for key in ("golden", "river", "<script>window.__xss=1</script>", "\"quoted\""):
        ref = _text_scores(data, {key})
        want = {int(data.feature_ids[r]): ref[r] for r in np.flatnonzero(ref > 0)}
        got = dict(index.get(key, []))
        top = sorted(want.items(), key=lambda kv: (-kv[1], kv[0]))[:40]
        assert set(got) == {f for f, _ in top}, key
        for f, v in got.items():
            assert v == pytest.approx(want[f], rel=1e-3)
    assert "" not in index and "\n" not in index  # whitespace-only tokens are not indexed


def test_merge_bytes():
    assert merge_bytes(["a", "<0xC2>", "<0xA0>", "b"]) == ["a", "\xa0", None, "b"]
    assert merge_bytes(["<0xE2>", "<0x80>", "<0x94>"]) == ["—", None, None]
    assert merge_bytes(["<0xE2>", "<0x80>"]) == ["<0xE2>", "<0x80>"]  # cut: stays raw
    assert merge_bytes(["<0x0A>", "x"]) == ["\n", "x"]


def test_visible_token():
    assert visible_token("a\nb") == "a⏎b"
    assert visible_token("\t") == "⇥"
    assert visible_token("  ") == "··"
    assert visible_token(" ", context=True) == " "
    assert visible_token("\n", context=True) == "⏎"
    assert visible_token("\u2581the") == " the"
    assert visible_token("\x00") == "\\x00"
    assert visible_token("\ud800") == "\ufffd"
    assert visible_token("") == "∅"
    assert visible_token("\xa0") == "⍽"


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.classes = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.classes.append(dict(attrs).get("class", ""))

    def handle_data(self, d):
        self.text.append(d)


def test_card_html(atlas_data):
    data = atlas_data
    fid = int(data.feature_ids[0])
    out = card_html(data, fid)
    p = _Collect()
    p.feed(out)
    assert "script" not in p.tags and "img" not in p.tags  # the nasty label stays text
    text = "".join(p.text)
    assert data.labels[0] in text
    assert f"Feature {fid}" in text
    n_top = int((data.top_value[0] > 0).sum())
    assert sum(c == "ex" for c in p.classes) == n_top + int((data.band_value[0] > 0).sum())
    assert sum(c.startswith("tok anchor") for c in p.classes) == n_top + int((data.band_value[0] > 0).sum())
    assert "jsae steer" in text and "--feature 0" in text
    with pytest.raises(KeyError, match="not in this atlas"):
        card_html(data, 1)
    pytest.importorskip("IPython")
    assert show_card(data, fid).data == out


def test_hist_range():
    assert hist_range([0] * 12) == (0, 12)
    assert hist_range([0, 0, 5, 0, 3] + [0] * 7) == (0, 8)
    assert hist_range([0] * 10 + [1] * 10 + [0] * 10) == (9, 21)
    assert hist_range([1, 2, 3]) == (0, 3)


@needs_browser
def test_screenshot(site, atlas_data, tmp_path):
    png = screenshot(site / "index.html", tmp_path / "card.png", feature=int(atlas_data.feature_ids[1]),
                     card_only=True, size=(1000, 700), executable=CHROMIUM)
    from PIL import Image

    with Image.open(png) as im:
        assert 300 < im.width < 1000 and 300 < im.height < 700  # the card panel, not the page
        assert im.mode == "P"  # quantised to a palette (small PNGs for the README)


def test_bad_atlas_data_names_the_field(tmp_path):
    from jsae.errors import FileFormatError

    data = random_atlas_data(20, seed=2)
    data.labels = data.labels[:-1]
    with pytest.raises(FileFormatError, match=r"labels has 19 entries, expected 20"):
        write_site(tmp_path, data, progress=False)
    data = random_atlas_data(20, seed=2)
    data.top_acts = data.top_acts[:, :3]
    with pytest.raises(FileFormatError, match=r"top_acts has shape \[20, 3, 16\], expected \[20, 8, 16\]"):
        write_site(tmp_path, data, progress=False)
    assert not (tmp_path / "index.html").exists()


@needs_browser
@pytest.mark.slow
def test_real_model_site(browser, tmp_path):
    """Gemma 3 270M on the offline corpus with a random 512-latent TopK dictionary: the site's
    contexts read as the tokenizer decodes them, real token strings render, nothing errs."""
    import jax

    from jsae.analysis.atlas import StreamConfig, atlas
    from jsae.analysis.corpus import corpus_contexts
    from jsae.analysis.top import hook_activations
    from jsae.models import load
    from jsae.sae import SAESpec, init_sae

    hook = "blocks.6.hook_resid_post"
    lm = load("gemma-3-270m")
    toks, mask = corpus_contexts(lm.tokenizer, 8, 64, seed=5)
    acts = np.asarray(hook_activations(lm, hook, toks))[mask]
    sae = init_sae(jax.random.PRNGKey(0), SAESpec("topk", acts.shape[1], 512, k=8), acts)
    data = atlas((lm, sae, hook), tokens=48 * 64, context_length=64, progress=False,
                 cfg=StreamConfig(top_k=8, window=16, bands=4, band_samples=2),
                 map_method="pca")
    write_site(tmp_path / "site", data, progress=False)
    w = Watch(browser)
    w.goto((tmp_path / "site" / "index.html").as_uri())
    assert w.page.evaluate("atlas.pointsDrawn") == int(np.isfinite(data.map_xy).all(1).sum()) > 0
    row = int(np.argmax(data.density))
    fid = int(data.feature_ids[row])
    w.page.evaluate(f"atlas.open({fid})")
    w.open_card(fid)
    checked = 0
    for k in range(int((data.top_value[row] > 0).sum())):  # each context reads as decoded
        ids = [int(t) for t in data.top_tokens[row, k] if t >= 0 and t != lm.tokenizer.bos_id]
        shown = w.page.locator("#panel .top .ex .ctx").nth(k).inner_text()
        if "<0x" in shown:  # a character cut by the window's edge stays as raw bytes
            continue
        shown = shown.replace("<bos>", "").replace("⏎", "\n").replace("⍽", "\xa0")
        assert shown.strip() == lm.tokenizer.decode(ids).strip()
        checked += 1
    assert checked >= 3
    w.shot(tmp_path, "atlas_card_real")
    assert w.problems == []
    w.close()


def test_crosscoder_card_shows_its_layer_profile(browser, tmp_path):
    """A crosscoder atlas (layer_profile and meta["layer_hooks"]): the browser's card and the
    notebook card both say how much of the feature's decoder norm goes to each hook."""
    data = random_atlas_data(40, seed=5, n_local_maps=0, explanations=False)
    prof = np.random.default_rng(0).dirichlet(np.ones(3), size=40).astype(np.float32)
    data.layer_profile = prof
    data.meta["layer_hooks"] = [f"blocks.{i}.hook_resid_post" for i in (3, 6, 9)]
    write_site(tmp_path / "cc", data, progress=False)
    fid = int(data.feature_ids[4])
    want = " · ".join(f"L{n} {round(100 * float(v))}%" for n, v in zip((3, 6, 9), prof[4]))
    w = Watch(browser)
    w.goto((tmp_path / "cc" / "index.html").as_uri())
    w.page.evaluate(f"atlas.open({fid})")
    w.open_card(fid)
    assert want in w.page.inner_text("#panel .stats")
    assert w.problems == []
    w.close()
    assert "writes to" in card_html(data, fid)
