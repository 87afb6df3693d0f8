"""Feature splitting across sizes: exact cosine matching, co-activation, a planted hierarchy
recovered, and `jsae families` end to end."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsae import cli
from jsae.sae.io import save_sae
from jsae.sae.spec import SAE, SAESpec
from jsae.scaling import families as fam

D = 32


def test_match_by_cosine_equals_brute_force():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=(13, 2, 5)), rng.normal(size=(50, 2, 5))  # two hooks' rows
    small[3] = 0  # a zero row never wins (cosine 0)
    parent, cos = fam.match_by_cosine(small, large, chunk=7)  # 8 chunks, the last padded
    s = small.reshape(13, -1)
    lg = large.reshape(50, -1)
    norms = np.linalg.norm(s, axis=1, keepdims=True)
    ref = (lg / np.linalg.norm(lg, axis=1, keepdims=True)) @ (s / np.maximum(norms, 1e-30)).T
    np.testing.assert_array_equal(parent, ref.argmax(1))
    np.testing.assert_allclose(cos, ref.max(1), atol=1e-6)


def test_coactivation_counts_equal_brute_force():
    rng = np.random.default_rng(1)
    fs, fl = rng.random((200, 6)) < 0.3, rng.random((200, 15)) < 0.2
    parent = rng.integers(0, 6, 15)
    valid = rng.random(15) < 0.8
    co = fam.coactivation(fs, fl, parent, valid, chunk=4)
    for j in range(15):
        on = fl[:, j]
        assert co["p_parent"][j] == pytest.approx(fs[on, parent[j]].mean())
        counts = (fs[on]).sum(0)
        assert co["coact_parent"][j] == counts.argmax()
    for p in range(6):
        kids = [j for j in range(15) if valid[j] and parent[j] == p]
        union = fl[:, kids].any(1) if kids else np.zeros(200, bool)
        assert co["coverage"][p] == pytest.approx((union & fs[:, p]).sum() / fs[:, p].sum())


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _planted(seed=0):
    """6 parents; 3 children each (parent + 0.6 * noise); 2 grandchildren per child (child +
    0.25 * noise); the middle dictionary also has 2 unrelated features. Rows shuffled."""
    rng = np.random.default_rng(seed)
    parents = _unit(rng.normal(size=(6, D)))
    children = _unit(np.repeat(parents, 3, 0) + 0.6 * _unit(rng.normal(size=(18, D))))
    grand = _unit(np.repeat(children, 2, 0) + 0.25 * _unit(rng.normal(size=(36, D))))
    mid = np.concatenate([children, _unit(rng.normal(size=(2, D)))])
    perms = [rng.permutation(len(w)) for w in (parents, mid, grand)]
    return [w[p] for w, p in zip((parents, mid, grand), perms)], perms


def _sae(w_dec):
    """A k=1 dictionary whose encoder is its decoder's transpose (codes pick the best row)."""
    n = len(w_dec)
    spec = SAESpec("topk", D, n, k=1, fast_path=False)
    params = {"W_enc": jnp.asarray(w_dec.T, jnp.float32), "b_enc": jnp.zeros(n),
              "W_dec": jnp.asarray(w_dec, jnp.float32), "b_dec": jnp.zeros(D)}
    return SAE(params=params, norm_scale=jnp.asarray(1.0), spec=spec)


@pytest.fixture(scope="module")
def planted():
    decs, perms = _planted()
    rng = np.random.default_rng(5)
    grand_true = np.argsort(perms[2])  # planted grandchild g sits at row grand_true[g]
    pick = rng.integers(0, 36, 600)
    x = 3.0 * decs[2][grand_true[pick]] + 0.01 * rng.normal(size=(600, D))
    return decs, perms, x.astype(np.float32)


def _planted_trees(perms):
    """{row of parent: {row of child: {rows of grandchildren}}} in the shuffled dictionaries."""
    pos = [np.argsort(p) for p in perms]  # planted index -> row
    return {int(pos[0][p]): {int(pos[1][c]): {int(pos[2][g]) for g in (2 * c, 2 * c + 1)}
                             for c in range(3 * p, 3 * p + 3)} for p in range(6)}


def test_planted_hierarchy_is_recovered(planted):
    from jsae.scaling.members import Member
    from jsae.scaling.splitting import families

    decs, perms, x = planted
    saes = [_sae(w) for w in decs]
    members = [Member(path=Path(f"m{i}"), hook="h", model=None,
                      spec=s.spec, meta={}, folder=None) for i, s in enumerate(saes)]
    res = families(members, saes, x, min_cos=0.6, top=6)
    got = {t["feature"]: {c["feature"]: {g["feature"] for g in c["children"]}
                          for c in t["children"]} for t in res["families"]}
    assert got == _planted_trees(perms)
    lv0, lv1 = res["levels"]
    assert sum(lv0["matched"]) == 18  # the two unrelated features have no parent
    assert lv0["split_frac"] == 1.0 and lv0["mean_children"] == 3.0
    assert lv1["mean_children"] == 2.0 and lv1["matched_frac"] == 1.0
    assert lv0["coverage_mean"] == 1.0 and lv0["coact_agreement"] == 1.0
    assert all(c["p_parent"] == 1.0 for t in res["families"] for c in t["children"])


def _save(root, decs, hooks=("blocks.0.hook_resid_post",) * 3):
    paths = []
    for w, h in zip(decs, hooks):
        p = root / f"d{len(w)}"
        save_sae(jax.device_get(_sae(w)), p, metadata={"hook_name": h, "model_name": "tiny"})
        paths.append(str(p))
    return paths


def test_families_cli_end_to_end(planted, tmp_path, capsys):
    decs, perms, x = planted
    paths = _save(tmp_path, decs)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "fam"
    # given out of order: the command sorts by size
    assert cli.main(["families", paths[2], paths[0], paths[1], "--out", str(out),
                     "--activations", str(tmp_path / "x.npy"), "--min-cos", "0.6"]) == 0
    doc = json.loads((out / "families.json").read_text())
    assert [m["d_sae"] for m in doc["members"]] == [6, 20, 36]
    assert doc["sample_tokens"] == 600 and doc["levels"][0]["coverage_mean"] == 1.0
    assert (out / "families.png").stat().st_size > 1000
    assert "6 -> 20 features: 90% matched" in capsys.readouterr().out


def test_families_bad_input_is_one_line_and_writes_nothing(planted, tmp_path, capsys):
    decs, _, _ = planted
    paths = _save(tmp_path, decs, hooks=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                                         "blocks.0.hook_resid_post"))
    np.save(tmp_path / "bad.npy", np.zeros((4, D + 1), np.float32))
    out = tmp_path / "never"
    for args in ([paths[0], paths[1]], [paths[0]], [paths[0], str(tmp_path / "nope")],
                 [paths[0], paths[2], "--activations", str(tmp_path / "bad.npy")]):
        assert cli.main(["families", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err, err
    assert not out.exists()


def test_families_reads_a_harvest_cache_sample(planted, tmp_path):
    """--activations CACHE: the cache's held-out rows give the same co-activation as the array."""
    from jsae.data.cache import CacheWriter

    decs, _, x = planted
    hook = "blocks.0.hook_resid_post"
    w = CacheWriter(tmp_path / "c", {"model": "tiny", "hooks": [hook], "d_in": {hook: D},
                                    "dtype": "float32"})
    w.write_shard("train", {hook: x[:64]})
    w.write_shard("eval", {hook: x})
    w.mark_complete("train")
    w.mark_complete("eval")
    paths = _save(tmp_path, decs[:2])
    np.save(tmp_path / "x.npy", x)
    for src, out in ((tmp_path / "c", "a"), (tmp_path / "x.npy", "b")):
        assert cli.main(["families", *paths, "--out", str(tmp_path / out), "--min-cos", "0.6",
                         "--activations", str(src)]) == 0
    a, b = (json.loads((tmp_path / o / "families.json").read_text()) for o in "ab")
    assert a["sample_tokens"] == b["sample_tokens"] == 600
    assert a["levels"][0]["p_parent"] == b["levels"][0]["p_parent"]
