"""The audit's verdict: the configured checks and the robustness the results show, never one without the other.

A green PASS that only says "the one configured check held" while accuracy collapses under a
perturbation reassures about the wrong thing. The verdict therefore combines, in this order:

1. ``alert`` — a warning record flagged ``alert`` (a model at chance on clean data, a
   preprocessing spec under which the model cannot work): the evidence itself is in doubt;
2. ``fail`` — a configured check (``--fail-on`` / ``checks:``) failed;
3. ``concerns`` — the checks pass (or none are configured) but some perturbation has a *breaking
   point* (:func:`medaudit.robustness.breaking_points`: a drop that significantly exceeds its
   ``verdict.margins`` margin), or failed to run (``not_run``: it was never judged); stress tests
   (perturbations unrealistic for the modality) count too but are named apart;
4. ``pass`` — checks configured, all pass, nothing breaks;
5. ``no-checks`` — nothing configured and nothing breaks.

The exit code of ``medaudit run`` still depends on the configured checks only: the verdict is
evidence for a reader, the checks are the user's gate.
"""

from __future__ import annotations

from typing import Any

from .config import DEFAULT_MARGIN
from .outputs import Scenario
from .perturbation import is_stress_test
from .robustness import breaking_points

STATUSES = ("alert", "fail", "concerns", "pass", "no-checks")


def breaking_points_of(results: dict[str, Any]) -> dict[str, Any]:
    """``robustness.breaking_points`` of a results dict, computed from its scenarios for a file
    written before they were stored (margins from its config, else the defaults)."""
    stored = results.get("robustness", {}).get("breaking_points")
    if stored is not None:
        return stored
    cfg = results.get("config", {})
    margins = {"*": DEFAULT_MARGIN, **(cfg.get("verdict", {}).get("margins") or {})}
    directions = results.get("metric_directions", {})
    info = results.get("metric_info") or {}
    # without display declarations (older files) every overall metric is judged, per-class keys not
    headline = [k for k, v in info.items() if v.get("headline")] if info else [k for k in directions if "/" not in k]
    keys = list(dict.fromkeys(headline + [k for k in margins if k in directions]))
    modality = cfg.get("input", {}).get("modality", "generic")
    stress = {c["name"]: is_stress_test(c.get("stress_test", ()), modality) for c in results.get("perturbation_catalogue", [])}
    scenarios = [Scenario(s["id"], s.get("suite"), s.get("perturbation"), s.get("severity", 0))
                 for s in results.get("scenarios", [])]
    return breaking_points({s["id"]: s.get("drop", {}) for s in results.get("scenarios", [])}, scenarios, keys,
                           margins, stress)


def breaking(results: dict[str, Any], stress_test: bool) -> dict[str, list[str]]:
    """Perturbation → the metrics it breaks, for the stress tests or for the realistic ones."""
    out: dict[str, list[str]] = {}
    for name, entry in sorted(breaking_points_of(results).items()):
        keys = [k for k, p in entry.get("metrics", {}).items() if p.get("severity") is not None]
        if keys and bool(entry.get("stress_test")) == stress_test:
            out[name] = keys
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """The verdict of a results.json dict: ``status`` (one of :data:`STATUSES`), a one-line
    ``headline``, the check counts and the perturbations that break a metric (realistic and
    stress tests apart)."""
    checks = results.get("checks", [])
    passed = sum(1 for c in checks if c.get("passed"))
    alerts = [w for w in results.get("warning_records", []) if w.get("alert")]
    real, stress = breaking(results, False), breaking(results, True)
    # a perturbation whose scenarios failed was never judged: a verdict silent about it would
    # reassure about an audit that did not happen in full
    failed = sorted({w.get("subject") or w.get("scenario") or "?" for w in results.get("warning_records", [])
                     if w.get("code") == "perturbation-failed"})
    if checks:
        check_text = f"{passed} of {_plural(len(checks), 'configured check')} passed"
    else:
        check_text = "no checks configured"
    if real or stress:
        parts = []
        if real:
            parts.append(f"{_plural(len(real), 'perturbation')} {'breaks' if len(real) == 1 else 'break'} a headline "
                         "metric beyond its margin")
        if stress:
            parts.append(f"{_plural(len(stress), 'stress test')} {'breaks' if len(stress) == 1 else 'break'} one")
        robustness_text = " and ".join(parts)
    else:
        robustness_text = "no perturbation breaks a headline metric beyond its margin"
    if failed:
        robustness_text += f"; {_plural(len(failed), 'perturbation')} failed to run and {'is' if len(failed) == 1 else 'are'} not judged ({', '.join(failed)})"
    if alerts:
        status, word = "alert", "ALERT: THE AUDIT MAY NOT BE MEANINGFUL"
        detail = f"{_plural(len(alerts), 'alert')}; {check_text}; {robustness_text}"
    elif passed < len(checks):
        status, word, detail = "fail", "FAIL", f"{check_text}; {robustness_text}"
    elif real or stress or failed:
        status = "concerns"
        word = "CHECKS PASS, ROBUSTNESS CONCERNS" if checks else "NO CHECKS, ROBUSTNESS CONCERNS"
        detail = f"{check_text}; {robustness_text}"
    elif checks:
        status, word, detail = "pass", "PASS", f"{check_text}; {robustness_text}"
    else:
        status, word, detail = "no-checks", "NO CHECKS CONFIGURED", robustness_text
    return {"status": status, "headline": f"{word} — {detail}", "checks_passed": passed, "checks_total": len(checks),
            "alerts": len(alerts), "breaking": real, "stress_breaking": stress, "not_run": failed}
