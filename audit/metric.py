"""The metric contract: weighted, batched over bootstrap resamples.

Every metric is computed on *weights* rather than on resampled copies of the data. Row ``r`` of
``weights`` (``[R, N]``) holds how many times each sample occurs in resample ``r``; the point
estimate is the row of ones. A percentile bootstrap is then one call over all resamples, sorting
and binning happen once, and a paired bootstrap (clean vs perturbed) is the same weight matrix
passed for both scenarios. A metric computed with integer count weights equals the same metric
computed on the resampled data, which is how the built-ins are tested against scikit-learn.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

#: A task *name*: the value of ``task.type`` (built-ins ``"binary"``, ``"multiclass"``,
#: ``"multilabel"``; plugins register more through ``medaudit_tasks``). The task object itself is
#: a :class:`medaudit.task.Task`.
Task = str


@dataclass(frozen=True)
class MetricContext:
    """What a metric needs to know besides predictions: the task and the audit's settings."""

    task: Task
    classes: tuple[str, ...]
    threshold: float = 0.5
    n_bins: int = 15
    target_specificity: float = 0.9


class Metric(ABC):
    """Base class of a metric family.

    ``compute`` returns one or more named values per weight row; names are the keys of a
    scenario's ``metrics`` in results.json (e.g. ``"accuracy"``, ``"sensitivity/pneumonia"``).

    Class attributes
    ----------------
    name : str
        Family name; also the default result key.
    tasks : tuple[str, ...]
        Names of the tasks it applies to (built-ins ``"binary"``, ``"multiclass"``,
        ``"multilabel"``, or a plugin's task, see :mod:`medaudit.task`).
    higher_is_better : bool
        Direction of every key it returns (``*_score``-like metrics True, losses and errors False).
    """

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("binary", "multiclass")
    higher_is_better: ClassVar[bool] = True

    @abstractmethod
    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        """Compute the metric for every row of ``weights``.

        Parameters
        ----------
        probs : Tensor ``[N, K]`` float
            The task's ``metric_input`` quantity of every sample: for the built-in tasks class
            probabilities (rows sum to 1 for binary/multiclass; independent sigmoid outputs for
            multilabel; binary tasks have ``K = 2``).
        labels : Tensor ``[N]`` int64, or ``[N, K]`` {0, 1} for multilabel.
        weights : Tensor ``[R, N]`` float
            Non-negative sample weights, one row per estimate (ones for the point estimate,
            bootstrap counts for resamples).
        ctx : MetricContext

        Returns
        -------
        dict mapping result key to a float tensor ``[R]``; NaN where undefined for that row
        (e.g. AUROC of a resample that holds one class only).

        Notes
        -----
        :func:`medaudit.bootstrap.evaluate` calls this once per chunk of weight rows; wrap work
        that does not depend on ``weights`` in :func:`medaudit.bootstrap.row_invariant` so that
        it runs once per call.
        """

    def curves(self, probs: Tensor, labels: Tensor, ctx: MetricContext) -> dict[str, Any] | None:
        """Optional JSON-ready plot data for the report (e.g. reliability-diagram bins)."""
        return None
