"""Datasets as the runner sees them, and the preprocessing every loader shares.

A loader plugin (see ``medaudit_open_dataset``) returns an :class:`AuditDataset`: labels and
metadata are known up front (small), images are read lazily by ``read(i)`` so a
``torch.utils.data.DataLoader`` with workers streams them. A data set may be unlabelled
(``labels`` is None); only an ``--ood-data`` set may be (see :func:`medaudit.audit.open_dataset`).
With ``input.dims: auto`` a loader reads the number of spatial dimensions from its data and opens
the data set with :func:`resolve_dims`. ``__getitem__`` applies the preprocessing of the input
spec, in this documented order:

1. channel handling: a 3/4-channel (RGB[A]) image given to a 1-channel model becomes its
   luminance (ITU-R BT.601 weights). A grey (1-channel) image given to a model of more channels
   (an ImageNet-pretrained backbone, ``input.preset``) stays grey here: perturbations act on the
   one grey image, as the scanner artifacts they model do, and the runner's normalisation
   ``(x - mean) / std`` with per-channel ``mean``/``std`` replicates it to the model's channels on
   the device, after the perturbation (replicating first would give e.g. every channel its own
   noise). Whether a data set is grey is decided by its first image, so the choice never depends
   on the batch; a grey image in a colour data set is replicated here, a colour image in a grey
   one is an error naming the file;
2. intensity scaling to ``[0, 1]`` (``input.intensity``), per image;
3. resizing to ``input.spatial_size`` (bilinear with antialiasing in 2D, trilinear in 3D).

The model's normalisation ``(x - mean) / std`` is *not* applied here: perturbations act on the
``[0, 1]`` image, and the runner normalises on the device just before the forward pass.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .config import Config, InputConfig, IntensityConfig, TaskConfig
from .errors import DataError
from .task import LabelError, task_of

#: Key under which :func:`summarize_column` counts a column's absent (``None``) values, in
#: results.json ``dataset.metadata_summary`` and the report. Not the subgroup analysis' label of
#: the group of samples with a missing attribute, which that plugin names itself.
MISSING_VALUE = "(missing)"


@dataclass(frozen=True)
class DatasetIdentity:
    path: str
    sha256: str
    n_samples: int
    class_counts: dict[str, int]
    metadata_columns: list[str]
    format: str
    metadata_summary: dict[str, dict[str, int]] = field(default_factory=dict)
    metadata_numeric: dict[str, dict[str, float]] = field(default_factory=dict)


class AuditDataset(Dataset):
    """Base class of datasets returned by loader plugins.

    Subclasses call ``super().__init__`` with everything but the pixels and implement
    :meth:`read`. ``labels`` are the targets the task read (:func:`resolve_labels`): class
    indices ``[N]`` (binary/multiclass) or a multi-hot ``[N, K]`` array (multilabel), or None
    when the data hold no labels at all; then ``unlabelled`` says what is missing, in the data's
    own terms, for the error of a role that needs labels. ``metadata`` maps a column name to one
    value per sample (``None`` for missing). ``input_cfg.dims`` is 2 or 3 (see :func:`resolve_dims`).
    """

    format: str = "unknown"
    #: Whether samples have reference label maps (a segmentation data set): then
    #: :meth:`read_label_map` reads them and ``__getitem__`` returns them with the voxel spacing.
    label_maps: bool = False
    #: Why ``labels`` is None (e.g. "the manifest has no 'label' column"), set by the loader.
    unlabelled: str = "the data set holds no labels"

    def __init__(
        self,
        path: Path,
        sample_ids: Sequence[str],
        labels: np.ndarray | None,
        metadata: dict[str, list[Any]],
        input_cfg: InputConfig,
        task: TaskConfig,
    ) -> None:
        self.path = Path(path)
        self.sample_ids = list(sample_ids)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.metadata = metadata
        self.input_cfg = input_cfg
        self.task = task
        if len(self.sample_ids) == 0:
            raise DataError(f"{self.path}: the dataset is empty (no samples)")
        for col, values in metadata.items():
            if len(values) != len(self.sample_ids):
                raise DataError(f"{self.path}: metadata column '{col}' has {len(values)} values for {len(self.sample_ids)} samples")

    def __len__(self) -> int:
        return len(self.sample_ids)

    @abstractmethod
    def read(self, index: int) -> np.ndarray:
        """The raw image of sample ``index``, channel-first: ``[C, H, W]`` or ``[C, D, H, W]``."""

    def describe_sample(self, index: int) -> str:
        """How an error names a sample (file and row where there is one)."""
        return f"{self.path} (sample {index}, id {self.sample_ids[index]!r})"

    def read_label_map(self, index: int) -> np.ndarray:
        """The reference label map of sample ``index``: integer class indices with the raw image's
        spatial shape (no channel axis), or, for overlapping structures, a bool array ``[K, *spatial]``
        of one map per structure (:func:`structure_maps`). Loaders of segmentation data
        (``label_maps`` True) implement it."""
        raise NotImplementedError(f"{type(self).__name__} holds no label maps")

    def spacing(self, index: int) -> tuple[float, ...]:
        """Physical voxel size of sample ``index`` along its spatial axes in array order (mm), from
        the file's header where it has one (NIfTI, DICOM); 1 per axis otherwise."""
        return (1.0,) * int(self.input_cfg.dims)

    def grey(self, first: np.ndarray | None = None) -> bool:
        """Whether grey images stay 1-channel for a model of more channels (module docstring, step 1):
        the data set's first image (``first``, when the caller has read it) has one channel."""
        if getattr(self, "_grey", None) is None:
            raw = first if first is not None else self.read(0)
            self._grey = self.input_cfg.channels > 1 and np.asarray(raw).shape[0] == 1
        return bool(self._grey)

    def __getitem__(self, index: int) -> tuple[Tensor, int, dict[str, Tensor]]:
        """``(image, index, extras)``: the preprocessed image and, for a data set with label maps,
        ``extras`` ``{"labels": [*spatial] integer map, "spacing": [dims] float64}`` resized with it."""
        raw = self.read(index)
        where = self.describe_sample(index)
        x = preprocess(raw, self.input_cfg, where, keep_grey=self.grey(raw if index == 0 else None))
        if not self.label_maps:
            return x, index, {}
        labels, spacing = preprocess_label_map(self.read_label_map(index), raw.shape[1:], self.spacing(index),
                                               self.input_cfg, where)
        return x, index, {"labels": labels, "spacing": spacing}

    @abstractmethod
    def content_hash(self) -> str:
        """SHA-256 over what defines the data (manifest and every file's bytes, streamed)."""

    def identity(self) -> DatasetIdentity:
        return DatasetIdentity(
            path=str(self.path),
            sha256=self.content_hash(),
            n_samples=len(self),
            class_counts=self.class_counts(),
            metadata_columns=sorted(self.metadata),
            format=self.format,
            metadata_summary={col: summarize_column(vals) for col, vals in sorted(self.metadata.items())},
            metadata_numeric={col: stats for col, vals in sorted(self.metadata.items())
                              if (stats := numeric_summary(vals)) is not None},
        )

    def class_counts(self) -> dict[str, int]:
        """Samples per class; empty for an unlabelled data set."""
        if self.labels is None:
            return {}
        return task_of(self.task).target_counts(self.labels, self.task.classes)


def summarize_column(values: Iterable[Any], limit: int = 20) -> dict[str, int]:
    """Counts of the most frequent values of a metadata column (missing values counted)."""
    counts = Counter(MISSING_VALUE if v is None else str(v) for v in values)
    return dict(counts.most_common(limit))


#: A numeric column with more distinct values than this is summarised (quartiles), not counted.
NUMERIC_DISTINCT = 10


def numeric_summary(values: Sequence[Any]) -> dict[str, float] | None:
    """Count, missing, mean and quartiles of a column whose present values are all numbers (or
    numeric strings, as a manifest CSV gives them) with more than :data:`NUMERIC_DISTINCT`
    distinct values; ``None`` for any other column, which :func:`summarize_column` counts."""
    present = [v for v in values if v is not None]
    try:
        numbers = np.array([float(v) for v in present if not isinstance(v, bool)], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    numbers = numbers[np.isfinite(numbers)]
    if len(numbers) != len(present) or len(np.unique(numbers)) <= NUMERIC_DISTINCT:
        return None
    q = np.quantile(numbers, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"n": int(len(numbers)), "missing": int(len(values) - len(numbers)), "mean": float(numbers.mean()),
            "min": float(q[0]), "q1": float(q[1]), "median": float(q[2]), "q3": float(q[3]), "max": float(q[4])}


def resolve_labels(raw: Any, task: TaskConfig, where: str,
                   sample_ids: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Raw labels (class names or indices; multi-hot rows for a multilabel task) → ``(labels, classes)``.

    The task reads them (:meth:`medaudit.task.Task.read_targets`). When ``task.classes`` is
    empty the classes are inferred and returned so the caller can record them. A label that
    names no class is a :class:`~medaudit.task.LabelError` naming its row, and the row's sample
    id when ``sample_ids`` are given (the task reads values, not samples).
    """
    try:
        return task_of(task).read_targets(raw, task, where)
    except LabelError as exc:
        if sample_ids is None or exc.sample_id is not None or not 0 <= exc.row < len(sample_ids):
            raise
        raise LabelError(exc.where, exc.row, exc.detail, sample_id=sample_ids[exc.row]) from None


def resolve_dims(input_cfg: InputConfig, dims: int, where: str) -> InputConfig:
    """``input_cfg`` with ``dims: auto`` replaced by the ``dims`` a loader read from the data at ``where``.

    An explicit ``input.dims`` is returned unchanged (the loader's checks then compare the data
    with it). The resolved value is an int, as everything after loading expects.
    """
    if input_cfg.dims != "auto":
        return input_cfg
    size = input_cfg.spatial_size
    if size is not None and len(size) != dims:
        raise DataError(f"{where}: the images are {dims}-D (input.dims: auto), but input.spatial_size has {len(size)} "
                        f"values {size}; give {dims} values, or set input.dims if the data were read wrongly")
    return input_cfg.model_copy(update={"dims": dims})


def settle_dims(dataset: AuditDataset, config: Config) -> None:
    """With ``input.dims: auto``, record in ``config`` the dims ``dataset`` was opened with.

    Built-in loaders read them from the data (:func:`resolve_dims`); for a loader that left
    ``auto``, sample 0's spatial axes are counted. Called when the audit opens its data and by
    the runner, so a config built by hand around a data set opened directly works too; a no-op
    once ``config.input.dims`` is a number.
    """
    if config.input.dims != "auto":
        return
    if dataset.input_cfg.dims == "auto":
        where = dataset.describe_sample(0)
        dims = dataset.read(0).ndim - 1
        if dims not in (2, 3):
            raise DataError(f"{where}: sample has {dims} spatial dimensions (input.dims: auto); set input.dims: 2 or 3")
        dataset.input_cfg = resolve_dims(dataset.input_cfg, dims, where)
    # recorded as the number used, so results.json's config stays a valid explicit config
    config.input = config.input.model_copy(update={"dims": dataset.input_cfg.dims})


def to_channel_first(arr: np.ndarray, dims: int, channels_last: bool) -> np.ndarray:
    """Add or move the channel axis: spatial-only arrays get ``C = 1``."""
    if arr.ndim == dims:
        return arr[None]
    if arr.ndim == dims + 1:
        return np.moveaxis(arr, -1, 0) if channels_last else arr
    raise ValueError(f"has {arr.ndim} dimensions, expected {dims} spatial dimensions (+ optional channels)")


def scale_intensity(x: Tensor, cfg: IntensityConfig) -> Tensor:
    """Map one image's intensities to ``[0, 1]`` as ``cfg.scaling`` says."""
    if cfg.scaling == "none":
        return x
    if cfg.scaling == "fixed":
        return (x / cfg.max_value).clamp(0.0, 1.0)
    if cfg.scaling == "window":
        lo = cfg.level - cfg.width / 2
        return ((x - lo) / cfg.width).clamp(0.0, 1.0)
    if cfg.scaling == "percentile":
        q = torch.quantile(x.flatten().float(), torch.tensor([cfg.low / 100, cfg.high / 100]))
        lo, hi = q[0], q[1]
    else:
        lo, hi = x.min(), x.max()
    span = hi - lo
    if span <= 0:
        return torch.zeros_like(x)
    return ((x - lo) / span).clamp(0.0, 1.0)


def structure_maps(masks: np.ndarray, where: str, row: int | None = None) -> np.ndarray:
    """A mask with a channel axis, ``[K, *spatial]`` (or ``[N, K, *spatial]`` for a whole array):
    one 0/1 map per structure (structures that may overlap, for ``task.activation: sigmoid``),
    returned as bool. Loaders hand such masks on as bool arrays and label maps as integer arrays,
    so the task tells the two apart whatever the number of spatial axes. A value other than 0 and 1
    is a DataError naming ``where`` (and the row)."""
    arr = np.asarray(masks)
    binary = (arr == 0) | (arr == 1)
    if not binary.all():
        bad = np.argwhere(~binary)[0]
        at = f", row {row + 1}" if row is not None else (f", row {int(bad[0]) + 1}" if arr.ndim > 1 else "")
        k = arr.shape[0] if row is not None else arr.shape[1]
        raise DataError(f"{where}{at}: the mask has {k} channels, so it is read as one 0/1 map per structure "
                        f"(overlapping structures), but it holds the value {arr[tuple(bad)].item()!r}; store class indices "
                        "in one channel, or 0/1 in every structure's channel (an RGB-coloured mask must be saved as "
                        "its class indices)")
    return arr.astype(bool)


def preprocess_label_map(mask: np.ndarray, image_shape: Sequence[int], spacing: Sequence[float], cfg: InputConfig,
                         where: str) -> tuple[Tensor, Tensor]:
    """A reference label map resized with its image: ``(labels [*spatial], spacing [dims] float64)``,
    or ``labels [K, *spatial]`` for the structure maps of a bool mask (:func:`structure_maps`).

    The map must have the raw image's spatial shape (a DataError naming both shapes otherwise).
    Resizing to ``input.spatial_size`` takes the nearest voxel's label (an interpolated label
    would be a class between two others), and the spacing grows by the same factor per axis so
    that distances stay in physical units. Labels are kept as uint8 where they fit (a 3-D
    volume's map is 8× smaller than int64 on its way to the device).
    """
    arr = np.asarray(mask)
    structures = arr.dtype == np.bool_ and arr.ndim == len(image_shape) + 1
    if not structures and arr.ndim == len(image_shape) + 1 and arr.shape[0] == 1:
        arr = arr[0]  # a single-channel mask saved as [1, *spatial]
    spatial = arr.shape[1:] if structures else arr.shape
    if tuple(spatial) != tuple(image_shape):
        raise DataError(f"{where}: the mask has shape {tuple(arr.shape)} but the image's spatial shape is "
                        f"{tuple(image_shape)}; a mask must cover its image voxel for voxel")
    dtype = torch.uint8 if arr.size == 0 or (arr.min() >= 0 and arr.max() < 256) else torch.int64
    labels = torch.from_numpy(np.ascontiguousarray(arr).astype(np.int64)).to(dtype)
    sp = torch.tensor([float(v) for v in spacing], dtype=torch.float64)
    size = cfg.spatial_size
    if size is not None and list(spatial) != list(size):
        sp = sp * torch.tensor([a / b for a, b in zip(spatial, size)], dtype=torch.float64)
        channels = labels if structures else labels[None]
        resized = F.interpolate(channels[None].float(), size=tuple(size), mode="nearest-exact")[0].to(dtype)
        labels = resized if structures else resized[0]
    return labels.contiguous(), sp


def preprocess(raw: np.ndarray, cfg: InputConfig, where: str, keep_grey: bool = False) -> Tensor:
    """Channel handling, intensity scaling and resizing (see the module docstring)."""
    arr = np.ascontiguousarray(raw)
    if not arr.dtype.isnative:
        # torch.from_numpy refuses non-native byte order, which big-endian NIfTI/NPY/DICOM files produce.
        arr = arr.astype(arr.dtype.newbyteorder("="))
    x = torch.from_numpy(arr).to(torch.float32)
    spatial = x.ndim - 1
    # "auto" only where a loader opened outside an audit left it unresolved: the image says it
    dims = spatial if cfg.dims == "auto" and spatial in (2, 3) else cfg.dims
    if spatial != dims:
        raise DataError(
            f"{where}: image has {spatial} spatial dimensions (shape {tuple(raw.shape)}), but input.dims is {cfg.dims}"
        )
    if not torch.isfinite(x).all():
        raise DataError(f"{where}: image contains NaN or Inf values; fix or remove the file")
    c = x.shape[0]
    if keep_grey and c != 1:
        raise DataError(f"{where}: image has {c} channels, but the data set's first image is grey (1 channel), so its "
                        "grey images are replicated to the model's channels after perturbation; convert the colour "
                        "images to grey, or give the colour ones a data set of their own")
    if c != cfg.channels and not keep_grey:
        if c == 1:
            x = x.expand(cfg.channels, *x.shape[1:])
        elif c in (3, 4) and cfg.channels == 1:
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        else:
            raise DataError(f"{where}: image has {c} channels, the model expects {cfg.channels} (input.channels)")
    x = scale_intensity(x, cfg.intensity)
    if cfg.spatial_size is not None and list(x.shape[1:]) != list(cfg.spatial_size):
        if len(cfg.spatial_size) != dims:
            raise DataError(f"{where}: image is {dims}-D, but input.spatial_size has {len(cfg.spatial_size)} values")
        mode = "bilinear" if dims == 2 else "trilinear"
        x = F.interpolate(x[None], size=tuple(cfg.spatial_size), mode=mode, align_corners=False,
                          antialias=dims == 2)[0].clamp(0.0, 1.0)
    return x.contiguous()
