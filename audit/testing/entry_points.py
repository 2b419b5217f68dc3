"""Entry-point check: the installed plugin loads as ``medaudit run`` loads it, with nothing lost."""

from __future__ import annotations

from importlib.metadata import entry_points

from ..config import Config
from ..hookspecs import PROJECT
from ..plugin_manager import PluginInfo, get_plugin_manager
from ..settings import resolve_settings


def check_entry_point(name: str) -> PluginInfo:
    """Load the entry point ``name`` of the ``medaudit`` group through medaudit's plugin manager.

    With every other installed plugin, as an audit loads them, so clashes with them show too.
    Checks that the entry point exists and imports; that the plugin targets this hook API and
    registers; that it implements at least one hook and nothing medaudit would ignore (a misspelt
    hook, a ``medaudit_*`` function without ``@hookimpl``); that its catalogue hooks
    (perturbations, metrics, detectors) run on a default config; that its perturbation names
    clash with no other plugin's; and that it joins no other plugin's suite uninvited. Returns
    the plugin's :class:`~medaudit.plugin_manager.PluginInfo`.
    """
    if not any(ep.name == name for ep in entry_points(group=PROJECT)):
        raise AssertionError(
            f'no entry point "{name}" in the "{PROJECT}" group: is the package installed (pip install -e .), '
            f'and does its pyproject.toml declare [project.entry-points.{PROJECT}] {name} = "your_module"?')
    pm = get_plugin_manager(autoload=True, warn=lambda message: None)
    failures = [f.message for f in pm.failures if f.name == name]
    assert not failures, "; ".join(failures)
    assert name in pm.infos, f'entry point "{name}" loaded but did not register'
    problems = [p.message for p in pm.problems if p.name == name]
    assert not problems, "; ".join(problems)
    assert pm.pm.get_hookcallers(pm.pm.get_plugin(name)), (
        f'plugin "{name}" implements no medaudit hook (are its functions decorated with @medaudit.hookimpl?)')
    pm.contributions(resolve_settings(Config(), pm))  # raises PluginError naming the plugin and the hook that failed
    intrusions = pm.suite_warnings(pm.perturbations(), plugin=name)  # perturbations() raises on a name clash
    assert not intrusions, "; ".join(intrusions)
    return pm.infos[name]
