"""Memory planner: per-device bytes of the compiled training step for a config and mesh.

`plan(cfg, data=D, model=M)` builds the Trainer's own jitted step (the one `jsae train` runs:
same shardings, donation, fast path and sharded top-k) on *abstract* states, lowers and
compiles it for a ``data x model`` mesh and reads ``compiled.memory_analysis()``; nothing is
allocated, so a 34M-latent dictionary plans in seconds on a laptop.  The states' bytes per
device (params, optimizer state, other state, batch) are exact arithmetic on the shard
shapes; ``temp`` (activations and other scratch) is what XLA's buffer assignment reports.

Devices: the step is compiled for the devices of the default backend.  When there are fewer
than ``D * M`` of them, the planner asks for ``D * M`` simulated CPU devices (possible only
before JAX has started its backends: the `jsae plan` command does this itself) and compiles
for the CPU backend.  Argument/parameter/optimizer bytes are then exact for any backend;
``temp`` is the CPU compiler's figure, a guide to (not a measurement of) what a TPU or GPU
compile needs, because fusion and layout decisions differ per backend.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jsae.config import ConfigError, RunConfig

GiB = 1024**3


@dataclasses.dataclass
class Plan:
    """Bytes per device of one compiled training step (all hooks' SAEs together)."""

    data: int
    model: int
    d_in: dict[str, int]
    d_sae: dict[str, int]
    batch_size: int
    backend: str
    simulated: bool
    params: int  # SAE parameters (incl. norm_scale)
    opt_state: int  # optimizer state (Adam moments, counters)
    other_state: int  # step, fired_ago, rng
    batch: int  # the activation batch
    argument: int  # memory_analysis().argument_size_in_bytes
    output: int  # memory_analysis().output_size_in_bytes
    alias: int  # memory_analysis().alias_size_in_bytes (donated outputs reusing inputs)
    temp: int  # memory_analysis().temp_size_in_bytes (activations and scratch)
    code: int  # memory_analysis().generated_code_size_in_bytes
    # per dictionary, its main tensors (the architecture's `param_shapes`): name -> shape,
    # bytes in all and bytes per device
    tensors: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)

    @property
    def peak(self) -> int:
        """Live bytes at the step's peak: inputs + new outputs not aliased + scratch."""
        return self.argument + self.output - self.alias + self.temp

    def table(self) -> str:
        def row(name, b, note=""):
            return f"  {name:<22s}{b / GiB:12.3f} GiB  {b:>16,d} B  {note}"

        dev = f"{self.backend}{' (simulated)' if self.simulated else ''}"
        lines = [
            f"mesh data={self.data} model={self.model} ({self.data * self.model} x {dev}); "
            f"batch {self.batch_size}; d_in {self.d_in}; d_sae {self.d_sae}",
            "per device:",
            row("params", self.params),
            row("optimizer state", self.opt_state),
            row("other train state", self.other_state),
            row("batch", self.batch),
            row("activations (temp)", self.temp, "XLA buffer assignment, this backend"),
            row("outputs not aliased", self.output - self.alias),
            row("peak (estimate)", self.peak, "= arguments + outputs - aliased + temp"),
        ]
        for key, tensors in self.tensors.items():
            lines.append(f"parameters of {key} (fp32; Adam keeps two more copies):")
            for name, t in tensors.items():
                shape = "[" + ", ".join(f"{n:,}" for n in t["shape"]) + "]"
                lines.append(f"  {name:<14s}{shape:<26s}{_size(t['bytes']):>12s} in all"
                             f"{_size(t['per_device']):>12s} per device")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak": self.peak}


def _size(b: int) -> str:
    for unit, n in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if b >= n:
            return f"{b / n:.2f} {unit}"
    return f"{b} B"


class _ShapeOnlySource:
    """Just enough of an ActivationSource for `Trainer.__init__` (hooks and d_in)."""

    def __init__(self, hooks, d_in):
        self.hooks = list(hooks)
        self.d_in = {h: d_in for h in self.hooks}


# (d_model, n_layers) of common models, so `jsae plan` needs no download (the width sizes the
# dictionary, the depth a set over every layer, `sae.layers: all`).
# Longer keys first: "gemma-3-1b" must not match a "gemma-3-12b" name.
MODEL_SHAPES = {
    "gemma-3-270m": (640, 18), "gemma-3-12b": (3840, 48), "gemma-3-27b": (5376, 62),
    "gemma-3-1b": (1152, 26), "gemma-3-4b": (2560, 34), "gemma-2-2b": (2304, 26),
    "gemma-2-9b": (3584, 42), "gemma-2-27b": (4608, 46),
    "gpt2-medium": (1024, 24), "gpt2-large": (1280, 36), "gpt2-xl": (1600, 48), "gpt2": (768, 12),
    "llama-3.1-8b": (4096, 32), "llama-3.2-1b": (2048, 16), "llama-3.2-3b": (3072, 28),
    "smollm2-135m": (576, 30), "smollm2-360m": (960, 32), "smollm2-1.7b": (2048, 24),
    "qwen2.5-0.5b": (896, 24), "qwen2.5-1.5b": (1536, 28), "qwen2.5-7b": (3584, 28),
}


def _known_shape(cfg: RunConfig) -> tuple[int, int] | None:
    """(d_model, n_layers) of the config's model when MODEL_SHAPES knows it by name."""
    name = (cfg.model.path or cfg.model.name or "").lower()
    return next((shape for key, shape in MODEL_SHAPES.items() if key in name), None)


def _with_set_hooks(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a set's hooks for every layer (``sae.layers: all``) from the model's known
    depth; a copy, the caller's config is not changed."""
    if cfg.sae.layers != "all" or cfg.model.hooks:
        return cfg
    from jsae.config import resolve_layers

    shape = _known_shape(cfg)
    if shape is None:
        raise ConfigError(f"config key 'sae.layers': cannot tell how many layers model "
                          f"{cfg.model.name!r} has without loading it; list them (sae.layers: "
                          "[0, 1, ...])")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model))
    resolve_layers(cfg, shape[1])
    return cfg


def resolve_d_in(cfg: RunConfig) -> int:
    """d_in of the config's activations without loading a model or data."""
    d = cfg.data
    if d.source == "synthetic":
        return d.d_in
    if d.source == "array" and d.path:
        import glob

        files = sorted(glob.glob(d.path)) or [d.path]
        try:
            return int(np.load(files[0], mmap_mode="r", allow_pickle=False).shape[-1])
        except (ValueError, OSError, IndexError) as e:
            from jsae.errors import FileFormatError

            raise FileFormatError(f"{files[0]}: not a .npy array of shape [N, d_in] "
                                  f"({' '.join(str(e).split()) or type(e).__name__})") from None
    if d.source == "cache" and d.path and not str(d.path).startswith("gs://"):
        from jsae.data.cache import read_manifest

        try:
            d_in = read_manifest(d.path)["d_in"]  # {hook: width}
            return int(d_in.get(cfg.model.hooks[0], next(iter(d_in.values()))))
        except FileNotFoundError:
            pass  # not harvested yet: fall back to the model's width
    shape = _known_shape(cfg)
    if shape is not None:
        return shape[0]
    raise ConfigError(
        f"cannot tell d_in of model {cfg.model.name!r} without loading it; pass d_in "
        "(`jsae plan ... --d-in N`)"
    )


def ensure_devices(n: int) -> bool:
    """Make at least ``n`` devices available; returns True when they are simulated CPUs.

    Simulation works only before JAX's backends start (``jax_num_cpu_devices``).
    """
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        if n > 1:
            jax.config.update("jax_num_cpu_devices", max(n, 1))
            jax.config.update("jax_platforms", "cpu")
            return True
        return False
    if len(jax.devices()) >= n:
        return False
    cpus = jax.devices("cpu") if _has_cpu() else []
    if len(cpus) >= n:
        return True
    raise RuntimeError(
        f"the mesh needs {n} devices but {len(jax.devices())} are available and JAX has already "
        f"started; run `jsae plan` in a fresh process (it simulates {n} CPU devices), or set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax"
    )


def _has_cpu() -> bool:
    try:
        jax.devices("cpu")
        return True
    except RuntimeError:
        return False


def _devices(n: int):
    devs = jax.devices()
    if len(devs) >= n:
        return devs[:n], False
    return jax.devices("cpu")[:n], True


def _shard_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def compile_step(cfg: RunConfig, data: int, model: int, d_in: int | None = None):
    """(compiled, abstract_states, abstract_batches, trainer, simulated) for the config on a
    mesh; a family's ``compiled`` is a dict, member name -> its compiled step."""
    from jsae import parallel
    from jsae.train.loop import Trainer

    d_in = d_in or resolve_d_in(cfg)
    devs, simulated = _devices(data * model)
    mesh = parallel.make_mesh(data, model, devices=devs)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=data, model=model))
    if cfg.train.steps is None and cfg.train.tokens is None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1))
    cfg = _with_set_hooks(cfg)
    trainer = Trainer(cfg, _ShapeOnlySource(cfg.model.hooks, d_in), mesh=mesh)
    states = trainer._template()
    bsh = parallel.batch_sharding(mesh)
    # the step reads one [B, d_in] batch per harvested hook (a transcoder's output hook and a
    # crosscoder's every hook included; it stacks them itself)
    batches = {
        h: jax.ShapeDtypeStruct((cfg.train.batch_size, d_in), np.float32, sharding=bsh)
        for h in trainer.source_hooks
    }
    if trainer.family:  # one program per member, each over its own states and the one batch
        steps = trainer.member_steps(states)
        compiled = {name: steps[name].lower({k: states[k] for k in keys}, batches).compile()
                    for name, keys in trainer.members.items()}
    else:
        compiled = trainer._compiled(states).lower(states, batches).compile()
    return compiled, states, batches, trainer, simulated


@dataclasses.dataclass
class _Memory:
    argument_size_in_bytes: int
    output_size_in_bytes: int
    alias_size_in_bytes: int
    temp_size_in_bytes: int
    generated_code_size_in_bytes: int


def _family_memory(compiled: dict, batch_bytes: int) -> _Memory:
    """A family's step as its members' programs run in turn: every member's state held at
    once (arguments, outputs and aliases add up; the one batch is counted once), scratch the
    largest member's (a member's temporaries are freed before the next one's)."""
    mems = [c.memory_analysis() for c in compiled.values()]
    return _Memory(
        sum(int(m.argument_size_in_bytes) for m in mems) - (len(mems) - 1) * batch_bytes,
        sum(int(m.output_size_in_bytes) for m in mems),
        sum(int(m.alias_size_in_bytes) for m in mems),
        max(int(m.temp_size_in_bytes) for m in mems),
        sum(int(m.generated_code_size_in_bytes) for m in mems))


def plan(cfg: RunConfig, data: int = 1, model: int = 1, d_in: int | None = None) -> Plan:
    """Compile the training step on abstract shapes and report bytes per device."""
    compiled, states, batches, trainer, simulated = compile_step(cfg, data, model, d_in)
    mem = (_family_memory(compiled, _shard_bytes(batches)) if isinstance(compiled, dict)
           else compiled.memory_analysis())
    params = sum(_shard_bytes(s.sae) for s in states.values())
    opt = sum(_shard_bytes(s.opt_state) for s in states.values())
    total_state = sum(_shard_bytes(s) for s in states.values())
    dev = trainer.mesh.devices.flat[0]
    simulated = simulated or (dev.platform == "cpu" and data * model > 1)
    tensors = {h: param_tensors(trainer.specs[h], states[h].sae.params) for h in states}
    return Plan(
        data=data, model=model,
        d_in={h: s.d_in for h, s in trainer.specs.items()},
        d_sae={h: s.d_sae for h, s in trainer.specs.items()},
        batch_size=cfg.train.batch_size, backend=dev.platform, simulated=simulated,
        params=params, opt_state=opt, other_state=total_state - params - opt,
        batch=_shard_bytes(batches),
        argument=int(mem.argument_size_in_bytes), output=int(mem.output_size_in_bytes),
        alias=int(mem.alias_size_in_bytes), temp=int(mem.temp_size_in_bytes),
        code=int(mem.generated_code_size_in_bytes), tensors=tensors,
    )


def param_tensors(spec, params=None) -> dict[str, dict[str, Any]]:
    """``{name: {"shape", "bytes", "per_device"}}`` of the architecture's main tensors
    (`Arch.param_shapes`: a cross-layer transcoder's W_dec [d_sae, L, d_in] is its bulk);
    ``params`` (abstract or real arrays with shardings) gives the bytes per device."""
    from jsae.sae.archs import get_arch

    out = {}
    for name, shape in get_arch(spec.architecture).param_shapes(spec).items():
        total = math.prod(shape) * 4
        leaf = None if params is None else params.get(name)
        if leaf is not None and tuple(leaf.shape) != tuple(shape):
            raise ValueError(f"{name}: the step holds {tuple(leaf.shape)}, the architecture "
                             f"declares {tuple(shape)}")
        per_device = total if getattr(leaf, "sharding", None) is None else _shard_bytes(leaf)
        out[name] = {"shape": list(shape), "bytes": total, "per_device": per_device}
    return out


def largest_d_sae(
    cfg: RunConfig, budget_bytes: float, data: int = 1, model: int = 1,
    d_in: int | None = None, probes: tuple[int, int] = (1 << 16, 1 << 17),
) -> tuple[int, Plan, Plan]:
    """Largest d_sae whose planned peak fits ``budget_bytes`` per device (computed, linear fit).

    The peak is affine in d_sae at fixed batch and d_in (every buffer is either independent
    of d_sae or proportional to it), so two compiles at ``probes`` give its slope and offset.
    Returns (d_sae rounded down to a multiple of 256 * model, plan at probe 0, plan at probe 1).
    The probes (latents per model shard) should be in the regime of the answer: the fast
    path's AuxK switches from a dense to a sparse decoder once d_sae >= 48 * aux_k.
    """
    if cfg.family:
        raise ConfigError("config key 'family': the largest width that fits is planned for one "
                          "dictionary; plan without the family (or each member's config)")
    plans = []
    for f in probes:
        c = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, d_sae=f * model,
                                                             expansion=None))
        plans.append(plan(c, data, model, d_in))
    (f0, f1), (p0, p1) = [f * model for f in probes], plans
    slope = (p1.peak - p0.peak) / (f1 - f0)
    offset = p0.peak - slope * f0
    step = 256 * model
    best = int((budget_bytes - offset) / slope) // step * step
    return best, p0, p1


def parse_mesh(text: str) -> tuple[int, int]:
    """``data=D,model=M`` (either part optional) -> (D, M)."""
    out = {"data": 1, "model": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, val = part.partition("=")
        if key not in out or not val.isdigit() or int(val) < 1:
            raise ConfigError(f"--mesh {text!r}: expected data=D,model=M with positive integers")
        out[key] = int(val)
    return out["data"], out["model"]


__all__ = ["Plan", "compile_step", "ensure_devices", "largest_d_sae", "param_tensors",
           "parse_mesh", "plan", "resolve_d_in"]
