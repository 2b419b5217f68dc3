"""Running an audit's units of work on a Ray cluster, with the results of one process.

:class:`RayExecutor` (``audit.executor: ray``) hands the units to Ray actors, one per worker;
each actor keeps a :class:`~medaudit.runner.executor.UnitRunner`, so it loads the model and
reads the data set from their paths once, and runs unit after unit. Only the unit's JSON goes
to a worker; its outputs come back as the plain arrays of :func:`~medaudit.runner.store.to_arrays`
and are rebuilt on this side. A unit is a pure function of its data, so the merged results are
those of the local executor (``audit.executor: local``) on the same kind of machine — the same
device type, library versions (checked when a worker starts) and CPU or GPU model.

* ``address="local"`` starts a private Ray instance on this machine for the audit and shuts it
  down at the end: no dashboard, no usage statistics (``RAY_USAGE_STATS_ENABLED=0``); its
  processes talk to each other only. ``"auto"`` joins the cluster this machine belongs to (as ``ray start`` set it
  up), ``"HOST:PORT"`` the cluster whose head listens there (medaudit, its plugins and the same
  torch must be installed on every node, and the model and data paths readable there).
  A Ray already initialised in this process is used as it is.
* A worker that dies (killed, out of memory, its node lost) is restarted by Ray (the actors'
  ``max_restarts=-1``) and given units again once it answers; the units it held are given again
  here, to whichever worker is free first (Ray itself retries none: ``max_task_retries=0``).
  Units are pure, so a re-run gives the same outputs, and nothing counts twice: exactly one
  result per unit is accepted. A unit that loses its worker :data:`MAX_ATTEMPTS` times is an
  error (a unit that kills its worker every time would be re-run for ever).
* :meth:`RayExecutor.cluster_info` describes the run for the report: nodes, workers, CPUs and
  GPUs used, and each unit's seconds and forward passes per second, measured in the workers.

Ray is an optional dependency (``pip install "medaudit[ray]"``), imported only here, when the
executor is created.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError, MedauditError, one_line
from .device import available_cpus
from .executor import ExecutionContext, UnitRunner
from .plan import WorkUnit
from .progress import Progress
from .shard import UnitOutputs
from .store import from_arrays, to_arrays

INSTALL = 'pip install "medaudit[ray]"'

#: Units a worker holds at once: the one it runs and the next, so it never waits for this
#: process between two units; more would only make the last units' spread over workers uneven.
DEPTH = 2

#: Times a unit may lose its worker before the audit stops: a unit that kills its worker every
#: time (out of memory, a crash in a library) would otherwise be re-run for ever.
MAX_ATTEMPTS = 3

#: Seconds the audit waits with no worker running (none started yet, or all being restarted)
#: before it stops: the cluster has no room for one (an autoscaler may need minutes to add a node).
START_TIMEOUT_S = 600.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:  # also when sys.modules["ray"] is None
        raise ConfigError(f"audit.executor ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


class _Worker:
    """One Ray actor: a :class:`UnitRunner` that keeps the model and data set loaded between units.

    torch runs ``threads`` CPU threads (the actor's ``cpus_per_worker``): by default a process
    starts one per core of its machine, so several workers on one machine would each start one
    per core, and every parallel operation would wait for threads the other workers have
    descheduled (on a busy machine that made an audit several times slower, see
    ``audit.threads``).
    """

    def __init__(self, threads: int) -> None:
        self.runner = UnitRunner(threads=threads)

    def info(self) -> dict[str, Any]:
        """Where this worker runs, and the versions that fix its numbers."""
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "medaudit": __version__, "torch": torch.__version__, "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def run(self, text: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Run the unit of ``text`` (its JSON); its outputs as plain arrays, and how long it took."""
        import ray

        unit = WorkUnit.from_json(text)
        if unit.device.startswith("cuda"):  # the GPU Ray gave this actor: the first it sees (CUDA_VISIBLE_DEVICES)
            unit = replace(unit, device="cuda:0")
        t0 = time.perf_counter()
        arrays = to_arrays(self.runner.run(unit))
        seconds = time.perf_counter() - t0
        passes = (unit.stop - unit.start) * len(unit.scenarios)
        return arrays, {"unit": unit.key, "start": unit.start, "stop": unit.stop, "scenarios": len(unit.scenarios),
                        "seconds": seconds, "forward_per_s": passes / max(seconds, 1e-9), "pid": os.getpid(),
                        "node": ray.get_runtime_context().get_node_id()}


class RayExecutor:
    """Runs the units on Ray actors, ``workers`` of them (see the module's description).

    ``workers`` None: as many as the cluster holds — its GPUs / ``gpus_per_worker`` when that is
    above 0 (one per GPU with 1), else its CPUs / ``cpus_per_worker`` — at least one, and never
    more than there are units. Each worker reserves ``cpus_per_worker`` CPUs and
    ``gpus_per_worker`` GPUs (a fraction shares a GPU; None: one when the audit runs on a GPU,
    none on a CPU) and runs torch on ``cpus_per_worker`` threads (rounded, at least 1).
    """

    name = "ray"

    def __init__(self, address: str = "local", workers: int | None = None, gpus_per_worker: float | None = None,
                 cpus_per_worker: float = 1) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"audit.ray.workers must be at least 1, got {workers}")
        if (gpus_per_worker is not None and gpus_per_worker < 0) or cpus_per_worker <= 0:
            raise ConfigError(f"audit.ray: gpus_per_worker must be 0 or more and cpus_per_worker above 0, got "
                              f"{gpus_per_worker} and {cpus_per_worker}")
        self.ray = _import_ray()
        self.address, self.workers = address, workers
        self.gpus_requested, self.cpus_per_worker = gpus_per_worker, cpus_per_worker
        self.gpus_per_worker = gpus_per_worker or 0.0  # decided by the audit's device when None (run)
        self.threads = max(1, round(cpus_per_worker))
        self._info: dict[str, Any] = {}
        self._processes: list[dict[str, Any]] = []  # every worker process that started (restarts included)
        self._units: list[dict[str, Any]] = []  # per unit: seconds, forward passes per second, where it ran
        self._reruns = 0  # units given again because their worker died

    def cluster_info(self) -> dict[str, Any]:
        """The last run, for the report and results: nodes, workers, the CPUs and GPUs they
        reserved, the worker processes (restarts included), and each unit's seconds and forward
        passes (samples × scenarios) per second, measured in its worker (a worker's first unit
        includes loading the model and the data set)."""
        seconds = sum(u["seconds"] for u in self._units)
        passes = sum((u["stop"] - u["start"]) * u["scenarios"] for u in self._units)
        return {**self._info, "nodes": len({p["node"] for p in self._processes}),
                "worker_processes": list(self._processes), "units_rerun": self._reruns,
                "units": list(self._units), "unit_seconds": seconds,
                "forward_per_s": passes / seconds if seconds else None}

    def run(self, units: Sequence[WorkUnit], context: ExecutionContext) -> Iterator[tuple[WorkUnit, UnitOutputs]]:
        self._info = {"executor": self.name, "address": self.address}
        self._processes, self._units, self._reruns = [], [], 0
        if not units:
            return
        self.gpus_per_worker = self._gpus(units[0].device)
        ray = self.ray
        started = self._connect()
        actors: list[Any] = []
        try:
            workers = self._count(len(units), started)
            self._info.update(ray=ray.__version__, workers=workers, cpus_per_worker=self.cpus_per_worker,
                              gpus_per_worker=self.gpus_per_worker, cpus=workers * self.cpus_per_worker,
                              gpus=workers * self.gpus_per_worker, threads_per_worker=self.threads)
            actor_class = ray.remote(_Worker).options(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                                      max_restarts=-1, max_task_retries=0)
            actors = [actor_class.remote(self.threads) for _ in range(workers)]
            yield from self._schedule(actors, [self._loaders_for_worker(u) for u in units], context.progress)
        finally:
            for actor in actors:  # also on an error or Ctrl-C: no worker outlives the audit
                ray.kill(actor, no_restart=True)
            if started:
                ray.shutdown()

    def _loaders_for_worker(self, unit: WorkUnit) -> WorkUnit:
        """The unit with as many data-loading processes as its worker's CPUs leave free.

        ``audit.num_workers`` unset is decided from this machine's cores (:func:`~medaudit.runner.batches.auto_workers`),
        which a worker of one CPU does not have: its loader processes would compete with its
        torch thread. The outputs do not depend on it; a number the user set is kept."""
        if json.loads(unit.config)["audit"].get("num_workers") is not None:
            return unit
        return replace(unit, num_workers=min(unit.num_workers, max(0, math.floor(self.cpus_per_worker) - 1)))

    def _gpus(self, device: str) -> float:
        """GPUs per worker: as asked, or one per worker when the audit runs on a GPU. The workers run
        the units on the audit's device type; a GPU reserved or missing for it is a configuration
        error, found before anything starts."""
        if self.gpus_requested is None:
            return 1.0 if device.startswith("cuda") else 0.0
        if device.startswith("cuda") and self.gpus_requested == 0:
            raise ConfigError(f"the audit runs on {device}, but audit.ray.gpus_per_worker is 0: the Ray workers "
                              "would have no GPU; give each one (gpus_per_worker: 1), or set audit.device: cpu")
        if not device.startswith("cuda") and self.gpus_requested > 0:
            raise ConfigError(f"the audit runs on {device}, so the GPUs audit.ray.gpus_per_worker reserves would "
                              "stay unused; set gpus_per_worker: 0, or audit.device: cuda")
        return self.gpus_requested

    def _connect(self) -> bool:
        """Initialise Ray unless this process already has; True when it was initialised here
        (and is shut down at the end)."""
        ray = self.ray
        if ray.is_initialized():
            return False
        if self.address == "local":
            # a private instance: no dashboard, no usage statistics (ray.init turns them off for a
            # release wheel too; the variable also covers the processes it starts)
            os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
            cpus = max(available_cpus(), math.ceil((self.workers or 1) * self.cpus_per_worker))
            # Ray (2.60 here) tells every new instance on the console that it authenticates its processes
            # by token (kept in ~/.ray); for a private instance that is no news to the user
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=self.address, logging_level=logging.WARNING)
        return True

    def _count(self, n_units: int, private: bool) -> int:
        """How many workers: ``workers``, or as many as the cluster's resources hold; never more
        than the units. A private instance cannot grow, so one that cannot hold them is an error."""
        resources = self.ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        fits = math.floor(cpus / self.cpus_per_worker + 1e-9)
        if self.gpus_per_worker > 0:
            fits = min(fits, math.floor(gpus / self.gpus_per_worker + 1e-9))
        workers = self.workers if self.workers is not None else max(1, fits)
        if private and workers > fits:
            raise ConfigError(f"this machine's Ray has {cpus:g} CPU(s) and {gpus:g} GPU(s): room for {fits} "
                              f"worker(s) with {self.cpus_per_worker:g} CPU(s) and {self.gpus_per_worker:g} GPU(s) "
                              f"each, not {workers}; lower audit.ray.workers or the resources per worker")
        return min(workers, n_units)

    def _schedule(self, actors: list[Any], units: list[WorkUnit],
                  progress: Progress) -> Iterator[tuple[WorkUnit, UnitOutputs]]:
        """Keep every running worker holding up to :data:`DEPTH` units; yield each unit once, as
        it completes; give the units of a worker that died to the others."""
        ray = self.ray
        lost_errors = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                       ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)
        here = {"medaudit": __version__, "torch": torch.__version__}
        texts = [unit.to_json() for unit in units]
        todo = deque(range(len(units)))
        attempts = [0] * len(units)
        done: set[int] = set()
        running: set[int] = set()  # the workers that answered since they (re)started
        pending: dict[Any, tuple[str, int, int]] = {}  # ref -> ("info" | "unit", worker, unit index)
        for a, actor in enumerate(actors):
            pending[actor.info.remote()] = ("info", a, -1)
        idle_since = time.monotonic()
        while len(done) < len(units):
            while todo:
                held = {a: 0 for a in running}
                for kind, a, _ in pending.values():
                    if kind == "unit" and a in held:
                        held[a] += 1
                free = [a for a in sorted(held, key=held.__getitem__) if held[a] < DEPTH]
                if not free:
                    break
                i = todo.popleft()
                pending[actors[free[0]].run.remote(texts[i])] = ("unit", free[0], i)
            timeout = None if running else max(0.0, idle_since + START_TIMEOUT_S - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:
                raise ConfigError(f"no Ray worker has run for {START_TIMEOUT_S:.0f} s: the cluster has no room for one "
                                  f"with {self.cpus_per_worker:g} CPU(s) and {self.gpus_per_worker:g} GPU(s) "
                                  "(`ray status` shows its resources)")
            kind, a, i = pending.pop(ready[0])
            try:
                value = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:  # the unit raised: the audit's error, as one process gives it
                if isinstance(exc.cause, MedauditError):
                    raise exc.cause from exc
                raise
            except lost_errors as exc:  # the worker died: Ray restarts it; its units go to whoever is free
                running.discard(a)
                if not running:
                    idle_since = time.monotonic()
                if kind == "unit":
                    self._reruns += 1
                    attempts[i] += 1
                    unit = units[i]
                    if attempts[i] >= MAX_ATTEMPTS:
                        raise MedauditError(
                            f"the unit of samples {unit.start}..{unit.stop - 1} lost its Ray worker {attempts[i]} "
                            f"times (last: {one_line(exc)}); a worker out of memory is the usual cause: give the "
                            "workers more memory or fewer samples per unit (audit.shard_size)") from exc
                    todo.appendleft(i)
                if not any(k == "info" and b == a for k, b, _ in pending.values()):
                    pending[actors[a].info.remote()] = ("info", a, -1)  # answers once it has restarted
                continue
            if kind == "info":
                theirs = {k: value[k] for k in here}
                if theirs != here:
                    raise ConfigError(f"the Ray worker on {value['host']} runs {theirs}, this process {here}: its "
                                      "outputs could differ; install the same versions on every node")
                self._processes.append(value)
                running.add(a)
                continue
            arrays, stats = value
            if i in done:  # never: a lost unit's result does not arrive; one result per unit, whatever happens
                continue
            done.add(i)
            unit = units[i]
            stats["attempts"] = attempts[i] + 1
            self._units.append(stats)
            # arrays read from Ray's object store are read-only views of it: own them
            owned = {k: v if v.flags.writeable else v.copy() for k, v in arrays.items()}
            out = from_arrays(unit.start, unit.stop, owned)
            assert out is not None  # the worker ran exactly this unit's samples
            progress.advance(unit.stop - unit.start, len(unit.scenarios))
            yield unit, out
