"""SHA-256 of files, streamed: the identities of models and datasets in results.json.

``results.json`` records a model file's hash and a dataset's content hash so that two audits can
be compared (``medaudit compare``) and a cached shard can be trusted; both must stay stable
across releases, so there is one implementation of reading a file into a hash, here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["sha256_file", "sha256_files"]

#: Bytes read at once: files are streamed, never loaded whole (volumes and models reach GBs).
CHUNK = 1 << 20


def _update(h: Any, path: Path, chunk: int) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    """Hex SHA-256 of one file's bytes (``sha256sum`` of it), streamed in chunks.

    Parameters
    ----------
    path : Path
    chunk : int
        Bytes read at once.

    Returns
    -------
    str, 64 hex digits.
    """
    h = hashlib.sha256()
    _update(h, path, chunk)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path], extra: bytes = b"", chunk: int = CHUNK) -> str:
    """Hex SHA-256 over ``extra`` and then each file's name and bytes, streamed in chunks.

    Each file contributes its name (not its folder), a NUL byte and its content, so renaming a
    file changes the hash and moving the dataset folder does not.

    Parameters
    ----------
    paths : iterable of Path, in a fixed order (the order is part of the hash).
    extra : bytes
        Hashed first (e.g. a manifest's normalised text).
    chunk : int
        Bytes read at once.

    Returns
    -------
    str, 64 hex digits.
    """
    h = hashlib.sha256(extra)
    for p in paths:
        h.update(p.name.encode() + b"\0")
        _update(h, p, chunk)
    return h.hexdigest()
