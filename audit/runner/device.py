"""Where and how the forward passes run: the device, torch's CPU threads, autocast, normalisation."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..config import Config
from ..errors import ConfigError


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"audit.device is {spec!r} but CUDA is not available on this machine; use --device cpu or auto")
    return device


@contextlib.contextmanager
def torch_threads(threads: int | Literal["auto"] | None) -> Iterator[None]:
    """Run the block with ``threads`` CPU threads for torch's operators (None or ``"auto"``: leave
    them as they are, :func:`choose_threads` decides "auto" later inside the block), and restore
    the previous number afterwards: the setting is process-wide."""
    previous = torch.get_num_threads()
    if isinstance(threads, int):
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class ThreadChoice:
    """The CPU threads an audit runs with and why (results.json ``environment.threads_reason``)."""

    threads: int
    reason: str
    #: Whether the model's outputs are the same bits at any thread count (checked in the dry run, or
    #: off the CPU, where the threads do not run it): then a unit may run at another count.
    free: bool = False


#: Timing repetitions per thread count (the minimum is kept: a busy machine only adds time), and
#: the wall time after which no further repetition starts, so a large model pays one of each.
TIMING_REPEATS = 3
TIMING_BUDGET_S = 1.0


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _equal(a: object, b: object) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a is None and b is None


def _same_outputs(runs: Sequence[Callable[[], object]], counts: Sequence[int]) -> bool:
    """Whether every call in ``runs`` gives bit-identical outputs at every thread count.

    oneDNN picks a convolution's algorithm by shape *and* thread count: the bundled example's
    model gives the same bits at 1 and 2 threads for chunks of up to 48 samples and different
    ones from 64 on. Where they differ, a count chosen by timing would make the numbers depend
    on how busy the machine was.
    """
    for run in runs:
        outputs = []
        for n in counts:
            torch.set_num_threads(n)
            outputs.append(run())
        if not all(_equal(outputs[0], o) for o in outputs[1:]):
            return False
    return True


def _per_batch(count: int, seconds: float) -> str:
    return f"{count} thread{'s' if count != 1 else ''} {seconds * 1000:.0f} ms/batch"


def choose_threads(setting: int | Literal["auto"] | None, device: torch.device,
                   runs: Sequence[Callable[[], object]]) -> ThreadChoice:
    """The CPU threads for the rest of the audit (``audit.threads``) and the reason; leaves
    torch's setting as it found it.

    An integer is the user's; None keeps torch's default (one per physical core). ``"auto"``
    times ``runs[0]`` (one model chunk of the dry run) at 1 thread, at torch's default and at
    every CPU the process may use, in turn, :data:`TIMING_REPEATS` times (the minimum of each:
    a busy machine only adds time), and keeps the fastest: where another process holds a core,
    every parallel operator waits for its descheduled thread (one busy process on 2 cores made
    a 2-thread audit 6-21x slower) while one thread runs unhindered. The counts are compared
    only where every call in ``runs`` (the full chunk and the short last one) gives the same
    bits at all of them (:func:`_same_outputs`, which also warms each count up), so results
    never depend on the choice; otherwise torch's default stays, and the reason says so. On an
    accelerator the threads do not run the model: torch's default.
    """
    default = torch.get_num_threads()
    if isinstance(setting, int):
        return ThreadChoice(setting, "audit.threads")
    if setting is None:
        return ThreadChoice(default, "torch's default, one per physical core")
    if device.type != "cpu":
        return ThreadChoice(default, f"auto: the model runs on {device.type}; torch's default", free=True)
    counts = sorted({1, default, available_cpus()})
    if counts == [1]:
        return ThreadChoice(1, "auto: one CPU")
    try:
        if not _same_outputs(runs, counts):
            return ThreadChoice(default, f"auto: the model's outputs differ between {' and '.join(map(str, counts))} "
                                         "threads, so the count is not chosen by timing (torch's default); on a busy "
                                         "machine set --threads 1")
        best = {n: float("inf") for n in counts}
        started = time.perf_counter()
        for _ in range(TIMING_REPEATS):
            for n in counts:
                torch.set_num_threads(n)
                t = time.perf_counter()
                runs[0]()
                best[n] = min(best[n], time.perf_counter() - t)
            if time.perf_counter() - started > TIMING_BUDGET_S:
                break
    finally:
        torch.set_num_threads(default)
    chosen = min(counts, key=lambda n: (best[n], -n))  # on a tie, more threads: the statistics scale too
    timings = " vs ".join(_per_batch(n, best[n]) for n in [chosen, *(n for n in counts if n != chosen)])
    return ThreadChoice(chosen, (f"{max(counts)} CPUs busy: " if chosen == 1 else "") + timings, free=True)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``audit.precision`` (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def normalisation(config: Config, device: torch.device) -> tuple[Tensor, Tensor]:
    """``input.mean`` and ``input.std`` as ``[1, C, 1, ...]`` tensors on ``device``."""
    channels = config.input.channels
    shape = (1, channels) + (1,) * config.input.dims
    mean = torch.tensor(config.input.mean, dtype=torch.float32).expand(channels).reshape(shape).to(device)
    std = torch.tensor(config.input.std, dtype=torch.float32).expand(channels).reshape(shape).to(device)
    return mean, std


def input_model(module: Callable[[Tensor], Any], config: Config, device: torch.device) -> Callable[[Tensor], Tensor]:
    """The model as a detector that :attr:`~medaudit.detector.Detector.needs_model` calls it:
    images in ``[0, 1]`` ``[B, C, *spatial]`` in, the audit's normalisation applied, the outputs
    (the first tensor of a tuple) out."""
    mean, std = normalisation(config, device)

    def call(x: Tensor) -> Tensor:
        out = module((x - mean.to(x.dtype)) / std.to(x.dtype))
        return out if isinstance(out, Tensor) else next(t for t in out if isinstance(t, Tensor))

    return call
