"""Overlays for tasks whose outputs are maps: a few samples' image, reference and prediction under
every perturbation, for the report.

The samples are the clean data's best, median and worst by the task's per-sample quality
(:meth:`medaudit.task.Task.sample_quality`; segmentation: mean foreground Dice), chosen from the
audit's own clean outputs, ties to the lower index. Each is replayed after the audit — the model
runs on those few samples only, never on a scenario's whole data set again — with the audit's keyed
randomness (:func:`medaudit.runner.shard.perturb_batch`), so every panel shows exactly the
perturbed image and moved reference the audit scored. Each panel is labelled with the audit's own
score of that sample in that scenario (the value in ``predictions.npz``); the replay runs only the
model, not the task's reduction. The model sees the three samples as one batch instead of the
audit's chunks, so a voxel on a knife-edge between two classes can round the other way in the
drawing — a difference no score printed to three decimals shows.

Rows are perturbations, columns clean and severities 1, 3 and 5 (those of them the audit ran; a
perturbation run at none of them shows its lowest and highest). A 3D sample shows the slice along
the first spatial axis with the most reference foreground in its clean reference. The prediction
is a translucent fill in its class colour, the reference a solid outline in the same colour.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from .config import Config
from .data import AuditDataset
from .features import Extractor
from .outputs import Scenario
from .perturbation import Perturbation
from .runner.batches import device_targets
from .runner.device import autocast, normalisation
from .runner.merge import ForwardResult
from .runner.shard import chunked_forward, move_labels, perturb_batch
from .task import task_of

#: Severities drawn per perturbation, where the audit ran them.
OVERLAY_SEVERITIES = (1, 3, 5)
#: Which clean samples are drawn, in this order.
POSITIONS = ("best", "median", "worst")
CELL_PX = 128
LABEL_PX = 250
TITLE_PX = 72  # two lines of title, then the column headings
LEGEND_PX = 34
MARGIN_PX = 4
FONT_PX = 16
FILL_ALPHA = 0.4
# Distinct colours for the classes (background excepted), cycled beyond ten: fill and outline.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


@dataclass
class Panel:
    """One drawn cell: the perturbed image ``[H, W]`` (grey) or ``[H, W, 3]`` in [0, 1], the
    reference and predicted maps — class indices ``[H, W]``, or one 0/1 map per structure
    ``[K, H, W]`` — and the quality computed from them."""

    image: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    quality: float


def pick_samples(quality: Tensor) -> list[tuple[str, int]]:
    """``(position, sample index)`` of the best, median (lower) and worst finite quality; ties
    go to the lower index; a sample is drawn once even when it holds two positions."""
    q = quality.double().cpu()
    finite = torch.nonzero(torch.isfinite(q)).flatten()
    if finite.numel() == 0:
        return []
    order = finite[torch.argsort(-q[finite], stable=True)]  # best first, stable: lower index first
    chosen = {"best": int(order[0]), "median": int(order[(order.numel() - 1) // 2]), "worst": int(order[-1])}
    out: list[tuple[str, int]] = []
    for pos in POSITIONS:
        if all(i != chosen[pos] for _, i in out):
            out.append((pos, chosen[pos]))
    return out


def overlay_grid(scenarios: Sequence[Scenario]) -> tuple[list[int], dict[str, dict[int, Scenario]]]:
    """The severity columns and, per perturbation (in run order), its scenario per drawn severity."""
    run: dict[str, dict[int, Scenario]] = {}
    for sc in scenarios:
        if sc.perturbation is not None:
            run.setdefault(sc.perturbation, {})[sc.severity] = sc
    rows: dict[str, dict[int, Scenario]] = {}
    for name, by_severity in run.items():
        wanted = [s for s in OVERLAY_SEVERITIES if s in by_severity]
        if not wanted:
            wanted = sorted({min(by_severity), max(by_severity)})
        rows[name] = {s: by_severity[s] for s in wanted}
    columns = sorted({s for row in rows.values() for s in row})
    return columns, rows


def _plane(x: Tensor, index: int | None) -> np.ndarray:
    """``[C, *spatial]`` or ``[*spatial]`` → the drawn 2D plane (slice ``index`` of a 3D map)."""
    if index is not None:
        x = x[..., index, :, :]
    return x.float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()


def _image_plane(x: Tensor, index: int | None) -> np.ndarray:
    arr = np.clip(_plane(x, index), 0.0, 1.0)
    return arr.transpose(1, 2, 0) if arr.shape[0] == 3 else arr[0]


def replay(dataset: AuditDataset, indices: Sequence[int], config: Config, extract: Extractor,
           scenarios: Sequence[Scenario], perturbations: Mapping[str, Perturbation], fwd: ForwardResult,
           device: torch.device, quality: Mapping[str, Tensor]) -> list[dict[str, Panel]]:
    """Every scenario on the samples ``indices`` (one batch): a :class:`Panel` per scenario id, per
    sample, labelled with ``quality[scenario id][sample index]`` (the audit's per-sample scores)."""
    task = task_of(config.task)
    cfg = config.task
    mean, std = normalisation(config, device)
    x, idx, extras = default_collate([dataset[i] for i in indices])
    x, idx = x.to(device), idx.to(torch.int64).to(device)
    targets = device_targets(task, extras, device)
    assert targets is not None  # only tasks with label-map targets have prediction maps
    clean_ref = targets["labels"]
    structures = clean_ref.ndim == x.ndim  # [B, K, *S]: one map per structure
    nd = x.ndim - 2
    slices: list[int | None] = [None] * len(indices)
    if nd == 3:  # the slice with the most reference foreground, fixed for the sample's whole grid
        if structures:
            keep = [k for k in range(clean_ref.shape[1]) if k != cfg.background]
            fg = clean_ref[:, keep].bool().any(dim=1)
        else:
            fg = clean_ref != cfg.background if cfg.background is not None else torch.ones_like(clean_ref, dtype=torch.bool)
        slices = [int(v) for v in fg.flatten(2).sum(dim=2).argmax(dim=1)]
    panels: list[dict[str, Panel]] = [{} for _ in indices]
    with torch.inference_mode():
        for sc in scenarios:
            pert = perturbations.get(sc.perturbation) if sc.perturbation else None
            xp, p = perturb_batch(x, idx, sc, pert, config.audit.seed)
            labels = clean_ref
            if pert is not None and pert.moves_anatomy:
                labels = move_labels(pert, clean_ref, p, x.ndim)
            xn = (xp.float() - mean) / std
            if fwd.memory_format != "contiguous":  # the audit's layout: its kernels, at its speed
                xn = xn.contiguous(memory_format=torch.channels_last if xn.ndim == 4 else torch.channels_last_3d)
            with autocast(config.audit.precision, device):
                out, _ = chunked_forward(extract, xn, config.audit.model_batch_size, fwd.pad_last)
            pred = task.prediction_map(out.float(), fwd.output_kind, cfg)  # type: ignore[arg-type]
            if pred is None:
                return []
            for j, (i, s) in enumerate(zip(indices, slices)):
                panels[j][sc.id] = Panel(_image_plane(xp[j], s), _plane(labels[j], s), _plane(pred[j], s),
                                         float(quality[sc.id][i]))
    return panels


def _fit(arr: np.ndarray, inner: int) -> np.ndarray:
    """Nearest-neighbour resize of ``[H, W, ...]`` to fit ``inner`` pixels: every voxel shown as it is."""
    h, w = arr.shape[:2]
    scale = inner / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    rows = np.minimum((np.arange(th) / scale).astype(int), h - 1)
    cols = np.minimum((np.arange(tw) / scale).astype(int), w - 1)
    return arr[rows][:, cols]


def _colour(k: int, background: int | None) -> tuple[int, int, int]:
    return PALETTE[(k - (1 if background is not None and k > background else 0)) % len(PALETTE)]


def _channels(maps: np.ndarray, n_classes: int) -> np.ndarray:
    """Class indices ``[H, W]`` or structure maps ``[K, H, W]`` → bool ``[K, H, W]``."""
    if maps.ndim == 3:
        return maps.astype(bool)
    return np.stack([maps == k for k in range(n_classes)])


def _cell(panel: Panel, inner: int, n_classes: int, background: int | None) -> np.ndarray:
    """The RGB uint8 cell: grey image, prediction filled, reference outlined, all in class colours
    (structures that overlap are filled one over the other)."""
    img = _fit(panel.image, inner)
    rgb = (np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img) * 255.0
    ref = _fit(np.moveaxis(_channels(panel.reference, n_classes), 0, -1), inner)
    pred = _fit(np.moveaxis(_channels(panel.prediction, n_classes), 0, -1), inner)
    for k in range(n_classes):
        if k == background:
            continue
        colour = np.array(_colour(k, background), dtype=np.float64)
        fill = pred[..., k]
        rgb[fill] = (1 - FILL_ALPHA) * rgb[fill] + FILL_ALPHA * colour
        mask = ref[..., k]
        edge = np.zeros_like(mask)  # reference voxels with a face neighbour outside it, or on the border
        edge[1:] |= mask[1:] & ~mask[:-1]
        edge[:-1] |= mask[:-1] & ~mask[1:]
        edge[:, 1:] |= mask[:, 1:] & ~mask[:, :-1]
        edge[:, :-1] |= mask[:, :-1] & ~mask[:, 1:]
        edge[[0, -1]] |= mask[[0, -1]]
        edge[:, [0, -1]] |= mask[:, [0, -1]]
        rgb[edge] = colour
    return np.round(rgb).astype(np.uint8)


def draw(panels: Mapping[str, Panel], columns: Sequence[int], rows: Mapping[str, Mapping[int, Scenario]],
         title: str, classes: Sequence[str], background: int | None) -> bytes:
    """One sample's grid as PNG bytes: a row per perturbation, columns clean and ``columns``."""
    from PIL import Image, ImageDraw, ImageFont

    ncols = 1 + len(columns)
    height = TITLE_PX + CELL_PX * max(1, len(rows)) + LEGEND_PX
    canvas = Image.new("RGB", (LABEL_PX + CELL_PX * ncols, height), "white")
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_PX)
    inner = CELL_PX - 2 * MARGIN_PX
    pen.multiline_text((MARGIN_PX, MARGIN_PX), title, fill="black", font=font, spacing=4)
    for c, label in enumerate(["clean", *(f"severity {s}" for s in columns)]):
        pen.text((LABEL_PX + c * CELL_PX + CELL_PX // 2, TITLE_PX - FONT_PX), label, fill="black", font=font, anchor="mm")
    for r, (name, by_severity) in enumerate(rows.items() or [("clean", {})]):
        top = TITLE_PX + r * CELL_PX
        pen.text((LABEL_PX - 8, top + CELL_PX // 2), name, fill="black", font=font, anchor="rm")
        cells = [panels.get("clean")] + [panels.get(by_severity[s].id) if s in by_severity else None for s in columns]
        for c, panel in enumerate(cells):
            if panel is None:
                continue
            left = LABEL_PX + c * CELL_PX
            tile = Image.fromarray(_cell(panel, inner, len(classes), background))
            canvas.paste(tile, (left + MARGIN_PX + (inner - tile.width) // 2, top + MARGIN_PX + (inner - tile.height) // 2))
            text = "n/a" if math.isnan(panel.quality) else f"{panel.quality:.3f}"
            pen.text((left + MARGIN_PX + 2, top + CELL_PX - MARGIN_PX - 2), text, fill="white", font=font, anchor="ld",
                     stroke_width=2, stroke_fill="black")
    x = MARGIN_PX
    y = height - LEGEND_PX // 2
    for k, name in enumerate(classes):
        if k == background:
            continue
        pen.rectangle((x, y - 7, x + 14, y + 7), fill=_colour(k, background))
        pen.text((x + 20, y), name, fill="black", font=font, anchor="lm")
        x += 20 + int(pen.textlength(name, font=font)) + 16
    buf = io.BytesIO()
    # an adaptive palette: the grid holds few distinct colours, and the report embeds it
    canvas.quantize(colors=256, dither=Image.Dither.NONE).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def overlay_assets(dataset: AuditDataset, config: Config, extract: Extractor, perturbations: Mapping[str, Perturbation],
                   fwd: ForwardResult, device: torch.device) -> dict[str, str]:
    """The report's overlays as assets: ``overlay_<position>_png`` (base64) and
    ``overlay_<position>_alt`` (what it shows, in words) for the best, median and worst clean
    samples; empty for a task without prediction maps or per-sample quality."""
    task = task_of(config.task)
    # every scenario's per-sample scores, as the audit computed them
    scores = {sc.id: task.sample_quality({k: v[at] for k, v in fwd.outputs.items()}, config.task)
              for at, sc in enumerate(fwd.scenarios)}
    quality = scores.get("clean")
    if quality is None:  # no clean scenario, or a task without per-sample quality
        return {}
    picks = pick_samples(quality)
    if not picks:
        return {}
    columns, rows = overlay_grid(fwd.scenarios)
    drawn = [s for s in fwd.scenarios if s.id == "clean"] + [sc for row in rows.values() for sc in row.values()]
    panels = replay(dataset, [i for _, i in picks], config, extract, drawn, perturbations, fwd, device,
                    {sid: q for sid, q in scores.items() if q is not None})
    if not panels:
        return {}
    classes = list(config.task.classes)
    assets: dict[str, str] = {}
    for (position, i), sample_panels in zip(picks, panels):
        sid = dataset.sample_ids[i]
        title = (f"{position} of the clean data: sample {sid} (score {float(quality[i]):.3f})\n"
                 "fill: prediction; outline: reference; number: the panel's score")
        png = draw(sample_panels, columns, rows, title, classes, config.task.background)
        assets[f"overlay_{position}_png"] = base64.b64encode(png).decode()
        assets[f"overlay_{position}_alt"] = (
            f"Sample {sid}, the {position} of the clean data by the task's per-sample score "
            f"({float(quality[i]):.3f} clean): the image with the predicted label map filled and the reference "
            f"outlined, clean and under {len(rows)} perturbations at severities {', '.join(map(str, columns))}.")
    return assets
