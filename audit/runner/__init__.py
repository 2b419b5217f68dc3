"""The forward passes: every scenario (clean, perturbation × severity) over the dataset.

The runner plans **units of work** → hands them to an **executor** → **merges** their outputs.

* **Unit of work** (:class:`~medaudit.runner.plan.WorkUnit`): a subset of the scenarios × a
  contiguous shard of sample indices, as plain JSON-serialisable data (model path and format,
  config, dataset path, shard range, scenario ids, seed, and what the model probe decided).
  Running a unit is pure: (scenarios, shard) → per-sample outputs
  (:class:`~medaudit.runner.shard.UnitOutputs`), whatever ran before it and wherever it runs;
  randomness is keyed by sample index, and the model sees fixed chunks aligned to the index, so
  outputs depend neither on the batch size, nor on the shard size, nor on the order of units.
* **Executor** (:class:`~medaudit.runner.executor.Executor`): runs the units and yields their
  outputs in any order. The built-in ``local`` executor runs them in this process on the
  already-loaded model; :class:`~medaudit.runner.executor.UnitRunner` runs units from their data
  alone, loading once per process, for executors that ship units to other processes — ``ray``
  (:class:`~medaudit.runner.ray_executor.RayExecutor`) runs them on the actors of a Ray cluster.
* **Merge** (:mod:`~medaudit.runner.merge`): deterministic, in a fixed order — scenarios in the
  audit's order, then sample index — independent of the order in which units completed.
* **Store** (:class:`~medaudit.runner.store.ShardStore`): completed units, keyed by unit, so
  ``--resume`` reuses them whatever executor ran them; a local folder today.

Modules: ``plan`` (scenarios, units), ``device`` (device, threads and their automatic choice, autocast,
normalisation),
``probe`` (dry run, output kind, memory format, short last chunk), ``batches`` (reading and
prefetching), ``shard`` (the shard loop), ``guard`` (the perturbation output contract),
``executor``, ``ray_executor``, ``store``, ``merge``, ``progress`` and ``forward``
(:func:`run_forward`, the whole sequence). No report or results I/O happens here.
"""

from ..features import Extractor
from .batches import prefetched
from .device import ThreadChoice, choose_threads, select_device, torch_threads
from .executor import ExecutionContext, Executor, LocalExecutor, UnitRunner, run_unit
from .forward import run_forward
from .merge import ForwardResult
from .plan import WorkUnit, plan_scenarios
from .probe import choose_memory_format
from .ray_executor import RayExecutor
from .shard import UnitOutputs
from .store import ShardCache, ShardStore

__all__ = [
    "ExecutionContext", "Executor", "Extractor", "ForwardResult", "LocalExecutor", "RayExecutor", "ShardCache",
    "ShardStore", "ThreadChoice", "UnitOutputs", "UnitRunner", "WorkUnit", "choose_memory_format", "choose_threads",
    "plan_scenarios", "prefetched", "run_forward", "run_unit", "select_device", "torch_threads",
]
