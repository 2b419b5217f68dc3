"""``plugins.subgroups``: the subgroup analysis's settings (formerly the core's ``subgroups`` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medaudit.settings import PluginSettings, legacy_key


class SubgroupSettings(PluginSettings):
    """``plugins.subgroups`` (formerly the ``subgroups`` section, still accepted key by key)."""

    attributes: list[str] = Field(default_factory=list, description="metadata columns to stratify by",
                                  json_schema_extra=legacy_key("subgroups.attributes"))
    intersections: list[list[str]] = Field(default_factory=list, description="combinations of attributes to stratify by",
                                           json_schema_extra=legacy_key("subgroups.intersections"))
    bins: dict[str, list[float]] = Field(default_factory=dict, description="bin edges of continuous attributes",
                                         json_schema_extra=legacy_key("subgroups.bins"))
    min_group_size: int = Field(30, ge=1, description="smaller groups get no metrics or tests",
                                json_schema_extra=legacy_key("subgroups.min_group_size"))
    permutations: int = Field(1000, ge=0, description="permutations of each gap's test (0: none)",
                              json_schema_extra=legacy_key("subgroups.permutations"))
    holm_family: Literal["audit", "scenario"] = Field(
        "audit", description="the family of Holm's correction of the gaps' p-values: 'audit' (every gap tested in "
        "the audit, the default) or 'scenario' (one family per scenario)",
        json_schema_extra=legacy_key("subgroups.holm_family"))
