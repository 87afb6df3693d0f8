"""`SAESpec`, `SAE` and `mm`: the leaf of `jsae.sae` (it imports only the registry).

A spec is the common description of a dictionary (widths, compute dtype, fast-path knobs) plus
``options``: one typed, hashable object that the architecture declares (`Arch.Options`, e.g.
TopK's ``k``). Shapes: ``x [..., d_in]`` raw activations, ``z [..., d_sae]`` codes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jsae.sae.registry import all_archs, get_arch

Array = jax.Array

# spec fields every architecture has; everything else is the architecture's `options`
COMMON = ("architecture", "d_in", "d_sae", "aux_k", "dtype", "fast_path", "topk_recall",
          "topk_chunk")


@dataclasses.dataclass(frozen=True, init=False)
class SAESpec:
    """Static description of an SAE (hashable; part of the pytree's structure).

    ``SAESpec("topk", 640, 10240, k=32)`` builds the options from keywords;
    ``SAESpec(name, d_in, d_sae, options)`` takes them ready-made.
    """

    architecture: str  # a name registered in jsae.sae.archs
    d_in: int
    d_sae: int
    options: Any = None  # the architecture's `Arch.Options` instance
    aux_k: int | None = None
    dtype: str = "float32"  # matmul compute dtype; params stay float32
    fast_path: bool = False  # k-sparse codes: sparse decoder + sparse encoder backward (jsae.sae.fast)
    topk_recall: float = 1.0  # < 1: fast-path top-k via lax.approx_max_k (approximate on TPU only)
    topk_chunk: int = 0  # > 0: fast-path top-k in two exact stages over chunks of this many latents

    def __init__(self, architecture: str, d_in: int, d_sae: int, options: Any = None, *,
                 aux_k: int | None = None, dtype: str = "float32", fast_path: bool = False,
                 topk_recall: float = 1.0, topk_chunk: int = 0, **option_values: Any):
        arch = get_arch(architecture)
        if options is None:
            options = arch.make_options(option_values)
        elif option_values:
            raise TypeError("give options= or option keywords, not both")
        elif not isinstance(options, arch.Options):
            raise TypeError(f"options of architecture {architecture!r} must be "
                            f"{arch.Options.__qualname__}, got {type(options).__qualname__}")
        values = dict(architecture=architecture, d_in=d_in, d_sae=d_sae, options=options,
                      aux_k=aux_k, dtype=dtype, fast_path=fast_path, topk_recall=topk_recall,
                      topk_chunk=topk_chunk)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def arch(self):
        """The registered `Arch` (what callers ask for capabilities)."""
        return get_arch(self.architecture)

    @property
    def unit_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm during training."""
        return self.arch.unit_decoder(self)

    @property
    def aux_k_resolved(self) -> int:
        return min(self.aux_k or max(1, self.d_in // 2), self.d_sae)

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


def spec_to_dict(spec: SAESpec) -> dict[str, Any]:
    """Flat JSON-able form: the common fields, then the options (as sae.json stores it)."""
    out = {name: getattr(spec, name) for name in COMMON}
    out.update(dataclasses.asdict(spec.options))
    return out


def spec_from_dict(d: dict[str, Any]) -> SAESpec:
    """Inverse of `spec_to_dict`; also reads the flat specs written before issue 26, which
    carried every architecture's fields (a key of another architecture is dropped).
    Raises KeyError / TypeError / ValueError on a bad dict."""
    d = dict(d)
    arch = get_arch(d["architecture"])
    fields = set(arch.option_fields())
    options = {k: d.pop(k) for k in list(d) if k in fields}
    for key in [k for k in d if k not in COMMON]:
        if not any(key in a.option_fields() for a in all_archs()):
            raise TypeError(f"unknown spec field {key!r}")
        del d[key]
    common = {k: d.pop(k) for k in COMMON if k in d}
    return SAESpec(common.pop("architecture"), common.pop("d_in"), common.pop("d_sae"),
                   arch.make_options(options), **common)


@struct.dataclass
class SAE:
    """Parameters (trainable dict), normalisation scale (not trained) and static spec.

    params: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus the
    architecture's own (`jsae.sae.archs`: e.g. log_threshold [d_sae]).
    """

    params: dict[str, Array]
    norm_scale: Array  # scalar float32
    spec: SAESpec = struct.field(pytree_node=False)

    @property
    def threshold(self) -> Array | None:
        """Per-latent inference threshold where the architecture has one (normalised units)."""
        return self.spec.arch.threshold(self.params)


def mm(a: Array, b: Array, dtype) -> Array:
    """Matmul in the compute dtype with float32 accumulation and result."""
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
