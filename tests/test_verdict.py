"""Breaking points and the verdict on hand-made results: each status, the margin rule, stress
tests apart, and the report pieces built on them (heat map, CSV tables, numeric metadata)."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import pytest

from medaudit.config import Config
from medaudit.data import numeric_summary
from medaudit.outputs import Scenario
from medaudit.perturbation import is_stress_test
from medaudit.report.core import heat_map
from medaudit.report.tables import AppendixTable, csv_files, table_csv
from medaudit.report.views import Row, Table
from medaudit.robustness import breaking_points
from medaudit.verdict import verdict


def drop(value: float, low: float, high: float) -> dict[str, Any]:
    return {"value": value, "ci_low": low, "ci_high": high, "significant": low > 0 or high < 0}


SCENARIOS = [Scenario.clean()] + [Scenario.perturbed("mri.noise", "mri", k) for k in (1, 2, 3)] + [
    Scenario.perturbed("intensity.inversion", "intensity", k) for k in (1, 2, 3)]
DROPS = {
    "clean": {},
    # significant at 1 but within the margin; beyond it (significantly) only from 3
    "mri.noise@1": {"accuracy": drop(0.03, 0.01, 0.05)},
    "mri.noise@2": {"accuracy": drop(0.08, 0.04, 0.12)},   # value past the margin, interval not
    "mri.noise@3": {"accuracy": drop(0.20, 0.15, 0.25)},
    "intensity.inversion@1": {"accuracy": drop(0.5, 0.4, 0.6)},
    "intensity.inversion@2": {"accuracy": drop(0.6, 0.5, 0.7)},
    "intensity.inversion@3": {"accuracy": drop(0.7, 0.6, 0.8)},
}


def test_breaking_point_is_the_lowest_severity_significantly_beyond_the_margin() -> None:
    points = breaking_points(DROPS, SCENARIOS, ["accuracy"], {"*": 0.05}, {"intensity.inversion": True})
    noise = points["mri.noise"]["metrics"]["accuracy"]
    assert noise["severity"] == 3 and (noise["drop"], noise["ci_low"], noise["ci_high"]) == (0.20, 0.15, 0.25)
    assert noise["worst_drop"] == 0.20 and noise["margin"] == 0.05
    assert points["intensity.inversion"]["stress_test"] and not points["mri.noise"]["stress_test"]
    # a per-metric margin overrides "*": 0.2 puts severity 3's interval (0.15 …) inside it
    strict = breaking_points(DROPS, SCENARIOS, ["accuracy"], {"*": 0.05, "accuracy": 0.2}, {})
    assert strict["mri.noise"]["metrics"]["accuracy"]["severity"] is None
    assert strict["intensity.inversion"]["metrics"]["accuracy"]["severity"] == 1
    # without intervals nothing is significant, so nothing breaks
    bare = {sid: {k: {"value": d["value"], "ci_low": None, "ci_high": None, "significant": False} for k, d in m.items()}
            for sid, m in DROPS.items()}
    assert breaking_points(bare, SCENARIOS, ["accuracy"], {"*": 0.0}, {})["mri.noise"]["metrics"]["accuracy"]["severity"] is None


def results_with(checks: list[bool], alerts: int = 0, stress_only: bool = False) -> dict[str, Any]:
    points = breaking_points(DROPS, SCENARIOS, ["accuracy"], {"*": 0.05}, {"intensity.inversion": True})
    if stress_only:
        points["mri.noise"]["metrics"]["accuracy"]["severity"] = None
    return {"checks": [{"expr": f"c{i}", "passed": p} for i, p in enumerate(checks)],
            "warning_records": [{"code": "near-chance", "message": "m", "alert": True}] * alerts,
            "robustness": {"breaking_points": points}}


@pytest.mark.parametrize("checks, alerts, stress_only, status, head", [
    ([True], 0, False, "concerns", "CHECKS PASS, ROBUSTNESS CONCERNS — 1 of 1 configured check passed; 1 perturbation "
                                   "breaks a headline metric beyond its margin and 1 stress test breaks one"),
    ([], 0, True, "concerns", "NO CHECKS, ROBUSTNESS CONCERNS — no checks configured; 1 stress test breaks one"),
    ([True, False], 0, False, "fail", "FAIL — 1 of 2 configured checks passed; "),
    ([True], 1, False, "alert", "ALERT: THE AUDIT MAY NOT BE MEANINGFUL — 1 alert; "),
])
def test_verdict_status_and_headline(checks: list[bool], alerts: int, stress_only: bool, status: str, head: str) -> None:
    v = verdict(results_with(checks, alerts, stress_only))
    assert v["status"] == status and v["headline"].startswith(head)
    assert v["stress_breaking"] == {"intensity.inversion": ["accuracy"]}


def test_verdict_pass_only_when_nothing_breaks() -> None:
    r = results_with([True])
    for entry in r["robustness"]["breaking_points"].values():
        entry["metrics"]["accuracy"]["severity"] = None
    assert verdict(r)["status"] == "pass" and verdict(r)["headline"].startswith("PASS — 1 of 1 configured check passed")
    r["checks"] = []
    assert verdict(r)["status"] == "no-checks"


def test_margins_keep_the_default_and_refuse_negatives() -> None:
    assert Config.model_validate({"verdict": {"margins": {"ece": 0.02}}}).verdict.margins == {"*": 0.05, "ece": 0.02}
    with pytest.raises(ValueError, match="verdict.margins must be >= 0"):
        Config.model_validate({"verdict": {"margins": {"ece": -0.1}}})


def test_stress_test_declaration() -> None:
    assert is_stress_test(["mri", "ct"], "MRI") and not is_stress_test(["mri", "ct"], "xray")
    assert is_stress_test(["any"], "generic") and not is_stress_test([], "mri")


def test_heat_map_marks_significant_and_breaking_cells() -> None:
    points = breaking_points(DROPS, SCENARIOS, ["accuracy"], {"*": 0.05}, {"intensity.inversion": True})
    r = {"scenarios": [{"id": s.id, "perturbation": s.perturbation, "severity": s.severity, "drop": DROPS[s.id],
                        "metrics": {}} for s in SCENARIOS],
         "robustness": {"breaking_points": points}, "metric_info": {}}
    hm = heat_map(r, "accuracy")
    assert hm is not None and [row.label for row in hm.rows] == ["mri.noise", "intensity.inversion"]  # stress last
    noise = hm.rows[0].cells
    assert [c.mark for c in noise] == ["significant", "significant", "breaking"]
    assert [c.text for c in noise] == ["0.030", "0.080", "0.200"]
    assert hm.rows[1].stress_test and hm.rows[1].cells[2].background == "#d55e00"  # the largest drop: full colour


def test_csv_has_raw_values_and_unique_names() -> None:
    t = Table("c", ["Scenario", "Accuracy"], name="scenarios", columns=["scenario", "accuracy", "accuracy_ci_low"])
    t.rows.append(Row(["clean", "0.988 [0.98, 0.99]"], values=["clean", 0.9883333333333333, float("nan")]))
    rows = list(csv.reader(io.StringIO(table_csv(t))))
    assert rows == [["scenario", "accuracy", "accuracy_ci_low"], ["clean", "0.9883333333333333", ""]]
    plain = Table("p", ["A", "B"], [Row(["x, y", "1"])])
    assert list(csv.reader(io.StringIO(table_csv(plain)))) == [["A", "B"], ["x, y", "1"]]
    files = csv_files([AppendixTable("robustness", t), AppendixTable("robustness", t), AppendixTable("ood", plain),
                       AppendixTable("ood", Table("empty", ["A"]))])
    assert list(files) == ["robustness-scenarios.csv", "robustness-scenarios-2.csv", "ood.csv"]


def test_numeric_metadata_is_summarised_by_quartiles() -> None:
    ages = [float(a) for a in range(20, 80)] + [None]
    st = numeric_summary(ages)
    present = np.array(ages[:-1])
    assert st is not None and st["n"] == 60 and st["missing"] == 1
    assert st["median"] == np.median(present) and st["q1"] == np.quantile(present, 0.25)
    assert numeric_summary([str(a) for a in range(30)]) is not None  # a manifest's numeric strings
    assert numeric_summary([1, 2, 3] * 10) is None  # few distinct values: counted instead
    assert numeric_summary(["left", "right"] * 10) is None


def test_a_perturbation_that_failed_to_run_is_never_a_pass() -> None:
    r = results_with([True])
    for entry in r["robustness"]["breaking_points"].values():
        entry["metrics"]["accuracy"]["severity"] = None
    r["warning_records"] = [{"code": "perturbation-failed", "subject": "acme.zipper", "scenario": "acme.zipper@3",
                             "message": "m"}]
    v = verdict(r)
    assert v["status"] == "concerns" and v["not_run"] == ["acme.zipper"]
    assert v["headline"].endswith("1 perturbation failed to run and is not judged (acme.zipper)")


def test_numeric_metadata_table_spans_the_page_beside_the_counted_columns() -> None:
    from medaudit.report.core import metadata_views

    r = {"dataset": {"n_samples": 61, "metadata_summary": {"sex": {"F": 30, "M": 31}, "age": {"20": 1}},
                     "metadata_numeric": {"age": numeric_summary([float(a) for a in range(20, 80)] + [None])}}}
    quartiles, counted, notes = metadata_views(r)
    assert quartiles.rows[0].cells[:3] == ["age", "60", "1"] and quartiles.rows[0].flag == "warn"
    assert [t.caption.split("“")[1].split("”")[0] for t in counted] == ["sex"] and notes == []
