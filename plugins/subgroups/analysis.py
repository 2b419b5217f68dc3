"""The subgroup analysis: which scenarios, per-group entries and gaps, how many permutations (auto), Holm's correction."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from medaudit.bootstrap import evaluate, interval, paired_drop
from medaudit.metric import MetricContext, class_names
from medaudit.outputs import AuditOutputs, Scenario
from medaudit.task import ALL_QUANTITIES, CLASS_PROBABILITIES, SINGLE_LABEL

from .attributes import Attribute, build_attributes
from .gaps import gap_entries
from .permutations import AUTO_MAX, Permutations, auto_permutations, holm, permutations_needed
from .rows import HEADLINE, RATES, MetricInput, ScenarioRows, generic_rows, headline_rows, rest_rows, take


def analysed_scenarios(scenarios: Sequence[Scenario]) -> list[tuple[int, Scenario]]:
    """``clean`` and, per perturbation, the scenario of its highest severity run, in run order."""
    chosen: list[tuple[int, Scenario]] = []
    worst: dict[str, tuple[int, Scenario]] = {}
    for i, sc in enumerate(scenarios):
        if sc.perturbation is None:
            if sc.id == "clean":
                chosen.append((i, sc))
        elif sc.perturbation not in worst or sc.severity > worst[sc.perturbation][1].severity:
            worst[sc.perturbation] = (i, sc)
    return chosen + sorted(worst.values(), key=lambda t: t[0])


def scenario_input(outputs: AuditOutputs, scenario_index: int) -> MetricInput:
    """What the task's metrics receive for one scenario, on the CPU: its ``metric_input``
    quantity ``[N, …]`` (class probabilities for the classification tasks), or the mapping of
    every quantity for a task that declares :data:`~medaudit.task.ALL_QUANTITIES` (segmentation's
    per-image Dice, distances and voxel-calibration statistics)."""
    name = outputs.task.metric_input
    if name == ALL_QUANTITIES:
        return {key: q[scenario_index].detach().cpu() for key, q in outputs.quantities.items()}
    return outputs.quantities[name][scenario_index].detach().cpu()


def measured_headline(outputs: AuditOutputs, scenario_index: int) -> list[str]:
    """The metrics perturbed scenarios report, among those the audit's metrics emit (one
    point-estimate evaluation), so a subgroup table never shows a metric that the audit itself
    was not configured to compute (e.g. ECE without the calibration plugin).

    Classification tasks: the :data:`HEADLINE` keys (the group-sum fast path computes them).
    Other tasks (e.g. segmentation): each metric family's declared ``headline`` keys
    (``dice``, ``nsd``, ``hd95``, ``ece``, …), computed through the metrics themselves.
    """
    n = len(outputs.sample_ids)
    if n == 0:
        return []
    ones = torch.ones(1, n)
    _, raw = evaluate(outputs.metrics, scenario_input(outputs, scenario_index), outputs.labels.detach().cpu(),
                      ones, outputs.ctx, outputs.confidence)
    if CLASS_PROBABILITIES in outputs.task.capabilities:
        return [key for key in HEADLINE if key in raw]
    declared = [key for m in outputs.metrics if outputs.ctx.task in m.tasks for key in m.headline]
    return [key for key in dict.fromkeys(declared) if key in raw]


def _class_counts(labels: Tensor, names: Sequence[str]) -> dict[str, int]:
    if labels.ndim == 2:  # multilabel: positives per label
        return {names[c]: int(v) for c, v in enumerate(labels.to(torch.int64).sum(dim=0).tolist())}
    counts = torch.bincount(labels.to(torch.int64), minlength=len(names)).tolist()
    return {names[c]: int(v) for c, v in enumerate(counts)}


def analyze(outputs: AuditOutputs, cfg: Any) -> dict[str, Any]:
    """The whole subgroup analysis; ``cfg`` is a :class:`~medaudit.plugins.subgroups.settings.SubgroupSettings`."""
    warnings: list[str] = []
    attrs = build_attributes(outputs.metadata, cfg, warnings)
    ctx = outputs.ctx
    labels = outputs.labels.detach().cpu()
    # float32 counts as given: every path converts its chunk of rows (a float64 copy of the whole
    # [1 + R, N] matrix was the analysis phase's peak memory at 30,000 samples)
    weights = outputs.bootstrap_weights.detach().cpu()
    # multi-hot targets (multilabel; which classes a segmentation's reference map holds) have K
    # columns; single-label tasks name K through their class probabilities
    names = class_names(ctx, labels.shape[1] if labels.ndim == 2 else int(outputs.probs.shape[-1]))
    # rounded so that 0.95 gives exactly 0.05 and an adjusted p of 0.05 is not "significant"
    alpha = round(1.0 - outputs.confidence, 12)
    scenarios = analysed_scenarios(outputs.scenarios)
    clean_i = next((i for i, sc in scenarios if sc.id == "clean"), None)
    fast = SINGLE_LABEL in outputs.task.capabilities
    headline = measured_headline(outputs, clean_i if clean_i is not None else 0)
    subgroups: list[dict[str, Any]] = []
    settings_attrs: list[dict[str, Any]] = []
    # first pass: every group's and gap's bootstrap rows, without permutations (how many gaps each
    # family tests, hence how many permutations auto draws, is known only once they are computed)
    tested: list[_TestedAttribute] = []

    for attr in attrs:
        sizes = torch.bincount(attr.codes, minlength=len(attr.groups))
        eligible = [g for g in range(len(attr.groups)) if int(sizes[g]) >= cfg.min_group_size]
        settings_attrs.append({"name": attr.name, "columns": list(attr.columns), "groups": attr.groups,
                               "tested_groups": [attr.groups[g] for g in eligible]})
        remap = torch.full((len(attr.groups),), -1, dtype=torch.int64)
        remap[eligible] = torch.arange(len(eligible))
        sel = remap[attr.codes] >= 0
        codes_e = remap[attr.codes][sel]  # [M] codes of eligible samples in 0..G_e-1
        n_e = len(eligible)
        testable = n_e >= 2
        if not testable:
            warnings.append(f"subgroups: attribute '{attr.name}' has {n_e} group(s) with at least "
                            f"{cfg.min_group_size} samples (subgroups.min_group_size); no gaps are computed for it")
        w_e = weights[:, sel]
        labels_e = labels[sel]
        clean_rows: ScenarioRows | None = None
        per_scenario: list[tuple[int, Scenario, ScenarioRows]] = []
        for s_index, sc in scenarios:
            probs_e = take(scenario_input(outputs, s_index), sel)
            is_clean = s_index == clean_i
            rows = _scenario_rows(outputs, probs_e, labels_e, w_e, codes_e, n_e, is_clean, fast, set(headline))
            if is_clean:
                clean_rows = rows
            for g, label in enumerate(attr.groups):
                subgroups.append(_group_entry(sc, attr, g, label, int(sizes[g]), labels[attr.codes == g], names,
                                              remap, rows, None if is_clean else clean_rows, outputs.confidence,
                                              cfg.min_group_size))
            per_scenario.append((s_index, sc, rows))
        if testable:
            tested.append(_TestedAttribute(attr, eligible, sel, codes_e, clean_rows, per_scenario))

    def entries_of(t: _TestedAttribute, s_index: int, sc: Scenario, rows: ScenarioRows) -> list[dict[str, Any]]:
        return gap_entries(sc, t.attr, t.eligible, rows, None if s_index == clean_i else t.clean, outputs.confidence,
                           ctx.task == "binary")

    gaps = [e for t in tested for s_index, sc, rows in t.scenarios for e in entries_of(t, s_index, sc, rows)]
    # permutations: auto draws the fewest with which a gap of the largest family can be
    # significant after Holm's correction (every gap with an observed value may be tested)
    candidates = family_sizes(gaps, cfg.holm_family, _observed)
    auto = cfg.permutations == "auto"
    largest = max(candidates.values(), default=0)
    n_perm = auto_permutations(largest, alpha) if auto else int(cfg.permutations)

    # second pass: the permutations of each attribute (the same draws for every scenario), and the
    # gap entries again, now with their p-values (the bootstrap rows are those of the first pass)
    if n_perm > 0 and tested:
        gaps = []
        for t in tested:
            perms = Permutations(t.codes, n_perm, outputs.seed, t.attr.name)
            labels_e = labels[t.sel]
            for s_index, sc, rows in t.scenarios:
                probs_e = take(scenario_input(outputs, s_index), t.sel)
                rows.perm = _perm_rows(outputs, probs_e, labels_e, t.codes, len(t.eligible), perms,
                                       s_index == clean_i, fast, set(headline))
                gaps.extend(entries_of(t, s_index, sc, rows))
                if rows is not t.clean:
                    rows.perm = None  # [P, G] per key: only the clean rows are read again (drop gaps)

    # Holm-Bonferroni over the family of subgroups.holm_family: every gap (and drop gap) tested in
    # the audit, read together in the report (default), or those of each scenario
    tested_sizes = adjust_p_values(gaps, cfg.holm_family, alpha)
    if n_perm > 0 and tested_sizes:
        fam, m = max(tested_sizes.items(), key=lambda t: t[1])
        if m / (n_perm + 1) >= alpha:
            where = (f"the {m} gaps tested in the whole audit (subgroups.holm_family: audit)"
                     if cfg.holm_family == "audit"
                     else f"the {m} gaps tested in scenario '{fam}' (subgroups.holm_family: scenario)")
            also = ("; or correct per scenario (subgroups.holm_family: scenario), smaller families that control the "
                    "error only within each scenario" if cfg.holm_family == "audit" else "")
            chosen = f" (subgroups.permutations: auto, at most {AUTO_MAX})" if auto else ""
            warnings.append(
                f"subgroups: with {n_perm} permutations{chosen} the smallest possible p-value is "
                f"1/{n_perm + 1}, and Holm's correction over {where} "
                f"multiplies it by {m}, so no gap can reach significance at {alpha:g}; "
                f"set subgroups.permutations to at least {permutations_needed(m, alpha)}{also}")

    settings = {
        "attributes": settings_attrs,
        "scenarios": [sc.id for _, sc in scenarios],
        "min_group_size": cfg.min_group_size,
        "permutations": n_perm,
        "permutations_rule": "auto" if auto else "configured",
        "alpha": alpha,
        "clean_metrics": "every metric of the audit",
        "perturbed_metrics": headline,
        "holm_family": cfg.holm_family,
        "correction": correction_label(cfg.holm_family, tested_sizes),
    }
    return {"subgroups": subgroups, "subgroup_gaps": gaps, "subgroup_settings": settings, "warnings": warnings}


@dataclass
class _TestedAttribute:
    """An attribute with at least two groups to compare: what the second pass (permutations,
    p-values) needs of the first. ``scenarios``: ``(index, scenario, rows)`` in analysis order."""

    attr: Attribute
    eligible: list[int]
    sel: Tensor
    codes: Tensor
    clean: ScenarioRows | None
    scenarios: list[tuple[int, Scenario, ScenarioRows]]


def _observed(slot: dict[str, Any]) -> bool:
    """Whether a gap entry (its ``gap``) or a drop gap has an observed value: a statistic that the
    permutations will test (unless it is undefined under every permutation)."""
    value = (slot.get("gap") or {}).get("value") if "gap" in slot else slot.get("value")
    return isinstance(value, (int, float)) and math.isfinite(value)


#: The name of the one family of ``holm_family: audit`` in the family sizes.
AUDIT_FAMILY = "audit"


def _slots(gaps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every tested statistic of the gap entries: each entry, then each perturbed entry's ``drop_gap``."""
    return list(gaps) + [e["drop_gap"] for e in gaps if e.get("drop_gap")]


def _families(gaps: Sequence[dict[str, Any]], family: str) -> dict[str, list[dict[str, Any]]]:
    """The tested statistics (:func:`_slots`) of each family of ``holm_family``, keyed
    :data:`AUDIT_FAMILY` or by scenario id, in first-seen order."""
    if family == "audit":
        return {AUDIT_FAMILY: _slots(gaps)} if gaps else {}
    if family == "scenario":
        return {sid: _slots([e for e in gaps if e["scenario"] == sid])
                for sid in dict.fromkeys(e["scenario"] for e in gaps)}
    raise ValueError(f"holm_family must be 'audit' or 'scenario', not {family!r}")


def family_sizes(gaps: Sequence[dict[str, Any]], family: str,
                 counts: Callable[[dict[str, Any]], bool] = lambda s: s.get("p_value") is not None) -> dict[str, int]:
    """How many statistics of each family of ``holm_family`` ``counts`` (by default: those with a
    p-value, the tests Holm adjusts), keyed as :func:`adjust_p_values` returns them."""
    return {key: sum(bool(counts(s)) for s in slots) for key, slots in _families(gaps, family).items()}


def adjust_p_values(gaps: Sequence[dict[str, Any]], family: str, alpha: float) -> dict[str, int]:
    """Holm-Bonferroni adjustment of every gap's (and drop gap's) ``p_value``, in place: sets
    ``p_adjusted`` and ``significant`` (``p_adjusted < alpha``; None where untested).

    ``family="audit"``: one family of every (scenario, attribute, metric) gap and drop gap tested in
    the audit. ``family="scenario"``: one family per scenario, over every (attribute, metric) gap
    and drop gap tested there. Returns the number of tests (defined p-values) per family, keyed
    :data:`AUDIT_FAMILY` or by scenario id, in first-seen order.
    """
    sizes: dict[str, int] = {}
    for key, slots in _families(gaps, family).items():
        raw = [s.get("p_value") for s in slots]
        sizes[key] = sum(p is not None for p in raw)
        for target, adj in zip(slots, holm(raw)):
            target["p_adjusted"] = adj
            target["significant"] = None if adj is None else bool(adj < alpha)
    return sizes


def correction_label(family: str, sizes: dict[str, int]) -> str:
    """The ``correction`` of ``subgroup_settings``, naming the family, e.g. "holm-bonferroni over
    the audit (120 tests)" or "holm-bonferroni per scenario (4 scenarios, up to 40 tests each)"."""
    if family == "audit":
        return f"holm-bonferroni over the audit ({sum(sizes.values())} tests)"
    most = max(sizes.values(), default=0)
    return f"holm-bonferroni per scenario ({len(sizes)} scenarios, up to {most} tests each)"


def _scenario_rows(outputs: AuditOutputs, probs: MetricInput, labels: Tensor, w: Tensor, codes: Tensor, n_groups: int,
                   is_clean: bool, fast: bool, headline: set[str]) -> ScenarioRows:
    """The bootstrap rows of one (scenario, attribute), without permutations (:func:`_perm_rows`).
    Clean: every audit metric (generic path). Perturbed: the headline metrics (fast path).
    Each group's rest (:func:`rest_rows`) is computed with the same path as the groups. ``probs``
    is the task's metric input; the fast path (single-label tasks) needs class probabilities."""
    ctx, conf = outputs.ctx, outputs.confidence
    binary = ctx.task == "binary"
    if n_groups == 0:
        return ScenarioRows({}, None, {}, {})
    if is_clean or not fast:
        keep = None if is_clean else headline

        def rows(p: Tensor, y: Tensor, wr: Tensor, grp: Tensor, n: int) -> dict[str, Tensor]:
            return generic_rows(outputs.metrics, p, y, wr, grp, n, ctx, conf, keep)[0]

        boot, dirs = generic_rows(outputs.metrics, probs, labels, w, codes, n_groups, ctx, conf, keep)
        rest = rest_rows(rows, probs, labels, w, codes, n_groups, boot)
        if binary:  # fairness rates always come from the group-sum path
            boot.update(headline_rows(probs, labels, w, codes, n_groups, ctx, keys=(), rates=True))
        return ScenarioRows(boot, None, dirs, rest)
    keys = [key for key in HEADLINE if key in headline]
    boot = headline_rows(probs, labels, w, codes, n_groups, ctx, keys, rates=binary)
    rest = rest_rows(lambda p, y, wr, grp, n: headline_rows(p, y, wr, grp, n, ctx, keys), probs, labels, w, codes,
                     n_groups, {key: boot[key] for key in keys})
    return ScenarioRows(boot, None, {key: HEADLINE[key] for key in keys}, rest)


def _perm_rows(outputs: AuditOutputs, probs: MetricInput, labels: Tensor, codes: Tensor, n_groups: int,
               perms: Permutations, is_clean: bool, fast: bool, headline: set[str]) -> dict[str, Tensor] | None:
    """The rows ``{key: [P, G]}`` of every permutation of one (scenario, attribute), for the keys
    :func:`_scenario_rows` computes there and by the same path (the labelling of each row is one
    permutation, every weight 1)."""
    ctx, conf = outputs.ctx, outputs.confidence
    binary = ctx.task == "binary"
    if n_groups == 0:
        return None
    if is_clean or not fast:
        keep = None if is_clean else headline
        parts: dict[str, list[Tensor]] = {}
        for chunk in perms:
            got, _ = generic_rows(outputs.metrics, probs, labels, torch.ones(chunk.shape, dtype=torch.float64),
                                  chunk, n_groups, ctx, conf, keep)
            for key, val in got.items():
                parts.setdefault(key, []).append(val)
        perm = {key: torch.cat(v) for key, v in parts.items()}
        if binary:  # fairness rates always come from the group-sum path
            perm.update(_perm_headline(probs, labels, perms, n_groups, ctx, (), True))
        return perm
    keys = [key for key in HEADLINE if key in headline]
    return _perm_headline(probs, labels, perms, n_groups, ctx, keys, binary)


def _perm_headline(probs: Tensor, labels: Tensor, perms: Permutations, n_groups: int, ctx: MetricContext,
                   keys: Sequence[str], rates: bool) -> dict[str, Tensor]:
    parts: dict[str, list[Tensor]] = {}
    for chunk in perms:
        ones = torch.ones(1, chunk.shape[1], dtype=torch.float64).expand(chunk.shape[0], -1)
        for key, val in headline_rows(probs, labels, ones, chunk, n_groups, ctx, keys, rates).items():
            parts.setdefault(key, []).append(val)
    return {key: torch.cat(v) for key, v in parts.items()}


def _group_entry(sc: Scenario, attr: Attribute, g: int, label: str, n: int, group_labels: Tensor,
                 names: Sequence[str], remap: Tensor, rows: ScenarioRows, clean: ScenarioRows | None, confidence: float,
                 min_size: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "scenario": sc.id, "perturbation": sc.perturbation, "severity": sc.severity,
        "attribute": attr.name, "group": label, "n": n,
        "class_counts": _class_counts(group_labels, names), "too_small": n < min_size, "metrics": {},
    }
    j = int(remap[g])
    if j < 0:
        return entry
    rates = {key: interval(val[:, j], confidence) for key, val in rows.boot.items() if key in RATES}
    entry["metrics"] = {key: interval(val[:, j], confidence) for key, val in rows.boot.items() if key not in RATES}
    if rates:
        entry["rates"] = rates
    if clean is not None:
        entry["drop"] = {key: paired_drop(clean.boot[key][:, j], rows.boot[key][:, j], rows.directions[key], confidence)
                         for key in rows.directions if key in clean.boot}
    return entry
