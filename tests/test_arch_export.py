"""SAELens round trips of the new architectures: matryoshka (as SAELens saves its
matryoshka_batchtopk for inference: a JumpReLU SAE) and jumprelu with a linear threshold."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from saelens_side import run_saelens, saelens_python
from test_export import D_IN, D_SAE, _random_sae, _x

from jsae.export.saelens import load_saelens, save_saelens
from jsae.sae import SAE, SAESpec, decode, encode


def _new_saes() -> dict[str, SAE]:
    base = _random_sae("batchtopk", seed=5)
    mat = base.replace(spec=SAESpec("matryoshka", D_IN, D_SAE, k=4, matryoshka_groups=(8, 24)))
    jr = _random_sae("jumprelu", seed=6)
    p = {k: v for k, v in jr.params.items() if k != "log_threshold"}
    p["threshold"] = jnp.exp(jr.params["log_threshold"])
    lin = jr.replace(params=p, spec=SAESpec("jumprelu", D_IN, D_SAE, jumprelu_threshold="linear"))
    return {"matryoshka": mat, "jumprelu_linear": lin}


def test_saelens_round_trip_in_jsae(tmp_path):
    x = _x(32)
    for name, sae in _new_saes().items():
        save_saelens(sae, tmp_path / name, hook_name="blocks.4.hook_resid_post",
                     model_name="gemma-3-270m")
        cfg = json.loads((tmp_path / name / "cfg.json").read_text())
        assert cfg["architecture"] == "jumprelu"
        back, _ = load_saelens(tmp_path / name)
        np.testing.assert_allclose(np.asarray(encode(back, x)), np.asarray(encode(sae, x)),
                                   rtol=1e-5, atol=1e-5, err_msg=name)


_SCRIPT = r"""
import json, sys
import numpy as np, torch
from sae_lens import SAE
root = sys.argv[1]
x = torch.from_numpy(np.load(f"{root}/x.npy"))
report = {}
for name in json.loads(open(f"{root}/names.json").read()):
    sae = SAE.load_from_disk(f"{root}/{name}")
    with torch.no_grad():
        z = sae.encode(x)
        np.save(f"{root}/{name}.z.npy", z.numpy())
        np.save(f"{root}/{name}.xhat.npy", sae.decode(z).numpy())
    report[name] = type(sae).__name__
print(json.dumps(report))
"""


@pytest.mark.slow
def test_new_architectures_load_in_real_saelens(tmp_path):
    saelens_python()
    x = _x(32)
    np.save(tmp_path / "x.npy", x)
    saes = _new_saes()
    for name, sae in saes.items():
        save_saelens(sae, tmp_path / name, hook_name="blocks.4.hook_resid_post",
                     model_name="gemma-3-270m")
    (tmp_path / "names.json").write_text(json.dumps(list(saes)))
    report = run_saelens(_SCRIPT, tmp_path)
    for name, sae in saes.items():
        assert report[name] == "JumpReLUSAE"
        z = np.asarray(encode(sae, x))
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.z.npy"), z, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.xhat.npy"),
                                   np.asarray(decode(sae, jnp.asarray(z))), rtol=1e-4, atol=1e-4)
