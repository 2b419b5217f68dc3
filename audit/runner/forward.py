"""The forward passes of an audit: probe the model, plan the units, execute, merge."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..config import Config
from ..data import AuditDataset, settle_dims
from ..detector import Detector
from ..features import Extractor
from ..memory import release_free_memory
from ..model import LoadedModel
from ..outputs import Scenario
from ..perturbation import Perturbation
from .batches import auto_workers, iterate_batches
from .device import ThreadChoice, choose_threads, normalisation
from .executor import ExecutionContext, Executor, LocalExecutor
from .merge import ForwardResult, merge_units
from .plan import plan_units
from .probe import chunk_calls, probe_model
from .progress import Progress
from .shard import UnitOutputs
from .store import ShardStore


def run_forward(model: LoadedModel, extract: Extractor, dataset: AuditDataset, config: Config,
                scenarios: list[Scenario], perturbations: dict[str, Perturbation], device: torch.device,
                detectors: Sequence[Detector] = (), cache: ShardStore | None = None, shard_size: int = 2048,
                progress: bool = False, owners: dict[object, str] | None = None,
                executor: Executor | None = None, trust_pickle: bool = False,
                scenarios_per_unit: int | None = None,
                on_threads: Callable[[ThreadChoice], None] | None = None,
                memory_format: str | None = None) -> ForwardResult:
    """Run every scenario over the whole dataset, unit by unit, and merge in index order.

    Units completed by an earlier run are taken from ``cache``; the others go to ``executor``
    (default: :class:`~medaudit.runner.executor.LocalExecutor`), and each one it returns is
    saved to ``cache`` except the last shard (nothing after it could be resumed, and writing it —
    hundreds of MB with feature embeddings — would only delay the end of the audit).
    ``trust_pickle`` is recorded in the units for an executor that loads the model again.
    ``scenarios_per_unit`` splits the scenarios into groups, one unit per group and shard
    (:func:`~medaudit.runner.plan.plan_units`); the results do not depend on it.
    With ``on_threads``, ``audit.threads`` is decided in the dry run
    (:func:`~medaudit.runner.device.choose_threads`), torch's threads are set to it for the rest
    of the process's work (the caller's :func:`~medaudit.runner.device.torch_threads` block
    restores them), and the choice is handed to ``on_threads`` before the passes start.
    ``memory_format`` (the audit's choice, for an extra data set's passes) skips choosing it again.
    """
    settle_dims(dataset, config)  # input.dims: auto in a config built around a data set opened directly
    n = len(dataset)
    mean, std = normalisation(config, device)
    chunk = config.audit.model_batch_size
    first_x, _, first_extras = next(iterate_batches(dataset, 0, min(n, chunk), chunk, 0, False))
    probe = probe_model(model, extract, first_x, n, config, device, mean, std, first_extras, memory_format)
    # the count every unit runs at, unless the outputs are known not to depend on it (an executor
    # that runs units elsewhere then gives its workers their own share of cores)
    unit_threads: int | None = None if device.type != "cpu" else torch.get_num_threads()
    if on_threads is not None:
        threads = choose_threads(config.audit.threads, device,
                                 chunk_calls(extract, first_x, n, config, device, mean, std, probe))
        torch.set_num_threads(threads.threads)
        on_threads(threads)
        unit_threads = None if threads.free else threads.threads
    workers = config.audit.num_workers if config.audit.num_workers is not None else auto_workers(dataset)
    units = plan_units(model_path=str(model.path), model_format=model.format, model_sha256=model.sha256,
                       trust_pickle=trust_pickle, config=config, dataset_path=str(dataset.path), n=n,
                       scenario_ids=[s.id for s in scenarios], detector_names=[d.name for d in detectors],
                       device=str(device), probe=probe, shard_size=shard_size, num_workers=workers,
                       scenarios_per_unit=scenarios_per_unit, threads=unit_threads)
    executor = executor if executor is not None else LocalExecutor()
    outputs: list[UnitOutputs] = []
    resumed = 0
    bar = Progress(n, len(scenarios), progress)
    try:
        todo = []
        for unit in units:
            cached = cache.load(unit) if cache is not None else None
            if cached is None:
                todo.append(unit)
            else:
                outputs.append(cached)
                resumed += 1
                bar.advance(unit.stop - unit.start, len(unit.scenarios))
        context = ExecutionContext(config, extract, dataset, scenarios, perturbations, detectors, owners or {},
                                   device, bar)
        for unit, out in executor.run(todo, context):
            if cache is not None and unit.stop < n:
                cache.save(unit, out)
            outputs.append(out)
            release_free_memory()  # the unit's transients: the next unit faults in only what it needs
    except BaseException:
        if cache is not None:
            cache.flush()  # the completed units are stored when the error reaches the caller
        raise
    bar.close()
    if len(outputs) != len(units):
        raise RuntimeError(f'executor "{executor.name}" returned {len(outputs) - resumed} of the {len(todo)} units it was given')
    return merge_units(outputs, n, scenarios, detectors, probe.output_kind, resumed,
                       "contiguous" if probe.memory_format == "contiguous" else "channels_last", probe.pad_last)
