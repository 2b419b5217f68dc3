"""Classification performance and selective-prediction metrics, weighted and batched over resamples.

Every function here works on a weight matrix ``W`` ``[R, N]`` (see :mod:`medaudit.metric`): a
metric computed with integer count weights equals the metric on the data resampled by those
counts. Sorting (for AUROC, operating points and risk-coverage curves) happens once per call;
the per-resample work is matrix products, ``index_add_`` and cumulative sums over ``[R, ·]``.

Conventions (see docs/metrics.md):

* binary prediction is ``1[p_1 >= ctx.threshold]``; multiclass prediction is the arg-max
  (first class on ties);
* a ratio whose denominator is 0 on a row (e.g. sensitivity of a class absent from a resample)
  is NaN on that row; macro averages of F1 / sensitivity (balanced accuracy) skip NaN classes,
  as scikit-learn skips classes absent from both ``y_true`` and ``y_pred``;
* macro AUROC is NaN when any class's one-vs-rest AUROC is undefined (scikit-learn raises);
* selective-prediction metrics use the top-label view: confidence = max probability,
  correct = arg-max equals the label, independent of the binary threshold.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from medaudit.bootstrap import check_predictions, row_invariant
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext, class_names
from medaudit.outputs import AuditOutputs
from medaudit.ranking import auroc_from_sums, binary_roc_sums, tie_groups
from medaudit.scoring import near_chance as is_near_chance
from medaudit.task import task_of
from medaudit.weighted import group_sums, safe_div

MEDAUDIT_API_VERSION = 1

#: Confidence at or above which a wrong prediction counts as a confident error.
CONFIDENT_ERROR_THRESHOLD = 0.9

_NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# Weighted building blocks
# ---------------------------------------------------------------------------------------------


def _as_weights(weights: Tensor, probs: Tensor) -> Tensor:
    return weights.to(device=probs.device, dtype=torch.float64)


def _class_roc_sums(probs: Tensor, labels: Tensor, c: int, positive: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`medaudit.ranking.binary_roc_sums` of class ``c``'s probabilities; their tie groups are computed once
    per :func:`medaudit.bootstrap.evaluate` call (``labels``: as the metric received them)."""
    scores = probs[:, c].double()
    groups = row_invariant(probs, labels, ("classification", "tie_groups", c), lambda: tie_groups(scores))
    return binary_roc_sums(scores, positive, weights, groups)


def sensitivity_at_specificity_from_sums(pos: Tensor, neg: Tensor, target: float) -> Tensor:
    r"""Highest sensitivity over thresholds whose specificity is at least ``target``, ``[R]``.

    Notes
    -----
    The candidate thresholds are the distinct scores (predict positive when ``score >= t``) and
    ``+inf`` (all negative, specificity 1, sensitivity 0), i.e. the points of
    ``sklearn.metrics.roc_curve(drop_intermediate=False)``. Because sensitivity falls and
    specificity rises with ``t``, the answer is the sensitivity at the lowest threshold whose
    specificity :math:`N_{<t}/N \ge` ``target``. The threshold is re-chosen on every weight row,
    so the interval includes the variability of choosing the operating point on the data.
    """
    n_pos = pos.sum(dim=1, keepdim=True)
    n_neg = neg.sum(dim=1, keepdim=True)
    neg_below = torch.cumsum(neg, dim=1) - neg  # negatives scored below each candidate threshold
    pos_below = torch.cumsum(pos, dim=1) - pos
    sens = torch.cat([n_pos - pos_below, torch.zeros_like(n_pos)], dim=1)
    spec_num = torch.cat([neg_below, n_neg], dim=1)
    # relative slack of 1e-12 keeps a specificity of exactly `target` feasible despite rounding
    feasible = spec_num >= target * n_neg * (1 - 1e-12)
    best = torch.where(feasible, sens, torch.full_like(sens, -1.0)).amax(dim=1)
    valid = (n_pos[:, 0] > 0) & (n_neg[:, 0] > 0)
    return torch.where(valid, best / torch.where(valid, n_pos[:, 0], torch.ones_like(best)), torch.full_like(best, _NAN))


def confusion_sums(
    true_onehot: Tensor, pred_onehot: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted one-vs-rest confusion counts per class: ``tp, fp, fn, tn``, each ``[R, K]``."""
    t = true_onehot.to(weights.dtype)
    p = pred_onehot.to(weights.dtype)
    tp = weights @ (t * p)
    n_true = weights @ t
    n_pred = weights @ p
    total = weights.sum(dim=1, keepdim=True)
    fp = n_pred - tp
    fn = n_true - tp
    tn = total - tp - fp - fn
    return tp, fp, fn, tn


def _nanmean_rows(x: Tensor) -> Tensor:
    # torch.nanmean of an all-NaN row is NaN, which is what we want (undefined everywhere)
    return torch.nanmean(x, dim=1)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class ClassificationMetrics(Metric):
    r"""Discrimination and threshold metrics (higher is better for every key).

    Keys, binary and multiclass
        ``accuracy``: :math:`\sum_i w_i 1[\hat y_i = y_i] / \sum_i w_i`.
        ``balanced_accuracy``: mean over classes present of the per-class sensitivity.
        ``auroc``: macro one-vs-rest AUROC (binary: AUROC of :math:`p_1`).
        ``f1_macro``: mean over classes of :math:`2TP/(2TP+FP+FN)`.
    Multiclass only
        ``sensitivity/<class>`` :math:`TP/(TP+FN)`, ``specificity/<class>`` :math:`TN/(TN+FP)`
        (one-vs-rest, arg-max prediction).
    Binary only
        ``sensitivity``, ``specificity`` at ``ctx.threshold``; ``sensitivity_at_spec``: highest
        sensitivity with specificity :math:`\ge` ``ctx.target_specificity``, threshold chosen per
        weight row (:func:`sensitivity_at_specificity_from_sums`).
    Multilabel (each label a binary problem at ``ctx.threshold``)
        ``auroc/<l>``, ``accuracy/<l>``, ``balanced_accuracy/<l>``, ``f1/<l>``,
        ``sensitivity/<l>``, ``specificity/<l>``, ``sensitivity_at_spec/<l>`` and their macro
        averages ``auroc``, ``accuracy``, ``balanced_accuracy``, ``f1_macro``, ``sensitivity``,
        ``specificity``, ``sensitivity_at_spec`` (NaN labels skipped, except ``auroc``, which is
        NaN when any label's AUROC is undefined).

    References
    ----------
    Hanley & McNeil, Radiology 143 (1982) 29-36 (AUROC as Mann-Whitney statistic).
    Brodersen et al., ICPR 2010 (balanced accuracy).
    """

    name: ClassVar[str] = "classification"
    tasks: ClassVar[tuple[str, ...]] = ("binary", "multiclass", "multilabel")
    higher_is_better: ClassVar[bool] = True
    headline: ClassVar[tuple[str, ...]] = ("accuracy", "balanced_accuracy", "auroc", "f1_macro")
    headline_order: ClassVar[int] = 100
    definitions: ClassVar[dict[str, str]] = {
        "accuracy": "(1/n) Σᵢ 1[ŷᵢ = yᵢ], with ŷ the arg-max class (binary: p₁ ≥ task.threshold); multilabel: per "
                    "label at the threshold, macro-averaged",
        "balanced_accuracy": "mean over the classes present of the sensitivity TP / (TP + FN) (Brodersen et al. 2010)",
        "auroc": "probability that a random positive scores above a random negative, ties counting ½ (Hanley & "
                 "McNeil 1982); multiclass: macro one-vs-rest; undefined when a class is absent",
        "f1_macro": "mean over classes of 2TP / (2TP + FP + FN)",
        "f1": "2TP / (2TP + FP + FN) of one label at task.threshold",
        "sensitivity": "TP / (TP + FN): one-vs-rest per class (arg-max prediction), binary at task.threshold",
        "specificity": "TN / (TN + FP): one-vs-rest per class (arg-max prediction), binary at task.threshold",
        "sensitivity_at_spec": "highest sensitivity whose specificity is at least task.target_specificity, the "
                               "threshold chosen on the evaluated samples",
    }

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        check_predictions(probs, labels, ctx.task, weights)
        w = _as_weights(weights, probs)
        if ctx.task == "multilabel":
            return self._multilabel(probs, labels, w, ctx)
        k = probs.shape[1]
        names = class_names(ctx, k)
        labels_in, labels = labels, labels.to(probs.device, torch.int64)
        if ctx.task == "binary":
            pred = (probs[:, 1] >= ctx.threshold).to(torch.int64)
        else:
            pred = probs.argmax(dim=1)
        eye = torch.eye(k, dtype=torch.bool, device=probs.device)
        tp, fp, fn, tn = confusion_sums(eye[labels], eye[pred], w)
        total = w.sum(dim=1)
        sens = safe_div(tp, tp + fn)
        spec = safe_div(tn, tn + fp)
        out: dict[str, Tensor] = {
            "accuracy": safe_div(tp.sum(dim=1), total),
            "balanced_accuracy": _nanmean_rows(sens),
            "f1_macro": _nanmean_rows(safe_div(2 * tp, 2 * tp + fp + fn)),
        }
        if ctx.task == "binary":
            pos, neg = _class_roc_sums(probs, labels_in, 1, labels == 1, w)
            out["auroc"] = auroc_from_sums(pos, neg)
            out["sensitivity"] = sens[:, 1]
            out["specificity"] = spec[:, 1]
            out["sensitivity_at_spec"] = sensitivity_at_specificity_from_sums(pos, neg, ctx.target_specificity)
        else:
            per_class = []
            for c in range(k):  # a loop over classes (K is small), never over resamples
                pos, neg = _class_roc_sums(probs, labels_in, c, labels == c, w)
                per_class.append(auroc_from_sums(pos, neg))
            # strict macro: NaN propagates (a class without positives makes OvR AUROC undefined)
            out["auroc"] = torch.stack(per_class, dim=1).mean(dim=1)
            for c, name in enumerate(names):
                out[f"sensitivity/{name}"] = sens[:, c]
                out[f"specificity/{name}"] = spec[:, c]
        return out

    def _multilabel(self, probs: Tensor, labels: Tensor, w: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        k = probs.shape[1]
        names = class_names(ctx, k)
        y = labels.to(probs.device).bool()
        pred = probs >= ctx.threshold
        tp, fp, fn, tn = confusion_sums(y, pred, w)  # per label: positives = label present
        total = w.sum(dim=1, keepdim=True)
        per: dict[str, Tensor] = {
            "accuracy": safe_div(tp + tn, total.expand_as(tp)),
            "sensitivity": safe_div(tp, tp + fn),
            "specificity": safe_div(tn, tn + fp),
            "f1": safe_div(2 * tp, 2 * tp + fp + fn),
        }
        per["balanced_accuracy"] = (per["sensitivity"] + per["specificity"]) / 2
        aurocs, sas = [], []
        for c in range(k):
            pos, neg = _class_roc_sums(probs, labels, c, y[:, c], w)
            aurocs.append(auroc_from_sums(pos, neg))
            sas.append(sensitivity_at_specificity_from_sums(pos, neg, ctx.target_specificity))
        per["auroc"] = torch.stack(aurocs, dim=1)
        per["sensitivity_at_spec"] = torch.stack(sas, dim=1)
        out: dict[str, Tensor] = {}
        for key, vals in per.items():
            macro_key = "f1_macro" if key == "f1" else key
            out[macro_key] = vals.mean(dim=1) if key == "auroc" else _nanmean_rows(vals)
            for c, name in enumerate(names):
                out[f"{key}/{name}"] = vals[:, c]
        return out


def _harmonic_diff(hi: Tensor, lo: Tensor) -> Tensor:
    """``H(hi) - H(lo)`` for (real) counts, ``H(n) = sum_{i<=n} 1/i = digamma(n + 1) + gamma``."""
    return torch.digamma(hi + 1) - torch.digamma(lo + 1)


def aurc_from_sorted_groups(weight_g: Tensor, error_g: Tensor) -> tuple[Tensor, Tensor]:
    r"""AURC and its optimum from per-group weights and errors in *descending* confidence order.

    Parameters
    ----------
    weight_g, error_g : Tensor ``[R, G]``
        Weighted sample count and weighted error count of each tie group of confidence.

    Returns
    -------
    aurc, aurc_optimal : Tensor ``[R]``

    Notes
    -----
    With :math:`M` samples sorted by decreasing confidence and :math:`E_i` errors among the
    first :math:`i`, :math:`\mathrm{AURC} = \frac1M \sum_{i=1}^{M} E_i / i`. Samples of equal
    confidence cannot be ordered, so within a tie group of :math:`W_g` samples and :math:`F_g`
    errors :math:`E_i` is interpolated linearly, :math:`E_{A+j} = B + j F_g / W_g`
    (:math:`A, B`: samples and errors before the group): the expectation over random tie
    breaking. Summing over the group in closed form with harmonic numbers,

    .. math:: \sum_{j=1}^{W_g} \frac{E_{A+j}}{A+j} = (B - A F_g/W_g)\,(H_{A+W_g} - H_A) + F_g.

    The optimum ranks every correct sample first (:math:`C = M - F` correct):
    :math:`\mathrm{AURC}^* = \frac1M \sum_{i=C+1}^{M} \frac{i - C}{i} = \frac{F - C\,(H_M - H_C)}{M}`,
    the exact finite-sample form of Geifman et al.'s :math:`\hat r + (1-\hat r)\ln(1-\hat r)`.
    """
    a = torch.cumsum(weight_g, dim=1) - weight_g
    b = torch.cumsum(error_g, dim=1) - error_g
    dh = _harmonic_diff(a + weight_g, a)
    rate = torch.where(weight_g > 0, error_g / torch.where(weight_g > 0, weight_g, torch.ones_like(weight_g)), torch.zeros_like(weight_g))
    area = ((b - a * rate) * dh + error_g).sum(dim=1)
    m = weight_g.sum(dim=1)
    f = error_g.sum(dim=1)
    c = m - f
    optimal_area = f - c * _harmonic_diff(m, c)
    return safe_div(area, m), safe_div(optimal_area, m)


class SelectivePredictionMetrics(Metric):
    r"""Risk-coverage metrics of max-probability confidence (lower is better for every key).

    Keys (binary and multiclass)
        ``aurc``: area under the risk-coverage curve (Geifman et al. 2019), ties in confidence
        handled by expectation over random tie breaking (:func:`aurc_from_sorted_groups`).
        ``eaurc``: excess AURC, ``aurc - aurc*`` with the exact finite-sample optimum.
        ``confident_error_rate``: fraction of *all* samples with confidence
        :math:`\ge 0.9` whose arg-max prediction is wrong.

    References
    ----------
    Geifman, Uziel & El-Yaniv, "Bias-Reduced Uncertainty Estimation for Deep Neural
    Classifiers", ICLR 2019.
    """

    name: ClassVar[str] = "selective_prediction"
    tasks: ClassVar[tuple[str, ...]] = ("binary", "multiclass")
    higher_is_better: ClassVar[bool] = False
    definitions: ClassVar[dict[str, str]] = {
        "aurc": "area under the risk-coverage curve when predictions are kept in order of decreasing confidence "
                "κ = maxₖ pₖ, ties broken at random in expectation (Geifman et al. 2019)",
        "eaurc": "AURC minus the AURC of an oracle confidence that ranks every error last (excess AURC)",
        "confident_error_rate": "share of all samples predicted wrongly with confidence κ ≥ 0.9",
    }

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        check_predictions(probs, labels, ctx.task, weights)
        w = _as_weights(weights, probs)
        conf, pred = probs.double().max(dim=1)
        wrong = pred != labels.to(probs.device, torch.int64)
        group, g = row_invariant(probs, labels, ("selective_prediction", "tie_groups"),
                                 lambda: tie_groups(conf, descending=True))
        aurc, optimal = aurc_from_sorted_groups(group_sums(w, group, g), group_sums(w, group, g, wrong))
        confident_wrong = (conf >= CONFIDENT_ERROR_THRESHOLD) & wrong
        return {
            "aurc": aurc,
            "eaurc": aurc - optimal,
            "confident_error_rate": safe_div(w @ confident_wrong.double(), w.sum(dim=1)),
        }


@hookimpl
def medaudit_metrics(config: object) -> list[Metric]:
    return [ClassificationMetrics(), SelectivePredictionMetrics()]


def near_chance(outputs: AuditOutputs, fitted_readout: bool = False) -> dict[str, Any] | None:
    """An alert record when the clean predictions are near chance (single-label tasks,
    :func:`medaudit.scoring.near_chance` of the clean balanced accuracy), else None.
    ``fitted_readout``: the predictions come from probes fitted on ``--reference`` (an encoder), so
    its labels are a cause to check too."""
    if outputs.labels.ndim != 1 or "clean" not in [s.id for s in outputs.scenarios]:
        return None
    probs = outputs.probs[outputs.index("clean")]
    ones = torch.ones(1, probs.shape[0], dtype=torch.float64)
    value = float(ClassificationMetrics().compute(probs, outputs.labels, ones, outputs.ctx)["balanced_accuracy"][0])
    k = len(outputs.ctx.classes)
    if not is_near_chance(value, k):
        return None
    return {"code": "near-chance", "scenario": "clean", "subject": "balanced_accuracy", "alert": True,
            "message": (f"the model is near chance on the clean data: balanced accuracy {value:.3f}, against "
                        f"{1.0 / k:.3f} for a constant prediction over {k} classes. Its robustness, calibration "
                        "and detection results describe a model that does not work on this data; check the input "
                        "spec (input.intensity scaling, input.mean/std, channels, size) and task.classes against "
                        "how the model was trained" + ("; the probes were fitted on --reference: check that its labels "
                                                       "match its images and the audit data's classes"
                                                       if fitted_readout else ""))}


@hookimpl
def medaudit_analyze(outputs: AuditOutputs, config: object) -> dict[str, Any] | None:
    """Flags a model near chance on clean data (:func:`near_chance`)."""
    alert = near_chance(outputs, task_of(config.task).needs_reference)  # type: ignore[attr-defined]
    return {"warnings": [alert]} if alert else None
