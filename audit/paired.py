r"""Paired comparison of two models evaluated on the *same* samples.

When two audits saved their per-sample predictions (``predictions.npz``) on one data set,
``medaudit compare`` can test whether the models differ instead of only showing two numbers
side by side. Because every sample is seen by both models, the comparison is *paired*: the
sample-to-sample variability that both models share cancels, which makes these tests far more
powerful than comparing two independent confidence intervals.

Functions (pure numpy / scipy, no torch, so they run on saved arrays without a model):

* :func:`mcnemar`: exact McNemar test of equal accuracy from per-sample correctness.
* :func:`delong`: DeLong's test of two correlated ROC AUCs (binary label), computed with the
  midrank algorithm of Sun & Xu; :func:`delong_ovr` runs it one-vs-rest per class.
* :func:`paired_bootstrap`: percentile interval and bootstrap p-value of the difference of any
  metric, with the same resampled samples for both models (drawn from a seed, or given as a
  weight matrix such as an audit's own, for a vectorised metric: what ``medaudit compare`` does).
* :func:`holm`: Holm's step-down adjustment of several p-values (shared with the subgroup
  analysis, which re-exports it).

Conventions: a *difference* is always model B minus model A, so a positive difference means B
scores higher. A test that is undefined on its input (one class only, no variance) returns
``p_value = None`` and a ``"reason"``, never a silent NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from .bootstrap import bootstrap_weights

__all__ = ["delong", "delong_ovr", "holm", "mcnemar", "paired_bootstrap"]

# Variances of an AUC difference at or below this share of the two AUC variances are rounding
# noise of a difference that is exactly 0 (identical scores, or two perfect separations).
_ZERO_VARIANCE_RTOL = 1e-12


# ---------------------------------------------------------------------------------------------
# McNemar
# ---------------------------------------------------------------------------------------------


def _as_binary(x: ArrayLike, name: str, what: str) -> NDArray[np.bool_]:
    """A 1-D boolean vector from booleans or 0/1 numbers; anything else is refused."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per sample), got shape {arr.shape}")
    if arr.dtype != np.bool_:
        # a score or a probability passed by mistake must not be silently thresholded
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1 ({what})")
        arr = arr.astype(bool)
    return arr


def mcnemar(correct_a: ArrayLike, correct_b: ArrayLike, weights: ArrayLike | None = None) -> dict[str, Any]:
    r"""Exact McNemar test that two models have the same accuracy on paired samples.

    Only the discordant samples carry information about a difference in accuracy:

    .. math::

        b = \#\{i : A_i \text{ right}, B_i \text{ wrong}\}, \qquad
        c = \#\{i : A_i \text{ wrong}, B_i \text{ right}\}.

    Under the null hypothesis of equal accuracy each discordant sample is equally likely to fall
    either way, so conditionally on :math:`b + c`, :math:`b \sim \mathrm{Binomial}(b + c, 1/2)`.
    The exact two-sided p-value is

    .. math::

        p = \min\Bigl(1,\; 2 \sum_{k=0}^{\min(b, c)} \binom{b + c}{k} 2^{-(b + c)}\Bigr),

    which is what ``statsmodels.stats.contingency_tables.mcnemar(table, exact=True)`` computes;
    the reported statistic is :math:`\min(b, c)` as there. With :math:`b + c = 0` the models
    never disagree and :math:`p = 1`.

    Parameters
    ----------
    correct_a, correct_b : array_like of bool or {0, 1}, shape (N,)
        Whether model A (B) classified sample ``i`` correctly.
    weights : array_like of non-negative int, shape (N,), optional
        Sample multiplicities: sample ``i`` counts ``weights[i]`` times in :math:`b` and
        :math:`c` (e.g. the counts of a deduplicated data set). Fractional weights are refused:
        the exact test is a binomial test of *counts*, and a fractional count has no binomial
        distribution (rescaling inverse-probability weights would invent sample size).

    Returns
    -------
    dict
        ``b`` and ``c`` (int), ``statistic`` (:math:`\min(b, c)`, int), ``p_value`` (float) and
        ``method`` (str).

    Raises
    ------
    ValueError
        On shapes that differ, values that are not boolean or 0/1, or weights that are negative,
        not whole numbers or not finite.

    Notes
    -----
    The exact conditional test is conservative (its actual size is below the nominal level,
    notably for small :math:`b + c`); Fagerland et al. (2013) recommend the mid-p variant. The
    exact test is kept because it is the textbook reference and matches statsmodels exactly.

    References
    ----------
    .. [1] McNemar Q. Note on the sampling error of the difference between correlated
       proportions or percentages. Psychometrika 12(2):153-157, 1947.
    .. [2] Fagerland MW, Lydersen S, Laake P. The McNemar test for binary matched-pairs data:
       mid-p and asymptotic are better than exact conditional. BMC Medical Research Methodology
       13:91, 2013.
    """
    a = _as_binary(correct_a, "correct_a", "is each prediction of model A correct?")
    b_ok = _as_binary(correct_b, "correct_b", "is each prediction of model B correct?")
    if a.shape != b_ok.shape:
        raise ValueError(f"correct_a and correct_b must describe the same samples, got {a.shape} and {b_ok.shape}")
    if weights is None:
        w = np.ones(a.shape, dtype=np.int64)
    else:
        wf = np.asarray(weights, dtype=np.float64)
        if wf.shape != a.shape:
            raise ValueError(f"weights must have shape {a.shape}, got {wf.shape}")
        if not np.isfinite(wf).all() or (wf < 0).any() or (wf != np.round(wf)).any():
            raise ValueError("weights must be non-negative whole numbers (sample multiplicities); "
                             "the exact McNemar test has no meaning for fractional weights")
        w = wf.astype(np.int64)
    b = int(w[a & ~b_ok].sum())
    c = int(w[~a & b_ok].sum())
    statistic = min(b, c)
    # binom.cdf(0, 0, .5) is 1, so b + c == 0 gives p = min(1, 2) = 1 without a special case;
    # spelled out anyway so that the reader need not rely on scipy's n = 0 convention
    p = 1.0 if b + c == 0 else min(1.0, 2.0 * float(stats.binom.cdf(statistic, b + c, 0.5)))
    return {"b": b, "c": c, "statistic": statistic, "p_value": p,
            "method": "exact McNemar (two-sided binomial test of b given b + c)"}


# ---------------------------------------------------------------------------------------------
# DeLong
# ---------------------------------------------------------------------------------------------


def _as_scores(x: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per sample), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        # a NaN would take an arbitrary rank and change the AUC without warning
        raise ValueError(f"{name} contains NaN or infinite scores")
    return arr


def _undefined(reason: str, **known: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"auc_a": None, "auc_b": None, "difference": None, "se": None, "z": None,
                           "p_value": None}
    out.update(known)
    out["reason"] = reason
    return out


def delong(scores_a: ArrayLike, scores_b: ArrayLike, labels: ArrayLike) -> dict[str, Any]:
    r"""DeLong's test that two correlated ROC AUCs (same samples, binary label) are equal.

    Let :math:`X_1..X_m` be a model's scores of the positives and :math:`Y_1..Y_n` of the
    negatives, and :math:`\psi(x, y) = 1` if :math:`x > y`, :math:`1/2` if :math:`x = y`, 0
    otherwise. The AUC is the Mann-Whitney statistic
    :math:`\hat\theta = \frac{1}{mn}\sum_i\sum_j \psi(X_i, Y_j)`. DeLong et al. (1988) write it
    through the structural components (placements)

    .. math::

        V_{10}(X_i) = \frac{1}{n}\sum_{j} \psi(X_i, Y_j), \qquad
        V_{01}(Y_j) = \frac{1}{m}\sum_{i} \psi(X_i, Y_j),

    whose covariances over models :math:`k, l \in \{A, B\}`,

    .. math::

        S_{10}^{kl} = \frac{1}{m - 1}\sum_i (V_{10}^k(X_i) - \hat\theta^k)(V_{10}^l(X_i) - \hat\theta^l),
        \qquad S_{01}^{kl} \text{ likewise over the negatives with } n - 1,

    give the covariance :math:`S = S_{10}/m + S_{01}/n` of :math:`(\hat\theta^A, \hat\theta^B)`.
    The test statistic is

    .. math::

        z = \frac{\hat\theta^B - \hat\theta^A}{\sqrt{S^{AA} + S^{BB} - 2 S^{AB}}},

    referred to the standard normal distribution, two-sided: :math:`p = 2(1 - \Phi(|z|))`.

    The placements are computed in :math:`O(N \log N)` with the midrank algorithm of Sun & Xu
    (2014): with :math:`T_Z` the midranks in the pooled sample and :math:`T_X`, :math:`T_Y` the
    midranks within the positives and within the negatives,

    .. math::

        V_{10}(X_i) = \frac{T_Z(X_i) - T_X(X_i)}{n}, \qquad
        V_{01}(Y_j) = 1 - \frac{T_Z(Y_j) - T_Y(Y_j)}{m}, \qquad
        \hat\theta = \frac{\sum_i T_Z(X_i) - m(m + 1)/2}{mn}.

    Midranks (average ranks of tied scores) make a tie count 1/2, exactly as :math:`\psi` does.

    Parameters
    ----------
    scores_a, scores_b : array_like of float, shape (N,)
        The two models' scores of the positive class (higher = more likely positive); only their
        order matters, so probabilities, logits or margins all work.
    labels : array_like of bool or {0, 1}, shape (N,)
        The binary reference label (1 = positive).

    Returns
    -------
    dict
        ``auc_a``, ``auc_b``, ``difference`` (``auc_b - auc_a``), ``se`` (its standard error),
        ``z`` and ``p_value`` (two-sided). When the test is undefined, ``p_value`` (and what
        cannot be computed) is None and ``reason`` says why: a class with fewer than two samples
        (the AUC or the covariance is undefined), or a difference with zero variance (identical
        rankings, or both models separating the classes perfectly).

    Raises
    ------
    ValueError
        On shapes that differ, labels that are not binary, or non-finite scores.

    References
    ----------
    .. [1] DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two or more
       correlated receiver operating characteristic curves: a nonparametric approach.
       Biometrics 44(3):837-845, 1988.
    .. [2] Sun X, Xu W. Fast implementation of DeLong's algorithm for comparing the areas under
       correlated receiver operating characteristic curves. IEEE Signal Processing Letters
       21(11):1389-1393, 2014.
    """
    sa, sb = _as_scores(scores_a, "scores_a"), _as_scores(scores_b, "scores_b")
    y = _as_binary(labels, "labels", "1 = positive; use delong_ovr for several classes")
    if not sa.shape == sb.shape == y.shape:
        raise ValueError(f"scores_a, scores_b and labels must describe the same samples, "
                         f"got {sa.shape}, {sb.shape} and {y.shape}")
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return _undefined(f"only one class present ({m} positives, {n} negatives): the AUC is undefined")

    scores = np.stack([sa, sb])                         # [2, N]
    pos, neg = scores[:, y], scores[:, ~y]              # [2, m], [2, n]
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks, pooled
    tx = stats.rankdata(pos, axis=1)                    # midranks among the positives
    ty = stats.rankdata(neg, axis=1)                    # midranks among the negatives
    # T_Z(X_i) - T_X(X_i) = number of negatives below X_i, ties counted 1/2 (Sun & Xu, eq. 9)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    auc_a, auc_b = float(auc[0]), float(auc[1])
    diff = auc_b - auc_a
    if m < 2 or n < 2:
        # S10 (S01) divides by m - 1 (n - 1): one sample of a class has no spread to estimate
        return _undefined(f"{m} positives and {n} negatives: DeLong's covariance needs at least two of each",
                          auc_a=auc_a, auc_b=auc_b, difference=diff)

    s = np.cov(v10) / m + np.cov(v01) / n               # [2, 2], ddof = 1 as in DeLong (1988)
    var = float(s[0, 0] + s[1, 1] - 2.0 * s[0, 1])
    if var <= _ZERO_VARIANCE_RTOL * float(s[0, 0] + s[1, 1]):
        # identical placements (e.g. identical rankings) or two perfect separations: the normal
        # approximation has nothing to scale by, and 0/0 must not become a NaN p-value
        return _undefined("the AUC difference has zero estimated variance (the two models place every sample "
                          "identically, e.g. the same ranking or both separating the classes perfectly)",
                          auc_a=auc_a, auc_b=auc_b, difference=diff, se=0.0)
    se = math.sqrt(var)
    z = diff / se
    p = float(2.0 * stats.norm.sf(abs(z)))              # sf, not 1 - cdf: keeps tiny p-values exact
    return {"auc_a": auc_a, "auc_b": auc_b, "difference": diff, "se": se, "z": z, "p_value": p}


def delong_ovr(probs_a: ArrayLike, probs_b: ArrayLike, labels: ArrayLike, n_classes: int) -> dict[int, dict[str, Any]]:
    r"""One-vs-rest DeLong tests for a multiclass task, one per class.

    Class :math:`k` is tested with the scores ``probs[:, k]`` against the binary label
    :math:`[y = k]`, each with :func:`delong`. The :math:`K` tests share samples and are
    therefore dependent; the caller adjusts the p-values for multiplicity, e.g. with
    :func:`holm`, which is valid under any dependence.

    Parameters
    ----------
    probs_a, probs_b : array_like of float, shape (N, n_classes)
        The two models' class scores (probabilities or logits) of the same samples.
    labels : array_like of int, shape (N,)
        Class indices in ``[0, n_classes)``.
    n_classes : int
        Number of classes, at least 2.

    Returns
    -------
    dict of int to dict
        For each class index, the result of :func:`delong` for that class against the rest (a
        class absent from ``labels`` gets ``p_value`` None with a ``reason``).

    Raises
    ------
    ValueError
        On shapes that do not match ``n_classes`` or labels outside ``[0, n_classes)``.

    References
    ----------
    .. [1] DeLong ER, DeLong DM, Clarke-Pearson DL. Biometrics 44(3):837-845, 1988.
    .. [2] Holm S. A simple sequentially rejective multiple test procedure. Scandinavian Journal
       of Statistics 6(2):65-70, 1979.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    pa, pb = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    y = np.asarray(labels)
    if y.ndim != 1 or pa.shape != (y.shape[0], n_classes) or pb.shape != pa.shape:
        raise ValueError(f"need probs_a and probs_b of shape (N, {n_classes}) and labels of shape (N,), "
                         f"got {pa.shape}, {pb.shape} and {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be integer class indices in [0, {n_classes})")
    return {k: delong(pa[:, k], pb[:, k], y == k) for k in range(n_classes)}


# ---------------------------------------------------------------------------------------------
# Paired bootstrap
# ---------------------------------------------------------------------------------------------


def paired_bootstrap(metric: Callable[..., Any], a: Any, b: Any, labels: Any, n_resamples: int | None = None,
                     seed: int | None = None, confidence: float = 0.95, *, weights: Any = None) -> dict[str, Any]:
    r"""Paired bootstrap of the difference of a metric between two models on the same samples.

    On each of :math:`R` resamples one set of :math:`N` sample indices
    :math:`I^*_r` is drawn with replacement and used for *both* models (that is what pairs them),

    .. math::

        \Delta^*_r = M(b[I^*_r], y[I^*_r]) - M(a[I^*_r], y[I^*_r]),

    so variability shared by the two models (easy and hard samples) cancels in every
    :math:`\Delta^*_r`. The point estimate is :math:`\hat\Delta = M(b, y) - M(a, y)`; the
    interval is the percentile interval, the :math:`\alpha/2` and :math:`1 - \alpha/2` quantiles
    of the :math:`\Delta^*_r` with :math:`\alpha = 1 - \text{confidence}` (Efron & Tibshirani
    1993, ch. 13). The two-sided p-value of :math:`H_0: \Delta = 0` is

    .. math::

        p = \min\Bigl(1,\; 2 \min\bigl(\tfrac{1}{R}\#\{\Delta^*_r \le 0\},\;
            \tfrac{1}{R}\#\{\Delta^*_r \ge 0\}\bigr)\Bigr),

    i.e. twice the smaller tail share beyond 0: the smallest :math:`\alpha` at which the
    equal-tailed percentile interval would exclude 0 (the duality of tests and intervals of
    Efron & Tibshirani 1993, ch. 15-16). Resamples at exactly 0 count in both tails, so identical
    models give :math:`p = 1`. Its resolution is :math:`1/R`: :math:`p = 0` means
    :math:`p < 2/R`, not an impossibility.

    Resamples on which either model's metric is NaN (e.g. an AUC of a resample with one class)
    are dropped; ``n_used`` reports how many remain, and the interval and p-value are computed on
    those.

    The resamples are either drawn here (``n_resamples`` index sets from ``seed``) or given as a
    weight matrix (``weights``): row :math:`r` counts how often each sample occurs in resample
    :math:`r`. A metric computed with such count weights equals the metric on the resampled data,
    so both are the same bootstrap; the weight form lets a vectorised metric evaluate every
    resample in one call per model, and lets a caller reuse an audit's own resamples
    (:func:`medaudit.bootstrap.bootstrap_weights`), so that each model's interval is the one its
    audit reported. ``medaudit compare`` uses it that way, with the audit's metric plugins.

    Parameters
    ----------
    metric : callable
        Without ``weights``: ``metric(outputs, labels) -> float`` evaluated on a subset of rows of
        ``a`` (or ``b``) and the matching rows of ``labels``. It must not depend on row order
        beyond the pairing of outputs and labels. With ``weights``: a weighted metric,
        ``metric(outputs, labels, weights) -> values [1 + R]``, one value per weight row (the
        rows of :meth:`medaudit.metric.Metric.compute`), called once per model on all of ``a``
        (``b``) and ``labels`` as given (arrays or tensors).
    a, b : array_like, shape (N, ...)
        Outputs of model A and model B (probabilities, scores, per-sample losses) for the same
        N samples in the same order.
    labels : array_like, shape (N, ...)
        Reference labels of the N samples.
    n_resamples : int
        Number of bootstrap resamples :math:`R` to draw (at least 1; 2000 or more for a 95%
        interval). Leave out with ``weights``.
    seed : int
        The resamples are those of :func:`medaudit.bootstrap.bootstrap_weights` for this seed (the
        audit's stream ``"bootstrap"``), each as the multiset of its indices in ascending order;
        the result is deterministic for a seed. Leave out with ``weights``.
    confidence : float, default 0.95
        Coverage of the percentile interval, in (0, 1).
    weights : array_like, shape (1 + R, N), optional
        The resamples as a weight matrix: row 0 ones (the full data: the point estimate), rows
        ``1..R`` non-negative counts (:func:`medaudit.bootstrap.bootstrap_weights`). Handed to
        ``metric`` as given.

    Returns
    -------
    dict
        ``difference`` (:math:`\hat\Delta`), ``ci_low``, ``ci_high``, ``p_value`` and
        ``n_used`` (resamples kept). If the metric is NaN on the full data or on every resample,
        the undefined values are None and ``reason`` says why.

    Raises
    ------
    ValueError
        On ``a``, ``b`` and ``labels`` with different numbers of samples, no samples, invalid
        ``n_resamples`` / ``confidence``, ``weights`` together with ``n_resamples`` or ``seed``,
        a weight matrix that does not match the samples or whose row 0 is not ones, or a
        weighted metric that does not return one value per weight row.

    References
    ----------
    .. [1] Efron B, Tibshirani RJ. An Introduction to the Bootstrap. Chapman & Hall/CRC, 1993;
       ch. 13 (percentile intervals), ch. 15-16 (hypothesis testing with the bootstrap).
    """
    if weights is None:
        xa, xb, y = np.asarray(a), np.asarray(b), np.asarray(labels)
    else:
        xa, xb, y = a, b, labels  # a weighted metric takes them as they are (e.g. tensors)
    shapes = [tuple(np.shape(x)) for x in (xa, xb, y)]
    if any(len(s) == 0 for s in shapes) or not shapes[0][0] == shapes[1][0] == shapes[2][0]:
        raise ValueError(f"a, b and labels need the same first dimension (samples), "
                         f"got shapes {shapes[0]}, {shapes[1]} and {shapes[2]}")
    n = shapes[0][0]
    if n == 0:
        raise ValueError("no samples to resample")
    if weights is not None and (n_resamples is not None or seed is not None):
        raise ValueError("pass either weights (the resamples) or n_resamples and seed (to draw them), not both")
    if weights is None and (n_resamples is None or isinstance(n_resamples, bool) or int(n_resamples) != n_resamples
                            or n_resamples < 1 or seed is None):
        raise ValueError(f"n_resamples must be a positive integer and seed given, got {n_resamples} and {seed}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    if weights is None:
        observed = float(metric(xb, y)) - float(metric(xa, y))
    else:
        rows = int(_check_weights(weights, n))
        va, vb = _metric_rows(metric, xa, y, weights, rows), _metric_rows(metric, xb, y, weights, rows)
        observed = float(vb[0] - va[0])
    out: dict[str, Any] = {"difference": observed, "ci_low": None, "ci_high": None, "p_value": None, "n_used": 0}
    if math.isnan(observed):
        out.update(difference=None, reason="the metric is NaN on the full data of one of the models")
        return out

    if weights is None:
        # the audit's own resamples (stream "bootstrap" of medaudit.rng), as index multisets
        counts = bootstrap_weights(n, int(n_resamples), int(seed)).numpy().astype(np.int64)  # type: ignore[arg-type]
        diffs = np.empty(int(n_resamples), dtype=np.float64)  # type: ignore[arg-type]
        for r in range(int(n_resamples)):                      # type: ignore[arg-type]
            idx = np.repeat(np.arange(n), counts[r + 1])  # one index set, both models: the pairing
            yr = y[idx]
            diffs[r] = float(metric(xb[idx], yr)) - float(metric(xa[idx], yr))
    else:
        diffs = (vb - va)[1:]                           # one weight row, both models: the pairing
    diffs = diffs[~np.isnan(diffs)]                     # undefined resamples carry no information
    out["n_used"] = int(diffs.size)
    if diffs.size == 0:
        out["reason"] = "the metric is NaN on every bootstrap resample"
        return out
    alpha = 1.0 - confidence
    low, high = np.quantile(diffs, [alpha / 2.0, 1.0 - alpha / 2.0])
    # both tails include 0 itself, so a resample with no difference never counts as evidence
    share_le, share_ge = float(np.mean(diffs <= 0.0)), float(np.mean(diffs >= 0.0))
    out.update(ci_low=float(low), ci_high=float(high), p_value=min(1.0, 2.0 * min(share_le, share_ge)))
    return out


def _host(values: Any) -> NDArray[np.float64]:
    """Values as a flat float64 host array (a weighted metric may return a tensor)."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator (no torch import here)
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check_weights(weights: Any, n: int) -> int:
    """The number of rows ``1 + R`` of a weight matrix for ``n`` samples whose row 0 is ones."""
    shape = tuple(np.shape(weights))
    if len(shape) != 2 or shape[1] != n or shape[0] < 2:
        raise ValueError(f"weights must have shape (1 + R, {n}) with R >= 1 resamples, got {shape}")
    if not np.all(_host(weights[0]) == 1.0):
        raise ValueError("row 0 of weights must be ones (the full data: the point estimate)")
    return shape[0]


def _metric_rows(metric: Callable[..., Any], outputs: Any, labels: Any, weights: Any, rows: int) -> NDArray[np.float64]:
    values = _host(metric(outputs, labels, weights))
    if values.shape != (rows,):
        raise ValueError(f"a weighted metric must return one value per weight row ({rows}), got shape {values.shape}")
    return values


# ---------------------------------------------------------------------------------------------
# Multiplicity
# ---------------------------------------------------------------------------------------------


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    r"""Holm-Bonferroni adjusted p-values (None entries are not tested and stay None).

    With the :math:`m` defined p-values sorted ascending, :math:`p_{(1)} \le \dots \le p_{(m)}`,

    .. math::

        \tilde p_{(i)} = \min\Bigl(1,\; \max_{j \le i}\, (m - j + 1)\, p_{(j)}\Bigr)

    (Holm 1979); rejecting where :math:`\tilde p < \alpha` controls the family-wise error rate at
    :math:`\alpha` under any dependence between the tests, so it suits the dependent
    one-vs-rest tests of :func:`delong_ovr` and the subgroup gaps of one scenario alike. The
    result equals ``statsmodels.stats.multitest.multipletests(p, method="holm")[1]`` on the
    defined entries.

    Parameters
    ----------
    p_values : sequence of float or None
        Raw p-values in [0, 1]; None marks a test that could not be run (it does not count in
        :math:`m`).

    Returns
    -------
    list of float or None
        Adjusted p-values in the input order, None where the input is None.

    Raises
    ------
    ValueError
        On a NaN or a value outside [0, 1] (an undefined test must be None, not NaN, so that it
        is neither counted nor sorted arbitrarily).

    References
    ----------
    .. [1] Holm S. A simple sequentially rejective multiple test procedure. Scandinavian Journal
       of Statistics 6(2):65-70, 1979.
    """
    idx = [i for i, p in enumerate(p_values) if p is not None]
    for i in idx:
        if not 0.0 <= float(p_values[i]) <= 1.0:  # type: ignore[arg-type]  # also catches NaN
            raise ValueError(f"p-value {p_values[i]!r} at position {i} is not in [0, 1]; "
                             "use None for a test that was not run")
    m = len(idx)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    # stable sort: tied p-values keep input order, and the running max gives them equal results
    for rank, i in enumerate(sorted(idx, key=lambda i: float(p_values[i]))):  # type: ignore[arg-type]
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))  # type: ignore[arg-type]
        out[i] = running
    return out
