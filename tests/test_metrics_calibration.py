"""Calibration metrics against netcal (binning reproduced exactly), scikit-learn and hand formulas."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss

from medaudit.bootstrap import bootstrap_weights
from medaudit.metric import MetricContext
from medaudit.plugins import calibration as cal
from medaudit.plugins.calibration import CalibrationMetrics

netcal_metrics = pytest.importorskip("netcal.metrics")
ECE, ACE, MCE = netcal_metrics.ECE, netcal_metrics.ACE, netcal_metrics.MCE

CLASSES = ("a", "b", "c", "d")


def make(n=300, k=4, seed=0, dtype=np.float64, decimals=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) * 2
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    if decimals is not None:
        p = np.round(p, decimals)
        p /= p.sum(1, keepdims=True)
    p[0] = np.eye(k)[y[0]]  # confidence exactly 1.0 (correct)
    p[1] = np.eye(k)[(y[1] + 1) % k]  # confidence exactly 1.0 (wrong)
    return p.astype(dtype), y


def netcal(metric, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric.measure(*args)


@pytest.mark.parametrize("dtype,decimals,n_bins", [(np.float64, None, 15), (np.float32, None, 15), (np.float64, 2, 10)])
def test_binned_metrics_match_netcal_on_every_resample(dtype, decimals, n_bins):
    p, y = make(dtype=dtype, decimals=decimals)
    w = bootstrap_weights(len(y), 4, seed=2)
    out = CalibrationMetrics().compute(torch.tensor(p), torch.tensor(y), w, MetricContext("multiclass", CLASSES, n_bins=n_bins))
    for r in range(w.shape[0]):
        idx = np.repeat(np.arange(len(y)), w[r].numpy().astype(int))
        pr, yr = p[idx], y[idx]
        assert len(np.unique(yr)) > 2  # netcal's multiclass (top-label) mode
        assert out["ece"][r].item() == pytest.approx(netcal(ECE(bins=n_bins), pr, yr), abs=1e-9)
        assert out["mce"][r].item() == pytest.approx(netcal(MCE(bins=n_bins), pr, yr), abs=1e-9)
        # netcal's ACE defaults to equal-width bins; ours is the equal-mass (adaptive) variant
        assert out["ace"][r].item() == pytest.approx(netcal(ACE(bins=n_bins, equal_intervals=False), pr, yr), abs=1e-9)
        classwise = np.mean([netcal(ECE(bins=n_bins), pr[:, c], (yr == c).astype(int)) for c in range(4)])
        assert out["classwise_ece"][r].item() == pytest.approx(classwise, abs=1e-9)


def test_confidence_of_one_lands_in_last_bin():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.3, 0.2]], dtype=torch.float64)
    y = torch.tensor([0, 2, 0])
    ctx = MetricContext("multiclass", ("x", "y", "z"), n_bins=15)
    bins = CalibrationMetrics().curves(p, y, ctx)["reliability"]["bins"]
    assert bins[-1]["count"] == 2 and bins[-1]["accuracy"] == 0.5
    assert bins[-1]["upper"] == 1.0 and sum(b["count"] for b in bins) == 3
    ece = CalibrationMetrics().compute(p, y, torch.ones(1, 3), ctx)["ece"].item()
    conf, correct = p.numpy().max(1), (p.numpy().argmax(1) == y.numpy()).astype(int)
    assert ece == pytest.approx(netcal(ECE(bins=15), conf, correct), abs=1e-12)
    # hand value: last bin holds confidences 1, 1 with accuracy 1/2; bin [7/15, 8/15) holds 0.5, correct
    assert ece == pytest.approx((2 * abs(0.5 - (1 - np.finfo(np.float64).eps)) + abs(1 - 0.5)) / 3, abs=1e-12)


def test_binary_task_is_top_label_unlike_netcal_binary_mode():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=400) * 2 + 1.2 * (2 * y - 1))))
    p = np.stack([1 - p1, p1], 1)
    out = CalibrationMetrics().compute(torch.tensor(p), torch.tensor(y), torch.ones(1, 400), MetricContext("binary", ("n", "p")))
    conf, correct = p.max(1), (p.argmax(1) == y).astype(int)
    # ours == netcal's ECE of (top-label confidence, correctness), in netcal's binary mode
    assert out["ece"].item() == pytest.approx(netcal(ECE(bins=15), conf, correct), abs=1e-9)
    assert out["ace"].item() == pytest.approx(netcal(ACE(bins=15, equal_intervals=False), conf, correct), abs=1e-9)
    # netcal.measure(probs, y) on a binary task measures positive-class calibration instead:
    positive_class = netcal(ECE(bins=15), p, y)
    assert positive_class == pytest.approx(netcal(ECE(bins=15), p1, y), abs=1e-12)
    assert abs(out["ece"].item() - positive_class) > 1e-3


def test_ace_survives_tied_quantile_edges_where_netcal_fails():
    # 60% of confidences tie at one value: several equal-mass edges coincide (zero-width bins);
    # scipy's binned_statistic_dd inside netcal raises, our searchsorted binning leaves them empty
    conf = np.r_[np.full(60, 0.8), np.linspace(0.3, 0.95, 40)]
    correct = (np.arange(100) % 3 != 0).astype(int)
    with pytest.raises(ValueError):
        netcal(ACE(bins=15, equal_intervals=False), conf, correct)
    p = torch.tensor(np.stack([conf, 1 - conf], 1))
    out = CalibrationMetrics().compute(p, torch.tensor(1 - correct), torch.ones(1, 100), MetricContext("binary", ("a", "b")))
    assert torch.isfinite(out["ace"]).all()
    # hand check: the tied block forms one bin with gap |acc - 0.8|, averaged with the others
    assert 0 <= out["ace"].item() <= 1


def test_multiclass_subset_with_two_labels_stays_top_label():
    p, y = make(n=200)
    keep = y < 2  # a subgroup holding two of four classes
    pk, yk = p[keep], y[keep]
    with pytest.raises(RuntimeError):  # netcal switches to binary mode and refuses K > 2
        netcal(ECE(bins=15), pk, yk)
    out = CalibrationMetrics().compute(torch.tensor(pk), torch.tensor(yk), torch.ones(1, len(yk)), MetricContext("multiclass", CLASSES))
    conf, correct = pk.max(1), (pk.argmax(1) == yk).astype(int)
    assert out["ece"].item() == pytest.approx(netcal(ECE(bins=15), conf, correct), abs=1e-9)


def test_brier_and_nll_match_hand_formula_and_sklearn():
    p, y = make(n=120, seed=3)
    w = bootstrap_weights(120, 3, seed=4)
    out = CalibrationMetrics().compute(torch.tensor(p), torch.tensor(y), w, MetricContext("multiclass", CLASSES))
    for r in range(w.shape[0]):
        idx = np.repeat(np.arange(120), w[r].numpy().astype(int))
        pr, yr = p[idx], y[idx]
        brier = np.mean(np.sum((pr - np.eye(4)[yr]) ** 2, axis=1))
        assert out["brier"][r].item() == pytest.approx(brier, abs=1e-12)
        assert out["nll"][r].item() == pytest.approx(log_loss(yr, pr, labels=range(4)), abs=1e-9)
    pb = p[2:, :2] + 1e-3  # rows 0, 1 are one-hot and may have no mass on classes 0, 1
    pb, yb = pb / pb.sum(1, keepdims=True), y[2:] % 2
    ob = CalibrationMetrics().compute(torch.tensor(pb), torch.tensor(yb), torch.ones(1, 118), MetricContext("binary", ("n", "p")))
    assert ob["brier"].item() == pytest.approx(2 * brier_score_loss(yb, pb[:, 1]), abs=1e-12)


def test_perfect_confident_predictions_are_perfectly_calibrated():
    y = torch.tensor([0, 1, 2, 1])
    p = torch.nn.functional.one_hot(y, 3).double()
    out = CalibrationMetrics().compute(p, y, torch.ones(1, 4), MetricContext("multiclass", ("a", "b", "c")))
    for key in ("ece", "ace", "mce", "classwise_ece", "brier"):
        assert out[key].item() == pytest.approx(0.0, abs=1e-12)
    wrong = p[:, [1, 2, 0]]
    out = CalibrationMetrics().compute(wrong, y, torch.ones(1, 4), MetricContext("multiclass", ("a", "b", "c")))
    assert out["ece"].item() == pytest.approx(1.0) and out["brier"].item() == pytest.approx(2.0)
    assert out["nll"].item() == pytest.approx(-np.log(np.finfo(np.float64).eps))


def test_multilabel_per_label_ece_brier_nll():
    rng = np.random.default_rng(5)
    n, k = 250, 3
    y = (rng.random((n, k)) < 0.4).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 1.2 * (2 * y - 1))))
    ctx = MetricContext("multilabel", ("l0", "l1", "l2"))
    out = CalibrationMetrics().compute(torch.tensor(p), torch.tensor(y), torch.ones(1, n), ctx)
    per = [netcal(ECE(bins=15), p[:, c], y[:, c]) for c in range(k)]
    for c in range(k):
        assert out[f"ece/l{c}"].item() == pytest.approx(per[c], abs=1e-9)
    assert out["ece"].item() == pytest.approx(np.mean(per), abs=1e-9)
    assert out["brier"].item() == pytest.approx(np.mean(np.sum((p - y) ** 2, 1)), abs=1e-12)
    assert out["nll"].item() == pytest.approx(sum(log_loss(y[:, c], p[:, c]) for c in range(k)), abs=1e-9)


def test_reliability_curve_bins_are_consistent_with_ece():
    p, y = make(n=500, seed=6)
    ctx = MetricContext("multiclass", CLASSES, n_bins=12)
    bins = CalibrationMetrics().curves(torch.tensor(p), torch.tensor(y), ctx)["reliability"]["bins"]
    assert len(bins) == 12 and sum(b["count"] for b in bins) == 500
    assert [b["lower"] for b in bins] == pytest.approx(list(np.linspace(0, 1, 13)[:-1]))
    ece = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    out = CalibrationMetrics().compute(torch.tensor(p), torch.tensor(y), torch.ones(1, 500), ctx)
    assert out["ece"].item() == pytest.approx(ece, abs=1e-12)


def test_invalid_inputs_raise():
    p, y = make(n=30)
    ctx = MetricContext("multiclass", CLASSES)
    with pytest.raises(ValueError, match="does not renormalise"):
        CalibrationMetrics().compute(torch.tensor(p * 0.9), torch.tensor(y), torch.ones(1, 30), ctx)
    p[4, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        CalibrationMetrics().compute(torch.tensor(p), torch.tensor(y), torch.ones(1, 30), ctx)


def test_hook_and_direction():
    (metric,) = cal.medaudit_metrics(config=None)
    assert isinstance(metric, CalibrationMetrics) and metric.higher_is_better is False
