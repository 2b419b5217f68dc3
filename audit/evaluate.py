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
from pydantic import ValidationError
from torch import Tensor

from . import __version__
from .bootstrap import bootstrap_weights, evaluate as evaluate_metrics, paired_drops, small_n_warnings
from .checks import evaluate_checks, requested_perturbation_checks
from .config import Config
from .data import DatasetIdentity
from .detector import Detector
from .errors import DataError, ModelOutputError, PluginError
from .memory import release_free_memory
from .metric import Metric, MetricContext
from .model import LoadedModel
from .outputs import AuditOutputs
from .plugin_manager import PluginManager
from .results import Results, WarningRecord, clean_floats, metric_info
from .robustness import summarize as summarize_robustness
from .scores import audit_scores
from .runner import ForwardResult
from .shift import evaluate_detectors, evaluate_external
from .representation import representation_measures
from .task import (ALL_QUANTITIES, FAILURE_DETECTION, OUTPUT_FEATURES, SINGLE_LABEL, TARGET_LABEL_MAP,
                   TEMPERATURE_SCALING, Readout, Task, task_named, task_of)
from .temperature import temperature_report
from .timing import PhaseClock
from .referral import recommend
from .verdict import breaking_points_of, verdict


@dataclass
class ExternalSet:
    """An extra data set evaluated on clean inputs only: ``--ood-data`` or ``--reference``.

    ``labels`` is None for an unlabelled ``--ood-data`` set: nothing computed for such a set
    needs them (its detection measures compare scores with the clean audit data's), and a
    ``--reference`` set always has them (the class-conditional detectors fit on them).
    """

    name: str
    identity: DatasetIdentity
    labels: Tensor | None
    forward: ForwardResult


@dataclass
class Evaluation:
    results: Results
    outputs: AuditOutputs
    external_arrays: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def _feature_identity(cfg: Config) -> dict[str, Any]:
    """results.json ``model.feature_layer`` (the layer feature detectors read), how it was chosen
    (``feature_layer_source``: config, auto or none, with a note), the verified linear head, and
    ``model.feature_layers``, the stages multi-layer detectors read (source: config, auto, layer
    — the feature layer alone — or none)."""
    choice = cfg.model._feature_choice
    return {"feature_layer": cfg.model.feature_layer,
            "feature_layer_source": None if choice is None else choice.source,
            "feature_layer_note": None if choice is None else choice.note,
            "head": None if choice is None else choice.head_name,
            "feature_layers": cfg.model.feature_layers if isinstance(cfg.model.feature_layers, list) else None,
            "feature_layers_source": None if choice is None else choice.stages_source,
            "feature_layers_note": None if choice is None else choice.stages_note}


def _token_identity(layouts: dict[str, Any], cfg: Config) -> dict[str, dict[str, Any]] | None:
    """results.json ``model.tokens``: the layout (:class:`medaudit.tokens.TokenLayout`) of every token
    layer the audit read."""
    if not layouts:
        return None
    return {layer: {"prefix": t.prefix, "cls": t.cls, "registers": t.registers, "source": t.source,
                    "pooling": cfg.model.tokens.pooling} for layer, t in sorted(layouts.items())}


def _readout(task: Task, cfg: Config, reference: ExternalSet | None) -> Readout | None:
    """The task's readouts fitted on the reference set (None for a task that needs none)."""
    if reference is None or reference.labels is None:
        return None
    try:
        readout = task.readout({k: v[0] for k, v in reference.forward.outputs.items()}, reference.labels, cfg.task,
                               reference.identity.sha256)
    except ValueError as exc:
        raise DataError(f"--reference {reference.identity.path}: {exc}") from None
    if readout is not None and set(readout.heads) != {"", *task.readout_prefixes}:
        raise PluginError(f"task {task.name!r}: its readout heads {sorted(readout.heads)} are not the primary head '' "
                          f"and the declared readout_prefixes {list(task.readout_prefixes)}")
    return readout


def _representation(task: Task, cfg: Config, fwd: ForwardResult, labels: Tensor, weights: Tensor,
                    reference: ExternalSet | None, dev: torch.device) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Per perturbed scenario, how far the representation moved from clean (:mod:`medaudit.representation`),
    and what was measured (results.json ``model.representation``)."""
    if not cfg.audit.representation:
        return {}, None
    encoder = OUTPUT_FEATURES in task.capabilities
    vectors = fwd.outputs.get("embedding") if encoder else fwd.representation
    if vectors is None:
        return {}, None
    ids = [s.id for s in fwd.scenarios]
    clean = vectors[ids.index("clean")].to(dev)
    ref_vectors = None
    if reference is not None and reference.labels is not None:
        ref_vectors = (reference.forward.outputs.get("embedding") if encoder else reference.forward.representation)
    self_reference = ref_vectors is None
    ref, ref_labels = (clean, labels) if self_reference else (ref_vectors[0].to(dev), reference.labels)  # type: ignore[union-attr]
    voting = SINGLE_LABEL in task.capabilities  # k-NN consistency compares one voted class per sample
    out = {sid: representation_measures(clean, vectors[i].to(dev), weights, cfg.audit.confidence,
                                        reference=ref if voting else None,
                                        reference_labels=ref_labels.to(dev) if voting else None,
                                        k=cfg.audit.representation_k, n_classes=len(cfg.task.classes),
                                        self_reference=self_reference)
           for i, sid in enumerate(ids) if sid != "clean"}
    info = {"source": "the encoder's embeddings" if encoder else f"the pooled output of {cfg.model.feature_layer!r}",
            "dim": int(clean.shape[1]), "knn_k": cfg.audit.representation_k,
            "knn_reference": None if not voting else "the clean audit data (each sample excluded from its own "
                             "neighbours)" if self_reference else "the --reference set", "similarity": "cosine"}
    return out, info


def _summaries(params: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    return {k: {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())} for k, v in params.items() if v.numel()}


def _scenario_metrics(metrics: list[Metric], task: Task, outputs: dict[str, Tensor], labels: Tensor, weights: Tensor,
                      ctx: MetricContext, confidence: float, scenario_id: str, owners: dict[int, str],
                      failures: dict[int, WarningRecord]) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Metric], dict[str, Any]]:
    """Estimates, raw per-row values, the family that emitted each key, and plot data of one scenario.

    Bad predictions (NaN, rows not summing to 1: what the task's check rejects) are the model's
    fault and stop the audit, naming the scenario. A metric plugin that raises is the plugin's
    fault: it is recorded in ``failures`` (named in the report's limitations) and the other
    metrics are kept. Metrics receive the task's ``metric_input`` quantity.
    """
    try:
        task.check_outputs(outputs, labels, weights)
    except ValueError as exc:
        raise ModelOutputError(f"unusable model outputs in scenario {scenario_id}: {exc}") from None
    probs: Any = outputs if task.metric_input == ALL_QUANTITIES else outputs[task.metric_input]
    estimates: dict[str, Any] = {}
    raw: dict[str, Tensor] = {}
    families: dict[str, Metric] = {}
    curves: dict[str, Any] = {}
    for m in metrics:
        if id(m) in failures:
            continue
        # One family at a time, so every key is attributed to the metric (and direction) that made it.
        try:
            est, r = evaluate_metrics([m], probs, labels, weights, ctx, confidence, validate=False)  # checked above
            extra = m.curves(probs, labels, ctx)
        except Exception as exc:
            plugin = owners.get(id(m), type(m).__module__)
            failures[id(m)] = WarningRecord(
                code="metric-failed", plugin=plugin, scenario=scenario_id, subject=m.name,
                message=(f'metric "{m.name}" of plugin "{plugin}" raised in scenario {scenario_id} '
                         f"({type(exc).__name__}: {exc}); its results are left out"))
            continue
        clash = sorted(set(est) & set(estimates))
        if clash:
            raise PluginError(f"metric {m.name!r} emits result keys {clash} that another metric already emits")
        estimates.update(est)
        raw.update(r)
        families.update(dict.fromkeys(est, m))
        if extra:
            curves.update(extra)
    return estimates, raw, families, curves


def analysis_warnings(plugin: str, value: Any) -> list[WarningRecord]:
    """An analysis plugin's ``warnings``: strings (wrapped, code ``analysis``) or records.

    A record given as a dict or :class:`WarningRecord` keeps its own code; its plugin defaults
    to the analysis plugin that returned it. An entry that is neither is the plugin's fault, not
    the audit's: it becomes an ``analysis-failed`` record naming the plugin.
    """
    out = []
    for w in value:
        if isinstance(w, str):
            out.append(WarningRecord(code="analysis", plugin=plugin, message=w))
            continue
        try:
            record = WarningRecord.model_validate(w.model_dump() if isinstance(w, WarningRecord) else w)
        except ValueError as exc:
            first = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": (), "msg": str(exc)}
            out.append(WarningRecord(
                code="analysis-failed", plugin=plugin,
                message=(f'plugin "{plugin}" returned a warning that is neither a string nor a warning record '
                         f"(code, message, optional scenario, subject): {w!r} "
                         f"({'.'.join(map(str, first['loc'])) or 'value'}: {first['msg']})")))
            continue
        out.append(record if record.plugin else record.model_copy(update={"plugin": plugin}))
    return out


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
    warnings: list[WarningRecord],
    reference: ExternalSet | None = None,
    ood_sets: list[ExternalSet] | None = None,
    assets: dict[str, str] | None = None,
    phases: PhaseClock | None = None,
    token_layouts: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = None,
) -> Evaluation:
    cfg = config
    phases = phases or PhaseClock()
    labels = torch.as_tensor(labels_np)
    n = labels.shape[0]
    task = task_of(cfg.task)
    # audit.n_bins holds the bin count the plugin owning it resolved (medaudit.settings); unset, the default
    n_bins = MetricContext.n_bins if cfg.audit.n_bins is None else cfg.audit.n_bins
    ctx = MetricContext(task.metric_task(cfg.task), tuple(cfg.task.classes), cfg.task.threshold, n_bins,
                        cfg.task.target_specificity)
    weights = bootstrap_weights(n, cfg.audit.bootstrap, cfg.audit.seed)
    # a label-map task's labels say which classes each mask holds: per-class sample counts (meant for
    # AUROC, sensitivity) do not apply, only the number of images the bootstrap resamples
    small = (small_n_warnings(labels, list(cfg.task.classes), "clean") if task.targets != TARGET_LABEL_MAP else
             [f"clean: {n} images (< 30); bootstrap intervals over images are unreliable"] if n < 30 else [])
    records = list(warnings) + [WarningRecord(code="small-sample", scenario="clean", message=w) for w in small]
    ids = [s.id for s in fwd.scenarios]
    # Metrics and bootstrap run on the audit's device: on a GPU the [R, N] resample work is cheap.
    # The same weights (drawn on the CPU from the seed) are used wherever they run.
    dev = device if device.type == "cuda" else torch.device("cpu")
    labels_d, weights_d = labels.to(dev), weights.to(dev)
    # A task whose outputs are not class scores (an encoder) is evaluated through readouts fitted on
    # the reference set: every head's class probabilities, scenario by scenario, as a classifier's.
    readout = _readout(task, cfg, reference)
    heads: dict[str, dict[str, Tensor]] = {}
    if readout is not None:
        for i in range(len(fwd.scenarios)):  # unusable embeddings are named per scenario, as probabilities are
            try:
                task.check_outputs({k: v[i] for k, v in fwd.outputs.items()}, labels)
            except ValueError as exc:
                raise ModelOutputError(f"unusable model outputs in scenario {fwd.scenarios[i].id}: {exc}") from None
        heads = {prefix: {"probs": torch.stack([head({k: v[i].to(dev) for k, v in fwd.outputs.items()})
                                                for i in range(len(fwd.scenarios))])}
                 for prefix, head in readout.heads.items()}
        eval_task = task_named(readout.metric_task)
        quantities = heads.pop("")
    else:
        eval_task, quantities = task, fwd.outputs
    outputs_d = {name: v.to(dev) for name, v in quantities.items()}

    ref_emb = {k: v[0] for k, v in reference.forward.embeddings.items()} if reference is not None else None
    # Detectors fit on image-level classes; a label-map task has none (its labels say which classes a
    # mask holds), so its images are one in-distribution class for the class-conditional detectors.
    label_maps = task.targets == TARGET_LABEL_MAP
    shift = evaluate_detectors(detectors, fwd.embeddings, torch.zeros(n, dtype=torch.int64) if label_maps else labels,
                               quantities.get(eval_task.metric_input), ids, weights_d,
                               cfg.audit.confidence, cfg.audit.seed, reference=ref_emb,
                               reference_labels=None if reference is None else (
                                   torch.zeros(reference.identity.n_samples, dtype=torch.int64) if label_maps
                                   else reference.labels),
                               output_kind=fwd.output_kind, device=dev,
                               failure_detection=FAILURE_DETECTION in task.capabilities, task_name=task.name,
                               explain_skip=not label_maps, feature_layer=cfg.model.feature_layer,
                               quality=task.sample_quality(fwd.outputs, cfg.task))
    # shift.py knows detectors by name only; which plugin provides each is known here, and the
    # message names it too, since the console and the string list show the message alone
    detector_plugin = {d.name: owners.get(id(d)) for d in detectors}
    for w in shift.records:
        owner = None if w.plugin else detector_plugin.get(w.subject)
        if owner:
            w = w.model_copy(update={"plugin": owner, "message": f'{w.message} (detector of plugin "{owner}")'})
        records.append(w)
    phases.lap("detectors")
    release_free_memory()  # knn distance blocks and fitting copies: the metrics need none of them

    representation, representation_info = _representation(task, cfg, fwd, labels, weights_d, reference, dev)
    phases.lap("representation")
    directions: dict[str, bool] = {}
    families: dict[str, Metric] = {}
    raw: dict[str, dict[str, Tensor]] = {}
    scenario_results: list[dict[str, Any]] = []
    metric_failures: dict[int, WarningRecord] = {}
    for i, sc in enumerate(fwd.scenarios):
        estimates, raw[sc.id], fams, curves = _scenario_metrics(metrics, eval_task, {k: v[i] for k, v in outputs_d.items()},
                                                               labels_d, weights_d, ctx, cfg.audit.confidence, sc.id,
                                                               owners, metric_failures)
        for prefix, head in heads.items():  # the other readouts' metrics, under their prefix
            est, r, fam, _ = _scenario_metrics(metrics, eval_task, {k: v[i].to(dev) for k, v in head.items()}, labels_d,
                                               weights_d, ctx, cfg.audit.confidence, sc.id, owners, metric_failures)
            estimates.update({prefix + k: v for k, v in est.items()})
            raw[sc.id].update({prefix + k: v for k, v in r.items()})
            fams.update({prefix + k: m for k, m in fam.items()})
        families.update(fams)
        directions.update({k: m.higher_is_better for k, m in fams.items()})
        drop = {}
        if sc.id != "clean":
            drop = paired_drops(raw["clean"], raw[sc.id], directions, cfg.audit.confidence)
        seconds = fwd.seconds.get(sc.id, 0.0)
        scenario_results.append({
            "id": sc.id, "suite": sc.suite, "perturbation": sc.perturbation, "severity": sc.severity,
            "n_samples": n, "metrics": estimates, "drop": drop, "curves": curves,
            "ood": shift.ood.get(sc.id, {}), "failure_detection": shift.failure_detection.get(sc.id, {}),
            "flagged_errors": shift.flagged_errors.get(sc.id, {}), "epd": shift.epd.get(sc.id, {}),
            "representation": representation.get(sc.id, {}),
            "params": _summaries(fwd.params.get(sc.id, {})),
            "throughput": n / seconds if seconds > 0 else None,
        })

    phases.lap("metrics")
    release_free_memory()
    external_arrays: dict[str, dict[str, Tensor]] = {}
    for ext in ood_sets or []:
        m = ext.identity.n_samples
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
        external_arrays[ext.name] = {**{k: v[0] for k, v in ext.forward.outputs.items()},
                                     **{f"ood_{k}": v for k, v in scores.items()}}
        records.append(WarningRecord(
            code="external-set", scenario=f"ood:{ext.name}", subject=ext.name,
            message=(f"ood:{ext.name}: external set {ext.identity.path} ({m} samples, SHA-256 "
                     f"{ext.identity.sha256[:12]}…) scored against the clean audit data; classification metrics "
                     "are not computed for it")))

    phases.lap("external")
    records += list(metric_failures.values())
    working = [m for m in metrics if id(m) not in metric_failures]  # analyses only see metrics that work
    outputs = AuditOutputs(fwd.scenarios, sample_ids, labels, None, metadata, working, ctx, weights,
                           cfg.audit.confidence, cfg.audit.seed, shift.scores, fwd.params,
                           quantities=quantities, task=eval_task)
    analyses: dict[str, Any] = {}
    subgroups: list[dict[str, Any]] = []

    def analysis_failed(message: str, plugin: str) -> None:
        records.append(WarningRecord(code="analysis-failed", plugin=plugin, subject=plugin, message=message))

    for plugin, extra in pm.call_each("medaudit_analyze", on_error=analysis_failed, outputs=outputs, config=cfg):
        for key, value in extra.items():
            if key == "warnings":
                records.extend(analysis_warnings(plugin, value))
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
            "auroc_ci": {name: shift.auroc_ci.get(name, "bootstrap") for name in sorted(shift.scores)},
        }
    calibration: dict[str, Any] = {}
    if TEMPERATURE_SCALING in task.capabilities:
        calibration["temperature_scaling"] = temperature_report(fwd.probs, labels, ids, task, ctx.n_bins,
                                                                cfg.audit.seed)
    phases.lap("calibration")
    robustness = summarize_robustness({s["id"]: s["metrics"] for s in scenario_results if s["id"] in ids},
                                      fwd.scenarios, directions)
    info = metric_info(families, owners)
    robustness.update(audit_scores(raw, fwd.scenarios, directions, [k for k, i in info.items() if i.headline],
                                   baseline=baseline, confidence=cfg.audit.confidence))
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
            "task_capabilities": sorted(task.capabilities),
            "dtype": model.dtype, "summary": model.summary, "output_kind": fwd.output_kind,
            "name": cfg.model.name, "description": cfg.model.description, "intended_use": cfg.model.intended_use,
            **_feature_identity(cfg),
            "output_key": cfg.model.output_key,
            "tokens": _token_identity(token_layouts or {}, cfg),
            "probe": None if readout is None else dict(readout.record),
            "representation": representation_info,
        },
        "dataset": {
            "path": identity.path, "sha256": identity.sha256, "n_samples": identity.n_samples,
            "class_counts": identity.class_counts, "metadata_columns": identity.metadata_columns,
            "format": identity.format, "metadata_summary": identity.metadata_summary,
            "metadata_numeric": identity.metadata_numeric,
        },
        "environment": env,
        "scenarios": scenario_results,
        "subgroups": subgroups,
        "config": cfg.model_dump(mode="json"),
        "metric_directions": directions,
        "metric_info": {k: v.model_dump() for k, v in info.items()},
        "perturbation_catalogue": catalogue,
        "robustness": robustness,
        "calibration": calibration,
        "analyses": analyses,
        "warnings": [w.message for w in records],
        "warning_records": [w.model_dump() for w in records],
        "timing": {"total_seconds": time.perf_counter() - started, "forward_seconds": forward_s,
                   "samples_per_second": n * len(ids) / forward_s if forward_s > 0 else 0.0,
                   "phases": phases.seconds},
        "assets": assets or {},
    }
    def drop_rows(sid: str, key: str) -> list[float] | None:
        """The resampled paired drops of one metric (rows 1..R, positive = worse), as paired_drops forms them."""
        if key not in raw.get(sid, {}) or key not in raw["clean"]:
            return None
        clean, pert = raw["clean"][key].double().flatten().cpu(), raw[sid][key].double().flatten().cpu()
        return ((clean - pert) if directions.get(key, True) else (pert - clean))[1:].tolist()

    results["checks"] = evaluate_checks(cfg.checks, results, drop_rows) + requested_perturbation_checks(
        cfg.audit.perturbations, ids, fwd.failures)
    # from the results dict, as the report derives them for older files: one definition of what is judged
    robustness["breaking_points"] = breaking_points_of(clean_floats(results))
    results["verdict"] = verdict(clean_floats(results))
    results["ood_recommendation"] = recommend(clean_floats(results), shift.thresholds)
    return Evaluation(Results.model_validate(clean_floats(results)), outputs, external_arrays)
