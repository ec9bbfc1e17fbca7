"""Resident memory of the calling process, for the benchmarks (Linux: ``/proc/self/status``).

``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is not a child's own peak on Linux: it keeps the parent's
peak at fork across exec, so every worker would report at least what the benchmark's parent had. VmHWM
belongs to the address space, which exec replaces: it starts afresh.
"""

from __future__ import annotations


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM)."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """This process's resident set size now, in MiB (VmRSS)."""
    return _status_mb("VmRSS")
