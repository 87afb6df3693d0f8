"""The new architectures' configs train from `jsae train` on the real Gemma 3 270M at a tiny
budget (4 steps, a 4x dictionary) and write SAEs that load."""

from __future__ import annotations

import pytest

from jsae.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("config", ["matryoshka", "jumprelu_target_l0"])
def test_new_architecture_configs_train_on_the_real_model(tmp_path, config):
    from jsae.sae.io import load_sae

    run = tmp_path / config
    rc = main(["train", f"configs/{config}.yaml", "--set", "train.tokens=8192",
               "--set", f"run_dir={run}", "--set", "eval.tokens=4096",
               "--set", "sae.expansion=4", "--set", "eval.show_features=0",
               # the configs' 65k buffer would run the LM 8x longer than it trains; one device:
               # a BatchTopK step over 8 simulated devices on 2 cores costs 2-3x (sharding has its tests)
               "--set", "data.shuffle_buffer=4096", "--set", "mesh.data=1"])
    assert rc == 0
    folders = [p for p in (run / "saes").iterdir() if p.is_dir()]
    assert len(folders) == 1
    sae, _ = load_sae(folders[0])
    assert sae.spec.architecture == ("matryoshka" if config == "matryoshka" else "jumprelu")
    assert sae.spec.d_sae == 4 * 640
