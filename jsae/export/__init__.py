"""Formats other tools read and write: SAELens folders, Gemma Scope params, run export."""

from jsae.export.gemmascope import load_gemmascope
from jsae.export.run import FORMATS, export_run, run_hooks, sae_from_run, save_gemmascope
from jsae.export.saelens import load_saelens, sae_from_tensors, saelens_config, save_saelens

__all__ = [
    "FORMATS", "export_run", "load_gemmascope", "load_saelens", "run_hooks", "sae_from_run",
    "sae_from_tensors", "save_gemmascope", "save_saelens", "saelens_config",
]
