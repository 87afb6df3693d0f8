"""A training run directory, read: its config, its hooks, its SAEs, its latest checkpoint.

What ``jsae train`` writes (``jsae.train.rundir`` guards the writing)::

    RUN/config.yaml                 the accepted config
    RUN/saes/<hook>/                final SAEs (``jsae.sae.io``; '/' in a hook name -> '_'); a
                                transcoder's is under its input hook, metadata
                                ``hook_name_out`` naming the hook it reconstructs
    RUN/saes/<hook>/<name>/         a family's members (config key ``family``): keyed
                                ``<hook>@<name>``, metadata ``family_member`` the name
    RUN/saes/set.json               a set (``sae.layers``): its layers and, per layer, the
                                dictionary key and its two hooks (`read_set`); a cross-layer
                                transcoder is one key, its input hooks joined with '+'; a
                                family of sets: one record, ``family`` its members' names
    RUN/checkpoints/<step>/         Orbax checkpoints (``jsae.train.checkpoint``)

Export, evaluation, analysis and the CLI commands all open runs through this module, so a run
has one meaning: the hooks it trains, and for each hook the newest SAE (the final folder, or a
later checkpoint of an unfinished or resumed run; a damaged final folder falls back to the last
checkpoint, with a warning).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from jsae.errors import FileFormatError
from jsae.sae.core import SAE

KEY_JOIN = "+"  # a crosscoder's key: its hooks joined ("blocks.3.hook_resid_post+blocks.6...")
# a family member's key: its hook's key and its name ("blocks.6.hook_resid_post@w4k"), its
# folder saes/<hook>/<name>/
MEMBER_JOIN = "@"


def member_key(key: str, name: str) -> str:
    """The key of family member ``name`` on the dictionary key ``key``."""
    return f"{key}{MEMBER_JOIN}{name}"


def split_member(key: str) -> tuple[str, str | None]:
    """(the hook's key, the member's name) of a family member's key; (key, None) otherwise."""
    base, sep, name = key.rpartition(MEMBER_JOIN)
    return (base, name) if sep else (key, None)


def input_hooks(key: str) -> list[str]:
    """The hooks a dictionary keyed ``key`` reads: one, or a crosscoder's several (a family
    member reads its hook's)."""
    return split_member(key)[0].split(KEY_JOIN)


def stack_hooks(acts, key: str, xp=None):
    """``acts[hook]`` for a one-hook key; a crosscoder's hooks stacked ``[..., L, d]``."""
    hooks = input_hooks(key)
    if len(hooks) == 1:
        return acts[hooks[0]]
    if xp is None:
        import numpy as xp
    return xp.stack([acts[h] for h in hooks], axis=-2)


MAX_DIRNAME = 128  # file systems allow 255 bytes; an 18-layer CLT's joined key is ~400


def sae_dirname(hook: str) -> str:
    """The folder name of ``hook``'s SAE under ``RUN/saes/``: the key itself, or for a long
    one (a dictionary over many hooks) its start, its hook count and a hash of the whole key,
    so it stays unique and within the file system's limit. The hook names live in sae.json.
    A family member's is its name under its hook's folder: ``<hook>/<name>``."""
    base, member = split_member(hook)
    if member is not None:
        return f"{sae_dirname(base)}/{member}"
    name = hook.replace("/", "_")
    if len(name) <= MAX_DIRNAME:
        return name
    import hashlib

    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[:80]}~{len(hook.split(KEY_JOIN))}-hooks~{digest}"


def is_run(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "saes").is_dir() or (p / "checkpoints").is_dir())


def run_config(run_dir: str | Path) -> dict:
    """The run's config.yaml as a plain dict (not validated: reading never needs a trainer)."""
    f = Path(run_dir) / "config.yaml"
    if not f.exists():
        raise FileNotFoundError(f"{run_dir} is not a jsae run directory ({f} is missing)")
    return yaml.safe_load(f.read_text()) or {}


def model_section(run_dir: str | Path) -> dict:
    """The ``model`` section of config.yaml (name, path, dtype, hooks as a list); {} if absent."""
    f = Path(run_dir) / "config.yaml"
    if not f.exists():
        return {}
    m = dict((yaml.safe_load(f.read_text()) or {}).get("model") or {})
    if isinstance(m.get("hooks"), str):
        m["hooks"] = [m["hooks"]]
    return m


def saved_hooks(run_dir: str | Path) -> list[str]:
    """Keys with a final SAE folder under ``RUN/saes/`` (names from the SAE metadata; a
    family member's folder ``saes/<hook>/<name>/`` gives its key ``<hook>@<name>``)."""
    saes = Path(run_dir) / "saes"
    hooks = []
    found = [*saes.glob("*/sae.json"), *saes.glob("*/*/sae.json")] if saes.is_dir() else []
    for meta in sorted(found):
        if any(p.name.startswith(".") for p in (meta.parent, meta.parent.parent)):
            continue  # a save cut off before its rename into place
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            info = {}
        m = info.get("metadata") or {}
        hook = m.get("hook_name") or meta.parent.name
        member = m.get("family_member")
        hooks.append(member_key(hook, member) if isinstance(member, str) else hook)
    return hooks


def output_hook(run_dir: str | Path, hook: str) -> str | None:
    """The hook ``hook``'s dictionary reconstructs when it is not ``hook`` itself (a
    transcoder's ``sae.output_hook``; in a set, the template's at the key's layer; a cross-layer
    transcoder's key: its output hooks joined), from config.yaml; None for an SAE. A family
    member's is its hook's."""
    from jsae.config import layer_hook, template_layer

    hook = split_member(hook)[0]

    try:
        sae_cfg = run_config(run_dir).get("sae") or {}
    except FileNotFoundError:
        return None
    ins, outs = sae_cfg.get("input_hook"), sae_cfg.get("output_hook")
    if not (isinstance(ins, str) and isinstance(outs, str)):
        return None
    if sae_cfg.get("layers") is None:
        return outs if ins == hook else None
    layers = [template_layer(ins, h) for h in input_hooks(hook)]
    if any(L is None for L in layers):
        return None
    return KEY_JOIN.join(layer_hook(outs, L) for L in layers)


SET_RECORD = "set.json"  # RUN/saes/set.json: a set's layers and, per layer, its dictionary


def write_set_record(run_dir: str | Path, record: dict) -> None:
    """Write ``RUN/saes/set.json`` (a set's layers, dictionaries and hooks per layer)."""
    from jsae import jsonsafe

    (Path(run_dir) / "saes").mkdir(parents=True, exist_ok=True)
    jsonsafe.write(Path(run_dir) / "saes" / SET_RECORD, record)


def read_set(run_dir: str | Path, member: str | None = None) -> dict | None:
    """The run's ``saes/set.json`` (checked), or None when the run is not a set: ``layers``
    [int], ``dictionaries`` [key], ``per_layer`` [{layer, key, input_hook, output_hook}].

    A family of sets (``family``: the members' names) is read one member at a time: ``member``
    names it, and its keys are the record's ``<key>@<member>``; one line (`BadInput`) when
    it is not given or not a member."""
    from jsae import validate as v

    f = Path(run_dir) / "saes" / SET_RECORD
    if not f.is_file():
        return None
    rec = v.mapping(v.read_json(f, "transcoder set record"), "", f)
    layers = rec.get("layers")
    if not isinstance(layers, list) or not all(isinstance(L, int) and L >= 0 for L in layers):
        raise v.bad(f, "field 'layers'", f"is {layers!r}; expected a list of layers")
    per = rec.get("per_layer")
    if not isinstance(per, list) or len(per) != len(layers) or not all(
            isinstance(p, dict) and p.get("layer") == L and all(
                isinstance(p.get(k), str) for k in ("key", "input_hook", "output_hook"))
            for p, L in zip(per, layers)):
        raise v.bad(f, "field 'per_layer'", "does not list each layer's key, input_hook and "
                    "output_hook in the order of 'layers'")
    family = rec.get("family")
    if family is None:
        check_member(run_dir, member, [])
        return rec
    if not isinstance(family, list) or not all(isinstance(n, str) and n for n in family):
        raise v.bad(f, "field 'family'", f"is {family!r}; expected the members' names")
    check_member(run_dir, member, family)
    return {**rec, "member": member,
            "dictionaries": [member_key(k, member) for k in rec["dictionaries"]],
            "per_layer": [{**p, "key": member_key(p["key"], member)} for p in per]}


def check_member(run_dir: str | Path, member: str | None, family: list[str]) -> None:
    """One line (`BadInput`) unless ``member`` picks one of ``family`` (the run's members'
    names; [] when the run is not a family, where ``member`` must be None)."""
    from jsae.errors import BadInput

    if not family and member is not None:
        raise BadInput(f"--member {member!r}: {run_dir} is not a family (no config key 'family')")
    if family and member is None:
        raise BadInput(f"{run_dir} holds a family ({', '.join(family)}); name one member "
                       "with --member NAME")
    if family and member not in family:
        raise BadInput(f"--member {member!r}: {run_dir} has no such member; its family: "
                       f"{', '.join(family)}")


def member_hooks(run_dir: str | Path, member: str | None) -> list[str]:
    """The run's keys (`run_hooks`) of family member ``member``, or of the whole run when it is
    not a family and ``member`` is None; one line otherwise (a family needs a member)."""
    hooks = run_hooks(run_dir)
    names = list(dict.fromkeys(n for n in (split_member(h)[1] for h in hooks) if n))
    check_member(run_dir, member, names)
    return [h for h in hooks if split_member(h)[1] == member]


def member_saes(run_dir: str | Path, member: str | None = None
                ) -> tuple[dict[str, SAE], dict[str, str], dict[str, dict]]:
    """The dictionaries of the run (of a family: ``member``'s, `member_hooks`) keyed by their
    hooks' keys (a member's without ``@name``): each SAE and info as `sae_from_run` reads them,
    and the hook each reconstructs (its own key for an SAE)."""
    saes, outs, infos = {}, {}, {}
    for k in member_hooks(run_dir, member):
        base = split_member(k)[0]
        saes[base], infos[base] = sae_from_run(run_dir, k)
        outs[base] = output_hook(run_dir, k) or infos[base].get("hook_name_out") or base
    return saes, outs, infos


def output_hooks(run_dir: str | Path) -> dict[str, str]:
    """hook -> the hook its dictionary reconstructs (itself for an SAE), for every run hook."""
    return {h: output_hook(run_dir, h) or h for h in run_hooks(run_dir)}


def latest_step(run_dir: str | Path) -> int | None:
    """Step of the newest finished checkpoint (None if there is none)."""
    from jsae.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir)


def run_hooks(run_dir: str | Path) -> list[str]:
    """The hooks the run trains: from its newest checkpoint, else from its final SAEs."""
    run_dir = Path(run_dir)
    step = latest_step(run_dir)
    if step is not None:
        meta = json.loads((run_dir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
        return list(meta["hooks"])
    hooks = saved_hooks(run_dir)
    if not hooks:
        raise FileNotFoundError(f"{run_dir}: no saved SAEs under {run_dir / 'saes'} and no "
                                "checkpoints/ (train first: jsae train CONFIG)")
    return hooks


def _pick_hook(run_dir: Path, hook: str | None, hooks: list[str]) -> str:
    if hook is None:
        if len(hooks) > 1:
            raise ValueError(f"{run_dir} trains several hooks {hooks}; name one with --hook")
        return hooks[0]
    if hook not in hooks:
        raise FileNotFoundError(f"{run_dir}: no SAE for hook {hook!r}; saved: {', '.join(hooks)}")
    return hook


def sae_from_checkpoint(run_dir: str | Path, hook: str, step: int | None = None
                        ) -> tuple[SAE, dict[str, Any]]:
    """``hook``'s SAE from the run's checkpoint ``step`` (default: the newest)."""
    import jax.numpy as jnp

    from jsae.sae.spec import spec_from_dict
    from jsae.train.checkpoint import read_checkpoint

    ck = read_checkpoint(run_dir, step)
    spec = spec_from_dict(ck["meta"]["specs"][hook])
    s = ck["states"][hook]["sae"]
    sae = SAE(params={k: jnp.asarray(v) for k, v in s["params"].items()},
              norm_scale=jnp.asarray(s["norm_scale"]), spec=spec)
    info = {"hook_name": hook, "step": ck["step"],
            "from": str(Path(run_dir) / "checkpoints" / str(ck["step"]))}
    out = output_hook(run_dir, hook)
    if out is not None:
        info["hook_name_out"] = out
    return sae, info


def sae_from_run(run_dir: str | Path, hook: str | None = None, *,
                 step: int | None = None) -> tuple[SAE, dict[str, Any]]:
    """(SAE, info) of ``hook``: the final ``saes/<hook>`` folder, or the newest (or given)
    checkpoint when that is later. info: hook_name, step, from (the folder read)."""
    from jsae.sae.io import load_sae

    run_dir = Path(run_dir)
    hook = _pick_hook(run_dir, hook, run_hooks(run_dir))
    final = run_dir / "saes" / sae_dirname(hook)
    latest = latest_step(run_dir)
    if step is None and (final / "sae.json").exists():
        try:
            sae, meta = load_sae(final)
        except FileFormatError as e:  # damaged saes/<hook>: the last checkpoint, said out loud
            if latest is None:
                raise
            print(f"warning: {e.args[0].split('; ')[0]}; using checkpoint step {latest} instead",
                  file=sys.stderr)
        else:
            if latest is None or int(meta.get("steps", 0)) >= latest:
                return sae, {**meta, "hook_name": hook, "step": meta.get("steps"), "from": str(final)}
    return sae_from_checkpoint(run_dir, hook, step)


def saes_from_run(run_dir: str | Path) -> dict[str, SAE]:
    """hook -> SAE for every hook of a run (each as `sae_from_run` picks it)."""
    return {h: sae_from_run(run_dir, h)[0] for h in run_hooks(run_dir)}


__all__ = [
    "KEY_JOIN", "MEMBER_JOIN", "SET_RECORD", "member_key", "split_member", "input_hooks",
    "is_run", "latest_step", "stack_hooks", "model_section",
    "output_hook", "output_hooks", "read_set", "check_member", "member_hooks", "member_saes",
    "run_config",
    "write_set_record",
    "run_hooks", "sae_dirname",
    "sae_from_checkpoint", "sae_from_run", "saes_from_run", "saved_hooks",
]
