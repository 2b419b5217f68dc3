"""MedMNIST-style ``.npz`` datasets: ``images`` and ``labels`` (or ``test_images`` / ``test_labels``)
plus optional ``meta_<column>`` arrays. ``images`` without ``labels`` is an unlabelled data set
(what an ``--ood-data`` set may be); ``input.dims: auto`` is read from the images' shape.

Loaded with ``allow_pickle=False`` always; uncompressed members are memory-mapped so DataLoader
workers share the pages.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medaudit.config import Config, TaskConfig
from medaudit.data import AuditDataset, resolve_dims, structure_maps, to_channel_first
from medaudit.errors import DataError, one_line
from medaudit.hashing import sha256_files
from medaudit.imagefile import looks_channels_last
from medaudit.task import TARGET_CLASS_SET, TARGET_LABEL_MAP, task_of

from .common import check_channel_count, dims_from_shape, finalize_labels


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
            raise DataError(f"{path}: not a readable .npz file ({one_line(exc)}); re-save it with np.savez") from None
        with zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            label_maps = task_of(config.task).targets == TARGET_LABEL_MAP
            image_key, label_key, meta_prefix = self._choose_keys(path, members, label_maps)
            try:
                shape, _, dtype = _npz_member_header(zf, members[image_key])
            except (ValueError, OSError, zipfile.BadZipFile) as exc:
                raise DataError(f"{path}: array {image_key!r} is unreadable ({one_line(exc)}); re-save the file") from None
            if dtype.hasobject:
                raise DataError(f"{path}: array {image_key!r} holds Python objects, which medaudit never unpickles; "
                                "save images as a numeric array")
            self._memmap = _npz_memmap(path, zf, members[image_key])
        self.image_key = image_key
        self._images: np.ndarray | None = self._memmap
        input_cfg, task = config.input, config.task
        small = ([label_key] if label_key else []) + [k for k in members if k.startswith(meta_prefix)]
        arrays = self._load_small(path, small)
        n = shape[0] if shape else 0
        raw_labels = arrays.pop(label_key) if label_key else None
        if raw_labels is not None and raw_labels.shape[:1] != (n,):
            raise DataError(f"{path}: {image_key!r} has {n} images but {label_key!r} has shape {raw_labels.shape}; "
                            "they must have the same first dimension")
        if n == 0:
            raise DataError(f"{path}: the dataset is empty: {image_key!r} holds no images (shape {tuple(shape)}); "
                            "re-save the file with at least one image and its label")
        sample_shape = tuple(shape[1:])
        if input_cfg.dims == "auto":
            dims = dims_from_shape(sample_shape, input_cfg.channels)
            if dims is None:
                raise DataError(f"{path}: {image_key!r} has shape {tuple(shape)}: {len(sample_shape)} dimensions per image, "
                                "neither a 2-D image nor a 3-D volume (input.dims: auto); expected [N, H, W], [N, C, H, W], "
                                "[N, H, W, C], [N, D, H, W] or [N, C, D, H, W]")
            input_cfg = resolve_dims(input_cfg, dims, f"{path} ({image_key!r}, shape {tuple(shape)})")
        if len(sample_shape) not in (input_cfg.dims, input_cfg.dims + 1):
            raise DataError(
                f"{path}: {image_key!r} has shape {tuple(shape)}: {len(sample_shape)} dimensions per image, but input.dims "
                f"is {input_cfg.dims} (expected [N, H, W], [N, C, H, W] or [N, H, W, C] in 2-D, [N, D, H, W] or "
                "[N, C, D, H, W] in 3-D); set input.dims to match the data"
            )
        self.channels_last = len(sample_shape) == input_cfg.dims + 1 and looks_channels_last(sample_shape)
        if len(sample_shape) == input_cfg.dims + 1:
            c = sample_shape[-1] if self.channels_last else sample_shape[0]
            check_channel_count((c, *sample_shape), input_cfg, f"{path} ({image_key!r})")
        ids = [str(i) for i in range(n)]
        labels = None
        self._masks: np.ndarray | None = None
        if raw_labels is None:
            wanted = "masks" if label_maps else "labels"
            self.unlabelled = f"it holds no {'test_' + wanted if image_key == 'test_images' else wanted} array " \
                              f"(arrays: {sorted(members)})"
        elif label_maps:
            spatial = sample_shape[:-1] if self.channels_last else sample_shape[len(sample_shape) - input_cfg.dims:]
            channels = raw_labels.ndim == len(spatial) + 2
            masks = raw_labels[:, 0] if channels and raw_labels.shape[1] == 1 else raw_labels
            if tuple(masks.shape[2 if channels and raw_labels.shape[1] > 1 else 1:]) != tuple(spatial):
                raise DataError(f"{path}: {label_key!r} has shape {tuple(raw_labels.shape)} but the images' spatial shape "
                                f"is {tuple(spatial)} ({image_key!r} {tuple(shape)}); a mask must cover its image voxel "
                                "for voxel: store [N, *spatial] class indices (or [N, K, *spatial] 0/1 maps of "
                                "overlapping structures)")
            if masks.ndim == len(spatial) + 2:  # one 0/1 map per structure: bool, as the task reads them
                masks = structure_maps(masks, f"{path} ({label_key!r})")
            elif masks.dtype == np.bool_:  # a bool label map holds classes 0 and 1: integers, not structures
                masks = masks.astype(np.uint8)
            self._masks = masks
            self.label_maps = True
            labels, task = finalize_labels(masks, task, f"{path} ({label_key!r})", ids)
        else:
            labels, task = self._labels(raw_labels, task, f"{path} ({label_key!r})", ids)
        metadata: dict[str, list[Any]] = {}
        for key, arr in arrays.items():
            column = key[len(meta_prefix):]
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.ndim != 1 or len(arr) != n:
                raise DataError(f"{path}: metadata array {key!r} has shape {arr.shape}, expected ({n},) (one value per image)")
            metadata[column] = [_python_value(v) for v in arr.tolist()]
        super().__init__(path, ids, labels, metadata, input_cfg, task)
        self.classes = list(task.classes)

    @staticmethod
    def _choose_keys(path: Path, members: dict[str, str], label_maps: bool = False) -> tuple[str, str | None, str]:
        """The images, labels (None: an unlabelled set) and metadata-prefix keys; for a task whose
        targets are label maps, the labels are the ``masks`` (``test_masks``) array."""
        # MedMNIST files hold train_/val_/test_ splits; an audit evaluates the test split.
        test_prefix = "test_meta_" if any(k.startswith("test_meta_") for k in members) else "meta_"
        if label_maps:
            for images, masks, prefix in (("images", "masks", "meta_"), ("test_images", "test_masks", test_prefix)):
                if images in members:
                    return images, (masks if masks in members else None), prefix
            raise DataError(f"{path}: expected arrays 'images' and 'masks' (a segmentation task), found "
                            f"{sorted(members) or 'none'}; re-save with np.savez(path, images=..., masks=..., meta_<column>=...)")
        if "images" in members and "labels" in members:
            return "images", "labels", "meta_"
        if "test_images" in members and "test_labels" in members:
            return "test_images", "test_labels", test_prefix
        if "images" in members:
            return "images", None, "meta_"
        if "test_images" in members:
            return "test_images", None, test_prefix
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
            raise DataError(f"{path}: cannot read arrays {keys} ({one_line(exc)}); the file may be truncated, re-save it") from None
        return out

    @staticmethod
    def _labels(raw: np.ndarray, task: TaskConfig, where: str, ids: list[str]) -> tuple[np.ndarray, TaskConfig]:
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
        return finalize_labels(raw if raw.ndim == 2 else raw.tolist(), task, where, ids)

    def _image_array(self) -> np.ndarray:
        if self._images is None:
            # Compressed member (np.savez_compressed, as MedMNIST ships): decompress once per process.
            try:
                with np.load(self.path, allow_pickle=False) as npz:
                    self._images = npz[self.image_key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{self.path}: cannot read array {self.image_key!r} ({one_line(exc)}); "
                                "the file may be truncated, re-save it") from None
        return self._images

    def read(self, index: int) -> np.ndarray:
        # np.array copies one image out of the memory map: torch needs a writable array.
        sample = np.array(self._image_array()[index])
        return to_channel_first(sample, self.input_cfg.dims, self.channels_last)

    def read_label_map(self, index: int) -> np.ndarray:
        if self._masks is None:
            raise DataError(f"{self.path}: holds no masks")
        return np.array(self._masks[index])

    def content_hash(self) -> str:
        return sha256_files([self.path])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the file: pickling a memmap would copy every image into the pickle.
        state = self.__dict__.copy()
        state["_images"] = None
        state["_memmap"] = None
        return state
