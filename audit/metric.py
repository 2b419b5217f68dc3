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


def class_names(ctx: MetricContext, k: int) -> tuple[str, ...]:
    """Names of the ``k`` classes (or labels) as they appear in result keys (``sensitivity/<name>``).

    Parameters
    ----------
    ctx : MetricContext
    k : int
        Number of probability columns the metric received.

    Returns
    -------
    ``ctx.classes`` when it names exactly ``k`` classes, else ``("0", ..., "k-1")`` (a context
    built without class names, e.g. in a test, still gives distinct keys).
    """
    return tuple(ctx.classes) if len(ctx.classes) == k else tuple(str(i) for i in range(k))


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
    headline : tuple[str, ...]
        Result keys shown in the report's standard tables (robustness, findings, subgroups), most
        important first. The first is the family's *lead* key, drawn in the degradation curves
        and the mCE table. Empty (the default): the keys are in results.json only.
    headline_order : int
        Where this family's headline keys go among other families' (lower first). The first
        headline key overall is the audit's primary metric. The built-ins use 100
        (classification) and 200 (calibration).
    digits : int
        Decimal digits the report shows for every key of the family.
    percent : bool
        Show values multiplied by 100 with a % sign (for shares in [0, 1]).
    definitions : dict[str, str]
        Plain-text definition of each result key, or of a key prefix before ``/`` (e.g.
        ``"sensitivity"`` for ``sensitivity/<class>``): formula, symbols, reference. The report's
        appendix lists them, so a reader of the evidence sees what every number means.

    The display declarations go into results.json (``metric_info``), so a report re-rendered
    from results.json alone shows the same tables.
    """

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("binary", "multiclass")
    higher_is_better: ClassVar[bool] = True
    headline: ClassVar[tuple[str, ...]] = ()
    headline_order: ClassVar[int] = 500
    digits: ClassVar[int] = 3
    percent: ClassVar[bool] = False
    definitions: ClassVar[dict[str, str]] = {}

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
