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
    def title(self) -> str:
        return f"plugin {self.plugin}" if self.plugin else "medaudit"


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
        groups.setdefault(w.get("plugin"), WarningGroup(w.get("plugin"), [])).records.append(w)
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
