"""The perturbation boundary: every perturbation's output is checked against its contract.

A third-party perturbation whose output has another shape, dtype or device, holds NaN/Inf, or
leaves ``[0, 1]`` would otherwise run to the end with wrong numbers, be blamed on the model, or
end as an internal error. Its scenarios are left out instead, with a message naming the plugin,
the perturbation and what was wrong.

Shape, dtype, device and the length of per-sample parameters are host metadata, checked on every
batch before the model runs (a wrong shape is never blamed on the model). Values are checked on
the device: a running minimum and maximum per scenario, read once at the end of the shard, so
the batch loop never waits for the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

#: How far outside ``[0, 1]`` an output may stray: float rounding in unclamped arithmetic (about
#: 80 float32 ulps at 1.0), far below one 8-bit grey level (1/255 ≈ 0.0039).
RANGE_TOLERANCE = 1e-5


def metadata_problem(x: Tensor, out: object, params: Mapping[str, object]) -> str | None:
    """What is wrong with a perturbation's output ``out`` for the input ``x``, from metadata
    alone (no device access), or None."""
    if not isinstance(out, Tensor):
        return f"returned {type(out).__name__} instead of a tensor"
    if out.shape != x.shape:
        return f"returned shape {tuple(out.shape)} for input {tuple(x.shape)}"
    if out.dtype != x.dtype:
        return f"returned dtype {out.dtype} for input {x.dtype}"
    if out.device != x.device:
        return f"returned a tensor on {out.device} for input on {x.device}"
    for name, value in params.items():
        # The runner keeps 1-D parameters as one value per sample (see run_shard).
        if isinstance(value, Tensor) and value.ndim == 1 and value.shape[0] != x.shape[0]:
            return f"returned parameter {name!r} with {value.shape[0]} values for a batch of {x.shape[0]}"
    return None


class ValueGuard:
    """The running minimum and maximum of each scenario's perturbed images, on the device."""

    def __init__(self) -> None:
        self.low: dict[str, Tensor] = {}
        self.high: dict[str, Tensor] = {}

    def observe(self, sid: str, out: Tensor) -> None:
        """Fold a batch into the scenario's bounds (NaN propagates through min and max)."""
        lo, hi = torch.aminmax(out)
        if sid in self.low:
            lo, hi = torch.minimum(self.low[sid], lo), torch.maximum(self.high[sid], hi)
        self.low[sid], self.high[sid] = lo, hi

    def problems(self) -> dict[str, str]:
        """Scenario id -> what was wrong with its values so far; one device read for all scenarios."""
        if not self.low:
            return {}
        ids = list(self.low)
        bounds = torch.stack([torch.stack([self.low[s], self.high[s]]).float() for s in ids]).tolist()
        found = {}
        for sid, (lo, hi) in zip(ids, bounds):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                found[sid] = "returned NaN or Inf values"
            elif lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
                found[sid] = f"returned values in [{lo:.6g}, {hi:.6g}], outside [0, 1]"
        return found
