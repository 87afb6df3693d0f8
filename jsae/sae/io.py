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
    """Write ``sae`` (host or single-process arrays) to the folder ``path``, atomically."""
    def write(tmp: Path) -> None:
        tensors = {k: np.asarray(jax.device_get(v), np.float32) for k, v in sae.params.items()}
        tensors["norm_scale"] = np.asarray(jax.device_get(sae.norm_scale), np.float32).reshape(())
        save_file(tensors, str(tmp / "sae.safetensors"))

    return _write_folder(Path(path), sae, metadata, write)


def save_sae_from_mesh(sae: SAE, path: str | Path, metadata: dict | None = None, *,
                       write: bool = True, chunk_bytes: int = 1 << 28) -> Path:
    """`save_sae` for an SAE whose arrays are sharded over a mesh, possibly across hosts.

    A collective: every process calls it; only ``write=True`` (process 0) writes.  Each
    tensor is fetched a block of rows at a time (at most ``chunk_bytes``, replicated to every
    device, then to the host) and streamed into the safetensors file, so no host ever holds
    the whole dictionary (155 GB for 16M latents at d_in 1152).
    """
    tensors = {**sae.params, "norm_scale": jnp.reshape(sae.norm_scale, ())}
    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        n = int(np.prod(tensors[name].shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes

    def chunks(x):
        if x.ndim == 0:
            yield np.asarray(jax.device_get(x), np.float32)
            return
        rows = x.shape[0]
        per = max(1, min(rows, chunk_bytes // max(4 * int(np.prod(x.shape[1:])), 1)))
        repl = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec()) \
            if isinstance(x.sharding, jax.sharding.NamedSharding) else None
        take = jax.jit(lambda x, i: jax.lax.dynamic_slice_in_dim(x, i, per, 0),
                       out_shardings=repl)
        done = 0
        while done < rows:
            start = min(done, rows - per)  # the last block overlaps: keep only its new rows
            block = np.asarray(jax.device_get(take(x, start)), np.float32)
            yield block[done - start:]
            done = start + per

    def write_weights(tmp: Path) -> None:
        with open(tmp / "sae.safetensors", "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name in names:
                for block in chunks(tensors[name]):
                    f.write(np.ascontiguousarray(block, "<f4").tobytes())
            f.flush()
            os.fsync(f.fileno())

    if not write:  # take part in every fetch (collectives), write nothing
        for name in names:
            for _ in chunks(tensors[name]):
                pass
        return Path(path)
    return _write_folder(Path(path), sae, metadata, write_weights)


def _write_folder(path: Path, sae: SAE, metadata: dict | None, write_weights) -> Path:
    """Write sae.safetensors (by ``write_weights(tmp)``) and sae.json into a temporary
    folder next to ``path``, then rename it into place (replacing an older one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write_weights(tmp)
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
