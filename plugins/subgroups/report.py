"""The subgroups plugin's report section: forest plots, the gap table, groups too small to analyse.

Built on the public view helpers only (:mod:`medaudit.report.views`), as a third party's section.
"""

from __future__ import annotations

from typing import Any

from medaudit.report.views import (
    Figure, Interval, Row, Table, clean_scenario, confidence_label, fmt, fmt_ci, fmt_p, forest, label, lead_keys,
    primary_metric, task_applies, value,
)
from medaudit.sections import ReportSection
from medaudit.task import SUBGROUPS

SUBGROUPS_TEMPLATE = """\
{% if figures or gaps.rows or notes %}
{% for f in figures %}{% include "sections/_figure.html" %}{% endfor %}
{% with t = gaps %}{% include "sections/_table.html" %}{% endwith %}
{% if notes %}
<h3>Groups too small to analyse</h3>
<ul>{% for n in notes %}<li>{{ n }}</li>{% endfor %}</ul>
{% endif %}
{% else %}
<p class="empty">No subgroup analysis was recorded. Set <code>subgroups.attributes</code> to metadata columns (available: {{ results.dataset.metadata_columns | join(', ') or 'none' }}) to compare performance across groups.</p>
{% endif %}
"""


def forest_figures(r: dict[str, Any]) -> list[Figure]:
    """One forest plot of the primary metric per attribute, on clean data."""
    metric = primary_metric(r)
    if not metric:
        return []
    confidence = confidence_label(r)
    rows = r.get("subgroups", [])
    figs = []
    for i, attr in enumerate(sorted({g["attribute"] for g in rows if g["scenario"] == "clean"})):
        intervals = []
        for g in rows:
            est = g["metrics"].get(metric) or {}
            if g["scenario"] != "clean" or g["attribute"] != attr or g.get("too_small") or est.get("value") is None:
                continue
            intervals.append(Interval(f"{g['group']} (n={g['n']})", est.get("value"), est.get("ci_low"), est.get("ci_high")))
        if not intervals:
            continue
        clean = clean_scenario(r)
        ref = value(clean["metrics"].get(metric)) if clean else None
        alt = (f"Forest plot of {label(metric)} per {attr} group on clean data with {confidence} confidence intervals: "
               + "; ".join(f"{iv.label} {fmt(iv.value)}" for iv in intervals) + ".")
        figs.append(Figure(forest(intervals, f"{label(metric)} (clean data)", f"forest-{i}", alt, ref),
                           f"{label(metric).capitalize()} per {attr} group on clean data with {confidence} bootstrap "
                           "CIs; the dashed line is the whole test set."))
    return figs


def gap_table(r: dict[str, Any]) -> Table:
    """The gaps of the headline metrics (the settings' and each metric family's lead key), plus
    every significant gap whatever its metric."""
    gaps_all = r.get("analyses", {}).get("subgroup_gaps", []) or []
    t = Table("Subgroup gaps: best minus worst group (oriented so positive is worse), its bootstrap CI, and a "
              "permutation test p-value, adjusted for multiple comparisons; significant means the adjusted "
              "p-value is below alpha.",
              ["Scenario", "Attribute", "Metric", "Gap [CI]", "Worst group", "Worst value", "Ratio", "p", "p adjusted",
               "Significant"])
    # the full list (all metrics × attributes × scenarios) is in results.json and would bury the signal
    headline = set(r.get("analyses", {}).get("subgroup_settings", {}).get("headline_metrics") or [])
    headline |= set(lead_keys(r))
    shown = [g for g in gaps_all if g.get("metric") in headline or g.get("significant")]
    for g in sorted(shown, key=lambda g: (g.get("scenario", "clean") != "clean", g.get("scenario", ""),
                                          g["attribute"], g["metric"])):
        t.rows.append(Row([g.get("scenario", "clean"), g["attribute"], label(g["metric"]), fmt_ci(g.get("gap")),
                           str(g.get("worst_group", "–")), fmt(g.get("worst_value")), fmt(g.get("ratio")),
                           fmt_p(g.get("p_value")), fmt_p(g.get("p_adjusted")), fmt(bool(g.get("significant")))],
                          "drop" if g.get("significant") else ""))
    if len(shown) < len(gaps_all):
        t.caption += (f" Shown: the headline metrics ({', '.join(label(k) for k in sorted(headline))}) and every "
                      f"significant gap; {len(gaps_all) - len(shown)} further non-significant gaps are listed in "
                      "results.json (analyses.subgroup_gaps).")
    return t


def small_group_notes(r: dict[str, Any]) -> list[str]:
    return [f"{g['attribute']} = {g['group']} ({g['scenario']}): {g['n']} samples, below subgroups.min_group_size; "
            "no metrics or tests reported for it." for g in r.get("subgroups", []) if g.get("too_small")]


def subgroup_finding(r: dict[str, Any]) -> str | None:
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
            and value(s["metrics"].get(primary or "")) is not None]
    if primary and rows:
        worst = min(rows, key=lambda s: (s["metrics"][primary]["value"], s["attribute"], s["group"]))
        return (f"Worst subgroup on clean data: {worst['attribute']} = {worst['group']} "
                f"({label(primary)} {fmt_ci(worst['metrics'][primary])}, n = {worst['n']}).")
    return None


def subgroup_limitations(r: dict[str, Any]) -> list[str]:
    """Configured attributes the data lacks, and a configuration that produced no subgroup results."""
    cfg = r.get("config", {})
    # this plugin's settings: under plugins.subgroups, or the documented top-level subgroups alias
    settings = cfg.get("plugins", {}).get("subgroups") or cfg.get("subgroups") or {}
    configured = settings.get("attributes", []) or []
    notes = []
    absent = [a for a in configured if a not in r["dataset"]["metadata_columns"]]
    if absent:
        notes.append("Subgroup attributes configured but absent from the data's metadata: " + ", ".join(absent) + ".")
    if configured and not r.get("subgroups"):
        notes.append("Subgroups were configured but no subgroup results were recorded (did the subgroup analysis "
                     "fail? see the warnings above).")
    return notes


def subgroup_sections(results: dict[str, Any]) -> list[ReportSection]:
    """The section for ``results``, with its finding and limitations (none for a task the
    subgroup analysis does not apply to: the analysis says so in the warnings)."""
    if not task_applies(results, SUBGROUPS):
        return []
    finding = subgroup_finding(results)
    return [ReportSection(
        id="subgroups", title="Subgroups", template=SUBGROUPS_TEMPLATE, order=430,
        context={"figures": forest_figures(results), "gaps": gap_table(results), "notes": small_group_notes(results)},
        findings=[finding] if finding else [], limitations=subgroup_limitations(results))]
