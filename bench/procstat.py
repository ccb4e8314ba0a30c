"""Memory figures of this process for the scale benches, from /proc/self/status (Linux), in MiB."""

from __future__ import annotations

from pathlib import Path


def status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile, ...) in MiB; NaN where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mb() -> float:
    """The peak resident memory of this process (VmHWM), mapped files' touched pages included."""
    return status_mb("VmHWM")
