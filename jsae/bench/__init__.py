"""How good are the features? SAEBench's measures, computed natively (``jsae bench``).

A measure is a module of this package that defines

- ``EVAL_TYPE_ID``: its name in SAEBench's output (``"absorption_first_letter"``, ...);
- ``add_arguments(parser)``: its own command-line options, each named ``--<measure>-...``
  (cheap: no jax import at parser time);
- ``evaluate(run, args, *, log) -> Result``: the measure on one dictionary
  (``run``: a :class:`jsae.analysis.run.Run`, the LM and the SAE at one hook).

``jsae bench`` finds the measures here, as ``jsae`` finds its commands, so a new measure is
one new file. Results are written in SAEBench's eval-output layout (:func:`saebench_output`)
so they sit beside published ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import time
from types import ModuleType


@dataclasses.dataclass
class Result:
    """One measure on one dictionary, in SAEBench's parts.

    ``config``: the settings that reproduce it (SAEBench's ``eval_config``);
    ``metrics``: ``{group: {metric: number}}`` (``eval_result_metrics``);
    ``details``: per-item rows (``eval_result_details``, e.g. one per letter or per dataset);
    ``unstructured``: anything else worth keeping (``eval_result_unstructured``).
    """

    config: dict
    metrics: dict
    details: list = dataclasses.field(default_factory=list)
    unstructured: dict | None = None


def measures() -> dict[str, ModuleType]:
    """``{name: module}`` of every measure in this package, by file name."""
    import jsae.bench as pkg

    out = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"jsae.bench.{info.name}")
        if hasattr(mod, "EVAL_TYPE_ID") and hasattr(mod, "evaluate"):
            out[info.name] = mod
    return out


def choices(value: str, allowed, option: str) -> list[str]:
    """A comma-separated option's values (``"a, b"`` -> ``["a", "b"]``, repeats dropped), each
    one of ``allowed``; anything else is one line naming ``option`` (a ConfigError)."""
    from jsae.config import ConfigError

    got = [x.strip() for x in str(value).split(",") if x.strip()]
    bad = [x for x in got if x not in allowed]
    if not got or bad:
        raise ConfigError(f"{option}: unknown value(s) {', '.join(bad) or '(none given)'}; "
                          f"choose from {', '.join(allowed)}")
    return list(dict.fromkeys(got))


def sae_cfg_dict(run) -> dict:
    """What SAEBench records of the dictionary under ``sae_cfg_dict`` (SAELens' config names)."""
    spec = run.sae.spec
    return {"d_in": int(spec.d_in), "d_sae": int(spec.d_sae), "dtype": str(spec.dtype),
            "architecture": run.sae.spec.architecture, "model_name": run.model_name,
            "hook_name": run.hook, "hook_name_out": run.output_hook,
            "device": "cpu" if _platform() == "cpu" else _platform()}


def _platform() -> str:
    import jax

    return jax.default_backend()


def saebench_output(eval_type_id: str, result: Result, run) -> dict:
    """``result`` in the layout of SAEBench's eval output files (its ``BaseEvalOutput``):
    ``eval_type_id, eval_config, eval_id, datetime_epoch_millis, eval_result_metrics,
    eval_result_details, sae_bench_commit_hash, sae_lens_id, sae_lens_release_id,
    sae_lens_version, sae_cfg_dict, eval_result_unstructured``. The SAELens fields name jsae's
    run and hook instead (the dictionary is not a SAELens release)."""
    import jsae
    from jsae.jsonsafe import finite

    millis = int(time.time() * 1000)
    return finite({
        "eval_type_id": eval_type_id,
        "eval_config": result.config,
        "eval_id": f"{eval_type_id}-{run.path.name}-{run.hook}-{millis}",
        "datetime_epoch_millis": millis,
        "eval_result_metrics": result.metrics,
        "eval_result_details": result.details,
        "sae_bench_commit_hash": f"jsae-{getattr(jsae, '__version__', 'dev')}",
        "sae_lens_id": run.hook,
        "sae_lens_release_id": str(run.path),
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg_dict(run),
        "eval_result_unstructured": result.unstructured,
    })


__all__ = ["Result", "choices", "measures", "sae_cfg_dict", "saebench_output"]
