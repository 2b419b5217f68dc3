"""CSV manifests of image files: ``path,label[,metadata…]``, one row per image.

A ``manifest.csv`` in a folder, or any CSV given directly, lists PNG/JPEG/TIFF/BMP, NPY, NIfTI
and DICOM files or DICOM series folders. Cheap checks (columns, labels, every file exists, DICOM
headers parse) run when the dataset is opened; decoding problems surface in ``read``. Every error
names the manifest row (row 1 = the first row after the header). A manifest without a ``label``
column is an unlabelled data set (what an ``--ood-data`` set may be); ``input.dims: auto`` is read
from the file of row 1.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

from medaudit.config import Config, TaskConfig
from medaudit.data import AuditDataset, resolve_dims, structure_maps
from medaudit.errors import DataError, one_line
from medaudit.hashing import sha256_files
from medaudit.imagefile import ImageFormatError
from medaudit.task import TARGET_CLASS_SET, TARGET_LABEL_MAP, LabelError, class_list, task_of

from .common import check_channel_count, finalize_labels
from .dicom import DICOM_FIELDS, dicom_header_values, dicom_series_files
from .readers import READERS, SUPPORTED, file_dims, file_kind


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


def _read_manifest(csv_path: Path) -> tuple[list[str], list[dict[str, str | None]]]:
    """Header and rows of a manifest; cells are stripped, empty cells become None.

    ``path`` is required; ``label`` is not (an unlabelled data set), and the caller decides
    whether its role needs one.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a BOM
            reader = csv.reader(fh)
            header = next(reader, None)
            body = list(reader)
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: manifest is not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: not a valid CSV file ({one_line(exc)})") from None
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read the manifest ({one_line(exc)})") from None
    if header is None:
        raise DataError(f"{csv_path}: manifest is empty; it needs a header row 'path,label[,metadata columns…]' and one row per image")
    header = [h.strip() for h in header]
    lower = [h.lower() for h in header]
    if "path" not in lower:
        raise DataError(f"{csv_path}: manifest has no 'path' column (columns: {header}); "
                        "the header must start 'path,label' (or 'path' alone for unlabelled --ood-data) "
                        "followed by any metadata columns")
    dupes = sorted({h for h in lower if lower.count(h) > 1 and h})
    if dupes:
        raise DataError(f"{csv_path}: manifest has duplicated column names {dupes}; rename them")
    # Canonical lower-case names for the two required columns; metadata columns keep their case.
    names = [h if h in ("path", "label", "mask") else header[k] for k, h in enumerate(lower)]
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


def _multilabel_cells(cells: list[str | None], task: TaskConfig, where: str, sample_ids: list[str]) -> np.ndarray:
    """``label`` cells listing class names separated by ``|`` or ``;`` as a multi-hot ``[N, K]`` array."""
    names = [[t.strip() for t in re.split(r"[|;]", c or "") if t.strip()] for c in cells]
    classes = list(task.classes) or sorted({t for row in names for t in row})
    index = {c: k for k, c in enumerate(classes)}
    out = np.zeros((len(cells), len(classes)), dtype=np.int64)
    for i, row in enumerate(names):
        for t in row:
            if t not in index:  # only when task.classes is configured: inferred classes hold every name
                raise LabelError(where, i, f"has label {t!r}, but task.classes names {class_list(classes)}", sample_ids[i])
            out[i, index[t]] = 1
    return out


class _MaskColumn:
    """The 'mask' files of a manifest as a lazy sequence: the task reads one label map at a time
    (which classes it holds, and that its values are classes), never all of them at once."""

    def __init__(self, dataset: ManifestDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.mask_files)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.dataset.read_label_map(i) for i in range(len(self)))


class ManifestDataset(AuditDataset):
    """Images listed in a CSV manifest: ``path,label[,metadata columns…]``."""

    format = "manifest"

    def __init__(self, csv_path: Path, config: Config) -> None:
        input_cfg, task = config.input, config.task
        names, rows = _read_manifest(csv_path)
        label_maps = task_of(task).targets == TARGET_LABEL_MAP
        # a segmentation task's targets are the 'mask' column's label maps; 'label' is then metadata
        labelled = ("mask" if label_maps else "label") in names
        root = csv_path.parent
        self.rel_paths: list[str] = []
        self.files: list[Path] = []
        self.kinds: list[str] = []
        missing: list[tuple[int, str, Path]] = []
        for i, row in enumerate(rows):
            cell = row["path"]
            if cell is None:
                raise DataError(f"{csv_path}, row {i + 1}: empty 'path' cell; give the image path relative to {root}")
            if labelled and label_maps and row["mask"] is None:
                raise DataError(f"{csv_path}, row {i + 1} ({cell}): empty 'mask' cell; give the path of the image's "
                                "label map (relative to the manifest's folder)")
            if labelled and not label_maps and row["label"] is None and task_of(task).targets != TARGET_CLASS_SET:
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
        input_cfg = resolve_dims(input_cfg, self._row_dims(csv_path, input_cfg.channels), str(csv_path)) \
            if input_cfg.dims == "auto" else input_cfg
        where = str(csv_path)
        labels: np.ndarray | None = None
        self.mask_files: list[Path] = []
        self.mask_kinds: list[str] = []
        if not labelled:
            self.unlabelled = f"the manifest has no '{'mask' if label_maps else 'label'}' column (columns: {names})"
        elif label_maps:
            self._find_masks(csv_path, [row["mask"] for row in rows])  # type: ignore[misc]
            self.label_maps = True
            self.path, self.input_cfg = csv_path, input_cfg  # read_label_map, before the base class sets them
            labels, task = finalize_labels(_MaskColumn(self), task, where, self.rel_paths)
        elif task_of(task).targets == TARGET_CLASS_SET:
            cells = _multilabel_cells([row["label"] for row in rows], task, where, self.rel_paths)
            labels, task = finalize_labels(cells, task, where, self.rel_paths)
        else:
            labels, task = finalize_labels([row["label"] for row in rows], task, where, self.rel_paths)
        targets = ("path", "mask") if label_maps else ("path", "label")
        metadata: dict[str, list[Any]] = {
            name: _infer_column([row[name] for row in rows]) for name in names if name not in targets
        }
        metadata.update(self._dicom_metadata(csv_path, set(n.lower() for n in names)))
        super().__init__(csv_path, self.rel_paths, labels, metadata, input_cfg, task)
        self.classes = list(task.classes)

    def _row_dims(self, csv_path: Path, channels: int) -> int:
        """``input.dims: auto``: the spatial dimensions of the file of row 1 (a later row that
        differs fails when it is read, naming its row)."""
        try:
            dims, what = file_dims(self.kinds[0], self.files[0], channels)
        except Exception as exc:  # readers raise anything from OSError to zlib.error on damaged files
            raise DataError(f"{csv_path}, row 1 ({self.rel_paths[0]}): cannot read the file's header to infer "
                            f"input.dims ({type(exc).__name__}: {one_line(exc)}); fix the file or set input.dims") from None
        if dims is None:
            raise DataError(f"{csv_path}, row 1 ({self.rel_paths[0]}): {what} is neither a 2-D image nor a 3-D volume "
                            "(input.dims: auto); save it as (H, W), (C, H, W), (D, H, W) or (C, D, H, W)")
        return dims

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
                                f"({one_line(exc)}); re-export it or remove the row") from None
            for kw, v in dicom_header_values(ds).items():
                if kw in columns:
                    columns[kw][i] = v
        # Only fields some file actually has: a column of all-missing values adds nothing.
        return {kw: vals for kw, vals in columns.items() if any(v is not None for v in vals)}

    def describe_sample(self, index: int) -> str:
        return f"{self.path}, row {index + 1} ({self.rel_paths[index]})"

    def _find_masks(self, csv_path: Path, cells: list[str]) -> None:
        """Resolve the 'mask' column: every file exists and is a format the readers read."""
        for i, cell in enumerate(cells):
            p = _resolve_row_path(csv_path.parent, cell)
            if not p.exists():
                raise DataError(f"{csv_path}, row {i + 1}: mask file {cell!r} does not exist (looked for {p}); fix the "
                                "path (relative to the manifest's folder) or remove the row")
            kind = file_kind(p)
            if kind is None:
                raise DataError(f"{csv_path}, row {i + 1}: mask {cell!r} is not a supported image file (supported: {SUPPORTED})")
            self.mask_files.append(p)
            self.mask_kinds.append(kind)

    def read_label_map(self, index: int) -> np.ndarray:
        """The 'mask' file of row ``index + 1``: class indices ``[*spatial]`` (one channel), or one
        0/1 map per structure ``[K, *spatial]`` bool (:func:`~medaudit.data.structure_maps`)."""
        path = self.mask_files[index]
        where = f"{self.path}, row {index + 1} (mask {path.name})"
        try:
            arr = READERS[self.mask_kinds[index]](path, int(self.input_cfg.dims))
        except Exception as exc:  # decoders raise anything from OSError to zlib.error on damaged files
            raise DataError(f"{where}: cannot read the mask ({type(exc).__name__}: {one_line(exc)}); re-export it or "
                            "remove the row") from None
        if arr.shape[0] != 1:
            return structure_maps(arr, where)
        return arr[0].astype(np.uint8) if arr.dtype == np.bool_ else arr[0]

    def spacing(self, index: int) -> tuple[float, ...]:
        """Voxel size from the image's header: NIfTI pixdim, DICOM PixelSpacing (and the slice
        spacing of a series); 1 per axis for formats without one."""
        dims = int(self.input_cfg.dims)
        kind, path = self.kinds[index], self.files[index]
        try:
            if kind == "nifti":
                import nibabel as nib

                zooms = nib.load(path).header.get_zooms()
                return tuple(float(z) for z in zooms[:dims])
            if kind == "dicom" and dims == 2:
                import pydicom

                ps = pydicom.dcmread(path, stop_before_pixels=True).get("PixelSpacing")
                if ps is not None:
                    return (float(ps[0]), float(ps[1]))
        except Exception as exc:
            raise DataError(f"{self.describe_sample(index)}: cannot read the voxel spacing from the header "
                            f"({type(exc).__name__}: {one_line(exc)})") from None
        return (1.0,) * dims

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
                f"{self.describe_sample(index)}: cannot decode {kind} file ({type(exc).__name__}: {one_line(exc)}); "
                "the file is probably truncated or corrupt: re-export or re-copy it, or remove the row"
            ) from exc
        if arr.ndim == self.input_cfg.dims + 1:
            check_channel_count(arr.shape, self.input_cfg, self.describe_sample(index))
        return arr

    def content_hash(self) -> str:
        files: list[Path] = [self.path]
        for kind, p in zip(self.kinds, self.files):
            if kind == "dicom_series":
                files.extend(sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")))
            else:
                files.append(p)
        return sha256_files(files)
