"""The representation section of the report: how far each perturbation moves the model's embeddings.

Reads the ``representation`` of every perturbed scenario in results.json (computed by the audit,
:mod:`medaudit.representation`) and draws embedding-drift curves, one panel per measure and one
line per perturbation, with a compact table of the worst severity and the full table in the
appendix (``tables/representation.csv``). Built on the public view helpers only, as a third
party's section would be.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from medaudit.hookspecs import hookimpl
from medaudit.report.views import (Figure, Row, Series, Table, confidence_label, degradation, estimate_columns,
                                   estimate_values, fmt_ci, perturbed_scenarios)
from medaudit.sections import ReportSection

MEDAUDIT_API_VERSION = 1

#: The measures in the order they are drawn, with their axis labels.
MEASURES = (("cosine", "median cosine to clean"), ("cka", "linear CKA with clean"),
            ("knn_consistency", "k-NN label consistency"))
#: Below this, a measure's worst value is a key finding: the representation changed enough that a
#: probe or head trained on clean embeddings is reading different inputs.
FINDING_BELOW = 0.8

TEMPLATE = """\
{% if figure %}{% with f = figure %}{% include "sections/_figure.html" %}{% endwith %}{% endif %}
<p>{{ what }}</p>
<p class="note">Per perturbation, the severity with the lowest CKA and the three measures there, and every perturbed
scenario with its intervals, are in the appendix and in <code>tables/representation.csv</code> and
<code>tables/representation-worst.csv</code>. Each measure is 1 when the perturbation leaves the representation unchanged.
Bootstrap intervals of CKA resample samples with replacement, and duplicated samples raise CKA, so its intervals tend to sit
above the point value.</p>
"""


def _scenarios(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in perturbed_scenarios(r) if s.get("representation")]


def drift_figure(r: dict[str, Any]) -> Figure | None:
    """Each measure against severity (0 = clean, where every measure is 1), one line per suite: the
    mean over the suite's perturbations (a line per perturbation made a legend longer than the
    figure; the table below names the perturbations)."""
    by_suite: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for s in _scenarios(r):
        by_suite[s.get("suite") or "other"][s["severity"]].append(s["representation"])
    panels = []
    for key, ylabel in MEASURES:
        series = []
        for suite in sorted(by_suite):
            means = {sev: [e[key]["value"] for e in reps if (e.get(key) or {}).get("value") is not None]
                     for sev, reps in sorted(by_suite[suite].items())}
            sevs = [sev for sev, vals in means.items() if vals]
            if sevs:
                series.append(Series(suite, [0, *sevs], [1.0] + [sum(means[v]) / len(means[v]) for v in sevs]))
        if series:
            panels.append((key, f"{ylabel} (mean)", series))
    if not panels:
        return None
    alt = ("Representation drift against severity: " + ", ".join(p[0] for p in panels)
           + " of the perturbed embeddings against the clean ones, one line per suite (mean over its perturbations).")
    return Figure(degradation(panels, "representation", alt, [True] * len(panels)),
                  "Embedding drift: each measure against severity, one line per suite averaged over its perturbations; "
                  f"1 means the embeddings did not move. Per-perturbation values with {confidence_label(r)} intervals are "
                  "in the table below and the appendix.")


def worst_table(r: dict[str, Any]) -> Table:
    """Per perturbation, the severity whose CKA is lowest, with all three measures there."""
    t = Table(f"Per perturbation, the severity with the lowest linear CKA, and the three measures there "
              f"({confidence_label(r)} CIs).", ["Perturbation", "Severity", "Cosine", "CKA", "k-NN consistency"],
              name="worst", columns=["perturbation", "severity"] + [c for k, _ in MEASURES for c in estimate_columns(k)])
    by_pert: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in _scenarios(r):
        by_pert[s["perturbation"]].append(s)
    for pert in sorted(by_pert):
        worst = min(by_pert[pert], key=lambda s: (_value(s, "cka"), s["severity"]))
        rep = worst["representation"]
        t.rows.append(Row([pert, str(worst["severity"])] + [fmt_ci(rep.get(k)) for k, _ in MEASURES],
                          "drop" if _value(worst, "cka") < FINDING_BELOW else "",
                          values=[pert, worst["severity"]] + [v for k, _ in MEASURES for v in estimate_values(rep.get(k))]))
    return t


def full_table(r: dict[str, Any]) -> Table:
    t = Table(f"Representation robustness of every perturbed scenario ({confidence_label(r)} CIs).",
              ["Scenario", "Cosine", "CKA", "k-NN consistency"],
              columns=["scenario"] + [c for k, _ in MEASURES for c in estimate_columns(k)])
    for s in _scenarios(r):
        rep = s["representation"]
        t.rows.append(Row([s["id"]] + [fmt_ci(rep.get(k)) for k, _ in MEASURES],
                          values=[s["id"]] + [v for k, _ in MEASURES for v in estimate_values(rep.get(k))]))
    return t


def _value(s: dict[str, Any], key: str) -> float:
    v = (s["representation"].get(key) or {}).get("value")
    return float("inf") if v is None else float(v)


def _lowest(r: dict[str, Any], key: str) -> tuple[float, str] | None:
    vals = [(_value(s, key), s["id"]) for s in _scenarios(r) if _value(s, key) != float("inf")]
    return min(vals) if vals else None


def headlines(r: dict[str, Any]) -> list[tuple[str, str]]:
    low = _lowest(r, "cka")
    if low is None:
        return []
    text = f"linear CKA with clean {low[0]:.3f} at worst ({low[1]})"
    knn = _lowest(r, "knn_consistency")
    if knn is not None:
        text += f"; k-NN label consistency {knn[0]:.3f} at worst ({knn[1]})"
    return [("Representation", text)]


def findings(r: dict[str, Any]) -> list[str]:
    out = []
    for key, name in (("cka", "linear CKA between its perturbed and clean embeddings"),
                      ("knn_consistency", "share of samples whose nearest clean neighbours vote the same class")):
        low = _lowest(r, key)
        if low is not None and low[0] < FINDING_BELOW:
            out.append(f"The representation itself moves under {low[1]}: the {name} is {low[0]:.3f}, so a head or "
                       "probe trained on clean embeddings reads different inputs there.")
    return out


def describe(r: dict[str, Any]) -> str:
    info = (r.get("model") or {}).get("representation") or {}
    return (f"Read from {info.get('source', 'the feature layer')} ({info.get('dim', '?')} dimensions). Cosine: the median "
            "over samples of the cosine similarity between a sample's perturbed and clean embedding. CKA: linear centred "
            "kernel alignment between the perturbed and clean embedding sets (Kornblith et al. 2019), invariant to "
            "rotations and isotropic scaling."
            + (f" k-NN consistency: the share of samples whose {info.get('knn_k', 'k')} nearest neighbours in "
               f"{info['knn_reference']} (cosine similarity) vote the same class for the perturbed as for the clean "
               "embedding." if info.get("knn_reference") else " k-NN consistency is not measured: this task has no "
                                                                "single class per sample to vote on."))


@hookimpl
def medaudit_report_sections(results: dict[str, Any]) -> list[ReportSection]:
    if not _scenarios(results):
        return []
    return [ReportSection(
        id="representation", title="Representation robustness", template=TEMPLATE, order=430,
        context={"figure": drift_figure(results), "what": describe(results)},
        findings=findings(results), headlines=headlines(results), appendix=[worst_table(results), full_table(results)])]
