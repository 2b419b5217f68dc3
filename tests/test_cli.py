"""End to end through the CLI on the bundled example: outputs, schema, checks, exit codes, atomicity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from medaudit.cli import cli
from medaudit.results import SCHEMA_PATH, VOLATILE_KEYS, json_schema

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CONFIG = ROOT / "examples" / "mni-patches.yaml"
FAST = ["--perturbation", "intensity.gamma", "--perturbation", "mri.noise", "--severities", "1,5", "--bootstrap", "100"]


def run(args: list[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "medaudit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def audit_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "out"
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet",
               "--save-predictions", "--fail-on", "clean.accuracy<0.5", "--junit", str(out.parent / "junit.xml"), *FAST])
    assert res.returncode == 0, res.stderr
    assert f"report:  {out / 'report.html'}" in res.stdout
    return out


def test_outputs_written(audit_out: Path) -> None:
    assert sorted(p.name for p in audit_out.iterdir()) == ["predictions.npz", "report.html", "results.json"]
    assert not list(audit_out.parent.glob(".out.partial-*"))


def test_results_match_schema_and_contract(audit_out: Path) -> None:
    results = json.loads((audit_out / "results.json").read_text())
    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
    assert results["schema_version"] == "1.0"
    assert [s["id"] for s in results["scenarios"]] == [
        "clean", "intensity.gamma@1", "intensity.gamma@5", "mri.noise@1", "mri.noise@5"]
    clean = results["scenarios"][0]
    assert clean["n_samples"] == 600
    acc = clean["metrics"]["accuracy"]
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    assert results["model"]["format"] == "torchscript"
    assert len(results["model"]["sha256"]) == 64
    assert results["dataset"]["class_counts"] == {"csf_other": 200, "grey_matter": 200, "white_matter": 200}
    # the config file's check comes first, then --fail-on's
    assert results["checks"] == [
        {"expr": "clean.accuracy<0.9", "value": acc["value"], "passed": True, "threshold": 0.9, "error": None},
        {"expr": "clean.accuracy<0.5", "value": acc["value"], "passed": True, "threshold": 0.5, "error": None}]
    assert "intensity" in results["environment"]["plugins"]


def test_predictions_npz(audit_out: Path) -> None:
    with np.load(audit_out / "predictions.npz", allow_pickle=False) as d:
        assert d["probs"].shape == (5, 600, 3)
        assert list(d["scenario_ids"]) == ["clean", "intensity.gamma@1", "intensity.gamma@5", "mri.noise@1", "mri.noise@5"]
        assert d["labels"].shape == (600,)
        assert d["sample_ids"].shape == (600,)
        np.testing.assert_allclose(d["probs"].sum(-1), 1.0, atol=1e-5)
        results = json.loads((audit_out / "results.json").read_text())
        acc = (d["probs"][0].argmax(1) == d["labels"]).mean()
        assert abs(acc - results["scenarios"][0]["metrics"]["accuracy"]["value"]) < 1e-9


def test_junit(audit_out: Path) -> None:
    xml = (audit_out.parent / "junit.xml").read_text()
    assert 'tests="2" failures="0"' in xml and 'name="clean.accuracy&lt;0.5"' in xml


def test_same_seed_same_results_whatever_batch_size(audit_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet",
               "--batch-size", "37", "--fail-on", "clean.accuracy<0.5", *FAST])
    assert res.returncode == 0, res.stderr
    a = json.loads((audit_out / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    for key in VOLATILE_KEYS:
        a.pop(key), b.pop(key)
    a["config"]["audit"].pop("batch_size"), b["config"]["audit"].pop("batch_size")
    a["config"]["output"].pop("dir"), b["config"]["output"].pop("dir")
    a["config"]["output"].pop("save_predictions"), b["config"]["output"].pop("save_predictions")
    for s in a["scenarios"] + b["scenarios"]:
        s.pop("throughput")
    assert a == b


def test_failed_check_exits_1(tmp_path: Path) -> None:
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(tmp_path / "o"),
               "--quiet", "--perturbation", "intensity.gamma", "--severities", "5", "--bootstrap", "0",
               "--fail-on", "clean.accuracy>0.5"])
    assert res.returncode == 1
    assert "check FAIL: clean.accuracy>0.5" in res.stdout
    assert (tmp_path / "o" / "report.html").exists()  # the report is still written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fail-on", "clean.accuracy<<0.5"], "not a check"),
        (["--fail-on", "nosuch.accuracy<0.5"], "names no scenario"),
        (["--suite", "nosuchsuite"], "unknown suite"),
        (["--severities", "7"], "audit.severities"),
        (["--device", "tpu"], "audit.device"),
    ],
)
def test_usage_errors_exit_2_and_leave_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "o"
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet",
               "--perturbation", "intensity.gamma", "--severities", "1", "--bootstrap", "0", *args]
              if "--severities" not in args else
              ["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet", *args])
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_model_and_data(tmp_path: Path) -> None:
    res = run(["run", str(tmp_path / "nope.pt"), "--data", str(DATA), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "nope.pt does not exist" in res.stderr
    res = run(["run", str(MODEL), "--data", str(tmp_path / "nodata.npz"), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "nodata.npz does not exist" in res.stderr
    assert not (tmp_path / "o").exists()


def test_debug_shows_traceback(tmp_path: Path) -> None:
    res = run(["--debug", "run", str(tmp_path / "nope.pt"), "--data", str(DATA)])
    assert res.returncode == 2 and "Traceback" in res.stderr


def test_report_rerender_round_trip(audit_out: Path, tmp_path: Path) -> None:
    target = tmp_path / "again.html"
    result = CliRunner().invoke(cli, ["report", str(audit_out / "results.json"), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_text() == (audit_out / "report.html").read_text()


def test_report_rejects_non_results(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text('{"hello": 1}')
    result = CliRunner().invoke(cli, ["report", str(bad)])
    assert result.exit_code == 2 and "not a medaudit results file" in result.output


def test_shipped_schema_is_current() -> None:
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), "run `python -m medaudit.results` to regenerate"


def test_init_and_config_schema(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "m.yaml"
    assert runner.invoke(cli, ["init", str(target)]).exit_code == 0
    again = runner.invoke(cli, ["init", str(target)])
    assert again.exit_code == 2 and "already exists" in again.output
    schema = json.loads(runner.invoke(cli, ["config-schema"]).output)
    assert "audit" in schema["properties"]


def test_plugins_and_perturbations_listing() -> None:
    runner = CliRunner()
    listing = json.loads(runner.invoke(cli, ["plugins", "--json"]).output)
    by_name = {p["name"]: p for p in listing["plugins"]}
    assert by_name["intensity"]["distribution"] == "medaudit"
    assert "intensity.gamma" in by_name["intensity"]["contributes"]["perturbations"]
    assert by_name["intensity"]["api_version"] == 1
    perts = json.loads(runner.invoke(cli, ["perturbations", "--json"]).output)
    gamma = next(p for p in perts if p["name"] == "intensity.gamma")
    assert gamma["suite"] == "intensity" and set(gamma["severities"]) == {"1", "2", "3", "4", "5"}
