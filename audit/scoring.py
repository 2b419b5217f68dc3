r"""Proper scoring rules of predicted probabilities, weighted over a weight matrix ``[R, N]``.

Shared by the built-in calibration metrics and temperature scaling (which reports NLL before and
after scaling and must agree with the ``nll`` metric to the bit), and documented for
third-party metrics (docs/plugins.md, "Helper modules for metrics").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .weighted import safe_div

__all__ = ["negative_log_likelihood"]


def negative_log_likelihood(probs: Tensor, labels: Tensor, weights: Tensor, task: str) -> Tensor:
    r"""Weighted mean negative log-likelihood of the labels, one value per weight row.

    Binary and multiclass: :math:`-\frac{1}{\sum_i w_i}\sum_i w_i \log \max(p_{i y_i}, \epsilon)`.
    Multilabel: :math:`\frac{1}{\sum_i w_i}\sum_i w_i \sum_l \mathrm{BCE}(p_{il}, y_{il})` with
    :math:`p` clipped to :math:`[\epsilon, 1-\epsilon]`, the NLL of the label vector under
    independent sigmoids. :math:`\epsilon` is the machine epsilon of ``probs``' dtype, as netcal
    clips.

    Parameters
    ----------
    probs : Tensor ``[N, K]``
        Probabilities (``K = 2`` for binary tasks).
    labels : Tensor ``[N]`` class indices, or ``[N, K]`` {0, 1} for multilabel.
    weights : Tensor ``[R, N]`` float64, on ``probs``' device.
    task : {"binary", "multiclass", "multilabel"}

    Returns
    -------
    Tensor ``[R]`` float64; NaN on a row of total weight 0.
    """
    eps = torch.finfo(probs.dtype).eps
    p = probs.double()
    total = weights.sum(dim=1)
    if task == "multilabel":
        y = labels.to(probs.device).double()
        pc = p.clamp(eps, 1 - eps)
        bce = -(y * torch.log(pc) + (1 - y) * torch.log1p(-pc)).sum(dim=1)
        return safe_div(weights @ bce, total)
    p_true = p.gather(1, labels.to(probs.device, torch.int64)[:, None])[:, 0].clamp_min(eps)
    return safe_div(weights @ -torch.log(p_true), total)
