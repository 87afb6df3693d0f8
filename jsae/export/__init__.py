"""Formats other tools read and write: SAELens folders, Gemma Scope params, circuit-tracer and
Gemma Scope 2 transcoder sets and CLTs, run export."""

from jsae.export.circuit_tracer import load_circuit_tracer, save_circuit_tracer
from jsae.export.circuits import Circuit, gather
from jsae.export.gemmascope import load_gemmascope
from jsae.export.gemmascope2 import load_gemmascope2, save_gemmascope2
from jsae.export.run import FORMATS, export_run, run_hooks, sae_from_run, save_gemmascope
from jsae.export.saelens import load_saelens, sae_from_tensors, saelens_config, save_saelens

__all__ = [
    "Circuit", "gather", "load_circuit_tracer", "load_gemmascope2", "save_circuit_tracer",
    "save_gemmascope2",
    "FORMATS", "export_run", "load_gemmascope", "load_saelens", "run_hooks", "sae_from_run",
    "sae_from_tensors", "save_gemmascope", "save_saelens", "saelens_config",
]
