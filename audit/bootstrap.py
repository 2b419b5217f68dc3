"""Percentile-bootstrap confidence intervals on weight matrices, paired drops and input checks.

Every metric is computed on a weight matrix ``[1 + R, N]`` (see :mod:`medaudit.metric`): row 0 is
ones (the point estimate), rows ``1..R`` are multinomial bootstrap counts. Because the *same*
matrix is used for every scenario, the difference of a metric between the clean scenario and a
perturbed one, row by row, is a paired bootstrap of the drop.

This module also holds :func:`check_predictions`, the one input validation every built-in metric
runs, so that a malformed probability matrix fails with the same clear message whichever metric
sees it first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import Tensor

from .errors import ConfigError
from .metric import Metric, MetricContext
from .rng import stream_generator
from .task import ALL_QUANTITIES, PROB_SUM_ATOL, Task, task_named

__all__ = [
    "PROB_SUM_ATOL",
    "bootstrap_weights",
    "check_predictions",
    "evaluate",
    "interval",
    "paired_drop",
    "row_invariant",
    "small_n_warnings",
]

# Rows of the bootstrap weight matrix evaluated (and drawn) at once on a CPU: rows x samples <=
# 256K elements, so the float64 temporaries (2 MiB) stay in cache and are reused from the heap
# instead of being fresh page-faulting mmaps; 4M elements made the metrics of a 2048-sample
# scenario 2x slower. The drawn weights do not depend on it (one sequential stream).
_CHUNK_ELEMENTS = 1 << 18
# On an accelerator memory is plentiful and each chunk costs kernel launches: 256K-element chunks
# made the metric and detector phases of an H100 audit 2-3x slower than 4M-element ones.
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 22


def chunk_elements(device: torch.device) -> int:
    """How many elements of ``[rows, N]`` temporaries to evaluate at once on ``device``."""
    return _CHUNK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


# The inputs :func:`evaluate` is computing metrics on, once validated: every metric checks its
# inputs, and evaluate calls each one per chunk of weight rows, so the same probabilities were
# re-checked hundreds of times per scenario (1.2 s of a 10,000-sample audit). Checks of exactly
# these tensors (weights: rows of the validated matrix) return at once while the metrics run.
_VALIDATED: ContextVar[tuple[Tensor, Tensor, str, Tensor] | None] = ContextVar("medaudit_validated", default=None)


# Work on the predictions that every chunk of weight rows would otherwise repeat, kept for one
# evaluate() call (see row_invariant).
_PER_CALL: ContextVar[dict[tuple[Any, ...], Any] | None] = ContextVar("medaudit_per_call", default=None)
_T = TypeVar("_T")


def row_invariant(probs: Tensor, labels: Tensor, key: tuple[Any, ...], compute: Callable[[], _T]) -> _T:
    """``compute()``, once per :func:`evaluate` call instead of once per chunk of weight rows.

    :func:`evaluate` calls each metric on chunks of rows, so work that depends on the
    predictions and labels but not on the weights (sorting scores into tie groups, binning
    confidences) was repeated for every chunk: ``R N / 2**18`` times per scenario, which made
    the metrics of a 10,000-sample audit grow faster than N. A metric wraps such work in this.

    Parameters
    ----------
    probs, labels : Tensor
        The ``probs`` and ``labels`` the metric was called with. The result is kept only when
        they are the very tensors :func:`evaluate` is computing on; a direct call of the
        metric, or one on other predictions, just computes.
    key : tuple
        Names the work among everything the metrics of one call keep: start it with the
        metric's name, then what the work depends on besides ``probs`` and ``labels``
        (e.g. ``("classification", "tie_groups", class_index)``).
    compute : callable
        The work; called at most once per :func:`evaluate` call and key.
    """
    trusted, cache = _VALIDATED.get(), _PER_CALL.get()
    if trusted is None or cache is None or probs is not trusted[0] or labels is not trusted[1]:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _already_validated(probs: Tensor, labels: Tensor, task: str, weights: Tensor | None) -> bool:
    trusted = _VALIDATED.get()
    if trusted is None or probs is not trusted[0] or labels is not trusted[1] or task != trusted[2]:
        return False
    whole = trusted[3]
    # a chunk evaluate() sliced from the validated rows shares its storage, columns and layout
    return weights is None or (weights.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
                               and weights.shape[1:] == whole.shape[1:] and weights.stride() == whole.stride()
                               and weights.dtype == whole.dtype)


def check_predictions(probs: Tensor, labels: Tensor, task: str | Task, weights: Tensor | None = None) -> None:
    """Validate predictions, labels and weights before any metric is computed.

    The task validates them (:meth:`medaudit.task.Task.check_outputs`); for the built-in tasks
    that is :func:`medaudit.task.check_class_probabilities`. medaudit never renormalises
    probabilities: a row that does not sum to 1 almost always means the model's outputs are
    logits or independent sigmoids and the configuration is wrong.

    Parameters
    ----------
    probs : Tensor ``[N, K]`` float
        The task's metric input: class probabilities for the built-in tasks (binary/multiclass
        rows must sum to 1 within :data:`PROB_SUM_ATOL`; multilabel entries are independent
        probabilities in ``[0, 1]``).
    labels : Tensor ``[N]`` integer in ``[0, K)``, or ``[N, K]`` in {0, 1} for multilabel.
    task : str or Task
        The task, or its name (``ctx.task``): the task an audit in this process bound, or an
        installed one (:func:`medaudit.task.task_named`).
    weights : Tensor ``[R, N]``, optional
        Non-negative finite sample weights.

    Raises
    ------
    ValueError
        Naming the problem, how large it is and the first offending row.
    """
    name = task if isinstance(task, str) else task.name
    if _already_validated(probs, labels, name, weights):
        return
    if isinstance(task, str):
        try:
            task = task_named(task)
        except ConfigError:
            raise ValueError(f"unknown task {name!r}") from None
    # a task whose metrics take every quantity (ALL_QUANTITIES) is handed the mapping itself
    task.check_outputs(probs if task.metric_input == ALL_QUANTITIES else {task.metric_input: probs}, labels, weights)


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------


def bootstrap_weights(n: int, n_resamples: int, seed: int, device: torch.device | str | None = None, *,
                      ood_set: str | None = None) -> Tensor:
    """Weight matrix of the point estimate and ``n_resamples`` bootstrap resamples.

    Parameters
    ----------
    n : int
        Number of samples ``N``.
    n_resamples : int
        Number of bootstrap resamples ``R`` (0: the point estimate only).
    seed : int
        The audit seed. The resamples of the audit's samples are drawn from its stream
        ``"bootstrap"`` (:func:`medaudit.rng.stream_generator`).
    device : torch.device or str, optional
        Where the returned matrix lives.
    ood_set : str, optional
        The name of an external OOD set (``--ood-data``) whose samples these are: its resamples
        come from the stream ``("ood-data", ood_set)``, independent of the audit's.

    Returns
    -------
    Tensor ``[1 + R, N]`` float32
        Row 0 is ones; row ``r`` holds how often each sample occurs in resample ``r``
        (multinomial counts, each row sums to ``N``).

    Notes
    -----
    Draws are made on the CPU generator, so the matrix is the same for a seed whatever the
    target device. Indices are drawn in blocks of a size fixed by ``n`` alone (bounded memory,
    still deterministic) and turned into counts with one ``scatter_add_`` per block.
    Float32 counts are exact (counts are at most ``N`` < 2**24 in practice).
    """
    if n < 0 or n_resamples < 0:
        raise ValueError(f"n and n_resamples must be non-negative, got {n}, {n_resamples}")
    gen = stream_generator(seed, "bootstrap") if ood_set is None else stream_generator(seed, "ood-data", ood_set)
    weights = torch.ones(1 + n_resamples, n, dtype=torch.float32)
    if n_resamples and n:
        block = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, n_resamples, block):
            rows = min(block, n_resamples - start)
            idx = torch.randint(0, n, (rows, n), generator=gen)
            counts = torch.zeros(rows, n, dtype=torch.float32)
            counts.scatter_add_(1, idx, torch.ones(rows, n, dtype=torch.float32))
            weights[1 + start : 1 + start + rows] = counts
    return weights.to(device) if device is not None else weights


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def interval(values: Tensor, confidence: float = 0.95) -> dict[str, float | None]:
    """Point estimate and percentile-bootstrap interval from per-row metric values.

    Parameters
    ----------
    values : Tensor ``[1 + R]``
        Row 0: the metric on the full data; rows ``1..R``: on each resample.
    confidence : float
        Coverage of the two-sided interval, e.g. 0.95.

    Returns
    -------
    dict with ``value``, ``ci_low``, ``ci_high`` (Python floats; ``None`` for NaN/undefined).
    ``ci_low``/``ci_high`` are ``None`` when ``R = 0`` or every resample is undefined.

    Notes
    -----
    Percentile interval (Efron & Tibshirani 1993, ch. 13): the ``(1-c)/2`` and ``(1+c)/2``
    quantiles (linear interpolation, as ``numpy.percentile``) of the resample values.
    Resamples where the metric is undefined (NaN, e.g. AUROC of a resample holding one class)
    are dropped, which conditions the interval on the metric being defined.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = values.detach().double().flatten().cpu()
    if values.numel() == 0:
        raise ValueError("values must hold at least the point estimate (row 0)")
    out: dict[str, float | None] = {"value": _finite_or_none(float(values[0])), "ci_low": None, "ci_high": None}
    resampled = values[1:]
    resampled = resampled[~torch.isnan(resampled)]
    if resampled.numel():
        alpha = (1.0 - confidence) / 2.0
        q = torch.quantile(resampled, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
        out["ci_low"], out["ci_high"] = _finite_or_none(float(q[0])), _finite_or_none(float(q[1]))
    return out


def intervals(values: dict[str, Tensor], confidence: float = 0.95) -> dict[str, dict[str, float | None]]:
    """:func:`interval` of many metrics at once: one ``nanquantile`` over a ``[K, 1 + R]`` stack.

    ``nanquantile`` ignores NaN rows exactly as :func:`interval` drops them, with the same linear
    interpolation, so the result equals ``{k: interval(v) for k, v in values.items()}``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not values:
        return {}
    keys = list(values)
    stack = torch.stack([values[k].detach().double().flatten().cpu() for k in keys])
    points = stack[:, 0].tolist()
    if stack.shape[1] > 1:
        alpha = (1.0 - confidence) / 2.0
        q = torch.nanquantile(stack[:, 1:], torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64), dim=1)
        lows, highs = q[0].tolist(), q[1].tolist()
    else:
        lows = highs = [None] * len(keys)
    return {k: {"value": _finite_or_none(p), "ci_low": _finite_or_none(lo), "ci_high": _finite_or_none(hi)}
            for k, p, lo, hi in zip(keys, points, lows, highs)}


def evaluate(
    metrics: Iterable[Metric],
    probs: Tensor,
    labels: Tensor,
    weights: Tensor,
    ctx: MetricContext,
    confidence: float = 0.95,
    validate: bool = True,
) -> tuple[dict[str, dict[str, float | None]], dict[str, Tensor]]:
    """Compute every applicable metric on every weight row, in bounded-memory chunks of rows.

    Parameters
    ----------
    metrics : iterable of Metric
        Metrics whose ``tasks`` exclude ``ctx.task`` are skipped.
    probs : Tensor ``[N, K]``
    labels : Tensor ``[N]`` or ``[N, K]`` (multilabel)
    weights : Tensor ``[1 + R, N]``
        Row 0 ones (point estimate), other rows bootstrap counts (see :func:`bootstrap_weights`).
    ctx : MetricContext
    confidence : float
        Interval coverage.
    validate : bool
        Check the inputs with :func:`check_predictions` (callers that already did pass False).

    Returns
    -------
    results : dict
        ``{key: {"value", "ci_low", "ci_high"}}``, the results.json form.
    raw : dict
        ``{key: Tensor [1 + R] float64}``, the per-row values (for paired drops).

    Raises
    ------
    ValueError
        On invalid inputs (see :func:`check_predictions`) or when two metrics emit the same key.
    """
    if validate:
        check_predictions(probs, labels, ctx.task, weights)
    n = weights.shape[1]  # probs may be a task's mapping of quantities (medaudit.task.ALL_QUANTITIES)
    chunk = max(1, chunk_elements(weights.device) // max(n, 1))
    raw: dict[str, Tensor] = {}
    token = _VALIDATED.set((probs, labels, ctx.task, weights))
    per_call = _PER_CALL.set({})
    try:
        _evaluate_rows(metrics, probs, labels, weights, ctx, chunk, raw)
    finally:
        _PER_CALL.reset(per_call)
        _VALIDATED.reset(token)
    return intervals(raw, confidence), raw


def _evaluate_rows(metrics: Iterable[Metric], probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext,
                   chunk: int, raw: dict[str, Tensor]) -> None:
    rows = weights.shape[0]
    for metric in metrics:
        if ctx.task not in metric.tasks:
            continue
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, rows, chunk):
            out = metric.compute(probs, labels, weights[start : start + chunk], ctx)
            for key, val in out.items():
                parts.setdefault(key, []).append(val.detach().double().reshape(-1).cpu())
        for key, vals in parts.items():
            if key in raw:
                raise ValueError(f"metric key {key!r} is emitted by more than one metric (last: {metric.name!r})")
            joined = torch.cat(vals)
            if joined.numel() != rows:
                raise ValueError(f"metric {metric.name!r} returned {joined.numel()} values for {key!r}, expected {rows}")
            raw[key] = joined


def paired_drop(
    clean_raw: Tensor, pert_raw: Tensor, higher_is_better: bool, confidence: float = 0.95
) -> dict[str, float | bool | None]:
    """Degradation from the clean scenario to a perturbed one, with a paired bootstrap interval.

    Parameters
    ----------
    clean_raw, pert_raw : Tensor ``[1 + R]``
        Per-row values of one metric on the clean and the perturbed scenario, computed with the
        same weight matrix (so row ``r`` of both is the same resample: a paired bootstrap).
    higher_is_better : bool
        The metric's direction.
    confidence : float

    Returns
    -------
    dict with
        ``value``: the drop, oriented so that **positive means worse**
        (``clean - perturbed`` when higher is better, ``perturbed - clean`` otherwise);
        ``ci_low``, ``ci_high``: percentile interval of the per-row drops;
        ``relative``: ``value / clean`` (``None`` when the clean value is 0 or undefined);
        ``significant``: True only when the interval excludes 0 (either side).
    """
    if clean_raw.shape != pert_raw.shape:
        raise ValueError(f"clean and perturbed rows differ in shape: {tuple(clean_raw.shape)} vs {tuple(pert_raw.shape)}")
    clean = clean_raw.detach().double().flatten().cpu()
    pert = pert_raw.detach().double().flatten().cpu()
    drop = clean - pert if higher_is_better else pert - clean
    out: dict[str, Any] = interval(drop, confidence)
    clean_value = float(clean[0])
    out["relative"] = (
        _finite_or_none(out["value"] / clean_value)
        if out["value"] is not None and math.isfinite(clean_value) and clean_value != 0
        else None
    )
    lo, hi = out["ci_low"], out["ci_high"]
    out["significant"] = bool(lo is not None and hi is not None and (lo > 0 or hi < 0))
    return out


def paired_drops(clean_raw: dict[str, Tensor], pert_raw: dict[str, Tensor], directions: dict[str, bool],
                 confidence: float = 0.95) -> dict[str, dict[str, float | bool | None]]:
    """:func:`paired_drop` for every key the two scenarios share, with one batched quantile call."""
    keys = [k for k in pert_raw if k in clean_raw]
    drops: dict[str, Tensor] = {}
    for k in keys:
        clean = clean_raw[k].detach().double().flatten().cpu()
        pert = pert_raw[k].detach().double().flatten().cpu()
        drops[k] = clean - pert if directions.get(k, True) else pert - clean
    out: dict[str, dict[str, Any]] = intervals(drops, confidence)
    for k in keys:
        clean_value = float(clean_raw[k].flatten()[0])
        o = out[k]
        o["relative"] = (_finite_or_none(o["value"] / clean_value)
                         if o["value"] is not None and math.isfinite(clean_value) and clean_value != 0 else None)
        lo, hi = o["ci_low"], o["ci_high"]
        o["significant"] = bool(lo is not None and hi is not None and (lo > 0 or hi < 0))
    return out


def small_n_warnings(
    labels: Tensor,
    classes: Sequence[str],
    scenario_id: str,
    min_n: int = 30,
    min_per_class: int = 10,
) -> list[str]:
    """Warnings for sample sizes too small for stable metrics and bootstrap intervals.

    Parameters
    ----------
    labels : Tensor ``[N]`` class indices, or ``[N, K]`` {0, 1} (multilabel: counts positives
        and negatives per label).
    classes : sequence of str
        Class (label) names; missing names fall back to the index.
    scenario_id : str
        Named in each message.
    min_n, min_per_class : int
        Thresholds below which a warning is issued.

    Returns
    -------
    list of str, empty when all counts are large enough.
    """
    warnings: list[str] = []
    n = int(labels.shape[0])
    if n < min_n:
        warnings.append(
            f"{scenario_id}: only {n} samples (< {min_n}); metric values and bootstrap intervals are unreliable"
        )

    def name(i: int) -> str:
        return classes[i] if i < len(classes) else str(i)

    if labels.ndim == 2:
        pos = labels.to(torch.int64).sum(dim=0)
        for i, p in enumerate(pos.tolist()):
            for kind, count in (("positive", p), ("negative", n - p)):
                if count < min_per_class:
                    warnings.append(
                        f"{scenario_id}: label {name(i)!r} has {count} {kind} samples (< {min_per_class}); "
                        "its AUROC, sensitivity and specificity intervals are unreliable"
                    )
    else:
        k = max(len(classes), int(labels.max()) + 1 if n else 0)
        counts = torch.bincount(labels.to(torch.int64).flatten(), minlength=k)
        for i, c in enumerate(counts.tolist()):
            if c < min_per_class:
                warnings.append(
                    f"{scenario_id}: class {name(i)!r} has {c} samples (< {min_per_class}); "
                    "its per-class metrics and AUROC intervals are unreliable"
                )
    return warnings
