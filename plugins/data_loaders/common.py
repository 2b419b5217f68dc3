"""What the NPZ and manifest loaders share: label resolution, the channel-count check and reading
``input.dims: auto`` from an array's shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medaudit.config import InputConfig, TaskConfig
from medaudit.data import resolve_labels
from medaudit.errors import DataError
from medaudit.imagefile import looks_channels_last


def check_channel_count(shape: Sequence[int], input_cfg: InputConfig, where: str) -> None:
    """Catch a 3-D stack read as a 2-D image with many channels, which is almost always ``input.dims``."""
    c = shape[0]
    if c > 4 and c != input_cfg.channels and input_cfg.dims == 2:
        raise DataError(
            f"{where}: samples have shape {tuple(shape)}, i.e. {c} channels per 2-D image; "
            "if these are 3-D volumes set input.dims: 3, otherwise set input.channels"
        )


def dims_from_shape(sample_shape: Sequence[int], channels: int) -> int | None:
    """Spatial dimensions of one headerless array sample (NPY, NPZ) for ``input.dims: auto``.

    2 axes are a 2-D image and 4 a 3-D volume with channels. 3 axes are a 2-D image with a
    channel axis when that axis is where the loader will look for it (first axis 1, 3, 4 or
    ``input.channels``, or a last axis of 3 or 4 entries that reads as RGB[A]), and a ``[D, H, W]``
    volume otherwise. None for any other number of axes.
    """
    n = len(sample_shape)
    if n in (2, 4):
        return 2 if n == 2 else 3
    if n == 3:
        channel_axis = sample_shape[0] in (1, 3, 4, channels) or looks_channels_last(sample_shape)
        return 2 if channel_axis else 3
    return None


def finalize_labels(raw: Any, task: TaskConfig, where: str,
                    sample_ids: Sequence[str] | None = None) -> tuple[np.ndarray, TaskConfig]:
    """Class indices (or multi-hot rows) and a task config whose ``classes`` are filled in."""
    labels, classes = resolve_labels(raw, task, where, sample_ids)
    return labels, task.model_copy(update={"classes": list(classes)})
