"""Plugin discovery: built-ins through entry points, broken plugins named, duplicates refused."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from medaudit.errors import PluginError
from medaudit.hookspecs import hookimpl
from medaudit.plugin_manager import catalogue_entry, get_plugin_manager
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


# ---------------------------------------------------------------------------------------------
# Load problems: functions medaudit would never call are named, the plugin is kept
# ---------------------------------------------------------------------------------------------


class _Misspelt:
    @hookimpl
    def medaudit_perturbations(self):  # type: ignore[no-untyped-def]
        return []

    @hookimpl
    def medaudit_detector(self, config):  # type: ignore[no-untyped-def]  # the spec is medaudit_detectors
        raise AssertionError("never called")


class _Unmarked:
    def medaudit_detectors(self, config):  # type: ignore[no-untyped-def]  # no @hookimpl
        raise AssertionError("never called")

    def helper(self) -> None:  # not hook-like: not reported
        pass


class _NewerHook:
    @hookimpl(optionalhook=True)
    def medaudit_from_the_future(self):  # type: ignore[no-untyped-def]
        return []


def test_misspelt_hook_is_a_warning_naming_plugin_and_function() -> None:
    messages: list[str] = []
    pm = get_plugin_manager(extra=[("acme", _Misspelt())], autoload=False, warn=messages.append)
    assert "acme" in pm.infos and not pm.failures  # a warning: the plugin's other hooks are kept
    assert messages == ['plugin "acme" (from (local)): function "medaudit_detector" implements no medaudit hook '
                        '(did you mean "medaudit_detectors"?); it is never called']
    assert [p.name for p in pm.problems] == ["acme"]


def test_unmarked_hook_function_is_a_warning() -> None:
    messages: list[str] = []
    pm = get_plugin_manager(extra=[("acme", _Unmarked())], autoload=False, warn=messages.append)
    assert "acme" in pm.infos
    assert messages == ['plugin "acme" (from (local)): function "medaudit_detectors" is not decorated with '
                        "@medaudit.hookimpl; it is never called"]


def test_optional_hooks_and_correct_plugins_are_not_reported() -> None:
    messages: list[str] = []
    pm = get_plugin_manager(extra=[("future", _NewerHook()), ("dup", _Duplicate())], autoload=False,
                            warn=messages.append)
    assert messages == [] and pm.problems == []


def test_builtins_have_no_load_problems() -> None:
    pm = get_plugin_manager(warn=lambda m: None)
    assert [p.message for p in pm.problems if pm.infos[p.name].distribution == "medaudit"] == []


def test_misspelt_hook_of_an_installed_module_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a module plugin, as third parties write them: module attributes, not methods
    _fake_distribution(tmp_path, "medaudit-typo", "typo = medaudit_typo_mod", """
        from medaudit import hookimpl
        from medaudit.hookspecs import medaudit_metrics  # an imported spec is not a mistake

        @hookimpl
        def medaudit_report_section(results):
            return []

        def medaudit_perturbations():
            return []
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    messages: list[str] = []
    pm = get_plugin_manager(warn=messages.append)
    typo = sorted(m for m in messages if '"typo"' in m)
    assert typo == [
        'plugin "typo" (from medaudit-typo): function "medaudit_perturbations" is not decorated with '
        "@medaudit.hookimpl; it is never called",
        'plugin "typo" (from medaudit-typo): function "medaudit_report_section" implements no medaudit hook '
        '(did you mean "medaudit_report_sections"?); it is never called',
    ]
    assert "typo" in pm.infos
    sys.modules.pop("medaudit_typo_mod", None)


def test_medaudit_exports_the_markers() -> None:
    import medaudit
    from medaudit import hookspecs

    assert medaudit.hookimpl is hookspecs.hookimpl and medaudit.hookspec is hookspecs.hookspec


# ---------------------------------------------------------------------------------------------
# Suites belong to a plugin; the catalogue names the provider of every perturbation
# ---------------------------------------------------------------------------------------------


class _Zipper(Gamma):
    name = "mri.zipper"
    suite = "mri"


class _Intruder:
    @hookimpl
    def medaudit_perturbations(self):  # type: ignore[no-untyped-def]
        return [_Zipper]


class _Own(Gamma):
    name = "acme.own"
    suite = "acme"


class _Guest(Gamma):
    name = "acme.guest"
    suite = "acme"


class _Owner:
    @hookimpl
    def medaudit_perturbations(self):  # type: ignore[no-untyped-def]
        return [_Own]


class _OpenOwner(_Owner):
    MEDAUDIT_OPEN_SUITES = {"acme"}


class _Guesting:
    @hookimpl
    def medaudit_perturbations(self):  # type: ignore[no-untyped-def]
        return [_Guest]


def test_joining_a_builtin_suite_is_a_warning_and_the_catalogue_names_the_plugin() -> None:
    pm = get_plugin_manager(extra=[("acme", _Intruder())], warn=lambda m: None)
    catalogue = pm.perturbations()
    assert pm.suite_warnings(catalogue) == [
        'perturbation "mri.zipper" of plugin "acme" joins suite "mri" of plugin "mri", which does not open it to '
        'other plugins: it runs with that suite and counts in its mCE; give it a suite of its own (e.g. "acme.zipper")']
    assert pm.suite_warnings(catalogue, plugin="mri") == []
    assert catalogue_entry(*catalogue["mri.zipper"])["plugin"] == "acme"
    assert catalogue_entry(*catalogue["mri.motion"])["plugin"] == "mri"


def test_builtins_own_their_suites_whatever_the_registration_order() -> None:
    import medaudit.plugins.mri as mri

    pm = get_plugin_manager(autoload=False, warn=lambda m: None)
    pm.register(_Intruder(), "aaa")  # a third party registered first ("aaa" sorts before "mri")
    pm.register(mri, "mri", "medaudit", "0")
    assert pm.suite_owners(pm.perturbations())["mri"] == "mri"
    assert pm.suite_warnings(pm.perturbations())[0].startswith('perturbation "mri.zipper" of plugin "aaa" joins')


def test_suite_owner_can_open_its_suite() -> None:
    closed = get_plugin_manager(extra=[("acme", _Owner()), ("guest", _Guesting())], autoload=False, warn=lambda m: None)
    assert len(closed.suite_warnings(closed.perturbations())) == 1
    opened = get_plugin_manager(extra=[("acme", _OpenOwner()), ("guest", _Guesting())], autoload=False, warn=lambda m: None)
    assert opened.suite_owners(opened.perturbations()) == {"acme": "acme"}
    assert opened.suite_warnings(opened.perturbations()) == []
