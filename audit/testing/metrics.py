"""Metric checks: ``[R]`` rows per key, weights as resampling counts, edge cases, no side effects."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..metric import Metric, MetricContext
from .records import Check, Subject

TASKS = ("binary", "multiclass", "multilabel")


def metric_checks(sub: Subject) -> Iterator[Check]:
    metric: Metric = sub.obj
    yield Check(check_metric_declaration)
    declared = tuple(t for t in getattr(metric, "tasks", ()) if t in TASKS)
    tasks = tuple(t for t in (sub.tasks or declared) if t in declared)
    nan_keys = tuple(getattr(metric, "nan_keys", ())) + tuple(sub.nan_keys)
    for task in tasks:
        ctx = default_context(task)
        yield Check(check_metric_returns_rows, task, ctx=ctx)
        yield Check(check_metric_permutation_invariant, task, ctx=ctx)
        yield Check(check_metric_point_row_unweighted, task, ctx=ctx)
        yield Check(check_metric_count_weights_equal_resampling, task, ctx=ctx)
        yield Check(check_metric_edge_cases, task, ctx=ctx, nan_keys=nan_keys)
        yield Check(check_metric_inputs_unchanged, task, ctx=ctx)
        yield Check(check_metric_curves_json, task, ctx=ctx)


def default_context(task: str) -> MetricContext:
    """The context the metric checks use: 2 classes for binary, 3 for multiclass and multilabel."""
    classes = ("negative", "positive") if task == "binary" else ("a", "b", "c")
    return MetricContext(task=task, classes=classes, n_bins=5)  # type: ignore[arg-type]


def synthetic_predictions(n: int, ctx: MetricContext, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Informative but imperfect predictions ``[N, K]`` and labels, every class present."""
    gen = torch.Generator().manual_seed(seed)
    k = len(ctx.classes)
    if ctx.task == "multilabel":
        labels = (torch.rand(n, k, generator=gen) < 0.5).to(torch.int64)
        labels[0], labels[1] = 1, 0  # every label has positives and negatives
        logits = 1.5 * (2 * labels - 1).double() + torch.randn(n, k, generator=gen, dtype=torch.float64)
        return torch.sigmoid(logits), labels
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=gen)]
    logits = 2.0 * torch.nn.functional.one_hot(labels, k).double() + torch.randn(n, k, generator=gen, dtype=torch.float64)
    return torch.softmax(logits, dim=1), labels


def _compute(metric: Metric, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
    out = metric.compute(probs, labels, weights, ctx)
    assert isinstance(out, dict) and out, f"compute() returned {type(out).__name__} {out!r}; expected a non-empty dict"
    return out


def _assert_results_close(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str, atol: float = 1e-9,
                          rtol: float = 1e-6) -> None:
    assert set(a) == set(b), f"{what}: result keys differ ({sorted(set(a) ^ set(b))})"
    for key in a:
        x, y = a[key].double().cpu(), b[key].double().cpu()
        assert x.shape == y.shape, f"{what}: {key!r} has shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            raise AssertionError(f"{what}: {key!r} differs: {x.tolist()} vs {y.tolist()}")


def check_metric_declaration(metric: Metric) -> None:
    """A non-empty ``name``, ``tasks`` within binary/multiclass/multilabel, a bool ``higher_is_better``."""
    assert isinstance(metric, Metric), f"{metric!r} is not a medaudit.metric.Metric instance"
    assert isinstance(metric.name, str) and metric.name.strip(), "name must be a non-empty str"
    assert metric.tasks and set(metric.tasks) <= set(TASKS), f"tasks {metric.tasks} must be a non-empty subset of {TASKS}"
    assert isinstance(metric.higher_is_better, bool), "higher_is_better must be a bool"


def check_metric_returns_rows(metric: Metric, ctx: MetricContext) -> None:
    """``compute`` returns ``{str: float Tensor [R]}`` with the same keys every call, finite on regular data."""
    probs, labels = synthetic_predictions(60, ctx)
    gen = torch.Generator().manual_seed(1)
    weights = torch.cat([torch.ones(1, 60), torch.randint(1, 3, (3, 60), generator=gen).float()])  # no class dropped
    out = _compute(metric, probs, labels, weights, ctx)
    for key, value in out.items():
        assert isinstance(key, str) and key, f"result key {key!r} must be a non-empty str"
        assert not any(c in key for c in "<>=! "), f"result key {key!r}: '<>=!' and spaces break --fail-on expressions"
        assert isinstance(value, Tensor), f"{key!r}: {type(value).__name__}, expected a Tensor"
        assert value.shape == (4,), f"{key!r}: shape {tuple(value.shape)}, expected [R] = (4,) for 4 weight rows"
        assert torch.is_floating_point(value), f"{key!r}: dtype {value.dtype}, expected floating point"
        assert bool(torch.isfinite(value).all()), f"{key!r} is not finite on regular data: {value.tolist()}"
    again = _compute(metric, probs, labels, torch.ones(2, 60), ctx)
    assert set(again) == set(out), f"the result keys depend on the weights: {sorted(set(again) ^ set(out))}"


def check_metric_permutation_invariant(metric: Metric, ctx: MetricContext) -> None:
    """Permuting the samples (probabilities, labels and weight columns together) changes nothing."""
    probs, labels = synthetic_predictions(50, ctx, seed=2)
    gen = torch.Generator().manual_seed(3)
    weights = torch.cat([torch.ones(1, 50), torch.randint(0, 4, (2, 50), generator=gen).float()])
    perm = torch.randperm(50, generator=gen)
    a = _compute(metric, probs, labels, weights, ctx)
    b = _compute(metric, probs[perm], labels[perm], weights[:, perm], ctx)
    _assert_results_close(a, b, "after permuting the samples")


def check_metric_point_row_unweighted(metric: Metric, ctx: MetricContext) -> None:
    """Each weight row is computed on its own: the ones row inside ``[R, N]`` equals the
    unweighted (single ones row) computation, and so does every other row alone."""
    probs, labels = synthetic_predictions(40, ctx, seed=4)
    gen = torch.Generator().manual_seed(5)
    weights = torch.cat([torch.ones(1, 40), torch.randint(0, 3, (2, 40), generator=gen).float()])
    stacked = _compute(metric, probs, labels, weights, ctx)
    for r in range(weights.shape[0]):
        alone = _compute(metric, probs, labels, weights[r : r + 1], ctx)
        what = "the point row (ones) vs the unweighted computation" if r == 0 else f"weight row {r} in a stack vs alone"
        _assert_results_close({k: v[r : r + 1] for k, v in stacked.items()}, alone, what)


def check_metric_count_weights_equal_resampling(metric: Metric, ctx: MetricContext) -> None:
    """Integer count weights equal the same metric on the data repeated by those counts (``np.repeat``)."""
    probs, labels = synthetic_predictions(40, ctx, seed=6)
    counts = np.random.default_rng(7).integers(0, 4, size=40)
    counts[: len(ctx.classes) * 2] = np.maximum(counts[: len(ctx.classes) * 2], 1)
    idx = torch.from_numpy(np.repeat(np.arange(40), counts))
    weighted = _compute(metric, probs, labels, torch.from_numpy(counts).double()[None], ctx)
    resampled = _compute(metric, probs[idx], labels[idx], torch.ones(1, idx.numel()), ctx)
    _assert_results_close(weighted, resampled, "count weights vs np.repeat resampling", atol=1e-7, rtol=1e-5)


def check_metric_edge_cases(metric: Metric, ctx: MetricContext, nan_keys: Sequence[str] = ()) -> None:
    """No exception and ``[R]`` results when one class is present, on tied and on hard 0/1
    probabilities; NaN only in keys documented as undefined (``nan_keys``), never ±Inf."""
    k = len(ctx.classes)
    n = 24
    probs, labels = synthetic_predictions(n, ctx, seed=8)
    single = torch.zeros_like(labels)  # only class 0 (multilabel: no label positive)
    ties = torch.full_like(probs, 0.5 if ctx.task == "multilabel" else 1.0 / k)
    hard_labels = labels
    if ctx.task == "multilabel":
        hard = labels.double().clone()
        hard[:3] = 1 - hard[:3]  # three confidently wrong samples
    else:
        hard_pred = labels.clone()
        hard_pred[:3] = (hard_pred[:3] + 1) % k
        hard = torch.nn.functional.one_hot(hard_pred, k).double()
    cases = {"one class present": (probs, single, True), "tied probabilities": (ties, labels, False),
             "hard 0/1 probabilities": (hard, hard_labels, False)}
    weights = torch.ones(2, n)
    for label, (p, y, nan_ok) in cases.items():
        try:
            out = metric.compute(p, y, weights, ctx)
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"{label}: compute() raised {type(exc).__name__}: {exc}") from None
        for key, value in out.items():
            assert isinstance(value, Tensor) and value.shape == (2,), f"{label}: {key!r} has shape {tuple(getattr(value, 'shape', ()))}, expected (2,)"
            v = value.double()
            assert not bool(torch.isinf(v).any()), f"{label}: {key!r} is infinite ({v.tolist()})"
            if bool(torch.isnan(v).any()):
                documented = nan_ok and any(fnmatch.fnmatchcase(key, pat) for pat in nan_keys)
                assert documented, (
                    f"{label}: {key!r} is NaN; NaN is allowed only for keys documented as undefined when a class "
                    f"is absent (nan_keys={list(nan_keys)})")


def check_metric_inputs_unchanged(metric: Metric, ctx: MetricContext) -> None:
    """``compute`` does not modify its inputs in place (the same tensors are shared by every metric)."""
    probs, labels = synthetic_predictions(30, ctx, seed=9)
    weights = torch.cat([torch.ones(1, 30), torch.full((1, 30), 2.0)])
    copies = (probs.clone(), labels.clone(), weights.clone())
    _compute(metric, probs, labels, weights, ctx)
    for name, before, after in zip(("probs", "labels", "weights"), copies, (probs, labels, weights)):
        assert torch.equal(before, after), f"compute() modified {name} in place"


def check_metric_curves_json(metric: Metric, ctx: MetricContext) -> None:
    """``curves()`` returns None or JSON-serialisable plot data without NaN."""
    probs, labels = synthetic_predictions(30, ctx, seed=10)
    curves = metric.curves(probs, labels, ctx)
    if curves is None:
        return
    try:
        json.dumps(curves, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"curves() is not JSON-serialisable (NaN must be None): {exc}") from None
