"""Harvesting and full-forward throughput: the jsae JAX port vs transformers (PyTorch eager), same
weights, same machine, same batch, in one run.

    python benchmarks/harvest.py                       # Gemma 3 270M, batch 8 x 128, layer 6
    python benchmarks/harvest.py --batch 32 --seq 256 --layer 8 --iters 5 --dtype bfloat16
    python benchmarks/harvest.py --single-thread       # one core each (fair on a busy machine)
    python benchmarks/harvest.py --smoke               # a toy random Gemma 3, every path, seconds

"harvest" runs the model up to `blocks.{layer}.hook_resid_post` and stops (jsae:
`stop_after_capture=True`; transformers: the same model truncated to layer+1 blocks, as
TransformerLens' `stop_at_layer` does). "body" is every block without the unembedding; "full" is
the forward with logits. Prints the hardware and tokens/s and the ratios jsae / torch. The torch
side runs on CUDA when torch sees a GPU (synchronised before each timing stops), on the CPU
otherwise. ``measure(...)`` is the same as a function (benchmarks/device_suite.py calls it for
several layers at once).

"nnx" runs the same three through the Flax NNX modules (`jsae.models.nnx.forward(lm.model, ...)`:
`nnx.split` + a jitted pure function of the state), interleaved with the pure-dict "jax" path, and
prints the ratio nnx / jax (the port must stay >= 0.95). Before timing it checks that the three
implementations compute the same harvest activations (prints the largest difference).

``--smoke`` runs every path (jax, nnx, transformers) on a toy random Gemma 3 (benchmarks/toy.py:
8 layers, d_model 160) at batch 2 x 32 with one timed call: a test that the benchmark still works
(tests/test_benchmarks.py), not a measurement.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

from machine import cpu_name  # benchmarks/machine.py (the script's own folder)


def hardware() -> str:
    import jax

    cpu = cpu_name()
    devs = jax.devices()
    return (
        f"{platform.system()} {platform.machine()}, CPU: {cpu}, {os.cpu_count()} logical cores; "
        f"jax {jax.__version__} on {devs[0].platform} x{len(devs)} ({devs[0].device_kind})"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="an offline name, a .gguf or an HF folder")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layer", type=int, default=6, help="harvest hook: blocks.LAYER.hook_resid_post")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--single-thread", action="store_true",
                    help="one thread for both (XLA intra-op parallelism off, torch 1 thread): a fairer "
                         "comparison on a machine shared with other work")
    ap.add_argument("--smoke", action="store_true",
                    help="toy random Gemma 3, batch 2 x 32, one timed call: checks every path runs")
    if ap.parse_known_args(argv)[0].smoke:  # smaller defaults; flags given still win
        ap.set_defaults(model=None, batch=2, seq=32, iters=1)
    args = ap.parse_args(argv)
    if args.smoke and args.model is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import toy

        tmp = tempfile.mkdtemp(prefix="jsae-toy-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        args.model = str(toy.write_model(os.path.join(tmp, "model")))
    if args.single_thread:  # must happen before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
        args.threads = 1

    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"command: python {' '.join(sys.argv)}")
    measure(args.model, batch=args.batch, seq=args.seq, layers=(args.layer,), iters=args.iters,
            dtype=args.dtype, use_torch=not args.no_torch, threads=args.threads)
    return 0


def measure(model: str, *, batch: int = 8, seq: int = 128, layers=(6,), iters: int = 5,
            dtype: str = "float32", use_torch: bool = True, threads: int | None = None,
            modes=("harvest", "body", "full"), nnx: bool = True, log=print) -> dict:
    """Tokens/s of jax (and the NNX view, and transformers on the same device: CUDA when torch
    sees a GPU) for each of ``modes``; "harvest" once per layer of ``layers`` (named
    "harvest" for one layer, "harvest L{n}" for several). Prints the lines the script prints;
    returns ``{"tok_s": {mode: {impl: tok/s}}, "max_diff": {impl: float}, "hardware": str,
    "model": str, "tokens": int}``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jsae.models as M

    log(hardware())
    lm = M.load(model, dtype=dtype)
    cfg = lm.cfg
    B, T = batch, seq
    ntok = B * T
    rng = np.random.default_rng(0)
    toks_np = rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
    toks_np[:, 0] = cfg.bos_id if cfg.bos_id is not None else 0
    toks = jnp.asarray(toks_np)
    hooks = {(f"harvest L{n}" if len(layers) > 1 else "harvest"): n for n in layers}
    log(f"model {lm.name} ({cfg.arch}, {cfg.n_layers} layers, d={cfg.d_model}, vocab={cfg.vocab_size}), "
        f"dtype {dtype}, batch {B} x {T} = {ntok} tokens, harvest hooks "
        + ", ".join(f"blocks.{n}.hook_resid_post" for n in layers))

    def harvest_fn(n):
        hook = f"blocks.{n}.hook_resid_post"
        return jax.jit(lambda p, t: M.forward(cfg, p, t, capture=(hook,),
                                              stop_after_capture=True).activations[hook])

    calls = {name: harvest_fn(n) for name, n in hooks.items() if "harvest" in modes}
    if "body" in modes:
        calls["body"] = jax.jit(lambda p, t: M.forward(
            cfg, p, t, capture=("ln_final.hook_normalized",),
            stop_after_capture=True).activations["ln_final.hook_normalized"])
    if "full" in modes:
        calls["full"] = jax.jit(lambda p, t: M.forward(cfg, p, t).logits)
    runs: dict[str, dict] = {name: {"jax": (lambda f=f: f(lm.params, toks).block_until_ready())}
                             for name, f in calls.items()}
    from jsae.models import nnx as mnnx

    # NNX modules over the same arrays. Bound as a default argument, not closed over: a closure
    # reads the name when called, after the torch branch below has built its own models (issue 32).
    nnx_model = lm.model
    nnx_calls = {}
    for name, n in hooks.items():
        hook = f"blocks.{n}.hook_resid_post"
        nnx_calls[name] = (lambda m=nnx_model, h=hook: mnnx.forward(
            m, toks, capture=(h,), stop_after_capture=True).activations[h])
    nnx_calls["body"] = lambda m=nnx_model: mnnx.forward(
        m, toks, capture=("ln_final.hook_normalized",),
        stop_after_capture=True).activations["ln_final.hook_normalized"]
    nnx_calls["full"] = lambda m=nnx_model: mnnx.forward(m, toks).logits
    if nnx:
        for name in runs:
            runs[name]["nnx"] = (lambda f=nnx_calls[name]: f().block_until_ready())

    torch_calls = {}
    if use_torch:
        import torch
        import transformers

        from jsae.models.convert import params_to_hf

        torch.set_num_threads(threads or os.cpu_count())
        if cfg.arch != "gemma3":
            raise SystemExit("the torch reference is wired for Gemma 3 only; pass --no-torch")
        hc = transformers.Gemma3TextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, sliding_window=cfg.sliding_window, query_pre_attn_scalar=round(cfg.scale**-2),
            rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_position,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base},
                             "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base}},
        )
        tdt = torch.float32 if dtype == "float32" else torch.bfloat16
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with dev:  # random init on the device itself (fast on a GPU), then the real weights
            hf = transformers.Gemma3ForCausalLM(hc)
        f32 = jax.device_get(lm.astype(jnp.float32).params)
        hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params_to_hf(cfg, f32).items()}, strict=False)
        hf = hf.to(device=dev, dtype=tdt).eval()
        log(f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"attn={hf.config._attn_implementation}, threads={torch.get_num_threads()}, device={dev}")
        tt = torch.tensor(toks_np, dtype=torch.long, device=dev)

        def truncated(n):
            short = copy.copy(hf.model)  # the same modules, truncated after the harvest layer
            short._modules = dict(short._modules)  # (a shallow copy would share the module dict)
            short.layers = torch.nn.ModuleList(list(hf.model.layers)[: n + 1])
            short.norm = torch.nn.Identity()  # the hook is the residual stream itself, before any norm
            short.config = copy.deepcopy(hf.config)
            short.config.num_hidden_layers = n + 1
            short.config.layer_types = hf.config.layer_types[: n + 1]
            assert len(hf.model.layers) == cfg.n_layers and len(short.layers) == n + 1
            return short

        def timed(f):  # no autograd; wait for the device, as jax's block_until_ready does
            def g():
                with torch.inference_mode():
                    out = f()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                return out
            return g

        # every model the lambdas use is a default argument (bound now, see the NNX calls above)
        for name, n in hooks.items():
            torch_calls[name] = timed(lambda s=truncated(n): s(input_ids=tt, use_cache=False).last_hidden_state)
        torch_calls["body"] = timed(lambda m=hf.model: m(input_ids=tt, use_cache=False).last_hidden_state)
        torch_calls["full"] = timed(lambda m=hf: m(input_ids=tt, use_cache=False).logits)
        for name in runs:
            runs[name]["torch"] = torch_calls[name]

    # The contenders must compute the same thing: the harvest activations of each, against jax's.
    def as_np(x):
        if type(x).__module__.startswith("torch"):
            return x.float().cpu().numpy()
        return np.asarray(jax.device_get(x), np.float32)

    max_diff = {}
    for name, n in hooks.items():
        want = as_np(harvest_fn(n)(lm.params, toks))
        scale = float(np.abs(want).max())
        impls = ([("nnx", nnx_calls[name])] if nnx else []) + (
            [("torch", torch_calls[name])] if use_torch else [])
        for impl, f in impls:
            got = as_np(f())
            assert got.shape == want.shape, (impl, got.shape, want.shape)
            diff = float(np.abs(got - want).max())
            max_diff[impl] = max(max_diff.get(impl, 0.0), diff)
            log(f"harvest activations {impl} vs jax: max |difference| {diff:.2e} (max |activation| "
                f"{scale:.2f}, blocks.{n}.hook_resid_post)")
            if dtype == "float32" and diff > 1e-3 * max(scale, 1.0):
                raise SystemExit(f"{impl} and jax disagree at blocks.{n}.hook_resid_post: the "
                                 "benchmark would compare different work")

    log(f"load average before: {os.getloadavg()[0]:.2f}  (jax and torch calls are interleaved, so "
        "both see the same background load)")
    results: dict[str, dict[str, float]] = {}
    for name, impls in runs.items():
        first = {}
        for impl, f in impls.items():  # compile / warm up
            t = time.perf_counter()
            f()
            first[impl] = time.perf_counter() - t
        times: dict[str, list] = {impl: [] for impl in impls}
        for _ in range(iters):
            for impl, f in impls.items():
                t = time.perf_counter()
                f()
                times[impl].append(time.perf_counter() - t)
        results[name] = {}
        for impl, ts in times.items():
            sec = sorted(ts)[len(ts) // 2]
            results[name][impl] = ntok / sec
            log(f"  {impl:5s} {name:8s} {ntok / sec:10.0f} tok/s   ({sec * 1e3:8.1f} ms/batch median of "
                f"{len(ts)}, first call {first[impl]:.1f}s)")
    log(f"load average after: {os.getloadavg()[0]:.2f}")
    if nnx:
        log("ratios nnx / jax:  " + ", ".join(f"{k} {v['nnx'] / v['jax']:.2f}x" for k, v in results.items()))
    if use_torch:
        log("ratios jax / torch:  " + ", ".join(
            f"{k} {v['jax'] / v['torch']:.2f}x" for k, v in results.items()))
    return {"tok_s": results, "max_diff": max_diff, "hardware": hardware(), "model": str(lm.name),
            "tokens": ntok}


if __name__ == "__main__":
    raise SystemExit(main())
