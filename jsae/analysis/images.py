"""Features on images: what fires on an image's soft tokens, a PNG with those tokens highlighted,
and a cross-modal measurement (features shared by an image and its caption vs mismatched pairs).

Each of Gemma 3's soft tokens pools a square of vision patches (`pool` x `pool` patches of
`patch_size` pixels), so soft token `i` covers the cell `(i // side, i % side)` of a
`side` x `side` grid over the resized image; that is where the highlight goes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jsae.errors import require


@dataclasses.dataclass
class ImageFeatures:
    """Codes of one image's soft tokens, and the features ranked by their max there."""

    codes: np.ndarray  # [M, d_sae] SAE codes at the image's soft tokens
    features: np.ndarray  # [k] feature ids, strongest first
    max: np.ndarray  # [k] max activation over the soft tokens
    n_tokens: np.ndarray  # [k] soft tokens where the feature fires
    text_codes: Optional[np.ndarray] = None  # [T, d_sae] at the caption's tokens (if any)


def _encode(sae, x):
    import jax.numpy as jnp

    from jsae.sae import encode

    return np.asarray(encode(sae, jnp.asarray(x, jnp.float32)))


def image_codes(lm, sae, hook: str, image: Any, caption: str = "") -> tuple[np.ndarray, np.ndarray]:
    """SAE codes at the soft tokens of `image` ([M, d_sae]) and at the caption's text tokens
    after it ([T, d_sae], BOS and the image block's own tokens left out)."""
    from jsae.models.multimodal import forward

    batch = lm.to_tokens([caption], images=[image])
    out = forward(lm, batch, capture=[hook], stop_after_capture=True)
    acts = np.asarray(out.activations[hook][0], np.float32)
    img = batch.image_mask[0]
    c = lm.vision.cfg
    last = int(np.nonzero(batch.tokens[0] == c.eoi_id)[0][-1])
    text_pos = np.arange(len(img)) > last + 1  # after "<end_of_image>\n\n"
    text_pos &= batch.attention_mask[0].astype(bool)
    return _encode(sae, acts[img]), _encode(sae, acts[text_pos])


def features_on_image(lm, sae, hook: str, image: Any, *, top: int = 10) -> ImageFeatures:
    """The features that fire most on an image's soft tokens (by their max activation)."""
    codes, _ = image_codes(lm, sae, hook, image)
    mx = codes.max(0)
    order = np.argsort(-mx, kind="stable")
    order = order[mx[order] > 0][:top]
    return ImageFeatures(codes, order, mx[order], (codes[:, order] > 0).sum(0))


def text_codes(lm, sae, hook: str, text: str) -> np.ndarray:
    """SAE codes at a text's tokens, BOS left out ([T, d_sae])."""
    from jsae.models.transformer import forward

    toks, mask = lm.to_tokens([text])
    out = forward(lm.cfg, lm.params, toks, attention_mask=mask, capture=[hook], stop_after_capture=True)
    acts = np.asarray(out.activations[hook][0], np.float32)[1:][mask[0, 1:].astype(bool)]
    return _encode(sae, acts)


def render_feature(lm, image: Any, soft_acts: Sequence[float], path: str | Path, *,
                   color=(255, 64, 0), size: Optional[int] = None) -> Path:
    """PNG of the image (as the model saw it, resized) with each soft token's cell tinted by the
    feature's activation there (transparent where it does not fire, strongest = most opaque)."""
    Image = require("PIL.Image", "vision", "rendering images")
    from jsae.models.images import open_image

    c = lm.vision.cfg
    side = c.tokens_per_side
    a = np.asarray(soft_acts, np.float32).reshape(side, side)
    S = size or max(c.vision.image_size, 256)
    base = open_image(image).resize((S, S), resample=c.resample).convert("RGBA")
    peak = float(a.max())
    alpha = np.zeros((side, side), np.float32) if peak <= 0 else np.clip(a / peak, 0, 1) * 0.75
    mask = Image.fromarray((alpha * 255).astype(np.uint8), "L").resize((S, S), resample=Image.NEAREST)
    tint = Image.new("RGBA", (S, S), (*color, 255))
    tint.putalpha(mask)
    out = Image.alpha_composite(base, tint)
    # a thin outline around cells that fire, so weak activations stay visible
    arr = np.asarray(out).copy()
    cell = S / side
    for i, j in zip(*np.nonzero(a > 0)):
        y0, y1 = int(i * cell), min(int((i + 1) * cell), S) - 1
        x0, x1 = int(j * cell), min(int((j + 1) * cell), S) - 1
        arr[y0, x0 : x1 + 1, :3] = color
        arr[y1, x0 : x1 + 1, :3] = color
        arr[y0 : y1 + 1, x0, :3] = color
        arr[y0 : y1 + 1, x1, :3] = color
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGBA").convert("RGB").save(p)
    return p


@dataclasses.dataclass
class TopImages:
    """Per feature, the images (of a scanned set) where it fires most on the soft tokens."""

    features: np.ndarray  # [F]
    images: np.ndarray  # [F, n] index into the scanned items, strongest first
    max: np.ndarray  # [F, n] the feature's max over that image's soft tokens
    soft: np.ndarray  # [F, n, M] its activation at every soft token (for render_feature)


def top_images(lm, sae, hook: str, images: Sequence[Any], features: Sequence[int], *, n: int = 4,
               batch_size: int = 8) -> TopImages:
    """Scan `images` (image alone, no caption) and keep each feature's `n` top-activating ones."""
    from jsae.models.multimodal import forward

    feats = np.asarray(list(features), np.int64)
    M = lm.vision.cfg.mm_tokens_per_image
    per = np.zeros((len(images), len(feats), M), np.float32)
    for s in range(0, len(images), batch_size):
        chunk = list(images[s : s + batch_size])
        imgs = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed shape: one compilation
        b = lm.to_tokens([""] * batch_size, images=imgs)
        acts = np.asarray(forward(lm, b, capture=[hook], stop_after_capture=True).activations[hook])
        for r in range(len(chunk)):
            per[s + r] = _encode(sae, acts[r][b.image_mask[r]])[:, feats].T
    mx = per.max(-1)  # [N, F]
    order = np.argsort(-mx, axis=0, kind="stable")[:n].T  # [F, n]
    rows = np.arange(len(feats))[:, None]
    return TopImages(feats, order, mx[order, rows], per[order, rows])


@dataclasses.dataclass
class CrossModal:
    """Overlap (Jaccard) of the feature sets active on an image and on a caption."""

    matched: np.ndarray  # [n] image i vs its own caption
    mismatched: np.ndarray  # [n, n-1] image i vs caption j != i
    n_image_features: np.ndarray  # [n] features active on each image
    n_text_features: np.ndarray  # [n] features active on each caption

    @property
    def matched_mean(self) -> float:
        return float(self.matched.mean())

    @property
    def mismatched_mean(self) -> float:
        return float(self.mismatched.mean())

    def summary(self) -> str:
        return (f"{len(self.matched)} image/caption pairs: feature overlap (Jaccard) matched "
                f"{self.matched_mean:.3f} vs mismatched {self.mismatched_mean:.3f} "
                f"(features per image {self.n_image_features.mean():.1f}, "
                f"per caption {self.n_text_features.mean():.1f})")


def cross_modal_overlap(lm, sae, hook: str, pairs: Sequence[tuple[Any, str]], *,
                        min_fraction: float = 0.0, batch_size: int = 8) -> CrossModal:
    """For image/caption pairs: features active on the image alone (any soft token) vs on the
    caption alone (any token, BOS excluded), Jaccard overlap for each matched pair against every
    mismatched one. `min_fraction` counts a feature only where it fires on more than that
    fraction of the image's soft tokens / caption's tokens (0: fires anywhere). Images and
    captions run in fixed-shape batches (two compilations in all)."""
    from jsae.models.multimodal import forward
    from jsae.models.transformer import forward as text_forward

    n = len(pairs)
    img_sets, txt_sets = [], []
    for s in range(0, n, batch_size):
        chunk = list(pairs[s : s + batch_size])
        pad = batch_size - len(chunk)
        imgs = [im for im, _ in chunk] + [chunk[-1][0]] * pad
        b = lm.to_tokens([""] * batch_size, images=imgs)
        acts = np.asarray(forward(lm, b, capture=[hook], stop_after_capture=True).activations[hook])
        caps = lm.to_tokens([c for _, c in chunk] + [chunk[-1][1]] * pad)
        T = caps[0].shape[1]
        Tp = -(-T // 32) * 32  # bucket the length: few compilations across calls
        toks = np.pad(caps[0], ((0, 0), (0, Tp - T)), constant_values=lm.pad_id)
        mask = np.pad(caps[1], ((0, 0), (0, Tp - T)))
        tacts = np.asarray(text_forward(lm.cfg, lm.params, toks, attention_mask=mask, capture=[hook],
                                        stop_after_capture=True).activations[hook])
        for r in range(len(chunk)):
            ci = _encode(sae, acts[r][b.image_mask[r]])
            keep = mask[r].astype(bool)
            keep[0] = False  # BOS
            ct = _encode(sae, tacts[r][keep])
            img_sets.append(np.nonzero((ci > 0).mean(0) > min_fraction)[0])
            txt_sets.append(np.nonzero((ct > 0).mean(0) > min_fraction)[0])

    def jac(a, b):
        u = len(np.union1d(a, b))
        return len(np.intersect1d(a, b)) / u if u else 0.0

    matched = np.array([jac(img_sets[i], txt_sets[i]) for i in range(n)])
    mism = np.array([[jac(img_sets[i], txt_sets[j]) for j in range(n) if j != i] for i in range(n)])
    return CrossModal(matched, mism, np.array([len(s) for s in img_sets]), np.array([len(s) for s in txt_sets]))
