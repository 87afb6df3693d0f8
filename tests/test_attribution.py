"""Attribution graphs (jsae.circuits): the frozen replacement model reproduces the real model,
its edges are exact (a change of one source moves every target by edge x change), targets split
over 8 devices give the same rows, pruning and scores follow their formulas, interventions
move the logits as a hand-made splice does, bad input is one line; and the real circuit-tracer
(side venv) computes the same graphs, pruning, scores and interventions on the same tiny Gemma 3
model and the same exported transcoders (per layer, with skip connections, and a CLT)."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from circuit_tracer_side import ATTRIBUTION_SCRIPT, circuit_tracer_python, run_circuit_tracer
from safetensors.numpy import save_file
from test_steering_helpers import tiny_params

from jsae.circuits import dictionaries as dicts
from jsae.circuits.attribution import attribute
from jsae.circuits.intervene import intervene
from jsae.circuits.prune import compute_influence, graph_scores, normalize_matrix, prune
from jsae.circuits.replacement import freeze, frozen_forward, ones_like_sources
from jsae.errors import BadInput
from jsae.export import gather, save_circuit_tracer
from jsae.models.config import TransformerConfig
from jsae.models.convert import params_to_hf
from jsae.models.transformer import forward
from jsae.sae import SAE, SAESpec

L, D, V, N = 3, 32, 97, 24
# One rope base for local and global layers: circuit-tracer's TransformerLens replacement model
# shares one rotary table across all layers (`_deduplicate_attention_buffers`), which is right
# only when the bases agree (Gemma 3's 10k local / 1M global would differ there).
CFG = TransformerConfig(
    arch="gemma3", vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=2, head_dim=8,
    d_mlp=64, norm_eps=1e-6, rope_base=1e6, rope_local_base=1e6, sliding_window=6,
    layer_types=("local", "global", "local"), attn_scale=8**-0.5, qk_norm=True, act="gelu_tanh",
    post_norms=True, embed_scale=D**0.5, bos_id=2, eos_id=1, pad_id=0, max_position=64)
TOKENS = np.array([2, 5, 9, 11, 40, 7, 23, 60, 33, 12], np.int32)
IN = [f"blocks.{i}.mlp.hook_in" for i in range(L)]
OUT = [f"blocks.{i}.hook_mlp_out" for i in range(L)]


class Model:
    def __init__(self, cfg, params):
        self.cfg, self.params, self.tokenizer = cfg, params, None


def _transcoder(seed: int, skip: bool = False) -> SAE:
    r = np.random.default_rng(seed)
    p = {"W_enc": r.standard_normal((D, N)) * 0.3, "W_dec": r.standard_normal((N, D)) * 0.3,
         "b_enc": r.standard_normal(N) * 0.1, "b_dec": r.standard_normal(D) * 0.1,
         "log_threshold": np.log(r.uniform(0.05, 0.3, N))}
    arch = "jumprelu_transcoder"
    if skip:
        p["W_skip"], arch = r.standard_normal((D, D)) * 0.05, "jumprelu_skip_transcoder"
    return SAE(params={k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
               norm_scale=jnp.asarray(0.7, jnp.float32), spec=SAESpec(arch, D, N))


def _clt(seed: int = 7) -> SAE:
    r = np.random.default_rng(seed)
    nf = N // 2
    p = {"W_enc": r.standard_normal((L, D, nf)) * 0.3,
         "W_dec": r.standard_normal((L * nf, L, D)) * 0.3,
         "b_enc": r.standard_normal(L * nf) * 0.1, "b_dec": r.standard_normal((L, D)) * 0.1,
         "in_scale": r.uniform(0.5, 2.0, L), "out_scale": r.uniform(0.5, 2.0, L),
         "log_threshold": np.log(r.uniform(0.05, 0.3, L * nf))}
    return SAE(params={k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
               norm_scale=jnp.asarray(0.8, jnp.float32),
               spec=SAESpec("clt", D, L * nf, n_layers=L, activation="jumprelu"))


@pytest.fixture(scope="module")
def tiny():
    params = tiny_params(CFG)
    sets = {"plt": ({h: _transcoder(i) for i, h in enumerate(IN)}, dict(zip(IN, OUT))),
            "skip": ({h: _transcoder(10 + i, True) for i, h in enumerate(IN)}, dict(zip(IN, OUT))),
            "clt": ({"+".join(IN): _clt()}, {"+".join(IN): "+".join(OUT)})}
    model = Model(CFG, params)
    graphs = {k: attribute(model, s, TOKENS, outputs=o, batch_size=32) for k, (s, o) in sets.items()}
    return model, sets, graphs


@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
def test_frozen_forward_reproduces_the_real_model(tiny, kind):
    """At c = 1 the frozen model's transcoder inputs, pre-activations and demeaned logits are
    the real forward's (an independent run of jsae.models.transformer)."""
    model, sets, _ = tiny
    saes, outs = sets[kind]
    dic = dicts.from_saes(saes, outs, model_cfg=CFG)
    fz, info = freeze(CFG, model.params, dic, TOKENS)
    pre, logit, x_in = frozen_forward(CFG, model.params, fz, *ones_like_sources(fz),
                                      return_inputs=True)
    real = forward(CFG, model.params, TOKENS[None], capture=IN)
    np.testing.assert_allclose(np.asarray(x_in),
                               np.stack([np.asarray(real.activations[h][0]) for h in IN]),
                               rtol=1e-5, atol=1e-5)
    n = len(info["activations"])
    assert 20 < n < 0.9 * L * (len(TOKENS) - 1) * dic.n_features
    assert not (info["features"][:, 1] == 0).any()  # BOS has no features
    np.testing.assert_allclose(np.asarray(pre)[:n], info["activations"], rtol=1e-5, atol=1e-5)
    lg = np.asarray(real.logits[0, -1])
    ids = info["logit_tokens"]
    np.testing.assert_allclose(np.asarray(logit)[:len(ids)], lg[ids] - lg.mean(), rtol=1e-5,
                               atol=1e-5)
    p = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
    top = np.argsort(-p)
    assert list(ids) == list(top[:len(ids)])  # the most probable tokens ...
    assert p[ids[:-1]].sum() < 0.95 or len(ids) == 10  # ... only as many as the 0.95 needs


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_edges_are_exact(tiny, kind):
    """A change of one source (a feature's activation, an error vector, a token embedding) by
    delta moves every target of the frozen model by edge weight x delta."""
    model, sets, graphs = tiny
    saes, outs = sets[kind]
    g = graphs[kind]
    fz, info = freeze(CFG, model.params, dicts.from_saes(saes, outs, model_cfg=CFG), TOKENS)
    n, k, T = g.n_features, g.n_logits, g.n_pos
    c = ones_like_sources(fz)
    base = [np.asarray(a, np.float64) for a in frozen_forward(CFG, model.params, fz, *c)]
    rng = np.random.default_rng(0)
    early = np.flatnonzero(g.active_features[:, 0] < L - 1)  # a last-layer feature reaches
    sources = [("feat", int(i)) for i in rng.choice(early, 3, replace=False)]  # logits only
    sources += [("err", (1, 4)), ("err", (L - 1, T - 1)), ("emb", 3), ("emb", T - 1)]
    delta = 0.25
    for kind_s, where in sources:
        cf, ce, cm = (np.array(a) for a in c)
        if kind_s == "feat":
            cf[where] += delta
            col = where
        elif kind_s == "err":
            ce[where] += delta
            col = g.error_index(*where)
        else:
            cm[where] += delta
            col = g.token_index(where)
        moved = [np.asarray(a, np.float64) for a in frozen_forward(
            CFG, model.params, fz, jnp.asarray(cf), jnp.asarray(ce), jnp.asarray(cm))]
        got = np.concatenate([(moved[0] - base[0])[:n], (moved[1] - base[1])[:k]]) / delta
        want = np.concatenate([g.adjacency[:n, col], g.adjacency[-k:, col]])
        assert np.abs(want).max() > 1e-3, (kind_s, where)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4, err_msg=f"{kind_s} {where}")


def test_graph_layout(tiny):
    _, _, graphs = tiny
    g = graphs["plt"]
    n, T = g.n_features, g.n_pos
    A = g.adjacency
    assert A.shape == (n + (L + 1) * T + g.n_logits,) * 2
    assert not A[n:-g.n_logits].any()  # error and token nodes have no inputs
    assert not A[:, -g.n_logits:].any()  # logits feed nothing
    assert not A[:, [g.error_index(i, 0) for i in range(L)]].any()  # no BOS error nodes
    # a feature gets nothing from features of its own layer or later ones
    lay = g.active_features[:, 0]
    assert not A[:n, :n][lay[:, None] <= lay[None, :]].any()
    # the CLT's features reach later layers directly: its graph has cross-layer edges the
    # per-layer set's cannot tell apart, but every edge still goes forward in layers
    gc = graphs["clt"]
    lc = gc.active_features[:, 0]
    assert not gc.adjacency[:gc.n_features, :gc.n_features][lc[:, None] <= lc[None, :]].any()


def test_a_circuit_tracer_folder_gives_the_same_graph(tiny, tmp_path):
    """The exported folder (what circuit-tracer reads) attributes as the SAEs do; progress
    reports every row."""
    model, sets, graphs = tiny
    saes, outs = sets["plt"]
    save_circuit_tracer(gather([(k, outs[k], s) for k, s in saes.items()], "tiny"), tmp_path / "ct")
    seen = []
    g = attribute(model, tmp_path / "ct", TOKENS, batch_size=32,
                  progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_allclose(g.adjacency, graphs["plt"].adjacency, rtol=1e-4, atol=1e-5)
    n_rows = g.n_features + g.n_logits
    assert seen[-1] == (n_rows, n_rows) and len(seen) == -(-n_rows // 32)


def test_targets_split_over_8_devices_give_the_same_graph(tiny):
    from jsae.parallel import make_mesh

    model, sets, graphs = tiny
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=8, model=1)
    saes, outs = sets["skip"]
    g = attribute(model, saes, TOKENS, outputs=outs, batch_size=12, mesh=mesh)
    np.testing.assert_allclose(g.adjacency, graphs["skip"].adjacency, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g.active_features, graphs["skip"].active_features)


def test_influence_is_the_series_of_the_normalised_matrix(tiny):
    """compute_influence = w ((I - B)^-1 - I), B the row-normalised |A| (NumPy's inverse)."""
    _, _, graphs = tiny
    g = graphs["plt"]
    B = normalize_matrix(g.adjacency).astype(np.float64)
    np.testing.assert_allclose(B.sum(1)[:g.n_features], 1.0, rtol=1e-5)
    w = np.zeros(len(B))
    w[-g.n_logits:] = g.logit_probabilities
    want = w @ (np.linalg.inv(np.eye(len(B)) - B) - np.eye(len(B)))
    np.testing.assert_allclose(compute_influence(B, w), want, rtol=1e-8, atol=1e-12)
    res = prune(g)
    assert res.node_mask[-g.n_logits - g.n_pos:].all()
    assert 0 < res.node_mask[:g.n_features].sum() < g.n_features
    assert not res.edge_mask[~res.node_mask].any() and not res.edge_mask[:, ~res.node_mask].any()
    r, c = graph_scores(g)
    assert 0 < r < 1 and 0 < c < 1


def test_intervention_moves_the_logits_as_a_splice_does(tiny):
    """Setting a last-layer feature adds (value - code) x its decoder to that MLP's output:
    the same as a hand-made intervention on the real model."""
    model, sets, graphs = tiny
    saes, outs = sets["plt"]
    g = graphs["plt"]
    last = np.flatnonzero((g.active_features[:, 0] == L - 1)
                          & (g.active_features[:, 1] == g.n_pos - 1))[0]
    layer, pos, feat = (int(v) for v in g.active_features[last])
    a = float(g.activations[last])
    out = intervene(model, saes, TOKENS, {(layer, feat, pos): 3.0 * a}, outputs=outs)
    sae = saes[IN[layer]]
    row = np.asarray(sae.params["W_dec"][feat]) / float(sae.norm_scale)

    def add(x):
        return x.at[0, pos].add(jnp.asarray(2.0 * a * row, x.dtype))

    want = forward(CFG, model.params, TOKENS[None], interventions={OUT[layer]: add}).logits[0, -1]
    np.testing.assert_allclose(out["intervened"], np.asarray(want), rtol=1e-4, atol=1e-4)
    assert np.abs(out["intervened"] - out["clean"]).max() > 1e-2
    assert len(out["top"]) >= 10 and out["top"][0][0] == int(np.argmax(out["clean"]))


def test_a_clt_intervention_writes_its_layer_and_every_later_one(tiny):
    """Setting a layer-1 CLT feature at one position adds (value - code) x its raw write to the
    MLP outputs of layers 1..L-1 there (its code reads layer 1's input, which no edit reaches),
    and nothing to layer 0's, whose output comes before layer 1's input in the forward."""
    from jsae.steering import feature_direction

    model, sets, graphs = tiny
    saes, outs = sets["clt"]
    (sae,) = saes.values()
    g = graphs["clt"]
    at1 = np.flatnonzero(g.active_features[:, 0] == 1)
    i = at1[np.argmax(g.active_features[at1, 1])]  # the latest position: inside every window
    layer, pos, feat = (int(v) for v in g.active_features[i])
    a = float(g.activations[i])
    out = intervene(model, saes, TOKENS, {(layer, feat, pos): 3.0 * a}, outputs=outs)
    n = sae.spec.d_sae // L

    def adds(t):
        row = np.asarray(feature_direction(sae, layer * n + feat, layer=t))
        return lambda x: x.at[0, pos].add(jnp.asarray(2.0 * a * row, x.dtype))

    want = forward(CFG, model.params, TOKENS[None],
                   interventions={OUT[t]: adds(t) for t in range(1, L)}).logits[0, -1]
    np.testing.assert_allclose(out["intervened"], np.asarray(want), rtol=1e-4, atol=1e-4)
    assert np.abs(out["intervened"] - out["clean"]).max() > 1e-3


def test_bad_input_is_one_line(tiny):
    model, sets, _ = tiny
    saes, outs = sets["plt"]
    cases = [
        (lambda: attribute(model, {IN[0]: saes[IN[0]], IN[2]: saes[IN[2]]}, TOKENS),
         r"every layer 0\.\.2 of the model; missing layer\(s\) 1"),
        (lambda: attribute(model, saes, np.arange(3, 70)), "has 68 tokens; the model.s context is 64"),
        (lambda: attribute(model, saes, TOKENS, target_tokens=[5, 400]),
         r"target token 400 is not in the vocabulary \[0, 97\)"),
        (lambda: attribute(Model(CFG.replace(d_model=16), model.params), saes, TOKENS),
         "d_model is 16"),
        (lambda: intervene(model, saes, TOKENS, {(0, N, 3): 1.0}), "feature 24 is not in 0..23"),
        (lambda: intervene(model, saes, TOKENS, {(0, 1, 10): 1.0}), "position 10 is not in"),
    ]
    for fn, msg in cases:
        with pytest.raises(BadInput, match=msg) as e:
            fn()
        assert "\n" not in str(e.value)


# ---- the real circuit-tracer ------------------------------------------------------------------

HF_CONFIG = dict(
    vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=L,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
    query_pre_attn_scalar=8, rope_theta=1e6, rope_local_base_freq=1e6,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"], rms_norm_eps=1e-6,
    max_position_embeddings=64, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)


@pytest.mark.slow
def test_real_circuit_tracer_computes_the_same_graphs(tiny, tmp_path):
    """circuit-tracer 0.5.0's attribute() on the same model (transformers -> TransformerLens)
    and the exported transcoders: the same active features, logit targets, adjacency (float32
    tolerance), pruning, scores and interventions."""
    circuit_tracer_python()
    model, sets, graphs = tiny
    save_file(params_to_hf(CFG, model.params), str(tmp_path / "model.safetensors"))
    np.save(tmp_path / "tokens.npy", TOKENS)
    interventions = {}
    for name, (saes, outs) in sets.items():
        triples = [(k, outs[k], s) for k, s in saes.items()]
        save_circuit_tracer(gather(triples, "tiny-gemma-3"), tmp_path / "ct" / name)
        g = graphs[name]
        i = int(np.flatnonzero(g.active_features[:, 0] == 0)[-1])  # propagates through 2 layers
        layer, pos, feat = (int(v) for v in g.active_features[i])
        interventions[name] = [[[layer, pos, feat, 0.0]], [[layer, pos, feat, 4.0]]]
    (tmp_path / "settings.json").write_text(json.dumps({
        "hf_config": HF_CONFIG, "sets": list(sets), "max_logits": 10, "logit_prob": 0.95,
        "batch_size": 64, "interventions": interventions}))
    report = run_circuit_tracer(ATTRIBUTION_SCRIPT, tmp_path)
    lg = np.asarray(forward(CFG, model.params, TOKENS[None]).logits[0])
    np.testing.assert_allclose(np.load(tmp_path / "hf_logits.npy"), lg, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "tl_logits.npy"), lg, rtol=1e-4, atol=1e-4)
    timings = {}
    for name, (saes, outs) in sets.items():
        ref, g = np.load(tmp_path / f"{name}.npz"), graphs[name]
        np.testing.assert_array_equal(ref["active"], g.active_features, err_msg=name)
        np.testing.assert_allclose(ref["acts"], g.activations, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(ref["logit_tokens"], g.logit_tokens)
        np.testing.assert_allclose(ref["logit_probs"], g.logit_probabilities, rtol=1e-4)
        A = ref["adjacency"]
        assert A.shape == g.adjacency.shape and np.abs(A).max() > 1.0
        np.testing.assert_allclose(g.adjacency, A, rtol=1e-4, atol=2e-5 * np.abs(A).max(),
                                   err_msg=name)
        # pruning and scores: jsae's NumPy functions on circuit-tracer's own matrix
        ref_graph = g.__class__(**{**g.__dict__, "adjacency": A})
        res = prune(ref_graph)
        np.testing.assert_array_equal(res.node_mask, ref["node_mask"])
        np.testing.assert_array_equal(res.edge_mask, ref["edge_mask"])
        np.testing.assert_allclose(res.cumulative_scores, ref["cum"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(graph_scores(ref_graph), (report[name]["replacement"],
                                                             report[name]["completeness"]),
                                   rtol=1e-4)
        for j, [(layer, pos, feat, value)] in enumerate(interventions[name]):
            out = intervene(model, saes, TOKENS, {(layer, feat, pos): value}, outputs=outs)
            np.testing.assert_allclose(out["intervened"], ref[f"intervened_{j}"], rtol=1e-4,
                                       atol=1e-4, err_msg=f"{name} intervention {j}")
        attribute(model, saes, TOKENS, outputs=outs, batch_size=64)  # compiles
        t0 = time.perf_counter()
        attribute(model, saes, TOKENS, outputs=outs, batch_size=64)
        timings[name] = (round(time.perf_counter() - t0, 3), round(report[name]["seconds_warm"], 3))
    print("attribution seconds, warm (jsae, circuit-tracer):", timings)


@pytest.mark.slow
def test_real_gemma3_270m_matches_circuit_tracer(tmp_path):
    """Gemma 3 270M (jsae's GGUF port; its weights handed to transformers as safetensors),
    random JumpReLU transcoders on every layer's MLP: circuit-tracer finds the same features
    and logit targets, the same adjacency (float32 tolerance), pruning and scores. Its
    TransformerLens model keeps each layer's rotary table (`keep_rotary_tables`: its shared
    table gives the local layers the global base)."""
    import jsae.models as M

    circuit_tracer_python()
    lm = M.load("gemma-3-270m")
    cfg = lm.cfg
    toks = np.asarray(lm.tokenizer.encode("The capital of France is", add_bos=True), np.int32)
    n_layers, d, n = cfg.n_layers, cfg.d_model, 256
    ins = [f"blocks.{i}.mlp.hook_in" for i in range(n_layers)]
    outs = {h: h.replace("mlp.hook_in", "hook_mlp_out") for h in ins}
    acts = forward(cfg, lm.params, toks[None], capture=ins + list(outs.values())).activations
    saes = {}
    for i, h in enumerate(ins):  # codes of unit scale; ~5% fire; outputs at the MLP's scale
        r = np.random.default_rng(i)
        rms_in = float(np.sqrt(np.mean(np.asarray(acts[h][0, 1:], np.float64) ** 2)))
        rms_out = float(np.sqrt(np.mean(np.asarray(acts[outs[h]][0], np.float64) ** 2)))
        p = {"W_enc": r.standard_normal((d, n)) / np.sqrt(d),
             "W_dec": r.standard_normal((n, d)) * 0.05 * rms_out,
             "b_enc": np.zeros(n), "b_dec": np.zeros(d),
             "log_threshold": np.log(r.uniform(1.2, 2.5, n))}
        saes[h] = SAE(params={k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
                      norm_scale=jnp.asarray(1 / rms_in, jnp.float32),
                      spec=SAESpec("jumprelu_transcoder", d, n))
    g = attribute(lm, saes, toks, outputs=outs, batch_size=64)
    save_file(params_to_hf(cfg, jax.device_get(lm.params)), str(tmp_path / "model.safetensors"))
    save_circuit_tracer(gather([(h, outs[h], saes[h]) for h in ins], "gemma-3-270m"),
                        tmp_path / "ct" / "plt")
    np.save(tmp_path / "tokens.npy", toks)
    hc = dict(vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=cfg.d_mlp,
              num_hidden_layers=n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              sliding_window=cfg.sliding_window, query_pre_attn_scalar=cfg.head_dim,
              rope_theta=cfg.rope_base, rope_local_base_freq=cfg.rope_local_base,
              layer_types=["sliding_attention" if t == "local" else "full_attention"
                           for t in cfg.layer_types],
              rms_norm_eps=cfg.norm_eps, max_position_embeddings=64,  # TL's masks: n_ctx^2
              bos_token_id=2, eos_token_id=1, pad_token_id=0,
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    (tmp_path / "settings.json").write_text(json.dumps({
        "hf_config": hc, "sets": ["plt"], "max_logits": 10, "logit_prob": 0.95,
        "batch_size": 64, "keep_rotary_tables": True, "warm": False}))
    report = run_circuit_tracer(ATTRIBUTION_SCRIPT, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    ref = np.load(tmp_path / "plt.npz")
    np.testing.assert_array_equal(ref["active"], g.active_features)
    assert 200 < g.n_features < 5000
    np.testing.assert_array_equal(ref["logit_tokens"], g.logit_tokens)
    A = ref["adjacency"]
    np.testing.assert_allclose(g.adjacency, A, rtol=1e-3, atol=1e-5 * np.abs(A).max())
    res = prune(g.__class__(**{**g.__dict__, "adjacency": A}))
    np.testing.assert_array_equal(res.node_mask, ref["node_mask"])
    np.testing.assert_array_equal(res.edge_mask, ref["edge_mask"])
    np.testing.assert_allclose(graph_scores(g), (report["plt"]["replacement"],
                                                 report["plt"]["completeness"]), rtol=1e-4)
