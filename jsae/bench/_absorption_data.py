"""The words and prompts of the absorption measure, and the LM's activations on them.

Words are the model's own single-token words (SAEBench's ``get_alpha_tokens``): every vocabulary
entry that, decoded alone, is ASCII letters with at most one leading space. A word is asked about
in SAEBench's in-context form: ten other words with their answers, then the word::

    \\n{w1} has the first letter: W\\n...\\n{w10} has the first letter: W\\n{word} has the first letter:

and the activation is read at the word's own token, the 6th from the end.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import numpy as np

LETTERS = string.ascii_lowercase
_ALPHA = frozenset(string.ascii_letters)
TEMPLATE = "{word} has the first letter:"
TOKEN_POS = -6  # the word's token in TEMPLATE (" has", " the", " first", " letter", ":" follow)
ICL_EXAMPLES = 10


def alpha_words(tokenizer) -> list[str]:
    """Every vocabulary entry that decodes to ASCII letters (optionally after one space), in
    id order, as SAEBench's ``get_alpha_tokens``: a SentencePiece ``▁`` piece whose decoded
    form lost its space gets it back."""
    n = tokenizer.vocab_size
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        texts = backend.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
    else:
        texts = [tokenizer.decode([i]) for i in range(n)]
    out = []
    for i, w in enumerate(texts):
        piece = tokenizer.id_to_token(i) or ""
        if piece.startswith("▁") and not w.startswith(" "):
            w = " " + w
        core = w[1:] if w.startswith(" ") else w
        if core and all(ch in _ALPHA for ch in core):
            out.append(w)
    return list(dict.fromkeys(out))  # two ids may decode alike: one word


def first_letter(word: str) -> str:
    """``" C"`` for ``"cat"`` / ``" cat"`` (SAEBench's answer format)."""
    return " " + [ch for ch in word.strip() if ch.isalpha()][0].upper()


def own_token(tokenizer, word: str) -> int:
    """The word's id when it encodes alone to one token, else -1."""
    ids = tokenizer.encode(word, add_bos=False)
    return ids[0] if len(ids) == 1 else -1


def letter_index(word: str) -> int:
    return LETTERS.index(first_letter(word).strip().lower())


def icl_prompt(word: str, examples: Sequence[str], rng: np.random.Generator, *,
               n_examples: int = ICL_EXAMPLES, template: str = TEMPLATE) -> str:
    """SAEBench's ``create_icl_prompt`` (separator ``\\n``, also before the first example):
    ``n_examples`` distinct words drawn from ``examples`` (redrawn while the word is among them)."""
    n = min(n_examples, len(examples))
    for _ in range(1000):
        pick = [examples[i] for i in rng.choice(len(examples), n, replace=False)]
        if word not in pick:
            break
    else:
        raise ValueError(f"no in-context examples without {word!r} in 1000 draws")
    lines = [template.format(word=ex) + first_letter(ex) for ex in pick]
    return "\n" + "\n".join([*lines, template.format(word=word)])


def hook_activations(model, hook: str, prompts: Sequence[str], *, position: int = TOKEN_POS,
                     batch_size: int = 32, progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``([N, d_model], [N])``: activations at ``hook`` on the token ``position`` from each
    prompt's own end (the BOS prepended as the model's tokenizer does), and the token id read
    there. Prompts are right-padded to a multiple of 16 tokens so that few shapes compile; the
    forward stops at the hook."""
    import jax.numpy as jnp

    from jsae.models.transformer import forward

    tok = model.tokenizer
    ids = tok.encode_batch(list(prompts)) if hasattr(tok, "encode_batch") else [tok.encode(p) for p in prompts]
    pad = tok.pad_id if tok.pad_id is not None else 0
    out = np.zeros((len(ids), model.cfg.d_model), np.float32)
    read = np.array([x[position] if len(x) >= -position else -1 for x in ids], np.int64)
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths share a batch
    for b in range(0, len(ids), batch_size):
        rows = order[b:b + batch_size]
        T = -(-max(len(ids[i]) for i in rows) // 16) * 16
        tokens = np.full((batch_size, T), pad, np.int32)
        at = np.zeros(batch_size, np.int32)
        for j, i in enumerate(rows):
            if len(ids[i]) < -position:
                raise ValueError(f"prompt {i} has {len(ids[i])} tokens; position {position} is outside it")
            tokens[j, :len(ids[i])] = ids[i]
            at[j] = len(ids[i]) + position
        acts = forward(model.cfg, model.params, jnp.asarray(tokens), capture=(hook,),
                       stop_after_capture=True).activations[hook]
        out[rows] = np.asarray(acts[jnp.arange(batch_size), jnp.asarray(at)], np.float32)[:len(rows)]
        if progress is not None:
            progress(len(rows))
    return out, read

