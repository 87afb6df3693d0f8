"""`jsae train CONFIG [--set section.key=value ...]`: train SAEs as the config says."""

from __future__ import annotations

import argparse

from jsae.errors import BadInput


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train sparse autoencoders from a YAML config")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--run-dir", help="run directory (overrides run_dir in the config)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: move the run directory's contents aside to RUN.old-<time>/ "
                        "(never deleted) and train from scratch")
    p.add_argument("--no-checkpoint", action="store_true", help="do not save checkpoints")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host run (TPU pod slice, several GPU nodes): call "
                        "jax.distributed.initialize() first; run the same command on every host")
    return p


def run(args) -> int:
    if args.distributed:
        _init_distributed()
    from jsae import config as config_lib

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = config_lib.load(args.config, overrides)
    if args.no_checkpoint:
        cfg.checkpoint.enabled = False

    from jsae.runner import EXIT_STOPPED, run_training

    out = run_training(cfg, fresh=args.fresh)
    # 0: finished (or already finished); 75: stopped by SIGTERM, resumable. `jsae train ... &&
    # jsae export ...` then never exports an unfinished run.
    return EXIT_STOPPED if "stopped_at" in out else 0


def _init_distributed() -> None:
    """`jax.distributed.initialize`: auto-detected on TPU pods and SLURM/MPI clusters;
    elsewhere from JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID.  CPU-only processes exchange data with gloo."""
    import os

    import jax

    kw = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        if not os.environ.get("JAX_COORDINATOR_ADDRESS") or not os.environ.get("JAX_PROCESS_ID"):
            raise BadInput("JAX_NUM_PROCESSES is set: also set JAX_COORDINATOR_ADDRESS "
                             "(host:port of process 0) and JAX_PROCESS_ID (0..N-1)")
        kw = {"num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
              "process_id": int(os.environ["JAX_PROCESS_ID"])}
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)
