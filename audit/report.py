"""The HTML audit report: view models → jinja2 templates → one self-contained file.

Everything shown is built from :class:`~medaudit.results.Results` alone, so ``medaudit report
results.json`` re-renders the same report. Templates live in ``medaudit/templates`` (one partial
per section); autoescaping is on, CSS is inlined, images are data URIs, and nothing is fetched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import jinja2

from .plugin_manager import PluginManager
from .results import Results
from .sections import ReportSection

HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1_macro", "ece", "brier", "nll")


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: fixed digits, an en dash for undefined values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(est: dict[str, Any] | None, digits: int = 3) -> str:
    if not est:
        return "–"
    if est.get("ci_low") is None:
        return fmt(est.get("value"), digits)
    return f"{fmt(est['value'], digits)} [{fmt(est['ci_low'], digits)}, {fmt(est['ci_high'], digits)}]"


@dataclass
class Row:
    cells: list[str]
    flag: str = ""


@dataclass
class Table:
    caption: str
    headers: list[str]
    rows: list[Row] = field(default_factory=list)


@dataclass
class ReportView:
    """What the templates see: ready-made strings and tables, no logic beyond loops."""

    title: str
    results: dict[str, Any]
    verdict: str
    findings: list[str]
    checks: Table
    identity: list[tuple[str, str]]
    robustness: Table
    calibration: Table
    catalogue: list[dict[str, Any]]
    preview_png: str | None
    warnings: list[str]
    sections: list[dict[str, Any]]


def headline_keys(results: dict[str, Any]) -> list[str]:
    keys = results["scenarios"][0]["metrics"].keys() if results["scenarios"] else []
    return [k for k in HEADLINE_METRICS if k in keys]


def findings(results: dict[str, Any]) -> list[str]:
    """Plain-language findings computed from the results: largest significant drops, calibration change."""
    out: list[str] = []
    drops = []
    for s in results["scenarios"]:
        for key in ("accuracy", "auroc", "balanced_accuracy"):
            d = s.get("drop", {}).get(key)
            if d and d.get("significant") and d.get("value") is not None:
                drops.append((d["value"], key, s["id"], d))
    drops.sort(reverse=True)
    seen: set[str] = set()
    for value, key, sid, d in drops:
        pert = sid.split("@")[0]
        if pert in seen:
            continue
        seen.add(pert)
        out.append(f"{key.replace('_', ' ')} drops by {value:.3f} (95% CI {fmt(d['ci_low'])} to {fmt(d['ci_high'])}) under {sid}.")
        if len(out) >= 3:
            break
    if not drops and len(results["scenarios"]) > 1:
        out.append("No perturbation caused a statistically significant drop in accuracy or AUROC.")
    clean = results["scenarios"][0]["metrics"] if results["scenarios"] else {}
    worst_ece = max((s for s in results["scenarios"][1:] if s["metrics"].get("ece", {}).get("value") is not None),
                    key=lambda s: s["metrics"]["ece"]["value"], default=None)
    if worst_ece and clean.get("ece", {}).get("value") is not None:
        out.append(f"Calibration error (ECE) rises from {fmt(clean['ece']['value'])} on clean data to "
                   f"{fmt(worst_ece['metrics']['ece']['value'])} under {worst_ece['id']}.")
    failed = [c for c in results.get("checks", []) if not c["passed"]]
    if failed:
        out.insert(0, f"{len(failed)} of {len(results['checks'])} configured checks failed.")
    return out[:5]


def build_view(results: Results, sections: list[ReportSection]) -> ReportView:
    r = results.model_dump(mode="json")
    checks = Table("Configured checks (--fail-on): a check fails when its condition holds.",
                   ["Check", "Value", "Result"])
    for c in r["checks"]:
        checks.rows.append(Row([c["expr"], fmt(c["value"]), "pass" if c["passed"] else "FAIL"], "" if c["passed"] else "fail"))
    verdict = "no checks configured" if not r["checks"] else (
        "PASS" if all(c["passed"] for c in r["checks"]) else "FAIL")
    m, d, e = r["model"], r["dataset"], r["environment"]
    identity = [
        ("Model file", m["path"]), ("Model SHA-256", m["sha256"]), ("Model format", m["format"]),
        ("Parameters", f"{m['num_parameters']:,}"), ("Architecture", m["summary"]), ("Output", m["output_kind"]),
        ("Task", f"{m['task']}: {', '.join(m['classes'])}"),
        ("Dataset", d["path"]), ("Dataset SHA-256", d["sha256"]), ("Samples", str(d["n_samples"])),
        ("Class counts", ", ".join(f"{k}: {v}" for k, v in d["class_counts"].items())),
        ("Metadata columns", ", ".join(d["metadata_columns"]) or "none"),
        ("medaudit", r["medaudit_version"]), ("Python / torch", f"{e['python']} / {e['torch']}"),
        ("Device", f"{e['device']} ({e['device_name']})"), ("Precision", e["precision"]), ("Seed", str(r["seed"])),
        ("Command", r["command"]), ("Created", r["created_at"]),
    ]
    if r.get("timing"):
        t = r["timing"]
        identity.append(("Run time", f"{t['total_seconds']:.1f} s ({t['samples_per_second']:,.0f} forward passes/s)"))
    for label, key in (("Intended use", "intended_use"), ("Model description", "description")):
        if m.get(key):
            identity.insert(0, (label, m[key]))
    keys = headline_keys(r)
    robustness = Table("Metrics per scenario with 95% bootstrap CIs; ▼ marks a drop from clean whose CI excludes 0.",
                       ["Scenario"] + keys)
    for s in r["scenarios"]:
        cells, flagged = [s["id"]], False
        for k in keys:
            text = fmt_ci(s["metrics"].get(k))
            drop = s.get("drop", {}).get(k)
            if drop and drop.get("significant") and drop.get("value", 0) and drop["value"] > 0:
                text += " ▼"
                flagged = True
            cells.append(text)
        robustness.rows.append(Row(cells, "drop" if flagged else ""))
    cal_keys = [k for k in ("ece", "ace", "mce", "brier", "nll") if k in keys or k in (r["scenarios"][0]["metrics"] if r["scenarios"] else {})]
    calibration = Table("Calibration per scenario (lower is better).", ["Scenario"] + cal_keys)
    for s in r["scenarios"]:
        calibration.rows.append(Row([s["id"]] + [fmt_ci(s["metrics"].get(k)) for k in cal_keys]))
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    rendered = [{"id": sec.id, "title": sec.title,
                 "html": env.from_string(sec.template).render(results=r, fmt=fmt, fmt_ci=fmt_ci, **sec.context)}
                for sec in sorted(sections, key=lambda s: s.order)]
    return ReportView(
        title=f"medaudit report: {m.get('name') or m['path']}", results=r, verdict=verdict, findings=findings(r),
        checks=checks, identity=identity, robustness=robustness, calibration=calibration,
        catalogue=r["perturbation_catalogue"], preview_png=r["assets"].get("preview_png"),
        warnings=r["warnings"], sections=rendered,
    )


def template_env() -> jinja2.Environment:
    root = resources.files("medaudit.templates")
    loader = jinja2.FunctionLoader(lambda name: (root / name).read_text(encoding="utf-8"))
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(fmt=fmt, fmt_ci=fmt_ci)
    return env


def render_report(results: Results, pm: PluginManager | None = None) -> str:
    sections: list[ReportSection] = []
    if pm is not None:
        data = results.model_dump(mode="json")
        for _plugin, secs in pm.call_each("medaudit_report_sections", results=data):
            sections.extend(secs)
    view = build_view(results, sections)
    env = template_env()
    css = (resources.files("medaudit.templates") / "report.css").read_text(encoding="utf-8")
    return env.get_template("report.html").render(v=view, css=css)
