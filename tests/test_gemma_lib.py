"""Gemma checkpoints in the layout of Google DeepMind's `gemma` library (jsae.models.gemma_ckpt), and
parity with that library's own JAX implementation (`gm.nn`), where the `gemma` package imports.

The library is optional (a side venv in CI, see tools/test.sh): its tests skip with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import types

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsae.models as M
from jsae.models import gemma_ckpt as G
from jsae.models.transformer import forward

V, D, L, N, K, H, F = 101, 48, 7, 4, 2, 16, 80


def _gm():
    """Import the library's model code without its training stack: `kauldron.typing` imports
    tensorflow only to name `tf.Tensor`, and `gemma.gm.ckpts`' __init__ pulls kauldron's trainer
    (clu -> tensorboard/tensorflow); neither is used by the modules compared here."""
    if importlib.util.find_spec("gemma") is None or importlib.util.find_spec("kauldron") is None:
        pytest.skip("the `gemma` library is not installed (pip install --no-deps gemma==3.3.0 kauldron, see "
                    "tools/test.sh)")
    if "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        tf = types.ModuleType("tensorflow")
        tf.Tensor = type("Tensor", (), {})
        sys.modules["tensorflow"] = tf
    if "gemma.gm.ckpts" not in sys.modules:
        root = importlib.util.find_spec("gemma").submodule_search_locations[0]
        pkg = types.ModuleType("gemma.gm.ckpts")
        pkg.__path__ = [os.path.join(root, "gm", "ckpts")]
        sys.modules["gemma.gm.ckpts"] = pkg
    try:
        from gemma.gm.nn import _config, _gemma, _modules, _transformer
    except ImportError as e:
        pytest.skip(f"the `gemma` library does not import here: {e}")
    return types.SimpleNamespace(config=_config, gemma=_gemma, modules=_modules, transformer=_transformer)


def _tiny_tree(seed=0) -> dict:
    """A random Gemma-3-shaped param tree in the library's layout (NumPy)."""
    r = np.random.default_rng(seed)

    def w(*s, sd=0.2):
        return r.normal(0, sd, s).astype(np.float32)

    t = {"embedder": {"input_embedding": w(V, D, sd=0.5)}, "final_norm": {"scale": w(D, sd=0.3)}}
    for i in range(L):
        t[f"layer_{i}"] = {
            "attn": {"q_einsum": {"w": w(N, D, H)}, "kv_einsum": {"w": w(2, K, D, H)},
                     "attn_vec_einsum": {"w": w(N, H, D)}, "_query_norm": {"scale": w(H, sd=0.3)},
                     "_key_norm": {"scale": w(H, sd=0.3)}},
            "mlp": {"gating_einsum": w(2, F, D), "linear": w(F, D)},
            **{n: {"scale": w(D, sd=0.3)} for n in ("pre_attention_norm", "post_attention_norm",
                                                    "pre_ffw_norm", "post_ffw_norm")},
        }
    return t


def _tiny_cfg(window=4):
    cfg = G.config_from_tree(_tiny_tree())
    return dataclasses.replace(cfg, sliding_window=window, max_position=128)


def _tokens(B=2, T=12, seed=3):
    t = np.random.default_rng(seed).integers(3, V, (B, T)).astype(np.int32)
    t[:, 0] = 2  # BOS; no pad (0) inside, the library masks pad tokens
    return t


def test_config_from_tree_and_flat_layout():
    tree = _tiny_tree()
    cfg = G.config_from_tree(tree)
    assert (cfg.arch, cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.d_mlp) == ("gemma3", V, D, L, N, K, H, F)
    assert cfg.layer_types == ("local",) * 5 + ("global", "local") and cfg.sliding_window == 512
    assert cfg.qk_norm and cfg.post_norms and cfg.attn_scale == H**-0.5
    # Kaggle's flat form: "transformer/<module path>": {param: array}; the MLP's two weights under "w"
    flat: dict = {}
    for path, arr in flax.traverse_util.flatten_dict(tree).items():
        if path[-1] in ("linear", "gating_einsum"):
            flat["transformer/" + "/".join(path)] = {"w": arr}
        else:
            flat.setdefault("transformer/" + "/".join(path[:-1]), {})[path[-1]] = arr
    assert "transformer/layer_3/attn/q_einsum" in flat and "transformer/embedder" in flat
    a = G.params_from_tree(cfg, tree)
    b = G.params_from_tree(cfg, flat)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    with pytest.raises(M.WeightError, match="missing 'embedder'"):
        G.config_from_tree({"layer_0": {}})


def test_orbax_round_trip_and_load(tmp_path):
    """tree -> jsae -> Orbax (library layout) -> jsae.load(folder) and load('gemma:folder'): same params,
    same outputs; the stored tree equals the library tree we started from."""
    cfg = _tiny_cfg()
    tree = _tiny_tree()
    params = G.params_from_tree(cfg, tree)
    np.testing.assert_allclose(params["blocks"][2]["ln1"]["scale"], 1 + tree["layer_2"]["pre_attention_norm"]["scale"])
    np.testing.assert_array_equal(params["blocks"][1]["attn"]["k"][:, 1], tree["layer_1"]["attn"]["kv_einsum"]["w"][0, 1])
    np.testing.assert_array_equal(params["blocks"][1]["mlp"]["up"], tree["layer_1"]["mlp"]["gating_einsum"][1].T)
    path = G.save(tmp_path / "ckpt", cfg, params)
    stored = G.read_tree(path)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7), stored, tree)
    for src in (str(path), f"gemma:{path}"):
        lm = M.load(src)
        assert dataclasses.replace(lm.cfg, sliding_window=4, max_position=128) == cfg
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), y, atol=1e-7),
                               lm.params, params)
    toks = _tokens()
    a = forward(cfg, params, toks).logits
    b = forward(cfg, jax.tree_util.tree_map(jnp.asarray, G.params_from_tree(cfg, stored)), toks).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="only Gemma models"):
        G.params_to_tree(dataclasses.replace(cfg, arch="llama"), params)
    with pytest.raises(FileNotFoundError, match="not an Orbax checkpoint"):
        G.read_tree(tmp_path)


def _library_outputs(gm, model, tree, toks, n_layers):
    """(logits [B, T, V], residual after each block [L][B, T, D]) from the library's Flax model."""
    params = jax.tree_util.tree_map(jnp.asarray, tree)
    out, state = model.apply({"params": params}, jnp.asarray(toks), return_last_only=False,
                             capture_intermediates=lambda mdl, _: isinstance(mdl, gm.modules.Block))
    inter = state["intermediates"]
    resid = [np.asarray(inter[f"layer_{i}"]["__call__"][0][1]) for i in range(n_layers)]
    return np.asarray(out.logits), resid


def _resid_hooks(n):
    return [f"blocks.{i}.hook_resid_post" for i in range(n)]


def test_parity_with_gemma_library_tiny():
    gm = _gm()
    C = gm.config
    tree = _tiny_tree()
    cfg = _tiny_cfg(window=4)
    lib_cfg = C.TransformerConfig(
        num_embed=V, embed_dim=D, hidden_dim=F, num_heads=N, head_dim=H, num_kv_heads=K,
        final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=tuple(gm.modules.AttentionType.GLOBAL if t == "global" else
                              gm.modules.AttentionType.LOCAL_SLIDING for t in cfg.layer_types),
        query_pre_attn_norm=C.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        sliding_window_size=4, transpose_gating_einsum=True, use_qk_norm=True,
        local_base_frequency=10_000, global_base_frequency=1_000_000)
    model = gm.transformer.Transformer(config=lib_cfg)
    toks = _tokens()
    ref_logits, ref_resid = _library_outputs(gm, model, tree, toks, L)
    out = forward(cfg, jax.tree_util.tree_map(jnp.asarray, G.params_from_tree(cfg, tree)), toks,
                  capture=_resid_hooks(L))
    for i in range(L):
        np.testing.assert_allclose(np.asarray(out.activations[f"blocks.{i}.hook_resid_post"]), ref_resid[i],
                                   rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_parity_with_gemma_library_gemma3_270m(tmp_path):
    """The real Gemma 3 270M (offline GGUF weights) in `gm.nn.Gemma3_270M` and in jsae: logits and
    every block's residual."""
    gm = _gm()
    lm = M.load("gemma-3-270m")
    tree = G.params_to_tree(lm.cfg, lm.params)
    model = gm.gemma.Gemma3_270M()
    toks, mask = lm.to_tokens(["The Golden Gate Bridge is a suspension bridge in", "Paris is the capital of"])
    toks = np.asarray(toks)[:, : int(np.asarray(mask).sum(1).min())]  # no padding: the library masks pad ids
    ref_logits, ref_resid = _library_outputs(gm, model, tree, toks, lm.cfg.n_layers)
    out = forward(lm.cfg, lm.params, toks, capture=_resid_hooks(lm.cfg.n_layers))
    diffs = []
    for i in range(lm.cfg.n_layers):
        a = np.asarray(out.activations[f"blocks.{i}.hook_resid_post"])
        diffs.append(float(np.abs(a - ref_resid[i]).max() / np.abs(ref_resid[i]).max()))
    logit_diff = float(np.abs(np.asarray(out.logits) - ref_logits).max())
    print(f"max rel resid diff {max(diffs):.2e}, max abs logit diff {logit_diff:.2e}")
    assert max(diffs) < 1e-5, diffs
    assert logit_diff < 1e-3
    assert (np.asarray(out.logits).argmax(-1) == ref_logits.argmax(-1)).all()


@pytest.mark.slow
def test_orbax_round_trip_gemma3_270m(tmp_path):
    """The real Gemma 3 270M exported in the library's layout and loaded back by jsae.load: the same
    weights, config (up to the float32 rounding of norm_eps in the GGUF) and tokenizer."""
    lm = M.load("gemma-3-270m")
    path = G.export(lm, tmp_path / "gemma3-270m")
    tree = G.read_tree(path)
    assert tree["layer_5"]["attn"]["kv_einsum"]["w"].shape == (2, 1, 640, 256)
    assert tree["layer_0"]["mlp"]["gating_einsum"].shape == (2, 2048, 640)
    del tree
    back = M.load(str(path))
    assert back.cfg == dataclasses.replace(lm.cfg, norm_eps=1e-6)
    same = jax.tree_util.tree_map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), lm.params, back.params)
    assert all(jax.tree_util.tree_leaves(same))
    assert back.tokenizer.encode("The Golden Gate Bridge") == lm.tokenizer.encode("The Golden Gate Bridge")
