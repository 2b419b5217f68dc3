"""Compare two audits (``medaudit compare old/results.json new/results.json``): what moved, and regressions.

Rules (also in docs/report.md):

* A metric is compared in every scenario id present in both results files, for every metric key
  present in both.
* **Change** ``delta = new − old``; **worsening** is ``delta`` oriented by the metric's direction
  (``metric_directions`` of the new results, else the old): ``old − new`` for higher-is-better
  metrics, ``new − old`` otherwise, so positive always means worse. A metric with no known
  direction is reported but never counted as a regression.
* **Significant** means the two confidence intervals do not overlap. This is conservative: with
  independent estimates, non-overlapping 95% intervals correspond to p < 0.01 roughly, and
  overlapping ones can still differ. When both audits ran on the same data (same dataset SHA-256)
  the estimates are paired and a paired test (bootstrap over samples of the per-sample
  differences, or McNemar for accuracy) would be more powerful, but that needs the per-sample
  predictions (``--save-predictions``), which results.json does not hold.
* **Regression**: ``worsening > max_drop`` (and, with ``require_significant``, also significant).
  The default ``max_drop = 0`` flags any worsening at all, which is right for re-runs of one model
  (audits are deterministic) and too strict for a retrained one: pass a tolerance then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .results import Results

HEADLINE = ("accuracy", "balanced_accuracy", "auroc", "f1_macro", "ece", "brier", "nll")


@dataclass(frozen=True)
class MetricChange:
    scenario: str
    metric: str
    old: dict[str, Any]
    new: dict[str, Any]
    higher_is_better: bool | None
    delta: float | None  # new − old
    worsening: float | None  # oriented: positive = worse; None when undefined or direction unknown
    significant: bool  # the two CIs do not overlap
    regression: bool


@dataclass
class CompareResult:
    old: dict[str, Any]  # identity summaries: label, model, dataset, created, version, sha256s
    new: dict[str, Any]
    max_drop: float
    require_significant: bool
    changes: list[MetricChange]
    only_old: list[str] = field(default_factory=list)  # scenario ids present in one run only
    only_new: list[str] = field(default_factory=list)
    checks: list[tuple[str, str, str]] = field(default_factory=list)  # (expr, old verdict, new verdict)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[MetricChange]:
        return [c for c in self.changes if c.regression]

    @property
    def has_regression(self) -> bool:
        return any(c.regression for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json`` output or CI artefacts)."""
        return {"old": self.old, "new": self.new, "max_drop": self.max_drop,
                "require_significant": self.require_significant, "has_regression": self.has_regression,
                "only_old": self.only_old, "only_new": self.only_new, "notes": self.notes,
                "checks": [{"expr": e, "old": o, "new": n} for e, o, n in self.checks],
                "changes": [c.__dict__ for c in self.changes]}


def _identity(r: dict[str, Any]) -> dict[str, Any]:
    return {"model": r["model"]["path"], "model_name": r["model"].get("name"), "model_sha256": r["model"]["sha256"],
            "dataset": r["dataset"]["path"], "dataset_sha256": r["dataset"]["sha256"],
            "n_samples": r["dataset"]["n_samples"], "created_at": r["created_at"],
            "medaudit_version": r["medaudit_version"], "seed": r["seed"],
            "bootstrap": r.get("config", {}).get("audit", {}).get("bootstrap")}


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two intervals overlap; None when either has no interval."""
    if None in (a.get("ci_low"), a.get("ci_high"), b.get("ci_low"), b.get("ci_high")):
        return None
    return not (a["ci_high"] < b["ci_low"] or b["ci_high"] < a["ci_low"])


def compare(old: Results, new: Results, max_drop: float = 0.0, *, require_significant: bool = False) -> CompareResult:
    """Compare two audits metric by metric; see the module docstring for the rules."""
    if max_drop < 0:
        raise ValueError(f"max_drop must be ≥ 0, got {max_drop}")
    o, n = old.model_dump(mode="json"), new.model_dump(mode="json")
    directions = {**o.get("metric_directions", {}), **n.get("metric_directions", {})}
    old_sc = {s["id"]: s for s in o["scenarios"]}
    new_sc = {s["id"]: s for s in n["scenarios"]}
    changes: list[MetricChange] = []
    for sid in [s["id"] for s in n["scenarios"] if s["id"] in old_sc]:
        om, nm = old_sc[sid]["metrics"], new_sc[sid]["metrics"]
        for key in [k for k in nm if k in om]:
            a, b = om[key], nm[key]
            higher = directions.get(key)
            delta = worse = None
            if a.get("value") is not None and b.get("value") is not None:
                delta = b["value"] - a["value"]
                if higher is not None:
                    worse = -delta if higher else delta
            overlap = _overlap(a, b)
            significant = overlap is False
            regression = worse is not None and worse > max_drop and (significant or not require_significant)
            changes.append(MetricChange(sid, key, a, b, higher, delta, worse, significant, regression))
    notes: list[str] = []
    io, iN = _identity(o), _identity(n)
    if io["dataset_sha256"] != iN["dataset_sha256"]:
        notes.append("The two audits ran on different data (dataset SHA-256 differs): differences mix the models' "
                     "behaviour with the change of test set.")
    else:
        notes.append("Both audits ran on the same data: the estimates are paired, so the CI-overlap rule is "
                     "conservative; a paired test needs the per-sample predictions (--save-predictions) of both runs.")
    if io["model_sha256"] == iN["model_sha256"]:
        notes.append("Both audits used the same model file (SHA-256 identical).")
    if io["seed"] != iN["seed"] or io["bootstrap"] != iN["bootstrap"]:
        notes.append("Seeds or bootstrap resamples differ, so the intervals are not directly comparable in width.")
    if not any(c.significant for c in changes) and any(c.old.get("ci_low") is None for c in changes):
        notes.append("At least one audit has no confidence intervals (audit.bootstrap: 0): nothing can be called "
                     "significant.")
    old_checks = {c["expr"]: c for c in o.get("checks", [])}
    new_checks = {c["expr"]: c for c in n.get("checks", [])}
    verdict = {True: "pass", False: "FAIL"}
    checks = [(e, verdict[old_checks[e]["passed"]] if e in old_checks else "–",
               verdict[new_checks[e]["passed"]] if e in new_checks else "–")
              for e in list(old_checks) + [e for e in new_checks if e not in old_checks]]
    return CompareResult(
        old=io, new=iN, max_drop=max_drop, require_significant=require_significant, changes=changes,
        only_old=[s for s in old_sc if s not in new_sc], only_new=[s for s in new_sc if s not in old_sc],
        checks=checks, notes=notes)


def render_compare(result: CompareResult) -> str:
    """The comparison as one self-contained HTML page in the report's style."""
    from .report import Row, Table, fmt, fmt_ci, label, stylesheet, template_env

    def signed(x: float | None) -> str:
        return "–" if x is None else f"{x:+.4f}"

    def row(c: MetricChange) -> Row:
        direction = {True: "↑", False: "↓", None: "?"}[c.higher_is_better]
        flag = "fail" if c.regression else ("drop" if c.significant else "")
        return Row([c.scenario, f"{label(c.metric)} {direction}", fmt_ci(c.old), fmt_ci(c.new), signed(c.delta),
                    "yes" if c.significant else "no", "REGRESSION" if c.regression else ""], flag)

    headers = ["Scenario", "Metric", "Old [CI]", "New [CI]", "Change (new − old)", "CIs disjoint", ""]
    regressions = Table(f"Regressions: metrics that worsened by more than {fmt(result.max_drop, 4)}"
                        + (" with disjoint CIs" if result.require_significant else "") + ", in every scenario and metric.",
                        headers, [row(c) for c in result.regressions])
    headline = Table("Headline metrics in every scenario present in both audits (↑ higher is better, ↓ lower is better). "
                     "Highlighted: CIs disjoint (significant by the conservative rule); red: regression.", headers,
                     [row(c) for c in result.changes if c.metric in HEADLINE])
    improved = sum(1 for c in result.changes if c.worsening is not None and c.worsening < 0 and c.significant)
    identity = [(k.replace("_", " "), str(result.old[k]), str(result.new[k])) for k in result.old]
    checks = Table("Configured checks in each audit.", ["Check", "Old", "New"],
                   [Row([e, a, b], "fail" if b == "FAIL" else "") for e, a, b in result.checks])
    return template_env().get_template("compare.html").render(
        r=result, regressions=regressions, headline=headline, identity=identity, checks=checks,
        n_improved=improved, n_significant=sum(1 for c in result.changes if c.significant),
        css=stylesheet())


def load_pair(old_path: Any, new_path: Any) -> tuple[Results, Results]:
    """Both results files, validated (a convenience for the CLI)."""
    from pathlib import Path

    from .results import load_results

    return load_results(Path(old_path)), load_results(Path(new_path))

