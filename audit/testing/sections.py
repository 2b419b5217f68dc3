"""Report section checks: a section renders as the report renders it, on real results, escaped."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..sections import ReportSection

#: Text no results.json holds, with the characters autoescaping must turn into entities. The
#: section check writes it into the results' free-text fields (model name, paths, warnings …),
#: where a user's own text goes; it must never reach the HTML unescaped.
CANARY = '<b class="medaudit-canary">x&y</b>'


def render_section(section: ReportSection, results: Mapping[str, Any]) -> str:
    """Render a section exactly as the report does (autoescape on, undefined names are errors)."""
    from ..report import render_section as render

    assert isinstance(section, ReportSection), f"{section!r} is not a medaudit.sections.ReportSection"
    assert section.id and " " not in section.id, f"section id {section.id!r} must be a non-empty HTML id without spaces"
    assert section.title.strip(), "section title is empty"
    return render(section, dict(results))


def _poisoned(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with :data:`CANARY` in every field that holds a user's free text."""
    out = copy.deepcopy(results)
    out["command"] = CANARY
    out["warnings"] = [*out.get("warnings", []), CANARY]
    for key in ("name", "description", "intended_use", "path"):
        if key in out.get("model", {}):
            out["model"][key] = CANARY
    if "path" in out.get("dataset", {}):
        out["dataset"]["path"] = CANARY
    return out


def check_report_section(plugin: object, results: Mapping[str, Any] | str | Path, name: str = "plugin-under-test") -> list[str]:
    """Render every section ``plugin`` contributes for ``results`` into a whole report.

    ``plugin`` is the plugin module or object (as registered: its ``medaudit_report_sections``
    must carry ``@hookimpl``); ``results`` a results.json of a real audit (a path, or the parsed
    dict) for which the plugin has something to show. Checks that the hook, called through
    medaudit's plugin manager, returns at least one :class:`~medaudit.sections.ReportSection`;
    that each renders on its own (:func:`render_section`) and inside the whole report, as
    ``<section id=...>``; and that text a user controls (:data:`CANARY` in the model name,
    paths, command and warnings) comes out escaped. Returns each section's HTML.
    """
    from ..plugin_manager import get_plugin_manager
    from ..report import render_report
    from ..results import Results

    data = json.loads(Path(results).read_text(encoding="utf-8")) if isinstance(results, (str, Path)) else dict(results)
    parsed = Results.model_validate(data)  # a real results.json, not a hand-made fragment
    data = parsed.model_dump(mode="json")
    pm = get_plugin_manager(extra=[(name, plugin)], autoload=False, warn=lambda message: None)
    assert name in pm.infos, "; ".join(f.message for f in pm.failures) or f"{plugin!r} could not be registered"
    assert pm.hook.medaudit_report_sections.get_hookimpls(), (
        f"{name} implements no medaudit_report_sections hook (is it decorated with @medaudit.hookimpl?)"
        + "".join(f"; {p.problem}" for p in pm.problems))
    sections = [sec for _plugin, secs in pm.call_each("medaudit_report_sections", results=data) for sec in secs]
    assert sections, ("medaudit_report_sections returned no section for these results; pass the results.json of "
                      "an audit your plugin has something to show for")
    rendered = []
    for sec in sections:
        try:
            rendered.append(render_section(sec, data))
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - any template error is this check's failure
            raise AssertionError(f"section {sec.id!r} does not render on these results: {type(exc).__name__}: {exc}") from None
    poisoned = _poisoned(data)
    html = render_report(Results.model_validate(poisoned), pm)
    for sec in [s for _plugin, secs in pm.call_each("medaudit_report_sections", results=poisoned) for s in secs]:
        assert f'<section id="{sec.id}">' in html, (
            f"section {sec.id!r} is missing from the rendered report (it failed to render there, or its id is not "
            "a plain HTML id)")
        assert CANARY not in render_section(sec, poisoned), (
            f"section {sec.id!r} puts text from results.json into the HTML unescaped (|safe or Markup?); "
            "autoescaping must stay on for anything a user wrote")
    assert CANARY not in html, "the report holds text from results.json unescaped"
    return rendered
