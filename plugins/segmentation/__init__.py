"""The built-in ``segmentation`` task: per-image overlap and surface metrics, voxel calibration
and Dice-failure detection for 2D and 3D segmentation networks.

Contributed through the same hooks a third-party plugin uses: the task (:mod:`.task`), its metric
families (:mod:`.metrics`) and its Dice-failure analysis (:mod:`.failure`), built from the device-side kernels of :mod:`.measures` and
:mod:`.voxel_calibration`.
"""

from __future__ import annotations

from typing import Any

from medaudit.config import Config
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric
from medaudit.outputs import AuditOutputs
from medaudit.sections import ReportSection
from medaudit.task import Task

from .failure import failure_analysis
from .metrics import DistanceMetrics, OverlapMetrics, VoxelCalibration
from .report import segmentation_sections
from .task import SegmentationTask

MEDAUDIT_API_VERSION = 1


@hookimpl
def medaudit_tasks() -> list[Task]:
    return [SegmentationTask()]


@hookimpl
def medaudit_metrics(config: Config) -> list[Metric]:
    background = config.task.background
    return [OverlapMetrics(background), DistanceMetrics(background), VoxelCalibration()]


@hookimpl
def medaudit_analyze(outputs: AuditOutputs, config: Config) -> dict[str, Any] | None:
    """Dice-failure detection and the uncertainty–Dice correlation (:mod:`.failure`)."""
    if outputs.ctx.task != SegmentationTask.name:
        return None
    return {"segmentation": failure_analysis(outputs, config)}


@hookimpl
def medaudit_report_sections(results: dict[str, Any]) -> list[ReportSection]:
    return segmentation_sections(results)
