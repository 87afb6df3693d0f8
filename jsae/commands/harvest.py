"""`jsae harvest CONFIG --out DIR [--tokens N]`: run the LM over text once and store the
activations of every hook in ``model.hooks`` on disk, for ``data.source: cache`` runs."""

from __future__ import annotations

import argparse

from jsae.commands._args import positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "harvest",
        help="harvest LM activations from text into an on-disk cache (resumable)",
        description=(
            "Run the model of CONFIG over its text source and write the activations of "
            "model.hooks as sharded safetensors plus manifest.json under --out (a local path or "
            "gs://...). Rerunning the same command resumes an interrupted harvest. Train from it "
            "with `--set data.source=cache --set data.path=DIR`."
        ),
    )
    p.add_argument("config", help="YAML config file (model.*, data.* as for data.source: text)")
    p.add_argument("--out", required=True, help="cache directory (local path or gs://...)")
    p.add_argument(
        "--tokens",
        type=positive_int,
        default=None,
        help="training tokens to harvest (default: the config's train.tokens or steps x batch)",
    )
    p.add_argument(
        "--eval-tokens", type=positive_int, default=None, help="held-out tokens (default: eval.tokens)"
    )
    p.add_argument("--shard-rows", type=positive_int, default=None, help="tokens per shard (default 32768)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.hooks=[blocks.3.hook_resid_post] (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true", help="start over even if DIR holds a cache")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host harvest: call jax.distributed.initialize() first and run the same "
        "command on every host; each harvests its own documents and 1/N of the tokens into "
        "its own shards of DIR (a shared path such as gs://...)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _partial_cache(path) -> bool:
    """A harvest interrupted before its first manifest: only its split folders are there."""
    return all(p.name in ("train", "eval") or p.name.startswith(".") for p in path.iterdir())


def run(args) -> int:
    import time

    import jax

    if args.distributed:
        jax.distributed.initialize()
    from jsae import config as config_lib

    cfg = config_lib.load(args.config, args.overrides)
    if cfg.data.source != "text":
        raise config_lib.ConfigError(
            f"config key 'data.source': {cfg.data.source!r}; jsae harvest runs the LM over "
            "text, so it needs data.source: text (add --set data.source=text)")
    from jsae import outputs

    outputs.claim_folder(args.out, "jsae harvest", overwrite=args.overwrite, cache_ok=True,
                         recognise=lambda p: outputs.is_cache_dir(p) or _partial_cache(p))
    from jsae.data.cache import harvest_to_cache

    t0 = time.time()
    man = harvest_to_cache(
        cfg,
        args.out,
        args.tokens,
        shard_rows=args.shard_rows,
        eval_tokens=args.eval_tokens,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    dt = time.time() - t0
    n_train = man["splits"]["train"]["rows"]
    n_eval = man["splits"]["eval"]["rows"]
    who = (
        f"process {jax.process_index()}/{jax.process_count()}: " if jax.process_count() > 1 else ""
    )
    print(
        f"jsae harvest: {who}{n_train} training + {n_eval} held-out tokens of "
        f"{', '.join(man['hooks'])} from {man['model']} in {args.out} ({dt:.1f} s)"
    )
    for h in man["hooks"]:
        s = man["stats"].get(h, {})
        if s:
            print(f"  {h}: mean |x| {s['mean_norm']:.3f}, norm_scale {s['norm_scale']:.4f}")
    return 0
