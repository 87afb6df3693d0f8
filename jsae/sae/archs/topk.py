"""TopK SAE (Gao et al. 2024): z = relu(top_k(pre)) per token, plus AuxK for dead latents."""

from __future__ import annotations

import dataclasses

import jax

from jsae.sae import selection
from jsae.sae.archs import OptionError, register
from jsae.sae.archs.base import Arch, LossInputs


def auxk_terms(sae, t: LossInputs) -> dict:
    """aux_coef * AuxK: the top aux_k dead latents reconstruct the residual target - x_hat."""
    from jsae.sae.losses import auxk_loss

    return {"auxk": t.aux_coef * auxk_loss(sae, t.pre, t.x_target - t.x_hat, t.dead_mask,
                                           t.topk_fn)}


def check_k(k, d_sae, d_sae_key="d_sae") -> None:
    if k is None or k <= 0:
        raise OptionError("k", "must be a positive integer")
    if d_sae is not None and k > d_sae:
        raise OptionError("k", f"k={k} exceeds {d_sae_key}={d_sae}")


class TopK(Arch):
    name = "topk"
    rank = 1
    is_default = True
    elementwise = False
    supports_fast = True
    fast_blockwise = True
    sharded_fast = True
    saelens_name = "topk"
    saelens_imports = ("topk",)

    @dataclasses.dataclass(frozen=True)
    class Options:
        k: int = 32  # active latents per token

    def check(self, options, d_sae, d_sae_key="d_sae"):
        check_k(options.k, d_sae, d_sae_key)

    def code_k(self, spec):
        return int(spec.options.k)

    def activate(self, sae, pre, x_n, *, train=False, topk_fn=None, batch_topk_fn=None):
        return jax.nn.relu((topk_fn or selection.topk_dense)(pre, sae.spec.options.k))

    def max_active(self, spec):
        return int(spec.options.k)

    def loss_terms(self, sae, t):
        return auxk_terms(sae, t)

    def fast_applies(self, batch_topk_fn) -> bool:
        return True

    def fast_codes(self, sae, pre):
        from jsae.sae import fast

        s = sae.spec
        return fast.topk_codes(pre, s.options.k, recall=s.topk_recall, rectify=False, chunk=s.topk_chunk)

    def saelens_cfg(self, spec):
        return {"k": int(spec.options.k), "rescale_acts_by_decoder_norm": False}

    def spec_from_saelens(self, saelens_arch, *, k, unit, source):
        if k is None or k <= 0:
            raise ValueError(f"{source}: a topk SAE needs k")
        return {"k": int(k)}


register(TopK())
