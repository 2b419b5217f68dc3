"""The example plugin passes medaudit's conformance kit, and its physics is what it says."""

from __future__ import annotations

import math
from typing import Any

import medaudit_plugin_example as plugin
import torch
from medaudit.metric import MetricContext
from medaudit.plugin_manager import get_plugin_manager
from medaudit.testing import parametrize_with_checks, render_section, subject
from medaudit_plugin_example import Vignetting, YoudenJ, cos4_gain, vignette


@parametrize_with_checks([Vignetting, subject(YoudenJ())])
def test_conformance(obj: Any, check: Any) -> None:
    check(obj)


def test_vignetting_follows_cosine_fourth_law() -> None:
    x = torch.ones(1, 1, 5, 5)
    y = vignette(x, torch.tensor([0.4]), torch.zeros(1, 2))
    assert math.isclose(float(y[0, 0, 2, 2]), 1.0, rel_tol=1e-6)  # on the optical axis
    assert math.isclose(float(y[0, 0, 2, 4]), 1.0 - 0.4, rel_tol=1e-5)  # r = 1: the documented fall-off
    assert math.isclose(float(y[0, 0, 4, 4]), cos4_gain(math.sqrt(2.0), 0.4), rel_tol=1e-5)  # corner


def test_youden_j_known_values() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    ctx = MetricContext(task="binary", classes=("neg", "pos"))
    out = YoudenJ().compute(probs, labels, torch.ones(1, 4), ctx)
    # sensitivity 1/2, specificity 1/2
    assert torch.allclose(out["youden_j"], torch.tensor([0.0], dtype=torch.float64))


def test_registered_through_the_plugin_manager() -> None:
    pm = get_plugin_manager(extra=[("example-under-test", plugin)], autoload=False)
    assert pm.perturbations()["example.vignetting"] == ("example-under-test", Vignetting)


def test_report_section_renders() -> None:
    results = {"scenarios": [
        {"id": "clean", "metrics": {"youden_j": {"value": 0.9, "ci_low": 0.85, "ci_high": 0.95}}},
        {"id": "example.vignetting@5", "metrics": {"youden_j": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5}}},
        {"id": "intensity.gamma@1", "metrics": {"youden_j": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}}},
    ]}
    [section] = plugin.medaudit_report_sections(results)
    html = render_section(section, results)
    assert "example.vignetting@5" in html and "0.400 [0.300, 0.500]" in html
    assert "intensity.gamma@1" not in html
    assert plugin.medaudit_report_sections({"scenarios": []}) == []
