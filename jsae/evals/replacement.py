"""A transcoder set or a cross-layer transcoder evaluated as a *replacement model*: every MLP
output it models replaced by its reconstruction in one forward pass, as circuit tracing's
replacement model does (Ameisen et al. 2025, "Circuit Tracing", §"Building a replacement model").

Sites. A dictionary keyed ``key`` reads ``input_hooks(key)`` and writes ``input_hooks(target)``
(`jsae.runs`): a set's per-layer transcoder one MLP input / output (e.g. ``blocks.l.mlp.hook_in``
-> ``blocks.l.hook_mlp_out``), a multi-hook transcoder (a CLT) one of each per layer it spans.
Each (dictionary, layer) pair is a *site*; its replacement is the dictionary's reconstruction
at that layer's output from the spliced run's own MLP inputs, so each layer's replacement feeds
the next layer's input. A multi-hook transcoder's output at its ``i``-th layer is computed
from its inputs at layers ``<= i`` (its later inputs set to zero: a multi-hook transcoder's
layer-``i`` output does not read them, its decoder being causal), read by one intervention
(`jsae.models.transformer.ReadsHook` with a tuple of sources).

Variants, each one LM forward (a ``lax.scan``, one compilation), at the masked positions only
(as `jsae.evals.downstream`; BOS and padding keep their activations):

- ``clean``; ``all``: every site spliced; ``all_zero`` / ``all_mean``: every site's MLP output
  zeroed / set to its mean over the evaluated tokens (the baselines of CE loss recovered);
- per site ``s``: ``s`` alone spliced, zeroed, mean-ablated (a set's per-layer numbers are the
  single-dictionary splice of `jsae.evals.downstream`).

Metrics (per site and for ``all``), over the same positions as `jsae.evals.downstream`:
``ce_*`` next-token CE, ``ce_recovered_zero|mean = (CE_abl - CE_spliced) / (CE_abl - CE_clean)``,
``kl_spliced = KL(p_clean || p_spliced)`` per token, ``kl_score_zero|mean``,
``top1_agreement``: the fraction of positions whose most likely next token is the clean
model's (the replacement model's "top-1 agreement" of Circuit Tracing's CLT evaluation), and

- ``resid_explained = 1 - sum_tok ||r(spliced) - r(clean)||^2 / sum_tok ||r(clean)||^2``, r the
  residual stream after the last block (what the unembedding reads, before the final norm):
  the share of the final residual's squared norm the replacement reproduces end to end;
- ``mlp_out_explained = 1 - sum_{tok, site} ||y - y_hat||^2 / sum_{tok, site} ||y||^2`` on the
  clean run, y each site's MLP output and y_hat its reconstruction: the share of the MLP outputs'
  squared norm carried by features rather than by circuit tracing's *error nodes* (y - y_hat,
  the local replacement model's per-layer errors). circuit-tracer's graph-level
  ``compute_graph_scores`` (replacement / completeness score) weigh the same error nodes by
  their attribution to the logits, which needs an attribution graph; these two need none.

Per site, from the clean run: ``fvu = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` and ``l0``,
the active latents per token of the features reading that site's layer (for a multi-hook
transcoder: its latents ``[i * n, (i + 1) * n)``, its layers' latents being layer-major blocks of
``n = d_sae / n_hooks``); ``all``'s ``l0`` sums the sites'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsae.evals.downstream import _ratio, _replace_reading
from jsae.models.config import parse_hook
from jsae.models.transformer import ReadsHook
from jsae.runs import input_hooks, stack_hooks
from jsae.sae.core import SAE, encode, reconstruct
from jsae.sae.registry import get_arch

BASE = ("clean", "all", "all_zero", "all_mean")  # variants 0..3; then 3 per site
PER_SITE = ("spliced", "zero", "mean")


@dataclasses.dataclass(frozen=True)
class Site:
    """One replaced MLP output: dictionary ``key``'s ``index``-th layer (of ``n_hooks``)."""

    layer: int
    key: str
    index: int
    n_hooks: int
    input_hook: str
    output_hook: str


def replacement_sites(model_cfg, saes: Mapping[str, SAE], targets: Mapping[str, str]
                      ) -> list[Site]:
    """The sites of ``saes`` (key -> transcoder; ``targets[key]``: the hooks it writes), in
    forward order. Raises ValueError (one line) for a dictionary that is not a transcoder, a
    key whose input and output hooks disagree in number, or two sites writing one hook."""
    sites = []
    for key, sae in saes.items():
        if not get_arch(sae.spec.architecture).transcoder:
            raise ValueError(f"{key}: a {sae.spec.architecture} dictionary reconstructs its own "
                             "input; a replacement model needs transcoders (MLP input -> output)")
        ins, outs = input_hooks(key), input_hooks(targets.get(key, key))
        if len(ins) != len(outs):
            raise ValueError(f"{key}: reads {len(ins)} hooks but writes {len(outs)}")
        for i, (h, o) in enumerate(zip(ins, outs)):
            sites.append(Site(parse_hook(o, model_cfg)[0], key, i, len(ins), h, o))
    outs = [s.output_hook for s in sites]
    if len(set(outs)) < len(outs):
        raise ValueError(f"two dictionaries replace the same hook: {outs}")
    return sorted(sites, key=lambda s: s.layer)


# ---- the spliced forwards -----------------------------------------------------------------


def _replace_multi(sae: SAE, index: int, m, s, c, act, srcs):
    """``act`` with masked positions set to ``s * y_hat_index + (1 - s) * c``, y_hat the
    multi-hook transcoder's output at its ``index``-th layer from ``srcs`` (its inputs at
    layers ``<= index``)."""
    x_n = jnp.stack([a.astype(jnp.float32) for a in srcs], axis=-2) * sae.norm_scale
    y = get_arch(sae.spec.architecture).reconstruct_layer(sae, x_n, index) / sae.norm_scale
    new = s * y + (1.0 - s) * c.astype(jnp.float32)
    return jnp.where(m[..., None], new, act.astype(jnp.float32)).astype(act.dtype)


def replacement_interventions(sites: Sequence[Site], saes: Mapping[str, SAE], where, s, c
                              ) -> dict:
    """``{output_hook: ReadsHook}`` for every site: at ``where[j] [B, T]`` positions, site j's
    output becomes ``s[j] * reconstruction + (1 - s[j]) * c[j]`` (``c [S, d]``)."""
    P = jax.tree_util.Partial
    fns = {}
    for j, site in enumerate(sites):
        sae = saes[site.key]
        if site.n_hooks == 1:
            fns[site.output_hook] = ReadsHook(site.input_hook, P(
                _replace_reading, sae, where[j], s[j], c[j]))
        else:
            reads = tuple(input_hooks(site.key)[: site.index + 1])
            fns[site.output_hook] = ReadsHook(reads, P(
                _replace_multi, sae, site.index, where[j], s[j], c[j]))
    return fns


def variant_plan(n_sites: int, means: np.ndarray):
    """``s [V, S]`` (1: the reconstruction, 0: the constant), ``use [V, S]``, ``const [V, S, d]``
    for ``means [S, d]``: variants ``BASE`` then ``PER_SITE`` for each site."""
    S = n_sites
    V = len(BASE) + len(PER_SITE) * S
    s = np.zeros((V, S), np.float32)
    use = np.zeros((V, S), bool)
    const = np.zeros((V, S, means.shape[-1]), np.float32)
    s[1] = 1.0
    use[1:4] = True
    const[3] = means
    for j in range(S):
        b = len(BASE) + len(PER_SITE) * j
        s[b, j] = 1.0
        use[b : b + 3, j] = True
        const[b + 2, j] = means[j]
    return s, use, const


def _variant_outputs(params, tokens, mask, saes, s, use, const, *, forward, model_cfg, sites,
                     final_hook):
    """Per variant: ``ce [V, B, T-1]``, ``kl``, ``top1`` (agreement with clean), ``d_resid``
    (||r - r_clean||^2) and ``resid`` (||r_clean||^2), each ``[V, B, T]``."""
    tokens = tokens.astype(jnp.int32)
    mask = mask.astype(bool)
    targets = tokens[:, 1:]

    def run(fns):
        out = forward(model_cfg, params, tokens, interventions=fns, capture=(final_hook,))
        return out.logits, out.activations[final_hook].astype(jnp.float32)

    shapes = jax.eval_shape(lambda: run(None))

    def body(carry, xs):
        lp_clean, r_clean = carry
        s_v, use_v, c_v, first = xs
        where = mask[None] & use_v[:, None, None]
        logits, r = run(replacement_interventions(sites, saes, where, s_v, c_v))
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lp_clean = jnp.where(first, lp, lp_clean)
        r_clean = jnp.where(first, r, r_clean)
        ce = -jnp.take_along_axis(lp[:, :-1], targets[..., None], axis=-1)[..., 0]
        kl = jnp.sum(jnp.exp(lp_clean) * (lp_clean - lp), axis=-1)
        top1 = (jnp.argmax(lp, -1) == jnp.argmax(lp_clean, -1)).astype(jnp.float32)
        d_resid = jnp.sum((r - r_clean) ** 2, -1)
        resid = jnp.sum(r_clean**2, -1)
        return (lp_clean, r_clean), (ce, kl, top1, d_resid, resid)

    first = jnp.arange(s.shape[0]) == 0
    init = (jnp.zeros(shapes[0].shape, jnp.float32), jnp.zeros(shapes[1].shape, jnp.float32))
    _, out = jax.lax.scan(body, init, (s, use, const, first))
    return out


_variant_outputs_jit = jax.jit(_variant_outputs,
                               static_argnames=("forward", "model_cfg", "sites", "final_hook"))


# ---- totals -------------------------------------------------------------------------------


class ReplacementStats:
    """Exact totals over batches: per variant CE / KL / top-1 / residual sums; per site the
    clean-run reconstruction sums (FVU, L0)."""

    def __init__(self, n_variants: int, n_sites: int):
        self.ce = np.zeros(n_variants)
        self.kl = np.zeros(n_variants)
        self.top1 = np.zeros(n_variants)
        self.d_resid = np.zeros(n_variants)
        self.resid = 0.0
        self.n_ce = self.n_kl = 0
        self.err = np.zeros(n_sites)  # sum ||y - y_hat||^2
        self.y2 = np.zeros(n_sites)  # sum ||y||^2
        self.y_sum: list[np.ndarray | float] = [0.0] * n_sites
        self.l0 = np.zeros(n_sites)
        self.n_rec = 0

    def add_downstream(self, ce, kl, top1, d_resid, resid, mask) -> None:
        mask = np.asarray(mask, bool)
        ce_mask = mask[:, :-1] & mask[:, 1:]
        self.ce += np.sum(np.asarray(ce, np.float64) * ce_mask, axis=(1, 2))
        self.kl += np.sum(np.asarray(kl, np.float64) * mask, axis=(1, 2))
        self.top1 += np.sum(np.asarray(top1, np.float64) * mask, axis=(1, 2))
        self.d_resid += np.sum(np.asarray(d_resid, np.float64) * mask, axis=(1, 2))
        self.resid += float(np.sum(np.asarray(resid, np.float64)[0] * mask))
        self.n_ce += int(ce_mask.sum())
        self.n_kl += int(mask.sum())

    def add_site(self, j: int, y, y_hat, active, mask) -> None:
        """``y`` / ``y_hat [B, T, d]``, ``active [B, T]`` (latents on), ``mask [B, T]``."""
        w = np.asarray(mask, bool)
        y = np.asarray(y, np.float64)[w]
        e = y - np.asarray(y_hat, np.float64)[w]
        self.err[j] += float(np.sum(e * e))
        self.y2[j] += float(np.sum(y * y))
        self.y_sum[j] = self.y_sum[j] + y.sum(0)
        self.l0[j] += float(np.asarray(active, np.float64)[w].sum())
        if j == 0:
            self.n_rec += int(w.sum())

    def merge_processes(self) -> None:
        """Sum every process's totals (a collective: every process calls it)."""
        if jax.process_count() == 1:
            return
        from jsae.parallel import process_sum

        S, d = len(self.err), len(np.atleast_1d(self.y_sum[0]))
        ys = np.concatenate([np.broadcast_to(np.asarray(v, np.float64), (d,)) for v in self.y_sum])
        parts = [self.ce, self.kl, self.top1, self.d_resid, [self.resid, self.n_ce, self.n_kl,
                 self.n_rec], self.err, self.y2, self.l0, ys]
        sizes = [len(p) for p in parts]
        total = process_sum(np.concatenate([np.asarray(p, np.float64) for p in parts]))
        out, pos = [], 0
        for n in sizes:
            out.append(total[pos:pos + n])
            pos += n
        self.ce, self.kl, self.top1, self.d_resid = out[:4]
        self.resid, n_ce, n_kl, n_rec = out[4]
        self.n_ce, self.n_kl, self.n_rec = int(round(n_ce)), int(round(n_kl)), int(round(n_rec))
        self.err, self.y2, self.l0 = out[5:8]
        self.y_sum = list(out[8].reshape(S, d))

    def result(self, sites: Sequence[Site]) -> dict:
        if self.n_ce == 0 or self.n_rec == 0:
            raise ValueError("no token positions were evaluated for the replacement model")
        ce, kl = self.ce / self.n_ce, self.kl / self.n_kl
        top1 = self.top1 / self.n_kl
        resid_ex = 1.0 - self.d_resid / self.resid if self.resid > 0 else np.full_like(ce, np.nan)

        def block(b_spliced, b_zero, b_mean):
            return {
                "ce_spliced": float(ce[b_spliced]), "ce_zero_abl": float(ce[b_zero]),
                "ce_mean_abl": float(ce[b_mean]), "ce_delta": float(ce[b_spliced] - ce[0]),
                "ce_recovered_zero": _ratio(ce[b_zero] - ce[b_spliced], ce[b_zero] - ce[0]),
                "ce_recovered_mean": _ratio(ce[b_mean] - ce[b_spliced], ce[b_mean] - ce[0]),
                "kl_spliced": float(kl[b_spliced]), "kl_zero_abl": float(kl[b_zero]),
                "kl_mean_abl": float(kl[b_mean]),
                "kl_score_zero": _ratio(kl[b_zero] - kl[b_spliced], kl[b_zero]),
                "kl_score_mean": _ratio(kl[b_mean] - kl[b_spliced], kl[b_mean]),
                "top1_agreement": float(top1[b_spliced]),
                "resid_explained": float(resid_ex[b_spliced]),
            }

        n = self.n_rec
        layers = []
        for j, site in enumerate(sites):
            mean = np.asarray(self.y_sum[j], np.float64) / n
            total = self.y2[j] - n * float(mean @ mean)
            b = len(BASE) + len(PER_SITE) * j
            layers.append({
                "layer": site.layer, "key": site.key, "input_hook": site.input_hook,
                "output_hook": site.output_hook, "fvu": _ratio(self.err[j], total),
                "l0": float(self.l0[j] / n), **block(b, b + 1, b + 2),
            })
        together = {"ce_clean": float(ce[0]), **block(1, 2, 3),
                    "mlp_out_explained": 1.0 - _ratio(self.err.sum(), self.y2.sum()),
                    "l0": float(self.l0.sum() / n), "ce_tokens": float(self.n_ce),
                    "kl_tokens": float(self.n_kl), "tokens": float(n)}
        return {"all": together, "layers": layers}


# ---- the evaluation -----------------------------------------------------------------------


def _site_reconstruction(sae: SAE, x, index: int, n_hooks: int):
    """(y_hat [..., d] at the site, active latents [...]) from the clean inputs ``x``."""
    z = encode(sae, x)
    y_hat = reconstruct(sae, x)
    if n_hooks > 1:
        y_hat = y_hat[..., index, :]
        z = z.reshape(*z.shape[:-1], n_hooks, -1)[..., index, :]
    return y_hat, jnp.sum(z != 0, axis=-1)


_site_reconstruction_jit = jax.jit(_site_reconstruction, static_argnums=(2, 3))


def replacement_metrics(evaluator, saes: Mapping[str, SAE], targets: Mapping[str, str], *,
                        progress: bool = False) -> dict:
    """The replacement model's metrics (module docstring) over ``evaluator``'s contexts
    (`jsae.evals.evaluate.Evaluator`, which must capture every site's input and output hook):
    ``{"all": {...}, "layers": [{layer, key, input_hook, output_hook, fvu, l0, ...}]}``."""
    model = evaluator.model
    sites = replacement_sites(model.cfg, saes, targets)
    missing = [h for s in sites for h in (s.input_hook, s.output_hook)
               if h not in evaluator.hooks]
    if missing:
        raise ValueError(f"no evaluation activations for hooks {missing}")
    saes = {k: jax.device_get(v) for k, v in saes.items()}
    means = evaluator.means()
    s, use, const = variant_plan(len(sites), np.stack([means[x.output_hook] for x in sites]))
    stats = ReplacementStats(len(s), len(sites))
    for acts, m in evaluator.activation_batches():
        for j, site in enumerate(sites):
            x = jnp.asarray(stack_hooks(acts, site.key))
            y_hat, active = _site_reconstruction_jit(saes[site.key], x, site.index, site.n_hooks)
            stats.add_site(j, acts[site.output_hook], jax.device_get(y_hat),
                           jax.device_get(active), m)
    final_hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    desc = f"eval: replacement model, {len(s)} LM passes" if progress else None
    for tokens, mask in evaluator.batches(evaluator.downstream_contexts, desc=desc):
        out = _variant_outputs_jit(
            model.params, jnp.asarray(tokens), jnp.asarray(mask), saes, jnp.asarray(s),
            jnp.asarray(use), jnp.asarray(const), forward=evaluator.forward,
            model_cfg=model.cfg, sites=tuple(sites), final_hook=final_hook)
        stats.add_downstream(*jax.device_get(out), mask)
    stats.merge_processes()
    return stats.result(sites)


def is_replacement(saes: Mapping[str, SAE], targets: Mapping[str, str]) -> bool:
    """Whether ``saes`` model MLP outputs as a replacement model: every dictionary a transcoder,
    and more than one layer replaced (a set, or a multi-hook transcoder)."""
    if not saes or not all(get_arch(s.spec.architecture).transcoder for s in saes.values()):
        return False
    return sum(len(input_hooks(targets.get(k, k))) for k in saes) > 1


TABLE_COLUMNS = [
    ("fvu", "FVU", "{:.4f}"),
    ("l0", "L0", "{:.1f}"),
    ("ce_spliced", "CE", "{:.4f}"),
    ("ce_recovered_zero", "CE rec. (zero)", "{:.4f}"),
    ("ce_recovered_mean", "CE rec. (mean)", "{:.4f}"),
    ("kl_spliced", "KL", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.4f}"),
    ("resid_explained", "resid. expl.", "{:.4f}"),
]


def format_replacement_table(result: Mapping) -> str:
    """One row per replaced layer (only it spliced) and one for all of them together."""
    rows = [("layer", *(label for _, label, _ in TABLE_COLUMNS))]
    entries = [(str(x["layer"]), x) for x in result["layers"]] + [("all", result["all"])]
    for name, m in entries:
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            v = m.get(key)
            ok = v is not None and not (isinstance(v, float) and math.isnan(v))
            cells.append(fmt.format(v) if ok else "-")
        rows.append((name, *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    a = result["all"]
    lines.append(f"replacement model: CE clean {a['ce_clean']:.4f}, mlp_out_explained "
                 f"{a['mlp_out_explained']:.4f} (the MLP outputs' squared norm not in error nodes)")
    return "\n".join(lines)


__all__ = ["Site", "ReplacementStats", "format_replacement_table", "is_replacement",
           "replacement_interventions", "replacement_metrics", "replacement_sites",
           "variant_plan"]
