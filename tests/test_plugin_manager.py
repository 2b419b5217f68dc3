"""Plugin discovery: built-ins through entry points, broken plugins named, duplicates refused."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from medaudit.errors import PluginError
from medaudit.hookspecs import hookimpl
from medaudit.plugin_manager import get_plugin_manager
from medaudit.plugins.intensity import Gamma

BUILTINS = {"intensity", "mri", "ct", "xray", "geometry", "classification", "calibration", "ood",
            "data_loaders", "model_loaders", "subgroups"}


def test_builtins_load_through_entry_points() -> None:
    messages: list[str] = []
    pm = get_plugin_manager(warn=messages.append)
    loaded = set(pm.infos)
    assert "intensity" in loaded
    assert pm.infos["intensity"].distribution == "medaudit"
    assert pm.infos["intensity"].module == "medaudit.plugins.intensity"
    assert pm.perturbations()["intensity.gamma"] == ("intensity", Gamma)


def _fake_distribution(root: Path, name: str, entry: str, module_src: str | None) -> None:
    dist = root / f"{name.replace('-', '_')}-0.3.dist-info"  # wheel naming: no dash in the name part
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text(f"[medaudit]\n{entry}\n")
    if module_src is not None:
        mod, _, _ = entry.split("=")[1].strip().partition(":")
        (root / f"{mod}.py").write_text(textwrap.dedent(module_src))


def test_broken_plugin_is_reported_by_name_and_others_still_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(tmp_path, "medaudit-broken", "broken = medaudit_broken_mod", "raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    messages: list[str] = []
    pm = get_plugin_manager(warn=messages.append)
    assert 'Error importing plugin "broken" (from medaudit-broken): ImportError: needs libfoo' in messages
    assert "broken" not in pm.infos
    assert "intensity.gamma" in pm.perturbations()
    sys.modules.pop("medaudit_broken_mod", None)


def test_plugin_targeting_another_api_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(tmp_path, "medaudit-future", "future = medaudit_future_mod", "MEDAUDIT_API_VERSION = 99\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    messages: list[str] = []
    pm = get_plugin_manager(warn=messages.append)
    assert any('"future"' in m and "hook API 99" in m for m in messages)
    assert "future" not in pm.infos
    sys.modules.pop("medaudit_future_mod", None)


class _Duplicate:
    @hookimpl
    def medaudit_perturbations(self):  # type: ignore[no-untyped-def]
        return [Gamma]


def test_duplicate_perturbation_names_both_plugins() -> None:
    pm = get_plugin_manager(extra=[("copycat", _Duplicate())], warn=lambda m: None)
    with pytest.raises(PluginError, match=r'"intensity.gamma" is provided by two plugins: "intensity" and "copycat"'):
        pm.perturbations()


class _Raises:
    @hookimpl
    def medaudit_perturbations(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")


def test_plugin_raising_in_a_hook_is_named() -> None:
    pm = get_plugin_manager(extra=[("exploding", _Raises())], warn=lambda m: None)
    with pytest.raises(PluginError, match=r'plugin "exploding" failed in medaudit_perturbations: RuntimeError: boom'):
        pm.perturbations()


def test_autoload_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDAUDIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager(warn=lambda m: None)
    assert pm.infos == {}
