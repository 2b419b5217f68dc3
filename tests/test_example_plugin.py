"""The example third-party plugin, installed as a separate distribution, works end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "medaudit-plugin-example"

pytestmark = pytest.mark.slow


def _env(target: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MEDAUDIT_DISABLE_PLUGIN_AUTOLOAD", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package pip-installed into a private --target folder (no network, no deps)."""
    target = tmp_path_factory.mktemp("site")
    # build from a copy: setuptools writes build/ and *.egg-info next to pyproject.toml
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=False, capture_output=True, text=True, cwd=source.parent)
    assert proc.returncode == 0, proc.stderr
    assert (target / "medaudit_plugin_example" / "__init__.py").is_file()
    return target


def test_plugins_lists_the_example(installed: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "medaudit.cli", "plugins", "--json"], check=False, capture_output=True, text=True,
                          env=_env(installed), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    [row] = [p for p in listing["plugins"] if p["name"] == "example"]
    assert row["distribution"] == "medaudit-plugin-example"
    assert row["version"] == "0.1.0"
    assert row["api_version"] == 1
    assert row["module"] == "medaudit_plugin_example"
    assert row["contributes"]["perturbations"] == ["example.vignetting"]
    assert row["contributes"]["metrics"] == ["example.youden_j"]
    assert "report sections" in row["contributes"]["hooks"]
    assert not [f for f in listing["failed"] if f["name"] == "example"]


def test_audit_uses_the_example_plugin(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medaudit.cli", "run", "examples/model.pt", "--data", "examples/mni-patches/test.npz",
         "--config", "examples/mni-patches.yaml", "--perturbation", "example.vignetting", "--severities", "1,5",
         "--bootstrap", "50", "--out", str(out), "--quiet"],
        check=False, capture_output=True, text=True, env=_env(installed), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    ids = [s["id"] for s in results["scenarios"]]
    assert ids == ["clean", "example.vignetting@1", "example.vignetting@5"]
    for s in results["scenarios"]:
        j = s["metrics"]["youden_j"]
        assert 0.0 < j["value"] <= 1.0 and j["ci_low"] <= j["value"] <= j["ci_high"]
    assert results["metric_directions"]["youden_j"] is True
    assert "example.vignetting" in [c["name"] for c in results["perturbation_catalogue"]]
    html = (out / "report.html").read_text()
    assert 'id="example-vignetting"' in html
    assert "Vignetting and Youden&#39;s J (example plugin)" in html or "Vignetting and Youden's J (example plugin)" in html


def test_example_package_own_tests_pass(installed: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          check=False, capture_output=True, text=True, env=_env(installed), cwd=EXAMPLE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
