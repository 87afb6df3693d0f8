"""Atlas speed: the streaming pass next to a plain harvest over the same contexts, and the time
and memory of decoder neighbours and the UMAP map at several dictionary sizes.

    python benchmarks/atlas.py --run runs/quickstart --tokens 20000
    python benchmarks/atlas.py --sizes 10000,100000 --no-pass       # neighbours / UMAP only
    python benchmarks/atlas.py --run RUN --cache HARVEST --no-maps   # + the pass from a cache
    python benchmarks/atlas.py --run RUN --pieces --no-pass --no-maps  # one batch's pieces
    python benchmarks/atlas.py --smoke          # every path on a toy model, run and cache, seconds

The pass and the harvest run interleaved in one process on the same contexts (after a warm-up
batch each, so compilation is excluded); tokens/s count the masked-in tokens. Neighbours use
random unit decoders of width ``--d-in``; the 1M-feature figure is planned from the measured
``F^2 * d`` rate (the blocked kernel's time is quadratic in F, its memory is not). Prints each
result as a JSON line and the ratio lines ``ratio atlas pass / plain harvest tok/s: X`` (and
``... / reading the cache alone``).

``--smoke`` first makes a toy random Gemma 3 and corpus (benchmarks/toy.py), trains a TopK
dictionary on it for 4,096 tokens and harvests a cache (`jsae train` / `jsae harvest`, called in
this process), then runs the pass, the cache pass, the pieces and the maps (256 and 512 features)
on them: a test that every path still works (tests/test_benchmarks.py), not a measurement. Its
map is PCA (``--map-method pca``, as the test suite's atlas tests map), because UMAP's numba
compilation alone takes 30-60 s; ``--smoke --map-method umap`` runs UMAP too.
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_pass(run, tokens: int, context_length: int, batch_size: int, repeats: int) -> dict:
    """The pass next to a plain harvest. ``run``: a run folder, or anything with ``model``,
    ``sae`` and ``hook`` (an LM and a dictionary already in memory)."""
    import jax

    from jsae.analysis.atlas.stream import StreamConfig, stream_text
    from jsae.analysis.corpus import corpus_contexts
    from jsae.analysis.run import load_run
    from jsae.data.harvest import Harvester

    r = load_run(run) if isinstance(run, (str, Path)) else run
    n_ctx = -(-tokens // context_length)
    tok, msk = corpus_contexts(r.model.tokenizer, n_ctx, context_length, seed=1)
    tok, msk = tok[: n_ctx - n_ctx % batch_size], msk[: n_ctx - n_ctx % batch_size]
    h = Harvester(r.model, [r.hook])
    cfg = StreamConfig()
    warm = slice(0, batch_size)
    jax.block_until_ready(h.activations(tok[warm]))
    stream_text(r.model, {r.hook: r.sae}, tok[:batch_size * 2], msk[:batch_size * 2], cfg,
                batch_size=batch_size, progress=False)
    counted = int(msk.sum())
    res = {"harvest_s": [], "atlas_s": []}
    for _ in range(repeats):
        t = time.perf_counter()
        for s in range(0, len(tok), batch_size):
            jax.block_until_ready(h.activations(tok[s : s + batch_size]))
        res["harvest_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        stream_text(r.model, {r.hook: r.sae}, tok, msk, cfg, batch_size=batch_size, progress=False)
        res["atlas_s"].append(time.perf_counter() - t)
    hs, at = min(res["harvest_s"]), min(res["atlas_s"])
    return {"d_sae": r.sae.spec.d_sae, "tokens": counted, "contexts": len(tok),
            "batch": batch_size, "harvest_tok_s": counted / hs, "atlas_tok_s": counted / at,
            "atlas_overhead": at / hs - 1, "devices": str(jax.devices()[0].platform)}


def bench_cache(run: str, cache: str, tokens: int, batch_size: int, repeats: int) -> dict:
    """The pass from a `jsae harvest` cache (no LM) next to reading the same rows alone."""
    import jax

    from jsae.analysis.atlas.stream import StreamConfig, stream_cache
    from jsae.data.cache import ContextRows
    from jsae.runs import input_hooks, run_hooks, sae_from_run

    hook = run_hooks(run)[0]
    sae, _ = sae_from_run(run, hook)
    reader = ContextRows(cache, input_hooks(hook))
    n_ctx = int(min(len(reader.tokens), max(batch_size, -(-tokens // reader.tokens.shape[1]))))
    n_ctx -= n_ctx % batch_size
    counted = int(reader.mask[:n_ctx].sum())
    cfg = StreamConfig()
    stream_cache({hook: sae}, cache, cfg, batch_size=batch_size, max_contexts=batch_size * 2,
                 progress=False)  # compile outside the timing
    res = {"read_s": [], "atlas_s": []}
    for _ in range(repeats):
        t = time.perf_counter()
        done = 0
        for s in range(0, n_ctx, batch_size):
            n = int(reader.mask[s : s + batch_size].sum())
            jax.block_until_ready(jax.numpy.asarray(reader.rows(done, n)[input_hooks(hook)[0]]))
            done += n
        res["read_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        stream_cache({hook: sae}, cache, cfg, batch_size=batch_size, max_contexts=n_ctx,
                     progress=False)
        res["atlas_s"].append(time.perf_counter() - t)
    rs, at = min(res["read_s"]), min(res["atlas_s"])
    return {"source": "cache", "d_sae": sae.spec.d_sae, "tokens": counted, "contexts": n_ctx,
            "batch": batch_size, "read_tok_s": counted / rs, "atlas_tok_s": counted / at,
            "devices": str(jax.devices()[0].platform)}


def bench_pieces(run: str, context_length: int, batch_size: int, repeats: int) -> dict:
    """Seconds of each piece of one atlas batch (best of ``repeats + 4``): the LM to the hook,
    the SAE's encoder matmul alone, the whole encode, each token's active set, the update."""
    import jax
    import jax.numpy as jnp

    from jsae.analysis.atlas import state as S
    from jsae.analysis.atlas.stream import encode_codes
    from jsae.analysis.corpus import corpus_contexts
    from jsae.analysis.run import load_run
    from jsae.data.harvest import Harvester

    r = load_run(run)
    tok, msk = corpus_contexts(r.model.tokenizer, batch_size, context_length, seed=1)
    h = Harvester(r.model, [r.hook])
    cfg = S.StreamConfig()
    state = jax.device_put(S.init_state(r.sae.spec.d_sae, cfg))
    acts = jnp.asarray(h.activations(tok)[r.hook], jnp.float32)
    z = encode_codes(r.sae, acts)
    cv, ci = S.active_codes(z, S.active_width(cfg, state, z.shape[-1]))
    matmul = jax.jit(lambda x: x.reshape(-1, x.shape[-1]) @ r.sae.params["W_enc"])
    tk, mk = jnp.asarray(tok, jnp.int32), jnp.asarray(msk)

    def update():
        nonlocal state
        state = S.update_from_active(state, z, cv, ci, tk, mk, jnp.int32(0), cfg=cfg)
        return state

    def best(f):
        times = []
        for _ in range(repeats + 4):  # the first call compiles
            t = time.perf_counter()
            jax.block_until_ready(f())
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return {"tokens": int(tok.size), "lm_s": best(lambda: h.activations(tok)[r.hook]),
            "encoder_matmul_s": best(lambda: matmul(acts)), "encode_s": best(lambda: encode_codes(r.sae, acts)),
            "active_set_s": best(lambda: S.active_codes(z, cv.shape[1])), "update_s": best(update)}


def bench_maps(sizes, d_in: int, n: int, umap_max: int, method: str = "umap") -> list[dict]:
    from jsae.analysis.atlas.maps import clusters, layout
    from jsae.analysis.atlas.neighbours import decoder_neighbours

    out = []
    for F in sizes:
        W = np.random.default_rng(F).normal(size=(F, d_in)).astype(np.float32)
        rss0 = _rss_mb()
        decoder_neighbours(W[: min(F, 2048)], n)  # compile outside the timing
        t = time.perf_counter()
        decoder_neighbours(W, n)
        nb = time.perf_counter() - t
        row = {"features": F, "d_in": d_in, "neighbours_s": nb,
               "neighbours_gflop_s": 2 * F * F * d_in / nb / 1e9,
               "neighbours_kernel_mb": 1024 * (8192 + n) * 4 / 2**20,
               "rss_growth_mb": _rss_mb() - rss0}
        if F <= umap_max:
            t = time.perf_counter()
            xy = layout(W, method=method)
            row["umap_s" if method == "umap" else f"{method}_map_s"] = time.perf_counter() - t
            t = time.perf_counter()
            clusters(xy)
            row["hdbscan_s"] = time.perf_counter() - t
            row["rss_after_umap_mb"] = _rss_mb()
        out.append(row)
        print(json.dumps(row), flush=True)
    if out:
        r = out[-1]
        rate = r["neighbours_gflop_s"]
        out.append({"features": 1_000_000, "planned": True, "d_in": d_in,
                    "neighbours_s": 2 * 1e12 * d_in / rate / 1e9,
                    "neighbours_kernel_mb": r["neighbours_kernel_mb"],
                    "note": f"planned from {rate:.1f} GFLOP/s measured at {r['features']} features"})
        print(json.dumps(out[-1]), flush=True)
    return out


def make_smoke_run(out: Path) -> tuple[str, str]:
    """(run, cache): a TopK dictionary trained on the toy model for 4,096 tokens, and a harvest of
    its hook (4,096 held-out tokens: the cache pass reads the held-out split), made by the `jsae`
    commands (in this process)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import toy

    from jsae.cli import main as cli

    sets = toy.smoke_sets(toy.write_model(out / "toy-model"),
                          toy.write_corpus(out / "toy-corpus.jsonl"))
    run, cache = out / "run", out / "cache"
    over = [x for kv in [*sets, f"run_dir={run}", "train.tokens=4096", "eval.tokens=512",
                         "eval.show_features=0", "checkpoint.enabled=false"] for x in ("--set", kv)]
    for args in (["train", "configs/quickstart.yaml", *over, "--fresh"],
                 ["harvest", "configs/quickstart.yaml", "--out", str(cache), "--tokens", "1024",
                  "--eval-tokens", "4096", *[x for kv in sets for x in ("--set", kv)]]):
        rc = cli(args)
        if rc:
            raise SystemExit(f"jsae {' '.join(args)}: exit code {rc}")
    return str(run), str(cache)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--neighbours", type=int, default=10)
    ap.add_argument("--umap-max", type=int, default=100000, help="skip UMAP above this size")
    ap.add_argument("--map-method", choices=["umap", "pca"], default="umap",
                    help="the 2-D map (pca: no numba compilation, as the test suite maps)")
    ap.add_argument("--no-pass", action="store_true", help="skip the LM pass benchmark")
    ap.add_argument("--cache", help="also time the pass from this `jsae harvest` folder (no LM)")
    ap.add_argument("--no-maps", action="store_true", help="skip neighbours / UMAP")
    ap.add_argument("--pieces", action="store_true",
                    help="also time each piece of one batch (LM, encoder matmul, encode, active set, update)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true",
                    help="a toy model, run and cache made first; every path at a tiny size "
                         "(checks that it runs; not a measurement)")
    if ap.parse_known_args(argv)[0].smoke:  # smaller defaults; flags given still win
        ap.set_defaults(run=None, tokens=2048, context_length=32, batch_size=8, sizes="256,512",
                        d_in=16, pieces=True, map_method="pca")
    a = ap.parse_args(argv)
    if a.smoke and a.run is None:  # in a temporary folder, removed at exit
        tmp = tempfile.mkdtemp(prefix="jsae-atlas-smoke-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        a.run, made_cache = make_smoke_run(Path(tmp))
        a.cache = a.cache or made_cache
    res = {}
    if not a.no_pass:
        res["pass"] = bench_pass(a.run, a.tokens, a.context_length, a.batch_size, a.repeats)
        print(json.dumps(res["pass"]), flush=True)
        r = res["pass"]
        print(f"ratio atlas pass / plain harvest tok/s: {r['atlas_tok_s'] / r['harvest_tok_s']:.2f}x "
              f"(the pass adds {r['atlas_overhead']:.0%})", flush=True)
    if a.cache:
        res["cache"] = bench_cache(a.run, a.cache, a.tokens, a.batch_size, a.repeats)
        print(json.dumps(res["cache"]), flush=True)
        r = res["cache"]
        print(f"ratio atlas pass from the cache / reading the cache alone tok/s: "
              f"{r['atlas_tok_s'] / r['read_tok_s']:.2f}x", flush=True)
    if a.pieces:
        res["pieces"] = bench_pieces(a.run, a.context_length, a.batch_size, a.repeats)
        print(json.dumps(res["pieces"]), flush=True)
    if not a.no_maps:
        res["maps"] = bench_maps([int(s) for s in a.sizes.split(",") if s], a.d_in, a.neighbours,
                                 a.umap_max, a.map_method)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
