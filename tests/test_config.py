"""Config: YAML round trip, overrides, and errors that name the bad key."""

from pathlib import Path

import pytest

from jsae import config as C

REPO = Path(__file__).resolve().parents[1]


def test_yaml_round_trip(tmp_path):
    cfg = C.load(REPO / "configs" / "synthetic.yaml")
    C.dump(cfg, tmp_path / "c.yaml")
    again = C.load(tmp_path / "c.yaml")
    assert again == cfg
    assert cfg.sae.architecture == "topk" and cfg.sae.d_sae == 1024


def test_every_shipped_config_is_valid():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    for f in files:
        C.load(f)


def test_overrides_apply_and_parse_yaml_scalars():
    cfg = C.load(REPO / "configs" / "synthetic.yaml",
                 ["train.lr=3e-4", "mesh.model=2", "model.hooks=[a, b]", "run_dir=/tmp/x"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.mesh.model == 2
    assert cfg.model.hooks == ["a", "b"]
    assert cfg.run_dir == "/tmp/x"


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"sae": {"archtecture": "topk"}}, "unknown config key 'sae.archtecture'"),
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"sae": {"k": "many"}}, "'sae.k': expected"),
        ({"train": {"lr": -1.0}}, "'train.lr': must be > 0"),
        ({"sae": {"d_sae": 8, "k": 9}}, "'sae.k': k=9 exceeds sae.d_sae=8"),
        ({"sae": {"architecture": "sparse"}}, "'sae.architecture': 'sparse' is not allowed"),
        ({"train": {"steps": None, "tokens": None}}, "'train.steps'"),
        ({"data": {"source": "array"}}, "'data.path': is required"),
        ({"sae": "topk"}, "section 'sae'"),
        ({"train": {"progress": "yes"}}, "'train.progress': expected true or false"),
    ],
)
def test_bad_configs_name_the_key(raw, needle):
    base = {"sae": {"d_sae": 64}, "train": {"steps": 10}}
    for section, value in raw.items():
        if isinstance(value, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **value}
        else:
            base[section] = value
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        C.from_dict(base)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae: [unclosed")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)
    with pytest.raises(C.ConfigError, match="section.key=value"):
        C.load(None, ["novalue"])
