"""Linux /proc readings shared by the benchmarks (peak and current memory of a process)."""

from __future__ import annotations


def status_kb(field: str, pid: int | str = "self") -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...); None where unreadable (not Linux, process gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
