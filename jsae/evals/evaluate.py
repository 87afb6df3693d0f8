"""Evaluate dictionaries on a language model: reconstruction, sparsity, latent health and
downstream loss, per hook, from held-out text.

Two passes over the same evaluation contexts:

1. one early-stopped forward per batch captures every hook (the activations are cached on
   the host when they fit in ``cache_bytes``); it gives the reconstruction and sparsity
   metrics, the feature densities and the mean activation used for mean ablation;
2. one jitted program per batch runs the LM clean and with each hook spliced / zero-ablated /
   mean-ablated (:mod:`jsae.evals.downstream`).

Positions evaluated are those the SAE trains on (``mask``: no padding, no BOS when
``data.exclude_bos``). ``Evaluator`` is reusable: the periodic evaluation during training
(:func:`make_eval_fn`) builds it once and calls :meth:`Evaluator.evaluate` with new SAEs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jsae import jsonsafe
from jsae.evals.downstream import downstream_metrics
from jsae.evals.health import latent_health, plot_feature_density
from jsae.evals.reconstruction import ReconstructionStats
from jsae.parallel import process_sum
from jsae.runs import sae_dirname
from jsae.sae.core import SAE
from jsae.sae.registry import get_arch

# Default CE/KL budget on a CPU: the 1 + 4H full-LM passes (262k-vocab unembedding) dominate
# `jsae eval`; reconstruction metrics still use all `eval.tokens`. `--downstream-tokens` overrides.
CPU_DOWNSTREAM_TOKENS = 4096

# ---- evaluation contexts ----------------------------------------------------------------


def eval_contexts(
    model,
    data_cfg,
    n_tokens: int,
    *,
    seed: int = 0,
    documents=None,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out contexts ``(tokens [N, T], mask [N, T])`` with at least ``n_tokens`` masked
    positions (fewer if the held-out documents run out), packed exactly as for training.

    ``data_cfg`` is a ``DataConfig`` (``dataset``, ``context_length``, ``prepend_bos``,
    ``exclude_bos``, ``holdout_fraction``); ``documents`` overrides ``data_cfg.dataset``.
    """
    from jsae.data.packing import Packer, tokenizer_fn
    from jsae.data.text import DataSourceError, DocumentStream, open_documents

    docs = documents if documents is not None else open_documents(data_cfg)
    split = "holdout" if data_cfg.holdout_fraction > 0 else "train"
    try:
        stream = DocumentStream(
            docs, split=split, holdout_fraction=data_cfg.holdout_fraction, seed=seed,
            process_index=process_index, process_count=process_count, epochs=1,
        )
    except DataSourceError:  # too few documents to hold any out: evaluate on the training split
        stream = DocumentStream(docs, split="train", seed=seed, process_index=process_index,
                                process_count=process_count, epochs=1)
    tok = model.tokenizer
    packer = Packer(
        stream, tokenizer_fn(tok), context_length=data_cfg.context_length, bos_id=tok.bos_id,
        pad_id=tok.pad_id if tok.pad_id is not None else 0, prepend_bos=data_cfg.prepend_bos,
        exclude_bos=data_cfg.exclude_bos,
    )
    rows, masks, have = [], [], 0
    while have < n_tokens:
        c = packer.next_context()
        if c is None:
            break
        rows.append(c[0])
        masks.append(c[1])
        have += int(c[1].sum())
    if not rows:
        raise ValueError("no evaluation text: the held-out documents are empty")
    return np.stack(rows), np.stack(masks)


def texts_to_contexts(
    model, texts: Sequence[str], context_length: int, *, prepend_bos: bool = True,
    exclude_bos: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Pack a list of texts (in order) into ``(tokens [N, T], mask [N, T])``."""
    from jsae.data.packing import pack_documents, tokenizer_fn

    tok = model.tokenizer
    return pack_documents(
        list(texts), tokenizer_fn(tok), context_length, bos_id=tok.bos_id,
        pad_id=tok.pad_id if tok.pad_id is not None else 0, prepend_bos=prepend_bos,
        exclude_bos=exclude_bos,
    )


@partial(jax.jit, static_argnums=(0, 3, 4))
def _capture(model_cfg, params, tokens, hooks: tuple, forward: Callable) -> dict:
    """Activations at ``hooks`` ([B, T, d] float32), the forward stopped after the last one."""
    out = forward(model_cfg, params, tokens, capture=hooks, stop_after_capture=True)
    return {h: out.activations[h].astype(jnp.float32) for h in hooks}


# ---- the evaluator ------------------------------------------------------------------------


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # hook -> metric -> value
    density: dict[str, np.ndarray]  # hook -> [d_sae] fraction of tokens each latent fired on
    n_tokens: int  # masked positions evaluated

    def flat(self) -> dict[str, float]:
        """``metric`` (one hook) or ``hook/metric`` (several): the training loop's naming."""
        multi = len(self.metrics) > 1
        return {(f"{h}/{k}" if multi else k): float(v)
                for h, m in self.metrics.items() for k, v in m.items()}


class Evaluator:
    """Metrics of SAEs at ``hooks`` of ``model`` over fixed contexts ``tokens``/``mask``.

    ``forward`` defaults to ``jsae.models.forward``; ``batch_size`` is contexts per LM pass.
    """

    def __init__(
        self,
        model,
        hooks: Sequence[str],
        tokens: np.ndarray,
        mask: np.ndarray,
        *,
        forward: Callable | None = None,
        batch_size: int = 8,
        cache_bytes: int = 1 << 30,
        downstream_tokens: int | None = None,
        progress: bool = False,
    ):
        if forward is None:
            from jsae.models import forward
        self.model, self.forward = model, forward
        self.hooks = list(hooks)
        self.tokens = np.asarray(tokens, np.int32)
        self.mask = np.asarray(mask, bool)
        if self.tokens.shape != self.mask.shape or self.tokens.ndim != 2:
            raise ValueError(f"tokens {self.tokens.shape} and mask {self.mask.shape} must be [N, T]")
        self.batch_size = max(1, min(int(batch_size), len(self.tokens)))
        n, T = self.tokens.shape
        d = int(model.cfg.d_model)
        self._cache_ok = n * T * d * 4 * len(self.hooks) <= cache_bytes
        self._acts: list[dict[str, np.ndarray]] | None = None
        self._means: dict[str, np.ndarray] | None = None
        self.progress = progress
        # The spliced-LM passes cost 1 + 4H full forwards: they may use a prefix of the contexts.
        counts = np.cumsum(self.mask.sum(1))
        want = self.n_tokens if downstream_tokens is None else int(downstream_tokens)
        self.downstream_contexts = int(min(n, np.searchsorted(counts, want) + 1)) if n else 0

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def n_downstream_tokens(self) -> int:
        return int(self.mask[: self.downstream_contexts].sum())

    def batches(self, n_contexts: int | None = None, desc: str | None = None):
        """``(tokens [B, T], mask [B, T])`` over the first ``n_contexts`` contexts (default all);
        the last batch is padded with masked-out rows so every batch has the same shape (one
        compilation). ``desc``: show a progress bar with that title. A prefix (``n_contexts``,
        the spliced-LM passes) is cut into equal batches no larger than ``batch_size``: 3
        contexts run as one batch of 3, not padded to 16 (each pass computes full-vocabulary
        logits for every row, padding included)."""
        B = self.batch_size
        T = self.tokens.shape[1]
        n = len(self.tokens) if n_contexts is None else int(n_contexts)
        if n_contexts is not None and n:
            B = -(-n // -(-n // B))  # ceil(n / number of batches)
        starts = range(0, n, B)
        if desc and self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch", total=len(starts), leave=False)
        for s in starts:
            e = min(s + B, n)
            t, m = self.tokens[s:e], self.mask[s:e]
            if len(t) < B:
                pad = B - len(t)
                t = np.concatenate([t, np.full((pad, T), self.tokens[0, 0], np.int32)])
                m = np.concatenate([m, np.zeros((pad, T), bool)])
            yield t, m

    def activation_batches(self):
        """``({hook: [B, T, d] float32}, mask [B, T])`` per batch (cached when small)."""
        if self._acts is not None:
            yield from zip(self._acts, (m for _, m in self.batches()))
            return
        cache = [] if self._cache_ok else None
        for t, m in self.batches(desc=f"eval: LM to {', '.join(self.hooks)}"):
            acts = _capture(self.model.cfg, self.model.params, jnp.asarray(t), tuple(self.hooks),
                            self.forward)
            acts = {h: np.asarray(a) for h, a in acts.items()}
            if cache is not None:
                cache.append(acts)
            yield acts, m
        if cache is not None:
            self._acts = cache

    def means(self) -> dict[str, np.ndarray]:
        """Mean activation per hook over the masked positions (for mean ablation)."""
        if self._means is None:
            d = int(self.model.cfg.d_model)
            sums = {h: np.zeros(d) for h in self.hooks}  # same shape on every process
            for acts, m in self.activation_batches():
                for h in self.hooks:
                    sums[h] = sums[h] + np.asarray(acts[h], np.float64)[m].sum(0)
            n = process_sum(float(self.n_tokens))  # multi-host: every process's share
            self._means = {h: process_sum(sums[h]) / max(float(n), 1.0) for h in self.hooks}
        return self._means

    def reconstruction(self, saes: Mapping[str, SAE], targets: Mapping[str, str] | None = None
                       ) -> dict[str, ReconstructionStats]:
        from jsae.runs import stack_hooks

        targets = targets or {}
        stats = {h: ReconstructionStats() for h in saes}
        for acts, m in self.activation_batches():
            for h, sae in saes.items():
                t = targets.get(h, h)  # a multi-hook transcoder's: its output hooks joined
                stats[h].add(sae, stack_hooks(acts, h), m,
                             x_target=None if t == h else stack_hooks(acts, t))
        for h, sae in saes.items():  # multi-host: combine the processes' shares
            width = int(np.prod(get_arch(sae.spec.architecture).token_shape(sae.spec)))
            stats[h].merge_processes(width, sae.spec.d_sae)
        return stats

    def evaluate(self, saes: Mapping[str, SAE], *, downstream: bool = True,
                 targets: Mapping[str, str] | None = None) -> EvalResult:
        """All metrics for ``saes`` (hook -> SAE; hooks must be among ``self.hooks``).

        ``targets[hook]``: the hook a transcoder at ``hook`` reconstructs (also among
        ``self.hooks``); its metrics measure that hook, and CE / KL splice the transcoder in
        place of it (:mod:`jsae.evals.downstream`)."""
        from jsae.runs import input_hooks, split_member

        targets = {h: (targets or {}).get(h, h) for h in saes}
        needed = captured_hooks(targets)
        unknown = [t for t in dict.fromkeys(needed) if t not in self.hooks]
        if unknown:
            raise ValueError(f"no evaluation activations for hooks {unknown}; have {self.hooks}")
        d_model = int(self.model.cfg.d_model)
        for h, sae in saes.items():
            if sae.spec.d_in != d_model:
                raise ValueError(f"SAE at {h} has d_in={sae.spec.d_in}, the model has d_model={d_model}")
        saes = {h: jax.device_get(s) for h, s in saes.items()}
        stats = self.reconstruction(saes, targets)
        metrics = {h: s.result() for h, s in stats.items()}
        density = {h: s.feature_density for h, s in stats.items()}
        for h, s in stats.items():
            health = latent_health(s.feature_counts, s.n_tokens)
            metrics[h].update({k: v for k, v in health.items() if k.startswith("log10")})
        # an acausal crosscoder reads later layers than it writes: no single spliced forward
        spliced = {h: s for h, s in saes.items() if len(input_hooks(h)) == 1}
        if downstream and spliced:
            means = self.means()
            # a family's members replace the same hook: one round of LM passes per member,
            # its keys spliced under their hooks' names
            rounds: dict = {}
            for h, s in spliced.items():
                rounds.setdefault(split_member(h)[1], {})[h] = s
            for group in rounds.values():
                base = {h: split_member(h)[0] for h in group}
                tgt = {base[h]: split_member(targets[h])[0] for h in group}
                batches = self.batches(self.downstream_contexts,
                                       desc=f"eval: CE/KL, {1 + 4 * len(group)} LM passes")
                ds = downstream_metrics(self.model, {base[h]: s for h, s in group.items()},
                                        batches, {b: means[t] for b, t in tgt.items()},
                                        forward=self.forward, targets=tgt)
                n_ds = int(process_sum(float(self.n_downstream_tokens)))
                for h in group:
                    metrics[h].update(ds[base[h]])
                    metrics[h]["downstream_tokens"] = float(n_ds)
        return EvalResult(metrics, density, int(process_sum(float(self.n_tokens))))


# ---- during training --------------------------------------------------------------------


def make_eval_fn(
    cfg,
    model=None,
    *,
    n_tokens: int | None = None,
    downstream: bool = True,
    forward: Callable | None = None,
    documents=None,
):
    """``eval_fn(trainer, states) -> dict[str, float]`` for ``Trainer.fit(eval_fn=...)``.

    With an LM (``model``, the text source's ``trainer.source.model``, or for a ``cache``
    source the model the config names, loaded on first use) it computes every
    metric of :class:`Evaluator` on ``cfg.eval.tokens`` held-out tokens (contexts built once,
    activations cached); without one (synthetic / array sources) the reconstruction metrics
    of ``trainer.evaluate``. Keys follow the loop: ``metric`` or ``hook/metric``.
    """
    holder: dict = {}

    def eval_fn(trainer, states) -> dict[str, float]:
        lm = model if model is not None else getattr(trainer.source, "model", None)
        if lm is None and cfg.data.source == "cache":  # cached activations: load the LM once
            if "lm" not in holder:
                from jsae.models import load

                holder["lm"] = load(cfg.model.path or cfg.model.name, dtype=cfg.model.dtype)
            lm = holder["lm"]
        if lm is None:
            per_hook = trainer.evaluate(states, n_tokens)
            return EvalResult(per_hook, {}, 0).flat()
        if "ev" not in holder:
            toks, mask = eval_contexts(
                lm, cfg.data, n_tokens or cfg.eval.tokens, seed=cfg.seed, documents=documents,
                process_index=jax.process_index(), process_count=jax.process_count(),
            )
            holder["ev"] = Evaluator(lm, trainer.source_hooks, toks, mask, forward=forward,
                                     batch_size=cfg.eval.batch_size)
        saes = trainer.host_saes(states)
        return holder["ev"].evaluate(saes, downstream=downstream,
                                     targets=trainer.targets).flat()

    return eval_fn


# ---- a run directory ----------------------------------------------------------------------


def captured_hooks(targets: Mapping[str, str]) -> list[str]:
    """The model hooks evaluating ``targets`` (key -> the hooks its dictionary reconstructs)
    reads: every key's input hooks and output hooks, each once (a crosscoder's and a
    multi-hook transcoder's keys split into their hooks)."""
    from jsae.runs import input_hooks

    return list(dict.fromkeys(p for h, t in targets.items()
                              for p in [*input_hooks(h), *input_hooks(t)]))


def load_run_saes(run_dir: str | Path) -> dict[str, SAE]:
    """hook -> SAE of a run directory: the newest SAE of every hook (`jsae.runs`)."""
    from jsae.runs import saes_from_run

    return saes_from_run(run_dir)


def write_outputs(
    result: EvalResult, out_dir: str | Path, *, json_path: str | Path | None = None,
    info: dict | None = None, extra: Mapping | None = None,
) -> dict[str, str]:
    """``eval.json`` (metrics + info + the ``extra`` sections, e.g. ``replacement``),
    ``feature_density.png`` and ``feature_density_<hook>.npy``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    if result.density:
        files["plot"] = str(plot_feature_density(
            result.density, out_dir / "feature_density.png",
            n_tokens={h: result.n_tokens for h in result.density},
        ))
        for h, d in result.density.items():
            # one file per dictionary (a family member's folder <hook>/<name> flattened)
            p = out_dir / f"feature_density_{sae_dirname(h).replace('/', '@')}.npy"
            np.save(p, np.asarray(d, np.float32))
            files[f"density:{h}"] = str(p)
    json_path = Path(json_path) if json_path else out_dir / "eval.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"info": info or {}, "tokens": result.n_tokens, "metrics": _jsonable(result.metrics),
           "saebench": _jsonable({h: saebench_view(m) for h, m in result.metrics.items()}),
           **_jsonable(dict(extra or {})), "files": files}
    json_path.write_text(jsonsafe.dumps(doc, indent=2))  # NaN -> null: strict JSON
    files["json"] = str(json_path)
    return files


SAEBENCH_KEYS = {  # SAEBench core-eval category -> its key -> jsae key (docs/metrics.md)
    # SAELens' definitions: the ablation zeroes every position (BOS too), mse is per token.
    "model_behavior_preservation": {
        "kl_div_score": "kl_div_score", "kl_div_with_ablation": "kl_zero_abl_all",
        "kl_div_with_sae": "kl_spliced"},
    "model_performance_preservation": {
        "ce_loss_score": "ce_loss_score", "ce_loss_with_ablation": "ce_zero_abl_all",
        "ce_loss_with_sae": "ce_spliced_saelens", "ce_loss_without_sae": "ce_clean_saelens"},
    "reconstruction_quality": {"explained_variance": "explained_variance",
                               "mse": "mse_per_token", "cossim": "cos_sim"},
    "shrinkage": {
        "l2_norm_in": "l2_norm_in", "l2_norm_out": "l2_norm_out", "l2_ratio": "l2_ratio",
        "relative_reconstruction_bias": "rel_recon_bias"},
    "sparsity": {"l0": "l0", "l1": "l1"},
}


def saebench_view(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """One hook's metrics under SAEBench's core-eval names (jsae's definitions; the
    explained variance is the pooled one, see docs/metrics.md)."""
    out = {}
    for cat, keys in SAEBENCH_KEYS.items():
        vals = {k: metrics[j] for k, j in keys.items() if j in metrics}
        if vals:
            out[cat] = vals
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


TABLE_ROWS = [
    ("tokens", "tokens evaluated (reconstruction)", "{:.0f}"),
    ("downstream_tokens", "tokens evaluated (CE / KL)", "{:.0f}"),
    ("l0", "L0 (active latents / token)", "{:.2f}"),
    ("l1", "L1", "{:.4g}"),
    ("fvu", "FVU", "{:.4f}"),
    ("explained_variance", "explained variance", "{:.4f}"),
    ("mse", "MSE (per element)", "{:.4g}"),
    ("cos_sim", "cosine similarity", "{:.4f}"),
    ("rel_recon_bias", "relative reconstruction bias", "{:.4f}"),
    ("l2_ratio", "L2 norm ratio", "{:.4f}"),
    ("dead_frac", "dead latents", "{:.2%}"),
    ("dense_frac", "dense latents (>10%)", "{:.2%}"),
    ("log10_density_median", "median log10 density (alive)", "{:.2f}"),
    ("ce_clean", "CE clean", "{:.4f}"),
    ("ce_spliced", "CE with SAE", "{:.4f}"),
    ("ce_delta", "CE increase", "{:.4f}"),
    ("ce_zero_abl", "CE zero-ablated (SAE positions)", "{:.4f}"),
    ("ce_zero_abl_all", "CE zero-ablated (all, BOS too)", "{:.4f}"),
    ("ce_mean_abl", "CE mean-ablated", "{:.4f}"),
    ("ce_recovered_zero", "CE loss recovered (zero abl.)", "{:.4f}"),
    ("ce_recovered_mean", "CE loss recovered (mean abl.)", "{:.4f}"),
    ("ce_loss_score", "ce_loss_score (SAEBench)", "{:.4f}"),
    ("kl_spliced", "KL(clean || SAE) / token", "{:.4f}"),
    ("kl_score_zero", "KL score (zero abl.)", "{:.4f}"),
    ("kl_div_score", "kl_div_score (SAEBench)", "{:.4f}"),
]


def format_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per hook."""
    hooks = list(metrics)
    rows = [("metric", *hooks)]
    for key, label, fmt in TABLE_ROWS:
        if not any(key in metrics[h] for h in hooks):
            continue
        vals = []
        for h in hooks:
            v = metrics[h].get(key)
            vals.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        rows.append((label, *vals))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- a path on disk: a run directory, a jsae SAE, an SAELens / Gemma Scope folder ------------


def detect_kind(path: str | Path) -> str:
    """``run`` | ``jsae`` | ``saelens`` | ``gemmascope`` for a folder (or ``.npz`` file)."""
    p = Path(path)
    if p.is_dir() and (p / "saes").is_dir():
        return "run"
    if p.is_dir() and (p / "sae.json").exists():
        return "jsae"
    if p.is_dir() and (p / "cfg.json").exists():
        return "saelens"
    if p.suffix == ".npz" or (p.is_dir() and ((p / "params.npz").exists() or any(p.glob("*.safetensors")))):
        return "gemmascope"
    raise FileNotFoundError(
        f"{p}: not a jsae run (saes/), a jsae SAE (sae.json), an SAELens folder (cfg.json) or a "
        "Gemma Scope folder (params.npz / *.safetensors)"
    )


def _external(kind: str, path: Path) -> tuple[SAE, dict]:
    try:
        from jsae import export
    except ImportError as e:
        raise RuntimeError(f"reading {kind} dictionaries needs jsae.export ({e})") from e
    fn = getattr(export, "load_saelens" if kind == "saelens" else "load_gemmascope")
    out = fn(path)
    if isinstance(out, tuple):
        sae, meta = out[0], (out[1] if len(out) > 1 and isinstance(out[1], dict) else {})
    else:
        sae, meta = out, {}
    return sae, dict(meta)


def text_source(data):
    """The text a run's activations came from: its own data section, or for a run trained from
    a cache (``data.path`` is then the cache) the text source recorded in the cache's manifest."""
    if data.source != "cache" or not data.path:
        return data
    from jsae.data.cache import read_manifest

    src = read_manifest(data.path).get("source") or {}
    keys = ("dataset", "path", "data_dir", "split", "text_field")
    return dataclasses.replace(data, source="text", **{k: src[k] for k in keys if k in src})


def _run_config_file(path: Path, kind: str) -> Path | None:
    """The run's config.yaml: in the run directory, or two levels up from ``saes/<hook>/``."""
    if kind == "run" and (path / "config.yaml").exists():
        return path / "config.yaml"
    if kind == "jsae" and path.parent.name == "saes" and (path.parent.parent / "config.yaml").exists():
        return path.parent.parent / "config.yaml"
    return None


def _eval_config(path: Path, kind: str, overrides: Sequence[str]):
    from jsae import config as config_lib

    run_cfg = _run_config_file(path, kind)
    if run_cfg is not None:
        return config_lib.load(run_cfg, list(overrides))
    # no training config: defaults (offline text, 128-token contexts); the train/sae values
    # below only make the config valid, evaluation does not use them
    raw = config_lib.apply_overrides({"train": {"steps": 1}, "sae": {"expansion": 1, "k": 1}},
                                     list(overrides))
    return config_lib.from_dict(raw)


def evaluate_path(
    path: str | Path,
    *,
    n_tokens: int | None = None,
    downstream_tokens: int | None = None,
    batch_size: int | None = None,
    model_name: str | None = None,
    hook: str | None = None,
    json_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    downstream: bool = True,
    overrides: Sequence[str] = (),
    model=None,
    forward: Callable | None = None,
    documents=None,
    print_fn: Callable[[str], None] | None = print,
) -> dict:
    """``jsae eval``: evaluate the SAEs at ``path``; write JSON and plots; return the JSON doc.

    ``model`` / ``forward`` / ``documents`` replace the loaded LM, its forward and the text
    (tests and notebooks)."""
    path = Path(path)
    kind = detect_kind(path)
    meta: dict = {}
    extra: dict = {}
    if kind == "run":
        from jsae.runs import output_hooks

        saes = load_run_saes(path)
        targets = output_hooks(path)
    else:
        if kind == "jsae":
            from jsae.sae.io import load_sae

            sae, meta = load_sae(path)
        else:
            sae, meta = _external(kind, path)
        key = hook or meta.get("hook_name") or ""
        saes = {key: sae}
        targets = {key: meta.get("hook_name_out") or key}
    if "" in saes:
        raise ValueError(f"{path}: the hook is unknown; pass --hook (e.g. blocks.6.hook_resid_post)")
    captured = captured_hooks(targets)
    cfg = _eval_config(path, kind, overrides)
    run_cfg = _run_config_file(path, kind) is not None
    n_tokens = int(n_tokens or cfg.eval.tokens)
    info = {"path": str(path), "kind": kind, "hooks": list(saes), "n_tokens_requested": n_tokens}
    if any(t != h for h, t in targets.items()):
        info["output_hooks"] = {h: t for h, t in targets.items() if t != h}

    lm_needed = not run_cfg or cfg.data.source in ("text", "cache")
    if not lm_needed:  # synthetic / array activations: reconstruction metrics only
        from jsae.data import make_source
        from jsae.runs import stack_hooks

        source = make_source(cfg)
        stats = {h: ReconstructionStats() for h in saes}
        for batch in source.eval_batches(n_tokens, 4096):
            for h, sae in saes.items():
                t = targets[h]
                stats[h].add(sae, stack_hooks(batch, h), x_target=None if t == h else batch[t])
        metrics = {h: s.result() for h, s in stats.items()}
        result = EvalResult(metrics, {h: s.feature_density for h, s in stats.items()},
                            int(next(iter(stats.values())).n_tokens))
        info["data"] = cfg.data.source
    else:
        if model is None:
            from jsae.models import load

            if kind == "run" or run_cfg:
                name = model_name or cfg.model.path or cfg.model.name
            else:
                name = model_name or meta.get("model_name")
            if not name:
                raise ValueError(f"{path}: the model is unknown; pass --model (e.g. gemma-3-270m)")
            model = load(name, dtype=cfg.model.dtype)
        tokens, mask = eval_contexts(model, text_source(cfg.data), n_tokens, seed=cfg.seed,
                                     documents=documents)
        ds_tokens = downstream_tokens or cfg.eval.downstream_tokens or (
            min(n_tokens, CPU_DOWNSTREAM_TOKENS) if jax.default_backend() == "cpu" else n_tokens)
        ev = Evaluator(model, captured, tokens, mask, forward=forward,
                       batch_size=batch_size or cfg.eval.batch_size,
                       downstream_tokens=ds_tokens, progress=print_fn is not None)
        from jsae.evals.replacement import is_replacement, replacement_metrics
        from jsae.runs import split_member

        # a transcoder set / multi-hook transcoder: every MLP spliced at once, and each alone;
        # a family of them: each member's replacement model, under its name
        groups: dict = {}
        for k in saes:
            base = split_member(k)[0]
            g = groups.setdefault(split_member(k)[1], ({}, {}))
            g[0][base], g[1][base] = saes[k], split_member(targets[k])[0]
        replace = kind == "run" and downstream and all(
            is_replacement(*g) for g in groups.values())
        result = ev.evaluate(saes, downstream=downstream and not replace, targets=targets)
        if replace:
            reps = {name: replacement_metrics(ev, *g, progress=print_fn is not None)
                    for name, g in groups.items()}
            extra["replacement"] = reps[None] if None in reps else {"members": reps}
        info.update(model=getattr(model, "name", None), dataset=cfg.data.dataset,
                    context_length=int(tokens.shape[1]), contexts=int(tokens.shape[0]),
                    exclude_bos=cfg.data.exclude_bos)
    out_dir = Path(out_dir) if out_dir else (
        Path(json_path).parent if json_path else (path if path.is_dir() else path.parent) / "eval")
    files = write_outputs(result, out_dir, json_path=json_path, info=info, extra=extra)
    if print_fn is not None:
        print_fn(format_table(result.metrics))
        if "replacement" in extra:
            from jsae.evals.replacement import format_replacement_table

            rep = extra["replacement"]
            for name, r in (rep["members"].items() if "members" in rep else [(None, rep)]):
                print_fn((f"member {name}:\n" if name else "") + format_replacement_table(r))
        print_fn(f"wrote {files['json']}" + (f" and {files['plot']}" if "plot" in files else ""))
    return {"info": info, "tokens": result.n_tokens, "metrics": result.metrics, **extra,
            "files": files}
