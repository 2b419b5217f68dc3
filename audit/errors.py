"""Errors that reach the user: each names the file, field or plugin involved and what to do."""

from __future__ import annotations


class MedauditError(Exception):
    """Base class of every error medaudit reports to the user.

    ``exit_code`` is what the CLI exits with: 2 for usage, config and input errors.
    """

    exit_code = 2


class ConfigError(MedauditError):
    """The configuration (file or flags) is invalid."""


class DataError(MedauditError):
    """A dataset, or one file or row in it, cannot be used."""


class ModelError(MedauditError):
    """The model cannot be loaded or does not fit the input spec."""


class PluginError(MedauditError):
    """A plugin is broken, conflicts with another, or raised during an audit."""


class ModelOutputError(MedauditError):
    """The model produced unusable outputs (NaN/Inf, wrong shape) in a scenario."""
