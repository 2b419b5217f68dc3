"""The HTML audit report: view models → jinja2 templates → one self-contained file.

Everything shown is built from :class:`~medaudit.results.Results` alone, so ``medaudit report
results.json`` re-renders the same report, byte for byte. Templates live in
``medaudit/templates`` (one partial per core section); autoescaping is on, CSS is inlined,
figures are inline SVG drawn by :mod:`medaudit.figures`, images are data URIs, and nothing is
fetched.

The package computes *what* to show (plain strings, numbers, tables, SVG figures); the templates
decide *how* (all markup). User-supplied strings (paths, class and group names, metadata values,
warnings) only ever reach the templates as plain ``str`` and are escaped there.

* :mod:`.views` — the public building blocks (tables, figures, formatting, results accessors)
  that plugin sections use; the built-in calibration, OOD and subgroup sections use only these;
* :mod:`.format` — number formatting; :mod:`.core` — the core sections' views;
  :mod:`.summary` — verdict and findings; :mod:`.limitations` — warnings and derived notes;
* :mod:`.render` — assembly and rendering.
"""

from .format import fmt, fmt_ci, fmt_metric, fmt_p, label
from .render import RenderedReport, ReportView, build_view, render_report, render_report_files, render_section, stylesheet, template_env
from .summary import findings
from .views import Figure, Row, Table

__all__ = ["Figure", "RenderedReport", "ReportView", "Row", "Table", "build_view", "findings", "fmt", "fmt_ci", "fmt_metric", "fmt_p",
           "label", "render_report", "render_report_files", "render_section", "stylesheet", "template_env"]
