"""From per-sample outputs to :class:`~medaudit.results.Results`.

Everything here is a function of the runner's outputs, the config and the seed: metrics with
bootstrap CIs, paired drops from clean, OOD measures, robustness summaries, temperature scaling,
analysis plugins and the ``--fail-on`` checks. Nothing runs the model.
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .bootstrap import bootstrap_weights, check_predictions, evaluate as evaluate_metrics, paired_drops, small_n_warnings
from .checks import evaluate_checks
from .config import Config
from .data import DatasetIdentity
from .detector import Detector
from .errors import ModelOutputError, PluginError
from .memory import release_free_memory
from .metric import Metric, MetricContext
from .model import LoadedModel
from .outputs import AuditOutputs
from .plugin_manager import PluginManager
from .results import Results, clean_floats
from .robustness import summarize as summarize_robustness
from .runner import ForwardResult
from .shift import evaluate_detectors, evaluate_external
from .temperature import temperature_report
from .timing import PhaseClock


@dataclass
class ExternalSet:
    """An extra data set evaluated on clean inputs only: ``--ood-data`` or ``--reference``."""

    name: str
    identity: DatasetIdentity
    labels: Tensor
    forward: ForwardResult


@dataclass
class Evaluation:
    results: Results
    outputs: AuditOutputs
    external_arrays: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def _summaries(params: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    return {k: {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())} for k, v in params.items() if v.numel()}


def _scenario_metrics(metrics: list[Metric], probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext,
                      confidence: float, scenario_id: str, owners: dict[int, str],
                      failures: dict[int, str]) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, bool], dict[str, Any]]:
    """Estimates, raw per-row values, direction per key and plot data of one scenario.

    Bad predictions (NaN, rows not summing to 1) are the model's fault and stop the audit, naming
    the scenario. A metric plugin that raises is the plugin's fault: it is recorded in
    ``failures`` (named in the report's limitations) and the other metrics are kept.
    """
    try:
        check_predictions(probs, labels, ctx.task, weights)
    except ValueError as exc:
        raise ModelOutputError(f"unusable model outputs in scenario {scenario_id}: {exc}") from None
    estimates: dict[str, Any] = {}
    raw: dict[str, Tensor] = {}
    directions: dict[str, bool] = {}
    curves: dict[str, Any] = {}
    for m in metrics:
        if id(m) in failures:
            continue
        # One family at a time, so every key is attributed to the metric (and direction) that made it.
        try:
            est, r = evaluate_metrics([m], probs, labels, weights, ctx, confidence, validate=False)  # checked above
            extra = m.curves(probs, labels, ctx)
        except Exception as exc:
            failures[id(m)] = (f'metric "{m.name}" of plugin "{owners.get(id(m), type(m).__module__)}" raised in '
                               f"scenario {scenario_id} ({type(exc).__name__}: {exc}); its results are left out")
            continue
        clash = sorted(set(est) & set(estimates))
        if clash:
            raise PluginError(f"metric {m.name!r} emits result keys {clash} that another metric already emits")
        estimates.update(est)
        raw.update(r)
        directions.update(dict.fromkeys(est, m.higher_is_better))
        if extra:
            curves.update(extra)
    return estimates, raw, directions, curves


def build_results(
    pm: PluginManager,
    config: Config,
    model: LoadedModel,
    identity: DatasetIdentity,
    sample_ids: list[str],
    labels_np: Any,
    metadata: dict[str, list[Any]],
    metrics: list[Metric],
    detectors: list[Detector],
    owners: dict[int, str],
    catalogue: list[dict[str, Any]],
    fwd: ForwardResult,
    device: torch.device,
    command: str,
    started: float,
    warnings: list[str],
    reference: ExternalSet | None = None,
    ood_sets: list[ExternalSet] | None = None,
    assets: dict[str, str] | None = None,
    phases: PhaseClock | None = None,
) -> Evaluation:
    cfg = config
    phases = phases or PhaseClock()
    labels = torch.as_tensor(labels_np)
    n = labels.shape[0]
    ctx = MetricContext(cfg.task.type, tuple(cfg.task.classes), cfg.task.threshold, cfg.audit.n_bins,
                        cfg.task.target_specificity)
    weights = bootstrap_weights(n, cfg.audit.bootstrap, cfg.audit.seed)
    warnings = list(warnings) + small_n_warnings(labels, list(cfg.task.classes), "clean")
    ids = [s.id for s in fwd.scenarios]
    # Metrics and bootstrap run on the audit's device: on a GPU the [R, N] resample work is cheap.
    # The same weights (drawn on the CPU from the seed) are used wherever they run.
    dev = device if device.type == "cuda" else torch.device("cpu")
    probs_d, labels_d, weights_d = fwd.probs.to(dev), labels.to(dev), weights.to(dev)

    ref_emb = {k: v[0] for k, v in reference.forward.embeddings.items()} if reference is not None else None
    shift = evaluate_detectors(detectors, fwd.embeddings, labels, fwd.probs, ids, weights_d, cfg.audit.confidence,
                               cfg.audit.seed, reference=ref_emb,
                               reference_labels=reference.labels if reference is not None else None,
                               output_kind=fwd.output_kind, device=dev)
    warnings += shift.warnings
    phases.lap("detectors")
    release_free_memory()  # knn distance blocks and fitting copies: the metrics need none of them

    directions: dict[str, bool] = {}
    raw: dict[str, dict[str, Tensor]] = {}
    scenario_results: list[dict[str, Any]] = []
    metric_failures: dict[int, str] = {}
    for i, sc in enumerate(fwd.scenarios):
        estimates, raw[sc.id], dirs, curves = _scenario_metrics(metrics, probs_d[i], labels_d, weights_d, ctx,
                                                               cfg.audit.confidence, sc.id, owners, metric_failures)
        directions.update(dirs)
        drop = {}
        if sc.id != "clean":
            drop = paired_drops(raw["clean"], raw[sc.id], directions, cfg.audit.confidence)
        seconds = fwd.seconds.get(sc.id, 0.0)
        scenario_results.append({
            "id": sc.id, "suite": sc.suite, "perturbation": sc.perturbation, "severity": sc.severity,
            "n_samples": n, "metrics": estimates, "drop": drop, "curves": curves,
            "ood": shift.ood.get(sc.id, {}), "failure_detection": shift.failure_detection.get(sc.id, {}),
            "params": _summaries(fwd.params.get(sc.id, {})),
            "throughput": n / seconds if seconds > 0 else None,
        })

    phases.lap("metrics")
    release_free_memory()
    external_arrays: dict[str, dict[str, Tensor]] = {}
    for ext in ood_sets or []:
        m = ext.labels.shape[0]
        ext_weights = bootstrap_weights(m, cfg.audit.bootstrap, cfg.audit.seed, ood_set=ext.name)
        clean_idx = ids.index("clean")
        measures, scores = evaluate_external(
            shift.fitted, {k: v[clean_idx] for k, v in shift.scores.items()},
            {k: v[0] for k, v in ext.forward.embeddings.items()}, weights_d, ext_weights, cfg.audit.confidence, device=dev)
        seconds = sum(ext.forward.seconds.values())
        scenario_results.append({
            "id": f"ood:{ext.name}", "suite": "ood", "perturbation": None, "severity": 0, "n_samples": m,
            "metrics": {}, "ood": measures, "throughput": m / seconds if seconds > 0 else None,
        })
        external_arrays[ext.name] = {"probs": ext.forward.probs[0], **{f"ood_{k}": v for k, v in scores.items()}}
        warnings.append(f"ood:{ext.name}: external set {ext.identity.path} ({m} samples, SHA-256 "
                        f"{ext.identity.sha256[:12]}…) scored against the clean audit data; classification metrics "
                        "are not computed for it")

    phases.lap("external")
    warnings += list(metric_failures.values())
    working = [m for m in metrics if id(m) not in metric_failures]  # analyses only see metrics that work
    outputs = AuditOutputs(fwd.scenarios, sample_ids, labels, fwd.probs, metadata, working, ctx, weights,
                           cfg.audit.confidence, cfg.audit.seed, shift.scores, fwd.params)
    analyses: dict[str, Any] = {}
    subgroups: list[dict[str, Any]] = []
    for _plugin, extra in pm.call_each("medaudit_analyze", on_error=warnings.append, outputs=outputs, config=cfg):
        for key, value in extra.items():
            if key == "warnings":
                warnings.extend(value)
            elif key == "subgroups":
                subgroups.extend(value)
            else:
                analyses[key] = value
    phases.lap("analyses")
    if shift.scores:
        analyses["ood_fitting"] = {
            "method": shift.fitting,
            "reference": None if reference is None else {"path": reference.identity.path,
                                                          "sha256": reference.identity.sha256,
                                                          "n_samples": reference.identity.n_samples},
            "detectors": sorted(shift.scores),
        }
    calibration = {"temperature_scaling": temperature_report(fwd.probs, labels, ids, cfg.task.type, cfg.audit.n_bins,
                                                             cfg.audit.seed)}
    phases.lap("calibration")
    robustness = summarize_robustness({s["id"]: s["metrics"] for s in scenario_results if s["id"] in ids},
                                      fwd.scenarios, directions)
    forward_s = sum(fwd.seconds.values())
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
        "plugins": {i.name: f"{i.distribution} {i.version}".strip() for i in pm.infos.values()},
        "platform": platform.platform(), "precision": cfg.audit.precision,
        "memory_format": fwd.memory_format, "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
    }
    results: dict[str, Any] = {
        "medaudit_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "seed": cfg.audit.seed,
        "model": {
            "path": str(model.path), "sha256": model.sha256, "format": model.format,
            "num_parameters": model.num_parameters, "task": cfg.task.type, "classes": list(cfg.task.classes),
            "dtype": model.dtype, "summary": model.summary, "output_kind": fwd.output_kind,
            "name": cfg.model.name, "description": cfg.model.description, "intended_use": cfg.model.intended_use,
        },
        "dataset": {
            "path": identity.path, "sha256": identity.sha256, "n_samples": identity.n_samples,
            "class_counts": identity.class_counts, "metadata_columns": identity.metadata_columns,
            "format": identity.format, "metadata_summary": identity.metadata_summary,
        },
        "environment": env,
        "scenarios": scenario_results,
        "subgroups": subgroups,
        "config": cfg.model_dump(mode="json"),
        "metric_directions": directions,
        "perturbation_catalogue": catalogue,
        "robustness": robustness,
        "calibration": calibration,
        "analyses": analyses,
        "warnings": warnings,
        "timing": {"total_seconds": time.perf_counter() - started, "forward_seconds": forward_s,
                   "samples_per_second": n * len(ids) / forward_s if forward_s > 0 else 0.0,
                   "phases": phases.seconds},
        "assets": assets or {},
    }
    results["checks"] = evaluate_checks(cfg.checks, results)
    return Evaluation(Results.model_validate(clean_floats(results)), outputs, external_arrays)
