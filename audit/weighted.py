"""Arithmetic on weight matrices that metric plugins share: undefined ratios and group sums.

A metric sees its samples through a weight matrix ``W`` ``[R, N]`` (see :mod:`medaudit.metric`):
row ``r`` says how often each sample counts in estimate ``r``. Sums per group of samples, and
ratios of such sums that are undefined on some rows, are the building blocks of nearly every
metric; they live here so that a third-party metric builds on the same definitions as the
built-ins (see docs/plugins.md, "Helper modules for metrics").
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_sums", "safe_div"]

_NAN = float("nan")


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with NaN where ``den == 0`` (an undefined ratio, never a silent 0).

    Parameters
    ----------
    num, den : Tensor
        Broadcastable; typically ``[R]`` or ``[R, K]`` weighted sums.

    Returns
    -------
    Tensor of ``num``'s shape and dtype; NaN wherever ``den`` is not positive.
    """
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, _NAN))


def group_sums(weights: Tensor, group: Tensor, n_groups: int, values: Tensor | None = None) -> Tensor:
    """Per-row sums of weights (times ``values``) by group, ``[R, G]``.

    ``out[r, g] = sum_{i: group_i = g} weights[r, i] * values_i``.

    Parameters
    ----------
    weights : Tensor ``[R, N]``
        The result has its dtype and device.
    group : Tensor int64, ``[N]`` or ``[R, N]``
        Group of each sample in ``0..n_groups-1``: the same on every row (``[N]``, e.g. tie groups
        or classes, one ``index_add``) or one grouping per row (``[R, N]``, e.g. permuted group
        labels, one ``scatter_add``). Combine two groupings into one with
        ``group * n_sub + sub`` and ``n_groups * n_sub`` groups.
    n_groups : int
    values : Tensor ``[N]``, optional
        Per-sample factor (a bool mask counts as 0/1); all ones when omitted.

    Returns
    -------
    Tensor ``[R, n_groups]``
    """
    w = weights if values is None else weights * values.to(weights.dtype)
    out = torch.zeros(weights.shape[0], n_groups, dtype=weights.dtype, device=weights.device)
    if group.ndim == 1:
        return out.index_add_(1, group, w)
    return out.scatter_add_(1, group, w.expand_as(group).contiguous())
