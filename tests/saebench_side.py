"""Running a script under the real sae-bench (a side venv in CI: $JSAE_SAEBENCH_PYTHON, built by
tools/test.sh with JSAE_WITH_SAEBENCH=1)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _wait_for_build(marker: str, timeout_s: float = 900) -> None:
    """tools/test.sh builds the side venv while the suite runs: wait for MARKER.done (or skip on
    MARKER.failed, the build's log beside it)."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if Path(marker + ".done").exists():
            return
        if Path(marker + ".failed").exists():
            pytest.skip(f"the sae-bench side venv could not be installed ({marker}.log)")
        time.sleep(2)
    pytest.skip(f"the sae-bench side venv was not ready after {timeout_s:.0f} s ({marker}.log)")


def saebench_python() -> str:
    """$JSAE_SAEBENCH_PYTHON, or this Python if it has sae_bench; else the test skips."""
    if os.environ.get("JSAE_SAEBENCH_MARKER"):
        _wait_for_build(os.environ["JSAE_SAEBENCH_MARKER"])
    exe = os.environ.get("JSAE_SAEBENCH_PYTHON")
    if not exe and importlib.util.find_spec("sae_bench"):
        exe = sys.executable
    if not exe:
        pytest.skip("sae-bench is not installed (set JSAE_SAEBENCH_PYTHON to a Python with it, "
                    "as `JSAE_WITH_SAEBENCH=1 bash tools/test.sh` does)")
    return exe


def run_saebench(script: str, root: Path):
    """Run ``script`` (argv[1] = ``root``) under sae-bench; its last stdout line as JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    out = subprocess.run([saebench_python(), "-c", script, str(root)], capture_output=True,
                         text=True, timeout=900, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# SAEBench's absorption eval (its k-sparse probing experiment, then its feature-absorption
# experiment, aggregated as its main.run_eval does) on a tiny Gemma 3 model: argv[1] holds
# settings.json (the transformers config, layer, batch sizes, epochs), model.safetensors
# (jsae's weights in transformers' layout), tokenizer.json and sae/ (a SAELens folder written
# by jsae). The model is built in transformers and converted by TransformerLens's own Gemma
# converter with no weight processing (from_pretrained_no_processing). run_eval itself loads
# a model by hub name, so the script calls the two experiments it runs.
ABSORPTION_SCRIPT = r"""
import json, random, statistics, sys
import numpy as np, torch
root = sys.argv[1]
S = json.loads(open(f"{root}/settings.json").read())
random.seed(S["seed"]); np.random.seed(S["seed"]); torch.manual_seed(S["seed"])
from safetensors.numpy import load_file
import transformers as T
hc = S["hf_config"]
hf = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**hc, attn_implementation="eager")).eval()
sd = {k: torch.from_numpy(v) for k, v in load_file(f"{root}/model.safetensors").items()}
missing, unexpected = hf.load_state_dict(sd, strict=False)
assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
tok = T.PreTrainedTokenizerFast(tokenizer_file=f"{root}/tokenizer.json", bos_token="<bos>",
                                eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
tok.save_pretrained(f"{root}/tok")  # TransformerLens wants a tokenizer that knows its folder
tok = T.AutoTokenizer.from_pretrained(f"{root}/tok")
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import get_pretrained_model_config
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
over = dict(d_model=hc["hidden_size"], d_head=hc["head_dim"], n_heads=hc["num_attention_heads"],
            d_mlp=hc["intermediate_size"], n_layers=hc["num_hidden_layers"], d_vocab=hc["vocab_size"],
            d_vocab_out=hc["vocab_size"], n_key_value_heads=hc["num_key_value_heads"],
            window_size=hc["sliding_window"], rotary_base=hc["rope_theta"],
            rotary_base_local=hc["rope_local_base_freq"],
            attn_types=["local" if t == "sliding_attention" else "global" for t in hc["layer_types"]],
            rotary_dim=hc["head_dim"], attn_scale=float(hc["query_pre_attn_scalar"]) ** 0.5,
            tokenizer_name=None, eps=hc["rms_norm_eps"], n_ctx=hc["max_position_embeddings"],
            model_name="tiny-words", device="cpu")
d = get_pretrained_model_config("google/gemma-3-270m").to_dict(); d.update(over)
fields = HookedTransformerConfig.__dataclass_fields__
cfg = HookedTransformerConfig(**{k: v for k, v in d.items() if k in fields and k != "n_params"})
model = HookedTransformer(cfg, tokenizer=tok)
model.load_and_process_state_dict(convert_gemma_weights(hf, cfg), fold_ln=False,
    center_writing_weights=False, center_unembed=False, fold_value_biases=False)
from sae_lens import SAE
sae = SAE.load_from_disk(f"{root}/sae", device="cpu")
from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment
from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment
from sae_bench.evals.absorption.main import _aggregate_results_df
from sae_bench.evals.absorption.vocab import get_alpha_tokens
c = AbsorptionEvalConfig(model_name="tiny-words", random_seed=S["seed"],
                         k_sparse_probe_batch_size=S["k_sparse_probe_batch_size"])
layer, name = S["layer"], "jsae-tiny"
ksp = run_k_sparse_probing_experiment(
    model=model, sae=sae, layer=layer, sae_name=name, force=True, max_k_value=c.max_k_value,
    f1_jump_threshold=c.f1_jump_threshold, prompt_template=c.prompt_template,
    prompt_token_pos=c.prompt_token_pos, device="cpu", experiment_dir=f"{root}/ksp",
    probes_dir=f"{root}/probes", k_sparse_probe_l1_decay=c.k_sparse_probe_l1_decay,
    k_sparse_probe_batch_size=c.k_sparse_probe_batch_size,
    k_sparse_probe_num_epochs=c.k_sparse_probe_num_epochs, eval_batch_size=64,
    precalc_k_sparse_probe_sae_acts=True, verbose=False)
raw = run_feature_absortion_experiment(
    model=model, sae=sae, layer=layer, sae_name=name, force=True, max_k_value=c.max_k_value,
    feature_split_f1_jump_threshold=c.f1_jump_threshold, prompt_template=c.prompt_template,
    prompt_token_pos=c.prompt_token_pos, batch_size=64, device="cpu",
    experiment_dir=f"{root}/fa", sparse_probing_experiment_dir=f"{root}/ksp",
    probes_dir=f"{root}/probes")
agg = _aggregate_results_df(raw)
f1_probe = dict(zip(ksp["letter"], ksp["f1_probe"].astype(float)))
kept = agg[[f1_probe[l] > c.min_GT_probe_f1 for l in agg["letter"]]]
mean = {"mean_absorption_fraction_score": statistics.mean(kept["mean_absorption_fraction"]),
        "mean_full_absorption_score": statistics.mean(kept["full_absorption_rate"]),
        "mean_num_split_features": statistics.mean(kept["num_split_feats"])}
letters = {r["letter"]: {"split_features": [int(f) for f in r["split_feats"]],
                         "num_probe_true_positives": int(r["num_probe_true_positives"]),
                         "mean_absorption_fraction": float(r["mean_absorption_fraction"]),
                         "full_absorption_rate": float(r["full_absorption_rate"])}
           for _, r in agg.iterrows()}
words = {r["token"]: [float(r["absorption_fraction"]), bool(r["is_full_absorption"])]
         for _, r in raw.iterrows()}
print(json.dumps({"mean": mean, "letters": letters, "f1_probe": f1_probe, "words": words,
                  "vocabulary": sorted(get_alpha_tokens(model.tokenizer))}))
"""
