"""The subgroups plugin's report section: forest plots, a plain reading per attribute, the gap table,
groups too small to analyse.

Built on the public view helpers only (:mod:`medaudit.report.views`), as a third party's section.
"""

from __future__ import annotations

from typing import Any

from medaudit.report.views import (
    Figure, Interval, Row, Table, clean_scenario, confidence_label, estimate_columns, estimate_values, fmt, fmt_ci,
    fmt_p, forest, label, lead_keys,
    primary_metric, task_applies, value,
)
from medaudit.sections import ReportSection
from medaudit.task import SUBGROUPS

# One sentence on why the max - min gap's interval misleads: the reason the table pairs the gap
# with the permutation test and the worst-vs-rest interval instead of the gap's own interval.
GAP_BIAS = ("A gap (best group minus worst) is the largest of several noisy differences, so it is above 0 even "
            "between groups that perform alike and its own bootstrap interval almost never contains 0; read it with "
            "the permutation test's p-value and with the worst group's difference from the rest of the groups, whose "
            "interval does contain 0 when the data cannot tell that group apart.")

SUBGROUPS_TEMPLATE = """\
{% if figures or gaps.rows or notes %}
{% if gaps.rows %}<p>{{ bias }}</p>{% endif %}
{% for f in figures %}{% include "sections/_figure.html" %}{% endfor %}
{% if readings %}
<p>{{ readings_intro }}</p>
<ul>{% for line in readings %}<li>{{ line }}</li>{% endfor %}</ul>
{% endif %}
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


GAP_HEADERS = ["Scenario", "Attribute", "Metric", "Worst group (value)", "Gap", "Worst vs rest [CI]", "p", "p adjusted",
               "Significant"]


def _gap_row(g: dict[str, Any]) -> Row:
    worst = "–" if g.get("worst_group") is None else f"{g['worst_group']} ({fmt(g.get('worst_value'))})"
    gap, rest = g.get("gap") or {}, g.get("worst_vs_rest") or {}
    return Row([g.get("scenario", "clean"), g["attribute"], label(g["metric"]), worst, fmt(gap.get("value")),
                fmt_ci(rest), fmt_p(g.get("p_value")), fmt_p(g.get("p_adjusted")), fmt(bool(g.get("significant")))],
               "drop" if g.get("significant") else "",
               [g.get("scenario", "clean"), g["attribute"], g["metric"], g.get("worst_group"), g.get("worst_value"),
                g.get("best_group"), *estimate_values(gap), *estimate_values(rest), g.get("p_value"),
                g.get("p_adjusted"), bool(g.get("significant"))])


def _gap_order(g: dict[str, Any]) -> tuple[Any, ...]:
    return (g.get("scenario", "clean") != "clean", g.get("scenario", ""), g["attribute"], g["metric"])


def holm_family_text(r: dict[str, Any]) -> str:
    """The family of Holm's correction as recorded in the results, e.g. "Holm, over all 120 gaps tested
    in the audit" or "Holm, per scenario". Results written before ``holm_family`` existed were
    corrected per scenario, and say so."""
    settings = r.get("analyses", {}).get("subgroup_settings", {}) or {}
    if settings.get("holm_family", "scenario") != "audit":
        return "Holm, per scenario"
    gaps = r.get("analyses", {}).get("subgroup_gaps", []) or []
    tested = sum(s.get("p_value") is not None for s in gaps + [g["drop_gap"] for g in gaps if g.get("drop_gap")])
    return f"Holm, over all {tested} gaps tested in the audit"


def permutations_text(r: dict[str, Any]) -> str:
    """How many permutations the test drew and why, as recorded in the results, e.g. " (6520
    permutations, chosen automatically for the correction's family)" or " (1000 permutations, as
    configured)"; "" when none are recorded (no tests, or results written before the count was)."""
    settings = r.get("analyses", {}).get("subgroup_settings", {}) or {}
    n = settings.get("permutations")
    if not isinstance(n, int) or n <= 0:
        return ""
    why = {"auto": ", chosen automatically for the correction's family", "configured": ", as configured"}
    return f" ({n} permutations{why.get(settings.get('permutations_rule'), '')})"


def gap_table(r: dict[str, Any]) -> Table:
    """The section's compact table: clean-data gaps of the headline metrics (the settings' and each
    metric family's lead key), plus every significant gap whatever its metric or scenario.

    The gap is shown without its own interval (biased away from 0, see :data:`GAP_BIAS`); beside
    the test stands the worst group's difference from the rest, whose interval can contain 0.
    """
    gaps_all = r.get("analyses", {}).get("subgroup_gaps", []) or []
    t = Table("Subgroup gaps, oriented so positive is worse: the gap (best minus worst group); the worst group's "
              f"difference from the other groups pooled, with its paired {confidence_label(r)} bootstrap CI; and the "
              f"permutation test of the gap{permutations_text(r)}, its p-value adjusted for multiple comparisons "
              f"({holm_family_text(r)}); "
              "significant means the adjusted p-value is below alpha.", list(GAP_HEADERS))
    headline = set(r.get("analyses", {}).get("subgroup_settings", {}).get("headline_metrics") or [])
    headline |= set(lead_keys(r))
    shown = [g for g in gaps_all if (g.get("metric") in headline and g.get("scenario", "clean") == "clean")
             or g.get("significant")]
    for g in sorted(shown, key=_gap_order):
        t.rows.append(_gap_row(g))
    if len(shown) < len(gaps_all):
        t.caption += (f" Shown: the clean-data gaps of the headline metrics ({', '.join(label(k) for k in sorted(headline))}) "
                      f"and every significant gap; all {len(gaps_all)} gaps are in the appendix and in "
                      "tables/subgroups-gaps.csv.")
    return t


def all_gaps_table(r: dict[str, Any]) -> Table:
    """Every gap of every metric, attribute and scenario (the appendix table, ``tables/subgroups-gaps.csv``)."""
    t = Table("All subgroup gaps per scenario, attribute and metric (positive is worse); columns as in the "
              "section's table.", list(GAP_HEADERS), name="gaps",
              columns=["scenario", "attribute", "metric", "worst_group", "worst_value", "best_group",
                       "gap", "gap_ci_low", "gap_ci_high", "worst_vs_rest", "worst_vs_rest_ci_low",
                       "worst_vs_rest_ci_high", "p_value", "p_adjusted", "significant"])
    for g in sorted(r.get("analyses", {}).get("subgroup_gaps", []) or [], key=_gap_order):
        t.rows.append(_gap_row(g))
    return t


def groups_table(r: dict[str, Any]) -> Table:
    """Every group's headline metrics per scenario (the appendix table, ``tables/subgroups-groups.csv``)."""
    keys = lead_keys(r)
    t = Table(f"Metrics per subgroup and scenario with {confidence_label(r)} bootstrap CIs; groups below "
              "subgroups.min_group_size have no metrics.",
              ["Scenario", "Attribute", "Group", "n"] + [label(k) for k in keys], name="groups",
              columns=["scenario", "attribute", "group", "n", "too_small"] + [c for k in keys for c in estimate_columns(k)])
    for g in r.get("subgroups", []):
        t.rows.append(Row([g["scenario"], g["attribute"], str(g["group"]), str(g["n"])]
                          + [fmt_ci(g["metrics"].get(k)) for k in keys], "warn" if g.get("too_small") else "",
                          [g["scenario"], g["attribute"], g["group"], g["n"], bool(g.get("too_small"))]
                          + [v for k in keys for v in estimate_values(g["metrics"].get(k))]))
    return t


def gap_readings(r: dict[str, Any]) -> list[str]:
    """One plain sentence per attribute on the primary metric's clean-data gap: the test's verdict
    first, then how far the worst group lies from the rest, e.g. "hemisphere: no evidence of a
    gap (p = 0.475); the worst group, left, is 0.009 below the rest [-0.004, 0.022]"."""
    metric = primary_metric(r)
    alpha = r.get("analyses", {}).get("subgroup_settings", {}).get("alpha", 0.05)
    gaps = [g for g in r.get("analyses", {}).get("subgroup_gaps", []) or []
            if g.get("scenario", "clean") == "clean" and g.get("metric") == metric
            and (g.get("gap") or {}).get("value") is not None]
    out = []
    for g in sorted(gaps, key=lambda g: g["attribute"]):
        p, adjusted = g.get("p_value"), g.get("p_adjusted")
        if p is None:
            test = "not tested (no permutations)"
        elif g.get("significant"):
            test = f"a significant gap (p = {fmt_p(p)}, adjusted {fmt_p(adjusted)})"
        elif adjusted is not None and p < alpha:
            test = f"no significant gap after correcting for multiple comparisons (p = {fmt_p(p)}, adjusted {fmt_p(adjusted)})"
        else:
            test = f"no evidence of a gap (p = {fmt_p(p)})"
        line = f"{g['attribute']}: {test}"
        rest = g.get("worst_vs_rest") or {}
        if rest.get("value") is not None:
            side = "below" if g.get("higher_is_better", True) else "above"
            ci = "" if rest.get("ci_low") is None else f" [{fmt(rest['ci_low'])}, {fmt(rest['ci_high'])}]"
            line += f"; the worst group, {g['worst_group']}, is {fmt(rest['value'])} {side} the rest{ci}"
        out.append(line + ".")
    return out


def _readings_intro(r: dict[str, Any]) -> str:
    metric = primary_metric(r) or ""
    return (f"The {label(metric)} gap on clean data per attribute (the worst group's difference from the rest "
            f"with its {confidence_label(r)} CI):")


#: Above this many too-small groups in one attribute, one summary line replaces the list.
SMALL_GROUPS_LISTED = 10


def small_group_notes(r: dict[str, Any]) -> list[str]:
    """Groups below ``min_group_size``, from the clean scenario (a group's members, hence its size,
    are the same in every scenario): one line per group, or one per attribute when it has many
    (a numeric column without bins makes every value a group)."""
    small: dict[str, list[dict[str, Any]]] = {}
    for g in r.get("subgroups", []):
        if g.get("too_small") and g["scenario"] == "clean":
            small.setdefault(g["attribute"], []).append(g)
    notes = []
    for attr, groups in small.items():
        if len(groups) <= SMALL_GROUPS_LISTED:
            notes += [f"{attr} = {g['group']} (clean): {g['n']} samples, below subgroups.min_group_size; no metrics "
                      "or tests reported for it." for g in groups]
            continue
        sizes = [g["n"] for g in groups]
        notes.append(f"{attr}: {len(groups)} groups below subgroups.min_group_size ({min(sizes)}–{max(sizes)} samples "
                     f"each, e.g. {', '.join(str(g['group']) for g in groups[:5])}, …); no metrics or tests reported "
                     f"for them. Merge values into bins (subgroups.bins.{attr}) to analyse this attribute.")
    return notes


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
    readings = gap_readings(results)
    return [ReportSection(
        id="subgroups", title="Subgroups", template=SUBGROUPS_TEMPLATE, order=430,
        context={"figures": forest_figures(results), "gaps": gap_table(results), "notes": small_group_notes(results),
                 "bias": GAP_BIAS, "readings": readings, "readings_intro": _readings_intro(results)},
        findings=[finding] if finding else [], limitations=subgroup_limitations(results),
        headlines=[("Subgroups", "; ".join(line.rstrip(".") for line in readings))] if readings else [],
        appendix=[all_gaps_table(results), groups_table(results)])]
