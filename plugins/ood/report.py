"""The ood plugin's report section: shift detection per scenario and detector, and failure detection.

Built on the public view helpers only (:mod:`medaudit.report.views`), as a third party's section.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from medaudit.report.views import (
    Figure, Row, Series, Table, confidence_label, degradation, detectors, estimate_columns, estimate_values, fmt,
    fmt_ci, label, perturbed_scenarios,
)
from medaudit.sections import ReportSection

OOD_STATS = (("auroc", "AUROC"), ("aupr", "AUPR"), ("fpr95", "FPR@95%TPR"))

OOD_TEMPLATE = """\
{% if has_scores %}
{% if figure %}{% with f = figure %}{% include "sections/_figure.html" %}{% endwith %}{% endif %}
{% with t = summary %}{% include "sections/_table.html" %}{% endwith %}
{% if recommendation %}
<h3>Recommendation</h3>
<p{% if recommendation.weak %} class="alert"{% endif %}>{{ recommendation.statement }} The threshold is the score below which {{ "%.0f" % (recommendation.keep * 100) }} % of the clean audit inputs fall (scored by the audit's cross-fitted detectors); the ranking is by the mean {{ "share of errors flagged" if recommendation.ranked_by == "flagged_errors" else "prevented drop (epd)" }} over the realistic perturbed scenarios, stress tests excluded.</p>
{% with t = recommendation_table %}{% include "sections/_table.html" %}{% endwith %}
{% endif %}
<p class="note">Every scenario × detector with AUROC, AUPR and FPR@95%TPR and their intervals, and failure detection per scenario, are in the appendix and in <code>tables/ood.csv</code> and <code>tables/ood-failure.csv</code>.</p>
{% else %}
<p class="empty">No detectors ran: this results file holds no shift-detection scores (no detector plugin was installed or none applied to this model; <code>audit.detectors</code> selects them).</p>
{% endif %}
"""


def ood_table(r: dict[str, Any]) -> Table:
    t = Table(f"Shift detection per scenario and detector: how well each detector's score separates the perturbed "
              f"samples from clean ones ({confidence_label(r)} CIs). AUROC 0.5 is chance; FPR@95%TPR is the share of "
              "clean samples flagged when 95% of shifted ones are (lower is better).",
              ["Scenario", "Detector"] + [h for _, h in OOD_STATS],
              columns=["scenario", "detector"] + [c for k, _ in OOD_STATS for c in estimate_columns(k)])
    for s in r["scenarios"]:
        for det in sorted(s.get("ood", {})):
            stats = s["ood"][det]
            t.rows.append(Row([s["id"], det] + [fmt_ci(stats.get(k)) for k, _ in OOD_STATS],
                              values=[s["id"], det] + [v for k, _ in OOD_STATS for v in estimate_values(stats.get(k))]))
    return t


def _mean_auroc(scenarios: list[dict[str, Any]], det: str) -> float | None:
    vals = [s["ood"][det]["auroc"]["value"] for s in scenarios
            if (s.get("ood", {}).get(det, {}).get("auroc") or {}).get("value") is not None]
    return sum(vals) / len(vals) if vals else None


def external_sets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The external OOD sets' scenarios (``--ood-data``), in results order."""
    return [s for s in r["scenarios"] if s["id"].startswith("ood:")]


def summary_table(r: dict[str, Any]) -> Table:
    """The section's compact table: per detector, mean shift-detection AUROC per suite, AUROC on each
    external OOD set, clean failure-detection AUROC, and the mean share of the perturbed scenarios'
    errors it flags at 5 % clean referrals."""
    dets = detectors(r)
    suites = sorted({s.get("suite") or "other" for s in perturbed_scenarios(r)})
    ext = external_sets(r)
    clean = next((s for s in r["scenarios"] if s["id"] == "clean"), {})
    flagged = any(s.get("flagged_errors") for s in perturbed_scenarios(r))
    t = Table("Per detector: mean shift-detection AUROC over each suite's perturbed scenarios (0.5 is chance), "
              "AUROC against each external OOD set, failure-detection AUROC on clean data (wrong vs correct "
              "predictions), and the mean share of the perturbed scenarios' wrong predictions it flags at the threshold "
              "that lets 95 % of clean inputs through.",
              ["Detector"] + [f"{suite} (mean AUROC)" for suite in suites] + [s["id"] for s in ext]
              + ["Failure detection (clean)"] + (["Errors caught at 5 % clean referrals (mean, perturbed)"] if flagged else []))
    for det in dets:
        cells = [fmt(_mean_auroc([s for s in perturbed_scenarios(r) if (s.get("suite") or "other") == suite], det))
                 for suite in suites]
        cells += [fmt_ci(s.get("ood", {}).get(det, {}).get("auroc")) for s in ext]
        cells.append(fmt_ci(clean.get("failure_detection", {}).get(det)))
        if flagged:
            shares = [v for s in perturbed_scenarios(r)
                      if (v := (s.get("flagged_errors", {}).get(det) or {}).get("value")) is not None]
            cells.append(fmt(sum(shares) / len(shares)) if shares else "–")
        t.rows.append(Row([det] + cells))
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


_FAILURE_CAPTIONS = {
    "failure_detection": ("failure", "Failure detection: AUROC of each detector's score at separating the model's wrong "
                                     "predictions from its correct ones, per scenario"),
    "flagged_errors": ("flagged_errors", "Errors caught at 5 % clean referrals: the share of each scenario's wrong "
                                         "predictions that a detector flags at the threshold letting 95 % of clean inputs "
                                         "through"),
    "epd": ("epd", "Performance drop prevented at 5 % clean referrals (epd): the part of each scenario's drop "
                   "(accuracy or Dice points) that referring a detector's flagged inputs to a human would prevent"),
}


def failure_table(r: dict[str, Any], key: str = "failure_detection") -> Table:
    """Per scenario and detector, the failure-detection AUROC (``key="failure_detection"``), the
    share of wrong predictions flagged at 5 % clean referrals (``key="flagged_errors"``) or the
    drop that referral prevents (``key="epd"``)."""
    keys = sorted({k for s in r["scenarios"] for k in s.get(key, {})})
    name, caption = _FAILURE_CAPTIONS[key]
    t = Table(f"{caption} ({confidence_label(r)} CIs; higher is better).",
              ["Scenario"] + [label(k) for k in keys], name=name,
              columns=["scenario"] + [c for k in keys for c in estimate_columns(k)])
    for s in r["scenarios"]:
        if s.get(key):
            t.rows.append(Row([s["id"]] + [fmt_ci(s[key].get(k)) for k in keys],
                              values=[s["id"]] + [v for k in keys for v in estimate_values(s[key].get(k))]))
    return t


def ood_headlines(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's lines: the best and weakest shift detector, and each external OOD set."""
    means = {det: m for det in detectors(r) if (m := _mean_auroc(perturbed_scenarios(r), det)) is not None}
    out = []
    if means:
        best = max(means, key=lambda d: (means[d], d))
        weak = min(means, key=lambda d: (means[d], d))
        text = f"best detector {best}, mean AUROC {means[best]:.3f} over the perturbed scenarios"
        if weak != best:
            text += f"; weakest {weak}, {means[weak]:.3f} (0.5 is chance)"
        out.append(("Shift detection", text))
    for s in external_sets(r):
        scores = {det: st["auroc"] for det, st in s.get("ood", {}).items() if (st.get("auroc") or {}).get("value") is not None}
        if scores:
            best = max(scores, key=lambda d: (scores[d]["value"], d))
            out.append((f"External set {s['id']}", f"detected best by {best}, AUROC {fmt_ci(scores[best])} against "
                                                    f"the clean audit data ({s['n_samples']} samples)"))
        else:
            out.append((f"External set {s['id']}", "no detector produced a score for it"))
    return out


def external_findings(r: dict[str, Any]) -> list[str]:
    """One finding per external OOD set that the best detector flags poorly (AUROC below 0.8)."""
    out = []
    for s in external_sets(r):
        scores = {det: st["auroc"]["value"] for det, st in s.get("ood", {}).items()
                  if (st.get("auroc") or {}).get("value") is not None}
        if scores and max(scores.values()) < 0.8:
            best = max(scores, key=lambda d: (scores[d], d))
            out.append(f"The external OOD set {s['id']} is hard to detect: the best detector, {best}, reaches AUROC "
                       f"{scores[best]:.3f}.")
    return out


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


def recommendation_table(r: dict[str, Any]) -> Table | None:
    """The recommendation's evidence: every ranked detector's threshold and mean harm statistics."""
    rec = r.get("ood_recommendation")
    if not rec:
        return None
    t = Table(f"Detectors ranked by the harm they catch at {1 - rec['keep']:.0%} clean referrals, mean over the "
              f"{len(rec['scenarios'])} realistic perturbed scenarios (per-scenario values with intervals in the appendix).",
              ["Detector", "Threshold", "Errors flagged", "Drop prevented (epd)"], name="ood-recommendation",
              columns=["detector", "threshold", "flagged_errors", "epd"])
    for e in rec["ranking"]:
        t.rows.append(Row([e["detector"], fmt(e["threshold"]), fmt(e["flagged_errors"]), fmt(e["epd"])],
                          values=[e["detector"], e["threshold"], e["flagged_errors"], e["epd"]]))
    return t


def ood_sections(results: dict[str, Any]) -> list[ReportSection]:
    """The section for ``results``, with its finding and limitations."""
    finding = ood_finding(results)
    table = ood_table(results)
    return [ReportSection(
        id="ood", title="OOD and shift detection", template=OOD_TEMPLATE, order=420,
        context={"has_scores": bool(table.rows), "figure": ood_figure(results), "summary": summary_table(results),
                 "recommendation": results.get("ood_recommendation"),
                 "recommendation_table": recommendation_table(results)},
        findings=external_findings(results) + ([finding] if finding else []), limitations=ood_limitations(results),
        headlines=ood_headlines(results),
        appendix=[table, failure_table(results)] + [failure_table(results, key) for key in ("flagged_errors", "epd")
                                                    if any(sc.get(key) for sc in results["scenarios"])])]
