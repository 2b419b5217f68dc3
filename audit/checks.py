r"""``--fail-on`` gates: expressions over results.json that fail an audit (exit code 1).

Grammar (whitespace around the operator is allowed)::

    check      := path op number
    op         := "<" | "<=" | ">" | ">=" | "==" | "!="
    path       := scenario "." metric                 clean.accuracy, mri.motion@3.ece,
                                                       clean.sensitivity/pneumonia
                | scenario ".drop." metric            mri.motion@3.drop.accuracy (clean − perturbed
                                                       for higher-is-better metrics)
                | scenario ".ood." detector "." stat  mri.motion@3.ood.energy.auroc, mri.motion@*.ood.rmd.flagged_errors
                                                       (stat: auroc aupr fpr95 fpr95_in aupr_trapz flagged_errors epd)
                | scenario ".representation." measure mri.motion@3.representation.cka
                                                       (measure: cosine cka knn_consistency; higher is better)
                | "subgroup." attribute "." metric "_gap"
                                                       subgroup.sex.accuracy_gap (max − min over the
                                                       attribute's groups on clean data)
    scenario   := "clean" | perturbation "@" severity | perturbation "@*" | "*"

    noninferiority check := scenario ".drop." metric (">" | ">=") margin "noninferior"
                                                       mri.motion@3.drop.accuracy > 0.05 noninferior

A **non-inferiority** check fails only when the drop is *not shown* to be within the margin: when
the upper end of the paired drop's interval (``ci_high``, the audit's two-sided ``confidence``
interval, so at 0.95 a one-sided 97.5 % bound — the regulatory convention of a two-sided 95 %
interval for a one-sided test at 2.5 %) exceeds the margin (``>``; ``>=``: reaches it). The
plain check fails on the point estimate instead. A non-inferiority check records that bound
(``checks[].upper_bound``) and the one-sided bootstrap p-value of H0 "drop >= margin"
(``checks[].p_value``): :math:`(1 + \#\{r: d_r \ge m\})/(1 + R)` over the ``R`` resampled
drops :math:`d_r` (Davison & Hinkley 1997, eq. 4.11; never 0 with finitely many resamples). The
decision is the bound's; the p-value is reported beside it. A wildcard takes the scenario with
the highest bound. Without bootstrap intervals (``audit.bootstrap: 0``) non-inferiority cannot be
shown and the check fails, with that reason.

A wildcard scenario takes the *worst* value over the matching scenarios (the lowest for a
higher-is-better metric, the highest otherwise; for ``drop`` the largest drop); the check records
which scenario that was (``checks[].scenario``), so a failure names it. The expression
states the failure condition: ``clean.accuracy<0.8`` fails the audit when clean accuracy is
below 0.8. A check whose value is undefined (e.g. AUROC with one class) fails, with the reason.

:func:`validate_checks` refuses, before any forward pass, a path naming a scenario, metric,
detector or metadata column the audit cannot produce (a :class:`Vocabulary`).

Besides the configured checks, the audit adds a failed ``perturbation:NAME ran`` check for each
perturbation the user named (``--perturbation``) whose plugin failed in all its scenarios.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt,
}
_EXPR = re.compile(r"^\s*(?P<path>[^<>=!]+?)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<num>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)"
                   r"(?:\s+(?P<kind>noninferior))?\s*$")


@dataclass(frozen=True)
class ParsedCheck:
    expr: str
    path: str
    op: str
    threshold: float
    #: a non-inferiority check: judged on the upper bound of the drop's interval, not its point
    noninferior: bool = False


def parse_check(expr: str) -> ParsedCheck:
    m = _EXPR.match(expr)
    if not m:
        raise ConfigError(
            f"--fail-on {expr!r}: not a check; write PATH OP NUMBER, e.g. 'clean.accuracy<0.8' or "
            "'mri.motion@3.ece>0.1' (operators < <= > >= == !=), or a non-inferiority check "
            "'mri.motion@3.drop.accuracy > 0.05 noninferior'")
    parsed = ParsedCheck(expr.strip(), m["path"].strip(), m["op"], float(m["num"]), m["kind"] is not None)
    if parsed.noninferior and (parsed.op not in (">", ">=") or ".drop." not in "." + parsed.path):
        raise ConfigError(
            f"--fail-on {expr!r}: a non-inferiority check bounds a drop from above: 'SCENARIO.drop.METRIC > MARGIN "
            "noninferior' (or >=); it fails when the drop's upper confidence bound exceeds the margin")
    return parsed


#: The statistics of a detector in a scenario's ``ood`` (:func:`medaudit.ood_metrics.detection_measures`).
DETECTION_STATS = ("auroc", "aupr", "fpr95", "fpr95_in", "aupr_trapz")
#: Harm statistics of a detector, kept beside ``ood`` in a scenario (``flagged_errors``, ``epd``);
#: a check names them like the detection statistics: ``mri.motion@*.ood.rmd.flagged_errors``.
HARM_STATS = ("flagged_errors", "epd")


#: Representation-robustness measures of a scenario (:mod:`medaudit.representation`), higher is better.
REPRESENTATION_STATS = ("cosine", "cka", "knn_consistency")


def _split_scenario(path: str, scenario_ids: list[str]) -> tuple[str, str]:
    """``(scenario prefix, rest)`` of a check path; the longest matching scenario id wins."""
    ids = sorted(scenario_ids, key=len, reverse=True)
    wildcards = sorted({f"{sid.split('@')[0]}@*" for sid in scenario_ids if "@" in sid})
    for prefix in ids + wildcards + ["*"]:
        if path.startswith(prefix + "."):
            return prefix, path[len(prefix) + 1:]
    raise ConfigError(f"check path {path!r} names no scenario; scenarios are: {', '.join(scenario_ids)}")


@dataclass(frozen=True)
class Vocabulary:
    """The names a check path may use in one audit, known before its first forward pass.

    ``metrics`` is None when some metric family does not declare the keys it emits (neither
    ``headline`` nor ``definitions``): its keys are unknown until it runs, so any metric name is
    accepted rather than refusing one the plugin may produce. A declared key may also be a
    per-class prefix (``sensitivity/<class>``), the class named or numbered (``class_names``).
    """

    scenarios: list[str]
    metrics: frozenset[str] | None
    classes: tuple[str, ...]
    detectors: list[str]
    columns: list[str]
    #: Whether the audit measures representation robustness (``audit.representation`` and a feature
    #: layer, or an encoder's embeddings).
    representation: bool = False

    def metric_known(self, key: str) -> bool:
        if self.metrics is None or key in self.metrics:
            return True
        prefix, _, suffix = key.rpartition("/")  # the class is the last part (knn_probe/sensitivity/<class>)
        labels = {*self.classes, *(str(i) for i in range(len(self.classes)))}
        return prefix in self.metrics and suffix in labels

    def metric_names(self) -> str:
        per_class = ", ".join(f"{k}/<class>" for k in sorted(self.metrics or ()) if "/" not in k)
        return f"{', '.join(sorted(self.metrics or ()))} (per class: {per_class}; classes: {', '.join(self.classes)})"


def _check_metric(expr: str, key: str, vocab: Vocabulary) -> None:
    if not vocab.metric_known(key):
        raise ConfigError(f"--fail-on {expr!r}: no metric {key!r} in this audit; metrics are: {vocab.metric_names()}")


def validate_checks(exprs: Iterable[str], vocab: Vocabulary) -> None:
    """Fail before any work when a check names a scenario, metric, detector statistic or
    subgroup attribute the audit cannot produce; the message names it and what exists."""
    for expr in exprs:
        path = parse_check(expr).path
        if path.startswith("subgroup."):
            parts = path.split(".")
            if len(parts) != 3 or not parts[2].endswith("_gap"):
                raise ConfigError(f"--fail-on {expr!r}: subgroup checks are 'subgroup.ATTRIBUTE.METRIC_gap'")
            # an intersection is named by its columns joined with "×" (docs/subgroups.md)
            missing = [c for c in parts[1].split("×") if c not in vocab.columns]
            if missing:
                raise ConfigError(f"--fail-on {expr!r}: {', '.join(map(repr, missing))} is not a metadata column of the "
                                  f"data; columns are: {', '.join(vocab.columns) or 'none'}")
            _check_metric(expr, parts[2][: -len("_gap")], vocab)
            continue
        prefix, rest = _split_scenario(path, vocab.scenarios)
        parts = rest.split(".")
        if parts[0] == "ood" and len(parts) == 3:
            if parts[1] not in vocab.detectors:
                raise ConfigError(f"--fail-on {expr!r}: no detector {parts[1]!r} runs in this audit; detectors are: "
                                  f"{', '.join(vocab.detectors) or 'none'}")
            if parts[2] not in DETECTION_STATS + HARM_STATS:
                raise ConfigError(f"--fail-on {expr!r}: no detector statistic {parts[2]!r}; statistics are: "
                                  f"{', '.join(DETECTION_STATS + HARM_STATS)}")
            if parts[2] in HARM_STATS and prefix.startswith("ood:"):
                raise ConfigError(f"--fail-on {expr!r}: an external OOD set has no predictions to judge, so no "
                                  f"{parts[2]}; name a perturbed scenario")
        elif prefix.startswith("ood:"):
            raise ConfigError(f"--fail-on {expr!r}: an external OOD set has detector statistics only, "
                              f"'{prefix}.ood.DETECTOR.STAT'")
        elif parts[0] == "representation":
            if len(parts) != 2 or parts[1] not in REPRESENTATION_STATS:
                raise ConfigError(f"--fail-on {expr!r}: representation checks are 'SCENARIO.representation.MEASURE' "
                                  f"with MEASURE one of {', '.join(REPRESENTATION_STATS)}")
            if not vocab.representation:
                raise ConfigError(f"--fail-on {expr!r}: this audit measures no representation robustness (it needs "
                                  "audit.representation and a feature layer, or task.type: embedding)")
            if prefix == "clean":
                raise ConfigError(f"--fail-on {expr!r}: representation measures compare a perturbed scenario with "
                                  "clean; name a perturbed scenario or '*'")
        elif parts[0] == "drop" and len(parts) >= 2:
            if prefix == "clean":
                raise ConfigError(f"--fail-on {expr!r}: drops are from clean, so 'clean' has none; name a perturbed "
                                  "scenario or '*'")
            _check_metric(expr, ".".join(parts[1:]), vocab)
        else:
            _check_metric(expr, rest, vocab)


def _lookup(results: dict[str, Any], path: str) -> tuple[float | None, str | None]:
    """The value of ``path`` and the scenario it came from: for a wildcard the worst one, or the
    first whose value is undefined (then the value is None)."""
    scenarios = results["scenarios"]
    directions: dict[str, bool] = results.get("metric_directions", {})
    if path.startswith("subgroup."):
        return _subgroup_gap(results, path), None
    prefix, rest = _split_scenario(path, [s["id"] for s in scenarios])
    if prefix == "*":
        chosen = [s for s in scenarios if s["perturbation"]]
    elif prefix.endswith("@*"):
        chosen = [s for s in scenarios if s["id"].startswith(prefix[:-1])]
    else:
        chosen = [s for s in scenarios if s["id"] == prefix]
    parts = rest.split(".")
    values: list[float | None] = []
    if parts[0] == "drop" and len(parts) >= 2:
        key = ".".join(parts[1:])
        values = [s.get("drop", {}).get(key, {}).get("value") for s in chosen]
        higher = False  # a larger drop is worse
        known = any(key in s.get("drop", {}) for s in chosen)
    elif parts[0] == "ood" and len(parts) == 3:
        det, stat = parts[1], parts[2]
        if stat in HARM_STATS:  # stored per scenario beside ood: {stat: {detector: estimate}}
            values = [s.get(stat, {}).get(det, {}).get("value") for s in chosen]
            known = any(det in s.get(stat, {}) for s in chosen)
        else:
            values = [s.get("ood", {}).get(det, {}).get(stat, {}).get("value") for s in chosen]
            known = any(det in s.get("ood", {}) for s in chosen)
        higher = stat not in ("fpr95", "fpr95_in")
    elif parts[0] == "representation" and len(parts) == 2:
        values = [s.get("representation", {}).get(parts[1], {}).get("value") for s in chosen]
        known = any(parts[1] in s.get("representation", {}) for s in chosen)
        higher = True
    else:
        key = rest
        values = [s["metrics"].get(key, {}).get("value") for s in chosen]
        higher = directions.get(key, True)
        known = any(key in s["metrics"] for s in chosen)
    if not known:
        available = sorted(chosen[0]["metrics"]) if chosen else []
        raise ConfigError(f"check path {path!r}: no value {rest!r} in scenario {prefix!r}; metrics are: {', '.join(available)}")
    undefined = next((s["id"] for s, v in zip(chosen, values) if v is None), None)
    if undefined is not None or not chosen:
        return None, undefined
    worst = (min if higher else max)(range(len(values)), key=lambda i: values[i])  # the first of equals
    return values[worst], chosen[worst]["id"]


def _noninferiority(results: dict[str, Any], parsed: ParsedCheck,
                    drop_rows: Callable[[str, str], Any] | None) -> dict[str, Any]:
    """A non-inferiority check's entry: decided by the highest upper bound over its scenarios."""
    prefix, rest = _split_scenario(parsed.path, [s["id"] for s in results["scenarios"]])
    key = rest.split(".", 1)[1]
    chosen = [s for s in results["scenarios"] if s["perturbation"] and (
        prefix == "*" or s["id"] == prefix or (prefix.endswith("@*") and s["id"].startswith(prefix[:-1])))]
    entry: dict[str, Any] = {"expr": parsed.expr, "value": None, "passed": False, "threshold": parsed.threshold,
                             "scenario": None, "error": None, "noninferior": True, "upper_bound": None, "p_value": None}
    if not any(key in s.get("drop", {}) for s in chosen):
        raise ConfigError(f"check path {parsed.path!r}: no drop {key!r} in scenario {prefix!r}")
    bounds = [(s["id"], s.get("drop", {}).get(key, {})) for s in chosen]
    missing = next((sid for sid, d in bounds if d.get("ci_high") is None), None)
    if missing is not None:
        entry.update(scenario=missing, error=(
            f"the drop has no confidence interval in {missing} (audit.bootstrap: 0, or the metric is undefined on "
            "every resample), so non-inferiority cannot be shown"))
        return entry
    sid, drop = max(bounds, key=lambda b: b[1]["ci_high"])  # the first of equals
    failed = _OPS[parsed.op](drop["ci_high"], parsed.threshold)
    entry.update(value=drop.get("value"), scenario=sid, passed=not failed, upper_bound=drop["ci_high"])
    rows = drop_rows(sid, key) if drop_rows is not None else None
    if rows is not None:
        resampled = [float(d) for d in rows if d == d]  # NaN resamples are dropped, as from the interval
        entry["p_value"] = (1 + sum(d >= parsed.threshold for d in resampled)) / (1 + len(resampled))
    return entry


def _subgroup_gap(results: dict[str, Any], path: str) -> float | None:
    parts = path.split(".")
    if len(parts) != 3 or not parts[2].endswith("_gap"):
        raise ConfigError(f"check path {path!r}: subgroup checks are 'subgroup.ATTRIBUTE.METRIC_gap'")
    attribute, metric = parts[1], parts[2][: -len("_gap")]
    values = [g["metrics"].get(metric, {}).get("value") for g in results.get("subgroups", [])
              if g["attribute"] == attribute and g["scenario"] == "clean" and not g.get("too_small", False)]
    if not values:
        attrs = sorted({g["attribute"] for g in results.get("subgroups", [])})
        raise ConfigError(f"check path {path!r}: no subgroup results for attribute {attribute!r} "
                          f"(audited attributes: {attrs or 'none; set subgroups.attributes or --subgroup'})")
    defined = [v for v in values if v is not None]
    if len(defined) < 2:
        return None
    return max(defined) - min(defined)


#: The non-inferiority fields of a plain check's entry (as results.json's Check model fills them in).
PLAIN: dict[str, Any] = {"noninferior": False, "upper_bound": None, "p_value": None}


def evaluate_checks(exprs: list[str], results: dict[str, Any],
                    drop_rows: Callable[[str, str], Any] | None = None) -> list[dict[str, Any]]:
    """Evaluate every check against a results dict; returns results.json ``checks`` entries.

    ``drop_rows(scenario_id, metric)``: the resampled paired drops (positive = worse) of a
    scenario's metric, from which a non-inferiority check's p-value is computed; without it the
    p-value is None (the decision, on the stored bound, is the same).
    """
    out = []
    for expr in exprs:
        parsed = parse_check(expr)
        if parsed.noninferior:
            out.append(_noninferiority(results, parsed, drop_rows))
            continue
        value, scenario = _lookup(results, parsed.path)
        if value is None:
            where = f" (in {scenario})" if scenario is not None else ""
            out.append({"expr": parsed.expr, "value": None, "passed": False, "threshold": parsed.threshold,
                        "scenario": scenario,
                        "error": f"the value is undefined for this audit{where} (e.g. a single class present)",
                        **PLAIN})
            continue
        failed = _OPS[parsed.op](value, parsed.threshold)
        out.append({"expr": parsed.expr, "value": value, "passed": not failed, "threshold": parsed.threshold,
                    "scenario": scenario, "error": None, **PLAIN})
    return out


def format_value(value: float | None) -> str:
    """A check's value as people read it: 4 significant digits, or ``undefined``."""
    return "undefined" if value is None else f"{value:.4g}"


def describe_check(check: dict[str, Any]) -> str:
    """One line that cannot be misread: ``PASS clean.accuracy = 0.988 (fails if < 0.9)``.

    The expression states the failure condition, so printing it bare (``pass: clean.accuracy<0.9``)
    reads as if accuracy were below 0.9; here the value and the condition are apart. A wildcard
    check names the scenario whose value decided it.
    """
    status = "PASS" if check["passed"] else "FAIL"
    match = _EXPR.match(check["expr"])
    if match is None:  # not a threshold check (perturbation:NAME ran)
        return f"{status} {check['expr']}" + (f": {check['error']}" if check.get("error") else "")
    path, op = match["path"].strip(), match["op"]
    scenario = check.get("scenario")
    where = f" in {scenario}" if scenario and not path.startswith(scenario + ".") else ""
    if check.get("noninferior"):
        if check.get("upper_bound") is None:
            return f"{status} {path}{where} non-inferiority: {check.get('error')}"
        p = check.get("p_value")
        verdict = "within the margin" if check["passed"] else "not shown within the margin"
        return (f"{status} {path}{where} = {format_value(check['value'])}, upper bound {format_value(check['upper_bound'])} "
                f"(non-inferiority margin {match['num']}: {verdict}" + (f"; one-sided p = {p:.3g}" if p is not None else "")
                + ")")
    line = f"{status} {path}{where} = {format_value(check['value'])} (fails if {op} {match['num']})"
    return line + (f": {check['error']}" if check.get("error") and check["value"] is None else "")


def requested_perturbation_checks(requested: list[str], scenario_ids: list[str],
                                  failures: dict[str, str]) -> list[dict[str, Any]]:
    """A failed check ``perturbation:NAME ran`` for each perturbation named in
    ``audit.perturbations`` (``--perturbation``) that produced no scenario.

    Its plugin failed in every scenario (the failures are isolated, so the audit went on): an
    audit of what the user asked for did not happen, and exit code 1, "a check failed", must say
    so to CI. ``failures`` maps scenario ids to why they were left out (the runner's).
    """
    out = []
    for name in dict.fromkeys(requested):
        if any(sid.split("@")[0] == name for sid in scenario_ids):
            continue
        reasons = [msg for sid, msg in failures.items() if sid.split("@")[0] == name]
        error = reasons[0] if reasons else f"perturbation {name!r} produced no scenario"
        if len(reasons) > 1:
            error += f" (and {len(reasons) - 1} more of its scenarios)"
        out.append({"expr": f"perturbation:{name} ran", "value": 0.0, "passed": False, "threshold": None,
                    "error": error, **PLAIN})
    return out


def junit_xml(checks: list[dict[str, Any]]) -> str:
    """A JUnit XML document with one test case per check, for CI systems."""
    from xml.sax.saxutils import escape, quoteattr

    failures = sum(not c["passed"] for c in checks)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name="medaudit" tests="{len(checks)}" failures="{failures}" errors="0">']
    for c in checks:
        lines.append(f'  <testcase classname="medaudit.checks" name={quoteattr(c["expr"])}>')
        if not c["passed"]:
            msg = describe_check(c)
            lines.append(f'    <failure message={quoteattr(msg)}>{escape(c["expr"])}: {escape(str(c["value"]))}'
                         f'{escape(" in " + c["scenario"]) if c.get("scenario") else ""}</failure>')
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    return "\n".join(lines) + "\n"
