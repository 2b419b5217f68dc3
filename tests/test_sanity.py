"""The preprocessing probe (medaudit.sanity) and the near-chance definition it shares with the
classification plugin (medaudit.scoring)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score

from medaudit.audit import prepare
from medaudit.config import load_config
from medaudit.plugin_manager import get_plugin_manager
from medaudit.sanity import preprocessing_probe, probe_indices
from medaudit.scoring import balanced_accuracy, near_chance

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CONFIG = ROOT / "examples" / "mni-patches.yaml"


def run(args: list[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "medaudit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def reference_score(scale: float, mean: float, std: float) -> float:
    """The example model's balanced accuracy on the probe samples, computed without medaudit:
    (pixel / scale - mean) / std into the TorchScript model, arg-max, scikit-learn's score."""
    with np.load(DATA) as d:
        images, labels = d["images"], d["labels"]
    idx = np.linspace(0, len(labels) - 1, 64).round().astype(int)
    x = (torch.from_numpy(images[idx].astype(np.float32))[:, None] / scale - mean) / std
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's: the example is TorchScript
        pred = torch.jit.load(str(MODEL))(x).argmax(dim=1).numpy()
    return float(balanced_accuracy_score(labels[idx], pred))


def test_near_chance_and_balanced_accuracy_by_hand() -> None:
    assert near_chance(0.6, 2) and not near_chance(0.61, 2)  # 1/2 + 0.1, inclusive
    assert near_chance(1 / 3 + 0.1, 3) and not near_chance(0.44, 3)
    assert not near_chance(math.nan, 3)  # nothing to judge
    # class 0: 1 of 1, class 1: 2 of 3, class 2: 0 of 1 (the class predicted but absent, 3, counts nowhere)
    pred, labels = torch.tensor([0, 0, 1, 1, 3]), torch.tensor([0, 1, 1, 1, 2])
    assert balanced_accuracy(pred, labels) == pytest.approx((1 + 2 / 3 + 0) / 3, abs=1e-15)


def test_probe_samples_are_spread_over_the_data_set() -> None:
    assert probe_indices(600, 2) == [int(round(v)) for v in np.linspace(0, 599, 64)]
    assert probe_indices(10, 2) == list(range(10)) and len(probe_indices(600, 3)) == 16


def test_a_missing_scaling_is_named_on_the_console_in_results_and_in_the_report(tmp_path: Path) -> None:
    # the example's config with raw 0..255 pixels handed to the model (scaling: none): it was trained on /255
    spec = yaml.safe_load(CONFIG.read_text())
    spec["input"]["intensity"] = {"scaling": "none"}
    spec["checks"] = []  # its clean.accuracy<0.9 would fail the run: the alert is what is tested
    config = tmp_path / "wrong.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(config), "--out", str(out), "--quiet",
               "--perturbation", "intensity.gamma", "--severities", "3", "--bootstrap", "20"])
    assert res.returncode == 0, res.stderr  # the audit still runs as configured
    right, as_configured = reference_score(255, 0.5, 0.25), reference_score(1, 0.5, 0.25)
    assert right > 0.9 and as_configured == pytest.approx(1 / 3)
    message = (f"with `input.intensity.scaling: fixed` (max_value 255) the model scores a balanced accuracy of "
               f"{right:.2f} on 64 probe samples ({as_configured:.2f} as configured): check your input spec")
    assert f"medaudit: warning: {message}" in res.stderr
    results = json.loads((out / "results.json").read_text())
    [record] = [w for w in results["warning_records"] if w["code"] == "preprocessing-suspect"]
    assert record["alert"] and record["plugin"] is None and message in record["message"]
    html = (out / "report.html").read_text()
    summary = html[html.index('<section id="summary">'):html.index('<section id="identity">')]
    banner = summary[summary.index('role="alert"'):summary.index("Verdict:")]
    assert "scaling: fixed" in banner and "64 probe samples" in banner


@pytest.fixture(scope="module")
def pm():  # noqa: ANN201
    return get_plugin_manager(warn=lambda m: None)


def probe(pm, overrides: dict | None = None, path: Path | None = CONFIG):  # noqa: ANN001, ANN201
    prep = prepare(pm, MODEL, DATA, load_config(path, overrides))
    return preprocessing_probe(prep.extract, prep.dataset, prep.config, prep.device)


def test_the_correct_spec_raises_nothing(pm) -> None:  # noqa: ANN001
    assert probe(pm) is None


def test_the_default_spec_of_the_issue_points_to_fixed_scaling(pm) -> None:  # noqa: ANN001
    # no config (min-max, mean 0 / std 1): scaling alone cannot fix it, the data's own statistics help
    record = probe(pm, {"input.modality": "mri"}, None)
    assert record is not None and record.alert and record.code == "preprocessing-suspect"
    with np.load(DATA) as d:
        probe_x = d["images"][probe_indices(600, 2)].astype(np.float64) / 255
    mean, std = round(float(probe_x.mean()), 3), round(float(probe_x.std(ddof=1)), 3)
    assert (f"with `input.intensity.scaling: fixed` (max_value 255) and `input.mean: [{mean:g}]`, "
            f"`input.std: [{std:g}]` (the probe samples' own) the model scores a balanced accuracy of "
            f"{reference_score(255, mean, std):.2f} on 64 probe samples (0.33 as configured)") in record.message


def test_tasks_without_arg_max_predictions_are_skipped(pm) -> None:  # noqa: ANN001
    prep = prepare(pm, MODEL, DATA, load_config(CONFIG, {"input.intensity.scaling": "none"}))
    prep.config.task._task = type("Regression", (), {"capabilities": frozenset(), "targets": "class"})()  # no class probabilities
    assert preprocessing_probe(prep.extract, prep.dataset, prep.config, prep.device) is None


def test_a_model_that_fails_on_the_probe_is_left_to_the_dry_run(pm) -> None:  # noqa: ANN001
    prep = prepare(pm, MODEL, DATA, load_config(CONFIG, {"input.intensity.scaling": "none"}))

    def broken(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        raise RuntimeError("shape mismatch")

    assert preprocessing_probe(broken, prep.dataset, prep.config, prep.device) is None
