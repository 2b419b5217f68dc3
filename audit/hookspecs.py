"""Hook specifications: the plugin author's reference.

A plugin is a module (or object) with functions named like the specs below and decorated with
``medaudit.hookimpl`` (the :data:`hookimpl` below, also exported by ``medaudit`` itself),
registered through the ``medaudit`` entry-point group::

    [project.entry-points.medaudit]
    my_plugin = "my_package.my_plugin"

medaudit's own built-ins (``medaudit.plugins.*``) are registered the same way.

A ``medaudit_*`` function without ``@hookimpl``, or an implementation whose name is none of the
specs below (a misspelling), is never called; medaudit reports both as load warnings naming the
plugin and the function. Mark an implementation of a hook that only a newer medaudit has with
``@hookimpl(optionalhook=True)``.

A plugin module may declare ``MEDAUDIT_API_VERSION = 1``; medaudit refuses to load a plugin that
targets another major hook API version (a change to any spec below is a breaking change and
bumps :data:`HOOK_API_VERSION`).

Hooks are grouped by the phase of an audit in which they are called:

1. catalogue: what the plugin contributes (tasks, perturbations, metrics, detectors, protocols);
2. loading: turning a path into a model or a dataset;
3. analysis: extra results computed from the per-sample predictions;
4. report: extra sections of the HTML report;
5. command line: extra ``medaudit`` sub-commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import click
    from pydantic import BaseModel

    from .config import Config
    from .data import AuditDataset
    from .detector import Detector
    from .metric import Metric
    from .model import LoadedModel
    from .outputs import AuditOutputs
    from .perturbation import Perturbation
    from .protocols import Protocol
    from .sections import ReportSection
    from .task import Task

PROJECT = "medaudit"
HOOK_API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------------
# 1. Catalogue
# ---------------------------------------------------------------------------------------------


@hookspec
def medaudit_tasks() -> list[Task]:
    """Return the task types this plugin provides.

    Called once when the catalogue is built (``medaudit run`` resolves ``task.type`` among them
    before it opens any data; ``medaudit plugins`` lists them). Each is an instance of a
    :class:`medaudit.task.Task` subclass; its ``name`` is a value of ``task.type`` and must be
    unique across all plugins (a duplicate is an error naming both plugins). The built-in
    ``binary``, ``multiclass`` and ``multilabel`` come from the ``tasks`` plugin this way.

    :return: a list of :class:`medaudit.task.Task` instances.
    """


@hookspec
def medaudit_perturbations() -> list[type[Perturbation]]:
    """Return the perturbation classes this plugin provides.

    Called once when the catalogue is built (``medaudit run``, ``perturbations``, ``plugins``).
    Each class subclasses :class:`medaudit.perturbation.Perturbation`; its ``name`` must be
    unique across all plugins (a duplicate is an error naming both plugins). A suite belongs to
    the plugin whose perturbations first declare it (the built-ins own theirs): declaring
    another plugin's suite is a warning unless that plugin's module sets
    ``MEDAUDIT_OPEN_SUITES = {"suite", ...}``.

    :return: a list of classes (not instances); they are instantiated without arguments.
    """


@hookspec
def medaudit_metrics(config: Config) -> list[Metric]:
    """Return metric instances to compute on every scenario.

    Called once per audit after the config is validated. Instances may read the config and
    their plugin's own settings (``config.plugin_settings("<plugin>")``, see
    :func:`medaudit_settings`). A metric whose ``tasks`` exclude the audit's task is skipped.

    :param config: the validated audit configuration.
    :return: a list of :class:`medaudit.metric.Metric` instances.
    """


@hookspec
def medaudit_detectors(config: Config) -> list[Detector]:
    """Return OOD / shift detector instances.

    Called once per audit. Each detector is fitted on in-distribution data and scores every
    scenario (see :class:`medaudit.detector.Detector`). Detectors that need features are skipped
    (and the report says so) when ``model.feature_layer`` is not set or cannot be reached.

    :param config: the validated audit configuration.
    :return: a list of :class:`medaudit.detector.Detector` instances.
    """


@hookspec
def medaudit_settings() -> type[BaseModel]:
    """Return the pydantic model of this plugin's settings.

    Its section of the config file is ``plugins.<entry-point name>`` (``plugins.ood.knn_k``),
    validated once plugins are loaded with the core's rule: an unknown key is an error naming
    it. Hooks read the validated instance with ``config.plugin_settings("<entry-point name>")``
    (defaults where the file sets nothing). A field may replace an older core key with
    ``json_schema_extra=medaudit.settings.legacy_key("audit.n_bins")``; see docs/plugins.md.

    :return: a model class, e.g. a subclass of :class:`medaudit.settings.PluginSettings`.
    """


@hookspec
def medaudit_protocols() -> list[Protocol]:
    """Return the frozen audit protocols this plugin publishes (``medaudit run --protocol NAME``).

    A protocol (:class:`medaudit.protocols.Protocol`) pins the modality, the perturbations with
    their parameters at every severity, the severities, seed, bootstrap size, confidence level,
    detectors, compared metrics and breaking-point margins; its name carries its version
    (``site-consortium-v2``) and results.json records its SHA-256. Never change a published
    protocol: publish the next version beside it. Two plugins publishing one name is an error.
    Implement it with ``@hookimpl(optionalhook=True)`` to keep supporting medaudit releases
    before protocols existed.
    """


# ---------------------------------------------------------------------------------------------
# 2. Loading
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def medaudit_load_model(path: Path, config: Config, trust_pickle: bool) -> LoadedModel | None:
    """Load the model at ``path``.

    Called once per audit; stops at the first non-None result. Return ``None`` when the file is
    not in a format this plugin handles, so the next loader is tried. Raise
    :class:`medaudit.errors.ModelError` when the format is yours but the file is bad; the
    message must name the file and say what to do.

    :param path: the model file given on the command line.
    :param config: the audit configuration (``config.model`` says format, arch, output kind).
    :param trust_pickle: True only when the user passed ``--trust-pickle``. Never unpickle
        arbitrary objects otherwise.
    :return: a :class:`medaudit.model.LoadedModel` or None.
    """


@hookspec(firstresult=True)
def medaudit_open_dataset(path: Path, config: Config) -> AuditDataset | None:
    """Open the dataset at ``path`` (a file or a folder).

    Called for the audit data (and any reference or OOD data); stops at the first non-None
    result. Return ``None`` when the path is not in a format this plugin reads. Raise
    :class:`medaudit.errors.DataError` naming the file (and row) for bad input. Read labels and
    metadata eagerly, pixels lazily (``AuditDataset.read``), so large sets stream.

    :param path: the dataset path given on the command line.
    :param config: the audit configuration (input spec and task).
    :return: a :class:`medaudit.data.AuditDataset` or None.
    """


# ---------------------------------------------------------------------------------------------
# 3. Analysis
# ---------------------------------------------------------------------------------------------


@hookspec
def medaudit_analyze(outputs: AuditOutputs, config: Config) -> dict[str, Any] | None:
    """Compute extra results from the per-sample outputs of every scenario.

    Called once after all forward passes; must not run the model again. The returned mapping is
    merged into results.json: entries under ``subgroups`` are appended to the top-level
    ``subgroups`` list, ``warnings`` are added to the report's limitations (each a string, recorded
    in ``warning_records`` with code ``analysis`` and this plugin's name, or a record: a dict or
    :class:`medaudit.results.WarningRecord` with ``code`` and ``message``, optionally ``scenario``
    and ``subject``), and every other key is stored as ``results["analyses"][key]``. An exception is caught, named
    (plugin and hook) in the limitations, and the other plugins' analyses are kept.

    :param outputs: probabilities, labels, metadata and OOD scores of every scenario.
    :param config: the audit configuration.
    :return: a mapping of top-level result keys to values, or None.
    """


# ---------------------------------------------------------------------------------------------
# 4. Report
# ---------------------------------------------------------------------------------------------


@hookspec
def medaudit_report_sections(results: dict[str, Any]) -> list[ReportSection]:
    """Return extra sections for the HTML report.

    Called when a report is rendered (after ``run`` and by ``medaudit report``), so it may only
    use what is in ``results`` (the parsed results.json). Templates are rendered with the
    report's environment (autoescaping on, the ``sections/_table.html`` and
    ``sections/_figure.html`` partials available); never mark user-supplied text as safe. Build
    views with :mod:`medaudit.report.views`; a section's ``findings`` join the summary's key
    findings, its ``limitations`` the report's limitations, and its ``order`` places it among the
    core sections. The built-in calibration, OOD and subgroup views are sections of this hook.

    :param results: the results.json content as a dict.
    :return: a list of :class:`medaudit.sections.ReportSection`.
    """


# ---------------------------------------------------------------------------------------------
# 5. Command line
# ---------------------------------------------------------------------------------------------


@hookspec
def medaudit_register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``medaudit`` command group.

    Called once when the CLI starts. Use ``@cli.command()`` to add commands.
    """
