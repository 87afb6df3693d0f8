"""A deterministic sample of the offline text corpus, packed into token contexts for analysis.

Documents come from the English Wikipedia vital-article summaries (and, optionally, the State
of the Union speeches) that the offline default ships; with other corpora, pass any list of
texts to :func:`pack_texts`.
"""

from __future__ import annotations

import json

import numpy as np


def offline_texts(n_docs: int | None = None, *, seed: int = 0, sotu: bool = False) -> list[str]:
    """Up to ``n_docs`` documents of the offline corpus, in a fixed pseudo-random order."""
    from jsae.data.tfds_offline import offline_corpus_files

    files = offline_corpus_files()
    with open(files["wikipedia"], encoding="utf-8") as fh:
        data = json.load(fh)
    recs = data.values() if isinstance(data, dict) else data
    texts = [str(r.get("extract") or r.get("text") or "").strip() if isinstance(r, dict) else str(r)
             for r in recs]
    if sotu:
        for path in files["sotu"]:
            with open(path, encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read().strip())
    texts = [t for t in texts if t]
    order = np.random.default_rng(seed).permutation(len(texts))
    if n_docs is not None:
        order = order[:n_docs]
    return [texts[i] for i in order]


def pack_texts(tokenizer, texts: list[str], context_length: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [N, T], mask [N, T])``: documents separated by BOS and packed into contexts that
    each start with BOS; the mask is False on BOS and padding."""
    from jsae.data.packing import pack_documents, tokenizer_fn

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return pack_documents(texts, tokenizer_fn(tokenizer), context_length,
                          bos_id=tokenizer.bos_id, pad_id=pad)


def corpus_contexts(tokenizer, n_contexts: int = 256, context_length: int = 64, *, seed: int = 0,
                    sotu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """About ``n_contexts`` packed contexts of the offline corpus (wiki summaries average
    ~110 tokens, so this reads ~``n_contexts * context_length / 100`` documents)."""
    n_docs = max(1, int(n_contexts * context_length / 90) + 1)
    tokens, mask = pack_texts(tokenizer, offline_texts(n_docs, seed=seed, sotu=sotu), context_length)
    return tokens[:n_contexts], mask[:n_contexts]
