"""Attributes: metadata columns (and their intersections) as group codes of the samples.

A column is grouped by its values, or binned by the edges the user gave (``subgroups.bins``);
missing values form a group of their own (:data:`MISSING_GROUP`), never dropped. Problems
(unknown columns, unbinned continuous columns, bad edges) become warnings, not errors.
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Label of the group of samples whose attribute value is missing (None, "", NaN). It reads like
#: :data:`medaudit.data.MISSING_VALUE` on purpose, but names a group, not a count of absent values.
MISSING_GROUP = "(missing)"
#: Joins column names (``sex×age``) and group labels (``F×[40, 60)``) of an intersection.
SEP = "×"
#: A numeric column without bin edges and more distinct values than this gets a warning.
MAX_CATEGORIES = 10


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

    Missing values form the group :data:`MISSING_GROUP` (listed last), never dropped. Categories are
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
    """Append the :data:`MISSING_GROUP` group when any code is -1 (missing) and build the tensor."""
    if any(c < 0 for c in codes):
        groups = groups + [MISSING_GROUP]
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
