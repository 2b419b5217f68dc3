r"""Permutation tests of group gaps and their multiplicity correction.

Group labels of the eligible samples are permuted (:class:`Permutations`, the same draws for
every scenario of an attribute, so drops are tested paired); the p-value counts how often a
permuted gap is at least the observed one (:func:`permutation_p`), and Holm's step-down
correction (:func:`holm`) adjusts the p-values of every gap tested in one scenario.

:func:`holm` lives in the core (:func:`medaudit.paired.holm`, which the paired model comparison
shares) and is re-exported here, so ``from .permutations import holm`` keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from medaudit.paired import holm
from medaudit.rng import stream_generator

__all__ = ["Permutations", "holm", "permutation_p", "range_rows"]

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


def range_rows(values: Tensor, include: Tensor) -> Tensor:
    """Per row, max - min over the included groups; NaN on rows where any of them is undefined."""
    v = values[:, include]
    out = v.amax(dim=1) - v.amin(dim=1)
    return torch.where(torch.isnan(v).any(dim=1), torch.full_like(out, _NAN), out)


class Permutations:
    """Permutations of the group codes of the eligible samples, ``[P, M]``, in chunks, drawn from
    the audit seed's stream ``("subgroup-permutations", attribute)`` (:mod:`medaudit.rng`).

    The same permutations are used for every scenario of an attribute (a paired test of
    clean vs perturbed drops). Small draws are cached; large ones are regenerated from the seed
    chunk by chunk so memory stays bounded.
    """

    def __init__(self, codes: Tensor, n_perm: int, seed: int, attribute: str) -> None:
        self.codes, self.n_perm, self.seed, self.attribute = codes, n_perm, seed, attribute
        # 1M codes per chunk: the generic path expands a chunk to G indicator rows of float64
        self.chunk = max(1, (1 << 20) // max(1, codes.numel()))
        self._cache: list[Tensor] | None = None
        if n_perm <= self.chunk:
            self._cache = list(self._draw())

    def _draw(self) -> Iterator[Tensor]:
        gen = stream_generator(self.seed, "subgroup-permutations", self.attribute)
        m = self.codes.numel()
        for start in range(0, self.n_perm, self.chunk):
            rows = min(self.chunk, self.n_perm - start)
            order = torch.argsort(torch.rand(rows, m, generator=gen), dim=1)
            yield self.codes[order]

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._cache) if self._cache is not None else self._draw()
