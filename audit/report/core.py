"""The core sections' views: identity, perturbation catalogue, robustness, checks, throughput.

Metric keys come from the results' own display declarations (:func:`~.views.metric_info`), never
from a list of built-in names: a plugin metric declared headline is shown like a built-in one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..data import MISSING_VALUE
from .views import (Figure, Row, Series, Table, clean_scenario, degradation, fmt, fmt_metric, label, metric_info,
                    perturbed_scenarios)


def checks_table(r: dict[str, Any]) -> Table:
    t = Table("Configured checks (--fail-on). Each expression states the failure condition: the check "
              "fails when it holds for the measured value. Scenario: the one whose value decided the check (for a "
              "wildcard, the worst).", ["Check", "Scenario", "Measured value", "Threshold", "Result", "Note"])
    for c in r["checks"]:
        t.rows.append(Row([c["expr"], c.get("scenario") or "–", fmt(c["value"], 4), fmt(c.get("threshold"), 4),
                           "pass" if c["passed"] else "FAIL", c.get("error") or ""], "" if c["passed"] else "fail"))
    return t


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
            t.rows.append(Row([value, str(c), f"{100 * c / n:.1f}%" if n else "–"], "warn" if value == MISSING_VALUE else ""))
        listed = sum(counts.values())
        if listed < n:
            t.rows.append(Row(["(other values)", str(n - listed), f"{100 * (n - listed) / n:.1f}%"]))
        tables.append(t)
    return tables, notes


def params_table(r: dict[str, Any]) -> Table:
    """One row per (perturbation, parameter), one column per audited severity: mean (min – max)."""
    severities = sorted({s["severity"] for s in perturbed_scenarios(r)})
    t = Table("Parameters actually sampled per scenario (random perturbations draw per sample within the "
              "severity's range): mean over the samples, with the minimum and maximum in parentheses.",
              ["Perturbation", "Parameter"] + [f"Severity {k}" for k in severities])
    cells: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    for s in perturbed_scenarios(r):
        for name, p in s.get("params", {}).items():
            cells[(s["perturbation"], name)][s["severity"]] = (
                fmt(p["mean"], 3) if p["min"] == p["max"] else f"{fmt(p['mean'], 3)} ({fmt(p['min'], 3)} – {fmt(p['max'], 3)})")
    for (pert, name), by_sev in sorted(cells.items()):
        t.rows.append(Row([pert, name] + [by_sev.get(k, "–") for k in severities]))
    return t


def _series(r: dict[str, Any], pert: str, key: str) -> Series | None:
    clean = clean_scenario(r)
    scs = sorted((s for s in r["scenarios"] if s.get("perturbation") == pert), key=lambda s: s["severity"])
    if not clean or key not in clean["metrics"] or not scs:
        return None
    pts = [clean] + scs
    ests = [s["metrics"].get(key) or {} for s in pts]
    return Series(
        label=pert, x=[0] + [s["severity"] for s in scs], y=[e.get("value") for e in ests],
        low=[e.get("ci_low") for e in ests], high=[e.get("ci_high") for e in ests],
        marked=[False] + [bool(s.get("drop", {}).get(key, {}).get("significant")) for s in scs])


@dataclass
class SuiteView:
    name: str
    figure: Figure | None
    summary: Table


def suite_views(r: dict[str, Any], keys: list[str], confidence: str) -> list[SuiteView]:
    """Per suite: degradation curves of ``keys`` (the metric families' lead keys) and their summary."""
    info = metric_info(r)
    rob = r.get("robustness", {}).get("perturbations", {})
    by_suite: dict[str, list[str]] = defaultdict(list)
    for s in perturbed_scenarios(r):
        if s["perturbation"] not in by_suite[s.get("suite") or "other"]:
            by_suite[s.get("suite") or "other"].append(s["perturbation"])
    directions = r.get("metric_directions", {})
    views = []
    for suite in sorted(by_suite):
        perts = sorted(by_suite[suite])
        panels, drawn = [], []
        for key in keys:
            series = [s for s in (_series(r, p, key) for p in perts) if s is not None]
            if series:
                panels.append((label(key), label(key), series))
                drawn.append(key)
        fig = None
        if panels:
            alt = (f"Degradation curves of the {suite} suite: " + " and ".join(p[0] for p in panels)
                   + " against severity 0 (clean) to 5 for " + ", ".join(perts) + ".")
            svg = degradation(panels, f"deg-{suite}", alt, [directions.get(k, True) for k in drawn])
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
                    summary.rows.append(Row([p, label(key), fmt_metric(m.get("clean"), info.get(key)),
                                             fmt_metric(m.get("auc"), info.get(key)), fmt(m.get("relative_auc")),
                                             fmt(m.get("worst_severity")), fmt_metric(m.get("worst_value"), info.get(key)),
                                             fmt(m.get("ce"), 2)]))
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
    info = metric_info(r)
    t = Table(f"Metrics per scenario with {confidence} bootstrap CIs; ▼ marks a drop from clean whose paired "
              "CI excludes 0 (significant).", ["Scenario"] + [label(k) for k in keys])
    for s in r["scenarios"]:
        cells, flagged = [s["id"]], False
        for k in keys:
            text = fmt_metric(s["metrics"].get(k), info.get(k))
            drop = s.get("drop", {}).get(k)
            if drop and drop.get("significant") and (drop.get("value") or 0) > 0:
                text += " ▼"
                flagged = True
            cells.append(text)
        t.rows.append(Row(cells, "drop" if flagged else ""))
    return t


def throughput_table(r: dict[str, Any]) -> Table:
    t = Table("Throughput per scenario: samples per second of the forward passes (including the perturbation).",
              ["Scenario", "Samples", "Samples/s"])
    for s in r["scenarios"]:
        t.rows.append(Row([s["id"], str(s["n_samples"]), fmt(s.get("throughput"), 0)]))
    return t
