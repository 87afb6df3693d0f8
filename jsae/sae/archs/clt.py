"""Cross-layer transcoder (CLT; Anthropic, "Circuit Tracing", 2025; Gemma Scope 2's CLTs): one
dictionary whose features each read one layer's MLP input and write to that layer's and every
later layer's MLP output, so the MLPs of a whole model are replaced at once.

Shapes, for L = ``n_layers`` layers (an option set from the number of layers the config reads)
and n = d_sae / L features per layer; latent index = l * n + i (layer-major):

    x_n [B, L, d_in]    the L MLP inputs (normalised), stacked like a crosscoder's hooks
    y_n [B, L, d_in]    the L MLP outputs (the target; scaled by the same norm_scale)
    W_enc [L, d_in, n]  b_enc [L * n]  W_dec [L * n, L, d_in]  b_dec [L, d_in]
    in_scale [L]  out_scale [L]  (set from the init sample, not trained)
    (JumpReLU: log_threshold or threshold [L * n]; BatchTopK: ema_threshold [L * n])

    pre_l   = (in_scale_l x_l) W_enc[l] + b_enc[l-block]     (no b_dec centring: transcoder)
    z_l     = act(pre_l)                                     (jumprelu | topk | batchtopk)
    y_hat_t = sum_{l <= t} z_l W_dec[l-block, t] / out_scale_t + b_dec[t]
                                                             (causal: t < l entries masked)
    loss    = sum_t out_scale_t^2 ||y_hat_t - y_t||^2  +  sparsity  (+ preact)   (per token)

Per-layer normalisation: in Gemma 3 270M, E||x||^2 / d of the MLP outputs (hook_mlp_out) runs
from 128 (layer 2) to 77,500 (layer 17) and of the MLP inputs (mlp.hook_in) from 0.08 to 1.9;
with one scale the loss would be layer 17's alone and the sparsity coefficient meaningless.
So on top of the SAE's scalar ``norm_scale`` (E||x_l||^2 = d_in averaged over layers) each
layer's input and output get their own: in_scale_l, out_scale_t with E||in_scale_l x_l||^2 =
E||out_scale_t y_t||^2 = d_in (in normalised units, from the init sample).  W_enc, W_dec and the
codes live in these per-layer units (as Anthropic's CLTs train); `jsae.sae.core.fold_norm`
folds them into the weights (`fold_params`).

W_dec[l*n + i, t] for t < l is masked in the forward, so it gets no gradient and, starting at
zero, stays zero under Adam. ``||W_dec_i||`` below is the norm of the feature's whole (masked)
decoder, over all the layers it writes, in per-layer units; ``layer_profile`` shares it out
over the target layers in the same units.  Sparsity, by ``activation``:

- ``jumprelu``: z = pre * H(pre - theta) with JumpReLU's straight-through thresholds and its
  knobs (`jsae.sae.archs.jumprelu`); ``jumprelu_sparsity``: ``tanh`` (default, Anthropic's CLT
  penalty) l0_coef * sum_i tanh(c |z_i| ||W_dec_i||), ``step`` l0_coef * L0, or
  ``quadratic`` (Gemma Scope 2) l0_coef * (2 / T) (L0 - T)^2, with L0 a token's active
  latents over all layers and T = ``target_l0``.
- ``topk``: the ``k`` largest pre-activations of each layer (per token, so layer t's codes do
  not depend on later layers), relu; AuxK on dead latents (below).
- ``batchtopk``: in training the ``k * B`` largest relu(pre) of each layer over the batch; at
  inference a per-latent threshold, the EMA of each layer's smallest kept code (as
  `jsae.sae.archs.batchtopk`, per layer); AuxK.

``preact_coef`` (0 = off): Anthropic's pre-activation penalty against dead features,
preact_coef * sum_i relu(theta_i - pre_i) ||W_dec_i|| (theta: the JumpReLU threshold, 0 for
topk / batchtopk).  AuxK (topk, batchtopk): the top ``aux_k`` dead latents of a token (over
all layers) reconstruct its residual y - y_hat through the masked decoder.

Sharding (`jsae.parallel`, by latent axis): W_dec [L * n, L, d_in] (the bulk: L * n x L x d_in),
b_enc and the thresholds split their latent axis over ``mesh.model``, W_enc [L, d_in, n] its
last (so n must divide by mesh.model); the per-layer top-k selections let XLA partition them.
No SAELens format.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae import selection
from jsae.sae.archs import OptionError, register
from jsae.sae.archs.base import Arch, LossInputs
from jsae.sae.archs.batchtopk import threshold_rate
from jsae.sae.archs.jumprelu import JumpReLU
from jsae.sae.jumprelu import heaviside_ste, jumprelu_ste

ACTIVATIONS = ("jumprelu", "topk", "batchtopk")


def causal_mask(n_layers: int, n: int) -> jax.Array:
    """``[L * n, L]`` float32: 1 where latent l * n + i may write to layer t (t >= l)."""
    return jnp.repeat(jnp.triu(jnp.ones((n_layers, n_layers), jnp.float32)), n, axis=0)


class CLT(Arch):
    name = "clt"
    rank = 11
    coef_field = "l0_coef"
    elementwise = False  # W_enc [L, d_in, n] cannot be sliced by latent ids (steering's sub_sae)
    multi_hook = True
    transcoder = True
    encoder_init_scale = 0.1
    derived_options = ("n_layers",)
    extra_latent_axes = {"log_threshold": 0, "threshold": 0, "ema_threshold": 0}
    frozen_params = ("in_scale", "out_scale")  # set from the init sample
    circuit_export = "cross_layer"  # circuit-tracer's W_enc_N / W_dec_N, Gemma Scope 2's CLT
    circuit_imports = ("cross_layer",)

    @dataclasses.dataclass(frozen=True)
    class Options:
        activation: Literal["jumprelu", "topk", "batchtopk"] = "jumprelu"
        k: int = 16  # topk / batchtopk: active latents per layer and token
        l0_coef: float = 1e-3  # jumprelu's sparsity coefficient
        jumprelu_bandwidth: float = 1e-3  # straight-through estimator's kernel width
        jumprelu_init_threshold: float = 1e-3
        jumprelu_sparsity: Literal["step", "tanh", "quadratic"] = "tanh"
        jumprelu_tanh_scale: float = 4.0  # tanh: c in tanh(c |z_i| ||W_dec_i||)
        target_l0: Optional[float] = None  # quadratic: L0 per token over all layers
        jumprelu_threshold: Literal["log", "linear"] = "log"
        preact_coef: float = 0.0  # pre-activation penalty against dead features (0: off)
        n_layers: int = 1  # layers read and written (from the config's layers)

    # ---- options ------------------------------------------------------------------------

    def config_options(self, options, *, n_hooks):
        return dataclasses.replace(options, n_layers=n_hooks)

    def check(self, options, d_sae, d_sae_key="d_sae"):
        o = options
        if o.activation not in ACTIVATIONS:
            raise OptionError("activation", f"{o.activation!r}: expected {', '.join(ACTIVATIONS)}")
        if o.n_layers < 1:
            raise OptionError("n_layers", f"must be >= 1 (got {o.n_layers})")
        if o.preact_coef < 0:
            raise OptionError("preact_coef", "must be >= 0")
        if d_sae is not None and d_sae % o.n_layers:
            raise OptionError(d_sae_key.removeprefix("sae."),
                              f"{d_sae} latents do not split over the {o.n_layers} layers "
                              f"(d_sae = n_layers x features per layer)")
        if o.activation == "jumprelu":
            JumpReLU.check(self, o, d_sae, d_sae_key)
        elif o.k is None or o.k <= 0:
            raise OptionError("k", "must be a positive integer (active latents per layer)")
        elif d_sae is not None and o.k > d_sae // o.n_layers:
            raise OptionError("k", f"k={o.k} exceeds the {d_sae // o.n_layers} features per "
                              f"layer ({d_sae_key}={d_sae} over {o.n_layers} layers)")

    def sparsity_coef(self, options):
        return float(options.l0_coef) if options.activation == "jumprelu" else 0.0

    # ---- capabilities -------------------------------------------------------------------

    def n_hooks(self, spec):
        return spec.options.n_layers

    def token_shape(self, spec):
        return (spec.options.n_layers, spec.d_in)

    def max_active(self, spec):
        o = spec.options
        return None if o.activation == "jumprelu" else int(o.k) * o.n_layers

    def layer_profile(self, sae):
        """``[d_sae, L]``: each feature's (masked) decoder norm per target layer, as a fraction
        of its total (zero before the feature's own layer)."""
        w = np.asarray(sae.params["W_dec"], np.float64)
        norms = np.linalg.norm(w, axis=-1) * np.asarray(_mask(sae.spec))
        return norms / np.maximum(norms.sum(-1, keepdims=True), 1e-12)

    def feature_layers(self, spec):
        """Latent l * n + i reads layer l's MLP input (layer-major)."""
        L = spec.options.n_layers
        return np.repeat(np.arange(L), spec.d_sae // L)

    def unit_decoder(self, spec):
        return False

    # ---- parameters ---------------------------------------------------------------------

    def param_shapes(self, spec):
        L, d = spec.options.n_layers, spec.d_in
        return {"W_enc": (L, d, spec.d_sae // L), "W_dec": (spec.d_sae, L, d),
                "b_enc": (spec.d_sae,), "b_dec": (L, d)}

    def extra_params(self, spec, *, key=None, jumprelu_init_threshold=None, **opts):
        """Replaces the plain shapes: decoder slices (l, t >= l) random at norm 0.1, masked
        ones zero; encoder columns random at norm ``encoder_init_scale`` (input and output
        live in different spaces, so W_enc is not tied to W_dec)."""
        o, L, d = spec.options, spec.options.n_layers, spec.d_in
        n = spec.d_sae // L
        k_dec, k_enc = jax.random.split(jax.random.key(0) if key is None else key)
        w = jax.random.normal(k_dec, (spec.d_sae, L, d), jnp.float32)
        w = 0.1 * w / jnp.linalg.norm(w, axis=-1, keepdims=True) * _mask(spec)[:, :, None]
        e = jax.random.normal(k_enc, (L, d, n), jnp.float32)
        e = self.encoder_init_scale * e / jnp.linalg.norm(e, axis=1, keepdims=True)
        out = {"W_dec": w, "W_enc": e, "b_enc": jnp.zeros((spec.d_sae,), jnp.float32),
               "b_dec": jnp.zeros((L, d), jnp.float32),
               "in_scale": jnp.ones((L,), jnp.float32), "out_scale": jnp.ones((L,), jnp.float32)}
        if o.activation == "batchtopk":
            out["ema_threshold"] = jnp.full((spec.d_sae,), -1.0, jnp.float32)  # set by batch 1
        elif o.activation == "jumprelu":
            out.update(JumpReLU.extra_params(self, spec,
                                             jumprelu_init_threshold=jumprelu_init_threshold))
        return out

    def sample_params(self, spec, x_n, y_n):
        """in_scale / out_scale [L]: E||scale_l v_l||^2 = d_in for each layer's input and
        output in the sample (normalised units; the output's are 1 without targets)."""
        def per_layer(v):
            v = np.asarray(v, np.float64).reshape(-1, spec.options.n_layers, spec.d_in)
            mean_sq = np.mean(np.sum(v * v, axis=-1), axis=0)  # [L]
            if not np.all(np.isfinite(mean_sq) & (mean_sq > 0)):
                raise ValueError(f"cannot normalise layers with mean squared norms {mean_sq}")
            return jnp.asarray(np.sqrt(spec.d_in / mean_sq), jnp.float32)

        out = {"in_scale": per_layer(x_n)}
        if y_n is not None:
            out["out_scale"] = per_layer(y_n)
        return out

    def fold_params(self, params):
        """W_enc[l] x in_scale_l and W_dec[:, t] / out_scale_t; the scales become 1."""
        p = dict(params)
        s_in, s_out = p["in_scale"], p["out_scale"]
        p["W_enc"] = p["W_enc"] * s_in[:, None, None]
        p["W_dec"] = p["W_dec"] / s_out[None, :, None]
        p["in_scale"], p["out_scale"] = jnp.ones_like(s_in), jnp.ones_like(s_out)
        return p

    def threshold(self, params):
        """theta [d_sae] (normalised units): JumpReLU's, or BatchTopK's inference threshold;
        None for topk."""
        if "log_threshold" in params:
            return jnp.exp(params["log_threshold"])
        return params.get("threshold", params.get("ema_threshold"))

    def decoder_directions(self, params, features):
        """A feature's total write into the residual stream (normalised units): its decoder
        summed over the layers it writes (the masked ones are zero)."""
        return jnp.sum(params["W_dec"][features] / params["out_scale"][:, None], axis=1)

    def decoder_rows(self, params, features):
        """[F, L, d_in] in normalised units: each layer's row over its out_scale."""
        return params["W_dec"][features] / params["out_scale"][:, None]

    def decoder_norms(self, sae):
        """``[d_sae]``: the norm of each feature's whole masked decoder (all layers)."""
        w = sae.params["W_dec"] * _mask(sae.spec)[:, :, None]
        return jnp.sqrt(jnp.sum(w * w, axis=(1, 2)))

    # ---- forward ------------------------------------------------------------------------

    def pre_activations(self, sae, x_n):
        """x_n [..., L, d_in] -> pre [..., L * n]: each layer's encoder reads its own input."""
        p, dt = sae.params, sae.spec.compute_dtype
        x_l = x_n * p["in_scale"][:, None]  # each layer's input at its own scale
        pre = jnp.einsum("...ld,ldn->...ln", x_l.astype(dt), p["W_enc"].astype(dt),
                         preferred_element_type=jnp.float32)
        return pre.reshape(*pre.shape[:-2], -1) + p["b_enc"]

    def activate(self, sae, pre, x_n, *, train=False, topk_fn=None, batch_topk_fn=None):
        """The selections run per layer (causality); the sharded ``*_fn`` select over all
        latents at once, so they are not used (XLA partitions the per-layer selection)."""
        return self._activate_layers(sae, pre, train=train)

    def _activate_layers(self, sae, pre, *, train=False):
        """pre [..., m] for the first m / n layers (all of them, or a prefix) -> codes."""
        o = sae.spec.options
        m = pre.shape[-1]
        if o.activation == "jumprelu":
            return jumprelu_ste(pre, self.threshold(sae.params)[:m], o.jumprelu_bandwidth)
        per_layer = pre.reshape(*pre.shape[:-1], m // (sae.spec.d_sae // o.n_layers), -1)
        if o.activation == "topk":
            z = jax.nn.relu(selection.topk_dense(per_layer, o.k))
        elif train:  # batchtopk: the k * B largest codes of each layer over the batch
            acts = jax.nn.relu(per_layer.reshape(-1, *per_layer.shape[-2:]))  # [B, L, n]
            z = jax.vmap(lambda a: selection.batch_topk(a, o.k), in_axes=1, out_axes=1)(acts)
        else:
            return jnp.where(pre > sae.params["ema_threshold"][:m], pre, 0.0)
        return z.reshape(pre.shape)

    def reconstruct_layer(self, sae, x_n, j: int):
        """Output layer ``j``'s normalised reconstruction from ``x_n [..., j+1, d]``, the inputs
        of layers 0..j: only their encoders and decoder column ``j`` run (a replacement model
        splicing layer j in a forward pays ``(j+1) n d`` twice, not the whole CLT's ``L n L d``).
        Equals ``decode(encode(x_n with any later inputs))[..., j, :]``: later layers' features
        never write to layer j."""
        p, dt = sae.params, sae.spec.compute_dtype
        m = (j + 1) * (sae.spec.d_sae // sae.spec.options.n_layers)
        x_l = x_n * p["in_scale"][: j + 1, None]
        pre = jnp.einsum("...ld,ldn->...ln", x_l.astype(dt), p["W_enc"][: j + 1].astype(dt),
                         preferred_element_type=jnp.float32)
        z = self._activate_layers(sae, pre.reshape(*pre.shape[:-2], m) + p["b_enc"][:m])
        y = jnp.matmul(z.astype(dt), p["W_dec"][:m, j].astype(dt), preferred_element_type=jnp.float32)
        return y / p["out_scale"][j] + p["b_dec"][j]

    def decode(self, sae, z, x_in=None):
        """z [..., L * n] -> y_hat [..., L, d_in] through the causally masked decoder."""
        p = sae.params
        return self._write(sae, z) / p["out_scale"][:, None] + p["b_dec"]

    def _write(self, sae, z):
        """z [..., L * n] -> [..., L, d_in] in per-layer output units (no bias)."""
        p, dt = sae.params, sae.spec.compute_dtype
        w = p["W_dec"] * _mask(sae.spec)[:, :, None]  # masked entries get no gradient
        return jnp.einsum("...n,nld->...ld", z.astype(dt), w.astype(dt),
                          preferred_element_type=jnp.float32)

    # ---- training -----------------------------------------------------------------------

    def recon_loss(self, sae, x_hat, x_target):
        """sum_t ||out_scale_t (y_hat_t - y_t)||^2, averaged over tokens: each layer's error in
        its own units (one layer's large outputs do not drown the others)."""
        d = (x_hat - x_target) * sae.params["out_scale"][:, None]
        return jnp.sum(d * d, axis=tuple(range(1, d.ndim))).mean()

    def loss_terms(self, sae, t: LossInputs):
        o, p = sae.spec.options, sae.params
        norms = self.decoder_norms(sae)  # [d_sae]
        terms = {}
        if o.activation == "jumprelu":
            theta = self.threshold(p)
            if o.jumprelu_sparsity == "tanh":
                per_tok = jnp.sum(jnp.tanh(o.jumprelu_tanh_scale * jnp.abs(t.z) * norms), -1)
            else:
                l0_tok = jnp.sum(heaviside_ste(t.pre, theta, o.jumprelu_bandwidth), -1)  # [B]
                per_tok = l0_tok if o.jumprelu_sparsity == "step" else \
                    2.0 / o.target_l0 * (l0_tok - o.target_l0) ** 2
            terms["sparsity"] = t.sparsity_coef * per_tok.mean()
        else:
            theta = 0.0
            terms["auxk"] = t.aux_coef * self._auxk(sae, t)
        if o.preact_coef > 0:
            per_tok = jnp.sum(jax.nn.relu(theta - t.pre) * norms, -1)
            terms["preact"] = o.preact_coef * per_tok.mean()
        return terms

    def _auxk(self, sae, t: LossInputs):
        """The top aux_k dead latents of each token reconstruct y - y_hat (a constant), in
        per-layer units."""
        k_aux = sae.spec.aux_k_resolved

        def compute(operands):
            pre, residual, dead = operands
            vals, idx = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), k_aux)
            vals = jnp.where(jnp.isfinite(vals), jax.nn.relu(vals), 0.0)
            e_hat = self._write(sae, selection.scatter_rows(vals, idx, pre.shape[-1]))
            err = e_hat - jax.lax.stop_gradient(residual)
            return jnp.sum(err * err, axis=tuple(range(1, err.ndim))).mean()

        return jax.lax.cond(jnp.any(t.dead_mask), compute, lambda _: jnp.zeros((), jnp.float32),
                            (t.pre, (t.x_target - t.x_hat) * sae.params["out_scale"][:, None],
                             t.dead_mask))

    def after_update(self, params, z, step=None):
        """Linear JumpReLU thresholds are kept >= 0; BatchTopK's ``ema_threshold`` follows the
        EMA of each layer's smallest kept code (a negative one is untrained: the first batch
        sets it; the rate is `jsae.sae.archs.batchtopk`'s)."""
        if "threshold" in params:
            return {**params, "threshold": jnp.maximum(params["threshold"], 0.0)}
        if "ema_threshold" not in params:
            return params
        old, L = params["ema_threshold"], params["W_enc"].shape[0]
        zl = z.reshape(-1, L, z.shape[-1] // L)
        m = jnp.min(jnp.where(zl > 0, zl, jnp.inf), axis=(0, 2))  # [L]
        m = jnp.repeat(jnp.where(jnp.isfinite(m), m, 0.0), z.shape[-1] // L)
        rate = 0.01 if step is None else threshold_rate(step)
        return {**params, "ema_threshold": jnp.where(old < 0, m, (1.0 - rate) * old + rate * m)}

    # ---- circuit tracing's formats (jsae.export.circuits) -------------------------------

    def circuit_tensors(self, params):
        """JumpReLU's threshold, or BatchTopK's inference threshold (the same rule, ``pre >
        theta``); decoder writes to earlier layers zeroed. A top k has no threshold to write."""
        theta = self.threshold(params)
        if theta is None:
            raise ValueError("circuit tracing's formats hold ReLU / JumpReLU rules; a CLT with "
                             "activation topk selects the top k (train jumprelu or batchtopk)")
        theta = np.asarray(theta, np.float32)
        if (theta < 0).any():
            raise ValueError(f"{int((theta < 0).sum())} inference thresholds are still unset "
                             "(a batchtopk CLT before its first training step)")
        L, n = params["W_enc"].shape[0], params["W_enc"].shape[-1]
        mask = np.asarray(causal_mask(L, n))[:, :, None]
        t = {k: np.asarray(params[k], np.float32) for k in ("W_enc", "b_enc", "b_dec")}
        return {**t, "W_dec": np.asarray(params["W_dec"], np.float32) * mask, "threshold": theta}

    def from_circuit_tensors(self, t):
        """A linear JumpReLU threshold (a ReLU CLT, threshold 0, imports exactly)."""
        params = {k: t[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
        ones = np.ones((t["W_enc"].shape[0],), np.float32)  # the files hold folded weights
        params.update(in_scale=ones, out_scale=ones.copy())
        return params, {"activation": "jumprelu", "jumprelu_threshold": "linear",
                        "n_layers": int(t["W_enc"].shape[0])}


def _mask(spec) -> jax.Array:
    L = spec.options.n_layers
    return causal_mask(L, spec.d_sae // L)


register(CLT())
