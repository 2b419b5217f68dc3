"""Assembly: the core sections' views and the plugins' sections → jinja2 templates → one file.

The core renders summary, identity, perturbation catalogue, robustness, limitations and
appendix; every other section (the built-in calibration, OOD and subgroup views included) comes
from a plugin's ``medaudit_report_sections`` and is placed among them by its ``order``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup
from pydantic import ValidationError

from ..config import Config
from ..plugin_manager import PluginManager
from ..results import MetricInfo, Results, WarningRecord, metric_info
from ..sections import CORE_ORDER, ReportSection
from ..verdict import breaking_points_of
from .core import (HeatMap, breaking_table, checks_table, degradation_table, heat_map, identity_rows, mce_table,
                   metadata_views, model_card_link, params_table, protocol_text, robustness_figure, robustness_table,
                   scope_text, scores_table, stress_tests, throughput_table)
from .format import fmt, fmt_ci, fmt_p, label
from .limitations import WarningGroup, derived_notes, warning_groups, warning_records
from .summary import alerts, findings, robustness_headlines, verdict
from .tables import AppendixTable, csv_files
from .views import Figure, Table, clean_scenario, confidence_label, headline_keys, lead_keys, primary_metric
from .views import metric_info as info_of

CORE_TITLES = {"summary": "Summary", "identity": "Identity and traceability", "perturbations": "Perturbation catalogue",
               "robustness": "Robustness", "limitations": "Limitations and warnings", "appendix": "Appendix"}


@dataclass
class SectionEntry:
    """One section in document order: a core template (``include``) or a plugin's rendered ``html``."""

    id: str
    title: str
    include: str = ""
    html: Markup = Markup("")


@dataclass
class ReportView:
    """What the templates see: ready-made strings, tables and figures, no logic beyond loops."""

    title: str
    results: dict[str, Any]
    verdict: dict[str, Any]
    alerts: list[dict[str, Any]]
    findings: list[str]
    headlines: list[tuple[str, str]]
    heat_map: HeatMap | None
    checks: Table
    identity: list[tuple[str, str]]
    metadata_numeric: Table
    metadata_tables: list[Table]
    metadata_notes: list[str]
    catalogue: list[dict[str, Any]]
    preview_png: str | None
    primary: str | None
    robustness_figure: Figure | None
    breaking: Table
    warnings: list[WarningGroup]
    derived_notes: list[str]
    definitions: list[tuple[str, str, bool]]  # (term, definition, higher is better), as the metrics declare them
    confidence: str
    sections: list[SectionEntry]
    scope: str
    stress: set[str]
    scores: Table
    scores_notes: list[str]
    protocol: str | None
    protocol_conformant: bool
    model_card: str | None  # the card's path relative to the report (a link), or None
    appendix: list[AppendixTable]  # every full table, in document order: collapsed here, CSV beside results.json


def metric_definitions(r: dict[str, Any], keys: Any) -> list[tuple[str, str, bool]]:
    """The appendix's definitions of the metric keys in ``keys``, as their families declare them
    (``metric_info``): one entry per key, or per prefix for per-class keys (``<key>/<class>``)."""
    info = info_of(r)
    out: dict[str, tuple[str, str, bool]] = {}
    for key in keys:
        entry = info.get(key) or {}
        if entry.get("definition"):
            term = key.split("/")[0]
            out.setdefault(term, (label(term), entry["definition"], bool(entry.get("higher_is_better", True))))
    return list(out.values())


def template_env() -> jinja2.Environment:
    """The report's jinja2 environment; plugin sections are rendered with it too."""
    root = resources.files("medaudit.templates")
    loader = jinja2.FunctionLoader(lambda name: (root / name).read_text(encoding="utf-8"))
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(fmt=fmt, fmt_ci=fmt_ci, fmt_p=fmt_p, label=label)
    return env


def stylesheet() -> str:
    return (resources.files("medaudit.templates") / "report.css").read_text(encoding="utf-8")


def render_section(section: ReportSection, results: dict[str, Any], env: jinja2.Environment | None = None) -> str:
    """A plugin section's HTML, exactly as the report renders it (without the ``<section>`` wrapper)."""
    return (env or template_env()).from_string(section.template).render(results=results, **section.context)


def _problem(code: str, message: str, plugin: str | None = None) -> dict[str, Any]:
    return WarningRecord(code=code, message=message, plugin=plugin).model_dump()


def _render_sections(env: jinja2.Environment, r: dict[str, Any], sections: list[tuple[str, ReportSection]],
                     problems: list[dict[str, Any]]) -> list[tuple[ReportSection, Markup]]:
    rendered = []
    for plugin, sec in sorted(sections, key=lambda ps: (ps[1].order, ps[1].id)):
        try:
            html = render_section(sec, r, env)
        except Exception as exc:  # a broken plugin template must not take the report down
            problems.append(_problem("report-section-failed", f'report section "{sec.id}" of plugin "{plugin}" could '
                                     f"not be rendered ({type(exc).__name__}: {exc}); it is left out", plugin))
            continue
        rendered.append((sec, Markup(html)))
    return rendered


def _appendix(core: dict[str, list[Table]], rendered: list[tuple[ReportSection, Markup]]) -> list[AppendixTable]:
    """The full tables in document order: the core sections' and the plugin sections' (``appendix``)."""
    entries = [(CORE_ORDER[sid], 0, sid, t) for sid, tables in core.items() for t in tables]
    entries += [(sec.order, 1, sec.id, t) for sec, _ in rendered for t in sec.appendix if isinstance(t, Table)]
    return [AppendixTable(sid, t) for _, _, sid, t in sorted(entries, key=lambda e: e[:3]) if t.rows]


def _document_order(rendered: list[tuple[ReportSection, Markup]]) -> list[SectionEntry]:
    core = [(order, 0, sid, SectionEntry(sid, CORE_TITLES[sid], include=f"sections/{sid}.html"))
            for sid, order in CORE_ORDER.items()]
    plugins = [(sec.order, 1, sec.id, SectionEntry(sec.id, sec.title, html=html)) for sec, html in rendered]
    return [entry for *_, entry in sorted(core + plugins, key=lambda t: t[:3])]


def build_view(results: Results, sections: list[tuple[str, ReportSection]] | None = None,
               problems: list[dict[str, Any]] | None = None, env: jinja2.Environment | None = None) -> ReportView:
    r = results.model_dump(mode="json")
    # a results file from before breaking points were stored: derive them, so heat map and verdict agree
    r.setdefault("robustness", {})["breaking_points"] = breaking_points_of(r)
    env = env or template_env()
    problems = list(problems or [])
    rendered = _render_sections(env, r, sections or [], problems)
    confidence = confidence_label(r)
    primary = primary_metric(r)
    leads = lead_keys(r)
    clean = clean_scenario(r)
    metadata_numeric, metadata_tables, metadata_notes = metadata_views(r)
    records = warning_records(r) + problems
    m = r["model"]
    scores = scores_table(r, confidence)
    core_appendix = {
        "perturbations": [params_table(r)],
        "robustness": [robustness_table(r, headline_keys(r), confidence), degradation_table(r, leads), mce_table(r, leads)],
        "appendix": [throughput_table(r)],
    }
    return ReportView(
        title=f"medaudit report: {m.get('name') or m['path']}", results=r, verdict=verdict(r), alerts=alerts(r),
        findings=findings(r, [f for sec, _ in rendered for f in sec.findings]),
        headlines=robustness_headlines(r) + [h for sec, _ in rendered for h in sec.headlines],
        heat_map=heat_map(r, primary), checks=checks_table(r), identity=identity_rows(r),
        metadata_numeric=metadata_numeric, metadata_tables=metadata_tables, metadata_notes=metadata_notes, catalogue=r["perturbation_catalogue"],
        preview_png=r["assets"].get("preview_png"), primary=primary,
        robustness_figure=robustness_figure(r, primary, confidence), breaking=breaking_table(r, leads),
        warnings=warning_groups(records),
        derived_notes=derived_notes(r, records, [n for sec, _ in rendered for n in sec.limitations]),
        definitions=metric_definitions(r, clean["metrics"] if clean else {}),
        confidence=confidence, sections=_document_order(rendered), scope=scope_text(r), stress=stress_tests(r),
        appendix=_appendix(core_appendix, rendered), scores=scores[0], scores_notes=scores[1],
        protocol=protocol_text(r), protocol_conformant=(r.get("protocol") or {}).get("conformant", True),
        model_card=model_card_link(r),
    )


def declared_metric_info(pm: PluginManager, results: Results, problems: list[dict[str, Any]]) -> dict[str, MetricInfo]:
    """For results written before metrics declared their display: the installed metric plugins'
    declarations, applied to the keys the results hold (empty when the recorded config no longer
    validates, e.g. written by another medaudit version)."""
    try:
        config = Config.model_validate(results.config)
    except ValidationError:
        return {}
    families: dict[str, Any] = {}
    owners: dict[int, str] = {}
    for plugin, metrics in pm.call_each("medaudit_metrics", config=config,
                                        on_error=lambda msg, plugin: problems.append(
                                            _problem("report-metric-info-failed", msg, plugin))):
        for m in metrics:
            owners[id(m)] = plugin
            # the keys a family names: its headline keys and the keys (or prefixes) it defines
            for key in results.metric_directions:
                if key in m.headline or key in m.definitions or key.split("/")[0] in m.definitions:
                    families.setdefault(key, m)
    return metric_info(families, owners)


@dataclass
class RenderedReport:
    """The report file and its full tables as CSV (file name → text, for ``tables/``)."""

    html: str
    tables: dict[str, str]


def render_report_files(results: Results, pm: PluginManager | None = None) -> RenderedReport:
    """Render the report and its CSV tables; a plugin section that fails is left out and named
    in the limitations."""
    sections: list[tuple[str, ReportSection]] = []
    problems: list[dict[str, Any]] = []
    if pm is not None:
        if not results.metric_info and results.metric_directions:
            results = results.model_copy(update={"metric_info": declared_metric_info(pm, results, problems)})
        data = results.model_dump(mode="json")

        def section_failed(message: str, plugin: str) -> None:
            problems.append(_problem("report-section-failed", message, plugin))

        for plugin, secs in pm.call_each("medaudit_report_sections", on_error=section_failed, results=data):
            for sec in secs:
                if isinstance(sec, ReportSection):
                    sections.append((plugin, sec))
                else:
                    problems.append(_problem("report-section-failed", f'plugin "{plugin}" returned {sec!r} from '
                                             "medaudit_report_sections; expected ReportSection objects", plugin))
    env = template_env()
    view = build_view(results, sections, problems, env)
    return RenderedReport(env.get_template("report.html").render(v=view, css=stylesheet()), csv_files(view.appendix))


def render_report(results: Results, pm: PluginManager | None = None) -> str:
    """The report's HTML (:func:`render_report_files` without the CSV tables)."""
    return render_report_files(results, pm).html
