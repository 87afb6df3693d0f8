"""The architecture registry: every kind is registered, and shared code asks it instead of
naming kinds (an `if spec.architecture == ...` outside jsae/sae/archs/ is a second home)."""

from __future__ import annotations

import re
from pathlib import Path

from jsae.sae.archs import get_arch, names
from jsae.sae.core import SAESpec

ROOT = Path(__file__).resolve().parents[1]


def test_every_configurable_kind_is_registered():
    from jsae.config import ARCHITECTURES

    assert set(ARCHITECTURES) <= set(names())
    assert {"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"} <= set(names())


def test_config_kind_lists_match_the_registry():
    """config.py checks k / output hooks / target_l0 without importing jax: its lists of
    kinds must say what the registry says."""
    from jsae import config
    from jsae.sae.archs.jumprelu import JumpReLU

    assert set(config.ARCHITECTURES) == set(names())
    assert set(config.NEEDS_K) == {n for n in names() if get_arch(n).needs_k}
    assert set(config.TRANSCODERS) == {n for n in names() if get_arch(n).transcoder}
    assert set(config.JUMPRELU_KINDS) == {n for n in names() if isinstance(get_arch(n), JumpReLU)}
    import typing

    lit = typing.get_type_hints(config.SAEConfig)["architecture"]
    assert set(typing.get_args(lit)) == set(names())  # the Literal lists every kind


def test_max_active_per_token():
    k = 7
    spec = lambda a: SAESpec(a, d_in=8, d_sae=32, k=k)  # noqa: E731
    assert get_arch("topk").max_active(spec("topk")) == k
    assert get_arch("transcoder").max_active(spec("transcoder")) == k
    for a in ("relu", "batchtopk", "matryoshka", "jumprelu", "gated"):
        assert get_arch(a).max_active(spec(a)) is None, a  # batch-level or threshold rules


def test_shared_code_names_no_architecture():
    pattern = re.compile(r"spec\.architecture\s*(==|!=|in)\s")
    offenders = []
    for f in sorted((ROOT / "jsae").rglob("*.py")):
        if "archs" in f.parts:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "ask jsae.sae.archs instead:\n" + "\n".join(offenders)
