"""Confidence binning and binned calibration errors (ECE, MCE, ACE), binned exactly as netcal bins.

Shared by the built-in calibration metrics, the subgroup analysis and temperature scaling, and
documented for third-party metrics (docs/plugins.md, "Helper modules for metrics"). Binning
follows ``netcal.metrics`` 1.x (``_Miscalibration``) so that values can be checked against it:

* confidences are clipped to ``[eps, 1 - eps]`` with ``eps`` the machine epsilon of the input
  dtype, so a confidence of exactly 1.0 falls in the last bin (and 0.0 in the first);
* equal-width edges are ``numpy.linspace(0, 1, n_bins + 1)``; a value on an inner edge goes to
  the bin above (``searchsorted(side="right")``, as ``numpy.histogramdd``);
* empty bins are left out (netcal ``sample_threshold = 1``).

Every function takes a weight matrix ``[R, N]`` where it sums (see :mod:`medaudit.metric`), so a
bootstrap is one call over all resamples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .weighted import safe_div

__all__ = [
    "bin_index",
    "binned_sums",
    "calibration_errors",
    "clip_confidence",
    "ece_mce_ace_from_bins",
    "equal_width_edges",
    "top_label",
    "weighted_quantile_edges",
]

_NAN = float("nan")


def clip_confidence(x: Tensor) -> Tensor:
    """Clip to ``[eps, 1 - eps]`` (eps of ``x``'s dtype, as netcal) and promote to float64.

    Parameters
    ----------
    x : Tensor, any shape, floating point
        Confidences or probabilities.

    Returns
    -------
    Tensor of ``x``'s shape, float64.
    """
    eps = torch.finfo(x.dtype).eps
    return x.clamp(eps, 1.0 - eps).double()


def equal_width_edges(n_bins: int, device: torch.device | None = None) -> Tensor:
    """Equal-width bin edges ``numpy.linspace(0, 1, n_bins + 1)``, bit-identical to netcal's.

    Parameters
    ----------
    n_bins : int
    device : torch.device, optional

    Returns
    -------
    Tensor ``[n_bins + 1]`` float64.
    """
    return torch.from_numpy(np.linspace(0.0, 1.0, n_bins + 1)).to(device)


def equal_width_bin_index(values: Tensor, edges: Tensor) -> Tensor:
    """:func:`bin_index` for :func:`equal_width_edges` (shared ``[B + 1]``), by arithmetic: the
    bin ``floor(value · B)`` corrected by one comparison with each of its edges, which rounding can
    put it one bin off. Equal to :func:`bin_index` everywhere (values on an edge included), and a
    fraction of ``searchsorted``'s cost on the millions of voxels of a segmentation map.

    The comparisons run in ``values``' own dtype, against each edge rounded up to the smallest
    value of that dtype not below it: for any value of that dtype, ``value >= edge`` holds exactly
    when ``value >= rounded edge`` does, so float32 confidences are binned as their exact float64
    promotions would be, without promoting millions of them.
    """
    n_bins = edges.shape[-1] - 1
    dtype = values.dtype
    lower = edges.to(dtype)
    lower = torch.where(lower.double() < edges, torch.nextafter(lower, torch.full_like(lower, float("inf"))), lower)
    # the last bin is closed: nothing moves past it
    lower[-1] = float("inf")
    index = (values * n_bins).to(torch.int64).clamp_(0, n_bins - 1)  # truncation is floor: values are >= 0
    index -= (values < lower[index]).to(torch.int64)
    index += (values >= lower[index + 1]).to(torch.int64)
    return index.clamp_(0, n_bins - 1)


def bin_index(values: Tensor, edges: Tensor) -> Tensor:
    """Bin of each value: ``[lo, hi)`` bins, the last one closed (``numpy.histogramdd``).

    Parameters
    ----------
    values : Tensor ``[N]`` (or ``[N, K]``), or ``[R, N]`` with per-row edges
    edges : Tensor ``[B + 1]`` (shared) or ``[R, B + 1]`` (one set per row of ``values``)

    Returns
    -------
    Tensor int64 of ``values``' shape, in ``0..B-1`` (values outside the edges go to the outer bins).
    """
    n_bins = edges.shape[-1] - 1
    return (torch.searchsorted(edges.contiguous(), values.contiguous(), right=True) - 1).clamp_(0, n_bins - 1)


def binned_sums(
    weights: Tensor, index: Tensor, n_bins: int, confidence: Tensor, hit: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted count, confidence sum and hit sum per bin.

    Parameters
    ----------
    weights : Tensor ``[R, N]`` float64
    index : Tensor int64, ``[N]`` (bins shared by every row) or ``[R, N]`` (per-row bins, ACE)
        From :func:`bin_index`.
    n_bins : int
    confidence, hit : Tensor ``[N]`` float64

    Returns
    -------
    count, conf_sum, hit_sum : Tensor ``[R, n_bins]`` each.
    """
    r = weights.shape[0]
    zeros = torch.zeros(r, n_bins, dtype=torch.float64, device=weights.device)
    wc, wh = weights * confidence, weights * hit
    if index.ndim == 1:
        return zeros.index_add(1, index, weights), zeros.index_add(1, index, wc), zeros.index_add(1, index, wh)
    return zeros.scatter_add(1, index, weights), zeros.scatter_add(1, index, wc), zeros.scatter_add(1, index, wh)


def ece_mce_ace_from_bins(count: Tensor, conf_sum: Tensor, hit_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""ECE, MCE and the mean bin gap from per-bin sums ``[R, B]``.

    .. math:: \mathrm{ECE} = \sum_b \frac{n_b}{n}\,|\bar a_b - \bar c_b|, \quad
              \mathrm{MCE} = \max_{b: n_b > 0} |\bar a_b - \bar c_b|, \quad
              \text{gap} = \frac{1}{|\{b: n_b>0\}|}\sum_{b: n_b>0} |\bar a_b - \bar c_b|

    (the last is ACE when the bins are equal-mass).

    Parameters
    ----------
    count, conf_sum, hit_sum : Tensor ``[R, B]``
        Weighted count, confidence sum and hit sum per bin (:func:`binned_sums`).

    Returns
    -------
    ece, mce, mean_gap : Tensor ``[R]`` each; all NaN on a row of total weight 0.
    """
    nonempty = count > 0
    gap = torch.where(nonempty, (hit_sum - conf_sum).abs() / torch.where(nonempty, count, torch.ones_like(count)), torch.zeros_like(count))
    total = count.sum(dim=1)
    ece = safe_div((gap * count).sum(dim=1), total)
    mce = torch.where(total > 0, gap.amax(dim=1), torch.full_like(total, _NAN))
    mean_gap = safe_div(gap.sum(dim=1), nonempty.sum(dim=1).to(gap.dtype))
    return ece, mce, mean_gap


def weighted_quantile_edges(values: Tensor, weights: Tensor, n_bins: int) -> Tensor:
    r"""Equal-mass bin edges per weight row, ``[R, n_bins + 1]``, first edge 0 and last 1.

    For integer weights, row ``r`` equals ``numpy.quantile(np.repeat(values, w_r), q)`` at
    ``q = linspace(0, 1, n_bins + 1)`` (linear interpolation between order statistics
    :math:`x_{(\lfloor h\rfloor)}` and :math:`x_{(\lfloor h\rfloor + 1)}`, :math:`h = q (M-1)`),
    with the outer edges set to 0 and 1 as netcal's ACE does. The values are sorted once;
    order statistics of every row come from one batched ``searchsorted`` on cumulative counts.

    Parameters
    ----------
    values : Tensor ``[N]`` float64
    weights : Tensor ``[R, N]``
    n_bins : int

    Returns
    -------
    Tensor ``[R, n_bins + 1]`` float64.
    """
    order = torch.argsort(values)
    return _quantile_edges_sorted(values[order], torch.cumsum(weights[:, order], dim=1), n_bins)


def _quantile_edges_sorted(sorted_vals: Tensor, cum: Tensor, n_bins: int) -> Tensor:
    """:func:`weighted_quantile_edges` from the sorted values and each row's cumulative weights in that order."""
    m = cum[:, -1:]  # [R, 1]
    q = torch.from_numpy(np.linspace(0.0, 1.0, n_bins + 1)).to(sorted_vals.device)
    h = q[None, :] * (m - 1).clamp_min(0)
    lo = torch.floor(h)
    frac = h - lo
    hi = torch.minimum(lo + 1, (m - 1).clamp_min(0))

    def order_stat(j: Tensor) -> Tensor:
        # j-th (0-based) value of the expanded sample: first sorted position whose cumulative count exceeds j
        pos = torch.searchsorted(cum.contiguous(), j.contiguous(), right=True).clamp_(max=sorted_vals.numel() - 1)
        return sorted_vals[pos]

    a, b = order_stat(lo), order_stat(hi)
    diff = b - a
    # numpy's _lerp: interpolate from the nearer end, so edges hit sample values exactly as numpy's do
    edges = torch.where(frac >= 0.5, b - diff * (1 - frac), a + diff * frac)
    edges[:, 0] = 0.0
    edges[:, -1] = 1.0
    return edges


def top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label view of class probabilities: the confidence of the arg-max and whether it is right.

    Parameters
    ----------
    probs : Tensor ``[N, K]``
    labels : Tensor ``[N]`` class indices

    Returns
    -------
    confidence : Tensor ``[N]`` float64, the max probability clipped by :func:`clip_confidence`.
    hit : Tensor ``[N]`` float64, 1.0 where the arg-max (first class on ties) equals the label.
    """
    clipped = clip_confidence(probs)
    conf, pred = clipped.max(dim=1)
    return conf, (pred == labels.to(probs.device, torch.int64)).double()


def _sorted_bin_sums(prefix: Tensor, bounds: Tensor) -> Tensor:
    """Per-bin sums ``[R, B]`` from prefix sums ``[R, N + 1]`` of values in sorted order and the
    bins' sorted-position bounds ``[B + 1]`` (shared) or ``[R, B + 1]`` (per row)."""
    at = prefix.gather(1, bounds.expand(prefix.shape[0], -1))
    return at[:, 1:] - at[:, :-1]


def calibration_errors(conf: Tensor, hit: Tensor, weights: Tensor, n_bins: int,
                       presorted: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """``ece``, ``mce`` (equal-width bins) and ``ace`` (equal-mass bins) of one confidence/hit pair.

    Both binnings are read from the same prefix sums: in confidence order every bin, of either
    kind and of any weight row, is a run of consecutive samples, bounded by where its edges fall
    among the sorted confidences (a value on an edge belongs to the bin above, as in
    :func:`bin_index`), so its weighted count, confidence and hit sums are differences of prefix
    sums. Each row costs three cumulative sums instead of a scatter per binning and sum.

    Parameters
    ----------
    conf : Tensor ``[N]`` float64, already clipped (see :func:`clip_confidence`).
    hit : Tensor ``[N]`` float64 in {0, 1}.
    weights : Tensor ``[R, N]`` float64.
    n_bins : int
    presorted : (Tensor, Tensor), optional
        ``torch.sort(conf)`` when the caller already has it.

    Returns
    -------
    dict of ``[R]`` tensors.
    """
    r, n = weights.shape
    sorted_conf, order = presorted if presorted is not None else torch.sort(conf)
    w = torch.gather(weights, 1, order.expand(r, n))  # 3x faster than weights[:, order] on a CPU
    # prefix sums with a leading zero column: count, confidence and hit mass of the first k samples
    sums = weights.new_zeros(3, r, n + 1)
    torch.cumsum(w, dim=1, out=sums[0, :, 1:])
    torch.cumsum(w * sorted_conf, dim=1, out=sums[1, :, 1:])
    torch.cumsum(w * hit[order], dim=1, out=sums[2, :, 1:])
    cum = sums[0, :, 1:]

    def bounds(edges: Tensor) -> Tensor:
        # first sorted position at or above each inner edge; the outer edges 0 and 1 enclose every
        # clipped confidence, and a value beyond them would be clamped into the outer bins anyway
        inner = torch.searchsorted(sorted_conf, edges[..., 1:-1].contiguous(), right=False)
        ends = inner.new_zeros(*inner.shape[:-1], 1)
        return torch.cat([ends, inner, ends + n], dim=-1)

    ece, mce, _ = ece_mce_ace_from_bins(*(_sorted_bin_sums(p, bounds(equal_width_edges(n_bins, conf.device))) for p in sums))
    equal_mass = bounds(_quantile_edges_sorted(sorted_conf, cum, n_bins))
    _, _, ace = ece_mce_ace_from_bins(*(_sorted_bin_sums(p, equal_mass) for p in sums))
    return {"ece": ece, "mce": mce, "ace": ace}
