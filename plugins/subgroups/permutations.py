r"""Permutation tests of group gaps and their multiplicity correction.

Group labels of the eligible samples are permuted (:class:`Permutations`, the same draws for
every scenario of an attribute, so drops are tested paired); the p-value counts how often a
permuted gap is at least the observed one (:func:`permutation_p`), and Holm's step-down
correction (:func:`holm`) adjusts the p-values of every gap tested in one scenario.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from medaudit.rng import stream_generator

_NAN = float("nan")


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    r"""Holm-Bonferroni adjusted p-values (None entries are not tested and stay None).

    With the :math:`m` defined p-values sorted ascending, :math:`p_{(1)} \le \dots \le p_{(m)}`,
    :math:`\tilde p_{(i)} = \min(1, \max_{j \le i} (m - j + 1)\, p_{(j)})` (Holm 1979); rejecting
    where :math:`\tilde p < \alpha` controls the family-wise error rate at :math:`\alpha` under
    any dependence between the tests.
    """
    idx = [i for i, p in enumerate(p_values) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):  # type: ignore[arg-type, return-value]
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))  # type: ignore[arg-type]
        out[i] = running
    return out


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
