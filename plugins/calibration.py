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
from pydantic import Field
from torch import Tensor

from medaudit.binning import (bin_index, binned_sums, calibration_errors, clip_confidence, equal_width_edges,
                              top_label)
from medaudit.bootstrap import check_predictions, row_invariant
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext, class_names
from medaudit.scoring import negative_log_likelihood
from medaudit.settings import PluginSettings, legacy_key
from medaudit.weighted import safe_div

MEDAUDIT_API_VERSION = 1


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


@hookimpl
def medaudit_metrics(config: object) -> list[Metric]:
    return [CalibrationMetrics()]


# ---------------------------------------------------------------------------------------------
# Report section: reliability diagram, calibration table, temperature scaling (public API only)
# ---------------------------------------------------------------------------------------------

from medaudit.report.views import (  # noqa: E402  (a self-contained block: the view code of this plugin)
    Figure, Row, Table, clean_scenario, confidence_label, fmt, fmt_ci, label, perturbed_scenarios, reliability, value,
)
from medaudit.sections import ReportSection  # noqa: E402

# the calibration table's columns (class-wise ECE stays in results.json: it repeats ECE per class)
CALIBRATION_KEYS = ("ece", "ace", "mce", "brier", "nll")

CALIBRATION_TEMPLATE = """\
{% if reliability %}{% with f = reliability %}{% include "sections/_figure.html" %}{% endwith %}{% endif %}
{% with t = table %}{% include "sections/_table.html" %}{% endwith %}
{% if temperature.rows %}
<h3>Temperature scaling</h3>
<p>{{ method }} If ECE falls a lot after scaling, the model's ranking is sound and its confidence merely needs rescaling; if it stays high under a perturbation, a clean-data recalibration does not carry over to that shift.</p>
{% with t = temperature %}{% include "sections/_table.html" %}{% endwith %}
{% endif %}
"""


def reliability_figure(r: dict[str, Any], worst: int = 3) -> Figure | None:
    """Reliability curves of clean data and of the ``worst`` perturbations by ECE (each at its worst severity)."""
    clean = clean_scenario(r)
    if not clean or "reliability" not in clean.get("curves", {}):
        return None
    scored = [s for s in perturbed_scenarios(r)
              if "reliability" in s.get("curves", {}) and value(s["metrics"].get("ece")) is not None]
    # the worst scenario of each perturbation, then the worst perturbations: three severities of
    # one perturbation would say less than three different failure modes
    by_pert: dict[str, dict[str, Any]] = {}
    for s in sorted(scored, key=lambda s: (-s["metrics"]["ece"]["value"], s["id"])):
        by_pert.setdefault(s["perturbation"], s)
    chosen = sorted(by_pert.values(), key=lambda s: (-s["metrics"]["ece"]["value"], s["id"]))[:worst]
    curves = [(f"clean (ECE {fmt(value(clean['metrics'].get('ece')))})", clean["curves"]["reliability"]["bins"])]
    curves += [(f"{s['id']} (ECE {fmt(s['metrics']['ece']['value'])})", s["curves"]["reliability"]["bins"]) for s in chosen]
    kind = clean["curves"]["reliability"].get("kind", "top-label")
    alt = ("Reliability diagram (" + kind + "): bin accuracy against bin confidence for "
           + ", ".join(c[0] for c in curves) + "; the dotted diagonal is perfect calibration.")
    svg = reliability(curves, "reliability", alt)
    return Figure(svg, f"Reliability diagram ({kind}) of clean data and of the {len(chosen)} perturbations with the "
                       "highest ECE, each at its worst severity. Points below the diagonal are over-confident; marker area is proportional to "
                       "the number of samples in the bin.")


def calibration_table(r: dict[str, Any]) -> Table:
    clean = clean_scenario(r)
    keys = [k for k in CALIBRATION_KEYS if k in (clean["metrics"] if clean else {})]
    t = Table(f"Calibration per scenario with {confidence_label(r)} bootstrap CIs (lower is better).",
              ["Scenario"] + [label(k) for k in keys])
    for s in r["scenarios"]:
        t.rows.append(Row([s["id"]] + [fmt_ci(s["metrics"].get(k)) for k in keys]))
    return t


def temperature_table(r: dict[str, Any]) -> tuple[Table, str]:
    """The table of results.json ``calibration.temperature_scaling`` and a sentence on its method."""
    ts = r.get("calibration", {}).get("temperature_scaling") or {}
    t = Table("Temperature scaling: calibration before and after dividing the logits by the temperature fitted on "
              "clean data (clean row: cross-fitted, so no sample is calibrated by a temperature fitted on itself).",
              ["Scenario", "ECE before", "ECE after", "NLL before", "NLL after", "Cross-fitted"])
    for sid, row in ts.get("scenarios", {}).items():
        t.rows.append(Row([sid, fmt(row.get("ece_before")), fmt(row.get("ece_after")), fmt(row.get("nll_before")),
                           fmt(row.get("nll_after")), fmt(bool(row.get("cross_fitted")))]))
    temp = ts.get("temperature")
    temp_text = ", ".join(fmt(x) for x in temp) if isinstance(temp, list) else fmt(temp)
    method = f"{ts['method'][:1].upper()}{ts['method'][1:]}. Fitted temperature T = {temp_text}." if ts else ""
    return t, method


def calibration_finding(r: dict[str, Any]) -> str | None:
    clean = clean_scenario(r)
    scored = [s for s in perturbed_scenarios(r) if value(s["metrics"].get("ece")) is not None]
    if not clean or not scored or value(clean["metrics"].get("ece")) is None:
        return None
    worst = max(scored, key=lambda s: (s["metrics"]["ece"]["value"], s["id"]))
    return (f"Calibration error (ECE) rises from {fmt(clean['metrics']['ece']['value'])} on clean data to "
            f"{fmt(worst['metrics']['ece']['value'])} under {worst['id']}.")


@hookimpl
def medaudit_report_sections(results: dict[str, Any]) -> list[ReportSection]:
    clean = clean_scenario(results)
    if not clean or not any(k in clean["metrics"] for k in CALIBRATION_KEYS):
        return []  # this plugin's metrics did not run (another task, or the plugin failed)
    temperature, method = temperature_table(results)
    finding = calibration_finding(results)
    return [ReportSection(
        id="calibration", title="Calibration", template=CALIBRATION_TEMPLATE, order=410,
        context={"reliability": reliability_figure(results), "table": calibration_table(results),
                 "temperature": temperature, "method": method},
        findings=[finding] if finding else [])]


class CalibrationSettings(PluginSettings):
    """``plugins.calibration`` (formerly ``audit.n_bins``).

    The metrics read the bin count from ``MetricContext.n_bins``, which the core fills from
    ``audit.n_bins``, the alias this setting keeps in step: the subgroup ECE and the
    temperature-scaling report bin with the same count without naming this plugin.
    """

    n_bins: int = Field(15, ge=2, description="bins of the calibration metrics",
                        json_schema_extra=legacy_key("audit.n_bins"))


@hookimpl
def medaudit_settings() -> type[PluginSettings]:
    return CalibrationSettings
