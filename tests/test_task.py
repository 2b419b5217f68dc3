"""The task seam: tasks come from plugins (``medaudit_tasks``), the audit keeps what a task declares."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import Tensor

import medaudit.cli as cli_mod
from medaudit.config import Config, TaskConfig, load_config
from medaudit.errors import ConfigError, ModelOutputError, PluginError
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext
from medaudit.plugin_manager import get_plugin_manager
from medaudit.runner import UnitOutputs
from medaudit.runner.store import from_arrays, to_arrays
from medaudit.task import Task, bind_task, check_reduced, read_class_labels

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CONFIG = ROOT / "examples" / "mni-patches.yaml"


class OrdinalTask(Task):
    """A toy third-party task: classes are ordered grades; the audit keeps the expected grade only."""

    name = "ordinal"
    description = "ordered grades; keeps the expected grade under the softmax"
    metric_input = "grade"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def read_targets(self, raw: Any, cfg: TaskConfig, where: str) -> tuple[np.ndarray, list[str]]:
        return read_class_labels(raw, cfg.classes, where)

    def quantities(self, cfg: TaskConfig) -> dict[str, tuple[int, ...]]:
        return {"grade": ()}

    def reduce(self, out: Tensor, kind: str, cfg: TaskConfig) -> dict[str, Tensor]:
        p = torch.softmax(out.float(), dim=1)
        return {"grade": p @ torch.arange(p.shape[1], dtype=p.dtype, device=p.device)}

    def check_outputs(self, outputs: Mapping[str, Tensor], targets: Tensor, weights: Tensor | None = None) -> None:
        if not bool(torch.isfinite(outputs["grade"]).all()):
            raise ValueError("grades must be finite")


class GradeMAE(Metric):
    name = "grade_mae"
    tasks = ("ordinal",)
    higher_is_better = False

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        err = (probs.double() - labels.double()).abs()
        return {"grade_mae": (weights.double() * err).sum(dim=1) / weights.double().sum(dim=1)}


class OrdinalPlugin:
    @hookimpl
    def medaudit_tasks(self) -> list[Task]:
        return [OrdinalTask()]

    @hookimpl
    def medaudit_metrics(self, config: Config) -> list[Metric]:
        return [GradeMAE()]


def _cli(monkeypatch: pytest.MonkeyPatch, extra: list[tuple[str, object]], args: list[str]) -> Any:
    real = cli_mod.get_plugin_manager
    monkeypatch.setattr(cli_mod, "get_plugin_manager", lambda **kw: real(extra=extra, **kw))
    return CliRunner().invoke(cli_mod.cli, args)


def test_hook_medaudit_tasks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "ordinal.yaml"
    cfg.write_text(CONFIG.read_text().replace("type: multiclass", "type: ordinal")
                   .replace('  - "clean.accuracy<0.9"', '  - "clean.grade_mae>2"'))
    out = tmp_path / "out"
    res = _cli(monkeypatch, [("ordinal", OrdinalPlugin())], [
        "run", str(MODEL), "--data", str(DATA), "--config", str(cfg), "--out", str(out), "--quiet",
        "--perturbation", "intensity.gamma", "--severities", "3", "--bootstrap", "20", "--save-predictions"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["task"] == "ordinal"
    assert [s["id"] for s in results["scenarios"]] == ["clean", "intensity.gamma@3"]
    clean = results["scenarios"][0]["metrics"]
    assert set(clean) == {"grade_mae"}  # the classification metrics do not declare this task
    assert results["metric_directions"] == {"grade_mae": False}
    assert "temperature_scaling" not in results["calibration"]
    assert any("did not run: the outputs of the ordinal task are not class scores" in w for w in results["warnings"])
    assert any("subgroup analysis does not apply to a ordinal task" in w for w in results["warnings"])
    # the task's capabilities are recorded, and the report leaves out the views that do not apply
    assert results["model"]["task_capabilities"] == []
    html = (out / "report.html").read_text()
    assert 'id="calibration"' not in html and 'id="subgroups"' not in html

    # The stored quantity is the task's, [S, N]; checked against the model run here by hand.
    preds = np.load(out / "predictions.npz")
    assert "probs" not in preds and preds["grade"].shape == (2, 600)
    with np.load(DATA) as d:
        x = torch.from_numpy(d["images"].astype(np.float32) / 255.0)[:, None]
        labels = d["labels"].astype(np.float64)
    with torch.inference_mode():
        logits = torch.jit.load(str(MODEL))((x - 0.5) / 0.25)
    grade = (torch.softmax(logits.float(), 1) * torch.tensor([0.0, 1.0, 2.0])).sum(1).numpy()
    np.testing.assert_allclose(preds["grade"][0], grade, rtol=1e-5, atol=1e-5)
    assert clean["grade_mae"]["value"] == pytest.approx(float(np.abs(grade - labels).mean()), abs=1e-5)


def test_unknown_task_type_names_the_available_ones(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.read_text().replace("type: multiclass", "type: regression"))
    res = _cli(monkeypatch, [("ordinal", OrdinalPlugin())],
               ["run", str(MODEL), "--data", str(DATA), "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2
    assert "task.type: unknown task 'regression'; available: ['binary', 'embedding', 'multiclass', 'multilabel', 'ordinal', 'segmentation']" in res.output
    assert not (tmp_path / "o").exists()


def test_task_validates_its_config_when_bound() -> None:
    pm = get_plugin_manager(warn=lambda m: None)
    config = Config.model_validate({"task": {"type": "binary", "classes": ["a", "b", "c"]}})
    with pytest.raises(ConfigError, match=r"binary task has 2 classes \(negative, positive\), got 3"):
        bind_task(config, pm.tasks())
    ok = Config.model_validate({"task": {"type": "binary", "classes": ["a", "b"]}})
    assert bind_task(ok, pm.tasks()).name == "binary"


def test_duplicate_task_names_name_both_plugins() -> None:
    pm = get_plugin_manager(extra=[("first", OrdinalPlugin()), ("second", OrdinalPlugin())], autoload=False)
    with pytest.raises(PluginError, match=r'task "ordinal" is provided by two plugins: "first" and "second"'):
        pm.tasks()


def test_builtin_tasks_reduce_outputs_to_hand_computed_probabilities() -> None:
    tasks = {name: t for name, (_p, t) in get_plugin_manager(warn=lambda m: None).tasks().items()}
    two = TaskConfig(type="binary", classes=["n", "p"])
    out = tasks["binary"].reduce(torch.tensor([0.0, 2.0]), "logits", two)["probs"]
    p1 = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(out.numpy(), [[0.5, 0.5], [1 - p1, p1]], rtol=1e-6)
    three = TaskConfig(type="multilabel", classes=["a", "b", "c"])
    ml = tasks["multilabel"].reduce(torch.tensor([[0.0, 0.0, 0.0]]), "logits", three)["probs"]
    assert ml.tolist() == [[0.5, 0.5, 0.5]]  # independent sigmoids, not a softmax
    mc = tasks["multiclass"].reduce(torch.tensor([[0.0, 0.0, 0.0]]), "logits", three.model_copy(update={"type": "multiclass"}))
    np.testing.assert_allclose(mc["probs"].numpy(), [[1 / 3] * 3], rtol=1e-6)
    with pytest.raises(ModelOutputError, match="outputs 2 values per sample but task.classes names 3"):
        tasks["multiclass"].reduce(torch.zeros(4, 2), "logits", three)
    assert tasks["multiclass"].detect_output_kind(torch.tensor([[0.2, 0.8]])) == "probabilities"
    assert tasks["multiclass"].detect_output_kind(torch.tensor([[0.2, 0.9]])) == "logits"
    assert tasks["multilabel"].detect_output_kind(torch.tensor([[0.2, 0.9]])) == "probabilities"


def test_reduce_must_return_what_the_task_declares() -> None:
    cfg = TaskConfig(type="ordinal", classes=["a", "b", "c"])
    task = OrdinalTask()
    check_reduced(task, task.reduce(torch.zeros(5, 3), "logits", cfg), cfg, 5)
    with pytest.raises(PluginError, match=r"reduce returned quantities \['grade', 'probs'\] but quantities\(\) declares \['grade'\]"):
        check_reduced(task, {"grade": torch.zeros(5), "probs": torch.zeros(5, 3)}, cfg, 5)
    with pytest.raises(PluginError, match=r"quantity 'grade' of a batch of 5 is \(5, 1\), declared \[5, \*\(\)\]"):
        check_reduced(task, {"grade": torch.zeros(5, 1)}, cfg, 5)


def test_shard_store_round_trips_any_declared_quantity() -> None:
    shard = UnitOutputs(0, 3, outputs={"grade": {"clean": torch.tensor([0.5, 1.0, 2.0]), "blur@1": torch.zeros(3)},
                                       "probs": {"clean": torch.eye(3), "blur@1": torch.ones(3, 3)}},
                        seconds={"clean": 1.5, "blur@1": 0.5})
    arrays = {k: np.asarray(v) for k, v in to_arrays(shard).items()}  # what the npz file holds
    back = from_arrays(0, 3, arrays)
    assert back is not None
    assert {k: {s: v.tolist() for s, v in d.items()} for k, d in back.outputs.items()} == \
        {"grade": {"clean": [0.5, 1.0, 2.0], "blur@1": [0.0, 0.0, 0.0]},
         "probs": {"clean": torch.eye(3).tolist(), "blur@1": torch.ones(3, 3).tolist()}}
    assert back.seconds == {"clean": 1.5, "blur@1": 0.5}
    assert from_arrays(0, 4, arrays) is None  # another shard layout is recomputed, not misaligned


def test_config_type_is_a_string_checked_against_plugins_not_the_schema() -> None:
    # any name loads; which names exist is known only once plugins are loaded (bind_task)
    assert load_config(None, {"task.type": "ordinal"}).task.type == "ordinal"
    description = Config.model_json_schema()["$defs"]["TaskConfig"]["properties"]["type"]["description"]
    assert "binary | multiclass | multilabel" in description
