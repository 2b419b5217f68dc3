"""Per-sample outputs of a whole audit, as analysis plugins and the results builder see them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .metric import Metric, MetricContext


@dataclass(frozen=True)
class Scenario:
    """One evaluation condition: the clean data, or a perturbation at a severity."""

    id: str
    suite: str | None = None
    perturbation: str | None = None
    severity: int = 0

    @classmethod
    def clean(cls) -> "Scenario":
        return cls("clean")

    @classmethod
    def perturbed(cls, name: str, suite: str, severity: int) -> "Scenario":
        return cls(f"{name}@{severity}", suite, name, severity)


@dataclass
class AuditOutputs:
    """Everything the forward passes produced, merged and ordered by sample index.

    ``probs`` is ``[S, N, K]`` in the order of ``scenarios``; ``ood_scores`` maps a detector name
    to ``[S, N]`` (higher = more shifted, NaN where a sample was used to fit the detector).
    ``bootstrap_weights`` is the ``[R, N]`` count matrix every scenario's CIs use (paired).
    """

    scenarios: list[Scenario]
    sample_ids: list[str]
    labels: Tensor
    probs: Tensor
    metadata: dict[str, list[Any]]
    metrics: list[Metric]
    ctx: MetricContext
    bootstrap_weights: Tensor
    confidence: float
    seed: int
    ood_scores: dict[str, Tensor] = field(default_factory=dict)
    scenario_params: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def index(self, scenario_id: str) -> int:
        return next(i for i, s in enumerate(self.scenarios) if s.id == scenario_id)
