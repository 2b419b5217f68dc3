"""The C heap's free pages go back to the system when an audit phase ends (glibc only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medaudit.memory import release_free_memory

SCRIPT = r"""
import torch
from medaudit.memory import release_free_memory, tune_allocator

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

assert tune_allocator()
before = rss_mib()
blocks = [torch.ones(1 << 18) for _ in range(300)]  # 300 x 1 MiB from the heap, pages touched
pinned = torch.ones(16)  # a live tensor above them keeps the heap from shrinking by itself
del blocks
held = rss_mib()
assert release_free_memory()
after = rss_mib()
print(before, held, after)
"""


@pytest.mark.skipif(not release_free_memory(), reason="needs glibc's malloc_trim")
def test_freed_heap_pages_are_kept_within_a_phase_and_returned_after_it() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    before, held, after = map(float, out.split())
    assert held - before > 250  # the tuned thresholds keep freed blocks for reuse ...
    assert held - after > 250  # ... until release_free_memory returns them
