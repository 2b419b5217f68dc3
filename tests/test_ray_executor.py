"""The Ray executor: an audit's units on Ray actors give the outputs of one process, also when a
worker is killed mid-audit; without Ray installed it is a config error naming the install line.

The example audit (examples/model.pt on examples/mni-patches, 600 samples) with three scenarios
and every default detector; the units carry real paths, as the workers open them themselves.
Torch runs on one thread here as in each worker: on two busy cores two threads made the local
reference ten times slower, not different.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from medaudit.errors import ConfigError, ModelError
from medaudit.runner import LocalExecutor, RayExecutor, UnitRunner, run_forward, run_unit, torch_threads
from medaudit.runner.device import available_cpus
from medaudit.results import audit_content
from medaudit.runner.merge import ForwardResult
from medaudit.runner.progress import Progress

ray = pytest.importorskip("ray", reason='the Ray executor needs Ray: pip install "medaudit[ray]"')

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CONFIG = ROOT / "examples" / "mni-patches.yaml"


def test_without_ray_the_executor_is_a_config_error_naming_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "medaudit\[ray\]"') as info:
        RayExecutor()
    assert info.value.exit_code == 2


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from medaudit.audit import prepare
    from medaudit.config import load_config
    from medaudit.plugin_manager import get_plugin_manager

    cfg = load_config(ROOT / "examples" / "mni-patches.yaml", {
        "output.dir": str(tmp_path_factory.mktemp("ray") / "o"), "audit.suites": [],
        "audit.perturbations": ["intensity.gamma", "mri.noise"], "audit.severities": [3], "audit.threads": 1})
    prep = prepare(get_plugin_manager(warn=lambda m: None), ROOT / "examples" / "model.pt",
                   ROOT / "examples" / "mni-patches" / "test.npz", cfg)
    assert len(prep.dataset) == 600 and len(prep.scenarios) == 3 and prep.detectors
    return prep


def _forward(prep: Any, executor: Any, shard_size: int) -> ForwardResult:
    with torch_threads(1):
        return run_forward(prep.model, prep.extract, prep.dataset, prep.config, prep.scenarios, prep.perturbations,
                           prep.device, prep.detectors, shard_size=shard_size, owners=prep.owners, executor=executor)


class _Local(dict):  # type: ignore[type-arg]
    """The local executor's result per shard size, computed when first asked for."""

    def __init__(self, prep: Any) -> None:
        super().__init__()
        self.prep = prep

    def __missing__(self, shard_size: int) -> ForwardResult:
        self[shard_size] = _forward(self.prep, LocalExecutor(), shard_size)
        return self[shard_size]


@pytest.fixture(scope="module")
def local(prep: Any) -> _Local:
    return _Local(prep)


def _assert_identical(got: ForwardResult, want: ForwardResult) -> None:
    assert [s.id for s in got.scenarios] == [s.id for s in want.scenarios]
    assert (got.output_kind, got.memory_format, got.pad_last) == (want.output_kind, want.memory_format, want.pad_last)
    assert (got.failures, got.failed_detectors) == (want.failures, want.failed_detectors)
    pairs = [(f"outputs.{k}", got.outputs.get(k), v) for k, v in want.outputs.items()]
    pairs += [(f"embeddings.{k}", got.embeddings.get(k), v) for k, v in want.embeddings.items()]
    pairs += [(f"maps.{k}", got.maps.get(k), v) for k, v in want.maps.items()]
    pairs += [(f"params.{sid}.{k}", got.params.get(sid, {}).get(k), v)
              for sid, p in want.params.items() for k, v in p.items()]
    if want.representation is not None:
        pairs.append(("representation", got.representation, want.representation))
    assert (got.outputs.keys(), got.embeddings.keys(), got.maps.keys()) == \
        (want.outputs.keys(), want.embeddings.keys(), want.maps.keys())
    assert {s: p.keys() for s, p in got.params.items()} == {s: p.keys() for s, p in want.params.items()}
    assert len(want.embeddings) > 1 and any(want.params.values())  # feature and logit detectors, perturbation params
    for name, a, b in pairs:
        assert a is not None and a.dtype == b.dtype and torch.equal(a, b), f"{name} differs from the local executor's"


def test_a_unit_runner_loads_once_for_the_units_of_an_audit(prep: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import medaudit.audit
    from medaudit.runner.store import to_arrays

    loads: list[str] = []
    load_model = medaudit.audit.load_model
    monkeypatch.setattr(medaudit.audit, "load_model", lambda *a, **k: loads.append("model") or load_model(*a, **k))
    runner = UnitRunner()
    units = _units(prep, 256)
    with torch_threads(1):
        outputs = [to_arrays(runner.run(unit)) for unit in units]
        assert loads == ["model"]  # one load for the three units
        again = to_arrays(run_unit(units[1]))  # a fresh runner: loads again, same outputs
        assert loads == ["model", "model"]
        other = json.loads(units[0].config)
        other["audit"]["seed"] += 1
        runner.run(replace(units[0], config=json.dumps(other), seed=other["audit"]["seed"]))  # another config
    assert loads == ["model"] * 3
    assert outputs[1].keys() == again.keys()
    assert all(outputs[1][k].tobytes() == again[k].tobytes() for k in again if not k.startswith("sec|"))


def test_a_unit_runs_at_its_own_thread_count_where_the_outputs_depend_on_it(prep: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a Ray worker of one CPU runs the unit at the audit's count when the dry run found that the
    # model's outputs differ between counts (this session's AMD EPYC: 1 and 2 threads differ)
    import medaudit.runner.executor as executor_module

    seen: list[int] = []
    run_shard = executor_module.run_shard
    monkeypatch.setattr(executor_module, "run_shard",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or run_shard(*a, **k))
    runner = UnitRunner(threads=1)
    unit = _one_unit(prep)
    with torch_threads(1):
        runner.run(replace(unit, threads=2))
        runner.run(replace(unit, threads=None))  # the outputs do not depend on it: the worker's share
    assert seen == [2, 1]


def test_the_planned_units_carry_the_thread_count_unless_the_outputs_do_not_depend_on_it(
        prep: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import medaudit.runner.forward as forward_module
    from medaudit.runner.device import ThreadChoice

    class _Record:
        name = "record"

        def run(self, units, context):  # type: ignore[no-untyped-def]
            self.threads = {u.threads for u in units}
            return LocalExecutor().run(units, context)

    for choice, want in ((ThreadChoice(1, "outputs differ"), {1}), (ThreadChoice(1, "timed", free=True), {None})):
        monkeypatch.setattr(forward_module, "choose_threads", lambda *a, c=choice, **k: c)
        executor = _Record()
        with torch_threads(1):
            run_forward(prep.model, prep.extract, prep.dataset, prep.config, prep.scenarios[:1], prep.perturbations,
                        prep.device, prep.detectors, shard_size=600, owners=prep.owners, executor=executor,
                        on_threads=lambda c: None)
        assert executor.threads == want


def test_a_private_local_cluster_is_started_and_shut_down(prep: Any, local: dict[int, ForwardResult]) -> None:
    assert not ray.is_initialized()  # before the module's shared instance (the next tests)
    executor = RayExecutor()  # address "local", as many workers as CPUs
    _assert_identical(_forward(prep, executor, 256), local[256])
    assert not ray.is_initialized()
    info = executor.cluster_info()
    assert info["workers"] == min(available_cpus(), 3) and info["nodes"] == 1 and info["units_rerun"] == 0
    assert sorted(u["start"] for u in info["units"]) == [0, 256, 512]
    assert all(u["seconds"] > 0 and u["forward_per_s"] > 0 and u["attempts"] == 1 for u in info["units"])
    _assert_gone([p["pid"] for p in info["worker_processes"]])


@pytest.fixture(scope="module")
def cluster() -> Any:
    """One Ray instance for the module's other tests (the executors reuse it, and leave it running)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("shard_size", [96, 256])
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_gives_the_outputs_of_one_process(cluster: Any, prep: Any, local: dict[int, ForwardResult],
                                              workers: int, shard_size: int) -> None:
    executor = RayExecutor(workers=workers)
    _assert_identical(_forward(prep, executor, shard_size), local[shard_size])
    assert cluster.is_initialized()  # not ours to shut down
    info = executor.cluster_info()
    assert info["workers"] == workers and info["cpus"] == workers and info["gpus"] == 0
    assert len({u["pid"] for u in info["units"]}) <= workers and len(info["units"]) == -(-600 // shard_size)
    _assert_gone([p["pid"] for p in info["worker_processes"]])


def _assert_gone(pids: list[int], wait_s: float = 20.0) -> None:
    """The worker processes exit once the audit is done (ray.kill is asynchronous: wait a little)."""
    deadline = time.monotonic() + wait_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if _running(pid)]
    assert not alive, f"Ray worker process(es) {alive} outlived the audit"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) has stopped running too
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


class _KillAfterFirst:
    """The Ray executor, killing (SIGKILL) the worker that completed the first unit as soon as
    it does: that worker holds its next unit, which Ray loses with it."""

    name = "ray"

    def __init__(self, inner: RayExecutor) -> None:
        self.inner, self.killed = inner, 0

    def run(self, units, context):  # type: ignore[no-untyped-def]
        for unit, out in self.inner.run(units, context):
            if not self.killed:
                self.killed = self.inner.cluster_info()["units"][0]["pid"]
                os.kill(self.killed, signal.SIGKILL)
            yield unit, out


def test_a_worker_killed_mid_audit_has_its_unit_run_again_with_the_same_outputs(
        cluster: Any, prep: Any, local: dict[int, ForwardResult]) -> None:
    executor = _KillAfterFirst(RayExecutor(workers=2))
    _assert_identical(_forward(prep, executor, 64), local[64])  # 10 units
    info = executor.inner.cluster_info()
    assert info["units_rerun"] >= 1
    assert len(info["units"]) == 10 and len({u["unit"] for u in info["units"]}) == 10  # each accepted once
    rerun = [u for u in info["units"] if u["attempts"] == 2]
    assert rerun and all(u["pid"] != executor.killed for u in rerun)


def test_the_progress_bar_is_fed_by_completed_units(cluster: Any, prep: Any) -> None:
    context = _context(prep)
    context.progress = Progress(600, 2, False)  # the units' two scenarios
    steps, before = [], 0
    for unit, _ in RayExecutor(workers=2).run(_units(prep, 256), context):
        steps.append((context.progress.passes - before, (unit.stop - unit.start) * len(unit.scenarios)))
        before = context.progress.passes
    assert all(step == size for step, size in steps)  # each unit advances it by its samples × scenarios
    assert len(steps) == 3 and context.progress.passes == 600 * 2 and context.progress.done == 600


def test_a_units_error_in_a_worker_is_the_audits_error(cluster: Any, prep: Any) -> None:
    unit = replace(_one_unit(prep), model_sha256="0" * 64)  # another model file than the one planned for
    with pytest.raises(ModelError, match="work unit was planned for"):
        list(RayExecutor(workers=1).run([unit], _context(prep)))


def test_a_gpu_reserved_or_missing_for_the_audits_device_is_a_config_error(prep: Any) -> None:
    context, unit = _context(prep), _one_unit(prep)
    with pytest.raises(ConfigError, match="stay unused"):
        list(RayExecutor(gpus_per_worker=1).run([unit], context))
    with pytest.raises(ConfigError, match="would have no GPU"):
        list(RayExecutor(gpus_per_worker=0).run([replace(unit, device="cuda:0")], context))
    # unset: one GPU per worker on a GPU audit, none on a CPU audit
    assert RayExecutor()._gpus("cuda:0") == 1 and RayExecutor()._gpus("cpu") == 0
    assert RayExecutor(gpus_per_worker=0.25)._gpus("cuda") == 0.25


def test_a_worker_runs_as_many_loader_processes_as_its_cpus_leave_free_unless_the_user_chose(prep: Any) -> None:
    unit = replace(_one_unit(prep), num_workers=4)  # as the driver's cores decided for audit.num_workers unset
    assert json.loads(unit.config)["audit"]["num_workers"] is None
    assert RayExecutor(cpus_per_worker=1)._loaders_for_worker(unit).num_workers == 0
    assert RayExecutor(cpus_per_worker=3.5)._loaders_for_worker(unit).num_workers == 2
    chosen = json.loads(unit.config)
    chosen["audit"]["num_workers"] = 4
    unit = replace(unit, config=json.dumps(chosen))
    assert RayExecutor(cpus_per_worker=1)._loaders_for_worker(unit).num_workers == 4


def _one_unit(prep: Any) -> Any:
    return _units(prep, 600)[0]


def _units(prep: Any, shard_size: int) -> list[Any]:
    """Units of two of the audit's scenarios, with all its detectors."""
    from medaudit.runner.plan import plan_units
    from medaudit.runner.probe import ModelProbe

    return plan_units(model_path=str(prep.model.path), model_format=prep.model.format, model_sha256=prep.model.sha256,
                      trust_pickle=False, config=prep.config, dataset_path=str(prep.dataset.path), n=600,
                      scenario_ids=["clean", "intensity.gamma@3"], detector_names=[d.name for d in prep.detectors],
                      device="cpu", probe=ModelProbe("logits", "contiguous", False), shard_size=shard_size,
                      num_workers=0)


def _context(prep: Any) -> Any:
    from medaudit.runner.executor import ExecutionContext
    from medaudit.runner.progress import Progress

    return ExecutionContext(prep.config, prep.extract, prep.dataset, prep.scenarios, prep.perturbations,
                            prep.detectors, prep.owners, prep.device, Progress(600, 1, False))


def test_run_with_the_ray_executor_writes_the_local_results(tmp_path: Path) -> None:
    # through medaudit run: the same results.json, whatever the executor, workers or shard size
    from medaudit.audit import run_audit
    from medaudit.config import load_config
    from medaudit.plugin_manager import get_plugin_manager

    pm = get_plugin_manager(warn=lambda m: None)
    base = {"audit.suites": [], "audit.perturbations": ["intensity.gamma"], "audit.severities": [2, 4],
            "audit.bootstrap": 20, "audit.threads": 1}
    runs = {"local": {"audit.executor": "local"},
            "ray-2x256": {"audit.executor": "ray", "audit.ray.workers": 2, "audit.shard_size": 256}}
    views = {}
    for name, extra in runs.items():
        out = tmp_path / name
        results = run_audit(pm, MODEL, DATA, load_config(CONFIG, {**base, **extra, "output.dir": str(out)}), command="x")
        views[name] = audit_content(json.loads((out / "results.json").read_text(encoding="utf-8")))
        if name != "local":
            info = results.environment.executor
            assert info["executor"] == "ray" and info["workers"] == 2 and len(info["units"]) == 3
    assert views["ray-2x256"] == views["local"]
