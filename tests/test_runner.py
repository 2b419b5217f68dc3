"""The runner: per-sample seeding independent of batch and shard size, resume, clear model errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medaudit.config import Config
from medaudit.data import AuditDataset
from medaudit.detector import Detector
from medaudit.errors import ConfigError, ModelError, ModelOutputError
from medaudit.model import LoadedModel
from medaudit.outputs import Scenario
from medaudit.perturbation import Perturbation
from medaudit.plugins.intensity import Gamma
from medaudit.runner import ShardCache, plan_scenarios, run_forward


class ArrayDataset(AuditDataset):
    format = "memory"

    def __init__(self, images: np.ndarray, labels: np.ndarray, config: Config) -> None:
        self.images = images
        super().__init__(Path("memory"), [f"s{i}" for i in range(len(labels))], labels, {}, config.input, config.task)

    def read(self, index: int) -> np.ndarray:
        return self.images[index][None]

    def content_hash(self) -> str:
        return "0" * 64


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _setup(n: int = 23, batch_size: int = 8) -> tuple[Config, ArrayDataset, LoadedModel]:
    cfg = Config.model_validate({
        "task": {"classes": ["a", "b", "c"]},
        "input": {"intensity": {"scaling": "fixed", "max_value": 1.0}},
        "audit": {"batch_size": batch_size, "seed": 5, "device": "cpu", "model_batch_size": 5},
    })
    rng = np.random.default_rng(0)
    images = rng.random((n, 16, 16)).astype(np.float32)
    ds = ArrayDataset(images, rng.integers(0, 3, n), cfg)
    net = TinyNet().eval()
    model = LoadedModel(net, Path("tiny"), "eager", "x", 1, "float32", "TinyNet")
    return cfg, ds, model


def _run(cfg: Config, ds: ArrayDataset, model: LoadedModel, shard_size: int = 2048, cache: ShardCache | None = None):
    scenarios = [Scenario.clean()] + [Scenario.perturbed("intensity.gamma", "intensity", s) for s in (1, 5)]
    return run_forward(model, lambda x: (model.module(x), None), ds, cfg, scenarios, {"intensity.gamma": Gamma()},
                       torch.device("cpu"), cache=cache, shard_size=shard_size)


def test_outputs_do_not_depend_on_batch_or_shard_size() -> None:
    cfg, ds, model = _setup()
    ref = _run(cfg, ds, model)
    assert ref.probs.shape == (3, 23, 3)
    assert torch.allclose(ref.probs.sum(-1), torch.ones(3, 23))
    for bs, shard in ((1, 2048), (5, 7), (23, 10), (64, 15)):
        cfg.audit.batch_size = bs
        other = _run(cfg, ds, model, shard_size=shard)
        torch.testing.assert_close(other.probs, ref.probs, rtol=0, atol=1e-6)
        torch.testing.assert_close(other.params["intensity.gamma@5"]["log_gamma"],
                                   ref.params["intensity.gamma@5"]["log_gamma"], rtol=0, atol=0)


def test_severity_changes_outputs_and_params_are_recorded() -> None:
    cfg, ds, model = _setup()
    res = _run(cfg, ds, model)
    assert not torch.allclose(res.probs[0], res.probs[2])
    lg = res.params["intensity.gamma@5"]["log_gamma"].abs()
    assert lg.shape == (23,)
    assert bool(((lg >= 0.6) & (lg <= 0.8)).all())
    assert res.params["clean"] == {}


def test_channels_last_gives_the_same_predictions() -> None:
    cfg, ds, model = _setup()
    ref = _run(cfg, ds, model)
    cfg.audit.channels_last = True
    seen: list[bool] = []
    net = model.module
    model.module = lambda x: (seen.append(x.is_contiguous(memory_format=torch.channels_last)), net(x))[1]
    other = _run(cfg, ds, model)
    assert seen and all(seen)
    torch.testing.assert_close(other.probs, ref.probs, rtol=0, atol=1e-6)


class FlattensActivations(nn.Module):
    """``view`` of a conv output: needs contiguous activations, so it raises in channels-last."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1))


def test_memory_format_auto_uses_channels_last_on_cpu_with_the_same_predictions() -> None:
    cfg, ds, model = _setup()
    cfg.audit.channels_last = False
    ref = _run(cfg, ds, model)
    assert ref.memory_format == "contiguous"
    assert model.module.conv.weight.is_contiguous()
    cfg.audit.channels_last = "auto"
    auto = _run(cfg, ds, model)
    assert auto.memory_format == "channels_last"
    assert model.module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(auto.probs, ref.probs, rtol=0, atol=1e-6)


def test_memory_format_auto_keeps_a_model_that_cannot_run_channels_last_contiguous() -> None:
    cfg, ds, model = _setup()
    model.module = FlattensActivations().eval()
    with pytest.raises(RuntimeError, match="view"):  # the premise: this model fails in channels-last
        model.module.to(memory_format=torch.channels_last)(torch.rand(2, 1, 16, 16).contiguous(memory_format=torch.channels_last))
    model.module.to(memory_format=torch.contiguous_format)
    res = _run(cfg, ds, model)  # auto (the default)
    assert res.memory_format == "contiguous" and model.module.conv.weight.is_contiguous()
    cfg.audit.channels_last = True  # asked for explicitly, the model's error is reported
    with pytest.raises(ModelError, match="view"):
        _run(cfg, ds, model)


def test_memory_format_auto_leaves_gpu_and_non_module_models_alone() -> None:
    from medaudit.runner import choose_memory_format

    cfg, ds, model = _setup()
    cfg.input.dims = 2  # what run_forward settles input.dims: auto to for these 2-D images; called directly here

    def never(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        raise AssertionError("no probe expected")

    x, mean, std = torch.rand(4, 1, 16, 16), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    assert choose_memory_format(model, never, x, cfg, torch.device("cuda"), mean, std) is None
    assert model.module.conv.weight.is_contiguous()
    cfg.audit.channels_last = True
    assert choose_memory_format(model, never, x, cfg, torch.device("cuda"), mean, std) is torch.channels_last
    model.module = lambda t: t  # not a torch module: nothing to convert
    assert choose_memory_format(model, never, x, cfg, torch.device("cpu"), mean, std) is None
    cfg.audit.channels_last = "auto"
    model.module = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))  # no convolution weights: no probe
    assert choose_memory_format(model, never, x, cfg, torch.device("cpu"), mean, std) is None


def test_seed_changes_the_perturbation() -> None:
    cfg, ds, model = _setup()
    a = _run(cfg, ds, model)
    cfg.audit.seed = 6
    b = _run(cfg, ds, model)
    torch.testing.assert_close(a.probs[0], b.probs[0])  # clean is unaffected
    assert not torch.equal(a.params["intensity.gamma@5"]["log_gamma"], b.params["intensity.gamma@5"]["log_gamma"])


def test_model_is_called_on_aligned_fixed_chunks() -> None:
    cfg, ds, model = _setup()
    shapes: list[int] = []
    net = model.module
    model.module = lambda x: (shapes.append(x.shape[0]), net(x))[1]
    cfg.audit.batch_size = 7  # rounded up to 10 (two chunks of 5)
    res = _run(cfg, ds, model)
    n_scenarios = len(res.scenarios)
    # the dry run, the check that a 3-sample chunk is accepted, then batch by batch every
    # scenario: two chunks of 5 per batch of 10, and the last 3 samples (23 = 4 x 5 + 3) at
    # their own size
    assert shapes[:2] == [5, 3]
    assert shapes[2:] == [5, 5] * n_scenarios + [5, 5] * n_scenarios + [3] * n_scenarios


class FixedBatch(nn.Module):
    """A model exported with a fixed batch dimension: any other batch size raises."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.shapes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(x.shape[0])
        if x.shape[0] != 5:
            raise RuntimeError(f"Got invalid dimensions for input: index 0 got {x.shape[0]}, expected 5")
        return self.net(x)


def test_a_fixed_batch_model_gets_its_last_chunk_zero_padded() -> None:
    cfg, ds, model = _setup()
    ref = _run(cfg, ds, model)
    fixed = FixedBatch(model.module)
    model.module = fixed
    res = _run(cfg, ds, model)
    assert fixed.shapes[:2] == [5, 3]  # the dry run, then the refused short batch
    assert set(fixed.shapes[2:]) == {5}
    torch.testing.assert_close(res.probs, ref.probs, rtol=0, atol=1e-6)
    assert res.probs.shape[1] == 23


def test_results_do_not_depend_on_the_batch_size_with_a_short_last_chunk() -> None:
    outs = []
    for batch_size in (5, 10, 25):
        cfg, ds, model = _setup(batch_size=batch_size)
        outs.append(_run(cfg, ds, model).probs)
    for other in outs[1:]:
        assert torch.equal(other, outs[0])


def test_resume_reuses_completed_shards(tmp_path: Path) -> None:
    cfg, ds, model = _setup()
    cache = ShardCache(tmp_path, "fp")
    first = _run(cfg, ds, model, shard_size=10, cache=cache)
    cache.flush()
    # every shard but the last (after it there is nothing left to resume)
    assert sorted(p.name for p in cache.dir.iterdir()) == ["shard-000000000.npz", "shard-000000010.npz"]
    (cache.dir / "shard-000000010.npz").unlink()  # as if interrupted during the second shard
    again = _run(cfg, ds, model, shard_size=10, cache=cache)
    assert again.resumed_shards == 1
    torch.testing.assert_close(again.probs, first.probs, rtol=0, atol=0)


def test_channel_mismatch_is_explained() -> None:
    cfg, ds, model = _setup()
    model.module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ModelError, match=r"expects 3 channels, data has 1"):
        _run(cfg, ds, model)


def test_wrong_number_of_outputs_is_explained() -> None:
    cfg, ds, model = _setup()
    model.module = nn.Sequential(nn.Flatten(), nn.Linear(256, 5))
    with pytest.raises(ModelError, match=r"outputs 5 values per sample but task.classes names 3"):
        _run(cfg, ds, model)


class NaNOnFifthCall(nn.Module):
    """Calls (chunks of 5, batches of 10): 1 dry run, 2 the short-chunk check, 3-4 clean batch,
    5 first perturbed chunk -> NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = x.mean(dim=(1, 2, 3))[:, None].repeat(1, 3)
        return out * float("nan") if self.calls == 5 else out


def test_nan_output_names_the_scenario() -> None:
    cfg, ds, model = _setup()
    cfg.audit.channels_last = False  # the model counts its calls: no memory-format probe
    model.module = NaNOnFifthCall()
    with pytest.raises(ModelOutputError, match=r"NaN or Inf outputs in scenario intensity\.gamma@1"):
        _run(cfg, ds, model)


def test_plan_scenarios_by_modality_suite_and_name() -> None:
    catalogue = {"intensity.gamma": ("intensity", Gamma)}
    cfg = Config()
    with pytest.raises(RuntimeError, match=r"input\.dims; with auto, open the data set first"):
        plan_scenarios(cfg, catalogue)  # auto would match no perturbation: never plan before the data are opened
    cfg.input.dims = 2
    scenarios, perts = plan_scenarios(cfg, catalogue)
    assert [s.id for s in scenarios] == ["clean"] + [f"intensity.gamma@{s}" for s in range(1, 6)]
    cfg.audit.suites = []
    cfg.audit.perturbations = ["intensity.gamma"]
    cfg.audit.severities = [2, 4]
    scenarios, _ = plan_scenarios(cfg, catalogue)
    assert [s.id for s in scenarios] == ["clean", "intensity.gamma@2", "intensity.gamma@4"]
    cfg.audit.perturbations = ["mri.nonexistent"]
    with pytest.raises(ConfigError, match=r"unknown perturbation 'mri.nonexistent'"):
        plan_scenarios(cfg, catalogue)
    cfg.audit.perturbations = []
    cfg.audit.suites = ["nosuch"]
    with pytest.raises(ConfigError, match=r"unknown suite\(s\) \['nosuch'\]"):
        plan_scenarios(cfg, catalogue)


def test_prefetched_yields_in_order_and_reraises_in_the_consumer() -> None:
    from medaudit.runner import prefetched

    items = [(torch.full((2,), float(i)), torch.tensor([i])) for i in range(7)]
    assert [int(b[1]) for b in prefetched(iter(items))] == list(range(7))

    def broken() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield items[0]
        raise ValueError("sample 3 of data.npz is corrupt")

    got = []
    with pytest.raises(ValueError, match="sample 3 of data.npz is corrupt"):
        for batch in prefetched(broken()):
            got.append(int(batch[1]))
    assert got == [0]
    # a consumer that stops early does not leave the producer blocked on a full queue
    gen = prefetched(iter(items), depth=1)
    next(gen)
    gen.close()


class _LogitDetector(Detector):
    """Embeds the logits, optionally as futures resolved later or with a width that changes."""

    needs = "logits"

    def __init__(self, name: str, as_future: bool = False, widen_after: int | None = None) -> None:
        self.name, self.as_future, self.widen_after, self.calls = name, as_future, widen_after, 0

    def embed(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor | Future[torch.Tensor]:
        self.calls += 1
        emb = logits * 2.0
        if self.widen_after is not None and self.calls > self.widen_after:
            emb = torch.cat([emb, emb], dim=1)
        if self.as_future:
            fut: Future[torch.Tensor] = Future()
            fut.set_result(emb)
            return fut
        return emb

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings[:, 0]


def test_shard_outputs_are_whole_per_sample_arrays_from_tensors_and_futures() -> None:
    cfg, ds, model = _setup(n=23, batch_size=10)
    scenarios = [Scenario.clean(), Scenario.perturbed("intensity.gamma", "intensity", 3)]
    dets = [_LogitDetector("plain"), _LogitDetector("later", as_future=True), _LogitDetector("widens", widen_after=2)]
    fwd = run_forward(model, lambda x: (model.module(x), None), ds, cfg, scenarios, {"intensity.gamma": Gamma()},
                      torch.device("cpu"), detectors=dets, shard_size=20)
    with torch.inference_mode():
        logits = model.module(torch.as_tensor(ds.images)[:, None])
    # Row i of every output is sample i, across batches (10) and shards (20).
    assert torch.allclose(fwd.embeddings["plain"][0], logits * 2.0, atol=1e-6)
    assert torch.equal(fwd.embeddings["later"], fwd.embeddings["plain"])
    assert torch.allclose(fwd.probs[0], torch.softmax(logits, dim=1), atol=1e-6)
    assert fwd.params["intensity.gamma@3"]["log_gamma"].shape == (23,)
    assert not torch.isnan(fwd.params["intensity.gamma@3"]["log_gamma"]).any()
    # An embedding whose width changes between batches drops that detector, named, not the audit.
    assert "widens" not in fwd.embeddings
    assert "per-sample shape (6,) differs from the earlier batches' (3,)" in fwd.failed_detectors["widens"]


def test_merge_writes_each_shard_part_into_one_tensor_and_frees_it() -> None:
    from medaudit.runner import UnitOutputs
    from medaudit.runner.merge import merge_rows

    parts = {sid: torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2) + k for k, sid in enumerate(("a", "b"))}
    shards = [UnitOutputs(lo, hi, outputs={"probs": {sid: p[lo:hi].clone() for sid, p in parts.items()}})
              for lo, hi in ((0, 4), (4, 8), (8, 10))]
    merged = merge_rows({"a": shards, "b": shards}, ["b", "a"], 10, lambda sh, sid: sh.outputs["probs"].pop(sid))
    assert torch.equal(merged, torch.stack([parts["b"], parts["a"]]))
    # every part was taken out of its shard: nothing holds it beside the merged tensor
    assert all(not sh.outputs["probs"] for sh in shards)


def test_merge_refuses_a_scenario_with_missing_rows() -> None:
    from medaudit.runner import UnitOutputs
    from medaudit.runner.merge import merge_rows

    units = [UnitOutputs(0, 4, outputs={"probs": {"a": torch.zeros(4, 2)}}),
             UnitOutputs(8, 10, outputs={"probs": {"a": torch.zeros(2, 2)}})]  # rows 4..8 never ran
    with pytest.raises(RuntimeError, match="hold 6 rows of scenario a, not the 10 samples"):
        merge_rows({"a": units}, ["a"], 10, lambda u, sid: u.outputs["probs"].pop(sid))


@pytest.mark.parametrize("per_unit", [1, 2])
def test_units_of_scenario_subsets_merge_to_the_same_outputs(per_unit: int, tmp_path: Path) -> None:
    cfg, ds, model = _setup()
    dets = [_LogitDetector("plain")]
    scenarios = [Scenario.clean()] + [Scenario.perturbed("intensity.gamma", "intensity", s) for s in (1, 3, 5)]

    def run(executor=None, per=None, cache=None):  # type: ignore[no-untyped-def]
        return run_forward(model, lambda x: (model.module(x), None), ds, cfg, scenarios, {"intensity.gamma": Gamma()},
                           torch.device("cpu"), detectors=dets, shard_size=10, executor=executor,
                           scenarios_per_unit=per, cache=cache)

    whole = run()
    rev = _Reversed()
    split = run(rev, per_unit)
    groups = -(-len(scenarios) // per_unit)
    assert len(rev.given[0]) == 3 * groups  # every scenario group × every shard, run last first
    assert torch.equal(split.probs, whole.probs)
    assert torch.equal(split.embeddings["plain"], whole.embeddings["plain"])
    assert split.params.keys() == whole.params.keys()
    for sid, params in whole.params.items():
        assert all(torch.equal(split.params[sid][k], v) for k, v in params.items())
    # the same grouping resumes from its store; another grouping recomputes instead of mixing units
    cache = ShardCache(tmp_path, "fp")
    run(None, per_unit, cache)
    cache.flush()
    resumed = run(None, per_unit, cache)
    assert resumed.resumed_shards == 2 * groups and torch.equal(resumed.probs, whole.probs)
    regrouped = run(None, None, cache)
    assert regrouped.resumed_shards == 0 and torch.equal(regrouped.probs, whole.probs)


class _Reversed:
    """An executor that runs the units it is given last first, as a pool of workers might finish them."""

    name = "reversed"

    def __init__(self) -> None:
        self.given: list[list[int]] = []

    def run(self, units, context):  # type: ignore[no-untyped-def]
        from medaudit.runner import LocalExecutor

        self.given.append([u.start for u in units])
        yield from LocalExecutor().run(list(units)[::-1], context)


def test_merge_does_not_depend_on_the_order_units_complete_in() -> None:
    cfg, ds, model = _setup()
    dets = [_LogitDetector("plain")]
    scenarios = [Scenario.clean()] + [Scenario.perturbed("intensity.gamma", "intensity", s) for s in (1, 5)]

    def run(executor):  # type: ignore[no-untyped-def]
        return run_forward(model, lambda x: (model.module(x), None), ds, cfg, scenarios, {"intensity.gamma": Gamma()},
                           torch.device("cpu"), detectors=dets, shard_size=10, executor=executor)

    local, rev = run(None), _Reversed()
    other = run(rev)
    assert rev.given == [[0, 10, 20]]
    assert torch.equal(other.probs, local.probs)
    assert torch.equal(other.embeddings["plain"], local.embeddings["plain"])
    assert torch.equal(other.params["intensity.gamma@5"]["log_gamma"], local.params["intensity.gamma@5"]["log_gamma"])
    # and both are the samples in index order: row i is sample i
    with torch.inference_mode():
        logits = model.module(torch.as_tensor(ds.images)[:, None])
    torch.testing.assert_close(local.probs[0], torch.softmax(logits, dim=1), rtol=0, atol=1e-6)


def test_resume_works_for_any_executor(tmp_path: Path) -> None:
    cfg, ds, model = _setup()
    cache = ShardCache(tmp_path, "fp")
    first_executor = _Reversed()
    first = _run_with(cfg, ds, model, cache, first_executor)
    cache.flush()
    # the last shard (20..23) is never stored; the two others were, although they completed last
    assert sorted(p.name for p in cache.dir.iterdir()) == ["shard-000000000.npz", "shard-000000010.npz"]
    again_executor = _Reversed()
    again = _run_with(cfg, ds, model, cache, again_executor)
    assert again_executor.given == [[20]] and again.resumed_shards == 2
    assert torch.equal(again.probs, first.probs)


def _run_with(cfg: Config, ds: ArrayDataset, model: LoadedModel, cache: ShardCache, executor: object):  # type: ignore[no-untyped-def]
    scenarios = [Scenario.clean(), Scenario.perturbed("intensity.gamma", "intensity", 5)]
    return run_forward(model, lambda x: (model.module(x), None), ds, cfg, scenarios, {"intensity.gamma": Gamma()},
                       torch.device("cpu"), cache=cache, shard_size=10, executor=executor)  # type: ignore[arg-type]


def test_work_unit_round_trips_through_json_and_rejects_other_data() -> None:
    from medaudit.runner import WorkUnit

    unit = WorkUnit("m.pt", "torchscript", "ab" * 32, False, '{"audit": {}}', "d.npz", 256, 512,
                    ("clean", "mri.noise@3"), ("msp",), 7, "cpu", "logits", "channels_last", True, 32, 224, 0)
    text = unit.to_json()
    assert json.loads(text)["scenarios"] == ["clean", "mri.noise@3"]  # plain JSON, no pickled objects
    assert WorkUnit.from_json(text) == unit
    data = json.loads(text)
    data["shard"] = 3
    del data["seed"]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['shard'\], missing field\(s\) \['seed'\]"):
        WorkUnit.from_json(json.dumps(data))


class _CapturingExecutor:
    """The local executor, keeping a copy of every unit's outputs as plain arrays."""

    name = "capturing"

    def __init__(self) -> None:
        self.outputs: dict[int, tuple[object, dict[str, np.ndarray]]] = {}

    def run(self, units, context):  # type: ignore[no-untyped-def]
        from medaudit.runner import LocalExecutor
        from medaudit.runner.store import to_arrays

        for unit, out in LocalExecutor().run(units, context):
            self.outputs[unit.start] = (unit, {k: v.copy() for k, v in to_arrays(out).items()})
            yield unit, out


CHILD = """
import sys, numpy as np
from pathlib import Path
from medaudit.runner import WorkUnit, run_unit
from medaudit.runner.store import to_arrays
unit = WorkUnit.from_json(Path(sys.argv[1]).read_text())
np.savez(sys.argv[2], **to_arrays(run_unit(unit)))
"""


def test_a_unit_run_from_json_in_a_fresh_process_gives_bit_identical_outputs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from medaudit.audit import prepare
    from medaudit.config import load_config
    from medaudit.plugin_manager import get_plugin_manager
    from medaudit.runner import WorkUnit

    root = Path(__file__).resolve().parents[1]
    model_path, data_path = root / "examples" / "model.pt", root / "examples" / "mni-patches" / "test.npz"
    cfg = load_config(root / "examples" / "mni-patches.yaml", {
        "output.dir": str(tmp_path / "o"), "audit.suites": [], "audit.perturbations": ["intensity.gamma", "mri.noise"],
        "audit.severities": [3]})
    prep = prepare(get_plugin_manager(warn=lambda m: None), model_path, data_path, cfg)
    assert prep.detectors and any(d.needs == "features" for d in prep.detectors)  # embeddings of both kinds
    executor = _CapturingExecutor()
    run_forward(prep.model, prep.extract, prep.dataset, prep.config, prep.scenarios, prep.perturbations, prep.device,
                prep.detectors, shard_size=256, owners=prep.owners, executor=executor)
    assert sorted(executor.outputs) == [0, 256, 512]
    unit, local = executor.outputs[256]  # a middle shard: nothing about it is "first"
    assert isinstance(unit, WorkUnit) and unit.memory_format == "channels_last"  # the probe's choice travels
    (tmp_path / "unit.json").write_text(unit.to_json())
    env = {k: v for k, v in os.environ.items() if k != "MEDAUDIT_DISABLE_PLUGIN_AUTOLOAD"}
    subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "unit.json"), str(tmp_path / "out.npz")],
                   check=True, env=env, timeout=600)
    with np.load(tmp_path / "out.npz", allow_pickle=False) as f:
        remote = {k: f[k] for k in f.files}
    outputs = sorted(k for k in local if not k.startswith("sec|"))
    assert outputs == sorted(k for k in remote if not k.startswith("sec|"))
    assert any(k.startswith("emb|") for k in outputs) and any(k.startswith("param|") for k in outputs)
    for key in outputs:
        assert local[key].dtype == remote[key].dtype and local[key].shape == remote[key].shape, key
        assert local[key].tobytes() == remote[key].tobytes(), f"{key} differs between the processes"


class _NaNCorner(Perturbation):
    name = "acme.nan_corner"
    suite = "acme"
    severities = {s: {"x": float(s)} for s in range(1, 6)}

    def sample(self, severity, rng, shape):  # type: ignore[no-untyped-def]
        return {}

    def apply(self, x, params):  # type: ignore[no-untyped-def]
        y = x.clone()
        y[:, :, 0, 0] = float("nan")
        return y


class _RefusesNonFinite(nn.Module):
    """A model that checks its input, as some exported models do: it raises on NaN."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("input holds NaN")
        return self.net(x)


def test_a_model_that_raises_on_a_perturbations_nan_does_not_take_the_blame() -> None:
    cfg, ds, model = _setup()
    model.module = _RefusesNonFinite(model.module)
    scenarios = [Scenario.clean(), Scenario.perturbed("acme.nan_corner", "acme", 2),
                 Scenario.perturbed("intensity.gamma", "intensity", 5)]
    perts = {"acme.nan_corner": _NaNCorner(), "intensity.gamma": Gamma()}
    fwd = run_forward(model, lambda x: (model.module(x), None), ds, cfg, scenarios, perts, torch.device("cpu"),
                      owners={"acme.nan_corner": "acme"})
    assert fwd.failures == {"acme.nan_corner@2": 'perturbation "acme.nan_corner" of plugin "acme" returned NaN or '
                                                 "Inf values in scenario acme.nan_corner@2; the scenario is left out"}
    assert [s.id for s in fwd.scenarios] == ["clean", "intensity.gamma@5"]
    assert torch.equal(fwd.probs, _run(cfg, ds, model).probs[[0, 2]])  # the others' numbers are unaffected
