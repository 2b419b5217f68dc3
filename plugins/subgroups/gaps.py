"""Gaps between groups: spread of a metric over groups, of the per-group drops, fairness differences.

Each gap comes with its bootstrap interval (the spread on every weight row) and a permutation
p-value (the spread under permuted group labels); Holm's correction is applied by the caller
over every gap of a scenario. The spread's interval cannot contain 0 in practice (the max - min
of noisy estimates is biased upward), so each metric gap also carries the worst group's
difference from the rest of the groups pooled (:func:`_worst_vs_rest`): a signed paired
difference whose interval contains 0 when the data do not tell the worst group apart.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from medaudit.bootstrap import interval
from medaudit.outputs import Scenario

from .attributes import Attribute
from .permutations import permutation_p, range_rows
from .rows import RATES, ScenarioRows

_UNDEFINED: dict[str, Any] = {"value": None, "ci_low": None, "ci_high": None}


def gap_entries(sc: Scenario, attr: Attribute, eligible: list[int], rows: ScenarioRows, clean: ScenarioRows | None,
                confidence: float, binary: bool) -> list[dict[str, Any]]:
    """The ``subgroup_gaps`` entries of one (scenario, attribute): one per metric over the
    ``eligible`` groups, with the drop gap under a perturbed scenario (``clean`` given) and, for
    binary tasks, the fairness differences. ``p_adjusted`` is left to the caller (Holm)."""
    groups = [attr.groups[g] for g in eligible]
    base = {"scenario": sc.id, "perturbation": sc.perturbation, "severity": sc.severity, "attribute": attr.name}
    out: list[dict[str, Any]] = []
    for key, higher in rows.directions.items():
        boot = rows.boot[key]
        point = boot[0]
        include = torch.isfinite(point)
        entry: dict[str, Any] = {**base, "metric": key, "kind": "calibration" if key in ("ece", "ace", "mce", "classwise_ece", "boundary_ece") else "performance",
                                 "higher_is_better": higher, "n_groups": int(include.sum())}
        if int(include.sum()) < 2:
            entry.update(gap=dict(_UNDEFINED), worst_group=None, worst_value=None, best_group=None, ratio=None,
                         p_value=None, worst_vs_rest={**_UNDEFINED, "rest_value": None})
            out.append(entry)
            continue
        values = point.clone()
        values[~include] = -math.inf if higher else math.inf
        worst = int(values.argmin()) if higher else int(values.argmax())
        values[~include] = math.inf if higher else -math.inf
        best = int(values.argmax()) if higher else int(values.argmin())
        lo, hi = float(point[include].min()), float(point[include].max())
        gap = interval(range_rows(boot, include), confidence)
        null = range_rows(rows.perm[key], include) if rows.perm is not None and key in rows.perm else None
        entry.update(gap=gap, worst_group=groups[worst], worst_value=float(point[worst]), best_group=groups[best],
                     best_value=float(point[best]), ratio=_ratio(lo, hi), p_value=permutation_p(gap["value"], null),
                     worst_vs_rest=_worst_vs_rest(boot[:, worst], rows.rest[key][:, worst], higher, confidence))
        if clean is not None and key in clean.boot:
            entry["drop_gap"] = _drop_gap(clean, rows, key, higher, groups, confidence)
        out.append(entry)
    if binary and all(r in rows.boot for r in RATES):
        out.extend(_fairness_entries(base, rows, confidence))
    return out


def _drop_gap(clean: ScenarioRows, rows: ScenarioRows, key: str, higher: bool, groups: list[str],
              confidence: float) -> dict[str, Any]:
    """Spread of the per-group drops from clean: does the perturbation hurt one group more?"""

    def drops(c: Tensor, p: Tensor) -> Tensor:
        return c - p if higher else p - c

    d = drops(clean.boot[key], rows.boot[key])
    include = torch.isfinite(d[0])
    if int(include.sum()) < 2:
        return {**_UNDEFINED, "most_affected_group": None, "p_value": None,
                "most_affected_vs_rest": {**_UNDEFINED, "rest_value": None}}
    est = interval(range_rows(d, include), confidence)
    point = d[0].clone()
    point[~include] = -math.inf
    most = int(point.argmax())
    null = None
    if rows.perm is not None and clean.perm is not None and key in rows.perm and key in clean.perm:
        null = range_rows(drops(clean.perm[key], rows.perm[key]), include)
    # the drops are oriented (positive = worse), so a larger drop is the worse one
    rest_drop = drops(clean.rest[key][:, most], rows.rest[key][:, most])
    return {**est, "most_affected_group": groups[most], "most_affected_drop": float(d[0, most]),
            "p_value": permutation_p(est["value"], null),
            "most_affected_vs_rest": _worst_vs_rest(d[:, most], rest_drop, False, confidence)}


def _worst_vs_rest(worst: Tensor, rest: Tensor, higher: bool, confidence: float) -> dict[str, Any]:
    """How much worse the worst group is than the rest pooled, oriented so positive is worse
    (``rest - worst`` when higher is better), with the percentile interval of the per-row
    differences: both come from the same weight row, so it is a paired bootstrap.

    Unlike max - min, this difference is signed on every row, so its interval contains 0 when the
    resamples do not consistently put the worst group below the rest.
    """
    diff = rest - worst if higher else worst - rest
    # an undefined rest value (NaN) becomes null with the rest of results.json (clean_floats)
    return {**interval(diff, confidence), "rest_value": float(rest[0])}


def _fairness_entries(base: dict[str, Any], rows: ScenarioRows, confidence: float) -> list[dict[str, Any]]:
    """fairlearn's demographic-parity and equalized-odds differences (between groups, worst case)."""
    sel, tpr, fpr = (rows.boot[r] for r in RATES)
    out = []
    for name, include, stat in (
        ("demographic_parity_difference", torch.isfinite(sel[0]),
         lambda s, t, f, inc: range_rows(s, inc)),
        ("equalized_odds_difference", torch.isfinite(tpr[0]) & torch.isfinite(fpr[0]),
         lambda s, t, f, inc: torch.maximum(range_rows(t, inc), range_rows(f, inc))),
    ):
        entry: dict[str, Any] = {**base, "metric": name, "kind": "fairness", "higher_is_better": False,
                                 "n_groups": int(include.sum()), "worst_group": None, "worst_value": None}
        if int(include.sum()) < 2:
            entry.update(gap=dict(_UNDEFINED), ratio=None, p_value=None)
            out.append(entry)
            continue
        gap = interval(stat(sel, tpr, fpr, include), confidence)
        if name == "demographic_parity_difference":
            ratio = _ratio(float(sel[0][include].min()), float(sel[0][include].max()))
        else:
            rt = _ratio(float(tpr[0][include].min()), float(tpr[0][include].max()))
            rf = _ratio(float(fpr[0][include].min()), float(fpr[0][include].max()))
            ratio = None if rt is None or rf is None else min(rt, rf)
        null = None
        if rows.perm is not None and all(r in rows.perm for r in RATES):
            null = stat(*(rows.perm[r] for r in RATES), include)
        entry.update(gap=gap, ratio=ratio, p_value=permutation_p(gap["value"], null))
        out.append(entry)
    return out


def _ratio(lo: float, hi: float) -> float | None:
    return lo / hi if hi > 0 and lo >= 0 else None
