"""``medaudit new-plugin``: the scaffolded package installs and passes its own tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from medaudit.scaffold import ScaffoldError, plugin_names, scaffold_plugin


def test_scaffold_writes_a_package(tmp_path: Path) -> None:
    root = scaffold_plugin("medaudit-plugin-retina", tmp_path)
    assert root == tmp_path / "medaudit-plugin-retina"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["README.md", "medaudit_plugin_retina/__init__.py", "pyproject.toml",
                     "tests/test_medaudit_plugin_retina.py"]
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.medaudit]\nretina = "medaudit_plugin_retina"' in pyproject
    module = (root / "medaudit_plugin_retina" / "__init__.py").read_text()
    assert 'name = "retina.noise"' in module and "MEDAUDIT_API_VERSION = 1" in module
    compile(module, "module", "exec")
    compile((root / "tests" / "test_medaudit_plugin_retina.py").read_text(), "tests", "exec")


@pytest.mark.parametrize(("name", "suite"), [("medaudit-plugin-retina", "retina"), ("derm_tools", "derm_tools"),
                                             ("medaudit-fundus-kit", "fundus_kit")])
def test_names(name: str, suite: str) -> None:
    assert plugin_names(name)["suite"] == suite


@pytest.mark.parametrize(("name", "match"), [
    ("Retina", "invalid plugin name 'Retina': use a lowercase"),
    ("1retina", "starting with a letter"),
    ("retina--x", "invalid plugin name"),
    ("my plugin", "invalid plugin name"),
    ("json", "shadow medaudit, a standard library module"),
    ("medaudit", "shadow medaudit"),
    ("medaudit-plugin-mri", "'mri' is a built-in medaudit plugin"),
])
def test_invalid_names_are_refused(tmp_path: Path, name: str, match: str) -> None:
    with pytest.raises(ScaffoldError, match=match):
        scaffold_plugin(name, tmp_path)
    assert not any(tmp_path.iterdir())


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    existing = tmp_path / "medaudit-plugin-retina"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ScaffoldError, match=r"medaudit-plugin-retina already exists; .*never overwrites"):
        scaffold_plugin("medaudit-plugin-retina", tmp_path)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_scaffolded_plugin_installs_registers_and_passes_its_tests(tmp_path: Path) -> None:
    root = scaffold_plugin("medaudit-plugin-retina", tmp_path / "src")
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(root)], check=False, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    env.pop("MEDAUDIT_DISABLE_PLUGIN_AUTOLOAD", None)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                           check=False, capture_output=True, text=True, env=env, cwd=root)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "failed" not in tests.stdout and " passed" in tests.stdout
    listing = subprocess.run([sys.executable, "-m", "medaudit.cli", "perturbations", "--json"],
                             check=False, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert '"name": "retina.noise"' in listing.stdout and '"plugin": "retina"' in listing.stdout
