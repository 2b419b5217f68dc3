"""Built-in OOD / shift detectors (msp, max_logit, energy, entropy, mahalanobis, mahalanobis_ensemble, knn,
spectral and the post-hoc zoo: vim, react, ash, scale, dice_sparse, gen, rmd, kl_matching, she, nnguide, fdbd, odin (off
by default);
and the model-free floor, histogram),
their report section and their settings.

Modules: :mod:`.detectors` (the detectors; its docstring states the conventions), :mod:`.zoo_fitted`
and :mod:`.zoo_shaping` (the zoo: fitted feature-space scores, and activation shaping before the
head), :mod:`.histogram` (the intensity-histogram baseline), :mod:`.report`
(the "OOD and shift detection" section), :mod:`.settings` (``plugins.ood``); this module holds
the hooks and the public names. See docs/ood.md for formulas, conventions and citations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medaudit.detector import Detector
from medaudit.hookspecs import hookimpl
from medaudit.task import VOXEL_CLASS_SCORES, task_of
from medaudit.sections import ReportSection

from .detectors import (KNN, MSP, Energy, Entropy, Mahalanobis, MahalanobisEnsemble, MaxLogit, OutputDetector, Spectral,
                        kth_nn_distance, ledoit_wolf, pool, spectral_signature, two_class)
from .histogram import Histogram, intensity_histograms
from .odin import ODIN
from .report import ood_sections
from .settings import OodSettings
from .zoo_fitted import GEN, RMD, SHE, KLMatching, NNGuide, ViM
from .zoo_shaping import ASH, DICE, FDBD, SCALE, ReAct

if TYPE_CHECKING:  # annotation only: detectors need nothing from the config module at run time
    from medaudit.config import Config

MEDAUDIT_API_VERSION = 1

__all__ = [
    "ASH", "DICE", "FDBD", "GEN", "Histogram", "KNN", "MSP", "RMD", "SCALE", "SHE", "Energy", "Entropy", "KLMatching", "Mahalanobis",
    "MahalanobisEnsemble", "ODIN",
    "MaxLogit", "NNGuide", "OodSettings", "OutputDetector", "ReAct", "Spectral", "ViM",
    "intensity_histograms", "kth_nn_distance", "ledoit_wolf", "pool", "spectral_signature", "two_class",
]


@hookimpl
def medaudit_detectors(config: Config) -> list[Detector]:
    """The built-in detectors, with ``plugins.ood.energy_temperature`` and ``plugins.ood.knn_k``."""
    settings = config.plugin_settings("ood")
    outputs: list[OutputDetector] = [MSP(), MaxLogit(), Energy(settings.energy_temperature), Entropy(), GEN()]
    maps = VOXEL_CLASS_SCORES in task_of(config.task).capabilities
    if maps:
        for d in outputs:
            d.voxelwise = True  # a segmentation map: each image scores the mean of its voxels' scores
    else:
        outputs.append(KLMatching())  # templates per predicted class: an image has no single prediction
    # the zoo's head-based detectors run where the audit verified a linear head (needs_head), and
    # rmd needs a class per image: a segmentation map has neither, so they are not offered for one
    zoo: list[Detector] = [] if maps else [ViM(), ReAct(), ASH(), SCALE(), DICE(), RMD(), SHE(), NNGuide(), FDBD()]
    if settings.odin and not maps:  # gradients through the model: off unless asked for; per-voxel maps have no ODIN
        zoo.append(ODIN(settings.odin_temperature, settings.odin_epsilon))
    # one stage (resolved by the audit before this hook runs, or null): the ensemble would be a
    # monotone copy of mahalanobis on the same layer, so it is offered for two stages or more
    stages = config.model.feature_layers
    ensemble = [MahalanobisEnsemble()] if stages == "auto" or (isinstance(stages, list) and len(stages) > 1) else []
    detectors: list[Detector] = [*outputs, Mahalanobis(), *ensemble, KNN(settings.knn_k), Spectral(), *zoo,
                                 Histogram()]
    for d in detectors:
        d.auroc_ci = settings.auroc_ci
    return detectors


@hookimpl
def medaudit_report_sections(results: dict[str, Any]) -> list[ReportSection]:
    return ood_sections(results)


@hookimpl
def medaudit_settings() -> type[OodSettings]:
    return OodSettings
