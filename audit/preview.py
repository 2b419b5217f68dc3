"""Preview grid: one image under each perturbation at severities 0..5, for eyes and the report.

Rows are perturbations, columns severities 0 (clean) to 5; 3D images show their middle slice
along the first spatial axis. The seeding is :func:`medaudit.imagefile.single_sample_rng`
(``stream_key(seed, name, severity)``, sample index 0), as in ``perturb_file``, so a cell is what
``medaudit perturb IMAGE -p NAME -s SEVERITY --seed SEED`` writes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from .imagefile import single_sample_rng
from .perturbation import SEVERITY_LEVELS, Perturbation

CELL_INCHES = 1.6
DPI = 100


def _panel(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` or ``[C, D, H, W]`` -> ``[H, W]`` grey or ``[H, W, 3]`` RGB float in [0, 1]."""
    if image.ndim == 4:
        image = image[:, image.shape[1] // 2]
    arr = image.float().clamp(0.0, 1.0).cpu().numpy()
    return arr.transpose(1, 2, 0) if arr.shape[0] == 3 else arr[0]


def _cells(image: Tensor, cls: type[Perturbation], seed: int) -> list[np.ndarray | None]:
    nd = image.ndim - 1
    if nd not in cls.dims:
        return [_panel(image)] + [None] * len(SEVERITY_LEVELS)
    out: list[np.ndarray | None] = [_panel(image)]
    perturbation = cls()
    for severity in SEVERITY_LEVELS:
        y, _ = perturbation(image[None], severity, single_sample_rng(seed, cls.name, severity, image.device))
        out.append(_panel(y[0]))
    return out


def preview_grid(image: Tensor, perturbations: Sequence[type[Perturbation]], seed: int) -> np.ndarray:
    """Render the grid as a uint8 RGB array ``[height, width, 3]``.

    :param image: one image ``[C, H, W]`` or ``[C, D, H, W]`` with intensities in [0, 1].
    :param perturbations: perturbation classes, one row each, in order.
    :param seed: the audit seed.
    """
    if not isinstance(image, Tensor) or image.ndim not in (3, 4):
        raise ValueError(f"image must be a [C, H, W] or [C, D, H, W] tensor, got {getattr(image, 'shape', type(image).__name__)}")
    if not perturbations:
        raise ValueError("perturbations must name at least one perturbation class, got an empty list")
    for cls in perturbations:
        if not (isinstance(cls, type) and issubclass(cls, Perturbation)):
            raise TypeError(f"perturbations must be Perturbation subclasses, got {cls!r}")
    lo, hi = float(image.min()), float(image.max())  # not a hot path: one check per preview
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"image intensities must be in [0, 1], got range [{lo:g}, {hi:g}]")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = 1 + len(SEVERITY_LEVELS)
    nrows = len(perturbations)
    fig = Figure(figsize=(CELL_INCHES * ncols + 1.6, CELL_INCHES * nrows + 0.4), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=1.6 / (CELL_INCHES * ncols + 1.6), right=0.99, top=1 - 0.3 / (CELL_INCHES * nrows + 0.4),
                        bottom=0.01, wspace=0.04, hspace=0.08)
    for r, cls in enumerate(perturbations):
        for c, cell in enumerate(_cells(image, cls, seed)):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.text(0.5, 0.5, f"{image.ndim - 1}-D\nnot supported", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            else:
                ax.imshow(cell, cmap="gray" if cell.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            if r == 0:
                ax.set_title("clean" if c == 0 else f"severity {c}", fontsize=8)
        axes[r, 0].set_ylabel(cls.name, fontsize=8, rotation=0, ha="right", va="center")
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def save_grid_png(grid: np.ndarray, path: str | Path) -> None:
    """Write a grid from :func:`preview_grid` as a PNG file."""
    from PIL import Image

    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
        raise ValueError(f"grid must be a uint8 [height, width, 3] array, got {grid.dtype} {grid.shape}")
    Image.fromarray(grid, mode="RGB").save(Path(path), format="PNG")


def grid_png_bytes(image: Tensor, perturbations: Sequence[type[Perturbation]], seed: int) -> bytes:
    """The preview grid as PNG bytes, to embed in the HTML report (``data:image/png;base64,...``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(preview_grid(image, perturbations, seed), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
