"""Demographic and site subgroups: per-group metrics, gaps, permutation tests (issue 6).

An analysis plugin (``medaudit_analyze``): it never runs the model, it re-reads the per-sample
probabilities of every scenario and stratifies them by metadata columns (manifest CSV columns,
npz ``meta_<col>`` arrays, DICOM header fields, all delivered as ``outputs.metadata[col]``).

What it returns (see docs/subgroups.md for the formulas):

* ``subgroups``: one entry per (scenario, attribute, group) with ``n``, ``class_counts``,
  ``too_small`` and, for groups of at least ``subgroups.min_group_size`` samples, every metric
  with a percentile-bootstrap interval (the audit's shared weight matrix restricted to the
  group's columns). Under a perturbed scenario also the per-group ``drop`` from clean (paired).
* ``subgroup_gaps`` (lands in ``results["analyses"]``): per (scenario, attribute, metric) the
  gap max - min over groups with its bootstrap interval, the worst group, the min/max ratio,
  the worst group's paired difference from the other groups pooled (``worst_vs_rest``, whose
  interval, unlike the gap's, contains 0 when the groups cannot be told apart), a
  permutation-test p-value (``permutations: auto`` draws the fewest permutations with which a gap
  can be significant after the correction) and its Holm-Bonferroni adjustment (one family over
  the whole audit, or one per scenario: ``holm_family``); for binary tasks also
  fairlearn's demographic-parity and equalized-odds differences; under a perturbed scenario
  also the gap of the per-group drops ("does this artifact hurt one group more?").
* ``subgroup_settings`` (also in ``analyses``): attributes, groups, scenarios and metric sets, the
  number of permutations drawn and whether ``auto`` chose it (``permutations_rule``).
* ``warnings``: attributes that are missing, unbinned continuous columns, untestable gaps.

Scenarios analysed: ``clean`` with every metric of the audit, and each perturbation at its
highest severity run with the headline metrics (:data:`HEADLINE`), computed for all groups at
once with group sums (:func:`headline_rows`) so that the analysis stays within seconds.

Modules: :mod:`.attributes` (metadata columns to group codes), :mod:`.rows` (per-group metric
rows), :mod:`.permutations` (permutation tests, Holm), :mod:`.gaps` (gaps between groups) and
:mod:`.analysis` (the whole analysis, and which gaps form one family of Holm's correction);
this module holds the hook and the public names.
"""

from __future__ import annotations

from typing import Any

from medaudit.hookspecs import hookimpl
from medaudit.outputs import AuditOutputs
from medaudit.sections import ReportSection
from medaudit.task import SUBGROUPS

from .analysis import adjust_p_values, analysed_scenarios, analyze, measured_headline
from .attributes import (MAX_CATEGORIES, MISSING_GROUP, SEP, Attribute, bin_labels, build_attributes,
                         column_attribute, format_number, intersect, is_missing)
from .permutations import (AUTO_MAX, AUTO_MIN, Permutations, auto_permutations, holm, permutation_p,
                           permutations_needed, range_rows)
from .report import subgroup_sections
from .rows import HEADLINE, RATES, generic_rows, headline_rows, rest_rows
from .settings import SubgroupSettings

MEDAUDIT_API_VERSION = 1

__all__ = [
    "AUTO_MAX", "AUTO_MIN", "HEADLINE", "MAX_CATEGORIES", "MISSING_GROUP", "RATES", "SEP", "Attribute", "Permutations",
    "adjust_p_values", "analysed_scenarios", "auto_permutations", "permutations_needed",
    "analyze", "bin_labels", "build_attributes", "column_attribute", "format_number", "generic_rows", "headline_rows",
    "SubgroupSettings", "holm", "intersect", "is_missing", "measured_headline", "medaudit_analyze", "permutation_p", "range_rows", "rest_rows",
]


@hookimpl
def medaudit_analyze(outputs: AuditOutputs, config: Any) -> dict[str, Any] | None:
    """Subgroup metrics and gaps for ``plugins.subgroups``; None when no attribute is configured."""
    cfg = config.plugin_settings("subgroups")
    if not cfg.attributes and not cfg.intersections:
        return None
    if SUBGROUPS not in outputs.task.capabilities:
        return {"warnings": [f"subgroups: the subgroup analysis does not apply to a {outputs.task.name} task; "
                             "subgroups.attributes are ignored"]}
    return analyze(outputs, cfg)


@hookimpl
def medaudit_report_sections(results: dict[str, Any]) -> list[ReportSection]:
    return subgroup_sections(results)


@hookimpl
def medaudit_settings() -> type[SubgroupSettings]:
    return SubgroupSettings
