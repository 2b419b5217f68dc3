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
* :class:`UnitRunner` runs units from their data alone — loading the model and the data set
  through the plugin manager, as ``prepare`` does, once for all the units that share them — for
  an executor that ships units to other processes or machines (one runner per worker process,
  e.g. :class:`medaudit.runner.ray_executor.RayExecutor`); :func:`run_unit` runs one unit on a
  fresh runner.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

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


#: What a unit's loaded state depends on: two units with the same key share the model, data set and
#: detectors (:class:`UnitRunner`). Every unit of one audit has the same key.
_LOAD_KEY = ("model_path", "model_sha256", "model_format", "trust_pickle", "dataset_path", "config", "device",
             "memory_format")


@dataclass
class _Loaded:
    """A unit's model, data set, config and detectors, as :meth:`UnitRunner.run` loaded them."""

    config: Config
    dataset: AuditDataset
    extract: Extractor
    catalogue: dict[str, tuple[str, type[Perturbation]]]
    detectors: dict[str, Detector]  # every detector the installed plugins provide for the config, by name
    owners: dict[object, str]
    device: torch.device


class UnitRunner:
    """Runs units of work from their data alone, in this process, loading once what they share.

    The model, the data set, the extractor and the detectors are loaded by the first unit and kept
    for the next ones that name the same model file (path, sha256, format, ``trust_pickle``), data
    set, config, device and memory format — all the units of one audit — so a worker process that
    runs many units loads once. A unit that names others loads them (the previous ones are
    released first). Running a unit is pure, so the outputs do not depend on what ran before.

    ``threads``: torch's CPU threads while a unit runs, for a worker given a fixed share of a
    machine's cores (None: the unit config's ``audit.threads``); a unit whose outputs depend on the
    count names its own (:attr:`WorkUnit.threads`), which wins.
    """

    def __init__(self, pm: PluginManager | None = None, threads: int | None = None) -> None:
        from ..plugin_manager import get_plugin_manager

        self.pm = pm if pm is not None else get_plugin_manager()
        self.threads = threads
        self._key: tuple[object, ...] | None = None
        self._loaded: _Loaded | None = None

    def run(self, unit: WorkUnit) -> UnitOutputs:
        """Run one unit: the outputs are bit-identical to the audit process's for the same unit on
        the same kind of machine (the unit carries every decision the probe made: output kind,
        memory format, short-chunk padding, chunk size)."""
        loaded = self._load(unit)
        scenarios = scenarios_from_ids(unit.scenarios, loaded.catalogue)
        perturbations = {s.perturbation: loaded.catalogue[s.perturbation][1]() for s in scenarios if s.perturbation}
        missing = [name for name in unit.detectors if name not in loaded.detectors]
        if missing:
            raise ConfigError(f"work unit names detector(s) {missing}, but no installed plugin provides them")
        detectors = [loaded.detectors[name] for name in unit.detectors]
        spec = forward_spec(unit, loaded.config, loaded.extract, detectors, loaded.owners, loaded.device)
        with torch_threads(unit.threads if unit.threads is not None else self._threads(loaded.config)):
            batches = shard_batches(loaded.dataset, unit.start, unit.stop, unit.batch_size, unit.num_workers,
                                    loaded.device)
            with torch.inference_mode():
                return run_shard(batches, unit.start, unit.stop, scenarios, perturbations, spec)

    def _threads(self, config: Config) -> int | Literal["auto"] | None:
        return self.threads if self.threads is not None else config.audit.threads

    def _load(self, unit: WorkUnit) -> _Loaded:
        """The unit's model, data set and detectors: those already loaded when its key is theirs.

        A different model file, or one loaded as another format, is an error rather than
        different numbers."""
        key = tuple(getattr(unit, name) for name in _LOAD_KEY)
        if key == self._key and self._loaded is not None:
            return self._loaded
        self._key = self._loaded = None  # the previous model and data are released before the next load
        # Imported here: medaudit.audit imports this package (prepare plans and runs the units).
        from ..audit import load_model, open_dataset
        from ..features import make_extractor, model_callable

        pm = self.pm
        # the plugins' settings and the task are resolved in this process, by its plugins, as prepare does
        config = resolve_settings(Config.model_validate_json(unit.config), pm)
        bind_task(config, pm.tasks())
        device = torch.device(unit.device)
        with torch_threads(self._threads(config)):
            # role None: an --ood-data set may be unlabelled
            dataset = open_dataset(pm, Path(unit.dataset_path), config, role=None)
            model = load_model(pm, Path(unit.model_path), config, unit.trust_pickle).to(device)
            if (model.format, model.sha256) != (unit.model_format, unit.model_sha256):
                raise ModelError(f"model {unit.model_path} loaded as {model.format} with sha256 {model.sha256[:12]}…, "
                                 f"but the work unit was planned for {unit.model_format} with sha256 "
                                 f"{unit.model_sha256[:12]}…")
            fmt = MEMORY_FORMATS[unit.memory_format]
            if fmt is not None:
                model.module = model.module.to(memory_format=fmt)  # type: ignore[union-attr]
            # a missing layer: the plan has no detector that needs it
            extract, _ = make_extractor(model, config.model.captured_layers())
            catalogue = pm.perturbations()
            owners: dict[object, str] = {name: plugin for name, (plugin, _cls) in catalogue.items()}
            detectors: dict[str, Detector] = {}
            for plugin, ds in pm.call_each("medaudit_detectors", config=config):
                for d in ds:
                    owners[id(d)] = plugin
                    detectors[d.name] = d
            for d in detectors.values():
                if d.needs_model:
                    d.model = input_model(model_callable(model), config, device)
        self._loaded = _Loaded(config, dataset, extract, catalogue, detectors, owners, device)
        self._key = key
        return self._loaded


def run_unit(unit: WorkUnit, pm: PluginManager | None = None) -> UnitOutputs:
    """Run one unit from its data alone on a fresh :class:`UnitRunner`: load the model and the
    data set through the plugin manager (the loaders ``prepare`` uses), rebuild the scenarios and
    detectors, and run the shard (:meth:`UnitRunner.run`). A process that runs many units keeps
    one runner instead, and loads once."""
    return UnitRunner(pm).run(unit)
