"""Save and load a jsae SAE: ``sae.safetensors`` (params + norm_scale) and ``sae.json`` (spec).

Writes go to a temporary folder that is renamed into place, so a crash never leaves a
half-written SAE behind.  ``sae.json`` records the weights file's size and SHA-256
(``files``); :func:`load_sae` checks both before reading, so a truncated or altered file is an
error naming the path (and, inside a run directory, the checkpoint to fall back on) instead of
a reshape failure or silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jsae import jsonsafe
from jsae.errors import FileFormatError
from jsae.fileio import atomic_folder
from jsae.sae.registry import get_arch
from jsae.sae.spec import SAE, SAESpec, spec_from_dict, spec_to_dict

FORMAT = "jsae-sae-v1"
WEIGHTS = "sae.safetensors"


def save_sae(sae: SAE, path: str | Path, metadata: dict | None = None, *,
             owner: str = "jsae", dtype: str = "float32") -> Path:
    """Write ``sae`` (host or single-process arrays) to the folder ``path``, atomically.
    ``dtype="float16"`` halves the file (a dictionary to copy off a machine); `load_sae` gives
    the parameters back in the stored dtype."""
    store = np.dtype(dtype)
    if store not in (np.float32, np.float16):
        raise ValueError(f"save_sae stores float32 or float16, not {dtype}")

    def write(tmp: Path) -> None:
        tensors = {k: np.asarray(jax.device_get(v), np.float32).astype(store)
                   for k, v in sae.params.items()}
        tensors["norm_scale"] = np.asarray(jax.device_get(sae.norm_scale), np.float32).reshape(())
        save_file(tensors, str(tmp / WEIGHTS))
        return {WEIGHTS: file_record(tmp / WEIGHTS)}

    return _write_folder(Path(path), sae, metadata, write, owner)


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

    def write_weights(tmp: Path) -> dict:
        h = hashlib.sha256()
        with open(tmp / "sae.safetensors", "wb") as f:
            for piece in _pieces():
                h.update(piece)
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        return {WEIGHTS: {"bytes": (tmp / WEIGHTS).stat().st_size, "sha256": h.hexdigest()}}

    def _pieces():
        yield len(blob).to_bytes(8, "little")
        yield blob
        for name in names:
            for block in chunks(tensors[name]):
                yield np.ascontiguousarray(block, "<f4").tobytes()

    if not write:  # take part in every fetch (collectives), write nothing
        for name in names:
            for _ in chunks(tensors[name]):
                pass
        return Path(path)
    return _write_folder(Path(path), sae, metadata, write_weights)


def _write_folder(path: Path, sae: SAE, metadata: dict | None, write_weights,
                  owner: str = "jsae") -> Path:
    """Write sae.safetensors (by ``write_weights(tmp)``) and sae.json into a temporary
    folder next to ``path``, then rename it into place (replacing an older one)."""
    with atomic_folder(path, owner=owner) as tmp:  # `owner`: the command, for jsae.outputs
        files = write_weights(tmp)
        info = {"format": FORMAT, "spec": spec_to_dict(sae.spec),
                "metadata": metadata or {}, "files": files}
        (tmp / "sae.json").write_text(jsonsafe.dumps(info, indent=2))
    return path


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def fallback_hint(folder: Path) -> str:
    """What to use instead of a damaged ``RUN/saes/<hook>``: the run's last checkpoint."""
    if folder.parent.name != "saes":
        return ""
    run = folder.parent.parent
    try:
        from jsae.train.checkpoint import latest_checkpoint

        step = latest_checkpoint(run)
    except Exception:  # noqa: BLE001 - a hint only
        step = None
    if step is None:
        return f"; {run} has no checkpoint to fall back on: retrain it (`jsae train --fresh`)"
    return (f"; the run's last checkpoint (step {step} in {run / 'checkpoints'}) is intact "
            f"if it loads: `jsae export {run} --step {step} --format saelens OUT` rebuilds the "
            "dictionary from it")


def check_folder(path: str | Path) -> dict:
    """sae.json of an SAE folder after checking sae.safetensors' size and checksum.

    Raises :class:`FileFormatError` naming the damaged file and the fallback.
    """
    path = Path(path)
    meta_file, weights = path / "sae.json", path / WEIGHTS
    for f in (meta_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"not a jsae SAE folder: {f} is missing")
    try:
        info = json.loads(meta_file.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise FileFormatError(f"{meta_file} is not valid JSON ({e}){fallback_hint(path)}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise FileFormatError(f"{meta_file}: unknown format {got!r}; expected {FORMAT}")
    files = info.get("files") or {}
    want = files.get(WEIGHTS) if isinstance(files, dict) else None
    if want is not None and not (isinstance(want, dict)
                                 and isinstance(want.get("bytes"), int)
                                 and isinstance(want.get("sha256"), (str, type(None)))):
        raise FileFormatError(f"{meta_file}: field 'files.{WEIGHTS}' is {want!r:.80}; expected "
                              f"{{\"bytes\": N, \"sha256\": HEX}}{fallback_hint(path)}")
    if want:  # folders written before checksums were recorded have none
        size = weights.stat().st_size
        if size != want.get("bytes"):
            raise FileFormatError(
                f"{weights} is damaged: {size:,} bytes, {want.get('bytes'):,} were written"
                f"{fallback_hint(path)}")
        if want.get("sha256") and file_record(weights)["sha256"] != want["sha256"]:
            raise FileFormatError(
                f"{weights} is damaged: its SHA-256 differs from the one recorded in "
                f"{meta_file}{fallback_hint(path)}")
    return info


def load_sae(path: str | Path) -> tuple[SAE, dict]:
    """Returns (sae, metadata) from a folder written by `save_sae` (checked, see above)."""
    path = Path(path)
    info = check_folder(path)
    weights = path / WEIGHTS
    spec = _checked_spec(info, path / "sae.json")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise FileFormatError(f"{weights} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}){fallback_hint(path)}") from e
    if "norm_scale" not in tensors:
        raise FileFormatError(f"{weights}: tensor norm_scale is missing{fallback_hint(path)}")
    scale = tensors.pop("norm_scale")

    expected = get_arch(spec.architecture).param_shapes(spec)
    for name, shape in expected.items():
        if name not in tensors:
            raise FileFormatError(f"{weights}: tensor {name} is missing{fallback_hint(path)}")
        if tuple(tensors[name].shape) != shape:
            raise FileFormatError(f"{weights}: {name} has shape {tensors[name].shape}, "
                                  f"expected {shape}{fallback_hint(path)}")
    from jsae.validate import bad, finite_array

    if np.shape(scale) != () or not np.isfinite(scale) or float(scale) <= 0:
        raise bad(weights, "tensor norm_scale", f"is {np.asarray(scale).tolist()!r:.60}; expected "
                  f"one finite number > 0{fallback_hint(path)}")
    for name in expected:
        finite_array(tensors[name], f"tensor {name}", weights)
    meta = info.get("metadata") or {}
    if not isinstance(meta, dict):
        raise bad(path / "sae.json", "field 'metadata'", f"is {type(meta).__name__}; expected an "
                  "object")
    params = {k: jnp.asarray(v) for k, v in tensors.items()}
    return SAE(params=params, norm_scale=jnp.asarray(scale), spec=spec), meta


def read_spec(path: str | Path) -> tuple[SAESpec, dict]:
    """(spec, metadata) from an SAE folder's sae.json alone, checked, without reading the
    weights (what a command needs to compare dictionaries' shapes and read their records)."""
    from jsae import validate as v

    meta_file = Path(path) / "sae.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"not a jsae SAE folder: {meta_file} is missing")
    info = v.mapping(v.read_json(meta_file, "SAE metadata"), "", meta_file)
    if info.get("format") != FORMAT:
        raise FileFormatError(f"{meta_file}: unknown format {info.get('format')!r}; expected "
                              f"{FORMAT}")
    meta = info.get("metadata") or {}
    if not isinstance(meta, dict):
        raise v.bad(meta_file, "field 'metadata'", f"is {type(meta).__name__}; expected an object")
    return _checked_spec(info, meta_file), meta


def _checked_spec(info: dict, meta_file: Path) -> SAESpec:
    """sae.json's spec, its fields typed and in range (a hand-edited or damaged spec is refused
    in one line naming the field)."""
    from jsae import validate as v

    d = v.mapping(v.field(info, "spec", dict, meta_file), "field 'spec'", meta_file)
    v.field(d, "architecture", str, meta_file, prefix="spec.")
    d_sae = v.field(d, "d_sae", int, meta_file, prefix="spec.", lo=1)
    v.field(d, "d_in", int, meta_file, prefix="spec.", lo=1)
    try:
        spec = spec_from_dict(d)
        get_arch(spec.architecture).check(spec.options, d_sae)
        return spec
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{meta_file}: bad spec ({' '.join(str(e).split())})") from e
