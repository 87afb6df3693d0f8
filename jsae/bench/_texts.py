"""Texts through the LM and the dictionary at one hook, reduced per text on the device.

Shared by the measures that need one summary row per text (pooled activations for probing, the
code of every feature over a word's tokens for the concept lexicon): texts are tokenised (BOS
first, truncated to ``context_length``), sorted by length and right-padded to a multiple of
``bucket`` tokens so only a few shapes compile; a jitted ``reduce(sae, acts [B, T, D],
mask [B, T]) -> {name: [B, ...]}`` turns each batch into rows, and the rows come back in input
order as NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def tokenize(tokenizer, texts: Sequence[str], context_length: int) -> list[np.ndarray]:
    """Token ids per text (BOS first where the tokenizer has one), cut to ``context_length``."""
    ids = (tokenizer.encode_batch(list(texts)) if hasattr(tokenizer, "encode_batch")
           else [tokenizer.encode(t) for t in texts])
    return [np.asarray(x, np.int32)[:context_length] for x in ids]


def special_ids(tokenizer) -> list[int]:
    """BOS, EOS and padding ids: never counted in a text's summary (as SAEBench masks them)."""
    return [i for i in {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} if i is not None]


def reduce_texts(run, ids: Sequence[np.ndarray], masks: Sequence[np.ndarray], reduce: Callable, *,
                 batch_size: int = 16, bucket: int = 16, desc: str = "texts") -> dict[str, np.ndarray]:
    """``reduce`` over every text: ``{name: [N, ...]}`` in the order of ``ids``.

    ``ids[i] [T_i]`` token ids, ``masks[i] [T_i]`` which positions ``reduce`` may count (padding is
    always masked). ``run`` supplies ``model`` (cfg, params, tokenizer), ``sae`` and ``hook``."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from jsae.models.transformer import forward

    model, n = run.model, len(ids)
    if n == 0:
        raise ValueError("no texts to run")
    pad = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
    order = np.argsort([len(x) for x in ids], kind="stable")
    parts: list[dict] = []
    with tqdm(total=n, desc=desc, unit="text", leave=False) as bar:
        for b in range(0, n, batch_size):
            rows = order[b: b + batch_size]
            T = -(-max(len(ids[i]) for i in rows) // bucket) * bucket
            tokens = np.full((batch_size, T), pad, np.int32)  # the last batch is padded with masked rows
            mask = np.zeros((batch_size, T), bool)
            for j, i in enumerate(rows):
                tokens[j, : len(ids[i])] = ids[i]
                mask[j, : len(ids[i])] = masks[i]
            acts = forward(model.cfg, model.params, jnp.asarray(tokens), capture=(run.hook,),
                           stop_after_capture=True).activations[run.hook]
            out = jax.device_get(reduce(run.sae, acts, jnp.asarray(mask)))
            parts.append({k: np.asarray(v)[: len(rows)] for k, v in out.items()})
            bar.update(len(rows))
    inv = np.empty(n, np.int64)
    inv[order] = np.arange(n)
    return {k: np.concatenate([p[k] for p in parts])[inv] for k in parts[0]}
