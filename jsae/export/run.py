"""`export_run` (what `jsae export` does): a run's SAEs (read through `jsae.runs`) in another format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jsae.runs import run_config, run_hooks, sae_dirname, sae_from_run
from jsae.sae.core import SAE

FORMATS = ("saelens", "gemmascope", "jsae")


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
        dest = out if len(hooks) == 1 else out / sae_dirname(h)
        if format == "saelens":
            dataset = None if synthetic else (data.get("path") or data.get("dataset"))
            save_saelens(
                sae, dest, hook_name=h,
                model_name="synthetic" if synthetic else cfg.get("model", {}).get("name"),
                context_size=None if synthetic else data.get("context_length"),
                prepend_bos=None if synthetic else data.get("prepend_bos"),
                dataset_path=dataset,
                exclude_special_tokens=None if synthetic else data.get("exclude_bos"),
                metadata={"jsae_run_dir": str(run_dir.absolute()), "jsae_step": info["step"],
                          **({"hook_name_out": info["hook_name_out"]}
                             if info.get("hook_name_out") else {})},
            )
            written.append(dest)
        elif format == "gemmascope":
            written.append(save_gemmascope(sae, dest))
        else:
            meta = {"hook_name": h, "steps": info["step"]}
            if info.get("hook_name_out"):
                meta["hook_name_out"] = info["hook_name_out"]
            written.append(save_sae(sae, dest, metadata=meta))
    return written


__all__ = ["FORMATS", "export_run", "run_hooks", "save_gemmascope", "sae_from_run"]
