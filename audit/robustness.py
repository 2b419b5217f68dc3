r"""Degradation summaries over perturbation severities, and a clean-normalised mean corruption error.

For every perturbation :math:`p`, metric :math:`m` and severity :math:`s \in S_p` (the severities
audited, a subset of 1..5; severity 0 is the clean scenario):

* ``values[s]``: :math:`m_{p,s}`; ``drop[s]``: the degradation oriented so that positive is worse,
  :math:`m_0 - m_{p,s}` when higher is better and :math:`m_{p,s} - m_0` otherwise;
  ``relative_drop[s]``: ``drop[s] / m_0`` (``None`` when :math:`m_0 = 0`).
* ``auc``: normalised area under the degradation curve,
  :math:`\frac{1}{s_{\max}} \int_0^{s_{\max}} m_p(s)\,ds` by the trapezoid rule over the
  points :math:`(0, m_0), (s, m_{p,s})_{s\in S_p}`. It is the curve's mean level, in the metric's
  own units and direction (equal to :math:`m_0` for a model the perturbation does not affect),
  so it can be compared across perturbations and metrics of one kind.
  ``relative_auc`` = ``auc / m_0``.
* ``worst_severity``: the lowest severity at which the worst value is reached.

Suite level, in the spirit of ImageNet-C's mCE (Hendrycks & Dietterich 2019) but with the
model's own clean error as the normaliser instead of AlexNet's (there is no reference model in
an audit). With error :math:`e = 1 - m` for higher-is-better metrics (all of which are in
[0, 1]) and :math:`e = m` for lower-is-better ones,

.. math:: \mathrm{CE}_p = \frac{\sum_{s\in S_p} e_{p,s}}{|S_p|\; e_0}, \qquad
          \mathrm{mCE} = \frac{1}{|P|}\sum_p \mathrm{CE}_p .

``CE_p = 1`` means no degradation, 2 means the error doubles on average over severities. The
ratio is undefined when the clean error is 0 (perfect clean accuracy, or a calibration error of
exactly 0): ``ce``/``mce`` are then ``None`` and the absolute
:math:`\Delta\mathrm{CE}_p = \frac{1}{|S_p|}\sum_s e_{p,s} - e_0` (``mean_error_increase``,
always defined) carries the information instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .outputs import Scenario

__all__ = ["breaking_points", "summarize"]


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _value(metrics: Mapping[str, Mapping[str, Any]] | None, key: str) -> float | None:
    if not metrics or key not in metrics:
        return None
    entry = metrics[key]
    return _num(entry.get("value") if isinstance(entry, Mapping) else entry)


def _trapezoid_mean(points: list[tuple[float, float]]) -> float:
    xs, ys = zip(*points)
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def summarize(
    scenario_metrics: dict[str, dict[str, dict]],
    scenarios: list[Scenario],
    directions: dict[str, bool],
) -> dict:
    """Summarise how each metric degrades under each perturbation, and a suite-level mCE.

    Parameters
    ----------
    scenario_metrics : dict
        ``{scenario_id: {metric_key: {"value", "ci_low", "ci_high"}}}``; must hold ``"clean"``.
    scenarios : list of Scenario
        The clean scenario and every perturbed one (``perturbation``, ``suite``, ``severity``).
    directions : dict
        ``{metric_key: higher_is_better}``; keys absent here are skipped.

    Returns
    -------
    dict (JSON-ready; undefined numbers are ``None``)::

        {"perturbations": {name: {"suite": str | None, "metrics": {key: {
             "higher_is_better", "clean", "severities": [1, ...],
             "values": {"1": v, ...}, "drop": {"1": d, ...}, "relative_drop": {"1": r, ...},
             "auc", "relative_auc", "worst_severity", "worst_value", "ce", "mean_error_increase"}}}},
         "suites": {suite: {key: {"mce", "mean_error_increase", "n_perturbations"}}},
         "mce": {key: {"value", "mean_error_increase", "n_perturbations"}}}

    Notes
    -----
    See the module docstring for the formulas. A perturbation whose value is undefined at any
    audited severity gets ``auc = None``, ``ce = None`` for that metric and is left out of the
    mCE (``n_perturbations`` counts those included).
    """
    clean_id = Scenario.clean().id
    if clean_id not in scenario_metrics:
        raise ValueError(f"scenario_metrics has no {clean_id!r} scenario to measure drops from")
    clean = scenario_metrics[clean_id]

    by_perturbation: dict[str, list[Scenario]] = {}
    for sc in scenarios:
        if sc.perturbation is not None and sc.id in scenario_metrics:
            by_perturbation.setdefault(sc.perturbation, []).append(sc)

    perturbations: dict[str, Any] = {}
    ce_by_key: dict[str, list[tuple[str | None, float | None, float]]] = {}
    for name, scs in by_perturbation.items():
        scs = sorted(scs, key=lambda s: s.severity)
        entry: dict[str, Any] = {"suite": scs[0].suite, "metrics": {}}
        for key, higher in directions.items():
            m0 = _value(clean, key)
            if key not in clean:
                continue
            sev_values = [(sc.severity, _value(scenario_metrics[sc.id], key)) for sc in scs]
            values = {str(s): v for s, v in sev_values}
            drop: dict[str, float | None] = {}
            rel: dict[str, float | None] = {}
            for s, v in sev_values:
                d = None if v is None or m0 is None else (m0 - v if higher else v - m0)
                drop[str(s)] = d
                rel[str(s)] = None if d is None or not m0 else d / m0
            complete = m0 is not None and all(v is not None for _, v in sev_values)
            auc = _trapezoid_mean([(0.0, m0)] + [(float(s), v) for s, v in sev_values]) if complete else None
            defined = [(s, v) for s, v in sev_values if v is not None]
            worst_s, worst_v = None, None
            if defined:
                target = min(v for _, v in defined) if higher else max(v for _, v in defined)
                worst_s, worst_v = next((s, v) for s, v in defined if v == target)
            ce = increase = None
            if complete:
                errors = [(1.0 - v) if higher else v for _, v in sev_values]
                e0 = (1.0 - m0) if higher else m0
                mean_err = sum(errors) / len(errors)
                increase = mean_err - e0
                ce = mean_err / e0 if e0 > 0 else None
                ce_by_key.setdefault(key, []).append((scs[0].suite, ce, increase))
            entry["metrics"][key] = {
                "higher_is_better": bool(higher),
                "clean": m0,
                "severities": [s for s, _ in sev_values],
                "values": values,
                "drop": drop,
                "relative_drop": rel,
                "auc": auc,
                "relative_auc": None if auc is None or not m0 else auc / m0,
                "worst_severity": worst_s,
                "worst_value": worst_v,
                "ce": ce,
                "mean_error_increase": increase,
            }
        perturbations[name] = entry

    def aggregate(rows: list[tuple[str | None, float | None, float]]) -> dict[str, Any]:
        ces = [c for _, c, _ in rows]
        return {
            # one undefined CE_p (clean error 0) makes the whole mean undefined: it is the same e_0
            "mce": None if not rows or any(c is None for c in ces) else sum(ces) / len(ces),
            "mean_error_increase": sum(i for _, _, i in rows) / len(rows) if rows else None,
            "n_perturbations": len(rows),
        }

    suites: dict[str, dict[str, Any]] = {}
    mce: dict[str, Any] = {}
    for key, rows in ce_by_key.items():
        overall = aggregate(rows)
        mce[key] = {"value": overall["mce"], "mean_error_increase": overall["mean_error_increase"],
                    "n_perturbations": overall["n_perturbations"]}
        for suite in sorted({s for s, _, _ in rows if s is not None}):
            suites.setdefault(suite, {})[key] = aggregate([r for r in rows if r[0] == suite])
    return {"perturbations": perturbations, "suites": suites, "mce": mce}


def breaking_points(
    scenario_drops: dict[str, dict[str, dict]],
    scenarios: list[Scenario],
    keys: list[str],
    margins: Mapping[str, float],
    stress_tests: Mapping[str, bool],
) -> dict:
    """The lowest severity at which each perturbation breaks each metric.

    A perturbation *breaks* metric ``m`` at severity ``s`` when the paired-bootstrap drop from
    clean (positive = worse) significantly exceeds the metric's margin: the lower end of the
    drop's interval is above ``margins[m]`` (``margins["*"]`` for metrics not named). A drop
    that is significant but within the margin does not break; without bootstrap intervals
    nothing can break.

    Parameters
    ----------
    scenario_drops : dict
        ``{scenario_id: {metric_key: {"value", "ci_low", "ci_high", "significant"}}}``.
    scenarios : list of Scenario
        Every audited scenario; the perturbed ones are grouped by perturbation.
    keys : list of str
        The metrics to judge (the headline metrics and any named in ``margins``).
    margins : mapping
        Metric key → margin in the metric's units; ``"*"`` for every other key.
    stress_tests : mapping
        Perturbation → whether it is a stress test for the audited modality.

    Returns
    -------
    dict (JSON-ready)::

        {name: {"stress_test": bool, "metrics": {key: {
            "margin", "severity" (int or None), "drop", "ci_low", "ci_high",
            "worst_drop" (the largest drop over severities, or None)}}}}

    ``drop``/``ci_low``/``ci_high`` are the drop at the breaking severity (None when it does not break).
    """
    by_perturbation: dict[str, list[Scenario]] = {}
    for sc in scenarios:
        if sc.perturbation is not None and sc.id in scenario_drops:
            by_perturbation.setdefault(sc.perturbation, []).append(sc)
    out: dict[str, Any] = {}
    for name in sorted(by_perturbation):
        scs = sorted(by_perturbation[name], key=lambda s: s.severity)
        metrics: dict[str, Any] = {}
        for key in keys:
            margin = float(margins.get(key, margins.get("*", 0.0)))
            entries = [(sc.severity, scenario_drops[sc.id].get(key)) for sc in scs]
            if not any(d for _, d in entries):
                continue
            point: dict[str, Any] = {"margin": margin, "severity": None, "drop": None, "ci_low": None, "ci_high": None}
            for severity, d in entries:
                low = _num((d or {}).get("ci_low"))
                if d and d.get("significant") and low is not None and low > margin:
                    point.update(severity=severity, drop=_num(d.get("value")), ci_low=low, ci_high=_num(d.get("ci_high")))
                    break
            drops = [v for v in (_num((d or {}).get("value")) for _, d in entries) if v is not None]
            point["worst_drop"] = max(drops) if drops else None
            metrics[key] = point
        out[name] = {"stress_test": bool(stress_tests.get(name, False)), "metrics": metrics}
    return out
