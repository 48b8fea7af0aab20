"""Shared by the benchmarks' Python helpers (only the standard library).

The helpers are copied beside this file into a run's work dir and import it
from there (their own folder is first on sys.path when they run as scripts).
"""

import os
import platform


def machine():
    """This machine for a report's `- Machine:` line: CPUs, CPU model, kernel, RAM."""
    with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        mem = next(int(l.split()[1]) for l in f if l.startswith("MemTotal"))
    return (
        f"{os.cpu_count()} CPUs · {cpu} · kernel {platform.system()} {platform.release()} "
        f"{platform.machine()} · {mem / 1048576:.1f} GiB RAM"
    )
