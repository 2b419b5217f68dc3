"""The --fail-on grammar: parsing, scenario wildcards, drops, OOD, subgroup gaps, JUnit."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from medaudit.checks import evaluate_checks, junit_xml, parse_check, validate_check_scenarios
from medaudit.errors import ConfigError


def est(v: float | None) -> dict[str, Any]:
    return {"value": v, "ci_low": None, "ci_high": None}


RESULTS: dict[str, Any] = {
    "metric_directions": {"accuracy": True, "ece": False},
    "scenarios": [
        {"id": "clean", "perturbation": None, "metrics": {"accuracy": est(0.9), "ece": est(0.02), "auroc": est(None)}},
        {"id": "mri.motion@1", "perturbation": "mri.motion", "metrics": {"accuracy": est(0.85), "ece": est(0.05)},
         "drop": {"accuracy": {**est(0.05), "significant": True}},
         "ood": {"energy": {"auroc": est(0.7), "fpr95": est(0.6)}}},
        {"id": "mri.motion@3", "perturbation": "mri.motion", "metrics": {"accuracy": est(0.6), "ece": est(0.2)},
         "drop": {"accuracy": {**est(0.3), "significant": True}},
         "ood": {"energy": {"auroc": est(0.9), "fpr95": est(0.3)}}},
        {"id": "intensity.gamma@3", "perturbation": "intensity.gamma", "metrics": {"accuracy": est(0.88), "ece": est(0.03)}},
    ],
    "subgroups": [
        {"scenario": "clean", "attribute": "sex", "group": "F", "n": 50, "metrics": {"accuracy": est(0.95)}},
        {"scenario": "clean", "attribute": "sex", "group": "M", "n": 50, "metrics": {"accuracy": est(0.85)}},
        {"scenario": "clean", "attribute": "sex", "group": "X", "n": 3, "too_small": True, "metrics": {}},
        {"scenario": "mri.motion@3", "attribute": "sex", "group": "F", "n": 50, "metrics": {"accuracy": est(0.1)}},
    ],
}


@pytest.mark.parametrize(
    ("expr", "value", "passed"),
    [
        ("clean.accuracy<0.8", 0.9, True),
        ("clean.accuracy < 0.95", 0.9, False),
        ("mri.motion@3.ece>0.1", 0.2, False),
        ("mri.motion@1.ece>=0.05", 0.05, False),
        ("mri.motion@*.accuracy<0.7", 0.6, False),  # worst severity of a higher-is-better metric: the minimum
        ("mri.motion@*.ece>0.25", 0.2, True),  # worst ece is the maximum
        ("*.accuracy<0.5", 0.6, True),  # worst over every perturbed scenario
        ("mri.motion@3.drop.accuracy>0.1", 0.3, False),
        ("mri.motion@*.drop.accuracy>0.4", 0.3, True),
        ("mri.motion@3.ood.energy.auroc<0.8", 0.9, True),
        ("mri.motion@*.ood.energy.auroc<0.8", 0.7, False),
        ("mri.motion@*.ood.energy.fpr95>0.5", 0.6, False),  # worst fpr95 is the highest
        ("subgroup.sex.accuracy_gap>0.05", pytest.approx(0.1), False),  # too-small group X ignored
        ("clean.accuracy==0.9", 0.9, False),
        ("clean.accuracy!=0.9", 0.9, True),
        ("clean.accuracy<1e-1", 0.9, True),
    ],
)
def test_checks(expr: str, value: float, passed: bool) -> None:
    (check,) = evaluate_checks([expr], RESULTS)
    assert check["value"] == value
    assert check["passed"] is passed
    assert check["error"] is None


def test_undefined_value_fails_with_reason() -> None:
    (check,) = evaluate_checks(["clean.auroc<0.5"], RESULTS)
    assert check["passed"] is False and check["value"] is None
    assert "undefined" in check["error"]


@pytest.mark.parametrize(
    ("expr", "pattern"),
    [
        ("clean.accuracy", r"not a check; write PATH OP NUMBER"),
        ("clean.accuracy<<0.5", r"not a check"),
        ("clean.accuracy<abc", r"not a check"),
    ],
)
def test_parse_errors(expr: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_check(expr)


@pytest.mark.parametrize(
    ("expr", "pattern"),
    [
        ("mri.spike@3.accuracy<0.5", r"names no scenario; scenarios are: clean, mri.motion@1"),
        ("clean.recall<0.5", r"no value 'recall' in scenario 'clean'; metrics are: accuracy, auroc, ece"),
        ("subgroup.age.accuracy_gap>0.1", r"no subgroup results for attribute 'age'"),
        ("subgroup.sex.accuracy>0.1", r"subgroup checks are 'subgroup.ATTRIBUTE.METRIC_gap'"),
    ],
)
def test_lookup_errors_name_what_exists(expr: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        evaluate_checks([expr], RESULTS)


def test_validate_scenarios_before_running() -> None:
    validate_check_scenarios(["mri.motion@*.accuracy<0.5", "subgroup.sex.accuracy_gap>0.1"], ["clean", "mri.motion@1"])
    with pytest.raises(ConfigError, match=r"names no scenario"):
        validate_check_scenarios(["ct.ring@2.accuracy<0.5"], ["clean", "mri.motion@1"])


def test_junit_has_one_case_per_check() -> None:
    checks = evaluate_checks(["clean.accuracy<0.8", "mri.motion@3.ece>0.1", "clean.auroc<0.5"], RESULTS)
    root = ET.fromstring(junit_xml(checks))
    assert root.attrib == {"name": "medaudit", "tests": "3", "failures": "2", "errors": "0"}
    cases = root.findall("testcase")
    assert [c.attrib["name"] for c in cases] == ["clean.accuracy<0.8", "mri.motion@3.ece>0.1", "clean.auroc<0.5"]
    assert [c.find("failure") is not None for c in cases] == [False, True, True]
