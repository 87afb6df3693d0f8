"""Transcoder sets and cross-layer transcoders (issue 27): what one LM pass and one dictionary save.

    python benchmarks/transcoder_sets.py                  # Gemma 3 270M, all 18 layers
    python benchmarks/transcoder_sets.py --steps 4 --batch 512 --n-per-layer 128 --rounds 3
    python benchmarks/transcoder_sets.py --no-clt         # only (a); --no-sets: only (b)
    python benchmarks/transcoder_sets.py --smoke          # a toy random Gemma 3, every path, seconds

(a) **One pass vs one pass per layer.** `configs/transcoders_all.yaml` trains a transcoder for
every layer from a single LM pass (`sae.layers: all`). The alternative is one run per layer
(`sae.layers: [L]`), each with its own LM pass, which stops after layer L's hooks (the harvest
always stops at its deepest hook), so the separate passes cost about (L+1)/2 full passes, not L.
Both do the same training work: every layer's transcoder sees ``--steps`` batches of
``--batch`` rows. Timed: the `jsae train` loop body, harvest included (``source.next_batch`` +
``Trainer.step``: the LM forward, the shuffle buffer, the jitted step), after one warm-up step
that compiles. Prints tokens/s of training (rows each layer's transcoder trains on, per second)
and the ratio one pass / separate passes.

(b) **A CLT vs the same parameters as per-layer transcoders.** The CLT of `configs/clt.yaml`
(``--n-per-layer`` features per layer, TopK ``--clt-k`` per layer) against L independent
transcoders (`sae.architecture: transcoder`, TopK with the same k) whose d_sae is chosen so
that their parameters add up to the CLT's (the CLT's masked decoder entries are stored and
computed, so they count). Both are trained the way `jsae train` does (the Trainer's jitted,
donated step; the set's L transcoders in one jitted step) on the same random batch; timed in
interleaved rounds (median), and the peak memory of each compiled step as XLA reports it
(`compiled.memory_analysis()`: arguments + outputs - aliased + temporaries, as `jsae plan`).

``--smoke`` runs every path on a toy random Gemma 3 (benchmarks/toy.py: 8 layers, d_model 160):
three layers for (a), all eight for (b), batch 64, one step: a test that the benchmark still
works (tests/test_benchmarks.py), not a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _now() -> float:
    return time.perf_counter()



def _cfg(name: str, overrides: list[str]):
    from jsae import config as config_lib

    return config_lib.load(ROOT / "configs" / name, overrides)


# ---- (a) one LM pass for every layer vs one per layer --------------------------------------


class Contender:
    """A `jsae train` loop body (harvest + step) for one set config, compiled by a first step."""

    def __init__(self, cfg, lm):
        import jax

        from jsae.data.lm_source import TextActivationSource
        from jsae.train.loop import Trainer

        self.source = TextActivationSource(cfg, lm)
        self.trainer = Trainer(cfg, self.source)
        self.states = self.trainer.init_states()
        self.run(1)  # compiles the LM forward and the step
        jax.block_until_ready(self.states)

    def run(self, n: int) -> float:
        import jax

        t0 = _now()
        for _ in range(n):
            batch = self.source.next_batch(self.trainer.local_batch)
            self.states, m = self.trainer.step(self.states, batch)
        jax.block_until_ready((self.states, m))
        return _now() - t0


# TopK transcoders here: configs/transcoders_all.yaml ships JumpReLU ones, whose keys are cleared
TOPK = ("sae.jumprelu_sparsity=null", "sae.target_l0=null", "sae.jumprelu_threshold=null")


def bench_sets(args, lm, data_sets: list[str], layers: list[int]) -> float:
    import gc

    common = [f"run_dir={args.tmp}/unused", f"train.batch_size={args.batch}",
              f"train.steps={args.steps + 1}", "train.tokens=null",
              f"model.batch_size={args.lm_batch}", f"model.dtype={args.dtype}",
              f"data.context_length={args.context}", f"data.shuffle_buffer={args.batch}",
              f"sae.init_sample={args.batch}", f"sae.expansion={args.expansion}",
              "sae.architecture=skip_transcoder", *TOPK, f"sae.k={args.k}", "checkpoint.enabled=false", "mesh.data=1", "mesh.model=1",
              *data_sets]
    L = len(layers)
    print(f"\n== (a) one LM pass feeding {L} transcoders vs {L} passes feeding one each ==")
    print(f"skip transcoders, d_sae {args.expansion} x d_model, k {args.k}; train batch "
          f"{args.batch} rows, LM batch {args.lm_batch} x {args.context} tokens, "
          f"{args.steps} timed steps per contender (each layer's transcoder trains on "
          f"{args.steps * args.batch} rows in both)", flush=True)
    # One contender alive at a time: the separate runs' states would double the memory.
    one = Contender(_cfg("transcoders_all.yaml", [*common, f"sae.layers={layers}"]), lm)
    t_one = one.run(args.steps)
    harvested_one = one.source.tokens_harvested
    del one
    gc.collect()
    t_sep, harvested_sep = [], 0
    for layer in layers:
        c = Contender(_cfg("transcoders_all.yaml", [*common, f"sae.layers=[{layer}]"]), lm)
        t_sep.append(c.run(args.steps))
        harvested_sep += c.source.tokens_harvested
        del c
        gc.collect()
    rows = args.steps * args.batch
    tps_one, tps_sep = rows / t_one, rows / sum(t_sep)
    print(f"one pass    {t_one:9.2f} s  {tps_one:10,.0f} tok/s  (LM tokens run, warm-up "
          f"included: {harvested_one:,})")
    print(f"{L} passes   {sum(t_sep):9.2f} s  {tps_sep:10,.0f} tok/s  (LM tokens run: "
          f"{harvested_sep:,}; per layer s: {', '.join(f'{t:.2f}' for t in t_sep)})")
    ratio = tps_one / tps_sep
    print(f"ratio one pass / separate passes tokens_per_s: {ratio:.2f}x", flush=True)
    return ratio


# ---- (b) a CLT vs the same parameters as per-layer transcoders ----------------------------


class RandomSource:
    """Random rows for every hook of a set (an MLP input and output per layer)."""

    def __init__(self, hooks: list[str], d: int, seed: int = 0):
        import numpy as np

        self.hooks, self.d_in = list(hooks), {h: d for h in hooks}
        self._rng = np.random.default_rng(seed)

    def next_batch(self, n: int):
        return {h: self._rng.normal(size=(n, self.d_in[h])).astype("float32") for h in self.hooks}


class StepRunner:
    """The Trainer's jitted step on a fixed placed batch; its compiled memory analysis."""

    def __init__(self, cfg, n_layers: int, d: int):
        import jax

        from jsae import config as config_lib
        from jsae import parallel
        from jsae.train.loop import Trainer

        config_lib.resolve_layers(cfg, n_layers)
        src = RandomSource(cfg.model.hooks, d)
        self.trainer = Trainer(cfg, src)
        self.states = self.trainer.init_states()
        self.batch = {h: parallel.global_batch(v, self.trainer.mesh)
                      for h, v in src.next_batch(cfg.train.batch_size).items()}
        self.params = sum(int(leaf.size) for s in self.states.values()
                          for leaf in jax.tree.leaves(s.sae.params))
        step = self.trainer._compiled(self.states)
        mem = step.lower(self.states, self.batch).compile().memory_analysis()
        self.peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
        self.temp = mem.temp_size_in_bytes
        self.step = step
        self.run(1)

    def run(self, n: int) -> float:
        import jax

        t0 = _now()
        for _ in range(n):
            self.states, m = self.step(self.states, self.batch)
        jax.block_until_ready((self.states, m))
        return (_now() - t0) / n


def matching_d_sae(n_layers: int, n: int, d: int, clt_params: int) -> int:
    """d_sae of a plain transcoder (W_enc, W_dec, b_enc, b_dec; no skip) such that
    ``n_layers`` of them hold about ``clt_params`` parameters (a multiple of 8)."""
    per_layer = clt_params / n_layers  # = 2 d m + m + d
    return max(8, int(round((per_layer - d) / (2 * d + 1) / 8)) * 8)


def bench_clt(args, n_layers: int, d: int) -> float:
    MiB = 2 ** 20
    n = args.n_per_layer
    common = [f"run_dir={args.tmp}/unused", f"train.batch_size={args.batch}",
              "train.steps=1000", "train.tokens=null", f"sae.init_sample={args.batch}",
              "checkpoint.enabled=false", "mesh.data=1", "mesh.model=1", "sae.layers=all",
              "model.name=bench-random"]
    print(f"\n== (b) CLT step vs the same parameters as {n_layers} per-layer transcoders ==")
    clt = StepRunner(_cfg("clt.yaml", [*common, f"sae.d_sae={n_layers * n}",
                                       f"sae.k={args.clt_k}", "sae.activation=topk"]),
                     n_layers, d)
    m = matching_d_sae(n_layers, n, d, clt.params)
    tcs = StepRunner(_cfg("transcoders_all.yaml", [*common, *TOPK, "sae.architecture=transcoder",
                                                   "sae.expansion=null", f"sae.d_sae={m}",
                                                   f"sae.k={args.clt_k}"]), n_layers, d)
    print(f"CLT: {n} features per layer x {n_layers} layers, d_in {d}, TopK k {args.clt_k} per "
          f"layer, {clt.params:,} parameters; {n_layers} transcoders: d_sae {m} each, TopK k "
          f"{args.clt_k}, {tcs.params:,} parameters; batch {args.batch} rows, "
          f"{args.rounds} rounds x {args.clt_steps} steps", flush=True)
    times = {"clt": [], "transcoders": []}
    for _ in range(args.rounds):  # interleaved: load from other processes hits both alike
        times["clt"].append(clt.run(args.clt_steps))
        times["transcoders"].append(tcs.run(args.clt_steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, r in (("clt", clt), ("transcoders", tcs)):
        print(f"{name:<12s}{med[name] * 1e3:10.1f} ms/step  {args.batch / med[name]:10,.0f} tok/s"
              f"  peak {r.peak / MiB:9.1f} MiB (temp {r.temp / MiB:.1f} MiB)")
    ratio = med["transcoders"] / med["clt"]
    print(f"ratio clt / transcoders step tokens_per_s: {ratio:.2f}x")
    print(f"ratio clt / transcoders peak memory: {clt.peak / tcs.peak:.2f}x", flush=True)
    return ratio


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="an offline name or an HF folder")
    ap.add_argument("--layers", default="all", help="(a): 'all' or a list such as 0,6,12,17")
    ap.add_argument("--steps", type=int, default=4, help="(a): timed steps per contender")
    ap.add_argument("--batch", type=int, default=512, help="train batch (rows)")
    ap.add_argument("--lm-batch", type=int, default=4, help="(a): LM sequences per forward")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="(a): the LM's dtype")
    ap.add_argument("--expansion", type=int, default=2, help="(a): d_sae = expansion x d_model")
    ap.add_argument("--k", type=int, default=16, help="(a): TopK k of each transcoder")
    ap.add_argument("--n-per-layer", type=int, default=128, help="(b): CLT features per layer")
    ap.add_argument("--clt-k", type=int, default=8, help="(b): TopK k per layer")
    ap.add_argument("--rounds", type=int, default=3, help="(b): interleaved rounds")
    ap.add_argument("--clt-steps", type=int, default=2, help="(b): steps per round")
    ap.add_argument("--no-sets", action="store_true", help="skip (a)")
    ap.add_argument("--no-clt", action="store_true", help="skip (b)")
    ap.add_argument("--smoke", action="store_true",
                    help="toy random Gemma 3, 3 layers for (a), batch 64, one step: checks every path")
    if ap.parse_known_args(argv)[0].smoke:  # smaller defaults; flags given still win
        ap.set_defaults(model=None, layers="0,3,7", steps=1, batch=64, lm_batch=2, context=32,
                        n_per_layer=16, clt_k=2, k=4, rounds=1, clt_steps=1)
    args = ap.parse_args(argv)
    import toy
    from harvest import hardware
    from machine import load_avg, print_header

    import jsae.models as M

    args.tmp, args.model, data_sets = toy.model_or_toy(args.model, "jsae-tcbench-")
    print_header(hardware())
    lm = M.load(args.model, dtype=args.dtype)
    n_layers, d = lm.cfg.n_layers, lm.cfg.d_model
    print(f"model {lm.name}: {n_layers} layers, d_model {d}, dtype {args.dtype}", flush=True)
    layers = (list(range(n_layers)) if args.layers == "all"
              else [int(s) for s in args.layers.split(",")])
    if not args.no_sets:
        bench_sets(args, lm, data_sets, layers)
    del lm
    if not args.no_clt:
        bench_clt(args, n_layers, d)
    print(f"\nload average after: {load_avg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
