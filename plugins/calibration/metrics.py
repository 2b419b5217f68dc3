"""Calibration metrics, weighted and batched over resamples, binned exactly as netcal bins.

Binned metrics follow ``netcal.metrics`` 1.x (``_Miscalibration``) so that values can be checked
against it; the binning conventions (clipping, edges, empty bins) are those of
:mod:`medaudit.binning`, which holds the binning and the ECE/MCE/ACE computation, and the NLL is
:func:`medaudit.scoring.negative_log_likelihood`.

Where we differ from netcal, on purpose: netcal's ``measure(probs, labels)`` switches to its
*binary* mode whenever at most two distinct labels occur in the data it is given. For a binary
task this makes it measure positive-class calibration (``p_1`` against ``y``), and for a
multiclass subset holding two classes it raises. medaudit's ``ece``/``ace``/``mce`` are
always **top-label** (confidence = max probability, hit = arg-max is right), whatever labels a
subset or resample holds, so values are comparable across scenarios, subgroups and resamples.
Top-label ECE equals netcal's ECE of ``(max probability, correct)`` in binary mode, and the
positive-class ECE of a binary task is our ``classwise_ece`` term of class 1.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from medaudit.binning import (bin_index, binned_sums, calibration_errors, clip_confidence, equal_width_edges,
                              top_label)
from medaudit.bootstrap import check_predictions, row_invariant
from medaudit.metric import Metric, MetricContext, class_names
from medaudit.scoring import negative_log_likelihood
from medaudit.weighted import safe_div

# ---------------------------------------------------------------------------------------------
# Class-wise ECE (binning itself: medaudit.binning)
# ---------------------------------------------------------------------------------------------


def classwise_columns(probs: Tensor, labels_onehot: Tensor, n_bins: int) -> Tensor:
    """``[N, 2 K B]`` columns of :func:`classwise_ece`: each sample's confidence and hit in its bin, per class."""
    n, k = probs.shape
    conf = clip_confidence(probs)  # [N, K]
    hit = labels_onehot.double()
    member = torch.nn.functional.one_hot(bin_index(conf, equal_width_edges(n_bins, probs.device)), n_bins).double()  # [N, K, B]
    return torch.cat([member * conf[..., None], member * hit[..., None]], dim=1).reshape(n, 2 * k * n_bins)


def classwise_ece(probs: Tensor, labels_onehot: Tensor, weights: Tensor, n_bins: int,
                  columns: Tensor | None = None) -> Tensor:
    r"""Per-class equal-width ECE of :math:`p_k` against :math:`1[y = k]`, ``[R, K]``.

    The bins do not depend on the weight row, so every class's confidence and hit sums per bin
    are one matrix product of the weights with ``[N, 2 K B]`` bin-membership columns
    (:func:`classwise_columns`, which a caller that has them passes as ``columns``).
    """
    k = probs.shape[1]
    if columns is None:
        columns = classwise_columns(probs, labels_onehot, n_bins)
    sums = (weights @ columns).reshape(-1, 2, k, n_bins)
    gap = (sums[:, 1] - sums[:, 0]).abs().sum(dim=2)  # sum_b |sum hit - sum conf| per class
    return safe_div(gap, weights.sum(dim=1, keepdim=True).expand(-1, k))


# ---------------------------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------------------------


class CalibrationMetrics(Metric):
    r"""Calibration of the predicted probabilities (lower is better for every key).

    Keys, binary and multiclass
        ``ece``: top-label expected calibration error, ``ctx.n_bins`` equal-width bins
        (Naeini et al. 2015; Guo et al. 2017), :math:`\sum_b \frac{n_b}{n}|\mathrm{acc}_b - \mathrm{conf}_b|`.
        ``ace``: the same gap averaged over non-empty equal-mass bins (netcal's ACE;
        Nixon et al. 2019 "adaptive calibration error" without the class loop).
        ``mce``: maximum gap over non-empty equal-width bins.
        ``classwise_ece``: mean over classes of the equal-width ECE of :math:`p_k` against
        :math:`1[y=k]` (Kull et al. 2019).
        ``brier``: :math:`\frac1n\sum_i\sum_k (p_{ik} - 1[y_i=k])^2` (Brier 1950; for a binary
        task this is twice ``sklearn.metrics.brier_score_loss``).
        ``nll``: :math:`-\frac1n\sum_i \log \max(p_{i y_i}, \epsilon)`.
    Multilabel (each label a binary problem, positive-class calibration)
        ``ece/<l>``, ``ace/<l>``, ``mce/<l>`` and macro means ``ece``, ``ace``, ``mce``;
        ``brier`` :math:`= \frac1n\sum_i\sum_l (p_{il} - y_{il})^2`; ``nll``
        :math:`= \frac1n\sum_i\sum_l \mathrm{BCE}(p_{il}, y_{il})` (the negative log-likelihood of
        the label vector under independent sigmoids).

    Always computed on probabilities: a model that outputs logits is soft-maxed by the core
    before metrics run, and :func:`medaudit.bootstrap.check_predictions` rejects rows that are
    not probabilities.

    References
    ----------
    Naeini, Cooper & Hauskrecht, AAAI 2015. Guo et al., ICML 2017. Nixon et al., CVPR-W 2019.
    Kull et al., NeurIPS 2019. Küppers et al., netcal (github.com/EFS-OpenSource/calibration-framework).
    """

    name: ClassVar[str] = "calibration"
    tasks: ClassVar[tuple[str, ...]] = ("binary", "multiclass", "multilabel")
    higher_is_better: ClassVar[bool] = False
    headline: ClassVar[tuple[str, ...]] = ("ece", "brier", "nll")
    headline_order: ClassVar[int] = 200
    definitions: ClassVar[dict[str, str]] = {
        "ece": "Σ_b (n_b / n) |acc_b − conf_b| over equal-width bins of the top-label confidence "
               "(plugins.calibration.n_bins, 15 by default; Naeini et al. 2015, Guo et al. 2017); multilabel: mean "
               "over labels of each label's ECE",
        "ace": "mean over equal-mass bins of |acc_b − conf_b| (Nixon et al. 2019)",
        "mce": "max_b |acc_b − conf_b| over non-empty bins: the maximum calibration error (not the mean corruption "
               "error, mCE)",
        "classwise_ece": "mean over classes of the ECE of p_k against 1[y = k] (Kull et al. 2019)",
        "brier": "(1/n) Σᵢ Σₖ (pᵢₖ − 1[yᵢ = k])² (Brier 1950; for a binary task twice scikit-learn's "
                 "brier_score_loss)",
        "nll": "−(1/n) Σᵢ log pᵢ,yᵢ (multilabel: (1/n) Σᵢ of the binary cross-entropies summed over labels, the "
               "label vector's negative log-likelihood under independent sigmoids)",
    }

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        check_predictions(probs, labels, ctx.task, weights)
        w = weights.to(device=probs.device, dtype=torch.float64)
        total = w.sum(dim=1)
        p = probs.double()
        n, k = probs.shape
        if ctx.task == "multilabel":
            y = labels.to(probs.device).double()
            conf = clip_confidence(probs)
            out: dict[str, Tensor] = {}
            per: dict[str, list[Tensor]] = {"ece": [], "ace": [], "mce": []}
            for c, name in enumerate(class_names(ctx, k)):  # loop over labels, never resamples
                order = row_invariant(probs, labels, ("calibration", "sorted_conf", c), lambda: torch.sort(conf[:, c]))
                errs = calibration_errors(conf[:, c], y[:, c], w, ctx.n_bins, order)
                for key, val in errs.items():
                    per[key].append(val)
                    out[f"{key}/{name}"] = val
            for key, vals in per.items():
                out[key] = torch.nanmean(torch.stack(vals, dim=1), dim=1)
            out["brier"] = safe_div(w @ ((p - y) ** 2).sum(dim=1), total)
            out["nll"] = negative_log_likelihood(probs, labels, w, ctx.task)
            return out
        labels_in, labels = labels, labels.to(probs.device, torch.int64)
        onehot = torch.nn.functional.one_hot(labels, k).double()
        conf, hit = top_label(probs, labels)
        order = row_invariant(probs, labels_in, ("calibration", "sorted_conf"), lambda: torch.sort(conf))
        out = calibration_errors(conf, hit, w, ctx.n_bins, order)
        columns = row_invariant(probs, labels_in, ("calibration", "classwise_columns"),
                                lambda: classwise_columns(probs, onehot, ctx.n_bins))
        out["classwise_ece"] = classwise_ece(probs, onehot, w, ctx.n_bins, columns).mean(dim=1)
        out["brier"] = safe_div(w @ ((p - onehot) ** 2).sum(dim=1), total)
        out["nll"] = negative_log_likelihood(probs, labels, w, ctx.task)
        return out

    def curves(self, probs: Tensor, labels: Tensor, ctx: MetricContext) -> dict[str, Any] | None:
        """Reliability-diagram data of the point estimate.

        Returns
        -------
        ``{"reliability": {"kind", "bins": [{"lower", "upper", "confidence", "accuracy",
        "count"}, ...]}}`` over ``ctx.n_bins`` equal-width bins; ``confidence`` and
        ``accuracy`` are ``None`` for empty bins. Binary/multiclass: top-label confidence
        against accuracy. Multilabel: every (sample, label) probability against the label's
        frequency (positive-class reliability, pooled over labels).
        """
        check_predictions(probs, labels, ctx.task)
        if ctx.task == "multilabel":
            conf = clip_confidence(probs).reshape(-1)
            hit = labels.to(probs.device).double().reshape(-1)
            kind = "positive-class (pooled over labels)"
        else:
            conf, hit = top_label(probs, labels)
            kind = "top-label"
        edges = equal_width_edges(ctx.n_bins, conf.device)
        ones = torch.ones(1, conf.numel(), dtype=torch.float64, device=conf.device)
        count, conf_sum, hit_sum = (t[0] for t in binned_sums(ones, bin_index(conf, edges), ctx.n_bins, conf, hit))
        bins = []
        for b in range(ctx.n_bins):
            c = float(count[b])
            bins.append(
                {
                    "lower": float(edges[b]),
                    "upper": float(edges[b + 1]),
                    "confidence": float(conf_sum[b]) / c if c else None,
                    "accuracy": float(hit_sum[b]) / c if c else None,
                    "count": int(round(c)),
                }
            )
        return {"reliability": {"kind": kind, "bins": bins}}
