"""Limitations: the run's warnings, grouped, and notes derived from the results.

Notes about warnings come from the records' codes (results.json ``warning_records``), never from
their text, so rewording a warning cannot silently drop a note.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data import MISSING_VALUE


@dataclass
class WarningGroup:
    """The warnings of one source: medaudit itself (``plugin`` None) or one plugin."""

    plugin: str | None
    records: list[dict[str, Any]]

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def title(self) -> str:
        return f"plugin {self.plugin}" if self.plugin else "medaudit"


#: What medaudit's own warning codes mean for the evidence; a plugin's record states its own
#: (``WarningRecord.impact``).
IMPACT = {
    "plugin-load-failed": "Whatever the plugin contributes (perturbations, metrics, detectors, analyses, sections) is "
                          "absent: the audit is narrower than configured.",
    "plugin-hook-problem": "Part of a plugin's contribution may be missing or ignored; its results, if any, need a check.",
    "suite-joined": "A plugin adds perturbations to a suite it does not own; they run and are reported with that suite.",
    "classes-inferred": "Class names come from the labels, not the config: check they are in the model's output order, "
                        "or every per-class number belongs to another class.",
    "feature-layer-unavailable": "Feature-based detectors could not run; shift detection rests on output scores only.",
    "feature-detectors-skipped": "Feature-based detectors did not run; shift detection rests on output scores only.",
    "output-detectors-skipped": "Output-based detectors did not run for this task; shift detection rests on features only.",
    "perturbation-failed": "The named scenarios are missing from every table and from the verdict: robustness to that "
                           "perturbation is not established.",
    "detector-failed": "The detector's scores are absent; the other detectors are unaffected.",
    "detector-constant": "The detector gave (nearly) constant scores, so it is left out rather than reported at chance; "
                         "shift detection rests on the other detectors.",
    "metric-failed": "The metric is absent from the results; checks on it are undefined and count as failed.",
    "analysis-failed": "The analysis (e.g. subgroups) is absent or partial.",
    "preview-failed": "Only the example grid is missing; no number is affected.",
    "overlays-failed": "Only the overlays of image, reference and prediction are missing; no number is affected.",
    "small-sample": "Intervals are wide and the bootstrap less reliable for the named quantity; read its value as a "
                    "rough estimate.",
    "external-set": "The external set is scored for shift detection only; classification metrics do not apply to it.",
    "detector-cross-fitted": "Detectors were fitted on half of the clean audit data and scored on the other half (no "
                             "--reference): their AUROCs use half the samples each.",
    "preprocessing-suspect": "The model may be seeing inputs unlike its training inputs: every number in this report "
                             "may describe a misconfigured audit rather than the model.",
    "report-section-failed": "A section of the report is missing; results.json still holds its results.",
    "report-metric-info-failed": "Some metrics may be shown without their declared format or definition.",
}


def impact(w: dict[str, Any]) -> str:
    """What a warning record means for the evidence: its own ``impact``, medaudit's for its codes,
    else what an alert or a plugin's warning implies in general."""
    if w.get("impact"):
        return w["impact"]
    if w.get("code") in IMPACT:
        return IMPACT[w["code"]]
    if w.get("alert"):
        return "Flagged by its plugin as possibly invalidating the evidence: resolve it before relying on this report."
    if w.get("plugin"):
        return f'Recorded by plugin "{w["plugin"]}"; its documentation says what it affects.'
    return "Context for reading the results; no number is known to be affected."


def warning_records(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's warning records; results files from before records existed have plain strings,
    which become records of code ``unclassified``."""
    if r.get("warning_records"):
        return r["warning_records"]
    return [{"code": "unclassified", "message": w, "plugin": None, "scenario": None, "subject": None}
            for w in r.get("warnings", [])]


def warning_groups(records: Sequence[dict[str, Any]]) -> list[WarningGroup]:
    """Records grouped by source, medaudit's own first, then plugins in order of first warning."""
    groups: dict[str | None, WarningGroup] = {None: WarningGroup(None, [])}
    for w in records:
        groups.setdefault(w.get("plugin"), WarningGroup(w.get("plugin"), [])).records.append({**w, "impact_text": impact(w)})
    return [g for g in groups.values() if g.records]


def derived_notes(r: dict[str, Any], records: Sequence[dict[str, Any]], sections: Sequence[str] = ()) -> list[str]:
    """Limitations that follow from the results themselves (beyond the run's recorded warnings);
    ``sections`` are the plugin sections' own notes, in section order."""
    notes: list[str] = []
    audit = r.get("config", {}).get("audit", {})
    if audit.get("bootstrap") == 0:
        notes.append("Bootstrap was off (audit.bootstrap: 0): no confidence intervals, and no drop can be called "
                     "significant.")
    small = [s["id"] for s in r["scenarios"] if s["n_samples"] < 30]
    if small:
        notes.append(f"Fewer than 30 samples in {', '.join(small)}: intervals are wide and unreliable.")
    rare = [f"{k} ({v})" for k, v in r["dataset"]["class_counts"].items() if v < 10]
    if rare:
        notes.append("Classes with fewer than 10 samples: " + ", ".join(rare) + "; per-class metrics are unreliable.")
    for col, counts in r["dataset"].get("metadata_summary", {}).items():
        if counts.get(MISSING_VALUE):
            notes.append(f"Metadata column {col} is missing for {counts[MISSING_VALUE]} of {r['dataset']['n_samples']} samples.")
    notes.extend(sections)
    failed = list(dict.fromkeys(w["subject"] or w["plugin"] for w in records if w["code"] == "plugin-load-failed"))
    if failed:
        notes.append("Plugins that failed to load (their perturbations, metrics, detectors or analyses are absent "
                     "from this report): " + ", ".join(failed) + ".")
    errored = [c["expr"] for c in r.get("checks", []) if c.get("error")]
    if errored:
        notes.append("Checks whose value was undefined (counted as failed): " + ", ".join(errored) + ".")
    notes.append("The perturbations are simulations of acquisition changes on this test set; robustness to them "
                 "does not establish performance on real data from other sites, scanners or populations.")
    return notes
