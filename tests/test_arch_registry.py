"""The architecture registry: every kind is found by discovery, owns its options, and shared
code asks it for capabilities instead of naming kinds (an ``if spec.architecture == ...`` or a
kind's name outside jsae/sae/archs/ is a second home)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from sae_reference import spec_for

from jsae import config
from jsae.sae.archs import get_arch, names
from jsae.sae.core import SAESpec

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_in_archs_is_registered():
    """Discovery: each architecture module's classes are registered without an import list."""
    assert {"relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka", "transcoder",
            "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder",
            "crosscoder"} <= set(names())
    modules = {p.stem for p in (ROOT / "jsae/sae/archs").glob("*.py")} - {"__init__", "base"}
    assert modules <= {type(get_arch(n)).__module__.rsplit(".", 1)[-1] for n in names()}


def test_config_lists_the_registry():
    """No hand-kept list of kinds: the config refuses an unknown kind naming archs.names()."""
    for gone in ("ARCHITECTURES", "NEEDS_K", "TRANSCODERS", "JUMPRELU_KINDS"):
        assert not hasattr(config, gone)
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"sae": {"architecture": "sparse", "d_sae": 8}, "train": {"steps": 1}})
    assert all(repr(n) in str(e.value) for n in names())


def test_options_are_one_hashable_object_per_architecture():
    spec = SAESpec("matryoshka", 8, 16, k=2, matryoshka_groups=[4, 16])
    assert spec.options == get_arch("matryoshka").Options(2, (4, 16), ())
    assert hash(spec) == hash(SAESpec("matryoshka", 8, 16, k=2, matryoshka_groups=(4, 16)))
    shared = {"architecture", "d_in", "d_sae", "options", "aux_k", "dtype", "fast_path",
              "topk_recall", "topk_chunk"}
    assert set(SAESpec.__dataclass_fields__) == shared  # nothing of one architecture
    with pytest.raises(TypeError, match="'relu' has no option 'k'"):
        SAESpec("relu", 8, 16, k=3)


@pytest.mark.parametrize("raw,needle", [
    ({"architecture": "relu", "k": 4},
     "'sae.k' belongs to sae.architecture topk / batchtopk / matryoshka / transcoder / "
     "skip_transcoder / clt, not 'relu' (its keys: l1_coef, l1_variant)"),
    ({"architecture": "topk", "matryoshka_groups": [4]}, "belongs to sae.architecture matryoshka"),
    ({"architecture": "jumprelu", "bogus": 1},
     "unknown config key 'sae.bogus' for sae.architecture 'jumprelu'; allowed keys here: "),
    ({"architecture": "jumprelu", "jumprelu_sparsity": "quadratic"}, "'sae.target_l0': is required"),
    ({"architecture": "matryoshka", "matryoshka_groups": [8, 4]}, "'sae.matryoshka_groups'"),
])
def test_sae_keys_are_checked_through_the_registry(raw, needle):
    with pytest.raises(config.ConfigError, match=re.escape(needle)):
        config.from_dict({"sae": {"d_sae": 64, **raw}, "train": {"steps": 1}})


def test_old_config_files_with_every_key_still_load():
    """config.yaml written before issue 26 lists every kind's keys at their defaults."""
    cfg = config.load(ROOT / "tests/fixtures/old_format/jumprelu_run/config.yaml")
    assert cfg.sae.options.jumprelu_sparsity == "tanh"
    assert "k" not in config.to_dict(cfg)["sae"]


def test_max_active_per_token():
    k = 7
    spec = lambda a: spec_for(a, d_in=8, d_sae=32, k=k)  # noqa: E731
    assert get_arch("topk").max_active(spec("topk")) == k
    assert get_arch("transcoder").max_active(spec("transcoder")) == k
    for a in ("relu", "batchtopk", "matryoshka", "jumprelu", "gated"):
        assert get_arch(a).max_active(spec(a)) is None, a  # batch-level or threshold rules


def _outside_archs():
    for f in sorted((ROOT / "jsae").rglob("*.py")):
        if "archs" not in f.parts:
            yield f, f.read_text()


def test_shared_code_names_no_architecture():
    """Outside jsae/sae/archs/: no string that is a kind's name, no comparison with
    ``spec.architecture``, no import of one architecture's module."""
    kinds = set(names())
    pattern = re.compile(r"spec\.architecture\s*(==|!=|in)\s|jsae\.sae\.archs\.\w+ import")
    offenders = []
    for f, text in _outside_archs():
        for i, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and node.value in kinds:
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "ask jsae.sae.archs instead:\n" + "\n".join(offenders)


def test_shared_code_asks_capabilities_not_shapes():
    """What kind of dictionary a caller holds comes from its `Arch` (n_hooks, token_shape,
    layer_profile, multi_hook), never from ``n_layers`` or an array's rank."""
    pattern = re.compile(r"\bn_layers\b|\.ndim\s*(==|!=|>|<)")
    offenders = []
    for f, text in _outside_archs():
        if f.parent.name == "models" or "sae" not in f.parts and "steering" not in f.name \
                and f.parent.name not in ("evals", "atlas", "commands", "train", "export"):
            continue  # models/: a transformer's layers, not a dictionary's
        for i, line in enumerate(text.splitlines(), 1):
            if pattern.search(line) and "spec" in line or "sae.spec.n_layers" in line:
                offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "ask the architecture instead:\n" + "\n".join(offenders)
