"""medaudit: robustness auditor for PyTorch medical-imaging classifiers."""

from importlib.metadata import PackageNotFoundError, version

# First, so that its exit handler runs after every handler registered later (see the module).
from . import fastexit

try:
    __version__ = version("medaudit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

del fastexit  # imported for its exit handler only

__all__ = ["__version__"]
