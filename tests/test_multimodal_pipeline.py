"""The whole image path offline on a tiny random multimodal Gemma 3 (real tokenizer, real photos):
images + text -> activations -> a trained dictionary -> features listed for an image (Python and
`jsae features RUN --image`), highlighted PNGs, and the cross-modal overlap (only that it runs:
the model is random, so the numbers mean nothing)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("skimage")

import jax  # noqa: E402

import jsae.models as M  # noqa: E402
from jsae.data import images as DI  # noqa: E402
from jsae.models.multimodal import forward, random_gemma3, text_only_error  # noqa: E402

HOOK = "blocks.2.hook_resid_post"
TEXTS = [
    "The Golden Gate Bridge is a suspension bridge spanning the strait in San Francisco. It opened in 1937.",
    "A cat sat on the warm windowsill and watched the birds in the garden below for most of the afternoon.",
    "Coffee is a drink brewed from roasted coffee beans, the seeds of berries from certain Coffea species.",
    "The rocket lifted off from the launch pad at dawn, carrying a satellite that would observe the Earth.",
] * 3


def save_hf(lm, folder):
    """Write a multimodal `LanguageModel` as an HF Gemma3ForConditionalGeneration folder
    (`config.json`, `model.safetensors`, `tokenizer.json`) that `jsae.models.load` (and
    transformers) read back: hands the tiny random model to `jsae` commands."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    from jsae.models.convert import params_to_hf

    cfg, vt = lm.cfg, lm.vision
    if vt is None:
        raise text_only_error(lm)
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    sd = params_to_hf(cfg, lm.params, prefix="model.language_model.")
    sd.pop("lm_head.weight", None)  # tied
    a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    vc, vp = vt.cfg.vision, vt.params["vision"]
    pre = "model.vision_tower."
    C, P, D = vc.n_channels, vc.patch_size, vc.d_model
    sd[pre + "embeddings.patch_embedding.weight"] = a(vp["patch"]).T.reshape(D, C, P, P)
    sd[pre + "embeddings.patch_embedding.bias"] = a(vp["patch_bias"])
    sd[pre + "embeddings.position_embedding.weight"] = a(vp["pos"])
    for i, b in enumerate(vp["blocks"]):
        e = f"{pre}encoder.layers.{i}."
        for ln, hf in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
            sd[e + hf + ".weight"], sd[e + hf + ".bias"] = a(b[ln]["scale"]), a(b[ln]["bias"])
        for ours, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            sd[e + f"self_attn.{hf}.weight"] = a(b["attn"][ours]).T
            sd[e + f"self_attn.{hf}.bias"] = a(b["attn"]["b" + ours])
        m = b["mlp"]
        sd[e + "mlp.fc1.weight"], sd[e + "mlp.fc1.bias"] = a(m["fc1"]).T, a(m["b1"])
        sd[e + "mlp.fc2.weight"], sd[e + "mlp.fc2.bias"] = a(m["fc2"]).T, a(m["b2"])
    sd[pre + "post_layernorm.weight"] = a(vp["post_norm"]["scale"])
    sd[pre + "post_layernorm.bias"] = a(vp["post_norm"]["bias"])
    pp = vt.params["projector"]
    sd["model.multi_modal_projector.mm_input_projection_weight"] = a(pp["proj"])
    sd["model.multi_modal_projector.mm_soft_emb_norm.weight"] = a(pp["norm"]) - 1.0
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(d / "model.safetensors"))
    text = {
        "model_type": "gemma3_text", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position, "rms_norm_eps": cfg.norm_eps,
        "sliding_window": cfg.sliding_window, "query_pre_attn_scalar": round(cfg.scale**-2),
        "layer_types": ["sliding_attention" if cfg.is_local(i) else "full_attention" for i in range(cfg.n_layers)],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base},
                            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base}},
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
    }
    vision = {"model_type": "siglip_vision_model", "hidden_size": vc.d_model, "intermediate_size": vc.d_mlp,
              "num_hidden_layers": vc.n_layers, "num_attention_heads": vc.n_heads, "image_size": vc.image_size,
              "patch_size": vc.patch_size, "num_channels": vc.n_channels, "layer_norm_eps": vc.norm_eps,
              "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
    c = vt.cfg
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text, "vision_config": vision, "mm_tokens_per_image": c.mm_tokens_per_image,
        "image_token_index": c.image_token_id, "boi_token_index": c.boi_id, "eoi_token_index": c.eoi_id,
        "tie_word_embeddings": True,
    }, indent=1))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "size": {"height": vc.image_size, "width": vc.image_size},
        "image_mean": list(c.image_mean), "image_std": list(c.image_std), "resample": c.resample,
        "rescale_factor": 1 / 255, "do_convert_rgb": True}, indent=1))
    if lm.tokenizer is not None:
        lm.tokenizer.save(d)
    return d


def _tokenizer():
    entries = sorted((M.cache_dir() / "models").glob("gemma-3-270m-*/tokenizer.json"))
    return M.Tokenizer.from_dir(entries[-1].parent) if entries else M.load("gemma-3-270m").tokenizer


@pytest.fixture(scope="module")
def lm():
    return random_gemma3(_tokenizer(), jax.random.key(0), mm_tokens_per_image=16)


@pytest.fixture(scope="module")
def photos():
    return DI.skimage_photos()


def test_skimage_photos_and_folder(photos, tmp_path):
    assert len(photos) >= 15
    names = {p.name for p in photos}
    assert {"astronaut", "coffee", "chelsea", "rocket"} <= names
    assert dict((p.name, p.caption) for p in photos)["chelsea"] == "Chelsea the cat"
    import shutil

    for p in photos[:3]:
        shutil.copy(p.image, tmp_path / p.image.name)
    (tmp_path / photos[0].image.with_suffix(".txt").name).write_text("an astronaut")
    (tmp_path / "readme.md").write_text("not an image")
    items = DI.open_images(str(tmp_path))
    assert len(items) == 3 and items[0].caption == "an astronaut"
    with pytest.raises(DI.ImageSourceError, match="no image files"):
        DI.folder_images(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        DI.open_images(str(tmp_path / "nowhere"))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_harvest_mix_rows_match_forward(lm, photos):
    items = photos[:6]
    ctx = DI.mix(lm, items, iter(TEXTS), image_ratio=0.5, context_length=32, seed=0)
    h = DI.harvest(lm, [HOOK], ctx, items, batch_size=6, progress=False)
    M_ = lm.vision.cfg.mm_tokens_per_image
    assert h.is_image.sum() == len(items) * M_
    assert 0.35 < h.is_image.mean() < 0.65  # image_ratio is a token fraction
    assert sorted(set(h.image[h.is_image])) == list(range(len(items)))
    assert (h.soft_index[h.is_image] < M_).all() and (h.soft_index[~h.is_image] == -1).all()
    # one image context by hand: the rows are the forward's activations at those positions
    j = next(i for i, c in enumerate(ctx) if c.image == 2)
    b = lm.to_tokens([items[2].caption], images=[items[2].image])
    np.testing.assert_array_equal(b.tokens[0], np.asarray(ctx[j].ids))
    ref = np.asarray(forward(lm, b, capture=[HOOK], stop_after_capture=True).activations[HOOK][0])
    rows = h.acts[HOOK][h.context == j]
    np.testing.assert_allclose(rows, ref[h.position[h.context == j]], atol=1e-5)


def test_train_on_image_text_activations_then_features(lm, photos, tmp_path):
    from jsae.analysis.images import cross_modal_overlap, features_on_image, render_feature
    from jsae.config import load
    from jsae.data import make_source
    from jsae.train import Run, Trainer

    items = photos[:12]
    ctx = DI.mix(lm, items, iter(TEXTS * 4), image_ratio=0.5, context_length=32, seed=1)
    h = DI.harvest(lm, [HOOK], ctx, items, batch_size=6, progress=False)
    out = h.save(tmp_path / "acts")
    sets = ["data.source=array", f"data.path={out / (HOOK + '.npy')}", f"model.hooks=[{HOOK}]",
            "sae.d_sae=256", "sae.k=8", "train.steps=60", "train.batch_size=128", "train.lr=3e-3",
            "data.holdout_fraction=0.1", "sae.init_sample=256", f"run_dir={tmp_path / 'run'}",
            "checkpoint.enabled=false"]
    cfg = load(None, sets)
    tr = Trainer(cfg, make_source(cfg))
    summary = Run(cfg, log=lambda m: None).train(tr)
    fvu = summary["heldout"][HOOK]["fvu"]
    assert np.isfinite(fvu) and fvu < 0.9
    from jsae.parallel import to_host

    # data.source: images streams the same mix (same LM batch shapes: no new compilation)
    cfg2 = load(None, ["data.source=images", f"model.hooks=[{HOOK}]", "data.context_length=32", "sae.d_sae=64", "train.steps=1",
                       "model.batch_size=6", "data.holdout_fraction=0.2", "data.shuffle_buffer=160",
                       f"run_dir={tmp_path / 'run2'}"])
    src = DI.ImageTextActivationSource(cfg2, lm, items=items, texts=TEXTS * 4)
    assert src.chunk_images == 5 and len(src._chunks(0)) == 2  # 160 * 0.5 / 16 images per chunk
    rows = src.next_batch(100)[HOOK]
    assert rows.shape == (100, lm.cfg.d_model) and np.isfinite(rows).all()
    assert src.state() == {"kind": "images", "epoch": 0, "chunk": 0, "offset": 100}
    more = src.next_batch(250)[HOOK]  # crosses into the second chunk (about 220 rows each)
    assert src.state()["chunk"] == 1 and np.isfinite(more).all()
    held = np.concatenate([b[HOOK] for b in src.eval_batches(10_000, 64)])
    assert len(held) > 16 and np.isfinite(held).all()  # from the held-out images and documents
    src.restore({"kind": "images", "epoch": 0, "chunk": 0, "offset": 40})
    np.testing.assert_array_equal(src.next_batch(60)[HOOK], rows[40:])  # resume: same rows
    sae = to_host(tr.states[HOOK].sae)

    res = features_on_image(lm, sae, HOOK, items[0].image, top=5)
    assert len(res.features) == 5 and (np.diff(res.max) <= 0).all()
    assert res.codes.shape == (16, 256) and (res.n_tokens >= 1).all()
    png = render_feature(lm, items[0].image, res.codes[:, res.features[0]], tmp_path / "f.png")
    from PIL import Image

    im = np.asarray(Image.open(png))
    assert im.shape == (256, 256, 3)
    # top-activating images of a feature: batched scan vs one image at a time
    from jsae.analysis.images import image_codes, top_images

    imgs = [it.image for it in items[:8]]
    ti = top_images(lm, sae, HOOK, imgs, res.features[:2], n=3)
    f = int(res.features[0])
    ref = np.array([image_codes(lm, sae, HOOK, im)[0][:, f].max() for im in imgs])
    np.testing.assert_allclose(ti.max[0], np.sort(ref)[::-1][:3], rtol=1e-4, atol=1e-5)
    assert ti.soft.shape == (2, 3, 16)
    cm = cross_modal_overlap(lm, sae, HOOK, [(it.image, it.caption) for it in items[:4]])
    assert cm.matched.shape == (4,) and cm.mismatched.shape == (4, 3)
    assert 0 <= cm.matched_mean <= 1 and 0 <= cm.mismatched_mean <= 1
    assert "image/caption pairs" in cm.summary()


@pytest.mark.slow
def test_save_hf_roundtrip_and_cli_features_image(lm, photos, tmp_path, capsys):
    folder = save_hf(lm, tmp_path / "tiny_mm")
    back = M.load(str(folder))
    assert back.vision is not None and back.vision.cfg == lm.vision.cfg
    b = lm.to_tokens(["a photo"], images=[photos[1].image])
    a1 = forward(lm, b).logits
    a2 = forward(back, b).logits
    np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), atol=1e-5)

    # a run folder trained with `jsae train` on data.source: images, then `jsae features --image`
    import yaml

    from jsae.cli import main

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    import shutil

    for p in photos[:6]:
        shutil.copy(p.image, img_dir / p.image.name)
    for i, t in enumerate(TEXTS[:4]):
        (tmp_path / f"t{i}.txt").write_text(t * 3)
    cfg = {"model": {"path": str(folder), "hooks": [HOOK], "batch_size": 6},
           "data": {"source": "images", "images": str(img_dir), "dataset": "files",
                    "path": str(tmp_path / "t*.txt"), "context_length": 32, "holdout_fraction": 0.2},
           "sae": {"d_sae": 128, "k": 8, "init_sample": 128},
           "train": {"steps": 6, "batch_size": 64}, "eval": {"show_features": 0},
           "checkpoint": {"enabled": False}, "run_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    capsys.readouterr()
    img = img_dir / photos[0].image.name
    assert main(["features", str(tmp_path / "run"), "--image", str(img), "--top", "3", "--contexts", "8",
                 "--snippets", "2"]) == 0
    text = capsys.readouterr().out
    assert f"fire on the image {img}" in text and "soft tokens" in text
    pngs = sorted((tmp_path / "run" / "analysis" / "images").glob("*.png"))
    assert len(pngs) == 3
    assert main(["features", str(tmp_path / "run"), "--feature", "3", "--images", str(img_dir),
                 "--contexts", "8", "--snippets", "1"]) == 0
    text = capsys.readouterr().out
    assert "feature 3: top-activating images among 6" in text
    assert len(list((tmp_path / "run" / "analysis" / "images").glob("top_f3_*.png"))) == 4
