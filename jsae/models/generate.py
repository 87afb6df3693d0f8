"""Text generation with a KV cache: one jitted program runs the prefill and a `lax.while_loop` of
single-token decode steps (greedy, or temperature / top-p sampling), for a batch of left-padded
prompts, with interventions active in the prefill, the decode steps, or both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsae.models.config import TransformerConfig, parse_hook
from jsae.models.transformer import KVCache, merge_interventions, run, split_interventions

INTERVENE_ON = ("all", "prompt", "generated")


def _bucket(n: int, step: int) -> int:
    return -(-n // step) * step


def sample_next(logits: jax.Array, key, temperature, top_p, *, greedy: bool, use_top_p: bool) -> jax.Array:
    """logits [B, V] -> next token [B] (argmax when greedy; else temperature + nucleus sampling)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if use_top_p:
        srt = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        keep = before < top_p
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10, 11, 12))
def _generate_cached(
    cfg: TransformerConfig,
    params,
    tokens,  # [B, T0] left-padded
    mask,  # [B, T0]
    key,
    temperature,
    top_p,
    max_new: int,  # static buffer size (bucketed)
    greedy: bool,
    use_top_p: bool,
    static_fns,
    intervene_on: str,
    eos_id: int,
    dyn_fns=(),
    n_new=None,  # traced: tokens to generate (<= max_new)
):
    fns = merge_interventions(static_fns, dyn_fns)
    pre_fns = fns if intervene_on in ("all", "prompt") else None
    gen_fns = fns if intervene_on in ("all", "generated") else None
    B, T0 = tokens.shape
    cache = KVCache.init(cfg, B, T0 + max_new, params["embed"].dtype)
    logits, _, cache = run(cfg, params, tokens, attention_mask=mask, interventions=pre_fns, cache=cache, last_only=True)
    pos = jnp.sum(mask.astype(jnp.int32), axis=1)  # position of the first generated token
    out = jnp.full((B, max_new), -1, jnp.int32)
    done = jnp.zeros((B,), bool)

    n_new = max_new if n_new is None else n_new

    def cond(state):
        i, _, _, _, done, _, _ = state
        return (i < n_new) & ~jnp.all(done)

    def body(state):
        i, cache, logits, pos, done, out, key = state
        key, sub = jax.random.split(key)
        tok = sample_next(logits[:, -1], sub, temperature, top_p, greedy=greedy, use_top_p=use_top_p)
        tok = jnp.where(done, -1, tok)
        out = out.at[:, i].set(tok)
        done = done | (tok == eos_id)
        feed = jnp.maximum(tok, 0)[:, None]
        logits, _, cache = run(
            cfg, params, feed, positions=pos[:, None], interventions=gen_fns, cache=cache, last_only=True
        )
        return i + 1, cache, logits, pos + 1, done, out, key

    state = (jnp.zeros((), jnp.int32), cache, logits, pos, done, out, key)
    state = jax.lax.while_loop(cond, body, state)
    return state[5]


def _position_masked(fn: Callable, where: jax.Array) -> Callable:
    def masked(x):
        return jnp.where(where[:, :, None], fn(x), x)

    return masked


def generate_tokens(
    cfg: TransformerConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: Optional[jax.Array] = None,
    interventions: Optional[Mapping[str, Callable]] = None,
    intervene_on: str = "all",
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    use_cache: bool = True,
    pad_multiple: int = 16,
) -> np.ndarray:
    """Generate from token-id prompts. Returns `[B, max_new_tokens]` int32 ids, -1 after EOS.

    `use_cache=False` recomputes the whole sequence every step (a reference for tests; greedy only).
    """
    if intervene_on not in INTERVENE_ON:
        raise ValueError(f"intervene_on must be one of {INTERVENE_ON}; got {intervene_on!r}")
    for name in interventions or {}:
        parse_hook(name, cfg)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B = len(prompts)
    T0 = _bucket(max(len(p) for p in prompts), pad_multiple)
    tokens = np.full((B, T0), pad_id, np.int32)
    mask = np.zeros((B, T0), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, T0 - len(p) :] = p
        mask[i, T0 - len(p) :] = 1
    eos = -2 if eos_id is None else int(eos_id)
    if max_new_tokens <= 0:
        return np.zeros((B, 0), np.int32)
    if not use_cache:
        return _generate_uncached(cfg, params, tokens, mask, max_new_tokens, interventions, intervene_on, eos, pad_id)
    greedy = float(temperature) == 0.0
    if not greedy and key is None:
        key = jax.random.PRNGKey(0)
    if key is None:
        key = jax.random.PRNGKey(0)
    static, dyn = split_interventions(interventions)
    out = _generate_cached(
        cfg,
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        key,
        jnp.float32(temperature if not greedy else 1.0),
        jnp.float32(top_p),
        _bucket(int(max_new_tokens), 32),  # one compiled program serves up to 32 lengths
        greedy,
        bool(top_p < 1.0),
        static,
        intervene_on,
        eos,
        dyn,
        jnp.int32(max_new_tokens),
    )
    return np.asarray(out)[:, :max_new_tokens]


def _generate_uncached(cfg, params, tokens, mask, max_new, interventions, intervene_on, eos, pad_id):
    """Greedy generation by re-running the full forward each step (fixed shapes: one compile)."""
    from jsae.models.transformer import forward

    B, T0 = tokens.shape
    buf = np.concatenate([tokens, np.full((B, max_new), pad_id, np.int32)], axis=1)
    msk = np.concatenate([mask, np.zeros((B, max_new), np.int32)], axis=1)
    fns = None
    if interventions:
        is_prompt = jnp.asarray(np.arange(T0 + max_new)[None, :] < T0).repeat(B, 0)
        where = {"all": jnp.ones_like(is_prompt), "prompt": is_prompt, "generated": ~is_prompt}[intervene_on]
        fns = {k: _position_masked(f, where) for k, f in interventions.items()}
    out = np.full((B, max_new), -1, np.int32)
    done = np.zeros(B, bool)
    for i in range(max_new):
        logits = forward(cfg, params, buf, attention_mask=msk, interventions=fns).logits
        tok = np.asarray(jnp.argmax(logits[:, T0 + i - 1], axis=-1)).astype(np.int32)
        tok = np.where(done, -1, tok)
        out[:, i] = tok
        done |= tok == eos
        buf[:, T0 + i] = np.maximum(tok, 0)
        msk[:, T0 + i] = 1
        if done.all():
            break
    return out


def generate(
    model,
    prompts: str | Sequence[str],
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: Optional[jax.Array] = None,
    interventions: Optional[Mapping[str, Callable]] = None,
    intervene_on: str = "all",
    add_bos: Optional[bool] = None,
    stop_at_eos: bool = True,
) -> list[str]:
    """Continue each prompt; returns the generated continuations (without the prompts).

    `interventions` (hook name -> fn(act) -> act) act during generation: `intervene_on="all"` in the
    prompt and every new token, `"prompt"` in the prefill only, `"generated"` in decode steps only.
    `add_bos=None` follows the model's tokenizer (Gemma: yes; SmolLM2 / Qwen: no).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"model {model.name!r} has no tokenizer; use generate_tokens with ids")
    if add_bos is None:
        add_bos = getattr(tok, "add_bos_default", True)
    ids = tok.encode_batch(list(prompts), add_bos=add_bos)
    eos = tok.eos_id if tok.eos_id is not None else model.cfg.eos_id
    out = generate_tokens(
        model.cfg,
        model.params,
        ids,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        key=key,
        interventions=interventions,
        intervene_on=intervene_on,
        eos_id=eos if stop_at_eos else None,
        pad_id=model.pad_id,
    )
    texts = []
    for row in out:
        row = [int(t) for t in row if t >= 0]
        if stop_at_eos and eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(tok.decode(row))
    return texts
