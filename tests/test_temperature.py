"""Temperature scaling: the fit against netcal, cross-fitting, and the report."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from medaudit.temperature import _logits, fit_inverse_temperature, temperature_report


def overconfident(n=400, k=4, seed=0, sharpen=3.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += 1.0
    y_true = np.array([rng.choice(k, p=np.exp(r) / np.exp(r).sum()) for r in z])  # calibrated at T = 1
    p = np.exp(sharpen * z)
    p /= p.sum(1, keepdims=True)
    return p, y_true


@pytest.mark.parametrize("binary", [False, True])
def test_fitted_temperature_matches_netcal(binary):
    scaling = pytest.importorskip("netcal.scaling")
    p, y = overconfident()
    if binary:
        p = p[:, :2] / p[:, :2].sum(1, keepdims=True)
        y = (y == 1).astype(int)
    ts = scaling.TemperatureScaling()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts.fit(p[:, 1] if binary else p, y)
    beta_netcal = float(np.asarray(ts.temperature).ravel()[0])  # netcal stores the logit multiplier 1/T
    beta = fit_inverse_temperature(_logits(torch.tensor(p)), torch.tensor(y))
    assert beta == pytest.approx(beta_netcal, rel=1e-4)


def test_recovers_known_temperature():
    p, y = overconfident(n=3000, sharpen=3.0)
    beta = fit_inverse_temperature(_logits(torch.tensor(p)), torch.tensor(y))
    assert 1 / beta == pytest.approx(3.0, rel=0.15)


def test_report_cross_fits_clean_and_applies_full_temperature_to_shifted():
    p, y = overconfident(n=400)
    shifted = p ** 1.5
    shifted /= shifted.sum(1, keepdims=True)
    probs = torch.tensor(np.stack([p, shifted]))
    rep = temperature_report(probs, torch.tensor(y), ["clean", "contrast@3"], "multiclass", n_bins=15, seed=0, folds=5)
    json.dumps(rep)
    assert rep["folds"] == 5 and len(rep["fold_temperatures"]) == 5
    assert rep["temperature"] > 1.5  # over-confident model: T > 1
    clean = rep["scenarios"]["clean"]
    assert clean["cross_fitted"] and clean["nll_after"] < clean["nll_before"] and clean["ece_after"] < clean["ece_before"]
    shift = rep["scenarios"]["contrast@3"]
    assert not shift["cross_fitted"] and shift["nll_after"] < shift["nll_before"]
    # the shifted scenario is scaled with the all-clean temperature: check by hand
    t = rep["temperature"]
    z = np.log(np.clip(shifted, np.finfo(float).eps, 1 - np.finfo(float).eps)) / t
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    assert shift["nll_after"] == pytest.approx(-np.mean(np.log(q[np.arange(400), y])), abs=1e-9)
    # each clean fold temperature is fitted without its fold, so differs from the full fit
    assert all(ft != t for ft in rep["fold_temperatures"])
    rep2 = temperature_report(probs, torch.tensor(y), ["clean", "contrast@3"], "multiclass", n_bins=15, seed=0)
    assert rep2 == rep  # seeded folds


def test_report_multilabel_and_errors():
    rng = np.random.default_rng(3)
    y = (rng.random((200, 2)) < 0.4).astype(int)
    p = 1 / (1 + np.exp(-3 * (rng.normal(size=(200, 2)) + (2 * y - 1))))
    rep = temperature_report(torch.tensor(p)[None], torch.tensor(y), ["clean"], "multilabel", 10, seed=1, folds=3)
    assert len(rep["temperature"]) == 2 and len(rep["fold_temperatures"][0]) == 2
    with pytest.raises(ValueError, match="clean"):
        temperature_report(torch.tensor(p)[None], torch.tensor(y), ["blur@1"], "multilabel", 10, seed=1)
    with pytest.raises(ValueError, match="renormalise"):
        temperature_report(torch.tensor(p)[None], torch.tensor(y[:, 0]), ["clean"], "binary", 10, seed=1)
