"""Image preprocessing and the interleaved sequence vs transformers' Gemma 3 image processor and
processor, on scikit-image's real photographs; bad image input -> one-line errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
skdata = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from PIL import Image  # noqa: E402

import jsae.models as M  # noqa: E402
from jsae.errors import FileFormatError  # noqa: E402
from jsae.models import images as I  # noqa: E402
from jsae.models.multimodal import random_gemma3  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _hf_pixels(imgs, size):
    from transformers import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    pv = ip(images=imgs, return_tensors="np")["pixel_values"]
    return np.transpose(pv, (0, 2, 3, 1))


@pytest.mark.parametrize("size", [64, 224])
def test_preprocess_matches_hf_on_real_photos(size):
    imgs = [getattr(skdata, n)() for n in PHOTOS]
    ours = I.preprocess(imgs, size)
    ref = _hf_pixels(imgs, size)
    assert ours.shape == (len(PHOTOS), size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    assert ours.min() >= -1.0 and ours.max() <= 1.0 and ours.std() > 0.2  # real content, normalised


def test_grayscale_rgba_16bit_converted(tmp_path):
    gray = skdata.camera()  # [H, W] uint8
    np.testing.assert_allclose(I.preprocess([gray], 64), _hf_pixels([Image.fromarray(gray)], 64), atol=1e-6)
    rgba = Image.fromarray(skdata.astronaut()).convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:100, :, 3] = 0  # a transparent band -> white, as transformers' convert_to_rgb
    rgba = Image.fromarray(a, "RGBA")
    ours = I.preprocess([rgba], 64)
    np.testing.assert_allclose(ours, _hf_pixels([rgba], 64), atol=1e-6)
    assert np.allclose(ours[0, :8], 1.0)  # white band
    # a 16-bit PNG on disk and a uint16 array: scaled to 8 bits, same as the 8-bit image
    g16 = gray.astype(np.uint16) * 257
    p = tmp_path / "gray16.png"
    Image.fromarray(g16).save(p)
    assert Image.open(p).mode.startswith("I")
    np.testing.assert_allclose(I.preprocess([p], 64), I.preprocess([gray], 64), atol=1e-6)
    np.testing.assert_allclose(I.preprocess([g16], 64), I.preprocess([gray], 64), atol=1e-6)
    # floats in [0, 1] and channels-first arrays
    rgb = skdata.coffee()
    np.testing.assert_allclose(I.preprocess([rgb / 255.0], 64), I.preprocess([rgb], 64), atol=1e-6)
    np.testing.assert_allclose(I.preprocess([np.moveaxis(rgb, -1, 0)], 64), I.preprocess([rgb], 64))


def test_bad_images_name_the_file(tmp_path, monkeypatch):
    txt = tmp_path / "notes.jpg"
    txt.write_text("not an image at all")
    with pytest.raises(FileFormatError, match="notes.jpg: not a readable image"):
        I.preprocess([txt], 32)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        I.preprocess([tmp_path / "missing.png"], 32)
    good = tmp_path / "cat.png"
    Image.fromarray(skdata.chelsea()).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(FileFormatError, match="cut.png"):
        I.preprocess([cut], 32)
    monkeypatch.setattr(I, "MAX_PIXELS", 1000)
    with pytest.raises(I.ImageError, match="cat.png: 451x300 pixels is over"):
        I.preprocess([good], 32)
    with pytest.raises(I.ImageError, match="array of shape"):
        I.preprocess([np.zeros((5, 5, 7), np.uint8)], 32)
    with pytest.raises(I.ImageError, match="not an image"):
        I.preprocess([{"a": 1}], 32)


@pytest.fixture(scope="module")
def mm_lm():
    # the real Gemma 3 tokenizer (with <start_of_image>/<end_of_image>), from the model cache if there
    entries = sorted((M.cache_dir() / "models").glob("gemma-3-270m-*/tokenizer.json"))
    tok = M.Tokenizer.from_dir(entries[-1].parent) if entries else M.load("gemma-3-270m").tokenizer
    return random_gemma3(tok, jax.random.key(0), mm_tokens_per_image=16)  # tiny random towers


def test_to_tokens_matches_hf_processor(mm_lm):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    lm = mm_lm
    d = lm.tokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        d.save(t)
        tok = PreTrainedTokenizerFast(
            tokenizer_file=f"{t}/tokenizer.json", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
            extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                  "image_token": "<image_soft_token>"},
        )
    assert tok.image_token_id == lm.vision.cfg.image_token_id  # 262144, appended to the 270M vocab
    size = lm.vision.cfg.vision.image_size
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
                           tokenizer=tok, image_seq_length=16)
    texts = ["A photo <start_of_image> of an astronaut.", "<start_of_image>cat and<start_of_image> coffee"]
    images = [[skdata.astronaut()], [skdata.chelsea(), skdata.coffee()]]
    ref = proc(text=texts, images=images, return_tensors="np", padding=True)
    ours = lm.to_tokens(texts, images=images, add_bos=False)
    n = ref["attention_mask"].sum(1)
    for i in range(2):  # HF pads on the left or right depending on the tokenizer; compare the rows
        r = ref["input_ids"][i][ref["attention_mask"][i] == 1]
        o = ours.tokens[i][ours.attention_mask[i] == 1]
        np.testing.assert_array_equal(o, r)
        assert ours.image_mask[i].sum() == (ref["token_type_ids"][i] == 1).sum()
    assert list(ours.attention_mask.sum(1)) == list(n)
    np.testing.assert_allclose(ours.pixel_values, np.transpose(ref["pixel_values"], (0, 2, 3, 1)), atol=1e-6)


def test_to_tokens_layout_and_errors(mm_lm):
    lm = mm_lm
    c = lm.vision.cfg
    b = lm.to_tokens(["a cat"], images=[skdata.chelsea()])  # no placeholder: image first
    row = list(b.tokens[0])
    assert row[:3] == [2, 108, c.boi_id] and row[3:19] == [c.image_token_id] * 16
    assert row[19:21] == [c.eoi_id, 108] and lm.tokenizer.decode(row[21:]) == "a cat"
    assert b.pixel_values.shape == (1, c.vision.image_size, c.vision.image_size, 3)
    mixed = lm.to_tokens(["text only", "<start_of_image> with image"], images=[None, skdata.rocket()])
    assert mixed.image_mask[0].sum() == 0 and mixed.image_mask[1].sum() == 16
    assert mixed.pixel_values.shape[0] == 1
    with pytest.raises(I.ImageError, match="2 <start_of_image> placeholder"):
        lm.to_tokens(["<start_of_image><start_of_image> x"], images=[skdata.rocket()])
    with pytest.raises(I.ImageError, match="3 entries for 2 texts"):
        lm.to_tokens(["a", "b"], images=[skdata.rocket()] * 3)
    out = lm.forward(mixed, capture=["blocks.2.hook_resid_post"], stop_after_capture=True)
    acts = np.asarray(out.activations["blocks.2.hook_resid_post"])
    assert acts.shape[:2] == mixed.tokens.shape and np.isfinite(acts).all()
    np.testing.assert_array_equal(np.asarray(out.image_mask), mixed.image_mask)


@pytest.mark.slow
def test_real_photos_end_to_end_vs_transformers(mm_lm, tmp_path):
    """Real photos through transformers' processor + Gemma3ForConditionalGeneration and through
    jsae (to_tokens -> forward) on one tiny random checkpoint: the same logits everywhere."""
    torch = pytest.importorskip("torch")
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )

    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=64, patch_size=8, vision_use_head=False)
    tc = Gemma3TextConfig(vocab_size=262_208, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    cfg = Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=16)
    torch.manual_seed(0)
    m = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    d = tmp_path / "ckpt"
    m.save_pretrained(d)
    mm_lm.tokenizer.save(d)
    lm = M.load(str(d))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 64, "width": 64}),
                           tokenizer=tok, image_seq_length=16)
    texts = ["<start_of_image> Chelsea the cat, sitting on a rug", "A cup of <start_of_image> coffee on a table"]
    images = [[skdata.chelsea()], [skdata.coffee()]]
    ref_in = proc(text=texts, images=images, return_tensors="pt", padding="longest")
    ours = lm.to_tokens(texts, images=images, add_bos=False)
    assert ours.attention_mask.all()  # rows of equal length: no padding (HF's positions are arange)
    np.testing.assert_array_equal(ours.tokens, ref_in["input_ids"].numpy())
    with torch.no_grad():
        ref = m(**ref_in).logits.numpy()
    out = np.asarray(lm.forward(ours).logits)
    real = ref_in["attention_mask"].numpy() == 1
    text_after = real & ~ours.image_mask & (np.cumsum(ours.image_mask, 1) > 0)
    assert text_after.sum() > 10
    assert np.abs(out[real] - ref[real]).max() <= 1e-4
