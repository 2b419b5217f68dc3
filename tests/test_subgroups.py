"""Subgroup analysis: per-group metrics against fairlearn, gaps, permutation tests, Holm, grouping rules."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
)
from medaudit.bootstrap import bootstrap_weights, evaluate
from medaudit.checks import evaluate_checks
from medaudit.config import Config, load_config
from medaudit.errors import ConfigError
from medaudit.metric import MetricContext
from medaudit.outputs import AuditOutputs, Scenario
from medaudit.plugin_manager import get_plugin_manager
from medaudit.plugins import subgroups as sg
from medaudit.plugins.subgroups import SubgroupSettings
from medaudit.plugins.calibration import CalibrationMetrics
from medaudit.plugins.classification import ClassificationMetrics
from medaudit.report import render_report
from medaudit.results import Results, SubgroupResult, clean_floats
from medaudit.settings import resolve_settings
from pydantic import ValidationError
from scipy import stats
from sklearn.metrics import accuracy_score, recall_score

ATOL = 1e-9


# ---------------------------------------------------------------------------------------------
# Synthetic audits
# ---------------------------------------------------------------------------------------------


def binary_probs(labels: np.ndarray, rng: np.random.Generator, strength: float = 1.2, decimals: int | None = None) -> np.ndarray:
    logit = rng.normal(size=labels.size) + strength * (2 * labels - 1)
    p1 = 1 / (1 + np.exp(-logit))
    if decimals is not None:  # coarse scores: many ties in AUROC and calibration bins
        p1 = np.round(p1, decimals)
    return np.stack([1 - p1, p1], axis=1)


def multiclass_probs(labels: np.ndarray, k: int, rng: np.random.Generator, decimals: int | None = None) -> np.ndarray:
    logits = rng.normal(size=(labels.size, k)) * 1.5
    logits[np.arange(labels.size), labels] += 1.3
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    if decimals is not None:
        p = np.round(p, decimals)
        p[:, -1] = 1 - p[:, :-1].sum(1)
        p = np.clip(p, 0, 1)
        p /= p.sum(1, keepdims=True)
    return p


def make_outputs(
    probs: np.ndarray | list[np.ndarray],
    labels: np.ndarray,
    metadata: dict[str, list[Any]],
    task: str = "binary",
    scenarios: list[Scenario] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    metrics: list | None = None,
) -> AuditOutputs:
    stack = np.stack(probs) if isinstance(probs, list) else probs[None]
    scenarios = scenarios or [Scenario.clean()]
    k = stack.shape[-1]
    n = labels.shape[0]
    ctx = MetricContext(task, tuple(f"c{i}" for i in range(k)))
    return AuditOutputs(
        scenarios=scenarios, sample_ids=[str(i) for i in range(n)], labels=torch.from_numpy(labels).long(),
        probs=torch.from_numpy(stack).float(), metadata=metadata,
        metrics=metrics if metrics is not None else [ClassificationMetrics(), CalibrationMetrics()], ctx=ctx,
        bootstrap_weights=bootstrap_weights(n, n_boot, seed), confidence=0.95, seed=seed,
    )


def entries(res: dict[str, Any], scenario: str = "clean", attribute: str | None = None) -> dict[str, dict[str, Any]]:
    return {e["group"]: e for e in res["subgroups"]
            if e["scenario"] == scenario and (attribute is None or e["attribute"] == attribute)}


def gap(res: dict[str, Any], metric: str, scenario: str = "clean", attribute: str | None = None) -> dict[str, Any]:
    found = [e for e in res["subgroup_gaps"] if e["scenario"] == scenario and e["metric"] == metric
             and (attribute is None or e["attribute"] == attribute)]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def binary_audit() -> tuple[AuditOutputs, dict[str, Any], np.ndarray]:
    """400 samples, sex with missing values in three spellings, a site column, two perturbations."""
    rng = np.random.default_rng(1)
    n = 400
    labels = rng.integers(0, 2, n)
    sex: list[Any] = list(rng.choice(["F", "M"], n))
    for i, v in zip(range(0, 40, 10), [None, "", float("nan"), "  "]):
        sex[i] = v  # four missing spellings: must form one "(missing)" group of 4
    site = list(rng.choice(["A", "B", "C"], n, p=[0.5, 0.45, 0.05]))
    clean = binary_probs(labels, rng, decimals=2)
    blur1 = binary_probs(labels, rng, strength=1.0)
    blur3 = binary_probs(labels, rng, strength=0.5)
    noise2 = binary_probs(labels, rng, strength=0.8)
    scenarios = [Scenario.clean(), Scenario.perturbed("blur", "s", 1), Scenario.perturbed("blur", "s", 3),
                 Scenario.perturbed("noise", "s", 2)]
    outputs = make_outputs([clean, blur1, blur3, noise2], labels, {"sex": sex, "site": site}, "binary", scenarios)
    cfg = SubgroupSettings(attributes=["sex", "site"], intersections=[["sex", "site"]], min_group_size=30, permutations=199)
    return outputs, sg.analyze(outputs, cfg), clean


def group_labels(values: list[Any]) -> np.ndarray:
    return np.array([sg.MISSING_GROUP if sg.is_missing(v) else v for v in values], dtype=object)


# ---------------------------------------------------------------------------------------------
# Per-group metrics and fairness differences against fairlearn
# ---------------------------------------------------------------------------------------------


def test_group_metrics_match_fairlearn_metricframe(binary_audit):
    outputs, res, clean = binary_audit
    y = outputs.labels.numpy()
    y_pred = (clean[:, 1] >= 0.5).astype(int)
    sex = group_labels(outputs.metadata["sex"])
    frame = MetricFrame(metrics={"accuracy": accuracy_score, "recall": recall_score}, y_true=y, y_pred=y_pred,
                        sensitive_features=sex)
    got = entries(res, attribute="sex")
    assert set(got) == {"F", "M", sg.MISSING_GROUP}
    for group in ("F", "M"):
        assert got[group]["metrics"]["accuracy"]["value"] == pytest.approx(frame.by_group.loc[group, "accuracy"], abs=ATOL)
        assert got[group]["metrics"]["sensitivity"]["value"] == pytest.approx(frame.by_group.loc[group, "recall"], abs=ATOL)
        assert got[group]["n"] == int((sex == group).sum())
        ci = got[group]["metrics"]["accuracy"]
        assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
    # the gap is max - min over the groups that are large enough (F, M; the 4 missing are too small)
    g = gap(res, "accuracy", attribute="sex")
    by = frame.by_group["accuracy"][["F", "M"]]
    assert g["gap"]["value"] == pytest.approx(by.max() - by.min(), abs=ATOL)
    assert g["worst_group"] == by.idxmin() and g["worst_value"] == pytest.approx(by.min(), abs=ATOL)
    assert g["ratio"] == pytest.approx(by.min() / by.max(), abs=ATOL)
    assert g["gap"]["ci_low"] <= g["gap"]["value"] <= g["gap"]["ci_high"]


def test_fairness_differences_match_fairlearn(binary_audit):
    outputs, res, clean = binary_audit
    y = outputs.labels.numpy()
    y_pred = (clean[:, 1] >= 0.5).astype(int)
    site = np.array(outputs.metadata["site"])
    keep = site != "C"  # C (~5 %) is below min_group_size: excluded from gaps, as from the tests
    assert entries(res, attribute="site")["C"]["too_small"] is True
    dp = gap(res, "demographic_parity_difference", attribute="site")
    eo = gap(res, "equalized_odds_difference", attribute="site")
    assert dp["gap"]["value"] == pytest.approx(
        demographic_parity_difference(y[keep], y_pred[keep], sensitive_features=site[keep]), abs=ATOL)
    assert eo["gap"]["value"] == pytest.approx(
        equalized_odds_difference(y[keep], y_pred[keep], sensitive_features=site[keep]), abs=ATOL)
    assert dp["kind"] == eo["kind"] == "fairness"
    assert 0 <= dp["p_value"] <= 1 and 0 <= eo["p_value"] <= 1
    # per-group rates are reported alongside the metrics
    a = entries(res, attribute="site")["A"]
    sel = y_pred[site == "A"].mean()
    assert a["rates"]["selection_rate"]["value"] == pytest.approx(sel, abs=ATOL)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
@pytest.mark.parametrize("decimals", [None, 1])
def test_headline_rows_equal_metric_plugins_on_bootstrap_and_permutation_rows(task: str, decimals: int | None):
    """The group-sum fast path must equal the metric plugins evaluated on each group's rows."""
    rng = np.random.default_rng(7)
    n, k, groups = 150, (2 if task == "binary" else 3), 3
    y = rng.integers(0, k, n)
    p = binary_probs(y, rng, decimals=decimals) if task == "binary" else multiclass_probs(y, k, rng, decimals)
    probs, labels = torch.from_numpy(p).float(), torch.from_numpy(y)
    grp = torch.from_numpy(rng.integers(0, groups, n))
    ctx = MetricContext(task, tuple(f"c{i}" for i in range(k)))
    metrics = [ClassificationMetrics(), CalibrationMetrics()]
    w = bootstrap_weights(n, 20, 3).double()
    fast = sg.headline_rows(probs, labels, w, grp, groups, ctx)
    for g in range(groups):
        sel = grp == g
        _, raw = evaluate(metrics, probs[sel], labels[sel], w[:, sel], ctx)
        for key in sg.HEADLINE:
            torch.testing.assert_close(fast[key][:, g], raw[key], atol=1e-9, rtol=0, equal_nan=True)
    # permutation rows: a different labelling per row, unit weights (the float32-exact AUROC path)
    perm = torch.stack([grp[torch.randperm(n, generator=torch.Generator().manual_seed(i))] for i in range(6)])
    ones = torch.ones(6, n, dtype=torch.float64)
    fast_p = sg.headline_rows(probs, labels, ones, perm, groups, ctx)
    for r in range(6):
        for g in range(groups):
            sel = perm[r] == g
            _, raw = evaluate(metrics, probs[sel], labels[sel], torch.ones(1, int(sel.sum())), ctx)
            for key in sg.HEADLINE:
                torch.testing.assert_close(fast_p[key][r, g], raw[key][0], atol=1e-9, rtol=0, equal_nan=True)
    # non-integer weights take the float64 AUROC path and still agree
    wf = torch.rand(4, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    fast_f = sg.headline_rows(probs, labels, wf, perm[:4], groups, ctx, keys=["auroc"])
    for r in range(4):
        sel = perm[r] == 0
        _, raw = evaluate([ClassificationMetrics()], probs[sel], labels[sel], wf[r : r + 1, sel], ctx)
        torch.testing.assert_close(fast_f["auroc"][r, 0], raw["auroc"][0], atol=1e-9, rtol=0)


def test_multilabel_takes_the_generic_path():
    rng = np.random.default_rng(11)
    n, k = 120, 3
    y = rng.integers(0, 2, (n, k))
    p = np.clip(0.7 * y + 0.3 * rng.random((n, k)), 0, 1)
    ctx = MetricContext("multilabel", ("a", "b", "c"))
    scen = [Scenario.clean(), Scenario.perturbed("noise", "s", 2)]
    out = AuditOutputs(scen, [str(i) for i in range(n)], torch.from_numpy(y), torch.from_numpy(np.stack([p, p[::-1].copy()])).float(),
                       {"site": list(rng.choice(["A", "B"], n))}, [ClassificationMetrics(), CalibrationMetrics()], ctx,
                       bootstrap_weights(n, 20, 0), 0.95, 0)
    res = sg.analyze(out, SubgroupSettings(attributes=["site"], permutations=19))
    pert = entries(res, "noise@2")
    assert set(pert["A"]["metrics"]) == set(sg.HEADLINE)
    assert pert["A"]["class_counts"] == {name: int(v) for name, v in zip("abc", y[np.array(out.metadata["site"]) == "A"].sum(0))}
    assert gap(res, "auroc", "noise@2")["p_value"] is not None


# ---------------------------------------------------------------------------------------------
# Subgroup x perturbation
# ---------------------------------------------------------------------------------------------


def test_perturbed_metrics_follow_the_audit_metrics_and_survive_untestable_attributes():
    rng = np.random.default_rng(4)
    n = 120
    y = rng.integers(0, 2, n)
    scen = [Scenario.clean(), Scenario.perturbed("noise", "s", 4)]
    meta = {"id": [str(i) for i in range(n)], "site": ["A", "B"] * (n // 2)}  # every id group is too small
    out = make_outputs([binary_probs(y, rng), binary_probs(y, rng, 0.5)], y, meta, scenarios=scen,
                       metrics=[ClassificationMetrics()])  # no calibration plugin: no ECE anywhere
    res = sg.analyze(out, SubgroupSettings(attributes=["id", "site"], permutations=19))
    assert res["subgroup_settings"]["perturbed_metrics"] == ["accuracy", "balanced_accuracy", "auroc"]
    assert set(entries(res, "noise@4", "site")["A"]["metrics"]) == {"accuracy", "balanced_accuracy", "auroc"}
    assert all(e["too_small"] for e in res["subgroups"] if e["attribute"] == "id")


def test_perturbations_are_analysed_at_their_highest_severity(binary_audit):
    _, res, _ = binary_audit
    assert res["subgroup_settings"]["scenarios"] == ["clean", "blur@3", "noise@2"]
    assert not [e for e in res["subgroups"] if e["scenario"] == "blur@1"]
    pert = entries(res, "blur@3", "sex")
    clean = entries(res, "clean", "sex")
    assert set(pert["F"]["metrics"]) == set(sg.HEADLINE)
    assert set(clean["F"]["metrics"]) > set(sg.HEADLINE)  # clean: every metric of the audit
    for key in sg.HEADLINE:  # per-group drop from clean, paired on the same resamples
        drop = pert["F"]["drop"][key]
        expected = clean["F"]["metrics"][key]["value"] - pert["F"]["metrics"][key]["value"]
        assert drop["value"] == pytest.approx(expected if sg.HEADLINE[key] else -expected, abs=1e-12)
    g = gap(res, "accuracy", "blur@3", "sex")
    drops = {grp: pert[grp]["drop"]["accuracy"]["value"] for grp in ("F", "M")}
    assert g["drop_gap"]["value"] == pytest.approx(max(drops.values()) - min(drops.values()), abs=1e-12)
    assert g["drop_gap"]["most_affected_group"] == max(drops, key=drops.get)
    assert 0 < g["drop_gap"]["p_value"] <= 1


def test_a_perturbation_that_hurts_one_group_is_detected():
    rng = np.random.default_rng(3)
    n = 300
    y = rng.integers(0, 2, n)
    grp = np.array(["a", "b"] * (n // 2))
    clean = binary_probs(y, rng, strength=2.0)
    hurt = clean.copy()
    flip = (grp == "b") & (rng.random(n) < 0.4)  # the artifact flips 40 % of group b only
    hurt[flip] = hurt[flip][:, ::-1]
    out = make_outputs([clean, hurt], y, {"g": list(grp)}, scenarios=[Scenario.clean(), Scenario.perturbed("art", "s", 5)])
    res = sg.analyze(out, SubgroupSettings(attributes=["g"], min_group_size=10, permutations=999))
    g = gap(res, "accuracy", "art@5")
    assert g["drop_gap"]["most_affected_group"] == "b"
    assert g["drop_gap"]["p_value"] == pytest.approx(1 / 1000)
    assert g["drop_gap"]["significant"] is True
    # clean: the same groups perform alike, nothing is flagged
    assert not any(e["significant"] for e in res["subgroup_gaps"] if e["scenario"] == "clean")


# ---------------------------------------------------------------------------------------------
# The worst group against the rest: an interval that can contain 0
# ---------------------------------------------------------------------------------------------


def weighted_accuracy(correct: np.ndarray, w: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Per weight row, the accuracy of the selected samples (numpy reference, ``[1 + R]``)."""
    return (w[:, sel] * correct[sel]).sum(1) / w[:, sel].sum(1)


def test_worst_vs_rest_is_the_paired_difference_from_the_pooled_other_groups():
    """Three groups: by hand from the weight matrix, on clean (generic path) and perturbed (group sums)."""
    rng = np.random.default_rng(11)
    n = 360
    y = rng.integers(0, 2, n)
    grp = rng.choice(["a", "b", "c"], n)
    clean, pert = binary_probs(y, rng), binary_probs(y, rng, strength=0.6)
    scen = [Scenario.clean(), Scenario.perturbed("p", "s", 1)]
    out = make_outputs([clean, pert], y, {"g": list(grp)}, scenarios=scen, n_boot=300)
    res = sg.analyze(out, SubgroupSettings(attributes=["g"], min_group_size=10, permutations=0))
    w = out.bootstrap_weights.double().numpy()
    for sid, probs in (("clean", clean), ("p@1", pert)):
        correct = ((probs[:, 1] >= 0.5) == y).astype(float)
        acc = {x: weighted_accuracy(correct, w, grp == x) for x in "abc"}
        worst = min("abc", key=lambda x: acc[x][0])
        diff = weighted_accuracy(correct, w, grp != worst) - acc[worst]  # rest minus worst: positive is worse
        got = gap(res, "accuracy", sid)
        assert got["worst_group"] == worst
        assert got["worst_vs_rest"]["value"] == pytest.approx(diff[0], abs=ATOL)
        assert got["worst_vs_rest"]["rest_value"] == pytest.approx(weighted_accuracy(correct, w, grp != worst)[0], abs=ATOL)
        assert got["worst_vs_rest"]["ci_low"] == pytest.approx(np.percentile(diff[1:], 2.5), abs=ATOL)
        assert got["worst_vs_rest"]["ci_high"] == pytest.approx(np.percentile(diff[1:], 97.5), abs=ATOL)
    # the perturbation's most affected group against the rest: a difference of paired drops
    correct_c = ((clean[:, 1] >= 0.5) == y).astype(float)
    correct_p = ((pert[:, 1] >= 0.5) == y).astype(float)
    drop = {x: weighted_accuracy(correct_c, w, grp == x) - weighted_accuracy(correct_p, w, grp == x) for x in "abc"}
    most = max("abc", key=lambda x: drop[x][0])
    rest_drop = weighted_accuracy(correct_c, w, grp != most) - weighted_accuracy(correct_p, w, grp != most)
    dg = gap(res, "accuracy", "p@1")["drop_gap"]
    assert dg["most_affected_group"] == most
    assert dg["most_affected_vs_rest"]["value"] == pytest.approx(drop[most][0] - rest_drop[0], abs=ATOL)
    assert dg["most_affected_vs_rest"]["ci_low"] == pytest.approx(np.percentile((drop[most] - rest_drop)[1:], 2.5), abs=ATOL)


def test_worst_vs_rest_of_a_lower_is_better_metric_is_oriented_worse_positive():
    rng = np.random.default_rng(12)
    n = 300
    y = rng.integers(0, 2, n)
    grp = np.array(["a", "b"] * (n // 2))
    probs = binary_probs(y, rng)
    res = sg.analyze(make_outputs(probs, y, {"g": list(grp)}), SubgroupSettings(attributes=["g"], permutations=0))
    g = gap(res, "ece")
    # two groups: the rest is the other group, so the value is the gap itself, worst minus best
    assert g["worst_value"] >= g["best_value"]
    assert g["worst_vs_rest"]["value"] == pytest.approx(g["worst_value"] - g["best_value"], abs=ATOL)
    assert g["worst_vs_rest"]["rest_value"] == pytest.approx(g["best_value"], abs=ATOL)


def test_identical_groups_worst_vs_rest_contains_zero_where_the_gap_interval_does_not():
    """Groups drawn at random (no real difference): the max - min gap's interval excludes 0 in
    (nearly) every seed, the worst-vs-rest interval contains it in most, like the test's p > 0.05."""
    rng = np.random.default_rng(2025)
    n, sims = 300, 30
    contains, gap_contains, agree = 0, 0, 0
    for s in range(sims):
        y = rng.integers(0, 2, n)
        out = make_outputs(binary_probs(y, rng), y, {"g": list(rng.choice(["a", "b"], n))}, n_boot=200, seed=s,
                           metrics=[ClassificationMetrics()])
        g = gap(sg.analyze(out, SubgroupSettings(attributes=["g"], min_group_size=10, permutations=199)), "accuracy")
        inside = g["worst_vs_rest"]["ci_low"] <= 0 <= g["worst_vs_rest"]["ci_high"]
        contains += inside
        gap_contains += g["gap"]["ci_low"] <= 0
        agree += inside == (g["p_value"] > 0.05)
    assert gap_contains <= 2  # the bias the issue is about: the gap's own interval sits above 0
    assert contains >= 25  # nominal 95 %: about 28.5 of 30
    assert agree >= 27  # the interval and the test say the same thing


def test_a_clear_difference_excludes_zero_and_agrees_with_the_test():
    rng = np.random.default_rng(5)
    n = 240
    y = rng.integers(0, 2, n)
    grp = np.array(["a", "b", "c"] * (n // 3))
    probs = binary_probs(y, rng, strength=2.0)
    bad = (grp == "c") & (rng.random(n) < 0.35)
    probs[bad] = probs[bad][:, ::-1]
    res = sg.analyze(make_outputs(probs, y, {"g": list(grp)}), SubgroupSettings(attributes=["g"], min_group_size=10,
                                                                                 permutations=999))
    g = gap(res, "accuracy")
    assert g["worst_group"] == "c" and g["significant"] is True
    assert g["worst_vs_rest"]["ci_low"] > 0  # c is below the rest on (nearly) every resample
    # c's accuracy is ~0.35 below a and b, so against a and b pooled the difference is close to the gap
    assert 0.2 < g["worst_vs_rest"]["value"] <= g["gap"]["value"]


def test_an_untestable_attribute_has_an_undefined_worst_vs_rest():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 100)
    grp = ["a"] * 95 + ["b"] * 5
    res = sg.analyze(make_outputs(binary_probs(y, rng), y, {"g": grp}),
                     SubgroupSettings(attributes=["g"], min_group_size=10, permutations=0))
    assert res["subgroup_gaps"] == []  # one eligible group: no gap entries at all
    res = sg.analyze(make_outputs(binary_probs(y, rng), y, {"g": ["a", "b"] * 50}, n_boot=0),
                     SubgroupSettings(attributes=["g"], permutations=0))
    g = gap(res, "accuracy")
    assert g["worst_vs_rest"]["value"] is not None and g["worst_vs_rest"]["ci_low"] is None  # no resamples


def report_results(gaps: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts of results.json the subgroup section reads, around hand-made gap entries."""
    info = {k: {"family": "classification", "plugin": "classification", "higher_is_better": True, "headline": True,
                "order": i, "lead": k == "accuracy"} for i, k in enumerate(["accuracy", "auroc"])}
    return {"metric_info": info, "config": {"audit": {"confidence": 0.95}}, "subgroups": [],
            "scenarios": [{"id": "clean", "metrics": {k: {"value": 0.9} for k in info}}],
            "analyses": {"subgroup_gaps": gaps, "subgroup_settings": {"alpha": 0.05}}}


def gap_entry(attribute: str, metric: str = "accuracy", **kw: Any) -> dict[str, Any]:
    entry = {"scenario": "clean", "attribute": attribute, "metric": metric, "higher_is_better": True,
             "gap": {"value": 0.009, "ci_low": 0.001, "ci_high": 0.026}, "worst_group": "left", "worst_value": 0.98,
             "worst_vs_rest": {"value": 0.009, "ci_low": -0.004, "ci_high": 0.022, "rest_value": 0.989},
             "p_value": 0.475, "p_adjusted": 1.0, "significant": False}
    return {**entry, **kw}


def test_report_reads_each_attribute_plainly():
    gaps = [
        gap_entry("hemisphere"),
        gap_entry("site", worst_group="B", p_value=0.001, p_adjusted=0.004, significant=True,
                  worst_vs_rest={"value": 0.12, "ci_low": 0.05, "ci_high": 0.19}),
        gap_entry("level", p_value=0.02, p_adjusted=0.08),
        gap_entry("scanner", p_value=None, p_adjusted=None, worst_vs_rest={"value": 0.03, "ci_low": None, "ci_high": None}),
        gap_entry("sex", metric="auroc", p_value=0.001, significant=True),  # not the primary metric: no line
        gap_entry("age", scenario="noise@5"),  # perturbed: no line
    ]
    assert sg.report.gap_readings(report_results(gaps)) == [
        "hemisphere: no evidence of a gap (p = 0.475); the worst group, left, is 0.009 below the rest [-0.004, 0.022].",
        "level: no significant gap after correcting for multiple comparisons (p = 0.020, adjusted 0.080); the worst "
        "group, left, is 0.009 below the rest [-0.004, 0.022].",
        "scanner: not tested (no permutations); the worst group, left, is 0.030 below the rest.",
        "site: a significant gap (p = 0.001, adjusted 0.004); the worst group, B, is 0.120 below the rest [0.050, 0.190].",
    ]
    ece = gap_entry("hemisphere", metric="ece", higher_is_better=False)
    r = report_results([ece])
    r["metric_info"] = {"ece": {"family": "calibration", "plugin": "calibration", "higher_is_better": False,
                                "headline": True, "order": 0, "lead": True}}
    r["scenarios"][0]["metrics"] = {"ece": {"value": 0.02}}
    assert sg.report.gap_readings(r)[0].endswith("is 0.009 above the rest [-0.004, 0.022].")


def test_report_table_shows_the_worst_vs_rest_interval_beside_the_test_not_the_gap_interval():
    old = gap_entry("level")
    del old["worst_vs_rest"]  # results written before the key existed
    t = sg.report.gap_table(report_results([gap_entry("hemisphere"), old]))
    assert t.headers[3:] == ["Worst group (value)", "Gap", "Worst vs rest [CI]", "p", "p adjusted", "Significant"]
    assert t.rows[0].cells[3:] == ["left (0.980)", "0.009", "0.009 [-0.004, 0.022]", "0.475", "1.000", "no"]
    assert t.rows[1].cells[5] == "–"
    assert "0.001" not in " ".join(c for row in t.rows for c in row.cells)  # the gap's biased interval is gone


def test_report_table_states_the_family_of_the_correction():
    drop = gap_entry("site", scenario="noise@5", drop_gap={"p_value": 0.01, "p_adjusted": 0.05})
    gaps = [gap_entry("hemisphere"), gap_entry("level", p_value=None), drop]
    r = report_results(gaps)
    r["analyses"]["subgroup_settings"].update(holm_family="audit", correction="holm-bonferroni over the audit (3 tests)")
    caption = sg.report.gap_table(r).caption
    assert "adjusted for multiple comparisons (Holm, over all 3 gaps tested in the audit)" in caption
    assert "per scenario" not in caption
    r["analyses"]["subgroup_settings"].update(holm_family="scenario")
    assert "(Holm, per scenario)" in sg.report.gap_table(r).caption
    # results.json written before holm_family existed: corrected per scenario, and says so
    del r["analyses"]["subgroup_settings"]["holm_family"]
    assert "(Holm, per scenario)" in sg.report.gap_table(r).caption
    del r["analyses"]["subgroup_settings"]
    assert "(Holm, per scenario)" in sg.report.gap_table(r).caption


def test_rendered_section_explains_the_gap_bias_and_reads_the_attributes(binary_audit):
    _, res, _ = binary_audit
    data = json.loads((Path(__file__).parent / "fixtures" / "results-full.json").read_text())
    data["subgroups"] = clean_floats(res["subgroups"])
    data["analyses"] = {"subgroup_gaps": clean_floats(res["subgroup_gaps"]),
                        "subgroup_settings": res["subgroup_settings"]}
    html = render_report(Results.model_validate(data), get_plugin_manager(warn=lambda m: None))
    section = html[html.index('<section id="subgroups">'):]
    section = section[:section.index("</section>")]
    assert "almost never contains 0" in section
    for attr in ("sex", "site"):
        assert f"<li>{attr}: " in section and "the rest [" in section
    assert "Worst vs rest [CI]" in section
    m = sum(s["p_value"] is not None for s in slots_of(res))
    assert f"(Holm, over all {m} gaps tested in the audit)" in section


# ---------------------------------------------------------------------------------------------
# Permutation tests and Holm-Bonferroni
# ---------------------------------------------------------------------------------------------


def test_permutation_p_values_are_uniform_under_the_null():
    """Groups assigned at random: p-values of the accuracy gap are (approximately) uniform."""
    rng = np.random.default_rng(2024)
    n, sims = 120, 100
    pvals = []
    for s in range(sims):
        y = rng.integers(0, 2, n)
        probs = binary_probs(y, rng, strength=0.7)
        out = make_outputs(probs, y, {"g": list(rng.choice(["a", "b", "c"], n))}, n_boot=0, seed=s,
                           metrics=[ClassificationMetrics()])
        res = sg.analyze(out, SubgroupSettings(attributes=["g"], min_group_size=5, permutations=199))
        pvals.append(gap(res, "auroc")["p_value"])
    pvals = np.array(pvals)
    # binomial(100, 0.05): mean 5, sd 2.2; 12 is ~3 sd above
    assert (pvals <= 0.05).sum() <= 12
    assert 0.3 <= (pvals <= 0.5).mean() <= 0.7
    assert stats.kstest(pvals, "uniform").pvalue > 0.01


def test_permutation_p_value_is_small_for_a_planted_gap():
    rng = np.random.default_rng(5)
    n = 240
    y = rng.integers(0, 2, n)
    grp = np.array(["a", "b"] * (n // 2))
    probs = binary_probs(y, rng, strength=2.0)
    bad = (grp == "b") & (rng.random(n) < 0.35)
    probs[bad] = probs[bad][:, ::-1]
    res = sg.analyze(make_outputs(probs, y, {"g": list(grp)}), SubgroupSettings(attributes=["g"], permutations=999))
    g = gap(res, "accuracy")
    assert g["worst_group"] == "b"
    assert g["p_value"] == pytest.approx(1 / 1000)
    assert g["significant"] is True
    assert not [w for w in res["warnings"] if "permutations" in w]


def test_too_few_permutations_for_the_correction_warn():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 100)
    res = sg.analyze(make_outputs(binary_probs(y, rng), y, {"g": ["a", "b"] * 50}),
                     SubgroupSettings(attributes=["g"], permutations=99))
    m = sum(e["p_value"] is not None for e in res["subgroup_gaps"])
    warning = [w for w in res["warnings"] if "permutations" in w]
    assert len(warning) == 1 and f"at least {math.ceil(m / 0.05)}" in warning[0]
    assert f"the {m} gaps tested in the whole audit (subgroups.holm_family: audit)" in warning[0]
    assert "or correct per scenario (subgroups.holm_family: scenario)" in warning[0]


def test_too_few_permutations_for_a_scenario_family_name_the_scenario(binary_audit):
    outputs, _, _ = binary_audit
    res = sg.analyze(outputs, SubgroupSettings(attributes=["sex", "site"], permutations=19, holm_family="scenario"))
    sizes = {sid: sum(s["p_value"] is not None for s in slots_of(res, sid)) for sid in res["subgroup_settings"]["scenarios"]}
    sid, m = max(sizes.items(), key=lambda t: t[1])
    warning = [w for w in res["warnings"] if "permutations" in w]
    assert len(warning) == 1
    assert f"the {m} gaps tested in scenario '{sid}' (subgroups.holm_family: scenario)" in warning[0]
    assert f"at least {math.ceil(m / 0.05)}" in warning[0] and "or correct per scenario" not in warning[0]


@pytest.mark.parametrize(("m", "alpha", "needed"), [
    (326, 0.05, 6520),  # the example's audit family: 326/6520 is exactly 0.05, not below it
    (38, 0.05, 760), (13, 0.05, 260), (1, 0.05, 20), (7, 0.01, 700), (3, 0.1, 30),
    (1, 0.32, 3),  # m/alpha = 3.125: 3 permutations give p >= 1/4 < 0.32 (ceil(m/alpha) = 4 is one too many)
    (5, 0.3, 16),  # 16.67: 5/17 < 0.3 <= 5/16
    (0, 0.05, 0),
])
def test_permutations_needed_is_the_fewest_with_which_a_gap_can_be_significant(m, alpha, needed):
    assert sg.permutations_needed(m, alpha) == needed
    if m:
        # in exact arithmetic (alpha as the decimal it is): enough, and one fewer is not
        a = Fraction(str(alpha))
        assert Fraction(m, needed + 1) < a <= Fraction(m, needed)
        # the smallest p-value, adjusted over the family, is significant then
        assert sg.holm([1 / (needed + 1)] + [0.5] * (m - 1))[0] < alpha


@pytest.mark.parametrize(("m", "expected"), [(0, 1000), (10, 1000), (50, 1000), (51, 1020), (326, 6520),
                                             (1000, 20000), (1001, 20000), (5000, 20000)])
def test_auto_permutations_is_the_needed_count_within_its_bounds(m, expected):
    assert sg.auto_permutations(m, 0.05) == expected == min(sg.AUTO_MAX, max(sg.AUTO_MIN, sg.permutations_needed(m, 0.05)))


def observed_slots(res: dict[str, Any], scenario: str | None = None) -> int:
    """Gaps and drop gaps of the results with an observed value: what ``auto`` counts."""
    return sum(sg.analysis._observed(s) for s in slots_of(res, scenario))


@pytest.mark.parametrize("family", ["audit", "scenario"])
def test_auto_picks_the_documented_count_for_the_family(binary_audit, family):
    outputs, configured, _ = binary_audit
    cfg = SubgroupSettings(attributes=["sex", "site"], intersections=[["sex", "site"]], min_group_size=30,
                           holm_family=family)
    assert cfg.permutations == "auto"
    res = sg.analyze(outputs, cfg)
    if family == "audit":
        m = observed_slots(res)
    else:
        m = max(observed_slots(res, sid) for sid in res["subgroup_settings"]["scenarios"])
    n = res["subgroup_settings"]["permutations"]
    assert n == max(1000, math.floor(m / 0.05)) and res["subgroup_settings"]["permutations_rule"] == "auto"
    assert sum(s["p_value"] is not None for s in slots_of(res)) <= observed_slots(res)  # every test was counted
    assert not [w for w in res["warnings"] if "permutations" in w]
    # p-values in steps of 1 / (n + 1): n permutations were drawn
    for s in slots_of(res):
        if s["p_value"] is not None:
            assert s["p_value"] * (n + 1) == pytest.approx(round(s["p_value"] * (n + 1)), abs=1e-6)
    # the same seed gives the same draws: auto is the configured count it chose, bit for bit
    again = sg.analyze(outputs, cfg.model_copy(update={"permutations": n}))
    assert again["subgroup_settings"]["permutations_rule"] == "configured"
    assert [s["p_value"] for s in slots_of(again)] == [s["p_value"] for s in slots_of(res)]
    assert again["subgroup_gaps"] == res["subgroup_gaps"] and again["subgroups"] == res["subgroups"]
    assert [e["gap"] for e in res["subgroup_gaps"]] == [e["gap"] for e in configured["subgroup_gaps"]]


def test_a_configured_number_of_permutations_is_used_as_given(binary_audit):
    _, res, _ = binary_audit  # permutations: 199
    assert (res["subgroup_settings"]["permutations"], res["subgroup_settings"]["permutations_rule"]) == (199, "configured")
    assert min(s["p_value"] for s in slots_of(res) if s["p_value"] is not None) >= 1 / 200


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (0, 0), (1, 1), (6520, 6520), ("2000", 2000),
                                                 (2000.0, 2000)])
def test_permutations_setting_accepts_auto_or_a_count(value, expected):
    assert SubgroupSettings(permutations=value).permutations == expected


@pytest.mark.parametrize("value", [-1, "many", "Auto", 2.5, True, [1000]])
def test_permutations_setting_rejects_other_values_naming_the_key(value, tmp_path: Path):
    with pytest.raises(ValidationError, match=r"permutations\n.*permutations must be auto or a number of permutations"):
        SubgroupSettings(permutations=value)
    with pytest.raises(ValidationError, match="permutations must be auto"):
        SubgroupSettings(permutations=None)  # (in a config file, a null alias key is "not set")
    pm = get_plugin_manager(warn=lambda m: None)
    for where, key in (({"plugins": {"subgroups": {"permutations": value}}}, r"plugins\.subgroups\.permutations"),
                       ({"subgroups": {"permutations": value}}, r"subgroups\.permutations")):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(where))
        with pytest.raises(ConfigError, match=r"(?m)^  " + key + r": Value error, permutations must be auto or a"):
            resolve_settings(load_config(path), pm)


def example_shaped_outputs() -> AuditOutputs:
    """The bundled example's family shape on 150 samples: 3 classes, hemisphere (2 groups) and
    level (3), clean and 18 perturbations x 5 severities: 32 clean gaps + 18 x 16 = 320 tests.
    The hemisphere "left" is planted far worse in every scenario (so drop gaps stay 0)."""
    rng = np.random.default_rng(3)
    n, k = 150, 3
    y = rng.integers(0, k, n)
    hemisphere = np.array(["left", "right"] * (n // 2))
    probs = multiclass_probs(y, k, rng)
    bad = (hemisphere == "left") & (rng.random(n) < 0.8)
    probs[bad] = np.roll(probs[bad], 1, axis=1)
    scen = [Scenario.clean()] + [Scenario.perturbed(f"p{i}", "s", s) for i in range(18) for s in range(1, 6)]
    meta = {"hemisphere": list(hemisphere), "level": list(rng.choice(["inf", "mid", "sup"], n))}
    return make_outputs([probs] * len(scen), y, meta, "multiclass", scen, n_boot=50)


def test_example_shaped_family_no_longer_warns_by_default():
    out = example_shaped_outputs()
    res = sg.analyze(out, SubgroupSettings(attributes=["hemisphere", "level"]))
    m = sum(s["p_value"] is not None for s in slots_of(res))
    assert m == observed_slots(res) == 320
    assert res["subgroup_settings"]["correction"] == "holm-bonferroni over the audit (320 tests)"
    assert res["subgroup_settings"]["permutations"] == 6400 and res["subgroup_settings"]["permutations_rule"] == "auto"
    assert not [w for w in res["warnings"] if "permutations" in w]
    # the planted gap reaches the smallest p-value, which survives Holm over all 320 tests
    planted = gap(res, "accuracy", attribute="hemisphere")
    assert planted["p_value"] == pytest.approx(1 / 6401) and planted["p_adjusted"] == pytest.approx(320 / 6401)
    assert planted["significant"] is True
    # the former default could not make it significant, and said so
    old = sg.analyze(out, SubgroupSettings(attributes=["hemisphere", "level"], permutations=1000))
    assert gap(old, "accuracy", attribute="hemisphere")["significant"] is False
    assert [w for w in old["warnings"] if "permutations" in w and "at least 6400" in w]


def test_auto_warns_when_even_its_cap_cannot_reach_significance(monkeypatch):
    monkeypatch.setattr(sg.permutations, "AUTO_MAX", 1500)
    monkeypatch.setattr(sg.analysis, "AUTO_MAX", 1500)
    out = example_shaped_outputs()
    res = sg.analyze(out, SubgroupSettings(attributes=["hemisphere"], holm_family="audit"))
    m = sum(s["p_value"] is not None for s in slots_of(res))  # 16 + 18 x 8 = 160 tests: 3200 needed
    assert res["subgroup_settings"]["permutations"] == 1500 and m == 160
    warning = [w for w in res["warnings"] if "permutations" in w]
    assert len(warning) == 1
    assert "with 1500 permutations (subgroups.permutations: auto, at most 1500)" in warning[0]
    assert "set subgroups.permutations to at least 3200" in warning[0]


def test_report_caption_states_the_number_of_permutations():
    r = report_results([gap_entry("hemisphere")])
    settings = r["analyses"]["subgroup_settings"]
    settings.update(permutations=6520, permutations_rule="auto")
    caption = sg.report.gap_table(r).caption
    assert "permutation test of the gap (6520 permutations, chosen automatically for the correction's family)" in caption
    settings.update(permutations=1000, permutations_rule="configured")
    assert "(1000 permutations, as configured)" in sg.report.gap_table(r).caption
    del settings["permutations_rule"]  # results written before the rule was recorded
    assert "permutation test of the gap (1000 permutations), its p-value" in sg.report.gap_table(r).caption
    settings.update(permutations=0)
    assert "permutation test of the gap, its p-value" in sg.report.gap_table(r).caption


def test_permutation_p_helper():
    null = torch.tensor([0.1, 0.2, 0.3, float("nan"), 0.3])
    assert sg.permutation_p(0.25, null) == pytest.approx((1 + 2) / (1 + 4))
    assert sg.permutation_p(0.3, null) == pytest.approx((1 + 2) / 5)  # ties count as "at least as large"
    assert sg.permutation_p(None, null) is None
    assert sg.permutation_p(0.3, torch.tensor([float("nan")])) is None


def test_holm_bonferroni_by_hand():
    raw = [0.01, 0.04, 0.03, None, 0.005]
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.06
    assert sg.holm(raw) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    assert sg.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert sg.holm([]) == []


def slots_of(res: dict[str, Any], scenario: str | None = None) -> list[dict[str, Any]]:
    """Every tested statistic (gaps, then drop gaps) of one scenario, or of the whole audit."""
    rows = [e for e in res["subgroup_gaps"] if scenario is None or e["scenario"] == scenario]
    return rows + [e["drop_gap"] for e in rows if e.get("drop_gap")]


def check_significance(slots: list[dict[str, Any]]) -> None:
    for s in slots:
        assert s["significant"] is (None if s["p_adjusted"] is None else s["p_adjusted"] < 0.05)
        if s["p_value"] is not None:
            assert s["p_adjusted"] >= s["p_value"]


def test_adjusted_p_values_are_holm_over_the_whole_audit_by_default(binary_audit):
    _, res, _ = binary_audit
    slots = slots_of(res)
    assert len({e["scenario"] for e in res["subgroup_gaps"]}) == 3
    raw = [s["p_value"] for s in slots]
    assert [s["p_adjusted"] for s in slots] == pytest.approx(sg.holm(raw))
    check_significance(slots)
    m = sum(p is not None for p in raw)
    assert res["subgroup_settings"]["holm_family"] == "audit"
    assert res["subgroup_settings"]["correction"] == f"holm-bonferroni over the audit ({m} tests)"


def test_adjusted_p_values_are_holm_within_each_scenario_when_asked(binary_audit):
    outputs, audit_res, _ = binary_audit
    cfg = SubgroupSettings(attributes=["sex", "site"], intersections=[["sex", "site"]], min_group_size=30,
                           permutations=199, holm_family="scenario")
    res = sg.analyze(outputs, cfg)
    # the raw p-values do not depend on the family
    assert [s["p_value"] for s in slots_of(res)] == [s["p_value"] for s in slots_of(audit_res)]
    sizes = []
    for scenario in res["subgroup_settings"]["scenarios"]:
        slots = slots_of(res, scenario)
        raw = [s["p_value"] for s in slots]
        assert [s["p_adjusted"] for s in slots] == pytest.approx(sg.holm(raw))
        check_significance(slots)
        sizes.append(sum(p is not None for p in raw))
    assert res["subgroup_settings"]["holm_family"] == "scenario"
    assert res["subgroup_settings"]["correction"] == \
        f"holm-bonferroni per scenario ({len(sizes)} scenarios, up to {max(sizes)} tests each)"
    # a larger family adjusts at least as much
    for a, b in zip(slots_of(audit_res), slots_of(res)):
        assert (a["p_adjusted"] is None) == (b["p_adjusted"] is None)
        if a["p_adjusted"] is not None:
            assert a["p_adjusted"] >= b["p_adjusted"] - 1e-12


def constructed_gaps() -> list[dict[str, Any]]:
    """Gap entries of three scenarios with chosen p-values: drop gaps, untested (None) and tied p-values."""
    def entry(scenario: str, attribute: str, metric: str, p: float | None, drop: float | None | str = "none") -> dict[str, Any]:
        e: dict[str, Any] = {"scenario": scenario, "attribute": attribute, "metric": metric, "p_value": p}
        if drop != "none":
            e["drop_gap"] = {"p_value": drop}
        return e
    return [
        entry("clean", "sex", "accuracy", 0.001), entry("clean", "sex", "auroc", 0.004),
        entry("clean", "site", "accuracy", 0.03), entry("clean", "site", "auroc", None),
        entry("clean", "site", "ece", 0.004),
        entry("blur@3", "sex", "accuracy", 0.002, 0.0005), entry("blur@3", "sex", "auroc", 0.2, None),
        entry("blur@3", "site", "accuracy", 0.01, 0.5),
        entry("noise@2", "sex", "accuracy", 0.001, 0.003), entry("noise@2", "site", "accuracy", 0.9, 0.04),
    ]


def reference_holm(p_values: list[float]) -> list[float]:
    """Holm's adjustment by statsmodels (independent of sg.holm), or by hand when it is not installed."""
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:  # by hand: sorted ascending, running max of (m - j) * p_(j), capped at 1
        m, order, running = len(p_values), sorted(range(len(p_values)), key=lambda i: p_values[i]), 0.0
        out = [0.0] * m
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (m - rank) * p_values[i]))
            out[i] = running
        return out
    return list(multipletests(p_values, method="holm")[1])


def test_audit_family_adjusts_every_scenario_together():
    gaps = constructed_gaps()
    sizes = sg.adjust_p_values(gaps, "audit", 0.05)
    slots = slots_of({"subgroup_gaps": gaps})
    tested = [s for s in slots if s["p_value"] is not None]
    assert sizes == {"audit": len(tested)} == {"audit": 13}
    expected = reference_holm([s["p_value"] for s in tested])
    assert [s["p_adjusted"] for s in tested] == pytest.approx(expected, abs=1e-12)
    assert all(s["p_adjusted"] is None and s["significant"] is None for s in slots if s["p_value"] is None)
    # the smallest p of the audit is multiplied by all 13 tests, not by its scenario's 5
    assert gaps[5]["drop_gap"]["p_adjusted"] == pytest.approx(13 * 0.0005)
    assert [s["significant"] for s in tested] == [a < 0.05 for a in expected]
    assert sg.analysis.correction_label("audit", sizes) == "holm-bonferroni over the audit (13 tests)"


def test_scenario_family_reproduces_the_per_scenario_adjustment():
    gaps = constructed_gaps()
    sizes = sg.adjust_p_values(gaps, "scenario", 0.05)
    assert sizes == {"clean": 4, "blur@3": 5, "noise@2": 4}
    for sid in sizes:
        tested = [s for s in slots_of({"subgroup_gaps": gaps}, sid) if s["p_value"] is not None]
        expected = reference_holm([s["p_value"] for s in tested])
        assert [s["p_adjusted"] for s in tested] == pytest.approx(expected, abs=1e-12)
    assert gaps[5]["drop_gap"]["p_adjusted"] == pytest.approx(5 * 0.0005)
    # per scenario, the clean 0.03 is significant (4 tests); over the audit it is not (13)
    assert gaps[2]["significant"] is True
    sg.adjust_p_values(gaps, "audit", 0.05)
    assert gaps[2]["significant"] is False
    assert sg.analysis.correction_label("scenario", sizes) == "holm-bonferroni per scenario (3 scenarios, up to 5 tests each)"
    with pytest.raises(ValueError, match="holm_family"):
        sg.adjust_p_values(gaps, "attribute", 0.05)
    assert sg.adjust_p_values([], "audit", 0.05) == {}


@pytest.mark.parametrize("where", ["plugins", "alias"])
def test_holm_family_setting_is_read_and_validated(where: str, tmp_path: Path):
    pm = get_plugin_manager(warn=lambda m: None)
    assert SubgroupSettings().holm_family == "audit"
    with pytest.raises(ValidationError, match="holm_family"):
        SubgroupSettings(holm_family="attribute")

    def config(value: str) -> Path:
        section = {"holm_family": value}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"plugins": {"subgroups": section}} if where == "plugins" else {"subgroups": section}))
        return path

    assert resolve_settings(load_config(config("scenario")), pm).plugin_settings("subgroups").holm_family == "scenario"
    assert resolve_settings(load_config(config("audit")), pm).plugin_settings("subgroups").holm_family == "audit"
    key = r"plugins\.subgroups\.holm_family" if where == "plugins" else r"subgroups\.holm_family"
    with pytest.raises(ConfigError, match=key + r": Input should be 'audit' or 'scenario'"):
        resolve_settings(load_config(config("per-scenario")), pm)


def test_permutations_are_seeded(binary_audit):
    outputs, res, _ = binary_audit
    cfg = SubgroupSettings(attributes=["sex"], permutations=199)
    again = sg.analyze(outputs, cfg)
    assert [e["p_value"] for e in again["subgroup_gaps"]] == [e["p_value"] for e in res["subgroup_gaps"]
                                                               if e["attribute"] == "sex"]
    none = sg.analyze(outputs, SubgroupSettings(attributes=["sex"], permutations=0))
    assert all(e["p_value"] is None and e["significant"] is None for e in none["subgroup_gaps"])


# ---------------------------------------------------------------------------------------------
# Grouping rules
# ---------------------------------------------------------------------------------------------


def test_missing_values_form_their_own_group(binary_audit):
    _, res, _ = binary_audit
    missing = entries(res, attribute="sex")[sg.MISSING_GROUP]
    assert missing["n"] == 4 and missing["too_small"] is True
    assert sum(e["n"] for e in entries(res, attribute="sex").values()) == 400
    assert sg.is_missing(np.float32("nan")) and sg.is_missing(" ") and not sg.is_missing(0) and not sg.is_missing(False)


def test_too_small_groups_are_flagged_without_metrics(binary_audit):
    outputs, res, _ = binary_audit
    c = entries(res, attribute="site")["C"]
    site = np.array(outputs.metadata["site"])
    y = outputs.labels.numpy()
    assert c["too_small"] is True and c["metrics"] == {} and c["n"] == int((site == "C").sum()) < 30
    assert c["class_counts"] == {"c0": int((y[site == "C"] == 0).sum()), "c1": int((y[site == "C"] == 1).sum())}
    assert gap(res, "accuracy", attribute="site")["n_groups"] == 2
    assert res["subgroup_settings"]["attributes"][1]["tested_groups"] == ["A", "B"]
    # medaudit's subgroup checks read these entries and ignore the too-small ones
    check = evaluate_checks(["subgroup.site.accuracy_gap<1"], {"scenarios": [], "subgroups": res["subgroups"]})[0]
    assert check["value"] == pytest.approx(gap(res, "accuracy", attribute="site")["gap"]["value"], abs=ATOL)


def test_binning_by_edges_and_labels():
    warnings: list[str] = []
    ages = [10, 39.9, 40, 59, 60, 85, None, float("nan")]
    attr = sg.column_attribute("age", ages, [40, 60], warnings)
    assert attr.groups == ["(-inf, 40)", "[40, 60)", "[60, inf)", sg.MISSING_GROUP]
    assert [attr.groups[c] for c in attr.codes.tolist()] == [
        "(-inf, 40)", "(-inf, 40)", "[40, 60)", "[40, 60)", "[60, inf)", "[60, inf)", sg.MISSING_GROUP, sg.MISSING_GROUP]
    assert not warnings
    # empty interior bins are still listed (n = 0), unoccupied outer bins are not
    attr = sg.column_attribute("age", [45, 50, 85], [40, 60, 80], warnings)
    assert attr.groups == ["[40, 60)", "[60, 80)", "[80, inf)"]
    assert sg.bin_labels([0.5, 1e6]) == ["(-inf, 0.5)", "[0.5, 1e+06)", "[1e+06, inf)"]


def test_bins_on_text_values_warn_and_fall_back_to_categories():
    warnings: list[str] = []
    attr = sg.column_attribute("age", ["045Y", "060Y", "045Y"], [50], warnings)
    assert attr.groups == ["045Y", "060Y"]
    assert len(warnings) == 1 and "non-numeric" in warnings[0] and "'age'" in warnings[0]


def test_unbinned_continuous_column_warns_with_suggested_edges():
    warnings: list[str] = []
    attr = sg.column_attribute("age", list(range(20, 80)), None, warnings)
    assert len(attr.groups) == 60
    assert len(warnings) == 1
    assert "60 distinct values" in warnings[0] and "subgroups.bins.age: [" in warnings[0]
    warnings.clear()
    sg.column_attribute("grade", [1, 2, 3, 2, 1], None, warnings)  # few values: a categorical column
    assert warnings == []


def test_categories_are_ordered_numbers_then_text():
    attr = sg.column_attribute("x", [10, 2, 2.0, "b", "a", None, True], None, [])
    assert attr.groups == ["2", "10", "True", "a", "b", sg.MISSING_GROUP]


def test_missing_attribute_is_a_warning_naming_it_and_the_columns():
    rng = np.random.default_rng(0)
    n = 80
    y = rng.integers(0, 2, n)
    out = make_outputs(binary_probs(y, rng), y, {"site": ["A", "B"] * 40, "scanner": ["x"] * n})
    res = sg.analyze(out, SubgroupSettings(attributes=["sex", "site"], intersections=[["sex", "site"]], permutations=9))
    missing = [w for w in res["warnings"] if "'sex'" in w]
    assert len(missing) == 1 and "scanner, site" in missing[0]
    assert {e["attribute"] for e in res["subgroups"]} == {"site"}


def test_intersections(binary_audit):
    outputs, res, _ = binary_audit
    name = "sex" + sg.SEP + "site"
    got = entries(res, attribute=name)
    sex = group_labels(outputs.metadata["sex"])
    site = np.array(outputs.metadata["site"])
    expected = {f"{a}{sg.SEP}{b}": int(((sex == a) & (site == b)).sum()) for a in ("F", "M", sg.MISSING_GROUP)
                for b in ("A", "B", "C") if ((sex == a) & (site == b)).any()}
    assert {g: e["n"] for g, e in got.items()} == expected
    assert list(got) == sorted(expected, key=lambda g: (("F", "M", sg.MISSING_GROUP).index(g.split(sg.SEP)[0]), g))
    assert gap(res, "accuracy", attribute=name)["n_groups"] == sum(v >= 30 for v in expected.values())


def test_single_group_attribute_warns_and_has_no_gaps():
    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 2, n)
    res = sg.analyze(make_outputs(binary_probs(y, rng), y, {"site": ["A"] * n}), SubgroupSettings(attributes=["site"]))
    assert res["subgroup_gaps"] == []
    assert any("'site' has 1 group(s)" in w for w in res["warnings"])


# ---------------------------------------------------------------------------------------------
# Hook and results.json compatibility
# ---------------------------------------------------------------------------------------------


def test_hook_output_fits_results_json(binary_audit):
    outputs, _, _ = binary_audit
    pm = get_plugin_manager(autoload=False, extra=[("subgroups", sg)])
    config = resolve_settings(Config.model_validate({"subgroups": {"attributes": ["sex"], "permutations": 19}}), pm)
    res = sg.medaudit_analyze(outputs, config)
    assert set(res) == {"subgroups", "subgroup_gaps", "subgroup_settings", "warnings"}
    for e in res["subgroups"]:
        SubgroupResult.model_validate(clean_floats(e))
    text = json.dumps(clean_floats(res), allow_nan=False)
    assert "NaN" not in text
    assert sg.medaudit_analyze(outputs, resolve_settings(Config(), pm)) is None


def test_example_sized_analysis_covers_highest_severities():
    """600 samples, 2 attributes, 18 perturbations x 5 severities, 200 resamples and permutations.

    (Speed is measured by benchmarks, not asserted here.)"""
    rng = np.random.default_rng(0)
    n, k = 600, 3
    y = rng.integers(0, k, n)
    scen = [Scenario.clean()] + [Scenario.perturbed(f"p{i}", "s", s) for i in range(18) for s in range(1, 6)]
    probs = [multiclass_probs(y, k, rng)] * len(scen)
    meta = {"hemisphere": list(rng.choice(["left", "right"], n)), "level": list(rng.choice(["inf", "mid", "sup"], n))}
    out = make_outputs(probs, y, meta, "multiclass", scen, n_boot=200)
    res = sg.analyze(out, SubgroupSettings(attributes=["hemisphere", "level"], permutations=200))
    assert len({e["scenario"] for e in res["subgroups"]}) == 19
    assert not math.isnan(gap(res, "auroc", "p17@5", "level")["gap"]["value"])


def test_large_permutation_draws_are_chunked_and_reproducible(monkeypatch):
    codes = torch.arange(2000) % 3
    cached = sg.Permutations(codes, 600, seed=9, attribute="site")
    assert cached._cache is not None and cached._cache[0].dtype == torch.int8  # 1.2 MB: drawn once, held small
    monkeypatch.setattr(sg.Permutations, "CACHE_BYTES", 0)
    perms = sg.Permutations(codes, 600, seed=9, attribute="site")
    first = torch.cat(list(perms))
    assert perms._cache is None and len(list(perms)) > 1  # regenerated chunk by chunk, not held
    assert torch.equal(first, torch.cat(list(perms)))
    # the cached draws are the regenerated ones, chunk for chunk, in the codes' type
    assert [c.shape for c in cached] == [c.shape for c in perms] and all(c.dtype == torch.int64 for c in cached)
    assert torch.equal(first, torch.cat(list(cached)))
    assert first.shape == (600, 2000)
    assert torch.equal(first.sort(dim=1).values, codes.sort().values.expand(600, -1))  # group sizes kept
    assert not torch.equal(first[0], first[1])


def test_many_small_groups_are_summarised_once_per_attribute() -> None:
    """A numeric column without bins makes every value a group in every scenario: the report
    names them once per attribute, not once per group and scenario."""
    from medaudit.plugins.subgroups.report import small_group_notes

    rows = [{"attribute": "z", "group": str(v), "scenario": sc, "n": 1 + v % 5, "too_small": True, "metrics": {}}
            for sc in ("clean", "mri.noise@5") for v in range(40)]
    rows += [{"attribute": "sex", "group": "X", "scenario": sc, "n": 3, "too_small": True, "metrics": {}}
             for sc in ("clean", "mri.noise@5")]
    notes = small_group_notes({"subgroups": rows})
    assert notes == ["z: 40 groups below subgroups.min_group_size (1–5 samples each, e.g. 0, 1, 2, 3, 4, …); no metrics "
                     "or tests reported for them. Merge values into bins (subgroups.bins.z) to analyse this attribute.",
                     "sex = X (clean): 3 samples, below subgroups.min_group_size; no metrics or tests reported for it."]
