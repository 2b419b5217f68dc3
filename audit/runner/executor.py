"""Executors: who runs the units of work, and where.

An :class:`Executor` takes the planned :class:`~medaudit.runner.plan.WorkUnit`\\ s and yields
``(unit, outputs)`` for each, in any order; the runner stores and merges them
(:mod:`medaudit.runner.merge`), so the audit's results do not depend on the executor. The unit's
contract: running it is a pure function of its plain data, (scenarios, shard) → per-sample
outputs; two runs of the same unit, in this process or another, give bit-identical outputs on
the same kind of machine.

* :class:`LocalExecutor` (``"local"``, the default) runs the units one after the other in this
  process with what :func:`~medaudit.runner.forward.run_forward` has already loaded and probed:
  the audit's shard loop, with its prefetching, buffers and progress.
* :func:`run_unit` runs one unit from its data alone — loading the model and the data set
  through the plugin manager, as ``prepare`` does — for an executor that ships units to other
  processes or machines.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from ..config import Config
from ..data import AuditDataset
from ..detector import Detector
from ..errors import ConfigError, ModelError
from ..features import Extractor
from ..outputs import Scenario
from ..perturbation import Perturbation
from ..settings import resolve_settings
from ..task import bind_task, task_of
from .batches import shard_batches
from .device import input_model, normalisation, torch_threads
from .plan import WorkUnit, scenarios_from_ids
from .probe import MEMORY_FORMATS
from .progress import Progress
from .shard import ForwardSpec, UnitOutputs, run_shard

if TYPE_CHECKING:
    from ..plugin_manager import PluginManager


@dataclass
class ExecutionContext:
    """What the audit's process has loaded for the units: an in-process executor runs on it; one
    that ships units elsewhere uses only ``progress`` (the units load the rest themselves)."""

    config: Config
    extract: Extractor
    dataset: AuditDataset
    scenarios: Sequence[Scenario]
    perturbations: dict[str, Perturbation]
    detectors: Sequence[Detector]
    owners: dict[object, str]
    device: torch.device
    progress: Progress


class Executor(Protocol):
    """Runs units of work; yields each unit with its outputs, in any order, once."""

    name: str

    def run(self, units: Sequence[WorkUnit], context: ExecutionContext) -> Iterator[tuple[WorkUnit, UnitOutputs]]:
        ...


def forward_spec(unit: WorkUnit, config: Config, extract: Extractor, detectors: Sequence[Detector],
                 owners: dict[object, str], device: torch.device) -> ForwardSpec:
    """The shard loop's settings for ``unit``: from the unit's data, the model's extractor and
    the detectors (the only parts that are not plain data)."""
    mean, std = normalisation(config, device)
    return ForwardSpec(extract, task_of(config.task), config.task, unit.output_kind, mean, std, unit.seed,
                       device, config.audit.precision, detectors, unit.model_batch_size, owners, unit.model_path,
                       MEMORY_FORMATS[unit.memory_format], unit.pad_last, saved_maps(config),
                       config.model.feature_layer, tuple(config.model.feature_layers or ()),
                       config.model.tokens.pooling, config.audit.representation)


def saved_maps(config: Config) -> frozenset[str]:
    """The scenarios whose predicted label maps an audit keeps: with ``output.save_predictions``,
    clean and those ``output.save_labelmaps`` names (a task without maps keeps none anyway)."""
    if not config.output.save_predictions:
        return frozenset()
    return frozenset({"clean", *config.output.save_labelmaps})


def _selected(unit: WorkUnit, scenarios: Sequence[Scenario], detectors: Sequence[Detector]) -> tuple[list[Scenario], list[Detector]]:
    ids, names = set(unit.scenarios), set(unit.detectors)
    return [s for s in scenarios if s.id in ids], [d for d in detectors if d.name in names]


class LocalExecutor:
    """The units one after the other in this process, on the audit's loaded model and data."""

    name = "local"

    def run(self, units: Sequence[WorkUnit], context: ExecutionContext) -> Iterator[tuple[WorkUnit, UnitOutputs]]:
        for unit in units:
            scenarios, detectors = _selected(unit, context.scenarios, context.detectors)
            spec = forward_spec(unit, context.config, context.extract, detectors, context.owners, context.device)
            batches = shard_batches(context.dataset, unit.start, unit.stop, unit.batch_size, unit.num_workers,
                                    context.device)
            with torch.inference_mode():
                outputs = run_shard(batches, unit.start, unit.stop, scenarios, context.perturbations, spec,
                                    on_batch=lambda b, k=len(scenarios): context.progress.advance(b, k))
            yield unit, outputs


def run_unit(unit: WorkUnit, pm: PluginManager | None = None) -> UnitOutputs:
    """Run one unit from its data alone: load the model and the data set through the plugin
    manager (the loaders ``prepare`` uses), rebuild the scenarios and detectors, and run the shard.

    The outputs are bit-identical to the audit process's for the same unit on the same kind of
    machine: the unit carries every decision the probe made (output kind, memory format,
    short-chunk padding, chunk size). A different model file, or one loaded as another format,
    is an error rather than different numbers.
    """
    # Imported here: medaudit.audit imports this package (prepare plans and runs the units).
    from ..audit import load_model, open_dataset
    from ..features import make_extractor, model_callable
    from ..plugin_manager import get_plugin_manager

    pm = pm if pm is not None else get_plugin_manager()
    # the plugins' settings and the task are resolved in this process, by its plugins, as prepare does
    config = resolve_settings(Config.model_validate_json(unit.config), pm)
    bind_task(config, pm.tasks())
    device = torch.device(unit.device)
    with torch_threads(config.audit.threads):
        dataset = open_dataset(pm, Path(unit.dataset_path), config, role=None)  # an --ood-data set may be unlabelled
        model = load_model(pm, Path(unit.model_path), config, unit.trust_pickle).to(device)
        if (model.format, model.sha256) != (unit.model_format, unit.model_sha256):
            raise ModelError(f"model {unit.model_path} loaded as {model.format} with sha256 {model.sha256[:12]}…, but the "
                             f"work unit was planned for {unit.model_format} with sha256 {unit.model_sha256[:12]}…")
        fmt = MEMORY_FORMATS[unit.memory_format]
        if fmt is not None:
            model.module = model.module.to(memory_format=fmt)  # type: ignore[union-attr]
        extract, _ = make_extractor(model, config.model.captured_layers())  # a missing layer: the plan has no such detector
        catalogue = pm.perturbations()
        scenarios = scenarios_from_ids(unit.scenarios, catalogue)
        perturbations = {s.perturbation: catalogue[s.perturbation][1]() for s in scenarios if s.perturbation}
        owners: dict[object, str] = {name: plugin for name, (plugin, _cls) in catalogue.items()}
        found: dict[str, Detector] = {}
        for plugin, ds in pm.call_each("medaudit_detectors", config=config):
            for d in ds:
                if d.name in unit.detectors:
                    owners[id(d)] = plugin
                    found[d.name] = d
        missing = [name for name in unit.detectors if name not in found]
        if missing:
            raise ConfigError(f"work unit names detector(s) {missing}, but no installed plugin provides them")
        detectors = [found[name] for name in unit.detectors]
        for d in detectors:
            if d.needs_model:
                d.model = input_model(model_callable(model), config, device)
        spec = forward_spec(unit, config, extract, detectors, owners, device)
        batches = shard_batches(dataset, unit.start, unit.stop, unit.batch_size, unit.num_workers, device)
        with torch.inference_mode():
            return run_shard(batches, unit.start, unit.stop, scenarios, perturbations, spec)
