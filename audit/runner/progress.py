"""The forward passes' progress line."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress display on stderr (only on a TTY and unless quiet)."""

    def __init__(self, total: int, n_scenarios: int, enabled: bool) -> None:
        self.total, self.n_scenarios, self.done, self.passes = total, n_scenarios, 0, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def advance(self, n: int, scenarios: int | None = None) -> None:
        """``n`` more samples done in ``scenarios`` of the scenarios (None: all of them)."""
        self.passes += n * (self.n_scenarios if scenarios is None else scenarios)
        self.done = self.passes // max(self.n_scenarios, 1)  # samples through every scenario, so far
        if self.enabled:
            rate = self.done * self.n_scenarios / max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"\r  {self.done}/{self.total} samples × {self.n_scenarios} scenarios  ({rate:,.0f} forward/s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
