"""Training FLOPs of a dictionary from its shapes (multiply-adds count 2).

Per token, with ``d = d_in * n_hooks`` (a crosscoder reads several hooks at once) and
``n = d_sae``:

- dense codes: the encoder ``x @ W_enc`` and the decoder ``z @ W_dec`` cost ``2dn`` each forward;
  the backward pass costs twice the forward (gradients of the weights and of the inputs), so
  ``12 * d * n`` per token. This is the usual ``6 * N * D`` with ``N = 2dn`` parameters: the
  paper's compute ``C ~ tokens * features`` up to the constant ``12 d``.
- k-sparse codes on the fast path (``Arch.code_k`` and ``spec.fast_path``): the encoder forward is
  still dense (``2dn``: every pre-activation is needed to select the top k); its weight gradient,
  the decoder forward and the decoder's two gradients touch only the k selected rows
  (``2dk`` each), so ``2dn + 8dk``. Without the fast path a k-sparse dictionary trains dense.

Element-wise work (activations, top-k selection, the optimizer's update) is left out: it is
linear in ``n``, not ``dn``.
"""

from __future__ import annotations

from jsae.sae.archs import get_arch


def flops_per_token(spec) -> float:
    """Training FLOPs per token of a dictionary with ``spec`` (see the module docstring)."""
    arch = get_arch(spec.architecture)
    d, n = spec.d_in * arch.n_hooks(spec), spec.d_sae
    k = arch.code_k(spec)
    if k is not None and spec.fast_path:
        return float(2 * d * n + 8 * d * k)
    return float(12 * d * n)


__all__ = ["flops_per_token"]
