"""Harvest LM activations: one jitted forward, stopped after the last hook needed, captures
every requested hook at once; positions outside the mask are dropped on the host.

Several SAEs (e.g. on layers 3, 6 and 9) therefore train from a single model pass, and the
unembedding is never computed. Rows are aligned across hooks: row i of every hook is the
same token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def _default_forward():
    from jsae.models import forward  # imported lazily: jsae.models pulls in the LM ports

    return forward


@partial(jax.jit, static_argnums=(0, 3, 4))
def _harvest_jit(model_cfg, params, tokens, hooks: tuple, forward: Callable):
    out = forward(model_cfg, params, tokens, capture=hooks, stop_after_capture=True)
    return {h: out.activations[h].astype(jnp.float32) for h in hooks}


def norm_outlier_keep(norms: dict[str, np.ndarray], multiple: float | None) -> np.ndarray | None:
    """Rows to keep: norm <= multiple x median norm, for every hook (None: keep all).

    ``norms``: hook -> [n] norms of the candidate rows (already masked)."""
    if multiple is None:
        return None
    keep = None
    for v in norms.values():
        if len(v) == 0:
            continue
        k = v <= multiple * np.median(v)
        keep = k if keep is None else keep & k
    return keep


class Harvester:
    """``harvester(tokens [B, T], mask [B, T]) -> {hook: float32 [n_kept, d]}``.

    ``model`` is a ``jsae.models`` LanguageModel (``.cfg``, ``.params``). ``forward`` defaults to
    ``jsae.models.forward`` (``forward(cfg, params, tokens, capture=, stop_after_capture=)``);
    pass another function of the same signature to harvest from a stand-in.

    ``devices``: the LM batch is split over these (data parallel, parameters replicated).
    ``"auto"`` (default) takes every local device on GPU/TPU (a TPU v3-8 host harvests on all
    8 cores) and one device on CPU; ``None`` runs unsharded on the default device. The batch is
    padded to a multiple of the device count (padding rows are dropped).
    """

    def __init__(
        self,
        model,
        hooks: Sequence[str],
        *,
        forward: Callable | None = None,
        exclude_norm_outliers: float | None = None,
        devices="auto",
    ):
        if not hooks:
            raise ValueError("harvesting needs at least one hook name")
        self.model = model
        self.hooks = tuple(hooks)
        self.forward = forward or _default_forward()
        self.exclude_norm_outliers = exclude_norm_outliers
        if isinstance(devices, str):
            if devices != "auto":
                raise ValueError(f"devices: 'auto', None or a list of devices, not {devices!r}")
            devices = jax.local_devices() if jax.default_backend() != "cpu" else None
        self.devices = list(devices) if devices is not None and len(devices) > 1 else None
        self._params = None
        self._tok_sharding = None

    def _placed_params(self):
        if self._params is None:
            if self.devices is None:
                self._params = self.model.params
            else:
                from jsae.parallel import batch_sharding, make_mesh, replicated

                # token rows over the mesh's data axis (one per device), the model replicated
                mesh = make_mesh(devices=self.devices)
                self._tok_sharding = batch_sharding(mesh, 2)
                self._params = jax.device_put(self.model.params, replicated(mesh))
        return self._params

    def activations(self, tokens: np.ndarray) -> dict:
        """Device arrays ``{hook: [B', T, d] float32}`` (``B' >= B``: padded to a multiple of the
        device count; rows past ``B`` are padding)."""
        params = self._placed_params()
        tokens = np.asarray(tokens, np.int32)
        if self.devices is not None:
            n = len(self.devices)
            extra = (-tokens.shape[0]) % n
            if extra:
                pad = np.broadcast_to(tokens[-1:], (extra, tokens.shape[1]))
                tokens = np.concatenate([tokens, pad])
            tokens = jax.device_put(tokens, self._tok_sharding)
        else:
            tokens = jnp.asarray(tokens)
        return _harvest_jit(self.model.cfg, params, tokens, self.hooks, self.forward)

    def __call__(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return self.select(self.activations(tokens), mask)

    def select(self, acts: dict, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Host rows ``{hook: [n_kept, d]}`` from ``activations()`` output: masked positions
        dropped, then norm outliers (if configured)."""
        acts = {h: np.asarray(a) for h, a in acts.items()}
        if mask is None:
            mask = np.ones(next(iter(acts.values())).shape[:2], bool)
        mask = np.asarray(mask, bool)
        acts = {h: a[: mask.shape[0]] for h, a in acts.items()}  # drop device padding rows
        rows = {h: a[mask] for h, a in acts.items()}
        kept = mask.copy()
        if self.exclude_norm_outliers is not None:
            norms = {h: np.linalg.norm(r, axis=-1) for h, r in rows.items()}
            keep = norm_outlier_keep(norms, self.exclude_norm_outliers)
            if keep is not None:
                rows = {h: r[keep] for h, r in rows.items()}
                kept[mask] = keep
        # [B, T] positions that produced a row, in row order (row-major): the cache stores it
        # beside the held-out tokens so a row can be put back at its context position.
        self.last_kept = kept
        return rows


def make_global_batch(local: dict[str, np.ndarray], mesh) -> dict:
    """Global ``jax.Array`` batch (rows over the mesh's ``data`` axis) from each process's
    local rows, with ``jax.make_array_from_process_local_data``.

    Every process calls this with its own ``{hook: [B_local, d]}``; the result has
    ``B_local * process_count`` rows, process p's rows at ``[p * B_local, (p + 1) * B_local)``."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P(mesh.axis_names[0], None))
    out = {}
    for h, x in local.items():
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        out[h] = jax.make_array_from_process_local_data(sharding, x, global_shape)
    return out
