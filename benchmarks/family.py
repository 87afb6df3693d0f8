"""Families (issue 29): N dictionaries from one pass vs N separate runs, from text and a cache.

    python benchmarks/family.py                   # Gemma 3 270M, layer 6, widths 1k 2k 4k
    python benchmarks/family.py --widths 1024,4096,16384 --steps 6 --batch 1024
    python benchmarks/family.py --no-cache        # only from text; --no-text: only the cache
    python benchmarks/family.py --smoke           # a toy random Gemma 3, every path, seconds
    python benchmarks/family.py --sets            # families of transcoder sets (every layer)

A family (`configs/family.yaml`: the config key ``family``) trains one dictionary per width from
the same batches: the LM runs once per batch (or the cache is read once) and every member's
jitted step takes that batch. The alternative is one run per width, each paying the LM (or the
cache read) itself. Both do the same training work: every width's dictionary sees ``--steps``
batches of ``--batch`` rows. Timed: the `jsae train` loop body (``source.next_batch`` +
``Trainer.step``: the LM forward or the cache read, the shuffle buffer, the jitted steps),
after one warm-up step that compiles. Prints wall time, tokens/s of training (rows each
dictionary trains on, per second) and the ratio family / separate runs.

From text the LM's share is paid once instead of N times; from a cache (harvested first, not
timed) only the read is shared, so the ratio there shows what remains: the SAE steps
themselves, which a family does not make cheaper.

``--smoke`` runs every path on a toy random Gemma 3 (benchmarks/toy.py), two small widths,
batch 64, one step, then (without ``--sets``) the family of transcoder sets from text: a test
that the benchmark still works (tests/test_benchmarks.py), not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))



class Contender:
    """A `jsae train` loop body (harvest or cache read + step) for one config, compiled by a
    first step (after the states' init, which reads ``sae.init_sample`` rows)."""

    def __init__(self, cfg, lm):
        import jax

        from jsae.data import make_source
        from jsae.data.lm_source import TextActivationSource
        from jsae.train.loop import Trainer

        self.source = (TextActivationSource(cfg, lm) if cfg.data.source == "text"
                       else make_source(cfg))
        self.trainer = Trainer(cfg, self.source)
        self.states = self.trainer.init_states()
        self.run(1)
        jax.block_until_ready(self.states)

    def run(self, n: int) -> float:
        import jax

        t0 = time.perf_counter()
        for _ in range(n):
            batch = self.source.next_batch(self.trainer.local_batch)
            self.states, m = self.trainer.step(self.states, batch)
        jax.block_until_ready((self.states, m))
        return time.perf_counter() - t0


def family_config(args, extra: list[str]):
    """configs/family.yaml at the benchmark's sizes, one member per width."""
    import yaml

    from jsae import config as config_lib

    raw = config_lib.apply_overrides(
        yaml.safe_load((ROOT / "configs" / "family.yaml").read_text()),
        [f"run_dir={args.tmp}/unused", f"train.batch_size={args.batch}",
         f"train.steps={args.steps + 1}", "train.tokens=null", "eval.at_tokens=null",
         f"model.batch_size={args.lm_batch}", f"model.dtype={args.dtype}",
         f"model.hooks=[blocks.{args.layer}.hook_resid_post]",
         f"data.context_length={args.context}", f"data.shuffle_buffer={args.batch}",
         f"sae.init_sample={args.batch}", f"sae.k={args.k}", "checkpoint.enabled=false",
         "mesh.data=1", "mesh.model=1", *extra])
    raw["family"] = [{"name": f"w{w}", "sae": {"d_sae": w}} for w in args.widths]
    return config_lib.from_dict(raw)


def set_family_config(args, extra: list[str]):
    """configs/transcoder_family.yaml at the benchmark's sizes: its members (three sets of
    per-layer transcoders of every layer), from text or a cache."""
    import yaml

    from jsae import config as config_lib

    raw = config_lib.apply_overrides(
        yaml.safe_load((ROOT / "configs" / "transcoder_family.yaml").read_text()),
        [f"run_dir={args.tmp}/unused", f"train.batch_size={args.batch}",
         f"train.steps={args.steps + 1}", "train.tokens=null",
         f"model.batch_size={args.lm_batch}", f"model.dtype={args.dtype}",
         f"data.context_length={args.context}", f"data.shuffle_buffer={args.batch}",
         f"sae.init_sample={args.batch}", "checkpoint.enabled=false",
         "mesh.data=1", "mesh.model=1", *extra])
    return config_lib.from_dict(raw)


def compare(args, cfg, lm, label: str) -> float:
    from jsae.config import member_config

    n = len(cfg.family)
    unit = "transcoder sets" if cfg.sae.layers is not None else "dictionaries"
    print(f"\n== {label}: one pass feeding {n} {unit} vs {n} runs ==")
    what = (f"{cfg.sae.architecture} sets of every layer" if cfg.sae.layers is not None
            else f"TopK k {args.k}")
    print(f"{what}, members {', '.join(m.name for m in cfg.family)}; train batch "
          f"{args.batch} rows, {args.steps} timed steps per contender (each dictionary trains "
          f"on {args.steps * args.batch} rows in both)", flush=True)
    one = Contender(cfg, lm)  # one contender alive at a time
    t_one = one.run(args.steps)
    del one
    gc.collect()
    t_sep = []
    for i in range(n):
        c = Contender(member_config(cfg, i), lm)
        t_sep.append(c.run(args.steps))
        del c
        gc.collect()
    rows = args.steps * args.batch
    print(f"family      {t_one:9.2f} s  {rows / t_one:10,.0f} tok/s")
    print(f"{n} runs      {sum(t_sep):9.2f} s  {rows / sum(t_sep):10,.0f} tok/s  (per run s: "
          f"{', '.join(f'{t:.2f}' for t in t_sep)})")
    ratio = sum(t_sep) / t_one
    print(f"ratio family / separate runs tokens_per_s ({label}): {ratio:.2f}x", flush=True)
    return ratio


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="an offline name or an HF folder")
    ap.add_argument("--layer", type=int, default=6, help="hook blocks.LAYER.hook_resid_post")
    ap.add_argument("--widths", default="1024,2048,4096", help="the members' d_sae")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per contender")
    ap.add_argument("--batch", type=int, default=1024, help="train batch (rows)")
    ap.add_argument("--lm-batch", type=int, default=8, help="LM sequences per forward")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--sets", action="store_true",
                    help="families of transcoder sets (configs/transcoder_family.yaml's members, "
                    "every layer's MLP) instead of SAEs at one layer (--widths, --layer, --k unused)")
    ap.add_argument("--no-text", action="store_true", help="skip the comparison from text")
    ap.add_argument("--no-cache", action="store_true", help="skip the comparison from a cache")
    ap.add_argument("--smoke", action="store_true",
                    help="toy random Gemma 3, widths 64,128, batch 64, one step")
    if ap.parse_known_args(argv)[0].smoke:  # smaller defaults; flags given still win
        ap.set_defaults(model=None, layer=3, widths="64,128", k=4, steps=1, batch=64,
                        lm_batch=2, context=32)
    args = ap.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",")]
    import toy
    from harvest import hardware
    from machine import load_avg, print_header

    import jsae.models as M

    args.tmp, args.model, data_sets = toy.model_or_toy(args.model, "jsae-familybench-")
    print_header(hardware())
    lm = M.load(args.model, dtype=args.dtype)
    where = "every layer's MLP" if args.sets else f"layer {args.layer}"
    print(f"model {lm.name}: {where}, d_model {lm.cfg.d_model}, dtype {args.dtype}", flush=True)
    make = set_family_config if args.sets else family_config
    cfg = make(args, data_sets)
    if not args.no_text:
        compare(args, cfg, lm, "from text")
    if not args.no_cache:
        from jsae.data.cache import harvest_to_cache

        cache = Path(args.tmp) / "cache"
        need = args.batch * (args.steps + 2)  # init sample + warm-up + timed steps
        t0 = time.perf_counter()
        harvest_to_cache(cfg, cache, need, model=lm, eval_tokens=args.batch, progress=False)
        print(f"\ncache of {need:,} rows harvested in {time.perf_counter() - t0:.1f} s (not "
              "timed below)")
        cached = make(args, [*data_sets, "data.source=cache", f"data.path={cache}"])
        compare(args, cached, lm, "from a cache")
    if args.smoke and not args.sets and not args.no_text:  # every path: the sets' too
        compare(args, set_family_config(args, data_sets), lm, "sets from text")
    print(f"\nload average after: {load_avg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
