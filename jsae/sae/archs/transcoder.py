"""Transcoders: encode one hook, reconstruct another (Dunefsky et al. 2024; sparsify).

``transcoder`` (TopK): z = relu(top_k(x_in W_enc + b_enc)), x_hat = z W_dec + b_dec, trained on
||x_hat - x_target||^2 (+ AuxK on the residual x_target - x_hat), e.g. x_in an MLP's input
(blocks.L.hook_resid_mid) and x_target its output (blocks.L.hook_mlp_out).
``skip_transcoder`` adds an affine skip connection (Paulo et al. 2025, "skip transcoder";
Gemma Scope 2's ``affine_skip_connection``): x_hat += x_in W_skip, W_skip [d_in, d_in]
initialised to zero, so the dictionary only has to explain what a linear map cannot.
``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``: the same with JumpReLU's activation and
sparsity terms (Gemma Scope 2's transcoders); these export to SAELens 6's
``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` (TopK ones have no SAELens class).

Shapes: x_in, x_target [B, d_in] (d_out == d_in: `SAESpec` has one width, which holds for the
MLP of a transformer block); W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in] is the
output bias.  Unlike an SAE the input is not centred by b_dec (the two hooks live in different
spaces; SAELens's transcoders do the same).  One ``norm_scale`` multiplies both hooks, so
raw-unit encode / decode stay consistent (`jsae.sae.core.fold_norm` holds: the skip term
(x s) W_skip / s = x W_skip).  No sparse fast path: the dense loss is used.

Output scale: an MLP's input and output can differ in norm by orders of magnitude (Gemma 3
270M: E||x||^2 / d of blocks.L.mlp.hook_in 0.08-1.9, of hook_mlp_out 128-77,500), so with the
input's ``norm_scale`` alone the output would be far from unit scale and a short run barely
learns. ``out_scale`` (a scalar set from the init sample, not trained) makes
E||out_scale y_n||^2 = d_in: the decoder writes in those units,
x_hat = (z W_dec + x_in W_skip) / out_scale + b_dec, and the loss is the error in them,
out_scale^2 ||x_hat - y||^2. `fold_params` folds it into W_dec / W_skip (exports see plain
weights); a folder written before it (no ``out_scale``) reads as out_scale 1.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jsae.sae.archs import register
from jsae.sae.archs.jumprelu import JumpReLU
from jsae.sae.archs.topk import TopK
from jsae.sae.spec import mm


def _out_scale(params):
    """The output scale (1 for a folder written before there was one, or imported)."""
    return params.get("out_scale", 1.0)


class _TranscoderForward:
    """What makes an architecture a transcoder; mixed in before the activation's class."""

    skip: bool = False
    transcoder = True
    # W_enc = W_dec^T makes sense only where input and output share a space: a transcoder
    # starts with small codes, so its first outputs are ~b_dec (the target's median), not noise
    encoder_init_scale = 0.1
    supports_fast = False
    fast_blockwise = False
    sharded_fast = False
    gemmascope_export = False

    @property
    def frozen_params(self):  # out_scale is set from the init sample, never by the gradient
        return (*super().frozen_params, "out_scale")

    def extra_params(self, spec, **opts):
        extra = super().extra_params(spec, **opts)
        if self.skip:
            extra["W_skip"] = jnp.zeros((spec.d_in, spec.d_in), jnp.float32)
        extra["out_scale"] = jnp.ones((), jnp.float32)
        return extra

    def sample_params(self, spec, x_n, y_n):
        """out_scale: E||out_scale y_n||^2 = d_in over the init sample's targets ``y_n``."""
        out = super().sample_params(spec, x_n, y_n)
        if y_n is None:
            return out
        y = np.asarray(y_n, np.float64).reshape(-1, spec.d_in)
        mean_sq = float(np.mean(np.sum(y * y, axis=-1)))
        if not (np.isfinite(mean_sq) and mean_sq > 0):
            raise ValueError(f"cannot normalise the output hook: mean squared norm {mean_sq}")
        return {**out, "out_scale": jnp.asarray(np.sqrt(spec.d_in / mean_sq), jnp.float32)}

    def fold_params(self, params):
        """W_dec (and W_skip) / out_scale; out_scale becomes 1."""
        p = dict(super().fold_params(params))
        if "out_scale" in p:
            s = p["out_scale"]
            p["W_dec"] = p["W_dec"] / s
            if "W_skip" in p:
                p["W_skip"] = p["W_skip"] / s
            p["out_scale"] = jnp.ones_like(s)
        return p

    def decoder_rows(self, params, features):
        return super().decoder_rows(params, features) / _out_scale(params)

    def recon_loss(self, sae, x_hat, x_target):
        """The error in output units: out_scale^2 ||x_hat - y||^2 per token, averaged."""
        s = _out_scale(sae.params)
        return super().recon_loss(sae, x_hat * s, x_target * s)

    def loss_terms(self, sae, t):
        """The activation's terms with the reconstruction in output units (AuxK's residual)."""
        s = _out_scale(sae.params)
        return super().loss_terms(sae, dataclasses.replace(t, x_target=t.x_target * s,
                                                           x_hat=t.x_hat * s))

    def pre_activations(self, sae, x_n):
        """x_in W_enc + b_enc (no b_dec centring: b_dec is the target's bias)."""
        p = sae.params
        return mm(x_n, p["W_enc"], sae.spec.compute_dtype) + p["b_enc"]

    def decode(self, sae, z, x_in=None):
        """(z W_dec (+ x_in W_skip for a skip transcoder)) / out_scale + b_dec."""
        p = sae.params
        out = mm(z, p["W_dec"], sae.spec.compute_dtype)
        if not self.skip:
            return out / _out_scale(p) + p["b_dec"]
        if x_in is None:
            raise ValueError("a skip transcoder's decode needs its encoded input x_in "
                             "(use jsae.sae.core.decode_normalized(sae, z, x_n))")
        return (out + mm(x_in, p["W_skip"], sae.spec.compute_dtype)) / _out_scale(p) + p["b_dec"]

    def fast_applies(self, batch_topk_fn) -> bool:
        return False

    def from_saelens(self, saelens_arch, t, shift, source):
        """Encoder biases as jsae's transcoder uses them (it never subtracts b_dec: b_dec
        lives in the output space); W_skip [d_out, d_in] (SAELens) -> [d_in, d_out]."""

        b_dec = t["b_dec"].astype(np.float64)

        def no_b_dec_shift(w):  # undo what `shift` assumes and remove any b_dec @ W_enc
            return shift(w) - (b_dec @ w.astype(np.float64)).astype(np.float32)

        out = super().from_saelens(saelens_arch, t, no_b_dec_shift, source)
        if self.skip:
            d = t["W_enc"].shape[0]
            w = t.get("W_skip")
            if w is None or w.shape != (d, d):
                got = "missing" if w is None else f"of shape {w.shape}"
                raise ValueError(f"{source}: a skip transcoder needs W_skip [{d}, {d}] "
                                 f"(d_out == d_in); it is {got}")
            out["W_skip"] = np.ascontiguousarray(w.T)
        return out

    def to_saelens(self, params):
        t = super().to_saelens(params)
        if self.skip:  # SAELens keeps W_skip as [d_out, d_in] and adds x @ W_skip.T
            t["W_skip"] = params["W_skip"].T
        return t

    def saelens_cfg(self, spec):
        return {**super().saelens_cfg(spec), "d_out": spec.d_in, "apply_b_dec_to_input": False}

    def circuit_tensors(self, params):
        if self.circuit_export is None:
            return super().circuit_tensors(params)
        t = {n: np.asarray(params[n], np.float32) for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
        t["threshold"] = np.asarray(self.threshold(params), np.float32)
        if self.skip:
            t["W_skip"] = np.asarray(params["W_skip"], np.float32)
        return t

    def from_circuit_tensors(self, t):
        """A linear threshold: a ReLU transcoder (threshold 0) imports exactly."""
        params = {n: t[n] for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
        if self.skip:
            params["W_skip"] = t["W_skip"]
        return params, {"jumprelu_threshold": "linear"}


class Transcoder(_TranscoderForward, TopK):
    name = "transcoder"
    rank = 6
    saelens_name = None  # SAELens's transcoders are ReLU / JumpReLU: a TopK one does not map
    saelens_imports = ()
    circuit_export = None  # circuit-tracer's files hold ReLU / JumpReLU rules, no top k


class SkipTranscoder(Transcoder):
    name = "skip_transcoder"
    rank = 7
    skip = True


class JumpReLUTranscoder(_TranscoderForward, JumpReLU):
    """JumpReLU activation and sparsity terms (`jsae.sae.archs.jumprelu`), as Gemma Scope 2's
    transcoders; exports to SAELens's ``jumprelu_transcoder``."""

    name = "jumprelu_transcoder"
    rank = 8
    gemmascope_import = "mlp"
    circuit_export = "per_layer"
    circuit_imports = ("per_layer",)
    saelens_name = "jumprelu_transcoder"
    saelens_imports = ("jumprelu_transcoder",)


class JumpReLUSkipTranscoder(JumpReLUTranscoder):
    name = "jumprelu_skip_transcoder"
    rank = 9
    gemmascope_import = "mlp_skip"
    saelens_name = "jumprelu_skip_transcoder"
    saelens_imports = ("jumprelu_skip_transcoder",)
    circuit_imports = ("per_layer_skip",)
    skip = True


register(Transcoder())
register(SkipTranscoder())
register(JumpReLUTranscoder())
register(JumpReLUSkipTranscoder())
