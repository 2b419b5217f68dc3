"""Bootstrap weights, percentile intervals, chunked evaluation, paired drops and small-n warnings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medaudit import bootstrap as bs
from medaudit.bootstrap import bootstrap_weights, evaluate, interval, paired_drop, small_n_warnings
from medaudit.metric import Metric, MetricContext
from medaudit.plugins.calibration import CalibrationMetrics
from medaudit.plugins.classification import ClassificationMetrics, SelectivePredictionMetrics


def test_weights_shape_counts_and_seed():
    w = bootstrap_weights(50, 20, seed=7)
    assert w.shape == (21, 50) and (w[0] == 1).all()
    assert torch.equal(w.sum(dim=1), torch.full((21,), 50.0))
    assert torch.equal(w, w.round()) and (w >= 0).all()
    assert torch.equal(w, bootstrap_weights(50, 20, seed=7))
    assert not torch.equal(w, bootstrap_weights(50, 20, seed=8))
    assert bootstrap_weights(5, 0, seed=0).shape == (1, 5)
    # each sample appears with probability 1 - (1 - 1/n)^n ≈ 0.63 in a resample
    big = bootstrap_weights(400, 200, seed=1)[1:]
    assert (big > 0).double().mean().item() == pytest.approx(1 - (1 - 1 / 400) ** 400, abs=0.01)


def test_weights_blocks_are_deterministic(monkeypatch):
    monkeypatch.setattr(bs, "_CHUNK_ELEMENTS", 100)  # 2 rows per block for n = 50
    w = bootstrap_weights(50, 7, seed=3)
    assert torch.equal(w, bootstrap_weights(50, 7, seed=3))
    assert torch.equal(w.sum(dim=1), torch.full((8,), 50.0))


def test_interval_percentiles_nan_and_no_resamples():
    vals = torch.tensor([0.5, *np.linspace(0, 1, 101)])
    out = interval(vals, 0.9)
    assert out["value"] == 0.5
    assert out["ci_low"] == pytest.approx(np.percentile(np.linspace(0, 1, 101), 5))
    assert out["ci_high"] == pytest.approx(np.percentile(np.linspace(0, 1, 101), 95))
    with_nan = torch.tensor([0.5, 0.1, float("nan"), 0.3, float("nan"), 0.2])
    assert interval(with_nan, 0.5)["ci_low"] == pytest.approx(np.percentile([0.1, 0.3, 0.2], 25))
    assert interval(torch.tensor([0.7], dtype=torch.float64), 0.95) == {"value": 0.7, "ci_low": None, "ci_high": None}
    assert interval(torch.tensor([float("nan"), float("nan")]))["value"] is None


def data(n, acc, seed, k=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    correct = torch.rand(n, generator=g) < acc
    pred = torch.where(correct, y, (y + 1 + torch.randint(0, k - 1, (n,), generator=g)) % k)
    conf = 0.5 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64)
    p = torch.full((n, k), 0.0, dtype=torch.float64) + ((1 - conf) / (k - 1))[:, None]
    p[torch.arange(n), pred] = conf
    return p, y


def test_evaluate_chunked_equals_unchunked_and_has_all_keys(monkeypatch):
    p, y = data(120, 0.7, 0)
    w = bootstrap_weights(120, 30, seed=0)
    ctx = MetricContext("multiclass", ("a", "b", "c"))
    metrics = [ClassificationMetrics(), SelectivePredictionMetrics(), CalibrationMetrics()]
    res, raw = evaluate(metrics, p, y, w, ctx, 0.95)
    monkeypatch.setattr(bs, "_CHUNK_ELEMENTS", 7 * 120)  # 7 rows per chunk
    res2, raw2 = evaluate(metrics, p, y, w, ctx, 0.95)
    assert raw.keys() == raw2.keys()
    for key in raw:
        assert torch.allclose(raw[key], raw2[key], equal_nan=True, atol=1e-12), key
        assert raw[key].shape == (31,)
    assert {"accuracy", "auroc", "aurc", "ece", "brier", "sensitivity/a"} <= res.keys()
    assert res["accuracy"]["ci_low"] <= res["accuracy"]["value"] <= res["accuracy"]["ci_high"]
    with pytest.raises(ValueError, match="more than one metric"):
        evaluate([ClassificationMetrics(), ClassificationMetrics()], p, y, w, ctx)


def test_evaluate_skips_metrics_of_other_tasks_and_validates():
    p = torch.rand(40, 2, dtype=torch.float64)
    y = (torch.rand(40, 2) < 0.5).long()
    res, _ = evaluate([SelectivePredictionMetrics(), CalibrationMetrics()], p, y, bootstrap_weights(40, 5, 0),
                      MetricContext("multilabel", ("x", "y")))
    assert "aurc" not in res and "ece/x" in res
    with pytest.raises(ValueError, match="does not renormalise"):
        evaluate([ClassificationMetrics()], p, y[:, 0], bootstrap_weights(40, 5, 0), MetricContext("binary", ("n", "p")))


def test_percentile_intervals_cover_the_truth_in_simulation():
    # 120 independent data sets of a classifier with true accuracy 0.8; nominal 90% coverage
    ctx = MetricContext("multiclass", ("a", "b", "c"))
    hits = 0
    trials = 120
    for t in range(trials):
        p, y = data(150, 0.8, seed=100 + t)
        res, _ = evaluate([ClassificationMetrics()], p, y, bootstrap_weights(150, 200, seed=t), ctx, 0.9)
        hits += res["accuracy"]["ci_low"] <= 0.8 <= res["accuracy"]["ci_high"]
    assert 0.8 <= hits / trials <= 0.97


def test_paired_drop_flags_planted_drop_and_not_a_null_one():
    ctx = MetricContext("multiclass", ("a", "b", "c"))
    p, y = data(300, 0.8, seed=1)
    w = bootstrap_weights(300, 400, seed=2)
    _, clean = evaluate([ClassificationMetrics()], p, y, w, ctx)
    # planted: 15% of samples become wrong
    worse = p.clone()
    flip = torch.arange(300) % 7 == 0
    worse[flip] = worse[flip][:, [1, 2, 0]]
    _, pert = evaluate([ClassificationMetrics()], worse, y, w, ctx)
    drop = paired_drop(clean["accuracy"], pert["accuracy"], True, 0.95)
    assert drop["significant"] and drop["value"] > 0 and drop["ci_low"] > 0
    assert drop["relative"] == pytest.approx(drop["value"] / clean["accuracy"][0].item())
    # null: the probabilities change but no prediction does
    same = p.clone() * 0.9 + 0.1 / 3
    _, null = evaluate([ClassificationMetrics()], same, y, w, ctx)
    assert paired_drop(clean["accuracy"], null["accuracy"], True)["significant"] is False
    # null with changes both ways: 20 right predictions become wrong and 20 wrong become right
    right = (p.argmax(1) == y).nonzero().flatten()[:20]
    wrong = (p.argmax(1) != y).nonzero().flatten()[:20]
    mixed = p.clone()
    mixed[right] = mixed[right][:, [1, 2, 0]]
    mixed[wrong] = torch.nn.functional.one_hot(y[wrong], 3).double() * 0.7 + 0.1
    _, mixed_raw = evaluate([ClassificationMetrics()], mixed, y, w, ctx)
    null_drop = paired_drop(clean["accuracy"], mixed_raw["accuracy"], True)
    assert null_drop["value"] == pytest.approx(0.0, abs=1e-12) and null_drop["significant"] is False
    assert null_drop["ci_low"] < 0 < null_drop["ci_high"]
    # lower-is-better orientation: a larger ECE is a positive (worse) drop
    lower = paired_drop(torch.tensor([0.1, 0.1]), torch.tensor([0.3, 0.25]), False)
    assert lower["value"] == pytest.approx(0.2) and lower["relative"] == pytest.approx(2.0)
    assert paired_drop(torch.tensor([0.0, 0.0]), torch.tensor([0.3, 0.2]), False)["relative"] is None


def test_small_n_warnings():
    y = torch.tensor([0] * 20 + [1] * 5)
    msgs = small_n_warnings(y, ["benign", "malignant", "other"], "clean")
    assert any("only 25 samples" in m for m in msgs)
    assert any("'malignant' has 5" in m for m in msgs) and any("'other' has 0" in m for m in msgs)
    assert not any("'benign'" in m for m in msgs)
    assert small_n_warnings(torch.tensor([0, 1] * 30), ["a", "b"], "clean") == []
    ml = torch.tensor([[1, 0]] * 35 + [[0, 0]] * 5)
    msgs = small_n_warnings(ml, ["x", "y"], "blur@3")
    assert any("'y' has 0 positive" in m for m in msgs) and any("'x' has 5 negative" in m for m in msgs)


def test_batched_intervals_and_drops_equal_the_single_versions() -> None:
    from medaudit.bootstrap import interval, intervals, paired_drop, paired_drops

    g = torch.Generator().manual_seed(3)
    clean = {"a": torch.rand(201, generator=g, dtype=torch.float64), "b": torch.rand(201, generator=g, dtype=torch.float64)}
    pert = {"a": clean["a"] - 0.2, "b": torch.rand(201, generator=g, dtype=torch.float64)}
    clean["b"][[3, 7, 11]] = float("nan")  # undefined resamples are dropped
    pert["c"] = torch.full((201,), float("nan"), dtype=torch.float64)  # only in one scenario: no drop
    batched = intervals(clean, 0.9)
    for k, v in clean.items():
        assert batched[k] == pytest.approx(interval(v, 0.9))
    drops = paired_drops(clean, pert, {"a": True, "b": False}, 0.95)
    assert set(drops) == {"a", "b"}
    assert drops["a"] == pytest.approx(paired_drop(clean["a"], pert["a"], True, 0.95))
    assert drops["b"] == pytest.approx(paired_drop(clean["b"], pert["b"], False, 0.95))
    assert drops["a"]["significant"] is True


def test_bootstrap_weights_do_not_depend_on_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk bounds memory only: the same seed draws the same resamples whatever it is."""
    from medaudit import bootstrap as b

    reference = b.bootstrap_weights(300, 50, 9)
    monkeypatch.setattr(b, "_CHUNK_ELEMENTS", 1000)
    assert torch.equal(b.bootstrap_weights(300, 50, 9), reference)
    # cache-sized chunks on a CPU, large ones (fewer kernel launches) on an accelerator
    assert b.chunk_elements(torch.device("cpu")) == 1000
    assert b.chunk_elements(torch.device("cuda")) > 1000


def test_evaluate_validates_its_inputs_once_but_metrics_still_check_other_tensors(monkeypatch):
    """Inside evaluate() a metric's check of evaluate's own inputs (and of chunks of its weight
    rows) returns at once; a check of any other tensor, or of the same ones afterwards, runs."""
    from medaudit.metric import Metric

    p, y = data(60, 0.7, 1)
    w = bootstrap_weights(60, 20, seed=0)
    ctx = MetricContext("multiclass", ("a", "b", "c"))
    full_checks = []
    original_isfinite = torch.isfinite

    def counting_isfinite(x):
        if x is p:
            full_checks.append(1)
        return original_isfinite(x)

    bad = p.clone()
    bad[0, 0] = float("nan")

    class Probe(Metric):
        name = "probe"
        tasks = ("multiclass",)
        higher_is_better = True
        seen_error: list[str] = []

        def compute(self, probs, labels, weights, ctx):
            bs.check_predictions(probs, labels, ctx.task, weights)  # trusted: returns at once
            try:
                bs.check_predictions(bad, labels, ctx.task, weights)  # another tensor: checked
            except ValueError as exc:
                self.seen_error.append(str(exc))
            return {"probe": weights.sum(dim=1).double()}

    monkeypatch.setattr(bs, "_CHUNK_ELEMENTS", 5 * 60)  # 21 rows in chunks of 5: 5 compute calls
    monkeypatch.setattr(torch, "isfinite", counting_isfinite)
    evaluate([Probe()], p, y, w, ctx)
    assert len(full_checks) == 1  # evaluate's own validation only, not one per chunk
    assert len(Probe.seen_error) == 5 and "NaN" in Probe.seen_error[0]
    bs.check_predictions(p, y, "multiclass", w)  # outside evaluate: checked again
    assert len(full_checks) == 2


@pytest.mark.parametrize("fault", ["short", "missing_later"])
def test_evaluate_names_a_metric_returning_the_wrong_number_of_values(monkeypatch, fault):
    from medaudit.metric import Metric

    p, y = data(30, 0.7, 2)
    w = bootstrap_weights(30, 9, seed=0)  # 10 rows, in chunks of 4: 4, 4, 2

    class Faulty(Metric):
        name = "faulty"
        tasks = ("multiclass",)
        higher_is_better = True
        calls = 0

        def compute(self, probs, labels, weights, ctx):
            Faulty.calls += 1
            if fault == "short":
                return {"v": weights.sum(dim=1)[:-1].double()}
            return {"v": weights.sum(dim=1).double()} if Faulty.calls == 1 else {}

    monkeypatch.setattr(bs, "_CHUNK_ELEMENTS", 4 * 30)
    with pytest.raises(ValueError, match=r"metric 'faulty' returned \d+ values for 'v', expected 10"):
        evaluate([Faulty()], p, y, w, MetricContext("multiclass", ("a", "b", "c")))


class _CountingMetric(Metric):
    """Mean of p_0 per weight row; its row-invariant work counts how often it really runs."""

    name = "counting"

    def __init__(self) -> None:
        self.computed = 0
        self.calls = 0

    def compute(self, probs, labels, weights, ctx):  # type: ignore[no-untyped-def]
        self.calls += 1

        def work() -> torch.Tensor:
            self.computed += 1
            return probs[:, 0].double()

        p0 = bs.row_invariant(probs, labels, ("counting", "p0"), work)
        w = weights.double()
        return {"mean_p0": (w @ p0) / w.sum(dim=1)}


def test_row_invariant_work_runs_once_per_evaluate_call_and_only_for_its_inputs() -> None:
    n = 40_000  # 2**18 // n = 6 weight rows per chunk: 13 rows are three chunks
    probs = torch.softmax(torch.randn(n, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(1))
    weights = bootstrap_weights(n, 12, seed=0)
    ctx = MetricContext("multiclass", ("a", "b", "c"))
    metric = _CountingMetric()
    _, raw = evaluate([metric], probs, labels, weights, ctx)
    assert (metric.calls, metric.computed) == (3, 1)
    expected = (weights.double() @ probs[:, 0].double()) / weights.double().sum(dim=1)
    assert torch.allclose(raw["mean_p0"], expected, rtol=1e-12)
    evaluate([metric], probs, labels, weights, ctx)  # a new call computes it anew
    assert metric.computed == 2
    metric.compute(probs, labels, weights, ctx)  # outside evaluate: no cache
    metric.compute(probs, labels, weights, ctx)
    assert metric.computed == 4


def test_row_invariant_is_not_used_for_other_predictions_inside_evaluate() -> None:
    n = 40_000
    probs = torch.softmax(torch.randn(n, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(1))
    other = probs.flip(0)
    seen: list[torch.Tensor] = []

    class Nested(Metric):
        name = "nested"

        def compute(self, probs, labels, weights, ctx):  # type: ignore[no-untyped-def]
            for p in (probs, other):  # the same key, different predictions: never each other's value
                seen.append(bs.row_invariant(p, labels, ("nested",), lambda: p[:, 0].clone()))
            return {"x": weights.double().sum(dim=1)}

    evaluate([Nested()], probs, labels, bootstrap_weights(n, 12, seed=0), MetricContext("multiclass", ("a", "b", "c")))
    assert all(torch.equal(s, (probs if i % 2 == 0 else other)[:, 0]) for i, s in enumerate(seen))


@pytest.mark.parametrize("task,k", [("binary", 2), ("multiclass", 4), ("multilabel", 3)])
def test_builtin_metrics_with_row_invariant_work_equal_one_whole_call(task: str, k: int) -> None:
    n = 40_000  # three chunks of rows in evaluate, one call with every row here
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(n, k, generator=gen).round(decimals=1)  # ties in every score
    if task == "multilabel":
        probs, labels = torch.sigmoid(logits), torch.randint(0, 2, (n, k), generator=gen)
    else:
        probs, labels = torch.softmax(logits, dim=1), torch.randint(0, k, (n,), generator=gen)
    weights = bootstrap_weights(n, 12, seed=3)
    ctx = MetricContext(task, tuple("abcd"[:k]))
    metrics = [ClassificationMetrics(), CalibrationMetrics()] + ([SelectivePredictionMetrics()] if task != "multilabel" else [])
    _, raw = evaluate(metrics, probs, labels, weights, ctx)
    for metric in metrics:
        for key, val in metric.compute(probs, labels, weights, ctx).items():
            assert torch.allclose(raw[key], val.double(), rtol=1e-12, atol=1e-15, equal_nan=True), key
