"""Dataset loader checks: a valid file opens and reads; missing, truncated and garbage files
raise :class:`~medaudit.errors.DataError` naming the file."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..config import Config
from ..data import AuditDataset
from ..errors import DataError
from .records import Check, Subject

@dataclass
class DatasetLoader:
    """A ``medaudit_open_dataset`` implementation plus factories that write files in its format.

    ``write_valid(folder)`` writes a small valid dataset into ``folder`` and returns its path.
    ``write_truncated`` and ``write_garbage`` default to the valid file cut to half its bytes and
    to random bytes under the valid file's name; pass your own for folder-based formats.
    """

    open: Callable[[Path, Config], AuditDataset | None]
    write_valid: Callable[[Path], Path]
    name: str = ""
    config: Config = field(default_factory=Config)
    write_truncated: Callable[[Path], Path] | None = None
    write_garbage: Callable[[Path], Path] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            self.name = getattr(self.open, "__module__", "loader") + "." + getattr(self.open, "__name__", "open")


def loader_checks(sub: Subject) -> Iterator[Check]:
    yield Check(check_loader_opens_valid)
    yield Check(check_loader_missing_file)
    yield Check(check_loader_bad_file, "truncated", kind="truncated")
    yield Check(check_loader_bad_file, "garbage", kind="garbage")


def _names_file(message: str, path: Path) -> bool:
    return str(path) in message or path.name in message


def _read_all(ds: AuditDataset) -> None:
    for i in range(len(ds)):
        ds[i]


def check_loader_opens_valid(loader: DatasetLoader) -> None:
    """The valid file opens as an :class:`AuditDataset` whose samples read."""
    with tempfile.TemporaryDirectory() as tmp:
        path = loader.write_valid(Path(tmp))
        ds = loader.open(path, loader.config)
        assert isinstance(ds, AuditDataset), f"open({path.name}) returned {type(ds).__name__}; expected an AuditDataset"
        assert len(ds) > 0, "the valid dataset opened empty"
        _read_all(ds)


def check_loader_missing_file(loader: DatasetLoader) -> None:
    """A path that does not exist raises :class:`DataError` naming it."""
    with tempfile.TemporaryDirectory() as tmp:
        # a sibling of a valid file, so the name has the format's suffix the loader looks for
        sample = loader.write_valid(Path(tmp))
        missing = sample.with_name("does-not-exist" + "".join(sample.suffixes))
        try:
            result = loader.open(missing, loader.config)
        except DataError as exc:
            assert _names_file(str(exc), missing), f"the DataError does not name the file: {exc}"
            return
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"a missing file raised {type(exc).__name__}: {exc}; expected a DataError naming the file") from None
        raise AssertionError(f"a missing file {missing.name} gave {type(result).__name__} instead of a DataError naming it")


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(path: Path) -> Path:
    size = max(path.stat().st_size, 64)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def check_loader_bad_file(loader: DatasetLoader, kind: Literal["truncated", "garbage"]) -> None:
    """A truncated or garbage file raises :class:`DataError` naming it, at open or when a sample is read."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        custom = loader.write_truncated if kind == "truncated" else loader.write_garbage
        path = custom(folder) if custom is not None else (_truncate if kind == "truncated" else _garbage)(loader.write_valid(folder))
        try:
            ds = loader.open(path, loader.config)
            assert ds is not None, f"the {kind} file {path.name} was not claimed (open returned None); raise a DataError naming it"
            _read_all(ds)
        except DataError as exc:
            assert _names_file(str(exc), path), f"the DataError for the {kind} file does not name it: {exc}"
            return
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"the {kind} file raised {type(exc).__name__}: {exc}; expected a DataError naming {path.name}") from None
        raise AssertionError(f"the {kind} file {path.name} opened and read without error")
