"""Built-in OOD / shift detectors (msp, max_logit, energy, entropy, mahalanobis, knn, spectral),
their report section and their settings.

Modules: :mod:`.detectors` (the detectors; its docstring states the conventions), :mod:`.report`
(the "OOD and shift detection" section), :mod:`.settings` (``plugins.ood``); this module holds
the hooks and the public names. See docs/ood.md for formulas, conventions and citations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medaudit.detector import Detector
from medaudit.hookspecs import hookimpl
from medaudit.task import VOXEL_CLASS_SCORES, task_of
from medaudit.sections import ReportSection

from .detectors import (KNN, MSP, Energy, Entropy, Mahalanobis, MaxLogit, OutputDetector, Spectral,
                        kth_nn_distance, ledoit_wolf, pool, spectral_signature, two_class)
from .report import ood_sections
from .settings import OodSettings

if TYPE_CHECKING:  # annotation only: detectors need nothing from the config module at run time
    from medaudit.config import Config

MEDAUDIT_API_VERSION = 1

__all__ = [
    "KNN", "MSP", "Energy", "Entropy", "Mahalanobis", "MaxLogit", "OodSettings", "OutputDetector", "Spectral",
    "kth_nn_distance", "ledoit_wolf", "pool", "spectral_signature", "two_class",
]


@hookimpl
def medaudit_detectors(config: Config) -> list[Detector]:
    """The built-in detectors, with ``plugins.ood.energy_temperature`` and ``plugins.ood.knn_k``."""
    settings = config.plugin_settings("ood")
    outputs: list[OutputDetector] = [MSP(), MaxLogit(), Energy(settings.energy_temperature), Entropy()]
    if VOXEL_CLASS_SCORES in task_of(config.task).capabilities:
        for d in outputs:
            d.voxelwise = True  # a segmentation map: each image scores the mean of its voxels' scores
    detectors: list[Detector] = [*outputs, Mahalanobis(), KNN(settings.knn_k), Spectral()]
    for d in detectors:
        d.auroc_ci = settings.auroc_ci
    return detectors


@hookimpl
def medaudit_report_sections(results: dict[str, Any]) -> list[ReportSection]:
    return ood_sections(results)


@hookimpl
def medaudit_settings() -> type[OodSettings]:
    return OodSettings
