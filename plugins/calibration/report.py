"""The calibration plugin's report section: reliability diagram, calibration table, temperature scaling.

Built on the public view helpers only (:mod:`medaudit.report.views`), as a third party's section.
"""

from __future__ import annotations

from typing import Any

from medaudit.report.views import (
    Figure, Row, Table, clean_scenario, confidence_label, estimate_columns, estimate_values, fmt, fmt_ci, label,
    perturbed_scenarios, reliability, task_applies, value,
)
from medaudit.sections import ReportSection
from medaudit.task import CALIBRATION

# the calibration table's columns (class-wise ECE stays in results.json: it repeats ECE per class)
CALIBRATION_KEYS = ("ece", "ace", "mce", "brier", "nll")

CALIBRATION_TEMPLATE = """\
{% if reliability %}{% with f = reliability %}{% include "sections/_figure.html" %}{% endwith %}{% endif %}
{% with t = table %}{% include "sections/_table.html" %}{% endwith %}
{% if method %}
<p><strong>Temperature scaling.</strong> {{ method }} If ECE falls a lot after scaling, the model's ranking is sound and its confidence merely needs rescaling; if it stays high under a perturbation, a clean-data recalibration does not carry over to that shift. Before/after values per scenario are in the appendix.</p>
{% endif %}
<p class="note">Every calibration metric per scenario with its interval is in the appendix and in <code>tables/calibration.csv</code>.</p>
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
    """Every calibration metric per scenario, with CIs (the appendix table, ``tables/calibration.csv``)."""
    clean = clean_scenario(r)
    keys = [k for k in CALIBRATION_KEYS if k in (clean["metrics"] if clean else {})]
    t = Table(f"Calibration per scenario with {confidence_label(r)} bootstrap CIs (lower is better).",
              ["Scenario"] + [label(k) for k in keys],
              columns=["scenario"] + [c for k in keys for c in estimate_columns(k)])
    for s in r["scenarios"]:
        if s["metrics"]:
            t.rows.append(Row([s["id"]] + [fmt_ci(s["metrics"].get(k)) for k in keys],
                              values=[s["id"]] + [v for k in keys for v in estimate_values(s["metrics"].get(k))]))
    return t


def ece_grid(r: dict[str, Any]) -> Table:
    """The section's compact table: ECE per perturbation and severity (clean in the caption)."""
    clean = clean_scenario(r)
    severities = sorted({s["severity"] for s in perturbed_scenarios(r)})
    t = Table(f"ECE per perturbation and severity (clean: {fmt(value((clean or {}).get('metrics', {}).get('ece')))}; "
              "lower is better); ▲ marks a significant rise from clean (paired bootstrap).",
              ["Perturbation"] + [f"Severity {k}" for k in severities])
    cells: dict[str, dict[int, str]] = {}
    for s in perturbed_scenarios(r):
        est = s["metrics"].get("ece")
        if est is not None:
            drop = s.get("drop", {}).get("ece") or {}
            cells.setdefault(s["perturbation"], {})[s["severity"]] = (
                fmt(value(est)) + (" ▲" if drop.get("significant") and (drop.get("value") or 0) > 0 else ""))
    for pert in sorted(cells):
        t.rows.append(Row([pert] + [cells[pert].get(k, "–") for k in severities]))
    return t


def temperature_table(r: dict[str, Any]) -> tuple[Table, str]:
    """The table of results.json ``calibration.temperature_scaling`` and a sentence on its method."""
    ts = r.get("calibration", {}).get("temperature_scaling") or {}
    t = Table("Temperature scaling: calibration before and after dividing the logits by the temperature fitted on "
              "clean data (clean row: cross-fitted, so no sample is calibrated by a temperature fitted on itself).",
              ["Scenario", "ECE before", "ECE after", "NLL before", "NLL after", "Cross-fitted"], name="temperature",
              columns=["scenario", "ece_before", "ece_after", "nll_before", "nll_after", "cross_fitted"])
    for sid, row in ts.get("scenarios", {}).items():
        raw = [row.get(k) for k in ("ece_before", "ece_after", "nll_before", "nll_after")]
        t.rows.append(Row([sid, *(fmt(v) for v in raw), fmt(bool(row.get("cross_fitted")))],
                          values=[sid, *raw, bool(row.get("cross_fitted"))]))
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


def calibration_headline(r: dict[str, Any]) -> tuple[str, str] | None:
    """The summary's calibration line: clean ECE with its interval, the worst scenario, and what
    temperature scaling does to clean ECE."""
    clean = clean_scenario(r)
    if not clean or value(clean["metrics"].get("ece")) is None:
        return None
    text = f"ECE {fmt_ci(clean['metrics']['ece'])} on clean data"
    scored = [s for s in perturbed_scenarios(r) if value(s["metrics"].get("ece")) is not None]
    if scored:
        worst = max(scored, key=lambda s: (s["metrics"]["ece"]["value"], s["id"]))
        text += f", {fmt(worst['metrics']['ece']['value'])} at worst ({worst['id']})"
    ts = (r.get("calibration", {}).get("temperature_scaling") or {}).get("scenarios", {}).get("clean")
    if ts and ts.get("ece_after") is not None:
        text += f"; temperature scaling takes clean ECE to {fmt(ts['ece_after'])} (cross-fitted)"
    return ("Calibration", text)


def calibration_sections(results: dict[str, Any]) -> list[ReportSection]:
    """The section for ``results`` (none when this plugin's metrics did not run), with its finding."""
    clean = clean_scenario(results)
    if not task_applies(results, CALIBRATION) or not clean or not any(k in clean["metrics"] for k in CALIBRATION_KEYS):
        return []  # the task has no calibration view, or this plugin's metrics did not run (the plugin failed)
    temperature, method = temperature_table(results)
    finding = calibration_finding(results)
    headline = calibration_headline(results)
    return [ReportSection(
        id="calibration", title="Calibration", template=CALIBRATION_TEMPLATE, order=410,
        context={"reliability": reliability_figure(results), "table": ece_grid(results), "method": method},
        findings=[finding] if finding else [], headlines=[headline] if headline else [],
        appendix=[calibration_table(results), temperature])]
