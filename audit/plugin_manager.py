"""Plugin discovery and the catalogue of what plugins contribute.

Built-ins and third-party plugins take the same path: every entry point of the ``medaudit``
group is imported under a guard, so a broken package becomes a named load failure (reported by
``medaudit plugins`` and in the report's limitations) instead of a traceback, and the audit goes
on without it. A plugin that loads but looks wrong (a ``medaudit_*`` function medaudit will never
call, a perturbation in another plugin's suite) is registered and reported as a warning, in the
same places. Set ``MEDAUDIT_TRACE=1`` to print every hook call to stderr, and
``MEDAUDIT_DISABLE_PLUGIN_AUTOLOAD=1`` to load only plugins passed explicitly (tests).
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, TypeVar

import pluggy

from . import hookspecs
from .errors import PluginError
from .perturbation import Perturbation
from .protocols import Protocol
from .task import Task, check_declaration

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    api_version: int
    module: str


@dataclass(frozen=True)
class LoadFailure:
    name: str
    distribution: str
    error: str

    @property
    def message(self) -> str:
        return f'Error importing plugin "{self.name}" (from {self.distribution}): {self.error}'


@dataclass(frozen=True)
class LoadProblem:
    """A plugin that loaded, with something medaudit will silently not do as its author meant.

    A warning, not a :class:`LoadFailure`: the plugin's other contributions are sound and the
    audit keeps them. Refusing the whole plugin for a misspelt report hook would drop its
    perturbations too, and a hook that a newer medaudit adds (new hooks do not bump the hook API
    version) would make every plugin implementing it unloadable here.
    """

    name: str
    distribution: str
    problem: str

    @property
    def message(self) -> str:
        return f'plugin "{self.name}" (from {self.distribution}): {self.problem}'


def hook_problems(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """What of ``plugin`` looks like a hook implementation that medaudit will never call.

    Two mistakes vanish silently in pluggy: an implementation of a hook no spec declares (a
    misspelt name; pluggy's ``check_pending`` finds these, but stops at the first and names no
    function), and a ``medaudit_*`` function without ``@hookimpl`` (not an implementation at all).
    ``@hookimpl(optionalhook=True)`` marks a hook of a newer medaudit on purpose.
    """
    problems = []
    specs = sorted(name for name in vars(hookspecs) if name.startswith(f"{hookspecs.PROJECT}_"))
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec() or all(impl.optionalhook for impl in caller.get_hookimpls() if impl.plugin is plugin):
            continue
        close = difflib.get_close_matches(caller.name, specs, n=1)
        hint = f'did you mean "{close[0]}"?' if close else "the hooks are listed by docs/plugins.md"
        problems.append(f'function "{caller.name}" implements no medaudit hook ({hint}); it is never called')
    for attr in sorted(dir(plugin)):
        if not attr.startswith(f"{hookspecs.PROJECT}_") or pm.parse_hookimpl_opts(plugin, attr) is not None:
            continue
        value = getattr(plugin, attr, None)
        if callable(value) and not hasattr(value, f"{hookspecs.PROJECT}_spec"):  # an imported spec is no mistake
            problems.append(f'function "{attr}" is not decorated with @medaudit.hookimpl; it is never called')
    return problems


def catalogue_entry(plugin: str, cls: type[Perturbation]) -> dict[str, Any]:
    """A perturbation's entry in ``medaudit perturbations`` and results.json ``perturbation_catalogue``:
    its description plus the plugin that provides it."""
    return {**cls.describe(), "plugin": plugin}


@dataclass
class PluginManager:
    """A pluggy manager plus what medaudit knows about each registered plugin."""

    pm: pluggy.PluginManager
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)
    problems: list[LoadProblem] = field(default_factory=list)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def register(self, plugin: object, name: str, distribution: str = "(local)", version: str = "") -> None:
        api = int(getattr(plugin, "MEDAUDIT_API_VERSION", hookspecs.HOOK_API_VERSION))
        if api != hookspecs.HOOK_API_VERSION:
            self.failures.append(LoadFailure(name, distribution, (
                f"targets medaudit hook API {api}, this medaudit provides {hookspecs.HOOK_API_VERSION}; "
                "upgrade the plugin or medaudit")))
            return
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self.failures.append(LoadFailure(name, distribution, str(exc)))
            return
        module = getattr(plugin, "__name__", type(plugin).__name__)
        self.infos[name] = PluginInfo(name, distribution, version, api, module)
        self.problems.extend(LoadProblem(name, distribution, p) for p in hook_problems(self.pm, plugin))

    def call_each(self, hook_name: str, on_error: Callable[[str, str], None] | None = None,
                  **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of a hook separately, returning ``(plugin name, result)``.

        Unlike ``pm.hook.X()``, this attributes each contribution to its plugin. An exception in
        one plugin becomes a message naming it: raised as :class:`PluginError`, or, when
        ``on_error`` is given, passed to it with the plugin's name (``on_error(message, plugin)``)
        while the other plugins' results are kept.
        """
        out = []
        caller = getattr(self.pm.hook, hook_name)
        for impl in caller.get_hookimpls():  # registration order
            args = {k: kwargs[k] for k in impl.argnames}
            try:
                result = impl.function(**args)
            except Exception as exc:
                message = (str(exc) if isinstance(exc, PluginError)
                           else f'plugin "{impl.plugin_name}" failed in {hook_name}: {type(exc).__name__}: {exc}')
                if on_error is None:
                    raise (exc if isinstance(exc, PluginError) else PluginError(message)) from exc
                on_error(message, impl.plugin_name)
                continue
            if result is not None:
                out.append((impl.plugin_name, result))
        return out

    def _by_name(self, hook: str, kind: str, check: Callable[[Any, str], object]) -> dict[str, tuple[str, Any]]:
        """Every object a catalogue ``hook`` returns, by its ``name``, with the plugin that provides
        it; ``check(obj, plugin)`` raises for a malformed one, and a name two plugins provide is a
        PluginError naming both."""
        found: dict[str, tuple[str, Any]] = {}
        for plugin, objects in self.call_each(hook):
            for obj in objects:
                check(obj, plugin)
                if obj.name in found:
                    raise PluginError(
                        f'{kind} "{obj.name}" is provided by two plugins: "{found[obj.name][0]}" and "{plugin}"; '
                        f"uninstall one or rename its {kind}")
                found[obj.name] = (plugin, obj)
        return found

    def perturbations(self) -> dict[str, tuple[str, type[Perturbation]]]:
        """Every perturbation by name, with the plugin that provides it."""
        def check(cls: Any, plugin: str) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Perturbation)):
                raise PluginError(f'plugin "{plugin}" returned {cls!r} from medaudit_perturbations; expected Perturbation subclasses')

        return self._by_name("medaudit_perturbations", "perturbation", check)

    def suite_owners(self, catalogue: dict[str, tuple[str, type[Perturbation]]]) -> dict[str, str]:
        """The plugin that owns each suite: the first whose perturbations declare it.

        medaudit's own plugins come first, so a third-party plugin that happens to register
        before them (entry points load in name order) cannot take over ``mri`` or ``ct``.
        """
        def third_party(entry: tuple[str, type[Perturbation]]) -> bool:
            info = self.infos.get(entry[0])
            return info is None or info.distribution != hookspecs.PROJECT

        owners: dict[str, str] = {}
        for plugin, cls in sorted(catalogue.values(), key=third_party):  # stable: registration order otherwise
            owners.setdefault(cls.suite, plugin)
        return owners

    def suite_warnings(self, catalogue: dict[str, tuple[str, type[Perturbation]]], plugin: str | None = None) -> list[str]:
        """A warning for each perturbation that joins another plugin's suite without its leave.

        Such a perturbation runs whenever its suite is chosen (by modality or ``--suite``) and
        counts in that suite's mCE, which would silently change what a built-in suite measures.
        A suite's owner opens it with a module-level ``MEDAUDIT_OPEN_SUITES = {"suite", ...}``.
        ``plugin`` keeps only the warnings about that plugin's perturbations.
        """
        owners = self.suite_owners(catalogue)
        out = []
        for name, (provider, cls) in sorted(catalogue.items()):
            owner = owners[cls.suite]
            if provider == owner or plugin not in (None, provider) or \
                    cls.suite in getattr(self.pm.get_plugin(owner), "MEDAUDIT_OPEN_SUITES", ()):
                continue
            out.append(f'perturbation "{name}" of plugin "{provider}" joins suite "{cls.suite}" of plugin "{owner}", '
                       f"which does not open it to other plugins: it runs with that suite and counts in its mCE; "
                       f'give it a suite of its own (e.g. "{provider}.{name.split(".", 1)[1]}")')
        return out

    def protocols(self) -> dict[str, tuple[str, Protocol]]:
        """Every frozen audit protocol by name, with the plugin that publishes it."""
        def check(obj: Any, plugin: str) -> None:
            if not isinstance(obj, Protocol):
                raise PluginError(f'plugin "{plugin}" returned {obj!r} from medaudit_protocols; expected '
                                  "medaudit.protocols.Protocol objects")

        return self._by_name("medaudit_protocols", "protocol", check)

    def tasks(self) -> dict[str, tuple[str, Task]]:
        """Every task type by name (the values of ``task.type``), with the plugin that provides it."""
        return self._by_name("medaudit_tasks", "task", check_declaration)

    def contributions(self, config: Any) -> dict[str, dict[str, list[str]]]:
        """For ``medaudit plugins``: what each plugin contributes, by kind."""
        out: dict[str, dict[str, list[str]]] = {name: {} for name in self.infos}
        for plugin, tasks in self.call_each("medaudit_tasks"):
            out[plugin].setdefault("tasks", []).extend(t.name for t in tasks)
        for plugin, classes in self.call_each("medaudit_perturbations"):
            out[plugin].setdefault("perturbations", []).extend(c.name for c in classes)
        for plugin, metrics in self.call_each("medaudit_metrics", config=config):
            out[plugin].setdefault("metrics", []).extend(m.name for m in metrics)
        for plugin, detectors in self.call_each("medaudit_detectors", config=config):
            out[plugin].setdefault("detectors", []).extend(d.name for d in detectors)
        for plugin, protocols in self.call_each("medaudit_protocols"):
            out[plugin].setdefault("protocols", []).extend(p.name for p in protocols)
        hooks = {
            "medaudit_load_model": "model loader", "medaudit_open_dataset": "dataset loader",
            "medaudit_analyze": "analysis", "medaudit_report_sections": "report sections",
            "medaudit_register_commands": "commands",
        }
        for hook_name, label in hooks.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                out[impl.plugin_name].setdefault("hooks", []).append(label)
        return out


def _dist_of(ep: Any) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "(unknown distribution)", ""
    return dist.metadata["Name"], dist.version


def get_plugin_manager(extra: Iterable[tuple[str, object]] = (), autoload: bool | None = None,
                       warn: Callable[[str], None] | None = None) -> PluginManager:
    """Build a fresh plugin manager (no module-level singleton).

    :param extra: ``(name, plugin)`` pairs registered after the entry points (tests, scripts).
    :param autoload: load the ``medaudit`` entry-point group; default unless
        ``MEDAUDIT_DISABLE_PLUGIN_AUTOLOAD`` is set.
    :param warn: where load failures and problems are reported (default: ``warnings.warn``).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    manager = PluginManager(pm)
    if autoload is None:
        autoload = not os.environ.get("MEDAUDIT_DISABLE_PLUGIN_AUTOLOAD")
    if autoload:
        for ep in sorted(entry_points(group=hookspecs.PROJECT), key=lambda e: e.name):
            dist, version = _dist_of(ep)
            if pm.get_plugin(ep.name) is not None or ep.name in {f.name for f in manager.failures}:
                manager.failures.append(LoadFailure(ep.name, dist, "another installed distribution registers a plugin of the same name"))
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time error of third-party code
                manager.failures.append(LoadFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
                continue
            manager.register(plugin, ep.name, dist, version)
    for name, plugin in extra:
        manager.register(plugin, name)
    report = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=2))
    for failure in [*manager.failures, *manager.problems]:
        report(failure.message)
    if os.environ.get("MEDAUDIT_TRACE"):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
        pm.enable_tracing()
    return manager
