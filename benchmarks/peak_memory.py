"""Peak resident memory of the calling process, for the benchmarks' child processes.

``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is not the child's own peak on Linux: it keeps the parent's
peak at fork across exec, so every worker would report at least what the benchmark's parent had. VmHWM
(``/proc/self/status``) belongs to the address space, which exec replaces: it starts afresh.
"""

from __future__ import annotations


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")
