"""Text documents: where they come from, in which order, and who reads which.

A *document collection* is random access (``len(docs)``, ``docs[i] -> str``) so that every
process can read only its own share and a resumed run can jump straight to a position.
Sources:

- ``offline``: English Wikipedia vital-article summaries + US State of the Union speeches,
  built once into an array_record TFDS dataset (see :mod:`jsae.data.tfds_offline`);
- ``tfds:NAME[/CONFIG][:VERSION]``: any prepared TFDS dataset (array_record) under
  ``data_dir`` (``gs://`` allowed), read with ``tfds`` data sources, never downloaded;
- ``hf:ORG/NAME[:CONFIG]``: a Hugging Face ``datasets`` stream (optional extra; iterable only);
- ``files``: local ``.txt`` files (one document per file) and ``.jsonl`` files (one document
  per line, the ``text_field`` key).

Order and splits are pure functions of (number of documents, seed, epoch, process):
:func:`split_holdout` keeps a fixed set of documents out of training (independent of the run
seed, so runs with different seeds evaluate on the same documents), :func:`epoch_order` is a
fresh permutation of the training documents per epoch, and :func:`process_share` gives one
process its strided share.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from jsae.errors import FileFormatError, JsaeError

HOLDOUT_SEED = 0x5A3E  # fixed: the held-out documents do not depend on the run seed


class DataSourceError(JsaeError, RuntimeError):
    """A text source that cannot be found, reached or read."""


class Documents(Protocol):
    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> str: ...


# ---- collections ----------------------------------------------------------------------


class ListDocuments:
    """Documents held in memory (tests, small corpora)."""

    def __init__(self, texts: Sequence[str], name: str = "list"):
        self.texts = list(texts)
        self.name = name

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[int(i)]


class TfdsDocuments:
    """A TFDS random-access data source (``ArrayRecordDataSource``) viewed as documents."""

    def __init__(self, data_source: Any, text_field: str = "text", name: str = "tfds"):
        self.ds = data_source
        self.text_field = text_field
        self.name = name

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> str:
        ex = self.ds[int(i)]
        if self.text_field not in ex:
            raise DataSourceError(
                f"{self.name}: examples have no field {self.text_field!r} "
                f"(fields: {', '.join(sorted(ex))}); set data.text_field"
            )
        v = ex[self.text_field]
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class FileDocuments:
    """Local ``.txt`` (one document per file) and ``.jsonl`` (one per line) files.

    Opening builds an index of (file, byte offset) so documents are read on demand.
    """

    def __init__(self, patterns: str | Sequence[str], text_field: str = "text"):
        if isinstance(patterns, str):
            patterns = [p for p in patterns.split(",") if p.strip()]
        files: list[str] = []
        for pat in patterns:
            pat = os.path.expanduser(pat.strip())
            if os.path.isdir(pat):
                hits = sorted(
                    glob.glob(os.path.join(pat, "**", "*.txt"), recursive=True)
                    + glob.glob(os.path.join(pat, "**", "*.jsonl"), recursive=True)
                )
            else:
                hits = sorted(glob.glob(pat, recursive=True))
            if not hits:
                raise DataSourceError(f"no text files match {pat!r} (data.path)")
            files.extend(hits)
        self.files = files
        self.text_field = text_field
        self.name = "files:" + ",".join(patterns)
        self._index: list[tuple[int, int]] = []  # (file number, byte offset or -1 = whole file)
        for fi, f in enumerate(files):
            if f.endswith((".jsonl", ".json")):
                with open(f, "rb") as fh:
                    off = 0
                    for n, line in enumerate(fh, 1):
                        if line.strip():
                            _utf8(line, f"{f}:{n}", off)
                            self._index.append((fi, off))
                        off += len(line)
            elif f.endswith(".txt"):
                self._index.append((fi, -1))
            else:
                raise DataSourceError(f"{f}: expected a .txt or .jsonl file")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> str:
        fi, off = self._index[int(i)]
        path = self.files[fi]
        if off < 0:
            return read_text_file(path)
        with open(path, "rb") as fh:
            fh.seek(off)
            line = fh.readline()
        where = f"{path} (the line at byte {off})"
        try:
            rec = json.loads(_utf8(line, where, 0))
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each "
                                  f"line of a .jsonl file is one JSON object") from e
        if isinstance(rec, str):
            return rec
        if not isinstance(rec, dict):
            raise FileFormatError(f"{where}: a JSON {type(rec).__name__}; expected an object with "
                                  f"a {self.text_field!r} string (or a string)")
        if self.text_field not in rec:
            raise DataSourceError(f"{path}: a line has no field {self.text_field!r}")
        return str(rec[self.text_field])


def _utf8(raw: bytes, where: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(
            f"{where}: not UTF-8 text ({e.reason} at byte {offset + e.start}); convert it to "
            "UTF-8 first (e.g. `iconv -f latin1 -t utf-8`)") from e


def read_text_file(path) -> str:
    """The whole of a text file, which must be UTF-8: bytes that are not are refused in one line
    naming the file and the byte (a :class:`~jsae.errors.FileFormatError`), never replaced."""
    with open(path, "rb") as fh:
        raw = fh.read()
    return _utf8(raw, str(path), 0)


class StreamDocuments:
    """An iterable (not random-access) stream of documents, e.g. HF ``datasets`` streaming.

    Positions are counted in documents from the start of the stream, so resuming replays
    (skips) the documents already read.
    """

    random_access = False

    def __init__(self, make_iter, name: str, text_field: str = "text"):
        self._make_iter = make_iter
        self.name = name
        self.text_field = text_field

    def iterate(self, start: int = 0) -> Iterator[tuple[int, str]]:
        for i, ex in enumerate(self._make_iter()):
            if i < start:
                continue
            v = ex[self.text_field] if isinstance(ex, dict) else ex
            yield i, (v.decode("utf-8") if isinstance(v, bytes) else str(v))


# ---- order, holdout, process shares ----------------------------------------------------


def split_holdout(n_docs: int, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train document ids, held-out document ids), both sorted. Independent of the run seed.

    At least one document is held out when ``holdout_fraction > 0`` and there are 2+ docs.
    """
    if n_docs <= 0:
        raise DataSourceError("the text source has no documents")
    n_hold = int(round(n_docs * holdout_fraction))
    if holdout_fraction > 0 and n_docs > 1:
        n_hold = min(max(n_hold, 1), n_docs - 1)
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n_docs)
    hold = np.sort(perm[:n_hold])
    train = np.sort(perm[n_hold:])
    return train, hold


def is_holdout(i: int, holdout_fraction: float) -> bool:
    """Holdout membership for streams of unknown length (a hash of the index)."""
    if holdout_fraction <= 0:
        return False
    h = (int(i) * 0x9E3779B97F4A7C15 + HOLDOUT_SEED) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 29
    h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 32
    return (h % 1_000_000) < holdout_fraction * 1_000_000


def epoch_order(doc_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``doc_ids``, different for each epoch, fixed by (seed, epoch)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0xD0C5])
    return np.asarray(doc_ids)[rng.permutation(len(doc_ids))]


def process_share(ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """The strided share of one process: ids[p::P]. Shares are disjoint and cover ``ids``."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return np.asarray(ids)[process_index::process_count]


LAZY_ABOVE = 1 << 22  # collections with more documents use lazy orders (no O(n) arrays)

_M64 = 0xFFFFFFFFFFFFFFFF


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A seeded bijection of ``[0, n)`` evaluated per index in O(1) memory: a 4-round
    Feistel network on the smallest even-bit power of two >= n, with cycle walking."""

    def __init__(self, n: int, key: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self.half, self.mask = bits // 2, (1 << (bits // 2)) - 1
        self.keys = [_mix64((int(key) & _M64) ^ (r * 0x632BE59BD9B4E019)) for r in range(4)]

    def __len__(self) -> int:
        return self.n

    def _once(self, x: int) -> int:
        l, r = x >> self.half, x & self.mask
        for k in self.keys:
            l, r = r, l ^ (_mix64(r ^ k) & self.mask)
        return (l << self.half) | r

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._once(int(i))
        while x >= self.n:  # cycle walking: stays a bijection on [0, n)
            x = self._once(x)
        return x


class _Strided:
    """``seq[start::step]`` of a lazy sequence."""

    def __init__(self, seq, start: int, step: int):
        self.seq, self.start, self.step = seq, start, step

    def __len__(self) -> int:
        return max(0, (len(self.seq) - self.start + self.step - 1) // self.step)

    def __getitem__(self, j: int) -> int:
        return self.seq[self.start + int(j) * self.step]


class DocumentStream:
    """This process's documents, epoch after epoch, with a resumable position.

    ``split='train'``: the non-held-out documents, reshuffled each epoch from ``seed``,
    infinite unless ``epochs`` is given. ``split='holdout'``: the held-out documents in a
    fixed order, one pass. Position = ``(epoch, pos)`` within this process's share.

    Above ``LAZY_ABOVE`` documents (or with ``lazy=True``) nothing of size O(n) is built:
    held-out documents are chosen by a hash of their index (:func:`is_holdout`), each epoch's
    order is a :class:`FeistelPermutation`, and ``pos`` indexes this process's share of that
    permutation (held-out documents in it are skipped).
    """

    def __init__(
        self,
        docs: Documents,
        *,
        split: str = "train",
        holdout_fraction: float = 0.0,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        epochs: int | None = None,
        lazy: bool | None = None,
    ):
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        self.docs = docs
        self.split = split
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.holdout_fraction = holdout_fraction
        self.epochs = 1 if split == "holdout" else epochs
        self.random_access = getattr(docs, "random_access", True)
        self.lazy = False
        if self.random_access:
            n = len(docs)
            self.lazy = n > LAZY_ABOVE if lazy is None else bool(lazy)
            if self.lazy:
                if n < process_count or (split == "holdout" and holdout_fraction <= 0):
                    raise DataSourceError(
                        f"{docs.name}: no {split} documents for {process_count} processes"
                    )
            else:
                train, hold = split_holdout(n, holdout_fraction)
                self._ids = train if split == "train" else hold
                if len(self._ids) < process_count:
                    raise DataSourceError(
                        f"{docs.name}: {len(self._ids)} {split} documents for {process_count} processes"
                    )
        self._cache: dict[int, np.ndarray] = {}

    def order(self, epoch: int):
        """Document ids this process reads in ``epoch`` (an array, or a lazy sequence)."""
        if self.lazy:
            key = _mix64(((int(self.seed) & 0xFFFFFFFF) << 32) ^ int(epoch) ^ 0xD0C5)
            perm = FeistelPermutation(len(self.docs), key)
            return _Strided(perm, self.process_index, self.process_count)
        ids = self._ids if self.split == "holdout" else epoch_order(self._ids, self.seed, epoch)
        return process_share(ids, self.process_index, self.process_count)

    def _order_cached(self, epoch: int):
        if epoch not in self._cache:
            self._cache = {epoch: self.order(epoch)}
        return self._cache[epoch]

    def iterate(self, epoch: int = 0, pos: int = 0) -> Iterator[tuple[int, int, str]]:
        """Yield ``(epoch, pos, text)`` from the given position on."""
        if not self.random_access or (self.lazy and self.split == "holdout"):
            yield from self._iterate_stream(epoch, pos)
            return
        while self.epochs is None or epoch < self.epochs:
            order = self._order_cached(epoch)
            while pos < len(order):
                i = int(order[pos])
                if not (self.lazy and is_holdout(i, self.holdout_fraction)):
                    yield epoch, pos, self.docs[i]
                pos += 1
            epoch, pos = epoch + 1, 0

    def _iterate_stream(self, epoch: int, pos: int) -> Iterator[tuple[int, int, str]]:
        # pos counts this process's documents of this split in stream order.
        if self.random_access:  # a lazy holdout split: the documents in index order
            docs = self.docs

            def items():
                for i in range(len(docs)):
                    if is_holdout(i, self.holdout_fraction):
                        yield i, docs[i]
        else:

            def items():
                return self.docs.iterate()

        while self.epochs is None or epoch < self.epochs:
            k = 0
            for i, text in items():
                if is_holdout(i, self.holdout_fraction) != (self.split == "holdout"):
                    continue
                if i % self.process_count != self.process_index:
                    continue
                if k >= pos:
                    yield epoch, k, text
                k += 1
            if k == 0:
                raise DataSourceError(f"{self.docs.name}: no {self.split} documents")
            epoch, pos = epoch + 1, 0


# ---- opening a source by name -----------------------------------------------------------


def _with_timeout(fn, seconds: float, what: str):
    """Run ``fn()`` in a daemon thread; DataSourceError if it takes longer than ``seconds``
    (a hung network call is abandoned, and does not keep the process alive at exit)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"jsae-open:{what}")
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise DataSourceError(f"{what}: no answer within {seconds:.0f} s (offline?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _check_reachable(url: str, what: str, timeout: float = 5.0) -> None:
    """DataSourceError at once if ``url``'s host does not resolve or accept a connection
    (instead of a client library retrying for minutes)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise DataSourceError(f"{what}: cannot reach {host} ({e}); no network?") from None


def open_hf_stream(name: str, split: str = "train", text_field: str = "text") -> StreamDocuments:
    """A Hugging Face ``datasets`` dataset in streaming mode (``pip install jsae[hf]``)."""
    try:
        import datasets  # noqa: F401
    except ImportError as e:
        raise DataSourceError(
            f"hf:{name} needs the 'datasets' package: pip install 'jsae[hf]'"
        ) from e
    path, _, config = name.partition(":")  # hf:ORG/NAME[:CONFIG]
    if not os.path.isdir(path):  # a hub dataset: check that the hub answers at all, fast
        _check_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), f"hf:{name}")

    def make_iter():
        import datasets

        return datasets.load_dataset(path, config or None, split=split, streaming=True)

    # Fail fast: opening the stream (and its first example) must answer within a minute.
    def probe():
        return next(iter(make_iter()))

    try:
        first = _with_timeout(probe, float(os.environ.get("JSAE_OPEN_TIMEOUT", 60)), f"hf:{name}")
    except DataSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to open is reported the same way
        raise DataSourceError(f"hf:{name} (split {split!r}) cannot be opened: {e}") from e
    if isinstance(first, dict) and text_field not in first:
        raise DataSourceError(
            f"hf:{name}: examples have no field {text_field!r} (fields: {', '.join(first)})"
        )
    return StreamDocuments(make_iter, name=f"hf:{name}", text_field=text_field)


def open_documents(data_cfg: Any) -> Documents:
    """The document collection a ``DataConfig`` names (``data.dataset``, ``data.path`` ...)."""
    dataset = data_cfg.dataset
    if dataset == "offline":
        from jsae.data.tfds_offline import offline_corpus

        return TfdsDocuments(offline_corpus(data_dir=data_cfg.data_dir), "text", "offline")
    if dataset.startswith("tfds:"):
        from jsae.data.tfds_offline import open_tfds

        name = dataset[len("tfds:") :]
        ds = open_tfds(name, data_dir=data_cfg.data_dir, split=data_cfg.split)
        return TfdsDocuments(ds, data_cfg.text_field, dataset)
    if dataset.startswith("hf:"):
        return open_hf_stream(dataset[3:], data_cfg.split, data_cfg.text_field)
    if dataset == "files":
        if not data_cfg.path:
            raise DataSourceError("data.dataset 'files' needs data.path (a glob of .txt/.jsonl)")
        return FileDocuments(data_cfg.path, data_cfg.text_field)
    raise DataSourceError(
        f"data.dataset {dataset!r}: expected offline, tfds:NAME, hf:NAME or files"
    )
