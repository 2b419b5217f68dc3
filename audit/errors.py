"""Errors that reach the user: each names the file, field or plugin involved and what to do."""

from __future__ import annotations

import re


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


class OutputWidthError(ModelOutputError, ModelError):
    """The model outputs ``width`` values per sample where the task expects ``n_classes``: the
    audit names the labels behind the class count when they were inferred from the data. A
    model error too: the dry run finds it before any scenario runs."""

    def __init__(self, message: str, width: int, n_classes: int) -> None:
        super().__init__(message)
        self.width, self.n_classes = width, n_classes


def one_line(text: object, limit: int = 300) -> str:
    """Exception text squeezed onto one line of at most ``limit`` characters.

    Errors that reach the user are one line by convention (the CLI prints them as ``error: …``),
    but an underlying library's message may span lines (pydicom, onnxruntime, zipfile) or run to
    pages (a state dict's key list). Runs of white space become one space; a longer text is cut
    and ends in ``…``.

    Parameters
    ----------
    text : object
        Usually an exception; formatted with ``str``.
    limit : int
        Largest length of the result, ``…`` included.

    Returns
    -------
    str
    """
    s = re.sub(r"\s+", " ", str(text)).strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"
