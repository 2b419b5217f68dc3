r"""Robustness summary scores from the literature, computed exactly as their papers define them.

:mod:`medaudit.robustness` has its own ``mce``: each perturbation's mean error divided by the
*model's own* clean error. That ratio needs no second model, but it is not the number the
ImageNet-C, MedMNIST-C or ROOD-MRI papers report, so it cannot be put next to theirs. This
module computes theirs. Every function works on per-row metric values: row 0 is the value on the
full data, rows ``1..R`` on the audit's bootstrap resamples, paired across scenarios (row ``r``
of every scenario is the same resample), so a score computed row by row is a paired bootstrap of
the score and :func:`medaudit.bootstrap.interval` turns it into a percentile interval.

Notation: :math:`m_{p,s}` is the metric under perturbation :math:`p` at severity :math:`s`,
:math:`m_0` on the clean data; :math:`E = 1 - m` is the error of a higher-is-better metric in
[0, 1]; a superscript :math:`b` marks the *baseline* model (another audit). Only the
(perturbation, severity) pairs that both the model and the baseline audited count; the others
are reported as left out. Sums over :math:`s` run over those shared severities :math:`S_p`.

ImageNet-C (Hendrycks & Dietterich, ICLR 2019, arXiv:1903.12261, the CE and Relative CE
definitions of its ImageNet-C metrics; the baseline there is AlexNet), on the top-1 error
:math:`E = 1 - \text{accuracy}`:

.. math:: \mathrm{CE}_p = \frac{\sum_{s} E_{p,s}}{\sum_{s} E^b_{p,s}}, \qquad
          \text{Relative CE}_p = \frac{\sum_{s} (E_{p,s} - E_0)}{\sum_{s} (E^b_{p,s} - E^b_0)},

``mce_vs_baseline`` and ``relative_mce_vs_baseline`` are their means over perturbations. The
clean error is subtracted once per severity. Transcriptions of the formula write
:math:`\sum_s E_{s,c} - E_\text{clean}`; read literally (the clean error subtracted once from the
five-severity sum) it gives ResNet-50 a relative mCE of 79.4 from its published per-corruption
errors, while the per-severity reading gives 104.9, the 105.0 reported for ResNet-50 (see
``tests/test_scores.py``). ResNet-50's mCE of 76.7 is reproduced to 0.01.

MedMNIST-C (Di Salvo, Doerrich & Ledig 2024, arXiv:2406.17536; formulas as implemented by the
authors' ``medmnistc/eval.py``, ``Evaluator.populate_summary``): the same two ratios on the
*balanced* error :math:`\mathrm{BE} = 1 - \text{balanced accuracy}` (macro mean of per-class
recall; per label for multi-label tasks), normalised by a baseline model's balanced errors:

.. math:: \mathrm{BE}_p = \frac{\overline{\mathrm{BE}}_{p}}{\overline{\mathrm{BE}}^b_{p}}, \qquad
          \mathrm{rBE}_p = \frac{\overline{\mathrm{BE}}_{p} - \mathrm{BE}_0}
                               {\overline{\mathrm{BE}}^b_{p} - \mathrm{BE}^b_0},

with :math:`\overline{\,\cdot\,}_p` the mean over severities (equal to the ratio of sums on a
common severity set); ``be`` and ``rbe`` are the means over perturbations. Both need a baseline:
without one they are ``None`` with the reason.

ROOD-MRI (Boone et al., NeuroImage 2023, arXiv:2203.06060; formula as implemented by the
authors' ``roodmri/metrics/calculate.py``, ``calculate_metrics``): the severity-weighted
degradation of any metric, positive = worse,

.. math:: D_p = \frac{\sum_{s} \alpha^{s}\, d_{p,s}}{\sum_{s} \alpha^{s}}, \qquad
          d_{p,s} = \begin{cases} m_0 - m_{p,s} & \text{higher is better} \\
                                   m_{p,s} - m_0 & \text{lower is better} \end{cases},
          \qquad \alpha = 2/3,

in the metric's own units (Dice, mm of HD95, ...); ``rood_degradation`` is the mean of
:math:`D_p` over perturbations. It needs no baseline.

Undefined values: a ratio whose baseline denominator is 0 (the baseline made no error on a
perturbation, or did not degrade) is ``None`` with a ``reason``; one undefined perturbation
makes the mean over perturbations undefined too (its per-perturbation entries stay reported). A
*negative* relative denominator (the baseline did better corrupted than clean, which happens
with MedMNIST-C's own baselines) is computed as the paper's formula does, with a warning,
because the sign of that term is then reversed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from .bootstrap import interval

__all__ = [
    "ROOD_ALPHA",
    "SCORES",
    "SCORE_METRIC",
    "audit_scores",
    "corruption_error",
    "mean_over_perturbations",
    "relative_corruption_error",
    "rood_degradation",
    "summarize_scores",
]

#: The scores, by the name a caller stores them under (``robustness.<name>`` in results.json).
SCORES: tuple[str, ...] = ("mce_vs_baseline", "relative_mce_vs_baseline", "be", "rbe", "rood_degradation")

#: The metric key (as the ``classification`` plugin emits it) each paper's score is defined on;
#: the error is one minus it. ``rood_degradation`` takes any metric (``dice``, ``hd95``, ...).
SCORE_METRIC: dict[str, str | None] = {
    "mce_vs_baseline": "accuracy",
    "relative_mce_vs_baseline": "accuracy",
    "be": "balanced_accuracy",
    "rbe": "balanced_accuracy",
    "rood_degradation": None,
}

#: ROOD-MRI's default severity weighting parameter (``alpha_deg`` of ``calculate_metrics``).
ROOD_ALPHA = 2.0 / 3.0

_NEEDS_BASELINE = {"mce_vs_baseline", "relative_mce_vs_baseline", "be", "rbe"}
_RELATIVE = {"relative_mce_vs_baseline", "rbe"}


# ---------------------------------------------------------------------------------------------
# Vectorised scores: severities on axis 0, bootstrap rows on the trailing axis
# ---------------------------------------------------------------------------------------------


def _rows(x: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError(f"{name} needs a leading severity axis, got a scalar")
    return arr


def _like(baseline: ArrayLike, model: NDArray[np.float64], name: str) -> NDArray[np.float64]:
    """The baseline shaped to broadcast against the model's ``[S, ..., 1+R]`` values.

    A baseline is normally point values (another audit's constants: the model's shape without
    the trailing row axis), which gets a trailing axis of length 1; a baseline with the model's
    full shape (a paired baseline audited with the same resamples) is used row by row.
    """
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape == model.shape:
        return b
    if b.shape == model.shape[:-1]:
        return b[..., None]
    raise ValueError(f"{name} must have shape {model.shape[:-1]} (point values) or {model.shape} (paired rows), "
                     f"got {b.shape}")


def _divide(num: NDArray[np.float64], den: NDArray[np.float64]) -> NDArray[np.float64]:
    """``num / den`` with NaN where ``den`` is 0 (never ±inf)."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=np.broadcast_to(den != 0, out.shape))
    return out


def corruption_error(errors: ArrayLike, baseline_errors: ArrayLike) -> NDArray[np.float64]:
    r"""Corruption Error of one perturbation: :math:`\sum_s E_{s} / \sum_s E^b_{s}`.

    ImageNet-C's :math:`\mathrm{CE}^f_c` (Hendrycks & Dietterich 2019) on top-1 errors, and
    MedMNIST-C's :math:`\mathrm{BE}_c` on balanced errors (a ratio of severity means, equal to
    the ratio of sums over the same severities).

    Parameters
    ----------
    errors : array ``[S, 1+R]`` (or ``[S]``)
        The model's error at each of the ``S`` shared severities, per bootstrap row.
    baseline_errors : array ``[S]`` (or ``[S, 1+R]``)
        The baseline's errors at the same severities: point values broadcast over the rows, or
        paired rows.

    Returns
    -------
    array ``[1+R]`` (a scalar array for ``[S]`` input); NaN on a row whose baseline sum is 0.
    """
    e = _rows(errors, "errors")
    b = _like(baseline_errors, e, "baseline_errors") if e.ndim > 1 else np.asarray(baseline_errors, dtype=np.float64)
    return _divide(e.sum(axis=0), np.broadcast_to(b, e.shape).sum(axis=0))


def relative_corruption_error(errors: ArrayLike, clean_error: ArrayLike, baseline_errors: ArrayLike,
                              baseline_clean_error: ArrayLike) -> NDArray[np.float64]:
    r"""Relative Corruption Error of one perturbation.

    :math:`\sum_s (E_{s} - E_0) / \sum_s (E^b_{s} - E^b_0)`: ImageNet-C's Relative
    :math:`\mathrm{CE}^f_c` on top-1 errors, MedMNIST-C's :math:`\mathrm{rBE}_c` on balanced
    errors. The clean error is subtracted at every severity (``S`` times).

    Parameters
    ----------
    errors : array ``[S, 1+R]`` (or ``[S]``)
    clean_error : array ``[1+R]`` (or scalar)
        The model's clean error, rows paired with ``errors``.
    baseline_errors : array ``[S]`` (or ``[S, 1+R]``)
    baseline_clean_error : scalar (or ``[1+R]`` paired rows)

    Returns
    -------
    array ``[1+R]``; NaN on a row whose denominator is 0.
    """
    e = _rows(errors, "errors")
    b = _like(baseline_errors, e, "baseline_errors") if e.ndim > 1 else np.asarray(baseline_errors, dtype=np.float64)
    e0 = np.asarray(clean_error, dtype=np.float64)
    b0 = np.asarray(baseline_clean_error, dtype=np.float64)
    num = (e - e0).sum(axis=0)
    den = (np.broadcast_to(b, e.shape) - b0).sum(axis=0)
    return _divide(num, den)


def rood_degradation(values: ArrayLike, clean: ArrayLike, severities: Sequence[int], *,
                     higher_is_better: bool = True, alpha: float = ROOD_ALPHA) -> NDArray[np.float64]:
    r"""ROOD-MRI's severity-weighted degradation of one perturbation, positive = worse.

    :math:`D = \sum_s \alpha^s d_s / \sum_s \alpha^s` with :math:`d_s = m_0 - m_s` when higher
    is better and :math:`m_s - m_0` otherwise (Boone et al. 2023; ``calculate_metrics`` of the
    authors' ``roodmri`` package, ``alpha_deg = 2/3``).

    Parameters
    ----------
    values : array ``[S, 1+R]`` (or ``[S]``)
        The metric at each severity, per bootstrap row.
    clean : array ``[1+R]`` (or scalar)
        The clean metric, rows paired with ``values``.
    severities : sequence of int
        The ``S`` severity levels of ``values`` (the exponents of the weights).
    higher_is_better : bool
    alpha : float
        The weighting parameter, ``0 < alpha``; below 1 the mild severities weigh more.

    Returns
    -------
    array ``[1+R]`` in the metric's units.
    """
    m = _rows(values, "values")
    s = np.asarray(severities, dtype=np.float64)
    if s.shape != m.shape[:1]:
        raise ValueError(f"{m.shape[0]} severities of values, but {s.size} severities given")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    m0 = np.asarray(clean, dtype=np.float64)
    d = (m0 - m) if higher_is_better else (m - m0)
    w = (alpha ** s).reshape((-1,) + (1,) * (m.ndim - 1))
    return (w * d).sum(axis=0) / w.sum()


def mean_over_perturbations(per_perturbation: Sequence[ArrayLike]) -> NDArray[np.float64]:
    """The suite-level score: the mean over perturbations of their ``[1+R]`` rows, row by row."""
    if not per_perturbation:
        raise ValueError("no perturbation to average")
    return np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in per_perturbation]), axis=0)


# ---------------------------------------------------------------------------------------------
# Convenience: from an audit's per-scenario rows to a JSON-ready entry
# ---------------------------------------------------------------------------------------------


def _severity(key: Any) -> int:
    s = int(key)
    if str(s) != str(key).strip() or s < 1:
        raise ValueError(f"severities are integers >= 1 (0 is the clean scenario), got {key!r}")
    return s


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ci(rows: NDArray[np.float64], confidence: float) -> dict[str, float | None]:
    return interval(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64)), confidence)


def _empty(score: str, metric: str | None, reason: str) -> dict[str, Any]:
    return {"score": score, "metric": metric, "value": None, "ci_low": None, "ci_high": None, "reason": reason,
            "n_perturbations": 0, "perturbations": {}, "left_out": [], "warnings": []}


def summarize_scores(
    score: str,
    metric_rows: Mapping[str, Mapping[Any, ArrayLike]],
    clean_rows: ArrayLike,
    *,
    baseline: Mapping[str, Mapping[Any, float | None]] | None = None,
    baseline_clean: float | None = None,
    higher_is_better: bool = True,
    alpha: float = ROOD_ALPHA,
    confidence: float = 0.95,
    metric: str | None = None,
) -> dict[str, Any]:
    r"""One literature score of an audit, with its percentile-bootstrap interval.

    Parameters
    ----------
    score : str
        One of :data:`SCORES`.
    metric_rows : mapping
        ``{perturbation: {severity: rows}}``: the metric's per-row values ``[1+R]`` (row 0 the
        full data, paired across scenarios) of every perturbed scenario. Pass the metric the
        score is defined on (:data:`SCORE_METRIC`): ``accuracy`` for the ImageNet-C scores,
        ``balanced_accuracy`` for ``be``/``rbe``; the error is ``1 - value`` (with
        ``higher_is_better=False`` the values are taken as errors as they are). Severity keys may
        be ints or their strings (results.json).
    clean_rows : array ``[1+R]``
        The same metric's rows on the clean scenario.
    baseline, baseline_clean : optional
        Another model's audit in the same metric: ``{perturbation: {severity: value}}`` point
        values (``None``/NaN where undefined) and its clean value. The four baseline-normalised
        scores need them (the relative ones ``baseline_clean`` too); ``rood_degradation``
        refuses them.
    higher_is_better : bool
        The metric's direction.
    alpha : float
        ROOD-MRI's severity weighting (``rood_degradation`` only).
    confidence : float
        Coverage of the interval.
    metric : str, optional
        The metric key, recorded in the result.

    Returns
    -------
    dict (JSON-ready; undefined numbers are ``None``)::

        {"score", "metric", "value", "ci_low", "ci_high",
         "reason": None | str,                # why value is None
         "n_perturbations": int,              # perturbations averaged
         "perturbations": {name: {"value", "ci_low", "ci_high", "severities": [...],
                                  "reason": None | str}},   # CE_p / relative CE_p / BE_p / rBE_p / D_p
         "left_out": [{"perturbation", "severity", "why"}],  # pairs not shared with the baseline
         "warnings": [str, ...],
         "alpha": float}                      # rood_degradation only

    Values are ratios (1.0 = as the baseline; the papers print them ×100) except
    ``rood_degradation``, which is in the metric's units.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {', '.join(SCORES)}")
    if score == "rood_degradation" and (baseline is not None or baseline_clean is not None):
        raise ValueError("rood_degradation takes no baseline: it is the model's own degradation")
    clean = np.asarray(clean_rows, dtype=np.float64).reshape(-1)
    n_rows = clean.size
    if n_rows == 0:
        raise ValueError("clean_rows must hold at least row 0")

    model: dict[str, dict[int, NDArray[np.float64]]] = {}
    for name, by_severity in metric_rows.items():
        for key, rows in by_severity.items():
            arr = np.asarray(rows, dtype=np.float64).reshape(-1)
            if arr.size != n_rows:
                raise ValueError(f"{name}@{key} has {arr.size} rows, the clean scenario {n_rows}: rows must be paired")
            model.setdefault(name, {})[_severity(key)] = arr

    if score in _NEEDS_BASELINE and baseline is None:
        return _empty(score, metric, f"{score} is normalised by a baseline model's errors (ImageNet-C: AlexNet; "
                                     "MedMNIST-C: the authors' reference model); no baseline audit was given")
    if score in _RELATIVE and _finite(baseline_clean) is None:
        return _empty(score, metric, f"{score} subtracts the baseline's clean error; no (finite) baseline_clean given")

    left_out: list[dict[str, Any]] = []
    shared: dict[str, list[int]] = {}
    base: dict[str, dict[int, float]] = {}
    if baseline is None:
        shared = {name: sorted(sev) for name, sev in model.items()}
    else:
        for name, by_severity in baseline.items():
            for key, value in by_severity.items():
                s = _severity(key)
                v = _finite(value)
                if v is None:
                    left_out.append({"perturbation": name, "severity": s, "why": "undefined in the baseline"})
                elif s not in model.get(name, {}):
                    left_out.append({"perturbation": name, "severity": s, "why": "not audited by the model"})
                else:
                    base.setdefault(name, {})[s] = v
        for name, by_severity in model.items():
            for s in by_severity:
                if s not in base.get(name, {}) and not any(o["perturbation"] == name and o["severity"] == s
                                                           for o in left_out):
                    left_out.append({"perturbation": name, "severity": s, "why": "not audited in the baseline"})
        shared = {name: sorted(sev) for name, sev in base.items()}
    left_out.sort(key=lambda o: (o["perturbation"], o["severity"]))

    def error(x: NDArray[np.float64]) -> NDArray[np.float64]:
        return 1.0 - x if higher_is_better else x

    per: dict[str, dict[str, Any]] = {}
    rows_by_name: dict[str, NDArray[np.float64]] = {}
    warnings: list[str] = []
    for name in sorted(shared):
        sevs = shared[name]
        values = np.stack([model[name][s] for s in sevs])  # [S, 1+R]
        reason = None
        if score == "rood_degradation":
            rows = rood_degradation(values, clean, sevs, higher_is_better=higher_is_better, alpha=alpha)
        else:
            b = np.array([base[name][s] for s in sevs])
            e, eb = error(values), error(b)
            if score in _RELATIVE:
                eb0 = float(error(np.float64(baseline_clean)))
                den = float((eb - eb0).sum())
                rows = relative_corruption_error(e, error(clean), eb, eb0)
                if den == 0:
                    reason = f"the baseline's error on {name} equals its clean error (denominator 0)"
                elif den < 0:
                    warnings.append(f"{name}: the baseline's error is below its clean error "
                                    f"(denominator {den:.4g} < 0), so this term's sign is reversed")
            else:
                rows = corruption_error(e, eb)
                if float(eb.sum()) == 0:
                    reason = f"the baseline made no error on {name} (denominator 0)"
        rows_by_name[name] = rows
        entry = {**_ci(rows, confidence), "severities": sevs, "reason": reason}
        if entry["value"] is None and reason is None:
            entry["reason"] = f"not finite on the full data (row 0) for {name}"
        per[name] = entry

    out: dict[str, Any] = {"score": score, "metric": metric, "value": None, "ci_low": None, "ci_high": None,
                           "reason": None, "n_perturbations": len(per), "perturbations": per, "left_out": left_out,
                           "warnings": warnings}
    if score == "rood_degradation":
        out["alpha"] = float(alpha)
    undefined = sorted(n for n, p in per.items() if p["reason"] is not None)
    if not per:
        out["reason"] = ("no perturbation was audited" if baseline is None
                         else "the model and the baseline share no (perturbation, severity) pair")
    elif undefined:
        out["reason"] = f"undefined for {', '.join(undefined)}, so the mean over perturbations is too"
    else:
        out.update(_ci(mean_over_perturbations([rows_by_name[n] for n in sorted(per)]), confidence))
    return out


def _host(rows: Any) -> NDArray[np.float64]:
    """Rows as a float64 host array (the audit's rows are tensors, possibly on a GPU)."""
    if isinstance(rows, torch.Tensor):
        return rows.detach().double().cpu().numpy().reshape(-1)
    return np.asarray(rows, dtype=np.float64).reshape(-1)


def audit_scores(raw: Mapping[str, Mapping[str, Any]], scenarios: Sequence[Any], directions: Mapping[str, bool],
                 headline: Sequence[str], *, baseline: Mapping[str, Any] | None = None,
                 confidence: float = 0.95) -> dict[str, Any]:
    """Every score of one audit, as results.json ``robustness`` holds them.

    Parameters
    ----------
    raw : mapping
        ``{scenario_id: {metric_key: rows [1+R]}}`` (tensors or arrays), ``"clean"`` included.
    scenarios : sequence of :class:`medaudit.outputs.Scenario`
        The audited scenarios; the perturbed ones are grouped by perturbation.
    directions : mapping
        Metric key -> higher is better.
    headline : sequence of str
        The headline metric keys: ``rood_degradation`` is computed for each.
    baseline : mapping, optional
        Another audit's results.json (``--baseline``): the point values of its scenarios are the
        denominators of the four baseline-normalised scores.

    Returns
    -------
    ``{"mce_vs_baseline": {...}, "relative_mce_vs_baseline": {...}, "be": {...}, "rbe": {...},
    "rood_degradation": {metric_key: {...}}}``, each entry as :func:`summarize_scores` returns
    it (``value`` None with a ``reason`` where the metric is not computed or no baseline is
    given). Stress tests count like every other perturbation, as every corruption counts in
    ImageNet-C; a protocol fixes which perturbations those are.
    """
    def rows_of(key: str) -> tuple[dict[str, dict[int, Any]], Any]:
        per: dict[str, dict[int, Any]] = {}
        for sc in scenarios:
            if sc.perturbation is not None and key in raw.get(sc.id, {}):
                per.setdefault(sc.perturbation, {})[sc.severity] = _host(raw[sc.id][key])
        return per, _host(raw["clean"][key])

    def baseline_of(key: str) -> tuple[dict[str, dict[int, float | None]], float | None]:
        assert baseline is not None
        per: dict[str, dict[int, float | None]] = {}
        clean = None
        for s in baseline.get("scenarios", []):
            value = (s.get("metrics", {}).get(key) or {}).get("value")
            if s.get("id") == "clean":
                clean = value
            elif s.get("perturbation") is not None:
                per.setdefault(s["perturbation"], {})[int(s["severity"])] = value
        return per, clean

    out: dict[str, Any] = {}
    for score in SCORES[:4]:
        key = SCORE_METRIC[score]
        assert key is not None
        if key not in raw.get("clean", {}):
            out[score] = _empty(score, key, f"this task does not compute {key}")
        elif baseline is None:
            out[score] = _empty(score, key, "needs a baseline model's audit: medaudit run ... --baseline results.json")
        else:
            per, clean = rows_of(key)
            base, base_clean = baseline_of(key)
            out[score] = summarize_scores(score, per, clean, baseline=base, baseline_clean=base_clean,
                                          confidence=confidence, metric=key)
    rood: dict[str, Any] = {}
    for key in headline:
        if key in raw.get("clean", {}) and key in directions:
            per, clean = rows_of(key)
            if per:
                rood[key] = summarize_scores("rood_degradation", per, clean, higher_is_better=directions[key],
                                             confidence=confidence, metric=key)
    out["rood_degradation"] = rood
    return out
