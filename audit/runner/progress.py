"""The forward passes' progress line."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress display on stderr (only on a TTY and unless quiet)."""

    def __init__(self, total: int, n_scenarios: int, enabled: bool) -> None:
        self.total, self.n_scenarios, self.done = total, n_scenarios, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        if self.enabled:
            rate = self.done * self.n_scenarios / max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"\r  {self.done}/{self.total} samples × {self.n_scenarios} scenarios  ({rate:,.0f} forward/s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
