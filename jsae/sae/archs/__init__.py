"""The dictionary architectures, one module each, registered by name.

An architecture is an `Arch` subclass instance (see `jsae.sae.archs.base`) registered with
`register`; shared code (core encode/decode, `sae_loss`, init, the train step and loop,
export, steering, the sharding specs, checkpoints) looks it up with
``get_arch(spec.architecture)`` and never names an architecture itself.

Adding one (the smallest example is `jsae.sae.archs.relu`):

1. A module ``jsae/sae/archs/<name>.py`` with ``class MyArch(Arch)`` and ``name = "<name>"``;
   import it at the bottom of this file (registration happens on import).
2. Override what differs from the plain SAE ``z = act((x_n - b_dec) W_enc + b_enc)``,
   ``x_hat = z W_dec + b_dec``:

   - ``extra_params(spec, **opts) -> dict``: parameters beyond W_enc, b_enc, W_dec, b_dec
     (``opts``: init options such as ``jumprelu_init_threshold``);
   - ``extra_latent_axes``: ``{param name: latent axis}`` of those that are per latent (sharded
     over ``model`` by `jsae.parallel`, sliced by steering's sub-dictionaries). W_enc (axis -1),
     W_dec (axis 0) and b_enc (axis 0) are per-latent already; an architecture with other
     shapes (a crosscoder's W_enc [n_layers, d_in, d_sae], W_dec [d_sae, n_layers, d_in])
     keeps the latent axis at -1 for encoders and 0 for decoders, so one name maps to one spec;
   - ``pre_activations(sae, x_n)`` and ``decode(sae, z, x_in)``: the shapes of the input and
     the reconstruction belong to the architecture (``x_in`` lets a skip transcoder add
     ``x_in W_skip``);
   - ``activate(sae, pre, x_n, train=..., topk_fn=..., batch_topk_fn=...)``: the nonlinearity
     (``train`` selects a batch-level rule; the ``*_fn`` are the sharded selections);
   - ``loss_terms(sae, t: LossInputs) -> dict``: the terms added to the reconstruction
     (``t.x_in`` is what was encoded, ``t.x_target`` what is reconstructed: a transcoder's
     other hook; ``t.x_target is t.x_in`` for an SAE);
   - ``unit_decoder(spec)``, ``needs_k``, ``elementwise``, ``coef_field`` (config key of the
     sparsity coefficient), ``frozen_params`` / ``after_update`` (parameters not set by the
     gradient), ``supports_fast`` and the fast-path hooks, and the SAELens mapping
     (``saelens_name``, ``to_saelens``, ``from_saelens``).
3. Tests ``tests/test_arch_<name>.py``: loss against NumPy, gradients against finite
   differences, sharded == single device, export round trip.
"""

from __future__ import annotations

from jsae.sae.archs.base import Arch, LossInputs

_REGISTRY: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    """Add ``arch`` under ``arch.name`` (one name, one architecture)."""
    if arch.name in _REGISTRY and type(_REGISTRY[arch.name]) is not type(arch):
        raise ValueError(f"SAE architecture {arch.name!r} is registered twice")
    _REGISTRY[arch.name] = arch
    return arch


def get_arch(name: str) -> Arch:
    """The architecture registered as ``name``; a clear error naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown SAE architecture {name!r}; known: {', '.join(names())}"
                         ) from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_archs() -> tuple[Arch, ...]:
    return tuple(_REGISTRY.values())


def latent_axes() -> dict[str, int]:
    """Latent axis of every per-latent parameter name of every architecture."""
    out: dict[str, int] = {}
    for arch in _REGISTRY.values():
        for name, axis in arch.latent_axes().items():
            if out.setdefault(name, axis) != axis:
                raise ValueError(f"parameter {name!r} has latent axis {axis} in "
                                 f"{arch.name!r} but {out[name]} elsewhere")
    return out


def from_saelens_name(saelens_arch: str, source: str = "tensors") -> Arch:
    """The jsae architecture that imports SAELens's ``saelens_arch``."""
    for arch in _REGISTRY.values():
        if saelens_arch in arch.saelens_imports:
            return arch
    known = sorted(n for a in _REGISTRY.values() for n in a.saelens_imports)
    raise ValueError(f"{source}: SAELens architecture {saelens_arch!r} is not supported by jsae "
                     f"(supported: {', '.join(known)})")


# registration order = the order of `names()` (config help, docs)
from jsae.sae.archs import relu, topk, batchtopk, jumprelu, gated, matryoshka, transcoder, crosscoder  # noqa: E402,F401,I001

__all__ = ["Arch", "LossInputs", "all_archs", "from_saelens_name", "get_arch", "latent_axes",
           "names", "register"]
