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
  **Improvement** is the mirror image: ``worsening < −max_drop`` under the same significance rule.
* **Worst first**: regressions (and improvements) are ordered with disjoint-CI ones before the others,
  each group by the size of the change, so the first lines of a long list are the most credible
  and the largest. Sizes are in each metric's units, so unbounded metrics (NLL) can lead.
* **Incomparable audits** are refused (:class:`IncomparableAudits`, exit 2 on the command line)
  unless ``allow_different_data``: a different test set (dataset SHA-256) or a different task (type
  or class list, the label space the metrics are computed over). Either way the differences would
  mix the models' behaviour with the change of test set, which no tolerance can separate. Settings
  that shape the numbers without changing what is measured (seed, bootstrap resamples, confidence,
  ECE bins, severities, precision, threshold, medaudit version) are allowed and stated in ``notes``;
  scenarios present in one audit only are counted, not compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import DataError
from .results import Results

HEADLINE = ("accuracy", "balanced_accuracy", "auroc", "f1_macro", "ece", "brier", "nll")
SUMMARY_LINES = 10  # worst regressions named on the console and atop the HTML; the rest are counted
# settings that change the numbers (or their intervals) but not what is measured: stated, not refused
SETTINGS = (("audit", "bootstrap"), ("audit", "confidence"), ("audit", "n_bins"), ("audit", "severities"),
            ("audit", "precision"), ("task", "threshold"), ("task", "target_specificity"))


class IncomparableAudits(DataError):
    """The two audits measured different things (test set or task); see the module docstring."""


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


@dataclass(frozen=True)
class RobustnessRow:
    """One perturbed scenario of both audits side by side: how much each one's headline metric
    dropped from its own clean value, and how far each one's representation moved."""

    scenario: str
    metric: str
    old_drop: dict[str, Any] | None  # {value, ci_low, ci_high}: clean − perturbed, oriented (positive = worse)
    new_drop: dict[str, Any] | None
    old_representation: dict[str, Any]  # {measure: estimate} (empty when not measured)
    new_representation: dict[str, Any]

    @property
    def more_robust(self) -> str:
        """``old`` or ``new`` when its drop is smaller and the two intervals are disjoint, else
        ``neither`` (intervals overlap) or ``–`` (a drop is missing)."""
        if not self.old_drop or not self.new_drop or None in (self.old_drop.get("value"), self.new_drop.get("value")):
            return "–"
        if _overlap(self.old_drop, self.new_drop) is not False:
            return "neither (CIs overlap)"
        return "old" if self.old_drop["value"] < self.new_drop["value"] else "new"


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
    mismatch: list[str] = field(default_factory=list)  # why the audits are not comparable (allowed by the caller)
    settings: list[str] = field(default_factory=list)  # "name old vs new" of settings that differ (comparable)
    robustness: list[RobustnessRow] = field(default_factory=list)  # per perturbed scenario in both, side by side

    @property
    def regressions(self) -> list[MetricChange]:
        """Regressions, worst first (see the module docstring)."""
        return worst_first([c for c in self.changes if c.regression])

    @property
    def improvements(self) -> list[MetricChange]:
        """Metrics that improved by more than ``max_drop`` (and significantly, with ``require_significant``), largest first."""
        return worst_first([c for c in self.changes if c.worsening is not None and c.worsening < -self.max_drop
                            and (c.significant or not self.require_significant)], improving=True)

    @property
    def unmatched(self) -> str | None:
        """The scenarios present in one audit only, as a count (they are not compared); None when there are none."""
        if not (self.only_old or self.only_new):
            return None
        return (f"{len(self.only_old) + len(self.only_new)} scenario(s) in one audit only, not compared "
                f"({len(self.only_old)} only in the old, {len(self.only_new)} only in the new)")

    @property
    def best_improvement(self) -> str | None:
        """The first improvement in worst-first order, labelled by why it is first; None when nothing improved."""
        if not self.improvements:
            return None
        top = self.improvements[0]
        return f"{'largest with disjoint CIs' if top.significant else 'largest'}: {describe(top)}"

    @property
    def has_regression(self) -> bool:
        return any(c.regression for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json`` output or CI artefacts)."""
        return {"old": self.old, "new": self.new, "max_drop": self.max_drop,
                "require_significant": self.require_significant, "has_regression": self.has_regression,
                "only_old": self.only_old, "only_new": self.only_new, "notes": self.notes, "mismatch": self.mismatch,
                "settings": self.settings,
                "checks": [{"expr": e, "old": o, "new": n} for e, o, n in self.checks],
                "changes": [c.__dict__ for c in self.changes],
                "robustness": [{**r.__dict__, "more_robust": r.more_robust} for r in self.robustness]}


def worst_first(changes: list[MetricChange], *, improving: bool = False) -> list[MetricChange]:
    """Disjoint-CI changes before the others, each group by size (of the worsening, or of the improvement)."""
    sign = -1 if improving else 1
    return sorted(changes, key=lambda c: (not c.significant, -sign * (c.worsening or 0.0)))


def describe(c: MetricChange) -> str:
    """One line for a regression or improvement: where, old -> new, by how much, and what the CIs say.

    ASCII only: it is printed on consoles whose encoding may not have arrows.
    """
    ci = "no CIs" if _overlap(c.old, c.new) is None else ("CIs disjoint" if c.significant else "CIs overlap")
    how = f"worse by {c.worsening:.4f}" if (c.worsening or 0) > 0 else f"better by {-(c.worsening or 0):.4f}"
    return f"{c.scenario} {c.metric}: {c.old['value']:.4f} -> {c.new['value']:.4f} ({how}, {ci})"


def _task(r: dict[str, Any]) -> str | None:
    """The label space the metrics were computed over, as ``type [class, …]``; None when the results
    file does not record it. An encoder's audit (``embedding``) is evaluated through its probes as
    the classification task of its classes, so a frozen backbone with probes compares with the
    fine-tuned classifier of the same classes."""
    task = r.get("config", {}).get("task") or {}
    if not task.get("type"):
        return None
    classes = [str(c) for c in task.get("classes") or []]
    kind = task["type"]
    if kind == "embedding":
        kind = "binary" if len(classes) == 2 else "multiclass"
    return f"{kind} [{', '.join(classes)}]"


def _identity(r: dict[str, Any]) -> dict[str, Any]:
    return {"model": r["model"]["path"], "model_name": r["model"].get("name"), "model_sha256": r["model"]["sha256"],
            "model_task": r["model"].get("task"),
            "dataset": r["dataset"]["path"], "dataset_sha256": r["dataset"]["sha256"],
            "n_samples": r["dataset"]["n_samples"], "task": _task(r), "created_at": r["created_at"],
            "medaudit_version": r["medaudit_version"], "seed": r["seed"],
            "bootstrap": r.get("config", {}).get("audit", {}).get("bootstrap")}


def _mismatch(io: dict[str, Any], iN: dict[str, Any]) -> list[str]:
    """What makes the two audits incomparable, each as a phrase naming both sides."""
    out = []
    if io["dataset_sha256"] != iN["dataset_sha256"]:
        out.append(f"different data: old {io['dataset']} (SHA-256 {io['dataset_sha256'][:12]}), "
                   f"new {iN['dataset']} (SHA-256 {iN['dataset_sha256'][:12]})")
    if None not in (io["task"], iN["task"]) and io["task"] != iN["task"]:
        out.append(f"different task: old {io['task']}, new {iN['task']}")
    return out


def _settings_differ(o: dict[str, Any], n: dict[str, Any]) -> list[str]:
    """``name old vs new`` for every setting in SETTINGS (and the seed and version) that differs."""
    pairs = [("seed", o["seed"], n["seed"]), ("medaudit version", o["medaudit_version"], n["medaudit_version"])]
    for section, key in SETTINGS:
        pairs.append((f"{section}.{key}", o.get("config", {}).get(section, {}).get(key),
                      n.get("config", {}).get(section, {}).get(key)))
    return [f"{name} {a} vs {b}" for name, a, b in pairs if a != b]


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two intervals overlap; None when either has no interval."""
    if None in (a.get("ci_low"), a.get("ci_high"), b.get("ci_low"), b.get("ci_high")):
        return None
    return not (a["ci_high"] < b["ci_low"] or b["ci_high"] < a["ci_low"])


def compare(old: Results, new: Results, max_drop: float = 0.0, *, require_significant: bool = False,
            allow_different_data: bool = False) -> CompareResult:
    """Compare two audits metric by metric; see the module docstring for the rules.

    Raises :class:`IncomparableAudits` when they ran on different data or tasks, unless
    ``allow_different_data``; then the reasons are in ``mismatch``.
    """
    if max_drop < 0:
        raise ValueError(f"max_drop must be ≥ 0, got {max_drop}")
    o, n = old.model_dump(mode="json"), new.model_dump(mode="json")
    io, iN = _identity(o), _identity(n)
    mismatch = _mismatch(io, iN)
    if mismatch and not allow_different_data:
        raise IncomparableAudits(f"the two audits are not comparable: {'; '.join(mismatch)}; "
                                 "pass --allow-different-data to compare them anyway")
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
    if io["dataset_sha256"] == iN["dataset_sha256"]:
        notes.append("Both audits ran on the same data: the estimates are paired, so the CI-overlap rule is "
                     "conservative; a paired test needs the per-sample predictions (--save-predictions) of both runs.")
    if io["model_sha256"] == iN["model_sha256"]:
        notes.append("Both audits used the same model file (SHA-256 identical).")
    settings = _settings_differ(o, n)
    if settings:
        notes.append(f"Settings differ ({'; '.join(settings)}): the audits stay comparable, but these shape the "
                     "numbers or the width of their intervals.")
    if not any(c.significant for c in changes) and any(c.old.get("ci_low") is None for c in changes):
        notes.append("At least one audit has no confidence intervals (audit.bootstrap: 0): nothing can be called "
                     "significant.")
    old_checks = {c["expr"]: c for c in o.get("checks", [])}
    new_checks = {c["expr"]: c for c in n.get("checks", [])}
    verdict = {True: "pass", False: "FAIL"}
    checks = [(e, verdict[old_checks[e]["passed"]] if e in old_checks else "–",
               verdict[new_checks[e]["passed"]] if e in new_checks else "–")
              for e in list(old_checks) + [e for e in new_checks if e not in old_checks]]
    if io.get("model_task") != iN.get("model_task"):
        notes.append(f"The models are of different kinds ({io.get('model_task')} vs {iN.get('model_task')}): an "
                     "encoder's metrics are its linear probe's, fitted on its --reference set; compare robustness by "
                     "the drops from each audit's own clean value (the robustness table).")
    return CompareResult(
        old=io, new=iN, max_drop=max_drop, require_significant=require_significant, changes=changes,
        only_old=[s for s in old_sc if s not in new_sc], only_new=[s for s in new_sc if s not in old_sc],
        checks=checks, notes=notes, mismatch=mismatch, settings=settings,
        robustness=robustness_rows(o, n, directions))


def robustness_rows(o: dict[str, Any], n: dict[str, Any], directions: dict[str, bool]) -> list[RobustnessRow]:
    """Every perturbed scenario in both audits: each audit's drop from its own clean value in the
    first headline metric both have (:data:`HEADLINE`, else the first drop both record), and the
    representation measures, side by side."""
    old_sc = {s["id"]: s for s in o["scenarios"]}
    both = [s for s in n["scenarios"] if s["id"] in old_sc and s.get("perturbation")]
    common = [k for k in (both[0].get("drop") or {}) if k in (old_sc[both[0]["id"]].get("drop") or {})] if both else []
    metric = next((k for k in HEADLINE if k in common), next((k for k in common if k in directions), None))
    return [RobustnessRow(s["id"], metric or "–",
                          (old_sc[s["id"]].get("drop") or {}).get(metric) if metric else None,
                          (s.get("drop") or {}).get(metric) if metric else None,
                          old_sc[s["id"]].get("representation") or {}, s.get("representation") or {})
            for s in both]


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
                        + (" with disjoint CIs" if result.require_significant else "")
                        + ", in every scenario and metric, worst first (disjoint CIs before overlapping ones).",
                        headers, [row(c) for c in result.regressions])
    headline = Table("Headline metrics in every scenario present in both audits (↑ higher is better, ↓ lower is better). "
                     "Highlighted: CIs disjoint (significant by the conservative rule); red: regression.", headers,
                     [row(c) for c in result.changes if c.metric in HEADLINE])
    identity = [(k.replace("_", " "), str(result.old[k]), str(result.new[k])) for k in result.old]
    checks = Table("Configured checks in each audit.", ["Check", "Old", "New"],
                   [Row([e, a, b], "fail" if b == "FAIL" else "") for e, a, b in result.checks])
    measures = [m for m in ("cosine", "cka", "knn_consistency")
                if any(m in x.old_representation or m in x.new_representation for x in result.robustness)]
    metric = result.robustness[0].metric if result.robustness else "–"
    robustness = Table(
        f"Robustness per perturbed scenario: each audit's drop in {label(metric)} from its own clean value (positive = "
        "worse) with its interval, which audit is more robust (smaller drop, intervals disjoint), and the "
        "representation measures of each (1 = unchanged).",
        ["Scenario", f"Old drop ({label(metric)})", f"New drop ({label(metric)})", "More robust"]
        + [f"{who} {m}" for m in measures for who in ("Old", "New")],
        [Row([x.scenario, fmt_ci(x.old_drop), fmt_ci(x.new_drop), x.more_robust]
             + [fmt_ci(getattr(x, f"{who}_representation").get(m)) for m in measures for who in ("old", "new")],
             "drop" if x.more_robust in ("old", "new") else "") for x in result.robustness])
    return template_env().get_template("compare.html").render(
        r=result, regressions=regressions, headline=headline, identity=identity, checks=checks, robustness=robustness,
        worst=[describe(c) for c in result.regressions[:SUMMARY_LINES]], improvements=result.improvements,
        n_significant=sum(1 for c in result.changes if c.significant), css=stylesheet())


def load_pair(old_path: Any, new_path: Any) -> tuple[Results, Results]:
    """Both results files, validated (a convenience for the CLI)."""
    from pathlib import Path

    from .results import load_results

    return load_results(Path(old_path)), load_results(Path(new_path))

