"""What the memory benchmarks share: this process's resident set size."""

from __future__ import annotations


def rss_mib() -> float:
    """Current resident set size of this process in MiB (VmRSS; NaN where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
