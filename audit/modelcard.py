"""A results.json as a Model Card: a document of Google's Model Card Toolkit schema.

:func:`model_card` maps a results dict (``Results.model_dump(mode="json")``, or a results.json
read with :func:`json.load`) to a dict that validates against the Model Card Toolkit's JSON
Schema v0.0.2 (``medaudit/schemas/model_card.schema.json``; its source and Apache-2.0 licence are
in ``MODEL_CARD_SCHEMA.md`` beside it). It is pure and deterministic: it reads nothing but
``results``, and the only time in the card is ``results["created_at"]``.

Every number in the card is copied from ``results``, written as the schema asks (strings, in
``repr`` form, so ``float(card_value) == results_value`` exactly); nothing is rounded, estimated
or filled in. What the results do not hold (owners, licences, training data, intended users, a
release date) is left out rather than guessed.

Where things go:

* ``model_details``: the model's name (``model.name``, else the model file's name), its
  description, its file path, ``version.name`` = the file's SHA-256 (the identity of what was
  audited), and a citation of the medaudit run (version, date, seed, dataset hash);
* ``model_parameters``: architecture summary, input and output format (from the config and the
  model info), and the evaluation data set (``results["dataset"]``: path, SHA-256, size, class
  counts, metadata columns) — the audit's data, not training data;
* ``quantitative_analysis.performance_metrics``: one entry per metric per scenario (``type`` =
  metric key, ``slice`` = scenario id), the scenario's drops from clean (``drop:<key>``), OOD
  detection (``ood:<detector>:<key>``), failure detection, flagged errors, EPD and
  representation measures (``<family>:<key>``), then the same for every subgroup
  (``slice`` = ``<scenario>/<attribute>=<group>``); each with its bootstrap interval when the
  results hold one;
* ``considerations``: the intended use as a use case; as limitations the verdict's headline,
  every breaking point (a perturbation whose drop exceeds its margin, with the severity, drop and
  interval), failed checks and every warning (with its impact); statistically significant
  subgroup gaps as ethical considerations.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

__all__ = ["MODEL_CARD_SCHEMA_VERSION", "model_card"]

#: The Model Card Toolkit schema version the cards follow (``schemas/model_card.schema.json``).
MODEL_CARD_SCHEMA_VERSION = "0.0.2"

# Estimate-valued families of a scenario beside its metrics: {name: {key: Estimate}}
_SCENARIO_FAMILIES = ("drop", "failure_detection", "flagged_errors", "epd", "representation")


def _num(x: Any) -> str:
    """A number from the results as the schema's string: exact (``repr``), ints as ints."""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    return repr(float(x))


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _file_name(path: str) -> str:
    """The last component of a path written on any OS."""
    return PureWindowsPath(PurePosixPath(path).name).name or path


def _metric(kind: str, value: dict[str, Any], slice_: str) -> dict[str, Any] | None:
    """A performance_metric entry from an Estimate dict, or None when its value is undefined."""
    if not isinstance(value, dict) or not _is_num(value.get("value")):
        return None
    entry: dict[str, Any] = {"type": kind, "value": _num(value["value"]), "slice": slice_}
    ci = {}
    if _is_num(value.get("ci_low")):
        ci["lower_bound"] = _num(value["ci_low"])
    if _is_num(value.get("ci_high")):
        ci["upper_bound"] = _num(value["ci_high"])
    if ci:
        entry["confidence_interval"] = ci
    return entry


def _estimates(source: dict[str, Any], slice_: str, families: tuple[str, ...]) -> list[dict[str, Any]]:
    """Entries of ``source["metrics"]`` (type = key), then of each family (type = ``family:key``),
    and of ``source["ood"]`` (type = ``ood:detector:key``), in the results' order."""
    out = [_metric(key, est, slice_) for key, est in (source.get("metrics") or {}).items()]
    for family in families:
        out += [_metric(f"{family}:{key}", est, slice_) for key, est in (source.get(family) or {}).items()]
    for detector, keys in (source.get("ood") or {}).items():
        out += [_metric(f"ood:{detector}:{key}", est, slice_) for key, est in (keys or {}).items()]
    return [e for e in out if e is not None]


def _performance_metrics(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for sc in results.get("scenarios", []):
        out += _estimates(sc, sc["id"], _SCENARIO_FAMILIES)
    for g in results.get("subgroups", []):
        out += _estimates(g, f"{g['scenario']}/{g['attribute']}={g['group']}", ("drop",))
    return out


def _interval(p: dict[str, Any]) -> str:
    if _is_num(p.get("ci_low")) and _is_num(p.get("ci_high")):
        return f" (interval {_num(p['ci_low'])} to {_num(p['ci_high'])})"
    return ""


def _limitations(results: dict[str, Any]) -> list[dict[str, str]]:
    out: list[str] = []
    headline = (results.get("verdict") or {}).get("headline")
    if headline:
        out.append(f"Audit verdict: {headline}")
    breaking = (results.get("robustness") or {}).get("breaking_points") or {}
    for name in sorted(breaking):
        entry = breaking[name] or {}
        kind = "stress test" if entry.get("stress_test") else "realistic perturbation"
        for key, p in (entry.get("metrics") or {}).items():
            if p.get("severity") is None:
                continue
            drop = f"drop from clean {_num(p['drop'])}" if _is_num(p.get("drop")) else "drop from clean"
            margin = f" beyond its margin {_num(p['margin'])}" if _is_num(p.get("margin")) else " beyond its margin"
            out.append(f"Breaking point: {name} ({kind}) breaks {key} at severity {_num(p['severity'])}: "
                       f"{drop}{_interval(p)}{margin}.")
    for c in results.get("checks", []):
        if not c.get("passed"):
            value = _num(c["value"]) if _is_num(c.get("value")) else "undefined"
            where = f" on {c['scenario']}" if c.get("scenario") else ""
            error = f" ({c['error']})" if c.get("error") else ""
            out.append(f"Failed check {c['expr']}{where}: value {value}{error}.")
    records = results.get("warning_records") or []
    if records:
        for w in records:
            about = ", ".join(x for x in (w.get("plugin"), w.get("scenario"), w.get("subject")) if x)
            text = f"Audit warning [{w['code']}{': ' + about if about else ''}]"
            text += f"{' (alert)' if w.get('alert') else ''}: {w['message']}"
            if w.get("impact"):
                text += f" Impact: {w['impact']}"
            out.append(text)
    else:  # results written before warning_records
        out += [f"Audit warning: {m}" for m in results.get("warnings", [])]
    return [{"description": d} for d in out]


def _subgroup_risks(results: dict[str, Any]) -> list[dict[str, str]]:
    """Significant subgroup gaps (Holm-adjusted permutation test) as ethical considerations."""
    out = []
    for g in (results.get("analyses") or {}).get("subgroup_gaps") or []:
        if not g.get("significant"):
            continue
        gap = g.get("gap") or {}
        parts = [f"{g['metric']} differs across {g['attribute']} groups on {g['scenario']}"]
        if _is_num(gap.get("value")):
            parts.append(f"gap {_num(gap['value'])}{_interval(gap)}")
        if g.get("worst_group") is not None and _is_num(g.get("worst_value")):
            parts.append(f"worst group {g['worst_group']} {_num(g['worst_value'])}")
        if g.get("best_group") is not None and _is_num(g.get("best_value")):
            parts.append(f"best group {g['best_group']} {_num(g['best_value'])}")
        if _is_num(g.get("p_adjusted")):
            parts.append(f"adjusted p {_num(g['p_adjusted'])}")
        out.append({"name": "Subgroup gap: " + "; ".join(parts)})
    return out


def _keyvals(pairs: list[tuple[str, Any]]) -> list[dict[str, str]]:
    out = []
    for key, value in pairs:
        if value is None or value == "" or value == [] or value == {}:
            continue
        out.append({"key": key, "value": value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)})
    return out


def _dataset(ds: dict[str, Any]) -> dict[str, Any]:
    counts = ", ".join(f"{k}: {v}" for k, v in (ds.get("class_counts") or {}).items())
    text = (f"Evaluation data of the medaudit audit (not training data): {ds['path']}"
            f"{' (' + ds['format'] + ')' if ds.get('format') else ''}, sha256 {ds['sha256']}, "
            f"{ds['n_samples']} samples")
    if counts:
        text += f"; class counts {counts}"
    if ds.get("metadata_columns"):
        text += f"; metadata columns {', '.join(ds['metadata_columns'])}"
    return {"name": _file_name(ds["path"]), "description": text + "."}


def model_card(results: dict[str, Any]) -> dict[str, Any]:
    """The Model Card (Model Card Toolkit schema v0.0.2) of a results.json dict.

    ``results`` is ``Results.model_dump(mode="json")`` or a results.json as loaded by
    :func:`json.load`; it is not modified. The card is a JSON-ready dict that validates against
    ``medaudit/schemas/model_card.schema.json``; equal results give equal cards.
    """
    model = results["model"]
    dataset = results["dataset"]
    config = results.get("config") or {}
    version = results.get("medaudit_version", "")

    details: dict[str, Any] = {"name": model.get("name") or _file_name(model["path"])}
    if model.get("description"):
        details["overview"] = model["description"]
    doc = [f"{model['task']} model ({model['format']}, {model['num_parameters']} parameters"
           f"{', ' + model['dtype'] if model.get('dtype') else ''}), file sha256 {model['sha256']}."]
    verdict = results.get("verdict") or {}
    if verdict.get("headline"):
        doc.append(f"Robustness audit by medaudit {version} ({results['created_at']}, seed {results['seed']}): "
                   f"{verdict['headline']}.")
    checks = results.get("checks") or []
    if checks:
        doc.append("Checks (an expression states when the audit fails): " + "; ".join(
            f"{c['expr']}: value {_num(c['value']) if _is_num(c.get('value')) else 'undefined'}, "
            f"{'passed' if c.get('passed') else 'failed'}" for c in checks) + ".")
    details["documentation"] = " ".join(doc)
    details["version"] = {"name": f"sha256:{model['sha256']}"}  # the identity of the audited file
    details["citations"] = [{"style": "text", "citation": (
        f"medaudit {version} robustness audit of {_file_name(model['path'])} (sha256 {model['sha256']}) on "
        f"{_file_name(dataset['path'])} (sha256 {dataset['sha256']}), results.json schema "
        f"{results.get('schema_version', '')}, created {results['created_at']}, seed {results['seed']}.")}]
    details["path"] = model["path"]

    inp = config.get("input") or {}
    params: dict[str, Any] = {}
    if model.get("summary"):
        params["model_architecture"] = model["summary"]
    params["data"] = [_dataset(dataset)]
    input_map = _keyvals([("modality", inp.get("modality")), ("dims", inp.get("dims")),
                          ("channels", inp.get("channels")), ("spatial_size", inp.get("spatial_size")),
                          ("intensity", inp.get("intensity")), ("mean", inp.get("mean")), ("std", inp.get("std"))])
    if input_map:
        params["input_format_map"] = input_map
    params["output_format_map"] = _keyvals([("task", model["task"]), ("output_kind", model.get("output_kind")),
                                            ("output_key", model.get("output_key")), ("classes", model["classes"])])

    considerations: dict[str, Any] = {}
    intended = model.get("intended_use") or (config.get("model") or {}).get("intended_use")
    if intended:
        considerations["use_cases"] = [{"description": intended}]
    limitations = _limitations(results)
    if limitations:
        considerations["limitations"] = limitations
    risks = _subgroup_risks(results)
    if risks:
        considerations["ethical_considerations"] = risks

    card: dict[str, Any] = {"schema_version": MODEL_CARD_SCHEMA_VERSION, "model_details": details,
                            "model_parameters": params,
                            "quantitative_analysis": {"performance_metrics": _performance_metrics(results)}}
    if considerations:
        card["considerations"] = considerations
    return card
