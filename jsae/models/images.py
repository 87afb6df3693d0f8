"""Images in: reading, conversion and Gemma 3's preprocessing, and the interleaved token sequence.

Preprocessing is the HF Gemma 3 image processor's (PIL backend, pan-and-scan off): convert to RGB
(transparency composited onto white, as transformers does), resize to `image_size` x `image_size`
with PIL's bilinear filter on 8-bit pixels, rescale by 1/255, normalise with mean/std (0.5).
16-bit images are brought to 8 bits first (value / 257), float arrays are read as [0, 1].

The token sequence is the Gemma 3 processor's: each `<start_of_image>` in a text becomes
`"\\n\\n<start_of_image>" + mm_tokens_per_image x <image_soft_token> + "<end_of_image>\\n\\n"`,
then the whole text is tokenised (BOS first). A text with images but no `<start_of_image>`
gets its images in front of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jsae.errors import FileFormatError, JsaeError, require

BOI = "<start_of_image>"
MAX_PIXELS = 178_956_970  # PIL's decompression-bomb limit: larger images are refused, naming the file
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageError(JsaeError, ValueError):
    """An image (array or object) that cannot be used; the message says which one and why."""


def _pil():
    return require("PIL.Image", "vision", "reading images")


def _describe(x: Any) -> str:
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return type(x).__name__


def open_image(src: Any, name: Optional[str] = None):
    """A path, PIL image or NumPy array -> an RGB PIL image (8 bits per channel)."""
    Image = _pil()
    name = name or _describe(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: {im.width}x{im.height} pixels is over the {MAX_PIXELS:,}-pixel limit "
                        "(downscale it first)"
                    )
                im.load()
                return to_rgb(im, str(path))
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path}: too many pixels ({e})") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise FileFormatError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if isinstance(src, Image.Image):
        return to_rgb(src, name)
    if isinstance(src, np.ndarray) or hasattr(src, "__array__"):
        return to_rgb(_array_to_pil(np.asarray(src), name), name)
    raise ImageError(f"{name}: not an image (expected a path, a PIL image or a NumPy array)")


def _array_to_pil(a: np.ndarray, name: str):
    Image = _pil()
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(f"{name}: expected [H, W], [H, W, 3|4] or [3|4, H, W]")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ImageError(f"{name}: {a.shape[1]}x{a.shape[0]} pixels is over the {MAX_PIXELS:,}-pixel limit")
    if min(a.shape[:2]) < 1:
        raise ImageError(f"{name}: empty image")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: has NaN or infinite values")
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)  # floats are [0, 1]
    elif a.dtype == np.uint16 or (np.issubdtype(a.dtype, np.integer) and a.max(initial=0) > 255):
        a = np.clip(np.round(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def to_rgb(im, name: str = "image"):
    """RGB, 8 bits: transparency onto white (transformers' `convert_to_rgb`), 16-bit scaled."""
    Image = _pil()
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im)
        if im.mode == "F":
            a = a.astype(np.float64)
            a = a / max(float(a.max(initial=0.0)), 1.0) if a.max(initial=0) > 1 else a
            return to_rgb(_array_to_pil(a.astype(np.float32), name), name)
        return to_rgb(_array_to_pil(a.astype(np.uint16 if a.max(initial=0) < 65536 else np.uint32), name),
                      name)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: cannot convert image mode {im.mode!r} to RGB ({e})") from e


def preprocess(images: Sequence[Any], image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
               resample: int = 2) -> np.ndarray:
    """Images (paths, PIL, arrays) -> pixel values [N, S, S, 3] float32, channels last."""
    out = np.empty((len(images), image_size, image_size, 3), np.float32)
    m = np.asarray(mean, np.float32)
    s = np.asarray(std, np.float32)
    for i, src in enumerate(images):
        im = open_image(src)
        im = im.resize((image_size, image_size), resample=resample)
        out[i] = (np.asarray(im, np.float32) * np.float32(1 / 255) - m) / s
    return out


def preprocess_for(lm, images: Sequence[Any]) -> np.ndarray:
    vt = _vision_of(lm)
    c = vt.cfg
    return preprocess(images, c.vision.image_size, c.image_mean, c.image_std, c.resample)


def _vision_of(lm):
    vt = getattr(lm, "vision", None)
    if vt is None:
        from jsae.models.multimodal import text_only_error

        raise text_only_error(lm)
    return vt


def _is_image(x) -> bool:
    if isinstance(x, (str, os.PathLike, np.ndarray)):
        return True
    try:
        from PIL import Image

        return isinstance(x, Image.Image)
    except ImportError:
        return False


def _per_text(texts: list[str], images) -> list[list[Any]]:
    if _is_image(images):
        images = [images]
    images = list(images)
    if len(texts) == 1 and len(images) != 1 and all(_is_image(x) for x in images):
        return [images]  # several images for one text
    if len(images) != len(texts):
        raise ImageError(
            f"images: {len(images)} entries for {len(texts)} texts (give one entry per text: an image, "
            "a list of images or None)"
        )
    return [[] if x is None else ([x] if _is_image(x) else list(x)) for x in images]


def expand_text(text: str, n_images: int, boi: str, eoi: str) -> str:
    """Gemma 3 processor's expansion of the `<start_of_image>` placeholders (soft tokens left out:
    they are inserted as ids after each start-of-image token)."""
    n = text.count(boi)
    if n == 0 and n_images:
        text, n = boi * n_images + text, n_images
    if n != n_images:
        raise ImageError(
            f"text has {n} {boi} placeholder(s) but {n_images} image(s) were given: {text[:60]!r}"
        )
    return text.replace(boi, f"\n\n{boi}{eoi}\n\n")


def build_inputs(lm, texts, images, *, add_bos: bool = True, padding_side: str = "right"):
    """-> `MultimodalInputs(tokens [B, T], attention_mask [B, T], pixel_values [N, S, S, 3] | None,
    image_mask [B, T])`; `images` holds one entry per text (an image, a list, or None)."""
    from jsae.models.loading import pad_batch
    from jsae.models.multimodal import MultimodalInputs

    vt = _vision_of(lm)
    c = vt.cfg
    tok = lm._tok()
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    per = _per_text(texts, images)
    boi, eoi = tok.id_to_token(c.boi_id), tok.id_to_token(c.eoi_id)
    if boi is None or eoi is None:
        raise ImageError(f"model {lm.name!r}: its tokenizer has no start/end-of-image tokens ({c.boi_id}, {c.eoi_id})")
    ids = []
    for text, imgs in zip(texts, per):
        row = tok.encode(expand_text(text, len(imgs), boi, eoi), add_bos=add_bos)
        out = []
        for t in row:
            out.append(t)
            if t == c.boi_id:
                out.extend([c.image_token_id] * c.mm_tokens_per_image)
        ids.append(out)
    tokens, mask = pad_batch(ids, lm.pad_id, padding_side)
    flat = [im for imgs in per for im in imgs]
    pixels = preprocess_for(lm, flat) if flat else None
    return MultimodalInputs(tokens, mask, pixels, tokens == c.image_token_id)
