"""The --fail-on grammar: parsing, scenario wildcards, drops, OOD, subgroup gaps, JUnit."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from medaudit.checks import Vocabulary, describe_check, evaluate_checks, junit_xml, parse_check, validate_checks
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


VOCAB = Vocabulary(scenarios=["clean", "mri.motion@1", "mri.motion@3", "ood:inverted"],
                   metrics=frozenset({"classification", "accuracy", "sensitivity", "ece"}),
                   classes=("csf", "grey matter"), detectors=["energy", "knn"], columns=["age", "sex"])


@pytest.mark.parametrize("expr", [
    "mri.motion@*.accuracy<0.5", "*.ece>0.2", "clean.sensitivity/csf<0.5", "clean.sensitivity/grey matter<0.5",
    "clean.sensitivity/1<0.5",  # a class by number, as keys read when task.classes does not match the outputs
    "mri.motion@3.drop.accuracy>0.1", "*.ood.knn.fpr95>0.5", "ood:inverted.ood.energy.auroc<0.9",
    "subgroup.sex.accuracy_gap>0.1", "subgroup.sex×age.ece_gap>0.1",
])
def test_validate_accepts_what_the_audit_can_produce(expr: str) -> None:
    validate_checks([expr], VOCAB)


@pytest.mark.parametrize(("expr", "pattern"), [
    ("ct.ring@2.accuracy<0.5", r"names no scenario; scenarios are: clean, mri.motion@1"),
    ("clean.acuracy<0.5", r"no metric 'acuracy' in this audit; metrics are: accuracy, classification, ece, sensitivity "
                          r"\(per class: accuracy/<class>.*classes: csf, grey matter\)"),
    ("*.drop.acc<0.5", r"no metric 'acc'"),
    ("clean.sensitivity/wm<0.5", r"no metric 'sensitivity/wm'"),
    ("clean.drop.accuracy>0.1", r"'clean' has none"),
    ("*.ood.mahalanobis.auroc<0.5", r"no detector 'mahalanobis' runs in this audit; detectors are: energy, knn"),
    ("*.ood.energy.auc<0.5", r"no detector statistic 'auc'; statistics are: auroc, aupr, fpr95"),
    ("ood:inverted.accuracy<0.5", r"external OOD set has detector statistics only"),
    ("subgroup.site.accuracy_gap>0.1", r"'site' is not a metadata column of the data; columns are: age, sex"),
    ("subgroup.sex×site.accuracy_gap>0.1", r"'site' is not a metadata column"),
    ("subgroup.sex.acc_gap>0.1", r"no metric 'acc'"),
    ("subgroup.sex.accuracy>0.1", r"subgroup checks are 'subgroup.ATTRIBUTE.METRIC_gap'"),
])
def test_validate_refuses_names_the_audit_cannot_produce(expr: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        validate_checks([expr], VOCAB)


def test_undeclared_metric_keys_are_accepted() -> None:
    # a metric family that declares no keys may emit any: never refuse what it might produce
    undeclared = Vocabulary(["clean"], None, ("a", "b"), [], [])
    validate_checks(["clean.youden_j<0.5", "clean.anything/at_all<0.5"], undeclared)


@pytest.mark.parametrize(("expr", "scenario", "line"), [
    ("*.accuracy<0.7", "mri.motion@3", "FAIL *.accuracy in mri.motion@3 = 0.6 (fails if < 0.7)"),
    ("mri.motion@*.ood.energy.auroc<0.8", "mri.motion@1", "FAIL mri.motion@*.ood.energy.auroc in mri.motion@1 = 0.7 "
                                                           "(fails if < 0.8)"),
    ("mri.motion@*.drop.accuracy>0.5", "mri.motion@3", "PASS mri.motion@*.drop.accuracy in mri.motion@3 = 0.3 "
                                                      "(fails if > 0.5)"),
    ("clean.accuracy<0.8", "clean", "PASS clean.accuracy = 0.9 (fails if < 0.8)"),
    ("subgroup.sex.accuracy_gap>0.05", None, "FAIL subgroup.sex.accuracy_gap = 0.1 (fails if > 0.05)"),
])
def test_checks_name_the_deciding_scenario(expr: str, scenario: str | None, line: str) -> None:
    (check,) = evaluate_checks([expr], RESULTS)
    assert check["scenario"] == scenario
    assert describe_check(check) == line


def test_an_undefined_wildcard_value_names_its_scenario() -> None:
    results = {**RESULTS, "scenarios": [*RESULTS["scenarios"][:2],
                                        {**RESULTS["scenarios"][2], "metrics": {"accuracy": est(None)}}]}
    (check,) = evaluate_checks(["*.accuracy<0.5"], results)
    assert check["scenario"] == "mri.motion@3" and check["value"] is None and not check["passed"]
    assert describe_check(check) == ("FAIL *.accuracy in mri.motion@3 = undefined (fails if < 0.5): the value is "
                                     "undefined for this audit (in mri.motion@3) (e.g. a single class present)")


def test_values_are_printed_to_four_significant_digits() -> None:
    check = {"expr": "clean.accuracy<0.9", "value": 0.98833333333, "passed": True, "scenario": "clean", "error": None}
    assert describe_check(check) == "PASS clean.accuracy = 0.9883 (fails if < 0.9)"
    assert describe_check({**check, "value": 123456.7}) == "PASS clean.accuracy = 1.235e+05 (fails if < 0.9)"
    ran = {"expr": "perturbation:mri.spike ran", "value": 0.0, "passed": False, "error": "it failed"}
    assert describe_check(ran) == "FAIL perturbation:mri.spike ran: it failed"


def test_junit_has_one_case_per_check() -> None:
    checks = evaluate_checks(["clean.accuracy<0.8", "mri.motion@3.ece>0.1", "clean.auroc<0.5"], RESULTS)
    root = ET.fromstring(junit_xml(checks))
    assert root.attrib == {"name": "medaudit", "tests": "3", "failures": "2", "errors": "0"}
    cases = root.findall("testcase")
    assert [c.attrib["name"] for c in cases] == ["clean.accuracy<0.8", "mri.motion@3.ece>0.1", "clean.auroc<0.5"]
    assert [c.find("failure") is not None for c in cases] == [False, True, True]
    assert cases[1].find("failure").attrib["message"] == "FAIL mri.motion@3.ece = 0.2 (fails if > 0.1)"
    (wild,) = evaluate_checks(["*.accuracy<0.7"], RESULTS)
    failure = ET.fromstring(junit_xml([wild])).find("testcase/failure")
    assert "in mri.motion@3" in failure.attrib["message"] and failure.text.endswith("in mri.motion@3")


def test_representation_and_probe_checks() -> None:
    vocab = Vocabulary(scenarios=["clean", "mri.motion@3"],
                       metrics=frozenset({"accuracy", "sensitivity", "knn_probe/accuracy", "knn_probe/sensitivity"}),
                       classes=("csf", "wm"), detectors=[], columns=[], representation=True)
    validate_checks(["mri.motion@3.representation.cka<0.8", "*.representation.knn_consistency<0.7",
                     "clean.knn_probe/accuracy<0.5", "clean.knn_probe/sensitivity/wm<0.5",
                     "mri.motion@3.drop.knn_probe/accuracy>0.1"], vocab)
    for expr, pattern in [("mri.motion@3.representation.cca<0.8", "MEASURE one of cosine, cka, knn_consistency"),
                          ("clean.representation.cka<0.8", "compare a perturbed scenario with clean"),
                          ("clean.knn_probe/ece<0.5", "no metric 'knn_probe/ece'")]:
        with pytest.raises(ConfigError, match=pattern):
            validate_checks([expr], vocab)
    without = Vocabulary(["clean", "mri.motion@3"], frozenset({"accuracy"}), ("a", "b"), [], [])
    with pytest.raises(ConfigError, match="measures no representation robustness"):
        validate_checks(["*.representation.cka<0.8"], without)
    results = {"metric_directions": {}, "scenarios": [
        {"id": "clean", "perturbation": None, "metrics": {}, "representation": {}},
        {"id": "mri.motion@1", "perturbation": "mri.motion", "metrics": {}, "representation": {"cka": {"value": 0.9}}},
        {"id": "mri.motion@3", "perturbation": "mri.motion", "metrics": {}, "representation": {"cka": {"value": 0.6}}}]}
    (check,) = evaluate_checks(["mri.motion@*.representation.cka<0.8"], results)
    assert (check["value"], check["scenario"], check["passed"]) == (0.6, "mri.motion@3", False)
