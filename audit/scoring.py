r"""Proper scoring rules of predicted probabilities, weighted over a weight matrix ``[R, N]``, and
what "near chance" means.

Shared by the built-in calibration metrics and temperature scaling (which reports NLL before and
after scaling and must agree with the ``nll`` metric to the bit), by the classification
plugin's near-chance alert and the core's preprocessing probe (:mod:`medaudit.sanity`), and
documented for third-party metrics (docs/plugins.md, "Helper modules for metrics").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .weighted import safe_div

__all__ = ["NEAR_CHANCE_MARGIN", "balanced_accuracy", "near_chance", "negative_log_likelihood"]

#: A model whose clean balanced accuracy is within this of a constant prediction's (1/K) is
#: near chance: robustness, calibration and detection results of a model that does not work on
#: the audit data are not evidence of anything, and read as reassuring ("no significant drop").
NEAR_CHANCE_MARGIN = 0.1


def near_chance(balanced_accuracy: float, n_classes: int) -> bool:
    """Whether a balanced accuracy is within :data:`NEAR_CHANCE_MARGIN` of ``1 / n_classes``.

    Balanced accuracy is compared with 1/K, what every constant prediction (and random guessing)
    scores whatever the class balance, so a majority-class predictor is caught on imbalanced
    data too. NaN (no class present) is not near chance: there is nothing to judge.
    """
    return balanced_accuracy <= 1.0 / n_classes + NEAR_CHANCE_MARGIN


def balanced_accuracy(predicted: Tensor, labels: Tensor) -> float:
    """Unweighted balanced accuracy of class predictions ``[N]``: the mean over the classes
    present in ``labels`` ``[N]`` of the share of their samples predicted as them (the
    ``balanced_accuracy`` metric of one set of arg-max predictions)."""
    labels = labels.to(predicted.device, torch.int64)
    present = torch.unique(labels)
    return float(torch.stack([(predicted[labels == c] == c).double().mean() for c in present]).mean())


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
