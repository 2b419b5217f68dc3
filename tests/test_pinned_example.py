"""The bundled example's results.json, pinned bit for bit.

``fixtures/example-pinned.json.gz`` holds the results of ``medaudit run examples/model.pt --data
examples/mni-patches/test.npz --config examples/mni-patches.yaml`` made by the code *before* the
core-seams restructuring (commit 281ba71), with the keys that vary between runs removed
(:func:`pinned_view`). Restructuring must not move a single value: every pinned number is
compared with ``==``, not a tolerance. New keys may be added; none may vanish or change.

Values that depend on a random stream whose derivation was deliberately changed are listed in
:data:`STREAM_DEPENDENT` with the CHANGELOG entry that moved them, values a changed definition moved
in :data:`CHANGED_STATISTICS`; nothing else may be listed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
PINNED = Path(__file__).resolve().parent / "fixtures" / "example-pinned.json.gz"
#: The kind of CPU the pins were made on (:func:`cpu_kind`): there they hold to the bit.
PINNED_ON = ("GenuineIntel", "AVX512")


@dataclass(frozen=True)
class Tolerance:
    rel: float
    abs: float


#: How far a float may move on another kind of CPU, where float32 kernels round differently.
OTHER_CPU = Tolerance(rel=1e-3, abs=1e-6)

#: Keys that vary between runs of the same audit (time, paths, speed, host) or that hold the
#: report's rendered images.
VARYING_TOP = {"created_at", "command", "timing", "environment", "assets", "medaudit_version"}
VARYING_ANYWHERE = {"throughput"}
VARYING_PATHS = {("model", "path"), ("dataset", "path"), ("config", "output", "dir")}

#: Settings that moved to a plugin's section (CHANGELOG: plugin-owned settings), old dotted path →
#: new: the pinned value must also be found at the new place. results.json keeps the old keys too
#: (they mirror the value in use), so the plain comparison still checks them.
MOVED: dict[str, str] = {
    "config.audit.n_bins": "config.plugins.calibration.n_bins",
    "config.audit.energy_temperature": "config.plugins.ood.energy_temperature",
    "config.audit.knn_k": "config.plugins.ood.knn_k",
    **{f"config.subgroups.{k}": f"config.plugins.subgroups.{k}"
       # permutations is also a changed default (CHANGED_DEFAULTS): both places hold the new one
       for k in ("attributes", "intersections", "bins", "min_group_size")},
}

#: Regular expressions over dotted paths whose values depend on a random stream that a later,
#: documented change re-derived (CHANGELOG names it). Each entry names its stream (docs/randomness.md).
STREAM_DEPENDENT: list[str] = [
    # CHANGELOG "One derivation for every random stream": the streams below were seeded with the
    # raw seed (subgroup permutations: seed * 1000003 + crc32(attribute)); now stream_key(seed, name).
    # "bootstrap": every interval on the shared weight matrix, and the drops' significance.
    r"scenarios\.\d+\.(metrics|drop)\.[^.]+\.ci_(low|high)",
    r"scenarios\.\d+\.drop\.[^.]+\.significant",
    r"scenarios\.\d+\.(ood\.[^.]+\.(auroc|aupr|fpr95)|failure_detection\.[^.]+)\.ci_(low|high)",
    r"subgroups\.\d+\.(metrics|drop)\.[^.]+\.ci_(low|high)",
    r"subgroups\.\d+\.drop\.[^.]+\.significant",
    r"analyses\.subgroup_gaps\.\d+\.(gap|drop_gap)\.ci_(low|high)",
    # "cross-fit": the scores of the detectors fitted on the halves (the output-based ones do not fit).
    r"scenarios\.\d+\.ood\.(knn|mahalanobis|spectral)\.(auroc|aupr|fpr95)\.value",
    r"scenarios\.\d+\.failure_detection\.(knn|mahalanobis|spectral)\.value",
    # "temperature-folds": the fold temperatures and the clean scenario's cross-fitted "after" values.
    r"calibration\.temperature_scaling\.fold_temperatures\.\d+",
    r"calibration\.temperature_scaling\.scenarios\.clean\.(ece|nll)_after",
    # "subgroup-permutations": the permutation tests' p-values (Holm-adjusted too).
    r"analyses\.subgroup_gaps\.\d+\.(drop_gap\.)?p_(value|adjusted)",
]

#: Values a deliberate change of a statistic's definition moved (CHANGELOG names it), as regular
#: expressions over dotted paths. Nothing else may be listed.
CHANGED_STATISTICS: list[str] = [
    # CHANGELOG "Subgroup gaps are Holm-corrected over the whole audit by default": a larger family,
    # so fewer gaps are significant after the correction, and the correction's description.
    r"analyses\.subgroup_gaps\.\d+\.(drop_gap\.)?significant",
    r"analyses\.subgroup_settings\.correction",
    # CHANGELOG "subgroups.permutations: auto": the count drawn for that family (1000 before).
    r"analyses\.subgroup_settings\.permutations",
]

#: Settings whose default was deliberately changed (CHANGELOG names the change), dotted path →
#: (pinned value, new value): the example does not set them, so it must show exactly the new
#: default there. Nothing else may be listed.
CHANGED_DEFAULTS: dict[str, tuple[Any, Any]] = {
    # CHANGELOG "audit.threads: auto": the count is chosen in the dry run only where the model's
    # outputs are the same bits at every count, so no number depends on it (tests/test_threads.py).
    "config.audit.threads": (None, "auto"),
    # CHANGELOG "subgroups.permutations: auto": enough permutations for the audit-wide Holm family.
    "config.subgroups.permutations": (1000, "auto"),
    "config.plugins.subgroups.permutations": (1000, "auto"),
}


#: Lists that a documented change lets grow (CHANGELOG names it), dotted path → why: every pinned
#: entry must still be there, unchanged and in the same order; entries may be added between them.
GROWN_LISTS: dict[str, str] = {
    # CHANGELOG "The post-hoc OOD detector zoo": gen, kl_matching and rmd run on the example too;
    # the zoo's head-based detectors do not (its head reads a crop, not the pooled map), which a
    # new warning says.
    "analyses.ood_fitting.detectors": "zoo detectors added",
    "warnings": "head-detectors-skipped warning for the zoo's head-based detectors",
}


def _subsequence(pinned: list[Any], actual: list[Any]) -> bool:
    it = iter(actual)
    return all(any(p == a and type(p) is type(a) for a in it) for p in pinned)


def pinned_view(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without the keys that legitimately differ between two runs."""

    def strip(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {
                k: strip(v, (*path, k))
                for k, v in node.items()
                if k not in VARYING_ANYWHERE and (*path, k) not in VARYING_PATHS
            }
        if isinstance(node, list):
            return [strip(v, (*path, str(i))) for i, v in enumerate(node)]
        return node

    return strip({k: v for k, v in results.items() if k not in VARYING_TOP}, ())


def differences(pinned: Any, actual: Any, path: str = "", close: Tolerance | None = None) -> list[str]:
    """Every place where ``actual`` lacks or changes a value of ``pinned`` (additions allowed);
    with ``close``, floats within that tolerance count as unchanged (every other value exactly)."""
    if any(re.fullmatch(p, path) for p in STREAM_DEPENDENT + CHANGED_STATISTICS):
        return []
    if path in CHANGED_DEFAULTS:
        before, after = CHANGED_DEFAULTS[path]
        ok = pinned == before and actual == after and type(actual) is type(after)
        return [] if ok else [f"{path}: pinned {pinned!r}, default changed to {after!r}, now {actual!r}"]
    if isinstance(pinned, dict):
        if not isinstance(actual, dict):
            return [f"{path}: was an object, now {type(actual).__name__}"]
        out: list[str] = []
        for k, v in pinned.items():
            sub = f"{path}.{k}" if path else k
            if k not in actual:
                out.append(f"{sub}: missing")
            else:
                out.extend(differences(v, actual[k], sub, close))
        return out
    if isinstance(pinned, list) and path in GROWN_LISTS:
        ok = isinstance(actual, list) and _subsequence(pinned, actual)
        return [] if ok else [f"{path}: a pinned entry vanished or changed ({GROWN_LISTS[path]} only adds entries)"]
    if isinstance(pinned, list):
        if not isinstance(actual, list) or len(actual) != len(pinned):
            return [f"{path}: list changed length or type"]
        out = []
        for i, (p, a) in enumerate(zip(pinned, actual)):
            out.extend(differences(p, a, f"{path}.{i}", close))
        return out
    if close is not None and type(pinned) is float and type(actual) is float \
            and math.isclose(pinned, actual, rel_tol=close.rel, abs_tol=close.abs):
        return []
    if pinned != actual or type(pinned) is not type(actual):
        return [f"{path}: pinned {pinned!r}, now {actual!r}"]
    return []


def at(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node[part]
    return node


def moved_differences(pinned: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Every :data:`MOVED` setting whose pinned value is not at its new place."""
    out = []
    for old, new in MOVED.items():
        try:
            value = at(actual, new)
        except (KeyError, TypeError):
            out.append(f"{new}: missing (moved from {old})")
            continue
        out.extend(differences(at(pinned, old), value, f"{new} (moved from {old})"))
    return out


def test_moved_differences_checks_the_new_place() -> None:
    pinned = {"config": {"audit": {"n_bins": 15, "energy_temperature": 1.0, "knn_k": 50},
                         "subgroups": {"attributes": ["a"], "intersections": [], "bins": {}, "min_group_size": 30,
                                       "permutations": 1000}}}
    moved = {"config": {"plugins": {"calibration": {"n_bins": 15}, "ood": {"energy_temperature": 1.0, "knn_k": 50},
                                    "subgroups": {"attributes": ["a"], "intersections": [], "bins": {},
                                                  "min_group_size": 30, "permutations": 1000}}}}
    assert moved_differences(pinned, moved) == []
    moved["config"]["plugins"]["ood"]["knn_k"] = 49
    del moved["config"]["plugins"]["calibration"]
    assert moved_differences(pinned, moved) == [
        "config.plugins.calibration.n_bins: missing (moved from config.audit.n_bins)",
        "config.plugins.ood.knn_k (moved from config.audit.knn_k): pinned 50, now 49",
    ]


def test_a_changed_default_must_show_exactly_its_new_value() -> None:
    assert differences({"config": {"audit": {"threads": None}}}, {"config": {"audit": {"threads": "auto"}}}) == []
    assert differences({"config": {"audit": {"threads": None}}}, {"config": {"audit": {"threads": 2}}}) == [
        "config.audit.threads: pinned None, default changed to 'auto', now 2"
    ]


def test_differences_finds_a_changed_number_and_a_missing_key() -> None:
    pinned = {"a": {"value": 0.5, "ci_low": 0.1}, "b": [1, 2]}
    assert differences(pinned, {"a": {"value": 0.5, "ci_low": 0.1, "new": 1}, "b": [1, 2]}) == []
    assert differences(pinned, {"a": {"value": 0.5000000000000001, "ci_low": 0.1}, "b": [1, 2]}) == [
        "a.value: pinned 0.5, now 0.5000000000000001"
    ]
    assert differences(pinned, {"a": {"value": 0.5}, "b": [1, 2, 3]}) == [
        "a.ci_low: missing",
        "b: list changed length or type",
    ]


def cpu_kind() -> tuple[str, str]:
    """The CPU's vendor (``/proc/cpuinfo`` ``vendor_id``) and the vector instructions torch uses."""
    vendor = ""
    with contextlib.suppress(OSError):
        vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("vendor_id")), "")
    return vendor, torch.backends.cpu.get_cpu_capability()


def test_differences_within_a_tolerance_still_finds_every_other_change() -> None:
    close = Tolerance(rel=1e-4, abs=1e-6)
    pinned = {"a": 100.0, "b": 1e-9, "c": True, "d": 3, "e": "x", "f": 0.5}
    same = {"a": 100.001, "b": 2e-9, "c": True, "d": 3, "e": "x", "f": 0.5}
    assert differences(pinned, same, close=close) == []
    moved = {"a": 100.1, "b": 1e-9, "c": False, "d": 4, "e": "y", "f": 0.50002}
    assert [d.split(":")[0] for d in differences(pinned, moved, close=close)] == ["a", "c", "d", "e"]
    assert len(differences(pinned, same)) == 2  # without a tolerance, to the bit


@pytest.mark.slow
def test_example_results_are_pinned(example_run: Path) -> None:
    """To the bit on the kind of CPU that made the pins. On another (an AMD EPYC with the same
    AVX-512 instructions gave float32 convolutions other last bits, so 5,499 values moved, the
    largest by 1.4e-4 of itself), every value that is not a float is still compared exactly, and
    floats to within :data:`OTHER_CPU`: a change of code moves values further, or changes a count,
    a rank or a flag."""
    actual = pinned_view(json.loads((example_run / "results.json").read_text()))
    with gzip.open(PINNED, "rt") as f:
        pinned = json.load(f)
    close = None if cpu_kind() == PINNED_ON else OTHER_CPU
    found = differences(pinned, actual, close=close) + moved_differences(pinned, actual)
    on = "this CPU" if close is None else f"{cpu_kind()}, not the pins' {PINNED_ON}, so floats within {OTHER_CPU}"
    assert not found, f"{len(found)} pinned values changed ({on}), first: " + "\n".join(found[:20])
