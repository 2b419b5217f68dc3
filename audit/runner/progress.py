"""The forward passes' progress: a bar on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time

#: Seconds between two progress lines when stderr is not a terminal (a CI log, a file, a pipe):
#: often enough that a long audit never looks stuck, rarely enough that a log stays readable.
LINE_INTERVAL_S = 10.0


class Progress:
    """Progress of the forward passes on stderr, unless quiet.

    On a terminal, a bar redrawn in place; otherwise (``\\r`` would pile up in a log) one line
    every :data:`LINE_INTERVAL_S` seconds, ``[medaudit] 45% 41/91 scenarios · 1,234 samples/s ·
    eta 20 s``, and a last one at the end when any was printed.
    """

    def __init__(self, total: int, n_scenarios: int, enabled: bool) -> None:
        self.total, self.n_scenarios, self.done, self.passes = total, n_scenarios, 0, 0
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.t0 = self.last_line = time.perf_counter()
        self.lines = 0
        self.printed = -1  # passes at the last line printed

    def advance(self, n: int, scenarios: int | None = None) -> None:
        """``n`` more samples done in ``scenarios`` of the scenarios (None: all of them)."""
        self.passes += n * (self.n_scenarios if scenarios is None else scenarios)
        self.done = self.passes // max(self.n_scenarios, 1)  # samples through every scenario, so far
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = self.passes / max(now - self.t0, 1e-9)
        if self.tty:
            sys.stderr.write(f"\r  {self.done}/{self.total} samples × {self.n_scenarios} scenarios  ({rate:,.0f} forward/s)")
            sys.stderr.flush()
        elif now - self.last_line >= LINE_INTERVAL_S:
            self._line(rate)
            self.last_line = now

    def _line(self, rate: float) -> None:
        planned = max(self.total * self.n_scenarios, 1)
        left = max(planned - self.passes, 0)
        eta = f" · eta {left / rate:,.0f} s" if rate > 0 and left else ""
        sys.stderr.write(f"[medaudit] {100 * self.passes // planned}% {self.passes // max(self.total, 1)}/"
                         f"{self.n_scenarios} scenarios · {rate:,.0f} samples/s{eta}\n")
        sys.stderr.flush()
        self.lines += 1
        self.printed = self.passes

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\n")
        elif self.lines and self.printed != self.passes:  # a log that showed progress shows its end, once
            self._line(self.passes / max(time.perf_counter() - self.t0, 1e-9))
        self.enabled = False  # closed once: a second close (error paths close too) prints nothing
