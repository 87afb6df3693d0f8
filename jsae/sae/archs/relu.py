"""ReLU SAE with an L1 penalty (Anthropic's April-2024 update by default).

z = relu(pre); loss + l1 * sum_i z_i * ||W_dec_i|| ("anthropic": decoder rows free) or
+ l1 * sum_i z_i ("standard": unit decoder rows).  The smallest architecture: read this one
first when adding another.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jsae.sae.archs import OptionError, register
from jsae.sae.archs.base import Arch, LossInputs


class ReLU(Arch):
    name = "relu"
    rank = 0
    coef_field = "l1_coef"
    saelens_name = "standard"
    saelens_imports = ("standard",)

    @dataclasses.dataclass(frozen=True)
    class Options:
        l1_coef: float = 5.0  # sparsity coefficient (after normalisation)
        l1_variant: Literal["standard", "anthropic"] = "anthropic"  # standard: unit decoder rows

    def check(self, options, d_sae, d_sae_key="d_sae"):
        if options.l1_coef < 0:
            raise OptionError("l1_coef", "must be >= 0")

    def unit_decoder(self, spec) -> bool:
        return spec.options.l1_variant != "anthropic"

    def activate(self, sae, pre, x_n, *, train=False, topk_fn=None, batch_topk_fn=None):
        return jax.nn.relu(pre)

    def loss_terms(self, sae, t: LossInputs):
        weight = (jnp.linalg.norm(sae.params["W_dec"], axis=-1)
                  if sae.spec.options.l1_variant == "anthropic" else 1.0)
        return {"sparsity": t.sparsity_coef * jnp.sum(t.z * weight, axis=-1).mean()}

    def spec_from_saelens(self, saelens_arch, *, k, unit, source):
        return {"l1_variant": "standard" if unit else "anthropic"}


register(ReLU())
