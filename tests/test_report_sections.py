"""Report seams: metrics that declare their display, warning records, plugin sections' capabilities.

One small real audit (as in tests/test_hooks.py) with a plugin that contributes a headline metric,
an analysis returning a string and a record warning, and a section with findings, limitations,
an ``order`` and the shared table partial.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from medaudit.audit import run_audit
from medaudit.config import Config, load_config
from medaudit.evaluate import analysis_warnings
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext
from medaudit.outputs import AuditOutputs
from medaudit.plugin_manager import get_plugin_manager
from medaudit.report import fmt_metric, render_report
from medaudit.report.views import Row, Table, headline_keys, lead_keys, metric_info, primary_metric
from medaudit.results import Results, WarningRecord, json_schema, metric_info as declare
from medaudit.sections import ReportSection
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


class Sharpness(Metric):
    """Mean top-class probability: a plugin metric that declares itself headline, as a percent."""

    name: ClassVar[str] = "seamtest"
    headline: ClassVar[tuple[str, ...]] = ("seamtest_sharpness",)
    headline_order: ClassVar[int] = 150  # between the built-in classification (100) and calibration (200)
    digits: ClassVar[int] = 1
    percent: ClassVar[bool] = True

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        w = weights.double()
        return {"seamtest_sharpness": (w @ probs.double().amax(dim=1)) / w.sum(dim=1),
                "seamtest_hidden": (w @ probs.double().amin(dim=1)) / w.sum(dim=1)}


class SeamPlugin:
    @hookimpl
    def medaudit_metrics(self, config: Config) -> list[Metric]:
        return [Sharpness()]

    @hookimpl
    def medaudit_analyze(self, outputs: AuditOutputs, config: Config) -> dict[str, Any]:
        return {"warnings": ["seamtest: a plain warning",
                             {"code": "seamtest-odd", "message": "seamtest: a record", "scenario": "clean"}]}

    @hookimpl
    def medaudit_report_sections(self, results: dict[str, Any]) -> list[ReportSection]:
        t = Table("Seam table", ["Scenario", "n"], [Row([s["id"], str(s["n_samples"])]) for s in results["scenarios"]])
        return [ReportSection(id="seamtest", title="Seam test", order=150, context={"t": t},
                              template='{% include "sections/_table.html" %}<p>{{ fmt_p(0.0001) }}</p>',
                              findings=["seamtest: a finding from a section"],
                              limitations=["seamtest: a limitation from a section"])]


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Any]:
    out = tmp_path_factory.mktemp("audit")
    pm = get_plugin_manager(extra=[("seamtest", SeamPlugin())], warn=lambda m: None)
    config = load_config(ROOT / "examples" / "mni-patches.yaml", {
        "output.dir": str(out), "audit.suites": [], "audit.perturbations": ["intensity.gamma"],
        "audit.severities": [5], "audit.bootstrap": 20, "audit.detectors": ["msp", "knn"],
        "subgroups.attributes": [], "checks": [],
    })
    run_audit(pm, ROOT / "examples" / "model.pt", ROOT / "examples" / "mni-patches" / "test.npz", config, command="test")
    return json.loads((out / "results.json").read_text()), (out / "report.html").read_text(), pm


def _robustness_headers(html: str) -> list[str]:
    # the all-scenarios table sits in the appendix, collapsed
    section = html[html.index('<section id="appendix">'):]
    table = re.findall(r"Metrics per scenario with.*?</thead>", section, re.DOTALL)[-1]
    return re.findall(r'<th scope="col">(.*?)</th>', table)


def test_metric_info_is_recorded_and_validates(audit: tuple[dict[str, Any], str, Any]) -> None:
    results, _, _ = audit
    info = results["metric_info"]
    assert set(info) == set(results["metric_directions"])  # every emitted key, nothing else
    headline = sorted((k for k, i in info.items() if i["headline"]), key=lambda k: info[k]["order"])
    # today's HEADLINE_METRICS of a multiclass audit, with the plugin's key where its order puts it
    assert headline == ["accuracy", "balanced_accuracy", "auroc", "f1_macro", "seamtest_sharpness", "ece", "brier", "nll"]
    assert [k for k in headline if info[k]["lead"]] == ["accuracy", "seamtest_sharpness", "ece"]
    assert info["seamtest_sharpness"] == {"family": "seamtest", "plugin": "seamtest", "higher_is_better": True,
                                          "headline": True, "order": 4, "lead": True, "digits": 1, "percent": True,
                                          "definition": None}
    assert info["seamtest_hidden"]["headline"] is False and info["seamtest_hidden"]["order"] is None
    assert info["sensitivity/csf_other"]["family"] == "classification" and not info["sensitivity/csf_other"]["headline"]
    assert info["ece"]["plugin"] == "calibration" and info["ece"]["higher_is_better"] is False
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(results, json_schema())


def test_plugin_headline_metric_reaches_the_standard_tables(audit: tuple[dict[str, Any], str, Any]) -> None:
    results, html, _ = audit
    assert _robustness_headers(html) == ["Scenario", "accuracy", "balanced accuracy", "auroc", "f1 macro",
                                         "seamtest sharpness", "ece", "brier", "nll"]
    # formatted as declared: percent with one digit, the CI too
    est = results["scenarios"][0]["metrics"]["seamtest_sharpness"]
    text = f"{100 * est['value']:.1f}% [{100 * est['ci_low']:.1f}%, {100 * est['ci_high']:.1f}%]"
    assert f"<td>{text}</td>" in html
    # a lead key: summarised per perturbation in the degradation table and judged for breaking points
    degradation = re.search(r"Degradation summary per perturbation.*?</table>", html, re.DOTALL).group(0)
    assert "<td>seamtest sharpness</td>" in degradation
    assert "seamtest sharpness: breaks at" in html
    assert "seamtest hidden" not in html.split('<section id="appendix">')[0]


def test_warning_records_match_warnings(audit: tuple[dict[str, Any], str, Any]) -> None:
    results, html, _ = audit
    records = results["warning_records"]
    assert [w["message"] for w in records] == results["warnings"]
    by_message = {w["message"]: w for w in records}
    assert by_message["seamtest: a plain warning"] == {"code": "analysis", "plugin": "seamtest", "scenario": None,
                                                       "subject": None, "message": "seamtest: a plain warning", "alert": False,
                                                       "impact": None}
    assert by_message["seamtest: a record"] == {"code": "seamtest-odd", "plugin": "seamtest", "scenario": "clean",
                                                "subject": None, "message": "seamtest: a record", "alert": False,
                                                "impact": None}
    # knn needs the feature layer the example config sets; msp skipped or not, every record has a code
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", w["code"]) for w in records)
    assert "<h4>From plugin seamtest (2)</h4>" in html


def test_section_capabilities(audit: tuple[dict[str, Any], str, Any]) -> None:
    _, html, _ = audit
    # order 150: between the core's summary (100) and identity (200), in the document and the nav
    ids = re.findall(r'<section id="([^"]+)">', html)
    assert ids[:3] == ["summary", "seamtest", "identity"]
    nav = re.findall(r'<li><a href="#([^"]+)">', html)
    assert nav == ids
    summary = html[:html.index('<section id="seamtest">')]
    assert "<li>seamtest: a finding from a section</li>" in summary
    limitations = html[html.index('<section id="limitations">'):]
    assert "<li>seamtest: a limitation from a section</li>" in limitations
    seam = html[html.index('<section id="seamtest">'):html.index('<section id="identity">')]
    assert "<caption>Seam table</caption>" in seam and '<th scope="row">intensity.gamma@5</th><td>600</td>' in seam
    assert "<p>&lt;\u00a00.001</p>" in seam


def test_report_rerenders_byte_for_byte(audit: tuple[dict[str, Any], str, Any]) -> None:
    results, html, pm = audit
    assert render_report(Results.model_validate(results), pm) == html


def test_core_report_names_no_builtin_metric() -> None:
    names = ("accuracy", "balanced_accuracy", "auroc", "aupr", "fpr95", "f1_macro", "ece", "ace", "mce",
             "classwise_ece", "brier", "nll", "aurc", "eaurc", "sensitivity", "specificity", "confident_error_rate",
             "temperature")
    pattern = re.compile(r"\b(" + "|".join(names) + r")\b", re.IGNORECASE)
    hits = []
    for path in sorted((ROOT / "audit" / "report").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            # "mce"/"mCE" is also the robustness summary's mean corruption error (results.json
            # robustness.mce), a core key; the calibration metric is spelt "MCE" in prose
            for m in pattern.finditer(re.sub(r"\bmce(_table)?\b|\bmCE\b", "", line)):
                hits.append(f"{path.name}:{n}: {m.group(0)}")
    assert not hits, hits
    assert pattern.search('x = "ece"') and pattern.search("Accuracy drops")  # the pattern itself finds names
    # nor do the core templates; the shift-detection measures (AUROC, AUPR, FPR95 of a detector's
    # score) are the core's own (medaudit.ood_metrics), so only the metric plugins' names count there
    metric_names = re.compile(r"\b(" + "|".join(n for n in names if n not in ("auroc", "aupr", "fpr95")) + r")\b",
                              re.IGNORECASE)
    template_hits = [f"{path.name}: {m.group(0)}" for path in sorted((ROOT / "templates").rglob("*.html"))
                     for m in metric_names.finditer(re.sub(r"\bmce(_table)?\b|\bmCE\b", "", path.read_text()))]
    assert not template_hits, template_hits


def test_appendix_lists_the_definitions_the_metrics_declare() -> None:
    # a results file without metric_info gets the installed plugins' declarations, definitions included
    data = json.loads((ROOT / "tests" / "fixtures" / "results-full.json").read_text(encoding="utf-8"))
    assert "metric_info" not in data
    html = render_report(Results.model_validate(data), get_plugin_manager(warn=lambda m: None))
    appendix = html.split('<section id="appendix">')[1]
    assert "Hanley &amp; McNeil 1982" in appendix  # auroc, from ClassificationMetrics.definitions
    assert "Kull et al. 2019" in appendix  # classwise_ece, from CalibrationMetrics.definitions
    # without plugins nothing declares them, and the appendix says so instead of listing nothing
    bare = render_report(Results.model_validate(data)).split('<section id="appendix">')[1]
    assert "records no metric definitions" in bare


def test_metric_info_ranking_by_hand() -> None:
    class A(Metric):
        name = "a"
        headline = ("a2", "a1")
        headline_order = 300

        def compute(self, *args: Any) -> dict[str, Tensor]:
            raise NotImplementedError

    class B(A):
        name = "b"
        headline = ("b1", "missing")
        headline_order = 300
        higher_is_better = False

    a, b = A(), B()
    info = declare({"a1": a, "a2": a, "b1": b, "b0": b}, {id(a): "pa"})
    # same headline_order: families in emission order (a first), then their declared order
    assert {k: (i.order, i.lead, i.headline) for k, i in info.items()} == {
        "a2": (0, True, True), "a1": (1, False, True), "b1": (2, True, True), "b0": (None, False, False)}
    assert info["a1"].plugin == "pa" and info["b1"].plugin == B.__module__ and info["b1"].higher_is_better is False


def test_old_results_fallback_without_and_with_plugins() -> None:
    data = json.loads((FIXTURES / "results-small.json").read_text())
    assert "metric_info" not in data and "warning_records" not in data
    # results alone: every non-per-class key of metric_directions, in order; the first leads
    plain = [k for k in data["metric_directions"] if "/" not in k]
    assert headline_keys(data) == [k for k in plain if k in data["scenarios"][0]["metrics"]]
    assert lead_keys(data) == [plain[0]] and primary_metric(data) == plain[0]
    html = render_report(Results.model_validate(data))
    assert _robustness_headers(html)[1:] == [k.replace("_", " ") for k in headline_keys(data)]
    # with the installed plugins: their declarations, so the same tables as a new results file
    html = render_report(Results.model_validate(data), get_plugin_manager(warn=lambda m: None))
    assert _robustness_headers(html)[1:] == ["accuracy", "balanced accuracy", "auroc", "f1 macro", "ece", "brier", "nll"]


def test_fmt_metric() -> None:
    est = {"value": 0.12, "ci_low": 0.1, "ci_high": 0.15}
    assert fmt_metric(est, None) == "0.120 [0.100, 0.150]"
    assert fmt_metric(est, {"digits": 2, "percent": True}) == "12.00% [10.00%, 15.00%]"
    assert fmt_metric({"value": None}, {"percent": True}) == "–"
    assert fmt_metric(0.5, {"digits": 0, "percent": True}) == "50%"
    assert fmt_metric(torch.tensor(0.5).item(), {"digits": 1}) == "0.5"
    assert metric_info({"metric_info": {"x": {"headline": True}}}) == {"x": {"headline": True}}


def test_analysis_warnings_strings_records_and_garbage() -> None:
    out = analysis_warnings("p", ["plain", {"code": "c1", "message": "m1", "subject": "s"},
                                  WarningRecord(code="c2", message="m2", plugin="other"), {"message": "no code"}, 3])
    assert [(w.code, w.plugin, w.message) for w in out[:3]] == [("analysis", "p", "plain"), ("c1", "p", "m1"),
                                                                ("c2", "other", "m2")]
    assert out[1].subject == "s"
    # entries that are no record are the plugin's fault: recorded, naming it, and the audit goes on
    assert [w.code for w in out[3:]] == ["analysis-failed", "analysis-failed"]
    assert 'plugin "p"' in out[3].message and "code: Field required" in out[3].message
    assert "3" in out[4].message


def test_task_applies_reads_the_recorded_capabilities() -> None:
    from medaudit.report.views import task_applies
    from medaudit.task import CALIBRATION, SUBGROUPS

    assert task_applies({"model": {}}, CALIBRATION)  # results from before tasks declared capabilities
    recorded = {"model": {"task_capabilities": [SUBGROUPS]}}
    assert task_applies(recorded, SUBGROUPS) and not task_applies(recorded, CALIBRATION)
