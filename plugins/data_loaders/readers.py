"""Which reader handles an image file, by extension first and then the DICOM marker.

Each reader returns a channel-first array: ``[C, H, W]`` or ``[C, D, H, W]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medaudit.imagefile import read_nifti, read_npy, read_pil

from .common import dims_from_shape
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


def file_dims(kind: str, path: Path, channels: int) -> tuple[int | None, str]:
    """``input.dims: auto`` from one file's header: ``(2 or 3, what the file is)``; None when
    the shape fits neither. Reads no pixels (except a ``.npy``'s, memory-mapped)."""
    if kind == "dicom_series":
        return 3, "a DICOM series folder"
    if kind == "nifti":
        import nibabel as nib

        shape = tuple(nib.load(path).shape)
        volume = len(shape) >= 3 and shape[2] != 1
        return (3 if volume else 2), f"a NIfTI {'volume' if volume else 'image'} of shape {shape}"
    if kind == "image":
        from PIL import Image

        with Image.open(path) as im:
            pages = int(getattr(im, "n_frames", 1))
        return (3, f"a {pages}-page stack") if pages > 1 else (2, "a 2-D image")
    if kind == "dicom":
        import pydicom

        frames = int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
        return (3, f"a {frames}-frame DICOM file") if frames > 1 else (2, "a single-frame DICOM file")
    shape = tuple(np.load(path, allow_pickle=False, mmap_mode="r").shape)
    return dims_from_shape(shape, channels), f"an array of shape {shape}"
