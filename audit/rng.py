"""Every random number of an audit: one derivation from the seed and named keys.

**Streams.** Each random stream of an audit has a key, ``stream_key(audit.seed, name, *parts)``
(:func:`stream_key`), and nothing else in an audit seeds a generator. The streams:

* ``(seed, perturbation, severity)``: a perturbation's parameters and noise, per sample (below:
  :func:`sample_keys`, :class:`SampleRNG`);
* ``(seed, "bootstrap")``: the audit's bootstrap weight matrix, shared by every scenario
  (``medaudit.bootstrap.bootstrap_weights``);
* ``(seed, "ood-data", name)``: the bootstrap weights of the external OOD set ``name``
  (``--ood-data``);
* ``(seed, "cross-fit")``: the split of the clean samples into the detectors' halves A and B
  (``medaudit.shift.cross_fit_halves``);
* ``(seed, "temperature-folds")``: the folds of temperature scaling's cross-fitting
  (``medaudit.temperature.temperature_report``);
* ``(seed, "subgroup-permutations", attribute)``: the permutation test's relabellings of one
  attribute's groups (the subgroups plugin).

The named streams (:data:`STREAMS`) draw whole arrays at once from a CPU ``torch.Generator``
seeded with their key (:func:`stream_generator`): on the CPU so that the draws are the same
whatever device the audit runs on. The perturbation streams draw per sample on the device
(below). An analysis plugin that needs randomness of its own takes a name of its own (prefixed
with its suite) and uses :func:`stream_generator` the same way.

Why named keys: two generators seeded with the same number give the same numbers, so streams
seeded alike are not independent. Before every stream was derived here, the bootstrap, the
cross-fitting split and the temperature folds were all seeded with the raw ``audit.seed``, which
made the split and the folds one permutation, tied to the first bootstrap resample (see
docs/randomness.md). A distinct name hashed into each key makes the streams independent, and
adding a stream never moves the numbers of another.

**Per-sample streams.** Why not ``torch.Generator`` for perturbations: a generator per sample
means a Python loop per sample, and the numbers a CPU generator and a CUDA generator give for
the same seed differ. Here every random number is a pure integer hash of ``(sample key,
counter)`` computed with tensor ops, so

* one batched call draws for every sample at once (no per-sample loop, no host round trip);
* a sample gets the same numbers whatever batch it is in and whatever device it is on;
* the numbers depend only on ``(seed, stream name, sample index)``.

The generator, exactly (all integer arithmetic modulo 2**32 or 2**64 as stated; ``>>`` is a
logical shift):

* **Keys.** ``stream_key(*parts)`` is the first 4 bytes (little-endian) of BLAKE2b of
  ``repr(parts)``. A sample's key is ``k = m32(m32(index + 0x9E3779B9) ^ stream_key)`` and a
  child stream's key is ``m32(k ^ stream_key(name))``, where ``m32`` is Chris Wellons'
  ``lowbias32`` finaliser (public domain)::

      x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (mod 2**32)

* **Counter.** Each :class:`SampleRNG` holds a counter ``c`` (starting at 0) shared by all its
  samples; a draw uses the counters ``c, c + 1, ...`` and advances ``c`` past them, so the k-th
  draw of a sample never depends on the other samples of its batch.
* **bits / uniform / integers / choice.** Counter ``i`` gives the 32-bit word
  ``w = m32(m32(k ^ m32(2 i + 1)) + 0x9E3779B9)``. ``uniform`` is ``((w >> 8) + 0.5) / 2**24``
  (24 bits, open interval (0, 1)) scaled to ``(low, high)``; ``integers(low, high)`` is
  ``low + w % (high - low)`` (modulo bias below ``(high - low) / 2**32``).
* **normal.** SplitMix64 (Steele, Lea & Flood, OOPSLA 2014) seeded per sample: with
  ``s = m64(k)``, counter ``i`` gives the 64-bit word ``h = m64(s + (i + 1) * 0x9E3779B97F4A7C15)``
  where ``m64`` is SplitMix64's finaliser::

      x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27; x *= 0x94D049BB133111EB; x ^= x >> 31   (mod 2**64)

  Its top and bottom 24 bits give ``u1 = ((h >> 40) + 0.5) / 2**24`` and
  ``u2 = ((h & 0xFFFFFF) + 0.5) / 2**24``, and Box-Muller gives *two* independent normals
  ``r cos(2 pi u2)`` and ``r sin(2 pi u2)``, ``r = sqrt(-2 ln u1)``. A draw of ``n`` normals
  uses ``m = ceil(n / 2)`` counters: flat value ``j < m`` is the cosine of counter ``c + j`` and
  value ``m + j`` its sine. One 64-bit hash per two normals (instead of four 32-bit hash rounds
  per normal) is what makes dense noise fields cheap. ``|z|`` is bounded by
  ``sqrt(2 ln 2**25) = 5.89`` (24-bit ``u1``; a tail probability of 4e-9 is lost).

Integer arithmetic runs on int64 tensors. The 32-bit hash keeps values below 2**32 and masks
after each multiplication (the product of a 32-bit value and a 31/32-bit constant fits in 63
bits, so nothing overflows); the 64-bit hash relies on int64 multiplication wrapping modulo
2**64 (two's complement, as on every CPU and CUDA device; checked against a pure-Python reference
in the tests) and masks after each arithmetic right shift to make it logical. Everything up to
the float conversion is integer arithmetic, so CPU and CUDA give the same integers; the float
steps (log, sqrt, cos, sin) may differ between devices in the last bit.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

# Bumped whenever the numbers drawn for a key change, so cached results (--resume) are not mixed
# across generator versions. 2: normal() became SplitMix64 + two-branch Box-Muller.
RNG_VERSION = 2

#: The named streams drawn through :func:`stream_generator` (name -> what it draws); their keys
#: and the perturbation streams are described in the module docstring.
STREAMS: dict[str, str] = {
    "bootstrap": "the audit's bootstrap weight matrix, shared by every scenario",
    "ood-data": "the bootstrap weights of one external OOD set (part: the set's name)",
    "cross-fit": "the split of the clean samples into the detectors' cross-fitting halves",
    "temperature-folds": "the folds of temperature scaling's cross-fitting on the clean samples",
    "subgroup-permutations": "the permutation test's relabellings of one attribute (part: its name)",
}

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _signed64(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA64 = _signed64(0x9E3779B97F4A7C15)  # SplitMix64's Weyl increment (odd, 2**64 / golden ratio)
_MUL64_1 = _signed64(0xBF58476D1CE4E5B9)
_MUL64_2 = _signed64(0x94D049BB133111EB)
_TWO_PI = 2.0 * math.pi
_INV_2_24 = 1.0 / (1 << 24)
# Counters per sample in one pass of normal() are a multiple of this, so every float tensor it
# runs log/cos/sin on has rows (and a total length) that are multiples of 64 elements: CPU
# kernels then evaluate every element in their vectorised body, never in a scalar tail whose
# libm result may differ in the last bit, and a sample's normals stay bit-identical whatever the
# batch size (which moves where the tail would fall).
_ALIGN = 64
# Elements per pass of normal(): about 1 MiB of int64, so the ~25 elementwise passes of one chunk
# run in the L2 cache instead of streaming the whole field from memory once per op.
_CHUNK_ELEMENTS = 1 << 17


def _mix32(x: Tensor) -> Tensor:
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def _mix64_(x: Tensor) -> Tensor:
    """SplitMix64's finaliser, in place on an int64 tensor (wrapping multiplication).

    ``>>`` on int64 is arithmetic, so each shift is masked to the ``64 - s`` bits a logical shift
    keeps; the masks make the result the unsigned finaliser's bits exactly.
    """
    x ^= (x >> 30) & ((1 << 34) - 1)
    x *= _MUL64_1
    x ^= (x >> 27) & ((1 << 37) - 1)
    x *= _MUL64_2
    x ^= (x >> 31) & ((1 << 33) - 1)
    return x


def stream_key(*parts: object) -> int:
    """A 32-bit key for a named stream, e.g. ``stream_key(seed, "mri.motion", 3)`` or
    ``stream_key(seed, "bootstrap")``: the one derivation of every stream (module docstring).

    Uses BLAKE2b of the parts' ``repr`` so that keys are stable across Python processes
    (``hash()`` of a string is salted per process).
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def stream_generator(seed: int, stream: str, *parts: object) -> torch.Generator:
    """The CPU ``torch.Generator`` of the named stream ``stream`` of an audit with seed ``seed``.

    It is seeded with ``stream_key(seed, stream, *parts)``; ``parts`` tell apart the instances
    of one stream (the attribute of ``"subgroup-permutations"``, the set of ``"ood-data"``).
    The generator is on the CPU whatever the audit's device, so a stream's numbers do not
    depend on the device; draw on the CPU and move the result.
    """
    return torch.Generator(device="cpu").manual_seed(stream_key(int(seed), stream, *parts))


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
        """Standard normal float32 ``[B, *shape]``: SplitMix64 + Box-Muller, two normals per
        64-bit hash (see the module docstring for the exact construction)."""
        n = math.prod(shape)
        b = self.batch_size
        m = (n + 1) // 2  # counters used: one per (cosine, sine) pair
        m_pad = -(-m // _ALIGN) * _ALIGN
        base = self._offset
        self._offset += m
        out = torch.empty(b, n, dtype=torch.float32, device=self.device)
        if n == 0:
            return out.reshape(b, *shape)
        seeds = _mix64_(self.keys.clone())[:, None]  # [B, 1]
        # On CUDA one pass is fastest; on CPU the chunks keep the working set in cache. Chunking
        # cannot change a value: every op is elementwise and chunk lengths are multiples of _ALIGN.
        if self.device.type == "cpu":
            chunk = max(_ALIGN, _CHUNK_ELEMENTS // max(b, 1) // _ALIGN * _ALIGN)
        else:
            chunk = m_pad
        bufs: _Buffers | None = None
        for j0 in range(0, m_pad, chunk):
            j1 = min(j0 + chunk, m_pad)
            if bufs is None or bufs.width != j1 - j0:  # the first chunk, and a shorter last one
                bufs = _Buffers(b, j1 - j0, self.device)
            r, c, s = bufs.pairs(seeds, base + j0)
            cos_end = min(j1, m)
            if cos_end > j0:
                torch.mul(r[:, : cos_end - j0], c[:, : cos_end - j0], out=out[:, j0:cos_end])
            sin_end = min(j1, n - m)
            if sin_end > j0:
                torch.mul(r[:, : sin_end - j0], s[:, : sin_end - j0], out=out[:, m + j0 : m + sin_end])
        return out.reshape(b, *shape)

    def integers(self, low: int, high: int, *shape: int) -> Tensor:
        """Integers uniform in ``[low, high)`` (int64 ``[B, *shape]``)."""
        if high <= low:
            raise ValueError(f"high ({high}) must be greater than low ({low})")
        return low + self.bits(*shape) % (high - low)

    def choice(self, options: Tensor, *shape: int) -> Tensor:
        """Draw uniformly from a 1-D tensor of options (``[B, *shape]``)."""
        return options.to(self.device)[self.integers(0, options.numel(), *shape)]


class _Buffers:
    """Scratch tensors for one chunk of :meth:`SampleRNG.normal`, reused from chunk to chunk.

    Every op writes into these with ``out=`` or in place: allocating a fresh tensor per op costs
    more than the op itself at this size. All are contiguous ``[B, width]`` (``width`` a multiple
    of ``_ALIGN``), so the float ops see whole aligned rows (see ``_ALIGN``).
    """

    def __init__(self, batch: int, width: int, device: torch.device) -> None:
        self.width = width
        self.weyl = torch.empty(width, dtype=torch.int64, device=device)
        self.h = torch.empty(batch, width, dtype=torch.int64, device=device)
        self.t = torch.empty_like(self.h)
        self.r = torch.empty(batch, width, dtype=torch.float32, device=device)
        self.c = torch.empty_like(self.r)
        self.s = torch.empty_like(self.r)

    def pairs(self, seeds: Tensor, first: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(r, cos, sin)`` for counters ``first .. first + width - 1`` (Box-Muller radius and
        the cosine and sine of the angle; the normals are ``r * cos`` and ``r * sin``)."""
        h, t = self.h, self.t
        torch.arange(first + 1, first + self.width + 1, out=self.weyl)
        torch.add(seeds, self.weyl.mul_(_GAMMA64), out=h)  # s + (i + 1) * gamma, [B, 1] + [W]
        for shift, mul in ((30, _MUL64_1), (27, _MUL64_2), (31, None)):
            torch.bitwise_right_shift(h, shift, out=t)
            h ^= t.bitwise_and_((1 << (64 - shift)) - 1)
            if mul is not None:
                h *= mul
        torch.bitwise_right_shift(h, 40, out=t)
        r = self.r.copy_(t.bitwise_and_(0xFFFFFF))  # u1 = (top 24 bits + 1/2) / 2**24
        r.add_(0.5).mul_(_INV_2_24).log_().mul_(-2.0).sqrt_()
        theta = self.s.copy_(h.bitwise_and_(0xFFFFFF))  # u2 = (low 24 bits + 1/2) / 2**24
        theta.add_(0.5).mul_(_TWO_PI * _INV_2_24)
        torch.cos(theta, out=self.c)
        return r, self.c, theta.sin_()


def _per_sample(v: float | Tensor, like: Tensor) -> Tensor | float:
    if isinstance(v, Tensor):
        return v.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    # A Python number stays one: a device tensor made from it is a blocking host-to-device copy,
    # which waits for all the work queued on the GPU.
    return float(v)
