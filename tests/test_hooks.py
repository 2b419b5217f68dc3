"""Every hook, exercised through the plugin manager with a small in-test plugin.

tests/test_docs.py requires a ``test_hook_<hookname>`` for every hookspec; the catalogue, analysis
and report hooks are exercised inside one real (small) audit so that they are seen where the
audit lifecycle calls them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from medaudit.audit import load_model, open_dataset, run_audit
from medaudit.config import Config, load_config
from medaudit.data import AuditDataset
from medaudit.detector import Detector
from medaudit.errors import PluginError
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext
from medaudit.model import LoadedModel
from medaudit.outputs import AuditOutputs
from medaudit.perturbation import Perturbation, finish, per_sample
from medaudit.plugin_manager import get_plugin_manager
from medaudit.rng import SampleRNG
from medaudit.sections import ReportSection
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]


class Darken(Perturbation):
    name = "hooktest.darken"
    suite = "hooktest"
    summary = "Multiplies intensities by (1 - amount)."
    severities = {s: {"amount": 0.1 * s} for s in range(1, 6)}

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"amount": self.draw(rng, severity, "amount")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return finish(x.float() * (1 - per_sample(params["amount"], x.float())), x)


class ErrorRate(Metric):
    name: ClassVar[str] = "hooktest_error"
    higher_is_better: ClassVar[bool] = False

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        w = weights.double()
        wrong = (probs.argmax(dim=1) != labels).double()
        return {"hooktest_error": (w @ wrong) / w.sum(dim=1)}


class NegMaxLogit(Detector):
    name = "hooktest_negmax"

    def score(self, embeddings: Tensor) -> Tensor:
        return -embeddings.float().amax(dim=1)


class AuditPlugin:
    """Catalogue, analysis and report hooks; records what it was called with."""

    def __init__(self) -> None:
        self.calls: dict[str, Any] = {}

    @hookimpl
    def medaudit_perturbations(self) -> list[type[Perturbation]]:
        return [Darken]

    @hookimpl
    def medaudit_metrics(self, config: Config) -> list[Metric]:
        self.calls["metrics"] = config.task.type
        return [ErrorRate()]

    @hookimpl
    def medaudit_detectors(self, config: Config) -> list[Detector]:
        return [NegMaxLogit()]

    @hookimpl
    def medaudit_analyze(self, outputs: AuditOutputs, config: Config) -> dict[str, Any]:
        self.calls["analyze"] = [s.id for s in outputs.scenarios]
        i = outputs.index("hooktest.darken@3")
        flipped = (outputs.probs[i].argmax(1) != outputs.probs[0].argmax(1)).double().mean()
        return {"hooktest_flip_rate": float(flipped), "warnings": ["hooktest: a warning from medaudit_analyze"]}

    @hookimpl
    def medaudit_report_sections(self, results: dict[str, Any]) -> list[ReportSection]:
        return [ReportSection(id="hooktest-section", title="Hook test <section>",
                              template="<p>flip rate {{ fmt(results.analyses.hooktest_flip_rate) }} {{ note }}</p>",
                              context={"note": "<b>escaped</b>"})]


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> tuple[AuditPlugin, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("audit")
    plugin = AuditPlugin()
    pm = get_plugin_manager(extra=[("hooktest", plugin)], warn=lambda m: None)
    config = load_config(ROOT / "examples" / "mni-patches.yaml", {
        "output.dir": str(out), "audit.suites": [], "audit.perturbations": ["hooktest.darken"],
        "audit.severities": [3], "audit.bootstrap": 20, "audit.detectors": ["hooktest_negmax"],
        "subgroups.attributes": [], "checks": [],
    })
    run_audit(pm, ROOT / "examples" / "model.pt", ROOT / "examples" / "mni-patches" / "test.npz", config, command="test")
    results = json.loads((out / "results.json").read_text())
    return plugin, results, (out / "report.html").read_text()


def test_hook_medaudit_perturbations(audit: tuple[AuditPlugin, dict[str, Any], str]) -> None:
    _, results, _ = audit
    assert [s["id"] for s in results["scenarios"]] == ["clean", "hooktest.darken@3"]
    assert results["scenarios"][1]["params"]["amount"]["mean"] == pytest.approx(0.3)
    pm = get_plugin_manager(extra=[("hooktest", AuditPlugin())], autoload=False)
    assert pm.perturbations() == {"hooktest.darken": ("hooktest", Darken)}


def test_hook_medaudit_metrics(audit: tuple[AuditPlugin, dict[str, Any], str]) -> None:
    plugin, results, _ = audit
    assert plugin.calls["metrics"] == "multiclass"
    clean = results["scenarios"][0]["metrics"]["hooktest_error"]
    assert clean["value"] == pytest.approx(1 - results["scenarios"][0]["metrics"]["accuracy"]["value"])
    assert clean["ci_low"] <= clean["value"] <= clean["ci_high"]
    assert results["metric_directions"]["hooktest_error"] is False


def test_hook_medaudit_detectors(audit: tuple[AuditPlugin, dict[str, Any], str]) -> None:
    _, results, _ = audit
    assert "hooktest_negmax" in json.dumps(results["scenarios"][1]["ood"])


def test_hook_medaudit_analyze(audit: tuple[AuditPlugin, dict[str, Any], str]) -> None:
    plugin, results, _ = audit
    assert plugin.calls["analyze"] == ["clean", "hooktest.darken@3"]
    assert 0.0 <= results["analyses"]["hooktest_flip_rate"] <= 1.0
    assert "hooktest: a warning from medaudit_analyze" in results["warnings"]


def test_hook_medaudit_report_sections(audit: tuple[AuditPlugin, dict[str, Any], str]) -> None:
    _, results, html = audit
    assert 'id="hooktest-section"' in html
    assert "Hook test &lt;section&gt;" in html and "&lt;b&gt;escaped&lt;/b&gt;" in html  # autoescaped
    assert f"flip rate {results['analyses']['hooktest_flip_rate']:.3f}" in html


class ToyDataset(AuditDataset):
    format = "toy"

    def __init__(self, path: Path, config: Config) -> None:
        n = int(path.read_text())
        super().__init__(path, [f"s{i}" for i in range(n)], np.arange(n) % 2, {}, config.input, config.task)

    def read(self, index: int) -> np.ndarray:
        return np.full((1, 4, 4), index, dtype=np.float32)

    def content_hash(self) -> str:
        return "0" * 64


class ToyLoaders:
    @hookimpl
    def medaudit_open_dataset(self, path: Path, config: Config) -> AuditDataset | None:
        return ToyDataset(path, config) if path.suffix == ".toy" else None

    @hookimpl
    def medaudit_load_model(self, path: Path, config: Config, trust_pickle: bool) -> LoadedModel | None:
        if path.suffix != ".toymodel":
            return None
        module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        return LoadedModel(module, path, "toy", "0" * 64, 34, "float32", "toy linear model")


def test_hook_medaudit_open_dataset(tmp_path: Path) -> None:
    pm = get_plugin_manager(extra=[("toy", ToyLoaders())], warn=lambda m: None)
    path = tmp_path / "five.toy"
    path.write_text("5")
    config = Config(task={"type": "binary", "classes": ["a", "b"]})
    ds = open_dataset(pm, path, config)
    assert isinstance(ds, ToyDataset) and len(ds) == 5
    image, index, _ = ds[3]
    assert index == 3 and image.shape == (1, 4, 4)
    # other formats still reach the built-in loaders (firstresult: the first non-None wins)
    npz = tmp_path / "d.npz"
    np.savez(npz, images=np.zeros((2, 4, 4), np.float32), labels=np.array([0, 1]))
    assert type(open_dataset(pm, npz, config)).__name__ == "NpzDataset"


def test_hook_medaudit_load_model(tmp_path: Path) -> None:
    pm = get_plugin_manager(extra=[("toy", ToyLoaders())], warn=lambda m: None)
    path = tmp_path / "m.toymodel"
    path.write_text("weights")
    model = load_model(pm, path, Config(), trust_pickle=False)
    assert model.format == "toy" and model.module(torch.zeros(3, 1, 4, 4)).shape == (3, 2)


class Commands:
    @hookimpl
    def medaudit_register_commands(self, cli: click.Group) -> None:
        @cli.command("hello")
        @click.argument("who")
        def hello(who: str) -> None:
            """Say hello."""
            click.echo(f"hello {who}")


def test_hook_medaudit_register_commands() -> None:
    pm = get_plugin_manager(extra=[("cmds", Commands())], autoload=False)
    group = click.Group("medaudit")
    pm.hook.medaudit_register_commands(cli=group)
    result = CliRunner().invoke(group, ["hello", "plugin"])
    assert result.exit_code == 0 and result.output == "hello plugin\n"


class Failing:
    @hookimpl
    def medaudit_metrics(self, config: Config) -> list[Metric]:
        raise KeyError("n_bins")


def test_a_raising_hook_is_named_during_an_audit(tmp_path: Path) -> None:
    pm = get_plugin_manager(extra=[("failing", Failing())], warn=lambda m: None)
    config = load_config(ROOT / "examples" / "mni-patches.yaml", {"output.dir": str(tmp_path)})
    with pytest.raises(PluginError, match=r"plugin \"failing\" failed in medaudit_metrics: KeyError: 'n_bins'"):
        run_audit(pm, ROOT / "examples" / "model.pt", ROOT / "examples" / "mni-patches" / "test.npz", config, command="t")
