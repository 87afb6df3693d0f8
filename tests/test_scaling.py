"""`eval.at_tokens`, training FLOPs, the scaling-law fits and `jsae scaling` end to end."""

import json

import numpy as np
import pytest

from jsae import cli
from jsae.config import ConfigError, from_dict
from jsae.errors import BadInput
from jsae.scaling import fit
from jsae.train.eval_points import at_steps

D_IN = 16
SIZES = (32, 64)
AT_CHECKED = [128, 1024, 3072, 6144]  # steps 1, 8, 24, 48


def _raw(run_dir, d_sae, steps=48, checkpoint=None, **eval_):
    return {
        "run_dir": str(run_dir), "seed": 0,
        "data": {"source": "synthetic", "d_in": D_IN, "n_features": 96, "active_per_sample": 3},
        "sae": {"architecture": "topk", "d_sae": d_sae, "k": 3, "dead_after_tokens": 50_000},
        "train": {"steps": steps, "batch_size": 128, "lr": 3e-3, "lr_warmup_steps": 4,
                  "log_every": 8, "progress": False},
        "eval": {"tokens": 1024, "show_features": 0, "at_tokens": "log:5", **eval_},
        "checkpoint": checkpoint or {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny synthetic runs of different widths, held-out points at log:5 (the wider one at
    checkpointed steps)."""
    from jsae.runner import run_training

    root = tmp_path_factory.mktemp("sweep")
    runs = []
    for d_sae in SIZES:
        extra = {} if d_sae != SIZES[1] else {  # checkpoints at points, to evaluate them apart
            "checkpoint": {"every_steps": 8, "keep": 10}, "at_tokens": AT_CHECKED}
        cfg = from_dict(_raw(root / f"w{d_sae}", d_sae, **extra))
        run_training(cfg, print_fn=lambda *a, **k: None)
        runs.append(root / f"w{d_sae}")
    return runs


def test_at_steps_lists_and_log_spacing():
    assert at_steps(None, 128, 48) == []
    assert at_steps([128, 129, 1000, 6144], 128, 48) == [1, 2, 8, 48]
    steps = at_steps("log:5", 128, 48)
    assert steps[0] == 1 and steps[-1] == 48 and len(steps) == 5
    ratios = np.diff(np.log(steps[1:]))  # log-spaced: equal ratios, up to rounding to steps
    assert np.ptp(ratios) < 0.5
    with pytest.raises(ValueError, match="log:N"):
        at_steps("lin:3", 128, 48)
    with pytest.raises(ValueError, match="outside"):
        at_steps([10**9], 128, 48)


def test_bad_at_tokens_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="eval.at_tokens"):
        from_dict(_raw(tmp_path / "r", 32, at_tokens="log:1"))


def test_flops_formula_dense_and_k_sparse():
    from jsae.sae.spec import SAESpec
    from jsae.scaling.flops import flops_per_token

    dense = SAESpec("topk", 16, 256, k=4)
    sparse = SAESpec("topk", 16, 256, k=4, fast_path=True)
    assert flops_per_token(dense) == 12 * 16 * 256
    assert flops_per_token(sparse) == 2 * 16 * 256 + 8 * 16 * 4


def test_recorded_points_equal_evaluating_the_checkpoints(sweep):
    """Each point at a checkpointed step equals a separate held-out evaluation of that
    checkpoint's SAE (same held-out rows), and the last is the final held-out metrics."""
    from jsae.data.sources import SyntheticSource
    from jsae.evals.reconstruction import reconstruction_metrics
    from jsae.runs import sae_from_checkpoint

    run = sweep[1]
    summary = json.loads((run / "summary.json").read_text())
    rec = summary["scaling"]["synthetic"]
    pts = rec["points"]
    assert [p["step"] for p in pts] == [1, 8, 24, 48]
    assert all(p["tokens"] == p["step"] * 128 for p in pts)
    assert all(p["flops"] == p["tokens"] * (2 * D_IN * SIZES[1] + 8 * D_IN * 3) for p in pts)
    assert pts[-1]["fvu"] == summary["heldout"]["synthetic"]["fvu"]
    meta = json.loads((run / "saes" / "synthetic" / "sae.json").read_text())["metadata"]
    assert meta["scaling"] == rec
    src = SyntheticSource(D_IN, 96, 3, seed=0)
    checked = 0
    for p in pts:
        if p["step"] % 8:
            continue
        sae, _ = sae_from_checkpoint(run, "synthetic", p["step"])
        ref = reconstruction_metrics(sae, (b["synthetic"] for b in src.eval_batches(1024, 128)))
        assert ref["fvu"] == pytest.approx(p["fvu"], rel=1e-5), p["step"]
        checked += 1
    assert checked == 3
    assert pts[0]["fvu"] > pts[-1]["fvu"]  # it learns


def test_power_law_plus_constant_recovered():
    x = np.geomspace(1e6, 1e10, 9)
    y = 3.0 * x**-0.25 + 0.05
    f = fit.fit_power_law(x, y * np.exp(np.random.default_rng(0).normal(0, 0.002, 9)))
    assert f["b"] == pytest.approx(0.25, rel=0.05)
    assert f["c"] == pytest.approx(0.05, rel=0.05)
    with pytest.raises(BadInput, match="at least 3 points"):
        fit.fit_power_law(x[:2], y[:2])


def test_frontier_and_loglog():
    c = np.array([1, 2, 3, 4, 5.0])
    loss = np.array([5, 6, 4, 4.5, 1.0])
    assert fit.pareto_frontier(c, loss).tolist() == [0, 2, 4]
    x = np.geomspace(1, 1e6, 7)
    f = fit.fit_loglog(x, 2.5 * x**0.6)
    assert f["exponent"] == pytest.approx(0.6) and f["coefficient"] == pytest.approx(2.5)


def test_joint_fit_recovers_exponents_and_optimum():
    """L = E + A/N^alpha + B/D^beta with dense FLOPs 12 d N D: the fit recovers alpha, beta and
    N* ~ C^(beta/(alpha+beta)), D* ~ C^(alpha/(alpha+beta)) within tolerance."""
    fpt = lambda n: 12.0 * 64 * np.asarray(n, np.float64)  # noqa: E731
    n, d = np.meshgrid([256, 512, 1024, 2048, 4096, 8192.0], np.geomspace(1e5, 1e8, 8))
    n, d = n.ravel(), d.ravel()
    alpha, beta = 0.4, 0.3
    loss = 0.05 + 2.0 * n**-alpha + 30.0 * d**-beta
    loss = loss * np.exp(np.random.default_rng(1).normal(0, 0.003, loss.shape))
    c = fpt(n) * d
    j = fit.fit_joint(n, d, loss, fpt, (c.min(), c.max()), bootstrap=10)
    assert j["alpha"] == pytest.approx(alpha, rel=0.08)
    assert j["beta"] == pytest.approx(beta, rel=0.05)
    assert j["n_exponent"] == pytest.approx(beta / (alpha + beta), abs=0.03)
    assert j["d_exponent"] == pytest.approx(alpha / (alpha + beta), abs=0.03)
    assert 0 < j["n_exponent_sd"] < 0.05 and j["bootstrap"] == 10 and j["at_bound"] == []
    # the optimum is a minimum on the budget line: neighbours on it are worse
    no, do = fit.optimal_allocation(j, fpt, [1e14])
    on_line = lambda m: fit.joint_loss(j, m, 1e14 / fpt(m))  # noqa: E731
    assert on_line(no[0]) < on_line(no[0] * 1.2) and on_line(no[0]) < on_line(no[0] / 1.2)


def test_scaling_cli_end_to_end(sweep, tmp_path, capsys):
    out = tmp_path / "scaling"
    assert cli.main(["scaling", *map(str, sweep), "--out", str(out), "--compute", "1e10",
                     "--bootstrap", "5"]) == 0
    doc = json.loads((out / "scaling.json").read_text())
    assert len(doc["points"]) == 5 + 4 and sorted(doc["per_size"]) == sorted(map(str, SIZES))
    assert doc["members"][0]["d_sae"] == 32
    assert doc["recommendation"]["features"] > 0 and doc["recommendation"]["tokens"] > 0
    for png in ("loss_vs_tokens.png", "frontier.png", "optimal.png"):
        assert (out / png).stat().st_size > 1000
    text = capsys.readouterr().out
    assert "for 1e+10 FLOPs:" in text and "features" in text
    # --min-tokens keeps the points at or after it, every other figure from those alone
    cut = sorted(p["tokens"] for p in doc["points"])[3]
    assert cli.main(["scaling", *map(str, sweep), "--out", str(tmp_path / "tail"), "--bootstrap",
                     "0", "--min-tokens", str(int(cut))]) == 0
    tail = json.loads((tmp_path / "tail" / "scaling.json").read_text())
    assert tail["points"] == [p for p in doc["points"] if p["tokens"] >= cut]
    assert tail["min_tokens"] == int(cut) and len(tail["points"]) < len(doc["points"])
    capsys.readouterr()
    assert cli.main(["scaling", *map(str, sweep), "--out", str(tmp_path / "none"),
                     "--min-tokens", "10000000"]) == 2
    err = capsys.readouterr().err
    assert "at or after 10,000,000 tokens" in err and not (tmp_path / "none").exists()
    # the SAE folders are members too
    folders = [str(r / "saes" / "synthetic") for r in sweep]
    assert cli.main(["scaling", *folders, "--out", str(tmp_path / "s2"), "--bootstrap", "0"]) == 0


def test_scaling_bad_input_is_one_line_and_writes_nothing(sweep, tmp_path, capsys):
    out = tmp_path / "never"
    for args in ([str(sweep[0])], [str(sweep[0]), str(tmp_path / "missing")],
                 [str(sweep[0]), str(sweep[0])]):
        assert cli.main(["scaling", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
    assert not out.exists()


def test_scaling_refuses_folders_without_points_or_of_another_model(sweep, tmp_path, capsys):
    import shutil

    def variant(name, edit):
        dst = tmp_path / name
        shutil.copytree(sweep[0] / "saes" / "synthetic", dst)
        info = json.loads((dst / "sae.json").read_text())
        edit(info["metadata"])
        (dst / "sae.json").write_text(json.dumps(info))
        return str(dst)

    no_points = variant("np", lambda m: m.pop("scaling"))
    other = variant("om", lambda m: m.update(model_name="another-model"))
    out = tmp_path / "never"
    for bad, says in ((no_points, "no held-out points"), (other, "model")):
        assert cli.main(["scaling", bad, str(sweep[1]), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


class _TwoHooks:
    """Two hooks fed from one synthetic stream (the second scaled), for a run of two SAEs."""

    def __init__(self):
        from jsae.data.sources import SyntheticSource

        self.src = SyntheticSource(D_IN, 96, 3, seed=0)
        self.hooks, self.d_in = ["a", "b"], {"a": D_IN, "b": D_IN}

    def _two(self, b):
        x = b["synthetic"]
        return {"a": x, "b": 2.0 * x[:, ::-1].copy()}

    def next_batch(self, n):
        return self._two(self.src.next_batch(n))

    def eval_batches(self, n_tokens, batch_size):
        return (self._two(b) for b in self.src.eval_batches(n_tokens, batch_size))

    def state(self):
        return self.src.state()

    def restore(self, state):
        self.src.restore(state)


def test_points_of_a_run_with_several_dictionaries(tmp_path):
    """metrics.csv holds eval_<hook>/<metric> columns; each dictionary gets its own points."""
    from jsae.train import Run, Trainer

    raw = _raw(tmp_path / "two", 32, steps=16, at_tokens=[256, 1024])
    raw["model"] = {"hooks": ["a", "b"]}
    cfg = from_dict(raw)
    summary = Run(cfg, log=lambda s: None).train(Trainer(cfg, _TwoHooks()))
    for h in ("a", "b"):
        pts = summary["scaling"][h]["points"]
        assert [p["step"] for p in pts] == [2, 8, 16]
        assert pts[-1]["fvu"] == summary["heldout"][h]["fvu"]
        assert all(0 < p["fvu"] < 2 and p["eval_tokens"] == 1024 for p in pts)
    assert summary["scaling"]["a"]["points"][0]["fvu"] != summary["scaling"]["b"]["points"][0]["fvu"]
