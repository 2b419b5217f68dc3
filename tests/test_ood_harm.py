"""Ranking detectors by the harm they catch: epd, the recommendation, the gates, the config rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medaudit.bootstrap import bootstrap_weights
from medaudit.checks import Vocabulary, evaluate_checks, validate_checks
from medaudit.config import load_config
from medaudit.errors import ConfigError
from medaudit.ood_metrics import prevented_drop
from medaudit.referral import recommend


def test_prevented_drop_by_hand() -> None:
    clean_scores = torch.arange(1.0, 21.0)  # 95 % of 20 pass at t = 19: flagged means > 19
    scores = torch.tensor([[25.0, 30.0, 19.0, 5.0] + [0.0] * 16])
    clean_q = torch.tensor([1.0, 1.0, 1.0, 1.0] + [1.0] * 15 + [0.0])
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0] + [1.0] * 15 + [1.0]])  # drops at 0, 2, 3; sample 19 improved
    got = prevented_drop(scores, q, clean_scores, clean_q, torch.ones(1, 20))
    # only sample 0 is flagged with a drop (sample 1 is flagged without one; 2 sits on t, 3 below)
    assert float(got[0, 0]) == pytest.approx(1 / 20)
    # Dice-like quality with NaN: no drop counted there
    q_nan = torch.tensor([[float("nan"), 0.2, 0.0, 0.0] + [1.0] * 16])
    got = prevented_drop(scores, q_nan, clean_scores, torch.full((20,), 0.9), torch.ones(1, 20))
    assert float(got[0, 0]) == pytest.approx((0.9 - 0.2) / 20)


def test_prevented_drop_rows_equal_resampled_data() -> None:
    g = torch.Generator().manual_seed(3)
    clean, shifted = torch.randn(40, generator=g), torch.randn(40, generator=g) + 1
    c = (torch.rand(40, generator=g) < 0.9).double()
    q = (torch.rand(40, generator=g) < 0.6).double()
    w = bootstrap_weights(40, 3, 9)
    rows = prevented_drop(shifted[None], q[None], clean, c, w)[0]
    for r in range(4):
        idx = np.repeat(np.arange(40), w[r].long().numpy())
        t = np.sort(clean.numpy()[idx])[int(np.ceil(0.95 * len(idx))) - 1]
        expected = ((shifted.numpy()[idx] > t) * (c.numpy()[idx] - q.numpy()[idx])).mean()
        assert float(rows[r]) == pytest.approx(expected, abs=1e-12)


def _est(v: float | None) -> dict[str, float | None]:
    return {"value": v, "ci_low": v, "ci_high": v}


def _results() -> dict:
    def scen(sid: str, pert: str | None, fe: dict[str, float], epd: dict[str, float]) -> dict:
        return {"id": sid, "perturbation": pert, "severity": 3 if pert else 0, "metrics": {}, "ood": {},
                "flagged_errors": {k: _est(v) for k, v in fe.items()}, "epd": {k: _est(v) for k, v in epd.items()}}
    return {
        "config": {"input": {"modality": "mri"}},
        "perturbation_catalogue": [{"name": "mri.motion", "stress_test": []},
                                   {"name": "intensity.inversion", "stress_test": ["any"]}],
        "scenarios": [scen("clean", None, {"a": 0.1, "b": 0.1}, {}),
                      scen("mri.motion@3", "mri.motion", {"a": 0.4, "b": 0.9}, {"a": 0.01, "b": 0.05}),
                      scen("mri.motion@5", "mri.motion", {"a": 0.6, "b": 0.7}, {"a": 0.02, "b": 0.08}),
                      # a stress test where a is perfect: it must not win a's place
                      scen("intensity.inversion@5", "intensity.inversion", {"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.0})],
    }


def test_recommendation_ranks_by_errors_flagged_under_realistic_shifts() -> None:
    rec = recommend(_results(), {"a": 1.5, "b": 2.25})
    assert rec is not None and rec["detector"] == "b" and rec["threshold"] == 2.25 and rec["ranked_by"] == "epd"
    assert rec["flagged_errors"] == pytest.approx(0.8) and rec["epd"] == pytest.approx(0.065)
    assert rec["scenarios"] == ["mri.motion@3", "mri.motion@5"] and [e["detector"] for e in rec["ranking"]] == ["b", "a"]
    assert "deploy b at threshold 2.25" in rec["statement"] and "80%" in rec["statement"] and not rec["weak"]


def test_recommendation_prefers_the_harm_of_the_shift_to_errors_flagged() -> None:
    """A detector that flags the errors the model makes clean too (hard inputs) catches no harm of
    the shift; the one that prevents more of the drop is recommended."""
    r = _results()
    for s in r["scenarios"][1:3]:
        s["flagged_errors"]["a"], s["epd"]["a"] = _est(0.95), _est(0.001)
    rec = recommend(r, {"a": 1.0, "b": 2.0})
    assert rec is not None and rec["detector"] == "b" and [e["detector"] for e in rec["ranking"]] == ["b", "a"]
    for s in r["scenarios"]:
        s["epd"] = {}
    rec = recommend(r, {"a": 1.0, "b": 2.0})
    assert rec is not None and rec["ranked_by"] == "flagged_errors" and rec["detector"] == "a"


def test_recommendation_is_loud_when_no_detector_catches_most_errors() -> None:
    r = _results()
    for s in r["scenarios"]:
        s["flagged_errors"] = {k: _est(0.2) for k in s["flagged_errors"]}
    rec = recommend(r, {"a": 1.0, "b": 2.0})
    assert rec is not None and rec["weak"] and "No detector flags even half of the errors" in rec["statement"]


def test_recommendation_is_withheld_when_the_audit_raised_alerts() -> None:
    r = _results()
    r["warning_records"] = [{"code": "near-chance", "alert": True, "message": "the model is near chance"},
                            {"code": "small-sample", "alert": False, "message": "few samples"}]
    rec = recommend(r, {"a": 1.0, "b": 2.0})
    assert rec is not None and rec["withheld"] and rec["detector"] is None and rec["weak"]
    assert rec["statement"].startswith("No deployment recommendation") and "the model is near chance" in rec["statement"]
    assert [e["detector"] for e in rec["ranking"]] == ["b", "a"]


def test_recommendation_for_segmentation_ranks_by_epd_and_none_without_harm() -> None:
    """A segmentation has no flagged_errors (no wrong class per image), only epd in Dice points."""
    r = _results()
    for s in r["scenarios"]:
        s["flagged_errors"] = {}
    rec = recommend(r, {"a": 1.0, "b": 2.0})
    assert rec is not None and rec["ranked_by"] == "epd" and rec["detector"] == "b"
    for s in r["scenarios"]:
        s["epd"] = {}
    assert recommend(r, {"a": 1.0}) is None


def test_harm_statistics_are_gates() -> None:
    r = _results()
    vocab = Vocabulary(scenarios=[s["id"] for s in r["scenarios"]], metrics=None, classes=("x", "y"),
                       detectors=["a", "b"], columns=[])
    validate_checks(["mri.motion@*.ood.a.flagged_errors<0.5", "*.ood.b.epd<0.01"], vocab)
    with pytest.raises(ConfigError, match="flagged_errors, epd"):
        validate_checks(["mri.motion@3.ood.a.harm<0.5"], vocab)
    checks = evaluate_checks(["mri.motion@*.ood.a.flagged_errors<0.5", "mri.motion@*.ood.b.epd<0.01"], r)
    assert [c["passed"] for c in checks] == [False, True]
    assert checks[0]["value"] == pytest.approx(0.4) and checks[0]["scenario"] == "mri.motion@3"


def test_feature_layer_beside_a_list_of_feature_layers_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  feature_layer: features\n  feature_layers: [features.0, features.3]\n")
    with pytest.raises(ConfigError, match=r"model.feature_layer \('features'\) and model.feature_layers"):
        load_config(cfg)
    cfg.write_text("model:\n  feature_layer: features\n  feature_layers: auto\n")
    assert load_config(cfg).model.feature_layers == "auto"
