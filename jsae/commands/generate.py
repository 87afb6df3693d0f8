"""`jsae generate --model gemma-3-270m --prompt "The Golden Gate Bridge is"`: continue prompts with
a jsae LM port (KV cache, jitted decode loop)."""

from __future__ import annotations

import argparse

from jsae.commands._args import nonneg_float, nonneg_int, positive_int, probability


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a language model (greedy or sampled)",
        description=(
            "Load MODEL (an offline name such as gemma-3-270m, a .gguf file, an HF safetensors "
            "folder or a hub id) and print the continuation of each --prompt."
        ),
    )
    p.add_argument("--model", default="gemma-3-270m", help="model name or path (default: gemma-3-270m)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive_int, default=40, help="tokens to generate (default 40)")
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument("--show-prompt", action="store_true", help="print the prompt before its continuation")
    return p


def run(args) -> int:
    import sys
    import time

    import jax

    import jsae.models as M

    if args.max_new_tokens < 0:
        print("jsae generate: --max-new-tokens must be >= 0", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        lm = M.load(args.model, dtype=args.dtype)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"jsae generate: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    texts = M.generate(
        lm,
        list(args.prompt),
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        key=jax.random.PRNGKey(args.seed),
        add_bos=False if args.no_bos else None,  # None: what the model's tokenizer does
    )
    t2 = time.perf_counter()
    for prompt, text in zip(args.prompt, texts):
        print(prompt + text if args.show_prompt else text)
    print(
        f"[{lm.name}: loaded in {t1 - t0:.1f}s, generated {len(texts)}x{args.max_new_tokens} tokens "
        f"in {t2 - t1:.1f}s incl. compilation]",
        file=sys.stderr,
    )
    return 0
