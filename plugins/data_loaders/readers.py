"""Which reader handles an image file, by extension first and then the DICOM marker.

Each reader returns a channel-first array: ``[C, H, W]`` or ``[C, D, H, W]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medaudit.imagefile import read_nifti, read_npy, read_pil

from .dicom import DICOM_EXTS, is_dicom_file, read_dicom, read_dicom_series

PIL_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPY_EXTS = (".npy",)
NIFTI_EXTS = (".nii", ".nii.gz")
SUPPORTED = "PNG, JPEG, TIFF, BMP, NPY, NIfTI (.nii/.nii.gz), DICOM (.dcm or files with a DICM header) or a DICOM series folder"


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
