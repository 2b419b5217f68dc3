"""One audit end to end: config → loaders → runner → results → outputs.

Data flows one way. :func:`prepare` resolves plugins, model, data, scenarios, metrics and
detectors (every input error surfaces here, before any output exists); :func:`run_audit` runs the
forward passes, builds the results (:mod:`medaudit.evaluate`), renders the report and writes
everything atomically (:mod:`medaudit.writing`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checks import Vocabulary, junit_xml, parse_check, validate_checks
from .config import Config
from .data import AuditDataset, DatasetIdentity, settle_dims
from .detector import Detector
from .errors import ConfigError, DataError, ModelError, OutputWidthError, PluginError
from .evaluate import ExternalSet, build_results
from .integrity import seal
from .features import (FeatureChoice, capture_layers, choose_feature_layer, choose_stages, feature_vector, make_extractor,
                       model_callable)
from .metric import Metric
from .model import LoadedModel
from .outputs import Scenario
from .perturbation import Perturbation
from .plugin_manager import PluginManager, catalogue_entry
from .protocols import ProtocolRun, check_metrics, check_plan
from .results import Results, WarningRecord, dumps
from .rng import RNG_VERSION
from .runner.executor import Executor, LocalExecutor, saved_maps
from .runner.shard import REPRESENTATION
from .runner.merge import ForwardResult
from .runner import (Extractor, RayExecutor, ShardCache, ThreadChoice, plan_scenarios, run_forward, select_device,
                     torch_threads)
from .runner.device import input_model, normalisation
from .sanity import preprocessing_probe
from .settings import resolve_settings
from .task import CLASS_PROBABILITIES, OUTPUT_FEATURES, VOXEL_CLASS_SCORES, LabelError, Task, bind_task, task_of
from .timing import PhaseClock, process_age
from .writing import AtomicOutputDir, predictions_arrays, write_atomic


@dataclass
class Prepared:
    pm: PluginManager
    config: Config
    model: LoadedModel
    extract: Extractor
    dataset: AuditDataset
    identity: DatasetIdentity
    scenarios: list[Scenario]
    perturbations: dict[str, Perturbation]
    metrics: list[Metric]
    detectors: list[Detector]
    owners: dict[object, str]
    device: torch.device
    warnings: list[WarningRecord] = field(default_factory=list)
    reference: AuditDataset | None = None
    ood_sets: dict[str, AuditDataset] = field(default_factory=dict)
    protocol: ProtocolRun | None = None


class AuditInterrupted(KeyboardInterrupt):
    """Ctrl-C during an audit; its message says what the shard cache kept, so that ``--resume`` is
    promised only when there is something to resume from."""

    def __init__(self, shards: int, cache_dir: Path) -> None:
        super().__init__(
            f"interrupted; {shards} completed shard(s) are cached in {cache_dir}: run again with --resume to continue"
            if shards else "interrupted before any shard completed; nothing was kept")
        self.shards, self.cache_dir = shards, cache_dir


#: Why a data set in each role needs labels (the role is the option that named it); a role not
#: listed here, ``--ood-data``, is scored against the clean audit data without them.
LABELS_NEEDED = {
    "--data": "every metric compares the model's predictions with them",
    "--reference": "detectors are fitted on it, and the class-conditional ones (mahalanobis) fit one mean per class",
}


def open_dataset(pm: PluginManager, path: Path, config: Config, role: str | None = "--data") -> AuditDataset:
    """Open the data set at ``path`` with the loader plugin that recognises it.

    ``role`` is the option that named it: ``--data`` and ``--reference`` need labels
    (:data:`LABELS_NEEDED`), an ``--ood-data`` set may have none (labels it has are still read
    against the task's classes, but nothing uses them), and None (a unit of work re-opening a data
    set for its forward passes) accepts either. With ``input.dims: auto`` the config is updated
    to the number of spatial dimensions read from the data, before anything else reads it.
    """
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    try:
        dataset = pm.hook.medaudit_open_dataset(path=path, config=config)
    except LabelError as exc:
        if role != "--ood-data":
            raise
        raise DataError(f"{exc}; the labels of an --ood-data set are not used, so leave out its label column "
                        "(or array) to score it unlabelled") from None
    if dataset is None:
        raise DataError(f"{path}: no dataset loader recognises this path; give a .npz file, or a folder or CSV "
                        "with a manifest (path,label,…)")
    if dataset.labels is None and role in LABELS_NEEDED:
        raise DataError(f"{path}: {dataset.unlabelled}; {role} needs labels, because {LABELS_NEEDED[role]} "
                        "(only an --ood-data set may be unlabelled)")
    settle_dims(dataset, config)
    return dataset


def load_model(pm: PluginManager, path: Path, config: Config, trust_pickle: bool) -> LoadedModel:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    model = pm.hook.medaudit_load_model(path=path, config=config, trust_pickle=trust_pickle)
    if model is None:
        raise ModelError(f"{path}: no model loader recognises this file; save it with torch.jit.save, "
                         "torch.export.save, or as a state dict with model.arch set")
    # how its outputs and token layers are read: the config's, whichever loader built it
    model.output_key, model.tokens = config.model.output_key, config.model.tokens
    return model


def _set_name(path: Path, taken: set[str]) -> str:
    base = path.name.removesuffix(".npz").removesuffix(".csv") or "ood"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def _feature_choice(model: LoadedModel, config: Config, dataset: AuditDataset, device: torch.device,
                    warnings: list[WarningRecord]) -> FeatureChoice:
    """Resolve ``model.feature_layer`` and ``model.feature_layers`` (``auto`` by default) on the
    first few samples and record the choice in the config: the rest of the audit (work units
    included) reads the named layers."""
    settle_dims(dataset, config)
    x = _first_batch(dataset, config, device)
    stages_cfg = config.model.feature_layers
    # a list of stages names the feature layer too: its last, deepest entry
    requested = stages_cfg[-1] if isinstance(stages_cfg, list) else config.model.feature_layer
    if requested == "auto" and OUTPUT_FEATURES in task_of(config.task).capabilities:
        # an encoder has no classification head to find the layer by; its embeddings are its features
        config.model = config.model.model_copy(update={"feature_layer": None, "feature_layers": None})
        choice = FeatureChoice(None, "none", note=(
            "an encoder's embeddings are its features: feature-based detectors and the representation measures read "
            "them (name a layer in model.feature_layer to read a block instead)"))
        config.model._feature_choice = choice
        return choice
    try:
        choice = choose_feature_layer(model, requested, x, maps=VOXEL_CLASS_SCORES in task_of(config.task).capabilities)
        if OUTPUT_FEATURES in task_of(config.task).capabilities and choice.layer is not None:
            # an encoder's outputs are embeddings: a weight matrix as wide as them is no class head
            choice = replace(choice, head_name=None, head=None, note=(
                f"an encoder has no classification head ({choice.layer!r} is read as configured)"))
            if stages_cfg == "auto":  # the stages are found by a classifier's head too
                stages_cfg = None
        stages, source, note = choose_stages(model, stages_cfg, choice.layer, x)
        if stages_cfg is None and config.model.feature_layers == "auto":
            note = (f"an encoder has no classification head to find its stages by: multi-layer detectors read "
                    f"{choice.layer!r} alone (list model.feature_layers to read several blocks)")
        choice = replace(choice, stages=stages, stages_source=source, stages_note=note)
    except ConfigError:
        raise
    except Exception as exc:  # the dry run that follows names what the model cannot take
        choice = FeatureChoice(None if requested == "auto" else requested, "none",
                               note=f"the feature layer could not be chosen ({type(exc).__name__}: {exc})")
    if choice.source == "none" and requested == "auto":
        warnings.append(WarningRecord(code="feature-layer-auto", message=choice.note))
    config.model = config.model.model_copy(update={
        "feature_layer": choice.layer, "feature_layers": [name for name, _ in choice.stages] or None})
    config.model._feature_choice = choice
    return choice


def _detectors(pm: PluginManager, config: Config, task: Task, feature_ok: bool, warnings: list[WarningRecord],
               owners: dict[object, str], choice: FeatureChoice | None = None) -> list[Detector]:
    detectors = []
    for plugin, ds in pm.call_each("medaudit_detectors", config=config):
        for d in ds:
            if d.name == REPRESENTATION:
                raise PluginError(f'plugin "{plugin}" offers a detector named {REPRESENTATION!r}, a name medaudit keeps '
                                  "for the representation measures; rename the detector")
            owners[id(d)] = plugin
            detectors.append(d)
    if config.audit.detectors is not None:
        known = {d.name for d in detectors}
        unknown = sorted(set(config.audit.detectors) - known)
        if unknown:
            raise ConfigError(f"audit.detectors: unknown detector(s) {unknown}; available: {sorted(known)}")
        detectors = [d for d in detectors if d.name in config.audit.detectors]
    if not feature_ok:
        why = (choice.note if choice is not None and choice.layer is None and choice.note else
               "model.feature_layer is not set" if config.model.feature_layer in (None, "auto")
               else f"layer {config.model.feature_layer!r} could not be captured")
        skipped: dict[str, list[str]] = {}
        for d in detectors:
            if d.needs in ("features", "stages"):
                skipped.setdefault(owners[id(d)], []).append(d.name)
        for plugin, names in skipped.items():
            warnings.append(WarningRecord(code="feature-detectors-skipped", plugin=plugin, message=(
                f'feature-based detectors {names} of plugin "{plugin}" did not run: {why}')))
        detectors = [d for d in detectors if d.needs not in ("features", "stages")]
    headless: dict[str, list[str]] = {}
    for d in detectors:
        if not d.needs_head:
            continue
        if choice is not None and choice.head is not None:
            d.head = choice.head
        else:
            headless.setdefault(owners[id(d)], []).append(d.name)
    for plugin, names in headless.items():
        why = choice.note if choice is not None and choice.note else "no linear classification head was found"
        warnings.append(WarningRecord(code="head-detectors-skipped", plugin=plugin, message=(
            f'detectors {names} of plugin "{plugin}" did not run: they recompute logits with the model\'s linear '
            f"head, and {why}")))
    detectors = [d for d in detectors if not (d.needs_head and d.head is None)]
    if not (feature_ok and choice is not None and choice.stages):
        stageless: dict[str, list[str]] = {}
        for d in detectors:
            if d.needs == "stages":
                stageless.setdefault(owners[id(d)], []).append(d.name)
        for plugin, names in stageless.items():
            why = (choice.stages_note if choice is not None and choice.stages_note else "model.feature_layers found no layers")
            warnings.append(WarningRecord(code="feature-detectors-skipped", plugin=plugin, message=(
                f'multi-layer detectors {names} of plugin "{plugin}" did not run: {why}')))
        detectors = [d for d in detectors if d.needs != "stages"]
    elif choice is not None:
        for d in detectors:
            if d.needs == "stages":
                d.stages = choice.stages
    if not {CLASS_PROBABILITIES, VOXEL_CLASS_SCORES} & task.capabilities:
        skipped = {}
        for d in detectors:
            if d.needs == "logits":
                skipped.setdefault(owners[id(d)], []).append(d.name)
        for plugin, names in skipped.items():
            warnings.append(WarningRecord(code="output-detectors-skipped", plugin=plugin, message=(
                f'output-based detectors {names} of plugin "{plugin}" did not run: the outputs of the {task.name} '
                "task are not class scores")))
        detectors = [d for d in detectors if d.needs != "logits"]
    return detectors


def represents(config: Config, task: Task) -> bool:
    """Whether the audit measures representation robustness: ``audit.representation`` and a
    feature layer to read (or an encoder, whose outputs are its representation)."""
    return config.audit.representation and (config.model.feature_layer is not None or OUTPUT_FEATURES in task.capabilities)


def _first_batch(dataset: AuditDataset, config: Config, device: torch.device) -> torch.Tensor:
    """The first few samples, normalised, on ``device``: what the feature layer is chosen on."""
    mean, std = normalisation(config, device)
    x = torch.stack([dataset[i][0] for i in range(min(4, len(dataset)))]).to(device)
    return (x - mean) / std


def _metric_keys(metrics: list[Metric]) -> frozenset[str] | None:
    """Every result key the metric families declare (name, ``headline``, ``definitions``); None when
    a family declares none, since its keys are then unknown until it runs (see :class:`Vocabulary`)."""
    if any(not m.headline and not m.definitions for m in metrics):
        return None
    return frozenset(k for m in metrics for k in (m.name, *m.headline, *m.definitions))


def prepare(pm: PluginManager, model_path: Path, data_path: Path, config: Config, trust_pickle: bool = False,
            reference_path: Path | None = None, ood_paths: tuple[Path, ...] = (),
            required_columns: tuple[str, ...] = (), protocol: ProtocolRun | None = None) -> Prepared:
    """Resolve everything an audit needs; every input error is raised here, before any output.

    ``required_columns`` are metadata columns the user asked for by name (``--subgroup``): a
    column the data lacks is an error here, not a warning after the audit. ``protocol``: the
    frozen protocol the config was resolved with (:func:`medaudit.protocols.resolve_protocol`);
    the planned perturbations and the task's metrics are checked against it.
    """
    resolve_settings(config, pm)  # plugin sections and their aliases, before any hook reads them
    warnings = [WarningRecord(code="plugin-load-failed", plugin=f.name, subject=f.name, message=f.message)
                for f in pm.failures]
    warnings += [WarningRecord(code="plugin-hook-problem", plugin=p.name, subject=p.name, message=p.message)
                 for p in pm.problems]
    for expr in config.checks:
        parse_check(expr)  # syntax errors before any work
    task = bind_task(config, pm.tasks())  # an unknown task.type is a config error before any data is read
    if task.needs_reference and reference_path is None:
        raise ConfigError(f"task.type {task.name!r} needs --reference: a labelled clean data set the task's probes are "
                          "fitted on (e.g. the training or a held-out split); the audit data is never used to fit them")
    device = select_device(config.audit.device)
    dataset = open_dataset(pm, data_path, config)
    columns = sorted(dataset.metadata)
    missing = [c for c in required_columns if c not in dataset.metadata]
    if missing:
        raise DataError(f"--subgroup {', '.join(missing)}: not a metadata column of {data_path}; "
                        f"its columns are: {', '.join(columns) or 'none'}")
    if not config.task.classes:
        classes = list(getattr(dataset, "classes", None) or dataset.task.classes)
        config.task = config.task.model_copy(update={"classes": classes})
        warnings.append(WarningRecord(code="classes-inferred",
                                      message=f"task.classes not configured; inferred from the labels: {classes}"))
    if len(config.task.classes) < 2:
        raise ConfigError(f"task.classes must name at least 2 classes, got {config.task.classes}")
    reference = open_dataset(pm, reference_path, config, "--reference") if reference_path is not None else None
    taken: set[str] = set()
    ood_sets = {_set_name(p, taken): open_dataset(pm, p, config, "--ood-data") for p in ood_paths}
    model = load_model(pm, model_path, config, trust_pickle).to(device)
    choice = _feature_choice(model, config, dataset, device, warnings)
    extract, feature_warning = make_extractor(model, config.model.captured_layers())
    if feature_warning and config.model.feature_layers:  # the stages may be what fails: keep the feature layer
        extract, stages_warning = make_extractor(model, config.model.feature_layer)
        if stages_warning is None:
            warnings.append(WarningRecord(code="feature-layer-unavailable", message=feature_warning.replace(
                "feature-based detectors are skipped", "multi-layer detectors read the feature layer alone")))
            config.model = config.model.model_copy(update={"feature_layers": None})
            choice.stages, choice.stages_source, choice.stages_note = (), "none", "the stages could not be captured"
            feature_warning = None
    if feature_warning:
        warnings.append(WarningRecord(code="feature-layer-unavailable", message=feature_warning))
    # an encoder's outputs are features themselves (the runner hands them to the detectors)
    feature_ok = (config.model.feature_layer is not None and feature_warning is None) or OUTPUT_FEATURES in task.capabilities
    if choice.layer is not None and config.model.tokens.pooling == "cls":
        try:
            feature_vector(capture_layers(model, [choice.layer], _first_batch(dataset, config, device)), choice.layer, "cls")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    catalogue = pm.perturbations()
    for provider in sorted({plugin for plugin, _cls in catalogue.values()}):
        warnings += [WarningRecord(code="suite-joined", plugin=provider, message=m)
                     for m in pm.suite_warnings(catalogue, plugin=provider)]
    scenarios, perturbations = plan_scenarios(config, catalogue)
    if protocol is not None:
        protocol = check_plan(protocol, {name: cls.describe() for name, (_p, cls) in catalogue.items() if name in perturbations},
                              int(config.input.dims), allow_override=config.protocol_override)
    unknown_maps = sorted(set(config.output.save_labelmaps) - {s.id for s in scenarios})
    if unknown_maps:
        raise ConfigError(f"output.save_labelmaps: {unknown_maps} are not scenarios of this audit; name scenario ids "
                          f"such as {scenarios[-1].id!r} (clean is always saved)")
    # Which plugin contributed each object, so a failure during the audit can name it.
    owners: dict[object, str] = {name: plugin for name, (plugin, _cls) in catalogue.items()}
    metrics = []
    for plugin, ms in pm.call_each("medaudit_metrics", config=config):
        for m in ms:
            if task.metric_task(config.task) in m.tasks:
                owners[id(m)] = plugin
                metrics.append(m)
    if not metrics:
        raise PluginError("no metric plugin is available for this task; is medaudit installed correctly? (`medaudit plugins`)")
    detectors = _detectors(pm, config, task, feature_ok, warnings, owners, choice)
    for d in detectors:
        if d.needs_model:
            d.model = input_model(model_callable(model), config, device)
    keys = _metric_keys(metrics)
    vocabulary = Vocabulary(
        scenarios=[s.id for s in scenarios] + [f"ood:{n}" for n in ood_sets],
        metrics=None if keys is None else keys | {p + k for p in task.readout_prefixes for k in keys},
        classes=tuple(config.task.classes), detectors=[d.name for d in detectors], columns=columns,
        representation=represents(config, task))
    validate_checks(config.checks, vocabulary)
    if protocol is not None:
        check_metrics(protocol, task.name, vocabulary.metric_known)
        if not protocol.conformant:
            warnings.append(WarningRecord(code="protocol-not-conformant", subject=protocol.protocol.name, message=(
                f"not conformant to protocol {protocol.protocol.name}: overridden {'; '.join(protocol.overrides)} "
                "(--protocol-override); its numbers are not comparable with conformant audits under this protocol")))
    return Prepared(pm, config, model, extract, dataset, dataset.identity(), scenarios, perturbations, metrics,
                    detectors, owners, device, warnings, reference, ood_sets, protocol)


def cache_root(config: Config) -> Path:
    """Where the audit's completed units are kept: ``output.cache_dir``, else a hidden folder in the
    output folder."""
    return config.output.cache_dir if config.output.cache_dir is not None else config.output.dir / ".medaudit-cache"


def cache_fingerprint(prep: Prepared, shard_size: int) -> str:
    cfg = prep.config
    return ShardCache.fingerprint({
        "medaudit": __version__, "rng": RNG_VERSION, "model": prep.model.sha256, "data": prep.identity.sha256,
        "input": cfg.input.model_dump(mode="json"), "task": cfg.task.model_dump(mode="json"),
        "model_cfg": cfg.model.model_dump(mode="json"), "seed": cfg.audit.seed, "precision": cfg.audit.precision,
        "model_batch_size": cfg.audit.model_batch_size, "channels_last": cfg.audit.channels_last,
        # outputs differ in the last bits between device kinds (and "auto" picks the memory format by device)
        "device": prep.device.type,
        "scenarios": [s.id for s in prep.scenarios], "detectors": [d.name for d in prep.detectors],
        "shard_size": shard_size, "maps": sorted(saved_maps(cfg)),
    })


def preview_for(prep: Prepared, left_out: set[str]) -> dict[str, str]:
    """The report's example grid: the first sample under every audited perturbation, severities 0..5.

    Perturbations whose scenarios failed are left out; a grid that cannot be drawn is a warning.
    """
    from .preview import grid_png_bytes

    image, *_ = prep.dataset[0]
    classes = [type(p) for name, p in sorted(prep.perturbations.items()) if name not in left_out]
    try:
        return {"preview_png": base64.b64encode(grid_png_bytes(image, classes, prep.config.audit.seed)).decode()}
    except Exception as exc:  # a figure must not cost the audit its results
        prep.warnings.append(WarningRecord(
            code="preview-failed",
            message=f"the perturbation preview grid could not be drawn ({type(exc).__name__}: {exc})"))
        return {}


def overlays_for(prep: Prepared, fwd: ForwardResult) -> dict[str, str]:
    """The report's overlays of a task whose outputs are maps (:mod:`medaudit.overlays`); a set
    that cannot be drawn is a warning, never a lost audit."""
    from .overlays import overlay_assets

    try:
        return overlay_assets(prep.dataset, prep.config, prep.extract, prep.perturbations, fwd, prep.device)
    except Exception as exc:  # a figure must not cost the audit its results
        prep.warnings.append(WarningRecord(
            code="overlays-failed",
            message=f"the overlays of image, reference and prediction could not be drawn ({type(exc).__name__}: {exc})"))
        return {}


def _owner(prep: Prepared, detector: str) -> str | None:
    return next((prep.owners.get(id(d)) for d in prep.detectors if d.name == detector), None)


def _inferred_classes_error(prep: Prepared, exc: OutputWidthError) -> OutputWidthError:
    """A model narrower than the classes inferred from the labels: name the first row whose label
    the model cannot output (a stray label is the usual cause), not just the two counts."""
    labels = np.asarray(prep.dataset.labels)
    inferred = any(w.code == "classes-inferred" for w in prep.warnings)
    if not inferred or labels.ndim != 1 or exc.width >= exc.n_classes:
        return exc
    beyond = np.flatnonzero(labels >= exc.width)
    if not len(beyond):
        return exc
    first = int(beyond[0])
    return OutputWidthError(
        f"{exc}: task.classes was not set, so the classes were inferred from the labels, and "
        f"{prep.dataset.describe_sample(first)} has label {prep.config.task.classes[labels[first]]!r}, the first of "
        f"{len(beyond)} sample(s) whose label the model's {exc.width} outputs cannot express; fix those labels, or "
        "set task.classes to the model's classes in output order", exc.width, exc.n_classes)


def _clean_only(prep: Prepared, name: str, dataset: AuditDataset, progress: bool, trust_pickle: bool,
                main: ForwardResult) -> ExternalSet:
    """Forward an extra data set on clean inputs only (detector reference or external OOD set), in
    the memory format the audit's own passes ran in (``main``)."""
    fmt = "channels_last_3d" if main.memory_format == "channels_last" and prep.config.input.dims == 3 else main.memory_format
    fwd = run_forward(prep.model, prep.extract, dataset, prep.config, [Scenario.clean()], {}, prep.device,
                      prep.detectors, progress=progress, trust_pickle=trust_pickle, memory_format=fmt)
    labels = None if dataset.labels is None else torch.as_tensor(dataset.labels)
    return ExternalSet(name, dataset.identity(), labels, fwd)


def run_audit(pm: PluginManager, model_path: Path, data_path: Path, config: Config, *, command: str,
              trust_pickle: bool = False, resume: bool = False, junit: Path | None = None,
              reference_path: Path | None = None, ood_paths: tuple[Path, ...] = (), progress: bool = False,
              log: Callable[[str], None] = lambda msg: None,
              config_path: Path | None = None, required_columns: tuple[str, ...] = (),
              protocol: ProtocolRun | None = None, baseline: dict[str, Any] | None = None,
              pdf: bool = False) -> Results:
    """Run a whole audit and write its outputs; returns the results (checks and warning records
    included: ``medaudit run`` prints them).

    ``config_path`` is recorded in results.json; ``required_columns`` and ``protocol``: see
    :func:`prepare`; ``baseline``: another model's results.json (``--baseline``), the denominator of
    the baseline-normalised robustness scores (:mod:`medaudit.scores`); ``pdf``: also print the
    report to report.pdf (needs Chromium). ``output.model_card`` and ``junit`` inside the output
    folder are written with the other outputs; results.json's ``integrity`` covers every file.
    Ctrl-C raises :class:`AuditInterrupted`, which says what the shard cache kept.
    """
    started = time.perf_counter()
    phases = PhaseClock()
    age = process_age()
    if age is not None:
        phases.seconds["startup"] = age
    # the user's choice, for this audit only ("auto" is decided in the dry run, inside this block)
    executor = executor_for(config)  # before any work: a missing Ray is an error now, not after the dry run
    with torch_threads(config.audit.threads):
        prep = prepare(pm, model_path, data_path, config, trust_pickle, reference_path, ood_paths, required_columns,
                       protocol)
        suspect = preprocessing_probe(prep.extract, prep.dataset, prep.config, prep.device)
        if suspect is not None:
            prep.warnings.append(suspect)
        if baseline is not None:
            prep.warnings.extend(baseline_warnings(baseline, prep))
        phases.lap("prepare")
        shard_size = prep.config.audit.shard_size
        cache = ShardCache(cache_root(prep.config), cache_fingerprint(prep, shard_size))
        if not resume:
            shutil.rmtree(cache.dir, ignore_errors=True)
        try:  # from the line that tells the user the forward passes begin
            log(f"medaudit {__version__}: {scenario_count(prep)} of {len(prep.dataset)} samples, on {prep.device}")
            results = _run_prepared(prep, cache, command=command, started=started, phases=phases,
                                    trust_pickle=trust_pickle, junit=junit, progress=progress,
                                    shard_size=shard_size, log=log, config_path=config_path, baseline=baseline,
                                    pdf=pdf, executor=executor)
        except KeyboardInterrupt:
            cache.flush()  # the shard being written when Ctrl-C came is complete, so it counts
            raise AuditInterrupted(len(list(cache.dir.glob("shard-*.npz"))), cache.dir) from None
        return results


#: What an audit writes in its output folder (besides a model card or JUnit file placed there): a
#: previous run's copy of one this run does not write is removed (:class:`AtomicOutputDir`).
OUTPUTS = ("results.json", "report.html", "report.pdf", "tables", "predictions.npz")


def _inside(path: Path, folder: Path) -> str | None:
    """``path`` relative to ``folder`` (``/``-separated) when it lies inside it, else None."""
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


def _model_card_text(results: Results) -> str:
    from .modelcard import model_card

    return json.dumps(model_card(results.model_dump(mode="json")), indent=2, ensure_ascii=False) + "\n"


def executor_for(config: Config) -> Executor:
    """The executor ``audit.executor`` names: this process, or Ray actors (``audit.ray``)."""
    if config.audit.executor == "ray":
        return RayExecutor(**config.audit.ray.model_dump())
    return LocalExecutor()


def baseline_warnings(baseline: dict[str, Any], prep: Prepared) -> list[WarningRecord]:
    """What makes a ``--baseline`` audit a weaker denominator: another test set, or another protocol
    (then the scores divide by numbers measured under other shifts; refused on the command line)."""
    out = []
    sha = baseline.get("dataset", {}).get("sha256")
    if sha != prep.identity.sha256:
        out.append(WarningRecord(code="baseline-data", message=(
            f"the --baseline audit ran on other data (dataset SHA-256 {str(sha)[:12]}, this audit "
            f"{prep.identity.sha256[:12]}): mce_vs_baseline, relative_mce_vs_baseline, be and rbe divide by its errors "
            "on another test set")))
    return out


def scenario_count(prep: Prepared) -> str:
    """``91 scenarios (clean, 90 perturbed from 18 perturbations)``: the number the report's summary
    gives (results.json ``scenarios``, external OOD sets included), with its breakdown."""
    def n(count: int, noun: str) -> str:
        return f"{count} {noun}{'s' if count != 1 else ''}"

    parts = ["clean", f"{len(prep.scenarios) - 1} perturbed from {n(len(prep.perturbations), 'perturbation')}"]
    if prep.ood_sets:
        parts.append(n(len(prep.ood_sets), "external OOD set"))
    return f"{n(len(prep.scenarios) + len(prep.ood_sets), 'scenario')} ({', '.join(parts)})"


def _run_prepared(prep: Prepared, cache: ShardCache, *, command: str, started: float, phases: PhaseClock,
                  trust_pickle: bool, junit: Path | None, progress: bool, shard_size: int,
                  log: Callable[[str], None], config_path: Path | None,
                  baseline: dict[str, Any] | None = None, pdf: bool = False,
                  executor: Executor | None = None) -> Results:
    """The forward passes, results and outputs of a prepared audit (:func:`run_audit`)."""
    cfg = prep.config
    chosen: list[ThreadChoice] = []

    def on_threads(choice: ThreadChoice) -> None:
        chosen.append(choice)
        if cfg.audit.threads == "auto":
            log(f"threads: {choice.threads} ({choice.reason})")

    try:
        fwd = run_forward(prep.model, prep.extract, prep.dataset, cfg, prep.scenarios, prep.perturbations, prep.device,
                          prep.detectors, cache=cache, shard_size=shard_size, progress=progress, owners=prep.owners,
                          trust_pickle=trust_pickle, on_threads=on_threads, executor=executor)
    except OutputWidthError as exc:
        raise _inferred_classes_error(prep, exc) from exc
    prep.warnings.extend([
        *(WarningRecord(code="perturbation-failed", scenario=sid, subject=sid.split("@")[0],
                        plugin=prep.owners.get(sid.split("@")[0]), message=msg) for sid, msg in fwd.failures.items()),
        *(WarningRecord(code="detector-failed", subject=name, plugin=_owner(prep, name), message=msg)
          for name, msg in fwd.failed_detectors.items())])
    prep.detectors = [d for d in prep.detectors if d.name not in fwd.failed_detectors]
    if fwd.resumed_shards:
        log(f"resumed {fwd.resumed_shards} completed shard(s) from {cache.dir}")
    phases.lap("forward")
    reference = (_clean_only(prep, "reference", prep.reference, progress, trust_pickle, fwd)
                 if prep.reference is not None else None)
    ood_sets = [_clean_only(prep, name, ds, progress, trust_pickle, fwd) for name, ds in prep.ood_sets.items()]
    phases.lap("external")
    assets = preview_for(prep, {s.split("@")[0] for s in fwd.failures})
    assets.update(overlays_for(prep, fwd))
    phases.lap("preview")
    catalogue = [catalogue_entry(prep.owners[name], type(prep.perturbations[name])) for name in sorted(prep.perturbations)]
    evaluation = build_results(
        prep.pm, cfg, prep.model, prep.identity, prep.dataset.sample_ids, prep.dataset.labels, prep.dataset.metadata,
        prep.metrics, prep.detectors, prep.owners, catalogue, fwd, prep.device, command, started,
        prep.warnings, reference, ood_sets, assets, phases, token_layouts=getattr(prep.extract, "token_layouts", None),
        baseline=baseline)
    results = evaluation.results
    if config_path is not None:
        results.config_path = str(config_path)
    if prep.protocol is not None:
        results.protocol = prep.protocol.record()
    # environment only: the count never changes a number (choose_threads), nor does who ran the units
    results.environment.threads_reason = chosen[0].reason
    info = getattr(executor, "cluster_info", None)
    results.environment.executor = info() if info is not None else {"executor": cfg.audit.executor}
    from .report import render_report_files

    rendered = render_report_files(results, prep.pm)
    if results.timing is not None:  # results.json only: the report cannot time its own rendering
        results.timing.phases["report"] = time.perf_counter() - phases.last
    out = cfg.output.dir
    card = cfg.output.model_card
    # outputs inside the folder are written in the stage, so that the seal covers them from the start
    staged = {p: _inside(p, out) for p in (card, junit) if p is not None}
    with AtomicOutputDir(out, replaces=OUTPUTS + tuple(r for r in staged.values() if r)) as stage:
        (stage / "results.json").write_text(dumps(results), encoding="utf-8")
        if cfg.output.report:
            (stage / "report.html").write_text(rendered.html, encoding="utf-8")
            if rendered.tables:
                (stage / "tables").mkdir()
                for name, text in rendered.tables.items():
                    (stage / "tables" / name).write_text(text, encoding="utf-8")
            if pdf:
                from .pdf import html_to_pdf

                html_to_pdf(stage / "report.html", stage / "report.pdf")
        if cfg.output.save_predictions:
            buf = io.BytesIO()
            np.savez_compressed(buf, **predictions_arrays(evaluation.outputs, evaluation.external_arrays, fwd.maps, cfg.task))
            (stage / "predictions.npz").write_bytes(buf.getvalue())
        texts = {p: text for p, text in ((card, _model_card_text(results) if card else ""),
                                         (junit, junit_xml([c.model_dump() for c in results.checks]) if junit else ""))
                 if p is not None}
        for p, text in texts.items():
            if staged[p]:
                (stage / staged[p]).parent.mkdir(parents=True, exist_ok=True)
                (stage / staged[p]).write_text(text, encoding="utf-8")
        # sealed before the folder appears: results.json's integrity covers every file above (medaudit.integrity)
        results.integrity = seal(stage)
    outside = [p for p in texts if not staged[p]]
    for p in outside:
        write_atomic(p, texts[p].encode("utf-8"))
    if card is not None and not staged[card]:  # the model card is evidence: its hash joins the seal
        results.integrity = seal(out, extra=[card])
    cache.flush()
    shutil.rmtree(cache.dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # other audits' units (a shared output.cache_dir) stay
        cache.dir.parent.rmdir()
    return results
