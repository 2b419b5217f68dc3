"""The ood plugin's report section: shift detection per scenario and detector, and failure detection.

Built on the public view helpers only (:mod:`medaudit.report.views`), as a third party's section.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from medaudit.report.views import (
    Figure, Row, Series, Table, confidence_label, degradation, detectors, fmt_ci, label, perturbed_scenarios,
)
from medaudit.sections import ReportSection

OOD_STATS = (("auroc", "AUROC"), ("aupr", "AUPR"), ("fpr95", "FPR@95%TPR"))

OOD_TEMPLATE = """\
{% if ood.rows %}
{% if figure %}{% with f = figure %}{% include "sections/_figure.html" %}{% endwith %}{% endif %}
{% with t = ood %}{% include "sections/_table.html" %}{% endwith %}
{% else %}
<p class="empty">No detectors ran: this results file holds no shift-detection scores (no detector plugin was installed or none applied to this model; <code>audit.detectors</code> selects them).</p>
{% endif %}
<h3>Failure detection</h3>
{% if failure.rows %}
{% with t = failure %}{% include "sections/_table.html" %}{% endwith %}
{% else %}
<p class="empty">No failure-detection results were recorded.</p>
{% endif %}
"""


def ood_table(r: dict[str, Any]) -> Table:
    t = Table(f"Shift detection per scenario and detector: how well each detector's score separates the perturbed "
              f"samples from clean ones ({confidence_label(r)} CIs). AUROC 0.5 is chance; FPR@95%TPR is the share of "
              "clean samples flagged when 95% of shifted ones are (lower is better).",
              ["Scenario", "Detector"] + [h for _, h in OOD_STATS])
    for s in r["scenarios"]:
        for det in sorted(s.get("ood", {})):
            stats = s["ood"][det]
            t.rows.append(Row([s["id"], det] + [fmt_ci(stats.get(k)) for k, _ in OOD_STATS]))
    return t


def ood_figure(r: dict[str, Any]) -> Figure | None:
    """Detector AUROC against severity, one panel per suite, averaged over the suite's perturbations."""
    dets = detectors(r)
    panels = []
    for suite in sorted({s.get("suite") or "other" for s in perturbed_scenarios(r)}) if dets else []:
        series = []
        for det in dets:
            by_sev: dict[int, list[float]] = defaultdict(list)
            for s in perturbed_scenarios(r):
                v = s.get("ood", {}).get(det, {}).get("auroc", {}).get("value")
                if (s.get("suite") or "other") == suite and v is not None:
                    by_sev[s["severity"]].append(v)
            if by_sev:
                sev = sorted(by_sev)
                series.append(Series(det, sev, [sum(by_sev[k]) / len(by_sev[k]) for k in sev]))
        if series:
            panels.append((suite, "AUROC (mean over perturbations)", series))
    if not panels:
        return None
    alt = ("Shift-detection AUROC against severity per detector (" + ", ".join(dets) + "), one panel per suite ("
           + ", ".join(p[0] for p in panels) + "), averaged over the suite's perturbations.")
    return Figure(degradation(panels, "ood", alt, [True] * len(panels), xlabel="severity", chance=0.5),
                  "Detector AUROC against severity, averaged over each suite's perturbations; the dotted line is chance "
                  "(0.5). results.json keeps no per-sample scores, so ROC curves cannot be drawn from it; this summary "
                  "replaces them (run with --save-predictions to keep the scores).")


def failure_table(r: dict[str, Any]) -> Table:
    keys = sorted({k for s in r["scenarios"] for k in s.get("failure_detection", {})})
    t = Table(f"Failure detection: AUROC of each detector's score at separating the model's wrong predictions from "
              f"its correct ones, per scenario ({confidence_label(r)} CIs; higher is better).",
              ["Scenario"] + [label(k) for k in keys])
    for s in r["scenarios"]:
        if s.get("failure_detection"):
            t.rows.append(Row([s["id"]] + [fmt_ci(s["failure_detection"].get(k)) for k in keys]))
    return t


def ood_finding(r: dict[str, Any]) -> str | None:
    means = {}
    for det in detectors(r):
        vals = [s["ood"][det]["auroc"]["value"] for s in perturbed_scenarios(r)
                if s.get("ood", {}).get(det, {}).get("auroc", {}).get("value") is not None]
        if vals:
            means[det] = sum(vals) / len(vals)
    if not means:
        return None
    det = min(means, key=lambda d: (means[d], d))
    return (f"The weakest shift detector is {det}: mean AUROC {means[det]:.3f} over the perturbed scenarios "
            f"(0.5 is chance), so shifted inputs often go unflagged by it.")


def ood_limitations(r: dict[str, Any]) -> list[str]:
    """Detectors configured but without results, and those the run had to skip (warning code
    ``detector-skipped``)."""
    notes = []
    wanted = r.get("config", {}).get("audit", {}).get("detectors")
    ran = set(detectors(r))
    if wanted:
        missing = [d for d in wanted if d not in ran]
        if missing:
            notes.append("Configured OOD detectors that produced no results: " + ", ".join(missing) + ".")
    elif not ran:
        notes.append("No OOD or shift detector produced results; the OOD section is empty.")
    skipped = sorted({w["subject"] for w in r.get("warning_records", [])
                      if w["code"] == "detector-skipped" and w.get("subject")})
    if skipped:
        notes.append("OOD detectors that could not run (reasons in the warnings above): " + ", ".join(skipped) + ".")
    return notes


def ood_sections(results: dict[str, Any]) -> list[ReportSection]:
    """The section for ``results``, with its finding and limitations."""
    finding = ood_finding(results)
    return [ReportSection(
        id="ood", title="OOD and shift detection", template=OOD_TEMPLATE, order=420,
        context={"ood": ood_table(results), "figure": ood_figure(results), "failure": failure_table(results)},
        findings=[finding] if finding else [], limitations=ood_limitations(results))]
