"""DICOM files and series folders: pixels in physical units, header fields as metadata.

Each reader returns a channel-first array: ``[C, H, W]``, or ``[C, D, H, W]`` for a series
folder (one folder = one 3-D volume) and ``[C, F, H, W]`` for a multi-frame file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medaudit.imagefile import ImageFormatError

DICOM_EXTS = (".dcm", ".dicom", ".ima")

# DICOM header fields exposed as metadata columns (for subgroup analysis) when the manifest does
# not already have a column of that name.
DICOM_FIELDS = (
    "PatientSex", "PatientAge", "Manufacturer", "ManufacturerModelName", "InstitutionName",
    "MagneticFieldStrength", "SliceThickness", "KVP", "BodyPartExamined",
)
_DICOM_NUMERIC = {"MagneticFieldStrength", "SliceThickness", "KVP"}

# Age String (AS) units in DICOM PS3.5 §6.2, as fractions of a year.
_AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


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
