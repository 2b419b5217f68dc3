"""The phase-encode axis of the MRI artifacts: drawn per sample, and per-axis 1-D work combined.

Scanners acquire k-space line by line along the phase-encode (PE) direction, so temporal effects
(motion, periodic modulation) act on whole lines/planes perpendicular to it. The PE axis is not
known from a tensor, so it is drawn per sample uniformly among the spatial axes
(:func:`draw_axis`); :func:`per_pe_axis` runs a 1-D transform along each sample's own axis.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from medaudit.perturbation import host_readable
from medaudit.rng import SampleRNG


def draw_axis(rng: SampleRNG, nd: int) -> Tensor:
    """A phase-encode (or resampling) axis per sample, uniform over the ``nd`` spatial axes."""
    return rng.integers(0, nd, 1)[:, 0]


def per_pe_axis(pe_axis: Tensor, nd: int, fn: Callable[[Tensor | None, int], Tensor]) -> Tensor:
    """Combine ``fn(samples, axis)`` over the phase-encode axes: each sample takes its own axis's result.

    ``fn`` transforms the samples with index tensor ``samples`` (``None``: all of them) along one
    spatial axis and must not depend on its batch-mates. When the axis draws can be read for
    free (:func:`~medaudit.perturbation.host_readable`: a CPU batch), each axis runs on its own
    samples only (a third of the work in 3D); otherwise every sample runs along every axis and
    ``torch.where`` selects, which needs no host synchronisation. Both give identical values.
    """
    if host_readable(pe_axis):
        out: Tensor | None = None
        for a in range(nd):  # loop over axes, not samples
            idx = (pe_axis == a).nonzero()[:, 0]
            if len(idx) == len(pe_axis):
                return fn(None, a)
            if len(idx):
                part = fn(idx, a)
                if out is None:
                    out = part.new_empty((len(pe_axis), *part.shape[1:]))
                out[idx] = part
        assert out is not None, "per_pe_axis needs a non-empty batch"
        return out
    combined = fn(None, 0)
    for a in range(1, nd):
        pick = (pe_axis == a).reshape(-1, *([1] * (combined.ndim - 1)))
        combined = torch.where(pick, fn(None, a), combined)
    return combined
