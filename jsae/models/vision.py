"""The SigLIP vision transformer (Gemma 3's vision tower) as plain `jax.numpy` functions.

Pixels are channels-last, `[N, H, W, C]` float (already resized, rescaled and normalised; see
`jsae.models.images`). The tower is the one in transformers' `SiglipVisionModel` without the
pooling head (Gemma 3 does not use it):

    patches (conv with stride = kernel = patch, written as a matmul) + learned positions
    -> n_layers x [x + attn(LN1(x)); x + MLP(LN2(x))]   (pre-norm, GELU-tanh MLP, biases)
    -> post LayerNorm                                    -> [N, (H/p)*(W/p), D]

Params (nested dicts; matrices `[in, out]`):

    patch [C*p*p, D] (rows in (channel, row, column) order, as the conv kernel), patch_bias [D]
    pos [P, D]
    blocks[i]: ln1, ln2 {"scale", "bias"}; attn {q, k, v, o [D, D], bq, bk, bv, bo [D]};
               mlp {fc1 [D, F], b1 [F], fc2 [F, D], b2 [D]}
    post_norm {"scale", "bias"}

LayerNorms and the softmax compute in float32, as HF does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

VISION_HOOK_OUT = "vision.hook_out"  # the tower's output (after the post LayerNorm), [N, P, D]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape of a SigLIP vision tower. Frozen and hashable (a static `jax.jit` argument)."""

    d_model: int = 1152
    d_mlp: int = 4304
    n_layers: int = 27
    n_heads: int = 16
    image_size: int = 896
    patch_size: int = 14
    n_channels: int = 3
    norm_eps: float = 1e-6
    act: str = "gelu_tanh"

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"vision d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def vision_config_from_hf(d: Mapping[str, Any]) -> VisionConfig:
    """`VisionConfig` from an HF `vision_config` dict (SigLIP; missing keys take HF's defaults)."""
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    acts = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
    if act not in acts:
        raise ValueError(f"vision_config.hidden_act {act!r} is not supported ({', '.join(acts)})")
    return VisionConfig(
        d_model=int(d.get("hidden_size", 768)),
        d_mlp=int(d.get("intermediate_size", 3072)),
        n_layers=int(d.get("num_hidden_layers", 12)),
        n_heads=int(d.get("num_attention_heads", 12)),
        image_size=int(d.get("image_size", 224)),
        patch_size=int(d.get("patch_size", 16)),
        n_channels=int(d.get("num_channels", 3)),
        norm_eps=float(d.get("layer_norm_eps", 1e-6)),
        act=acts[act],
    )


# ----------------------------------------------------------------------------------------------
# weights


def find_prefix(tensors: Mapping[str, Any], suffix: str) -> str | None:
    """The prefix of the first tensor name ending in `suffix` (checkpoints nest the tower
    differently: `vision_tower.vision_model.` on the hub, `model.vision_tower.` in transformers 5)."""
    for name in tensors:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def vision_params_from_hf(vcfg: VisionConfig, tensors: Mapping[str, np.ndarray], source: str) -> dict:
    """HF SigLIP vision tensors (any prefix) -> vision params (numpy float32)."""
    from jsae.models.convert import _Reader

    r = _Reader(tensors, source)
    p = find_prefix(tensors, "embeddings.patch_embedding.weight")
    if p is None:
        from jsae.models.convert import WeightError

        raise WeightError(f"{source}: no vision tower tensor '*embeddings.patch_embedding.weight' found")
    D, F, C, P = vcfg.d_model, vcfg.d_mlp, vcfg.n_channels, vcfg.patch_size
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731

    def ln(name):
        return {"scale": f32(r.get(name + ".weight", (D,))), "bias": f32(r.get(name + ".bias", (D,)))}

    def lin(name, n_in, n_out):
        return f32(r.get(name + ".weight", (n_out, n_in))).T, f32(r.get(name + ".bias", (n_out,)))

    conv = f32(r.get(p + "embeddings.patch_embedding.weight", (D, C, P, P)))
    out: dict = {
        "patch": conv.reshape(D, C * P * P).T,
        "patch_bias": f32(r.get(p + "embeddings.patch_embedding.bias", (D,))),
        "pos": f32(r.get(p + "embeddings.position_embedding.weight", (vcfg.n_patches, D))),
        "blocks": [],
    }
    for i in range(vcfg.n_layers):
        b = f"{p}encoder.layers.{i}."
        attn = {}
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            attn[ours], attn["b" + ours] = lin(b + "self_attn." + theirs, D, D)
        fc1, b1 = lin(b + "mlp.fc1", D, F)
        fc2, b2 = lin(b + "mlp.fc2", F, D)
        out["blocks"].append(
            {
                "ln1": ln(b + "layer_norm1"),
                "ln2": ln(b + "layer_norm2"),
                "attn": attn,
                "mlp": {"fc1": fc1, "b1": b1, "fc2": fc2, "b2": b2},
            }
        )
    out["post_norm"] = ln(p + "post_layernorm")
    return out


def init_vision_params(key: Array, vcfg: VisionConfig, std: float = 0.02) -> dict:
    """Random params (for tests and demos)."""
    D, F = vcfg.d_model, vcfg.d_mlp
    keys = iter(jax.random.split(key, 4 + 6 * vcfg.n_layers))

    def w(*shape):
        return np.asarray(jax.random.normal(next(keys), shape, jnp.float32) * std)

    def ln():
        return {"scale": np.ones(D, np.float32), "bias": np.zeros(D, np.float32)}

    zeros = lambda n: np.zeros(n, np.float32)  # noqa: E731
    blocks = []
    for _ in range(vcfg.n_layers):
        attn = {k: w(D, D) for k in "qkvo"} | {"b" + k: zeros(D) for k in "qkvo"}
        mlp = {"fc1": w(D, F), "b1": zeros(F), "fc2": w(F, D), "b2": zeros(D)}
        blocks.append({"ln1": ln(), "ln2": ln(), "attn": attn, "mlp": mlp})
    return {
        "patch": w(vcfg.n_channels * vcfg.patch_size**2, D),
        "patch_bias": zeros(D),
        "pos": w(vcfg.n_patches, D),
        "blocks": blocks,
        "post_norm": ln(),
    }


def _is_norm(path) -> bool:
    return any(getattr(k, "key", "") in ("ln1", "ln2", "post_norm", "norm") for k in path)


def to_device(params: dict, dtype="float32") -> dict:
    """numpy -> jax arrays of `dtype`; LayerNorm / RMSNorm parameters stay float32."""
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(a, jnp.float32 if _is_norm(path) else dt), params
    )


# ----------------------------------------------------------------------------------------------
# forward


def layer_norm(p: Mapping[str, Array], x: Array, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    mu = xf.mean(-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
    return y.astype(x.dtype)


def patchify(vcfg: VisionConfig, pixels: Array) -> Array:
    """[N, H, W, C] -> [N, P, C*p*p], patches row-major, each in (channel, row, column) order."""
    N, H, W, C = pixels.shape
    p = vcfg.patch_size
    x = pixels.reshape(N, H // p, p, W // p, p, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(N, (H // p) * (W // p), C * p * p)


def _act(name: str, x: Array) -> Array:
    return jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


def vision_block(vcfg: VisionConfig, p: Mapping, x: Array) -> Array:
    """One pre-norm encoder layer. x: [N, P, D]."""
    N, P, D = x.shape
    H, Dh = vcfg.n_heads, vcfg.head_dim
    a = p["attn"]
    h = layer_norm(p["ln1"], x, vcfg.norm_eps)
    q = (h @ a["q"] + a["bq"]).reshape(N, P, H, Dh)
    k = (h @ a["k"] + a["bk"]).reshape(N, P, H, Dh)
    v = (h @ a["v"] + a["bv"]).reshape(N, P, H, Dh)
    o = _attention(q, k, v, Dh**-0.5).reshape(N, P, D)
    x = x + (o @ a["o"] + a["bo"])
    m = p["mlp"]
    h = layer_norm(p["ln2"], x, vcfg.norm_eps)
    h = _act(vcfg.act, h @ m["fc1"] + m["b1"]) @ m["fc2"] + m["b2"]
    return x + h


QUERY_BLOCK = 1024  # queries per attention block: scores [N, H, 1024, P] instead of [N, H, P, P]


def _attention(q: Array, k: Array, v: Array, scale: float) -> Array:
    """Unmasked softmax attention, q/k/v [N, P, H, Dh]. Long sequences (Gemma 3's 4096 patches)
    run over blocks of queries one after another, so the float32 scores of a 896px image take
    256 MiB instead of 1 GiB; each query's softmax is unchanged (it sees every key)."""

    def one(qb):
        s = jnp.einsum("nqhd,nkhd->nhqk", qb, k, preferred_element_type=jnp.float32) * scale
        w = jax.nn.softmax(s, axis=-1).astype(v.dtype)  # no mask: every patch sees every patch
        return jnp.einsum("nhqk,nkhd->nqhd", w, v)

    N, P, H, Dh = q.shape
    if P <= QUERY_BLOCK or P % QUERY_BLOCK:
        return one(q)
    nb = P // QUERY_BLOCK
    qb = q.reshape(N, nb, QUERY_BLOCK, H, Dh).transpose(1, 0, 2, 3, 4)
    o = jax.lax.map(one, qb)  # [nb, N, blk, H, Dh]
    return o.transpose(1, 0, 2, 3, 4).reshape(N, P, H, Dh)


def vision_hook_names(vcfg: VisionConfig) -> list[str]:
    return [f"vision.blocks.{i}.hook_resid_post" for i in range(vcfg.n_layers)] + [VISION_HOOK_OUT]


def vision_run(
    vcfg: VisionConfig, params: Mapping, pixels: Array, capture: Sequence[str] = ()
) -> tuple[Array, dict]:
    """Traceable tower: pixels [N, H, W, C] -> (features [N, P, D], captured activations).

    `capture` may name `vision.blocks.{L}.hook_resid_post` and `vision.hook_out`."""
    if pixels.ndim != 4 or pixels.shape[1:] != (vcfg.image_size, vcfg.image_size, vcfg.n_channels):
        raise ValueError(
            f"pixel_values must be [N, {vcfg.image_size}, {vcfg.image_size}, {vcfg.n_channels}] "
            f"(channels last); got shape {tuple(pixels.shape)}"
        )
    acts: dict = {}
    dt = params["patch"].dtype
    x = patchify(vcfg, pixels.astype(dt)) @ params["patch"] + params["patch_bias"]
    x = x + params["pos"][None]
    for i, bp in enumerate(params["blocks"]):
        x = vision_block(vcfg, bp, x)
        name = f"vision.blocks.{i}.hook_resid_post"
        if name in capture:
            acts[name] = x
    x = layer_norm(params["post_norm"], x, vcfg.norm_eps)
    if VISION_HOOK_OUT in capture:
        acts[VISION_HOOK_OUT] = x
    return x, acts
