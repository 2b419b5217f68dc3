"""Public building blocks of report views, for the core report and plugin sections alike.

A ``medaudit_report_sections`` hookimpl builds its view from the results dict with these and
passes it to its template through ``ReportSection.context``; the built-in calibration, OOD and
subgroup sections use nothing else. Everything here reads results.json content only, so a
report re-rendered with ``medaudit report results.json`` is identical.

* view models: :class:`Table` / :class:`Row` (render with ``{% with t = … %}{% include
  "sections/_table.html" %}{% endwith %}``), :class:`Figure` (``sections/_figure.html``);
* figures (inline SVG, deterministic): :func:`degradation`, :func:`reliability`, :func:`forest`
  with :class:`Series` and :class:`Interval` (see :mod:`medaudit.figures`);
* CSV columns of estimates: :func:`estimate_columns`, :func:`estimate_values`;
* formatting: :func:`fmt`, :func:`fmt_ci`, :func:`fmt_p`, :func:`label`, :func:`fmt_metric`;
* results accessors: :func:`clean_scenario`, :func:`perturbed_scenarios`, :func:`value`,
  :func:`detectors`, :func:`confidence_label`, and the metrics' display declarations
  :func:`metric_info`, :func:`headline_keys`, :func:`primary_metric`, :func:`lead_keys`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup

from ..figures import Interval, Series, degradation, forest, reliability
from .format import fmt, fmt_ci, fmt_metric, fmt_p, label

__all__ = [
    "Figure", "Interval", "Row", "Series", "Table", "clean_scenario", "confidence_label", "degradation",
    "detectors", "estimate_columns", "estimate_values", "fmt", "fmt_ci", "fmt_metric", "fmt_p", "forest", "headline_keys", "label", "lead_keys",
    "metric_info", "perturbed_scenarios", "primary_metric", "reliability", "task_applies", "value",
]


@dataclass
class Row:
    """One table row; the first cell is the row header. ``flag`` is a CSS class: ``drop``
    (significant degradation), ``fail`` (failed check), ``warn``, ``total``.

    ``values`` are the row's raw values for the table's CSV file (numbers unrounded, intervals
    as separate columns), matching :attr:`Table.columns`; without them the CSV holds ``cells``."""

    cells: list[str]
    flag: str = ""
    values: list[Any] | None = None


@dataclass
class Table:
    """A captioned table; rendered only when it has rows.

    A table a section puts in the appendix (``ReportSection.appendix``) is also written as
    ``tables/<section>.csv`` (``tables/<section>-<name>.csv`` when it has a ``name``) beside
    results.json; ``columns`` are then the CSV's header, for rows that carry ``values``.
    """

    caption: str
    headers: list[str]
    rows: list[Row] = field(default_factory=list)
    name: str = ""
    columns: list[str] | None = None


def estimate_columns(name: str) -> list[str]:
    """CSV columns of an estimate: ``name``, ``name_ci_low``, ``name_ci_high``."""
    return [name, f"{name}_ci_low", f"{name}_ci_high"]


def estimate_values(est: dict[str, Any] | None) -> list[Any]:
    """An estimate's raw ``value``, ``ci_low``, ``ci_high`` (``None`` where undefined), for CSV rows."""
    est = est or {}
    return [est.get("value"), est.get("ci_low"), est.get("ci_high")]


@dataclass
class Figure:
    """An inline SVG (from the figure functions) with its caption."""

    svg: Markup
    caption: str


def value(est: dict[str, Any] | None) -> float | None:
    """The point value of an estimate dict (None when absent or undefined)."""
    return None if not est else est.get("value")


def perturbed_scenarios(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The scenarios that apply a perturbation (not clean, not external OOD sets)."""
    return [s for s in r["scenarios"] if s.get("perturbation")]


def clean_scenario(r: dict[str, Any]) -> dict[str, Any] | None:
    return next((s for s in r["scenarios"] if s["id"] == "clean"), None)


def task_applies(r: dict[str, Any], capability: str) -> bool:
    """Whether the audit's task declared ``capability`` (a :mod:`medaudit.task` constant such as
    ``CALIBRATION``): a section whose view does not apply to the task leaves itself out. Results
    written before tasks declared capabilities (no ``model.task_capabilities``) count as applying."""
    declared = r.get("model", {}).get("task_capabilities")
    return declared is None or capability in declared


def detectors(r: dict[str, Any]) -> list[str]:
    """Every detector with shift-detection results in some scenario, sorted."""
    return sorted({d for s in r["scenarios"] for d in s.get("ood", {})})


def confidence_label(r: dict[str, Any]) -> str:
    """The audit's CI level as text, e.g. ``95%``."""
    return f"{100 * r.get('config', {}).get('audit', {}).get('confidence', 0.95):g}%"


def metric_info(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Display declaration per metric key (results.json ``metric_info``).

    Results files written before metrics declared their display have none; for them every key of
    ``metric_directions`` without a ``/`` (per-class keys) is a headline key, in that order, and
    the first one is the only lead key. (``medaudit report`` fills ``metric_info`` in from the
    installed metric plugins' declarations before this fallback is needed.)
    """
    if r.get("metric_info"):
        return r["metric_info"]
    directions = r.get("metric_directions") or {}
    keys = [k for k in directions if "/" not in k]
    return {k: {"headline": True, "order": i, "lead": i == 0, "digits": 3, "percent": False,
                "higher_is_better": directions[k], "family": "", "plugin": ""} for i, k in enumerate(keys)}


def headline_keys(r: dict[str, Any]) -> list[str]:
    """The headline metric keys the results hold, in their declared order."""
    present = r["scenarios"][0]["metrics"] if r["scenarios"] else {}
    info = metric_info(r)
    return sorted((k for k, i in info.items() if i.get("headline") and k in present), key=lambda k: info[k]["order"])


def primary_metric(r: dict[str, Any]) -> str | None:
    """The metric findings and figures lead with: the first headline key."""
    return next(iter(headline_keys(r)), None)


def lead_keys(r: dict[str, Any]) -> list[str]:
    """Each metric family's first headline key, in headline order: drawn in the degradation curves."""
    info = metric_info(r)
    return [k for k in headline_keys(r) if info[k].get("lead")]
