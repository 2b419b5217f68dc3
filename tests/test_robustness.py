"""Degradation curves and the clean-normalised mCE on hand-computed cases."""

from __future__ import annotations

import json

import pytest

from medaudit.outputs import Scenario
from medaudit.robustness import summarize


def v(x):
    return {"value": x, "ci_low": None, "ci_high": None}


def build():
    scenarios = [Scenario.clean()] + [Scenario.perturbed("blur", "geometry", s) for s in (1, 2, 3, 4, 5)] + [
        Scenario.perturbed("noise", "intensity", s) for s in (1, 3, 5)
    ]
    acc = {"clean": 0.9, "blur@1": 0.9, "blur@2": 0.8, "blur@3": 0.7, "blur@4": 0.6, "blur@5": 0.6,
           "noise@1": 0.85, "noise@3": 0.8, "noise@5": 0.75}
    ece = {"clean": 0.05, "blur@1": 0.05, "blur@2": 0.1, "blur@3": 0.1, "blur@4": 0.2, "blur@5": 0.15,
           "noise@1": 0.05, "noise@3": 0.05, "noise@5": 0.05}
    metrics = {sid: {"accuracy": v(acc[sid]), "ece": v(ece[sid])} for sid in acc}
    return metrics, scenarios


def test_per_perturbation_curve_values():
    metrics, scenarios = build()
    out = summarize(metrics, scenarios, {"accuracy": True, "ece": False})
    json.dumps(out)  # JSON-ready
    blur = out["perturbations"]["blur"]
    assert blur["suite"] == "geometry"
    a = blur["metrics"]["accuracy"]
    assert a["clean"] == 0.9 and a["severities"] == [1, 2, 3, 4, 5]
    assert a["drop"]["3"] == pytest.approx(0.2) and a["relative_drop"]["3"] == pytest.approx(0.2 / 0.9)
    # trapezoid over (0,.9),(1,.9),(2,.8),(3,.7),(4,.6),(5,.6), divided by 5
    area = (0.9 + 0.9) / 2 + (0.9 + 0.8) / 2 + (0.8 + 0.7) / 2 + (0.7 + 0.6) / 2 + (0.6 + 0.6) / 2
    assert a["auc"] == pytest.approx(area / 5) and a["relative_auc"] == pytest.approx(area / 5 / 0.9)
    assert a["worst_severity"] == 4 and a["worst_value"] == 0.6  # lowest severity reaching the worst
    e = blur["metrics"]["ece"]
    assert e["drop"]["4"] == pytest.approx(0.15) and e["worst_severity"] == 4
    # noise audited at 1, 3, 5 only: unequal spacing handled by the trapezoid
    n = out["perturbations"]["noise"]["metrics"]["accuracy"]
    area_n = 1 * (0.9 + 0.85) / 2 + 2 * (0.85 + 0.8) / 2 + 2 * (0.8 + 0.75) / 2
    assert n["auc"] == pytest.approx(area_n / 5)


def test_mce_formula_and_suites():
    metrics, scenarios = build()
    out = summarize(metrics, scenarios, {"accuracy": True, "ece": False})
    ce_blur = (0.1 + 0.2 + 0.3 + 0.4 + 0.4) / 5 / 0.1
    ce_noise = (0.15 + 0.2 + 0.25) / 3 / 0.1
    assert out["perturbations"]["blur"]["metrics"]["accuracy"]["ce"] == pytest.approx(ce_blur)
    assert out["mce"]["accuracy"]["value"] == pytest.approx((ce_blur + ce_noise) / 2)
    assert out["mce"]["accuracy"]["n_perturbations"] == 2
    assert out["suites"]["geometry"]["accuracy"]["mce"] == pytest.approx(ce_blur)
    assert out["suites"]["intensity"]["accuracy"]["mce"] == pytest.approx(ce_noise)
    # lower-is-better metrics use the value itself as the error; 1 = no degradation
    assert out["perturbations"]["noise"]["metrics"]["ece"]["ce"] == pytest.approx(1.0)
    assert out["mce"]["ece"]["mean_error_increase"] == pytest.approx(((0.6 / 5 - 0.05) + 0.0) / 2)


def test_zero_clean_error_and_missing_values():
    metrics, scenarios = build()
    metrics["clean"]["accuracy"] = v(1.0)
    metrics["noise@3"]["ece"] = v(None)
    out = summarize(metrics, scenarios, {"accuracy": True, "ece": False, "absent": True})
    acc = out["perturbations"]["blur"]["metrics"]["accuracy"]
    assert acc["ce"] is None and acc["mean_error_increase"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.4) / 5)
    assert out["mce"]["accuracy"]["value"] is None
    assert out["mce"]["accuracy"]["mean_error_increase"] is not None
    ece_noise = out["perturbations"]["noise"]["metrics"]["ece"]
    assert ece_noise["auc"] is None and ece_noise["ce"] is None and ece_noise["values"]["3"] is None
    assert out["mce"]["ece"]["n_perturbations"] == 1
    assert "absent" not in out["perturbations"]["blur"]["metrics"]
    with pytest.raises(ValueError, match="clean"):
        summarize({"blur@1": metrics["blur@1"]}, scenarios, {"accuracy": True})
