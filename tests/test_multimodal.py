"""Gemma 3 multimodal port vs transformers' Gemma3ForConditionalGeneration (tiny random, float32):
vision features, soft tokens, merged embeddings, logits with the bidirectional image mask; the
loader on a checkpoint written here (HF layout, save_pretrained safetensors)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import jsae.models as M  # noqa: E402
from jsae.models import multimodal as MM  # noqa: E402
from jsae.models.vision import vision_run  # noqa: E402

IMG, BOI, EOI, VOCAB = 299, 297, 298, 300
N_SOFT = 16


def _tiny_hf():
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=4, vision_use_head=False, layer_norm_eps=1e-6)
    tc = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                          layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                          query_pre_attn_scalar=16)
    cfg = Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=N_SOFT, image_token_index=IMG,
                       boi_token_index=BOI, eoi_token_index=EOI)
    torch.manual_seed(0)
    m = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms and projector (HF initialises them to zeros)
        for name, p in m.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m = _tiny_hf()
    d = tmp_path_factory.mktemp("tiny_gemma3_mm")
    m.save_pretrained(d)
    lm = M.load(str(d))
    return m, lm, d


def _batch(rng):
    # row 0: text, one image, text; row 1: two images with text between (3 images in all)
    img = [BOI] + [IMG] * N_SOFT + [EOI]
    r0 = [2, 10, 11, 12] + img + list(range(20, 42))
    r1 = [2, 40] + img + [41, 42, 43] + img + [44, 45, 46]
    assert len(r0) == len(r1)
    tokens = np.array([r0, r1], np.int64)
    pixels = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)  # NCHW, as HF takes them
    return tokens, pixels


def test_loader_reads_vision_tower(tiny):
    m, lm, d = tiny
    assert lm.vision is not None
    c = lm.vision.cfg
    assert (c.mm_tokens_per_image, c.image_token_id, c.boi_id, c.eoi_id) == (N_SOFT, IMG, BOI, EOI)
    assert (c.vision.d_model, c.vision.n_layers, c.vision.image_size, c.vision.patch_size) == (32, 2, 32, 4)
    assert json.loads((d / "config.json").read_text())["model_type"] == "gemma3"


def test_parity_vision_softtokens_embeddings_logits(tiny):
    m, lm, _ = tiny
    rng = np.random.default_rng(0)
    tokens, pixels = _batch(rng)
    pv = torch.from_numpy(pixels)
    with torch.no_grad():
        ref_vis = m.model.vision_tower(pixel_values=pv).last_hidden_state.numpy()
        ref_soft = m.model.get_image_features(pv).pooler_output.numpy()
        seen = {}

        def grab(mod, args, kw):
            seen.setdefault("emb", kw["inputs_embeds"].clone())

        hook = m.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        tt = torch.from_numpy((tokens == IMG).astype(np.int64))
        ref = m(input_ids=torch.from_numpy(tokens), pixel_values=pv, token_type_ids=tt).logits.numpy()
        ref_causal = m(input_ids=torch.from_numpy(tokens), pixel_values=pv).logits.numpy()  # no image mask
        hook.remove()
    px = np.transpose(pixels, (0, 2, 3, 1))  # jsae takes channels last
    vt = lm.vision
    vis = np.asarray(vision_run(vt.cfg.vision, vt.params["vision"], jnp.asarray(px))[0])
    np.testing.assert_allclose(vis, ref_vis, atol=1e-4, rtol=0)
    soft, _ = MM.soft_tokens(vt, jnp.asarray(px))
    assert soft.shape == (3, N_SOFT, 64)
    np.testing.assert_allclose(np.asarray(soft), ref_soft, atol=1e-4, rtol=0)
    emb = MM.merge_embeddings(lm.cfg, vt.cfg, lm.params, jnp.asarray(tokens), soft)
    np.testing.assert_allclose(np.asarray(emb), seen["emb"].numpy(), atol=1e-4, rtol=0)

    out = lm.forward(tokens, px, capture=["blocks.1.hook_resid_post"])
    logits = np.asarray(out.logits)
    assert np.abs(logits - ref).max() <= 1e-4
    img = np.asarray(out.image_mask)
    np.testing.assert_array_equal(img, tokens == IMG)
    # text positions after an image see it; image positions see their whole image (both ways)
    after = np.zeros_like(img)
    after[0, 4 + N_SOFT + 2:] = True
    assert np.abs(logits[after] - ref[after]).max() <= 1e-4
    assert np.abs(ref[img] - ref_causal[img]).max() > 1e-3  # the bidirectional mask matters
    assert out.activations["blocks.1.hook_resid_post"].shape == (2, tokens.shape[1], 64)


def test_text_only_path_unchanged(tiny):
    m, lm, _ = tiny
    tokens = np.array([[2, 5, 6, 7, 8, 9, 10, 11, 12, 13]], np.int64)
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(tokens)).logits.numpy()
    out = lm.forward(tokens)
    assert np.abs(np.asarray(out.logits) - ref).max() <= 1e-4
    # the multimodal forward with no image gives exactly the text forward
    mm = MM.forward(lm, tokens)
    np.testing.assert_array_equal(np.asarray(mm.logits), np.asarray(out.logits))


def test_vision_hooks_and_errors(tiny):
    _, lm, _ = tiny
    rng = np.random.default_rng(1)
    tokens, pixels = _batch(rng)
    px = np.transpose(pixels, (0, 2, 3, 1))
    out = MM.forward(lm, tokens, px, capture=["vision.blocks.1.hook_resid_post", "mm.hook_soft_tokens",
                                              "vision.hook_out"], stop_after_capture=True)
    assert out.logits is None
    assert out.activations["vision.hook_out"].shape == (3, 64, 32)
    assert out.activations["mm.hook_soft_tokens"].shape == (3, N_SOFT, 64)
    with pytest.raises(MM.MultimodalError, match="3 image"):
        MM.forward(lm, tokens[:1], px)  # 1 image block, 3 images
    with pytest.raises(MM.MultimodalError, match="unknown vision hook"):
        MM.forward(lm, tokens, px, capture=["vision.blocks.9.hook_resid_post"])
    with pytest.raises(ValueError, match="channels last"):
        MM.forward(lm, tokens, pixels)  # NCHW by mistake


def test_text_only_model_given_images_errors():
    from jsae.errors import ModelLoadError

    lm = M.LanguageModel(M.TransformerConfig("gemma3", 16, 8, 1, 1, 1, 8, 16), {}, None, "textonly")
    with pytest.raises(ModelLoadError, match="text-only"):
        lm.to_tokens(["hi"], images=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ModelLoadError, match="text-only"):
        MM.forward(lm, np.zeros((1, 4), np.int32), np.zeros((1, 8, 8, 3), np.float32))


def test_harvest_memory_from_shapes(tiny):
    _, lm, d = tiny
    hf = json.loads((d / "config.json").read_text())
    r = MM.harvest_memory(hf, batch=2, context_length=48, dtype="float32", hook_layer=1)
    import jax

    nbytes = lambda t: sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(t))  # noqa: E731
    assert r["params_text"] == nbytes(lm.params)
    assert r["params_vision"] == nbytes(lm.vision.params)
    assert r["hook"] == "blocks.1.hook_resid_post" and r["images"] == 2
    # the captured activations [2, 48, 64] float32 are the output; XLA's temporaries are positive
    assert r["output"] >= 2 * 48 * 64 * 4 and r["temp"] > 0
    assert r["total"] >= r["params_text"] + r["params_vision"] + r["temp"]


def test_mask_hook_default_is_bit_identical(tiny):
    """No groups (or all -1) and the token embedding passed in: exactly the text forward."""
    from jsae.models import transformer as T

    _, lm, _ = tiny
    toks = jnp.asarray(np.array([[2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]], np.int32))
    ref, _, _ = T.run(lm.cfg, lm.params, toks)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (1, 12))
    emb = T.embed(lm.cfg, lm.params, toks, pos)
    got, _, _ = T.run(lm.cfg, lm.params, toks, inputs_embeds=emb, bidirectional_groups=jnp.full((1, 12), -1))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    m = T.attention_mask(pos, pos, jnp.ones((1, 12), bool), 4)
    m2 = T.attention_mask(pos, pos, jnp.ones((1, 12), bool), 4, jnp.zeros((1, 12, 12), bool))
    np.testing.assert_array_equal(np.asarray(m), np.asarray(m2))


def test_hub_layout_checkpoint(tiny, tmp_path):
    """The hub's Gemma 3 4B files name tensors `language_model.model.*`, `vision_tower.vision_model.*`,
    `multi_modal_projector.*` (transformers 4.x layout): same model."""
    from safetensors.numpy import load_file, save_file

    _, lm, d = tiny
    t = load_file(str(d / "model.safetensors"))
    assert any(k.startswith("vision_tower.") or k.startswith("model.vision_tower.") for k in t)

    def hub(k):
        k = k.removeprefix("model.")
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k.removeprefix("vision_tower.")
        if k.startswith("language_model.") and not k.startswith("language_model.model."):
            k = "language_model.model." + k.removeprefix("language_model.")
        return k

    out = tmp_path / "hub"
    out.mkdir()
    save_file({hub(k): v for k, v in t.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text((d / "config.json").read_text())
    lm2 = M.load(str(out))
    assert lm2.vision is not None
    tokens, pixels = _batch(np.random.default_rng(3))
    px = np.transpose(pixels, (0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(lm2.forward(tokens, px).logits), np.asarray(lm.forward(tokens, px).logits))


def test_blocked_vision_attention_matches(tiny, monkeypatch):
    """Queries in blocks (as for 4096-patch images) give the same tower output as transformers."""
    from jsae.models import vision as V

    m, lm, _ = tiny
    pixels = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = m.model.vision_tower(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    monkeypatch.setattr(V, "QUERY_BLOCK", 16)  # 64 patches -> 4 blocks (read at trace time)
    out, _ = V.vision_run(lm.vision.cfg.vision, lm.vision.params["vision"], jnp.asarray(np.transpose(pixels, (0, 2, 3, 1))))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
