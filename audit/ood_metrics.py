"""Detection metrics for OOD / shift scores, weighted and batched over bootstrap rows.

Every function takes the scores of the *positives* (shifted or otherwise "should be flagged"
samples) and of the *negatives* (clean / in-distribution samples), higher score = more shifted,
plus one weight row per estimate, and returns one value per row::

    f(scores_pos [Npos], scores_neg [Nneg], w_pos [R, Npos], w_neg [R, Nneg]) -> Tensor [R]

Weights follow :mod:`medaudit.metric`: row 0 is usually ones (the point estimate) and the other
rows bootstrap counts, so a metric with integer count weights equals the metric computed on the
explicitly resampled scores. For a paired clean-vs-shifted comparison the caller passes the same
weight matrix for both sides (sample ``i`` clean and sample ``i`` shifted share a count).

Implementation: scores are sorted once (descending) and tied scores merged into groups; each
row's weighted positive and negative mass per group is one ``index_add_``; every metric is then
a weighted cumulative sum over groups. Nothing loops over resamples. Ties are handled as
scikit-learn does: all samples with equal score cross the threshold together.

A row where the positives or the negatives carry zero total weight yields NaN (undefined), which
:func:`medaudit.bootstrap.interval` drops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["auroc", "aupr", "fpr_at_tpr", "fpr95", "detection_measures"]

# Rows evaluated at once: bounds the [rows, groups] float64 temporaries to ~32 MiB.
_CHUNK_ELEMENTS = 1 << 22


def _check(scores_pos: Tensor, scores_neg: Tensor, w_pos: Tensor, w_neg: Tensor) -> None:
    if scores_pos.ndim != 1 or scores_neg.ndim != 1:
        raise ValueError(f"scores must be 1-D, got {tuple(scores_pos.shape)} and {tuple(scores_neg.shape)}")
    if w_pos.ndim != 2 or w_pos.shape[1] != scores_pos.shape[0]:
        raise ValueError(f"w_pos must be [R, {scores_pos.shape[0]}], got {tuple(w_pos.shape)}")
    if w_neg.ndim != 2 or w_neg.shape[1] != scores_neg.shape[0]:
        raise ValueError(f"w_neg must be [R, {scores_neg.shape[0]}], got {tuple(w_neg.shape)}")
    if w_pos.shape[0] != w_neg.shape[0]:
        raise ValueError(f"w_pos and w_neg need the same number of rows, got {w_pos.shape[0]} and {w_neg.shape[0]}")
    if bool(torch.isnan(scores_pos).any()) or bool(torch.isnan(scores_neg).any()):
        raise ValueError("scores contain NaN; drop undefined samples (and their weights) first")


def _groups(scores_pos: Tensor, scores_neg: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Sort once: ``(order, is_pos[order], last index of each distinct-score group)``, descending scores."""
    scores = torch.cat([scores_pos, scores_neg]).to(device=device, dtype=torch.float64)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order]
    # A group ends wherever the next score differs (ties cross every threshold together).
    ends = torch.ones_like(sorted_scores, dtype=torch.bool)
    if sorted_scores.numel() > 1:
        ends[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    is_pos = (order < scores_pos.shape[0])
    return order, is_pos, torch.nonzero(ends).squeeze(1)


def _masses(sort: tuple[Tensor, Tensor, Tensor], w_pos: Tensor, w_neg: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted positive and negative mass per group: ``(P, Q)``, both ``[R, G]`` float64.

    Gathering the weight columns into score order and taking cumulative sums at the group ends is
    contiguous work (a column ``index_add_`` is several times slower on CPU).
    """
    order, is_pos, ends = sort
    device = order.device
    w = torch.cat([w_pos.to(device=device, dtype=torch.float64), w_neg.to(device=device, dtype=torch.float64)], 1)
    w = w[:, order]
    pos = torch.where(is_pos, w, 0.0).cumsum(1)[:, ends]
    neg = torch.where(is_pos, 0.0, w).cumsum(1)[:, ends]
    P = torch.diff(pos, dim=1, prepend=torch.zeros_like(pos[:, :1]))
    Q = torch.diff(neg, dim=1, prepend=torch.zeros_like(neg[:, :1]))
    return P, Q


def _grouped(scores_pos: Tensor, scores_neg: Tensor, w_pos: Tensor, w_neg: Tensor) -> tuple[Tensor, Tensor]:
    """``(P, Q)`` of :func:`_masses` for one set of weight rows (sorting included)."""
    return _masses(_groups(scores_pos, scores_neg, w_pos.device), w_pos, w_neg)


def _chunked_many(fns: dict[str, Callable[[Tensor, Tensor], Tensor]], scores_pos: Tensor, scores_neg: Tensor,
                  w_pos: Tensor, w_neg: Tensor) -> dict[str, Tensor]:
    """Evaluate several metrics from one sort, in chunks of rows that bound the temporaries."""
    _check(scores_pos, scores_neg, w_pos, w_neg)
    sort = _groups(scores_pos, scores_neg, w_pos.device)
    step = max(1, _CHUNK_ELEMENTS // max(sort[0].numel(), 1))
    out: dict[str, list[Tensor]] = {k: [] for k in fns}
    for s in range(0, w_pos.shape[0], step):
        P, Q = _masses(sort, w_pos[s : s + step], w_neg[s : s + step])
        for k, fn in fns.items():
            out[k].append(fn(P, Q))
    return {k: torch.cat(v) if v else torch.empty(0, dtype=torch.float64) for k, v in out.items()}


def _chunked(fn: Callable[[Tensor, Tensor], Tensor], scores_pos: Tensor, scores_neg: Tensor, w_pos: Tensor,
             w_neg: Tensor) -> Tensor:
    return _chunked_many({"v": fn}, scores_pos, scores_neg, w_pos, w_neg)["v"]


def _auroc(P: Tensor, Q: Tensor) -> Tensor:
    wp, wn = P.sum(1), Q.sum(1)
    # Negative mass strictly below each group (groups are in descending order: below = later).
    below = Q.flip(1).cumsum(1).flip(1) - Q
    num = (P * (below + 0.5 * Q)).sum(1)
    return torch.where((wp > 0) & (wn > 0), num / (wp * wn), torch.full_like(wp, float("nan")))


def _aupr(P: Tensor, Q: Tensor) -> Tensor:
    wp = P.sum(1)
    tp, fp = P.cumsum(1), Q.cumsum(1)
    flagged = tp + fp
    precision = torch.where(flagged > 0, tp / flagged.clamp_min(1e-300), torch.zeros_like(tp))
    ap = (P * precision).sum(1) / wp.clamp_min(1e-300)
    return torch.where((wp > 0) & (Q.sum(1) > 0), ap, torch.full_like(wp, float("nan")))


def _fpr_at(P: Tensor, Q: Tensor, tpr: float) -> Tensor:
    wp, wn = P.sum(1), Q.sum(1)
    tpr_curve = P.cumsum(1) / wp.clamp_min(1e-300)[:, None]
    fpr_curve = Q.cumsum(1) / wn.clamp_min(1e-300)[:, None]
    reached = tpr_curve >= tpr
    # argmax of a boolean row is the first True: the highest threshold detecting >= tpr of positives.
    first = reached.to(torch.int8).argmax(1)
    value = fpr_curve.gather(1, first[:, None]).squeeze(1)
    ok = (wp > 0) & (wn > 0) & reached.any(1)
    return torch.where(ok, value, torch.full_like(wp, float("nan")))


def auroc(scores_pos: Tensor, scores_neg: Tensor, w_pos: Tensor, w_neg: Tensor) -> Tensor:
    """Weighted area under the ROC curve, positives = shifted, one value per weight row.

    ``AUROC_r = Σ_i Σ_j w_pos[r,i] w_neg[r,j] (1[s_i > s_j] + ½ 1[s_i = s_j]) / (Σ w_pos[r] Σ w_neg[r])``,
    the Mann–Whitney form (Hanley & McNeil 1982), which equals scikit-learn's ``roc_auc_score``
    (trapezoidal area; ties give ½) with ``sample_weight``.

    Returns a float64 ``[R]`` tensor; NaN where a row gives either side zero weight.
    """
    return _chunked(_auroc, scores_pos, scores_neg, w_pos, w_neg)


def aupr(scores_pos: Tensor, scores_neg: Tensor, w_pos: Tensor, w_neg: Tensor) -> Tensor:
    """Weighted area under the precision-recall curve as **average precision**, positives = shifted.

    ``AP = Σ_k (R_k − R_{k−1}) P_k`` over the distinct scores ``t_k`` in descending order, with
    ``P_k``/``R_k`` the precision/recall of flagging ``s ≥ t_k`` (no interpolation), exactly
    scikit-learn's ``average_precision_score``. This is "AUPR-Out" in OpenOOD's naming (the shifted
    samples are the positive class); OpenOOD integrates the PR curve with the trapezoidal rule
    instead, which is slightly optimistic. Its chance level is the positive share, 0.5 for the
    paired clean-vs-shifted comparison.
    """
    return _chunked(_aupr, scores_pos, scores_neg, w_pos, w_neg)


def fpr_at_tpr(scores_pos: Tensor, scores_neg: Tensor, w_pos: Tensor, w_neg: Tensor, tpr: float = 0.95) -> Tensor:
    """False-positive rate at the highest threshold whose true-positive rate is ``>= tpr``.

    Positives = shifted: the share of clean inputs (negatives) flagged when the threshold is set
    so that at least ``tpr`` of the shifted inputs are flagged. OpenOOD v1.5 convention
    (``auc_and_fpr_recall``: OOD is the positive class, ``fpr[argmax(tpr >= 0.95)]`` on the ROC
    curve). We walk every distinct threshold, i.e. scikit-learn's ``roc_curve(...,
    drop_intermediate=False)``; OpenOOD keeps sklearn's default ``drop_intermediate=True``, which
    can only differ when the 95 % crossing falls on a dropped collinear point.
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    return _chunked(lambda P, Q: _fpr_at(P, Q, tpr), scores_pos, scores_neg, w_pos, w_neg)


def fpr95(scores_pos: Tensor, scores_neg: Tensor, w_pos: Tensor, w_neg: Tensor) -> Tensor:
    """:func:`fpr_at_tpr` at 95 % TPR (lower is better)."""
    return fpr_at_tpr(scores_pos, scores_neg, w_pos, w_neg, 0.95)


def detection_measures(scores_pos: Tensor, scores_neg: Tensor, w_pos: Tensor, w_neg: Tensor) -> dict[str, Tensor]:
    """``auroc``, ``aupr`` and ``fpr95`` together (one sort and one pass over the weight rows)."""
    return _chunked_many({"auroc": _auroc, "aupr": _aupr, "fpr95": lambda P, Q: _fpr_at(P, Q, 0.95)},
                         scores_pos, scores_neg, w_pos, w_neg)
