"""``plugins.ood``: the detectors' parameters (formerly ``audit.energy_temperature``, ``audit.knn_k``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medaudit.settings import PluginSettings, legacy_key


class OodSettings(PluginSettings):
    """``plugins.ood``: the detectors' parameters (formerly ``audit.energy_temperature``, ``audit.knn_k``)."""

    energy_temperature: float = Field(1.0, gt=0, description="temperature T of the energy detector",
                                      json_schema_extra=legacy_key("audit.energy_temperature"))
    knn_k: int = Field(50, ge=1, description="neighbour rank k of the knn detector (capped at n-1)",
                       json_schema_extra=legacy_key("audit.knn_k"))
    auroc_ci: Literal["bootstrap", "delong"] = Field(
        "bootstrap", description="intervals of the detectors' AUROCs (shift and failure detection): the audit's "
                                 "percentile bootstrap, or DeLong's asymptotic variance (an analytic normal interval; "
                                 "paired for clean vs shifted)")
    odin: bool = Field(False, description="run the odin detector: one extra forward and backward pass and one extra "
                                          "forward pass per batch and scenario (about 3x the audit's model cost); "
                                          "classification only")
    odin_temperature: float = Field(1000.0, gt=0, description="temperature T of odin")
    odin_epsilon: float = Field(0.0014, ge=0, description="odin's input step, in [0, 1] intensity units (before "
                                                          "the audit's normalisation)")
