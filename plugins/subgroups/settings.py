"""``plugins.subgroups``: the subgroup analysis's settings (formerly the core's ``subgroups`` section)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

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
    permutations: int | Literal["auto"] = Field(
        "auto", description="permutations of each gap's test: auto (the default: the fewest with which a gap can be "
        "significant after Holm's correction, floor(m / alpha) for a family of m tests, within 1000..20000) or a "
        "number (0: no tests)",
        json_schema_extra=legacy_key("subgroups.permutations"))
    holm_family: Literal["audit", "scenario"] = Field(
        "audit", description="the family of Holm's correction of the gaps' p-values: 'audit' (every gap tested in "
        "the audit, the default) or 'scenario' (one family per scenario)",
        json_schema_extra=legacy_key("subgroups.holm_family"))

    @field_validator("permutations", mode="before")
    @classmethod
    def _permutations(cls, v: Any) -> Any:
        # one message for the union (pydantic would list why each member failed); "2000" and 2000.0
        # are 2000, as pydantic's int read them before auto existed
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        elif isinstance(v, float) and v.is_integer():
            v = int(v)
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"permutations must be auto or a number of permutations (0 or more; 0: no tests), got {v!r}")
