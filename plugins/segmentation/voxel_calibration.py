"""Voxel-level calibration of segmentation maps, kept per image as sufficient statistics.

The metrics are over voxels — every voxel of every image a sample, with the same definitions as
the classification task's (:mod:`medaudit.binning`: equal-width bins, confidences clipped to
``[eps, 1 − eps]`` as netcal does, a confidence of 1 in the last bin) — but the bootstrap resamples
*images*. So the forward loop keeps, per image, bin counts and sums (:func:`calibration_stats`),
and the metrics are computed from their weighted sums over images (:func:`calibration_from_stats`):
an integer weight ``w`` on an image is exactly that image repeated ``w`` times. Sums are float64:
float32 loses whole voxels past 2²⁴ per bin.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medaudit.binning import clip_confidence, ece_mce_ace_from_bins, equal_width_bin_index, equal_width_edges
from medaudit.weighted import safe_div

from .measures import channel_max, one_hot


def _binned(index: Tensor, n_bins: int, *values: Tensor) -> Tensor:
    """Per-image sums over voxels into bins: ``index`` ``[B, V]`` (or ``[B, K, V]``), values of the
    same shape → ``[B, (K,) n_bins, len(values)]`` float64."""
    out = torch.zeros(*index.shape[:-1], n_bins, len(values), dtype=torch.float64, device=index.device)
    for j, v in enumerate(values):
        out[..., j].scatter_add_(-1, index, v.double())
    return out


def calibration_stats(probs: Tensor, ref: Tensor, n_bins: int, band: Tensor | None = None) -> dict[str, Tensor]:
    """Per-image sufficient statistics of the voxel calibration metrics.

    Two kinds of maps. One class per voxel (softmax; ``ref`` a label map ``[B, *S]``): top-label
    statistics. Independent structures (sigmoid; ``ref`` bool ``[B, K, *S]``, one map per
    structure, which may overlap): every (voxel, structure) pair is a binary prediction with
    positive-class confidence ``p_k``, as for a multilabel classifier — ``top`` pools the
    structures' positive-class statistics, ``brier`` and ``nll`` sum the squared errors and binary
    cross-entropies over structures, ``entropy`` sums the binary entropies and ``msp`` averages
    ``max(p_k, 1 − p_k)`` over structures.

    Parameters
    ----------
    probs : Tensor ``[B, K, *S]``, class probabilities per voxel (softmax: rows over K sum to 1;
        sigmoid: independent probabilities)
    ref : Tensor ``[B, *S]`` int, the reference classes; or bool ``[B, K, *S]``, the reference
        structures of a sigmoid model
    n_bins : int
    band : Tensor ``[B, *S]`` bool, optional
        Voxels of the boundary band (:func:`boundary_band`).

    Returns
    -------
    dict: ``top`` ``[B, n_bins, 3]`` (voxels, confidence sum, hit sum of the top label),
    ``classwise`` ``[B, K, n_bins, 3]`` (voxels, sum of p_k, sum of 1[y = k]), ``band`` like
    ``top`` over the band's voxels (zeros without one), ``brier``, ``nll`` (sums over voxels),
    ``voxels``, ``entropy`` and ``msp`` (means over voxels), each ``[B]``.
    """
    b, k = probs.shape[:2]
    if ref.ndim == probs.ndim:
        return _structure_stats(probs, ref, n_bins, band)
    p = probs.reshape(b, k, -1)
    y = ref.reshape(b, -1).long()
    edges = equal_width_edges(n_bins, probs.device)
    clipped = clip_confidence(p)  # [B, K, V] float64
    conf, pred = channel_max(clipped)
    hit = (pred == y).double()
    top_index = equal_width_bin_index(conf, edges)
    ones = torch.ones_like(conf)
    top = _binned(top_index, n_bins, ones, conf, hit)
    onehot = one_hot(y, k).double()  # [B, K, V]
    classwise = _binned(equal_width_bin_index(clipped, edges), n_bins, torch.ones_like(clipped), clipped, onehot)
    if band is None:
        band_stats = torch.zeros_like(top)
    else:
        inside = band.reshape(b, -1).double()
        band_stats = _binned(top_index, n_bins, inside, conf * inside, hit * inside)
    pd = p.double()
    eps = torch.finfo(probs.dtype).eps
    p_true = pd.gather(1, y[:, None])[:, 0]
    return {
        "top": top, "classwise": classwise, "band": band_stats,
        "brier": ((pd - onehot) ** 2).sum(dim=(1, 2)),
        "nll": -torch.log(p_true.clamp(min=eps)).sum(dim=1),
        "voxels": torch.full((b,), float(y.shape[1]), dtype=torch.float64, device=probs.device),
        "entropy": -torch.special.xlogy(pd, pd).sum(dim=1).mean(dim=1),
        "msp": channel_max(pd)[0].mean(dim=1),
    }


def _structure_stats(probs: Tensor, ref: Tensor, n_bins: int, band: Tensor | None) -> dict[str, Tensor]:
    """:func:`calibration_stats` of independent structures (sigmoid): ``ref`` bool ``[B, K, *S]``."""
    b, k = probs.shape[:2]
    p = probs.reshape(b, k, -1)
    y = ref.reshape(b, k, -1).double()
    edges = equal_width_edges(n_bins, probs.device)
    clipped = clip_confidence(p)  # [B, K, V] float64, the positive-class confidence of each structure
    index = equal_width_bin_index(clipped, edges)
    classwise = _binned(index, n_bins, torch.ones_like(clipped), clipped, y)
    if band is None:
        band_stats = torch.zeros_like(classwise[:, 0])
    else:
        inside = band.reshape(b, 1, -1).double().expand_as(clipped)
        band_stats = _binned(index, n_bins, inside, clipped * inside, y * inside).sum(dim=1)
    pd = p.double()
    eps = torch.finfo(probs.dtype).eps
    q = pd.clamp(eps, 1 - eps)
    voxels = p.shape[2]
    return {
        "top": classwise.sum(dim=1), "classwise": classwise, "band": band_stats,
        "brier": ((pd - y) ** 2).sum(dim=(1, 2)),
        "nll": -(y * torch.log(q) + (1 - y) * torch.log1p(-q)).sum(dim=(1, 2)),
        "voxels": torch.full((b,), float(voxels), dtype=torch.float64, device=probs.device),
        "entropy": -(torch.special.xlogy(pd, pd) + torch.special.xlogy(1 - pd, 1 - pd)).sum(dim=1).mean(dim=1),
        "msp": torch.maximum(pd, 1 - pd).mean(dim=(1, 2)),
    }


def boundary_band(pred_labels: Tensor, width: int) -> Tensor:
    """Voxels within ``width`` voxels (Chebyshev distance, a ``(2w+1)``-cube) of a predicted
    boundary, ``[B, *S]`` bool. A boundary voxel has a face neighbour of another predicted class
    (``pred_labels`` ``[B, *S]``), or, for independent structures (bool ``[B, K, *S]``), a face
    neighbour on the other side of any structure's boundary; the image border is not a boundary."""
    structures = pred_labels.dtype == torch.bool
    lab = pred_labels if structures else pred_labels.long()[:, None]
    nd = lab.ndim - 2
    boundary = torch.zeros_like(lab, dtype=torch.bool)
    for axis in range(2, nd + 2):
        n = lab.shape[axis]
        differs = lab.narrow(axis, 0, n - 1) != lab.narrow(axis, 1, n - 1)
        boundary.narrow(axis, 0, n - 1).logical_or_(differs)
        boundary.narrow(axis, 1, n - 1).logical_or_(differs)
    boundary = boundary.any(dim=1)
    pool = F.max_pool2d if nd == 2 else F.max_pool3d
    # a box dilation is separable: one pass per axis, 3·(2w+1) comparisons per voxel, not (2w+1)³
    band = boundary[:, None].float()
    for axis in range(nd):
        kernel = [1] * nd
        kernel[axis] = 2 * width + 1
        padding = [0] * nd
        padding[axis] = width
        band = pool(band, tuple(kernel), stride=1, padding=tuple(padding))
    return band[:, 0] > 0


def calibration_from_stats(stats: dict[str, Tensor], weights: Tensor) -> dict[str, Tensor]:
    """``ece``, ``classwise_ece``, ``brier``, ``nll`` and ``boundary_ece`` ``[R]`` from per-image
    statistics ``[N, …]`` (:func:`calibration_stats`) and image weights ``[R, N]``."""
    w = weights.double()
    top = torch.einsum("rn,nbj->rbj", w, stats["top"].double())
    ece = ece_mce_ace_from_bins(top[..., 0], top[..., 1], top[..., 2])[0]
    band = torch.einsum("rn,nbj->rbj", w, stats["band"].double())
    boundary_ece = ece_mce_ace_from_bins(band[..., 0], band[..., 1], band[..., 2])[0]
    cw = torch.einsum("rn,nkbj->rkbj", w, stats["classwise"].double())
    voxels = w @ stats["voxels"].double()
    per_class = safe_div((cw[..., 2] - cw[..., 1]).abs().sum(dim=2), voxels[:, None].expand(-1, cw.shape[1]))
    return {"ece": ece, "classwise_ece": per_class.mean(dim=1), "boundary_ece": boundary_ece,
            "brier": safe_div(w @ stats["brier"].double(), voxels), "nll": safe_div(w @ stats["nll"].double(), voxels)}


def reliability_bins(stats: dict[str, Tensor]) -> dict[str, Any]:
    """The voxel reliability diagram of all images, in the format of the per-sample one
    (``{"kind", "bins": [{"lower", "upper", "confidence", "accuracy", "count"}]}``; ``confidence``
    and ``accuracy`` None for an empty bin), JSON-ready."""
    top = stats["top"].double().sum(dim=0)
    edges = equal_width_edges(top.shape[0]).tolist()
    bins = []
    for b, (count, conf, hit) in enumerate(top.tolist()):
        bins.append({"lower": edges[b], "upper": edges[b + 1], "count": int(count),
                     "confidence": None if count == 0 else conf / count,
                     "accuracy": None if count == 0 else hit / count})
    return {"kind": "over voxels: top-label (softmax), positive-class pooled over structures (sigmoid)", "bins": bins}
