"""Compare audits (``medaudit compare a/results.json b/results.json [c/results.json …]``): a
leaderboard, what moved against the first audit, paired tests, and regressions.

Rules (also in docs/report.md):

* **Audits**: two or more results.json files; the first is the **baseline**. With two, the second
  is compared with the first (``old``/``new`` below); with more, every other audit is compared
  with the first, pair by pair, by the rules below, and the command exits 1 when any of them
  regresses.
* **Protocols are never mixed**: audits run under different frozen protocols (name, version or
  content SHA-256 differ, one ran under a protocol and another did not, or their conformance or
  overridden keys differ) are refused with :class:`DifferentProtocols` (exit 2), naming both
  protocol identities. No flag allows it: ``--allow-different-data`` concerns the data only. The
  protocol all audits share is stated (``protocol: mri-v1 (sha256 …)``, or ``none``).
* **Leaderboard**: for every headline metric (``metric_info``; :data:`HEADLINE` for older files)
  present in every audit, three rankings, best first by the metric's direction: the clean value
  (with its interval), the mean over the perturbed scenarios every audit ran (point values: no
  interval can be formed from results.json), and the worst of those scenarios (with its interval
  and where). Then every robustness score in ``robustness`` (:data:`SCORES`: ``mce`` per metric,
  the four baseline-normalised ones, ``rood_degradation`` per metric), lower is better for all.
  An undefined value ranks last. Baseline-normalised scores rank alike only when every audit used
  the same ``--baseline``, which results.json does not record.
* A metric is compared in every scenario id present in both results files, for every metric key
  present in both.
* **Change** ``delta = new − old``; **worsening** is ``delta`` oriented by the metric's direction
  (``metric_directions`` of the new results, else the old): ``old − new`` for higher-is-better
  metrics, ``new − old`` otherwise, so positive always means worse. A metric with no known
  direction is reported but never counted as a regression.
* **Paired tests** run when both audits of a pair saved their predictions (``predictions.npz``
  beside results.json, ``--save-predictions``) on the same samples (same ``sample_ids`` in the
  same order, same labels), in every scenario both saved: McNemar's exact test for ``accuracy``,
  DeLong's test for ``auroc`` (binary: one test; multiclass: one per class, one-vs-rest, since
  the macro AUROC of the report is a mean of those), and a paired bootstrap for every other
  headline metric (``ece``, ``brier``, ``nll``, …; also ``accuracy`` and ``auroc`` of a
  multilabel task, which are macro means over labels). The paired bootstrap evaluates the audit's
  own metric plugins on the baseline audit's resamples (its seed, ``audit.bootstrap`` or 1000
  when 0), both models on the same weight rows, so each model's interval is its audit's; the
  metrics are defined as the baseline audit configured them. Each test reports the difference
  (``other − baseline``) with its interval (paired bootstrap; DeLong's normal interval for
  AUROC), the p-value and the Holm-adjusted p-value over **every** test shown (all pairs,
  scenarios and metrics). A pair whose predictions cannot be paired says why (:attr:`Pairing.reason`).
* **Significant** means: for a metric a paired test covers, Holm-adjusted p < 1 − confidence (the
  baseline's ``audit.confidence``); otherwise (no predictions on either side, or a metric no
  test covers: non-headline keys, the macro AUROC of a multiclass task) the two confidence
  intervals do not overlap. That fallback is conservative: with independent estimates,
  non-overlapping 95% intervals correspond to p < 0.01 roughly, and overlapping ones can still
  differ, most of all on the same data, where the estimates are paired.
* **Regression**: ``worsening > max_drop`` (and, with ``require_significant``, also significant).
  The default ``max_drop = 0`` flags any worsening at all, which is right for re-runs of one model
  (audits are deterministic) and too strict for a retrained one: pass a tolerance then.
  **Improvement** is the mirror image: ``worsening < −max_drop`` under the same significance rule.
* **Worst first**: regressions (and improvements) are ordered with significant ones before the others,
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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import DataError
from .results import Results

HEADLINE = ("accuracy", "balanced_accuracy", "auroc", "f1_macro", "ece", "brier", "nll")
SUMMARY_LINES = 10  # worst regressions named on the console and atop the HTML; the rest are counted
# settings that change the numbers (or their intervals) but not what is measured: stated, not refused
SETTINGS = (("audit", "bootstrap"), ("audit", "confidence"), ("audit", "n_bins"), ("audit", "severities"),
            ("audit", "precision"), ("task", "threshold"), ("task", "target_specificity"))
#: The robustness scores of results.json ``robustness`` a leaderboard ranks (lower is better for all).
SCORES = ("mce", "mce_vs_baseline", "relative_mce_vs_baseline", "be", "rbe", "rood_degradation")
#: Resamples of the paired bootstrap when the baseline audit ran with ``audit.bootstrap: 0``.
PAIRED_RESAMPLES = 1000
#: Agreement of a metric recomputed from predictions.npz with the value its results.json records.
_REPRODUCE_TOL = 1e-6


class IncomparableAudits(DataError):
    """The two audits measured different things (test set or task); see the module docstring."""


class DifferentProtocols(IncomparableAudits):
    """The audits ran under different frozen protocols (or one under none): never compared."""


@dataclass(frozen=True)
class PairedTest:
    """One paired comparison of the baseline audit's model (A) with another's (B) on the same
    samples, in one scenario. ``difference`` is B − A (positive: B scores higher)."""

    baseline: int  # index of audit A among the compared audits (the first: 0)
    other: int  # index of audit B
    scenario: str
    metric: str  # the results.json key tested
    target: str | None  # the class of a one-vs-rest DeLong test; None: the metric itself
    method: str  # "McNemar", "DeLong", "DeLong one-vs-rest" or "paired bootstrap"
    higher_is_better: bool
    value_a: float | None
    value_b: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_adjusted: float | None = None  # Holm over every test of the comparison
    significant: bool = False  # p_adjusted < 1 - confidence
    reason: str | None = None  # why p_value is None
    detail: dict[str, Any] = field(default_factory=dict)  # McNemar b, c; DeLong se, z; bootstrap n_used

    @property
    def name(self) -> str:
        return self.metric if self.target is None else f"{self.metric} ({self.target} vs rest)"

    @property
    def b_better(self) -> bool | None:
        """Whether B is better than A (by the metric's direction); None when there is no difference."""
        if not self.difference:
            return None
        return (self.difference > 0) == self.higher_is_better


@dataclass
class Pairing:
    """The paired tests of one pair of audits, or why there are none (``reason``)."""

    baseline: int
    other: int
    reason: str | None = None
    tests: list[PairedTest] = field(default_factory=list)
    n_samples: int | None = None
    n_resamples: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def paired(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class MetricChange:
    scenario: str
    metric: str
    old: dict[str, Any]
    new: dict[str, Any]
    higher_is_better: bool | None
    delta: float | None  # new − old
    worsening: float | None  # oriented: positive = worse; None when undefined or direction unknown
    significant: bool  # the paired test's Holm-adjusted p < alpha where one ran, else the two CIs do not overlap
    regression: bool
    paired: PairedTest | None = None  # the paired test that decided ``significant``, if one did


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
    pairing: Pairing | None = None  # the paired tests of the two audits; None: not attempted (no files)

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
        why = "largest" if not top.significant else "largest significant" if top.paired else "largest with disjoint CIs"
        return f"{why}: {describe(top)}"

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
                "changes": [{**c.__dict__, "paired": None if c.paired is None else _test_dict(c.paired)}
                            for c in self.changes],
                "robustness": [{**r.__dict__, "more_robust": r.more_robust} for r in self.robustness],
                "pairing": None if self.pairing is None else _pairing_dict(self.pairing)}


def _test_dict(t: PairedTest) -> dict[str, Any]:
    return {**t.__dict__, "name": t.name}


def _pairing_dict(p: Pairing) -> dict[str, Any]:
    return {**p.__dict__, "tests": [_test_dict(t) for t in p.tests]}


def worst_first(changes: list[MetricChange], *, improving: bool = False) -> list[MetricChange]:
    """Significant changes before the others, each group by size (of the worsening, or of the improvement)."""
    sign = -1 if improving else 1
    return sorted(changes, key=lambda c: (not c.significant, -sign * (c.worsening or 0.0)))


def _p(p: float | None) -> str:
    """A p-value for the console (ASCII): four decimals, or ``<0.0001``."""
    return "n/a" if p is None else ("<0.0001" if p < 1e-4 else f"{p:.4f}")


def describe(c: MetricChange) -> str:
    """One line for a regression or improvement: where, old -> new, by how much, and what decided
    its significance (the paired test with its Holm-adjusted p-value, else the CIs).

    ASCII only: it is printed on consoles whose encoding may not have arrows.
    """
    if c.paired is not None:
        ci = f"{c.paired.method} Holm p={_p(c.paired.p_adjusted)}, {'significant' if c.significant else 'not significant'}"
    else:
        ci = "no CIs" if _overlap(c.old, c.new) is None else ("CIs disjoint" if c.significant else "CIs overlap")
    how = f"worse by {c.worsening:.4f}" if (c.worsening or 0) > 0 else f"better by {-(c.worsening or 0):.4f}"
    return f"{c.scenario} {c.metric}: {c.old['value']:.4f} -> {c.new['value']:.4f} ({how}, {ci})"


def describe_test(t: PairedTest, labels: Sequence[str]) -> str:
    """One ASCII line for a paired test: which audits, where, both values, the difference (B − A)
    with its interval, the test's p-value and the Holm-adjusted one."""
    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    head = f"{labels[t.baseline]} vs {labels[t.other]} {t.scenario} {t.name}"
    if t.p_value is None:
        return f"{head}: {num(t.value_a)} -> {num(t.value_b)} ({t.method}: not testable, {t.reason})"
    ci = "" if t.ci_low is None else f" [{t.ci_low:+.4f}, {t.ci_high:+.4f}]"
    verdict = "significant" if t.significant else "not significant"
    return (f"{head}: {num(t.value_a)} -> {num(t.value_b)} (difference {t.difference:+.4f}{ci}, {t.method} "
            f"p={_p(t.p_value)}, Holm p={_p(t.p_adjusted)}, {verdict})")


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


def protocol_text(protocol: dict[str, Any] | None) -> str:
    """A protocol record as one line: ``mri-v1 (sha256 0123456789ab)``, with ``, not conformant
    (overridden: …)`` when the audit overrode it; ``none`` without a protocol."""
    if not protocol:
        return "none"
    text = f"{protocol.get('name')} (sha256 {str(protocol.get('sha256'))[:12]})"
    if not protocol.get("conformant", True):
        text += f", not conformant (overridden: {'; '.join(protocol.get('overrides') or []) or 'not recorded'})"
    return text


def _protocol_key(protocol: dict[str, Any] | None) -> tuple[Any, ...] | None:
    if not protocol:
        return None
    return (protocol.get("name"), protocol.get("version"), protocol.get("sha256"), bool(protocol.get("conformant", True)),
            tuple(sorted(protocol.get("overrides") or [])))


def check_protocols(results: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any] | None:
    """The protocol every audit ran under (None: none did); raises :class:`DifferentProtocols`
    naming the protocol identities of the first audit and of every audit that differs from it."""
    first = _protocol_key(results[0].get("protocol"))
    odd = [i for i, r in enumerate(results) if _protocol_key(r.get("protocol")) != first]
    if odd:
        def ran(i: int) -> str:
            p = results[i].get("protocol")
            return (f"{labels[i]} under protocol {protocol_text(p)}, version {p.get('version')}" if p
                    else f"{labels[i]} under no protocol")
        raise DifferentProtocols(
            f"audits under different protocols are never compared: {'; '.join(ran(i) for i in [0, *odd])}; "
            "re-run them under one protocol (--allow-different-data concerns the data only)")
    return results[0].get("protocol")


def _identity(r: dict[str, Any]) -> dict[str, Any]:
    return {"model": r["model"]["path"], "model_name": r["model"].get("name"), "model_sha256": r["model"]["sha256"],
            "model_task": r["model"].get("task"),
            "dataset": r["dataset"]["path"], "dataset_sha256": r["dataset"]["sha256"],
            "n_samples": r["dataset"]["n_samples"], "task": _task(r), "created_at": r["created_at"],
            "medaudit_version": r["medaudit_version"], "seed": r["seed"],
            "bootstrap": r.get("config", {}).get("audit", {}).get("bootstrap"),
            "protocol": protocol_text(r.get("protocol"))}


def _mismatch(io: dict[str, Any], iN: dict[str, Any], names: tuple[str, str] = ("old", "new")) -> list[str]:
    """What makes the two audits incomparable, each as a phrase naming both sides."""
    a, b = names
    out = []
    if io["dataset_sha256"] != iN["dataset_sha256"]:
        out.append(f"different data: {a} {io['dataset']} (SHA-256 {io['dataset_sha256'][:12]}), "
                   f"{b} {iN['dataset']} (SHA-256 {iN['dataset_sha256'][:12]})")
    if None not in (io["task"], iN["task"]) and io["task"] != iN["task"]:
        out.append(f"different task: {a} {io['task']}, {b} {iN['task']}")
    return out


def _refusal(mismatch: list[str], who: str = "the two audits") -> IncomparableAudits:
    return IncomparableAudits(f"{who} are not comparable: {'; '.join(mismatch)}; "
                              "pass --allow-different-data to compare them anyway")


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
            allow_different_data: bool = False, pairing: Pairing | None = None,
            names: tuple[str, str] = ("old", "new")) -> CompareResult:
    """Compare two audits metric by metric; see the module docstring for the rules.

    Raises :class:`IncomparableAudits` when they ran on different data or tasks, unless
    ``allow_different_data``; then the reasons are in ``mismatch``. ``pairing``: the paired tests
    of the two audits (:func:`paired_comparison`, Holm-adjusted); a metric one of them tests is
    significant by its adjusted p-value instead of by CI overlap. ``names``: how ``mismatch`` calls
    the two audits.
    """
    if max_drop < 0:
        raise ValueError(f"max_drop must be ≥ 0, got {max_drop}")
    o, n = old.model_dump(mode="json"), new.model_dump(mode="json")
    io, iN = _identity(o), _identity(n)
    mismatch = _mismatch(io, iN, names)
    if mismatch and not allow_different_data:
        raise _refusal(mismatch)
    directions = {**o.get("metric_directions", {}), **n.get("metric_directions", {})}
    tested = {(t.scenario, t.metric): t for t in (pairing.tests if pairing else []) if t.target is None}
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
            test = tested.get((sid, key))
            significant = test.significant if test is not None else _overlap(a, b) is False
            regression = worse is not None and worse > max_drop and (significant or not require_significant)
            changes.append(MetricChange(sid, key, a, b, higher, delta, worse, significant, regression, test))
    notes: list[str] = []
    if io["dataset_sha256"] == iN["dataset_sha256"]:
        if pairing is not None and pairing.paired:
            notes.append("Both audits ran on the same data and saved their predictions: the headline metrics are judged "
                         f"by paired tests ({len(pairing.tests)} here, Holm-adjusted); other metrics by CI overlap.")
        else:
            notes.append("Both audits ran on the same data: the estimates are paired, so the CI-overlap rule is "
                         "conservative; a paired test needs the per-sample predictions (--save-predictions) of both runs.")
    if pairing is not None and not pairing.paired:
        notes.append(f"No paired tests: {pairing.reason}; significance falls back to CI overlap.")
    if io["model_sha256"] == iN["model_sha256"]:
        notes.append("Both audits used the same model file (SHA-256 identical).")
    settings = _settings_differ(o, n)
    if settings:
        notes.append(f"Settings differ ({'; '.join(settings)}): the audits stay comparable, but these shape the "
                     "numbers or the width of their intervals.")
    if not any(c.significant for c in changes) and any(c.old.get("ci_low") is None for c in changes):
        notes.append("At least one audit has no confidence intervals (audit.bootstrap: 0): nothing can be called "
                     "significant by CI overlap.")
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
        robustness=robustness_rows(o, n, directions), pairing=pairing)


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


# ---------------------------------------------------------------------------------------------
# Leaderboard
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """One audit's place on a board."""

    audit: int  # index among the compared audits (0: the first)
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    where: str | None = None  # the worst scenario; or why the value is undefined


@dataclass(frozen=True)
class Board:
    """One ranking of the audits, best first (undefined values last, ties in command-line order)."""

    kind: str  # "metric" (a headline metric in one view) or "score" (a robustness score)
    name: str  # the metric key, or the score
    view: str  # metric: "clean", "mean of N perturbed" or "worst perturbed"; score: the metric it is of, or ""
    higher_is_better: bool
    standings: list[Standing]

    @property
    def title(self) -> str:
        what = self.name if self.kind == "metric" else f"{self.name}{' ' + self.view if self.view else ''}"
        where = f", {self.view}" if self.kind == "metric" else ""
        return f"{what}{where} ({'higher' if self.higher_is_better else 'lower'} is better)"

    @property
    def defined(self) -> bool:
        return any(s.value is not None for s in self.standings)


def headline_keys(r: dict[str, Any]) -> list[str]:
    """The audit's headline metric keys in their report order (``metric_info``), else :data:`HEADLINE`."""
    info = r.get("metric_info") or {}
    keys = sorted((k for k, i in info.items() if i.get("headline")),
                  key=lambda k: (info[k].get("order") is None, info[k].get("order") or 0, k))
    return keys or [k for k in HEADLINE if any(k in s["metrics"] for s in r["scenarios"])]


def _ranked(standings: list[Standing], higher: bool) -> list[Standing]:
    return sorted(standings, key=lambda s: (s.value is None, 0.0 if s.value is None else (-s.value if higher else s.value),
                                            s.audit))


_ABSENT: dict[str, Any] = {}  # a score's metric one audit does not record


def _estimate(x: Any) -> dict[str, Any] | None:
    return x if isinstance(x, dict) and "value" in x else None


def leaderboard(results: Sequence[dict[str, Any]]) -> list[Board]:
    """Every board of the audits' leaderboard (see the module docstring): three per headline metric
    every audit has (clean, mean of the shared perturbed scenarios, worst of them), then the
    robustness scores (per metric where a score is per metric)."""
    directions: dict[str, bool] = {}
    for r in reversed(results):  # the first audit's directions win
        directions.update(r.get("metric_directions") or {})
    scen = [{s["id"]: s for s in r["scenarios"]} for r in results]
    keys = [k for k in headline_keys(results[0]) if k in directions
            and all(k in (sc.get("clean") or {}).get("metrics", {}) for sc in scen)]
    perturbed = [s["id"] for s in results[0]["scenarios"] if s.get("perturbation") and all(s["id"] in sc for sc in scen)]
    boards: list[Board] = []
    for key in keys:
        higher = directions[key]
        clean = [Standing(i, **{k: sc["clean"]["metrics"][key].get(k) for k in ("value", "ci_low", "ci_high")})
                 for i, sc in enumerate(scen)]
        boards.append(Board("metric", key, "clean", higher, _ranked(clean, higher)))
        if not perturbed:
            continue
        mean, worst = [], []
        for i, sc in enumerate(scen):
            ests = [(sid, sc[sid]["metrics"].get(key) or {}) for sid in perturbed]
            values = [e.get("value") for _, e in ests]
            missing = [sid for sid, e in ests if e.get("value") is None]
            mean.append(Standing(i, None, where=f"undefined in {', '.join(missing)}") if missing
                        else Standing(i, sum(values) / len(values)))  # type: ignore[arg-type]
            defined = [(sid, e) for sid, e in ests if e.get("value") is not None]
            if defined:
                sid, e = (max if not higher else min)(defined, key=lambda x: x[1]["value"])
                worst.append(Standing(i, e["value"], e.get("ci_low"), e.get("ci_high"), sid))
            else:
                worst.append(Standing(i, None, where="undefined in every perturbed scenario"))
        boards.append(Board("metric", key, f"mean of {len(perturbed)} perturbed", higher, _ranked(mean, higher)))
        boards.append(Board("metric", key, "worst perturbed", higher, _ranked(worst, higher)))
    for score in SCORES:
        entries = [(r.get("robustness") or {}).get(score) for r in results]
        if all(e is None for e in entries):
            continue
        single = [_estimate(e) for e in entries if _estimate(e)]
        if single:  # one estimate per audit (the baseline-normalised scores), of the metric it records
            by_metric: dict[str, list[Any]] = {str(single[0].get("metric") or ""): entries}
        else:  # {metric: estimate} per audit: one board per metric any audit scores, headline ones first
            names = list(dict.fromkeys(k for e in entries if isinstance(e, dict) for k in e))
            order = {k: i for i, k in enumerate(headline_keys(results[0]))}
            names.sort(key=lambda k: order.get(k, len(order)))
            by_metric = {k: [e.get(k, _ABSENT) if isinstance(e, dict) else _ABSENT for e in entries] for k in names}
        for metric, per_audit in by_metric.items():
            standings = []
            for i, e in enumerate(per_audit):
                est = _estimate(e) or {}
                why = None
                if est.get("value") is None:
                    why = ("not in this audit" if e is _ABSENT or e is None
                           else est.get("reason") or "undefined")
                standings.append(Standing(i, est.get("value"), est.get("ci_low"), est.get("ci_high"), why))
            boards.append(Board("score", score, metric, False, _ranked(standings, False)))
    return boards


# ---------------------------------------------------------------------------------------------
# Paired tests
# ---------------------------------------------------------------------------------------------


class _PluginRows:
    """Weighted metrics for :func:`medaudit.paired.paired_bootstrap`, read from the audit's own
    metric plugins: :func:`medaudit.bootstrap.evaluate` computes every key of every family on
    every weight row in one pass; the pass is kept per model (per outputs tensor), so every key's
    bootstrap reuses it instead of recomputing the family."""

    def __init__(self, metrics: list[Any], ctx: Any, confidence: float) -> None:
        self.metrics, self.ctx, self.confidence = metrics, ctx, confidence
        self._passes: list[tuple[Any, dict[str, Any]]] = []

    def rows(self, outputs: Any, labels: Any, weights: Any) -> dict[str, Any]:
        from .bootstrap import evaluate

        for seen, raw in self._passes:
            if seen is outputs:
                return raw
        raw = evaluate(self.metrics, outputs, labels, weights, self.ctx, self.confidence)[1]
        self._passes.append((outputs, raw))
        return raw

    def metric(self, key: str) -> Callable[[Any, Any, Any], Any]:
        return lambda outputs, labels, weights: self.rows(outputs, labels, weights)[key]


def _metric_setup(r: dict[str, Any]) -> tuple[list[Any], Any, Any]:
    """The metric plugins, metric context and bound task an audit used, from its recorded config
    (as :func:`medaudit.audit.prepare` chooses them)."""
    from .config import Config
    from .metric import MetricContext
    from .plugin_manager import get_plugin_manager
    from .settings import resolve_settings
    from .task import bind_task

    config = Config.model_validate(r.get("config") or {})
    pm = get_plugin_manager(warn=lambda msg: None)  # load problems are the audits' business, not the comparison's
    resolve_settings(config, pm)
    task = bind_task(config, pm.tasks())
    name = task.metric_task(config.task)
    metrics = [m for _plugin, ms in pm.call_each("medaudit_metrics", config=config) for m in ms if name in m.tasks]
    n_bins = MetricContext.n_bins if config.audit.n_bins is None else config.audit.n_bins
    ctx = MetricContext(name, tuple(config.task.classes), config.task.threshold, n_bins, config.task.target_specificity)
    return metrics, ctx, task


def _load_predictions(path: Path | None, label: str) -> tuple[dict[str, Any] | None, str | None]:
    import numpy as np

    if path is None or not path.is_file():
        return None, f"no predictions.npz beside {label} (audit it with --save-predictions)"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("scenario_ids", "sample_ids", "probs", "labels") if k in f.files}
    except (OSError, ValueError) as exc:
        return None, f"{path} cannot be read ({exc})"
    missing = [k for k in ("scenario_ids", "sample_ids", "probs", "labels") if k not in arrays]
    if missing:
        return None, (f"the predictions of {label} hold no {', '.join(missing)} (a task without per-sample class "
                      "probabilities and labels has no paired tests)")
    return arrays, None


def _unpairable(pa: dict[str, Any], pb: dict[str, Any], la: str, lb: str) -> str | None:
    """Why the two predictions files do not describe the same samples, or None."""
    import numpy as np

    ia, ib = pa["sample_ids"].astype(str), pb["sample_ids"].astype(str)
    if ia.shape != ib.shape:
        return f"different samples: {la} saved {ia.size} predictions, {lb} {ib.size}"
    differ = np.flatnonzero(ia != ib)
    if differ.size:
        i = int(differ[0])
        return (f"different samples or another order: sample_ids differ at {differ.size} position(s), the first at "
                f"{i} ({ia[i]!r} in {la}, {ib[i]!r} in {lb})")
    if pa["labels"].shape != pb["labels"].shape or not np.array_equal(pa["labels"], pb["labels"]):
        n = (int(np.any(pa["labels"] != pb["labels"], axis=tuple(range(1, pa["labels"].ndim))).sum())
             if pa["labels"].shape == pb["labels"].shape else ia.size)
        return f"the same samples with different labels ({n} of {ia.size} differ)"
    return None


def _close(computed: float, recorded: float | None) -> bool:
    if recorded is None or computed != computed:  # NaN computed: undefined, recorded as None
        return recorded is None and computed != computed
    return abs(computed - recorded) <= _REPRODUCE_TOL * (1.0 + abs(recorded))


def paired_comparison(ra: dict[str, Any], rb: dict[str, Any], pred_a: Path | None, pred_b: Path | None, *,
                      indices: tuple[int, int] = (0, 1), labels: tuple[str, str] = ("[1]", "[2]")) -> Pairing:
    """The paired tests of audit B against audit A (see the module docstring), unadjusted
    (``p_adjusted`` None: :func:`adjust` sets it over every test shown), or the reason there are
    none. ``ra``/``rb``: the results as dicts; ``pred_a``/``pred_b``: their predictions.npz (or
    None); ``indices``/``labels``: the two audits' places and names among the compared audits."""
    import numpy as np
    import torch

    from .bootstrap import bootstrap_weights
    from .errors import MedauditError, one_line
    from .paired import delong, delong_ovr, mcnemar, paired_bootstrap

    ia, ib = indices
    la, lb = labels
    pa, why = _load_predictions(pred_a, la)
    if pa is None:
        return Pairing(ia, ib, why)
    pb, why = _load_predictions(pred_b, lb)
    if pb is None:
        return Pairing(ia, ib, why)
    why = _unpairable(pa, pb, la, lb)
    if why:
        return Pairing(ia, ib, why)
    try:
        metrics, ctx, _task = _metric_setup(ra)
        _m, ctx_b, _t = _metric_setup(rb)
    except (MedauditError, ValueError) as exc:  # a config this medaudit cannot read (pydantic errors are ValueErrors)
        return Pairing(ia, ib, f"the metrics cannot be rebuilt from the recorded configs ({one_line(exc)})")
    if ctx.task not in ("binary", "multiclass", "multilabel"):
        return Pairing(ia, ib, "paired tests cover class-probability tasks (binary, multiclass, multilabel), "
                               f"not {ctx.task}")
    sc_a = {s["id"]: s for s in ra["scenarios"]}
    sc_b = {s["id"]: s for s in rb["scenarios"]}
    ids_a, ids_b = [str(x) for x in pa["scenario_ids"]], [str(x) for x in pb["scenario_ids"]]
    shared = [sid for sid in ids_a if sid in ids_b and sid in sc_a and sc_b.get(sid)]
    if not shared:
        return Pairing(ia, ib, f"no scenario is in the predictions of both {la} and {lb}")
    directions = {**(rb.get("metric_directions") or {}), **(ra.get("metric_directions") or {})}
    keys = [k for k in headline_keys(ra) if k in directions]
    audit_cfg = (ra.get("config") or {}).get("audit") or {}
    confidence = float(audit_cfg.get("confidence") or 0.95)
    resamples = int(audit_cfg.get("bootstrap") or 0) or PAIRED_RESAMPLES
    y = torch.from_numpy(np.ascontiguousarray(pa["labels"]))
    n = int(y.shape[0])
    weights = bootstrap_weights(n, resamples, int(ra.get("seed") or 0))
    z = _normal_quantile(0.5 + confidence / 2.0)
    notes = []
    differ = [f"{f} {getattr(ctx, f)} vs {getattr(ctx_b, f)}" for f in ("threshold", "n_bins", "target_specificity")
              if getattr(ctx, f) != getattr(ctx_b, f)]
    if differ:
        notes.append(f"the metrics of both models are computed as {la} configured them ({'; '.join(differ)}): the "
                     "paired differences use one definition, and need not equal the difference of the two results files")
    single_label = ctx.task in ("binary", "multiclass")
    tests: list[PairedTest] = []
    for sid in shared:
        np_a = np.ascontiguousarray(pa["probs"][ids_a.index(sid)])
        np_b = np.ascontiguousarray(pb["probs"][ids_b.index(sid)])
        probs_a, probs_b = torch.from_numpy(np_a), torch.from_numpy(np_b)  # sharing memory
        plugin = _PluginRows(metrics, ctx, confidence)
        try:
            rows_a, rows_b = plugin.rows(probs_a, y, weights), plugin.rows(probs_b, y, weights)
        except ValueError as exc:
            return Pairing(ia, ib, f"the saved predictions cannot be evaluated in {sid} ({exc})")
        present = [k for k in keys if k in rows_a and k in sc_a[sid]["metrics"] and k in sc_b[sid]["metrics"]]
        # the predictions must be the ones the results were computed from (a stale or foreign file is refused)
        for label, rows, sc, same in ((la, rows_a, sc_a, True), (lb, rows_b, sc_b, ctx_b == ctx)):
            if not same:
                continue
            for k in present:
                computed, recorded = float(rows[k][0]), sc[sid]["metrics"][k].get("value")
                if not _close(computed, recorded):
                    return Pairing(ia, ib, f"the predictions.npz beside {label} do not reproduce its results.json ({sid} "
                                           f"{k}: {computed:.6g} recomputed, {recorded} recorded)")
        for k in present:
            higher = directions[k]
            base = dict(baseline=ia, other=ib, scenario=sid, metric=k, higher_is_better=higher)
            if k == "auroc" and single_label:
                if ctx.task == "binary":
                    runs = {None: delong(np_a[:, 1], np_b[:, 1], pa["labels"] == 1)}
                    method = "DeLong"
                else:
                    per = delong_ovr(np_a, np_b, pa["labels"].astype(np.int64), len(ctx.classes))
                    runs = {ctx.classes[c]: res for c, res in per.items()}
                    method = "DeLong one-vs-rest"
                for target, res in runs.items():
                    se = res.get("se")
                    defined = se and res.get("p_value") is not None
                    ci = (res["difference"] - z * se, res["difference"] + z * se) if defined else (None, None)
                    tests.append(PairedTest(**base, target=target, method=method, value_a=res.get("auc_a"),
                                            value_b=res.get("auc_b"), difference=res.get("difference"), ci_low=ci[0],
                                            ci_high=ci[1], p_value=res.get("p_value"), reason=res.get("reason"),
                                            detail={"se": se, "z": res.get("z")}))
                continue
            boot = paired_bootstrap(plugin.metric(k), probs_a, probs_b, y, confidence=confidence, weights=weights)
            value_a, value_b = _finite(rows_a[k][0]), _finite(rows_b[k][0])
            if k == "accuracy" and single_label:
                correct_a = _predicted(probs_a, ctx).numpy() == pa["labels"]
                correct_b = _predicted(probs_b, ctx).numpy() == pa["labels"]
                mc = mcnemar(correct_a, correct_b)
                tests.append(PairedTest(**base, target=None, method="McNemar", value_a=value_a, value_b=value_b,
                                        difference=boot["difference"], ci_low=boot["ci_low"], ci_high=boot["ci_high"],
                                        p_value=mc["p_value"], detail={"b": mc["b"], "c": mc["c"],
                                                                       "n_used": boot["n_used"]}))
                continue
            tests.append(PairedTest(**base, target=None, method="paired bootstrap", value_a=value_a, value_b=value_b,
                                    difference=boot["difference"], ci_low=boot["ci_low"], ci_high=boot["ci_high"],
                                    p_value=monte_carlo_p(boot["p_value"], boot["n_used"]), reason=boot.get("reason"),
                                    detail={"n_used": boot["n_used"], "p_share": boot["p_value"]}))
    return Pairing(ia, ib, None, tests, n_samples=n, n_resamples=resamples, notes=notes)


def monte_carlo_p(p_share: float | None, n_used: int) -> float | None:
    r"""The paired bootstrap's p-value as a Monte Carlo p-value, never 0.

    :func:`medaudit.paired.paired_bootstrap` returns twice the smaller tail share,
    :math:`2k/R` with :math:`k` the resamples on the smaller side of 0, which is 0 when no
    resample crosses 0, although with :math:`R` resamples nothing below about :math:`2/R` can be
    resolved. Fed to Holm's correction, a 0 stays 0 however many tests there are. The comparison
    counts the observed data as one more resample, :math:`2(1 + k)/(1 + R)` (Davison & Hinkley
    1997, sec. 4.2.1; the form the non-inferiority gates of the checks use), which is a valid
    p-value at every :math:`R`; its smallest value :math:`2/(1 + R)` is what Holm's correction can
    work with.
    """
    if p_share is None or n_used < 1:
        return None
    return min(1.0, (p_share * n_used + 2.0) / (n_used + 1.0))


def _finite(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _predicted(probs: Any, ctx: Any) -> Any:
    """The predicted class, as the classification metrics define it: ``p_1 >= task.threshold`` for
    a binary task, else the arg-max (the first class on ties)."""
    if ctx.task == "binary":
        return (probs[:, 1] >= ctx.threshold).long()
    return probs.argmax(dim=1)


def _normal_quantile(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def adjust(pairings: Sequence[Pairing], alpha: float) -> None:
    """Holm-adjust the p-values of every test of every pairing at once (one family: every
    comparison shown), in place; significant means adjusted p < ``alpha``."""
    from .paired import holm

    tests = [(p, i) for p in pairings for i in range(len(p.tests))]
    adjusted = holm([p.tests[i].p_value for p, i in tests])
    for (p, i), q in zip(tests, adjusted, strict=True):
        p.tests[i] = replace(p.tests[i], p_adjusted=q, significant=q is not None and q < alpha)


# ---------------------------------------------------------------------------------------------
# Two or more audits
# ---------------------------------------------------------------------------------------------


@dataclass
class AuditsComparison:
    """Two or more audits compared: the first is the baseline (see the module docstring)."""

    paths: list[str]
    audits: list[dict[str, Any]]  # identities (as CompareResult.old), with "path" and "predictions"
    protocol: dict[str, Any] | None  # shared by all
    boards: list[Board]
    pairs: list[CompareResult]  # the first audit against each other one, in command-line order
    pairings: list[Pairing]  # the paired tests of each pair (or why there are none)
    alpha: float  # significance level of the paired tests (1 - the baseline's confidence)
    max_drop: float
    require_significant: bool
    notes: list[str] = field(default_factory=list)  # about the paired tests as a whole

    @property
    def labels(self) -> list[str]:
        return [f"[{i + 1}]" for i in range(len(self.paths))]

    @property
    def has_regression(self) -> bool:
        return any(p.has_regression for p in self.pairs)

    @property
    def regressed(self) -> list[int]:
        """Indices of the audits that regress against the baseline."""
        return [i + 1 for i, p in enumerate(self.pairs) if p.has_regression]

    @property
    def tests(self) -> list[PairedTest]:
        """Every paired test, significant first, each group by adjusted p-value (untestable last)."""
        every = [t for p in self.pairings for t in p.tests]
        return sorted(every, key=lambda t: (not t.significant, t.p_adjusted is None, t.p_adjusted or 0.0))

    @property
    def protocol_line(self) -> str:
        return f"protocol: {protocol_text(self.protocol)}"

    def to_dict(self) -> dict[str, Any]:
        return {"paths": self.paths, "audits": self.audits, "protocol": self.protocol, "alpha": self.alpha,
                "notes": self.notes,
                "max_drop": self.max_drop, "require_significant": self.require_significant,
                "has_regression": self.has_regression, "regressed": self.regressed,
                "leaderboard": [{**b.__dict__, "standings": [s.__dict__ for s in b.standings]} for b in self.boards],
                "pairs": [p.to_dict() for p in self.pairs], "pairings": [_pairing_dict(p) for p in self.pairings]}


def predictions_beside(results_path: Path) -> Path | None:
    """The predictions.npz an audit wrote beside its results.json, or None."""
    path = Path(results_path).parent / "predictions.npz"
    return path if path.is_file() else None


def compare_audits(paths: Sequence[Path | str], max_drop: float = 0.0, *, require_significant: bool = False,
                   allow_different_data: bool = False) -> AuditsComparison:
    """Compare two or more audits from their results.json files: the first is the baseline.

    Refuses audits under different protocols (:class:`DifferentProtocols`) and, unless
    ``allow_different_data``, of different data or tasks (:class:`IncomparableAudits`), before
    any work; then runs the paired tests of each pair (from the predictions.npz beside each
    results.json), Holm-adjusts them together and compares every audit with the
    baseline (:func:`compare`).
    """
    from .results import load_results

    if len(paths) < 2:
        raise ValueError(f"compare needs at least two audits, got {len(paths)}")
    if max_drop < 0:
        raise ValueError(f"max_drop must be ≥ 0, got {max_drop}")
    files = [Path(p) for p in paths]
    loaded = [load_results(p) for p in files]
    dicts = [r.model_dump(mode="json") for r in loaded]
    labels = [f"[{i + 1}]" for i in range(len(files))]
    named = [f"{labels[i]} {files[i]}" for i in range(len(files))]
    protocol = check_protocols(dicts, named)
    ids = [_identity(d) for d in dicts]
    for k in range(1, len(dicts)):
        mismatch = _mismatch(ids[0], ids[k]) if len(dicts) == 2 else _mismatch(ids[0], ids[k], (labels[0], labels[k]))
        if mismatch and not allow_different_data:
            raise _refusal(mismatch, "the two audits" if len(dicts) == 2 else f"{named[0]} and {named[k]}")
    predictions = [predictions_beside(p) for p in files]
    pairings = [paired_comparison(dicts[0], dicts[k], predictions[0], predictions[k], indices=(0, k),
                                  labels=(named[0], named[k])) for k in range(1, len(dicts))]
    confidence = float(((dicts[0].get("config") or {}).get("audit") or {}).get("confidence") or 0.95)
    adjust(pairings, 1.0 - confidence)
    pairs = [compare(loaded[0], loaded[k], max_drop, require_significant=require_significant,
                     allow_different_data=allow_different_data, pairing=pairings[k - 1],
                     names=("old", "new") if len(dicts) == 2 else (labels[0], labels[k]))
             for k in range(1, len(dicts))]
    audits = [{**ident, "label": labels[i], "path": str(files[i]),
               "predictions": None if predictions[i] is None else str(predictions[i])} for i, ident in enumerate(ids)]
    return AuditsComparison([str(p) for p in files], audits, protocol, leaderboard(dicts), pairs, pairings,
                            1.0 - confidence, max_drop, require_significant, resolution_notes(pairings, 1.0 - confidence))


def resolution_notes(pairings: Sequence[Pairing], alpha: float) -> list[str]:
    """A note when Holm's correction over every test makes the paired bootstrap's resolution
    (its smallest p-value, :func:`monte_carlo_p`) too coarse to reach ``alpha`` on its own."""
    m = sum(t.p_value is not None for p in pairings for t in p.tests)
    resamples = [p.n_resamples for p in pairings if p.n_resamples and any(t.method == "paired bootstrap" for t in p.tests)]
    if not resamples:
        return []
    r = min(resamples)
    smallest = 2.0 / (r + 1.0)
    if smallest * m < alpha:
        return []
    needed = math.floor(2.0 * m / alpha + 1e-9)
    return [f"with {r} bootstrap resamples the smallest paired-bootstrap p-value is 2/(1 + {r}) = {smallest:.4g}, and "
            f"Holm's correction over the {m} tests multiplies the smallest p-value by {m}: a paired-bootstrap comparison "
            f"reaches significance at {alpha:g} only behind smaller McNemar or DeLong p-values; audits with "
            f"audit.bootstrap of at least {needed} lift that limit"]


# ---------------------------------------------------------------------------------------------
# Console and HTML
# ---------------------------------------------------------------------------------------------


def _num(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.4f}"


def _standing_text(s: Standing, labels: Sequence[str], *, ci: bool) -> str:
    text = f"{labels[s.audit]} {_num(s.value)}"
    if ci and s.value is not None and s.ci_low is not None and s.ci_high is not None:
        text += f" [{s.ci_low:.4f}, {s.ci_high:.4f}]"
    if s.value is not None and s.where:
        text += f" ({s.where})"
    return text


def board_lines(boards: Sequence[Board], labels: Sequence[str]) -> list[str]:
    """The leaderboard as ASCII console lines: one per headline metric (its clean ranking with
    intervals, then the mean and the worst perturbed rankings, with where the worst is), one per
    score; audits best first in each ranking."""
    lines: list[str] = []
    for b in boards:
        ranking = ", ".join(_standing_text(s, labels, ci=b.kind == "score" or b.view == "clean") for s in b.standings)
        if b.kind == "metric" and b.view != "clean" and lines and lines[-1].startswith(f"{b.name} ("):
            lines[-1] += f" | {b.view} {ranking}"
        elif b.kind == "metric":
            lines.append(f"{b.name} ({'higher' if b.higher_is_better else 'lower'} is better): {b.view} {ranking}")
        else:
            lines.append(f"{b.title}: {ranking}")
    return lines


def console_boards(boards: Sequence[Board], primary: str | None) -> tuple[list[Board], list[str]]:
    """The boards the console prints (a per-metric score only for the primary metric; nothing
    with no value in any audit), and the scores left out for having no value anywhere."""
    shown, empty = [], []
    for b in boards:
        if b.kind == "score" and b.view and b.view != primary and any(x.kind == "score" and x.name == b.name
                                                                      and x.view == primary for x in boards):
            continue
        if not b.defined:
            empty.append(b.name if not b.view or b.kind == "metric" else f"{b.name} {b.view}")
            continue
        shown.append(b)
    return shown, list(dict.fromkeys(empty))


def console_lines(result: AuditsComparison, output: Path | None) -> list[str]:
    """Everything ``medaudit compare`` prints between the notes and the regressions (see docs/report.md)."""
    labels = result.labels
    lines = [result.protocol_line]
    primary = next((b.name for b in result.boards if b.kind == "metric"), None)
    shown, empty = console_boards(result.boards, primary)
    lines.append(f"leaderboard, best first ({', '.join(f'{labels[i]} {p}' for i, p in enumerate(result.paths))}):")
    lines += [f"  {line}" for line in board_lines(shown, labels)]
    if empty:
        lines.append(f"  no value in any audit: {', '.join(empty)}")
    for p in result.pairings:
        if not p.paired:
            lines.append(f"note: no paired tests for {labels[p.baseline]} vs {labels[p.other]}: {p.reason}; "
                         "significance falls back to CI overlap")
        for n in p.notes:
            lines.append(f"note: {labels[p.baseline]} vs {labels[p.other]}: {n}")
    lines += [f"note: {n}" for n in result.notes]
    tests = result.tests
    if tests:
        n_sig, m = sum(t.significant for t in tests), sum(t.p_value is not None for t in tests)
        lines.append(f"paired tests: {len(tests)} comparison(s), {m} with a p-value, {n_sig} significant after Holm's "
                     f"correction over those {m} (alpha {result.alpha:g}); significant first:")
        lines += [f"  {describe_test(t, labels)}" for t in tests[:SUMMARY_LINES]]
        if len(tests) > SUMMARY_LINES:
            lines.append(f"  ... and {len(tests) - SUMMARY_LINES} more"
                         + (f" (all in {output})" if output else " (-o FILE lists them all)"))
    return lines


def _standing_cell(s: Standing, labels: Sequence[str]) -> str:
    from .report import fmt_ci

    if s.value is None:
        return f"{labels[s.audit]} – ({s.where})" if s.where else f"{labels[s.audit]} –"
    text = f"{labels[s.audit]} {fmt_ci({'value': s.value, 'ci_low': s.ci_low, 'ci_high': s.ci_high}, 4)}"
    return f"{text} at {s.where}" if s.where else text


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th … 11th, 12th, 13th … 21st, 22nd."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _shared_tables(result: AuditsComparison) -> dict[str, Any]:
    """The leaderboard and paired-test tables both compare pages show."""
    from .report import Row, Table, fmt, fmt_p, label

    labels = result.labels
    places = [_ordinal(i + 1) for i in range(len(labels))]
    arrow = {True: "↑", False: "↓"}
    metrics = Table(
        "Headline metrics, audits best first in each row (↑ higher is better, ↓ lower is better): the clean value with "
        "its interval, the mean over the perturbed scenarios every audit ran, and the worst of them (with its interval "
        "and where).", ["Metric", "View", *places],
        [Row([f"{label(b.name)} {arrow[b.higher_is_better]}", b.view, *[_standing_cell(s, labels) for s in b.standings]])
         for b in result.boards if b.kind == "metric"])
    scores = Table(
        "Robustness scores (results.json robustness), audits best first, lower is better for every score; a "
        "score of one metric names it. Baseline-normalised scores (mce_vs_baseline, relative_mce_vs_baseline, be, rbe) "
        "rank alike only when every audit divided by the same --baseline audit.", ["Score", "Metric", *places],
        [Row([b.name, b.view or "–", *[_standing_cell(s, labels) for s in b.standings]])
         for b in result.boards if b.kind == "score"])

    def signed(x: float | None) -> str:
        return "–" if x is None else f"{x:+.4f}"

    def diff(t: PairedTest) -> str:
        return signed(t.difference) + ("" if t.ci_low is None else f" [{signed(t.ci_low)}, {signed(t.ci_high)}]")

    paired = Table(
        f"Paired tests, significant first (Holm-adjusted p < {fmt(result.alpha, 3)}, Holm's correction over the "
        f"{sum(t.p_value is not None for t in result.tests)} tests with a p-value). "
        "Difference = other − baseline, with its interval (paired bootstrap on the baseline audit's resamples; "
        "DeLong's normal interval for AUROC).",
        ["Audits", "Scenario", "Metric", "Test", "Baseline", "Other", "Difference [CI]", "p", "Holm p", "Significant"],
        [Row([f"{labels[t.baseline]} vs {labels[t.other]}", t.scenario,
              f"{label(t.name)} {arrow[t.higher_is_better]}", t.method, fmt(t.value_a, 4), fmt(t.value_b, 4), diff(t),
              fmt_p(t.p_value) if t.p_value is not None else f"– ({t.reason})", fmt_p(t.p_adjusted),
              "yes" if t.significant else "no"], "drop" if t.significant else "")
         for t in result.tests])
    fallback = [f"{labels[p.baseline]} vs {labels[p.other]}: no paired tests ({p.reason}); significance falls back to "
                "CI overlap." for p in result.pairings if not p.paired]
    fallback += [f"{labels[p.baseline]} vs {labels[p.other]}: {n}." for p in result.pairings for n in p.notes]
    fallback += [f"Note: {n}." for n in result.notes]
    return {"board_metrics": metrics, "board_scores": scores, "paired": paired, "paired_notes": fallback,
            "labels": labels, "audits": result.audits, "protocol": protocol_text(result.protocol)}


def render_compare(result: CompareResult, audits: AuditsComparison | None = None) -> str:
    """The comparison of two audits as one self-contained HTML page in the report's style;
    ``audits``: the :func:`compare_audits` result it belongs to (adds the protocol, the
    leaderboard and the paired tests)."""
    from .report import Row, Table, fmt, fmt_ci, label, stylesheet, template_env

    def signed(x: float | None) -> str:
        return "–" if x is None else f"{x:+.4f}"

    def row(c: MetricChange) -> Row:
        direction = {True: "↑", False: "↓", None: "?"}[c.higher_is_better]
        flag = "fail" if c.regression else ("drop" if c.significant else "")
        return Row([c.scenario, f"{label(c.metric)} {direction}", fmt_ci(c.old), fmt_ci(c.new), signed(c.delta),
                    "yes" if c.significant else "no", "REGRESSION" if c.regression else ""], flag)

    headers = ["Scenario", "Metric", "Old [CI]", "New [CI]", "Change (new − old)", "Significant", ""]
    regressions = Table(f"Regressions: metrics that worsened by more than {fmt(result.max_drop, 4)}"
                        + (" significantly" if result.require_significant else "")
                        + ", in every scenario and metric, worst first (significant before the others). Significant: "
                        "the paired test's Holm-adjusted p-value where one ran, else disjoint CIs.",
                        headers, [row(c) for c in result.regressions])
    headline = Table("Headline metrics in every scenario present in both audits (↑ higher is better, ↓ lower is better). "
                     "Highlighted: significant (paired test, else disjoint CIs); red: regression.", headers,
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
        n_significant=sum(1 for c in result.changes if c.significant), css=stylesheet(), audits=audits,
        shared=_shared_tables(audits) if audits is not None else None)


def render_audits(result: AuditsComparison) -> str:
    """The comparison of two or more audits as one self-contained HTML page: two audits get the
    pairwise page (:func:`render_compare`), more the baseline page (every audit against the first)."""
    from .report import Row, Table, fmt, fmt_ci, label, stylesheet, template_env

    if len(result.paths) == 2:
        return render_compare(result.pairs[0], result)
    labels = result.labels
    identity = [(k.replace("_", " "), ["–" if a.get(k) is None else str(a.get(k)) for a in result.audits])
                for k in result.audits[0] if k != "label"]

    def row(c: MetricChange) -> Row:
        direction = {True: "↑", False: "↓", None: "?"}[c.higher_is_better]
        delta = "–" if c.delta is None else f"{c.delta:+.4f}"
        return Row([c.scenario, f"{label(c.metric)} {direction}", fmt_ci(c.old), fmt_ci(c.new), delta,
                    "yes" if c.significant else "no"], "fail")

    per_audit = [(labels[k + 1], result.paths[k + 1], pair, Table(
        f"Regressions of {labels[k + 1]} against the baseline {labels[0]}: metrics that worsened by more than "
        f"{fmt(result.max_drop, 4)}{' significantly' if result.require_significant else ''}, worst first.",
        ["Scenario", "Metric", f"Baseline {labels[0]} [CI]", f"{labels[k + 1]} [CI]", "Change", "Significant"],
        [row(c) for c in pair.regressions])) for k, pair in enumerate(result.pairs)]
    return template_env().get_template("compare-many.html").render(
        r=result, labels=labels, identity=identity, per_audit=per_audit, shared=_shared_tables(result),
        describe=describe, summary_lines=SUMMARY_LINES, css=stylesheet())


def load_pair(old_path: Any, new_path: Any) -> tuple[Results, Results]:
    """Both results files, validated (a convenience for the CLI)."""
    from .results import load_results

    return load_results(Path(old_path)), load_results(Path(new_path))
