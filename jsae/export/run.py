"""`export_run` (what `jsae export` does): a run's SAEs (read through `jsae.runs`) in another format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jsae.runs import (
    is_run,
    member_hooks,
    run_config,
    run_hooks,
    sae_dirname,
    sae_from_run,
    split_member,
)
from jsae.sae.core import SAE

FORMATS = ("saelens", "gemmascope", "jsae", "circuit-tracer", "gemmascope2")
# formats that hold all of a run's layers in one folder (`jsae.export.circuits`)
CIRCUIT_FORMATS = ("circuit-tracer", "gemmascope2")


def save_gemmascope(sae: SAE, out: str | Path, *, owner: str = "jsae") -> Path:
    """``params.npz`` in Gemma Scope's layout (jumprelu / batchtopk SAEs) in the folder ``out``."""
    from jsae.export.saelens import saelens_tensors
    from jsae.fileio import atomic_folder
    from jsae.sae.archs import all_archs, get_arch

    if not get_arch(sae.spec.architecture).gemmascope_export:
        fits = ", ".join(a.name for a in all_archs() if a.gemmascope_export)
        raise ValueError(f"the Gemma Scope format holds JumpReLU SAEs ({fits}), "
                         f"not {sae.spec.architecture}")
    _, t = saelens_tensors(sae)
    # Gemma Scope encodes x @ W_enc + b_enc without subtracting b_dec.
    b_enc = t["b_enc"] - (t["b_dec"].astype(np.float64) @ t["W_enc"]).astype(np.float32)
    out = Path(out)
    with atomic_folder(out, owner=owner) as tmp, open(tmp / "params.npz", "wb") as f:
        np.savez(f, W_enc=t["W_enc"], W_dec=t["W_dec"], b_enc=b_enc, b_dec=t["b_dec"],
                 threshold=t["threshold"])
    return out / "params.npz"


EXPORT = "jsae export"  # the owner jsae.outputs records in an export folder


def _read_circuit_folder(path: Path):
    """(dictionaries, metadata) of a circuit-tracer or Gemma Scope 2 folder (converted by
    `export_run` like a run's); None when ``path`` is neither."""
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir()}
    if "config.yaml" in names and any(n.startswith(("layer_", "W_enc_")) for n in names):
        from jsae.export.circuit_tracer import load_circuit_tracer

        return load_circuit_tracer(path)
    if any(n.startswith(("params_layer_", "layer_")) for n in names):
        from jsae.export.gemmascope2 import load_gemmascope2

        return load_gemmascope2(path)
    return None


def _save_circuit(format: str, saes: list, out: Path, model_name: str | None) -> Path:
    """A run's transcoders (every layer's, or its CLT) in one circuit-tracing folder."""
    from jsae.export.circuit_tracer import save_circuit_tracer
    from jsae.export.circuits import gather
    from jsae.export.gemmascope2 import save_gemmascope2

    c = gather([(split_member(h)[0], info.get("hook_name_out"), sae) for h, sae, info in saes],
               model_name)  # a family member's transcoders under their hooks
    save = save_circuit_tracer if format == "circuit-tracer" else save_gemmascope2
    return save(c, out, owner=EXPORT)


def export_run(run_dir: str | Path, out: str | Path, *, format: str = "saelens",
               hooks: list[str] | None = None, step: int | None = None,
               overwrite: bool = False, member: str | None = None) -> list[Path]:
    """Write the run's SAEs in ``format``; one hook -> ``out``, several -> ``out/<hook>``
    (circuit-tracer and gemmascope2: every layer's transcoder, or the CLT, in ``out``; of a
    family of them, ``member``'s: such a run is exported a member at a time).
    ``run_dir`` may also be a circuit-tracer or Gemma Scope 2 folder, converted.

    ``out`` follows `jsae.outputs`' rule (new, empty, an earlier export, or ``overwrite``;
    never a run or a cache), checked before anything is read or written."""
    from jsae import outputs
    from jsae.errors import BadInput
    from jsae.export.saelens import save_saelens
    from jsae.sae.io import save_sae

    if format not in FORMATS:
        raise BadInput(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    outputs.claim_folder(out, EXPORT, overwrite=overwrite)
    imported = None if is_run(run_dir) else _read_circuit_folder(run_dir)
    if imported is None:
        cfg, available = run_config(run_dir), run_hooks(run_dir)
    else:
        cfg, available = {"model": {"name": imported[1].get("model_name")}}, list(imported[0])
    if member is not None and hooks:
        raise BadInput("give --hook (dictionaries by key) or --member (a family member's), "
                       "not both")
    if imported is None and (member is not None or (format in CIRCUIT_FORMATS and not hooks)):
        hooks = member_hooks(run_dir, member)  # a family's circuit export: one member's set
    elif member is not None:
        raise BadInput(f"--member {member!r}: {run_dir} is not a jsae run (a family's members "
                       "are a run's)")
    hooks = hooks or available
    unknown = [h for h in hooks if h not in available]
    if unknown:
        raise BadInput(f"--hook {unknown[0]!r}: {run_dir} has no dictionary for it; its hooks: "
                       f"{', '.join(available) or 'none'}")
    if len(hooks) > 1 and format not in CIRCUIT_FORMATS:
        for h in hooks:
            outputs.claim_folder(out / sae_dirname(h), EXPORT, overwrite=overwrite)
    data = cfg.get("data", {})
    synthetic = data.get("source") == "synthetic"
    if imported is None:
        saes = [(h, *sae_from_run(run_dir, h, step=step)) for h in hooks]  # all read first
    else:
        saes = [(h, imported[0][h], {"hook_name": h, "step": None,
                                     "hook_name_out": imported[1]["hook_names_out"][h]})
                for h in hooks]
    if format in CIRCUIT_FORMATS:
        return [_save_circuit(format, saes, out, None if synthetic else
                              cfg.get("model", {}).get("name"))]
    written = []
    for h, sae, info in saes:
        dest = out if len(hooks) == 1 else out / sae_dirname(h)
        hook, member = split_member(h)  # a family member reads its hook
        if format == "saelens":
            dataset = None if synthetic else (data.get("path") or data.get("dataset"))
            save_saelens(
                sae, dest, hook_name=hook, owner=EXPORT,
                model_name="synthetic" if synthetic else cfg.get("model", {}).get("name"),
                context_size=None if synthetic else data.get("context_length"),
                prepend_bos=None if synthetic else data.get("prepend_bos"),
                dataset_path=dataset,
                exclude_special_tokens=None if synthetic else data.get("exclude_bos"),
                metadata={"jsae_run_dir": str(run_dir.absolute()), "jsae_step": info["step"],
                          **({"jsae_family_member": member} if member else {}),
                          **({"hook_name_out": info["hook_name_out"]}
                             if info.get("hook_name_out") else {})},
            )
            written.append(dest)
        elif format == "gemmascope":
            written.append(save_gemmascope(sae, dest, owner=EXPORT))
        else:
            meta = {"hook_name": hook, "steps": info["step"],
                    **({"family_member": member} if member else {})}
            if info.get("hook_name_out"):
                meta["hook_name_out"] = info["hook_name_out"]
            written.append(save_sae(sae, dest, metadata=meta, owner=EXPORT))
    if len(hooks) > 1:
        outputs.write_marker(out, EXPORT, [*outputs.marked_files(out, EXPORT),
                                           *(sae_dirname(h) + "/" for h in hooks)])
    return written


__all__ = ["CIRCUIT_FORMATS", "FORMATS", "export_run", "run_hooks", "save_gemmascope", "sae_from_run"]
