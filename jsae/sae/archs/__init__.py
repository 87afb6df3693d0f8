"""The dictionary architectures, one module each, registered by name.

An architecture is an `Arch` subclass instance (see `jsae.sae.archs.base`) registered with
`register`; shared code (core encode/decode, `sae_loss`, init, the train step and loop,
export, steering, the sharding specs, checkpoints) looks it up with
``get_arch(spec.architecture)`` and never names an architecture itself.

Adding one (the smallest example is `jsae.sae.archs.relu`):

1. A module ``jsae/sae/archs/<name>.py`` with ``class MyArch(Arch)``, ``name = "<name>"`` and
   ``register(MyArch())`` at its end; `jsae.sae.registry` imports every module of this package on
   the first lookup, so nothing else is edited.  Its options: a frozen dataclass ``Options``
   (fields typed and defaulted; each is a ``sae.<field>`` config key and lands in
   ``spec.options``), checked by ``check(options, d_sae)`` raising `OptionError`.
2. Override what differs from the plain SAE ``z = act((x_n - b_dec) W_enc + b_enc)``,
   ``x_hat = z W_dec + b_dec``:

   - ``extra_params(spec, **opts) -> dict``: parameters beyond W_enc, b_enc, W_dec, b_dec
     (``opts``: init options such as ``jumprelu_init_threshold``);
   - ``extra_latent_axes``: ``{param name: latent axis}`` of those that are per latent (sharded
     over ``model`` by `jsae.parallel`, sliced by steering's sub-dictionaries). W_enc (axis -1),
     W_dec (axis 0) and b_enc (axis 0) are per-latent already; an architecture with other
     shapes (a crosscoder's W_enc [n_layers, d_in, d_sae], W_dec [d_sae, n_layers, d_in])
     keeps the latent axis at -1 for encoders and 0 for decoders, so one name maps to one spec;
   - ``pre_activations(sae, x_n)`` and ``decode(sae, z, x_in)``: the shapes of the input and
     the reconstruction belong to the architecture (``x_in`` lets a skip transcoder add
     ``x_in W_skip``);
   - ``activate(sae, pre, x_n, train=..., topk_fn=..., batch_topk_fn=...)``: the nonlinearity
     (``train`` selects a batch-level rule; the ``*_fn`` are the sharded selections);
   - ``loss_terms(sae, t: LossInputs) -> dict``: the terms added to the reconstruction
     (``t.x_in`` is what was encoded, ``t.x_target`` what is reconstructed: a transcoder's
     other hook; ``t.x_target is t.x_in`` for an SAE);
   - ``unit_decoder(spec)``, ``code_k`` (k-sparse codes), ``n_hooks`` / ``token_shape`` /
     ``layer_profile`` (several hooks), ``feature_layers`` (latents grouped by the layer
     they read), ``elementwise``, ``coef_field`` (the option that is the
     sparsity coefficient), ``frozen_params`` / ``after_update`` (parameters not set by the
     gradient), ``supports_fast`` and the fast-path hooks, and the SAELens mapping
     (``saelens_name``, ``to_saelens``, ``from_saelens``).
3. Tests ``tests/test_arch_<name>.py``: loss against NumPy, gradients against finite
   differences, sharded == single device, export round trip.
"""

from __future__ import annotations

from jsae.sae.archs.base import Arch, LossInputs, NoOptions, OptionError
from jsae.sae.registry import (
    all_archs,
    default_name,
    for_circuit,
    for_gemmascope,
    from_saelens_name,
    get_arch,
    latent_axes,
    names,
    owners,
    register,
)

__all__ = ["Arch", "LossInputs", "NoOptions", "OptionError", "all_archs", "default_name", "for_circuit",
           "for_gemmascope",
           "from_saelens_name", "get_arch", "latent_axes", "names", "owners", "register"]
