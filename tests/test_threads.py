"""CPU threads: results never depend on the count, and ``audit.threads: auto`` chooses it in the dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medaudit.runner import device as device_module
from medaudit.runner.device import choose_threads

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CONFIG = ROOT / "examples" / "mni-patches.yaml"
CPU = torch.device("cpu")

#: Perturbations whose outputs are the same bits at 1 and 2 threads (model chunks of 32: the
#: example's model gives different bits at 1 and 2 threads from chunks of 64 on, see
#: choose_threads). mri.motion is among them: its ~1e-7 differences come with the batch layout,
#: not with the thread count.
SMALL = ["--perturbation", "intensity.gamma", "--perturbation", "mri.noise", "--perturbation", "mri.motion",
         "--severities", "1,5", "--bootstrap", "100", "--model-batch-size", "32", "--quiet"]


def run(args: list[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "medaudit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def numbers(node: object, path: tuple[str, ...] = ()) -> object:
    """Everything but what records the run itself: time, speed (``throughput``), command, output
    folder, environment, the threads setting."""
    skip = {("created_at",), ("command",), ("timing",), ("environment",), ("assets",), ("integrity",),
            ("config", "audit", "threads"),
            ("config", "output", "dir")}
    if isinstance(node, dict):
        return {k: numbers(v, (*path, k)) for k, v in node.items() if (*path, k) not in skip and k != "throughput"}
    if isinstance(node, list):
        return [numbers(v, path) for v in node]
    return node


def test_results_do_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    results = {}
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out),
                   "--threads", str(threads), *SMALL])
        assert res.returncode == 0, res.stderr
        results[threads] = json.loads((out / "results.json").read_text())
        assert results[threads]["environment"]["threads"] == threads
        assert results[threads]["environment"]["threads_reason"] == "audit.threads"
    assert {"mri.motion@1", "mri.motion@5"} <= {s["id"] for s in results[1]["scenarios"]}
    assert numbers(results[1]) == numbers(results[2])  # every value, to the bit


def test_auto_is_the_default_and_says_what_it_chose(tmp_path: Path) -> None:
    out = tmp_path / "auto"
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out),
               *[a for a in SMALL if a != "--quiet"]])
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    assert results["config"]["audit"]["threads"] == "auto"
    line = next(line for line in res.stderr.replace("\r", "\n").splitlines() if line.startswith("threads: "))
    assert line == f"threads: {env['threads']} ({env['threads_reason']})"
    assert "ms/batch" in env["threads_reason"] or env["threads_reason"].startswith("auto: ")
    assert not [w for w in results["warning_records"] if w["code"] == "preprocessing-suspect"]  # the right spec
    bad = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(tmp_path / "b"),
               "--threads", "many"])
    assert bad.returncode == 2 and "audit.threads must be auto or a number" in bad.stderr


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A process on 2 CPUs whose torch default is 1 thread, whatever the machine; restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(device_module, "available_cpus", lambda: 2)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_auto_takes_one_thread_when_more_are_slower(two_cpus: None) -> None:
    def busy_model() -> torch.Tensor:  # as on a machine where another process holds the second core
        time.sleep(0.002 if torch.get_num_threads() == 1 else 0.02)
        return torch.ones(3)

    choice = choose_threads("auto", CPU, [busy_model])
    assert choice.threads == 1 and torch.get_num_threads() == 1  # decided, not set: the caller sets it
    assert choice.reason.startswith("2 CPUs busy: 1 thread ") and " ms/batch vs 2 threads " in choice.reason


def test_auto_takes_all_cpus_when_they_are_faster(two_cpus: None) -> None:
    def model() -> torch.Tensor:
        time.sleep(0.02 if torch.get_num_threads() == 1 else 0.002)
        return torch.ones(3)

    choice = choose_threads("auto", CPU, [model])
    assert choice.threads == 2 and choice.reason.startswith("2 threads ")


def test_auto_does_not_time_a_model_whose_outputs_change_with_the_count(two_cpus: None) -> None:
    calls = []

    def model() -> torch.Tensor:  # the last bits move with the thread count, as oneDNN's do at some shapes
        calls.append(torch.get_num_threads())
        return torch.tensor([1.0 + 1e-7 * torch.get_num_threads()])

    choice = choose_threads("auto", CPU, [lambda: torch.ones(1), model])  # the short last chunk differs
    assert choice.threads == 1 and "outputs differ between 1 and 2 threads" in choice.reason
    assert calls == [1, 2]  # compared once, never timed


def test_settings_other_than_auto_are_not_timed() -> None:
    def never() -> None:
        raise AssertionError("timed")

    assert choose_threads(3, CPU, [never]).threads == 3
    assert choose_threads(None, CPU, [never]).threads == torch.get_num_threads()
    assert choose_threads("auto", torch.device("cuda"), [never]).reason.startswith("auto: the model runs on cuda")
