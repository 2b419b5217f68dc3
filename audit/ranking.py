r"""Ranking helpers that metric plugins share: tie groups of scores and weighted ROC sums.

AUROC and the operating points of a ROC curve depend on the samples only through the order of
their scores. Sorting the scores once into *tie groups* (equal scores share a group) turns every
weight row's ROC into per-group sums of positive and negative weight, ``[R, G]``, from which
AUROC is one cumulative sum. Used by the built-in classification metrics and the subgroup
analysis; a third-party metric gets the same tie handling by building on them (see
docs/plugins.md, "Helper modules for metrics").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .weighted import group_sums, safe_div

__all__ = ["auroc_from_sums", "binary_roc_sums", "tie_groups"]


def tie_groups(scores: Tensor, descending: bool = False) -> tuple[Tensor, int]:
    """Rank of each sample's tie group in sorted score order.

    Parameters
    ----------
    scores : Tensor ``[N]``
    descending : bool
        Number the groups from the highest score down instead of from the lowest up.

    Returns
    -------
    group : Tensor ``[N]`` int64, the index (0 = lowest score, or highest when ``descending``)
        of the group of equal scores each sample belongs to.
    n_groups : int
        Number of distinct scores.
    """
    uniq, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    g = uniq.numel()
    if descending:
        inverse = g - 1 - inverse
    return inverse, g


def binary_roc_sums(scores: Tensor, positive: Tensor, weights: Tensor,
                    groups: tuple[Tensor, int] | None = None) -> tuple[Tensor, Tensor]:
    """Weighted positives and negatives per tie group, ascending score.

    Parameters
    ----------
    scores : Tensor ``[N]``
    positive : Tensor ``[N]`` bool
        Which samples are positives.
    weights : Tensor ``[R, N]`` float
    groups : (Tensor, int), optional
        ``tie_groups(scores)`` when the caller already has it (e.g. from
        :func:`medaudit.bootstrap.row_invariant`).

    Returns
    -------
    pos, neg : Tensor ``[R, G]`` each, in ``weights``' dtype.
    """
    group, g = groups if groups is not None else tie_groups(scores)
    pos = group_sums(weights, group, g, positive)
    neg = group_sums(weights, group, g, ~positive)
    return pos, neg


def auroc_from_sums(pos: Tensor, neg: Tensor) -> Tensor:
    r"""Weighted AUROC from per-group sums in ascending score order.

    Parameters
    ----------
    pos, neg : Tensor ``[R, G]``
        Positive and negative weight of each tie group (:func:`binary_roc_sums`).

    Returns
    -------
    Tensor ``[R]``; NaN on a row with no positives or no negatives.

    Notes
    -----
    .. math:: \mathrm{AUROC} = \frac{\sum_g P_g\,(N_{<g} + \tfrac12 N_g)}{P\,N}

    the Mann-Whitney statistic with ties counted one half, which equals the trapezoidal area
    under the ROC curve (``sklearn.metrics.roc_auc_score``).
    """
    cum_neg = torch.cumsum(neg, dim=1)
    num = (pos * (cum_neg - 0.5 * neg)).sum(dim=1)
    return safe_div(num, pos.sum(dim=1) * neg.sum(dim=1))
