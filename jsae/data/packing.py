"""Tokenise documents and pack them into fixed-length contexts.

The token stream is the concatenation, over documents in stream order, of
``[separator] + tokenize(document)`` (the separator defaults to BOS; ``None`` for none).
With ``prepend_bos`` every context is ``[BOS] + the next (T - 1) stream tokens``; when the next
stream token is a document-start BOS it *is* the context's BOS (no ``BOS BOS``). Without
``prepend_bos`` a context is the next ``T`` stream tokens. Long documents continue in the next
context; only the very last context of a finite stream is padded.

``mask`` is True where an SAE should train: never on padding, and not on BOS/separator
positions when ``exclude_bos`` (the default; BOS activations are huge attention sinks).

Position (``state()``) is ``{"epoch", "pos", "offset"}``: the next token to pack is token
``offset`` of this process's document ``pos`` of ``epoch`` (its stream tokens, separator
included). Restoring re-tokenises that one document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from jsae.data.text import DocumentStream


@dataclasses.dataclass
class PackedBatch:
    tokens: np.ndarray  # [B, T] int32
    mask: np.ndarray  # [B, T] bool, True = use this position for SAE training
    n_real: int  # rows holding text (the rest are all padding: end of a finite stream)
    start: dict  # packer state before the first token of this batch


def tokenizer_fn(tokenizer) -> Callable[[str], list[int]]:
    """``text -> ids`` without BOS, from a jsae.models tokenizer (``encode(text, add_bos)``)."""
    return lambda text: tokenizer.encode(text, add_bos=False)


def tokenizer_batch_fn(tokenizer) -> Callable[[list[str]], list[list[int]]] | None:
    """``texts -> ids lists`` without BOS (parallel in HF tokenizers), or None if unsupported."""
    if not hasattr(tokenizer, "encode_batch"):
        return None
    return lambda texts: tokenizer.encode_batch(list(texts), add_bos=False)


class Packer:
    def __init__(
        self,
        stream: DocumentStream,
        tokenize: Callable[[str], list[int]],
        *,
        context_length: int,
        bos_id: int | None,
        pad_id: int = 0,
        prepend_bos: bool = True,
        separator_id: int | None | str = "bos",
        exclude_bos: bool = True,
        tokenize_batch: Callable[[list[str]], list[list[int]]] | None = None,
        prefetch_docs: int = 32,
    ):
        if context_length < 2:
            raise ValueError("context_length must be >= 2")
        if prepend_bos and bos_id is None:
            raise ValueError(
                "data.prepend_bos: the tokenizer has no BOS token; set data.prepend_bos: false"
            )
        self.stream = stream
        self.tokenize = tokenize
        self.tokenize_batch = tokenize_batch
        self.prefetch_docs = max(int(prefetch_docs), 1) if tokenize_batch else 1
        self.T = int(context_length)
        self.bos_id = bos_id
        self.pad_id = int(pad_id)
        self.prepend_bos = prepend_bos
        self.sep = bos_id if separator_id == "bos" else separator_id
        self.exclude_bos = exclude_bos
        self.restore({"epoch": 0, "pos": 0, "offset": 0})

    # ---- position -----------------------------------------------------------------
    def state(self) -> dict:
        return {"epoch": int(self._epoch), "pos": int(self._pos), "offset": int(self._offset)}

    def restore(self, state: dict) -> None:
        self._epoch, self._pos, self._offset = state["epoch"], state["pos"], state["offset"]
        self._docs: Iterator | None = None
        self._ahead: list = []  # tokenised documents read ahead: (epoch, pos, ids, special)
        self._cur: np.ndarray | None = None  # stream tokens of document (epoch, pos)
        self._cur_special: np.ndarray | None = None
        self._done = False

    def _doc_tokens(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = list(ids)
        if not ids:
            return np.zeros(0, np.int32), np.zeros(0, bool)
        special = [False] * len(ids)
        if self.sep is not None:
            ids = [self.sep] + ids
            special = [True] + special
        return np.asarray(ids, np.int32), np.asarray(special, bool)

    def _load(self) -> bool:
        """Make self._cur the document at the current position with tokens left."""
        while self._cur is None or self._offset >= len(self._cur):
            if self._cur is not None:  # finished this document: move on
                self._cur = None
                self._pos += 1
                self._offset = 0
            if not self._ahead and not self._read_ahead():
                self._done = True
                return False
            self._epoch, self._pos, self._cur, self._cur_special = self._ahead.pop(0)
        return True

    def _read_ahead(self) -> bool:
        """Tokenise the next few documents (in one batch call when possible)."""
        if self._docs is None:
            self._docs = self.stream.iterate(self._epoch, self._pos)
        got = []
        for item in self._docs:
            got.append(item)
            if len(got) >= self.prefetch_docs:
                break
        if not got:
            return False
        texts = [t for _, _, t in got]
        if self.tokenize_batch is not None and len(texts) > 1:
            ids = self.tokenize_batch(texts)
        else:
            ids = [self.tokenize(t) for t in texts]
        for (epoch, pos, _), x in zip(got, ids):
            self._ahead.append((epoch, pos, *self._doc_tokens(x)))
        return True

    # ---- contexts -----------------------------------------------------------------
    def next_context(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens [T], mask [T]) or None when a finite stream is exhausted."""
        if self._done or not self._load():
            return None
        toks = np.full(self.T, self.pad_id, np.int32)
        special = np.zeros(self.T, bool)
        valid = np.zeros(self.T, bool)
        i = 0
        if self.prepend_bos:
            toks[0], special[0], valid[0] = self.bos_id, True, True
            i = 1
            # a document-start BOS right here serves as the context's BOS
            if self._cur_special[self._offset] and self._cur[self._offset] == self.bos_id:
                self._offset += 1
        while i < self.T:
            if not self._load():
                break
            n = min(self.T - i, len(self._cur) - self._offset)
            sl = slice(self._offset, self._offset + n)
            toks[i : i + n] = self._cur[sl]
            special[i : i + n] = self._cur_special[sl]
            valid[i : i + n] = True
            i += n
            self._offset += n
        mask = valid & ~special if self.exclude_bos else valid
        return toks, mask

    def next_batch(self, n: int) -> PackedBatch | None:
        """``n`` contexts (the last batch of a finite stream is padded with empty rows)."""
        start = self.state()
        toks = np.full((n, self.T), self.pad_id, np.int32)
        mask = np.zeros((n, self.T), bool)
        k = 0
        while k < n:
            c = self.next_context()
            if c is None:
                break
            toks[k], mask[k] = c
            k += 1
        if k == 0:
            return None
        return PackedBatch(toks, mask, k, start)


def pack_documents(
    texts: list[str], tokenize: Callable[[str], list[int]], context_length: int, **kw
) -> tuple[np.ndarray, np.ndarray]:
    """Pack a list of documents (in order, one pass): (tokens [N, T], mask [N, T])."""
    from jsae.data.text import ListDocuments

    stream = DocumentStream(ListDocuments(texts), split="train", epochs=1)
    stream.order = lambda epoch: np.arange(len(texts))  # keep the given order
    p = Packer(stream, tokenize, context_length=context_length, **kw)
    rows = []
    while (c := p.next_context()) is not None:
        rows.append(c)
    if not rows:
        return np.zeros((0, context_length), np.int32), np.zeros((0, context_length), bool)
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
