"""Gemma Scope JumpReLU SAEs (``params.npz`` / ``params.safetensors``) into jsae.

Gemma Scope (Gemma 2) ships ``params.npz`` with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
d_in]``, ``b_enc``, ``b_dec``, ``threshold``; Gemma Scope 2 (Gemma 3) ships
``params.safetensors`` with ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``. Both
encode ``relu(x @ W_enc + b_enc) * (pre > threshold)`` on raw activations, without
subtracting b_dec (SAELens: ``apply_b_dec_to_input = False``).

Gemma Scope 2's transcoders (folders ``transcoder...``/``clt...``, config.json with
``hf_hook_point_out``) read the MLP's input and write its output; with
``affine_connection`` they also hold ``affine_skip_connection [d_in, d_out]`` (x @ it is
added to the output): jsae's ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``, keyed
at ``blocks.L.hook_resid_mid`` (TransformerLens's ``hook_mlp_in``, as SAELens names it)
with ``hook_name_out`` ``blocks.L.hook_mlp_out``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from jsae import validate as v
from jsae.errors import FileFormatError
from jsae.export.saelens import _read_safetensors, sae_from_tensors
from jsae.sae.archs import for_gemmascope
from jsae.sae.core import SAE

_FILES = ("params.npz", "params.safetensors")


def _find(path: Path) -> Path:
    if path.is_file():
        return path
    for name in _FILES:
        if (path / name).exists():
            return path / name
    found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.npz"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"no Gemma Scope params ({' or '.join(_FILES)}) in {path}")


def _read_npz(f: Path) -> dict[str, np.ndarray]:
    """The arrays of a ``params.npz`` (a damaged or pickled one: one-line `FileFormatError`)."""
    try:
        with np.load(f, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise v.bad(f, "", "holds one array, not the named arrays of a params.npz")
            out = {}
            for k in data.files:
                a = data[k]
                if a.dtype.kind not in "fiu":
                    raise v.bad(f, f"array {k!r}", f"holds {a.dtype} values; expected numbers")
                out[k] = np.asarray(a, np.float32)
            return out
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, FileFormatError):
            raise
        raise FileFormatError(f"{f} is not a readable .npz file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''})") from e


def _guess_hook(text: str) -> str | None:
    m = re.search(r"layer_(\d+)", text)
    if not m:
        return None
    layer = int(m.group(1))
    for key, hook in (("resid_post", "hook_resid_post"), ("mlp", "hook_mlp_out"),
                      ("att", "hook_attn_out"), ("res", "hook_resid_post")):
        if key in text:
            return f"blocks.{layer}.{hook}"
    return None


def load_gemmascope(
    path: str | Path, *, hook_name: str | None = None, model_name: str | None = None
) -> tuple[SAE, dict[str, Any]]:
    """A Gemma Scope SAE (file, or folder holding params.npz / params.safetensors).

    Returns ``(sae, metadata)``; the hook name is taken from the argument, a ``config.json``
    beside the weights, or guessed from a ``layer_N/..`` path (else None).
    """
    f = _find(Path(path))
    if f.suffix == ".npz":
        tensors = _read_npz(f)
    else:
        tensors = _read_safetensors(f)
    meta: dict[str, Any] = {"source": "gemma-scope", "file": str(f)}
    cfg_file = f.parent / "config.json"
    if cfg_file.exists():
        meta["config"] = v.mapping(v.read_json(cfg_file, "Gemma Scope config.json"), "", cfg_file)
        for key in ("model_name", "hf_hook_point_out"):
            v.field(meta["config"], key, (str, None), cfg_file, default=None)
    raw = meta.get("config") or {}
    where = "/".join(f.parent.parts[-4:])
    transcoder = ("affine_skip_connection" in tensors or bool(raw.get("hf_hook_point_out"))
                  or bool(re.search(r"(^|/)(transcoder|clt)", where)))
    kind = "sae"
    if transcoder:
        kind = "mlp"
        if "affine_skip_connection" in tensors:
            kind = "mlp_skip"  # SAELens's W_skip is [d_out, d_in]
            tensors = {**tensors, "W_skip": np.asarray(tensors.pop("affine_skip_connection")).T}
    sae = sae_from_tensors(for_gemmascope(kind).saelens_name, tensors, apply_b_dec_to_input=False, source=str(f))
    meta["model_name"] = model_name or raw.get("model_name")
    if transcoder:
        layer = re.search(r"layer_(\d+)", where)
        meta["hook_name"] = hook_name or (f"blocks.{layer.group(1)}.hook_resid_mid" if layer else None)
        meta["hook_name_out"] = (f"blocks.{layer.group(1)}.hook_mlp_out" if layer else None)
    else:
        meta["hook_name"] = hook_name or _guess_hook(where)
    return sae, meta


__all__ = ["load_gemmascope"]
