"""The ``segmentation`` task: per-voxel class maps reduced on the device to per-image results.

A segmentation model outputs ``[B, K, H, W]`` (2D) or ``[B, K, D, H, W]`` (3D) class scores. Full
probability maps are never kept: inside the forward loop, batch by batch and scenario by
scenario, :meth:`SegmentationTask.reduce` turns them, with the batch's reference label maps
(moved by the perturbation where it moves the anatomy), into small per-image quantities —

* ``dice``, ``iou``, ``volume_error``, ``hd95``, ``assd``, ``nsd``: ``[K]`` per image
  (:mod:`.measures`); NaN where a class is undefined for that image;
* ``cal_top`` ``[bins, 3]``, ``cal_classwise`` ``[K, bins, 3]``, ``cal_band`` ``[bins, 3]``,
  ``brier``, ``nll``, ``voxels``: sufficient statistics of the voxel calibration metrics
  (:mod:`.voxel_calibration`), so the bootstrap resamples images while the metrics stay over voxels;
* ``entropy`` and ``msp``: the mean voxel entropy and max-probability of each image (per-image
  uncertainty, the Dice-failure detection's own baseline).

The targets a loader reads are label maps (:data:`~medaudit.task.TARGET_LABEL_MAP`); the per-sample
``labels`` of the data set are which classes each reference map holds (multi-hot ``[N, K]``), read
once when the data set is opened — which also checks every mask's values against the classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from medaudit.config import TaskConfig
from medaudit.errors import DataError, ModelOutputError, OutputWidthError
from medaudit.task import (ALL_QUANTITIES, SUBGROUPS, TARGET_LABEL_MAP, VOXEL_CLASS_SCORES, LabelError, OutputKind, Task,
                           class_list)

from .measures import channel_max, one_hot, overlap, surface_metrics
from .voxel_calibration import boundary_band, calibration_stats

#: Bins of the voxel reliability statistics (equal width, as medaudit's per-sample ECE).
N_BINS = 15

#: Per-class quantities ``[K]`` per image, in result-key order.
PER_CLASS = ("dice", "iou", "hd95", "assd", "nsd", "volume_error")


class SegmentationTask(Task):
    """One class per voxel (softmax) or independent structures (sigmoid), 2D or 3D."""

    name = "segmentation"
    description = ("a class per voxel; outputs [B, K, H, W] or [B, K, D, H, W] (softmax or sigmoid of logits, or "
                   "probabilities); targets are label maps (a manifest 'mask' column, or a 'masks' array)")
    targets = TARGET_LABEL_MAP
    metric_input = ALL_QUANTITIES
    capabilities = frozenset({VOXEL_CLASS_SCORES, SUBGROUPS})

    def validate_config(self, cfg: TaskConfig) -> None:
        if cfg.classes and cfg.background is not None and cfg.background >= len(cfg.classes):
            raise ValueError(f"task.background is {cfg.background} but task.classes names {len(cfg.classes)} classes "
                             "(0-based); set it to the background's index, or null when no class is background")

    def read_targets(self, raw: Any, cfg: TaskConfig, where: str) -> tuple[np.ndarray, list[str]]:
        """Label maps (any iterable of integer arrays, read lazily one at a time; bool ``[K, *S]``
        arrays hold one map per structure) → which classes each holds (multi-hot ``[N, K]``) and the
        classes (inferred ``0..max``, or one per structure, when not configured).

        A value that is not a class index is a :class:`~medaudit.task.LabelError` naming the row.
        """
        classes = list(cfg.classes)
        counts: list[np.ndarray] = []
        first: dict[bool, int] = {}  # the first row of each kind of mask: structure maps or class indices
        for row, mask in enumerate(raw if isinstance(raw, Iterable) else [raw]):
            arr = np.asarray(mask)
            structures = bool(arr.dtype == np.bool_ and arr.ndim >= 3)
            first.setdefault(structures, row)
            if len(first) == 2:
                raise LabelError(where, row, f"has {'structure maps' if structures else 'a map of class indices'}, but "
                                             f"row {first[not structures] + 1} has "
                                             f"{'a map of class indices' if structures else 'structure maps'}; every mask "
                                             "of a data set must be of one kind")
            if structures:  # [K, *S]: one map per structure (medaudit.data.structure_maps)
                if cfg.activation != "sigmoid":
                    raise LabelError(where, row, f"has a mask with {arr.shape[0]} channels, one 0/1 map per structure "
                                                 "(structures that may overlap), which needs task.activation: sigmoid; "
                                                 "store one channel of class indices for a softmax model")
                if classes and arr.shape[0] != len(classes):
                    raise LabelError(where, row, f"has {arr.shape[0]} structure maps, but task.classes names "
                                                 f"{class_list(classes)}")
                counts.append(arr.reshape(arr.shape[0], -1).sum(axis=1))
                continue
            if arr.dtype.kind == "f":
                if not np.isfinite(arr).all() or not np.equal(np.mod(arr, 1), 0).all():
                    raise LabelError(where, row, "has a mask with non-integer values; a mask holds class indices")
                arr = arr.astype(np.int64)
            elif arr.dtype.kind not in "iub":
                raise LabelError(where, row, f"has a mask of dtype {arr.dtype}; a mask holds integer class indices")
            lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
            if lo < 0:
                raise LabelError(where, row, f"has mask value {lo}; a mask holds class indices 0 or above")
            if classes and hi >= len(classes):
                raise LabelError(where, row, f"has mask value {hi}, but task.classes names {class_list(classes)}")
            counts.append(np.bincount(arr.ravel().astype(np.int64), minlength=hi + 1))
        if not counts:
            raise DataError(f"{where}: no masks")
        k = len(classes) or max(2, max(len(c) for c in counts))
        present = np.zeros((len(counts), k), dtype=np.int64)
        for row, c in enumerate(counts):
            present[row, : len(c)] = c > 0
        return present, classes or [str(i) for i in range(k)]

    def target_counts(self, targets: np.ndarray, classes: list[str]) -> dict[str, int]:  # type: ignore[override]
        """Images whose reference mask holds each class."""
        return {classes[k]: int(targets[:, k].sum()) for k in range(targets.shape[1])}

    def detect_output_kind(self, out: Tensor) -> OutputKind:
        o = out.float()
        if not bool(((o >= 0) & (o <= 1)).all()):
            return "logits"
        if o.shape[1] == 1:
            return "probabilities"
        sums = o.sum(dim=1)
        return "probabilities" if bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)) else "logits"

    def quantities(self, cfg: TaskConfig) -> dict[str, tuple[int, ...]]:
        k = len(cfg.classes)
        return {**{name: (k,) for name in PER_CLASS},
                "cal_top": (N_BINS, 3), "cal_classwise": (k, N_BINS, 3), "cal_band": (N_BINS, 3),
                "brier": (), "nll": (), "voxels": (), "entropy": (), "msp": ()}

    def reduce(self, out: Tensor, kind: OutputKind, cfg: TaskConfig,
               targets: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        if targets is None:
            raise ModelOutputError("a segmentation task needs the reference label maps of the batch")
        labels, spacing = targets["labels"], targets["spacing"]
        # a reference with a channel axis holds one 0/1 map per structure (overlapping structures)
        structures = labels.ndim == out.ndim
        nd = labels.ndim - (2 if structures else 1)
        if out.ndim != nd + 2:
            raise ModelOutputError(f"a {nd}-D segmentation model must output [B, K, {'D, ' if nd == 3 else ''}H, W] class "
                                   f"maps, got shape {tuple(out.shape)}")
        if tuple(out.shape[2:]) != tuple(labels.shape[-nd:]):
            raise ModelOutputError(f"the model's output maps have spatial size {tuple(out.shape[2:])} but its input "
                                   f"is {tuple(labels.shape[-nd:])}; medaudit compares outputs with the masks voxel for "
                                   "voxel, so the model must output maps of its input's size")
        k = len(cfg.classes)
        if out.shape[1] != k:
            raise OutputWidthError(f"the model outputs {out.shape[1]} class maps but task.classes names {k} classes",
                                   int(out.shape[1]), k)
        out = out.float()
        ref = labels.bool() if structures else one_hot(labels, k)
        if cfg.activation == "softmax":
            probs = torch.softmax(out, dim=1) if kind == "logits" else out
            pred_labels = channel_max(probs)[1]
            pred = one_hot(pred_labels, k)
            cal_ref, band_of = labels, pred_labels
        else:
            probs = torch.sigmoid(out) if kind == "logits" else out
            pred = probs > 0.5
            # independent structures: each (voxel, structure) a binary prediction; the band follows
            # every predicted structure's boundary
            cal_ref, band_of = ref, pred
        result = dict(overlap(pred, ref, ignore_empty=cfg.ignore_empty))
        # The background's surface is the foreground's seen from outside and is never reported:
        # distances (the costly part of the reduction) are computed for the other classes only.
        fg = [c for c in range(k) if c != cfg.background]
        surface = {key: torch.full((out.shape[0], k), float("nan"), device=out.device) for key in ("hd95", "assd", "nsd")}
        for key, value in surface_metrics(pred[:, fg], ref[:, fg], spacing.float(), cfg.nsd_tolerance_mm).items():
            surface[key][:, fg] = value
        # A class present on one side only has no finite surface distance; it scores the image
        # diagonal (the largest distance possible in the field of view) rather than inf, so means
        # and confidence intervals stay finite while a missed structure still counts as the worst.
        extent = torch.tensor(labels.shape[-nd:], device=labels.device, dtype=torch.float32)
        diagonal = (extent[None, :] * spacing.float()).pow(2).sum(dim=1).sqrt()[:, None]
        for key in ("hd95", "assd"):
            v = surface[key]
            result[key] = torch.where(torch.isinf(v), diagonal.expand_as(v), v)
        result["nsd"] = surface["nsd"]
        stats = calibration_stats(probs, cal_ref, N_BINS, band=boundary_band(band_of, cfg.boundary_width))
        result.update({"cal_top": stats["top"], "cal_classwise": stats["classwise"], "cal_band": stats["band"],
                       "brier": stats["brier"], "nll": stats["nll"], "voxels": stats["voxels"],
                       "entropy": stats["entropy"], "msp": stats["msp"]})
        return {name: value.float() for name, value in result.items()}

    def prediction_map(self, out: Tensor, kind: OutputKind, cfg: TaskConfig) -> Tensor | None:
        """Softmax: the arg-max class of every voxel ``[B, *S]``. Sigmoid: one 0/1 map per structure
        ``[B, K, *S]`` (probability above 0.5; structures may overlap). uint8."""
        if cfg.activation == "sigmoid":
            probs = torch.sigmoid(out.float()) if kind == "logits" else out
            return (probs > 0.5).to(torch.uint8)
        return channel_max(out)[1].to(torch.uint8)

    def sample_quality(self, quantities: Mapping[str, Tensor], cfg: TaskConfig) -> Tensor | None:
        """Each image's Dice averaged over the foreground classes its maps define (NaN: none)."""
        fg = [k for k in range(quantities["dice"].shape[-1]) if k != cfg.background]
        return torch.nanmean(quantities["dice"][..., fg], dim=-1)

    def prediction_arrays(self, quantities: Mapping[str, Tensor], cfg: TaskConfig) -> dict[str, np.ndarray]:
        """``dice``, ``iou``, … ``[S, N]`` (each image's mean over foreground classes) with
        ``<name>_per_class`` ``[S, N, K]``, and the per-image ``entropy`` and ``msp``; the voxel
        calibration statistics stay internal."""
        fg = [k for k in range(len(cfg.classes)) if k != cfg.background]
        arrays: dict[str, np.ndarray] = {}
        for name in PER_CLASS:
            values = quantities[name]
            arrays[name] = torch.nanmean(values[..., fg], dim=-1).numpy()
            arrays[f"{name}_per_class"] = values.numpy()
        arrays.update({name: quantities[name].numpy() for name in ("entropy", "msp")})
        return arrays

    def check_outputs(self, outputs: Mapping[str, Tensor], targets: Tensor, weights: Tensor | None = None) -> None:
        n = targets.shape[0]
        for name, value in outputs.items():
            if value.shape[0] != n:
                raise ValueError(f"quantity {name!r} has {value.shape[0]} rows for {n} images")
        dice = outputs["dice"]
        finite = torch.isnan(dice) | ((dice >= 0) & (dice <= 1))
        if not bool(finite.all()):
            row = int(torch.nonzero(~finite.all(dim=1))[0])
            raise ValueError(f"per-image Dice outside [0, 1] at image {row}")
        if not bool(torch.isfinite(outputs["nll"]).all()):
            rows = torch.nonzero(~torch.isfinite(outputs["nll"])).flatten()
            raise ValueError(f"voxel NLL is not finite for {rows.numel()} of {n} images (first: image {int(rows[0])}); "
                             "the model produced non-finite outputs, or probabilities of exactly 0 for the true class "
                             "with model.output: probabilities")

