"""Classification and selective-prediction metrics against scikit-learn and brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from medaudit.bootstrap import bootstrap_weights
from medaudit.metric import MetricContext
from medaudit.plugins import classification as cls
from medaudit.plugins.classification import ClassificationMetrics, SelectivePredictionMetrics

CLASSES = ("normal", "benign", "malignant", "other")


def make_multiclass(n: int = 240, k: int = 4, seed: int = 0, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) * 1.5
    logits[np.arange(n), y] += 1.2
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    if decimals is not None:  # coarse scores: many ties
        p = np.round(p, decimals)
        p[:, -1] = 1 - p[:, :-1].sum(1)
        p = np.clip(p, 0, 1)
        p /= p.sum(1, keepdims=True)
    return p, y


def expand(w_row: torch.Tensor) -> np.ndarray:
    return np.repeat(np.arange(w_row.numel()), w_row.numpy().astype(int))


def rows(weights: torch.Tensor):
    for r in range(weights.shape[0]):
        yield r, expand(weights[r])


@pytest.mark.parametrize("decimals", [None, 1])
def test_multiclass_weighted_rows_match_sklearn_on_resampled_data(decimals):
    p, y = make_multiclass(decimals=decimals)
    w = bootstrap_weights(len(y), 4, seed=3)
    ctx = MetricContext("multiclass", CLASSES)
    out = ClassificationMetrics().compute(torch.tensor(p), torch.tensor(y), w, ctx)
    for r, idx in rows(w):
        pr, yr = p[idx], y[idx]
        pred = pr.argmax(1)
        assert out["accuracy"][r].item() == pytest.approx(skm.accuracy_score(yr, pred), abs=1e-12)
        assert out["balanced_accuracy"][r].item() == pytest.approx(skm.balanced_accuracy_score(yr, pred), abs=1e-12)
        assert out["auroc"][r].item() == pytest.approx(skm.roc_auc_score(yr, pr, multi_class="ovr", average="macro"), abs=1e-12)
        assert out["f1_macro"][r].item() == pytest.approx(skm.f1_score(yr, pred, average="macro"), abs=1e-12)
        recall = skm.recall_score(yr, pred, average=None, labels=range(4))
        for c, name in enumerate(CLASSES):
            assert out[f"sensitivity/{name}"][r].item() == pytest.approx(recall[c], abs=1e-12)
            spec = skm.recall_score(yr != c, pred != c)  # specificity = recall of the negatives
            assert out[f"specificity/{name}"][r].item() == pytest.approx(spec, abs=1e-12)


def binary_data(n=300, seed=1, decimals=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.3 * (2 * y - 1))))
    if decimals is not None:
        p1 = np.round(p1, decimals)
    return np.stack([1 - p1, p1], 1), y


def sens_at_spec_reference(y, score, target):
    fpr, tpr, _ = skm.roc_curve(y, score, drop_intermediate=False)
    ok = (1 - fpr) >= target - 1e-12
    return tpr[ok].max()


@pytest.mark.parametrize("decimals", [None, 1])
def test_binary_threshold_and_operating_point_match_sklearn(decimals):
    p, y = binary_data(decimals=decimals)
    w = bootstrap_weights(len(y), 4, seed=5)
    ctx = MetricContext("binary", ("healthy", "disease"), threshold=0.3, target_specificity=0.8)
    out = ClassificationMetrics().compute(torch.tensor(p), torch.tensor(y), w, ctx)
    assert "sensitivity/disease" not in out
    for r, idx in rows(w):
        pr, yr = p[idx], y[idx]
        pred = (pr[:, 1] >= 0.3).astype(int)
        assert out["accuracy"][r].item() == pytest.approx(skm.accuracy_score(yr, pred), abs=1e-12)
        assert out["sensitivity"][r].item() == pytest.approx(skm.recall_score(yr, pred), abs=1e-12)
        assert out["specificity"][r].item() == pytest.approx(skm.recall_score(1 - yr, 1 - pred), abs=1e-12)
        assert out["f1_macro"][r].item() == pytest.approx(skm.f1_score(yr, pred, average="macro"), abs=1e-12)
        assert out["auroc"][r].item() == pytest.approx(skm.roc_auc_score(yr, pr[:, 1]), abs=1e-12)
        assert out["sensitivity_at_spec"][r].item() == pytest.approx(sens_at_spec_reference(yr, pr[:, 1], 0.8), abs=1e-12)


def test_sensitivity_at_spec_hand_case():
    # negatives at 0.1, 0.2, 0.3, 0.4, 0.9; positives at 0.35, 0.5, 0.95.
    # spec >= 0.8 needs threshold > 0.4 (4 of 5 negatives below): predicted positive = {0.5, 0.9, 0.95}
    neg, pos = [0.1, 0.2, 0.3, 0.4, 0.9], [0.35, 0.5, 0.95]
    s = torch.tensor(neg + pos, dtype=torch.float64)
    y = torch.tensor([0] * 5 + [1] * 3)
    ctx = MetricContext("binary", ("n", "p"), target_specificity=0.8)
    out = ClassificationMetrics().compute(torch.stack([1 - s, s], 1), y, torch.ones(1, 8), ctx)
    assert out["sensitivity_at_spec"].item() == pytest.approx(2 / 3)


def test_multilabel_per_label_and_macro_match_sklearn():
    rng = np.random.default_rng(2)
    n, k = 200, 3
    y = (rng.random((n, k)) < [0.3, 0.5, 0.2]).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 1.5 * (2 * y - 1))))
    w = bootstrap_weights(n, 3, seed=0)
    ctx = MetricContext("multilabel", ("effusion", "edema", "nodule"), threshold=0.4)
    out = ClassificationMetrics().compute(torch.tensor(p), torch.tensor(y), w, ctx)
    for r, idx in rows(w):
        pr, yr = p[idx], y[idx]
        pred = (pr >= 0.4).astype(int)
        assert out["f1_macro"][r].item() == pytest.approx(skm.f1_score(yr, pred, average="macro"), abs=1e-12)
        assert out["auroc"][r].item() == pytest.approx(skm.roc_auc_score(yr, pr, average="macro"), abs=1e-12)
        for c, name in enumerate(ctx.classes):
            assert out[f"auroc/{name}"][r].item() == pytest.approx(skm.roc_auc_score(yr[:, c], pr[:, c]), abs=1e-12)
            assert out[f"sensitivity/{name}"][r].item() == pytest.approx(skm.recall_score(yr[:, c], pred[:, c]), abs=1e-12)
            assert out[f"accuracy/{name}"][r].item() == pytest.approx(skm.accuracy_score(yr[:, c], pred[:, c]), abs=1e-12)
            assert out[f"balanced_accuracy/{name}"][r].item() == pytest.approx(
                skm.balanced_accuracy_score(yr[:, c], pred[:, c]), abs=1e-12
            )
            ref = sens_at_spec_reference(yr[:, c], pr[:, c], 0.9)
            assert out[f"sensitivity_at_spec/{name}"][r].item() == pytest.approx(ref, abs=1e-12)


def test_single_class_present_gives_nan_auroc_and_nan_sensitivity_of_absent_classes():
    p, _ = make_multiclass(n=50)
    y = np.zeros(50, dtype=int)
    out = ClassificationMetrics().compute(torch.tensor(p), torch.tensor(y), torch.ones(1, 50), MetricContext("multiclass", CLASSES))
    assert torch.isnan(out["auroc"]).all()
    assert torch.isnan(out["sensitivity/benign"]).all()
    assert not torch.isnan(out["accuracy"]).any()
    # balanced accuracy averages only the classes present in the labels, as scikit-learn does
    assert out["balanced_accuracy"].item() == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))


def test_perfect_and_all_wrong_predictions():
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    perfect = torch.nn.functional.one_hot(y, 3).double() * 0.8 + 0.2 / 3 * (1 - torch.nn.functional.one_hot(y, 3).double()) * 1.5
    perfect = perfect / perfect.sum(1, keepdim=True)
    ctx = MetricContext("multiclass", ("a", "b", "c"))
    w = torch.ones(1, 6)
    out = ClassificationMetrics().compute(perfect, y, w, ctx) | SelectivePredictionMetrics().compute(perfect, y, w, ctx)
    for key in ("accuracy", "balanced_accuracy", "auroc", "f1_macro"):
        assert out[key].item() == pytest.approx(1.0)
    assert out["aurc"].item() == pytest.approx(0.0) and out["eaurc"].item() == pytest.approx(0.0)
    wrong = perfect[:, [1, 2, 0]]  # every prediction wrong, confidently
    out = ClassificationMetrics().compute(wrong, y, w, ctx) | SelectivePredictionMetrics().compute(wrong, y, w, ctx)
    assert out["accuracy"].item() == 0.0 and out["f1_macro"].item() == 0.0
    assert out["aurc"].item() == pytest.approx(1.0) and out["eaurc"].item() == pytest.approx(0.0, abs=1e-12)


def aurc_reference(conf: np.ndarray, wrong: np.ndarray) -> float:
    order = np.argsort(-conf, kind="stable")
    errors = np.cumsum(wrong[order])
    return float(np.mean(errors / np.arange(1, len(conf) + 1)))


def test_aurc_without_ties_matches_definition_and_eaurc_matches_brute_force_optimum():
    p, y = make_multiclass(n=150, seed=4)
    w = bootstrap_weights(150, 3, seed=1)
    out = SelectivePredictionMetrics().compute(torch.tensor(p), torch.tensor(y), w, MetricContext("multiclass", CLASSES))
    conf, wrong = p.max(1), (p.argmax(1) != y).astype(float)
    assert out["aurc"][0].item() == pytest.approx(aurc_reference(conf, wrong), abs=1e-12)
    best = aurc_reference(-wrong, wrong)  # all correct ranked first
    assert out["eaurc"][0].item() == pytest.approx(aurc_reference(conf, wrong) - best, abs=1e-12)
    for r, idx in rows(w):  # repeated samples are ties of one sample: same hit, so order is irrelevant
        assert out["aurc"][r].item() == pytest.approx(aurc_reference(conf[idx], wrong[idx]), abs=1e-10)
    assert (out["eaurc"] >= -1e-12).all()


def test_aurc_with_ties_is_expectation_over_tie_orders():
    conf = np.array([0.9, 0.7, 0.7, 0.7, 0.6, 0.6])
    wrong = np.array([0, 1, 0, 1, 0, 1], dtype=float)
    perms = []
    for a in itertools.permutations([1, 2, 3]):
        for b in itertools.permutations([4, 5]):
            order = [0, *a, *b]
            perms.append(np.mean(np.cumsum(wrong[order]) / np.arange(1, 7)))
    probs = torch.tensor(np.stack([conf, 1 - conf], 1))
    labels = torch.tensor(wrong.astype(int))  # arg-max is class 0; wrong where label is 1
    out = SelectivePredictionMetrics().compute(probs, labels, torch.ones(1, 6), MetricContext("binary", ("a", "b")))
    assert out["aurc"].item() == pytest.approx(np.mean(perms), abs=1e-12)


def test_confident_error_rate_hand_case():
    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.05, 0.95]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 1])  # wrong: rows 0 (conf .95), 1 (conf .9), 2 (conf .6)
    out = SelectivePredictionMetrics().compute(probs, labels, torch.tensor([[1.0, 1, 1, 1], [2.0, 0, 1, 1]]), MetricContext("binary", ("a", "b")))
    assert out["confident_error_rate"].tolist() == pytest.approx([2 / 4, 2 / 4])


def test_invalid_probabilities_raise_clear_errors():
    p, y = make_multiclass(n=20)
    bad = p.copy()
    bad[3] *= 1.2
    ctx = MetricContext("multiclass", CLASSES)
    with pytest.raises(ValueError, match=r"does not renormalise") as err:
        ClassificationMetrics().compute(torch.tensor(bad), torch.tensor(y), torch.ones(1, 20), ctx)
    assert "0.2" in str(err.value) and "row 3" in str(err.value)
    nan = p.copy()
    nan[5, 1] = np.nan
    for metric in (ClassificationMetrics(), SelectivePredictionMetrics()):
        with pytest.raises(ValueError, match="NaN"):
            metric.compute(torch.tensor(nan), torch.tensor(y), torch.ones(1, 20), ctx)
    with pytest.raises(ValueError, match="logits"):
        ClassificationMetrics().compute(torch.tensor(p) * 5 - 1, torch.tensor(y), torch.ones(1, 20), ctx)


def test_hook_returns_metrics_with_directions():
    metrics = cls.medaudit_metrics(config=None)
    assert {type(m) for m in metrics} == {ClassificationMetrics, SelectivePredictionMetrics}
    assert ClassificationMetrics.higher_is_better and not SelectivePredictionMetrics.higher_is_better
    assert cls.MEDAUDIT_API_VERSION == 1


def test_near_chance_flags_a_constant_predictor_whatever_the_class_balance() -> None:
    from types import SimpleNamespace

    from medaudit.outputs import Scenario
    from medaudit.plugins.classification import near_chance

    labels = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)  # imbalanced: the majority class is 80 % accurate
    ctx = MetricContext(task="multiclass", classes=("a", "b", "c"))

    def outputs(probs: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(labels=labels, scenarios=[Scenario.clean()], probs=probs[None], ctx=ctx,
                               index=lambda sid: 0)

    majority = torch.tensor([[0.8, 0.15, 0.05]]).expand(100, 3).contiguous()
    alert = near_chance(outputs(majority))  # type: ignore[arg-type]
    assert alert is not None and alert["alert"] and "balanced accuracy 0.333" in alert["message"]
    perfect = torch.nn.functional.one_hot(labels, 3).double() * 0.9 + 0.1 / 3
    assert near_chance(outputs(perfect)) is None  # type: ignore[arg-type]
