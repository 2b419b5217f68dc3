"""medaudit: robustness auditor for PyTorch medical-imaging classifiers.

Plugin authors mark hook implementations with :data:`medaudit.hookimpl` (the same marker as
``medaudit.hookspecs.hookimpl``); docs/plugins.md is their guide.
"""

from importlib.metadata import PackageNotFoundError, version

# First, so that its exit handler runs after every handler registered later (see the module).
from . import fastexit

try:
    __version__ = version("medaudit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from .hookspecs import hookimpl, hookspec  # after fastexit, see above

del fastexit  # imported for its exit handler only

__all__ = ["__version__", "hookimpl", "hookspec"]
