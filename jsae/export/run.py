"""Trained SAEs out of a run directory, and `export_run` (what `jsae export` does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import yaml

from jsae.errors import FileFormatError
from jsae.sae.core import SAE, SAESpec
from jsae.sae.io import load_sae

FORMATS = ("saelens", "gemmascope", "jsae")


def _dirname(hook: str) -> str:
    return hook.replace("/", "_")


def run_config(run_dir: str | Path) -> dict:
    f = Path(run_dir) / "config.yaml"
    if not f.exists():
        raise FileNotFoundError(f"{run_dir} is not a jsae run directory ({f} is missing)")
    return yaml.safe_load(f.read_text()) or {}


def run_hooks(run_dir: str | Path) -> list[str]:
    from jsae.train.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    step = latest_checkpoint(run_dir)
    if step is not None:
        meta = json.loads((run_dir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
        return list(meta["hooks"])
    saes = run_dir / "saes"
    hooks = []
    for d in sorted(saes.glob("*/sae.json")) if saes.exists() else []:
        info = json.loads(d.read_text())
        hooks.append(info.get("metadata", {}).get("hook_name") or d.parent.name)
    if not hooks:
        raise FileNotFoundError(f"no trained SAE in {run_dir} (no saes/ and no checkpoints/)")
    return hooks


def sae_from_run(run_dir: str | Path, hook: str | None = None, *,
                 step: int | None = None) -> tuple[SAE, dict[str, Any]]:
    """The SAE of ``hook`` in a run: the final ``saes/<hook>`` folder, or the newest (or
    given) checkpoint when that is later (an unfinished or resumed run)."""
    from jsae.train.checkpoint import latest_checkpoint, read_checkpoint

    run_dir = Path(run_dir)
    hooks = run_hooks(run_dir)
    if hook is None:
        if len(hooks) > 1:
            raise ValueError(f"{run_dir} trains several hooks {hooks}; name one with --hook")
        hook = hooks[0]
    if hook not in hooks:
        raise ValueError(f"hook {hook!r} is not in {run_dir} (it has {hooks})")
    final = run_dir / "saes" / _dirname(hook)
    latest = latest_checkpoint(run_dir)
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
                return sae, {"hook_name": hook, "step": meta.get("steps"), "from": str(final)}
    ck = read_checkpoint(run_dir, step)
    spec = SAESpec(**ck["meta"]["specs"][hook])
    s = ck["states"][hook]["sae"]
    sae = SAE(params={k: jnp.asarray(v) for k, v in s["params"].items()},
              norm_scale=jnp.asarray(s["norm_scale"]), spec=spec)
    return sae, {"hook_name": hook, "step": ck["step"],
                 "from": str(run_dir / "checkpoints" / str(ck["step"]))}


def save_gemmascope(sae: SAE, out: str | Path) -> Path:
    """``params.npz`` in Gemma Scope's layout (jumprelu / batchtopk SAEs)."""
    from jsae.export.saelens import saelens_tensors

    arch, t = saelens_tensors(sae)
    if arch != "jumprelu":
        raise ValueError("the Gemma Scope format holds JumpReLU SAEs (jumprelu or batchtopk), "
                         f"not {sae.spec.architecture}")
    # Gemma Scope encodes x @ W_enc + b_enc without subtracting b_dec.
    b_enc = t["b_enc"] - (t["b_dec"].astype(np.float64) @ t["W_enc"]).astype(np.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "params.npz", W_enc=t["W_enc"], W_dec=t["W_dec"], b_enc=b_enc,
             b_dec=t["b_dec"], threshold=t["threshold"])
    return out / "params.npz"


def export_run(run_dir: str | Path, out: str | Path, *, format: str = "saelens",
               hooks: list[str] | None = None, step: int | None = None) -> list[Path]:
    """Write the run's SAEs in ``format``; one hook -> ``out``, several -> ``out/<hook>``."""
    from jsae.export.saelens import save_saelens
    from jsae.sae.io import save_sae

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    cfg = run_config(run_dir)
    hooks = hooks or run_hooks(run_dir)
    data = cfg.get("data", {})
    synthetic = data.get("source") == "synthetic"
    written = []
    for h in hooks:
        sae, info = sae_from_run(run_dir, h, step=step)
        dest = out if len(hooks) == 1 else out / _dirname(h)
        if format == "saelens":
            dataset = None if synthetic else (data.get("path") or data.get("dataset"))
            save_saelens(
                sae, dest, hook_name=h,
                model_name="synthetic" if synthetic else cfg.get("model", {}).get("name"),
                context_size=None if synthetic else data.get("context_length"),
                prepend_bos=None if synthetic else data.get("prepend_bos"),
                dataset_path=dataset,
                exclude_special_tokens=None if synthetic else data.get("exclude_bos"),
                metadata={"jsae_run_dir": str(run_dir.absolute()), "jsae_step": info["step"]},
            )
            written.append(dest)
        elif format == "gemmascope":
            written.append(save_gemmascope(sae, dest))
        else:
            written.append(save_sae(sae, dest, metadata={"hook_name": h, "steps": info["step"]}))
    return written


__all__ = ["FORMATS", "export_run", "run_hooks", "save_gemmascope", "sae_from_run"]
