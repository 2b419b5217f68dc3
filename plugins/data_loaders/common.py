"""What the NPZ and manifest loaders share: label resolution and the channel-count check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medaudit.config import InputConfig, TaskConfig
from medaudit.data import resolve_labels
from medaudit.errors import DataError


def check_channel_count(shape: Sequence[int], input_cfg: InputConfig, where: str) -> None:
    """Catch a 3-D stack read as a 2-D image with many channels, which is almost always ``input.dims``."""
    c = shape[0]
    if c > 4 and c != input_cfg.channels and input_cfg.dims == 2:
        raise DataError(
            f"{where}: samples have shape {tuple(shape)}, i.e. {c} channels per 2-D image; "
            "if these are 3-D volumes set input.dims: 3, otherwise set input.channels"
        )


def finalize_labels(raw: Any, task: TaskConfig, where: str) -> tuple[np.ndarray, TaskConfig]:
    """Class indices (or multi-hot rows) and a task config whose ``classes`` are filled in."""
    labels, classes = resolve_labels(raw, task, where)
    return labels, task.model_copy(update={"classes": list(classes)})
