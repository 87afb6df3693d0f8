"""circuit-tracer's folders (a transcoder per layer, or a cross-layer transcoder), written and read.

What circuit-tracer reads, checked against its 0.5.0 source (``transcoder/
single_layer_transcoder.py``, ``transcoder/cross_layer_transcoder.py``, ``utils/caching.py``,
``utils/hf_utils.py``) and round-tripped through it in tests/test_circuit_formats.py:

- A folder with ``config.yaml`` (``model_kind``: ``transcoder_set`` | ``cross_layer_transcoder``,
  ``feature_input_hook`` / ``feature_output_hook``: TransformerLens hook names without the
  ``blocks.{layer}.`` prefix, e.g. ``hook_resid_mid`` / ``hook_mlp_out``, or ``mlp.hook_in``
  (Gemma 3's normalised MLP input), ``model_name``, optional ``scan``) is what
  ``load_transcoders_from_cache`` (hence ``load_transcoder_from_hub`` with a local cache and
  ``ReplacementModel.from_pretrained``) loads; a hub repository has the same files. So an
  export ``OUT`` loads as ``load_transcoder_from_hub(OUT.name, cache_dir=OUT.parent)`` or, with
  ``CIRCUIT_TRACER_CACHE_DIR=OUT.parent``, ``ReplacementModel.from_pretrained(model, OUT.name)``.
- ``transcoder_set``: ``layer_{i}.safetensors`` for every layer 0..N-1 (``TranscoderSet``
  asserts that every layer from 0 to the last has one, all with one ``d_transcoder``), each
  ``W_enc [n, d]`` (``pre = x @ W_enc.T + b_enc``), ``W_dec [n, d]``, ``b_enc [n]``, ``b_dec
  [d]``, optional ``activation_function.threshold [n]`` (JumpReLU ``pre * (pre > threshold)``;
  without it ReLU) and optional ``W_skip [d, d]`` (``+ x @ W_skip.T``). ``load_relu_transcoder``
  reads them; there is no TopK on disk (``TopK`` exists only as a module to build by hand).
- ``cross_layer_transcoder``: ``W_enc_{i}.safetensors`` holding ``W_enc_{i} [n, d]``, ``b_enc_{i}
  [n]``, ``b_dec_{i} [d]`` (layer i's output bias), optional ``threshold_{i} [n]`` (JumpReLU,
  else ReLU), and ``W_dec_{i}.safetensors`` holding ``W_dec_{i} [n, L - i, d]`` (layer i's
  features' writes to layers i..L-1); L is the number of ``W_enc_*`` files. ``load_clt`` reads
  no skip connection from these files. Layer t's output: ``sum_{l <= t} z_l @ W_dec_l[:, t - l]
  + b_dec_t``.
- Tensors are float32 here (circuit-tracer casts to the dtype asked for).

jsae writes that layout from a `jsae.export.circuits.Circuit` (norm folded in, float32) and
reads it back strictly: a missing layer file, a tensor of the wrong shape or a non-finite value
is one `FileFormatError` naming the file and the tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jsae import validate as v
from jsae.errors import BadInput, FileFormatError
from jsae.export.circuits import CROSS_LAYER, PER_LAYER, Circuit, hook_names, to_saes
from jsae.export.saelens import _read_safetensors, tl_hook_to_jsae
from jsae.fileio import atomic_folder
from jsae.sae.core import SAE

CONFIG = "config.yaml"
KINDS = {PER_LAYER: "transcoder_set", CROSS_LAYER: "cross_layer_transcoder"}
THRESHOLD = "activation_function.threshold"


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32))


def save_circuit_tracer(c: Circuit, out: str | Path, *, owner: str = "jsae") -> Path:
    """Write ``c`` as circuit-tracer's folder ``out`` (config.yaml + safetensors files)."""
    from safetensors.numpy import save_file

    if c.layers != list(range(len(c.layers))):
        missing = sorted(set(range(max(c.layers) + 1)) - set(c.layers))
        raise BadInput(f"circuit-tracer needs a transcoder for every layer 0..{max(c.layers)}; "
                       f"missing layer(s) {', '.join(map(str, missing))}")
    files: dict[str, dict[str, np.ndarray]] = {}
    if c.kind == PER_LAYER:
        for i, t in zip(c.layers, c.tensors):
            f = {"W_enc": t["W_enc"].T, "W_dec": t["W_dec"], "b_enc": t["b_enc"],
                 "b_dec": t["b_dec"], THRESHOLD: t["threshold"]}
            if "W_skip" in t:
                f["W_skip"] = t["W_skip"].T  # circuit-tracer adds x @ W_skip.T
            files[f"layer_{i}.safetensors"] = f
    else:
        t = c.tensors[0]
        n_layers = len(c.layers)
        n = t["b_enc"].shape[0] // n_layers
        for i in c.layers:
            rows = slice(i * n, (i + 1) * n)
            files[f"W_enc_{i}.safetensors"] = {
                f"W_enc_{i}": t["W_enc"][i].T, f"b_enc_{i}": t["b_enc"][rows],
                f"b_dec_{i}": t["b_dec"][i], f"threshold_{i}": t["threshold"][rows]}
            files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": t["W_dec"][rows, i:]}
    config = {"model_kind": KINDS[c.kind], "model_name": c.model_name,
              "feature_input_hook": c.site_in, "feature_output_hook": c.site_out,
              "trained_with": "jsae"}
    out = Path(out)
    with atomic_folder(out, owner=owner) as tmp:
        for name, tensors in files.items():
            save_file({k: _f32(a) for k, a in tensors.items()}, str(tmp / name))
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return out


# ---- reading ----------------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    f = path / CONFIG
    if not f.exists():
        raise FileNotFoundError(f"not a circuit-tracer folder: {f} is missing")
    try:
        cfg = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{f}: not YAML ({' '.join(str(e).split())[:160]})") from e
    cfg = v.mapping(cfg, "", f)
    v.field(cfg, "model_kind", str, f, choices=tuple(KINDS.values()))
    for key in ("feature_input_hook", "feature_output_hook"):
        site = v.field(cfg, key, str, f)
        if not site or site.startswith("blocks."):
            raise v.bad(f, f"field {key!r}", f"is {site!r}; expected a hook name without its "
                        "layer (e.g. hook_resid_mid)")
    v.field(cfg, "model_name", (str, None), f, default=None)
    return cfg


def _layer_files(path: Path, pattern: str, what: str) -> list[Path]:
    """``pattern`` ('layer_{}') files for layers 0..N-1; a gap is an error naming it."""
    rx = re.compile(pattern.format(r"(\d+)") + r"\.safetensors")
    found = {int(m.group(1)): p for p in path.iterdir() if (m := rx.fullmatch(p.name))}
    if not found:
        raise FileFormatError(f"{path}: no {pattern.format('N')}.safetensors files ({what})")
    top = max(found)
    missing = sorted(set(range(top + 1)) - set(found))
    if missing:
        raise FileFormatError(f"{path}: {pattern.format(missing[0])}.safetensors is missing "
                              f"({what} needs one file per layer 0..{top}; found layers "
                              f"{', '.join(map(str, sorted(found)))})")
    return [found[i] for i in range(top + 1)]


def _tensor(t: dict, name: str, f: Path, shape) -> np.ndarray:
    if name not in t:
        raise v.bad(f, f"tensor {name!r}", f"is missing (found {', '.join(sorted(t))})")
    return v.finite_array(t[name], f"tensor {name!r}", f, shape=shape)


def _read_per_layer(path: Path) -> list[dict[str, np.ndarray]]:
    out, first = [], None
    for f in _layer_files(path, "layer_{}", "a transcoder set"):
        t = _read_safetensors(f)
        w_enc = _tensor(t, "W_enc", f, (None, None) if first is None else first)
        n, d = w_enc.shape
        if n == 0 or d == 0:
            raise v.bad(f, "tensor 'W_enc'", f"has shape {list(w_enc.shape)}; expected "
                        "[d_transcoder, d_model] with both > 0")
        first = first or (n, d)
        layer = {"W_enc": w_enc.T, "W_dec": _tensor(t, "W_dec", f, (n, d)),
                 "b_enc": _tensor(t, "b_enc", f, (n,)), "b_dec": _tensor(t, "b_dec", f, (d,))}
        layer["threshold"] = (_tensor(t, THRESHOLD, f, (n,)) if THRESHOLD in t
                              else np.zeros((n,), np.float32))  # none: ReLU
        if "W_skip" in t:
            layer["W_skip"] = _tensor(t, "W_skip", f, (d, d)).T
        out.append(layer)
    skips = {"W_skip" in t for t in out}
    if len(skips) > 1:
        raise FileFormatError(f"{path}: some layer files hold W_skip and some not; a set is one "
                              "or the other")
    return out


def _read_cross_layer(path: Path) -> dict[str, np.ndarray]:
    enc = _layer_files(path, "W_enc_{}", "a cross-layer transcoder")
    n_layers = len(enc)
    dec = [path / f"W_dec_{i}.safetensors" for i in range(n_layers)]
    for f in dec:
        if not f.exists():
            raise FileFormatError(f"{f} is missing (a cross-layer transcoder over {n_layers} "
                                  "layers needs W_dec_0..W_dec_{n_layers - 1})")
    parts: dict[str, list] = {"W_enc": [], "b_enc": [], "b_dec": [], "threshold": []}
    w_dec, shape = [], None
    for i, (fe, fd) in enumerate(zip(enc, dec)):
        t = _read_safetensors(fe)
        w = _tensor(t, f"W_enc_{i}", fe, shape or (None, None))
        n, d = shape = w.shape
        parts["W_enc"].append(w.T)
        parts["b_enc"].append(_tensor(t, f"b_enc_{i}", fe, (n,)))
        parts["b_dec"].append(_tensor(t, f"b_dec_{i}", fe, (d,)))
        parts["threshold"].append(_tensor(t, f"threshold_{i}", fe, (n,)) if f"threshold_{i}" in t
                                  else np.zeros((n,), np.float32))
        wd = _tensor(_read_safetensors(fd), f"W_dec_{i}", fd, (n, n_layers - i, d))
        full = np.zeros((n, n_layers, d), np.float32)
        full[:, i:] = wd  # writes to earlier layers do not exist
        w_dec.append(full)
    return {"W_enc": np.stack(parts["W_enc"]), "W_dec": np.concatenate(w_dec),
            "b_enc": np.concatenate(parts["b_enc"]), "b_dec": np.stack(parts["b_dec"]),
            "threshold": np.concatenate(parts["threshold"])}


def read_circuit_tracer(path: str | Path) -> Circuit:
    """The `Circuit` in circuit-tracer's folder ``path`` (checked; nothing is built yet)."""
    path = Path(path)
    cfg = _read_config(path)
    site_in, site_out = (tl_hook_to_jsae(f"blocks.0.{cfg[k]}")[len("blocks.0."):]
                         for k in ("feature_input_hook", "feature_output_hook"))
    if cfg["model_kind"] == KINDS[PER_LAYER]:
        tensors = _read_per_layer(path)
        kind = PER_LAYER
    else:
        tensors = [_read_cross_layer(path)]
        kind = CROSS_LAYER
    n_layers = len(tensors) if kind == PER_LAYER else tensors[0]["W_enc"].shape[0]
    return Circuit(kind, list(range(n_layers)), tensors, site_in, site_out, cfg.get("model_name"))


def load_circuit_tracer(path: str | Path) -> tuple[dict[str, SAE], dict[str, Any]]:
    """circuit-tracer's folder as jsae dictionaries keyed by input hook (a CLT: one, its hooks
    joined by ``+``), and metadata: ``model_name``, ``kind``, ``hook_names_out`` (key -> the
    hook(s) it writes)."""
    c = read_circuit_tracer(path)
    return to_saes(c), {**hook_names(c), "source": "circuit-tracer", "path": str(path)}


__all__ = ["load_circuit_tracer", "read_circuit_tracer", "save_circuit_tracer"]
