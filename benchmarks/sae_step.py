"""Time one SAE training step: jsae (fast and reference paths) next to PyTorch peers.

    python benchmarks/sae_step.py --batch 4096 --d-in 768 --d-sae 12288 --k 64
    python benchmarks/sae_step.py --arch topk batchtopk relu jumprelu gated --rounds 3
    python benchmarks/sae_step.py --pieces --topk-chunk 1024     # tuning on a new device
    python benchmarks/sae_step.py --cpu-devices 8 --mesh data=2,model=4   # sharded steps
    python benchmarks/sae_step.py --smoke       # every architecture, peer and piece, tiny shape

``compare(arch, ...)`` is one architecture's comparison as a function (benchmarks/device_suite.py
calls it); Matryoshka is available with ``--arch matryoshka`` (prefixes as configs/matryoshka.yaml).

For each architecture it times the jitted, donated jsae train step (Adam, grad clipping,
decoder-norm handling and dead-latent bookkeeping included: the step `jsae train` runs) and,
in the same process and interleaved round by round (so that load from other processes hits
all of them alike), the PyTorch peers on the same device:

- ``saelens``: SAELens's training SAE for that architecture (``training_forward_pass``,
  backward, grad clipping, Adam: the body of ``SAETrainer._train_step``), when installed;
  for topk also with ``use_sparse_activations=True`` (``saelens-sparse``).
- ``torch``: a plain PyTorch TopK step (encoder matmul, ``torch.topk``, ``embedding_bag``
  decoder, MSE, backward, clipping, Adam); with ``--dtype bfloat16`` on a GPU both peers run
  under bf16 autocast (fp32 parameters, as jsae's bf16 matmuls), otherwise in fp32.

It prints the hardware, ms/step and tokens/s of each, the ratio jsae/peer, and the dense-FLOP
floor (12 B d_in d_sae FLOPs at the matmul rate measured on this device), and ends with
``ratio jsae/peer tokens_per_s: X`` for the first architecture against its best peer.

``--smoke`` runs every architecture, both peers and ``--pieces`` at batch 64, d_in 16, d_sae 128,
k 4, one round of one step: a test that the benchmark still works (tests/test_benchmarks.py runs
it under the Python that has sae-lens), not a measurement. The mesh path is tested by
tests/test_fast_bench.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from machine import cpu_name  # benchmarks/machine.py (the script's own folder)


def _now() -> float:
    return time.perf_counter()


# ---- jsae -------------------------------------------------------------------------------------


SPARSE = ("topk", "batchtopk", "matryoshka")  # k-sparse codes: jsae's fast path applies


def matryoshka_groups(d_sae: int) -> list[int]:
    """Nested prefixes as configs/matryoshka.yaml has them (1/80, 1/20, 1/5 of d_sae), d_sae last."""
    return sorted({max(1, d_sae // 80), max(2, d_sae // 20), max(3, d_sae // 5)}) + [d_sae]


def arch_options(arch: str, d_sae: int, k: int) -> dict:
    """jsae's option keywords of ``arch`` at this shape."""
    if arch == "matryoshka":
        return {"k": k, "matryoshka_groups": matryoshka_groups(d_sae)}
    return {"k": k} if arch in SPARSE else {}


def jsae_step(arch: str, batch: int, d_in: int, d_sae: int, k: int, dtype: str, fast: bool,
              mesh=None, topk_chunk: int = 0):
    """(step, state, x): a jitted, donated jsae train step and its initial state.

    With a ``mesh`` the state and batch are sharded as `jsae train` shards them (latents over
    ``model``, rows over ``data``) and the step uses the mesh's sharded selections.
    """
    from jsae import parallel
    from jsae.config import RunConfig
    from jsae.sae import SAESpec, init_sae
    from jsae.train.optim import lr_schedule, make_optimizer, sparsity_schedule
    from jsae.train.state import init_state
    from jsae.train.step import make_train_step

    cfg = RunConfig()
    cfg.train.steps = 1000
    cfg.train.lr_warmup_steps = 10
    spec = SAESpec(arch, d_in, d_sae, dtype=dtype, fast_path=fast, topk_chunk=topk_chunk,
                   **arch_options(arch, d_sae, k))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, d_in)).astype(np.float32)
    sae = init_sae(jax.random.key(0), spec, x[:1024], b_dec_init="mean")
    opt = make_optimizer(cfg, 1000)
    coef = 5.0 if arch in ("relu", "gated") else (1e-3 if arch == "jumprelu" else 0.0)
    step = make_train_step(opt, sparsity_schedule(coef, 0), lr_schedule(cfg, 1000),
                           dead_after_tokens=10_000_000, mesh=mesh)
    state = init_state(sae, opt, jax.random.key(1))
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,)), state, jnp.asarray(x)
    parallel.check_divisible(mesh, batch_size=batch, d_sae=d_sae)
    st_sh = parallel.tree_shardings(state, mesh)
    state = jax.device_put(state, st_sh)
    x = jax.device_put(x, parallel.batch_sharding(mesh))
    jitted = jax.jit(step, in_shardings=(st_sh, parallel.batch_sharding(mesh)),
                     out_shardings=(st_sh, parallel.replicated(mesh)), donate_argnums=(0,))
    return jitted, state, x


class JsaeRunner:
    def __init__(self, *a, **kw):
        self.step, self.state, self.x = jsae_step(*a, **kw)
        self.state, m = self.step(self.state, self.x)  # compile + first step
        jax.block_until_ready(m)

    def run(self, n: int) -> float:
        t0 = _now()
        for _ in range(n):
            self.state, m = self.step(self.state, self.x)
        jax.block_until_ready((self.state, m))
        return (_now() - t0) / n


# ---- PyTorch peers ----------------------------------------------------------------------------


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SAELensRunner:
    """SAELens's training SAE, stepped as ``SAETrainer._train_step`` does."""

    CLASSES = {
        "topk": ("TopKTrainingSAE", "TopKTrainingSAEConfig"),
        "batchtopk": ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig"),
        "relu": ("StandardTrainingSAE", "StandardTrainingSAEConfig"),
        "jumprelu": ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig"),
        "gated": ("GatedTrainingSAE", "GatedTrainingSAEConfig"),
        "matryoshka": ("MatryoshkaBatchTopKTrainingSAE", "MatryoshkaBatchTopKTrainingSAEConfig"),
    }

    def __init__(self, arch, batch, d_in, d_sae, k, *, sparse=False, dtype="bfloat16"):
        import sae_lens
        import torch

        dev = _torch_device()
        cls_name, cfg_name = self.CLASSES[arch]
        kw = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": str(dev)}
        if arch in SPARSE:
            kw["k"] = k
        if arch == "matryoshka":
            kw["matryoshka_widths"] = matryoshka_groups(d_sae)
        if sparse:
            kw["use_sparse_activations"] = True
        cfg = getattr(sae_lens, cfg_name)(**kw)
        self.sae = getattr(sae_lens, cls_name)(cfg)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=1e-4)
        self.x = torch.randn(batch, d_in, device=dev)
        self.dead = torch.zeros(d_sae, dtype=torch.bool, device=dev)
        self.since_fired = torch.zeros(d_sae, device=dev)
        self.autocast = dev.type == "cuda" and dtype == "bfloat16"  # fp32 params either way
        self.dev = dev
        self.run(1)

    def run(self, n: int) -> float:
        import torch
        from sae_lens.saes.sae import TrainStepInput

        self._sync()
        t0 = _now()
        for i in range(n):
            with torch.autocast(self.dev.type, torch.bfloat16, enabled=self.autocast):
                out = self.sae.training_forward_pass(TrainStepInput(
                    sae_in=self.x, coefficients=self._coefficients(),
                    dead_neuron_mask=self.dead, n_training_steps=i, is_logging_step=False,
                ))
                with torch.no_grad():
                    did_fire = out.feature_acts.bool().float().sum(-2).bool()
                    if did_fire.is_sparse:
                        did_fire = did_fire.to_dense()
                    self.since_fired += 1
                    self.since_fired[did_fire] = 0
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad()
        self._sync()
        return (_now() - t0) / n

    def _coefficients(self):
        from sae_lens.saes.sae import TrainCoefficientConfig

        out = {}
        for name, c in self.sae.get_coefficients().items():
            out[name] = c.value if isinstance(c, TrainCoefficientConfig) else c
        return out

    def _sync(self):
        import torch

        if self.dev.type == "cuda":
            torch.cuda.synchronize()


class TorchTopKRunner:
    """A plain PyTorch TopK SAE step with an embedding_bag (gather) decoder."""

    def __init__(self, batch, d_in, d_sae, k, *, dtype="bfloat16"):
        import torch

        dev = _torch_device()
        g = torch.Generator(device="cpu").manual_seed(0)
        w = torch.randn(d_sae, d_in, generator=g)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_enc = torch.nn.Parameter(w.T.contiguous().to(dev))
        self.W_dec = torch.nn.Parameter(w.clone().to(dev))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=dev))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, device=dev))
        self.params = [self.W_enc, self.W_dec, self.b_enc, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=1e-4)
        self.x = torch.randn(batch, d_in, device=dev)
        self.k, self.dev = k, dev
        self.autocast = dev.type == "cuda" and dtype == "bfloat16"
        self.since_fired = torch.zeros(d_sae, device=dev)
        self.run(1)

    def run(self, n: int) -> float:
        import torch
        import torch.nn.functional as F

        self._sync()
        t0 = _now()
        for _ in range(n):
            with torch.autocast(self.dev.type, torch.bfloat16, enabled=self.autocast):
                pre = (self.x - self.b_dec) @ self.W_enc + self.b_enc
                vals, idx = torch.topk(pre, self.k, dim=-1, sorted=False)
                vals = vals.relu().float()
                x_hat = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
                x_hat = x_hat + self.b_dec
                loss = (x_hat.float() - self.x).pow(2).sum(-1).mean()
            with torch.no_grad():
                fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
                fired[idx.reshape(-1)] = True
                self.since_fired += 1
                self.since_fired[fired] = 0
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad()
            with torch.no_grad():
                self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)
        self._sync()
        return (_now() - t0) / n

    def _sync(self):
        import torch

        if self.dev.type == "cuda":
            torch.cuda.synchronize()


# ---- hardware ---------------------------------------------------------------------------------


def hardware() -> str:
    dev = jax.devices()[0]
    cpu = cpu_name()
    parts = [f"jax {jax.__version__} backend={jax.default_backend()} device={dev.device_kind}",
             f"cpu={cpu} x{os.cpu_count()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} threads={torch.get_num_threads()}"
                     + (f" gpu={torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    except ImportError:
        pass
    return "; ".join(parts)


def matmul_rate(dtype: str, n: int = 2048, reps: int = 3) -> float:
    """Measured FLOP/s of a square matmul on the default JAX device."""
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jnp.ones((n, n), dt)
    f = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = 1e9
    for _ in range(reps):
        t0 = _now()
        f(a).block_until_ready()
        best = min(best, _now() - t0)
    return 2 * n**3 / best


# ---- pieces -------------------------------------------------------------------------------------


def _time(f, *args, reps: int = 3) -> float:
    """Best wall time (ms) of a jitted call, after a compile-and-warm-up call."""
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = _now()
        jax.block_until_ready(f(*args))
        best = min(best, _now() - t0)
    return 1e3 * best


def time_pieces(B: int, d: int, F: int, k: int, dtype: str, reps: int = 3,
                chunks=(256, 1024, 4096), groups=(1, 2, 4, 8, 16)) -> dict:
    """ms of the fast TopK step's pieces at one shape, to see where the time goes and to
    choose `sae.topk_chunk` and the slab groups of `jsae.sae.fast` on a new device."""
    from jsae.sae import fast

    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, d)), jnp.float32)
    w_enc = jnp.asarray(rng.normal(size=(d, F)) / np.sqrt(d), jnp.float32)
    w_dec = jnp.asarray(w_enc.T)
    pre = jax.jit(lambda x, w: jnp.matmul(x.astype(dt), w.astype(dt),
                                          preferred_element_type=jnp.float32))(x, w_enc)
    out = {"encoder matmul": _time(jax.jit(lambda x, w: jnp.matmul(
        x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)), x, w_enc, reps=reps)}
    out["lax.top_k"] = _time(jax.jit(lambda p: jax.lax.top_k(p, k)), pre, reps=reps)
    for chunk in sorted(set(chunks)):
        if k < chunk < F and F % chunk == 0:
            f = jax.jit(lambda p, c=chunk: fast.chunked_top_k(p, k, c))
            out[f"chunked top-k ({chunk})"] = _time(f, pre, reps=reps)
    out["approx_max_k (0.95)"] = _time(
        jax.jit(lambda p: jax.lax.approx_max_k(p, k, recall_target=0.95)), pre, reps=reps)
    vals, idx = jax.lax.top_k(pre, k)
    codes = fast.SparseCodes(jax.nn.relu(vals).T, None, idx.T.astype(jnp.int32), B, F)
    g = jnp.ones((B, d), jnp.float32)
    params = {"W_enc": w_enc, "b_enc": jnp.zeros(F), "b_dec": jnp.zeros(d)}
    backend = jax.default_backend()
    defaults = (fast.GATHER_SLABS_PER_STEP.get(backend, 8),
                fast.SCATTER_SLABS_PER_STEP.get(backend, 8))
    out["library slab groups (gather, scatter)"] = defaults
    try:  # slabs per loop iteration (jsae.sae.fast.*_SLABS_PER_STEP): try several
        for group in groups:
            fast.GATHER_SLABS_PER_STEP[backend] = fast.SCATTER_SLABS_PER_STEP[backend] = group
            out[f"sparse decode (group {group})"] = _time(jax.jit(fast.sparse_decode), codes,
                                                          w_dec, reps=reps)
            dec_bwd = jax.jit(lambda c, w: jax.vjp(
                lambda v, w: fast.sparse_decode(c.replace(vals=v), w), c.vals, w)[1](g))
            out[f"sparse decode backward (group {group})"] = _time(dec_bwd, codes, w_dec,
                                                                   reps=reps)
            enc_bwd = jax.jit(lambda c, p: jax.grad(
                lambda p: jnp.sum(fast.encoder_hook(c, c.vals, x, p)))(p))
            out[f"sparse encoder backward (group {group})"] = _time(enc_bwd, codes, params,
                                                                    reps=reps)
    finally:
        fast.GATHER_SLABS_PER_STEP[backend], fast.SCATTER_SLABS_PER_STEP[backend] = defaults
    return out


# ---- main -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    name: str
    runner: object
    times: list = dataclasses.field(default_factory=list)

    @property
    def ms(self) -> float:
        return 1e3 * statistics.median(self.times)


def compare(arch: str, B: int, d: int, F: int, k: int, dtype: str, *, peers=("saelens", "torch"),
            rounds: int = 3, steps: int = 3, reference: bool = True, mesh=None,
            topk_chunk: int = 0, saelens_sparse: bool = True, log=print) -> dict:
    """Time one architecture's jsae step(s) and its peers, interleaved round by round.

    Prints the same lines as the script and returns ``{"ms": {name: median ms/step},
    "rounds_ms": {name: [...]}, "unavailable": {peer: reason}, "ratios": {peer: peer ms / jsae
    ms}, "best_peer": name or None}`` (ratios > 1: jsae is faster)."""
    log(f"\n== {arch} ==")
    entries: list[Entry] = []
    sparse_arch = arch in SPARSE
    entries.append(Entry("jsae" + ("-fast" if sparse_arch else ""),
                         JsaeRunner(arch, B, d, F, k, dtype, fast=sparse_arch, mesh=mesh,
                                    topk_chunk=topk_chunk)))
    if sparse_arch and reference:
        entries.append(Entry("jsae-reference", JsaeRunner(arch, B, d, F, k, dtype, fast=False,
                                                          mesh=mesh)))
    n_jsae = len(entries)
    peers_wanted = []
    if "saelens" in peers:
        peers_wanted.append(("saelens", lambda: SAELensRunner(arch, B, d, F, k, dtype=dtype)))
        if arch == "topk" and saelens_sparse:
            peers_wanted.append(("saelens-sparse",
                                 lambda: SAELensRunner(arch, B, d, F, k, sparse=True, dtype=dtype)))
    if "torch" in peers and arch == "topk":
        peers_wanted.append(("torch-topk-embbag", lambda: TorchTopKRunner(B, d, F, k, dtype=dtype)))
    unavailable = {}
    for name, make in peers_wanted:
        try:
            entries.append(Entry(name, make()))
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
            unavailable[name] = why
            log(f"({name} unavailable: {why})")
    for _ in range(rounds):
        for e in entries:
            e.times.append(e.runner.run(steps))
    best_jsae = min(entries[:n_jsae], key=lambda e: e.ms)
    for e in entries:
        tok = B / (e.ms / 1e3)
        rel = f"  jsae/this {e.ms / best_jsae.ms:.2f}x" if e is not best_jsae else ""
        log(f"{e.name:20s} {e.ms:9.1f} ms/step  {tok:12,.0f} tokens/s"
            f"  (rounds: {', '.join(f'{1e3 * t:.0f}' for t in e.times)} ms){rel}")
    out = {"ms": {e.name: e.ms for e in entries},
           "rounds_ms": {e.name: [1e3 * t for t in e.times] for e in entries},
           "unavailable": unavailable,
           "ratios": {e.name: e.ms / entries[0].ms for e in entries[n_jsae:]}, "best_peer": None}
    if entries[n_jsae:]:
        best_peer = min(entries[n_jsae:], key=lambda e: e.ms)
        out["best_peer"] = best_peer.name
        log(f"{arch}: ratio jsae/{best_peer.name} tokens_per_s: {best_peer.ms / entries[0].ms:.2f}")
    for e in entries:  # free memory before the next architecture
        e.runner = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["topk"],
                    choices=["topk", "batchtopk", "relu", "jumprelu", "gated", "matryoshka"])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=12288)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--peers", nargs="*", default=["saelens", "torch"],
                    help="saelens, torch (empty: none)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the jsae reference (dense) path for topk/batchtopk")
    ap.add_argument("--mesh", default=None, metavar="data=D,model=M",
                    help="shard the jsae steps over a device mesh (latents over model)")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="simulate this many CPU devices (for --mesh on a CPU machine)")
    ap.add_argument("--topk-chunk", type=int, default=0,
                    help="sae.topk_chunk of the jsae fast steps (0: one-stage lax.top_k)")
    ap.add_argument("--pieces", action="store_true",
                    help="also time the fast step's pieces (matmul, top-k variants, sparse ops)")
    ap.add_argument("--smoke", action="store_true",
                    help="every architecture, peer and piece at a tiny shape, one round of one step: "
                         "checks every path runs (not a measurement)")
    if ap.parse_known_args(argv)[0].smoke:  # smaller defaults; flags given still win
        ap.set_defaults(arch=["topk", "batchtopk", "relu", "jumprelu", "gated"], batch=64, d_in=16,
                        d_sae=128, k=4, rounds=1, steps=1, pieces=True, topk_chunk=32)
    args = ap.parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    mesh = None
    if args.mesh:
        from jsae import parallel
        from jsae.plan import parse_mesh

        mesh = parallel.make_mesh(*parse_mesh(args.mesh))

    B, d, F, k = args.batch, args.d_in, args.d_sae, args.k
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"hardware: {hardware()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"shape: batch={B} d_in={d} d_sae={F} k={k} dtype={args.dtype}")
    if mesh is not None:
        print(f"mesh: data={mesh.shape['data']} model={mesh.shape['model']} "
              f"({mesh.devices.size} x {mesh.devices.flat[0].device_kind}; peers use one device)")
    load0 = os.getloadavg()
    rate = matmul_rate(args.dtype, n=256 if args.smoke else 2048)
    dense_flops = 12 * B * d * F  # encoder + decoder, forward and both backward matmuls
    enc_flops = 2 * B * d * F
    print(f"matmul rate measured: {rate / 1e9:.1f} GFLOP/s ({args.dtype}); "
          f"dense-FLOP floor {1e3 * dense_flops / rate:.1f} ms/step "
          f"(encoder-forward-only floor {1e3 * enc_flops / rate:.1f} ms)")
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")

    if args.pieces:
        print("\n== pieces of the fast TopK step (one device, best of 3, ms) ==")
        chunks = (256, 1024, 4096, *([args.topk_chunk] if args.topk_chunk else []))
        groups = (1, 16) if args.smoke else (1, 2, 4, 8, 16)  # smoke: the loop's two ends
        for name, ms in time_pieces(B, d, F, k, args.dtype, chunks=chunks, groups=groups).items():
            print(f"{name:40s} {ms:9.2f} ms" if isinstance(ms, float) else f"{name:40s} {ms}")

    headline = None
    for arch in args.arch:
        res = compare(arch, B, d, F, k, args.dtype, peers=args.peers, rounds=args.rounds,
                      steps=args.steps, reference=not args.no_reference, mesh=mesh,
                      topk_chunk=args.topk_chunk)
        if res["best_peer"] and headline is None:
            headline = res["ratios"][res["best_peer"]]
    load1 = os.getloadavg()
    print(f"\nload average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if headline is not None:
        print(f"ratio jsae/peer tokens_per_s: {headline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
