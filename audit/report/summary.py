"""The summary's verdict and key findings, computed from the results alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..verdict import verdict as compute_verdict
from .core import stress_tests
from .views import clean_scenario, fmt, fmt_metric, label, metric_info, perturbed_scenarios, primary_metric, value


def alerts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Warning records that may invalidate the evidence (``alert``): a banner above the summary."""
    return [w for w in r.get("warning_records", []) if w.get("alert")]


def verdict(r: dict[str, Any]) -> dict[str, Any]:
    """The results' verdict (:mod:`medaudit.verdict`); computed for files written before it was stored."""
    return r.get("verdict") or compute_verdict(r)


def robustness_headlines(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's robustness lines: the worst significant drop of the primary metric among the
    realistic perturbations, and among the stress tests, each with its scenario."""
    primary = primary_metric(r)
    if primary is None or not perturbed_scenarios(r):
        return []
    info = metric_info(r).get(primary)
    clean = clean_scenario(r)
    before = value(clean["metrics"].get(primary)) if clean else None
    stress = stress_tests(r)
    out = []
    for kind, chosen in (("Robustness", False), ("Stress tests", True)):
        worst = None
        for s in perturbed_scenarios(r):
            d = s.get("drop", {}).get(primary)
            if (s["perturbation"] in stress) == chosen and d and d.get("significant") and (d.get("value") or 0) > 0:
                if worst is None or d["value"] > worst[1]["value"]:
                    worst = (s, d)
        if worst is not None:
            s, d = worst
            out.append((kind, f"worst significant drop in {label(primary)}: {fmt_metric(before, info)} clean → "
                              f"{fmt_metric(value(s['metrics'].get(primary)), info)} under {s['id']} "
                              f"(drop {fmt(d['value'])}, CI {fmt(d['ci_low'])} to {fmt(d['ci_high'])})"))
        elif not chosen:
            out.append((kind, f"no perturbation caused a significant drop in {label(primary)}"))
    return out


def _drop_findings(r: dict[str, Any], limit: int) -> list[str]:
    # rank by the primary metric only: mixing metrics would let two metrics of one scenario
    # compete, and readers compare findings against the primary metric's curves
    primary = primary_metric(r)
    info = metric_info(r).get(primary or "")
    drops = []
    for s in r["scenarios"]:
        for key in [primary] if primary else []:
            d = s.get("drop", {}).get(key)
            if d and d.get("significant") and d.get("value") is not None and d["value"] > 0:
                drops.append((d["value"], key, s["id"], s.get("perturbation") or s["id"], d))
    drops.sort(key=lambda t: (-t[0], t[1], t[2]))  # ties broken by name: same results, same text
    out: list[str] = []
    seen: set[str] = set()
    stress = stress_tests(r)
    for drop, key, sid, pert, d in drops:
        if pert in seen:
            continue
        seen.add(pert)
        clean = clean_scenario(r)
        before = value(clean["metrics"].get(key)) if clean else None
        after = value(next(s for s in r["scenarios"] if s["id"] == sid)["metrics"].get(key))
        kind = " — a stress test, not a realistic change for this modality" if pert in stress else ""
        out.append(f"{label(key).capitalize()} drops from {fmt_metric(before, info)} to {fmt_metric(after, info)} "
                   f"under {sid} (a drop of {drop:.3f}, CI {fmt(d['ci_low'])} to {fmt(d['ci_high'])}){kind}.")
        if len(out) >= limit:
            break
    if not drops and perturbed_scenarios(r):
        out.append(f"No perturbation caused a statistically significant drop in {label(primary or 'the primary metric')}.")
    return out


def findings(r: dict[str, Any], sections: Sequence[str] = ()) -> list[str]:
    """3–5 plain-language findings, most important first: failed checks, the largest significant
    drops of the primary metric, then the plugin sections' findings (``sections``, in section order)."""
    head: list[str] = [f"{w['message'][:1].upper()}{w['message'][1:]}." for w in alerts(r)]
    failed = [c for c in r.get("checks", []) if not c["passed"]]
    if failed:
        head.append(f"{len(failed)} of {len(r['checks'])} configured checks failed: "
                    + "; ".join(c["expr"] for c in failed[:3]) + ("; …" if len(failed) > 3 else "") + ".")
    tail = list(sections)
    drops = _drop_findings(r, max(1, 5 - len(head) - len(tail)))
    return (head + drops + tail)[:5]
