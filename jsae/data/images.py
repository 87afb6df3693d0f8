"""Images mixed with text for harvesting and training (`data.source: images`).

An image context is `<bos>` + Gemma 3's image block (`\\n\\n<start_of_image>` + soft tokens +
`<end_of_image>\\n\\n`) + its caption if it has one; a text context is `<bos>` + a packed
`context_length - 1` token chunk of the text corpus. `image_ratio` is the fraction of harvested
tokens that are image soft tokens (approximately: it sets how many text contexts go with each
image). Every harvested row keeps where it came from (`is_image`, `image`, `soft_index`, the
context and position), so analysis can show images beside text.

Image sources (`data.images`): `skimage` (the ~20 real photographs scikit-image ships, captions
from their docstrings; offline), a folder of image files (captions from a `NAME.txt` beside an
image, if any), `hf:ORG/NAME[:CONFIG]` (a `datasets` dataset with an image column
`data.image_field` and optional `data.caption_field`), `tfds:NAME` (a prepared TFDS dataset with an
`image` feature, under `data.data_dir`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jsae.errors import JsaeError, require
from jsae.models.images import IMAGE_SUFFIXES, expand_text, preprocess_for

# scikit-image's bundled photographs (no download needed) -> the loader function documenting them
SKIMAGE_PHOTOS = {
    "astronaut.png": "astronaut", "brick.png": "brick", "camera.png": "camera", "cell.png": "cell",
    "chelsea.png": "chelsea", "clock_motion.png": "clock", "coffee.png": "coffee", "coins.png": "coins",
    "grass.png": "grass", "gravel.png": "gravel", "horse.png": "horse",
    "hubble_deep_field.jpg": "hubble_deep_field", "ihc.png": "immunohistochemistry", "logo.png": "logo",
    "microaneurysms.png": "microaneurysms", "moon.png": "moon", "motorcycle_left.png": "stereo_motorcycle",
    "page.png": "page", "retina.jpg": "retina", "rocket.jpg": "rocket", "text.png": "text",
}


class ImageSourceError(JsaeError, ValueError):
    """An image source that cannot be opened or has no images."""


@dataclasses.dataclass
class ImageItem:
    image: Any  # path, PIL image or array
    caption: Optional[str] = None
    name: str = ""


def skimage_photos() -> list[ImageItem]:
    """scikit-image's real photographs with a caption from each one's docstring (offline)."""
    skimage = require("skimage", "vision", "the offline photographs (scikit-image)")
    import skimage.data as skd

    folder = Path(skimage.__file__).parent / "data"
    out = []
    for fname, fn in SKIMAGE_PHOTOS.items():
        p = folder / fname
        if p.is_file():
            doc = (getattr(skd, fn).__doc__ or fname).strip().splitlines()[0].rstrip(".")
            out.append(ImageItem(p, doc, fname.rsplit(".", 1)[0]))
    if not out:
        raise ImageSourceError(f"no photographs found in {folder}")
    return out


def folder_images(path: str | Path) -> list[ImageItem]:
    d = Path(path).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"data.images: image folder not found: {d}")
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageSourceError(f"data.images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {d}")
    out = []
    for p in files:
        cap = p.with_suffix(".txt")
        out.append(ImageItem(p, cap.read_text().strip() if cap.is_file() else None, p.stem))
    return out


def hf_images(spec: str, split: str, image_field: str, caption_field: Optional[str], limit: int) -> list[ImageItem]:
    datasets = require("datasets", "hf", f"data.images {spec!r}")
    name, _, conf = spec[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, conf or None, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001  (hub/network errors come in many types)
        raise ImageSourceError(f"data.images: cannot open {spec!r} ({type(e).__name__}: {e})") from e
    out = []
    for i, row in enumerate(itertools.islice(ds, limit)):
        if image_field not in row:
            raise ImageSourceError(f"data.images: {spec!r} has no column {image_field!r} ({', '.join(row)})")
        out.append(ImageItem(row[image_field], row.get(caption_field) if caption_field else None, f"{spec}#{i}"))
    return out


def tfds_images(spec: str, split: str, data_dir: Optional[str], limit: int) -> list[ImageItem]:
    tfds = require("tensorflow_datasets", "tfds", f"data.images {spec!r}")
    try:
        src = tfds.data_source(spec[5:], split=split, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001
        raise ImageSourceError(f"data.images: cannot open {spec!r} under {data_dir} ({e})") from e
    return [ImageItem(np.asarray(src[i]["image"]), None, f"{spec}#{i}") for i in range(min(limit, len(src)))]


def open_images(spec, *, split: str = "train", data_dir: Optional[str] = None, image_field: str = "image",
                caption_field: Optional[str] = None, limit: int = 100_000) -> list[ImageItem]:
    """`skimage`, a folder, `hf:NAME`, `tfds:NAME`, or a Python list of images / `ImageItem`s."""
    if isinstance(spec, (list, tuple)):
        return [x if isinstance(x, ImageItem) else ImageItem(x, None, str(i)) for i, x in enumerate(spec)]
    spec = str(spec)
    if spec == "skimage":
        return skimage_photos()
    if spec.startswith("hf:"):
        return hf_images(spec, split, image_field, caption_field, limit)
    if spec.startswith("tfds:"):
        return tfds_images(spec, split, data_dir, limit)
    return folder_images(spec)


# ----------------------------------------------------------------------------------------------
# contexts and harvesting


@dataclasses.dataclass
class Context:
    ids: list  # token ids (BOS first)
    image: int = -1  # index into the image list, -1 for a text context


def image_context(lm, caption: Optional[str], index: int) -> Context:
    c = lm.vision.cfg
    tok = lm._tok()
    boi, eoi = tok.id_to_token(c.boi_id), tok.id_to_token(c.eoi_id)
    row = tok.encode(expand_text(boi + (caption or ""), 1, boi, eoi), add_bos=True)
    ids = []
    for t in row:
        ids.append(t)
        if t == c.boi_id:
            ids.extend([c.image_token_id] * c.mm_tokens_per_image)
    return Context(ids, index)


def text_contexts(lm, texts: Iterable[str], context_length: int) -> Iterator[Context]:
    """Documents packed into `context_length` contexts starting with BOS."""
    tok = lm._tok()
    buf: list[int] = []
    n = context_length - 1
    for t in texts:
        buf.extend(tok.encode(t, add_bos=False))
        while len(buf) >= n:
            yield Context([tok.bos_id, *buf[:n]])
            buf = buf[n:]


def mix(lm, items: Sequence[ImageItem], texts: Iterable[str], *, image_ratio: float = 0.5,
        context_length: int = 64, seed: int = 0) -> list[Context]:
    """Every image once, with enough text contexts for `image_ratio` of the tokens to be image
    tokens, in a seeded interleaved order."""
    if not 0 < image_ratio <= 1:
        raise ImageSourceError(f"data.image_ratio must be in (0, 1]; got {image_ratio}")
    if lm.vision is None:
        from jsae.models.multimodal import text_only_error

        raise text_only_error(lm)
    imgs = [image_context(lm, it.caption, i) for i, it in enumerate(items)]
    M = lm.vision.cfg.mm_tokens_per_image
    n_text = int(round(len(imgs) * M * (1 - image_ratio) / (image_ratio * (context_length - 1))))
    txt = list(itertools.islice(text_contexts(lm, texts, context_length), n_text))
    if len(txt) < n_text:
        raise ImageSourceError(f"the text ran out: {len(txt)} of {n_text} text contexts")
    ctxs = imgs + txt
    order = np.random.default_rng([seed, 7]).permutation(len(ctxs))
    return [ctxs[i] for i in order]


@dataclasses.dataclass
class Harvest:
    """Rows harvested at image and text positions (BOS and padding dropped)."""

    acts: dict  # hook -> [N, D] float32
    is_image: np.ndarray  # [N] bool: an image soft token
    image: np.ndarray  # [N] int: index of the image (-1: text)
    soft_index: np.ndarray  # [N] int: which soft token of the image (-1: text)
    context: np.ndarray  # [N] int: index into `contexts`
    position: np.ndarray  # [N] int
    token: np.ndarray  # [N] int: the token id at the row

    def save(self, folder: str | Path) -> Path:
        """`<hook>.npy` per hook (train with `data.source: array`) + `rows.npz` (provenance)."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        for h, a in self.acts.items():
            np.save(d / f"{h}.npy", np.ascontiguousarray(a, np.float32))
        np.savez(d / "rows.npz", is_image=self.is_image, image=self.image, soft_index=self.soft_index,
                 context=self.context, position=self.position, token=self.token)
        return d


def harvest(lm, hooks: Sequence[str], contexts: Sequence[Context], items: Sequence[ImageItem], *,
            batch_size: int = 8, exclude_bos: bool = True, progress: bool = True) -> Harvest:
    """Run the multimodal LM over `contexts`, capturing `hooks` at every real position.

    Image and text contexts go in separate LM batches of a fixed shape each (`batch_size` rows,
    padded with masked copies), so the forward compiles twice, not once per batch."""
    hooks = list(hooks)
    parts: dict[str, list] = {h: [] for h in hooks}
    meta: dict[str, list] = {k: [] for k in ("is_image", "image", "soft_index", "context", "position", "token")}
    c = lm.vision.cfg
    bar = _bar(len(contexts), progress)
    for kind in (True, False):
        idx = [i for i, x in enumerate(contexts) if (x.image >= 0) == kind]
        if not idx:
            continue
        T = -(-max(len(contexts[i].ids) for i in idx) // 8) * 8
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            rows = chunk + [chunk[-1]] * (batch_size - len(chunk))  # masked padding rows
            tokens = np.full((batch_size, T), lm.pad_id, np.int32)
            mask = np.zeros((batch_size, T), np.int32)
            for r, i in enumerate(rows):
                ids = contexts[i].ids
                tokens[r, : len(ids)] = ids
                mask[r, : len(ids)] = r < len(chunk)
            imgs = [contexts[i].image for i in rows if contexts[i].image >= 0]
            pixels = preprocess_for(lm, [items[i].image for i in imgs]) if imgs else None
            _collect(lm, hooks, tokens, mask, pixels, np.asarray(chunk), c, exclude_bos, parts, meta,
                     np.array([contexts[i].image for i in rows]))
            bar.update(len(chunk))
    bar.close()
    order = np.lexsort((np.concatenate(meta["position"]), np.concatenate(meta["context"])))
    cat = {k: np.concatenate(v)[order] for k, v in meta.items()}
    return Harvest({h: np.concatenate(parts[h])[order] for h in hooks}, **cat)


def _collect(lm, hooks, tokens, mask, pixels, ctx_ids, c, exclude_bos, parts, meta, row_images):
    from jsae.models.multimodal import forward

    out = forward(lm, tokens, pixels, attention_mask=mask, capture=hooks, stop_after_capture=True)
    keep = mask.astype(bool)
    if exclude_bos:
        keep[:, 0] = False
    is_img = tokens == c.image_token_id
    soft = np.where(is_img, np.cumsum(is_img, axis=1) - 1, -1)
    image = np.where(is_img, row_images[:, None], -1)
    b, t = np.nonzero(keep)
    for h in hooks:
        parts[h].append(np.asarray(out.activations[h], np.float32)[b, t])
    meta["is_image"].append(is_img[b, t])
    meta["image"].append(image[b, t])
    meta["soft_index"].append(soft[b, t])
    meta["context"].append(ctx_ids[b])
    meta["position"].append(t)
    meta["token"].append(tokens[b, t])


def _bar(total: int, on: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="harvest images+text", unit="ctx", disable=not on, leave=False)


# ----------------------------------------------------------------------------------------------
# the training source


class ImageTextActivationSource:
    """`data.source: images`: an ActivationSource over images mixed with text at `data.image_ratio`.

    Images and text documents are split into train / held-out parts (`data.holdout_fraction`, at
    least one held-out image). Each epoch visits the training images in a fresh seeded order, in
    chunks of about `data.shuffle_buffer * image_ratio` image tokens (so memory stays bounded);
    a chunk is harvested with its share of text (read from a seeded document offset) and its rows
    are shuffled. A resumed run continues at the epoch, chunk and row it stopped at (that chunk
    is harvested again: same rows on the same machine)."""

    def __init__(self, cfg, model, process_index: int = 0, process_count: int = 1, *, items=None, texts=None):
        d = cfg.data
        self.cfg, self.model = cfg, model
        from jsae.config import resolve_layers

        resolve_layers(cfg, model.cfg.n_layers)  # a set's hooks (sae.layers: all needs the depth)
        self.hooks = list(cfg.model.hooks)
        self.d_in = {h: int(model.cfg.d_model) for h in self.hooks}
        items = items if items is not None else open_images(
            getattr(d, "images", None) or "skimage", split=d.split, data_dir=d.data_dir,
            image_field=getattr(d, "image_field", "image"), caption_field=getattr(d, "caption_field", None))
        if texts is None:
            from jsae.data.text import open_documents

            docs = open_documents(d)
            if not (hasattr(docs, "__getitem__") and hasattr(docs, "__len__")):  # a stream
                docs = list(itertools.islice(iter(docs), 20_000))
            texts = _Lazy(docs)
        self.ratio = float(getattr(d, "image_ratio", 0.5))
        rng = np.random.default_rng([cfg.seed, 31])
        io, to = rng.permutation(len(items)), rng.permutation(len(texts))
        if len(items) < 2:
            raise ImageSourceError("data.source images needs at least 2 images (one is held out)")
        if len(texts) < 2 and self.ratio < 1:
            raise ImageSourceError(f"data.source images: {len(texts)} text document(s); needs at least 2 "
                                   "(one is held out), or data.image_ratio: 1")
        n_ei = min(max(1, int(round(len(items) * d.holdout_fraction))), len(items) - 1)
        n_et = min(max(1, int(round(len(texts) * d.holdout_fraction))), max(len(texts) - 1, 0))
        self.eval_items = [items[i] for i in io[:n_ei]]
        self.train_items = [items[i] for i in io[n_ei:]][process_index::process_count]
        self.eval_texts = _Lazy(texts, to[:n_et])
        self.train_texts = _Lazy(texts, to[n_et:][process_index::process_count])
        self.seed = cfg.seed * 1000 + process_index
        M = model.vision.cfg.mm_tokens_per_image if model.vision is not None else 256
        self.chunk_images = max(1, int(d.shuffle_buffer * self.ratio) // M)
        self._epoch, self._chunk, self._offset, self._rows = 0, 0, 0, None

    def _harvest(self, items, texts, seed, start: int = 0) -> Harvest:
        ctx = mix(self.model, items, texts.cycle(start) if len(texts) else iter(()), image_ratio=self.ratio,
                  context_length=self.cfg.data.context_length, seed=seed)
        return harvest(self.model, self.hooks, ctx, items, batch_size=int(self.cfg.model.batch_size),
                       exclude_bos=self.cfg.data.exclude_bos)

    def _chunks(self, epoch: int) -> list:
        order = np.random.default_rng([self.seed, epoch, 5]).permutation(len(self.train_items))
        return [order[i : i + self.chunk_images] for i in range(0, len(order), self.chunk_images)]

    def _epoch_rows(self):
        if self._rows is None:
            chunks = self._chunks(self._epoch)
            items = [self.train_items[i] for i in chunks[self._chunk]]
            k = self._epoch * len(chunks) + self._chunk
            start = int(np.random.default_rng([self.seed, k, 11]).integers(max(len(self.train_texts), 1)))
            h = self._harvest(items, self.train_texts, self.seed + k, start)
            perm = np.random.default_rng([self.seed, k]).permutation(len(h.is_image))
            self._rows = {key: v[perm] for key, v in h.acts.items()}
        return self._rows

    def _advance(self) -> None:
        self._offset, self._rows = 0, None
        self._chunk += 1
        if self._chunk >= len(self._chunks(self._epoch)):
            self._epoch, self._chunk = self._epoch + 1, 0

    def next_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        out: dict[str, list] = {h: [] for h in self.hooks}
        need = batch_size
        while need:
            rows = self._epoch_rows()
            n = len(rows[self.hooks[0]])
            take = min(need, n - self._offset)
            for h in self.hooks:
                out[h].append(rows[h][self._offset : self._offset + take])
            self._offset += take
            need -= take
            if self._offset >= n:
                self._advance()
        return {h: np.concatenate(v) for h, v in out.items()}

    def eval_batches(self, n_tokens: int, batch_size: int):
        h = self._harvest(self.eval_items, self.eval_texts, self.seed + 10**6)
        n = min(n_tokens, len(h.is_image))
        for s in range(0, n, batch_size):
            yield {k: v[s : min(s + batch_size, n)] for k, v in h.acts.items()}

    def state(self) -> dict:
        return {"kind": "images", "epoch": self._epoch, "chunk": self._chunk, "offset": self._offset}

    def restore(self, state: dict) -> None:
        if state.get("kind") != "images":
            raise ValueError(f"saved data position is for a {state.get('kind')!r} source, not 'images'")
        self._epoch, self._chunk = int(state["epoch"]), int(state.get("chunk", 0))
        self._offset, self._rows = int(state["offset"]), None


def _text(doc) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict):
        return str(doc.get("text", ""))
    return str(getattr(doc, "text", doc))


class _Lazy:
    """Documents read only when the packer reaches them (the offline corpus has 10k)."""

    def __init__(self, docs, idx=None):
        self.docs = docs
        self.idx = np.arange(len(docs)) if idx is None else np.asarray(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> str:
        return _text(self.docs[int(self.idx[i])])

    def cycle(self, start: int = 0):
        while True:
            chars = 0
            for j in range(len(self)):
                t = self[(start + j) % len(self)]
                chars += len(t)
                yield t
            if not chars:  # every document is empty: end instead of looping forever
                return
