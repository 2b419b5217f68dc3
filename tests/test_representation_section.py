"""The representation-robustness report section (built-in plugin ``representation``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from medaudit.plugins import representation
from medaudit.report import render_report_files
from medaudit.results import Results

FIXTURES = Path(__file__).parent / "fixtures"


def _with_representation() -> dict[str, Any]:
    r = copy.deepcopy(json.loads((FIXTURES / "results-full.json").read_text(encoding="utf-8")))
    for s in r["scenarios"]:
        if s["perturbation"]:
            cka = 1.0 - 0.1 * s["severity"] if s["perturbation"] == "intensity.gamma" else 0.99
            s["representation"] = {"cosine": {"value": 0.99, "ci_low": 0.98, "ci_high": 1.0},
                                   "cka": {"value": cka, "ci_low": cka - 0.02, "ci_high": cka + 0.02},
                                   "knn_consistency": {"value": 0.95, "ci_low": 0.9, "ci_high": 0.97}}
    r["model"]["representation"] = {"source": "the pooled output of 'features'", "dim": 64, "knn_k": 10,
                                    "knn_reference": "the --reference set", "similarity": "cosine"}
    return r


def test_no_section_without_measures() -> None:
    r = json.loads((FIXTURES / "results-full.json").read_text(encoding="utf-8"))
    assert representation.medaudit_report_sections(r) == []


def test_section_findings_headline_and_tables() -> None:
    r = _with_representation()
    (section,) = representation.medaudit_report_sections(r)
    worst_gamma = max(s["severity"] for s in r["scenarios"] if s["perturbation"] == "intensity.gamma")
    low = 1.0 - 0.1 * worst_gamma
    (label, text), = section.headlines
    assert label == "Representation"
    assert text.startswith(f"linear CKA with clean {low:.3f} at worst (intensity.gamma@{worst_gamma})")
    assert "k-NN label consistency 0.950 at worst" in text
    assert (any("intensity.gamma@" in f and "linear CKA" in f for f in section.findings)) == (low < 0.8)
    worst, full = section.appendix
    row = next(x for x in worst.rows if x.cells[0] == "intensity.gamma")
    assert row.cells[1] == str(worst_gamma) and row.values[5] == low
    assert len(full.rows) == sum(1 for s in r["scenarios"] if s["perturbation"])
    assert section.context["figure"] is not None and "knn_consistency" in section.context["figure"].svg


def test_rendered_report_has_the_section_and_its_csv() -> None:
    from medaudit.plugin_manager import get_plugin_manager

    rendered = render_report_files(Results.model_validate(_with_representation()), get_plugin_manager())
    assert 'id="representation"' in rendered.html and "Representation robustness" in rendered.html
    assert "representation.csv" in rendered.tables and "representation-worst.csv" in rendered.tables
    assert rendered.tables["representation-worst.csv"].splitlines()[0].startswith("perturbation,severity,cosine")
