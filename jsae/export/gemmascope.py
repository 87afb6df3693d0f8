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

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from jsae.export.saelens import _read_safetensors, sae_from_tensors
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
        with np.load(f) as data:
            tensors = {k: np.asarray(data[k], np.float32) for k in data.files}
    else:
        tensors = _read_safetensors(f)
    meta: dict[str, Any] = {"source": "gemma-scope", "file": str(f)}
    cfg_file = f.parent / "config.json"
    if cfg_file.exists():
        try:
            meta["config"] = json.loads(cfg_file.read_text())
        except json.JSONDecodeError:
            pass
    raw = meta.get("config") or {}
    where = "/".join(f.parent.parts[-4:])
    transcoder = ("affine_skip_connection" in tensors or bool(raw.get("hf_hook_point_out"))
                  or bool(re.search(r"(^|/)(transcoder|clt)", where)))
    arch = "jumprelu"
    if transcoder:
        arch = "jumprelu_transcoder"
        if "affine_skip_connection" in tensors:
            arch = "jumprelu_skip_transcoder"  # SAELens's W_skip is [d_out, d_in]
            tensors = {**tensors, "W_skip": np.asarray(tensors.pop("affine_skip_connection")).T}
    sae = sae_from_tensors(arch, tensors, apply_b_dec_to_input=False, source=str(f))
    meta["model_name"] = model_name or raw.get("model_name")
    if transcoder:
        layer = re.search(r"layer_(\d+)", where)
        meta["hook_name"] = hook_name or (f"blocks.{layer.group(1)}.hook_resid_mid" if layer else None)
        meta["hook_name_out"] = (f"blocks.{layer.group(1)}.hook_mlp_out" if layer else None)
    else:
        meta["hook_name"] = hook_name or _guess_hook(where)
    return sae, meta


__all__ = ["load_gemmascope"]
