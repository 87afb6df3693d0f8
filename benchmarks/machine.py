"""The CPU's name for the benchmarks' hardware lines (standard library only)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """/proc/cpuinfo's model name, else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"
