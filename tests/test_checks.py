"""The --fail-on grammar: parsing, scenario wildcards, drops, OOD, subgroup gaps, JUnit, non-inferiority gates."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import jsonschema
import numpy as np
import pytest

from medaudit.checks import Vocabulary, describe_check, evaluate_checks, junit_xml, parse_check, validate_checks
from medaudit.errors import ConfigError
from medaudit.results import SCHEMA_PATH, Check


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


# ---------------------------------------------------------------------------------------------
# Non-inferiority gates: SCENARIO.drop.METRIC > MARGIN noninferior
# ---------------------------------------------------------------------------------------------


def drop(value: float | None, high: float | None, low: float | None = None) -> dict[str, Any]:
    return {"value": value, "ci_low": low, "ci_high": high, "relative": None, "significant": False}


def ni_results(**drops: dict[str, Any]) -> dict[str, Any]:
    """Results whose perturbed scenarios have the given accuracy drops (keyword: scenario id with
    ``_`` for ``.`` and ``__`` for ``@``)."""
    scenarios = [{"id": "clean", "perturbation": None, "metrics": {"accuracy": est(0.9)}}]
    for key, d in drops.items():
        sid = key.replace("__", "@").replace("_", ".")
        scenarios.append({"id": sid, "perturbation": sid.split("@")[0], "metrics": {"accuracy": est(0.9 - (d["value"] or 0))},
                          "drop": {"accuracy": d}})
    return {"metric_directions": {"accuracy": True}, "scenarios": scenarios}


NI = ni_results(mri_motion__1=drop(0.02, 0.05, -0.01), mri_motion__3=drop(0.03, 0.08, 0.0),
                mri_spike__3=drop(0.04, 0.06, 0.02))


@pytest.mark.parametrize(("expr", "op", "path"), [
    ("mri.motion@3.drop.accuracy > 0.05 noninferior", ">", "mri.motion@3.drop.accuracy"),
    ("mri.motion@3.drop.accuracy>=0.05 noninferior", ">=", "mri.motion@3.drop.accuracy"),
    ("  *.drop.accuracy>0.05   noninferior ", ">", "*.drop.accuracy"),
    ("mri.motion@*.drop.knn_probe/accuracy > 5e-2 noninferior", ">", "mri.motion@*.drop.knn_probe/accuracy"),
])
def test_noninferiority_parsing(expr: str, op: str, path: str) -> None:
    parsed = parse_check(expr)
    assert (parsed.noninferior, parsed.op, parsed.path, parsed.threshold, parsed.expr) == (
        True, op, path, 0.05, expr.strip())
    assert parse_check(path + " > 0.05").noninferior is False


@pytest.mark.parametrize(("expr", "pattern"), [
    ("mri.motion@3.drop.accuracy < 0.05 noninferior", r"a non-inferiority check bounds a drop from above: "
                                                       r"'SCENARIO.drop.METRIC > MARGIN noninferior' \(or >=\)"),
    ("mri.motion@3.drop.accuracy <= 0.05 noninferior", r"bounds a drop from above"),
    ("mri.motion@3.drop.accuracy == 0.05 noninferior", r"bounds a drop from above"),
    ("mri.motion@3.accuracy > 0.05 noninferior", r"bounds a drop from above"),
    ("clean.accuracy < 0.8 noninferior", r"bounds a drop from above"),
    ("mri.motion@3.ood.energy.auroc > 0.5 noninferior", r"bounds a drop from above"),
    ("mri.motion@3.drop.accuracy > 0.05 non-inferior", r"not a check; .* or a non-inferiority check "
                                                       r"'mri.motion@3.drop.accuracy > 0.05 noninferior'"),
    ("mri.motion@3.drop.accuracy > 0.05noninferior", r"not a check"),
    ("mri.motion@3.drop.accuracy noninferior", r"not a check"),
])
def test_noninferiority_parse_errors_say_how(expr: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_check(expr)


def test_noninferiority_validation_uses_the_drop_vocabulary() -> None:
    validate_checks(["mri.motion@3.drop.accuracy > 0.05 noninferior", "*.drop.ece >= 0.02 noninferior"], VOCAB)
    with pytest.raises(ConfigError, match=r"'clean' has none"):
        validate_checks(["clean.drop.accuracy > 0.05 noninferior"], VOCAB)
    with pytest.raises(ConfigError, match=r"no metric 'acc'"):
        validate_checks(["*.drop.acc > 0.05 noninferior"], VOCAB)


def test_upper_bound_at_the_margin_passes_for_gt_and_fails_for_ge() -> None:
    # mri.motion@1: drop 0.02, upper bound exactly 0.05
    (gt, ge) = evaluate_checks(["mri.motion@1.drop.accuracy > 0.05 noninferior",
                                "mri.motion@1.drop.accuracy >= 0.05 noninferior"], NI)
    assert (gt["passed"], gt["upper_bound"], gt["value"], gt["scenario"]) == (True, 0.05, 0.02, "mri.motion@1")
    assert (ge["passed"], ge["upper_bound"]) == (False, 0.05)
    assert gt["noninferior"] is ge["noninferior"] is True and gt["error"] is None


def test_upper_bound_just_above_the_margin_fails() -> None:
    above = float(np.nextafter(0.05, 1.0))
    results = ni_results(mri_motion__1=drop(0.02, above))
    (check,) = evaluate_checks(["mri.motion@1.drop.accuracy > 0.05 noninferior"], results)
    assert check["passed"] is False and check["upper_bound"] == above


def test_the_upper_bound_decides_not_the_point_estimate() -> None:
    # drop 0.03 is below the margin 0.05, but its interval reaches 0.08: non-inferiority is not shown
    noninferior, plain = evaluate_checks(["mri.motion@3.drop.accuracy > 0.05 noninferior",
                                          "mri.motion@3.drop.accuracy > 0.05"], NI)
    assert noninferior["passed"] is False and noninferior["value"] == 0.03 and noninferior["upper_bound"] == 0.08
    assert plain["passed"] is True and plain["value"] == 0.03 and plain["upper_bound"] is None and not plain["noninferior"]


def test_a_wildcard_takes_the_scenario_with_the_highest_upper_bound() -> None:
    (ni, plain) = evaluate_checks(["*.drop.accuracy > 0.1 noninferior", "*.drop.accuracy > 0.1"], NI)
    # the largest upper bound (0.08, mri.motion@3), not the largest drop (0.04, mri.spike@3)
    assert (ni["scenario"], ni["upper_bound"], ni["value"], ni["passed"]) == ("mri.motion@3", 0.08, 0.03, True)
    assert (plain["scenario"], plain["value"]) == ("mri.spike@3", 0.04)
    (sev,) = evaluate_checks(["mri.motion@*.drop.accuracy > 0.07 noninferior"], NI)
    assert (sev["scenario"], sev["passed"]) == ("mri.motion@3", False)


def test_without_an_interval_noninferiority_cannot_be_shown() -> None:
    results = ni_results(mri_motion__1=drop(0.0, 0.01), mri_motion__3=drop(0.01, None))  # audit.bootstrap: 0
    (check,) = evaluate_checks(["mri.motion@*.drop.accuracy > 0.05 noninferior"], results)
    assert (check["passed"], check["value"], check["upper_bound"], check["p_value"], check["scenario"]) == (
        False, None, None, None, "mri.motion@3")
    assert check["error"] == ("the drop has no confidence interval in mri.motion@3 (audit.bootstrap: 0, or the metric "
                              "is undefined on every resample), so non-inferiority cannot be shown")
    assert describe_check(check) == f"FAIL mri.motion@*.drop.accuracy in mri.motion@3 non-inferiority: {check['error']}"
    with pytest.raises(ConfigError, match=r"no drop 'ece' in scenario '\*'"):
        evaluate_checks(["*.drop.ece > 0.05 noninferior"], results)


def test_p_value_is_the_one_sided_bootstrap_p_value() -> None:
    nan = float("nan")
    rows = {"mri.motion@1": [0.01, 0.05, 0.07, nan, 0.02, 0.05, nan, 0.09, -0.01, 0.049999]}
    calls: list[tuple[str, str]] = []

    def drop_rows(sid: str, key: str) -> list[float] | None:
        calls.append((sid, key))
        return rows.get(sid)

    (check,) = evaluate_checks(["mri.motion@1.drop.accuracy > 0.05 noninferior"], NI, drop_rows)
    assert calls == [("mri.motion@1", "accuracy")]
    # by hand: 8 resamples left after the 2 NaN rows, 4 of them >= 0.05 (0.05, 0.07, 0.05, 0.09)
    assert check["p_value"] == (1 + 4) / (1 + 8)
    finite = np.array([d for d in rows["mri.motion@1"] if d == d])
    assert check["p_value"] == (1 + int((finite >= 0.05).sum())) / (1 + finite.size)
    # a wildcard's p-value is its deciding scenario's
    calls.clear()
    (wild,) = evaluate_checks(["*.drop.accuracy > 0.1 noninferior"], NI, drop_rows)
    assert calls == [("mri.motion@3", "accuracy")] and wild["p_value"] is None  # no rows: no p-value
    (none,) = evaluate_checks(["mri.motion@1.drop.accuracy > 0.05 noninferior"], NI)
    assert none["p_value"] is None and none["passed"] is True  # the decision is the bound's either way
    # never 0: (1 + 0) / (1 + R)
    (tiny,) = evaluate_checks(["mri.motion@1.drop.accuracy > 0.5 noninferior"], NI, lambda s, k: [0.0] * 19)
    assert tiny["p_value"] == 1 / 20


@pytest.mark.parametrize(("expr", "p", "line"), [
    ("mri.motion@3.drop.accuracy > 0.1 noninferior", 0.25,
     "PASS mri.motion@3.drop.accuracy = 0.03, upper bound 0.08 (non-inferiority margin 0.1: within the margin; "
     "one-sided p = 0.25)"),
    ("mri.motion@3.drop.accuracy >= 0.05 noninferior", None,
     "FAIL mri.motion@3.drop.accuracy = 0.03, upper bound 0.08 (non-inferiority margin 0.05: not shown within the "
     "margin)"),
    ("*.drop.accuracy > 0.1 noninferior", 1 / 3,
     "PASS *.drop.accuracy in mri.motion@3 = 0.03, upper bound 0.08 (non-inferiority margin 0.1: within the margin; "
     "one-sided p = 0.333)"),
])
def test_describe_noninferiority_check(expr: str, p: float | None, line: str) -> None:
    rows = None if p is None else [0.2] * round(p * 12 - 1) + [0.0] * (11 - round(p * 12 - 1))  # R = 11
    (check,) = evaluate_checks([expr], NI, lambda s, k: rows)
    assert check["p_value"] == (p if p is None else pytest.approx(p))
    assert describe_check(check) == line
    if not check["passed"]:
        failure = ET.fromstring(junit_xml([check])).find("testcase/failure")
        assert failure.attrib["message"] == line


def test_a_noninferiority_check_validates_as_a_results_check() -> None:
    (check,) = evaluate_checks(["*.drop.accuracy > 0.1 noninferior"], NI, lambda s, k: [0.0, 0.2, 0.05])
    model = Check.model_validate(check)
    assert (model.noninferior, model.upper_bound, model.p_value, model.scenario) == (True, 0.08, 0.5, "mri.motion@3")
    assert model.model_dump() == check
    defs = json.loads(SCHEMA_PATH.read_text())["$defs"]
    jsonschema.validate(check, {"$ref": "#/$defs/Check", "$defs": defs})
    (plain,) = evaluate_checks(["clean.accuracy<0.8"], RESULTS)
    assert Check.model_validate(plain).noninferior is False  # older files, without the fields, still validate
