"""Single-image I/O for ``medaudit perturb``: read, perturb and write one ``.npy``, ``.png`` or NIfTI file.

Arrays are channel-first float32 in the file's own intensity units:

* ``.npy``: a 2-D array ``(H, W)`` gets a channel axis (and loses it again when written back);
  ``(C, H, W)`` and ``(C, D, H, W)`` are channel-first, unless the last axis has 3 or 4 entries
  and the first does not look like channels (then it is channels-last RGB[A], as for datasets).
* ``.png``: 8- or 16-bit greyscale -> ``[1, H, W]``; RGB (palette and RGBA converted, alpha dropped)
  -> ``[3, H, W]``. Written back at the bit depth read (8-bit when the source was not a PNG).
* ``.nii`` / ``.nii.gz``: ``(X, Y, Z)`` -> ``[1, X, Y, Z]``, ``(X, Y, Z, T)`` -> ``[T, X, Y, Z]``,
  ``(X, Y)`` -> ``[1, X, Y]``; written back with the source's affine (identity if none).

Every failure is a :class:`~medaudit.errors.DataError` naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import to_channel_first
from .errors import DataError
from .perturbation import Perturbation, check_severity
from .rng import SampleRNG, sample_keys, stream_key

SUFFIXES = (".npy", ".png", ".nii", ".nii.gz")


def _kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".nii", ".npy", ".png"):
        if name.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unsupported image file type; use one of {', '.join(SUFFIXES)}")


# ---------------------------------------------------------------------------------------------
# Readers shared with the dataset loaders (each returns a channel-first array: [C, H, W] or
# [C, D, H, W]); the loader plugin adds manifests, DICOM and error context around them.
# ---------------------------------------------------------------------------------------------


class ImageFormatError(ValueError):
    """A readable file whose content cannot be used (wrong layout, objects): reported as-is, not as a decoding error."""


def channel_first_guess(arr: np.ndarray, dims: int) -> np.ndarray:
    """Channel-first layout for arrays without a header saying where channels are (NPY, NPZ).

    An array with one axis more than ``dims`` is channels-last when its last axis has 3 or 4
    entries (RGB[A]) and its first axis does not look like a channel axis; otherwise
    channel-first (the PyTorch convention).
    """
    if arr.ndim == dims + 1:
        return to_channel_first(arr, dims, channels_last=looks_channels_last(arr.shape))
    try:
        return to_channel_first(arr, dims, channels_last=False)
    except ValueError as exc:
        raise ImageFormatError(f"array of shape {arr.shape} {exc}; set input.dims to match the data") from None


def looks_channels_last(sample_shape: Sequence[int]) -> bool:
    return sample_shape[-1] in (3, 4) and sample_shape[0] not in (1, 3, 4)


def pil_frame(im: Any) -> np.ndarray:
    """One Pillow frame as ``[H, W]`` (grey, 8/16/32-bit or float) or ``[H, W, 3]`` (colour)."""
    mode = im.mode
    if mode in ("1", "LA", "La"):
        im = im.convert("L")  # alpha carries no diagnostic content; bilevel becomes 0/255
    elif mode in ("P", "PA"):
        im = im.convert("RGB")  # palette indices are not intensities
    elif mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    # np.array, not np.asarray: Pillow's array interface gives a read-only view, and torch.from_numpy
    # warns (once per process, on stderr) about non-writable arrays.
    return np.array(im)


def read_pil(path: Path, dims: int) -> np.ndarray:
    """PNG/JPEG/TIFF/BMP, 8- or 16-bit; a multi-page TIFF is a ``[D, H, W]`` stack."""
    from PIL import Image

    with Image.open(path) as im:
        n_frames = int(getattr(im, "n_frames", 1))
        frames = []
        for k in range(n_frames):
            im.seek(k)
            frames.append(pil_frame(im))
    if any(f.shape != frames[0].shape for f in frames):
        raise ImageFormatError(f"pages have different sizes {sorted({f.shape for f in frames})}")
    arr = frames[0] if n_frames == 1 else np.stack(frames)
    return np.moveaxis(arr, -1, 0) if frames[0].ndim == 3 else arr[None]


def read_npy(path: Path, dims: int) -> np.ndarray:
    """A ``.npy`` array, never unpickled; channels located as for npz images."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        if "Python objects" in str(exc) or "allow_pickle" in str(exc):
            raise ImageFormatError("array holds Python objects, which medaudit never unpickles (it could run arbitrary "
                            "code); save a numeric array") from None
        raise
    return channel_first_guess(np.array(arr), dims)


def read_nifti(path: Path, dims: int) -> np.ndarray:
    """NIfTI-1/2 with its scaling (scl_slope/scl_inter) applied, in voxel order ``[C, X, Y, Z]``.

    Axes 1-3 of a NIfTI are spatial by definition; a 4th (time) and 5th (vector) axis become
    channels. Voxel order is kept (no reorientation), as MONAI's ``LoadImage`` does, so a model
    trained on MONAI-loaded volumes sees the same layout.
    """
    import nibabel as nib

    img = nib.load(path)
    arr = np.asanyarray(img.dataobj)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)  # scaled data comes back as float64; halve the memory
    shape = arr.shape
    if arr.ndim < 2:
        raise ImageFormatError(f"NIfTI image has shape {shape}; expected at least 2 spatial dimensions")
    if dims == 2:
        if arr.ndim >= 3 and shape[2] != 1:
            raise ImageFormatError(f"is a 3-D volume of shape {shape} but input.dims is 2; set input.dims: 3 or give 2-D slices")
        spatial = shape[:2]
        rest = shape[3:] if arr.ndim >= 3 else ()
    else:
        if arr.ndim < 3 or shape[2] == 1:
            raise ImageFormatError(f"is a 2-D image of shape {shape} but input.dims is 3; set input.dims: 2")
        spatial = shape[:3]
        rest = shape[3:]
    channels = int(np.prod(rest)) if rest else 1
    return np.moveaxis(arr.reshape(*spatial, channels), -1, 0)


def read_image(path: str | Path, dims: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one image as a channel-first float32 array plus the metadata needed to write it back.

    ``dims`` (2 or 3) says how many spatial axes a ``.npy`` array has, which its shape alone
    cannot: by default a 3-axis array is ``(C, H, W)``; with ``dims=3`` it is a ``(D, H, W)``
    volume. Other formats say it themselves, and ``dims`` must agree with them.
    """
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if dims not in (None, 2, 3):
        raise DataError(f"{path}: dims must be 2 or 3, got {dims}")
    meta: dict[str, Any] = {"format": kind, "source": str(path)}
    try:
        if kind == ".npy":
            ndim = np.load(path, allow_pickle=False, mmap_mode="r").ndim
            nd = dims if dims is not None else (2 if ndim <= 3 else 3)
            if ndim not in (nd, nd + 1):
                want = "(H, W) or (C, H, W)" if nd == 2 else "(D, H, W) or (C, D, H, W)"
                raise DataError(f"{path}: expected a {want} array for {nd}-D images, got {ndim} dimensions")
            meta["squeezed"] = ndim == nd  # no channel axis: written back without one
            arr = read_npy(path, nd)
        elif kind == ".png":
            from PIL import Image

            with Image.open(path) as im:
                meta["mode"] = im.mode
                meta["bit_depth"] = 16 if im.mode in ("I;16", "I;16B", "I;16L", "I") else 8
            arr = read_pil(path, 2)
        else:
            import nibabel as nib

            img = nib.load(path)
            shape = img.shape
            if len(shape) not in (2, 3, 4):
                raise DataError(f"{path}: expected a 2-D, 3-D or 4-D NIfTI image, got shape {shape}")
            meta["affine"] = np.asarray(img.affine, dtype=np.float64)
            meta["zooms"] = tuple(float(z) for z in img.header.get_zooms())
            meta["channels_last"] = len(shape) == 4
            arr = read_nifti(path, 3 if len(shape) >= 3 and shape[2] != 1 else 2)
    except DataError:
        raise
    except Exception as exc:  # corrupt or truncated file, unusable layout: name it instead of a bare traceback
        raise DataError(f"{path}: cannot read {kind} image: {type(exc).__name__}: {exc}") from exc
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dims is not None and arr.ndim - 1 != dims:
        raise DataError(f"{path}: is a {arr.ndim - 1}-D image (channel-first shape {arr.shape}), not {dims}-D")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: image contains NaN or Inf values")
    return arr, meta


def write_image(path: str | Path, array: np.ndarray, like_meta: dict[str, Any] | None = None) -> None:
    """Write a channel-first array in the format of ``path``'s extension, reusing ``like_meta``
    (from :func:`read_image`) for what the format keeps: PNG bit depth, NIfTI affine, .npy shape."""
    path = Path(path)
    kind = _kind(path)
    meta = like_meta or {}
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim not in (3, 4):
        raise DataError(f"{path}: expected a channel-first (C, H, W) or (C, D, H, W) array to write, got shape {arr.shape}")
    try:
        if kind == ".npy":
            np.save(path, arr[0] if meta.get("squeezed") and arr.shape[0] == 1 else arr)
        elif kind == ".png":
            from PIL import Image

            if arr.ndim != 3 or arr.shape[0] not in (1, 3):
                raise DataError(f"{path}: PNG holds a 2-D grey or RGB image, got channel-first shape {arr.shape}")
            bits = meta.get("bit_depth")
            if meta.get("format") != ".png" or bits not in (8, 16):
                # values are not in PNG units: spread the image's own range over 8 bits
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                bits = 8
            top = 255 if bits == 8 else 65535
            ints = np.clip(np.rint(arr), 0, top)
            if arr.shape[0] == 3:
                if bits != 8:
                    raise DataError(f"{path}: 16-bit RGB PNG is not supported")
                Image.fromarray(ints.transpose(1, 2, 0).astype(np.uint8), mode="RGB").save(path)
            elif bits == 8:
                Image.fromarray(ints[0].astype(np.uint8), mode="L").save(path)
            else:
                Image.fromarray(ints[0].astype(np.uint16)).save(path)
        else:
            import nibabel as nib

            data = np.moveaxis(arr, 0, -1) if meta.get("channels_last") else (arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1))
            affine = meta.get("affine")
            nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot write {kind} image: {type(exc).__name__}: {exc}") from exc


def single_sample_rng(seed: int, name: str, severity: int, device: torch.device | str = "cpu") -> SampleRNG:
    """The stream of one stand-alone image: sample 0 of ``stream_key(seed, name, severity)``."""
    return SampleRNG(sample_keys(stream_key(seed, name, severity), torch.tensor([0], device=device)))


def perturb_array(array: np.ndarray, perturbation_cls: type[Perturbation], severity: int,
                  seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Perturb one channel-first image in its own units: min-max scale to [0, 1], perturb as
    sample 0 of stream ``stream_key(seed, name, severity)``, map back to the original range.

    Returns the perturbed array and a record (name, severity, seed, range, sampled parameters).
    """
    check_severity(perturbation_cls.name, severity)
    nd = array.ndim - 1
    if nd not in perturbation_cls.dims:
        raise DataError(f"'{perturbation_cls.name}' supports {perturbation_cls.dims}-D images, this one is {nd}-D (shape {array.shape})")
    lo, hi = float(array.min()), float(array.max())
    scale = hi - lo if hi > lo else 1.0  # a constant image stays constant
    x = torch.from_numpy((array - lo) / scale).float()[None]
    y, params = perturbation_cls()(x, severity, single_sample_rng(seed, perturbation_cls.name, severity))
    out = y[0].numpy().astype(np.float32) * scale + lo
    record = {"perturbation": perturbation_cls.name, "severity": severity, "seed": seed, "range": [lo, hi],
              "params": {k: v[0].tolist() for k, v in params.items()}}
    return out, record


def perturb_file(input: str | Path, output: str | Path, perturbation_cls: type[Perturbation], severity: int,
                 seed: int, dims: int | None = None) -> dict[str, Any]:
    """Read ``input`` (``dims`` as in :func:`read_image`), perturb it (see :func:`perturb_array`)
    and write ``output``; returns the record."""
    array, meta = read_image(input, dims)
    out, record = perturb_array(array, perturbation_cls, severity, seed)
    if meta.get("bit_depth") and Path(output).name.lower().endswith(".png"):
        out = np.rint(out)  # back to the integer grid of the source PNG
    write_image(output, out, meta)
    record.update(input=str(input), output=str(output))
    return record
