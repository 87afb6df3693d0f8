"""A transcoder set / a CLT evaluated as a replacement model (jsae.evals.replacement) on a tiny
random LM: the all-layer splice against a layer-by-layer loop of plain forwards, exact
transcoders give CE recovered 1 and KL 0, per-layer numbers equal the single-dictionary splice,
a CLT with zero cross-layer decoders equals its set, and `jsae eval` on a set run."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_evals import TEXTS, _np_log_softmax
from test_steering_helpers import TinyModel, tiny_config

from jsae.evals import Evaluator, texts_to_contexts
from jsae.evals.downstream import downstream_metrics
from jsae.evals.replacement import (
    format_replacement_table,
    replacement_metrics,
    replacement_sites,
)
from jsae.models.transformer import forward
from jsae.runs import KEY_JOIN
from jsae.sae import SAE, SAESpec, init_sae, reconstruct

L = 3
IN, OUT = "blocks.{}.mlp.hook_in", "blocks.{}.hook_mlp_out"
BATCH = 4
N = 16  # features per layer
K = 4


@pytest.fixture(scope="module")
def tiny():
    model = TinyModel(tiny_config(layers=L))
    tokens, mask = texts_to_contexts(model, TEXTS, 32)
    hooks = [h.format(i) for i in range(L) for h in (IN, OUT)]
    acts = forward(model.cfg, model.params, tokens, capture=hooks).activations
    return model, tokens, mask, {h: np.asarray(a) for h, a in acts.items()}


def _transcoder(x, y, seed, arch="transcoder"):
    """A random TopK transcoder (norm_scale 1) with b_dec the target's mean and codes that
    fire: W_enc's columns at unit scale of x."""
    rng = np.random.default_rng(seed)
    d = x.shape[-1]
    sae = init_sae(jax.random.key(seed), SAESpec(arch, d, N, k=K), None, normalize=False,
                   b_dec_init="zeros")
    p = dict(sae.params)
    p["W_enc"] = jnp.asarray(rng.normal(0, 1, (d, N)) / np.sqrt((x**2).sum(-1).mean()),
                             jnp.float32)
    p["W_dec"] = jnp.asarray(rng.normal(0, 0.3 * np.sqrt((y**2).sum(-1).mean() / d), (N, d)),
                             jnp.float32)
    p["b_dec"] = jnp.asarray(y.reshape(-1, d).mean(0), jnp.float32)
    return sae.replace(params=p, norm_scale=jnp.float32(1.0))


@pytest.fixture(scope="module")
def tset(tiny):
    """{input hook: transcoder}, {input hook: output hook} for every layer."""
    _, _, mask, acts = tiny
    saes = {IN.format(i): _transcoder(acts[IN.format(i)][mask], acts[OUT.format(i)][mask], i)
            for i in range(L)}
    return saes, {IN.format(i): OUT.format(i) for i in range(L)}


@pytest.fixture(scope="module")
def set_eval(tiny, tset):
    """(evaluator, the set's replacement metrics), shared: each costs 13 LM passes."""
    model, tokens, mask, _ = tiny
    saes, targets = tset
    ev = _evaluator(model, tokens, mask, saes, targets)
    return ev, replacement_metrics(ev, saes, targets)


def _clt_from_set(saes, cross=0.0, seed=0):
    """The CLT whose layer-l encoder / same-layer decoder are layer l's transcoder's; its
    cross-layer decoder slices random at ``cross`` times the same-layer scale (0: none)."""
    ts = [saes[IN.format(i)] for i in range(L)]
    d = ts[0].spec.d_in
    spec = SAESpec("clt", d, L * N, n_layers=L, activation="topk", k=K)
    clt = init_sae(jax.random.key(0), spec, None, normalize=False, b_dec_init="zeros")
    rng = np.random.default_rng(seed)
    w = np.zeros((L * N, L, d), np.float32)
    for l_, t in enumerate(ts):
        w_l = np.asarray(t.params["W_dec"])
        w[l_ * N:(l_ + 1) * N, l_] = w_l
        for t_ in range(l_ + 1, L):
            w[l_ * N:(l_ + 1) * N, t_] = cross * rng.normal(size=w_l.shape) * w_l.std()
    p = dict(clt.params)
    p.update(W_enc=jnp.stack([t.params["W_enc"] for t in ts]),
             b_enc=jnp.concatenate([t.params["b_enc"] for t in ts]),
             W_dec=jnp.asarray(w), b_dec=jnp.stack([t.params["b_dec"] for t in ts]),
             in_scale=jnp.ones(L), out_scale=jnp.ones(L))
    key = KEY_JOIN.join(IN.format(i) for i in range(L))
    return key, clt.replace(params=p, norm_scale=jnp.float32(1.0))


def _evaluator(model, tokens, mask, saes, targets, fwd=forward):
    from jsae.evals.evaluate import captured_hooks

    return Evaluator(model, captured_hooks(targets), tokens, mask, forward=fwd,
                     batch_size=BATCH)


def _loop_splice(model, tokens, mask, recon):
    """The all-layer replacement computed layer by layer with plain forwards: layer l's MLP
    output is fixed (as a constant) before layer l + 1's input is read. ``recon(l, inputs)``:
    layer l's reconstruction from the spliced inputs of layers 0..l. Returns log-probs and the
    final residual."""
    m3 = jnp.asarray(mask)[..., None]
    fixed, inputs = {}, []

    def const(v, a):
        return jnp.broadcast_to(v, a.shape).astype(a.dtype)

    P = jax.tree_util.Partial
    for l_ in range(L):
        iv = {OUT.format(j): P(const, fixed[j]) for j in range(l_)}
        out = forward(model.cfg, model.params, tokens, interventions=iv,
                      capture=[IN.format(l_), OUT.format(l_)]).activations
        inputs.append(np.asarray(out[IN.format(l_)], np.float64))
        y_hat = jnp.asarray(recon(l_, inputs), jnp.float32)
        fixed[l_] = jnp.where(m3, y_hat, out[OUT.format(l_)])
    final = f"blocks.{L - 1}.hook_resid_post"
    out = forward(model.cfg, model.params, tokens, capture=[final],
                  interventions={OUT.format(j): P(const, fixed[j]) for j in range(L)})
    return _np_log_softmax(out.logits), np.asarray(out.activations[final], np.float64)


def _loop_metrics(model, tokens, mask, recon):
    clean = forward(model.cfg, model.params, tokens,
                    capture=[f"blocks.{L - 1}.hook_resid_post"])
    lp0 = _np_log_softmax(clean.logits)
    r0 = np.asarray(clean.activations[f"blocks.{L - 1}.hook_resid_post"], np.float64)
    lp, r = _loop_splice(model, tokens, mask, recon)
    ce_mask = mask[:, :-1] & mask[:, 1:]
    tgt = tokens[:, 1:, None]
    ce = -np.take_along_axis(lp[:, :-1], tgt, -1)[..., 0][ce_mask].mean()
    ce0 = -np.take_along_axis(lp0[:, :-1], tgt, -1)[..., 0][ce_mask].mean()
    kl = (np.exp(lp0) * (lp0 - lp)).sum(-1)[mask].mean()
    top1 = (lp.argmax(-1) == lp0.argmax(-1))[mask].mean()
    resid = 1 - ((r - r0) ** 2).sum(-1)[mask].sum() / (r0**2).sum(-1)[mask].sum()
    return {"ce_clean": ce0, "ce_spliced": ce, "kl_spliced": kl, "top1_agreement": top1,
            "resid_explained": resid}


def test_all_layer_splice_matches_a_layer_by_layer_loop(tiny, tset, set_eval):
    model, tokens, mask, acts = tiny
    saes, targets = tset
    got = set_eval[1]

    def recon(l_, inputs):
        return reconstruct(saes[IN.format(l_)], jnp.asarray(inputs[l_], jnp.float32))

    want = _loop_metrics(model, tokens, mask, recon)
    a = got["all"]
    for k, v in want.items():
        assert a[k] == pytest.approx(v, rel=2e-4, abs=1e-6), k
    assert a["kl_spliced"] > 1e-3 and a["top1_agreement"] < 1  # the replacement matters
    # each layer's replacement feeds the next: splicing from clean inputs differs
    assert a["ce_spliced"] != pytest.approx(max(x["ce_spliced"] for x in got["layers"]))
    # FVU / L0 per layer and the error-node share, in NumPy from the clean activations
    err = y2 = 0.0
    for i, row in enumerate(got["layers"]):
        x, y = acts[IN.format(i)][mask], acts[OUT.format(i)][mask].astype(np.float64)
        sae = saes[IN.format(i)]
        y_hat = np.asarray(reconstruct(sae, jnp.asarray(x)), np.float64)
        from jsae.sae import encode

        l0 = (np.asarray(encode(sae, jnp.asarray(x))) != 0).sum(-1).mean()
        fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        assert row["layer"] == i and row["output_hook"] == OUT.format(i)
        assert row["fvu"] == pytest.approx(fvu, rel=1e-4) and row["l0"] == pytest.approx(l0)
        err, y2 = err + ((y - y_hat) ** 2).sum(), y2 + (y**2).sum()
    assert a["mlp_out_explained"] == pytest.approx(1 - err / y2, rel=1e-4)
    assert a["l0"] == pytest.approx(sum(x["l0"] for x in got["layers"]))
    table = format_replacement_table(got)
    assert table.splitlines()[-2].lstrip().startswith("all") and "CE rec. (mean)" in table


def test_per_layer_numbers_equal_the_single_dictionary_splice(tiny, tset, set_eval):
    model, tokens, mask, _ = tiny
    saes, targets = tset
    ev, got = set_eval
    means = ev.means()
    single = downstream_metrics(model, saes, ev.batches(), {h: means[targets[h]] for h in saes},
                                forward=forward, targets=targets)
    for row in got["layers"]:
        s = single[row["key"]]
        for k in ("ce_spliced", "ce_zero_abl", "ce_mean_abl", "ce_recovered_zero",
                  "ce_recovered_mean", "kl_spliced", "kl_score_zero", "kl_score_mean"):
            assert row[k] == pytest.approx(s[k], rel=1e-5, abs=1e-7), (row["layer"], k)
    assert got["all"]["ce_clean"] == pytest.approx(single[IN.format(0)]["ce_clean"], rel=1e-6)


def test_a_clt_with_zero_cross_layer_decoders_equals_its_set(tiny, tset, set_eval):
    model, tokens, mask, _ = tiny
    saes, targets = tset
    key, clt = _clt_from_set(saes)
    out_key = KEY_JOIN.join(OUT.format(i) for i in range(L))
    ev, a = set_eval
    b = replacement_metrics(ev, {key: clt}, {key: out_key})
    assert [(s.layer, s.index) for s in replacement_sites(model.cfg, {key: clt},
                                                          {key: out_key})] == [(0, 0), (1, 1), (2, 2)]
    for k, v in a["all"].items():
        assert b["all"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    for ra, rb in zip(a["layers"], b["layers"]):
        for k in ("fvu", "l0", "ce_spliced", "kl_spliced", "resid_explained"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), k
    # the CLT's own reconstruction metrics: over its stacked output hooks
    acts = tiny[3]
    rec = ev.evaluate({key: clt}, downstream=False, targets={key: out_key}).metrics[key]
    x = np.stack([acts[IN.format(i)][mask] for i in range(L)], 1)
    y = np.stack([acts[OUT.format(i)][mask] for i in range(L)], 1).astype(np.float64)
    y_hat = np.asarray(reconstruct(clt, jnp.asarray(x)), np.float64)
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert rec["fvu"] == pytest.approx(fvu, rel=1e-4)


def test_a_clt_splice_matches_the_loop_and_reads_only_earlier_layers(tiny, tset):
    """With cross-layer decoders, layer t's replacement is the CLT's output from the spliced
    run's inputs at layers <= t (the loop feeds garbage at later layers: it must not matter)."""
    model, tokens, mask, _ = tiny
    saes, _ = tset
    key, clt = _clt_from_set(saes, cross=0.5)
    out_key = KEY_JOIN.join(OUT.format(i) for i in range(L))
    ev = _evaluator(model, tokens, mask, {key: clt}, {key: out_key})
    got = replacement_metrics(ev, {key: clt}, {key: out_key})["all"]
    rng = np.random.default_rng(7)

    def recon(l_, inputs):
        later = [rng.normal(size=inputs[0].shape) * 5 for _ in range(L - 1 - l_)]
        x = jnp.asarray(np.stack(inputs + later, axis=-2), jnp.float32)
        return reconstruct(clt, x)[..., l_, :]

    want = _loop_metrics(model, tokens, mask, recon)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=2e-4, abs=1e-6), k


def test_exact_transcoders_recover_everything(tiny):
    """On a model whose MLPs are affine (non-gated, GELU in its linear range, no post-norm), a
    skip transcoder with W_skip / b_dec the MLP's map reproduces it: CE recovered 1, KL 0,
    FVU 0, all residual explained, top-1 all agree."""
    cfg = dataclasses.replace(tiny_config(layers=L), mlp="mlp", post_norms=False)
    model = TinyModel(cfg)
    rng = np.random.default_rng(3)
    blocks = []
    for b in model.params["blocks"]:
        m = {"up": b["mlp"]["up"], "down": b["mlp"]["down"] * 0.3,
             "b_up": jnp.full((cfg.d_mlp,), 30.0, jnp.float32),  # gelu(u) = u exactly for u >> 1
             "b_down": jnp.asarray(rng.normal(size=cfg.d_model), jnp.float32)}
        blocks.append({**b, "mlp": m})
    model.params = {**model.params, "blocks": blocks}
    tokens, mask = texts_to_contexts(model, TEXTS, 32)
    saes, targets = {}, {}
    for i, b in enumerate(blocks):
        m = b["mlp"]
        w_up, w_down = np.asarray(m["up"], np.float64), np.asarray(m["down"], np.float64)
        sae = init_sae(jax.random.key(i), SAESpec("skip_transcoder", cfg.d_model, 8, k=2), None,
                       normalize=False, b_dec_init="zeros")
        p = dict(sae.params, W_dec=jnp.zeros_like(sae.params["W_dec"]),
                 W_skip=jnp.asarray(w_up @ w_down, jnp.float32),
                 b_dec=jnp.asarray(np.asarray(m["b_up"]) @ w_down + np.asarray(m["b_down"]),
                                   jnp.float32))
        saes[IN.format(i)] = SAE(p, jnp.float32(1.0), sae.spec)
        targets[IN.format(i)] = OUT.format(i)
    ev = _evaluator(model, tokens, mask, saes, targets)
    got = replacement_metrics(ev, saes, targets)
    a = got["all"]
    assert a["ce_zero_abl"] - a["ce_clean"] > 0.05 and a["ce_mean_abl"] - a["ce_clean"] > 1e-3
    assert a["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-3)
    assert a["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-3)
    assert a["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert a["top1_agreement"] == 1.0 and a["resid_explained"] == pytest.approx(1.0, abs=1e-5)
    assert a["mlp_out_explained"] == pytest.approx(1.0, abs=1e-5)
    for row in got["layers"]:
        assert row["fvu"] == pytest.approx(0.0, abs=1e-5)
        assert row["kl_spliced"] == pytest.approx(0.0, abs=1e-5)


def test_a_dictionary_that_is_not_a_transcoder_is_refused(tiny):
    model, *_ = tiny
    sae = init_sae(jax.random.key(0), SAESpec("topk", model.cfg.d_model, 16, k=2), None)
    with pytest.raises(ValueError, match="^blocks.0.mlp.hook_in: a topk dictionary reconstructs"):
        replacement_sites(model.cfg, {IN.format(0): sae}, {IN.format(0): OUT.format(0)})


def test_cli_eval_on_a_set_run_writes_the_replacement_section(tmp_path, tiny, tset, capsys):
    """`jsae eval` on a run whose saes/ hold a set: the replacement table is printed and the
    JSON has the replacement section (all + per layer)."""
    from jsae.evals.evaluate import evaluate_path
    from jsae.runs import write_set_record
    from jsae.sae.io import save_sae

    model, *_ = tiny
    saes, targets = tset
    run = tmp_path / "run"
    raw = {"model": {"name": "tiny"},
           "data": {"source": "text", "dataset": "files", "context_length": 32,
                    "holdout_fraction": 0.0},
           "sae": {"architecture": "transcoder", "input_hook": "blocks.{layer}.mlp.hook_in",
                   "output_hook": "blocks.{layer}.hook_mlp_out", "layers": "all", "d_sae": N,
                   "k": K},
           "train": {"steps": 1}, "eval": {"tokens": 300, "batch_size": BATCH}}
    (run / "saes").mkdir(parents=True)
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    from jsae.runs import sae_dirname

    for h, sae in saes.items():
        save_sae(sae, run / "saes" / sae_dirname(h), metadata={"hook_name": h,
                                                                "hook_name_out": targets[h]})
    write_set_record(run, {"layers": list(range(L)), "dictionaries": list(saes), "per_layer": [
        {"layer": i, "key": IN.format(i), "input_hook": IN.format(i),
         "output_hook": OUT.format(i)} for i in range(L)]})
    from jsae.data.text import ListDocuments

    doc = evaluate_path(run, model=model, forward=forward, documents=ListDocuments(TEXTS),
                        json_path=tmp_path / "ev.json")
    out = capsys.readouterr().out
    assert "resid. expl." in out and "CE rec. (zero)" in out
    saved = json.loads((tmp_path / "ev.json").read_text())
    rep = saved["replacement"]
    assert [x["layer"] for x in rep["layers"]] == list(range(L))
    assert rep["all"]["ce_recovered_mean"] == pytest.approx(doc["replacement"]["all"][
        "ce_recovered_mean"])
    assert set(saved["metrics"]) == set(saes) and "fvu" in saved["metrics"][IN.format(0)]
