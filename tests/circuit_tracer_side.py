"""Running a script under the real circuit-tracer (a side venv in CI: $JSAE_CIRCUIT_TRACER_PYTHON,
built by tools/test.sh with JSAE_WITH_CIRCUIT_TRACER=1: it needs transformers<=4.57.3, which
the main environment's transformers 5 rules out)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def circuit_tracer_python() -> str:
    """$JSAE_CIRCUIT_TRACER_PYTHON, or this Python if it has circuit_tracer; else the test skips."""
    exe = os.environ.get("JSAE_CIRCUIT_TRACER_PYTHON")
    if not exe and importlib.util.find_spec("circuit_tracer"):
        exe = sys.executable
    if not exe:
        pytest.skip("circuit-tracer is not installed (set JSAE_CIRCUIT_TRACER_PYTHON to a Python "
                    "with it, as `JSAE_WITH_CIRCUIT_TRACER=1 bash tools/test.sh` does)")
    return exe


def run_circuit_tracer(script: str, root: Path):
    """Run ``script`` (argv[1] = ``root``) under circuit-tracer; its last stdout line as JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([circuit_tracer_python(), "-c", script, str(root)], capture_output=True,
                         text=True, timeout=600, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Attribution graphs by the real circuit-tracer (TransformerLens backend, its default) on a tiny
# Gemma 3 model: argv[1] holds settings.json (the transformers config, the transcoder folders
# under ct/, max_logits, logit_prob, batch_size, interventions), model.safetensors (jsae's
# weights in transformers' layout) and tokens.npy. The model is built in transformers, converted
# by TransformerLens's own Gemma converter, and attributed by circuit_tracer.attribute; each
# set's graph, pruning (prune_graph) and scores (compute_graph_scores) come back in <set>.npz
# and a JSON line (seconds per attribution, cold and warm).
ATTRIBUTION_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
root = sys.argv[1]
S = json.loads(open(f"{root}/settings.json").read())
from safetensors.numpy import load_file
import transformers as T
from tokenizers import Tokenizer, models
hc = S["hf_config"]
hf_cfg = T.Gemma3TextConfig(**hc, attn_implementation="eager")
hf = T.Gemma3ForCausalLM(hf_cfg).eval()
sd = {k: torch.from_numpy(v) for k, v in load_file(f"{root}/model.safetensors").items()}
missing, unexpected = hf.load_state_dict(sd, strict=False)
assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
vocab = {f"t{i}": i for i in range(hc["vocab_size"])}
tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t2", eos_token="t1", pad_token="t0", unk_token="t3")
tok.save_pretrained(f"{root}/tok")
tok = T.AutoTokenizer.from_pretrained(f"{root}/tok")
from transformer_lens.loading_from_pretrained import get_pretrained_model_config
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
# TransformerLens's Gemma 3 270M config with the tiny model's sizes (its derived fields too:
# rotary_dim and attn_scale are computed from the 270M head size)
over = dict(d_model=hc["hidden_size"], d_head=hc["head_dim"], n_heads=hc["num_attention_heads"],
            d_mlp=hc["intermediate_size"], n_layers=hc["num_hidden_layers"], d_vocab=hc["vocab_size"],
            n_key_value_heads=hc["num_key_value_heads"], window_size=hc["sliding_window"],
            rotary_base=hc["rope_theta"], rotary_base_local=hc["rope_local_base_freq"],
            attn_types=["local" if t == "sliding_attention" else "global" for t in hc["layer_types"]],
            rotary_dim=hc["head_dim"], attn_scale=float(hc["query_pre_attn_scalar"]) ** 0.5,
            tokenizer_name=None, eps=hc["rms_norm_eps"], n_ctx=hc["max_position_embeddings"])
tl_cfg = get_pretrained_model_config("google/gemma-3-270m", **{})
d = tl_cfg.to_dict(); d.update(over); d["d_vocab_out"] = hc["vocab_size"]
from transformer_lens import HookedTransformerConfig
fields = HookedTransformerConfig.__dataclass_fields__
tl_cfg = HookedTransformerConfig(**{k: v for k, v in d.items() if k in fields and k != "n_params"})
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel as RM
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.graph import prune_graph, compute_graph_scores
if S.get("keep_rotary_tables"):
    # circuit-tracer shares one rotary table across layers (`_deduplicate_attention_buffers`,
    # a memory saving), which gives Gemma 3's local layers (base 10k) the global base (1M);
    # keeping each layer's own table leaves circuit-tracer's attribution as it is
    RM._deduplicate_attention_buffers = lambda self: None
tokens = torch.from_numpy(np.load(f"{root}/tokens.npy").astype(np.int64))
with torch.no_grad():
    hf_logits = hf(tokens[None]).logits[0].numpy()
tl_weights = convert_gemma_weights(hf, tl_cfg)
del hf, sd  # one copy of the weights at a time (Gemma 3 270M: 1 GB each in float32)
def build(tc):  # ReplacementModel.from_config, with the weights loaded before wrapping
    m = RM(tl_cfg, tokenizer=tok)
    # load_and_process_state_dict pops what it loads: each model gets its own dict
    m.load_and_process_state_dict(dict(tl_weights), fold_ln=False, center_writing_weights=False,
                                  center_unembed=False, fold_value_biases=False)
    m._configure_replacement_model(tc)
    return m
out = {}
for name in S["sets"]:
    tc, _ = load_transcoder_from_hub(name, cache_dir=f"{root}/ct", device=torch.device("cpu"), dtype=torch.float32)
    model = build(tc)
    with torch.no_grad():  # the replacement model's hooks keep the real forward's values
        tl_logits = model(tokens[None])[0].numpy()
    t0 = time.perf_counter()
    g = attribute(tokens, model, max_n_logits=S["max_logits"], desired_logit_prob=S["logit_prob"], batch_size=S["batch_size"])
    secs = time.perf_counter() - t0
    secs2 = None
    if S.get("warm", True):  # a second run, as jsae's is timed after compiling
        t0 = time.perf_counter()
        attribute(tokens, model, max_n_logits=S["max_logits"],
                  desired_logit_prob=S["logit_prob"], batch_size=S["batch_size"])
        secs2 = time.perf_counter() - t0
    iv = {}
    for j, spec in enumerate(S.get("interventions", {}).get(name, [])):
        with torch.no_grad():
            lg, _ = model.feature_intervention(tokens, [tuple(x) for x in spec], freeze_attention=False)
        iv[f"intervened_{j}"] = lg[0, -1].numpy()
    pr = prune_graph(g, 0.8, 0.98)
    rs, cs = compute_graph_scores(g)
    np.savez(f"{root}/{name}.npz", adjacency=g.adjacency_matrix.numpy(), active=g.active_features.numpy(),
             acts=g.activation_values.numpy(), logit_tokens=g.logit_token_ids.numpy(),
             logit_probs=g.logit_probabilities.numpy(), node_mask=pr.node_mask.numpy(),
             edge_mask=pr.edge_mask.numpy(), cum=pr.cumulative_scores.numpy(), **iv)
    out[name] = {"seconds": secs, "seconds_warm": secs2, "replacement": rs, "completeness": cs}
np.save(f"{root}/hf_logits.npy", hf_logits); np.save(f"{root}/tl_logits.npy", tl_logits)
print(json.dumps(out))
"""
