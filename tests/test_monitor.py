"""Monitor: the pure firing / span-edge functions (inside jit) and the text scan against NumPy."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from test_steering_helpers import TinyModel, random_sae

from jsae import monitor
from jsae.models.transformer import forward
from jsae.sae import encode

HOOK = "blocks.1.hook_resid_post"


def _runs_np(f):
    out, t = [], 0
    while t < len(f):
        if f[t]:
            s = t
            while t < len(f) and f[t]:
                t += 1
            out.append((s, t))
        else:
            t += 1
    return out


def test_runs_and_span_edges_agree():
    rng = np.random.default_rng(0)
    fires = rng.random((3, 17, 2)) < 0.4
    fires[0, :, 0] = True
    fires[1, :, 1] = False
    starts, ends = jax.jit(monitor.span_edges)(jnp.asarray(fires))
    starts, ends = np.asarray(starts), np.asarray(ends)
    for b in range(3):
        for k in range(2):
            r = _runs_np(fires[b, :, k])
            assert monitor.runs(fires[b, :, k]) == r
            assert np.flatnonzero(starts[b, :, k]).tolist() == [s for s, _ in r]
            assert np.flatnonzero(ends[b, :, k]).tolist() == [e - 1 for _, e in r]


def test_firing_is_pure_and_jittable():
    model = TinyModel()
    toks = jnp.asarray(np.random.default_rng(1).integers(3, 97, (2, 10)), jnp.int32)
    acts = forward(model.cfg, model.params, toks, capture=(HOOK,)).activations[HOOK]
    sae = random_sae("jumprelu", model.cfg.d_model, 30, sample=np.asarray(acts).reshape(-1, model.cfg.d_model))
    feats, thr = jnp.asarray([4, 17]), jnp.asarray([0.2, 0.5])
    mask = jnp.ones((2, 10), bool).at[:, 0].set(False)
    fires, codes = jax.jit(monitor.firing)(sae, acts, feats, thr, mask)
    z = np.asarray(encode(sae, acts))[..., [4, 17]]
    np.testing.assert_allclose(np.asarray(codes), z, atol=1e-5)
    ref = (z > np.array([0.2, 0.5])) & np.asarray(mask)[..., None]
    np.testing.assert_array_equal(np.asarray(fires), ref)


def test_scan_finds_spans_where_codes_exceed_thresholds():
    model = TinyModel()
    texts = ["the golden gate bridge", "fog over the bay!", "x"]
    ids0 = model.tokenizer.encode(texts[0])
    acts = forward(model.cfg, model.params, jnp.asarray([ids0]), capture=(HOOK,)).activations[HOOK]
    sae = random_sae("relu", model.cfg.d_model, 30, sample=np.asarray(acts)[0])
    z = np.asarray(encode(sae, acts))[0]
    f = int(np.argmax((z[1:] > 0).sum(0)))  # a feature live on this text
    thr = float(np.median(z[1:, f]))
    res = monitor.scan(model, sae, HOOK, texts, [f, 3], [thr, 0.1], batch_size=2)
    assert len(res.spans) == 3 and len(res.pieces[0]) == len(ids0)
    np.testing.assert_allclose(res.codes[0][:, 0], z[:, f], atol=1e-5)
    expected = [(s, e) for s, e in _runs_np(z[:, f] > thr) if s > 0 or e > 1]
    got = [(s.start, s.end) for s in res.spans[0] if s.feature == f]
    assert got == [(max(s, 1), e) for s, e in expected] and got
    for s in res.spans[0]:
        assert s.text == texts[0][s.char_start - 0 : s.char_end] and s.peak > (thr if s.feature == f else 0.1)
    # every text is scanned on its own: padding in a batch does not change the codes
    solo = monitor.scan(model, sae, HOOK, texts[1], [f, 3], [thr, 0.1])
    np.testing.assert_allclose(solo.codes[0], res.codes[1], atol=1e-5)
    out = monitor.render(res, 0)
    assert re.sub(r"«([^»]*)»\[[^\]]*\]", r"\1", out) == texts[0]  # only marks were added
    # per character: the features named by the marks == the features whose spans cover it
    shown, pos = [set() for _ in texts[0]], 0
    for m in re.finditer(r"«([^»]*)»\[([^\]]*)\]|([^«]+)", out):
        if m.group(3) is not None:
            pos += len(m.group(3))
            continue
        for c in range(pos, pos + len(m.group(1))):
            shown[c] = {int(x[1:]) for x in m.group(2).split(",")}
        pos += len(m.group(1))
    truth = [set() for _ in texts[0]]
    for s in res.spans[0]:
        for c in range(s.char_start, s.char_end):
            truth[c].add(s.feature)
    assert shown == truth and any(truth)
