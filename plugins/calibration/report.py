"""The calibration plugin's report section: reliability diagram, calibration table, temperature scaling.

Built on the public view helpers only (:mod:`medaudit.report.views`), as a third party's section.
"""

from __future__ import annotations

from typing import Any

from medaudit.report.views import (
    Figure, Row, Table, clean_scenario, confidence_label, fmt, fmt_ci, label, perturbed_scenarios, reliability,
    task_applies, value,
)
from medaudit.sections import ReportSection
from medaudit.task import CALIBRATION

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


def calibration_sections(results: dict[str, Any]) -> list[ReportSection]:
    """The section for ``results`` (none when this plugin's metrics did not run), with its finding."""
    clean = clean_scenario(results)
    if not task_applies(results, CALIBRATION) or not clean or not any(k in clean["metrics"] for k in CALIBRATION_KEYS):
        return []  # the task has no calibration view, or this plugin's metrics did not run (the plugin failed)
    temperature, method = temperature_table(results)
    finding = calibration_finding(results)
    return [ReportSection(
        id="calibration", title="Calibration", template=CALIBRATION_TEMPLATE, order=410,
        context={"reliability": reliability_figure(results), "table": calibration_table(results),
                 "temperature": temperature, "method": method},
        findings=[finding] if finding else [])]
