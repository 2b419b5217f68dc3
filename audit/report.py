"""The HTML audit report: view models → jinja2 templates → one self-contained file.

Everything shown is built from :class:`~medaudit.results.Results` alone, so ``medaudit report
results.json`` re-renders the same report, byte for byte. Templates live in
``medaudit/templates`` (one partial per section); autoescaping is on, CSS is inlined, figures are
inline SVG drawn by :mod:`medaudit.figures`, images are data URIs, and nothing is fetched.

This module computes *what* to show (plain strings, numbers, tables, SVG figures); the templates
decide *how* (all markup). User-supplied strings (paths, class and group names, metadata values,
warnings) only ever reach the templates as plain ``str`` and are escaped there.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

from . import figures
from .plugin_manager import PluginManager
from .results import Results
from .sections import ReportSection

HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1_macro", "ece", "brier", "nll")
PRIMARY_METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1_macro")
CALIBRATION_METRICS = ("ece", "ace", "mce", "classwise_ece", "brier", "nll")
OOD_STATS = (("auroc", "AUROC"), ("aupr", "AUPR"), ("fpr95", "FPR@95%TPR"))
MISSING = "(missing)"  # medaudit.data.MISSING: how loaders count absent metadata values
PLUGIN_FAILURE = "Error importing plugin "  # prefix of medaudit.plugin_manager.LoadFailure.message
# medaudit.shift's warnings for a detector it had to leave out ("ood: detector 'knn' skipped: …")
_DETECTOR_SKIPPED = re.compile(r"ood: detector '([^']+)' (?:skipped|needs)")


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: fixed digits, an en dash for undefined values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.{digits}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"
    return str(value)


def fmt_ci(est: dict[str, Any] | None, digits: int = 3) -> str:
    if not est:
        return "–"
    if est.get("ci_low") is None:
        return fmt(est.get("value"), digits)
    return f"{fmt(est['value'], digits)} [{fmt(est['ci_low'], digits)}, {fmt(est['ci_high'], digits)}]"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<\u00a00.001" if p < 0.001 else f"{p:.3f}"


def label(key: str) -> str:
    """A metric key as a column header: ``balanced_accuracy`` → ``balanced accuracy``."""
    return key.replace("_", " ")


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
class Figure:
    svg: Markup
    caption: str


@dataclass
class SuiteView:
    name: str
    figure: Figure | None
    summary: Table


@dataclass
class ReportView:
    """What the templates see: ready-made strings, tables and figures, no logic beyond loops."""

    title: str
    results: dict[str, Any]
    verdict: str
    findings: list[str]
    checks: Table
    identity: list[tuple[str, str]]
    metadata_tables: list[Table]
    metadata_notes: list[str]
    catalogue: list[dict[str, Any]]
    preview_png: str | None
    params: Table
    primary: str | None
    suites: list[SuiteView]
    mce: Table
    robustness: Table
    reliability: Figure | None
    calibration: Table
    temperature: Table
    temperature_method: str
    ood: Table
    ood_figure: Figure | None
    failure: Table
    subgroup_figures: list[Figure]
    subgroup_gaps: Table
    subgroup_notes: list[str]
    warnings: list[str]
    derived_notes: list[str]
    metric_keys: list[str]
    throughput: Table
    confidence: str
    sections: list[dict[str, Any]]


def headline_keys(results: dict[str, Any]) -> list[str]:
    keys = results["scenarios"][0]["metrics"].keys() if results["scenarios"] else []
    return [k for k in HEADLINE_METRICS if k in keys]


def primary_metric(results: dict[str, Any]) -> str | None:
    """The metric the figures lead with: the first of accuracy, balanced accuracy, AUROC, F1 present."""
    keys = results["scenarios"][0]["metrics"] if results["scenarios"] else {}
    return next((k for k in PRIMARY_METRICS if k in keys), None)


def _value(est: dict[str, Any] | None) -> float | None:
    return None if not est else est.get("value")


def _perturbed(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in r["scenarios"] if s.get("perturbation")]


def _clean(r: dict[str, Any]) -> dict[str, Any] | None:
    return next((s for s in r["scenarios"] if s["id"] == "clean"), None)


def detectors(r: dict[str, Any]) -> list[str]:
    return sorted({d for s in r["scenarios"] for d in s.get("ood", {})})


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _drop_findings(r: dict[str, Any], limit: int) -> list[str]:
    # rank by the primary metric only: mixing metrics would let F1 and accuracy of one scenario
    # compete, and readers compare findings against the primary metric's curves
    primary = primary_metric(r)
    drops = []
    for s in r["scenarios"]:
        for key in [primary] if primary else []:
            d = s.get("drop", {}).get(key)
            if d and d.get("significant") and d.get("value") is not None and d["value"] > 0:
                drops.append((d["value"], key, s["id"], s.get("perturbation") or s["id"], d))
    drops.sort(key=lambda t: (-t[0], t[1], t[2]))  # ties broken by name: same results, same text
    out: list[str] = []
    seen: set[str] = set()
    for value, key, sid, pert, d in drops:
        if pert in seen:
            continue
        seen.add(pert)
        clean = _clean(r)
        before = _value(clean["metrics"].get(key)) if clean else None
        after = _value(next(s for s in r["scenarios"] if s["id"] == sid)["metrics"].get(key))
        out.append(f"{label(key).capitalize()} drops from {fmt(before)} to {fmt(after)} under {sid} "
                   f"(a drop of {value:.3f}, CI {fmt(d['ci_low'])} to {fmt(d['ci_high'])}).")
        if len(out) >= limit:
            break
    if not drops and _perturbed(r):
        out.append(f"No perturbation caused a statistically significant drop in {label(primary or 'the primary metric')}.")
    return out


def _subgroup_finding(r: dict[str, Any]) -> str | None:
    gaps = [g for g in r.get("analyses", {}).get("subgroup_gaps", []) or []
            if (g.get("gap") or {}).get("value") is not None]
    primary = primary_metric(r)
    clean = [g for g in gaps if g.get("scenario", "clean") == "clean"]
    pools = ([g for g in clean if g.get("significant")], [g for g in gaps if g.get("significant")],
             [g for g in clean if g.get("metric") == primary], clean)
    pool = next((p for p in pools if p), None)
    if pool:
        g = max(pool, key=lambda g: (g["gap"]["value"], g.get("scenario", ""), g["attribute"], g["metric"]))
        where = "clean data" if g.get("scenario", "clean") == "clean" else g["scenario"]
        tail = (f"significant after correction (adjusted p {fmt_p(g.get('p_adjusted'))})" if g.get("significant")
                else "not statistically significant")
        best = f" than for {g['best_group']}" if g.get("best_group") else " than for the best group"
        return (f"Worst subgroup on {where}: {g['attribute']} = {g['worst_group']}, whose {label(g['metric'])} "
                f"({fmt(g.get('worst_value'))}) is {fmt(g['gap']['value'])} worse{best}; {tail}.")
    rows = [s for s in r.get("subgroups", []) if s["scenario"] == "clean" and not s.get("too_small")
            and _value(s["metrics"].get(primary or "")) is not None]
    if primary and rows:
        worst = min(rows, key=lambda s: (s["metrics"][primary]["value"], s["attribute"], s["group"]))
        return (f"Worst subgroup on clean data: {worst['attribute']} = {worst['group']} "
                f"({label(primary)} {fmt_ci(worst['metrics'][primary])}, n = {worst['n']}).")
    return None


def _calibration_finding(r: dict[str, Any]) -> str | None:
    clean = _clean(r)
    scored = [s for s in _perturbed(r) if _value(s["metrics"].get("ece")) is not None]
    if not clean or not scored or _value(clean["metrics"].get("ece")) is None:
        return None
    worst = max(scored, key=lambda s: (s["metrics"]["ece"]["value"], s["id"]))
    return (f"Calibration error (ECE) rises from {fmt(clean['metrics']['ece']['value'])} on clean data to "
            f"{fmt(worst['metrics']['ece']['value'])} under {worst['id']}.")


def _ood_finding(r: dict[str, Any]) -> str | None:
    means = {}
    for det in detectors(r):
        vals = [s["ood"][det]["auroc"]["value"] for s in _perturbed(r)
                if s.get("ood", {}).get(det, {}).get("auroc", {}).get("value") is not None]
        if vals:
            means[det] = sum(vals) / len(vals)
    if not means:
        return None
    det = min(means, key=lambda d: (means[d], d))
    return (f"The weakest shift detector is {det}: mean AUROC {means[det]:.3f} over the perturbed scenarios "
            f"(0.5 is chance), so shifted inputs often go unflagged by it.")


def findings(r: dict[str, Any]) -> list[str]:
    """3–5 plain-language findings computed from the results, most important first."""
    head: list[str] = []
    failed = [c for c in r.get("checks", []) if not c["passed"]]
    if failed:
        head.append(f"{len(failed)} of {len(r['checks'])} configured checks failed: "
                    + "; ".join(c["expr"] for c in failed[:3]) + ("; …" if len(failed) > 3 else "") + ".")
    tail = [f for f in (_subgroup_finding(r), _calibration_finding(r), _ood_finding(r)) if f]
    drops = _drop_findings(r, max(1, 5 - len(head) - len(tail)))
    return (head + drops + tail)[:5]


def checks_table(r: dict[str, Any]) -> Table:
    t = Table("Configured checks (--fail-on). Each expression states the failure condition: the check "
              "fails when it holds for the measured value.", ["Check", "Measured value", "Threshold", "Result", "Note"])
    for c in r["checks"]:
        t.rows.append(Row([c["expr"], fmt(c["value"], 4), fmt(c.get("threshold"), 4),
                           "pass" if c["passed"] else "FAIL", c.get("error") or ""], "" if c["passed"] else "fail"))
    return t


# --------------------------------------------------------------------------------------------
# Identity, catalogue
# --------------------------------------------------------------------------------------------


def identity_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    m, d, e = r["model"], r["dataset"], r["environment"]
    identity = [
        ("Model file", m["path"]), ("Model SHA-256", m["sha256"]), ("Model format", m["format"]),
        ("Parameters", f"{m['num_parameters']:,}"), ("Architecture", m["summary"]), ("Output", m["output_kind"]),
        ("Task", f"{m['task']}: {', '.join(m['classes'])}"),
        ("Dataset", d["path"]), ("Dataset SHA-256", d["sha256"]), ("Dataset format", d.get("format") or "–"),
        ("Samples", str(d["n_samples"])),
        ("Class counts", ", ".join(f"{k}: {v}" for k, v in d["class_counts"].items())),
        ("Metadata columns", ", ".join(d["metadata_columns"]) or "none"),
        ("medaudit", r["medaudit_version"]), ("Python / torch", f"{e['python']} / {e['torch']}"),
        ("Platform", e.get("platform") or "–"),
        ("Device", f"{e['device']} ({e['device_name']})"
                   + (f", {e['threads']} CPU thread{'s' if e['threads'] != 1 else ''}" if e.get("threads") else "")),
        ("Precision", e["precision"] + (", channels-last memory format" if e.get("memory_format") == "channels_last" else "")),
        ("Seed", str(r["seed"])),
        ("Command", r["command"]), ("Created", r["created_at"]),
    ]
    if r.get("timing"):
        t = r["timing"]
        identity.append(("Run time", f"{t['total_seconds']:.1f} s ({t['samples_per_second']:,.0f} forward passes/s)"))
        if t.get("phases"):
            # "report" (results.json only) is left out, so a report re-rendered from results.json is identical
            shown = {k: v for k, v in t["phases"].items() if k != "report"}
            identity.append(("Run time by phase", " · ".join(f"{k} {v:.1f} s" for k, v in shown.items())))
    for lab, key in (("Intended use", "intended_use"), ("Model description", "description"), ("Model name", "name")):
        if m.get(key):
            identity.insert(0, (lab, m[key]))
    return identity


def metadata_views(r: dict[str, Any]) -> tuple[list[Table], list[str]]:
    """Sample counts per metadata value; identifier-like columns get a note instead of a table."""
    tables, notes = [], []
    n = r["dataset"]["n_samples"]
    for col, counts in r["dataset"].get("metadata_summary", {}).items():
        if counts and max(counts.values()) == 1:
            notes.append(f"{col}: every listed value occurs once (an identifier-like column); not tabulated.")
            continue
        t = Table(f"Samples per value of metadata column “{col}” (most frequent first; at most 20 values listed).",
                  ["Value", "Samples", "Share"])
        for value, c in counts.items():
            t.rows.append(Row([value, str(c), f"{100 * c / n:.1f}%" if n else "–"], "warn" if value == MISSING else ""))
        listed = sum(counts.values())
        if listed < n:
            t.rows.append(Row(["(other values)", str(n - listed), f"{100 * (n - listed) / n:.1f}%"]))
        tables.append(t)
    return tables, notes


def params_table(r: dict[str, Any]) -> Table:
    """One row per (perturbation, parameter), one column per audited severity: mean (min – max)."""
    severities = sorted({s["severity"] for s in _perturbed(r)})
    t = Table("Parameters actually sampled per scenario (random perturbations draw per sample within the "
              "severity's range): mean over the samples, with the minimum and maximum in parentheses.",
              ["Perturbation", "Parameter"] + [f"Severity {k}" for k in severities])
    cells: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    for s in _perturbed(r):
        for name, p in s.get("params", {}).items():
            cells[(s["perturbation"], name)][s["severity"]] = (
                fmt(p["mean"], 3) if p["min"] == p["max"] else f"{fmt(p['mean'], 3)} ({fmt(p['min'], 3)} – {fmt(p['max'], 3)})")
    for (pert, name), by_sev in sorted(cells.items()):
        t.rows.append(Row([pert, name] + [by_sev.get(k, "–") for k in severities]))
    return t


# --------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------


def _series(r: dict[str, Any], pert: str, key: str) -> figures.Series | None:
    clean = _clean(r)
    scs = sorted((s for s in r["scenarios"] if s.get("perturbation") == pert), key=lambda s: s["severity"])
    if not clean or key not in clean["metrics"] or not scs:
        return None
    pts = [clean] + scs
    ests = [s["metrics"].get(key) or {} for s in pts]
    return figures.Series(
        label=pert, x=[0] + [s["severity"] for s in scs], y=[e.get("value") for e in ests],
        low=[e.get("ci_low") for e in ests], high=[e.get("ci_high") for e in ests],
        marked=[False] + [bool(s.get("drop", {}).get(key, {}).get("significant")) for s in scs])


def suite_views(r: dict[str, Any], primary: str | None, confidence: str) -> list[SuiteView]:
    rob = r.get("robustness", {}).get("perturbations", {})
    by_suite: dict[str, list[str]] = defaultdict(list)
    for s in _perturbed(r):
        if s["perturbation"] not in by_suite[s.get("suite") or "other"]:
            by_suite[s.get("suite") or "other"].append(s["perturbation"])
    directions = r.get("metric_directions", {})
    views = []
    for suite in sorted(by_suite):
        perts = sorted(by_suite[suite])
        keys = [k for k in (primary, "ece") if k]
        panels = []
        for key in keys:
            series = [s for s in (_series(r, p, key) for p in perts) if s is not None]
            if series:
                panels.append((label(key), label(key), series))
        fig = None
        if panels:
            alt = (f"Degradation curves of the {suite} suite: " + " and ".join(p[0] for p in panels)
                   + " against severity 0 (clean) to 5 for " + ", ".join(perts) + ".")
            svg = figures.degradation(panels, f"deg-{suite}", alt,
                                      [directions.get(k, True) for k, p in zip(keys, panels)])
            fig = Figure(svg, f"{suite}: metric against severity, severity 0 = clean. Shaded bands: {confidence} "
                              "bootstrap confidence intervals. Filled markers with a dark outline: the drop from clean "
                              "is significant (paired bootstrap interval excludes 0).")
        summary = Table(f"{suite}: degradation summary per perturbation. AUC is the mean level of the metric over "
                        "severities 0–max (trapezoid rule; equals the clean value when nothing degrades); CE is the "
                        "mean error over severities divided by the clean error (1 = no degradation).",
                        ["Perturbation", "Metric", "Clean", "AUC", "Relative AUC", "Worst severity", "Worst value", "CE"])
        for p in perts:
            for key in keys:
                m = rob.get(p, {}).get("metrics", {}).get(key)
                if m:
                    summary.rows.append(Row([p, label(key), fmt(m.get("clean")), fmt(m.get("auc")),
                                             fmt(m.get("relative_auc")), fmt(m.get("worst_severity")),
                                             fmt(m.get("worst_value")), fmt(m.get("ce"), 2)]))
        views.append(SuiteView(suite, fig, summary))
    return views


def mce_table(r: dict[str, Any], keys: list[str]) -> Table:
    rob = r.get("robustness", {})
    t = Table("Mean corruption error (mCE) per suite and overall, normalised by the model's own clean error "
              "(1 = no degradation; 2 = the error doubles on average). Mean error increase is the absolute "
              "change, defined even when the clean error is 0.",
              ["Suite", "Metric", "mCE", "Mean error increase", "Perturbations"])
    for suite, metrics in sorted(rob.get("suites", {}).items()):
        for k in keys:
            if k in metrics:
                m = metrics[k]
                t.rows.append(Row([suite, label(k), fmt(m.get("mce"), 2), fmt(m.get("mean_error_increase")),
                                   fmt(m.get("n_perturbations"))]))
    for k in keys:
        m = rob.get("mce", {}).get(k)
        if m:
            t.rows.append(Row(["all suites", label(k), fmt(m.get("value"), 2), fmt(m.get("mean_error_increase")),
                               fmt(m.get("n_perturbations"))], "total"))
    return t


def robustness_table(r: dict[str, Any], keys: list[str], confidence: str) -> Table:
    t = Table(f"Metrics per scenario with {confidence} bootstrap CIs; ▼ marks a drop from clean whose paired "
              "CI excludes 0 (significant).", ["Scenario"] + [label(k) for k in keys])
    for s in r["scenarios"]:
        cells, flagged = [s["id"]], False
        for k in keys:
            text = fmt_ci(s["metrics"].get(k))
            drop = s.get("drop", {}).get(k)
            if drop and drop.get("significant") and (drop.get("value") or 0) > 0:
                text += " ▼"
                flagged = True
            cells.append(text)
        t.rows.append(Row(cells, "drop" if flagged else ""))
    return t


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def reliability_figure(r: dict[str, Any], worst: int = 3) -> Figure | None:
    clean = _clean(r)
    if not clean or "reliability" not in clean.get("curves", {}):
        return None
    scored = [s for s in _perturbed(r) if "reliability" in s.get("curves", {}) and _value(s["metrics"].get("ece")) is not None]
    # the worst scenario of each perturbation, then the worst perturbations: three severities of
    # one perturbation would say less than three different failure modes
    by_pert: dict[str, dict[str, Any]] = {}
    for s in sorted(scored, key=lambda s: (-s["metrics"]["ece"]["value"], s["id"])):
        by_pert.setdefault(s["perturbation"], s)
    chosen = sorted(by_pert.values(), key=lambda s: (-s["metrics"]["ece"]["value"], s["id"]))[:worst]
    curves = [(f"clean (ECE {fmt(_value(clean['metrics'].get('ece')))})", clean["curves"]["reliability"]["bins"])]
    curves += [(f"{s['id']} (ECE {fmt(s['metrics']['ece']['value'])})", s["curves"]["reliability"]["bins"]) for s in chosen]
    kind = clean["curves"]["reliability"].get("kind", "top-label")
    alt = ("Reliability diagram (" + kind + "): bin accuracy against bin confidence for "
           + ", ".join(c[0] for c in curves) + "; the dotted diagonal is perfect calibration.")
    svg = figures.reliability(curves, "reliability", alt)
    return Figure(svg, f"Reliability diagram ({kind}) of clean data and of the {len(chosen)} perturbations with the "
                       "highest ECE, each at its worst severity. Points below the diagonal are over-confident; marker area is proportional to "
                       "the number of samples in the bin.")


def temperature_table(r: dict[str, Any]) -> tuple[Table, str]:
    ts = r.get("calibration", {}).get("temperature_scaling") or {}
    t = Table("Temperature scaling: calibration before and after dividing the logits by the temperature fitted on "
              "clean data (clean row: cross-fitted, so no sample is calibrated by a temperature fitted on itself).",
              ["Scenario", "ECE before", "ECE after", "NLL before", "NLL after", "Cross-fitted"])
    for sid, row in ts.get("scenarios", {}).items():
        t.rows.append(Row([sid, fmt(row.get("ece_before")), fmt(row.get("ece_after")), fmt(row.get("nll_before")),
                           fmt(row.get("nll_after")), fmt(bool(row.get("cross_fitted")))]))
    temp = ts.get("temperature")
    if isinstance(temp, list):
        temp_text = ", ".join(fmt(x) for x in temp)
    else:
        temp_text = fmt(temp)
    method = f"{ts['method'][:1].upper()}{ts['method'][1:]}. Fitted temperature T = {temp_text}." if ts else ""
    return t, method


# --------------------------------------------------------------------------------------------
# OOD and subgroups
# --------------------------------------------------------------------------------------------


def ood_views(r: dict[str, Any], confidence: str) -> tuple[Table, Figure | None, Table]:
    dets = detectors(r)
    t = Table(f"Shift detection per scenario and detector: how well each detector's score separates the perturbed "
              f"samples from clean ones ({confidence} CIs). AUROC 0.5 is chance; FPR@95%TPR is the share of clean "
              "samples flagged when 95% of shifted ones are (lower is better).",
              ["Scenario", "Detector"] + [h for _, h in OOD_STATS])
    for s in r["scenarios"]:
        for det in sorted(s.get("ood", {})):
            stats = s["ood"][det]
            t.rows.append(Row([s["id"], det] + [fmt_ci(stats.get(k)) for k, _ in OOD_STATS]))
    fig = None
    if dets:
        panels = []
        for suite in sorted({s.get("suite") or "other" for s in _perturbed(r)}):
            series = []
            for det in dets:
                by_sev: dict[int, list[float]] = defaultdict(list)
                for s in _perturbed(r):
                    v = s.get("ood", {}).get(det, {}).get("auroc", {}).get("value")
                    if (s.get("suite") or "other") == suite and v is not None:
                        by_sev[s["severity"]].append(v)
                if by_sev:
                    sev = sorted(by_sev)
                    series.append(figures.Series(det, sev, [sum(by_sev[k]) / len(by_sev[k]) for k in sev]))
            if series:
                panels.append((suite, "AUROC (mean over perturbations)", series))
        if panels:
            alt = ("Shift-detection AUROC against severity per detector (" + ", ".join(dets) + "), one panel per suite ("
                   + ", ".join(p[0] for p in panels) + "), averaged over the suite's perturbations.")
            fig = Figure(figures.degradation(panels, "ood", alt, [True] * len(panels), xlabel="severity", chance=0.5),
                         "Detector AUROC against severity, averaged over each suite's perturbations; the dotted line is chance "
                         "(0.5). results.json keeps "
                         "no per-sample scores, so ROC curves cannot be drawn from it; this summary replaces them "
                         "(run with --save-predictions to keep the scores).")
    fd_keys = sorted({k for s in r["scenarios"] for k in s.get("failure_detection", {})})
    fd = Table(f"Failure detection: AUROC of each detector's score at separating the model's wrong predictions from its correct "
               f"ones, per scenario ({confidence} CIs; higher is better).", ["Scenario"] + [label(k) for k in fd_keys])
    for s in r["scenarios"]:
        if s.get("failure_detection"):
            fd.rows.append(Row([s["id"]] + [fmt_ci(s["failure_detection"].get(k)) for k in fd_keys]))
    return t, fig, fd


def subgroup_views(r: dict[str, Any], primary: str | None, confidence: str) -> tuple[list[Figure], Table, list[str]]:
    figs: list[Figure] = []
    notes: list[str] = []
    rows = r.get("subgroups", [])
    gaps_all = r.get("analyses", {}).get("subgroup_gaps", []) or []
    metric = primary
    attrs = sorted({g["attribute"] for g in rows if g["scenario"] == "clean"})
    for i, attr in enumerate(attrs):
        groups = [g for g in rows if g["scenario"] == "clean" and g["attribute"] == attr]
        if not metric:
            break
        intervals = []
        for g in groups:
            est = g["metrics"].get(metric) or {}
            if g.get("too_small") or est.get("value") is None:
                continue
            intervals.append(figures.Interval(f"{g['group']} (n={g['n']})", est.get("value"), est.get("ci_low"),
                                              est.get("ci_high")))
        if not intervals:
            continue
        clean = _clean(r)
        ref = _value(clean["metrics"].get(metric)) if clean else None
        alt = (f"Forest plot of {label(metric)} per {attr} group on clean data with {confidence} confidence intervals: "
               + "; ".join(f"{iv.label} {fmt(iv.value)}" for iv in intervals) + ".")
        figs.append(Figure(figures.forest(intervals, f"{label(metric)} (clean data)", f"forest-{i}", alt, ref),
                           f"{label(metric).capitalize()} per {attr} group on clean data with {confidence} bootstrap "
                           "CIs; the dashed line is the whole test set."))
    for g in rows:
        if g.get("too_small"):
            notes.append(f"{g['attribute']} = {g['group']} ({g['scenario']}): {g['n']} samples, below "
                         "subgroups.min_group_size; no metrics or tests reported for it.")
    t = Table("Subgroup gaps: best minus worst group (oriented so positive is worse), its bootstrap CI, and a "
              "permutation test p-value, adjusted for multiple comparisons; significant means the adjusted "
              "p-value is below alpha.",
              ["Scenario", "Attribute", "Metric", "Gap [CI]", "Worst group", "Worst value", "Ratio", "p", "p adjusted",
               "Significant"])
    # the headline metrics, plus every significant gap whatever its metric: the full list (all
    # metrics × attributes × scenarios) is in results.json and would bury the signal
    headline = set(r.get("analyses", {}).get("subgroup_settings", {}).get("headline_metrics") or [])
    headline |= {k for k in (primary, "ece") if k}
    shown = [g for g in gaps_all if g.get("metric") in headline or g.get("significant")]
    for g in sorted(shown, key=lambda g: (g.get("scenario", "clean") != "clean", g.get("scenario", ""),
                                          g["attribute"], g["metric"])):
        t.rows.append(Row([g.get("scenario", "clean"), g["attribute"], label(g["metric"]), fmt_ci(g.get("gap")),
                           str(g.get("worst_group", "–")), fmt(g.get("worst_value")), fmt(g.get("ratio")),
                           fmt_p(g.get("p_value")), fmt_p(g.get("p_adjusted")), fmt(bool(g.get("significant")))],
                          "drop" if g.get("significant") else ""))
    if len(shown) < len(gaps_all):
        notes_hidden = len(gaps_all) - len(shown)
        t.caption += (f" Shown: the headline metrics ({', '.join(label(k) for k in sorted(headline))}) and every "
                      f"significant gap; {notes_hidden} further non-significant gaps are listed in results.json "
                      "(analyses.subgroup_gaps).")
    return figs, t, notes


# --------------------------------------------------------------------------------------------
# Limitations, appendix
# --------------------------------------------------------------------------------------------


def derived_notes(r: dict[str, Any]) -> list[str]:
    """Limitations that follow from the results themselves (beyond the run's recorded warnings)."""
    notes: list[str] = []
    cfg = r.get("config", {})
    audit = cfg.get("audit", {})
    if audit.get("bootstrap") == 0:
        notes.append("Bootstrap was off (audit.bootstrap: 0): no confidence intervals, and no drop can be called "
                     "significant.")
    small = [s["id"] for s in r["scenarios"] if s["n_samples"] < 30]
    if small:
        notes.append(f"Fewer than 30 samples in {', '.join(small)}: intervals are wide and unreliable.")
    rare = [f"{k} ({v})" for k, v in r["dataset"]["class_counts"].items() if v < 10]
    if rare:
        notes.append("Classes with fewer than 10 samples: " + ", ".join(rare) + "; per-class metrics are unreliable.")
    for col, counts in r["dataset"].get("metadata_summary", {}).items():
        if counts.get(MISSING):
            notes.append(f"Metadata column {col} is missing for {counts[MISSING]} of {r['dataset']['n_samples']} samples.")
    configured = cfg.get("subgroups", {}).get("attributes", []) or []
    absent = [a for a in configured if a not in r["dataset"]["metadata_columns"]]
    if absent:
        notes.append("Subgroup attributes configured but absent from the data's metadata: " + ", ".join(absent) + ".")
    if configured and not r.get("subgroups"):
        notes.append("Subgroups were configured but no subgroup results were recorded (is the subgroups plugin "
                     "installed?).")
    wanted = audit.get("detectors")
    ran = set(detectors(r))
    if wanted:
        missing = [d for d in wanted if d not in ran]
        if missing:
            notes.append("Configured OOD detectors that produced no results: " + ", ".join(missing) + ".")
    elif not ran:
        notes.append("No OOD or shift detector produced results; the OOD section is empty.")
    skipped = sorted({m.group(1) for w in r["warnings"] if (m := _DETECTOR_SKIPPED.match(w))})
    if skipped:
        notes.append("OOD detectors that could not run (reasons in the warnings above): " + ", ".join(skipped) + ".")
    failed = [w[len(PLUGIN_FAILURE):].split(" (from", 1)[0].strip('"') for w in r["warnings"] if w.startswith(PLUGIN_FAILURE)]
    if failed:
        notes.append("Plugins that failed to load (their perturbations, metrics, detectors or analyses are absent "
                     "from this report): " + ", ".join(failed) + ".")
    errored = [c["expr"] for c in r.get("checks", []) if c.get("error")]
    if errored:
        notes.append("Checks whose value was undefined (counted as failed): " + ", ".join(errored) + ".")
    notes.append("The perturbations are simulations of acquisition changes on this test set; robustness to them "
                 "does not establish performance on real data from other sites, scanners or populations.")
    return notes


def throughput_table(r: dict[str, Any]) -> Table:
    t = Table("Throughput per scenario: samples per second of the forward passes (including the perturbation).",
              ["Scenario", "Samples", "Samples/s"])
    for s in r["scenarios"]:
        t.rows.append(Row([s["id"], str(s["n_samples"]), fmt(s.get("throughput"), 0)]))
    return t


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def _render_sections(r: dict[str, Any], sections: list[tuple[str, ReportSection]],
                     problems: list[str]) -> list[dict[str, str]]:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    rendered = []
    for plugin, sec in sorted(sections, key=lambda ps: (ps[1].order, ps[1].id)):
        try:
            html = env.from_string(sec.template).render(results=r, fmt=fmt, fmt_ci=fmt_ci, **sec.context)
        except Exception as exc:  # a broken plugin template must not take the report down
            problems.append(f'report section "{sec.id}" of plugin "{plugin}" could not be rendered '
                            f'({type(exc).__name__}: {exc}); it is left out')
            continue
        rendered.append({"id": sec.id, "title": sec.title, "html": html})
    return rendered


def build_view(results: Results, sections: list[tuple[str, ReportSection]] | None = None,
               problems: list[str] | None = None) -> ReportView:
    r = results.model_dump(mode="json")
    verdict = "no checks configured" if not r["checks"] else (
        "PASS" if all(c["passed"] for c in r["checks"]) else "FAIL")
    conf = r.get("config", {}).get("audit", {}).get("confidence", 0.95)
    confidence = f"{100 * conf:g}%"
    keys = headline_keys(r)
    primary = primary_metric(r)
    clean_metrics = _clean(r)["metrics"] if _clean(r) else {}
    cal_keys = [k for k in CALIBRATION_METRICS if k in clean_metrics and k != "classwise_ece"]
    calibration = Table(f"Calibration per scenario with {confidence} bootstrap CIs (lower is better).",
                        ["Scenario"] + [label(k) for k in cal_keys])
    for s in r["scenarios"]:
        calibration.rows.append(Row([s["id"]] + [fmt_ci(s["metrics"].get(k)) for k in cal_keys]))
    temperature, temperature_method = temperature_table(r)
    ood, ood_figure, failure = ood_views(r, confidence)
    sub_figs, sub_gaps, sub_notes = subgroup_views(r, primary, confidence)
    metadata_tables, metadata_notes = metadata_views(r)
    problems = list(problems or [])
    rendered = _render_sections(r, sections or [], problems)
    m = r["model"]
    return ReportView(
        title=f"medaudit report: {m.get('name') or m['path']}", results=r, verdict=verdict, findings=findings(r),
        checks=checks_table(r), identity=identity_rows(r), metadata_tables=metadata_tables,
        metadata_notes=metadata_notes, catalogue=r["perturbation_catalogue"],
        preview_png=r["assets"].get("preview_png"), params=params_table(r), primary=primary,
        suites=suite_views(r, primary, confidence), mce=mce_table(r, [k for k in (primary, "ece") if k]),
        robustness=robustness_table(r, keys, confidence), reliability=reliability_figure(r),
        calibration=calibration, temperature=temperature, temperature_method=temperature_method,
        ood=ood, ood_figure=ood_figure, failure=failure, subgroup_figures=sub_figs, subgroup_gaps=sub_gaps,
        subgroup_notes=sub_notes, warnings=r["warnings"] + problems, derived_notes=derived_notes(r),
        metric_keys=sorted({key.split("/")[0] for key in clean_metrics}), throughput=throughput_table(r), confidence=confidence, sections=rendered,
    )


def template_env() -> jinja2.Environment:
    root = resources.files("medaudit.templates")
    loader = jinja2.FunctionLoader(lambda name: (root / name).read_text(encoding="utf-8"))
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(fmt=fmt, fmt_ci=fmt_ci)
    return env


def stylesheet() -> str:
    return (resources.files("medaudit.templates") / "report.css").read_text(encoding="utf-8")


def render_report(results: Results, pm: PluginManager | None = None) -> str:
    """Render the report; a plugin section that fails is left out and named in the limitations."""
    sections: list[tuple[str, ReportSection]] = []
    problems: list[str] = []
    if pm is not None:
        data = results.model_dump(mode="json")
        for plugin, secs in pm.call_each("medaudit_report_sections", on_error=problems.append, results=data):
            sections.extend((plugin, sec) for sec in secs)
    view = build_view(results, sections, problems)
    return template_env().get_template("report.html").render(v=view, css=stylesheet())
