"""The plugin conformance kit: contract checks for perturbations, metrics, detectors, loaders,
report sections and entry points.

Modelled on scikit-learn's estimator checks: every ``check_*`` function tests one clause of a
contract and raises ``AssertionError`` (failed) or :class:`SkipCheck` (not applicable); which
checks apply to an object is decided by :func:`yield_checks` from what the object declares
(a perturbation's ``dims``, a metric's ``tasks``, a detector's ``needs``). Use it either way::

    from medaudit.testing import check_plugin_object, parametrize_with_checks

    check_plugin_object(MyPerturbation).assert_ok()          # one report, all checks

    @parametrize_with_checks([MyPerturbation, MyMetric()])   # one pytest test per check
    def test_conformance(obj, check):
        check(obj)

Per-object options (real images for the severity check, the tasks a metric is checked on,
metric keys allowed to be NaN, expected failures) are given by wrapping the object with
:func:`subject`. Expected failures are declared with a reason, ``xfail={"check_name": "why"}``;
a key is a check's base name (all its variants) or its full name (``"check_x[3d]"``).

Sizes are small so the whole catalogue is checked in seconds: 2D images are 32×32 and 3D volumes
16³. A perturbation that needs larger inputs declares ``min_spatial_size: int`` (the smallest
edge length it supports) and is checked at that size instead.

Two checks are about the plugin as installed rather than one object:
:func:`check_entry_point` loads it through its entry point as an audit does, and
:func:`check_report_section` renders its report sections into a whole report on a real
results.json.

The kit is a package by what it checks: :mod:`~medaudit.testing.records` (subjects, checks,
records, reports), :mod:`~medaudit.testing.runner` (choosing and running checks),
:mod:`~medaudit.testing.perturbations`, :mod:`~medaudit.testing.metrics`,
:mod:`~medaudit.testing.detectors`, :mod:`~medaudit.testing.loaders`,
:mod:`~medaudit.testing.sections` and :mod:`~medaudit.testing.entry_points`. Import from
``medaudit.testing`` itself: the module layout is not part of the API.
"""

from __future__ import annotations

from .detectors import (
    check_detector_declaration,
    check_detector_detects_obvious_shift,
    check_detector_deterministic,
    check_detector_embed_shape,
    check_detector_score_contract,
    check_detector_score_keeps_state,
    head_batch,
    synthetic_batch,
    toy_head,
)
from .entry_points import check_entry_point
from .loaders import DatasetLoader, check_loader_bad_file, check_loader_missing_file, check_loader_opens_valid
from .metrics import (
    TASKS,
    check_metric_count_weights_equal_resampling,
    check_metric_curves_json,
    check_metric_declaration,
    check_metric_edge_cases,
    check_metric_inputs_unchanged,
    check_metric_permutation_invariant,
    check_metric_point_row_unweighted,
    check_metric_returns_rows,
    default_context,
    synthetic_predictions,
)
from .perturbations import (
    DEFAULT_SIZE,
    FLOAT_DTYPES,
    check_perturbation_batch_split_invariant,
    check_perturbation_declaration,
    check_perturbation_describe_json,
    check_perturbation_deterministic,
    check_perturbation_finite_in_range,
    check_perturbation_inference_mode,
    check_perturbation_no_host_sync,
    check_perturbation_sample_params,
    check_perturbation_severities_documented,
    check_perturbation_severity_monotone,
    check_perturbation_severity_zero_identity,
    check_perturbation_shape_dtype_device,
    phantom,
)
from .records import Check, CheckRecord, CheckReport, SkipCheck, Status, Subject, object_name, subject
from .runner import check_plugin_object, parametrize_with_checks, yield_checks
from .sections import CANARY, check_report_section, render_section

__all__ = [
    "CheckRecord", "CheckReport", "DatasetLoader", "SkipCheck", "Subject", "check_entry_point",
    "check_plugin_object", "check_report_section", "parametrize_with_checks", "phantom", "render_section",
    "subject", "yield_checks",
]
