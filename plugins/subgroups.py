"""Demographic and site subgroups: per-group metrics, gaps, permutation tests (issue 6).

An analysis plugin (``medaudit_analyze``): it never runs the model, it re-reads the per-sample
probabilities of every scenario and stratifies them by metadata columns (manifest CSV columns,
npz ``meta_<col>`` arrays, DICOM header fields, all delivered as ``outputs.metadata[col]``).

What it returns (see docs/subgroups.md for the formulas):

* ``subgroups``: one entry per (scenario, attribute, group) with ``n``, ``class_counts``,
  ``too_small`` and, for groups of at least ``subgroups.min_group_size`` samples, every metric
  with a percentile-bootstrap interval (the audit's shared weight matrix restricted to the
  group's columns). Under a perturbed scenario also the per-group ``drop`` from clean (paired).
* ``subgroup_gaps`` (lands in ``results["analyses"]``): per (scenario, attribute, metric) the
  gap max - min over groups with its bootstrap interval, the worst group, the min/max ratio,
  a permutation-test p-value and its Holm-Bonferroni adjustment; for binary tasks also
  fairlearn's demographic-parity and equalized-odds differences; under a perturbed scenario
  also the gap of the per-group drops ("does this artifact hurt one group more?").
* ``subgroup_settings`` (also in ``analyses``): attributes, groups, scenarios and metric sets.
* ``warnings``: attributes that are missing, unbinned continuous columns, untestable gaps.

Scenarios analysed: ``clean`` with every metric of the audit, and each perturbation at its
highest severity run with the headline metrics (:data:`HEADLINE`), computed for all groups at
once with group sums (:func:`headline_rows`) so that the analysis stays within seconds.
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from medaudit.bootstrap import evaluate, interval, paired_drop
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext
from medaudit.outputs import AuditOutputs, Scenario
from medaudit.rng import stream_generator
from torch import Tensor

from .calibration import bin_index, ece_mce_ace_from_bins, equal_width_edges, top_label
from .classification import auroc_from_sums, class_names, safe_div, tie_groups

MEDAUDIT_API_VERSION = 1

#: Label of the group of samples whose attribute value is missing (None, "", NaN).
MISSING = "(missing)"
#: Joins column names (``sex×age``) and group labels (``F×[40, 60)``) of an intersection.
SEP = "×"
#: Metrics computed under perturbed scenarios, with their direction (higher is better).
HEADLINE: dict[str, bool] = {"accuracy": True, "balanced_accuracy": True, "auroc": True, "ece": False}
#: A numeric column without bin edges and more distinct values than this gets a warning.
MAX_CATEGORIES = 10
#: Fairness rates of binary tasks (prediction ``p_1 >= threshold``), per group.
RATES = ("selection_rate", "true_positive_rate", "false_positive_rate")

_NAN = float("nan")
# Elements (rows x groups x columns) of one chunk of group sums / permutation draws: keeps the
# float64 temporaries of the AUROC tie-group sums in the tens of MiB whatever N and R are.
_CHUNK_ELEMENTS = 1 << 21
# Largest per-row total weight for which float32 group sums of AUROC are exact (see _group_auroc).
_EXACT_F32_TOTAL = 4096


# ---------------------------------------------------------------------------------------------
# Attributes: metadata columns -> group codes
# ---------------------------------------------------------------------------------------------


@dataclass
class Attribute:
    """A stratification: ``codes[i]`` is the index in ``groups`` of sample ``i``'s group."""

    name: str
    groups: list[str]
    codes: Tensor  # [N] int64
    columns: tuple[str, ...] = field(default_factory=tuple)


def is_missing(value: Any) -> bool:
    """None, an empty/blank string, or a NaN number (numpy scalars included)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return math.isnan(float(value))
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def format_number(x: float) -> str:
    """Short label of a number: ``40``, ``2.5``, ``1e+06`` (integers lose the ``.0``)."""
    return f"{float(x):g}"


def bin_labels(edges: Sequence[float]) -> list[str]:
    """Labels of the ``len(edges) + 1`` half-open bins ``(-inf, e0)``, ``[e0, e1)``, …, ``[en, inf)``."""
    e = [format_number(x) for x in edges]
    return [f"(-inf, {e[0]})"] + [f"[{a}, {b})" for a, b in itertools.pairwise(e)] + [f"[{e[-1]}, inf)"]


def _category_label(value: Any) -> str:
    if _is_number(value):
        return format_number(value)
    return str(value).strip()


def _suggest_edges(numbers_: list[float]) -> str:
    q = np.quantile(np.asarray(numbers_, dtype=float), [0.25, 0.5, 0.75])
    return "[" + ", ".join(f"{v:.3g}" for v in sorted(set(q.tolist()))) + "]"


def _clean_edges(col: str, edges: Sequence[float], warnings: list[str]) -> list[float]:
    finite = [float(e) for e in edges if math.isfinite(float(e))]
    cleaned = sorted(set(finite))
    if cleaned != [float(e) for e in edges]:
        warnings.append(f"subgroups: bins for '{col}' were not strictly increasing finite edges ({list(edges)}); "
                        f"using {[format_number(e) for e in cleaned]}")
    return cleaned


def column_attribute(
    col: str, values: list[Any], edges: Sequence[float] | None, warnings: list[str]
) -> Attribute:
    """Group codes of one metadata column, binned when ``edges`` are given.

    Missing values form the group :data:`MISSING` (listed last), never dropped. Categories are
    ordered numbers first (numerically), then text (alphabetically); bins in edge order, the
    interior bins always listed (possibly with n = 0), the open outer bins only when occupied.
    """
    n = len(values)
    missing = [is_missing(v) for v in values]
    if edges is not None:
        cleaned = _clean_edges(col, edges, warnings)
        numeric: list[float | None] = []
        bad: list[Any] = []
        for v, miss in zip(values, missing):
            if miss:
                numeric.append(None)
                continue
            try:
                numeric.append(float(v))
            except (TypeError, ValueError):
                numeric.append(None)
                bad.append(v)
        if cleaned and not bad:
            labels = bin_labels(cleaned)
            idx = [None if x is None else bisect.bisect_right(cleaned, x) for x in numeric]
            used = {i for i in idx if i is not None}
            keep = [b for b in range(len(labels)) if b in used or 0 < b < len(labels) - 1]
            remap = {b: j for j, b in enumerate(keep)}
            groups = [labels[b] for b in keep]
            codes = [remap[i] if i is not None else -1 for i in idx]
            return _finish(col, groups, codes, (col,))
        if bad:
            warnings.append(f"subgroups: column '{col}' has bins but non-numeric values (e.g. {bad[0]!r}); "
                            "it is grouped by its values instead")
    present = [v for v, miss in zip(values, missing) if not miss]
    labels_by_key: dict[tuple[int, Any], str] = {}
    cell_labels: list[str | None] = []
    for v, miss in zip(values, missing):
        if miss:
            cell_labels.append(None)
            continue
        label = _category_label(v)
        key = (0, float(v)) if _is_number(v) else (1, label)
        labels_by_key.setdefault(key, label)
        cell_labels.append(label)
    ordered: list[str] = []
    for key in sorted(labels_by_key):
        if labels_by_key[key] not in ordered:  # 3 and 3.0 share the label "3"
            ordered.append(labels_by_key[key])
    if edges is None and present and all(_is_number(v) for v in present) and len(ordered) > MAX_CATEGORIES:
        warnings.append(
            f"subgroups: column '{col}' is numeric with {len(ordered)} distinct values, so each value is its own "
            f"(mostly too small) group; set bin edges, e.g. subgroups.bins.{col}: {_suggest_edges([float(v) for v in present])}")
    index = {g: j for j, g in enumerate(ordered)}
    codes = [-1 if c is None else index[c] for c in cell_labels]
    assert len(codes) == n
    return _finish(col, ordered, codes, (col,))


def _finish(name: str, groups: list[str], codes: list[int], columns: tuple[str, ...]) -> Attribute:
    """Append the :data:`MISSING` group when any code is -1 (missing) and build the tensor."""
    if any(c < 0 for c in codes):
        groups = groups + [MISSING]
        codes = [len(groups) - 1 if c < 0 else c for c in codes]
    return Attribute(name, groups, torch.tensor(codes, dtype=torch.int64).reshape(-1), columns)


def intersect(attrs: Sequence[Attribute]) -> Attribute:
    """The intersection ``a×b×…``: one group per occupied combination, in component order."""
    n = attrs[0].codes.numel()
    combined = torch.zeros(n, dtype=torch.int64)
    for a in attrs:  # mixed-radix code: lexicographic in the components' group order
        combined = combined * len(a.groups) + a.codes
    uniq, codes = torch.unique(combined, sorted=True, return_inverse=True)
    groups = []
    for u in uniq.tolist():
        parts = []
        for a in reversed(attrs):
            u, r = divmod(u, len(a.groups))
            parts.append(a.groups[r])
        groups.append(SEP.join(reversed(parts)))
    return Attribute(SEP.join(a.name for a in attrs), groups, codes.reshape(-1), tuple(c for a in attrs for c in a.columns))


def build_attributes(metadata: dict[str, list[Any]], cfg: Any, warnings: list[str]) -> list[Attribute]:
    """Attributes named by ``cfg.attributes`` and ``cfg.intersections``; problems become warnings."""
    available = sorted(metadata)
    cache: dict[str, Attribute] = {}

    def single(col: str) -> Attribute | None:
        if col in cache:
            return cache[col]
        if col not in metadata:
            warnings.append(f"subgroups: attribute '{col}' is not a metadata column of the dataset; "
                            f"available columns: {', '.join(available) if available else 'none'}")
            cache[col] = None  # type: ignore[assignment]  # warn once per column
            return None
        edges = cfg.bins.get(col)
        cache[col] = column_attribute(col, list(metadata[col]), edges, warnings)
        return cache[col]

    out: list[Attribute] = []
    seen: set[str] = set()
    for col in cfg.attributes:
        attr = single(col)
        if attr is not None and attr.name not in seen:
            seen.add(attr.name)
            out.append(attr)
    for combo in cfg.intersections:
        cols = list(dict.fromkeys(combo))  # drop repeats, keep order
        parts = [single(c) for c in cols]
        if any(p is None for p in parts) or not parts:
            continue
        attr = parts[0] if len(parts) == 1 else intersect(parts)  # type: ignore[arg-type]
        if attr.name not in seen:
            seen.add(attr.name)
            out.append(attr)
    used = {c for a in out for c in a.columns} | set(cfg.attributes)
    for col in sorted(set(cfg.bins) - used - {c for combo in cfg.intersections for c in combo}):
        warnings.append(f"subgroups: bins are set for '{col}', which is not among subgroups.attributes or intersections")
    return out


# ---------------------------------------------------------------------------------------------
# Statistics helpers
# ---------------------------------------------------------------------------------------------


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    r"""Holm-Bonferroni adjusted p-values (None entries are not tested and stay None).

    With the :math:`m` defined p-values sorted ascending, :math:`p_{(1)} \le \dots \le p_{(m)}`,
    :math:`\tilde p_{(i)} = \min(1, \max_{j \le i} (m - j + 1)\, p_{(j)})` (Holm 1979); rejecting
    where :math:`\tilde p < \alpha` controls the family-wise error rate at :math:`\alpha` under
    any dependence between the tests.
    """
    idx = [i for i, p in enumerate(p_values) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):  # type: ignore[arg-type, return-value]
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))  # type: ignore[arg-type]
        out[i] = running
    return out


def permutation_p(observed: float | None, null: Tensor | None) -> float | None:
    r"""One-sided permutation p-value :math:`(1 + \#\{T^*_b \ge T\}) / (1 + B)`.

    The +1 counts the observed labelling as one of the permutations, so p is never 0 and the
    test is exact (Phipson & Smyth 2010). Permutations where the statistic is undefined (NaN) are
    dropped. A relative tolerance of 1e-9 keeps floating-point noise from breaking ties
    (a permutation that reproduces the observed gap counts as "at least as large").
    """
    if observed is None or null is None or not math.isfinite(observed):
        return None
    null = null[~torch.isnan(null)]
    if null.numel() == 0:
        return None
    tol = 1e-9 * max(1.0, abs(observed))
    return (1 + int((null >= observed - tol).sum())) / (1 + null.numel())


def range_rows(values: Tensor, include: Tensor) -> Tensor:
    """Per row, max - min over the included groups; NaN on rows where any of them is undefined."""
    v = values[:, include]
    out = v.amax(dim=1) - v.amin(dim=1)
    return torch.where(torch.isnan(v).any(dim=1), torch.full_like(out, _NAN), out)


def _ratio(lo: float, hi: float) -> float | None:
    return lo / hi if hi > 0 and lo >= 0 else None


# ---------------------------------------------------------------------------------------------
# Per-group metric rows
# ---------------------------------------------------------------------------------------------


def _group_sums(w: Tensor, grp: Tensor, n_groups: int, x: Tensor | None = None,
                sub: Tensor | None = None, n_sub: int = 1) -> Tensor:
    """``out[r, g, s] = sum_i w[r, i] x_i 1[grp_i = g, sub_i = s]``, ``[R, G, n_sub]`` in ``w``'s dtype.

    ``grp`` is ``[M]`` (the same groups on every row: bootstrap rows) or ``[R, M]`` (one
    labelling per row: permutations); ``w`` is ``[R, M]``.
    """
    vals = w if x is None else w * x.to(w.dtype)
    idx = grp * n_sub + (0 if sub is None else sub)
    out = torch.zeros(w.shape[0], n_groups * n_sub, dtype=w.dtype)
    if idx.ndim == 1:
        out.index_add_(1, idx, vals)
    else:
        out.scatter_add_(1, idx, vals.expand_as(idx).contiguous())
    return out.view(w.shape[0], n_groups, n_sub)


def headline_rows(
    probs: Tensor, labels: Tensor, w: Tensor, grp: Tensor, n_groups: int, ctx: MetricContext,
    keys: Sequence[str] = tuple(HEADLINE), rates: bool = False,
) -> dict[str, Tensor]:
    """Headline metrics (and binary fairness rates) of every group on every row, ``{key: [R, G]}``.

    Same definitions as :class:`~medaudit.plugins.classification.ClassificationMetrics` and
    :class:`~medaudit.plugins.calibration.CalibrationMetrics` (binary prediction ``p_1 >=
    threshold``, multiclass arg-max, AUROC with half-counted ties, top-label equal-width ECE),
    but every group in one pass of group sums instead of one metric call per group: a group's
    metric is the metric with weight ``w[r, i] 1[grp_i = g]``. Binary and multiclass only.
    """
    if ctx.task not in ("binary", "multiclass"):
        raise ValueError(f"headline_rows supports binary and multiclass tasks, not {ctx.task!r}")
    m = probs.shape[0]
    t_max = m  # tie groups per AUROC call are at most M
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_groups * t_max))
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, w.shape[0], chunk):
        g = grp if grp.ndim == 1 else grp[start : start + chunk]
        out = _headline_chunk(probs, labels, w[start : start + chunk], g, n_groups, ctx, keys, rates)
        for key, val in out.items():
            parts.setdefault(key, []).append(val)
    return {key: torch.cat(vals) for key, vals in parts.items()}


def _headline_chunk(probs: Tensor, labels: Tensor, w: Tensor, grp: Tensor, n_groups: int,
                    ctx: MetricContext, keys: Sequence[str], rates: bool) -> dict[str, Tensor]:
    r, k = w.shape[0], probs.shape[1]
    w = w.to(torch.float64)
    labels = labels.to(torch.int64)
    pred = (probs[:, 1] >= ctx.threshold).to(torch.int64) if ctx.task == "binary" else probs.argmax(dim=1)
    correct = (pred == labels).double()
    out: dict[str, Tensor] = {}
    if "accuracy" in keys:
        out["accuracy"] = safe_div(_group_sums(w, grp, n_groups, correct)[..., 0], _group_sums(w, grp, n_groups)[..., 0])
    if "balanced_accuracy" in keys:
        n_c = _group_sums(w, grp, n_groups, None, labels, k)
        tp_c = _group_sums(w, grp, n_groups, correct, labels, k)
        out["balanced_accuracy"] = torch.nanmean(safe_div(tp_c, n_c), dim=2)
    if "auroc" in keys:
        per_class = []
        for c in ([1] if ctx.task == "binary" else range(k)):  # loop over classes, never rows
            positive = (labels == c).double()
            per_class.append(_group_auroc(probs[:, c].double(), positive, w, grp, n_groups))
        out["auroc"] = torch.stack(per_class, dim=2).mean(dim=2)  # strict macro: NaN propagates
    if "ece" in keys:
        conf, hit = top_label(probs, labels)
        b = ctx.n_bins
        idx = bin_index(conf, equal_width_edges(b, conf.device))
        sums = [_group_sums(w, grp, n_groups, x, idx, b).reshape(r * n_groups, b) for x in (None, conf, hit)]
        out["ece"] = ece_mce_ace_from_bins(*sums)[0].view(r, n_groups)
    if rates and ctx.task == "binary":
        yes = pred.double()
        pos = (labels == 1).double()
        out["selection_rate"] = safe_div(_group_sums(w, grp, n_groups, yes)[..., 0], _group_sums(w, grp, n_groups)[..., 0])
        out["true_positive_rate"] = safe_div(_group_sums(w, grp, n_groups, yes * pos)[..., 0],
                                             _group_sums(w, grp, n_groups, pos)[..., 0])
        out["false_positive_rate"] = safe_div(_group_sums(w, grp, n_groups, yes * (1 - pos))[..., 0],
                                              _group_sums(w, grp, n_groups, 1 - pos)[..., 0])
    return out


def _group_auroc(scores: Tensor, positive: Tensor, w: Tensor, grp: Tensor, n_groups: int) -> Tensor:
    """AUROC of ``scores`` against ``positive`` in every group on every row, ``[R, G]``.

    Fixed groups (``grp`` ``[M]``, bootstrap rows): one Mann-Whitney sum per group on its own
    columns, ``O(R M)`` in all. Per-row groups (``grp`` ``[R, M]``, permutations): positives and
    negatives per (group, tie group of the score) in one dense ``[R, G T]`` scatter, ``O(R G M)``.
    """
    r = w.shape[0]
    if grp.ndim == 1:
        cols = []
        for g in range(n_groups):
            sel = grp == g
            tie, n_ties = tie_groups(scores[sel])
            wg, pg = w[:, sel], positive[sel]
            zeros = torch.zeros(r, n_ties, dtype=torch.float64)
            pos = zeros.index_add(1, tie, wg * pg)
            neg = zeros.index_add(1, tie, wg * (1.0 - pg))
            cols.append(auroc_from_sums(pos, neg))
        return torch.stack(cols, dim=1)
    tie, n_ties = tie_groups(scores)
    # The dense sums dominate the analysis' run time. With integer weights and at most
    # _EXACT_F32_TOTAL samples per row every count, cumulative count and Mann-Whitney sum is an
    # integer or half-integer below 2**23, so float32 holds them exactly at half the memory traffic.
    exact32 = float(w.sum(dim=1).max()) <= _EXACT_F32_TOTAL and bool((w == w.round()).all())
    wd = w.to(torch.float32 if exact32 else torch.float64)
    idx = grp * n_ties + tie
    pw = wd * positive.to(wd.dtype)
    pos = torch.zeros(r, n_groups * n_ties, dtype=wd.dtype).scatter_add_(1, idx, pw).view(r * n_groups, n_ties)
    neg = torch.zeros(r, n_groups * n_ties, dtype=wd.dtype).scatter_add_(1, idx, wd - pw).view(r * n_groups, n_ties)
    below = torch.cumsum(neg, dim=1).sub_(neg, alpha=0.5)  # negatives below each tie group, ties half
    num = (pos * below).sum(dim=1).double()
    den = pos.sum(dim=1).double() * neg.sum(dim=1).double()
    return safe_div(num, den).view(r, n_groups)


def generic_rows(
    metrics: Sequence[Metric], probs: Tensor, labels: Tensor, w: Tensor, grp: Tensor, n_groups: int,
    ctx: MetricContext, confidence: float, keep: set[str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, bool]]:
    """Every metric of every group on every row via :func:`medaudit.bootstrap.evaluate`, ``{key: [R, G]}``.

    ``grp`` ``[M]``: each group's metric on the weight rows restricted to its columns.
    ``grp`` ``[R, M]`` (permutations, ``w`` ones): the metric weighted by the indicator of the
    group under each row's labelling, all groups stacked into one ``[G R, M]`` call per metric.
    Works for any plugin metric and task, at one metric call per group (or per stacked block).
    """
    rows: dict[str, Tensor] = {}
    directions: dict[str, bool] = {}
    for metric in metrics:
        if ctx.task not in metric.tasks:
            continue
        if grp.ndim == 1:
            per_group: dict[str, list[Tensor]] = {}
            for g in range(n_groups):
                sel = grp == g
                _, raw = evaluate([metric], probs[sel], labels[sel], w[:, sel], ctx, confidence)
                for key, val in raw.items():
                    per_group.setdefault(key, []).append(val)
            got = {key: torch.stack(vals, dim=1) for key, vals in per_group.items()}
        else:
            indicator = torch.cat([(grp == g).to(torch.float32) * w for g in range(n_groups)])  # [G R, M]
            _, raw = evaluate([metric], probs, labels, indicator, ctx, confidence)
            got = {key: val.view(n_groups, -1).T for key, val in raw.items()}
        for key, val in got.items():
            if keep is None or key in keep:
                rows[key] = val
                directions[key] = metric.higher_is_better
    return rows, directions


class Permutations:
    """Permutations of the group codes of the eligible samples, ``[P, M]``, in chunks, drawn from
    the audit seed's stream ``("subgroup-permutations", attribute)`` (:mod:`medaudit.rng`).

    The same permutations are used for every scenario of an attribute (a paired test of
    clean vs perturbed drops). Small draws are cached; large ones are regenerated from the seed
    chunk by chunk so memory stays bounded.
    """

    def __init__(self, codes: Tensor, n_perm: int, seed: int, attribute: str) -> None:
        self.codes, self.n_perm, self.seed, self.attribute = codes, n_perm, seed, attribute
        # 1M codes per chunk: the generic path expands a chunk to G indicator rows of float64
        self.chunk = max(1, (1 << 20) // max(1, codes.numel()))
        self._cache: list[Tensor] | None = None
        if n_perm <= self.chunk:
            self._cache = list(self._draw())

    def _draw(self) -> Iterator[Tensor]:
        gen = stream_generator(self.seed, "subgroup-permutations", self.attribute)
        m = self.codes.numel()
        for start in range(0, self.n_perm, self.chunk):
            rows = min(self.chunk, self.n_perm - start)
            order = torch.argsort(torch.rand(rows, m, generator=gen), dim=1)
            yield self.codes[order]

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._cache) if self._cache is not None else self._draw()


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


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


def measured_headline(outputs: AuditOutputs, scenario_index: int) -> list[str]:
    """The :data:`HEADLINE` keys that the audit's metrics emit (one point-estimate evaluation).

    Perturbed scenarios report only these, so a subgroup table never shows a metric that the
    audit itself was not configured to compute (e.g. ECE without the calibration plugin).
    """
    n = outputs.probs.shape[1]
    if n == 0:
        return []
    ones = torch.ones(1, n)
    _, raw = evaluate(outputs.metrics, outputs.probs[scenario_index].detach().cpu(), outputs.labels.detach().cpu(),
                      ones, outputs.ctx, outputs.confidence)
    return [key for key in HEADLINE if key in raw]


def _class_counts(labels: Tensor, names: Sequence[str]) -> dict[str, int]:
    if labels.ndim == 2:  # multilabel: positives per label
        return {names[c]: int(v) for c, v in enumerate(labels.to(torch.int64).sum(dim=0).tolist())}
    counts = torch.bincount(labels.to(torch.int64), minlength=len(names)).tolist()
    return {names[c]: int(v) for c, v in enumerate(counts)}


@dataclass
class _Rows:
    """Per-group rows of one (scenario, attribute): bootstrap ``[1 + R, G]`` and permutations ``[P, G]``."""

    boot: dict[str, Tensor]
    perm: dict[str, Tensor] | None
    directions: dict[str, bool]


def analyze(outputs: AuditOutputs, cfg: Any) -> dict[str, Any]:
    """The whole subgroup analysis; ``cfg`` is a :class:`medaudit.config.SubgroupConfig`."""
    warnings: list[str] = []
    attrs = build_attributes(outputs.metadata, cfg, warnings)
    ctx = outputs.ctx
    probs_all = outputs.probs.detach().cpu()
    labels = outputs.labels.detach().cpu()
    # float32 counts as given: every path converts its chunk of rows (a float64 copy of the whole
    # [1 + R, N] matrix was the analysis phase's peak memory at 30,000 samples)
    weights = outputs.bootstrap_weights.detach().cpu()
    k = probs_all.shape[-1]
    names = class_names(ctx, k)
    # rounded so that 0.95 gives exactly 0.05 and an adjusted p of 0.05 is not "significant"
    alpha = round(1.0 - outputs.confidence, 12)
    scenarios = analysed_scenarios(outputs.scenarios)
    clean_i = next((i for i, sc in scenarios if sc.id == "clean"), None)
    fast = ctx.task in ("binary", "multiclass")
    headline = measured_headline(outputs, clean_i if clean_i is not None else 0)
    subgroups: list[dict[str, Any]] = []
    gaps: list[dict[str, Any]] = []
    settings_attrs: list[dict[str, Any]] = []

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
        perms = Permutations(codes_e, cfg.permutations, outputs.seed, attr.name) \
            if testable and cfg.permutations > 0 else None
        w_e = weights[:, sel]
        labels_e = labels[sel]
        clean_rows: _Rows | None = None
        for s_index, sc in scenarios:
            probs_e = probs_all[s_index][sel]
            is_clean = s_index == clean_i
            rows = _scenario_rows(outputs, probs_e, labels_e, w_e, codes_e, n_e, perms, is_clean, fast, set(headline))
            if is_clean:
                clean_rows = rows
            for g, label in enumerate(attr.groups):
                subgroups.append(_group_entry(sc, attr, g, label, int(sizes[g]), labels[attr.codes == g], names,
                                              remap, rows, None if is_clean else clean_rows, outputs.confidence,
                                              cfg.min_group_size))
            if testable:
                gaps.extend(_gap_entries(sc, attr, eligible, rows, None if is_clean else clean_rows,
                                         outputs.confidence, ctx.task == "binary"))

    # Holm-Bonferroni within each scenario, over every (attribute, metric) gap tested there
    # (including the drop gaps of a perturbed scenario): the family a reader scans at once.
    family_sizes: dict[str, int] = {}
    for sid in dict.fromkeys(e["scenario"] for e in gaps):
        slots = [(e, None) for e in gaps if e["scenario"] == sid] + \
                [(e, "drop_gap") for e in gaps if e["scenario"] == sid and e.get("drop_gap")]
        raw = [(t[0] if t[1] is None else t[0][t[1]]).get("p_value") for t in slots]
        family_sizes[sid] = sum(p is not None for p in raw)
        for (entry, sub), adj in zip(slots, holm(raw)):
            target = entry if sub is None else entry[sub]
            target["p_adjusted"] = adj
            target["significant"] = None if adj is None else bool(adj < alpha)

    if cfg.permutations > 0 and family_sizes:
        sid, m = max(family_sizes.items(), key=lambda t: t[1])
        if m / (cfg.permutations + 1) >= alpha:
            warnings.append(
                f"subgroups: with {cfg.permutations} permutations the smallest possible p-value is "
                f"1/{cfg.permutations + 1}, and Holm's correction over the {m} gaps tested in scenario '{sid}' "
                f"multiplies it by {m}, so no gap can reach significance at {alpha:g}; "
                f"set subgroups.permutations to at least {math.ceil(m / alpha)}")

    settings = {
        "attributes": settings_attrs,
        "scenarios": [sc.id for _, sc in scenarios],
        "min_group_size": cfg.min_group_size,
        "permutations": cfg.permutations,
        "alpha": alpha,
        "clean_metrics": "every metric of the audit",
        "perturbed_metrics": headline,
        "correction": "holm-bonferroni per scenario",
    }
    return {"subgroups": subgroups, "subgroup_gaps": gaps, "subgroup_settings": settings, "warnings": warnings}


def _scenario_rows(outputs: AuditOutputs, probs: Tensor, labels: Tensor, w: Tensor, codes: Tensor, n_groups: int,
                   perms: Permutations | None, is_clean: bool, fast: bool, headline: set[str]) -> _Rows:
    """Clean: every audit metric (generic path). Perturbed: the headline metrics (fast path)."""
    ctx, conf = outputs.ctx, outputs.confidence
    binary = ctx.task == "binary"
    if n_groups == 0:
        return _Rows({}, None, {})
    if is_clean or not fast:
        keep = None if is_clean else headline
        boot, dirs = generic_rows(outputs.metrics, probs, labels, w, codes, n_groups, ctx, conf, keep)
        perm: dict[str, Tensor] | None = None
        if perms is not None:
            parts: dict[str, list[Tensor]] = {}
            for chunk in perms:
                got, _ = generic_rows(outputs.metrics, probs, labels, torch.ones(chunk.shape, dtype=torch.float64),
                                      chunk, n_groups, ctx, conf, keep)
                for key, val in got.items():
                    parts.setdefault(key, []).append(val)
            perm = {key: torch.cat(v) for key, v in parts.items()}
        if binary:  # fairness rates always come from the group-sum path
            boot.update(headline_rows(probs, labels, w, codes, n_groups, ctx, keys=(), rates=True))
            if perms is not None and perm is not None:
                for key, val in _perm_headline(probs, labels, perms, n_groups, ctx, (), True).items():
                    perm[key] = val
        return _Rows(boot, perm, dirs)
    keys = [key for key in HEADLINE if key in headline]
    boot = headline_rows(probs, labels, w, codes, n_groups, ctx, keys, rates=binary)
    perm = _perm_headline(probs, labels, perms, n_groups, ctx, keys, binary) if perms is not None else None
    return _Rows(boot, perm, {key: HEADLINE[key] for key in keys})


def _perm_headline(probs: Tensor, labels: Tensor, perms: Permutations, n_groups: int, ctx: MetricContext,
                   keys: Sequence[str], rates: bool) -> dict[str, Tensor]:
    parts: dict[str, list[Tensor]] = {}
    for chunk in perms:
        ones = torch.ones(1, chunk.shape[1], dtype=torch.float64).expand(chunk.shape[0], -1)
        for key, val in headline_rows(probs, labels, ones, chunk, n_groups, ctx, keys, rates).items():
            parts.setdefault(key, []).append(val)
    return {key: torch.cat(v) for key, v in parts.items()}


def _group_entry(sc: Scenario, attr: Attribute, g: int, label: str, n: int, group_labels: Tensor,
                 names: Sequence[str], remap: Tensor, rows: _Rows, clean: _Rows | None, confidence: float,
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


def _gap_entries(sc: Scenario, attr: Attribute, eligible: list[int], rows: _Rows, clean: _Rows | None,
                 confidence: float, binary: bool) -> list[dict[str, Any]]:
    groups = [attr.groups[g] for g in eligible]
    base = {"scenario": sc.id, "perturbation": sc.perturbation, "severity": sc.severity, "attribute": attr.name}
    out: list[dict[str, Any]] = []
    for key, higher in rows.directions.items():
        boot = rows.boot[key]
        point = boot[0]
        include = torch.isfinite(point)
        entry: dict[str, Any] = {**base, "metric": key, "kind": "calibration" if key in ("ece", "ace", "mce", "classwise_ece") else "performance",
                                 "higher_is_better": higher, "n_groups": int(include.sum())}
        if int(include.sum()) < 2:
            entry.update(gap={"value": None, "ci_low": None, "ci_high": None}, worst_group=None, worst_value=None,
                         best_group=None, ratio=None, p_value=None)
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
                     best_value=float(point[best]), ratio=_ratio(lo, hi), p_value=permutation_p(gap["value"], null))
        if clean is not None and key in clean.boot:
            entry["drop_gap"] = _drop_gap(clean, rows, key, higher, groups, confidence)
        out.append(entry)
    if binary and all(r in rows.boot for r in RATES):
        out.extend(_fairness_entries(base, rows, confidence))
    return out


def _drop_gap(clean: _Rows, rows: _Rows, key: str, higher: bool, groups: list[str], confidence: float) -> dict[str, Any]:
    """Spread of the per-group drops from clean: does the perturbation hurt one group more?"""

    def drops(c: Tensor, p: Tensor) -> Tensor:
        return c - p if higher else p - c

    d = drops(clean.boot[key], rows.boot[key])
    include = torch.isfinite(d[0])
    if int(include.sum()) < 2:
        return {"value": None, "ci_low": None, "ci_high": None, "most_affected_group": None, "p_value": None}
    est = interval(range_rows(d, include), confidence)
    point = d[0].clone()
    point[~include] = -math.inf
    most = int(point.argmax())
    null = None
    if rows.perm is not None and clean.perm is not None and key in rows.perm and key in clean.perm:
        null = range_rows(drops(clean.perm[key], rows.perm[key]), include)
    return {**est, "most_affected_group": groups[most], "most_affected_drop": float(d[0, most]),
            "p_value": permutation_p(est["value"], null)}


def _fairness_entries(base: dict[str, Any], rows: _Rows, confidence: float) -> list[dict[str, Any]]:
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
            entry.update(gap={"value": None, "ci_low": None, "ci_high": None}, ratio=None, p_value=None)
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


@hookimpl
def medaudit_analyze(outputs: AuditOutputs, config: Any) -> dict[str, Any] | None:
    """Subgroup metrics and gaps for ``config.subgroups``; None when no attribute is configured."""
    cfg = config.subgroups
    if not cfg.attributes and not cfg.intersections:
        return None
    return analyze(outputs, cfg)
