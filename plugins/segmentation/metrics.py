"""Metric families of the ``segmentation`` task, computed from the per-image quantities its
``reduce`` kept (the task's ``metric_input`` is every quantity, see :mod:`medaudit.task`).

Per-image values are averaged over images with the bootstrap's weights; an image where a value is
undefined (NaN: a class absent from the reference with ``task.ignore_empty``, no surface on either
side) is left out of that average, as MONAI's ``do_metric_reduction`` leaves out NaN. The headline
``dice`` of an image is the mean of its defined foreground classes (``task.background`` left out);
the audit's ``dice`` is the mean of that over images. Voxel calibration metrics are computed from
the images' summed statistics, so they are over voxels while the resampling is over images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from medaudit.metric import Metric, MetricContext

from .voxel_calibration import calibration_from_stats, reliability_bins

_CAL = ("cal_top", "cal_classwise", "cal_band", "brier", "nll", "voxels")


def foreground(n_classes: int, background: int | None) -> list[int]:
    """Indices of the classes averaged into ``dice``, ``iou``, … (every class but the background)."""
    return [k for k in range(n_classes) if k != background]


def image_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean over images of ``values`` ``[N]``, NaN entries left out; ``[R]`` (NaN where
    no image with weight has a value)."""
    defined = ~torch.isnan(values)
    v = torch.where(defined, values, 0.0).double()
    w = weights.double()
    den = w @ defined.double()
    return torch.where(den > 0, (w @ v) / den.clamp(min=1e-300), torch.nan)


def per_image_foreground_mean(values: Tensor, classes: list[int]) -> Tensor:
    """``[N, K]`` → ``[N]``: the mean over the listed classes that are defined for each image."""
    sel = values[:, classes]
    return torch.nanmean(sel, dim=1)


class _PerClassFamily(Metric):
    """Means over images of per-image, per-class quantities: the foreground mean under the
    quantity's own name and one key per foreground class (``dice/<class>``)."""

    tasks: ClassVar[tuple[str, ...]] = ("segmentation",)
    quantities: ClassVar[tuple[str, ...]]

    def __init__(self, background: int | None = 0) -> None:
        self.background = background  # task.background of the audit

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        q: Mapping[str, Tensor] = probs  # type: ignore[assignment]  # ALL_QUANTITIES: the mapping
        fg = foreground(len(ctx.classes), self.background)
        out: dict[str, Tensor] = {}
        for name in self.quantities:
            values = q[name].double()
            out[name] = image_mean(per_image_foreground_mean(values, fg), weights)
            for k in fg:
                out[f"{name}/{ctx.classes[k]}"] = image_mean(values[:, k], weights)
        return out


class OverlapMetrics(_PerClassFamily):
    """Dice, IoU and normalised surface Dice: higher is better."""

    name = "dice"
    quantities = ("dice", "iou", "nsd")
    headline = ("dice", "nsd")
    headline_order = 100
    definitions = {
        "dice": "Dice similarity coefficient 2|P∩R| / (|P|+|R|) of the predicted (P) and reference (R) voxels of a "
                "class, per image; the image's value is the mean over its foreground classes (task.background left "
                "out) and the audit's the mean over images. A class absent from the reference gives no value for that "
                "image when task.ignore_empty (default, MONAI's convention), else 1 if also absent from the "
                "prediction and 0 otherwise. dice/<class>: the mean over images of that class. Checked against "
                "MONAI's DiceMetric.",
        "iou": "Intersection over union |P∩R| / |P∪R| (Jaccard index), averaged as dice; MONAI's MeanIoU.",
        "nsd": "Normalised surface Dice (Nikolov et al. 2021): the share of both boundaries lying within "
               "task.nsd_tolerance_mm of the other boundary, in physical units from the voxel spacing; averaged as "
               "dice. Checked against MONAI's SurfaceDiceMetric.",
    }


class DistanceMetrics(_PerClassFamily):
    """Surface distances and volume error: lower is better."""

    name = "hd95"
    quantities = ("hd95", "assd", "volume_error")
    higher_is_better = False
    headline = ("hd95",)
    headline_order = 150
    digits = 2
    definitions = {
        "hd95": "95th-percentile Hausdorff distance between the predicted and reference boundaries, in the voxel "
                "spacing's units (mm from NIfTI/DICOM headers, voxels otherwise): the larger of the two directed 95th "
                "percentiles (MONAI's HausdorffDistanceMetric, percentile=95). A class present in only one of "
                "prediction and reference scores the image diagonal, the largest distance in the field of view; absent "
                "from both, no value. Averaged over foreground classes and images as dice.",
        "assd": "Average symmetric surface distance: the mean over both boundaries' voxels of the distance to the "
                "other boundary (MONAI's SurfaceDistanceMetric, symmetric); missing classes as hd95.",
        "volume_error": "Relative absolute volume error |V_P − V_R| / V_R of a class (voxel counts), per image; no "
                        "value where the reference holds none of the class.",
    }


class VoxelCalibration(Metric):
    """Calibration over voxels (top-label ECE, classwise ECE, Brier, NLL) and in the boundary band."""

    name = "ece"
    tasks: ClassVar[tuple[str, ...]] = ("segmentation",)
    higher_is_better = False
    headline = ("ece", "boundary_ece")
    headline_order = 200
    definitions = {
        "ece": "Expected calibration error over voxels: Σ_b (n_b/n)·|acc_b − conf_b| over 15 equal-width bins of the "
               "top-label confidence, every voxel of every image a sample (a confidence of exactly 1 in the last "
               "bin); the bootstrap resamples images.",
        "classwise_ece": "Mean over classes of the ECE of p_k against 1[y = k], over voxels (Kull et al. 2019).",
        "brier": "Mean over voxels of Σ_k (p_k − 1[y = k])².",
        "nll": "Mean over voxels of −log p_y (negative log-likelihood of the reference class).",
        "boundary_ece": "ECE over the voxels within task.boundary_width voxels of a predicted boundary (a voxel with a "
                        "face neighbour of another predicted class), where segmentation miscalibration concentrates.",
    }

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        q: Mapping[str, Tensor] = probs  # type: ignore[assignment]
        return calibration_from_stats(_stats(q), weights)

    def curves(self, probs: Tensor, labels: Tensor, ctx: MetricContext) -> dict[str, Any] | None:
        q: Mapping[str, Tensor] = probs  # type: ignore[assignment]
        return {"voxel_reliability": reliability_bins(_stats(q))}


def _stats(q: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The task's calibration quantities under the names :mod:`.voxel_calibration` uses."""
    return {"top": q["cal_top"], "classwise": q["cal_classwise"], "band": q["cal_band"], "brier": q["brier"],
            "nll": q["nll"], "voxels": q["voxels"]}
