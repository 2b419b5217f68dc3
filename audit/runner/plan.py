"""Planning the forward passes: the scenarios, and the units of work that cover them.

A :class:`WorkUnit` is plain, JSON-serialisable data: which model file, data set and config,
which sample range (a shard) and which scenarios, and what the model probe decided (output
kind, memory format, short-chunk padding, chunk size). Any process that can read the two files
can run it (:func:`medaudit.runner.executor.run_unit`) and gets the outputs the audit's own
process would get.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..outputs import Scenario
from ..perturbation import Perturbation
from .probe import ModelProbe


def plan_scenarios(config: Config, catalogue: dict[str, tuple[str, type[Perturbation]]]) -> tuple[list[Scenario], dict[str, Perturbation]]:
    """Choose perturbations from the config and expand them to scenarios (clean first).

    ``audit.suites`` selects whole suites; when it is unset, a perturbation is included when its
    ``modalities`` hold ``input.modality`` or ``"any"``. ``audit.perturbations`` adds single
    perturbations, ``audit.exclude`` removes some. Perturbations that do not support
    ``input.dims`` are left out of suites and are an error when named explicitly.
    """
    dims = config.input.dims
    if dims == "auto":  # a plan made before the data were opened would silently leave out every perturbation
        raise RuntimeError("plan_scenarios needs a number in input.dims; with auto, open the data set first "
                           "(medaudit.audit.open_dataset records the dims read from the data)")
    suites = {cls.suite for _, cls in catalogue.values()}
    chosen: dict[str, type[Perturbation]] = {}
    if config.audit.suites is None:
        for name, (_, cls) in catalogue.items():
            if (config.input.modality in cls.modalities or "any" in cls.modalities) and dims in cls.dims:
                chosen[name] = cls
    else:
        unknown = sorted(set(config.audit.suites) - suites)
        if unknown:
            raise ConfigError(f"audit.suites: unknown suite(s) {unknown}; available: {sorted(suites)}")
        for name, (_, cls) in catalogue.items():
            if cls.suite in config.audit.suites and dims in cls.dims:
                chosen[name] = cls
    for name in config.audit.perturbations + config.audit.exclude:
        if name not in catalogue:
            raise ConfigError(f"unknown perturbation {name!r}; `medaudit perturbations` lists them: {sorted(catalogue)}")
    for name in config.audit.perturbations:
        cls = catalogue[name][1]
        if dims not in cls.dims:
            raise ConfigError(f"perturbation {name!r} supports {list(cls.dims)}D images, input.dims is {dims}")
        chosen[name] = cls
    for name in config.audit.exclude:
        chosen.pop(name, None)
    scenarios = [Scenario.clean()]
    for name in sorted(chosen):
        for severity in config.audit.severities:
            scenarios.append(Scenario.perturbed(name, chosen[name].suite, severity))
    return scenarios, {name: cls() for name, cls in sorted(chosen.items())}


def scenarios_from_ids(ids: tuple[str, ...], catalogue: dict[str, tuple[str, type[Perturbation]]]) -> list[Scenario]:
    """The :class:`Scenario` objects of a unit's scenario ids (``clean``, ``<perturbation>@<severity>``)."""
    scenarios = []
    for sid in ids:
        if sid == "clean":
            scenarios.append(Scenario.clean())
            continue
        name, _, severity = sid.rpartition("@")
        if name not in catalogue:
            raise ConfigError(f"work unit names scenario {sid!r}, but no installed plugin provides perturbation {name!r}")
        scenarios.append(Scenario.perturbed(name, catalogue[name][1].suite, int(severity)))
    return scenarios


@dataclass(frozen=True)
class WorkUnit:
    """One unit of work: every scenario of ``scenarios`` on the samples ``start..stop-1``.

    Plain data only (no model, tensor or closure), so it can be written as JSON and run by
    another process; that process loads the model and the data set itself through the plugin
    manager, from ``model_path`` and ``dataset_path`` with ``config``.
    """

    model_path: str
    model_format: str  # the loader's format; another process must load the same kind of model
    model_sha256: str  # and the same file
    trust_pickle: bool
    config: str  # Config.model_dump_json() after prepare (task.classes filled in)
    dataset_path: str
    start: int
    stop: int
    scenarios: tuple[str, ...]  # scenario ids, in the audit's order
    detectors: tuple[str, ...]  # detector names, in the audit's order
    seed: int
    device: str
    output_kind: str
    memory_format: str  # a key of medaudit.runner.probe.MEMORY_FORMATS
    pad_last: bool
    model_batch_size: int  # samples per model call: fixes the numerics
    batch_size: int  # samples loaded and perturbed at once (a multiple of model_batch_size)
    num_workers: int
    part: int = 0  # which group of the audit's scenarios this unit runs (0 when every unit runs all)
    # torch's CPU threads the unit must run at (the audit's, where the model's outputs depend on the
    # count); None: any count gives the same outputs, so the process running it may choose
    threads: int | None = None

    @property
    def key(self) -> str:
        """Names the unit among its audit's units (a store's key with the audit's fingerprint)."""
        return f"{self.start:09d}" if self.part == 0 else f"{self.start:09d}-{self.part}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WorkUnit":
        data: dict[str, Any] = json.loads(text)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown or missing:
            raise ValueError(f"not a medaudit work unit: unknown field(s) {unknown}, missing field(s) {missing}")
        data["scenarios"] = tuple(data["scenarios"])
        data["detectors"] = tuple(data["detectors"])
        return cls(**data)


def plan_units(*, model_path: str, model_format: str, model_sha256: str, trust_pickle: bool, config: Config,
               dataset_path: str, n: int, scenario_ids: list[str], detector_names: list[str], device: str,
               probe: ModelProbe, shard_size: int, num_workers: int,
               scenarios_per_unit: int | None = None, threads: int | None = None) -> list[WorkUnit]:
    """Cover every scenario × the samples ``0..n-1``: shards of ``shard_size`` samples, each
    unit running a group of ``scenarios_per_unit`` consecutive scenarios (None: all of them).

    Loader batches and shards are rounded up to multiples of the model chunk so that chunks
    stay aligned to sample indices whatever the shard. Smaller scenario groups give more, smaller
    units (for executors that spread them over workers); each unit reads and decodes its shard
    itself, so in one process the default — every scenario on one decoded batch — is fastest.
    The outputs are the same for any grouping (the merge places every part by scenario and index).
    ``threads``: see :attr:`WorkUnit.threads`.
    """
    chunk = config.audit.model_batch_size
    batch_size = -(-config.audit.batch_size // chunk) * chunk
    shard_size = -(-shard_size // chunk) * chunk
    size = len(scenario_ids) if scenarios_per_unit is None else scenarios_per_unit
    if size < 1:
        raise ValueError(f"scenarios_per_unit must be at least 1, got {scenarios_per_unit}")
    groups = [tuple(scenario_ids[i : i + size]) for i in range(0, len(scenario_ids), size)] or [()]
    text = config.model_dump_json()
    return [WorkUnit(model_path, model_format, model_sha256, trust_pickle, text, dataset_path, start,
                     min(start + shard_size, n), group, tuple(detector_names), config.audit.seed,
                     device, probe.output_kind, probe.memory_format, probe.pad_last, chunk, batch_size, num_workers,
                     part, threads)
            for start in range(0, n, shard_size) for part, group in enumerate(groups)]
