"""Counter-based random numbers keyed per sample.

Why not ``torch.Generator``: a generator per sample means a Python loop per sample, and the
numbers a CPU generator and a CUDA generator give for the same seed differ. Here every random
number is a pure integer hash of ``(sample key, counter)`` computed with tensor ops, so

* one batched call draws for every sample at once (no per-sample loop, no host round trip);
* a sample gets the same numbers whatever batch it is in and whatever device it is on;
* the numbers depend only on ``(seed, stream name, sample index)``.

The hash is Chris Wellons' ``lowbias32`` integer finaliser (public domain), evaluated on int64
tensors that hold unsigned 32-bit values: int64 multiplication wraps modulo 2**64, which keeps the
low 32 bits exact, and the mask restores them.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(x: Tensor) -> Tensor:
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def stream_key(*parts: object) -> int:
    """A 32-bit key for a named stream, e.g. ``stream_key(seed, "mri.motion", 3)``.

    Uses BLAKE2b of the parts' ``repr`` so that keys are stable across Python processes
    (``hash()`` of a string is salted per process).
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def sample_keys(base: int, sample_indices: Tensor) -> Tensor:
    """Per-sample keys ``[B]`` (int64) from a stream key and the samples' dataset indices."""
    idx = sample_indices.to(torch.int64)
    return _mix32(_mix32(idx + _GOLDEN) ^ (base & _MASK))


class SampleRNG:
    """Independent random streams for a batch of samples, one stream per sample.

    ``keys`` is an int64 tensor ``[B]`` (see :func:`sample_keys`); its device is the device of
    every tensor drawn. Successive draws advance a counter shared by all samples, so the k-th
    draw of a sample does not depend on which other samples share its batch.
    """

    def __init__(self, keys: Tensor) -> None:
        if keys.dtype != torch.int64 or keys.ndim != 1:
            raise ValueError(f"keys must be an int64 tensor of shape [B], got {keys.dtype} {tuple(keys.shape)}")
        self.keys = keys
        self._offset = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def child(self, name: str) -> "SampleRNG":
        """A new, independent stream per sample, derived from these keys and ``name``."""
        return SampleRNG(_mix32(self.keys ^ stream_key(name)))

    def bits(self, *shape: int) -> Tensor:
        """Uniform 32-bit integers (int64 tensor ``[B, *shape]``)."""
        n = math.prod(shape)
        counter = torch.arange(self._offset, self._offset + n, device=self.device, dtype=torch.int64)
        self._offset += n
        h = _mix32(self.keys[:, None] ^ _mix32(counter * 2 + 1)[None, :])
        h = _mix32(h + _GOLDEN)
        return h.reshape(self.batch_size, *shape)

    def uniform(self, *shape: int, low: float | Tensor = 0.0, high: float | Tensor = 1.0) -> Tensor:
        """Float32 uniform on the open interval ``(low, high)``, shape ``[B, *shape]``.

        ``low``/``high`` may be per-sample tensors ``[B]``; they broadcast over ``shape``.
        """
        u = ((self.bits(*shape) >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
        low_t = _per_sample(low, u)
        high_t = _per_sample(high, u)
        return low_t + (high_t - low_t) * u

    def normal(self, *shape: int) -> Tensor:
        """Standard normal float32 ``[B, *shape]`` (Box-Muller on two uniforms)."""
        u1 = self.uniform(*shape)
        u2 = self.uniform(*shape)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)

    def integers(self, low: int, high: int, *shape: int) -> Tensor:
        """Integers uniform in ``[low, high)`` (int64 ``[B, *shape]``)."""
        if high <= low:
            raise ValueError(f"high ({high}) must be greater than low ({low})")
        return low + self.bits(*shape) % (high - low)

    def choice(self, options: Tensor, *shape: int) -> Tensor:
        """Draw uniformly from a 1-D tensor of options (``[B, *shape]``)."""
        return options.to(self.device)[self.integers(0, options.numel(), *shape)]


def _per_sample(v: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)
