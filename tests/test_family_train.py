"""Families: several dictionaries from one pass over the data (config key ``family``).

The reference is a run of each member alone (the member's config, same seed, same data): the
family's member must end with bitwise the same parameters, optimizer state and counters on
CPU. A family stopped by SIGTERM and resumed must end like the uninterrupted family.
"""

import copy
import dataclasses
import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from sae_reference import sae_section

from jsae import runs
from jsae.config import ConfigError, from_dict, member_config
from jsae.data import make_source
from jsae.train.checkpoint import RunCheckpointer, read_checkpoint
from jsae.train.loop import Trainer, TrainingStopped
from jsae.train.run import Run

STEPS = 12
MEMBERS = [  # a width, a k, an lr, a warmup: each member its own optimizer and schedule
    {"name": "w64"},
    {"name": "w128", "sae": {"d_sae": 128, "k": 4}, "train": {"lr": 1e-3,
                                                             "lr_warmup_steps": 2}},
]


def _raw(run_dir, family=MEMBERS):
    raw = {
        "run_dir": str(run_dir),
        "data": {"source": "synthetic", "d_in": 16, "n_features": 64, "active_per_sample": 3},
        "sae": sae_section({"architecture": "topk", "d_sae": 64, "k": 3, "init_sample": 128,
                            "b_dec_init": "mean", "dead_after_tokens": 1000}),
        "train": {"steps": STEPS, "batch_size": 32, "lr": 3e-3, "lr_warmup_steps": 3,
                  "log_every": 4, "progress": False},
        "checkpoint": {"every_steps": 100, "keep": 2},  # the stop's and the final save
        "eval": {"tokens": 64, "at_tokens": [128]},
        "mesh": {"data": 1, "model": 1},
    }
    if family is not None:
        raw["family"] = copy.deepcopy(family)
    return raw


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr("jsae.train.run.plot_metrics", lambda *a, **k: None)


def _host(states):
    return jax.tree.map(np.asarray, jax.device_get(states))


_COMPILED: dict = {}


def _trainer(cfg):
    """A Trainer reusing the jitted steps and evaluations of an earlier one of the same config
    (run_dir aside): compiling dominates these tests on a small CPU."""
    tr = Trainer(cfg, make_source(cfg))
    key = repr(dataclasses.replace(cfg, run_dir=""))
    if key in _COMPILED:
        tr._jitted, tr._eval_fns = _COMPILED[key]
        return tr
    compiled, eval_sums = tr._compiled, tr._eval_sums

    def keep():
        _COMPILED[key] = (tr._jitted, tr._eval_fns)

    def compiled_(states):
        fn = compiled(states)
        keep()
        return fn

    def eval_sums_(states):
        fns = eval_sums(states)
        keep()
        return fns

    tr._compiled, tr._eval_sums = compiled_, eval_sums_
    return tr


def _train(cfg, *, checkpoints=True, on_step=None, logs=None):
    """Train ``cfg`` in its run directory; ``on_step(n)`` runs before step n (1-based)."""
    tr = _trainer(cfg)
    log = logs.append if logs is not None else (lambda m: None)
    if on_step is not None:
        orig, count = tr.step, [0]

        def step(states, batch):
            count[0] += 1
            on_step(count[0])
            return orig(states, batch)

        tr.step = step
    if not checkpoints:
        Run(cfg, log=log).train(tr)
        return tr
    ck = RunCheckpointer(cfg, tr, log_fn=log)
    try:
        Run(cfg, log=log).train(tr, checkpointer=ck)
    finally:
        ck.close()
    return tr


def _assert_bitwise(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert len(la) == len(lb)
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("family")
    cfg = from_dict(_raw(run_dir))
    tr = _train(cfg, checkpoints=False)
    return cfg, run_dir, _host(tr.states), tr.source.state()


def test_each_member_equals_the_same_dictionary_trained_alone(family, tmp_path):
    cfg, _, states, _ = family
    assert sorted(states) == ["synthetic@w128", "synthetic@w64"]
    for i, m in enumerate(cfg.family):
        alone = member_config(cfg, i)  # the run's config with the member's overrides
        alone.run_dir = str(tmp_path / m.name)
        assert alone.family is None
        tr = _train(alone, checkpoints=False)
        _assert_bitwise(_host(tr.states)["synthetic"], states[f"synthetic@{m.name}"])
    # the members did learn different things (the overrides reached them)
    assert states["synthetic@w128"].sae.params["W_enc"].shape == (16, 128)
    assert float(states["synthetic@w64"].opt_state[1][0].count) == STEPS


def test_members_of_different_widths_start_from_independent_directions(tmp_path):
    """One seed, two widths: no decoder row of the wider member starts as the narrower's row of
    the same index (JAX's partitionable threefry makes normal(key, (N, d)) a prefix of
    normal(key, (2N, d)); the width is folded into the init key), so `jsae families` matches
    what the members learned, not their initialisation."""
    cfg = from_dict(_raw(tmp_path / "run"))
    st = _host(Trainer(cfg, make_source(cfg)).init_states())
    a, b = (np.asarray(st[f"synthetic@{n}"].sae.params["W_dec"]) for n in ("w64", "w128"))
    cos = np.sum(a * b[:64], 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b[:64], axis=1)
    assert np.abs(cos).max() < 0.9, np.abs(cos).max()


def test_family_folders_metrics_and_checkpoints(family):
    _, run_dir, states, _ = family
    for name, d_sae in (("w64", 64), ("w128", 128)):
        folder = run_dir / "saes" / "synthetic" / name
        meta = json.loads((folder / "sae.json").read_text())
        assert meta["spec"]["d_sae"] == d_sae
        assert meta["metadata"]["hook_name"] == "synthetic"
        assert meta["metadata"]["family_member"] == name
        assert meta["metadata"]["family"] == ["w64", "w128"]
        # its scaling points travel with it (`jsae scaling` on the folder)
        assert [p["step"] for p in meta["metadata"]["scaling"]["points"]] == [4, STEPS]
    assert sorted(runs.saved_hooks(run_dir)) == ["synthetic@w128", "synthetic@w64"]
    sae, info = runs.sae_from_run(run_dir, "synthetic@w128")
    np.testing.assert_array_equal(np.asarray(sae.params["W_dec"]),
                                  states["synthetic@w128"].sae.params["W_dec"])
    assert info["from"].endswith("saes/synthetic/w128")
    from jsae.scaling.members import read_members

    members = read_members([run_dir / "saes/synthetic/w128", run_dir / "saes/synthetic/w64"])
    assert [m.d_sae for m in members] == [64, 128] and {m.hook for m in members} == {"synthetic"}
    whole = read_members([run_dir])  # the family's run directory: every member's folder
    assert [m.folder for m in whole] == [m.folder for m in members]
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("w64", "w128"):
        assert f"synthetic@{name}/loss" in header and f"eval_synthetic@{name}/fvu" in header
    lr = {name: float(next(r for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]
                           ).split(",")[header.index(f"synthetic@{name}/lr")])
          for name in ("w64", "w128")}
    # at step 4 (warmup done for both): each member's own learning rate
    assert lr == {"w64": pytest.approx(3e-3), "w128": pytest.approx(1e-3)}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["heldout"]) == {"synthetic@w64", "synthetic@w128"}


def test_export_writes_each_member_at_its_hook(family, tmp_path):
    from jsae.export import export_run

    _, run_dir, _, _ = family
    written = export_run(run_dir, tmp_path / "out", format="saelens")
    assert sorted(Path(p).relative_to(tmp_path / "out").as_posix() for p in written) == [
        "synthetic/w128", "synthetic/w64"]
    for name in ("w64", "w128"):
        cfg = json.loads((tmp_path / "out" / "synthetic" / name / "cfg.json").read_text())
        assert cfg["hook_name"] == "synthetic"


def test_sigterm_and_resume_end_like_the_uninterrupted_family(family, tmp_path):
    cfg, _, ref_states, ref_data = family
    cfg = from_dict(_raw(tmp_path))

    def term(n):
        if n == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag

    with pytest.raises(TrainingStopped) as stop:
        _train(cfg, on_step=term)
    ck = read_checkpoint(tmp_path)  # one Orbax tree holds every member
    assert stop.value.step == 6 and ck["step"] == 6
    assert sorted(ck["states"]) == ["synthetic@w128", "synthetic@w64"]
    assert runs.run_hooks(tmp_path) == ["synthetic@w64", "synthetic@w128"]
    logs = []
    tr = _train(cfg, logs=logs)
    assert any("resuming from step 6" in m and "w128" in m for m in logs), logs
    _assert_bitwise(_host(tr.states), ref_states)
    assert tr.source.state() == ref_data


def test_eval_covers_every_member(family):
    from jsae.evals.evaluate import evaluate_path

    _, run_dir, _, _ = family
    out = evaluate_path(run_dir, n_tokens=64, json_path=run_dir / "eval" / "eval.json",
                        print_fn=None)
    assert set(out["metrics"]) == {"synthetic@w64", "synthetic@w128"}
    held = json.loads((run_dir / "summary.json").read_text())["heldout"]
    for k, m in out["metrics"].items():  # held-out rows of the run's data, drawn anew
        assert m["fvu"] == pytest.approx(held[k]["fvu"], abs=0.05)
        assert (run_dir / "eval" / f"feature_density_{k}.npy").is_file()
    assert out["metrics"]["synthetic@w64"]["fvu"] != out["metrics"]["synthetic@w128"]["fvu"]


@pytest.mark.parametrize("family_, key", [
    ([{"name": "a"}, {"name": "a", "sae": {"d_sae": 128}}], "family[1].name"),
    ([{"name": "a", "train": {"batch_size": 64}}], "family[0].train.batch_size"),
    ([{"name": "a", "train": {"tokens": 4096}}], "family[0].train.tokens"),
    ([{"name": "a", "sae": {"init_sample": 64}}], "family[0].sae.init_sample"),
    ([{"name": "a", "sae": {"input_hook": "blocks.1.hook_resid_post"}}],
     "family[0].sae.input_hook"),
    ([{"name": "a", "model": {"hooks": ["x"]}}], "family[0].model"),
    ([{"name": "a", "data": {"d_in": 8}}], "family[0].data"),
    ([{"name": "a", "sae": {"kk": 3}}], "family[0].sae.kk"),
    ([{"name": "a", "sae": {"k": 500}}], "family[0].sae.k"),
    ([{"name": "a", "train": {"lr": -1}}], "family[0].train.lr"),
    ([{"name": "a/b"}], "family[0].name"),
    ([], "family"),
])
def test_bad_family_is_one_line_naming_the_key(tmp_path, family_, key):
    with pytest.raises(ConfigError) as e:
        from_dict(_raw(tmp_path / "run", family_))
    msg = str(e.value)
    assert f"'{key}" in msg and "\n" not in msg, msg


def test_a_member_may_change_its_architecture(tmp_path):
    fam = [{"name": "t"}, {"name": "r", "sae": {"architecture": "relu", "d_sae": 96},
                           "train": {"sparsity_warmup_steps": 5}}]
    cfg = from_dict(_raw(tmp_path / "run", fam))
    relu = member_config(cfg, 1)
    assert (relu.sae.architecture, relu.sae.d_sae, relu.train.sparsity_warmup_steps) == (
        "relu", 96, 5)
    assert "k" not in relu.sae.options.__dataclass_fields__  # the run's TopK key is not its
    assert member_config(cfg, 0).sae.k == 3


def test_bad_family_on_the_command_line_exits_2_writing_nothing(tmp_path, capsys):
    from jsae.cli import main

    cfg = tmp_path / "family.yaml"
    raw = _raw(tmp_path / "run", [{"name": "a"}, {"name": "b", "train": {"steps": 3}}])
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "family[1].train.steps" in err and "agree" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_preflight_refuses_the_member_that_does_not_fit(tmp_path, monkeypatch):
    from jsae.train import preflight

    fam = [{"name": "small"}, {"name": "huge", "sae": {"d_sae": 1 << 16}}]
    cfg = from_dict(_raw(tmp_path / "run", fam))
    small = from_dict(_raw(tmp_path / "run", None))
    need_small = preflight.state_bytes(16, 64, 32, params_per_latent=34)
    monkeypatch.setattr(preflight, "device_memory", lambda: (need_small * 4, "this machine has"))
    preflight.preflight(small)  # the run's dictionary alone fits
    with pytest.raises(ConfigError) as e:
        preflight.preflight(cfg)
    msg = str(e.value)
    assert "'family[1].sae.d_sae'" in msg and "'huge'" in msg and "\n" not in msg, msg


def test_plan_covers_every_member(tmp_path):
    from jsae.plan import plan

    cfg = from_dict(_raw(tmp_path / "run"))
    p = plan(cfg)  # each member's step compiled; their states held at once
    hook = cfg.model.hooks[0]
    assert p.d_sae == {f"{hook}@w64": 64, f"{hook}@w128": 128}
    params = 4 * ((2 * 16 + 1) * (64 + 128) + 2 * (16 + 1))  # W_enc, W_dec, b_enc; b_dec, scale
    assert p.params == params and p.opt_state >= 2 * (params - 8)
    assert p.peak >= p.params + p.opt_state + p.batch


def test_configs_family_yaml_is_valid():
    from jsae.config import load

    cfg = load(Path(__file__).resolve().parents[1] / "configs" / "family.yaml")
    assert len(cfg.family) >= 3
    assert len({member_config(cfg, i).sae.d_sae for i in range(len(cfg.family))}) >= 3

