"""medaudit: robustness auditor for PyTorch medical-imaging classifiers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medaudit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
