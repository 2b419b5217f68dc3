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
"""

from __future__ import annotations

import csv
import math
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medaudit.config import Config, InputConfig, TaskConfig
from medaudit.data import AuditDataset, resolve_labels, sha256_files, to_channel_first
from medaudit.task import TARGET_CLASS_SET, task_of
from medaudit.errors import DataError
from medaudit.hookspecs import hookimpl
from medaudit.imagefile import (ImageFormatError, looks_channels_last, read_nifti, read_npy,
                                read_pil)

MEDAUDIT_API_VERSION = 1

PIL_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPY_EXTS = (".npy",)
NIFTI_EXTS = (".nii", ".nii.gz")
DICOM_EXTS = (".dcm", ".dicom", ".ima")
SUPPORTED = "PNG, JPEG, TIFF, BMP, NPY, NIfTI (.nii/.nii.gz), DICOM (.dcm or files with a DICM header) or a DICOM series folder"

# DICOM header fields exposed as metadata columns (for subgroup analysis) when the manifest does
# not already have a column of that name.
DICOM_FIELDS = (
    "PatientSex", "PatientAge", "Manufacturer", "ManufacturerModelName", "InstitutionName",
    "MagneticFieldStrength", "SliceThickness", "KVP", "BodyPartExamined",
)
_DICOM_NUMERIC = {"MagneticFieldStrength", "SliceThickness", "KVP"}

# Age String (AS) units in DICOM PS3.5 §6.2, as fractions of a year.
_AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def _one_line(text: object, limit: int = 240) -> str:
    """Exception text squeezed onto one line: CLI errors are one line by convention."""
    s = re.sub(r"\s+", " ", str(text)).strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _python_value(v: Any) -> Any:
    """A metadata cell as a plain Python value; NaN, empty strings and None become None (missing)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str):
        v = v.strip()
        return v or None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _infer_column(values: list[str | None]) -> list[Any]:
    """Turn a CSV column into numbers when every non-empty cell is one.

    Numbers let the subgroup analysis bin continuous attributes (age, field strength). Columns
    with a leading-zero integer ("007") stay strings, because those are identifiers, not amounts.
    """
    present = [v for v in values if v is not None]
    if not present:
        return values
    if all(re.fullmatch(r"[+-]?(0|[1-9]\d*)", v) for v in present):
        return [None if v is None else int(v) for v in values]
    try:
        floats = [None if v is None else float(v) for v in values]
    except ValueError:
        return values
    if any(re.fullmatch(r"[+-]?0\d+", v) for v in present) or any(f is not None and not math.isfinite(f) for f in floats):
        return values
    return floats


def _check_channel_count(shape: Sequence[int], input_cfg: InputConfig, where: str) -> None:
    """Catch a 3-D stack read as a 2-D image with many channels, which is almost always ``input.dims``."""
    c = shape[0]
    if c > 4 and c != input_cfg.channels and input_cfg.dims == 2:
        raise DataError(
            f"{where}: samples have shape {tuple(shape)}, i.e. {c} channels per 2-D image; "
            "if these are 3-D volumes set input.dims: 3, otherwise set input.channels"
        )


def _finalize_labels(raw: Any, task: TaskConfig, where: str) -> tuple[np.ndarray, TaskConfig]:
    """Class indices (or multi-hot rows) and a task config whose ``classes`` are filled in."""
    labels, classes = resolve_labels(raw, task, where)
    return labels, task.model_copy(update={"classes": list(classes)})


# ---------------------------------------------------------------------------------------------
# NPZ (MedMNIST-style)
# ---------------------------------------------------------------------------------------------


def _npz_member_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of an array inside an npz, without reading its data."""
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        return np.lib.format.read_array_header_2_0(fh)


def _npz_memmap(path: Path, zf: zipfile.ZipFile, member: str) -> np.ndarray | None:
    """Memory-map an uncompressed (``np.savez``) npz member; None when it is compressed.

    A stored zip member is a plain ``.npy`` at a fixed offset, so ``np.memmap`` can read it in
    place: the OS pages images in on demand and DataLoader workers share those pages.
    """
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        offset = fh.tell()
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class NpzDataset(AuditDataset):
    """Images, labels and ``meta_<column>`` arrays from one ``.npz`` file."""

    format = "npz"

    def __init__(self, path: Path, config: Config) -> None:
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{path}: not a readable .npz file ({_one_line(exc)}); re-save it with np.savez") from None
        with zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            image_key, label_key, meta_prefix = self._choose_keys(path, members)
            try:
                shape, _, dtype = _npz_member_header(zf, members[image_key])
            except (ValueError, OSError, zipfile.BadZipFile) as exc:
                raise DataError(f"{path}: array {image_key!r} is unreadable ({_one_line(exc)}); re-save the file") from None
            if dtype.hasobject:
                raise DataError(f"{path}: array {image_key!r} holds Python objects, which medaudit never unpickles; "
                                "save images as a numeric array")
            self._memmap = _npz_memmap(path, zf, members[image_key])
        self.image_key = image_key
        self._images: np.ndarray | None = self._memmap
        input_cfg, task = config.input, config.task
        arrays = self._load_small(path, [label_key] + [k for k in members if k.startswith(meta_prefix)])
        raw_labels = arrays[label_key]
        n = shape[0] if shape else 0
        if raw_labels.shape[:1] != (n,):
            raise DataError(f"{path}: {image_key!r} has {n} images but {label_key!r} has shape {raw_labels.shape}; "
                            "they must have the same first dimension")
        if n == 0:
            raise DataError(f"{path}: the dataset is empty: {image_key!r} holds no images (shape {tuple(shape)}); "
                            "re-save the file with at least one image and its label")
        sample_shape = tuple(shape[1:])
        if len(sample_shape) not in (input_cfg.dims, input_cfg.dims + 1):
            raise DataError(
                f"{path}: {image_key!r} has shape {tuple(shape)}: {len(sample_shape)} dimensions per image, but input.dims "
                f"is {input_cfg.dims} (expected [N, H, W], [N, C, H, W] or [N, H, W, C] in 2-D, [N, D, H, W] or "
                "[N, C, D, H, W] in 3-D); set input.dims to match the data"
            )
        self.channels_last = len(sample_shape) == input_cfg.dims + 1 and looks_channels_last(sample_shape)
        if len(sample_shape) == input_cfg.dims + 1:
            c = sample_shape[-1] if self.channels_last else sample_shape[0]
            _check_channel_count((c, *sample_shape), input_cfg, f"{path} ({image_key!r})")
        labels, task = self._labels(raw_labels, task, f"{path} ({label_key!r})")
        metadata: dict[str, list[Any]] = {}
        for key, arr in arrays.items():
            if key == label_key:
                continue
            column = key[len(meta_prefix):]
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.ndim != 1 or len(arr) != n:
                raise DataError(f"{path}: metadata array {key!r} has shape {arr.shape}, expected ({n},) (one value per image)")
            metadata[column] = [_python_value(v) for v in arr.tolist()]
        super().__init__(path, [str(i) for i in range(n)], labels, metadata, input_cfg, task)
        self.classes = list(task.classes)

    @staticmethod
    def _choose_keys(path: Path, members: dict[str, str]) -> tuple[str, str, str]:
        if "images" in members and "labels" in members:
            return "images", "labels", "meta_"
        # MedMNIST files hold train_/val_/test_ splits; an audit evaluates the test split.
        if "test_images" in members and "test_labels" in members:
            return "test_images", "test_labels", "test_meta_" if any(k.startswith("test_meta_") for k in members) else "meta_"
        raise DataError(
            f"{path}: expected arrays 'images' and 'labels' (or MedMNIST's 'test_images' and 'test_labels'), "
            f"found {sorted(members) or 'none'}; re-save with np.savez(path, images=..., labels=..., meta_<column>=...)"
        )

    @staticmethod
    def _load_small(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
        """Labels and metadata arrays, loaded eagerly (they are small) and never unpickled."""
        out: dict[str, np.ndarray] = {}
        try:
            with np.load(path, allow_pickle=False) as npz:
                for key in keys:
                    try:
                        out[key] = npz[key]
                    except ValueError as exc:
                        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                            raise DataError(
                                f"{path}: array {key!r} holds Python objects, which medaudit never unpickles "
                                "(it could run arbitrary code); save it as a numeric or fixed-width string array "
                                "(e.g. np.asarray(values, dtype=str))"
                            ) from None
                        raise
        except DataError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: cannot read arrays {keys} ({_one_line(exc)}); the file may be truncated, re-save it") from None
        return out

    @staticmethod
    def _labels(raw: np.ndarray, task: TaskConfig, where: str) -> tuple[np.ndarray, TaskConfig]:
        if raw.ndim == 2 and raw.shape[1] == 1:
            raw = raw[:, 0]
        if raw.ndim == 2 and task_of(task).targets != TARGET_CLASS_SET:
            raise DataError(f"{where}: labels have shape {raw.shape} (several per image) but task.type is "
                            f"{task.type!r}; set task.type: multilabel, or store one label per image")
        if raw.dtype.kind == "f":
            if not np.isfinite(raw).all() or not np.equal(np.mod(raw, 1), 0).all():
                raise DataError(f"{where}: labels must be integers or class names, found non-integer floats")
            raw = raw.astype(np.int64)
        if raw.dtype.kind == "b":
            raw = raw.astype(np.int64)
        return _finalize_labels(raw if raw.ndim == 2 else raw.tolist(), task, where)

    def _image_array(self) -> np.ndarray:
        if self._images is None:
            # Compressed member (np.savez_compressed, as MedMNIST ships): decompress once per process.
            try:
                with np.load(self.path, allow_pickle=False) as npz:
                    self._images = npz[self.image_key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{self.path}: cannot read array {self.image_key!r} ({_one_line(exc)}); "
                                "the file may be truncated, re-save it") from None
        return self._images

    def read(self, index: int) -> np.ndarray:
        # np.array copies one image out of the memory map: torch needs a writable array.
        sample = np.array(self._image_array()[index])
        return to_channel_first(sample, self.input_cfg.dims, self.channels_last)

    def content_hash(self) -> str:
        return sha256_files([self.path])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the file: pickling a memmap would copy every image into the pickle.
        state = self.__dict__.copy()
        state["_images"] = None
        state["_memmap"] = None
        return state


# ---------------------------------------------------------------------------------------------
# Image readers (each returns a channel-first array: [C, H, W] or [C, D, H, W])
# ---------------------------------------------------------------------------------------------


def is_dicom_file(path: Path) -> bool:
    """True when the file has the DICOM Part 10 preamble marker ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def parse_dicom_age(value: Any) -> float | None:
    """DICOM Age String to years: ``"045Y"`` → 45.0, ``"006M"`` → 0.5, weeks and days likewise.

    A bare number is read as years (common in hand-edited headers); anything else is missing.
    """
    if value is None:
        return None
    s = str(value).strip().upper()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([YMWD]?)", s)
    if not m:
        return None
    years = float(m.group(1)) * _AGE_UNITS[m.group(2) or "Y"]
    return round(years, 4)


def dicom_header_values(ds: Any) -> dict[str, Any]:
    """The subgroup-relevant header fields of one dataset (None where absent or unparseable)."""
    out: dict[str, Any] = {}
    for kw in DICOM_FIELDS:
        try:
            raw = ds.get(kw)
        except Exception:  # a malformed value (e.g. DS "abc") must not sink the whole dataset
            raw = None
        if raw is None or str(raw).strip() == "":
            out[kw] = None
        elif kw == "PatientAge":
            out[kw] = parse_dicom_age(raw)
        elif kw in _DICOM_NUMERIC:
            try:
                out[kw] = float(raw)
            except (TypeError, ValueError):
                out[kw] = None
        else:
            out[kw] = str(raw).strip()
    return out


def _dicom_to_array(ds: Any) -> np.ndarray:
    """Pixels of one DICOM dataset, channel-first, in physical units where the header gives them.

    The modality LUT (RescaleSlope/Intercept, e.g. CT → Hounsfield units) is applied, then
    MONOCHROME1 images (where low values are bright, as in many CR/DX files) are inverted over
    their full output range so that bright means dense in every image medaudit hands a model.
    Returns ``[C, H, W]`` or, for multi-frame files, ``[C, F, H, W]``.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    colour = arr.ndim == (4 if frames > 1 else 3)
    if not colour:
        out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        if photometric == "MONOCHROME1":
            lo, hi = _stored_range(ds, arr)
            ends = np.asarray(apply_modality_lut(np.array([lo, hi], dtype=np.float64), ds), dtype=np.float64)
            out = (ends.min() + ends.max()) - out
        return out[None]
    return np.moveaxis(arr, -1, 0)


def _stored_range(ds: Any, arr: np.ndarray) -> tuple[float, float]:
    """The range stored pixel values can take (BitsStored, PixelRepresentation)."""
    bits = ds.get("BitsStored")
    if arr.dtype.kind in "iu" and bits:
        bits = int(bits)
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:
            return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
        return 0.0, 2.0**bits - 1
    return float(arr.min()), float(arr.max())


def read_dicom(path: Path, dims: int) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageFormatError("DICOM file holds no pixel data (is it a DICOMDIR, report or segmentation?)")
    return _dicom_to_array(ds)


def dicom_series_files(folder: Path) -> list[Path]:
    """Every DICOM (DICM-marked or ``.dcm``) file directly in ``folder``, sorted by name."""
    files = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        p = Path(entry.path)
        if p.suffix.lower() in DICOM_EXTS or is_dicom_file(p):
            files.append(p)
    return files


def _slice_key(ds: Any) -> float | None:
    """Position of a slice along its normal (ImageOrientationPatient × ImagePositionPatient)."""
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if iop.shape != (6,) or ipp.shape != (3,):
        return None
    return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))


def read_dicom_series(folder: Path, dims: int) -> np.ndarray:
    """A folder of single-frame slices of one series as a ``[C, D, H, W]`` volume.

    Slices are sorted by position along the slice normal (ImagePositionPatient projected on the
    normal of ImageOrientationPatient), falling back to InstanceNumber, then to file name.
    """
    import pydicom

    datasets = []
    for f in dicom_series_files(folder):
        ds = pydicom.dcmread(f)
        if "PixelData" in ds:  # DICOMDIRs, structured reports etc. share folders with images
            datasets.append((f, ds))
    if not datasets:
        raise ImageFormatError("series folder holds no DICOM images")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise ImageFormatError(f"folder mixes {len(series)} series (SeriesInstanceUID); put one series per folder")
    multi = [f.name for f, ds in datasets if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise ImageFormatError(f"series folder holds multi-frame file(s) {multi[:3]}; list a multi-frame file directly instead")
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in datasets}
    if len(sizes) > 1:
        raise ImageFormatError(f"slices have different sizes {sorted(sizes)}")
    keys = [_slice_key(ds) for _, ds in datasets]
    instance = [ds.get("InstanceNumber") for _, ds in datasets]
    if all(k is not None for k in keys):
        order = sorted(range(len(datasets)), key=lambda i: (keys[i], int(instance[i] or 0), datasets[i][0].name))
        ks = [keys[i] for i in order]
        dupes = [datasets[order[j]][0].name for j in range(1, len(ks)) if abs(ks[j] - ks[j - 1]) < 1e-4]
        if dupes:
            raise ImageFormatError(
                f"several slices share a position (e.g. {dupes[0]}); the folder holds more than one volume "
                "(echoes, time points or series); put one volume per folder"
            )
    elif all(v is not None for v in instance):
        order = sorted(range(len(datasets)), key=lambda i: (int(instance[i]), datasets[i][0].name))
    else:
        order = list(range(len(datasets)))
    slices = [_dicom_to_array(datasets[i][1]) for i in order]  # each [C, H, W], rescaled per slice
    return np.stack(slices, axis=1)


READERS: dict[str, Callable[[Path, int], np.ndarray]] = {
    "image": read_pil,
    "npy": read_npy,
    "nifti": read_nifti,
    "dicom": read_dicom,
    "dicom_series": read_dicom_series,
}


def file_kind(path: Path) -> str | None:
    """Which reader handles ``path`` (extension first, then the DICOM marker); None if none."""
    if path.is_dir():
        return "dicom_series"
    name = path.name.lower()
    if name.endswith(NIFTI_EXTS):
        return "nifti"
    if name.endswith(PIL_EXTS):
        return "image"
    if name.endswith(NPY_EXTS):
        return "npy"
    if name.endswith(DICOM_EXTS) or is_dicom_file(path):
        return "dicom"
    return None


# ---------------------------------------------------------------------------------------------
# Manifest CSV
# ---------------------------------------------------------------------------------------------


def _read_manifest(csv_path: Path) -> tuple[list[str], list[dict[str, str | None]]]:
    """Header and rows of a manifest; cells are stripped, empty cells become None."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a BOM
            reader = csv.reader(fh)
            header = next(reader, None)
            body = list(reader)
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: manifest is not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: not a valid CSV file ({_one_line(exc)})") from None
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read the manifest ({_one_line(exc)})") from None
    if header is None:
        raise DataError(f"{csv_path}: manifest is empty; it needs a header row 'path,label[,metadata columns…]' and one row per image")
    header = [h.strip() for h in header]
    lower = [h.lower() for h in header]
    missing = [c for c in ("path", "label") if c not in lower]
    if missing:
        raise DataError(f"{csv_path}: manifest has no {' or '.join(repr(c) for c in missing)} column (columns: {header}); "
                        "the header must start 'path,label' followed by any metadata columns")
    dupes = sorted({h for h in lower if lower.count(h) > 1 and h})
    if dupes:
        raise DataError(f"{csv_path}: manifest has duplicated column names {dupes}; rename them")
    # Canonical lower-case names for the two required columns; metadata columns keep their case.
    names = ["path" if h == "path" else "label" if h == "label" else header[k] for k, h in enumerate(lower)]
    rows: list[dict[str, str | None]] = []
    for cells in body:
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) > len(names):
            raise DataError(f"{csv_path}, row {len(rows) + 1}: {len(cells)} cells but the header names {len(names)} columns; "
                            "quote cells that contain commas")
        rows.append({n: (cells[k].strip() or None) if k < len(cells) else None for k, n in enumerate(names)})
    if not rows:
        raise DataError(f"{csv_path}: the dataset is empty (the manifest has a header but no rows); add one row per image")
    return names, rows


def _resolve_row_path(root: Path, cell: str) -> Path:
    """A manifest path relative to the manifest's folder (absolute paths kept, Windows separators accepted)."""
    p = root / cell
    if not p.exists() and "\\" in cell:
        p = root / cell.replace("\\", "/")
    return p


def _multilabel_cells(cells: list[str | None], task: TaskConfig, where: str) -> np.ndarray:
    """``label`` cells listing class names separated by ``|`` or ``;`` as a multi-hot ``[N, K]`` array."""
    names = [[t.strip() for t in re.split(r"[|;]", c or "") if t.strip()] for c in cells]
    classes = list(task.classes) or sorted({t for row in names for t in row})
    index = {c: k for k, c in enumerate(classes)}
    out = np.zeros((len(cells), len(classes)), dtype=np.int64)
    for i, row in enumerate(names):
        for t in row:
            if t not in index:
                raise DataError(f"{where}, row {i + 1}: label {t!r} is not one of the classes {classes} (task.classes)")
            out[i, index[t]] = 1
    return out


class ManifestDataset(AuditDataset):
    """Images listed in a CSV manifest: ``path,label[,metadata columns…]``."""

    format = "manifest"

    def __init__(self, csv_path: Path, config: Config) -> None:
        input_cfg, task = config.input, config.task
        names, rows = _read_manifest(csv_path)
        root = csv_path.parent
        self.rel_paths: list[str] = []
        self.files: list[Path] = []
        self.kinds: list[str] = []
        missing: list[tuple[int, str, Path]] = []
        for i, row in enumerate(rows):
            cell = row["path"]
            if cell is None:
                raise DataError(f"{csv_path}, row {i + 1}: empty 'path' cell; give the image path relative to {root}")
            if row["label"] is None and task_of(task).targets != TARGET_CLASS_SET:
                raise DataError(f"{csv_path}, row {i + 1} ({cell}): empty 'label' cell; give the class name or index")
            p = _resolve_row_path(root, cell)
            self.rel_paths.append(cell)
            self.files.append(p)
            if not p.exists():
                missing.append((i, cell, p))
                self.kinds.append("")
                continue
            kind = file_kind(p)
            if kind is None:
                raise DataError(f"{csv_path}, row {i + 1}: {cell!r} is not a supported image file (supported: {SUPPORTED})")
            self.kinds.append(kind)
        if missing:
            i, cell, p = missing[0]
            more = f" (and {len(missing) - 1} more missing files, e.g. {[m[1] for m in missing[1:4]]})" if len(missing) > 1 else ""
            raise DataError(f"{csv_path}, row {i + 1}: file {cell!r} does not exist (looked for {p}){more}; "
                            "fix the path (relative to the manifest's folder) or remove the row")
        where = str(csv_path)
        label_cells = [row["label"] for row in rows]
        if task_of(task).targets == TARGET_CLASS_SET:
            labels, task = _finalize_labels(_multilabel_cells(label_cells, task, where), task, where)
        else:
            labels, task = _finalize_labels(label_cells, task, where)
        metadata: dict[str, list[Any]] = {
            name: _infer_column([row[name] for row in rows]) for name in names if name not in ("path", "label")
        }
        metadata.update(self._dicom_metadata(csv_path, set(n.lower() for n in names)))
        super().__init__(csv_path, self.rel_paths, labels, metadata, input_cfg, task)
        self.classes = list(task.classes)

    def _dicom_metadata(self, csv_path: Path, existing: set[str]) -> dict[str, list[Any]]:
        """DICOM header fields as metadata columns; reading headers here also fails fast on broken files."""
        import pydicom

        wanted = [kw for kw in DICOM_FIELDS if kw.lower() not in existing]
        dicom_rows = [i for i, k in enumerate(self.kinds) if k in ("dicom", "dicom_series")]
        if not wanted or not dicom_rows:
            return {}
        columns: dict[str, list[Any]] = {kw: [None] * len(self.files) for kw in wanted}
        for i in dicom_rows:
            target = self.files[i]
            if self.kinds[i] == "dicom_series":
                slices = dicom_series_files(target)
                if not slices:
                    raise DataError(f"{csv_path}, row {i + 1}: folder {self.rel_paths[i]!r} holds no DICOM files; "
                                    "a folder in the manifest must be one DICOM series")
                target = slices[0]
            try:
                ds = pydicom.dcmread(target, stop_before_pixels=True)
            except Exception as exc:  # pydicom raises many types for damaged headers
                raise DataError(f"{csv_path}, row {i + 1}: {target.name!r} is not a readable DICOM file "
                                f"({_one_line(exc)}); re-export it or remove the row") from None
            for kw, v in dicom_header_values(ds).items():
                if kw in columns:
                    columns[kw][i] = v
        # Only fields some file actually has: a column of all-missing values adds nothing.
        return {kw: vals for kw, vals in columns.items() if any(v is not None for v in vals)}

    def describe_sample(self, index: int) -> str:
        return f"{self.path}, row {index + 1} ({self.rel_paths[index]})"

    def read(self, index: int) -> np.ndarray:
        kind, path = self.kinds[index], self.files[index]
        try:
            arr = READERS[kind](path, self.input_cfg.dims)
        except ImageFormatError as exc:
            raise DataError(f"{self.describe_sample(index)}: {exc}") from None
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"{self.describe_sample(index)}: file disappeared since the manifest was opened; restore it") from None
        except Exception as exc:  # decoders raise anything from OSError to zlib.error on damaged files
            raise DataError(
                f"{self.describe_sample(index)}: cannot decode {kind} file ({type(exc).__name__}: {_one_line(exc)}); "
                "the file is probably truncated or corrupt: re-export or re-copy it, or remove the row"
            ) from exc
        if arr.ndim == self.input_cfg.dims + 1:
            _check_channel_count(arr.shape, self.input_cfg, self.describe_sample(index))
        return arr

    def content_hash(self) -> str:
        files: list[Path] = [self.path]
        for kind, p in zip(self.kinds, self.files):
            if kind == "dicom_series":
                files.extend(sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")))
            else:
                files.append(p)
        return sha256_files(files)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


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
