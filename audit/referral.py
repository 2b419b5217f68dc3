"""Which detector to deploy, and at which threshold: the OOD section's closing recommendation.

A detector earns its place by the harm it catches, not by AUROC alone: at the operating point
that refers 5 % of clean inputs to a human, how much of the performance drop under realistic
shifts would the referral prevent (``epd``), and how many of the model's errors does it flag
(``flagged_errors``)? :func:`recommend` ranks the detectors that ran by the mean of these
over the realistic perturbed scenarios (stress tests are judged apart, as in the verdict) and
states the best one with its threshold and evidence. The inputs are results.json's own values,
so the recommendation can be recomputed from the file.
"""

from __future__ import annotations

import math
from typing import Any

from .perturbation import is_stress_test

__all__ = ["KEEP", "recommend"]

#: The share of clean inputs the recommended operating point lets through (5 % are referred).
KEEP = 0.95


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return sum(defined) / len(defined) if defined else None


def recommend(results: dict[str, Any], thresholds: dict[str, float]) -> dict[str, Any] | None:
    """results.json ``ood_recommendation`` for a results dict (scenarios with ``flagged_errors``
    and ``epd``) and each detector's operating point on the clean data (``thresholds``); None
    when no detector has harm statistics under a realistic perturbation.

    The ranking key is the mean ``epd`` over the realistic perturbed scenarios — the drop the
    shift caused that a referral prevents: a detector that flags inputs the model gets wrong even
    clean catches errors but no harm of the shift — else the mean ``flagged_errors``; ties go to
    the other statistic, then the name.
    """
    modality = results.get("config", {}).get("input", {}).get("modality", "generic")
    stress = {c["name"] for c in results.get("perturbation_catalogue", [])
              if is_stress_test(c.get("stress_test", ()), modality)}
    realistic = [s for s in results["scenarios"] if s.get("perturbation") and s["perturbation"] not in stress]
    ranking = []
    for det in sorted({d for s in realistic for d in (*s.get("flagged_errors", {}), *s.get("epd", {}))}):
        if det not in thresholds:
            continue
        flagged = _mean([(s.get("flagged_errors", {}).get(det) or {}).get("value") for s in realistic])
        epd = _mean([(s.get("epd", {}).get(det) or {}).get("value") for s in realistic])
        if flagged is None and epd is None:
            continue
        ranking.append({"detector": det, "threshold": thresholds[det], "flagged_errors": flagged, "epd": epd})
    if not ranking:
        return None
    by_epd = any(r["epd"] is not None for r in ranking)
    key, other = ("epd", "flagged_errors") if by_epd else ("flagged_errors", "epd")
    ranking.sort(key=lambda r: (-(r[key] if r[key] is not None else -math.inf),
                                -(r[other] if r[other] is not None else -math.inf), r["detector"]))
    best_flags = ranking[0]["flagged_errors"] is not None
    best = ranking[0]
    scenarios = [s["id"] for s in realistic]
    evidence = [{"scenario": s["id"],
                 "flagged_errors": (s.get("flagged_errors", {}).get(best["detector"]) or {}).get("value"),
                 "epd": (s.get("epd", {}).get(best["detector"]) or {}).get("value")} for s in realistic]
    parts = []
    if best["epd"] is not None:
        parts.append(f"referring what it flags at {1 - KEEP:.0%} clean referrals prevents {best['epd']:.3f} of the "
                     f"{'accuracy' if best_flags else 'performance'} drop on average")
    if best_flags:
        parts.append(f"it flags {best['flagged_errors']:.0%} of the model's errors")
    what = " and ".join(parts) + f" over the {len(scenarios)} realistic perturbed scenarios"
    statement = (f"For this model, deploy {best['detector']} at threshold {best['threshold']:.6g}: {what}.")
    weak = best_flags and (best["flagged_errors"] or 0.0) < 0.5
    alerts = [w["message"] for w in results.get("warning_records", []) if w.get("alert")]
    if alerts:
        # errors of an audit that may be broken (a model at chance, a wrong input spec) are not the
        # model's deployment errors: ranking detectors by them would be reassurance without evidence
        statement = (f"No deployment recommendation: the audit raised {len(alerts)} alert(s) (first: {alerts[0]}), so the "
                     "errors the detectors are ranked by may be the audit's, not the model's in deployment. The ranking "
                     "is shown as evidence only.")
        return {"detector": None, "threshold": None, "keep": KEEP, "ranked_by": key, "flagged_errors": None,
                "epd": None, "scenarios": scenarios, "evidence": [], "ranking": ranking, "weak": True,
                "withheld": True, "statement": statement}
    if weak:
        statement += (" No detector flags even half of the errors: a referral rule built on these detectors would let "
                      "most shift-induced errors through.")
    return {"detector": best["detector"], "threshold": best["threshold"], "keep": KEEP, "ranked_by": key,
            "flagged_errors": best["flagged_errors"], "epd": best["epd"], "scenarios": scenarios,
            "evidence": evidence, "ranking": ranking, "weak": weak, "withheld": False, "statement": statement}
