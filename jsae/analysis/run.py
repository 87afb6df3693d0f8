"""Open a training run folder for analysis: its model, its SAEs, and cached corpus statistics.

A run folder is read through ``jsae.runs`` (config, hooks, the newest SAE of each hook).
Corpus statistics (top activations of every feature over a sample of the offline corpus, with
the contexts) are cached under ``analysis/<hook>/`` and recomputed when the SAE changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import numpy as np

from jsae import runs
from jsae.analysis.top import TopActivations, top_activations
from jsae.runs import run_hooks
from jsae.sae.core import SAE


@dataclasses.dataclass
class Run:
    path: Path
    model: object  # jsae.models.LanguageModel
    sae: SAE
    hook: str
    model_name: str
    output_hook: str | None = None  # a transcoder's: the hook its features write to


def load_run(run_dir: str | Path, hook: str | None = None, *, model=None) -> Run:
    """Load the model and the SAE at ``hook`` (default: the first hook in the config that has a
    SAE). ``model`` skips loading the LM (pass one already in memory)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    hooks = run_hooks(path)
    mcfg = runs.model_section(path)
    if hook is None:
        wanted = [h for h in mcfg.get("hooks") or [] if h in hooks]
        hook = (wanted or hooks)[0]
    sae, info = runs.sae_from_run(path, hook)
    name = mcfg.get("path") or mcfg.get("name") or info.get("model_name")
    if model is None:
        if not name:
            raise ValueError(f"{path}: no model name in config.yaml or in the SAE metadata")
        from jsae.models import load

        model = load(name, dtype=mcfg.get("dtype") or "float32")
    return Run(path, model, sae, hook, str(name or getattr(model, "name", "")),
               runs.output_hook(path, hook))


def _sae_file_stamp(run: Run) -> str:
    """Short hash of the newest saved SAE file's size and mtime: the corpus-statistics cache
    key, so a retrained run recomputes them."""
    f = run.path / "saes" / runs.sae_dirname(run.hook) / "sae.safetensors"
    if not f.exists():  # an unfinished run: its newest checkpoint
        f = run.path / "checkpoints" / str(runs.latest_step(run.path))
    st = f.stat()
    return hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]


def _load_cached(f_top: Path, f_ctx: Path, n_contexts: int, context_length: int
                 ) -> tuple[TopActivations, np.ndarray]:
    """The cached corpus statistics, checked against each other: a damaged cache is refused in
    one line naming the file (delete it and the next command recomputes it)."""
    from jsae.errors import FileFormatError
    from jsae.validate import bad, finite_array

    top = TopActivations.load(f_top)
    try:
        ctx = np.load(f_ctx, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise FileFormatError(f"{f_ctx} is not a readable .npy file ({type(e).__name__}: {e}); "
                              "delete it to recompute it") from e
    finite_array(ctx, "the cached contexts", f_ctx, shape=(None, context_length), kind="i")
    if len(ctx) > n_contexts or (ctx < 0).any():
        raise bad(f_ctx, "", f"holds {len(ctx)} contexts of token ids (some negative?), expected "
                  f"at most {n_contexts}; delete it to recompute it")
    if (top.position < 0).any() or (top.position >= ctx.shape[1]).any():
        raise bad(f_top, "array 'position'", f"holds positions outside the {ctx.shape[1]} tokens "
                  "of a context; delete it to recompute it")
    used = top.context[top.context >= 0]
    if used.size and int(used.max()) >= len(ctx):
        raise bad(f_top, "array 'context'", f"names context {int(used.max())} but {f_ctx.name} "
                  f"holds {len(ctx)}; delete both to recompute them")
    return top, ctx


def corpus_stats(run: Run, n_contexts: int = 256, context_length: int = 64, *, seed: int = 0,
                 top_n: int = 10, batch_size: int = 8, cache: bool = True, log=None
                 ) -> tuple[TopActivations, np.ndarray]:
    """(top activations of every feature, contexts [N, T]) over a sample of the offline corpus,
    cached in ``RUN_DIR/analysis/<hook>/``."""
    from jsae.analysis.corpus import corpus_contexts

    log = log or (lambda m: print(m, file=sys.stderr))
    d = run.path / "analysis" / run.hook
    key = f"top{top_n}_{n_contexts}x{context_length}_seed{seed}_{_sae_file_stamp(run)}"
    f_top, f_ctx = d / f"{key}.npz", d / f"{key}.contexts.npy"
    if cache and f_top.exists() and f_ctx.exists():
        return _load_cached(f_top, f_ctx, n_contexts, context_length)
    tokens, mask = corpus_contexts(run.model.tokenizer, n_contexts, context_length, seed=seed)
    log(f"scanning {len(tokens)} contexts x {context_length} tokens of the offline corpus "
        f"for {run.sae.spec.d_sae} features at {run.hook} ...")

    from tqdm.auto import tqdm

    with tqdm(total=len(tokens), desc="scan corpus", unit="ctx", leave=False) as bar:
        def progress(done, total):
            bar.update(done - bar.n)

        top = top_activations(run.model, run.sae, run.hook, tokens, mask, top_n=top_n,
                              batch_size=batch_size, progress=progress)
    if cache:
        d.mkdir(parents=True, exist_ok=True)
        top.save(f_top)
        np.save(f_ctx, tokens)
    return top, tokens
