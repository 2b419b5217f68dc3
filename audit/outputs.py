"""Per-sample outputs of a whole audit, as analysis plugins and the results builder see them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .metric import Metric, MetricContext
from .task import Task, task_named


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


@dataclass(init=False)
class AuditOutputs:
    """Everything the forward passes produced, merged and ordered by sample index.

    ``quantities`` maps every per-sample quantity the task declares
    (:meth:`medaudit.task.Task.quantities`) to ``[S, N, *shape]`` in the order of ``scenarios``;
    :attr:`probs` is the class probabilities ``[S, N, K]`` of a task that keeps them (the
    built-in tasks do). ``ood_scores`` maps a detector name to ``[S, N]`` (higher = more
    shifted, NaN where a sample was used to fit the detector). ``bootstrap_weights`` is the
    ``[R, N]`` count matrix every scenario's CIs use (paired). :attr:`task` is the audit's task.

    Constructed as before with ``probs`` (a tensor, or None when ``quantities`` is given).
    """

    scenarios: list[Scenario]
    sample_ids: list[str]
    labels: Tensor
    quantities: dict[str, Tensor]
    metadata: dict[str, list[Any]]
    metrics: list[Metric]
    ctx: MetricContext
    bootstrap_weights: Tensor
    confidence: float
    seed: int
    ood_scores: dict[str, Tensor]
    scenario_params: dict[str, dict[str, Tensor]]

    def __init__(self, scenarios: list[Scenario], sample_ids: list[str], labels: Tensor, probs: Tensor | None,
                 metadata: dict[str, list[Any]], metrics: list[Metric], ctx: MetricContext, bootstrap_weights: Tensor,
                 confidence: float, seed: int, ood_scores: dict[str, Tensor] | None = None,
                 scenario_params: dict[str, dict[str, Tensor]] | None = None, *,
                 quantities: Mapping[str, Tensor] | None = None, task: Task | None = None) -> None:
        self.scenarios, self.sample_ids, self.labels = scenarios, sample_ids, labels
        self.quantities = dict(quantities or {})
        if probs is not None:
            self.quantities["probs"] = probs
        self.metadata, self.metrics, self.ctx = metadata, metrics, ctx
        self.bootstrap_weights, self.confidence, self.seed = bootstrap_weights, confidence, seed
        self.ood_scores = ood_scores if ood_scores is not None else {}
        self.scenario_params = scenario_params if scenario_params is not None else {}
        self._task = task

    @property
    def probs(self) -> Tensor:
        """Class probabilities ``[S, N, K]``; AttributeError for a task that keeps none."""
        if "probs" not in self.quantities:
            raise AttributeError(f"task {self.ctx.task!r} keeps no class probabilities; its per-sample quantities "
                                 f"are {sorted(self.quantities)} (AuditOutputs.quantities)")
        return self.quantities["probs"]

    @property
    def task(self) -> Task:
        """The audit's task object (its capabilities say which analyses apply)."""
        return self._task if self._task is not None else task_named(self.ctx.task)

    def index(self, scenario_id: str) -> int:
        return next(i for i, s in enumerate(self.scenarios) if s.id == scenario_id)
