"""Checks of a config against this machine, before any work: devices, mesh, shapes, memory.

`jsae.config.validate` checks what a config says on its own; :func:`preflight` what it asks of
the devices at hand (mesh size, batch and latent splits, bytes of the training state), so that
an impossible run fails in a second with the key, the value and what would work, instead of
after minutes of loading or with an attempt at a 4 TB allocation.
"""

from __future__ import annotations

import os

import jax

from jsae.config import ConfigError, RunConfig

# Bytes per latent of the training state (fp32 params + two Adam moments of W_enc, W_dec,
# b_enc; threshold and fired_ago counters are small next to them) and of the batch's dense
# pre-activations (encoder output, its gradient and the top-k workspace).
_STATE_COPIES = 3
_BATCH_COPIES = 3


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mesh_shape(cfg: RunConfig, n_devices: int) -> tuple[int, int]:
    """(data, model) the config's mesh gives on ``n_devices``, or ConfigError saying why not."""
    m = cfg.mesh
    if n_devices % m.model:
        raise ConfigError(
            f"config key 'mesh.model': {m.model} does not divide the {n_devices} available "
            f"{jax.default_backend()} device(s); use one of {_divisors(n_devices)}")
    data = n_devices // m.model if m.data == -1 else m.data
    if data * m.model > n_devices:
        raise ConfigError(
            f"config key 'mesh.data': data={data} x model={m.model} needs {data * m.model} "
            f"devices but {n_devices} are available; use mesh.data=-1 (all) or at most "
            f"{n_devices // m.model}")
    return data, m.model


def state_bytes(d_in: int, d_sae: int, batch: int, *, data: int = 1, model: int = 1,
                params_per_latent: float | None = None) -> int:
    """Bytes per device the training step needs at the least (state + dense pre-activations).

    ``params_per_latent``: parameters per latent (default a plain SAE's 2 d_in + 2; a
    cross-layer transcoder's decoder writes every layer: `dictionary_specs`)."""
    per_param = 2 * d_in + 2 if params_per_latent is None else params_per_latent
    per_latent = int(4 * (_STATE_COPIES * per_param + 1))
    rows = -(-batch // data)
    return (-(-d_sae // model)) * (per_latent + 4 * _BATCH_COPIES * rows) + 4 * 3 * d_in


def device_memory() -> tuple[int | None, str]:
    """(bytes one device can hold, what it is): the accelerator's limit, or the host's RAM."""
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"one {dev.platform} device holds"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, ""
    return int(ram), "this machine has"


def _fmt(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


def dictionary_specs(cfg: RunConfig, d_in: int) -> list:
    """The specs of the dictionaries ``cfg`` trains (the trainer's own layout over
    ``model.hooks``): one per hook, per transcoder, or one over several hooks (every family
    member's, member after member)."""
    return [s for specs in member_specs(cfg, d_in).values() for s in specs]


def member_specs(cfg: RunConfig, d_in: int) -> dict:
    """Per family member (its index; None for a run of one dictionary), the specs it trains."""
    from jsae.config import member_config
    from jsae.train.loop import _layout, spec_from_config

    hooks = list(cfg.model.hooks)
    inputs, _ = _layout(cfg, hooks, {h: d_in for h in hooks})
    cfgs = ({i: member_config(cfg, i) for i in range(len(cfg.family))} if cfg.family
            else {None: cfg})
    return {i: [spec_from_config(c, d_in, n_hooks=len(ins)) for ins in inputs.values()]
            for i, c in cfgs.items()}


def params_per_latent(spec) -> float:
    """Parameters per latent of ``spec``'s architecture (`Arch.param_shapes`)."""
    import math

    shapes = spec.arch.param_shapes(spec).values()
    return sum(math.prod(s) for s in shapes) / spec.d_sae


def check_memory(cfg: RunConfig, d_in: int, data: int, model: int) -> None:
    d_sae = cfg.resolved_d_sae(d_in)
    if not cfg.model.hooks:  # hooks known once the model is (a set over all layers)
        return
    have, what = device_memory()
    if have is None:
        return
    on_host = what.startswith("this machine")
    per_member = {i: sum(state_bytes(d_in, s.d_sae, cfg.train.batch_size, data=data,
                                     model=model, params_per_latent=params_per_latent(s))
                         for s in specs)
                  for i, specs in member_specs(cfg, d_in).items()}
    total = sum(per_member.values()) * (data * model if on_host else 1)
    if total <= have:
        return
    if cfg.family:  # every member's state is held at once: name the largest
        _refuse_member(cfg, d_in, per_member, total, have, what, on_host, data, model)
    per_latent = total / d_sae
    fits = max(int(have / per_latent) // 256 * 256, 0)
    key = "sae.d_sae" if cfg.sae.d_sae is not None else "sae.expansion"
    raise ConfigError(
        f"config key '{key}': d_sae={d_sae:,} (d_in {d_in}, batch {cfg.train.batch_size}, mesh "
        f"data={data} model={model}) needs at least {_fmt(total)} ({total:,} bytes) "
        f"{'in all' if on_host else 'per device'} for the SAE, its Adam state and the "
        f"pre-activations, but {what} {_fmt(have)}; use d_sae <= ~{fits:,}, more mesh.model "
        "shards or a smaller train.batch_size (`jsae plan CONFIG` shows the compiled figure)")


def _refuse_member(cfg: RunConfig, d_in: int, per_member: dict, total: int, have: int,
                   what: str, on_host: bool, data: int, model: int) -> None:
    """ConfigError naming the family's largest member, with what it and the others need."""
    from jsae.config import member_config

    i = max(per_member, key=per_member.get)
    m, scale = cfg.family[i], data * model if on_host else 1
    c = member_config(cfg, i)
    key = "sae.d_sae" if c.sae.d_sae is not None else "sae.expansion"
    key = f"family[{i}].{key}" if ("d_sae" in m.sae or "expansion" in m.sae) else key
    rest = (total - per_member[i] * scale)
    raise ConfigError(
        f"config key '{key}': family member {m.name!r} (d_sae={c.resolved_d_sae(d_in):,}, d_in "
        f"{d_in}, batch {cfg.train.batch_size}, mesh data={data} model={model}) needs at least "
        f"{_fmt(per_member[i] * scale)} {'in all' if on_host else 'per device'} and the other "
        f"{len(per_member) - 1} member(s) {_fmt(rest)}, all held at once, but {what} "
        f"{_fmt(have)}; make it smaller, drop members, use more mesh.model shards or a smaller "
        "train.batch_size (`jsae plan CONFIG` shows the compiled figure)")


def preflight(cfg: RunConfig, *, d_in: int | None = None, memory: bool = True) -> tuple[int, int]:
    """Check ``cfg`` against the devices of this process; returns the mesh (data, model)."""
    n = jax.device_count()
    data, model = mesh_shape(cfg, n)
    b, procs = cfg.train.batch_size, jax.process_count()
    if b % data:
        up = -(-b // data) * data
        raise ConfigError(
            f"config key 'train.batch_size': {b} is not divisible by the mesh's data axis "
            f"({data} devices); use a multiple of {data}, e.g. {up}")
    if b % procs:
        raise ConfigError(
            f"config key 'train.batch_size': {b} is not divisible by the {procs} processes; "
            f"use a multiple of {procs}")
    if d_in is None:
        try:
            from jsae.plan import resolve_d_in

            d_in = resolve_d_in(cfg)
        except Exception:  # noqa: BLE001 - unknown width: the trainer checks it once loaded
            d_in = None
    d_sae = cfg.sae.d_sae if d_in is None else cfg.resolved_d_sae(d_in)
    if d_sae is not None and d_sae % model:
        key = "sae.d_sae" if cfg.sae.d_sae is not None else "sae.expansion"
        raise ConfigError(
            f"config key '{key}': d_sae={d_sae} is not divisible by mesh.model={model} (the "
            f"latents are split evenly over the model axis); use a multiple of {model}, e.g. "
            f"{-(-d_sae // model) * model}")
    from jsae.sae.archs import get_arch

    if d_sae is not None:
        try:
            get_arch(cfg.sae.architecture).check(cfg.sae.options, d_sae)
        except ValueError as e:  # an OptionError names its key
            raise ConfigError(f"config key {e}") from None
    if cfg.family:
        _check_members(cfg, d_in, model)
    if memory and d_in is not None:
        check_memory(cfg, d_in, data, model)
    if d_sae is not None:
        from jsae.train.loop import check_index_range

        check_index_range(d_sae, model)
    return data, model


def _check_members(cfg: RunConfig, d_in: int | None, model: int) -> None:
    """Each family member's width against the mesh (`preflight`'s checks of the run's)."""
    from jsae.config import member_config
    from jsae.sae.archs import get_arch
    from jsae.train.loop import check_index_range

    for i, m in enumerate(cfg.family):
        c = member_config(cfg, i)
        d_sae = c.sae.d_sae if d_in is None else c.resolved_d_sae(d_in)
        if d_sae is None:
            continue
        where = f"family[{i}].sae.{'d_sae' if c.sae.d_sae is not None else 'expansion'}"
        try:
            if d_sae % model:
                raise ValueError(f"d_sae={d_sae} is not divisible by mesh.model={model} (the "
                                 "latents are split evenly over the model axis)")
            get_arch(c.sae.architecture).check(c.sae.options, d_sae)
            check_index_range(d_sae, model)
        except ValueError as e:
            raise ConfigError(f"config key '{where}' (member {m.name!r}): "
                              f"{' '.join(str(e).split())}") from None


__all__ = ["check_memory", "device_memory", "dictionary_specs", "member_specs", "mesh_shape",
           "params_per_latent",
           "preflight", "state_bytes"]
