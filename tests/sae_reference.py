"""Independent NumPy (float64) reference of the SAE forward pass and losses."""

from __future__ import annotations

import numpy as np


def np_params(sae) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in sae.params.items()}


def np_forward(p, arch: str, x_n, *, k=None, train=True):
    """Returns (pre, z, x_hat) in normalised space."""
    pre = (x_n - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if arch == "relu":
        z = np.maximum(pre, 0)
    elif arch == "topk":
        z = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=-1, kind="stable")[:, :k]
        rows = np.arange(pre.shape[0])[:, None]
        z[rows, idx] = np.maximum(pre[rows, idx], 0)
    elif arch == "batchtopk":
        r = np.maximum(pre, 0)
        if train:
            flat = r.reshape(-1)
            keep = np.argsort(-flat, kind="stable")[: k * pre.shape[0]]
            z = np.zeros_like(flat)
            z[keep] = flat[keep]
            z = z.reshape(r.shape)
        else:
            z = np.where(pre > p["threshold"], pre, 0)
    elif arch == "jumprelu":
        z = np.where(pre > np.exp(p["log_threshold"]), pre, 0)
    elif arch == "gated":
        gate = (pre > 0).astype(np.float64)
        mag = (x_n - p["b_dec"]) @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"]
        z = gate * np.maximum(mag, 0)
    else:
        raise ValueError(arch)
    return pre, z, z @ p["W_dec"] + p["b_dec"]


def np_loss(p, arch: str, x_n, *, coef, k=None, l1_variant="anthropic", frozen=None):
    """Total loss; ``frozen`` supplies the stop-gradient copies (gated's aux decoder)."""
    pre, z, x_hat = np_forward(p, arch, x_n, k=k)
    loss = np.mean(np.sum((x_hat - x_n) ** 2, -1))
    norms = np.linalg.norm(p["W_dec"], axis=-1)
    if arch == "relu":
        w = norms if l1_variant == "anthropic" else 1.0
        loss += coef * np.mean(np.sum(z * w, -1))
    elif arch == "jumprelu":
        loss += coef * np.mean(np.sum(pre > np.exp(p["log_threshold"]), -1))
    elif arch == "gated":
        f = frozen or p
        r = np.maximum(pre, 0)
        loss += coef * np.mean(np.sum(r * norms, -1))
        loss += np.mean(np.sum((r @ f["W_dec"] + f["b_dec"] - x_n) ** 2, -1))
    return loss


def spec_for(arch: str, d_in: int, d_sae: int, **kw):
    """``SAESpec(arch, d_in, d_sae, ...)`` keeping only the options ``arch`` has (tests pass
    one set of keywords, e.g. ``k``, to every architecture)."""
    from jsae.sae.archs import get_arch
    from jsae.sae.spec import COMMON, SAESpec

    own = get_arch(arch).option_fields()
    return SAESpec(arch, d_in, d_sae, **{k: v for k, v in kw.items() if k in own or k in COMMON})


def sae_section(raw: dict) -> dict:
    """A config's ``sae`` section keeping only the common keys and the chosen architecture's
    (tests write one section, e.g. with ``k`` and ``l1_coef``, for every architecture)."""
    from jsae import config
    from jsae.sae.archs import default_name, get_arch

    arch = get_arch(raw.get("architecture") or default_name())
    common = {f for f in config.SAEConfig.__dataclass_fields__ if f != "options"}
    return {k: v for k, v in raw.items() if k in common or k in arch.option_keys()}
