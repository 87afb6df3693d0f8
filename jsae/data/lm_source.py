"""``TextActivationSource``: text -> tokens -> LM activations -> shuffled training batches.

Pipeline (per process): this process's share of the training documents in a seeded order
(:mod:`jsae.data.text`) -> packed contexts with BOS (:mod:`jsae.data.packing`) -> one LM
forward per ``model.batch_size`` contexts capturing every hook (:mod:`jsae.data.harvest`),
masked rows only -> :class:`~jsae.data.shuffle.ShuffleMixer` -> ``next_batch``.

Data position (``state()``) is the mixer's replay point: the packer position (epoch, document,
token offset) at the start of an LM batch, the row offset within it, the round and the rows
already emitted. ``restore`` rewinds the packer there and replays at most
``data.shuffle_buffer`` tokens of LM forwards, after which the batches are exactly those the
uninterrupted run would have produced (same machine and backend: the forward is
deterministic for a fixed batch composition, and the replay recreates the same LM batches).

Evaluation (``eval_batches``) reads the held-out documents, in a fixed order, unshuffled.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from jsae.config import resolve_layers
from jsae.data.harvest import Harvester, make_global_batch
from jsae.data.packing import Packer, tokenizer_batch_fn, tokenizer_fn
from jsae.data.shuffle import ShuffleMixer
from jsae.data.text import DataSourceError, DocumentStream, open_documents

__all__ = ["TextActivationSource", "make_global_batch"]


def _mix_seed(seed: int, process_index: int) -> int:
    return (int(seed) * 1_000_003 + int(process_index) * 7919 + 17) & 0x7FFFFFFF


class TextActivationSource:
    """ActivationSource over an LM run on text (``data.source: text``)."""

    def __init__(
        self,
        cfg,
        model,
        process_index: int = 0,
        process_count: int = 1,
        *,
        documents=None,
        forward=None,
    ):
        d = cfg.data
        self.cfg = cfg
        self.model = model
        self.process_index, self.process_count = process_index, process_count
        resolve_layers(cfg, model.cfg.n_layers)  # a set's hooks (sae.layers: all needs the depth)
        self.hooks = list(cfg.model.hooks)
        self.docs = documents if documents is not None else open_documents(d)
        self.harvester = Harvester(
            model, self.hooks, forward=forward, exclude_norm_outliers=d.exclude_norm_outliers
        )
        self.d_in = {h: int(model.cfg.d_model) for h in self.hooks}
        self.lm_batch = int(cfg.model.batch_size)
        tok = model.tokenizer
        self._tokenize = tokenizer_fn(tok)
        self._pack_kw = dict(
            context_length=d.context_length,
            bos_id=tok.bos_id,
            pad_id=tok.pad_id if tok.pad_id is not None else 0,
            prepend_bos=d.prepend_bos,
            exclude_bos=d.exclude_bos,
            tokenize_batch=tokenizer_batch_fn(tok),
        )
        self.stream = DocumentStream(
            self.docs,
            split="train",
            holdout_fraction=d.holdout_fraction,
            seed=cfg.seed,
            process_index=process_index,
            process_count=process_count,
        )
        self.packer = Packer(self.stream, self._tokenize, **self._pack_kw)
        self.mixer = ShuffleMixer(
            max(int(d.shuffle_buffer), 2), seed=_mix_seed(cfg.seed, process_index)
        )
        self._eval_cache: dict[int, dict[str, np.ndarray]] = {}
        self._pending = None  # (PackedBatch, device activations) dispatched ahead
        self.tokens_harvested = 0  # LM tokens run through the model (including replays)

    # ---- training stream ------------------------------------------------------------
    def _dispatch(self):
        """Pack the next LM batch and start its forward (asynchronously): (step, device acts)."""
        step = self.packer.next_batch(self.lm_batch)
        if step is None:
            return None
        return step, self.harvester.activations(step.tokens)

    def _harvest_step(self) -> bool:
        # One LM batch of lookahead: the next forward is queued before this one's results are
        # copied to the host, so packing/tokenising and device compute overlap. Positions are
        # those recorded with each batch, so the lookahead never changes what state() says.
        if self._pending is None:
            self._pending = self._dispatch()
        cur = self._pending
        if cur is None:  # a finite stream ran out
            self.mixer.finish()
            return False
        self._pending = self._dispatch()
        step, acts = cur
        rows = self.harvester.select(acts, step.mask)
        self.tokens_harvested += step.tokens.size
        self.mixer.push(rows, step.start)
        return True

    def next_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """``batch_size`` rows of this process (the trainer passes its local batch size)."""
        while True:
            b = self.mixer.pop(batch_size)
            if b is not None and len(b[self.hooks[0]]) == batch_size:
                return b
            if b is not None or not self._harvest_step():
                raise RuntimeError(f"{self.docs.name}: the text stream ended")

    # ---- evaluation -----------------------------------------------------------------
    def _eval_rows(self, n_tokens: int) -> dict[str, np.ndarray]:
        for n, rows in self._eval_cache.items():
            if n >= n_tokens:
                return {h: r[:n_tokens] for h, r in rows.items()}
        kw = dict(
            holdout_fraction=self.cfg.data.holdout_fraction,
            seed=self.cfg.seed,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        try:
            stream = DocumentStream(self.docs, split="holdout", **kw)
        except DataSourceError:  # no held-out documents (data.holdout_fraction: 0)
            warnings.warn(
                "data.holdout_fraction leaves no held-out documents: evaluating on training text",
                stacklevel=2,
            )
            stream = DocumentStream(self.docs, split="train", epochs=1, **kw)
        packer = Packer(stream, self._tokenize, **self._pack_kw)
        parts, have, ctx = [], 0, []
        while have < n_tokens:
            step = packer.next_batch(self.lm_batch)
            if step is None:
                break
            rows = self.harvester(step.tokens, step.mask)
            parts.append(rows)
            ctx.append((np.asarray(step.tokens, np.int32), self.harvester.last_kept))
            have += len(rows[self.hooks[0]])
        # the contexts behind the rows (tokens [N, T], row positions [N, T]), for the cache
        self.eval_contexts = tuple(np.concatenate(c) for c in zip(*ctx)) if ctx else None
        rows = {h: np.concatenate([p[h] for p in parts])[:n_tokens] for h in self.hooks}
        if n_tokens * sum(self.d_in.values()) * 4 <= 1 << 30:  # keep up to 1 GiB
            self._eval_cache = {n_tokens: rows}
        return rows

    def eval_batches(self, n_tokens: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Held-out tokens (documents never trained on), in a fixed order."""
        rows = self._eval_rows(n_tokens)
        n = len(rows[self.hooks[0]])
        for s in range(0, n, batch_size):
            yield {h: r[s : s + batch_size] for h, r in rows.items()}

    # ---- position -------------------------------------------------------------------
    def _signature(self) -> dict[str, Any]:
        d = self.cfg.data
        return {
            "dataset": d.dataset,
            "n_docs": len(self.docs) if hasattr(self.docs, "__len__") else None,
            "hooks": self.hooks,
            "context_length": d.context_length,
            "lm_batch": self.lm_batch,
            "process": [self.process_index, self.process_count],
        }

    def state(self) -> dict:
        return {"kind": "text", "mixer": self.mixer.state(), "source": self._signature()}

    def restore(self, state: dict) -> None:
        if state.get("kind") != "text":
            raise ValueError(
                f"saved data position is for a {state.get('kind')!r} source, but data.source is 'text'"
            )
        sig, now = state.get("source", {}), self._signature()
        changed = [k for k in now if k in sig and sig[k] != now[k]]
        if changed:
            raise ValueError(
                "cannot resume the text stream exactly: "
                + ", ".join(f"{k} {sig[k]!r} -> {now[k]!r}" for k in changed)
            )
        replay = self.mixer.restore(state["mixer"])
        self._pending = None
        self.packer.restore(replay["pos"] if replay else {"epoch": 0, "pos": 0, "offset": 0})
