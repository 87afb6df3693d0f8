"""Gemma 3's multimodal path: SigLIP tower -> projector -> soft tokens inside the text sequence.

    pixels [N, S, S, 3] -> vision tower [N, P, Dv] -> average pool to mm_tokens_per_image
    -> RMSNorm (Gemma's 1 + w, folded in at load) -> @ W [Dv, D] -> soft tokens [N, M, D]

The soft tokens replace the (scaled) text embeddings at the image-token positions, in order
(row-major over the batch), as transformers' `masked_scatter` does. Attention is causal (and
sliding on local layers) plus bidirectional between the tokens of one image.

    >>> lm = jsae.models.load("google/gemma-3-4b-pt")        # or a local HF folder
    >>> batch = lm.to_tokens(["<start_of_image> A photo of"], images=["cat.jpg"])
    >>> out = forward(lm, batch, capture=["blocks.20.hook_resid_post"], stop_after_capture=True)
    >>> out.activations["blocks.20.hook_resid_post"][out.image_mask]   # [n_image_tokens, D]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsae.errors import JsaeError, ModelLoadError
from jsae.models import transformer as T
from jsae.models.vision import (
    VISION_HOOK_OUT,
    VisionConfig,
    init_vision_params,
    vision_config_from_hf,
    vision_params_from_hf,
    vision_run,
)
from jsae.models.vision import to_device as vision_to_device

Array = jax.Array


class MultimodalError(JsaeError, ValueError):
    """Images that do not fit the token sequence, or a hook the vision side does not have."""


def text_only_error(lm) -> ModelLoadError:
    return ModelLoadError(
        f"model {lm.name!r} is a text-only model (no vision tower): images need a multimodal "
        "Gemma 3 checkpoint (google/gemma-3-4b-pt, 12b, 27b, or a folder with a vision_config)"
    )


SOFT_TOKENS_HOOK = "mm.hook_soft_tokens"  # projector output [N, M, D] (what enters the LM)


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
    """Static description of Gemma 3's vision side (hashable)."""

    vision: VisionConfig
    mm_tokens_per_image: int = 256
    image_token_id: int = 262_144
    boi_id: int = 255_999
    eoi_id: int = 256_000
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    resample: int = 2  # PIL.Image.BILINEAR, as Gemma 3's preprocessor_config.json

    def __post_init__(self):
        side = int(round(self.mm_tokens_per_image**0.5))
        if side * side != self.mm_tokens_per_image or self.vision.patches_per_side % side:
            raise ValueError(
                f"mm_tokens_per_image={self.mm_tokens_per_image} must be a square whose side divides "
                f"the {self.vision.patches_per_side} patches per side"
            )

    @property
    def tokens_per_side(self) -> int:
        return int(round(self.mm_tokens_per_image**0.5))

    @property
    def pool(self) -> int:
        return self.vision.patches_per_side // self.tokens_per_side


@dataclasses.dataclass(frozen=True, eq=False)
class VisionTower:
    """What a multimodal `LanguageModel` carries besides the text model: `cfg` and `params`
    (`{"vision": ..., "projector": {"norm": [Dv], "proj": [Dv, D]}}`)."""

    cfg: MultimodalConfig
    params: dict


class MultimodalInputs(NamedTuple):
    tokens: np.ndarray  # [B, T] int32
    attention_mask: np.ndarray  # [B, T] int32
    pixel_values: Optional[np.ndarray]  # [N, S, S, 3] float32, images in order of appearance
    image_mask: np.ndarray  # [B, T] bool: image soft-token positions


class MultimodalOutput(NamedTuple):
    logits: Optional[Array]  # [B, T, V] or None
    activations: dict  # hook -> [B, T, D] (LM hooks), or [N, ...] (vision hooks)
    image_mask: Array  # [B, T] bool


def multimodal_config_from_hf(hf: Mapping[str, Any], preprocessor: Optional[Mapping] = None) -> MultimodalConfig:
    """From a Gemma 3 `config.json` (with `vision_config`) and optionally `preprocessor_config.json`."""
    pre = dict(preprocessor or {})
    vcfg = vision_config_from_hf(hf["vision_config"])
    mean = tuple(float(v) for v in pre.get("image_mean") or (0.5, 0.5, 0.5))
    std = tuple(float(v) for v in pre.get("image_std") or (0.5, 0.5, 0.5))
    return MultimodalConfig(
        vision=vcfg,
        mm_tokens_per_image=int(hf.get("mm_tokens_per_image", 256)),
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 262_144))),
        boi_id=int(hf.get("boi_token_index", 255_999)),
        eoi_id=int(hf.get("eoi_token_index", 256_000)),
        image_mean=mean,
        image_std=std,
        resample=int(pre.get("resample", 2)),
    )


def projector_params_from_hf(mcfg: MultimodalConfig, d_model: int, tensors: Mapping, source: str) -> dict:
    from jsae.models.convert import WeightError, _Reader
    from jsae.models.vision import find_prefix

    p = find_prefix(tensors, "mm_input_projection_weight")
    if p is None:
        raise WeightError(f"{source}: no '*multi_modal_projector.mm_input_projection_weight' tensor")
    r = _Reader(tensors, source)
    Dv = mcfg.vision.d_model
    w = np.asarray(r.get(p + "mm_input_projection_weight", (Dv, d_model)), np.float32)
    g = np.asarray(r.get(p + "mm_soft_emb_norm.weight", (Dv,)), np.float32)
    return {"norm": g + 1.0, "proj": w}  # Gemma's RMSNorm scales by (1 + w)


def vision_from_hf(hf: Mapping, tensors: Mapping, d_model: int, source: str, dtype="float32",
                   preprocessor: Optional[Mapping] = None) -> VisionTower:
    """The vision tower + projector of a Gemma3ForConditionalGeneration checkpoint."""
    mcfg = multimodal_config_from_hf(hf, preprocessor)
    params = {
        "vision": vision_params_from_hf(mcfg.vision, tensors, source),
        "projector": projector_params_from_hf(mcfg, d_model, tensors, source),
    }
    return VisionTower(mcfg, vision_to_device(params, dtype))


def maybe_vision_from_hf(hf: Mapping, tensors: Mapping, d_model: int, folder, dtype="float32"):
    """`vision_from_hf`, or None with a warning when the checkpoint's vision part is incomplete
    (the text tower still loads: a text-only extract of a 4B checkpoint stays usable)."""
    import json
    import warnings
    from pathlib import Path

    pre = Path(folder) / "preprocessor_config.json"
    pre = json.loads(pre.read_text()) if pre.exists() else None
    try:
        return vision_from_hf(hf, tensors, d_model, str(folder), dtype, pre)
    except (JsaeError, ValueError, KeyError) as e:
        warnings.warn(f"{folder}: vision tower not loaded, text only ({e})", stacklevel=3)
        return None


def random_vision(key, d_model: int, vcfg: Optional[VisionConfig] = None, *, mm_tokens_per_image: int = 16,
                  image_token_id: int = 262_144, boi_id: int = 255_999, eoi_id: int = 256_000,
                  dtype="float32") -> VisionTower:
    """A random vision tower + projector (demos and tests without hub weights)."""
    vcfg = vcfg or VisionConfig(d_model=64, d_mlp=128, n_layers=2, n_heads=4, image_size=64, patch_size=8)
    mcfg = MultimodalConfig(vcfg, mm_tokens_per_image, image_token_id, boi_id, eoi_id)
    k1, k2 = jax.random.split(key)
    proj = np.asarray(jax.random.normal(k2, (vcfg.d_model, d_model), jnp.float32)) * vcfg.d_model**-0.5
    params = {
        "vision": init_vision_params(k1, vcfg),
        "projector": {"norm": np.ones(vcfg.d_model, np.float32), "proj": proj},
    }
    return VisionTower(mcfg, vision_to_device(params, dtype))


# ----------------------------------------------------------------------------------------------
# the pieces


def project(mcfg: MultimodalConfig, pp: Mapping[str, Array], feats: Array, eps: Optional[float] = None) -> Array:
    """Vision features [N, P, Dv] -> soft tokens [N, M, D]: avg-pool, RMSNorm, linear."""
    N, P, Dv = feats.shape
    s, k, t = mcfg.vision.patches_per_side, mcfg.pool, mcfg.tokens_per_side
    x = feats.reshape(N, t, k, t, k, Dv).astype(jnp.float32).mean(axis=(2, 4)).reshape(N, t * t, Dv)
    del s
    eps = mcfg.vision.norm_eps if eps is None else eps
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * pp["norm"]
    x = x.astype(feats.dtype)
    return x @ pp["proj"].astype(feats.dtype)


def image_groups(tokens: Array, image_token_id: int) -> Array:
    """[B, T] int32: the index of the image each soft token belongs to (per row), -1 elsewhere.

    An image block is a run of consecutive image tokens (transformers' block sequence ids)."""
    is_img = tokens == image_token_id
    prev = jnp.pad(is_img, ((0, 0), (1, 0)))[:, :-1]
    starts = is_img & ~prev
    g = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1
    return jnp.where(is_img, g, -1)


def merge_embeddings(cfg, mcfg: MultimodalConfig, params, tokens: Array, soft: Optional[Array]) -> Array:
    """Scaled text embeddings [B, T, D] with soft tokens [N, M, D] written at the image tokens.

    Image token ids outside the vocabulary embed as id 0 first (they are all overwritten)."""
    is_img = tokens == mcfg.image_token_id
    safe = jnp.where(is_img | (tokens >= cfg.vocab_size), 0, tokens)
    B, Tn = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(Tn, dtype=jnp.int32), (B, Tn))
    x = T.embed(cfg, params, safe, positions)
    if soft is None:
        return x
    flat = soft.reshape(-1, soft.shape[-1]).astype(x.dtype)
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1).astype(jnp.int32)) - 1, 0, flat.shape[0] - 1)
    merged = jnp.where(is_img.reshape(-1)[:, None], flat[idx], x.reshape(-1, x.shape[-1]))
    return merged.reshape(x.shape)


def soft_tokens(vt: VisionTower, pixels: Array, capture: Sequence[str] = ()) -> tuple[Array, dict]:
    """Pixels [N, S, S, 3] -> (soft tokens [N, M, D], vision activations)."""
    feats, acts = vision_run(vt.cfg.vision, vt.params["vision"], pixels, capture)
    soft = project(vt.cfg, vt.params["projector"], feats)
    if SOFT_TOKENS_HOOK in capture:
        acts[SOFT_TOKENS_HOOK] = soft
    return soft, acts


def _is_vision_hook(name: str) -> bool:
    return name.startswith("vision.") or name == SOFT_TOKENS_HOOK


def run(cfg, params, vt: VisionTower, tokens, pixels, *, attention_mask=None, interventions=None,
        capture: Sequence[str] = (), stop_after_capture: bool = False):
    """Traceable multimodal forward -> (logits | None, activations, image_mask)."""
    vis_capture = tuple(c for c in capture if _is_vision_hook(c))
    lm_capture = tuple(c for c in capture if not _is_vision_hook(c))
    acts: dict = {}
    soft = None
    if pixels is not None:
        soft, acts = soft_tokens(vt, pixels, vis_capture)
    x = merge_embeddings(cfg, vt.cfg, params, tokens, soft)
    groups = image_groups(tokens, vt.cfg.image_token_id)
    if stop_after_capture and capture and not lm_capture:
        return None, acts, groups >= 0
    logits, lm_acts, _ = T.run(
        cfg, params, tokens, attention_mask=attention_mask, interventions=interventions,
        capture=lm_capture, stop_after_capture=stop_after_capture, inputs_embeds=x,
        bidirectional_groups=groups,
    )
    acts.update(lm_acts)
    return logits, acts, groups >= 0


def _forward_impl(cfg, vcfg, params, vparams, tokens, pixels, mask, dyn, static, capture, stop):
    fns = T.merge_interventions(static, dyn)
    logits, acts, img = run(cfg, params, VisionTower(vcfg, vparams), tokens, pixels, attention_mask=mask,
                            interventions=fns, capture=capture, stop_after_capture=stop)
    return MultimodalOutput(logits, acts, img)


_forward_jit = jax.jit(_forward_impl, static_argnums=(0, 1, 8, 9, 10))


def forward(
    lm,
    tokens,
    pixel_values=None,
    *,
    attention_mask=None,
    capture: Sequence[str] = (),
    stop_after_capture: bool = False,
    interventions: Optional[Mapping[str, Callable]] = None,
) -> MultimodalOutput:
    """Jitted forward of a multimodal `LanguageModel` on tokens with images.

    `tokens` is `[B, T]` ids or the `MultimodalInputs` from `lm.to_tokens(texts, images=...)`
    (then `pixel_values` and `attention_mask` come from it). `pixel_values [N, S, S, 3]` holds
    one image per image block, in order of appearance. `capture` takes the LM hooks
    (`blocks.{L}.hook_*`, [B, T, D] at image and text positions alike), `vision.blocks.{L}.hook_resid_post`,
    `vision.hook_out` ([N, P, Dv]) and `mm.hook_soft_tokens` ([N, M, D]). `.image_mask [B, T]`
    says which positions are image soft tokens."""
    if isinstance(tokens, MultimodalInputs):
        tokens, attention_mask, pixel_values = tokens.tokens, tokens.attention_mask, tokens.pixel_values
    vt = getattr(lm, "vision", None)
    if vt is None:
        raise text_only_error(lm)
    if isinstance(capture, str):
        capture = (capture,)
    capture = tuple(sorted(set(capture)))
    from jsae.models.config import parse_hook
    from jsae.models.vision import vision_hook_names

    known_vis = set(vision_hook_names(vt.cfg.vision)) | {SOFT_TOKENS_HOOK}
    for name in capture:
        if _is_vision_hook(name):
            if name not in known_vis:
                raise MultimodalError(f"unknown vision hook {name!r}; known: vision.blocks.{{L}}.hook_resid_post, "
                                  f"{VISION_HOOK_OUT}, {SOFT_TOKENS_HOOK}")
        else:
            parse_hook(name, lm.cfg)
    tok = np.asarray(tokens, np.int32)
    if tok.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq]; got shape {tok.shape}")
    n_img_tokens = int((tok == vt.cfg.image_token_id).sum())
    n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    if n_img_tokens != n_images * vt.cfg.mm_tokens_per_image:
        raise MultimodalError(
            f"{n_img_tokens} image tokens in the batch but {n_images} image(s) x "
            f"{vt.cfg.mm_tokens_per_image} soft tokens: build inputs with lm.to_tokens(texts, images=...)"
        )
    static, dyn = T.split_interventions(interventions)
    pix = None if pixel_values is None or n_images == 0 else jnp.asarray(pixel_values, jnp.float32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return _forward_jit(lm.cfg, vt.cfg, lm.params, vt.params, jnp.asarray(tok), pix, mask, dyn, static,
                        capture, bool(stop_after_capture))


def random_gemma3(tokenizer, key, *, d_model: int = 64, n_layers: int = 4, vision: Optional[VisionConfig] = None,
                  mm_tokens_per_image: int = 16, vocab_size: int = 262_208, name: str = "tiny-random-gemma3-mm"):
    """A tiny random multimodal Gemma 3 (text tower + SigLIP + projector) around a real tokenizer:
    the whole image path runs offline in seconds (tests, notebooks). Its features mean nothing."""
    from jsae.models.config import TransformerConfig, gemma3_layer_types
    from jsae.models.convert import to_device
    from jsae.models.loading import LanguageModel

    H, K, Dh, F = 4, 1, 16, 2 * d_model
    cfg = TransformerConfig(
        arch="gemma3", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=H, n_kv_heads=K,
        head_dim=Dh, d_mlp=F, max_position=32768, rope_base=1e6, rope_local_base=1e4, sliding_window=512,
        layer_types=gemma3_layer_types(n_layers, 4), attn_scale=Dh**-0.5, qk_norm=True, act="gelu_tanh",
        post_norms=True, embed_scale=d_model**0.5, bos_id=2, eos_id=1, pad_id=0,
    )
    kt, kv = jax.random.split(key)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(kt)).astype(np.uint32))

    def w(*shape, fan_in=None):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32((fan_in or shape[0]) ** -0.5)

    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    blocks = []
    for _ in range(n_layers):
        blocks.append({
            "ln1": {"scale": ones(d_model)}, "ln1_post": {"scale": ones(d_model)},
            "ln2": {"scale": ones(d_model)}, "ln2_post": {"scale": ones(d_model)},
            "attn": {"q": w(d_model, H, Dh), "k": w(d_model, K, Dh), "v": w(d_model, K, Dh),
                     "o": w(H, Dh, d_model, fan_in=H * Dh), "q_norm": ones(Dh), "k_norm": ones(Dh)},
            "mlp": {"gate": w(d_model, F), "up": w(d_model, F), "down": w(F, d_model)},
        })
    params = {"embed": w(vocab_size, d_model, fan_in=d_model) * 0.1, "blocks": blocks,
              "final_norm": {"scale": ones(d_model)}}
    vt = random_vision(kv, d_model, vision, mm_tokens_per_image=mm_tokens_per_image)
    return LanguageModel(cfg, to_device(params), tokenizer, name, vt)


# google/gemma-3-4b-pt's config.json (the parts jsae reads), for planning without the weights
GEMMA3_4B_CONFIG = {
    "model_type": "gemma3", "mm_tokens_per_image": 256, "image_token_index": 262_144,
    "boi_token_index": 255_999, "eoi_token_index": 256_000,
    "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                    "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "head_dim": 256, "vocab_size": 262_208, "sliding_window": 1024,
                    "query_pre_attn_scalar": 256, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                      "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
                      "vision_use_head": False},
}


def harvest_memory(hf_config: Optional[Mapping] = None, *, batch: int = 8, context_length: int = 288,
                   images_per_row: int = 1, hook_layer: Optional[int] = None, dtype: str = "bfloat16") -> dict:
    """Bytes one device needs to harvest activations at `blocks.{hook_layer}.hook_resid_post` of a
    multimodal Gemma 3 (default: 4B, the middle layer): computed by compiling the jitted forward
    on abstract shapes (no weights are read) and asking XLA for its buffer sizes, as `jsae plan` does.

    Returns params (text, vision), the inputs, XLA's temporaries (peak working memory: the SigLIP
    attention scores [images, 16, 4096, 4096] dominate) and the captured output."""
    from jsae.models.config import from_hf_config

    hf = dict(hf_config or GEMMA3_4B_CONFIG)
    cfg = from_hf_config(hf)
    mcfg = multimodal_config_from_hf(hf)
    layer = cfg.n_layers // 2 if hook_layer is None else hook_layer
    hook = f"blocks.{layer}.hook_resid_post"
    dt = jnp.dtype(dtype)
    n_img = batch * images_per_row
    S, D, Dv = mcfg.vision.image_size, cfg.d_model, mcfg.vision.d_model

    def shapes(tree, norm_f32=True):
        from jsae.models.vision import _is_norm

        return jax.tree_util.tree_map_with_path(
            lambda p, a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32 if (norm_f32 and _is_norm(p)) else dt), tree)

    # parameter shapes without allocating them
    text_p = jax.eval_shape(lambda: _text_param_shapes(cfg))
    text_p = shapes(text_p)
    vis_p = shapes(jax.eval_shape(lambda: {
        "vision": _vision_param_shapes(mcfg.vision),
        "projector": {"norm": jnp.zeros(Dv), "proj": jnp.zeros((Dv, D))}}))
    toks = jax.ShapeDtypeStruct((batch, context_length), jnp.int32)
    pix = jax.ShapeDtypeStruct((n_img, S, S, 3), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, context_length), jnp.int32)
    lowered = _forward_jit.lower(cfg, mcfg, text_p, vis_p, toks, pix, mask, (), None, (hook,), True)
    mem = lowered.compile().memory_analysis()
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize  # noqa: E731
                              for x in jax.tree_util.tree_leaves(tree))
    return {
        "hook": hook, "batch": batch, "context_length": context_length, "images": n_img, "dtype": dtype,
        "params_text": nbytes(text_p), "params_vision": nbytes(vis_p),
        "inputs": nbytes([toks, pix, mask]),
        "temp": int(getattr(mem, "temp_size_in_bytes", 0)),
        "output": int(getattr(mem, "output_size_in_bytes", 0)),
        "total": nbytes(text_p) + nbytes(vis_p) + nbytes([toks, pix, mask])
        + int(getattr(mem, "temp_size_in_bytes", 0)) + int(getattr(mem, "output_size_in_bytes", 0)),
    }


def _text_param_shapes(cfg) -> dict:
    """Zero arrays in the text params layout (under `jax.eval_shape` only: never allocated)."""
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp
    z = jnp.zeros
    blk = {"ln1": {"scale": z(D)}, "ln1_post": {"scale": z(D)}, "ln2": {"scale": z(D)},
           "ln2_post": {"scale": z(D)},
           "attn": {"q": z((D, H, Dh)), "k": z((D, K, Dh)), "v": z((D, K, Dh)), "o": z((H, Dh, D)),
                    "q_norm": z(Dh), "k_norm": z(Dh)},
           "mlp": {"gate": z((D, F)), "up": z((D, F)), "down": z((F, D))}}
    return {"embed": z((cfg.vocab_size, D)), "blocks": [blk] * cfg.n_layers, "final_norm": {"scale": z(D)}}


def _vision_param_shapes(vc: VisionConfig) -> dict:
    """Zero arrays in the vision params layout (under `jax.eval_shape` only)."""
    D, F, z = vc.d_model, vc.d_mlp, jnp.zeros
    ln = {"scale": z(D), "bias": z(D)}
    blk = {"ln1": ln, "ln2": ln, "attn": {k: z((D, D)) for k in "qkvo"} | {"b" + k: z(D) for k in "qkvo"},
           "mlp": {"fc1": z((D, F)), "b1": z(F), "fc2": z((F, D)), "b2": z(D)}}
    return {"patch": z((vc.n_channels * vc.patch_size**2, D)), "patch_bias": z(D), "pos": z((vc.n_patches, D)),
            "blocks": [blk] * vc.n_layers, "post_norm": ln}
