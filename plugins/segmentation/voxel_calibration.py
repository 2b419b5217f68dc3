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

import functools
from typing import Any

import torch
from torch import Tensor

from medaudit.binning import ece_mce_ace_from_bins, equal_width_bin_index, equal_width_edges
from medaudit.weighted import safe_div

from .measures import channel_max, one_hot


def _selected(index: Tensor, flag: Tensor, n_bins: int) -> Tensor:
    """Bin indices that send the voxels where ``flag`` is false to a second set of ``n_bins`` bins past
    the real ones (dropped after the sums), so that only flagged voxels fill bins ``0..n_bins-1``."""
    return index + (~flag).long() * n_bins


def _stats(index: Tensor, conf: Tensor, hit: Tensor, n_bins: int) -> Tensor:
    """``[*R, n_bins, 3]`` float64: voxels, confidence sum and hit sum per bin, for each row of bin
    indices ``index`` ``[*R, V]`` (``hit`` bool). Counts are exact; each bin adds its voxels'
    confidences (promoted exactly) in voxel order, whatever else the batch holds."""
    ones = torch.ones((), dtype=torch.float64, device=index.device).expand(index.shape)
    sums = [torch.zeros(*index.shape[:-1], n_bins, dtype=torch.float64, device=index.device).scatter_add_(-1, index, v)
            for v in (ones, conf.double(), hit.double())]
    return torch.stack(sums, dim=-1)


def calibration_stats(probs: Tensor, ref: Tensor, n_bins: int, band: Tensor | None = None) -> dict[str, Tensor]:
    """Per-image sufficient statistics of the voxel calibration metrics.

    Two kinds of maps. One class per voxel (softmax; ``ref`` a label map ``[B, *S]``): top-label
    statistics. Independent structures (sigmoid; ``ref`` bool ``[B, K, *S]``, one map per
    structure, which may overlap): every (voxel, structure) pair is a binary prediction with
    positive-class confidence ``p_k``, as for a multilabel classifier — ``top`` pools the
    structures' positive-class statistics, ``brier`` and ``nll`` sum the squared errors and binary
    cross-entropies over structures, ``entropy`` sums the binary entropies and ``msp`` averages
    ``max(p_k, 1 − p_k)`` over structures.

    Per-voxel work stays in the probabilities' dtype wherever it is exact there — clipping, arg-max,
    maxima, bin indices (:func:`~medaudit.binning.equal_width_bin_index` bins a float32 value as
    its float64 promotion) — and only what rounds (sums, logarithms, squares) runs in float64: the
    millions of voxels of a 96³ volume make this most of the reduction's cost.

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
    eps = torch.finfo(p.dtype).eps
    clipped = p.clamp(eps, 1.0 - eps)  # clip_confidence's values, in p's dtype (promotion is exact)
    conf, pred = channel_max(clipped)
    hit = pred == y
    index = equal_width_bin_index(clipped, edges)  # [B, K, V]
    top_index = index.gather(1, pred[:, None])[:, 0]  # the top label's bin: that of its confidence
    top = _stats(top_index, conf, hit, n_bins)
    onehot = one_hot(y, k)  # [B, K, V] bool
    classwise = _stats(index, clipped, onehot, n_bins)
    if band is None:
        band_stats = torch.zeros_like(top)
    else:
        inside = band.reshape(b, -1)
        band_stats = _stats(_selected(top_index, inside, n_bins), conf, hit, 2 * n_bins)[:, :n_bins]
    pd = p.double()
    p_true = p.gather(1, y[:, None])[:, 0].double()
    voxels = y.shape[1]
    return {
        "top": top, "classwise": classwise, "band": band_stats,
        # Σ_k (p_k − 1[y = k])² = Σ_k p_k² − 2 p_y + 1 per voxel, without a one-hot copy in float64
        "brier": (pd * pd).sum(dim=(1, 2)) - 2.0 * p_true.sum(dim=1) + voxels,
        "nll": -torch.log(p_true.clamp(min=eps)).sum(dim=1),
        "voxels": torch.full((b,), float(voxels), dtype=torch.float64, device=probs.device),
        "entropy": -torch.special.xlogy(pd, pd).sum(dim=1).mean(dim=1),
        "msp": functools.reduce(torch.maximum, p.unbind(1)).double().mean(dim=1),
    }


def _structure_stats(probs: Tensor, ref: Tensor, n_bins: int, band: Tensor | None) -> dict[str, Tensor]:
    """:func:`calibration_stats` of independent structures (sigmoid): ``ref`` bool ``[B, K, *S]``."""
    b, k = probs.shape[:2]
    p = probs.reshape(b, k, -1)
    y = ref.reshape(b, k, -1).bool()
    edges = equal_width_edges(n_bins, probs.device)
    eps = torch.finfo(p.dtype).eps
    clipped = p.clamp(eps, 1.0 - eps)  # the positive-class confidence of each structure
    index = equal_width_bin_index(clipped, edges)
    classwise = _stats(index, clipped, y, n_bins)
    if band is None:
        band_stats = torch.zeros_like(classwise[:, 0])
    else:
        inside = band.reshape(b, 1, -1).expand_as(y)
        band_stats = _stats(_selected(index, inside, n_bins), clipped, y, 2 * n_bins)[:, :, :n_bins].sum(dim=1)
    pd = p.double()
    q = pd.clamp(eps, 1 - eps)
    voxels = p.shape[2]
    return {
        "top": classwise.sum(dim=1), "classwise": classwise, "band": band_stats,
        "brier": torch.where(y, pd - 1.0, pd).square_().sum(dim=(1, 2)),
        "nll": -torch.where(y, torch.log(q), torch.log1p(-q)).sum(dim=(1, 2)),
        "voxels": torch.full((b,), float(voxels), dtype=torch.float64, device=probs.device),
        "entropy": -(torch.special.xlogy(pd, pd) + torch.special.xlogy(1 - pd, 1 - pd)).sum(dim=1).mean(dim=1),
        "msp": torch.maximum(pd, 1 - pd).mean(dim=(1, 2)),
    }


def boundary_band(pred_labels: Tensor, width: int) -> Tensor:
    """Voxels within ``width`` voxels (Chebyshev distance, a ``(2w+1)``-cube) of a predicted
    boundary, ``[B, *S]`` bool. A boundary voxel has a face neighbour of another predicted class
    (``pred_labels`` ``[B, *S]``), or, for independent structures (bool ``[B, K, *S]``), a face
    neighbour on the other side of any structure's boundary; the image border is not a boundary."""
    lab = pred_labels if pred_labels.dtype == torch.bool else pred_labels[:, None]
    boundary = torch.zeros(lab.shape[:1] + lab.shape[2:], dtype=torch.bool, device=lab.device)
    for axis in range(1, boundary.ndim):
        n = boundary.shape[axis]
        differs = (lab.narrow(axis + 1, 0, n - 1) != lab.narrow(axis + 1, 1, n - 1)).any(dim=1)
        boundary.narrow(axis, 0, n - 1).logical_or_(differs)
        boundary.narrow(axis, 1, n - 1).logical_or_(differs)
    # A box dilation is separable, one axis after the other, and along an axis it is the OR of the
    # 2w shifted copies: bool passes over the volume, a fraction of a max-pool's cost in float.
    band = boundary
    for axis in range(1, band.ndim):
        n = band.shape[axis]
        grown = band.clone()
        for shift in range(1, min(width, n - 1) + 1):
            grown.narrow(axis, 0, n - shift).logical_or_(band.narrow(axis, shift, n - shift))
            grown.narrow(axis, shift, n - shift).logical_or_(band.narrow(axis, 0, n - shift))
        band = grown
    return band


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
