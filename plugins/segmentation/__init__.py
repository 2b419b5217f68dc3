"""The built-in ``segmentation`` task: per-image overlap and surface metrics, voxel calibration
and Dice-failure detection for 2D and 3D segmentation networks.

Contributed through the same hooks a third-party plugin uses: the task (:mod:`.task`), its metric
families (:mod:`.metrics`), built from the device-side kernels of :mod:`.measures` and
:mod:`.voxel_calibration`.
"""

from __future__ import annotations

from medaudit.config import Config
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric
from medaudit.task import Task

from .metrics import DistanceMetrics, OverlapMetrics, VoxelCalibration
from .task import SegmentationTask

MEDAUDIT_API_VERSION = 1


@hookimpl
def medaudit_tasks() -> list[Task]:
    return [SegmentationTask()]


@hookimpl
def medaudit_metrics(config: Config) -> list[Metric]:
    background = config.task.background
    return [OverlapMetrics(background), DistanceMetrics(background), VoxelCalibration()]
