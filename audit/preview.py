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

#: Pixel geometry of the grid: square cells, a label column on the left, a title row on top.
CELL_PX = 160
LABEL_PX = 250  # room for the longest built-in name, "intensity.histogram_shift", at FONT_PX
TITLE_PX = 32
MARGIN_PX = 4
FONT_PX = 18


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

    from PIL import Image, ImageDraw, ImageFont

    # Composed with Pillow, not matplotlib: 100+ axes cost seconds of layout for what is a tiling.
    ncols = 1 + len(SEVERITY_LEVELS)
    canvas = Image.new("RGB", (LABEL_PX + CELL_PX * ncols, TITLE_PX + CELL_PX * len(perturbations)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_PX)
    inner = CELL_PX - 2 * MARGIN_PX
    for c in range(ncols):
        centre = (LABEL_PX + c * CELL_PX + CELL_PX // 2, TITLE_PX // 2)
        draw.text(centre, "clean" if c == 0 else f"severity {c}", fill="black", font=font, anchor="mm")
    for r, cls in enumerate(perturbations):
        top = TITLE_PX + r * CELL_PX
        draw.text((LABEL_PX - 8, top + CELL_PX // 2), cls.name, fill="black", font=font, anchor="rm")
        for c, cell in enumerate(_cells(image, cls, seed)):
            left = LABEL_PX + c * CELL_PX
            draw.rectangle((left + MARGIN_PX - 1, top + MARGIN_PX - 1, left + CELL_PX - MARGIN_PX, top + CELL_PX - MARGIN_PX),
                           outline="#999999")
            if cell is None:
                draw.multiline_text((left + CELL_PX // 2, top + CELL_PX // 2), f"{image.ndim - 1}-D\nnot supported",
                                    fill="black", font=font, anchor="mm", align="center")
                continue
            panel = Image.fromarray(np.round(cell * 255.0).astype(np.uint8)).convert("RGB")
            h, w = cell.shape[:2]
            scale = inner / max(h, w)
            # nearest neighbour: every pixel of the perturbed image is shown as it is, never smoothed
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            panel = panel.resize(size, Image.Resampling.NEAREST)
            canvas.paste(panel, (left + MARGIN_PX + (inner - size[0]) // 2, top + MARGIN_PX + (inner - size[1]) // 2))
    return np.asarray(canvas).copy()


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
