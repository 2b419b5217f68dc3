"""The core sections' views: identity, perturbation catalogue, robustness, checks, throughput.

Metric keys come from the results' own display declarations (:func:`~.views.metric_info`), never
from a list of built-in names: a plugin metric declared headline is shown like a built-in one.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import MISSING_VALUE
from .views import (Figure, Row, Series, Table, clean_scenario, degradation, estimate_columns, estimate_values, fmt,
                    fmt_metric, label, metric_info, perturbed_scenarios)


def checks_table(r: dict[str, Any]) -> Table:
    t = Table("Configured checks (--fail-on). Each expression states the failure condition: the check "
              "fails when it holds for the measured value. Scenario: the one whose value decided the check (for a "
              "wildcard, the worst).", ["Check", "Scenario", "Measured value", "Threshold", "Result", "Note"])
    for c in r["checks"]:
        t.rows.append(Row([c["expr"], c.get("scenario") or "–", fmt(c["value"], 4), fmt(c.get("threshold"), 4),
                           "pass" if c["passed"] else "FAIL", c.get("error") or ""], "" if c["passed"] else "fail"))
    return t


def scope_text(r: dict[str, Any]) -> str:
    """The audit's scope with one scenario count, as the console states it: every scenario in
    results.json (clean, perturbed, external OOD sets), then the breakdown."""
    scenarios = r["scenarios"]
    perturbed = perturbed_scenarios(r)
    external = [s for s in scenarios if s["id"].startswith("ood:")]
    perts = sorted({s["perturbation"] for s in perturbed})
    severities = sorted({s["severity"] for s in perturbed})
    parts = ["clean"]
    if perts:
        parts.append(f"{len(perturbed)} perturbed ({len(perts)} perturbation{'s' if len(perts) != 1 else ''} × "
                     f"severities {', '.join(map(str, severities))})")
    if external:
        parts.append(f"{len(external)} external OOD set{'s' if len(external) != 1 else ''}")
    return f"{len(scenarios)} scenarios: " + ", ".join(parts)


def _probes(p: dict[str, Any]) -> str:
    """An encoder audit's probes (results.json ``model.probe``): what every metric of the report was read through."""
    lin, knn, ref = p.get("linear", {}), p.get("knn", {}), p.get("reference", {})
    return (f"every metric is the linear probe's (logistic regression, C = {lin.get('C')}, {lin.get('scaling')}; "
            f"{'converged' if lin.get('converged') else 'NOT converged'} in {lin.get('n_iter')} iterations), the k-NN "
            f"probe's are knn_probe/… (k = {knn.get('k')}, {knn.get('metric')}); fitted on the --reference set of "
            f"{ref.get('n_samples')} samples, SHA-256 {str(ref.get('sha256'))[:12]}…")


def executor_rows(info: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Who ran the units of work (results.json ``environment.executor``): one row for this process;
    for Ray the cluster it used, and the units' times as its workers measured them."""
    if not info:
        return []
    if info.get("executor") != "ray":
        return [("Executor", f"{info.get('executor', 'local')} (every unit of work in this process)")]
    def n(count: float, noun: str) -> str:
        return f"{count:g} {noun}{'' if count == 1 else 's'}"

    gpus = sorted({f"{p['node'][:8]}:{g}" for p in info.get("worker_processes", []) for g in p.get("gpus", [])})
    rows = [("Executor", f"Ray {info.get('ray', '')} at {info.get('address')}: {n(info.get('workers', 0), 'worker')} "
                         f"on {n(info.get('nodes', 0), 'node')}, each {n(info.get('cpus_per_worker', 0), 'CPU')} "
                         f"and {n(info.get('gpus_per_worker', 0), 'GPU')} ({n(info.get('cpus', 0), 'CPU')} and "
                         f"{n(info.get('gpus', 0), 'GPU')} in all" + (f": {', '.join(gpus)}" if gpus else "") + ")")]
    units = info.get("units") or []
    if units:
        seconds = sorted(u["seconds"] for u in units)
        rerun = info.get("units_rerun", 0)
        rows.append(("Units of work", f"{n(len(units), 'unit')} run, {rerun} re-run after losing a worker; "
                                      f"{seconds[0]:.1f}–{seconds[-1]:.1f} s per unit, median "
                                      f"{statistics.median(u['forward_per_s'] for u in units):,.0f} forward passes/s per worker (measured in the "
                                      "workers; a worker's first unit includes loading the model and data)"))
    return rows


def identity_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    m, d, e = r["model"], r["dataset"], r["environment"]
    identity = [
        ("Model file", m["path"]), ("Model SHA-256", m["sha256"]), ("Model format", m["format"]),
        ("Parameters", f"{m['num_parameters']:,}"), ("Architecture", m["summary"]), ("Output", m["output_kind"]),
        ("Task", f"{m['task']}: {', '.join(m['classes'])}"),
        *([("Feature layer", (m.get("feature_layer") or "none") + (f" — {m['feature_layer_note']}"
                                                                     if m.get("feature_layer_note") else ""))]
          if "feature_layer" in m else []),
        *([("Feature stages", ", ".join(m["feature_layers"]) + (f" — {m['feature_layers_note']}"
                                                                 if m.get("feature_layers_note") else ""))]
          if m.get("feature_layers") else []),
        *([("Output key", str(m["output_key"]))] if m.get("output_key") is not None else []),
        *([("Token layers", "; ".join(f"{layer}: {t['prefix']} prefix token(s) ({'CLS' if t['cls'] else 'no CLS'}, "
                                      f"{t['registers']} register(s)), vectors by {t['pooling']} pooling — {t['source']}"
                                      for layer, t in m["tokens"].items()))] if m.get("tokens") else []),
        *([("Probes", _probes(m["probe"]))] if m.get("probe") else []),
        ("Dataset", d["path"]), ("Dataset SHA-256", d["sha256"]), ("Dataset format", d.get("format") or "–"),
        ("Samples", str(d["n_samples"])),
        ("Class counts", ", ".join(f"{k}: {v}" for k, v in d["class_counts"].items())),
        ("Metadata columns", ", ".join(d["metadata_columns"]) or "none"),
        ("medaudit", r["medaudit_version"]), ("Python / torch", f"{e['python']} / {e['torch']}"),
        ("Platform", e.get("platform") or "–"),
        ("Device", f"{e['device']} ({e['device_name']})"
                   + (f", {e['threads']} CPU thread{'s' if e['threads'] != 1 else ''}" if e.get("threads") else "")),
        *([("Thread choice", e["threads_reason"])] if e.get("threads_reason") else []),
        *executor_rows(e.get("executor")),
        ("Precision", e["precision"] + (", channels-last memory format" if e.get("memory_format") == "channels_last" else "")),
        ("Seed", str(r["seed"])),
        *([("Protocol", protocol_text(r) or "")] if r.get("protocol") else []),
        *([("Model card", f"{model_card_link(r)} (Model Card Toolkit schema 0.0.2)")] if model_card_link(r) else []),
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


def protocol_text(r: dict[str, Any]) -> str | None:
    """The frozen protocol the audit ran under and whether it conformed (results.json ``protocol``)."""
    p = r.get("protocol")
    if not p:
        return None
    text = f"{p['name']} (version {p['version']}, SHA-256 {p['sha256']})"
    if p.get("conformant", True):
        return text + " — conformant: every pinned setting as the protocol fixes it"
    return (text + " — NOT protocol-conformant (--protocol-override): overridden " + "; ".join(p.get("overrides", []))
            + ". Its numbers are not comparable with conformant audits under this protocol.")


def model_card_link(r: dict[str, Any]) -> str | None:
    """The model card's path relative to the report (``--model-card``), or None."""
    out = r.get("config", {}).get("output", {})
    card = out.get("model_card")
    if not card:
        return None
    return Path(os.path.relpath(Path(card).resolve(), Path(out.get("dir") or ".").resolve())).as_posix()


#: The literature scores in results.json ``robustness`` (:mod:`medaudit.scores`), as the report names them.
SCORE_LABELS = {"mce_vs_baseline": "mCE vs baseline (ImageNet-C)",
                "relative_mce_vs_baseline": "relative mCE vs baseline (ImageNet-C)",
                "be": "BE (MedMNIST-C)", "rbe": "rBE (MedMNIST-C)", "rood_degradation": "degradation (ROOD-MRI)"}


def scores_table(r: dict[str, Any], confidence: str) -> tuple[Table, list[str]]:
    """Comparable robustness scores, each as its paper defines it, with intervals
    (docs/robustness-scores.md); and one note per reason a group of them was not computed."""
    rob = r.get("robustness", {})
    t = Table("Comparable robustness scores, each computed as its paper defines it (docs/robustness-scores.md), with "
              f"{confidence} bootstrap intervals. The ImageNet-C and MedMNIST-C scores are ratios to a baseline model's "
              "audit (--baseline; 1 = as robust as the baseline, lower is better); the ROOD-MRI degradation is the "
              "severity-weighted drop (weights (2/3)^s) in the metric's units, positive = worse.",
              ["Score", "Metric", "Value", "Interval", "Perturbations", "Note"], name="scores",
              columns=["score", "metric", "value", "ci_low", "ci_high", "perturbations", "note"])
    entries = [(k, rob[k]) for k in ("mce_vs_baseline", "relative_mce_vs_baseline", "be", "rbe") if k in rob]
    entries += [("rood_degradation", e) for _, e in sorted((rob.get("rood_degradation") or {}).items())]
    missing: dict[str, list[str]] = {}
    for score, e in entries:
        if e.get("value") is None and e.get("n_perturbations", 0) == 0 and e.get("reason"):
            missing.setdefault(e["reason"], []).append(SCORE_LABELS[score])  # never computed: one note, not rows
            continue
        note = e.get("reason") or "; ".join(e.get("warnings") or [])
        if e.get("left_out"):
            note = (note + "; " if note else "") + f"{len(e['left_out'])} scenario(s) not shared with the baseline left out"
        t.rows.append(Row([SCORE_LABELS[score], label(e.get("metric") or ""), fmt(e.get("value"), 3),
                           f"[{fmt(e.get('ci_low'), 3)}, {fmt(e.get('ci_high'), 3)}]", fmt(e.get("n_perturbations")),
                           note], values=[score, e.get("metric"), e.get("value"), e.get("ci_low"), e.get("ci_high"),
                                          e.get("n_perturbations"), note]))
    return t, [f"Not computed — {', '.join(names)}: {reason}." for reason, names in missing.items()]


def metadata_views(r: dict[str, Any]) -> tuple[Table, list[Table], list[str]]:
    """The numeric columns' quartiles (one table, full width), sample counts per value of every
    other column, and notes on identifier-like columns."""
    tables, notes = [], []
    n = r["dataset"]["n_samples"]
    numeric = r["dataset"].get("metadata_numeric", {})
    quartiles = Table("Numeric metadata columns (more than 10 distinct values): distribution over the samples.",
                      ["Column", "Samples", "Missing", "Mean", "Min", "Q1", "Median", "Q3", "Max"])
    for col, st in sorted(numeric.items()):
        quartiles.rows.append(Row([col, str(int(st["n"])), str(int(st["missing"]))]
                                  + [f"{st[k]:.4g}" for k in ("mean", "min", "q1", "median", "q3", "max")],
                                  "warn" if st["missing"] else ""))
    for col, counts in r["dataset"].get("metadata_summary", {}).items():
        if col in numeric:
            continue
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
    return quartiles, tables, notes


@dataclass
class HeatCell:
    """One cell of the robustness heat map: the drop as text, its fill, and what it means."""

    text: str
    background: str = "#ffffff"
    color: str = "#1b1b1b"
    mark: str = ""  # "", "significant" or "breaking"


@dataclass
class HeatRow:
    label: str
    stress_test: bool
    cells: list[HeatCell]


@dataclass
class HeatMap:
    metric: str
    severities: list[int]
    rows: list[HeatRow]
    caption: str


def _blend(t: float) -> str:
    """White → Okabe-Ito vermillion (#D55E00) at ``t`` in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    rgb = [round(255 + (c - 255) * t) for c in (0xD5, 0x5E, 0x00)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def stress_tests(r: dict[str, Any]) -> set[str]:
    """The audited perturbations that are stress tests for the audited modality."""
    return {name for name, e in r.get("robustness", {}).get("breaking_points", {}).items() if e.get("stress_test")}


def heat_map(r: dict[str, Any], key: str | None) -> HeatMap | None:
    """Perturbation × severity, each cell the paired drop of ``key`` from clean, filled by the size
    of significant drops; cells past the breaking point (drop significantly beyond the margin) are marked."""
    if key is None or not perturbed_scenarios(r):
        return None
    info = metric_info(r).get(key)
    points = r.get("robustness", {}).get("breaking_points", {})
    severities = sorted({s["severity"] for s in perturbed_scenarios(r)})
    drops: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for s in perturbed_scenarios(r):
        d = s.get("drop", {}).get(key)
        if d:
            drops[s["perturbation"]][s["severity"]] = d
    if not drops:
        return None
    scale = max((d["value"] for by in drops.values() for d in by.values()
                 if d.get("significant") and (d.get("value") or 0) > 0), default=0.0)
    stress = stress_tests(r)
    rows = []
    for pert in sorted(drops, key=lambda p: (p in stress, p)):
        broken = (points.get(pert, {}).get("metrics", {}).get(key) or {}).get("severity")
        cells = []
        for k in severities:
            d = drops[pert].get(k)
            if d is None or d.get("value") is None:
                cells.append(HeatCell("–"))
                continue
            text = fmt_metric(d["value"], info)
            if d.get("significant") and d["value"] > 0 and scale > 0:
                t = 0.15 + 0.85 * d["value"] / scale
                mark = "breaking" if broken is not None and k >= broken else "significant"
                cells.append(HeatCell(text, _blend(t), "#ffffff" if t > 0.85 else "#1b1b1b", mark))
            else:
                cells.append(HeatCell(text, color="#767676"))
        rows.append(HeatRow(pert, pert in stress, cells))
    margin = next((e["metrics"][key]["margin"] for e in points.values() if key in e.get("metrics", {})), None)
    caption = (f"Robustness heat map: the drop in {label(key)} from clean (positive = worse) per perturbation and "
               "severity. Filled cells: the drop is significant (paired bootstrap interval excludes 0), darker = "
               "larger; bold cells with ✕: past the breaking point, the drop significantly exceeds the margin"
               + (f" of {fmt(margin, 3)}" if margin is not None else "")
               + " (verdict.margins). Grey: no significant drop. Stress tests (not realistic for this modality) "
               "are listed last and marked.")
    return HeatMap(label(key), severities, rows, caption)


def breaking_table(r: dict[str, Any], keys: list[str]) -> Table:
    """Per perturbation: the breaking severity of each lead metric, and its worst drop."""
    points = r.get("robustness", {}).get("breaking_points", {})
    shown = [k for k in keys if any(k in e.get("metrics", {}) for e in points.values())]
    margins = {k: next(e["metrics"][k]["margin"] for e in points.values() if k in e.get("metrics", {})) for k in shown}
    t = Table("Breaking points: the lowest severity at which the drop from clean significantly exceeds the "
              "metric's margin (" + ", ".join(f"{label(k)} {fmt(m, 3)}" for k, m in margins.items())
              + "; verdict.margins), and the largest drop over the audited severities. “–”: the perturbation does "
              "not break the metric at any audited severity.",
              ["Perturbation", "Kind"] + [f"{label(k)}: breaks at" for k in shown] + [f"{label(k)}: worst drop" for k in shown],
              name="breaking-points",
              columns=["perturbation", "stress_test"] + [f"{k}_breaking_severity" for k in shown]
              + [f"{k}_worst_drop" for k in shown])
    for pert, e in sorted(points.items(), key=lambda pe: (pe[1].get("stress_test", False), pe[0])):
        ms = e.get("metrics", {})
        sev = [(ms.get(k) or {}).get("severity") for k in shown]
        worst = [(ms.get(k) or {}).get("worst_drop") for k in shown]
        t.rows.append(Row([pert, "stress test" if e.get("stress_test") else "realistic"]
                          + [fmt(v) if v is not None else "–" for v in sev] + [fmt(v) for v in worst],
                          "drop" if any(v is not None for v in sev) else "",
                          [pert, bool(e.get("stress_test"))] + sev + worst))
    return t


def params_table(r: dict[str, Any]) -> Table:
    """One row per (perturbation, parameter), one column per audited severity: mean (min – max)."""
    severities = sorted({s["severity"] for s in perturbed_scenarios(r)})
    t = Table("Parameters actually sampled per scenario (random perturbations draw per sample within the "
              "severity's range): mean over the samples, with the minimum and maximum in parentheses.",
              ["Perturbation", "Parameter"] + [f"Severity {k}" for k in severities], name="parameters",
              columns=["perturbation", "parameter"] + [f"severity_{k}_{stat}" for k in severities
                                                        for stat in ("mean", "min", "max")])
    cells: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for s in perturbed_scenarios(r):
        for name, p in s.get("params", {}).items():
            cells[(s["perturbation"], name)][s["severity"]] = p
    for (pert, name), by_sev in sorted(cells.items()):
        shown = []
        for k in severities:
            p = by_sev.get(k)
            shown.append("–" if p is None else fmt(p["mean"], 3) if p["min"] == p["max"]
                         else f"{fmt(p['mean'], 3)} ({fmt(p['min'], 3)} – {fmt(p['max'], 3)})")
        raw = [(by_sev.get(k) or {}).get(stat) for k in severities for stat in ("mean", "min", "max")]
        t.rows.append(Row([pert, name] + shown, values=[pert, name] + raw))
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


def _suites(r: dict[str, Any]) -> dict[str, list[str]]:
    by_suite: dict[str, list[str]] = defaultdict(list)
    for s in perturbed_scenarios(r):
        if s["perturbation"] not in by_suite[s.get("suite") or "other"]:
            by_suite[s.get("suite") or "other"].append(s["perturbation"])
    return {suite: sorted(by_suite[suite]) for suite in sorted(by_suite)}


def robustness_figure(r: dict[str, Any], key: str | None, confidence: str) -> Figure | None:
    """Degradation curves of ``key`` (the primary metric), one panel per suite."""
    if key is None:
        return None
    panels = []
    for suite, perts in _suites(r).items():
        series = [s for s in (_series(r, p, key) for p in perts) if s is not None]
        if series:
            panels.append((suite, label(key), series))
    if not panels:
        return None
    alt = (f"Degradation curves of {label(key)} against severity 0 (clean) to 5, one panel per suite ("
           + ", ".join(p[0] for p in panels) + ").")
    svg = degradation(panels, "deg", alt, [r.get("metric_directions", {}).get(key, True)] * len(panels))
    return Figure(svg, f"{label(key).capitalize()} against severity per suite, severity 0 = clean. Shaded bands: "
                       f"{confidence} bootstrap confidence intervals. Filled markers with a dark outline: the drop from "
                       "clean is significant (paired bootstrap interval excludes 0). Every other metric's curve is in "
                       "the appendix tables.")


def degradation_table(r: dict[str, Any], keys: list[str]) -> Table:
    """Per perturbation and metric: clean value, AUC, worst severity and value, CE."""
    info = metric_info(r)
    rob = r.get("robustness", {}).get("perturbations", {})
    t = Table("Degradation summary per perturbation. AUC is the mean level of the metric over severities 0–max "
              "(trapezoid rule; equals the clean value when nothing degrades); CE is the mean error over severities "
              "divided by the clean error (1 = no degradation).",
              ["Perturbation", "Suite", "Metric", "Clean", "AUC", "Relative AUC", "Worst severity", "Worst value", "CE"],
              name="degradation",
              columns=["perturbation", "suite", "metric", "clean", "auc", "relative_auc", "worst_severity",
                       "worst_value", "ce", "mean_error_increase"])
    for suite, perts in _suites(r).items():
        for p in perts:
            for key in keys:
                m = rob.get(p, {}).get("metrics", {}).get(key)
                if m:
                    t.rows.append(Row([p, suite, label(key), fmt_metric(m.get("clean"), info.get(key)),
                                       fmt_metric(m.get("auc"), info.get(key)), fmt(m.get("relative_auc")),
                                       fmt(m.get("worst_severity")), fmt_metric(m.get("worst_value"), info.get(key)),
                                       fmt(m.get("ce"), 2)],
                                      values=[p, suite, key, m.get("clean"), m.get("auc"), m.get("relative_auc"),
                                              m.get("worst_severity"), m.get("worst_value"), m.get("ce"),
                                              m.get("mean_error_increase")]))
    return t


def mce_table(r: dict[str, Any], keys: list[str]) -> Table:
    rob = r.get("robustness", {})
    t = Table("Mean corruption error (mCE) per suite and overall, normalised by the model's own clean error "
              "(1 = no degradation; 2 = the error doubles on average). Mean error increase is the absolute "
              "change, defined even when the clean error is 0.",
              ["Suite", "Metric", "mCE", "Mean error increase", "Perturbations"], name="mce",
              columns=["suite", "metric", "mce", "mean_error_increase", "perturbations"])
    for suite, metrics in sorted(rob.get("suites", {}).items()):
        for k in keys:
            if k in metrics:
                m = metrics[k]
                t.rows.append(Row([suite, label(k), fmt(m.get("mce"), 2), fmt(m.get("mean_error_increase")),
                                   fmt(m.get("n_perturbations"))],
                                  values=[suite, k, m.get("mce"), m.get("mean_error_increase"), m.get("n_perturbations")]))
    for k in keys:
        m = rob.get("mce", {}).get(k)
        if m:
            t.rows.append(Row(["all suites", label(k), fmt(m.get("value"), 2), fmt(m.get("mean_error_increase")),
                               fmt(m.get("n_perturbations"))], "total",
                              ["all", k, m.get("value"), m.get("mean_error_increase"), m.get("n_perturbations")]))
    return t


def robustness_table(r: dict[str, Any], keys: list[str], confidence: str) -> Table:
    info = metric_info(r)
    t = Table(f"Metrics per scenario with {confidence} bootstrap CIs; ▼ marks a drop from clean whose paired "
              "CI excludes 0 (significant).", ["Scenario"] + [label(k) for k in keys], name="scenarios",
              columns=["scenario", "perturbation", "severity"]
              + [c for k in keys for c in (*estimate_columns(k), f"{k}_drop", f"{k}_drop_ci_low", f"{k}_drop_ci_high",
                                           f"{k}_drop_significant")])
    for s in r["scenarios"]:
        if not s["metrics"]:  # external OOD sets: no metrics of their own
            continue
        cells, flagged = [s["id"]], False
        values: list[Any] = [s["id"], s.get("perturbation"), s.get("severity")]
        for k in keys:
            text = fmt_metric(s["metrics"].get(k), info.get(k))
            drop = s.get("drop", {}).get(k)
            if drop and drop.get("significant") and (drop.get("value") or 0) > 0:
                text += " ▼"
                flagged = True
            cells.append(text)
            values += estimate_values(s["metrics"].get(k)) + estimate_values(drop) + [(drop or {}).get("significant")]
        t.rows.append(Row(cells, "drop" if flagged else "", values))
    return t


def throughput_table(r: dict[str, Any]) -> Table:
    t = Table("Throughput per scenario: samples per second of the forward passes (including the perturbation).",
              ["Scenario", "Samples", "Samples/s"], name="throughput", columns=["scenario", "samples", "samples_per_second"])
    for s in r["scenarios"]:
        t.rows.append(Row([s["id"], str(s["n_samples"]), fmt(s.get("throughput"), 0)],
                          values=[s["id"], s["n_samples"], s.get("throughput")]))
    return t
