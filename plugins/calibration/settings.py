"""``plugins.calibration``: the calibration metrics' settings (formerly ``audit.n_bins``)."""

from __future__ import annotations

from pydantic import Field

from medaudit.settings import PluginSettings, legacy_key


class CalibrationSettings(PluginSettings):
    """``plugins.calibration`` (formerly ``audit.n_bins``).

    The metrics read the bin count from ``MetricContext.n_bins``, which the core fills from
    ``audit.n_bins``, the alias this setting keeps in step: the subgroup ECE and the
    temperature-scaling report bin with the same count without naming this plugin.
    """

    n_bins: int = Field(15, ge=2, description="bins of the calibration metrics",
                        json_schema_extra=legacy_key("audit.n_bins"))
