"""Save and load a jsae SAE: ``sae.safetensors`` (params + norm_scale) and ``sae.json`` (spec).

Writes go to a temporary folder that is renamed into place, so a crash never leaves a
half-written SAE behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jsae.sae.core import SAE, SAESpec

FORMAT = "jsae-sae-v1"


def save_sae(sae: SAE, path: str | Path, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: np.asarray(jax.device_get(v), np.float32) for k, v in sae.params.items()}
        tensors["norm_scale"] = np.asarray(jax.device_get(sae.norm_scale), np.float32).reshape(())
        save_file(tensors, str(tmp / "sae.safetensors"))
        info = {"format": FORMAT, "spec": dataclasses.asdict(sae.spec), "metadata": metadata or {}}
        (tmp / "sae.json").write_text(json.dumps(info, indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_sae(path: str | Path) -> tuple[SAE, dict]:
    """Returns (sae, metadata) from a folder written by `save_sae`."""
    path = Path(path)
    meta_file, weights = path / "sae.json", path / "sae.safetensors"
    for f in (meta_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"not a jsae SAE folder: {f} is missing")
    info = json.loads(meta_file.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unknown format {info.get('format')!r}; expected {FORMAT}")
    spec = SAESpec(**info["spec"])
    tensors = load_file(str(weights))
    scale = tensors.pop("norm_scale")
    expected = {"W_enc": (spec.d_in, spec.d_sae), "W_dec": (spec.d_sae, spec.d_in),
                "b_enc": (spec.d_sae,), "b_dec": (spec.d_in,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{weights}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{weights}: {name} has shape {tensors[name].shape}, expected {shape}")
    params = {k: jnp.asarray(v) for k, v in tensors.items()}
    return SAE(params=params, norm_scale=jnp.asarray(scale), spec=spec), info.get("metadata", {})
