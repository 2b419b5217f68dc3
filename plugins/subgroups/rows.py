"""Per-group metric rows: every metric of every group on every weight row, ``{key: [R, G]}``.

Two paths: :func:`headline_rows` computes the headline metrics (:data:`HEADLINE`) of all groups
at once from group sums (fast, binary and multiclass); :func:`generic_rows` calls any metric
plugin once per group through :func:`medaudit.bootstrap.evaluate` (every metric and task).
:func:`rest_rows` computes, with either path, each metric on every group's *rest* (the pooled
samples of the other groups), for the worst-group-vs-rest differences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

from medaudit.binning import bin_index, ece_mce_ace_from_bins, equal_width_edges, top_label
from medaudit.bootstrap import evaluate
from medaudit.metric import Metric, MetricContext
from medaudit.ranking import auroc_from_sums, tie_groups
from medaudit.weighted import group_sums, safe_div

#: Metrics computed under perturbed scenarios, with their direction (higher is better).
HEADLINE: dict[str, bool] = {"accuracy": True, "balanced_accuracy": True, "auroc": True, "ece": False}
#: Fairness rates of binary tasks (prediction ``p_1 >= threshold``), per group.
RATES = ("selection_rate", "true_positive_rate", "false_positive_rate")

# Elements (rows x groups x columns) of one chunk of group sums / permutation draws: keeps the
# float64 temporaries of the AUROC tie-group sums in the tens of MiB whatever N and R are.
_CHUNK_ELEMENTS = 1 << 21
# Largest per-row total weight for which float32 group sums of AUROC are exact (see _group_auroc).
_EXACT_F32_TOTAL = 4096


#: What a task's metrics receive: one quantity ``[N, …]`` (class probabilities), or the mapping of
#: every per-sample quantity of a task whose ``metric_input`` is ``ALL_QUANTITIES`` (segmentation).
MetricInput: TypeAlias = Tensor | Mapping[str, Tensor]


def take(x: MetricInput, sel: Tensor) -> MetricInput:
    """The samples ``sel`` (a mask or indices) of a metric input, tensor or mapping."""
    if isinstance(x, Mapping):
        return {key: value[sel] for key, value in x.items()}
    return x[sel]


@dataclass
class ScenarioRows:
    """Per-group rows of one (scenario, attribute): bootstrap ``[1 + R, G]``, permutations ``[P, G]``
    and the bootstrap rows of each group's rest ``[1 + R, G]`` (:func:`rest_rows`)."""

    boot: dict[str, Tensor]
    perm: dict[str, Tensor] | None
    directions: dict[str, bool]
    rest: dict[str, Tensor]


#: ``rows(probs, labels, w, grp, n_groups) -> {key: [R, n_groups]}``: one of the two paths above with
#: its other arguments bound (see :func:`rest_rows`).
GroupRows = Callable[[MetricInput, Tensor, Tensor, Tensor, int], dict[str, Tensor]]


def rest_rows(rows: GroupRows, probs: MetricInput, labels: Tensor, w: Tensor, grp: Tensor, n_groups: int,
              boot: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each metric of every group's *rest*, ``{key: [R, G]}``: column ``g`` is the metric on the
    pooled samples of every other group (``grp != g``) with the same weight rows, so a group's
    value and its rest's value on row ``r`` come from the same resample (a paired difference).

    ``boot`` holds the groups' own rows (from ``rows``): with two groups each one's rest is the
    other group, whose rows are already there. A single group has no rest (and no gap): ``{}``.
    """
    if n_groups < 2:
        return {}
    if n_groups == 2:
        return {key: val.flip(1) for key, val in boot.items()}
    parts: dict[str, list[Tensor]] = {}
    for g in range(n_groups):
        sel = grp != g
        one = torch.zeros(int(sel.sum()), dtype=torch.int64)
        for key, val in rows(take(probs, sel), labels[sel], w[:, sel], one, 1).items():
            parts.setdefault(key, []).append(val[:, 0])
    return {key: torch.stack(vals, dim=1) for key, vals in parts.items()}


def _group_sums(w: Tensor, grp: Tensor, n_groups: int, x: Tensor | None = None,
                sub: Tensor | None = None, n_sub: int = 1) -> Tensor:
    """``out[r, g, s] = sum_i w[r, i] x_i 1[grp_i = g, sub_i = s]``, ``[R, G, n_sub]`` in ``w``'s dtype.

    ``grp`` is ``[M]`` (the same groups on every row: bootstrap rows) or ``[R, M]`` (one
    labelling per row: permutations); ``w`` is ``[R, M]``. The (group, sub) pair is one combined
    group of :func:`medaudit.weighted.group_sums`.
    """
    idx = grp * n_sub + (0 if sub is None else sub)
    return group_sums(w, idx, n_groups * n_sub, x).view(w.shape[0], n_groups, n_sub)


def headline_rows(
    probs: Tensor, labels: Tensor, w: Tensor, grp: Tensor, n_groups: int, ctx: MetricContext,
    keys: Sequence[str] = tuple(HEADLINE), rates: bool = False,
) -> dict[str, Tensor]:
    """Headline metrics (and binary fairness rates) of every group on every row, ``{key: [R, G]}``.

    Same definitions as :class:`~medaudit.plugins.classification.ClassificationMetrics` and
    :class:`~medaudit.plugins.calibration.CalibrationMetrics` (binary prediction ``p_1 >=
    threshold``, multiclass arg-max, AUROC with half-counted ties, top-label equal-width ECE),
    but every group in one pass of group sums instead of one metric call per group: a group's
    metric is the metric with weight ``w[r, i] 1[grp_i = g]``. Single-label tasks only (one class
    index per sample: binary and multiclass).
    """
    if labels.ndim != 1:
        raise ValueError(f"headline_rows needs one class index per sample (labels [N]), not labels of shape "
                         f"{tuple(labels.shape)} ({ctx.task!r} task)")
    m = probs.shape[0]
    t_max = m  # tie groups per AUROC call are at most M
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_groups * t_max))
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, w.shape[0], chunk):
        g = grp if grp.ndim == 1 else grp[start : start + chunk]
        out = _headline_chunk(probs, labels, w[start : start + chunk], g, n_groups, ctx, keys, rates)
        for key, val in out.items():
            parts.setdefault(key, []).append(val)
    return {key: torch.cat(vals) for key, vals in parts.items()}


def _headline_chunk(probs: Tensor, labels: Tensor, w: Tensor, grp: Tensor, n_groups: int,
                    ctx: MetricContext, keys: Sequence[str], rates: bool) -> dict[str, Tensor]:
    r, k = w.shape[0], probs.shape[1]
    w = w.to(torch.float64)
    labels = labels.to(torch.int64)
    pred = (probs[:, 1] >= ctx.threshold).to(torch.int64) if ctx.task == "binary" else probs.argmax(dim=1)
    correct = (pred == labels).double()
    out: dict[str, Tensor] = {}
    if "accuracy" in keys:
        out["accuracy"] = safe_div(_group_sums(w, grp, n_groups, correct)[..., 0], _group_sums(w, grp, n_groups)[..., 0])
    if "balanced_accuracy" in keys:
        n_c = _group_sums(w, grp, n_groups, None, labels, k)
        tp_c = _group_sums(w, grp, n_groups, correct, labels, k)
        out["balanced_accuracy"] = torch.nanmean(safe_div(tp_c, n_c), dim=2)
    if "auroc" in keys:
        per_class = []
        for c in ([1] if ctx.task == "binary" else range(k)):  # loop over classes, never rows
            positive = (labels == c).double()
            per_class.append(_group_auroc(probs[:, c].double(), positive, w, grp, n_groups))
        out["auroc"] = torch.stack(per_class, dim=2).mean(dim=2)  # strict macro: NaN propagates
    if "ece" in keys:
        conf, hit = top_label(probs, labels)
        b = ctx.n_bins
        idx = bin_index(conf, equal_width_edges(b, conf.device))
        sums = [_group_sums(w, grp, n_groups, x, idx, b).reshape(r * n_groups, b) for x in (None, conf, hit)]
        out["ece"] = ece_mce_ace_from_bins(*sums)[0].view(r, n_groups)
    if rates and ctx.task == "binary":
        yes = pred.double()
        pos = (labels == 1).double()
        out["selection_rate"] = safe_div(_group_sums(w, grp, n_groups, yes)[..., 0], _group_sums(w, grp, n_groups)[..., 0])
        out["true_positive_rate"] = safe_div(_group_sums(w, grp, n_groups, yes * pos)[..., 0],
                                             _group_sums(w, grp, n_groups, pos)[..., 0])
        out["false_positive_rate"] = safe_div(_group_sums(w, grp, n_groups, yes * (1 - pos))[..., 0],
                                              _group_sums(w, grp, n_groups, 1 - pos)[..., 0])
    return out


def _group_auroc(scores: Tensor, positive: Tensor, w: Tensor, grp: Tensor, n_groups: int) -> Tensor:
    """AUROC of ``scores`` against ``positive`` in every group on every row, ``[R, G]``.

    Fixed groups (``grp`` ``[M]``, bootstrap rows): one Mann-Whitney sum per group on its own
    columns, ``O(R M)`` in all. Per-row groups (``grp`` ``[R, M]``, permutations): positives and
    negatives per (group, tie group of the score) in one dense ``[R, G T]`` scatter, ``O(R G M)``.
    """
    r = w.shape[0]
    if grp.ndim == 1:
        cols = []
        for g in range(n_groups):
            sel = grp == g
            tie, n_ties = tie_groups(scores[sel])
            wg, pg = w[:, sel], positive[sel]
            cols.append(auroc_from_sums(group_sums(wg, tie, n_ties, pg), group_sums(wg, tie, n_ties, 1.0 - pg)))
        return torch.stack(cols, dim=1)
    tie, n_ties = tie_groups(scores)
    # The dense sums dominate the analysis' run time. With integer weights and at most
    # _EXACT_F32_TOTAL samples per row every count, cumulative count and Mann-Whitney sum is an
    # integer or half-integer below 2**23, so float32 holds them exactly at half the memory traffic.
    exact32 = float(w.sum(dim=1).max()) <= _EXACT_F32_TOTAL and bool((w == w.round()).all())
    wd = w.to(torch.float32 if exact32 else torch.float64)
    idx = grp * n_ties + tie
    pw = wd * positive.to(wd.dtype)
    pos = torch.zeros(r, n_groups * n_ties, dtype=wd.dtype).scatter_add_(1, idx, pw).view(r * n_groups, n_ties)
    neg = torch.zeros(r, n_groups * n_ties, dtype=wd.dtype).scatter_add_(1, idx, wd - pw).view(r * n_groups, n_ties)
    below = torch.cumsum(neg, dim=1).sub_(neg, alpha=0.5)  # negatives below each tie group, ties half
    num = (pos * below).sum(dim=1).double()
    den = pos.sum(dim=1).double() * neg.sum(dim=1).double()
    return safe_div(num, den).view(r, n_groups)


def generic_rows(
    metrics: Sequence[Metric], probs: MetricInput, labels: Tensor, w: Tensor, grp: Tensor, n_groups: int,
    ctx: MetricContext, confidence: float, keep: set[str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, bool]]:
    """Every metric of every group on every row via :func:`medaudit.bootstrap.evaluate`, ``{key: [R, G]}``.

    ``grp`` ``[M]``: each group's metric on the weight rows restricted to its columns.
    ``grp`` ``[R, M]`` (permutations, ``w`` ones): the metric weighted by the indicator of the
    group under each row's labelling, all groups stacked into one ``[G R, M]`` call per metric.
    Works for any plugin metric and task, at one metric call per group (or per stacked block).
    """
    rows: dict[str, Tensor] = {}
    directions: dict[str, bool] = {}
    for metric in metrics:
        if ctx.task not in metric.tasks:
            continue
        if grp.ndim == 1:
            per_group: dict[str, list[Tensor]] = {}
            for g in range(n_groups):
                sel = grp == g
                _, raw = evaluate([metric], take(probs, sel), labels[sel], w[:, sel], ctx, confidence)
                for key, val in raw.items():
                    per_group.setdefault(key, []).append(val)
            got = {key: torch.stack(vals, dim=1) for key, vals in per_group.items()}
        else:
            indicator = torch.cat([(grp == g).to(torch.float32) * w for g in range(n_groups)])  # [G R, M]
            _, raw = evaluate([metric], probs, labels, indicator, ctx, confidence)
            got = {key: val.view(n_groups, -1).T for key, val in raw.items()}
        for key, val in got.items():
            if keep is None or key in keep:
                rows[key] = val
                directions[key] = metric.higher_is_better
    return rows, directions
