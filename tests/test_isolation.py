"""A plugin that raises during an audit is named in the results and the report; the others' results are kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import medaudit.cli
from medaudit.audit import _detectors, run_audit
from medaudit.config import load_config
from medaudit.detector import Detector
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric
from medaudit.perturbation import Perturbation
from medaudit.plugin_manager import get_plugin_manager
from medaudit.plugins import tasks as builtin_tasks
from medaudit.results import SCHEMA_PATH, WarningRecord
from medaudit.sections import ReportSection
from medaudit.task import bind_task

ROOT = Path(__file__).resolve().parents[1]


class Exploding(Perturbation):
    name = "boom.explode"
    suite = "boom"
    summary = "raises"
    severities = {s: {"x": float(s)} for s in range(1, 6)}

    def sample(self, severity, rng, shape):  # type: ignore[no-untyped-def]
        return {}

    def apply(self, x, params):  # type: ignore[no-untyped-def]
        raise RuntimeError("kaboom in apply")


class BadMetric(Metric):
    name = "bad_metric"

    def compute(self, probs, labels, weights, ctx):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("metric bug")


class BadDetector(Detector):
    name = "bad_detector"

    def embed(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        raise ValueError("embed bug")

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings[:, 0]


class BrokenPlugin:
    @hookimpl
    def medaudit_perturbations(self) -> list[type[Perturbation]]:
        return [Exploding]

    @hookimpl
    def medaudit_metrics(self, config: Any) -> list[Metric]:
        return [BadMetric()]

    @hookimpl
    def medaudit_detectors(self, config: Any) -> list[Detector]:
        return [BadDetector()]

    @hookimpl
    def medaudit_analyze(self, outputs: Any, config: Any) -> dict[str, Any]:
        raise KeyError("analysis bug")

    @hookimpl
    def medaudit_report_sections(self, results: dict[str, Any]) -> list[ReportSection]:
        return [ReportSection("broken", "Broken", "{{ results.no_such_key.deeper }}")]


def test_failing_plugin_is_named_and_the_rest_is_kept(tmp_path: Path) -> None:
    pm = get_plugin_manager(extra=[("exploding", BrokenPlugin())], warn=lambda m: None)
    out = tmp_path / "o"
    cfg = load_config(ROOT / "examples" / "mni-patches.yaml", {
        "output.dir": str(out), "audit.suites": [], "audit.perturbations": ["boom.explode", "intensity.gamma"],
        "audit.severities": [3], "audit.bootstrap": 20, "checks": []})
    results = run_audit(pm, ROOT / "examples" / "model.pt", ROOT / "examples" / "mni-patches" / "test.npz", cfg,
                        command="test")
    ids = [s.id for s in results.scenarios]
    assert ids == ["clean", "intensity.gamma@3"]  # the exploding perturbation's scenario is left out
    warnings = "\n".join(results.warnings)
    assert 'perturbation "boom.explode" of plugin "exploding" raised in scenario boom.explode@3' in warnings
    assert "kaboom in apply" in warnings
    assert 'metric "bad_metric" of plugin "exploding" raised' in warnings
    assert 'ood: detector "bad_detector" of plugin "exploding" raised in embed' in warnings
    assert 'plugin "exploding" failed in medaudit_analyze: KeyError' in warnings
    # every isolated failure is a record naming the plugin it came from, the analysis one included
    failed = {w.code: w.plugin for w in results.warning_records if w.code.endswith("-failed")}
    assert failed == {"perturbation-failed": "exploding", "metric-failed": "exploding",
                      "detector-failed": "exploding", "analysis-failed": "exploding"}
    # named by the user and left without a scenario: a failed check, so the audit exits 1
    [check] = [c for c in results.checks if c.expr == "perturbation:boom.explode ran"]
    assert not check.passed and "kaboom in apply" in (check.error or "")
    assert not any(c.expr == "perturbation:intensity.gamma ran" for c in results.checks)  # it ran
    clean = results.scenarios[0]
    assert "accuracy" in clean.metrics and "bad_metric" not in clean.metrics
    assert "msp" in results.scenarios[1].ood and "bad_detector" not in results.scenarios[1].ood
    assert results.subgroups, results.warnings  # the built-in subgroup analysis still ran
    report = (out / "report.html").read_text()
    assert "kaboom in apply" in report
    assert 'report section &#34;broken&#34; of plugin &#34;exploding&#34; could not be rendered' in report


class FitFails(Detector):
    name = "fit_fails"

    def fit(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        raise ValueError("fit bug")

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings[:, 0]


class FeatureDetector(Detector):
    name = "needs_features"
    needs = "features"

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings[:, 0]


class OnlyExploding:
    @hookimpl
    def medaudit_perturbations(self) -> list[type[Perturbation]]:
        return [Exploding]

    @hookimpl
    def medaudit_detectors(self, config: Any) -> list[Detector]:
        return [FitFails()]


def test_cli_prints_isolated_failures_once_and_exits_1_when_a_named_perturbation_never_ran(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jsonschema

    real = get_plugin_manager
    monkeypatch.setattr(medaudit.cli, "get_plugin_manager",
                        lambda **kw: real(extra=[("exploding", OnlyExploding())], **kw))
    out = tmp_path / "o"
    res = CliRunner().invoke(medaudit.cli.cli, [
        "run", str(ROOT / "examples" / "model.pt"), "--data", str(ROOT / "examples" / "mni-patches" / "test.npz"),
        "--config", str(ROOT / "examples" / "mni-patches.yaml"), "--out", str(out), "--perturbation", "boom.explode",
        "--severities", "1,3", "--bootstrap", "20", "--quiet"])
    assert res.exit_code == 1, res.output
    assert "FAIL perturbation:boom.explode ran: " in res.stdout
    # once each, after the outputs, grouped under the plugin and kind: the two scenarios together
    err = res.stderr.splitlines()
    start = err.index("medaudit: warning: [exploding] perturbation-failed (2):")
    assert err[start + 1:start + 3] == [
        f'  perturbation "boom.explode" of plugin "exploding" raised in scenario boom.explode@{s} '
        "(RuntimeError: kaboom in apply); the scenario is left out" for s in (1, 3)]
    assert sum("boom.explode@1 (RuntimeError" in line for line in err) == 1
    fit = [line for line in err if "fit_fails" in line]
    assert fit == ["  ood: detector 'fit_fails' skipped: ValueError: fit bug (detector of plugin \"exploding\")"]
    results = json.loads((out / "results.json").read_text())
    assert err[-1] == f"{len(results['warning_records'])} warnings (see Limitations in the report)"
    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
    assert [s["id"] for s in results["scenarios"]] == ["clean"]
    failed = [c for c in results["checks"] if not c["passed"]]
    assert [c["expr"] for c in failed] == ["perturbation:boom.explode ran"]
    assert failed[0]["value"] == 0 and failed[0]["error"].endswith("(and 1 more of its scenarios)")
    assert fit[0].strip() in results["warnings"]


def test_skipped_feature_detectors_name_their_plugin() -> None:
    class Features:
        @hookimpl
        def medaudit_detectors(self, config: Any) -> list[Detector]:
            return [FeatureDetector()]

    pm = get_plugin_manager(extra=[("featureful", Features()), ("tasks", builtin_tasks)], autoload=False,
                            warn=lambda m: None)
    warnings: list[WarningRecord] = []
    owners: dict[object, str] = {}
    cfg = load_config(None, {})
    task = bind_task(cfg, pm.tasks())
    assert _detectors(pm, cfg, task, False, warnings, owners) == []
    assert [w.message for w in warnings] == ["feature-based detectors ['needs_features'] of plugin \"featureful\" did not run: "
                        "model.feature_layer is not set"]
