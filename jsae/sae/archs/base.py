"""`Arch`: what one dictionary architecture decides; the plain SAE is the default of each.

Shapes for the plain SAE: ``x_n [B, d_in]`` normalised inputs, ``pre, z [B, d_sae]``,
params W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
See `jsae.sae.archs` for how to add one.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae.spec import mm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of an architecture that has none of its own."""


class OptionError(ValueError):
    """An option value that does not fit; ``key`` is the option (config key ``sae.<key>``)."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"'sae.{key}': {msg}")
        self.key, self.msg = key, msg


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """What `jsae.sae.losses.sae_loss` hands an architecture's `Arch.loss_terms`.

    x_in: the encoded input (normalised); x_target: what is reconstructed (``is x_in`` for an
    SAE; another hook for a transcoder); pre / z: pre-activations and codes; x_hat: the
    reconstruction; dead_mask [d_sae] bool; topk_fn: the sharded per-row top-k or None.
    """

    x_in: Array
    x_target: Array
    pre: Array
    z: Array
    x_hat: Array
    sparsity_coef: Array | float
    dead_mask: Array
    aux_coef: float
    topk_fn: Any = None


class Arch:
    """One architecture. Subclasses set ``name`` and override what differs.

    ``Options``: a frozen dataclass of the architecture's own options (``spec.options``); its
    fields are also the architecture's ``sae.*`` config keys (but for ``derived_options``,
    which `config_options` sets from the data), typed by their annotations.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    derived_options: ClassVar[tuple[str, ...]] = ()  # options set from the data, not config keys
    rank: ClassVar[int] = 100  # position in `names()` (config help, docs)
    is_default: ClassVar[bool] = False  # trained when a config names no sae.architecture
    elementwise: ClassVar[bool] = True  # a latent's code depends on its own pre-activation only
    coef_field: ClassVar[str | None] = None  # config key (sae.<field>) of the sparsity coef
    extra_latent_axes: ClassVar[dict[str, int]] = {}  # per-latent extra params -> latent axis
    frozen_params: ClassVar[tuple[str, ...]] = ()  # set by `after_update`, not by gradients
    supports_fast: ClassVar[bool] = False  # has a sparse fast path (`jsae.sae.fast`)
    fast_blockwise: ClassVar[bool] = False  # fast path selects per row block (never [B, d_sae])
    sharded_fast: ClassVar[bool] = False  # has the latent-sharded fast path (fast_sharded)
    saelens_name: ClassVar[str | None] = None  # SAELens architecture it exports to
    saelens_imports: ClassVar[tuple[str, ...]] = ()  # SAELens architectures it imports
    transcoder: ClassVar[bool] = False  # reconstructs another hook (sae.output_hook)
    encoder_init_scale: ClassVar[float] = 1.0  # W_enc starts as this x W_dec^T
    multi_hook: ClassVar[bool] = False  # reads (and writes) several hooks at once
    gemmascope_export: ClassVar[bool] = False  # fits Gemma Scope's params.npz (a JumpReLU rule)
    gemmascope_import: ClassVar[str | None] = None  # the Gemma Scope files it reads: sae, ...
    # How circuit tracing's formats (circuit-tracer, Gemma Scope 2) hold it: "per_layer" (one
    # layer's MLP transcoder), "cross_layer" (a CLT), None (they cannot: e.g. a TopK rule)
    circuit_export: ClassVar[str | None] = None
    # The circuit-tracing dictionaries it imports: "per_layer", "per_layer_skip", "cross_layer"
    circuit_imports: ClassVar[tuple[str, ...]] = ()

    # ---- options ------------------------------------------------------------------------

    @classmethod
    def option_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls.Options))

    def option_keys(self) -> tuple[str, ...]:
        """The ``sae.*`` config keys of this architecture."""
        return tuple(f for f in self.option_fields() if f not in self.derived_options)

    def option_types(self) -> dict[str, Any]:
        return typing.get_type_hints(self.Options)

    def make_options(self, values: dict[str, Any]):
        """``Options`` from ``values`` (lists become tuples; a None for a key this
        architecture lacks is ignored). TypeError names an unknown key."""
        fields = self.option_fields()
        unknown = [k for k, v in values.items() if k not in fields and v is not None]
        if unknown:
            raise TypeError(f"architecture {self.name!r} has no option {unknown[0]!r} (its "
                            f"options: {', '.join(fields) or 'none'})")
        return self.Options(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in values.items() if k in fields})

    def config_options(self, options, *, n_hooks: int):
        """``options`` with the derived ones set for a dictionary over ``n_hooks`` hooks."""
        return options

    def check(self, options, d_sae: int | None, d_sae_key: str = "d_sae") -> None:
        """Raise `OptionError` when ``options`` do not fit (``d_sae``: None when not yet known;
        ``d_sae_key``: how a message names it)."""

    def sparsity_coef(self, options) -> float:
        """The sparsity coefficient (the option named ``coef_field``), 0 without one."""
        return 0.0 if self.coef_field is None else float(getattr(options, self.coef_field))

    # ---- capabilities -------------------------------------------------------------------

    def code_k(self, spec) -> int | None:
        """k where training codes are k-sparse per token (k * B per batch): the fast path's k."""
        return None

    def n_hooks(self, spec) -> int:
        """How many hooks the dictionary reads and reconstructs at once."""
        return 1

    def token_shape(self, spec) -> tuple[int, ...]:
        """Shape of one token's input (and reconstruction)."""
        return (spec.d_in,)

    def layer_profile(self, sae) -> np.ndarray | None:
        """``[d_sae, n_hooks]`` share of each feature's decoder norm per hook (rows sum to 1),
        for a dictionary that writes several hooks; None otherwise."""
        return None

    def feature_layers(self, spec) -> np.ndarray | None:
        """``[d_sae]`` int: the hook (index among the hooks read) each latent reads alone, for
        a dictionary whose latents are grouped by the layer they read; None when every
        latent reads every hook (or there is one hook)."""
        return None

    def reconstruct_layer(self, sae, x_n: Array, j: int) -> Array:
        """Output hook ``j``'s normalised reconstruction ``[..., d_out]`` from the inputs of hooks
        ``0..j`` (``x_n [..., j+1, d_in]``), for a dictionary whose latents read one layer and
        write that layer and later ones (``feature_layers`` is set): what a replacement model
        splices at hook j in the middle of a forward."""
        raise NotImplementedError(f"a {self.name} does not read and write layer by layer")

    # ---- parameters ---------------------------------------------------------------------

    def unit_decoder(self, spec) -> bool:
        """Whether decoder rows are kept at unit norm during training."""
        return True

    def check_spec(self, spec) -> None:
        """Raise ValueError (naming the sae.* key) when ``spec`` does not fit this architecture."""
        self.check(spec.options, spec.d_sae)

    def latent_axes(self) -> dict[str, int]:
        """``{param name: latent axis}`` of every per-latent parameter."""
        return {"W_enc": -1, "b_enc": 0, "W_dec": 0, **self.extra_latent_axes}

    def extra_params(self, spec, **opts: Any) -> dict[str, Array]:
        """Parameters beyond W_enc, b_enc, W_dec, b_dec for a fresh SAE (or replacing them:
        ``opts["key"]`` is the init key)."""
        return {}

    def sample_params(self, spec, x_n: np.ndarray, y_n: np.ndarray | None) -> dict[str, Array]:
        """Parameters set from the init sample (normalised inputs ``x_n [N, *token_shape]``
        and a transcoder's targets ``y_n``), before b_enc is centred; e.g. per-layer scales."""
        return {}

    def fold_params(self, params: dict) -> dict:
        """Equivalent params with the architecture's own scales folded into the weights
        (`jsae.sae.core.fold_norm` then has plain weights to export)."""
        return params

    def param_shapes(self, spec) -> dict[str, tuple[int, ...]]:
        """Shapes of W_enc, W_dec, b_enc, b_dec (what a saved SAE is checked against)."""
        return {"W_enc": (spec.d_in, spec.d_sae), "W_dec": (spec.d_sae, spec.d_in),
                "b_enc": (spec.d_sae,), "b_dec": (spec.d_in,)}

    def decoder_directions(self, params: dict, features: Array) -> Array:
        """``[F, d_in]`` normalised-space decoder rows of ``features`` (the directions whose
        logit effects are shown)."""
        return params["W_dec"][features]

    def decoder_rows(self, params: dict, features: Array) -> Array:
        """``[F, *token_shape]`` normalised-space decoder rows of ``features``: what a unit
        of each code adds to the (normalised) reconstruction, at every hook it writes."""
        return params["W_dec"][features]

    def max_active(self, spec) -> int | None:
        """The most latents that can be active on one token, where the rule caps it (TopK: k)."""
        return None

    def threshold(self, params: dict) -> Array | None:
        """Per-latent inference threshold (normalised units), where the architecture has one."""
        return None

    # ---- forward ------------------------------------------------------------------------

    def pre_activations(self, sae, x_n: Array) -> Array:
        """(x_n - b_dec) W_enc + b_enc."""
        p = sae.params
        return mm(x_n - p["b_dec"], p["W_enc"], sae.spec.compute_dtype) + p["b_enc"]

    def activate(self, sae, pre: Array, x_n: Array, *, train: bool = False, topk_fn=None,
                 batch_topk_fn=None) -> Array:
        raise NotImplementedError(f"architecture {self.name!r} defines no activation")

    def decode(self, sae, z: Array, x_in: Array | None = None) -> Array:
        """Normalised reconstruction ``z W_dec + b_dec`` (``x_in``: the encoded input, for
        architectures whose output also reads it)."""
        p = sae.params
        return mm(z, p["W_dec"], sae.spec.compute_dtype) + p["b_dec"]

    # ---- training -----------------------------------------------------------------------

    def recon_loss(self, sae, x_hat: Array, x_target: Array) -> Array:
        """Squared error summed over the features of a token, averaged over tokens."""
        d = x_hat - x_target
        return jnp.sum(d ** 2, axis=tuple(range(1, d.ndim))).mean()

    def loss_terms(self, sae, t: LossInputs) -> dict[str, Array]:
        """Terms added to the reconstruction loss (in this order)."""
        return {}

    def fast_extra_terms(self, sae, codes, x_target: Array) -> dict[str, Array]:
        """Fast-path terms between the reconstruction and AuxK (``codes``: SparseCodes)."""
        return {}

    def after_update(self, params: dict, z, step=None) -> dict:
        """Parameters after the optimizer step (``z``: this batch's codes, dense or sparse;
        ``step``: the number of updates before this one)."""
        return params

    # fast path (supports_fast): see jsae.sae.fast
    def fast_applies(self, batch_topk_fn) -> bool:
        return False

    def fast_codes(self, sae, pre: Array):
        """Training codes (`jsae.sae.fast.SparseCodes`, raw values) from ``pre`` (no grad)."""
        raise ValueError(f"the fast path does not apply to {self.name!r}")

    # ---- SAELens ------------------------------------------------------------------------

    def to_saelens(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """SAELens-named tensors from (norm-folded) params."""
        if self.saelens_name is None:
            raise ValueError(f"cannot export architecture {self.name!r} to SAELens")
        return {"W_enc": params["W_enc"], "W_dec": params["W_dec"], "b_dec": params["b_dec"],
                "b_enc": params["b_enc"]}

    def saelens_cfg(self, spec) -> dict[str, Any]:
        """Architecture-specific cfg.json fields."""
        return {}

    def saelens_required(self, saelens_arch: str) -> tuple[str, ...]:
        """Per-latent tensors (shape [d_sae]) an import of ``saelens_arch`` needs."""
        return ("b_enc",)

    def from_saelens(self, saelens_arch: str, t: dict[str, np.ndarray], shift,
                     source: str) -> dict[str, np.ndarray]:
        """jsae params (without W_enc, W_dec, b_dec) from SAELens tensors ``t``.

        ``shift(W) -> b_dec @ W`` (zeros when SAELens subtracts b_dec from the input too):
        jsae always subtracts b_dec, so encoder biases absorb it.
        """
        return {"b_enc": t["b_enc"] + shift(t["W_enc"])}

    def saelens_cfg_problem(self, cfg: dict) -> str | None:
        """Why SAELens's cfg.json ``cfg`` cannot be imported as this architecture (None: it can)."""
        return None

    def spec_from_saelens(self, saelens_arch: str, *, k, unit: bool, source: str) -> dict:
        """Option values for an imported SAE."""
        return {}

    # ---- circuit tracing (circuit-tracer, Gemma Scope 2: `jsae.export.circuits`) ----------

    def circuit_tensors(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The dictionary in the neutral form `jsae.export.circuits` writes from (norm-folded
        params): jsae's W_enc, W_dec, b_enc, b_dec, a JumpReLU ``threshold`` per latent (0 is
        a ReLU) and, where the output also reads the input, ``W_skip [d_in, d_out]``
        (``x @ W_skip`` added). Only for ``circuit_export`` architectures."""
        raise ValueError(f"circuit tracing's formats hold ReLU / JumpReLU transcoders, not "
                         f"architecture {self.name!r}")

    def from_circuit_tensors(self, t: dict[str, np.ndarray]) -> tuple[dict, dict[str, Any]]:
        """(params, option values) of an imported dictionary from the neutral form ``t``
        (shapes already checked by the reader)."""
        raise ValueError(f"architecture {self.name!r} imports no circuit-tracing dictionary")
