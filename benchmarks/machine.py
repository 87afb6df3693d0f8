"""The benchmarks' hardware lines: the CPU's name, the load average, a run's header (standard
library only)."""

from __future__ import annotations

import datetime
import os
import platform
import sys


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


def load_avg() -> str:
    """The 1/5/15-minute load averages ("?" where the OS has none)."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def print_header(hardware: str) -> None:
    """Date, command, hardware and load average before, the first lines of a benchmark's output."""
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"command: python {' '.join(sys.argv)}")
    print(hardware)
    print(f"load average before: {load_avg()}", flush=True)
