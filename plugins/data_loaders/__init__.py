"""Built-in dataset loaders: MedMNIST-style ``.npz`` files and CSV manifests of image files.

Two dataset classes, one hook that dispatches on the path:

* :class:`NpzDataset` — a ``.npz`` with ``images`` and ``labels`` (or MedMNIST's ``test_images``
  / ``test_labels``) plus optional ``meta_<column>`` arrays. Loaded with ``allow_pickle=False``
  always; uncompressed members are memory-mapped so DataLoader workers share the pages.
* :class:`ManifestDataset` — a ``manifest.csv`` (``path,label[,metadata…]``) in a folder, or any
  CSV given directly, listing PNG/JPEG/TIFF/BMP, NPY, NIfTI and DICOM files or DICOM series
  folders (one folder = one 3-D volume).

Cheap checks (columns, labels, every file exists, DICOM headers parse) run when the dataset is
opened, so a typo in row 9,000 fails in seconds rather than an hour into an audit; decoding
problems (truncated files) surface when ``read`` decodes the file. Every error names the file,
the manifest row where there is one (row 1 = the first row after the header), and what to do.

Modules: :mod:`.npz`, :mod:`.manifest`, :mod:`.dicom` (DICOM files, series and header fields),
:mod:`.readers` (which reader handles a file) and :mod:`.common` (labels, channel check); this
module holds the hook that dispatches on the path.
"""

from __future__ import annotations

import os
from pathlib import Path

from medaudit.config import Config
from medaudit.data import AuditDataset
from medaudit.errors import DataError
from medaudit.hookspecs import hookimpl

from .dicom import DICOM_FIELDS, dicom_header_values, dicom_series_files, is_dicom_file, parse_dicom_age, read_dicom_series
from .manifest import ManifestDataset
from .npz import NpzDataset
from .readers import READERS, SUPPORTED, file_kind

MEDAUDIT_API_VERSION = 1

__all__ = [
    "DICOM_FIELDS", "READERS", "SUPPORTED", "ManifestDataset", "NpzDataset", "dicom_header_values",
    "dicom_series_files", "file_kind", "is_dicom_file", "medaudit_open_dataset", "parse_dicom_age", "read_dicom_series",
]


def _scan_for_images(folder: Path, limit: int = 2000) -> tuple[bool, bool]:
    """``(has DICOM files, has other image files)`` in the first ``limit`` files under ``folder``."""
    dicom = images = False
    seen = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            seen += 1
            p = Path(dirpath) / name
            kind = file_kind(p)
            dicom |= kind == "dicom"
            images |= kind in ("image", "npy", "nifti")
            if (dicom and images) or seen >= limit:
                return dicom, images
    return dicom, images


@hookimpl
def medaudit_open_dataset(path: Path, config: Config) -> AuditDataset | None:
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".npz"):
        if not path.is_file():
            raise DataError(f"dataset {path} does not exist")
        return NpzDataset(path, config)
    if name.endswith(".csv"):
        if not path.is_file():
            raise DataError(f"manifest {path} does not exist")
        return ManifestDataset(path, config)
    if not path.is_dir():
        return None
    manifest = path / "manifest.csv"
    if manifest.is_file():
        return ManifestDataset(manifest, config)
    if not any(path.iterdir()):
        raise DataError(f"{path}: the dataset folder is empty; it needs a manifest.csv (path,label[,metadata…]) and the images")
    dicom, images = _scan_for_images(path)
    if dicom or images:
        what = "DICOM files" if dicom else "image files"
        raise DataError(
            f"{path}: folder holds {what} but no manifest.csv, so the labels are unknown; write {manifest} with a "
            "header 'path,label' (plus metadata columns) and one row per image, paths relative to the folder "
            "(a sub-folder holding one DICOM series is one 3-D volume)"
        )
    return None
