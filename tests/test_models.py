"""jsae.models on tiny random models: parity with transformers' PyTorch implementations for every
architecture (logits and every residual stream), loaders (HF safetensors folders, GGUF files incl.
llama's permuted Q/K), hooks, interventions, padding, cached generation, sampling, sharding, and
clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jsae.models as M  # noqa: E402

VOCAB, D, F, LAYERS, HEADS, KV, DH = 128, 64, 96, 4, 4, 2, 16


def llama_gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K (the inverse of
    `jsae.models.convert.llama_gguf_unpermute`); builds GGUF-layout test weights."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _randomise_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or "ln_f" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _hf_tiny(arch: str):
    T = transformers
    common = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=128,
                  attn_implementation="eager", bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if arch == "gemma3":
        cfg = T.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 7}, head_dim=DH, sliding_window=5, query_pre_attn_scalar=24,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
        cls = T.Gemma3ForCausalLM
    elif arch == "gemma3-small":  # 3 layers (local, global, local) for the generation tests
        cfg = T.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3}, head_dim=DH, sliding_window=4, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        cls = T.Gemma3ForCausalLM
    elif arch == "gemma2":
        cfg = T.Gemma2Config(**common, head_dim=DH, sliding_window=5, query_pre_attn_scalar=24,
                             attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
        cls = T.Gemma2ForCausalLM
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                           attn_implementation="eager", bos_token_id=1, eos_token_id=1)
        cls = T.GPT2LMHeadModel
    elif arch == "llama":
        cfg = T.LlamaConfig(**common, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                             "rope_theta": 500000.0})
        cls = T.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = T.Qwen2Config(**common, tie_word_embeddings=True)
        cls = T.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = T.Qwen3Config(**common, head_dim=DH, tie_word_embeddings=True)
        cls = T.Qwen3ForCausalLM
    elif arch == "mistral":
        cfg = T.MistralConfig(**common, sliding_window=5, tie_word_embeddings=False)
        cls = T.MistralForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    _randomise_norms(model)
    return model


ARCHS = ["gemma3", "gemma2", "gpt2", "llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (HF model, folder with config.json + model.safetensors)."""
    out = {}
    for arch in [*ARCHS, "gemma3-small"]:
        model = _hf_tiny(arch)
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d, safe_serialization=True)
        out[arch] = (model, d)
    return out


def _tokens(B=2, T=12, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, (B, T)).astype(np.int32)


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_transformers(saved, arch):
    hf, folder = saved[arch]
    lm = M.load(folder)
    assert lm.cfg.arch == arch
    toks = _tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(toks, dtype=torch.long), output_hidden_states=True)
    n = lm.cfg.n_layers
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(n)] + ["ln_final.hook_normalized"]
    out = M.forward(lm.cfg, lm.params, toks, capture=hooks)
    logits = np.asarray(out.logits)
    assert logits.shape == (2, 12, VOCAB)
    assert np.abs(logits - ref.logits.numpy()).max() <= 1e-4
    for i in range(n - 1):  # HF's last hidden state is after the final norm
        got = np.asarray(out.activations[f"blocks.{i}.hook_resid_post"])
        np.testing.assert_allclose(got, ref.hidden_states[i + 1].numpy(), atol=1e-4, rtol=1e-4)
    got = np.asarray(out.activations["ln_final.hook_normalized"])
    np.testing.assert_allclose(got, ref.hidden_states[-1].numpy(), atol=1e-4, rtol=1e-4)
    # resid_pre of layer 0 is the (scaled) embedding
    pre = M.forward(lm.cfg, lm.params, toks, capture=["blocks.0.hook_resid_pre"], stop_after_capture=True)
    np.testing.assert_allclose(np.asarray(pre.activations["blocks.0.hook_resid_pre"]),
                               ref.hidden_states[0].numpy(), atol=1e-5, rtol=1e-5)


def _hf_mlp_hooks(hf, arch: str, toks):
    """Per layer, from transformers' own modules: the MLP norm's input normalised without its
    weight (TransformerLens's ln2.hook_normalized), the norm's output (what the MLP reads) and what
    the MLP adds to the residual (after Gemma's post-feedforward norm)."""
    layers = hf.transformer.h if arch == "gpt2" else hf.model.layers
    got, handles = {}, []

    def keep(i, name, which):
        def fn(mod, args, out):
            got[(i, name)] = (args[0] if which == "in" else out).detach().double().numpy()
        return fn

    for i, layer in enumerate(layers):
        if arch == "gpt2":
            ln, out_mod = layer.ln_2, layer.mlp
        elif arch == "gemma3":
            ln, out_mod = layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm
        else:
            ln, out_mod = layer.post_attention_layernorm, layer.mlp
        handles += [ln.register_forward_hook(keep(i, "ln_in", "in")),
                    ln.register_forward_hook(keep(i, "mlp.hook_in", "out")),
                    out_mod.register_forward_hook(keep(i, "hook_mlp_out", "out"))]
    with torch.no_grad():
        hf(torch.tensor(toks, dtype=torch.long))
    for h in handles:
        h.remove()
    eps = hf.config.layer_norm_epsilon if arch == "gpt2" else hf.config.rms_norm_eps
    for i in range(len(layers)):
        x = got.pop((i, "ln_in"))
        if arch == "gpt2":
            x = x - x.mean(-1, keepdims=True)
        got[(i, "ln2.hook_normalized")] = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return got


@pytest.mark.parametrize("arch", ["gemma3", "gpt2", "llama"])
def test_mlp_input_hooks_match_transformers(saved, arch):
    """ln2.hook_normalized, mlp.hook_in and hook_mlp_out against transformers' modules; capturing
    or stopping at the new hooks changes nothing else, and an intervention there is the MLP's."""
    hf, folder = saved[arch]
    lm = M.load(folder)
    toks = _tokens()
    ref = _hf_mlp_hooks(hf, arch, toks)
    kinds = ("ln2.hook_normalized", "mlp.hook_in", "hook_mlp_out")
    names = [f"blocks.{i}.{k}" for i in range(lm.cfg.n_layers) for k in kinds]
    out = M.forward(lm.cfg, lm.params, toks, capture=names)
    for (i, k), want in ref.items():
        np.testing.assert_allclose(np.asarray(out.activations[f"blocks.{i}.{k}"]), want,
                                   atol=2e-4, rtol=2e-4, err_msg=f"blocks.{i}.{k}")
    plain = M.forward(lm.cfg, lm.params, toks)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(plain.logits))
    h = "blocks.1.ln2.hook_normalized"
    early = M.forward(lm.cfg, lm.params, toks, capture=[h, "blocks.1.mlp.hook_in"],
                      stop_after_capture=True)
    assert early.logits is None
    np.testing.assert_array_equal(np.asarray(early.activations[h]), np.asarray(out.activations[h]))
    # adding v to the normalised input at layer 1 == adding v * the norm's scale to the MLP input
    v = np.random.default_rng(1).normal(size=lm.cfg.d_model).astype(np.float32)
    sv = v * np.asarray(lm.params["blocks"][1]["ln2"]["scale"], np.float32)
    a = M.forward(lm.cfg, lm.params, toks, interventions={h: lambda x: x + v})
    b = M.forward(lm.cfg, lm.params, toks, interventions={"blocks.1.mlp.hook_in": lambda x: x + sv})
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-4)
    assert np.abs(np.asarray(a.logits) - np.asarray(plain.logits)).max() > 1e-3


def test_hook_algebra_and_early_stop(saved):
    hf, folder = saved["gemma3"]
    lm = M.load(folder)
    toks = _tokens()
    kinds = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"]
    names = [f"blocks.{L}.{k}" for L in range(lm.cfg.n_layers) for k in kinds]
    full = M.forward(lm.cfg, lm.params, toks, capture=names)
    a = {k: np.asarray(v) for k, v in full.activations.items()}
    for L in range(lm.cfg.n_layers):
        b = f"blocks.{L}."
        np.testing.assert_allclose(a[b + "hook_resid_mid"], a[b + "hook_resid_pre"] + a[b + "hook_attn_out"], atol=1e-5)
        np.testing.assert_allclose(a[b + "hook_resid_post"], a[b + "hook_resid_mid"] + a[b + "hook_mlp_out"], atol=1e-5)
        if L:
            np.testing.assert_array_equal(a[b + "hook_resid_pre"], a[f"blocks.{L - 1}.hook_resid_post"])
    early = M.forward(lm.cfg, lm.params, toks, capture=["blocks.2.hook_resid_post"], stop_after_capture=True)
    assert early.logits is None
    assert set(early.activations) == {"blocks.2.hook_resid_post"}
    np.testing.assert_allclose(np.asarray(early.activations["blocks.2.hook_resid_post"]),
                               a["blocks.2.hook_resid_post"], atol=1e-6)
    # the early-stopped program really is shorter: it has fewer dot products
    n_dots = [
        jax.jit(lambda p, t, c=c: M.forward(lm.cfg, p, t, capture=c, stop_after_capture=True).activations)
        .lower(lm.params, toks).as_text().count("dot_general")
        for c in (["blocks.1.hook_resid_post"], ["blocks.5.hook_resid_post"])
    ]
    assert n_dots[0] < n_dots[1]
    # stopping inside a block: resid_pre skips the block, attn_out/resid_mid skip its MLP
    for hook in ("blocks.3.hook_resid_pre", "blocks.3.hook_attn_out", "blocks.3.hook_resid_mid",
                 "blocks.3.hook_mlp_out"):
        got = M.forward(lm.cfg, lm.params, toks, capture=[hook], stop_after_capture=True).activations[hook]
        np.testing.assert_allclose(np.asarray(got), a[hook], atol=1e-5)

    def dots(c):
        f = jax.jit(lambda p, t: M.forward(lm.cfg, p, t, capture=c, stop_after_capture=True).activations)
        return f.lower(lm.params, toks).as_text().count("dot_general")

    d = [dots([f"blocks.3.{k}"]) for k in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")]
    assert d[0] < d[1] < d[2] and d[0] == dots(["blocks.2.hook_resid_post"])


def test_add_vector_intervention_equals_by_hand(saved):
    _, folder = saved["gemma3"]
    lm = M.load(folder)
    toks = _tokens()
    hook = "blocks.1.hook_resid_post"
    vec = jnp.asarray(np.random.default_rng(1).normal(size=D), jnp.float32) * 3.0
    steered = M.forward(lm.cfg, lm.params, toks, interventions={hook: lambda x: x + vec}).logits

    # by hand: run to the hook, add, then run the remaining blocks with the same building blocks
    from jsae.models import transformer as tf

    acts = M.forward(lm.cfg, lm.params, toks, capture=[hook], stop_after_capture=True).activations[hook]
    @jax.jit
    def rest(params, x):
        pos = tf.positions_from_mask(None, *toks.shape)
        valid = jnp.ones(toks.shape, bool)
        for L in range(2, lm.cfg.n_layers):
            x, _ = tf.block(lm.cfg, L, params["blocks"][L], x, pos, pos, valid, {}, {}, frozenset())
        return tf.unembed(lm.cfg, params, x)

    by_hand = rest(lm.params, acts + vec)
    np.testing.assert_allclose(np.asarray(steered), np.asarray(by_hand), atol=1e-5, rtol=1e-5)
    base = M.forward(lm.cfg, lm.params, toks).logits
    assert np.abs(np.asarray(base) - np.asarray(steered)).max() > 1e-2

    # the same through a jax.tree_util.Partial (array passed as a traced argument)
    part = jax.tree_util.Partial(lambda v, x: x + v, vec)
    again = M.forward(lm.cfg, lm.params, toks, interventions={hook: part}).logits
    np.testing.assert_allclose(np.asarray(again), np.asarray(steered), atol=1e-6)

    # a captured hook shows the intervened value
    cap = M.forward(lm.cfg, lm.params, toks, interventions={hook: lambda x: x + vec}, capture=[hook])
    np.testing.assert_allclose(np.asarray(cap.activations[hook]), np.asarray(acts + vec), atol=1e-6)


@pytest.mark.parametrize("arch", ["gemma3", "gpt2", "llama"])
def test_left_padding_matches_unpadded(saved, arch):
    _, folder = saved[arch]
    lm = M.load(folder)
    short = _tokens(1, 7, seed=3)
    longer = _tokens(1, 12, seed=4)
    toks = np.zeros((2, 12), np.int32)
    mask = np.zeros((2, 12), np.int32)
    toks[0, 5:], mask[0, 5:] = short[0], 1
    toks[1], mask[1] = longer[0], 1
    out = M.forward(lm.cfg, lm.params, toks, attention_mask=mask).logits
    alone = M.forward(lm.cfg, lm.params, short).logits
    np.testing.assert_allclose(np.asarray(out)[0, 5:], np.asarray(alone)[0], atol=1e-4, rtol=1e-4)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("arch", ["gemma3-small", "gpt2", "qwen2"])
def test_cached_generation_equals_uncached(saved, arch):
    _, folder = saved[arch]
    lm = M.load(folder)
    prompts = [[2, 5, 9, 33, 7], [2, 17, 4], [2, 40, 41, 42, 43, 44, 45, 46, 47, 48]]
    kw = dict(eos_id=None, pad_id=0)
    cached = M.generate_tokens(lm.cfg, lm.params, prompts, 12, **kw)
    uncached = M.generate_tokens(lm.cfg, lm.params, prompts, 12, use_cache=False, **kw)
    np.testing.assert_array_equal(cached, uncached)
    # each row alone gives the same tokens as in the batch
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(M.generate_tokens(lm.cfg, lm.params, [p], 12, **kw)[0], cached[i])


@pytest.mark.parametrize("intervene_on", ["all", "prompt", "generated"])
def test_generation_with_interventions(saved, intervene_on):
    _, folder = saved["gemma3-small"]
    lm = M.load(folder)
    vec = jnp.asarray(np.random.default_rng(2).normal(size=D) * 4.0, jnp.float32)
    fns = {"blocks.1.hook_resid_post": lambda x: x + vec}
    prompts = [[2, 5, 9, 33, 7], [2, 17, 4]]
    kw = dict(eos_id=None, interventions=fns, intervene_on=intervene_on)
    cached = M.generate_tokens(lm.cfg, lm.params, prompts, 10, **kw)
    uncached = M.generate_tokens(lm.cfg, lm.params, prompts, 10, use_cache=False, **kw)
    np.testing.assert_array_equal(cached, uncached)
    plain = M.generate_tokens(lm.cfg, lm.params, prompts, 10, eos_id=None)
    assert (cached != plain).any()


def test_eos_stops_rows(saved):
    _, folder = saved["gemma3-small"]
    lm = M.load(folder)
    prompts = [[2, 5, 9], [2, 17, 4, 8]]
    free = M.generate_tokens(lm.cfg, lm.params, prompts, 8, eos_id=None)
    eos = int(free[0, 2])  # pretend the third token of row 0 is EOS
    out = M.generate_tokens(lm.cfg, lm.params, prompts, 8, eos_id=eos)
    k0 = list(free[0]).index(eos)
    np.testing.assert_array_equal(out[0, : k0 + 1], free[0, : k0 + 1])
    assert (out[0, k0 + 1 :] == -1).all()
    row1 = list(free[1])
    if eos in row1:
        k = row1.index(eos)
        np.testing.assert_array_equal(out[1, : k + 1], free[1, : k + 1])
        assert (out[1, k + 1 :] == -1).all()
    else:
        np.testing.assert_array_equal(out[1], free[1])


def test_sampling(saved):
    _, folder = saved["gemma3-small"]
    lm = M.load(folder)
    prompts = [[2, 5, 9, 33, 7]] * 4
    k = jax.random.PRNGKey(3)
    a = M.generate_tokens(lm.cfg, lm.params, prompts, 10, temperature=1.0, key=k, eos_id=None)
    b = M.generate_tokens(lm.cfg, lm.params, prompts, 10, temperature=1.0, key=k, eos_id=None)
    np.testing.assert_array_equal(a, b)  # same key, same tokens
    assert len({tuple(r) for r in a}) > 1  # rows differ
    # a tiny nucleus keeps only the argmax: equals greedy
    nucleus = M.generate_tokens(lm.cfg, lm.params, prompts, 10, temperature=1.0, top_p=1e-6, key=k, eos_id=None)
    greedy = M.generate_tokens(lm.cfg, lm.params, prompts, 10, eos_id=None)
    np.testing.assert_array_equal(nucleus, greedy)
    # temperature -> 0 approaches greedy too
    cold = M.generate_tokens(lm.cfg, lm.params, prompts, 10, temperature=1e-4, key=k, eos_id=None)
    np.testing.assert_array_equal(cold, greedy)


def test_sample_next_top_p_support():
    from jsae.models.generate import sample_next

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = jax.jit(jax.vmap(lambda k: sample_next(logits, k, 1.0, 0.7, greedy=False, use_top_p=True)[0]))
    draws = np.asarray(draw(keys))
    assert set(draws) <= {0, 1}  # 0.5 + 0.3 >= 0.7: the nucleus is the first two tokens
    assert 0.55 < (draws == 0).mean() < 0.7  # renormalised 0.625


def test_bfloat16_forward_close(saved):
    _, folder = saved["gemma3"]
    lm32 = M.load(folder)
    lm16 = M.load(folder, dtype="bfloat16")
    assert lm16.params["blocks"][0]["attn"]["q"].dtype == jnp.bfloat16
    assert lm16.params["blocks"][0]["ln1"]["scale"].dtype == jnp.float32
    toks = _tokens()
    a = np.asarray(M.forward(lm32.cfg, lm32.params, toks).logits)
    b = np.asarray(M.forward(lm16.cfg, lm16.params, toks).logits)
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_partition_specs_and_sharded_forward(saved):
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    _, folder = saved["gemma3"]
    lm = M.load(folder)
    devs = jax.devices()
    if len(devs) < 4:
        pytest.skip("needs several (simulated) devices")
    mesh = Mesh(np.array(devs[:4]).reshape(2, 2), ("data", "model"))
    specs = M.partition_specs(lm.params, mesh=mesh)
    assert specs["blocks"][0]["attn"]["q"] == P(None, "model", None)
    assert specs["blocks"][0]["attn"]["o"] == P("model", None, None)
    assert specs["blocks"][0]["mlp"]["down"] == P("model", None)
    assert specs["blocks"][0]["ln1"]["scale"] == P()
    assert specs["embed"] == P("model", None)
    dp = M.partition_specs(lm.params, tensor_parallel=False)
    assert all(s == P() for s in jax.tree_util.tree_leaves(dp, is_leaf=lambda x: isinstance(x, P)))
    sharded = lm.shard(mesh).params
    assert sharded["blocks"][0]["mlp"]["up"].sharding.spec == P(None, "model")
    toks = jax.device_put(_tokens(4, 8), jax.sharding.NamedSharding(mesh, P("data", None)))
    out = M.forward(lm.cfg, sharded, toks).logits
    ref = M.forward(lm.cfg, lm.params, np.asarray(toks)).logits
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# GGUF


def _write_gguf(path, arch, hf_model, permute_qk=False, vocab_tokens=None):
    import gguf

    cfg = hf_model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    n = cfg.num_hidden_layers
    w.add_block_count(n)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    w.add_value_length(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_context_length(cfg.max_position_embeddings)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(float((rope.get("full_attention") or rope)["rope_theta"]))
    if arch in ("gemma3", "gemma2"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_float32("gemma2.attn_logit_softcapping", cfg.attn_logit_softcapping)
        w.add_float32("gemma2.final_logit_softcapping", cfg.final_logit_softcapping)
    toks = vocab_tokens or [f"<t{i}>" for i in range(cfg.vocab_size)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([-float(i) for i in range(len(toks))])
    w.add_token_types([3 if i < 3 else 1 for i in range(len(toks))])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    plus1 = 1.0 if arch.startswith("gemma") else 0.0
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"] + plus1)
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    norms = {"input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    if arch in ("gemma3", "gemma2"):
        norms.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        norms["post_attention_layernorm"] = "ffn_norm"
    for i in range(n):
        for hf_name, g in names.items():
            a = sd[f"model.layers.{i}.{hf_name}.weight"]
            if permute_qk and g == "attn_q":
                a = llama_gguf_permute(a, cfg.num_attention_heads)
            if permute_qk and g == "attn_k":
                a = llama_gguf_permute(a, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(a))
        for hf_name, g in norms.items():
            key = f"model.layers.{i}.{hf_name}.weight"
            if key in sd:
                w.add_tensor(f"blk.{i}.{g}.weight", sd[key] + plus1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_gemma3_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("JSAE_CACHE", str(tmp_path / "cache"))
    transformers_cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=7, num_attention_heads=HEADS,
        num_key_value_heads=KV, head_dim=DH, sliding_window=5, query_pre_attn_scalar=DH,
        max_position_embeddings=128, attn_implementation="eager")
    torch.manual_seed(1)
    hf = transformers.Gemma3ForCausalLM(transformers_cfg).eval()
    _randomise_norms(hf, 1)
    path = tmp_path / "tiny-gemma3.gguf"
    _write_gguf(path, "gemma3", hf)
    lm = M.load(path)
    assert lm.cfg.layer_types == ("local",) * 5 + ("global",) + ("local",)
    assert lm.cfg.rope_local_base == 10_000.0 and lm.cfg.embed_scale == pytest.approx(D**0.5)
    toks = _tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    got = np.asarray(M.forward(lm.cfg, lm.params, toks).logits)
    assert np.abs(got - ref).max() <= 1e-4
    # second load comes from the cache and is identical
    entries = list((tmp_path / "cache" / "models").iterdir())
    assert len(entries) == 1 and (entries[0] / "params.safetensors").exists()
    again = M.load(path)
    np.testing.assert_array_equal(np.asarray(M.forward(again.cfg, again.params, toks).logits), got)
    assert again.tokenizer.bos_id == 2 and again.tokenizer.eos_id == 1


def test_gguf_gemma2_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("JSAE_CACHE", str(tmp_path / "cache"))
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=4, num_attention_heads=HEADS,
        num_key_value_heads=KV, head_dim=DH, sliding_window=5, query_pre_attn_scalar=DH, max_position_embeddings=128,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, attn_implementation="eager")
    torch.manual_seed(3)
    hf = transformers.Gemma2ForCausalLM(cfg).eval()
    _randomise_norms(hf, 3)
    path = tmp_path / "tiny-gemma2.gguf"
    _write_gguf(path, "gemma2", hf)
    lm = M.load(path)
    assert lm.cfg.layer_types == ("local", "global", "local", "global")
    assert (lm.cfg.attn_softcap, lm.cfg.final_softcap) == (5.0, 3.0)
    toks = _tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    assert np.abs(np.asarray(M.forward(lm.cfg, lm.params, toks).logits) - ref).max() <= 1e-4


def test_gguf_llama_unpermutes_qk(tmp_path, monkeypatch):
    monkeypatch.setenv("JSAE_CACHE", str(tmp_path / "cache"))
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=128,
                                   tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _randomise_norms(hf, 2)
    path = tmp_path / "tiny-llama.gguf"
    _write_gguf(path, "llama", hf, permute_qk=True)
    lm = M.load(path, cache=False)
    toks = _tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()
        # transformers' own GGUF reader agrees that the file holds this model
        hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        ref2 = hf2(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ref2, ref, atol=1e-4)
    got = np.asarray(M.forward(lm.cfg, lm.params, toks).logits)
    assert np.abs(got - ref).max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# errors


def test_clear_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        M.load(tmp_path / "nope.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load(empty)
    # unknown architecture
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="mamba"):
        M.load(bad)
    # wrong tensor shape / missing tensor, named
    from safetensors.numpy import load_file, save_file

    _, folder = saved["llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    t = load_file(str(folder / "model.safetensors"))
    t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:-1]
    save_file(t, str(broken / "model.safetensors"))
    with pytest.raises(M.WeightError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        M.load(broken)
    del t["model.layers.1.self_attn.k_proj.weight"]
    save_file(t, str(broken / "model.safetensors"))
    with pytest.raises(M.WeightError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        M.load(broken)
    # bad hook names
    lm = M.load(saved["gpt2"][1])
    with pytest.raises(ValueError, match="hook_resid_psot"):
        M.forward(lm.cfg, lm.params, _tokens(), capture=["blocks.0.hook_resid_psot"])
    with pytest.raises(ValueError, match="layer 9"):
        M.forward(lm.cfg, lm.params, _tokens(), capture=["blocks.9.hook_resid_post"])


def test_bf16_safetensors_folder(saved, tmp_path):
    """HF checkpoints are often bfloat16 on disk; they load (widened) without torch."""
    hf, folder = saved["qwen3"]
    d = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    hf.to(torch.float32)
    lm = M.load(d)
    ref = M.load(folder)
    w = np.asarray(lm.params["blocks"][0]["mlp"]["up"])
    np.testing.assert_allclose(w, np.asarray(ref.params["blocks"][0]["mlp"]["up"]), atol=1e-2)


def test_generate_command(saved, tmp_path, capsys):
    """`jsae generate` end to end on a tiny HF folder with a character-level tokenizer."""
    import shutil

    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import BPE

    from jsae.cli import main

    _, folder = saved["gemma3-small"]
    d = tmp_path / "with_tok"
    shutil.copytree(folder, d)
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + [chr(c) for c in range(32, 127)])}
    HFTok(BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}))
    rc = main(["generate", "--model", str(d), "--prompt", "hello", "--prompt", "hi", "--max-new-tokens", "6",
               "--show-prompt"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 2 and lines[0].startswith("hello") and lines[1].startswith("hi")
    assert main(["generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "x"]) == 2


def test_multimodal_gemma3_checkpoint_layout(saved, tmp_path):
    """Gemma 3 4B+ checkpoints nest the text config and prefix the text tower's weights."""
    from safetensors.numpy import load_file, save_file

    hf, folder = saved["gemma3"]
    d = tmp_path / "mm"
    d.mkdir()
    text_cfg = json.loads((folder / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                                                "text_config": text_cfg, "vision_config": {"hidden_size": 8}}))
    t = load_file(str(folder / "model.safetensors"))
    t = {k.replace("model.", "model.language_model.", 1): v for k, v in t.items()}
    t["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 3, 2, 2), np.float32)
    save_file(t, str(d / "model.safetensors"))
    lm, ref = M.load(d), M.load(folder)
    assert lm.cfg == ref.cfg
    toks = _tokens()
    np.testing.assert_array_equal(np.asarray(M.forward(lm.cfg, lm.params, toks).logits),
                                  np.asarray(M.forward(ref.cfg, ref.params, toks).logits))


def test_hub_id_goes_through_snapshot_download(saved, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    _, folder = saved["gpt2"]
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw.get("local_files_only")))
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    lm = M.load("someone/tiny-gpt2")
    assert lm.cfg.arch == "gpt2" and lm.name == "someone/tiny-gpt2"
    assert calls[0] == ("someone/tiny-gpt2", True)  # the local hub cache is tried first

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="someone/other.*gemma-3-270m"):
        M.load("someone/other")


def test_center_writing_weights_gpt2(saved):
    """TransformerLens-style centering: same logits, zero-mean residual stream."""
    _, folder = saved["gpt2"]
    lm = M.load(folder)
    ccfg, centred = M.center_writing_weights(lm.cfg, lm.params)
    assert not ccfg.tie_embeddings
    toks = _tokens()
    hooks = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_mid", "blocks.2.hook_mlp_out"]
    a = M.forward(lm.cfg, lm.params, toks, capture=hooks)
    b = M.forward(ccfg, centred, toks, capture=hooks)
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), atol=1e-4)
    for h in hooks:
        x, y = np.asarray(a.activations[h]), np.asarray(b.activations[h])
        np.testing.assert_allclose(y, x - x.mean(-1, keepdims=True), atol=1e-4)
    with pytest.raises(ValueError, match="LayerNorm"):
        M.center_writing_weights(M.load(saved["llama"][1]).cfg, {})
