r"""Permutation tests of group gaps and their multiplicity correction.

Group labels of the eligible samples are permuted (:class:`Permutations`, the same draws for
every scenario of an attribute, so drops are tested paired); the p-value counts how often a
permuted gap is at least the observed one (:func:`permutation_p`), and Holm's step-down
correction (:func:`holm`) adjusts the p-values of every gap of one family (the whole audit, or one
scenario: ``holm_family``). :func:`auto_permutations` is how many permutations ``permutations:
auto`` draws: the fewest with which a gap can still be significant after that correction.

:func:`holm` lives in the core (:func:`medaudit.paired.holm`, which the paired model comparison
shares) and is re-exported here, so ``from .permutations import holm`` keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import torch
from torch import Tensor

from medaudit.paired import holm
from medaudit.rng import stream_generator

__all__ = ["AUTO_MAX", "AUTO_MIN", "Permutations", "auto_permutations", "holm", "permutation_p",
           "permutations_needed", "range_rows"]

#: ``permutations: auto`` never draws fewer (the p-value's resolution when the family is small) ...
AUTO_MIN = 1000
#: ... nor more (the analysis' time grows about in proportion; past it the plugin warns).
AUTO_MAX = 20000

_NAN = float("nan")


def permutation_p(observed: float | None, null: Tensor | None) -> float | None:
    r"""One-sided permutation p-value :math:`(1 + \#\{T^*_b \ge T\}) / (1 + B)`.

    The +1 counts the observed labelling as one of the permutations, so p is never 0 and the
    test is exact (Phipson & Smyth 2010). Permutations where the statistic is undefined (NaN) are
    dropped. A relative tolerance of 1e-9 keeps floating-point noise from breaking ties
    (a permutation that reproduces the observed gap counts as "at least as large").
    """
    if observed is None or null is None or not math.isfinite(observed):
        return None
    null = null[~torch.isnan(null)]
    if null.numel() == 0:
        return None
    tol = 1e-9 * max(1.0, abs(observed))
    return (1 + int((null >= observed - tol).sum())) / (1 + null.numel())


def permutations_needed(m: int, alpha: float) -> int:
    r"""The fewest permutations :math:`B` with which one of :math:`m` tests can be significant
    after Holm's correction at level :math:`\alpha`: :math:`B = \lfloor m / \alpha \rfloor`.

    A p-value is at least :math:`1/(B + 1)` (:func:`permutation_p`), and Holm multiplies the
    smallest of the family by :math:`m`, so every adjusted p-value is at least :math:`m/(B + 1)`;
    ``significant`` is ``p_adjusted < alpha``, which some gap can reach only when
    :math:`m/(B + 1) < \alpha`, i.e. :math:`B + 1 > m/\alpha`: the smallest such integer is
    :math:`\lfloor m/\alpha \rfloor` (e.g. 326 tests at 0.05: 6520, where 6519 leaves exactly 0.05).
    ``alpha`` is read as the decimal it was rounded to (0.05 is 1/20), and the float comparisons
    of the plugin's warning and of Holm's product are checked too. 0 for an empty family.
    """
    if m <= 0:
        return 0
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    b = math.floor(Fraction(m) / Fraction(alpha).limit_denominator(10**12))
    # in floats as the warning tests it (m / (B + 1)) and as Holm computes it (m * p)
    while m / (b + 1) >= alpha or m * (1 / (b + 1)) >= alpha:
        b += 1
    return b


def auto_permutations(m: int, alpha: float) -> int:
    """``permutations: auto`` for a family of (at most) ``m`` tests: :func:`permutations_needed`,
    at least :data:`AUTO_MIN` and at most :data:`AUTO_MAX`."""
    return min(AUTO_MAX, max(AUTO_MIN, permutations_needed(m, alpha)))


def range_rows(values: Tensor, include: Tensor) -> Tensor:
    """Per row, max - min over the included groups; NaN on rows where any of them is undefined."""
    v = values[:, include]
    out = v.amax(dim=1) - v.amin(dim=1)
    return torch.where(torch.isnan(v).any(dim=1), torch.full_like(out, _NAN), out)


class Permutations:
    """Permutations of the group codes of the eligible samples, ``[P, M]``, in chunks, drawn from
    the audit seed's stream ``("subgroup-permutations", attribute)`` (:mod:`medaudit.rng`).

    The same permutations are used for every scenario of an attribute (a paired test of
    clean vs perturbed drops). Draws of up to :data:`CACHE_BYTES` (held in the smallest integer
    type of the codes) are drawn once and cached; larger ones are regenerated from the seed chunk
    by chunk so memory stays bounded. Either way the chunks, and so the draws, are the same.
    """

    #: Largest cached draw: 6520 permutations of 600 samples take 3.9 MB as int8.
    CACHE_BYTES = 64 << 20

    def __init__(self, codes: Tensor, n_perm: int, seed: int, attribute: str) -> None:
        self.codes, self.n_perm, self.seed, self.attribute = codes, n_perm, seed, attribute
        # 1M codes per chunk: the generic path expands a chunk to G indicator rows of float64
        self.chunk = max(1, (1 << 20) // max(1, codes.numel()))
        self._cache: list[Tensor] | None = None
        top = int(codes.max()) if codes.numel() else 0
        small = next((t for t in (torch.int8, torch.int16, torch.int32) if top <= torch.iinfo(t).max), torch.int64)
        if n_perm * codes.numel() * small.itemsize <= self.CACHE_BYTES:
            # drawn once for every scenario (regenerating 6520 permutations per scenario took a
            # third of the analysis), kept small and widened back to the codes' type when read
            self._cache = [c.to(small) for c in self._draw()]

    def _draw(self) -> Iterator[Tensor]:
        gen = stream_generator(self.seed, "subgroup-permutations", self.attribute)
        m = self.codes.numel()
        for start in range(0, self.n_perm, self.chunk):
            rows = min(self.chunk, self.n_perm - start)
            order = torch.argsort(torch.rand(rows, m, generator=gen), dim=1)
            yield self.codes[order]

    def __iter__(self) -> Iterator[Tensor]:
        if self._cache is None:
            return self._draw()
        return (c.to(self.codes.dtype) for c in self._cache)
