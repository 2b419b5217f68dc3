"""Report sections contributed by plugins (see ``medaudit_report_sections``).

The built-in calibration, OOD and subgroup views are sections like any third party's: the
report's core renders only the summary, identity, perturbation catalogue, robustness,
limitations and appendix, and places every plugin section among them by ``order``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Where the core sections sit; a plugin section's ``order`` places it among them (ties: the core
# section first, then plugin sections by id). The built-in plugins use 410 (calibration), 420
# (OOD) and 430 (subgroups), so the default 500 comes after them, as before.
CORE_ORDER = {"summary": 100, "identity": 200, "perturbations": 300, "robustness": 400,
              "limitations": 800, "appendix": 900}


@dataclass(frozen=True)
class ReportSection:
    """A section of the HTML report.

    ``template`` is jinja2 source rendered with the report's own environment: autoescaping on,
    undefined names are errors, ``trim_blocks``/``lstrip_blocks`` on. It receives ``results`` (the
    results.json dict), the formatting helpers ``fmt``, ``fmt_ci``, ``fmt_p`` and ``label`` (see
    :mod:`medaudit.report.views`) and the keys of ``context``; it may include the report's
    partials ``sections/_table.html`` (with ``t`` a :class:`~medaudit.report.views.Table`) and
    ``sections/_figure.html`` (with ``f`` a :class:`~medaudit.report.views.Figure`).

    ``order`` places it among the core sections (:data:`CORE_ORDER`: summary 100 … appendix
    900); every section gets an entry in the report's navigation, in that order.
    ``findings`` are plain-language sentences shown under the summary's key findings (at most
    five findings are shown in all, failed checks and significant drops first);
    ``limitations`` are notes shown under "Limitations and warnings", derived from the results.
    ``headlines`` are ``(label, text)`` pairs for the summary's first page (e.g. ``("Calibration",
    "ECE 0.012 clean, 0.31 at worst (intensity.inversion@5)")``): one or two per section, the
    numbers a reviewer needs before reading on.
    ``appendix`` are the section's full tables (:class:`~medaudit.report.views.Table`): shown
    collapsed in the report's appendix and written as CSV files ``tables/<id>.csv`` beside
    results.json, so the section itself can stay at one figure and one compact table.
    """

    id: str
    title: str
    template: str
    context: dict[str, Any] = field(default_factory=dict)
    order: int = 500
    findings: Sequence[str] = ()
    limitations: Sequence[str] = ()
    headlines: Sequence[tuple[str, str]] = ()
    appendix: Sequence[Any] = ()
