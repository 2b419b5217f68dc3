"""The HTML report: sections, findings, escaping, accessibility, self-containment and determinism.

Fixtures (tests/fixtures, see make_fixtures.py): ``results-small.json`` is a real tiny audit;
``results-full.json`` adds synthetic OOD/failure-detection entries and a too-small group. Both
predate ``metric_info`` and ``warning_records``, so they also exercise the fallbacks for old
results files. Reports are rendered with the installed built-in plugins, whose sections
(calibration, OOD, subgroups) are part of every report.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from medaudit import figures
from medaudit.errors import MedauditError
from medaudit.hookspecs import hookimpl
from medaudit.plugin_manager import get_plugin_manager
from medaudit.plugins import calibration, ood, subgroups
from medaudit.report import build_view, findings, render_report
from medaudit.results import Results
from medaudit.sections import ReportSection

FIXTURES = Path(__file__).parent / "fixtures"
# the built-in metrics' display declarations for the fixtures' keys (their results.json predates metric_info)
DECLARED = {k: {"family": f, "plugin": f, "higher_is_better": f == "classification", "headline": True, "order": i,
                "lead": k in ("accuracy", "ece")}
            for i, (k, f) in enumerate([("accuracy", "classification"), ("balanced_accuracy", "classification"),
                                        ("auroc", "classification"), ("f1_macro", "classification"),
                                        ("ece", "calibration"), ("brier", "calibration"), ("nll", "calibration")])}
EVIL = "<script>alert(1)</script>"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"results-{name}.json").read_text(encoding="utf-8"))


def render(data: dict[str, Any], sections: list[ReportSection] | None = None) -> str:
    """The report as ``medaudit report`` renders it: built-in plugins, plus ``sections`` from a "fake" plugin."""
    extra = [("fake", _SectionsPlugin(sections))] if sections is not None else []
    return render_report(Results.model_validate(data), get_plugin_manager(extra=extra, warn=lambda m: None))


class _SectionsPlugin:
    def __init__(self, sections: list[ReportSection]) -> None:
        self.sections = sections

    @hookimpl
    def medaudit_report_sections(self, results: dict[str, Any]) -> list[ReportSection]:
        return self.sections


def section_findings(data: dict[str, Any]) -> list[str]:
    """The built-in sections' findings, in section order, as render_report collects them."""
    secs = [s for mod in (calibration, ood, subgroups) for s in mod.medaudit_report_sections(data)]
    return [f for s in sorted(secs, key=lambda s: s.order) for f in s.findings]


class _Tags(HTMLParser):
    """Start tags and their attributes, as a browser's tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(html)
    return p.tags


@pytest.fixture(scope="module")
def full_html() -> str:
    return render(load("full"))


def test_fixtures_are_small() -> None:
    for f in FIXTURES.glob("results-*.json"):
        assert f.stat().st_size < 300_000, f


def test_all_sections_present(full_html: str) -> None:
    for sid in ("summary", "identity", "perturbations", "robustness", "calibration", "ood", "subgroups",
                "limitations", "appendix"):
        assert f'<section id="{sid}">' in full_html
        assert f'href="#{sid}"' in full_html
    assert full_html.count("<h2>") == 9


def test_summary_verdict_and_checks_table(full_html: str) -> None:
    assert ('class="verdict verdict-fail">Verdict: <strong>FAIL — 2 of 3 configured checks passed; 2 perturbations '
            "break a headline metric beyond its margin</strong>") in full_html
    # value and threshold of the failing check, flagged row
    row = re.search(r'<tr class="fail"><th scope="row">mri\.noise@\*\.drop\.accuracy&gt;0\.01</th>(.*?)</tr>', full_html)
    assert row, "failing check row missing"
    assert "<td>0.0783</td><td>0.0100</td><td>FAIL</td>" in row.group(1)


def test_findings_are_computed_from_results() -> None:
    data = load("full")
    data["metric_info"] = DECLARED
    out = findings(data, section_findings(data))
    assert 3 <= len(out) <= 5
    assert out[0].startswith("1 of 3 configured checks failed: mri.noise@*.drop.accuracy>0.01")
    assert any(f.startswith("Accuracy drops from 0.988 to 0.657 under intensity.gamma@5") for f in out)
    assert any(f.startswith("Worst subgroup") and "level" in f for f in out)
    assert any("ECE" in f and "intensity.gamma@5" in f for f in out)
    assert any("weakest shift detector is mahalanobis" in f for f in out)
    # the largest significant drop really is the largest one in the data
    drops = [(s["drop"]["accuracy"]["value"], s["id"]) for s in data["scenarios"]
             if s.get("drop", {}).get("accuracy", {}).get("significant")]
    top_value, top_id = max(drops)
    assert f"a drop of {top_value:.3f}" in out[1] and top_id in out[1]


def test_findings_without_drops_say_so() -> None:
    data = load("small")
    data["metric_info"] = DECLARED
    for s in data["scenarios"]:
        for d in s["drop"].values():
            d["significant"] = False
    assert "No perturbation caused a statistically significant drop in accuracy." in findings(data, section_findings(data))


def test_identity_and_metadata_counts(full_html: str) -> None:
    assert "bc91a0bfe5b189a584d234dc8c2014ba439401958c949dcec118b3f06a88f2c9" in full_html
    m = re.search(r"Samples per value of metadata column “hemisphere”.*?</table>", full_html, re.DOTALL)
    assert m and "<th scope=\"row\">right</th><td>318</td><td>53.0%</td>" in m.group(0)
    assert "voxel: every listed value occurs once" in full_html


def test_identity_names_the_executor_the_ray_cluster_and_per_unit_throughput() -> None:
    data = load("full")
    data["environment"]["executor"] = {"executor": "local"}
    assert "<th scope=\"row\">Executor</th><td class=\"wrap\">local (every unit of work in this process)</td>" in render(data)
    units = [{"unit": f"{s:09d}", "start": s, "stop": s + 200, "scenarios": 3, "seconds": sec, "forward_per_s": f,
              "pid": 10 + s, "node": node, "attempts": 1}
             for s, sec, f, node in [(0, 4.0, 150.0, "aa" * 28), (200, 1.0, 600.0, "bb" * 28), (400, 2.0, 300.0, "aa" * 28)]]
    data["environment"]["executor"] = {
        "executor": "ray", "address": "10.0.0.1:6379", "ray": "2.60.0", "workers": 2, "cpus_per_worker": 1,
        "gpus_per_worker": 0.5, "cpus": 2, "gpus": 1.0, "threads_per_worker": 1, "nodes": 2, "units_rerun": 1,
        "worker_processes": [{"pid": 10, "node": "aa" * 28, "gpus": ["0"]}, {"pid": 11, "node": "bb" * 28, "gpus": ["0"]}],
        "units": units, "unit_seconds": 7.0, "forward_per_s": 257.1}
    html = render(data)
    assert ("<th scope=\"row\">Executor</th><td class=\"wrap\">Ray 2.60.0 at 10.0.0.1:6379: 2 workers on 2 nodes, each 1 CPU and "
            "0.5 GPUs (2 CPUs and 1 GPU in all: aaaaaaaa:0, bbbbbbbb:0)</td>") in html
    # per unit: the range of seconds, and the median of the workers' forward passes per second
    assert ("<th scope=\"row\">Units of work</th><td class=\"wrap\">3 units run, 1 re-run after losing a worker; 1.0–4.0 s per "
            "unit, median 300 forward passes/s per worker") in html


def test_catalogue_preview_and_sampled_params(full_html: str) -> None:
    assert 'src="data:image/png;base64,' in full_html
    assert "Parameters actually sampled per scenario" in full_html  # collapsed in the appendix
    data = load("full")
    sigma = next(s for s in data["scenarios"] if s["id"] == "mri.noise@5")["params"]["sigma"]
    row = re.search(r'<th scope="row">mri\.noise</th><td>sigma</td>(.*?)</tr>', full_html)
    assert row, "sampled-parameter row of mri.noise missing"
    assert f"<td>{sigma['mean']:.3f} ({sigma['min']:.3f} – {sigma['max']:.3f})</td>" in row.group(1)
    assert row.group(1).count("<td>") == 2  # severities 1 and 5
    assert "gamma" in full_html and "<cite>" in full_html


def test_robustness_figures_and_tables(full_html: str) -> None:
    data = load("full")
    data["metric_info"] = DECLARED
    view = build_view(Results.model_validate(data), [])
    # one figure, one panel per suite, of the primary metric
    assert view.robustness_figure is not None and "one panel per suite (intensity, mri)" in view.robustness_figure.svg
    degradation = next(a.table for a in view.appendix if a.filename == "robustness-degradation.csv")
    assert {r.cells[1] for r in degradation.rows} == {"intensity", "mri"}
    assert {r.cells[2] for r in degradation.rows} == {"accuracy", "ece"}
    # significant drops: table marker and a filled (dark-edged) marker in the figure
    assert "▼" in full_html
    assert "Mean corruption error" in full_html and "all suites" in full_html


def test_calibration_section(full_html: str) -> None:
    data = load("full")
    fig = calibration.report.reliability_figure(data)
    assert fig is not None
    # clean plus the three scenarios with the highest ECE, worst first
    assert "clean (ECE" in fig.svg and "intensity.gamma@5 (ECE 0.301)" in fig.svg
    assert fig.svg in full_html
    assert "Temperature scaling" in full_html and "Fitted temperature T = 0.877" in full_html
    temperature, _ = calibration.report.temperature_table(data)
    assert temperature.rows[0].cells[0] == "clean"
    assert calibration.report.calibration_table(data).headers == ["Scenario", "ece", "ace", "mce", "brier", "nll"]


def test_ood_section_with_detectors(full_html: str) -> None:
    data = load("full")
    assert len(ood.report.ood_table(data).rows) == 8  # 4 perturbed scenarios × 2 detectors
    fig = ood.report.ood_figure(data)
    assert fig is not None and "keeps no per-sample scores" in fig.caption and fig.svg in full_html
    assert ood.report.failure_table(data).headers == ["Scenario", "energy", "msp"]
    assert "No detectors ran" not in full_html


def test_graceful_without_ood_and_subgroups() -> None:
    data = load("small")
    data["subgroups"] = []
    data["analyses"] = {}
    html = render(data)
    assert "No detectors ran" in html
    assert "No subgroup analysis was recorded." in html
    assert "Subgroups were configured but no subgroup results were recorded" in html
    assert "No OOD or shift detector produced results" in html


def test_subgroups_forest_gaps_and_small_groups(full_html: str) -> None:
    data = load("full")
    data["metric_info"] = DECLARED
    figs = subgroups.report.forest_figures(data)
    assert len(figs) == 2  # hemisphere, level
    assert "inferior (n=129)" in figs[1].svg
    gaps = subgroups.report.gap_table(data)
    sig = [r for r in gaps.rows if r.flag == "drop"]
    assert sig and all(r.cells[-1] == "yes" for r in sig)
    # non-headline, non-significant gaps are left to the appendix table, which lists every gap
    n_gaps = len(data["analyses"]["subgroup_gaps"])
    assert f"all {n_gaps} gaps are in the appendix" in gaps.caption
    assert len(subgroups.report.all_gaps_table(data).rows) == n_gaps > len(gaps.rows)
    assert all(r.cells[2] in {"accuracy", "balanced accuracy", "auroc", "ece"} or r.flag for r in gaps.rows)
    assert "level = (missing) (clean): 12 samples" in full_html


def test_limitations_include_warnings_and_derived_notes() -> None:
    data = load("full")
    data["warning_records"] = [
        {"code": "unclassified", "message": w} for w in data["warnings"]] + [
        {"code": "plugin-load-failed", "plugin": "ood", "subject": "ood",
         "message": 'Error importing plugin "ood" (from medaudit): ModuleNotFoundError: boom'},
        {"code": "detector-skipped", "subject": "knn", "plugin": "ood",
         "message": "ood: detector 'knn' skipped: cross-fitting needs at least 4 samples, got 3"},
        {"code": "detector-skipped", "subject": "energy", "plugin": "ood",
         "message": "ood: detector 'energy' needs logits but the model outputs probabilities; skipped"},
        # the notes come from codes, not text: a reworded warning still counts, a look-alike does not
        {"code": "detector-skipped", "subject": "mahalanobis", "message": "reworded"},
        {"code": "analysis", "plugin": "x", "message": "ood: detector 'msp' skipped: planted look-alike"},
    ]
    data["dataset"]["metadata_summary"]["level"]["(missing)"] = 12
    data["config"]["subgroups"]["attributes"].append("scanner")
    data["config"]["audit"]["bootstrap"] = 0
    html = render(data)
    assert "synthetic fixture warning" in html
    assert "analyses are absent from this report): ood." in html
    assert "Metadata column level is missing for 12 of 600 samples." in html
    assert "absent from the data&#39;s metadata: scanner." in html
    assert "Bootstrap was off" in html
    assert "OOD detectors that could not run (reasons in the warnings above): energy, knn, mahalanobis." in html
    # grouped by source: medaudit's own first, then each plugin
    limitations = html[html.index('<section id="limitations">'):]
    assert [h for h in re.findall(r"<h4>From (.*?) \(", limitations)] == ["medaudit", "plugin ood", "plugin x"]


def test_appendix_definitions_and_reproducibility(full_html: str) -> None:
    appendix = full_html[full_html.index('<section id="appendix">'):]
    for term in ("accuracy", "ece", "brier", "nll", "CE, mCE", "Shift-detection AUROC"):
        assert f"<dt>{term}" in appendix
    assert "percentile bootstrap" in appendix and "50 resamples" in appendix
    assert "samples/s" in appendix and "Throughput per scenario" in appendix
    assert "<dt>Precision</dt><dd>fp32</dd>" in appendix


def plant(data: dict[str, Any]) -> dict[str, Any]:
    """Hostile strings in every user-controlled place: class names, metadata, paths, groups, warnings."""
    d = copy.deepcopy(data)
    d["model"]["classes"][0] = EVIL
    d["model"]["path"] = f"/models/{EVIL}.pt"
    d["model"]["name"] = EVIL
    d["dataset"]["path"] = f"/data/{EVIL}"
    d["dataset"]["class_counts"] = {EVIL if k == "csf_other" else k: v for k, v in d["dataset"]["class_counts"].items()}
    d["dataset"]["metadata_summary"]["hemisphere"][EVIL] = 3
    d["dataset"]["metadata_columns"].append(EVIL)
    d["warnings"].append(f"warning about {EVIL}")
    for g in d["subgroups"]:
        if g["group"] == "left":
            g["group"] = EVIL  # reaches matplotlib (forest plot tick label) too
    d["analyses"]["subgroup_gaps"][0]["worst_group"] = EVIL
    return d


def test_user_strings_are_escaped_everywhere() -> None:
    html = render(plant(load("full")))
    assert "<script" not in html.lower()
    assert not [t for t, _ in tags(html) if t == "script"]
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert html.count(escaped) >= 8
    # inside the SVG forest plot the planted group name is escaped by matplotlib
    forest = re.findall(r"<svg[^>]*aria-label=\"Forest plot of accuracy per hemisphere.*?</svg>", html, re.DOTALL)
    assert forest and escaped in forest[0]


def test_plugin_sections_render_and_escape() -> None:
    sec = ReportSection(id="extra", title="Extra analysis", order=600,
                        template="<p>{{ note }} {{ fmt(results.dataset.n_samples) }}</p>", context={"note": EVIL})
    html = render(load("small"), [sec])
    assert '<section id="extra">' in html and 'href="#extra"' in html
    assert "<p>&lt;script&gt;alert(1)&lt;/script&gt; 600</p>" in html


def test_figures_accessible_and_ids_unique(full_html: str) -> None:
    svgs = [a for t, a in tags(full_html) if t == "svg"]
    assert len(svgs) >= 5  # robustness, reliability, OOD, 2 forest plots
    for a in svgs:
        assert a.get("role") == "img" and a.get("aria-label")
    assert full_html.count("<title>") == 1 + len(svgs)
    ids = re.findall(r'\sid="([^"]+)"', full_html)
    assert len(ids) == len(set(ids)), "duplicate element ids across inline SVGs"
    # every table has a caption and header cells have a scope
    assert len([t for t, _ in tags(full_html) if t == "table"]) == full_html.count("<caption>") > 10
    assert not [a for t, a in tags(full_html) if t == "th" and "scope" not in a]


def test_self_contained_no_external_references(full_html: str) -> None:
    for tag, attrs in tags(full_html):
        assert tag not in ("script", "link", "iframe", "object", "embed", "base")
        for name in ("src", "href", "xlink:href", "srcset", "action"):
            value = attrs.get(name) or ""
            assert not re.match(r"\s*(https?:|//|ftp:)", value, re.IGNORECASE), (tag, name, value)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", full_html)
    assert "@import" not in full_html
    assert "Content-Security-Policy" in full_html


def test_print_stylesheet() -> None:
    css = (Path(__file__).resolve().parents[1] / "templates" / "report.css").read_text()
    printing = css[css.index("@media print"):]
    assert "break-before: page" in printing and "break-inside: avoid" in printing
    assert "table-header-group" in printing and "table.keep { break-inside: avoid; }" in printing
    # short tables are kept whole, long ones (e.g. every scenario of a full audit) may break
    assert '<table class="keep">' in render(load("small"))


def test_details_only_in_the_appendix(full_html: str) -> None:
    # collapsed <details> print closed: only the appendix's full tables (each also a CSV file) and
    # the config may hide in one; every section's essentials stay open
    appendix = full_html.index('<section id="appendix">')
    assert "<details" in full_html and "<details" not in full_html[:appendix]
    summaries = re.findall(r"<summary>(.*?)</summary>", full_html[appendix:], re.DOTALL)
    assert sum("tables/" in s for s in summaries) == len(summaries) - 2  # all but severity parameters and config


def test_rendering_is_deterministic(full_html: str) -> None:
    assert render(load("full")) == full_html


def test_rendering_is_deterministic_across_processes(full_html: str, tmp_path: Path) -> None:
    code = ("import json,sys; from pathlib import Path; from medaudit.results import Results; "
            "from medaudit.report import render_report; from medaudit.plugin_manager import get_plugin_manager; "
            "sys.stdout.write(render_report(Results.model_validate(json.loads(Path(sys.argv[1]).read_text())), "
            "get_plugin_manager()))")
    out = subprocess.run([sys.executable, "-c", code, str(FIXTURES / "results-full.json")], capture_output=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "123"})
    assert out.stdout.decode() == full_html


def test_figures_escape_mathtext_and_markup() -> None:
    assert figures.text("cost $5") == r"cost \$5"
    svg = figures.forest([figures.Interval("a<b & $x$", 0.5, 0.4, 0.6)], "x", "t", 'alt "quoted" <b>')
    assert "a&lt;b &amp; $x$" in svg  # literal, not mathtext
    assert 'aria-label="alt &#34;quoted&#34; &lt;b&gt;"' in svg
    assert not svg.startswith("<?xml") and svg.startswith("<svg")
    again = figures.forest([figures.Interval("a<b & $x$", 0.5, 0.4, 0.6)], "x", "t", 'alt "quoted" <b>')
    assert svg == again


def test_pdf_without_chromium_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from medaudit import pdf

    html = tmp_path / "r.html"
    html.write_text("<p>x</p>")
    monkeypatch.setattr(pdf, "find_chromium", lambda: None)
    with pytest.raises(MedauditError, match="PDF export needs Chromium"):
        pdf.html_to_pdf(html, tmp_path / "r.pdf")
    assert not (tmp_path / "r.pdf").exists()
    with pytest.raises(MedauditError, match="no such report"):
        pdf.html_to_pdf(tmp_path / "missing.html", tmp_path / "r.pdf")


def test_number_formatting() -> None:
    from medaudit.report import fmt, fmt_ci, fmt_p

    assert fmt(-0.0001) == "0.000" and fmt(-0.5) == "-0.500" and fmt(None) == "–" and fmt(float("nan")) == "–"
    assert fmt_ci({"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}) == "0.500 [0.400, 0.600]"
    assert fmt_ci({"value": 0.5, "ci_low": None, "ci_high": None}) == "0.500"
    assert fmt_p(0.0004) == "<\u00a00.001" and fmt_p(0.0123) == "0.012"


def test_clean_only_audit_without_intervals_or_checks() -> None:
    data = load("small")
    data["scenarios"] = data["scenarios"][:1]
    for est in data["scenarios"][0]["metrics"].values():
        est["ci_low"] = est["ci_high"] = None
    data["checks"] = []
    data["subgroups"] = []
    data["analyses"] = {}
    data["robustness"] = {}
    data["calibration"] = {}
    data["assets"] = {}
    data["timing"] = None
    data["config"]["audit"]["bootstrap"] = 0
    html = render(data)
    assert "Verdict: <strong>NO CHECKS CONFIGURED — no perturbation breaks a headline metric beyond its margin</strong>" in html
    assert "No perturbation was audited" in html
    assert "Temperature scaling" not in html and "data:image/png" not in html
    assert "Bootstrap was off" in html
    assert html.count("<svg") == 1  # the reliability diagram of clean data
