"""Run configuration: typed dataclasses <-> YAML, with validation that names the bad key.

A config file has the sections ``model``, ``data``, ``sae``, ``train``, ``checkpoint``,
``eval``, ``mesh`` plus the top-level keys ``seed``, ``run_dir`` and ``family`` (several
dictionaries from one pass: a list of members, each a ``name`` and overrides of ``sae`` and
``train`` keys; `member_config` is a member's whole config).  Every key has a default,
so a config file only states what differs.  The ``sae`` section holds the common keys of
`SAEConfig` and the chosen architecture's own (the fields of its `Arch.Options`, e.g. ``sae.k``),
checked through the registry `jsae.sae.archs`.  ``--set section.key=value`` overrides apply on
top of the file, parsed as YAML scalars (``--set train.lr=3e-4``, ``--set model.hooks=[a,b]``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from jsae.errors import JsaeError


class ConfigError(JsaeError, ValueError):
    """A config value that is unknown, of the wrong type, or impossible."""



def _archs():
    """The architecture registry (imported when a config is read: it brings in jax)."""
    from jsae.sae import archs

    return archs


@dataclasses.dataclass
class ModelConfig:
    # "gemma-3-270m" is the offline default (GGUF from PyPI); also an HF id or local folder.
    name: str = "gemma-3-270m"
    path: Optional[str] = None  # explicit file/folder overriding the name's default location
    dtype: Literal["float32", "bfloat16"] = "float32"
    hooks: list[str] = dataclasses.field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    batch_size: int = 8  # contexts per LM forward pass when harvesting


@dataclasses.dataclass
class DataConfig:
    # synthetic: a known sparse dictionary; array: .npy [N, d_in] files; text: an LM over text;
    # cache: activations harvested earlier to disk.
    source: Literal["synthetic", "array", "text", "cache", "images"] = "synthetic"
    path: Optional[str] = None  # .npy file/glob (array), cache dir (cache), text files (text)
    dataset: str = "offline"  # text: offline | tfds:NAME | hf:NAME | files
    data_dir: Optional[str] = None  # TFDS data_dir (gs:// allowed)
    split: str = "train"
    text_field: str = "text"
    context_length: int = 128
    prepend_bos: bool = True
    exclude_bos: bool = True  # drop BOS/pad positions from SAE training batches
    exclude_norm_outliers: Optional[float] = None  # drop tokens with ||x|| > this x median
    shuffle_buffer: int = 65536  # tokens mixed before batching
    holdout_fraction: float = 0.02  # documents kept out of training, for evaluation
    # synthetic source: a ground-truth dictionary of n_features unit directions in d_in
    d_in: int = 64
    n_features: int = 512
    active_per_sample: int = 4
    noise_std: float = 0.0
    # images source (jsae.data.images): skimage | a folder | hf:NAME | tfds:NAME, mixed with the
    # text of `dataset` so that about image_ratio of the tokens are image soft tokens
    images: Optional[str] = None
    image_ratio: float = 0.5
    image_field: str = "image"
    caption_field: Optional[str] = None


@dataclasses.dataclass
class SAEConfig:
    architecture: str = ""  # a name in jsae.sae.archs.names(); "": the registry's default
    # transcoders: encode input_hook, reconstruct output_hook (model.hooks is then both)
    input_hook: Optional[str] = None
    output_hook: Optional[str] = None
    # a set: one transcoder per layer from one LM pass (input_hook / output_hook are templates
    # with {layer}, e.g. blocks.{layer}.mlp.hook_in); a cross-layer transcoder reads them all
    layers: Optional[Union[Literal["all"], list[int]]] = None
    d_sae: Optional[int] = None  # number of latents; or give expansion
    expansion: Optional[int] = None  # d_sae = expansion * d_in
    aux_k: Optional[int] = None  # AuxK latents (default d_in // 2)
    aux_coef: float = 1.0 / 32.0
    dead_after_tokens: int = 10_000_000  # a latent not firing for this many tokens is dead
    normalize: bool = True  # scale inputs so that E||x||^2 = d_in
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    init_sample: int = 4096  # tokens used for normalisation and b_dec init
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of matmuls
    fast_path: bool = True  # topk/batchtopk: sparse decoder + sparse encoder backward
    topk_recall: float = 1.0  # < 1: approximate top-k (lax.approx_max_k; faster on TPU)
    topk_chunk: int = 0  # > 0: exact two-stage top-k over chunks of this many latents (GPU)
    # the architecture's own keys (sae.k, sae.jumprelu_sparsity, ...): its `Arch.Options`,
    # written flat in YAML next to the keys above
    options: Any = None

    def __post_init__(self):
        if not self.architecture:
            self.architecture = _archs().default_name()
        if self.options is None:
            self.options = _archs().get_arch(self.architecture).Options()

    # `cfg.sae.k` reads (and sets) the architecture's option as the flat YAML key does.
    def __getattr__(self, name: str):
        if name.startswith("_") or name == "options":
            raise AttributeError(name)
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in dataclasses.fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"'SAEConfig' has no key {name!r} (sae.architecture "
                             f"{self.__dict__.get('architecture')!r})")

    def __setattr__(self, name: str, value):
        options = self.__dict__.get("options")
        if (options is not None and name not in {f.name for f in dataclasses.fields(self)}
                and name in {f.name for f in dataclasses.fields(options)}):
            value, name = dataclasses.replace(options, **{name: value}), "options"
        object.__setattr__(self, name, value)


@dataclasses.dataclass
class TrainConfig:
    steps: Optional[int] = None  # give steps or tokens
    tokens: Optional[int] = None
    batch_size: int = 4096  # tokens (activation vectors) per step
    lr: float = 2e-4
    lr_warmup_steps: int = 100
    lr_decay: Literal["constant", "cosine", "linear"] = "linear"
    lr_decay_start: float = 0.8  # fraction of training after which the LR decays to 0
    sparsity_warmup_steps: int = 0
    grad_clip: Optional[float] = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    log_every: int = 50
    progress: bool = True


@dataclasses.dataclass
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = 1000
    keep: int = 3


@dataclasses.dataclass
class EvalConfig:
    every_steps: Optional[int] = None  # periodic evaluation during training
    # held-out evaluation at these token counts (a list, or 'log:N'), for `jsae scaling`
    at_tokens: Optional[Union[list[int], str]] = None
    tokens: int = 16384
    downstream_tokens: Optional[int] = None  # CE/KL tokens (default: 4096 on CPU, else tokens)
    batch_size: int = 8  # contexts per LM pass for downstream metrics
    show_features: int = 6  # after training on text: print snippets of this many features
    show_features_contexts: int = 512  # corpus contexts scanned for those snippets


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by model
    model: int = 1


@dataclasses.dataclass
class FamilyMember:
    """One dictionary of a family: its name (its folder ``saes/<hook>/<name>/``) and its
    overrides of the run's ``sae`` and ``train`` keys (as written in YAML, checked by
    `member_config`)."""

    name: str
    sae: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sae: SAEConfig = dataclasses.field(default_factory=SAEConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    seed: int = 0
    run_dir: str = "runs/default"
    # several dictionaries trained from one pass over the data (None: one dictionary)
    family: Optional[list[FamilyMember]] = None

    # ---- derived values -------------------------------------------------------------
    def resolved_d_sae(self, d_in: int) -> int:
        if self.sae.d_sae is not None:
            return self.sae.d_sae
        if self.sae.expansion is None:
            raise ConfigError("sae.d_sae: give sae.d_sae or sae.expansion")
        return self.sae.expansion * d_in

    def resolved_steps(self) -> int:
        if self.train.steps is not None:
            return self.train.steps
        assert self.train.tokens is not None
        return max(1, self.train.tokens // self.train.batch_size)


# ---- dict -> dataclass with type checking --------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"config key '{key}': {value!r} is not allowed; expected one of "
                + ", ".join(repr(a) for a in allowed)
            )
        return value
    if origin is tuple:  # an architecture option's tuple[X, ...]: a YAML list
        (item, _) = typing.get_args(tp)
        return tuple(_coerce(value, list[item], key))
    if origin is list:
        if isinstance(value, str):  # a single item where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):  # YAML 1.1 reads "1e6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = f"section '{prefix}'" if prefix else "config file"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {raw!r}")
    if cls is SAEConfig:
        return _sae_from_dict(raw, prefix)
    if cls is RunConfig and raw.get("family") is not None:
        raw = {**raw, "family": _family_from_raw(raw["family"])}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; allowed keys here: {', '.join(names)}")
        if cls is RunConfig and key == "family":  # parsed above; members checked in validate
            kwargs[key] = value
            continue
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MEMBER_KEYS = ("name", "sae", "train")


def _family_from_raw(raw: Any) -> list[FamilyMember]:
    """The ``family`` list as written: each member a mapping of name, sae and train."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"config key 'family': expected a list of members (name, sae, train), "
                          f"got {raw!r}")
    out = []
    for i, m in enumerate(raw):
        key = f"family[{i}]"
        if not isinstance(m, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of name, sae and train, "
                              f"got {m!r}")
        for k in m:
            if k not in MEMBER_KEYS:
                raise ConfigError(f"unknown config key '{key}.{k}'; a member overrides sae and "
                                  f"train keys only (allowed keys here: {', '.join(MEMBER_KEYS)}); "
                                  "the hooks, data and model are the run's")
        name = m.get("name")
        if not isinstance(name, str) or not MEMBER_NAME.fullmatch(name):
            raise ConfigError(f"config key '{key}.name': expected a name of letters, digits, "
                              f"'_', '.' or '-' (its folder saes/<hook>/<name>/), got {name!r}")
        for section in ("sae", "train"):
            if not isinstance(m.get(section) or {}, dict):
                raise ConfigError(f"config key '{key}.{section}': expected a mapping of "
                                  f"{section} keys, got {m[section]!r}")
        out.append(FamilyMember(name, dict(m.get("sae") or {}), dict(m.get("train") or {})))
    return out


# Keys every member shares with the run, and why: one data stream feeds them all.
_SHARED_SAE = {
    "input_hook": "the members read the run's hooks",
    "output_hook": "the members read the run's hooks",
    "layers": "the members read the run's hooks",
    "init_sample": "every member is initialised from the same first tokens of the one data "
                   "stream, as a run of it alone would be",
}
_SHARED_TRAIN = {k: "one data stream feeds every member the same batches for the same number "
                    "of steps" for k in ("steps", "tokens", "batch_size")}
_SHARED_TRAIN.update({k: "the members are logged together" for k in ("log_every", "progress")})


def member_config(cfg: RunConfig, i: int) -> RunConfig:
    """The whole config of ``cfg.family[i]``: the run's, with the member's ``sae`` and
    ``train`` overrides (a run of it alone trains the same dictionary); ConfigError naming
    ``family[i].<key>`` when the member is impossible or changes a key members share."""
    m = cfg.family[i]
    where = f"family[{i}]"
    for section, shared in (("sae", _SHARED_SAE), ("train", _SHARED_TRAIN)):
        for k in getattr(m, section):
            if k in shared:
                raise ConfigError(f"config key '{where}.{section}.{k}' (member {m.name!r}): must "
                                  f"agree across the family ({shared[k]}); set it in the "
                                  f"top-level {section} section")
    raw = to_dict(cfg)
    raw.pop("family", None)
    sae = dict(raw["sae"])
    if m.sae.get("architecture", cfg.sae.architecture) != cfg.sae.architecture:
        common = {f.name for f in dataclasses.fields(SAEConfig)}
        sae = {k: v for k, v in sae.items() if k in common}  # the other architecture's keys go
    if "d_sae" in m.sae or "expansion" in m.sae:  # the member's size, not the run's
        sae.update(d_sae=None, expansion=None)
    raw["sae"] = {**sae, **m.sae}
    raw["train"] = {**raw["train"], **m.train}
    try:
        out = from_dict(raw)
    except ConfigError as e:
        msg = re.sub(r"key '(sae|train)\.", lambda g: f"key '{where}.{g.group(1)}.", str(e),
                     count=1)
        raise ConfigError(f"{msg} (family member {m.name!r})") from None
    archs = _archs()
    a, b = archs.get_arch(cfg.sae.architecture), archs.get_arch(out.sae.architecture)
    if (a.transcoder, a.multi_hook) != (b.transcoder, b.multi_hook):
        raise ConfigError(f"config key '{where}.sae.architecture' (member {m.name!r}): "
                          f"{out.sae.architecture!r} reads or writes other hooks than the run's "
                          f"{cfg.sae.architecture!r}; every member reads the run's hooks")
    return out


def _check_family(cfg: RunConfig) -> None:
    """Member names unique, each member's config possible (`member_config`)."""
    if cfg.family is None:
        return
    seen: dict[str, int] = {}
    for i, m in enumerate(cfg.family):
        if m.name in seen:
            raise ConfigError(f"config key 'family[{i}].name': {m.name!r} is also "
                              f"family[{seen[m.name]}]'s name; each member needs its own "
                              "(its folder saes/<hook>/<name>/)")
        seen[m.name] = i
    for i in range(len(cfg.family)):
        member_config(cfg, i)


def _sae_from_dict(raw: dict, prefix: str) -> SAEConfig:
    """The ``sae`` section: common keys plus the chosen architecture's option keys."""
    archs = _archs()
    name = raw.get("architecture") or archs.default_name()
    known = archs.names()
    if name not in known:
        raise ConfigError(f"config key '{prefix}.architecture': {name!r} is not allowed; "
                          f"expected one of {', '.join(repr(n) for n in known)}")
    arch = archs.get_arch(name)
    common = [f.name for f in dataclasses.fields(SAEConfig) if f.name != "options"]
    own, types_ = arch.option_keys(), arch.option_types()
    hints = typing.get_type_hints(SAEConfig)
    kwargs, opts = {}, {}
    for key, value in raw.items():
        full = f"{prefix}.{key}"
        if key in common:
            kwargs[key] = _coerce(value, hints[key], full)
        elif key in own:
            opts[key] = _coerce(value, types_[key], full)
        elif archs.owners(key):
            if _old_default(archs, key, value):  # configs saved before issue 26 list every key
                continue
            raise ConfigError(f"config key '{full}' belongs to sae.architecture "
                              f"{' / '.join(archs.owners(key))}, not {name!r} (its keys: "
                              f"{', '.join(own) or 'none'}); remove it or set it to null")
        else:
            raise ConfigError(f"unknown config key '{full}' for sae.architecture {name!r}; "
                              f"allowed keys here: {', '.join(common + list(own))}")
    kwargs["architecture"] = name
    return SAEConfig(**kwargs, options=arch.Options(**opts))


def _old_default(archs, key: str, value: Any) -> bool:
    """Whether ``value`` is null or the default of ``key`` wherever it is an option."""
    if value is None:
        return True
    defaults = [getattr(archs.get_arch(n).Options(), key) for n in archs.owners(key)]
    return any(value == d or (isinstance(d, tuple) and value == list(d)) for d in defaults)


def validate(cfg: RunConfig) -> RunConfig:
    """Check values that are individually well-typed but impossible together."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    for key, value in _leaves(cfg):  # YAML's .nan / .inf are floats: never a usable value
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}': {value!r} is not a finite number")
    need(cfg.seed >= 0, "seed", f"must be >= 0 (a PRNG seed), got {cfg.seed}")
    s, t = cfg.sae, cfg.train
    need(s.d_sae is None or s.d_sae > 0, "sae.d_sae", "must be a positive integer")
    need(s.expansion is None or s.expansion > 0, "sae.expansion", "must be a positive integer")
    need(
        s.d_sae is not None or s.expansion is not None,
        "sae.d_sae",
        "give sae.d_sae or sae.expansion",
    )
    arch = _archs().get_arch(s.architecture)
    try:
        arch.check(s.options, s.d_sae, "sae.d_sae")
    except ValueError as e:  # an OptionError names its key
        raise ConfigError(f"config key {e}") from None
    need(s.aux_k is None or s.aux_k > 0, "sae.aux_k", "must be a positive integer")
    need(s.aux_coef >= 0, "sae.aux_coef", "must be >= 0")
    need(s.init_sample > 0, "sae.init_sample", "must be > 0")
    need(0.0 < s.topk_recall <= 1.0, "sae.topk_recall", "must be in (0, 1]")
    need(s.topk_chunk >= 0, "sae.topk_chunk", "must be >= 0 (0: one-stage top-k)")
    need(t.steps is not None or t.tokens is not None, "train.steps", "give train.steps or train.tokens")
    need(t.steps is None or t.steps > 0, "train.steps", "must be a positive integer")
    need(t.tokens is None or t.tokens > 0, "train.tokens", "must be a positive integer")
    need(t.batch_size > 0, "train.batch_size", "must be a positive integer")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(t.lr < 10, "train.lr", f"{t.lr} would diverge at once; Adam SAE learning rates are "
         "1e-5 to 1e-2 (default 2e-4)")
    need(t.adam_eps > 0, "train.adam_eps", f"must be > 0, got {t.adam_eps}")
    need(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0")
    need(0.0 <= t.lr_decay_start <= 1.0, "train.lr_decay_start", "must be in [0, 1]")
    need(t.sparsity_warmup_steps >= 0, "train.sparsity_warmup_steps", "must be >= 0")
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be > 0 or null")
    need(0 <= t.adam_b1 < 1, "train.adam_b1", "must be in [0, 1)")
    need(0 <= t.adam_b2 < 1, "train.adam_b2", "must be in [0, 1)")
    need(t.log_every > 0, "train.log_every", "must be a positive integer")
    need(cfg.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be a positive integer")
    need(cfg.checkpoint.keep > 0, "checkpoint.keep", "must be a positive integer")
    need(
        cfg.eval.every_steps is None or cfg.eval.every_steps > 0,
        "eval.every_steps",
        "must be a positive integer or null",
    )
    need(cfg.mesh.data == -1 or cfg.mesh.data > 0, "mesh.data", "must be -1 (all) or positive")
    need(cfg.mesh.model > 0, "mesh.model", "must be a positive integer")
    d = cfg.data
    need(d.context_length > 1, "data.context_length", "must be > 1")
    need(d.shuffle_buffer > 0, "data.shuffle_buffer", "must be a positive integer")
    need(0.0 <= d.holdout_fraction < 1.0, "data.holdout_fraction", "must be in [0, 1)")
    need(d.d_in > 0, "data.d_in", "must be a positive integer")
    need(d.n_features > 0, "data.n_features", "must be a positive integer")
    need(
        0 < d.active_per_sample <= d.n_features,
        "data.active_per_sample",
        "must be in [1, data.n_features]",
    )
    need(d.source not in ("array", "cache") or d.path is not None, "data.path",
         f"is required when data.source is {d.source!r}")
    need(d.noise_std >= 0, "data.noise_std", f"must be >= 0, got {d.noise_std}")
    need(0.0 < d.image_ratio <= 1.0, "data.image_ratio",
         f"must be in (0, 1] (the fraction of tokens that are image tokens), got {d.image_ratio}")
    need(d.holdout_fraction > 0 or d.source != "array", "data.holdout_fraction",
         "must be > 0 for data.source 'array': the final held-out evaluation needs rows "
         "(e.g. 0.02)")
    need(s.dead_after_tokens > 0, "sae.dead_after_tokens", "must be a positive integer")
    e = cfg.eval
    need(e.tokens > 0, "eval.tokens", f"must be a positive integer, got {e.tokens}")
    if e.at_tokens is not None:
        from jsae.train.eval_points import at_steps

        try:
            at_steps(e.at_tokens, t.batch_size, cfg.resolved_steps())
        except ValueError as err:
            need(False, "eval.at_tokens", str(err))
    need(e.batch_size > 0, "eval.batch_size", f"must be a positive integer, got {e.batch_size}")
    need(e.show_features >= 0, "eval.show_features", "must be >= 0 (0: show none)")
    need(e.show_features_contexts > 0, "eval.show_features_contexts",
         "must be a positive integer")
    _check_transcoder_hooks(cfg, need)
    unresolved = s.layers == "all" and not cfg.model.hooks  # resolve_layers, once the model is known
    need(unresolved or len(cfg.model.hooks) > 0, "model.hooks", "must name at least one hook point")
    need(unresolved or not arch.multi_hook or len(set(cfg.model.hooks)) >= 2, "model.hooks",
         f"sae.architecture {s.architecture!r} reads several hooks at once: give two or more "
         f"distinct hooks, got {cfg.model.hooks}")
    need(cfg.model.batch_size > 0, "model.batch_size", "must be a positive integer")
    if d.exclude_norm_outliers is not None:
        need(d.exclude_norm_outliers > 1.0, "data.exclude_norm_outliers", "must be > 1 (a multiple of the median norm)")
    _check_family(cfg)
    return cfg


DEFAULT_HOOKS = ModelConfig().hooks


def _check_transcoder_hooks(cfg: RunConfig, need) -> None:
    """A transcoder harvests exactly its two hooks: ``model.hooks`` becomes [input, output]
    (a set: every layer's, see `_check_set`)."""
    s, archs = cfg.sae, _archs()
    if not archs.get_arch(s.architecture).transcoder:
        transcoders = [n for n in archs.names() if archs.get_arch(n).transcoder]
        need(s.layers is None, "sae.layers",
             f"trains one transcoder per layer (or a cross-layer transcoder): only transcoders "
             f"({', '.join(transcoders)}) have layers; sae.architecture is {s.architecture!r}")
        need(s.input_hook is None and s.output_hook is None,
             "sae.input_hook" if s.input_hook is not None else "sae.output_hook",
             f"only transcoders ({', '.join(transcoders)}) read one hook and reconstruct "
             f"another; sae.architecture is {s.architecture!r}")
        return
    multi = archs.get_arch(s.architecture).multi_hook
    need(s.layers is not None or not multi, "sae.layers",
         f"sae.architecture {s.architecture!r} reads every layer's {s.input_hook or 'input'} at "
         "once: give sae.layers (all, or a list such as [0, 1, 2]) with hook templates (sae."
         "input_hook: blocks.{layer}.mlp.hook_in, sae.output_hook: blocks.{layer}.hook_mlp_out)")
    if s.layers is not None:
        _check_set(cfg, need, multi)
        return
    for key in ("input_hook", "output_hook"):
        need(bool(getattr(s, key)), f"sae.{key}",
             f"is required for sae.architecture {s.architecture!r} (e.g. "
             f"{'blocks.6.hook_resid_mid' if key == 'input_hook' else 'blocks.6.hook_mlp_out'})")
    need(s.input_hook != s.output_hook, "sae.output_hook",
         f"must differ from sae.input_hook ({s.input_hook}); to reconstruct the input hook "
         "itself, train an SAE (another sae.architecture)")
    pair = [s.input_hook, s.output_hook]
    need(cfg.model.hooks in (DEFAULT_HOOKS, pair), "model.hooks",
         f"a transcoder harvests sae.input_hook and sae.output_hook ({pair}); leave "
         f"model.hooks unset or set it to that list, got {cfg.model.hooks}")
    cfg.model.hooks = pair


LAYER = "{layer}"  # the placeholder in sae.input_hook / sae.output_hook templates of a set


def layer_hook(template: str, layer: int) -> str:
    """``template`` (``blocks.{layer}.mlp.hook_in``) at ``layer``."""
    return template.replace(LAYER, str(layer))


def template_layer(template: str, hook: str) -> int | None:
    """The layer L with ``layer_hook(template, L) == hook``; None if ``hook`` is not one."""
    head, _, tail = template.partition(LAYER)
    if not _ or not hook.startswith(head) or not hook.endswith(tail):
        return None
    mid = hook[len(head):len(hook) - len(tail)]
    return int(mid) if mid.isdigit() and layer_hook(template, int(mid)) == hook else None


def transcoder_pairs(cfg: RunConfig, hooks=()) -> list[tuple[str, str]]:
    """(input hook, output hook) of every transcoder ``cfg`` trains: its one pair, or one per
    layer of ``sae.layers`` (``all``: every layer whose input hook is among ``hooks``)."""
    s = cfg.sae
    if s.layers is None:
        return [(s.input_hook, s.output_hook)]
    layers = s.layers if s.layers != "all" else sorted(
        {L for h in hooks if (L := template_layer(s.input_hook, h)) is not None})
    return [(layer_hook(s.input_hook, L), layer_hook(s.output_hook, L)) for L in layers]


def _set_hooks(s: SAEConfig, layers) -> list[str]:
    return [layer_hook(s.input_hook, L) for L in layers] + [layer_hook(s.output_hook, L) for L in layers]


def resolve_layers(cfg: RunConfig, n_layers: int) -> None:
    """``model.hooks`` from the set's templates for a model of ``n_layers`` layers (where the
    model is loaded: ``sae.layers: all`` needs its depth); a listed layer it lacks is refused."""
    s = cfg.sae
    if s.layers is None:
        return
    layers = list(range(n_layers)) if s.layers == "all" else list(s.layers)
    beyond = [L for L in layers if L >= n_layers]
    if beyond:
        raise ConfigError(f"config key 'sae.layers': layer {beyond[0]} does not exist (the model "
                          f"has {n_layers} layers, 0 to {n_layers - 1})")
    cfg.model.hooks = _set_hooks(s, layers)


def _check_set(cfg: RunConfig, need, multi: bool) -> None:
    """``sae.layers`` with templated hooks; ``model.hooks`` becomes every layer's two hooks (for
    ``all``: [] until `resolve_layers`, or the resolved list read back)."""
    s = cfg.sae
    for key in ("input_hook", "output_hook"):
        value = getattr(s, key)
        need(bool(value) and LAYER in value, f"sae.{key}",
             f"with sae.layers, a template holding {LAYER} (e.g. blocks.{LAYER}."
             f"{'mlp.hook_in' if key == 'input_hook' else 'hook_mlp_out'}), got {value!r}")
    need(s.input_hook != s.output_hook, "sae.output_hook",
         f"must differ from sae.input_hook ({s.input_hook})")
    if s.layers != "all":
        need(len(s.layers) > 0, "sae.layers", "give all, or a list of layers such as [0, 3, 5]")
        need(min(s.layers) >= 0, "sae.layers", f"layers are >= 0, got {s.layers}")
        need(len(set(s.layers)) == len(s.layers), "sae.layers",
             f"each layer once, got {s.layers}")
        need(not multi or len(s.layers) >= 2, "sae.layers",
             f"sae.architecture {s.architecture!r} reads several layers at once: give two or "
             f"more, got {s.layers}")
        derived = _set_hooks(s, s.layers)
    else:
        if cfg.model.hooks in (DEFAULT_HOOKS, []):
            cfg.model.hooks = []
            return
        derived = _set_hooks(s, sorted({L for h in cfg.model.hooks
                                        if (L := template_layer(s.input_hook, h)) is not None}))
    need(cfg.model.hooks in (DEFAULT_HOOKS, derived), "model.hooks",
         f"a set harvests every layer's sae.input_hook and sae.output_hook (from sae.layers); "
         f"leave model.hooks unset, got {cfg.model.hooks}")
    cfg.model.hooks = derived


def _leaves(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if isinstance(obj, SAEConfig) and f.name == "options":  # flat: sae.k, not sae.options.k
            yield from _leaves(v, prefix)
        elif dataclasses.is_dataclass(v):
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def from_dict(raw: dict) -> RunConfig:
    return validate(_from_dict(RunConfig, raw))


def to_dict(cfg: RunConfig) -> dict:
    """Plain dict as YAML writes it: the ``sae`` options flat next to the common keys."""
    out = dataclasses.asdict(cfg)
    if cfg.family is None:  # a run of one dictionary writes the config.yaml it always did
        del out["family"]
    if cfg.sae.layers is not None:  # derived from the set's templates (and, for all, the model)
        del out["model"]["hooks"]
    sae, keys = out["sae"], _archs().get_arch(cfg.sae.architecture).option_keys()
    sae.update({k: list(v) if isinstance(v, tuple) else v
                for k, v in sae.pop("options").items() if k in keys})
    return out


def comparable(raw: dict) -> dict:
    """``raw`` (a config.yaml as read) without the ``sae`` keys its architecture does not
    read: configs written before issue 26 list every architecture's keys."""
    sae = raw.get("sae") if isinstance(raw, dict) else None
    if not isinstance(sae, dict):
        return raw
    archs = _archs()
    name = sae.get("architecture") or archs.default_name()
    if name not in archs.names():
        return raw
    own = set(archs.get_arch(name).option_keys())
    common = {f.name for f in dataclasses.fields(SAEConfig)}
    return {**raw, "sae": {k: v for k, v in sae.items()
                           if k in own or k in common or not archs.owners(k)}}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e.problem})") from e
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
            node[p] = dict(child)
            node = node[p]
        node[parts[-1]] = value
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, and validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        if p.is_dir():
            raise ConfigError(f"config file {p} is a directory; give a YAML file (see configs/)")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}); give a "
                              "YAML file") from e
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw)


def dump(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
