r"""Post-hoc temperature scaling: how much of the miscalibration one scalar would fix, under shift.

Temperature scaling (Guo et al. 2017) rescales the logits, :math:`\hat p = \mathrm{softmax}(z/T)`,
with :math:`T` fitted by maximum likelihood on held-out data. The audit only holds one labelled
set, so

* on the **clean** scenario every sample is calibrated with a temperature fitted on the other
  folds (K-fold cross-fitting), so the "after" numbers are not fitted on the samples they score;
* on every **perturbed** scenario the temperature fitted on *all* clean samples is applied (the
  realistic deployment: calibrate in-distribution, meet shift afterwards).

Logits are recovered from probabilities as :math:`z = \log \mathrm{clip}(p, \epsilon, 1-\epsilon)`
(``eps`` of the input dtype, as netcal does); for a softmax this differs from the true logits by
a per-sample constant, which the softmax ignores, so the result is exact. Binary tasks use the
two-column softmax, identical to a sigmoid of :math:`(\log p_1 - \log p_0)/T`; multilabel tasks
fit one temperature per label on its sigmoid logit.

The fit minimises the mean NLL over :math:`\beta = 1/T`, which is convex in :math:`\beta`
(its second derivative is the mean variance of :math:`z` under :math:`\hat p`), by bisection on
the monotone derivative :math:`\frac{1}{n}\sum_i (\mathbb E_{\hat p_i}[z_i] - z_{i y_i})` over
:math:`\beta \in [10^{-3}, 10^{3}]`: robust, deterministic and precise to ~1e-12 relative.
It is checked against ``netcal.scaling.TemperatureScaling`` (whose ``temperature`` attribute
holds :math:`\beta`, the logit multiplier).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .binning import calibration_errors, clip_confidence, top_label
from .bootstrap import check_predictions
from .rng import stream_generator
from .scoring import negative_log_likelihood
from .task import Task

__all__ = ["fit_inverse_temperature", "temperature_report"]

_BETA_BOUNDS = (1e-3, 1e3)


def _logits(probs: Tensor) -> Tensor:
    eps = torch.finfo(probs.dtype).eps
    return torch.log(probs.clamp(eps, 1.0 - eps).double())


def fit_inverse_temperature(logits: Tensor, labels: Tensor, iterations: int = 100) -> float:
    r"""Maximum-likelihood inverse temperature :math:`\beta = 1/T` of softmax(``beta * logits``).

    Parameters
    ----------
    logits : Tensor ``[N, K]`` float64
    labels : Tensor ``[N]`` int64
    iterations : int
        Bisection steps on :math:`\log\beta` (100 halve the bracket to machine precision).

    Returns
    -------
    float
        :math:`\beta`, clamped to ``[1e-3, 1e3]`` (reached only for separable or constant data).
    """
    z = logits.double()
    z_true = z.gather(1, labels.to(torch.int64)[:, None])[:, 0]

    def slope(beta: float) -> float:
        # d/d(beta) of mean NLL: E_p[z] - z_y, increasing in beta
        p = torch.softmax(beta * z, dim=1)
        return float(((p * z).sum(dim=1) - z_true).mean())

    lo, hi = math.log(_BETA_BOUNDS[0]), math.log(_BETA_BOUNDS[1])
    if slope(math.exp(lo)) >= 0:
        return math.exp(lo)
    if slope(math.exp(hi)) <= 0:
        return math.exp(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if slope(math.exp(mid)) > 0:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-13:
            break
    return math.exp((lo + hi) / 2)


def _binary_logits(p: Tensor) -> Tensor:
    """Two-column logits ``[N, 2]`` of independent probabilities ``[N]``."""
    return _logits(torch.stack([1.0 - p, p], dim=1))


def _problems(probs: Tensor, labels: Tensor, per_label: bool) -> list[tuple[Tensor, Tensor]]:
    """(logits [N, K'], labels [N]) of each temperature to fit: one, or one per label."""
    if per_label:
        return [(_binary_logits(probs[:, c]), labels[:, c].to(torch.int64)) for c in range(probs.shape[1])]
    return [(_logits(probs), labels.to(torch.int64))]


def _apply(probs: Tensor, betas: Sequence[float], per_label: bool) -> Tensor:
    if per_label:
        cols = [torch.softmax(b * _binary_logits(probs[:, c]), dim=1)[:, 1] for c, b in enumerate(betas)]
        return torch.stack(cols, dim=1)
    return torch.softmax(betas[0] * _logits(probs), dim=1)


def _fit(probs: Tensor, labels: Tensor, per_label: bool) -> list[float]:
    return [fit_inverse_temperature(z, y) for z, y in _problems(probs, labels, per_label)]


def _ece_nll(probs: Tensor, labels: Tensor, task: str, n_bins: int) -> tuple[float, float]:
    """ECE and NLL as the calibration metrics define ``ece`` and ``nll`` (same helpers, same bits):
    top-label ECE, or for multilabel the mean over labels of each label's positive-class ECE."""
    check_predictions(probs, labels, task)
    ones = torch.ones(1, probs.shape[0], dtype=torch.float64)
    if task == "multilabel":
        conf, y = clip_confidence(probs), labels.double()
        per_label = [calibration_errors(conf[:, c], y[:, c], ones, n_bins)["ece"] for c in range(probs.shape[1])]
        ece = torch.nanmean(torch.stack(per_label, dim=1), dim=1)
    else:
        conf, hit = top_label(probs, labels)
        ece = calibration_errors(conf, hit, ones, n_bins)["ece"]
    return float(ece[0]), float(negative_log_likelihood(probs, labels, ones, task)[0])


def _none_if_nan(x: float) -> float | None:
    return x if math.isfinite(x) else None


def temperature_report(
    probs: Tensor,
    labels: Tensor,
    scenario_ids: Sequence[str],
    task: str | Task,
    n_bins: int,
    seed: int,
    folds: int = 5,
) -> dict[str, Any]:
    """ECE and NLL before and after temperature scaling, on the clean and every perturbed scenario.

    Parameters
    ----------
    probs : Tensor ``[S, N, K]``
        Probabilities of every scenario (same samples, same order).
    labels : Tensor ``[N]`` (``[N, K]`` multilabel)
    scenario_ids : sequence of str, length ``S``; must contain ``"clean"``.
    task : Task or its name
        The audit's task (one with the ``temperature_scaling`` capability). Multi-hot labels
        ``[N, K]`` (the task's check accepted them) get one temperature per label.
    n_bins : int
        Bins of the ECE.
    seed : int
        The audit seed; the fold assignment is a permutation from its stream
        ``"temperature-folds"`` (:func:`medaudit.rng.stream_generator`).
    folds : int
        Cross-fitting folds on the clean scenario (at least 2, at most ``N``).

    Returns
    -------
    dict (JSON-ready)::

        {"method": str, "folds": int,
         "temperature": T  (list of T per label for multilabel),
         "fold_temperatures": [T_f, ...]  (lists per label for multilabel),
         "scenarios": {id: {"ece_before", "ece_after", "nll_before", "nll_after", "cross_fitted"}}}

    ``temperature`` is fitted on all clean samples and applied to the perturbed scenarios;
    the clean scenario's "after" values use the cross-fitted fold temperatures
    (``cross_fitted: true``).

    References
    ----------
    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017.
    """
    if probs.ndim != 3 or probs.shape[0] != len(scenario_ids):
        raise ValueError(f"probs must be [S, N, K] with S = len(scenario_ids) = {len(scenario_ids)}, got {tuple(probs.shape)}")
    if "clean" not in scenario_ids:
        raise ValueError("temperature scaling is fitted on the clean scenario, but scenario_ids has no 'clean'")
    n = probs.shape[1]
    if n < 2:
        raise ValueError(f"temperature scaling needs at least 2 samples, got {n}")
    folds = max(2, min(int(folds), n))
    labels = labels.cpu()
    probs = probs.cpu()
    for sid, p in zip(scenario_ids, probs):
        check_predictions(p, labels, task)
    per_label = labels.ndim == 2
    name = task if isinstance(task, str) else task.name
    clean = probs[list(scenario_ids).index("clean")]

    betas_all = _fit(clean, labels, per_label)

    # cross-fitting: each clean sample is calibrated by a temperature fitted without it
    perm = torch.randperm(n, generator=stream_generator(seed, "temperature-folds"))
    calibrated_clean = torch.empty_like(clean, dtype=torch.float64)
    fold_betas: list[list[float]] = []
    for held_out in torch.tensor_split(perm, folds):
        train = torch.ones(n, dtype=torch.bool)
        train[held_out] = False
        betas = _fit(clean[train], labels[train], per_label)
        fold_betas.append(betas)
        calibrated_clean[held_out] = _apply(clean[held_out], betas, per_label)

    scenarios: dict[str, Any] = {}
    for sid, p in zip(scenario_ids, probs):
        is_clean = sid == "clean"
        after = calibrated_clean if is_clean else _apply(p, betas_all, per_label)
        ece_b, nll_b = _ece_nll(p, labels, name, n_bins)
        ece_a, nll_a = _ece_nll(after, labels, name, n_bins)
        scenarios[sid] = {
            "ece_before": _none_if_nan(ece_b),
            "ece_after": _none_if_nan(ece_a),
            "nll_before": _none_if_nan(nll_b),
            "nll_after": _none_if_nan(nll_a),
            "cross_fitted": is_clean,
        }

    def temps(betas: list[float]) -> float | list[float]:
        ts = [1.0 / b for b in betas]
        return ts if per_label else ts[0]

    return {
        "method": (
            f"temperature scaling (Guo et al. 2017); clean: {folds}-fold cross-fitted; "
            "perturbed: temperature fitted on all clean samples"
        ),
        "folds": folds,
        "temperature": temps(betas_all),
        "fold_temperatures": [temps(b) for b in fold_betas],
        "scenarios": scenarios,
    }
