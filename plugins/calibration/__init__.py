"""Calibration metrics (ECE, ACE, MCE, class-wise ECE, Brier, NLL), their report section and settings.

Modules: :mod:`.metrics` (the metrics; its docstring states the binning conventions and where
they differ from netcal on purpose), :mod:`.report` (the "Calibration" section: reliability
diagram, calibration table, temperature scaling), :mod:`.settings` (``plugins.calibration``);
this module holds the hooks and the public names.
"""

from __future__ import annotations

from typing import Any

from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric
from medaudit.sections import ReportSection

from .metrics import CalibrationMetrics, classwise_columns, classwise_ece
from .report import calibration_sections
from .settings import CalibrationSettings

MEDAUDIT_API_VERSION = 1

__all__ = ["CalibrationMetrics", "CalibrationSettings", "classwise_columns", "classwise_ece"]


@hookimpl
def medaudit_metrics(config: object) -> list[Metric]:
    return [CalibrationMetrics()]


@hookimpl
def medaudit_report_sections(results: dict[str, Any]) -> list[ReportSection]:
    return calibration_sections(results)


@hookimpl
def medaudit_settings() -> type[CalibrationSettings]:
    return CalibrationSettings
