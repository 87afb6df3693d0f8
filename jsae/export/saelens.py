"""SAELens 6 folders: ``cfg.json`` + ``sae_weights.safetensors``, written and read.

What SAELens 6 (``SAE.load_from_disk``) reads, checked against sae_lens 6.54 source
(``saes/sae.py``, ``loading/pretrained_sae_loaders.py``, ``saes/*_sae.py``):

- ``cfg.json``: ``architecture`` (``standard`` | ``topk`` | ``jumprelu`` | ``gated``), ``d_in``,
  ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
  ``reshape_activations``, ``k`` and ``rescale_acts_by_decoder_norm`` (topk only), and
  ``metadata`` with ``model_name``, ``hook_name``, ``sae_lens_version`` (>= 6 selects the
  6.x reader; older files are translated from top-level ``hook_point`` etc.).
- ``sae_weights.safetensors``: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec
  [d_in]``, and ``b_enc [d_sae]`` (standard, topk, jumprelu), ``threshold [d_sae]``
  (jumprelu), ``b_gate, r_mag, b_mag [d_sae]`` (gated, no b_enc).

SAELens encodes ``f((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)`` on raw activations,
so the jsae normalisation scale is folded into the weights first (`jsae.sae.fold_norm`).
jsae architectures map as: relu -> standard, topk -> topk, jumprelu -> jumprelu (threshold =
exp(log_threshold)), batchtopk -> jumprelu (its learned inference threshold; the same rule
``pre > threshold``), gated -> gated (b_gate = b_enc).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsae.errors import FileFormatError, JsaeError
from jsae.fileio import atomic_folder
from jsae.sae.archs import Arch, all_archs, from_saelens_name, get_arch
from jsae.sae.core import SAE, SAESpec, fold_norm

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The cfg.json layout version we write: SAELens treats < 6 as the old flat format.
SAELENS_FORMAT_VERSION = "6.0.0"

def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def saelens_tensors(sae: SAE) -> tuple[str, dict[str, np.ndarray]]:
    """(SAELens architecture name, tensors) of ``sae`` with its normalisation folded in."""
    arch = get_arch(sae.spec.architecture)
    if arch.saelens_name is None:
        raise ValueError(f"cannot export architecture {sae.spec.architecture!r} to SAELens")
    p = {k: _np(v) for k, v in fold_norm(sae).params.items()}
    t = arch.to_saelens(p)
    return arch.saelens_name, {k: np.ascontiguousarray(_np(v)) for k, v in t.items()}


def saelens_config(
    sae: SAE,
    *,
    hook_name: str,
    model_name: str,
    context_size: int | None = None,
    prepend_bos: bool | None = None,
    dataset_path: str | None = None,
    exclude_special_tokens: bool | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The cfg.json dict SAELens 6 reads for ``sae``."""
    jarch = get_arch(sae.spec.architecture)
    if jarch.saelens_name is None:
        raise ValueError(f"cannot export architecture {sae.spec.architecture!r} to SAELens")
    arch = jarch.saelens_name
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "prepend_bos": prepend_bos,
        "context_size": context_size,
        "dataset_path": dataset_path,
        "exclude_special_tokens": exclude_special_tokens,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "trained_with": "jsae",
        "jsae_spec": {
            "architecture": sae.spec.architecture,
            **dataclasses.asdict(sae.spec.options),
            "norm_scale_folded": float(np.asarray(jax.device_get(sae.norm_scale))),
        },
    }
    meta.update(metadata or {})
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.spec.d_in,
        "d_sae": sae.spec.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook_name.endswith("hook_z") else "none",
        "metadata": meta,
        # Top-level copies for readers of the pre-6 flat layout (Neuronpedia / SAEBench tools).
        "model_name": model_name,
        "hook_name": hook_name,
    }
    cfg.update(jarch.saelens_cfg(sae.spec))
    return cfg


def save_saelens(sae: SAE, out: str | Path, *, hook_name: str, model_name: str,
                 owner: str = "jsae", **cfg_fields: Any) -> Path:
    """Write ``sae`` as a SAELens 6 folder (cfg.json + sae_weights.safetensors) at ``out``."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _, tensors = saelens_tensors(sae)
    cfg = saelens_config(sae, hook_name=hook_name, model_name=model_name, **cfg_fields)
    with atomic_folder(out, owner=owner) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    return out


# ---- reading ----------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy (bfloat16 / float16 files included)."""
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="flax") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = np.asarray(f.get_tensor(k).astype(jnp.float32))
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise FileFormatError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''})") from e
    except Exception as e:  # safetensors' own SafetensorError (header, offsets, dtype)
        if type(e).__name__ != "SafetensorError":
            raise
        raise FileFormatError(f"{path} is not a readable safetensors file ({e})") from e
    return out


def _normalise_keys(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``w_enc`` / ``w_dec`` (Gemma Scope) -> ``W_enc`` / ``W_dec``."""
    return {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in t.items()}


def sae_from_tensors(
    arch: str,
    tensors: dict[str, np.ndarray],
    *,
    k: int | None = None,
    apply_b_dec_to_input: bool = True,
    source: str = "tensors",
) -> SAE:
    """A jsae SAE (norm_scale 1) from SAELens-named tensors of a SAELens architecture.

    ``arch``: a SAELens architecture some jsae architecture imports (`Arch.saelens_imports`:
    standard, topk, jumprelu, gated, jumprelu_transcoder, jumprelu_skip_transcoder). Without ``apply_b_dec_to_input`` (Gemma
    Scope) the encoder computes ``x @ W_enc + b_enc``; jsae always subtracts b_dec, so the
    encoder biases absorb ``b_dec @ W_enc``.
    """
    from jsae.validate import bad, finite_array

    t = {}
    for k_, v in _normalise_keys(tensors).items():
        a = np.asarray(v)
        if a.dtype.kind not in "fiu":
            raise bad(source, f"tensor {k_!r}", f"holds {a.dtype} values; expected numbers")
        t[k_] = a.astype(np.float32)
    try:
        jarch = from_saelens_name(arch, source)
    except JsaeError:
        raise
    except ValueError as e:
        raise FileFormatError(str(e)) from e
    need = jarch.saelens_required(arch)
    for name in ["W_enc", "W_dec", "b_dec", *need]:
        if name not in t:
            raise FileFormatError(f"{source}: tensor {name!r} is missing (found {sorted(t)})")
    finite_array(t["W_enc"], "tensor 'W_enc'", source, shape=(None, None))
    d_in, d_sae = t["W_enc"].shape
    if d_in == 0 or d_sae == 0:
        raise bad(source, "tensor 'W_enc'", f"has shape {list(t['W_enc'].shape)}; expected "
                  "[d_in, d_sae] with both > 0")
    shapes = {"W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes.update({n: (d_sae,) for n in need})
    for name, shape in shapes.items():
        if t[name].shape != shape:
            raise FileFormatError(f"{source}: {name} has shape {t[name].shape}, expected {shape} "
                                  f"(W_enc is {t['W_enc'].shape}: [d_in, d_sae])")
    for name in t:  # W_skip, scaling_factor, ... too: a NaN anywhere poisons every code
        finite_array(t[name], f"tensor {name!r}", source)
    if "scaling_factor" in t and t["scaling_factor"].shape != (d_sae,):
        raise bad(source, "tensor 'scaling_factor'", f"has shape {list(t['scaling_factor'].shape)}; "
                  f"expected [{d_sae}] (d_sae)")
    if "threshold" in t and (t["threshold"] < 0).any():
        raise bad(source, "tensor 'threshold'", f"holds {int((t['threshold'] < 0).sum())} "
                  "negative value(s); JumpReLU thresholds are >= 0")
    w_dec = t["W_dec"]
    if "scaling_factor" in t and not np.allclose(t["scaling_factor"], 1.0):
        w_dec = w_dec * t["scaling_factor"][:, None]  # old finetuning scaling: z * s @ W_dec
    params = {"W_enc": t["W_enc"], "W_dec": w_dec, "b_dec": t["b_dec"]}

    def shift(w: np.ndarray) -> np.ndarray:  # b_dec @ w, absorbed into the encoder biases
        if apply_b_dec_to_input:
            return np.zeros((w.shape[-1],), np.float32)
        return (t["b_dec"].astype(np.float64) @ w.astype(np.float64)).astype(np.float32)

    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer))
                          or not 0 < k <= d_sae):
        raise FileFormatError(f"{source}: k={k!r}; expected an integer in 1..{d_sae} (d_sae)")
    try:
        params.update(jarch.from_saelens(arch, t, shift, source))
        unit = bool(np.allclose(np.linalg.norm(w_dec, axis=-1), 1.0, atol=1e-3))
        spec = SAESpec(architecture=jarch.name, d_in=int(d_in), d_sae=int(d_sae),
                       **jarch.spec_from_saelens(arch, k=k, unit=unit, source=source))
    except JsaeError:
        raise
    except ValueError as e:  # the architecture's own checks name the source
        raise FileFormatError(" ".join(str(e).split())) from e
    for n, v in params.items():  # e.g. log(threshold) of a zero threshold
        if not np.isfinite(np.asarray(v)).all():
            raise bad(source, f"tensor {n!r}", "becomes non-finite once imported (a zero "
                      "threshold, an overflow?)")
    return SAE(params={n: jnp.asarray(v) for n, v in params.items()},
               norm_scale=jnp.ones((), jnp.float32), spec=spec)


def _upgrade_old_cfg(cfg: dict) -> dict:
    """Pre-6 flat cfg.json -> 6.x layout (as SAELens's handle_pre_6_0_config does)."""
    ren = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
           "activation_fn_str": "activation_fn"}
    new = {ren.get(k, k): v for k, v in cfg.items()}
    new.setdefault("architecture", "standard")
    new.setdefault("apply_b_dec_to_input", True)
    kw = new.get("activation_fn_kwargs") or {}
    kw = kw if isinstance(kw, dict) else {}
    fn = new.get("activation_fn")
    if kw.get("k") is not None and any(fn in a.saelens_imports and a.code_k is not Arch.code_k
                                       for a in all_archs()):  # a k-sparse activation by name
        new["architecture"], new["k"] = fn, kw["k"]
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = ("expected_average_only_in"
                                        if new["normalize_activations"] else "none")
    meta = dict(new.get("metadata") or {})
    for key in ("model_name", "hook_name", "hook_head_index", "prepend_bos", "context_size",
                "dataset_path", "neuronpedia_id", "exclude_special_tokens"):
        if key in new and key not in meta:
            meta[key] = new[key]
    new["metadata"] = meta
    return new


def tl_hook_to_jsae(name: str) -> str:
    """TransformerLens's ``blocks.L.hook_mlp_in`` is the residual stream before the MLP's
    norm, jsae's ``blocks.L.hook_resid_mid``; other names are shared."""
    if name.startswith("blocks.") and name.endswith(".hook_mlp_in"):
        return name[: -len("hook_mlp_in")] + "hook_resid_mid"
    return name


def _read_cfg(cfg_file: Path) -> dict:
    """cfg.json, upgraded to the 6.x layout, with the fields jsae uses type-checked."""
    from jsae import validate as v

    cfg = v.mapping(v.read_json(cfg_file, "SAELens cfg.json"), "", cfg_file)
    meta = cfg.get("metadata") or {}
    v.mapping(meta, "field 'metadata'", cfg_file)
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    major = None
    if version:
        try:
            major = int(str(version).split(".")[0])
        except ValueError:
            raise v.bad(cfg_file, "field 'sae_lens_version'", f"is {version!r}; expected a "
                        "version like '6.0.0'") from None
    if major is None or major < 6:
        cfg = _upgrade_old_cfg(cfg)
    v.field(cfg, "architecture", str, cfg_file, default="standard")
    v.field(cfg, "normalize_activations", (str, None), cfg_file, default=None)
    for key in ("d_in", "d_sae"):
        v.field(cfg, key, int, cfg_file, default=None, lo=1)
    v.field(cfg, "k", (int, None), cfg_file, default=None, lo=1)
    v.field(cfg, "apply_b_dec_to_input", bool, cfg_file, default=True)
    for key in ("model_name", "hook_name", "hook_name_out"):
        v.field(cfg, key, (str, None), cfg_file, default=None)
        v.field(cfg["metadata"], key, (str, None), cfg_file, default=None, prefix="metadata.")
    return cfg


def load_saelens(path: str | Path) -> tuple[SAE, dict[str, Any]]:
    """A SAELens folder (cfg.json + sae_weights.safetensors) as ``(jsae SAE, metadata)``.

    ``metadata`` holds ``model_name``, ``hook_name`` and the rest of cfg.json's metadata.
    """
    path = Path(path)
    cfg_file, weights = path / CFG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"not a SAELens SAE folder: {f} is missing")
    cfg = _read_cfg(cfg_file)
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise FileFormatError(
            f"{cfg_file}: normalize_activations={norm!r} rescales inputs at run time; jsae "
            "imports only SAEs with fixed weights (normalize_activations='none')"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise FileFormatError(f"{cfg_file}: rescale_acts_by_decoder_norm=true is not supported")
    try:
        problem = from_saelens_name(arch, str(cfg_file)).saelens_cfg_problem(cfg)
    except ValueError:
        problem = None  # an unsupported architecture: sae_from_tensors names it
    if problem:
        raise FileFormatError(f"{cfg_file}: {problem}")
    tensors = _read_safetensors(weights)
    sae = sae_from_tensors(arch, tensors, k=cfg.get("k"),
                           apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                           source=str(weights))
    for key in ("d_in", "d_sae"):
        if key in cfg and int(cfg[key]) != getattr(sae.spec, key):
            raise FileFormatError(f"{cfg_file}: {key}={cfg[key]} but the weights in {weights} "
                                  f"have {getattr(sae.spec, key)}")
    out = dict(cfg.get("metadata") or {})
    out.setdefault("model_name", cfg.get("model_name"))
    out.setdefault("hook_name", cfg.get("hook_name"))
    if cfg.get("hook_name_out") and not out.get("hook_name_out"):
        out["hook_name_out"] = cfg["hook_name_out"]
    for key in ("hook_name", "hook_name_out"):  # TransformerLens's pre-norm MLP input
        if out.get(key):
            out[key] = tl_hook_to_jsae(out[key])
    out["saelens_architecture"] = arch
    return sae, out


__all__ = ["load_saelens", "sae_from_tensors", "save_saelens", "saelens_config",
           "saelens_tensors", "tl_hook_to_jsae"]
