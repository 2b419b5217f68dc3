"""The built wheel carries the core, the built-in plugins, the templates and the schema.

The editable install used for development maps ``medaudit`` → ``audit/`` and
``medaudit.plugins`` → ``plugins/``; this test builds a real wheel, installs it into a separate
folder and runs an audit from there, so the package-dir mapping and package data are proven for
a normal install too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels)], check=True, capture_output=True)
    wheel = next(wheels.glob("medaudit-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    files = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    for needed in ("medaudit/cli.py", "medaudit/plugins/intensity.py", "medaudit/templates/report.html",
                   "medaudit/templates/sections/summary.html", "medaudit/templates/report.css",
                   "medaudit/schemas/results.schema.json", "medaudit/testing/__init__.py",
                   "medaudit/testing/entry_points.py"):
        assert needed in files, needed
    # PYTHONPATH precedes site-packages, so the wheel's copy wins over the editable install.
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import medaudit, medaudit.plugins.intensity as p; print(medaudit.__file__, p.__file__)"],
                           env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert all(str(target) in f for f in where.stdout.split())
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "medaudit.cli", "run", str(ROOT / "examples" / "model.pt"),
                          "--data", str(ROOT / "examples" / "mni-patches" / "test.npz"),
                          "--config", str(ROOT / "examples" / "mni-patches.yaml"), "--out", str(out),
                          "--perturbation", "intensity.gamma", "--severities", "3", "--bootstrap", "50", "--quiet"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "<!DOCTYPE html>" in (out / "report.html").read_text()
    assert json.loads((out / "results.json").read_text())["scenarios"][1]["id"] == "intensity.gamma@3"
