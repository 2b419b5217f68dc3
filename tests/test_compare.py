"""``medaudit.compare``: metric changes between two audits, significance by CI overlap, regressions,
refusal of audits of different data, and the summarised console (through the CLI)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from medaudit.cli import cli
from medaudit.compare import SUMMARY_LINES, IncomparableAudits, compare, render_compare
from medaudit.results import Results

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def base() -> dict[str, Any]:
    return json.loads((FIXTURES / "results-full.json").read_text(encoding="utf-8"))


def res(d: dict[str, Any]) -> Results:
    return Results.model_validate(d)


def shift(d: dict[str, Any], sid: str, key: str, by: float) -> dict[str, Any]:
    d = copy.deepcopy(d)
    est = next(s for s in d["scenarios"] if s["id"] == sid)["metrics"][key]
    for k in ("value", "ci_low", "ci_high"):
        est[k] += by
    return d


def change(result: Any, sid: str, key: str) -> Any:
    return next(c for c in result.changes if c.scenario == sid and c.metric == key)


def test_identical_audits_have_no_change(base: dict[str, Any]) -> None:
    r = compare(res(base), res(base))
    assert r.changes and not r.has_regression and not r.regressions
    assert all(c.delta == 0 and not c.significant for c in r.changes if c.delta is not None)
    assert any("same data" in n for n in r.notes) and any("same model" in n for n in r.notes)


def test_accuracy_drop_is_a_significant_regression(base: dict[str, Any]) -> None:
    new = shift(base, "clean", "accuracy", -0.1)  # CI [0.880, 0.897] vs [0.980, 0.997]: disjoint
    r = compare(res(base), res(new))
    c = change(r, "clean", "accuracy")
    assert c.higher_is_better is True
    assert c.delta == pytest.approx(-0.1) and c.worsening == pytest.approx(0.1)
    assert c.significant and c.regression and r.has_regression
    assert [x.metric for x in r.regressions] == ["accuracy"]


def test_tolerance_and_direction(base: dict[str, Any]) -> None:
    worse = shift(base, "clean", "accuracy", -0.01)
    assert not compare(res(base), res(worse), max_drop=0.02).has_regression
    assert compare(res(base), res(worse), max_drop=0.005).has_regression
    # a small non-significant worsening counts unless significance is required
    c = change(compare(res(base), res(worse)), "clean", "accuracy")
    assert c.regression and not c.significant
    assert not compare(res(base), res(worse), require_significant=True).has_regression
    # lower-is-better: ECE up is worse, ECE down is an improvement
    up = compare(res(base), res(shift(base, "mri.noise@5", "ece", +0.05)))
    assert change(up, "mri.noise@5", "ece").worsening == pytest.approx(0.05) and up.has_regression
    down = compare(res(base), res(shift(base, "mri.noise@5", "ece", -0.02)))
    assert change(down, "mri.noise@5", "ece").worsening == pytest.approx(-0.02) and not down.has_regression
    with pytest.raises(ValueError):
        compare(res(base), res(base), max_drop=-1)


def test_unknown_direction_and_undefined_values_never_regress(base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    del new["metric_directions"]["nll"]
    old = copy.deepcopy(base)
    del old["metric_directions"]["nll"]
    new = shift(new, "clean", "nll", +1.0)
    c = change(compare(res(old), res(new)), "clean", "nll")
    assert c.higher_is_better is None and c.worsening is None and not c.regression and c.significant
    undefined = copy.deepcopy(base)
    undefined["scenarios"][0]["metrics"]["auroc"] = {"value": None, "ci_low": None, "ci_high": None}
    c = change(compare(res(base), res(undefined)), "clean", "auroc")
    assert c.delta is None and not c.regression


def test_scenarios_in_one_run_only_are_counted(base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    new["scenarios"] = [s for s in new["scenarios"] if s["id"] != "mri.noise@1"]
    r = compare(res(base), res(new))
    assert r.only_old == ["mri.noise@1"] and r.only_new == []
    assert not any(c.scenario == "mri.noise@1" for c in r.changes)
    assert r.unmatched == "1 scenario(s) only in the old audit and 0 only in the new one are not compared"
    assert compare(res(base), res(base)).unmatched is None


def test_different_data_or_task_is_refused_unless_allowed(base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    new["dataset"]["sha256"] = "ab" * 32
    new["dataset"]["path"] = "/elsewhere/other.npz"
    with pytest.raises(IncomparableAudits) as exc:
        compare(res(base), res(new))
    msg = str(exc.value)
    assert "\n" not in msg and "e2c7f627f089" in msg and "abababababab" in msg
    assert base["dataset"]["path"] in msg and "/elsewhere/other.npz" in msg and "--allow-different-data" in msg
    r = compare(res(base), res(new), allow_different_data=True)
    assert len(r.mismatch) == 1 and "e2c7f627f089" in r.mismatch[0] and r.changes
    assert not any("same data" in n for n in r.notes)
    # a different label space on the same file is just as incomparable
    relabelled = copy.deepcopy(base)
    relabelled["config"]["task"]["classes"] = ["csf", "grey_matter", "white_matter"]
    with pytest.raises(IncomparableAudits, match=r"different task: old multiclass \[csf_other, grey_matter, "
                                                  r"white_matter\], new multiclass \[csf, grey_matter"):
        compare(res(base), res(relabelled))
    assert compare(res(base), res(relabelled), allow_different_data=True).mismatch[0].startswith("different task")


def test_settings_that_differ_are_stated_not_refused(base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    new["seed"] = 7
    new["config"]["audit"]["bootstrap"] = 200
    new["config"]["audit"]["severities"] = [1, 3, 5]
    r = compare(res(base), res(new))
    assert r.settings == ["seed 0 vs 7", "audit.bootstrap 50 vs 200", "audit.severities [1, 5] vs [1, 3, 5]"]
    assert any("seed 0 vs 7" in n for n in r.notes) and not r.mismatch
    assert compare(res(base), res(base)).settings == []


def test_regressions_worst_first_and_improvements(base: dict[str, Any]) -> None:
    new = shift(base, "clean", "accuracy", -0.02)  # CIs [0.960, 0.977] vs [0.980, 0.997]: disjoint
    new = shift(new, "intensity.gamma@5", "accuracy", -0.05)  # width 0.071: CIs overlap, larger drop
    new = shift(new, "mri.noise@5", "accuracy", -0.1)  # width 0.049: disjoint, largest drop
    new = shift(new, "intensity.gamma@5", "ece", -0.2)  # width 0.068: disjoint improvement
    new = shift(new, "mri.noise@1", "f1_macro", +0.001)  # overlapping improvement
    r = compare(res(base), res(new))
    assert [(c.scenario, c.metric) for c in r.regressions] == [
        ("mri.noise@5", "accuracy"), ("clean", "accuracy"), ("intensity.gamma@5", "accuracy")]
    assert [(c.scenario, c.metric) for c in r.improvements] == [("intensity.gamma@5", "ece"), ("mri.noise@1", "f1_macro")]
    assert len(compare(res(base), res(new), max_drop=0.01).improvements) == 1
    assert [c.metric for c in compare(res(base), res(new), require_significant=True).improvements] == ["ece"]


def test_render_compare_html(base: dict[str, Any]) -> None:
    new = shift(base, "clean", "accuracy", -0.1)
    new["model"]["path"] = "/m/<script>alert(1)</script>.pt"
    new["checks"][0]["passed"] = False
    r = compare(res(base), res(new), max_drop=0.01)
    html = render_compare(r)
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Verdict: <strong>REGRESSION</strong>" in html and 'role="alert"' not in html
    assert html.count("REGRESSION") >= 3  # verdict, regressions table, headline table
    assert "<li>clean accuracy: 0.9883 -&gt; 0.8883 (worse by 0.1000, CIs disjoint)</li>" in html
    assert "http://" not in html.replace('"http://www.w3.org', "") and "https://" not in html
    ok = render_compare(compare(res(base), res(base)))
    assert "Verdict: <strong>no regression</strong>" in ok and "No metric worsened" in ok
    assert render_compare(compare(res(base), res(base))) == ok  # deterministic
    assert r.to_dict()["has_regression"] is True and json.dumps(r.to_dict())
