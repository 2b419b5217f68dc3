"""Wall-clock accounting of an audit's phases (results.json ``timing.phases``)."""

from __future__ import annotations

import os
import time
from pathlib import Path


class PhaseClock:
    """Wall seconds between successive :meth:`lap` calls, by phase name (repeated names add up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now


def process_age() -> float | None:
    """Seconds since this process started (interpreter start-up, imports, argument parsing), or
    None where ``/proc`` is not available. Resolution: one clock tick (10 ms on Linux)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), after pid and comm
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return None
