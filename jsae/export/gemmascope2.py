"""Gemma Scope 2's transcoders and cross-layer transcoders, written and read.

Gemma Scope 2 (Gemma 3) ships, per dictionary folder, ``config.json`` and safetensors of float32
arrays, the JumpReLU rule ``z = pre * (pre > threshold)`` with ``pre = x @ w_enc + b_enc`` on raw
activations (no input centring), as circuit-tracer 0.5.0 reads them
(``load_gemma_scope_2_transcoder``, ``load_gemma_scope_2_clt``):

- a transcoder (``transcoder/layer_{i}_width_..._l0_.../``): ``params.safetensors`` with ``w_enc
  [d, n]``, ``w_dec [n, d]``, ``b_enc [n]``, ``b_dec [d]``, ``threshold [n]`` and, for the
  "affine" ones, ``affine_skip_connection [d_in, d_out]`` (``x @ it`` added to the output);
  config.json names ``hf_hook_point_in`` (the MLP's input) and ``hf_hook_point_out``.
- a CLT (``clt/...``): ``params_layer_{i}.safetensors`` for every layer i, each ``w_enc [d, n]``
  (layer i's encoder), ``w_dec [n, L, d]`` (its features' writes to every layer; those before
  i are zero), ``b_enc [n]``, ``b_dec [d]`` (layer i's output bias), ``threshold [n]``, optional
  ``affine_skip_connection [d, d]``. circuit-tracer stacks them and keeps ``w_dec[i, :, i:]``.

jsae writes a transcoder set as ``layer_{i}/params.safetensors`` + ``config.json`` (each folder
also loads alone through `jsae.export.load_gemmascope`) and a CLT as ``params_layer_{i}
.safetensors`` + ``config.json``; it reads both back strictly (one line naming the file and
tensor). Hook points are Hugging Face module paths of Gemma 3 where jsae's hook has one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from jsae import validate as v
from jsae.errors import FileFormatError
from jsae.export.circuits import CROSS_LAYER, PER_LAYER, Circuit, hook_names, to_saes
from jsae.export.saelens import _read_safetensors
from jsae.fileio import atomic_folder
from jsae.sae.core import SAE

PARAMS, CONFIG = "params.safetensors", "config.json"
# jsae hook site -> Gemma 3's module output / input (Gemma Scope 2's hf_hook_point_*)
_HF = {"hook_resid_mid": "pre_feedforward_layernorm.input",
       "mlp.hook_in": "pre_feedforward_layernorm.output",
       "hook_mlp_out": "post_feedforward_layernorm.output"}
_SITE = {"pre_feedforward_layernorm.input": "hook_resid_mid",
         "pre_feedforward_layernorm.output": "mlp.hook_in",
         "post_feedforward_layernorm.output": "hook_mlp_out"}


def _hf(site: str, layer: int) -> str | None:
    return f"model.layers.{layer}.{_HF[site]}" if site in _HF else None


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32))


def _config(c: Circuit, layer: int | None, skip: bool, width: int) -> dict[str, Any]:
    cfg = {"architecture": "jump_relu", "model_name": c.model_name, "width": width,
           "affine_connection": skip, "trained_with": "jsae",
           "jsae_hook_site_in": c.site_in, "jsae_hook_site_out": c.site_out}
    if layer is not None:
        cfg["hf_hook_point_in"] = _hf(c.site_in, layer)
        cfg["hf_hook_point_out"] = _hf(c.site_out, layer)
    else:
        cfg["n_layers"] = len(c.layers)
    return cfg


def save_gemmascope2(c: Circuit, out: str | Path, *, owner: str = "jsae") -> Path:
    """Write ``c`` in Gemma Scope 2's layout at the folder ``out``."""
    from safetensors.numpy import save_file

    out = Path(out)
    with atomic_folder(out, owner=owner) as tmp:
        if c.kind == PER_LAYER:
            for i, t in zip(c.layers, c.tensors):
                f = {"w_enc": t["W_enc"], "w_dec": t["W_dec"], "b_enc": t["b_enc"],
                     "b_dec": t["b_dec"], "threshold": t["threshold"]}
                if "W_skip" in t:
                    f["affine_skip_connection"] = t["W_skip"]
                (tmp / f"layer_{i}").mkdir()
                save_file({k: _f32(a) for k, a in f.items()}, str(tmp / f"layer_{i}" / PARAMS))
                cfg = _config(c, i, "W_skip" in t, t["b_enc"].shape[0])
                (tmp / f"layer_{i}" / CONFIG).write_text(json.dumps(cfg, indent=2))
        else:
            t = c.tensors[0]
            n = t["b_enc"].shape[0] // len(c.layers)
            for i in c.layers:
                rows = slice(i * n, (i + 1) * n)
                f = {"w_enc": t["W_enc"][i], "w_dec": t["W_dec"][rows], "b_enc": t["b_enc"][rows],
                     "b_dec": t["b_dec"][i], "threshold": t["threshold"][rows]}
                save_file({k: _f32(a) for k, a in f.items()},
                          str(tmp / f"params_layer_{i}.safetensors"))
            (tmp / CONFIG).write_text(json.dumps(_config(c, None, False, n), indent=2))
    return out


# ---- reading ----------------------------------------------------------------------------


def _tensor(t: dict, name: str, f: Path, shape) -> np.ndarray:
    if name not in t:
        raise v.bad(f, f"tensor {name!r}", f"is missing (found {', '.join(sorted(t))})")
    return v.finite_array(t[name], f"tensor {name!r}", f, shape=shape)


def _read_one(f: Path, shape, n_layers: int | None) -> dict[str, np.ndarray]:
    """One params file in the neutral names (``n_layers``: a CLT layer's file)."""
    t = _read_safetensors(f)
    w_enc = _tensor(t, "w_enc", f, shape or (None, None))
    d, n = w_enc.shape
    if n == 0 or d == 0:
        raise v.bad(f, "tensor 'w_enc'", f"has shape {list(w_enc.shape)}; expected [d_in, "
                    "d_sae] with both > 0")
    out = {"W_enc": w_enc,
           "W_dec": _tensor(t, "w_dec", f, (n, d) if n_layers is None else (n, n_layers, d)),
           "b_enc": _tensor(t, "b_enc", f, (n,)), "b_dec": _tensor(t, "b_dec", f, (d,)),
           "threshold": _tensor(t, "threshold", f, (n,))}
    if (out["threshold"] < 0).any():
        raise v.bad(f, "tensor 'threshold'", f"holds {int((out['threshold'] < 0).sum())} "
                    "negative value(s); JumpReLU thresholds are >= 0")
    if "affine_skip_connection" in t:
        if n_layers is not None:
            raise v.bad(f, "tensor 'affine_skip_connection'", "is not supported in a cross-layer "
                        "transcoder (jsae's CLT has no skip connection)")
        out["W_skip"] = _tensor(t, "affine_skip_connection", f, (d, d))
    return out


def _sites(cfg: dict, f: Path, layer: int | None) -> tuple[str, str]:
    """Hook sites from config.json: jsae's own fields, else Gemma 3's module paths."""
    sites = []
    for key, default in (("in", "hook_resid_mid"), ("out", "hook_mlp_out")):
        site = v.field(cfg, f"jsae_hook_site_{key}", (str, None), f, default=None)
        hf = v.field(cfg, f"hf_hook_point_{key}", (str, None), f, default=None)
        if site is None and hf:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
            if not m or m.group(2) not in _SITE or (layer is not None and int(m.group(1)) != layer):
                raise v.bad(f, f"field 'hf_hook_point_{key}'", f"is {hf!r}; expected "
                            f"model.layers.{'N' if layer is None else layer}.<one of "
                            f"{', '.join(_SITE)}>")
            site = _SITE[m.group(2)]
        sites.append(site or default)
    return sites[0], sites[1]


def read_gemmascope2(path: str | Path) -> Circuit:
    """The `Circuit` in a Gemma Scope 2 folder: a CLT (``params_layer_{i}.safetensors``) or a
    set of transcoder folders ``layer_{i}*/params.safetensors``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"not a Gemma Scope 2 folder: {path}")
    clt = {int(m.group(1)): p for p in path.iterdir()
           if (m := re.fullmatch(r"params_layer_(\d+)\.safetensors", p.name))}
    sets = {int(m.group(1)): p for p in path.iterdir()
            if (m := re.fullmatch(r"layer_(\d+)(_.*)?", p.name)) and (p / PARAMS).exists()}
    found = clt or sets
    if not found:
        raise FileNotFoundError(f"not a Gemma Scope 2 folder: {path} holds neither "
                                "params_layer_N.safetensors nor layer_N*/params.safetensors")
    cfg_file = path / CONFIG
    model_name = None
    if clt:
        missing = sorted(set(range(max(clt) + 1)) - set(clt))
        if missing:
            raise FileFormatError(f"{path}: params_layer_{missing[0]}.safetensors is missing (a "
                                  f"cross-layer transcoder needs layers 0..{max(clt)})")
        cfg = v.mapping(v.read_json(cfg_file, "Gemma Scope 2 config.json"), "", cfg_file) \
            if cfg_file.exists() else {}
        model_name = v.field(cfg, "model_name", (str, None), cfg_file, default=None)
        site_in, site_out = _sites(cfg, cfg_file, None)
        n_layers, shape, layers = len(clt), None, []
        for i in range(n_layers):
            t = _read_one(clt[i], shape, n_layers)
            shape = t["W_enc"].shape
            if np.any(t["W_dec"][:, :i]):  # a feature of layer i writing an earlier layer
                raise v.bad(clt[i], "tensor 'w_dec'", f"writes layers before {i}; a cross-layer "
                            "transcoder's features write their own layer and later ones")
            layers.append(t)
        tensors = [{"W_enc": np.stack([t["W_enc"] for t in layers]),
                    "W_dec": np.concatenate([t["W_dec"] for t in layers]),
                    "b_enc": np.concatenate([t["b_enc"] for t in layers]),
                    "b_dec": np.stack([t["b_dec"] for t in layers]),
                    "threshold": np.concatenate([t["threshold"] for t in layers])}]
        return Circuit(CROSS_LAYER, list(range(n_layers)), tensors, site_in, site_out, model_name)
    tensors, shape, sites = [], None, set()
    for i in sorted(sets):
        f = sets[i] / PARAMS
        t = _read_one(f, shape, None)
        shape = t["W_enc"].shape
        cfg_i = sets[i] / CONFIG
        cfg = v.mapping(v.read_json(cfg_i, "Gemma Scope 2 config.json"), "", cfg_i) \
            if cfg_i.exists() else {}
        model_name = model_name or v.field(cfg, "model_name", (str, None), cfg_i, default=None)
        sites.add(_sites(cfg, cfg_i, i))
        tensors.append(t)
    if len(sites) > 1:
        raise FileFormatError(f"{path}: the layers' config.json name different hook points "
                              f"({sorted(sites)}); a set reads one site at every layer")
    if len({"W_skip" in t for t in tensors}) > 1:
        raise FileFormatError(f"{path}: some layers have affine_skip_connection and some not")
    site_in, site_out = sites.pop()
    return Circuit(PER_LAYER, sorted(sets), tensors, site_in, site_out, model_name)


def load_gemmascope2(path: str | Path) -> tuple[dict[str, SAE], dict[str, Any]]:
    """A Gemma Scope 2 set or CLT folder as jsae dictionaries keyed by input hook, and
    metadata (``model_name``, ``kind``, ``hook_names_out``)."""
    c = read_gemmascope2(path)
    return to_saes(c), {**hook_names(c), "source": "gemma-scope-2", "path": str(path)}


__all__ = ["load_gemmascope2", "read_gemmascope2", "save_gemmascope2"]
