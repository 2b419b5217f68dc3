"""Calibration metrics, weighted and batched over resamples, binned exactly as netcal bins.

Binned metrics follow ``netcal.metrics`` 1.x (``_Miscalibration``) so that values can be checked
against it:

* confidences are clipped to ``[eps, 1 - eps]`` with ``eps`` the machine epsilon of the input
  dtype, so a confidence of exactly 1.0 falls in the last bin (and 0.0 in the first);
* equal-width edges are ``numpy.linspace(0, 1, n_bins + 1)``; a value on an inner edge goes to
  the bin above (``searchsorted(side="right")``, as ``numpy.histogramdd``);
* empty bins are left out (netcal ``sample_threshold = 1``).

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

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from medaudit.bootstrap import check_predictions, row_invariant
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext
from medaudit.settings import PluginSettings, legacy_key

from .classification import class_names, safe_div

MEDAUDIT_API_VERSION = 1

_NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# Binning helpers
# ---------------------------------------------------------------------------------------------


def clip_confidence(x: Tensor) -> Tensor:
    """Clip to ``[eps, 1 - eps]`` (eps of ``x``'s dtype, as netcal) and promote to float64."""
    eps = torch.finfo(x.dtype).eps
    return x.clamp(eps, 1.0 - eps).double()


def equal_width_edges(n_bins: int, device: torch.device | None = None) -> Tensor:
    """``numpy.linspace(0, 1, n_bins + 1)`` as float64, bit-identical to netcal's edges."""
    return torch.from_numpy(np.linspace(0.0, 1.0, n_bins + 1)).to(device)


def bin_index(values: Tensor, edges: Tensor) -> Tensor:
    """Bin of each value: ``[lo, hi)`` bins, the last one closed (``numpy.histogramdd``).

    ``edges`` is ``[B + 1]`` (shared) or ``[R, B + 1]`` (one set per row, with ``values`` ``[R, N]``).
    """
    n_bins = edges.shape[-1] - 1
    return (torch.searchsorted(edges.contiguous(), values.contiguous(), right=True) - 1).clamp_(0, n_bins - 1)


def binned_sums(
    weights: Tensor, index: Tensor, n_bins: int, confidence: Tensor, hit: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted count, confidence sum and hit sum per bin, each ``[R, n_bins]``.

    ``index`` is ``[N]`` (bins shared by every row) or ``[R, N]`` (per-row bins, ACE).
    """
    r = weights.shape[0]
    zeros = torch.zeros(r, n_bins, dtype=torch.float64, device=weights.device)
    wc, wh = weights * confidence, weights * hit
    if index.ndim == 1:
        return zeros.index_add(1, index, weights), zeros.index_add(1, index, wc), zeros.index_add(1, index, wh)
    return zeros.scatter_add(1, index, weights), zeros.scatter_add(1, index, wc), zeros.scatter_add(1, index, wh)


def ece_mce_ace_from_bins(count: Tensor, conf_sum: Tensor, hit_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""ECE, MCE and the mean bin gap from per-bin sums ``[R, B]``.

    .. math:: \mathrm{ECE} = \sum_b \frac{n_b}{n}\,|\bar a_b - \bar c_b|, \quad
              \mathrm{MCE} = \max_{b: n_b > 0} |\bar a_b - \bar c_b|, \quad
              \text{gap} = \frac{1}{|\{b: n_b>0\}|}\sum_{b: n_b>0} |\bar a_b - \bar c_b|

    (the last is ACE when the bins are equal-mass). All NaN on a row of total weight 0.
    """
    nonempty = count > 0
    gap = torch.where(nonempty, (hit_sum - conf_sum).abs() / torch.where(nonempty, count, torch.ones_like(count)), torch.zeros_like(count))
    total = count.sum(dim=1)
    ece = safe_div((gap * count).sum(dim=1), total)
    mce = torch.where(total > 0, gap.amax(dim=1), torch.full_like(total, _NAN))
    mean_gap = safe_div(gap.sum(dim=1), nonempty.sum(dim=1).to(gap.dtype))
    return ece, mce, mean_gap


def weighted_quantile_edges(values: Tensor, weights: Tensor, n_bins: int) -> Tensor:
    r"""Equal-mass bin edges per weight row, ``[R, n_bins + 1]``, first edge 0 and last 1.

    For integer weights, row ``r`` equals ``numpy.quantile(np.repeat(values, w_r), q)`` at
    ``q = linspace(0, 1, n_bins + 1)`` (linear interpolation between order statistics
    :math:`x_{(\lfloor h\rfloor)}` and :math:`x_{(\lfloor h\rfloor + 1)}`, :math:`h = q (M-1)`),
    with the outer edges set to 0 and 1 as netcal's ACE does. The values are sorted once;
    order statistics of every row come from one batched ``searchsorted`` on cumulative counts.
    """
    order = torch.argsort(values)
    return _quantile_edges_sorted(values[order], torch.cumsum(weights[:, order], dim=1), n_bins)


def _quantile_edges_sorted(sorted_vals: Tensor, cum: Tensor, n_bins: int) -> Tensor:
    """:func:`weighted_quantile_edges` from the sorted values and each row's cumulative weights in that order."""
    m = cum[:, -1:]  # [R, 1]
    q = torch.from_numpy(np.linspace(0.0, 1.0, n_bins + 1)).to(sorted_vals.device)
    h = q[None, :] * (m - 1).clamp_min(0)
    lo = torch.floor(h)
    frac = h - lo
    hi = torch.minimum(lo + 1, (m - 1).clamp_min(0))

    def order_stat(j: Tensor) -> Tensor:
        # j-th (0-based) value of the expanded sample: first sorted position whose cumulative count exceeds j
        pos = torch.searchsorted(cum.contiguous(), j.contiguous(), right=True).clamp_(max=sorted_vals.numel() - 1)
        return sorted_vals[pos]

    a, b = order_stat(lo), order_stat(hi)
    diff = b - a
    # numpy's _lerp: interpolate from the nearer end, so edges hit sample values exactly as numpy's do
    edges = torch.where(frac >= 0.5, b - diff * (1 - frac), a + diff * frac)
    edges[:, 0] = 0.0
    edges[:, -1] = 1.0
    return edges


def top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence (clipped, float64) and hit (1.0 when the arg-max is right)."""
    clipped = clip_confidence(probs)
    conf, pred = clipped.max(dim=1)
    return conf, (pred == labels.to(probs.device, torch.int64)).double()


def _sorted_bin_sums(prefix: Tensor, bounds: Tensor) -> Tensor:
    """Per-bin sums ``[R, B]`` from prefix sums ``[R, N + 1]`` of values in sorted order and the
    bins' sorted-position bounds ``[B + 1]`` (shared) or ``[R, B + 1]`` (per row)."""
    at = prefix.gather(1, bounds.expand(prefix.shape[0], -1))
    return at[:, 1:] - at[:, :-1]


def calibration_errors(conf: Tensor, hit: Tensor, weights: Tensor, n_bins: int,
                       presorted: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """``ece``, ``mce`` (equal-width bins) and ``ace`` (equal-mass bins) of one confidence/hit pair.

    Both binnings are read from the same prefix sums: in confidence order every bin, of either
    kind and of any weight row, is a run of consecutive samples, bounded by where its edges fall
    among the sorted confidences (a value on an edge belongs to the bin above, as in
    :func:`bin_index`), so its weighted count, confidence and hit sums are differences of prefix
    sums. Each row costs three cumulative sums instead of a scatter per binning and sum.

    Parameters
    ----------
    conf : Tensor ``[N]`` float64, already clipped (see :func:`clip_confidence`).
    hit : Tensor ``[N]`` float64 in {0, 1}.
    weights : Tensor ``[R, N]`` float64.
    n_bins : int
    presorted : (Tensor, Tensor), optional
        ``torch.sort(conf)`` when the caller already has it.

    Returns
    -------
    dict of ``[R]`` tensors.
    """
    r, n = weights.shape
    sorted_conf, order = presorted if presorted is not None else torch.sort(conf)
    w = torch.gather(weights, 1, order.expand(r, n))  # 3x faster than weights[:, order] on a CPU
    # prefix sums with a leading zero column: count, confidence and hit mass of the first k samples
    sums = weights.new_zeros(3, r, n + 1)
    torch.cumsum(w, dim=1, out=sums[0, :, 1:])
    torch.cumsum(w * sorted_conf, dim=1, out=sums[1, :, 1:])
    torch.cumsum(w * hit[order], dim=1, out=sums[2, :, 1:])
    cum = sums[0, :, 1:]

    def bounds(edges: Tensor) -> Tensor:
        # first sorted position at or above each inner edge; the outer edges 0 and 1 enclose every
        # clipped confidence, and a value beyond them would be clamped into the outer bins anyway
        inner = torch.searchsorted(sorted_conf, edges[..., 1:-1].contiguous(), right=False)
        ends = inner.new_zeros(*inner.shape[:-1], 1)
        return torch.cat([ends, inner, ends + n], dim=-1)

    ece, mce, _ = ece_mce_ace_from_bins(*(_sorted_bin_sums(p, bounds(equal_width_edges(n_bins, conf.device))) for p in sums))
    equal_mass = bounds(_quantile_edges_sorted(sorted_conf, cum, n_bins))
    _, _, ace = ece_mce_ace_from_bins(*(_sorted_bin_sums(p, equal_mass) for p in sums))
    return {"ece": ece, "mce": mce, "ace": ace}


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

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        check_predictions(probs, labels, ctx.task, weights)
        w = weights.to(device=probs.device, dtype=torch.float64)
        total = w.sum(dim=1)
        eps = torch.finfo(probs.dtype).eps
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
            pc = p.clamp(eps, 1 - eps)
            bce = -(y * torch.log(pc) + (1 - y) * torch.log1p(-pc)).sum(dim=1)
            out["nll"] = safe_div(w @ bce, total)
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
        p_true = p.gather(1, labels[:, None])[:, 0].clamp_min(eps)
        out["nll"] = safe_div(w @ -torch.log(p_true), total)
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
