"""The registry of dictionary architectures: name -> `Arch`, filled by discovery.

Every module in `jsae.sae.archs` (except ``base`` and names starting with ``_``) is imported on
the first lookup; a module registers its architectures with `register`. A new architecture is
therefore one new file and no other edit. This module imports nothing from `jsae.sae`, so the
architecture modules, `jsae.sae.spec` and `jsae.sae.core` can all import it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

_REGISTRY: dict[str, Any] = {}
_DISCOVERED = False
PACKAGE = "jsae.sae.archs"


def register(arch):
    """Add ``arch`` under ``arch.name`` (one name, one architecture)."""
    if not arch.name:
        raise ValueError(f"{type(arch).__name__} has no name")
    if arch.name in _REGISTRY and type(_REGISTRY[arch.name]) is not type(arch):
        raise ValueError(f"SAE architecture {arch.name!r} is registered twice")
    _REGISTRY[arch.name] = arch
    return arch


def _discover() -> None:
    """Import every architecture module of the package once (they register themselves)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    pkg = importlib.import_module(PACKAGE)
    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{PACKAGE}.{mod.name}")


def get_arch(name: str):
    """The architecture registered as ``name``; a clear error naming the known ones."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown SAE architecture {name!r}; known: {', '.join(names())}"
                         ) from None


def default_name() -> str:
    """The architecture a config without ``sae.architecture`` trains (`Arch.is_default`)."""
    _discover()
    return next(n for n in names() if _REGISTRY[n].is_default)


def names() -> tuple[str, ...]:
    """Registered names, in the order the architectures ask for (`Arch.rank`), then by name."""
    _discover()
    return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].rank, n)))


def all_archs() -> tuple:
    return tuple(_REGISTRY[n] for n in names())


def latent_axes() -> dict[str, int]:
    """Latent axis of every per-latent parameter name of every architecture."""
    out: dict[str, int] = {}
    for arch in all_archs():
        for name, axis in arch.latent_axes().items():
            if out.setdefault(name, axis) != axis:
                raise ValueError(f"parameter {name!r} has latent axis {axis} in "
                                 f"{arch.name!r} but {out[name]} elsewhere")
    return out


def owners(key: str) -> tuple[str, ...]:
    """Names of the architectures that have the option ``key``."""
    return tuple(a.name for a in all_archs() if key in a.option_keys())


def from_saelens_name(saelens_arch: str, source: str = "tensors"):
    """The jsae architecture that imports SAELens's ``saelens_arch``."""
    for arch in all_archs():
        if saelens_arch in arch.saelens_imports:
            return arch
    known = sorted(n for a in all_archs() for n in a.saelens_imports)
    raise ValueError(f"{source}: SAELens architecture {saelens_arch!r} is not supported by jsae "
                     f"(supported: {', '.join(known)})")


def for_gemmascope(kind: str):
    """The architecture that imports Gemma Scope's ``kind`` of dictionary: "sae", "mlp" (a
    transcoder), "mlp_skip" (one with an affine skip connection)."""
    for arch in all_archs():
        if arch.gemmascope_import == kind:
            return arch
    raise ValueError(f"no jsae architecture imports Gemma Scope {kind} files")


def for_circuit(kind: str):
    """The architecture that imports a circuit-tracing dictionary of ``kind`` (``Arch.
    circuit_imports``: "per_layer", "per_layer_skip", "cross_layer")."""
    for arch in all_archs():
        if kind in arch.circuit_imports:
            return arch
    raise ValueError(f"no jsae architecture imports {kind.replace('_', '-')} circuit-tracing "
                     "dictionaries")
