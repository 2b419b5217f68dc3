"""One audit end to end: config → loaders → runner → results → outputs.

Data flows one way. :func:`prepare` resolves plugins, model, data and scenarios;
:func:`evaluate` turns the runner's per-sample outputs into results; :func:`write_outputs`
writes results.json, the report and predictions atomically.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .bootstrap import bootstrap_weights, evaluate as evaluate_metrics, paired_drop, small_n_warnings
from .checks import evaluate_checks, junit_xml, parse_check
from .config import Config
from .data import AuditDataset, DatasetIdentity
from .detector import Detector
from .errors import ConfigError, DataError, MedauditError, ModelError, PluginError
from .metric import Metric, MetricContext
from .model import LoadedModel
from .outputs import AuditOutputs, Scenario
from .perturbation import Perturbation
from .plugin_manager import PluginManager
from .results import Results, clean_floats, dumps
from .robustness import summarize as summarize_robustness
from .runner import ForwardResult, ShardCache, plan_scenarios, run_forward, select_device
from .temperature import temperature_report


@dataclass
class Prepared:
    pm: PluginManager
    config: Config
    model: LoadedModel
    dataset: AuditDataset
    scenarios: list[Scenario]
    perturbations: dict[str, Perturbation]
    catalogue: dict[str, tuple[str, type[Perturbation]]]
    metrics: list[Metric]
    detectors: list[Detector]
    device: torch.device
    identity: DatasetIdentity
    warnings: list[str] = field(default_factory=list)


def open_dataset(pm: PluginManager, path: Path, config: Config) -> AuditDataset:
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    dataset = pm.hook.medaudit_open_dataset(path=path, config=config)
    if dataset is None:
        raise DataError(f"{path}: no dataset loader recognises this path; give a .npz file, or a folder or CSV "
                        "with a manifest (path,label,…)")
    return dataset


def load_model(pm: PluginManager, path: Path, config: Config, trust_pickle: bool) -> LoadedModel:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    model = pm.hook.medaudit_load_model(path=path, config=config, trust_pickle=trust_pickle)
    if model is None:
        raise ModelError(f"{path}: no model loader recognises this file; save it with torch.jit.save, "
                         "torch.export.save, or as a state dict with model.arch set")
    return model


def prepare(pm: PluginManager, model_path: Path, data_path: Path, config: Config, trust_pickle: bool = False) -> Prepared:
    warnings = [f.message for f in pm.failures]
    for expr in config.checks:
        parse_check(expr)  # syntax errors before any work
    device = select_device(config.audit.device)
    dataset = open_dataset(pm, data_path, config)
    if not config.task.classes:
        classes = list(getattr(dataset, "classes", None) or dataset.task.classes)
        config.task = config.task.model_copy(update={"classes": classes})
        warnings.append(f"task.classes not configured; inferred from the labels: {classes}")
    if len(config.task.classes) < 2:
        raise ConfigError(f"task.classes must name at least 2 classes, got {config.task.classes}")
    model = load_model(pm, model_path, config, trust_pickle).to(device)
    catalogue = pm.perturbations()
    scenarios, perturbations = plan_scenarios(config, catalogue)
    metrics = [m for _, ms in pm.call_each("medaudit_metrics", config=config) for m in ms
               if config.task.type in m.tasks]
    if not metrics:
        raise PluginError("no metric plugin is available for this task; is medaudit installed correctly? (`medaudit plugins`)")
    detectors = [d for _, ds in pm.call_each("medaudit_detectors", config=config) for d in ds]
    if config.audit.detectors is not None:
        known = {d.name for d in detectors}
        unknown = sorted(set(config.audit.detectors) - known)
        if unknown:
            raise ConfigError(f"audit.detectors: unknown detector(s) {unknown}; available: {sorted(known)}")
        detectors = [d for d in detectors if d.name in config.audit.detectors]
    return Prepared(pm, config, model, dataset, scenarios, perturbations, catalogue, metrics, detectors, device,
                    dataset.identity(), warnings)


def _summaries(params: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    return {k: {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())} for k, v in params.items() if v.numel()}


def evaluate(prep: Prepared, fwd: ForwardResult, command: str, started: float,
             assets: dict[str, str] | None = None) -> Results:
    """Metrics with CIs, drops, robustness summaries, analyses and checks → :class:`Results`."""
    cfg = prep.config
    ds = prep.dataset
    labels = torch.from_numpy(ds.labels)
    ctx = MetricContext(cfg.task.type, tuple(cfg.task.classes), cfg.task.threshold, cfg.audit.n_bins,
                        cfg.task.target_specificity)
    weights = bootstrap_weights(len(ds), cfg.audit.bootstrap, cfg.audit.seed)
    directions: dict[str, bool] = {}
    raw: dict[str, dict[str, torch.Tensor]] = {}
    scenario_results: list[dict[str, Any]] = []
    warnings = list(prep.warnings)
    warnings += small_n_warnings(labels, list(cfg.task.classes), "clean")
    for i, sc in enumerate(fwd.scenarios):
        metrics: dict[str, Any] = {}
        raw[sc.id] = {}
        curves: dict[str, Any] = {}
        for m in prep.metrics:
            est, r = evaluate_metrics([m], fwd.probs[i], labels, weights, ctx, cfg.audit.confidence)
            metrics.update(est)
            raw[sc.id].update(r)
            directions.update(dict.fromkeys(est, m.higher_is_better))
            extra = m.curves(fwd.probs[i], labels, ctx)
            if extra:
                curves.update(extra)
        drop = {}
        if sc.id != "clean":
            drop = {k: paired_drop(raw["clean"][k], raw[sc.id][k], directions[k], cfg.audit.confidence)
                    for k in raw[sc.id] if k in raw["clean"]}
        seconds = fwd.seconds.get(sc.id, 0.0)
        scenario_results.append({
            "id": sc.id, "suite": sc.suite, "perturbation": sc.perturbation, "severity": sc.severity,
            "n_samples": len(ds), "metrics": metrics, "drop": drop, "curves": curves,
            "params": _summaries(fwd.params.get(sc.id, {})),
            "throughput": len(ds) / seconds if seconds > 0 else None,
        })
    outputs = AuditOutputs(fwd.scenarios, ds.sample_ids, labels, fwd.probs, ds.metadata, prep.metrics, ctx,
                           weights, cfg.audit.confidence, cfg.audit.seed, {}, fwd.params)
    analyses: dict[str, Any] = {}
    subgroups: list[dict[str, Any]] = []
    for _plugin, extra in prep.pm.call_each("medaudit_analyze", outputs=outputs, config=cfg):
        for key, value in extra.items():
            if key == "warnings":
                warnings.extend(value)
            elif key == "subgroups":
                subgroups.extend(value)
            else:
                analyses[key] = value
    calibration = {"temperature_scaling": temperature_report(
        fwd.probs, labels, [s.id for s in fwd.scenarios], cfg.task.type, cfg.audit.n_bins, cfg.audit.seed)}
    robustness = summarize_robustness({s["id"]: s["metrics"] for s in scenario_results}, fwd.scenarios, directions)
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "device": str(prep.device),
        "plugins": {i.name: f"{i.distribution} {i.version}".strip() for i in prep.pm.infos.values()},
        "platform": platform.platform(), "precision": cfg.audit.precision,
        "device_name": torch.cuda.get_device_name(prep.device) if prep.device.type == "cuda" else platform.processor() or platform.machine(),
    }
    forward_s = sum(fwd.seconds.values())
    total = time.perf_counter() - started
    identity = prep.identity
    results = {
        "medaudit_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "seed": cfg.audit.seed,
        "model": {
            "path": str(prep.model.path), "sha256": prep.model.sha256, "format": prep.model.format,
            "num_parameters": prep.model.num_parameters, "task": cfg.task.type, "classes": list(cfg.task.classes),
            "dtype": prep.model.dtype, "summary": prep.model.summary, "output_kind": fwd.output_kind,
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
        "perturbation_catalogue": [prep.perturbations[name].describe() for name in sorted(prep.perturbations)],
        "robustness": robustness,
        "calibration": calibration,
        "analyses": analyses,
        "warnings": warnings,
        "timing": {"total_seconds": total, "forward_seconds": forward_s,
                   "samples_per_second": len(ds) * len(fwd.scenarios) / forward_s if forward_s > 0 else 0.0},
        "assets": assets or {},
    }
    results["checks"] = evaluate_checks(cfg.checks, results)
    return Results.model_validate(clean_floats(results))


def save_predictions(path: Path, fwd: ForwardResult, dataset: AuditDataset, ood_scores: dict[str, torch.Tensor]) -> None:
    arrays: dict[str, np.ndarray] = {
        "scenario_ids": np.array([s.id for s in fwd.scenarios]),
        "labels": dataset.labels,
        "sample_ids": np.array(dataset.sample_ids),
        "probs": fwd.probs.numpy(),
    }
    for name, scores in ood_scores.items():
        arrays[f"ood_{name}"] = scores.numpy()
    np.savez_compressed(path, **arrays)


class AtomicOutputDir:
    """Stage every output in a temporary folder beside ``out`` and move files in only on success.

    On failure the staging folder is removed, and ``out`` is removed too if this run created it,
    so no half-written report or results are ever left behind.
    """

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> Path:
        self.created = not self.out.exists()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self.stage

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.out.mkdir(parents=True, exist_ok=True)
                for item in sorted(self.stage.iterdir()):
                    os.replace(item, self.out / item.name)
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)
            if exc_type is not None and self.created and self.out.exists() and not any(self.out.iterdir()):
                self.out.rmdir()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a single file via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_fingerprint(prep: Prepared, shard_size: int) -> str:
    cfg = prep.config
    return ShardCache.fingerprint({
        "medaudit": __version__, "model": prep.model.sha256, "data": prep.identity.sha256,
        "input": cfg.input.model_dump(mode="json"), "task": cfg.task.model_dump(mode="json"),
        "model_cfg": cfg.model.model_dump(mode="json"), "seed": cfg.audit.seed, "precision": cfg.audit.precision,
        "scenarios": [s.id for s in prep.scenarios], "detectors": [d.name for d in prep.detectors],
        "shard_size": shard_size,
    })


def run_audit(pm: PluginManager, model_path: Path, data_path: Path, config: Config, *, command: str,
              trust_pickle: bool = False, resume: bool = False, junit: Path | None = None,
              progress: bool = False, shard_size: int = 2048,
              log: Callable[[str], None] = lambda msg: None) -> Results:
    """Run a whole audit and write its outputs; returns the results (checks included)."""
    started = time.perf_counter()
    prep = prepare(pm, model_path, data_path, config, trust_pickle)
    cfg = prep.config
    log(f"medaudit {__version__}: {len(prep.scenarios)} scenarios × {len(prep.dataset)} samples on {prep.device}")
    cache_root = cfg.output.dir / ".medaudit-cache"
    cache = ShardCache(cache_root, cache_fingerprint(prep, shard_size))
    if not resume:
        shutil.rmtree(cache.dir, ignore_errors=True)
        cache.dir.mkdir(parents=True)
    extract = default_extractor(prep.model)
    fwd = run_forward(prep.model, extract, prep.dataset, cfg, prep.scenarios, prep.perturbations, prep.device,
                      prep.detectors, cache=cache, shard_size=shard_size, progress=progress)
    if fwd.resumed_shards:
        log(f"resumed {fwd.resumed_shards} completed shard(s) from {cache.dir}")
    assets = {"preview_png": base64.b64encode(preview_for(prep)).decode()}
    results = evaluate(prep, fwd, command, started, assets)
    from .report import render_report

    html = render_report(results, pm)
    with AtomicOutputDir(cfg.output.dir) as stage:
        (stage / "results.json").write_text(dumps(results), encoding="utf-8")
        if cfg.output.report:
            (stage / "report.html").write_text(html, encoding="utf-8")
        if cfg.output.save_predictions:
            save_predictions(stage / "predictions.npz", fwd, prep.dataset, {})
    if junit is not None:
        write_atomic(junit, junit_xml([c.model_dump() for c in results.checks]).encode())
    shutil.rmtree(cache_root, ignore_errors=True)
    return results


def default_extractor(model: LoadedModel) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    return lambda x: (model.module(x), None)


def preview_for(prep: Prepared) -> bytes:
    """The report's example grid: the first sample under every audited perturbation, severities 0..5."""
    from .preview import grid_png_bytes

    image, _ = prep.dataset[0]
    classes = [type(p) for _, p in sorted(prep.perturbations.items())]
    return grid_png_bytes(image, classes, prep.config.audit.seed)
