"""Report sections contributed by plugins (see ``medaudit_report_sections``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReportSection:
    """A section of the HTML report.

    ``template`` is jinja2 source rendered with autoescaping on; it receives ``results`` (the
    results.json dict), ``fmt`` (number formatting helper) and the keys of ``context``.
    ``order`` places it among the built-in sections (summary 100 … appendix 900).
    """

    id: str
    title: str
    template: str
    context: dict[str, Any] = field(default_factory=dict)
    order: int = 500
