"""Merging the units' outputs into the audit's ``[S, N, ...]`` arrays, in a fixed order.

The merge is deterministic whatever order the units completed in: units are placed by their
sample range, scenarios in the audit's order, so the result is the same for any executor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..detector import Detector
from ..memory import release_free_memory
from ..outputs import Scenario
from .shard import REPRESENTATION, UnitOutputs


@dataclass
class ForwardResult:
    scenarios: list[Scenario]
    outputs: dict[str, Tensor]  # quantity the task declares -> [S, N, *shape]
    embeddings: dict[str, Tensor]  # detector -> [S, N, D]
    params: dict[str, dict[str, Tensor]]  # scenario -> param -> [N]
    seconds: dict[str, float]
    output_kind: str
    resumed_shards: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # scenario id -> why it was left out
    failed_detectors: dict[str, str] = field(default_factory=dict)
    memory_format: str = "contiguous"  # of the forward passes: "contiguous" or "channels_last"
    maps: dict[str, Tensor] = field(default_factory=dict)  # scenario -> predicted label maps [N, *spatial]
    pad_last: bool = False  # the model accepts only full chunks of audit.model_batch_size (found by the probe)
    # the feature layer's pooled output per scenario and sample [S, N, D] (audit.representation), else None
    representation: Tensor | None = None

    @property
    def probs(self) -> Tensor:
        """Class probabilities ``[S, N, K]``: the ``probs`` quantity of the classification tasks."""
        return self.outputs["probs"]


def merge_rows(holding: dict[str, list[UnitOutputs]], ids: list[str], n: int,
               take: Callable[[UnitOutputs, str], Tensor]) -> Tensor:
    """``[S, n, ...]`` from the ``[stop - start, ...]`` part of each scenario in every unit of
    ``holding[scenario]`` (the units that hold it).

    A unit may hold a subset of the scenarios (units are scenario subset × shard); every
    scenario of ``ids`` must be covered once over ``0..n-1``. The result is allocated once and
    ``take`` pops each part from its unit, so a part is freed as soon as it is copied: the merge
    holds the result and one part. Stacking concatenations held the parts, the concatenations
    and the result at once (at N = 20,000 on the example audit the merge raised the forward
    phase's peak by 84 MB).
    """
    out: Tensor | None = None
    for s, sid in enumerate(ids):
        covered = 0
        for unit in holding[sid]:
            part = take(unit, sid)
            if out is None:
                out = part.new_empty((len(ids), n, *part.shape[1:]))
            out[s, unit.start : unit.stop] = part
            covered += unit.stop - unit.start
        if covered != n:  # a planning or executor bug: never merge a scenario with holes or overlaps
            raise RuntimeError(f"the units hold {covered} rows of scenario {sid}, not the {n} samples")
    assert out is not None  # callers pass at least one unit and one scenario
    return out


def merge_units(units: list[UnitOutputs], n: int, scenarios: list[Scenario], detectors: Sequence[Detector],
                output_kind: str, resumed: int, memory_format: str, pad_last: bool = False) -> ForwardResult:
    """The audit's forward result from the outputs of units covering ``0..n-1`` for every
    scenario (in any order; each unit a subset of the scenarios × a shard).

    A scenario that failed in any unit (its perturbation raised or broke its contract) is left
    out everywhere, as is a detector that failed in any unit; the message of the last unit (in
    sample order) that it failed in says why. Consumes ``units`` (emptied), so the parts are freed by the merge.
    """
    units.sort(key=lambda u: (u.start, min(u.held() | set(u.failed), default="")))
    failures = {sid: msg for u in units for sid, msg in u.failed.items()}
    failed_detectors = {d: msg for u in units for d, msg in u.failed_detectors.items()}
    scenarios = [s for s in scenarios if s.id not in failures]
    ids = [s.id for s in scenarios]
    holding = {sid: [u for u in units if sid in u.held()] for sid in ids}  # in sample order
    names = list(dict.fromkeys(name for u in units for name in u.outputs))
    outputs = {name: merge_rows(holding, ids, n, lambda u, sid, name=name: u.outputs[name].pop(sid)) for name in names}
    embeddings: dict[str, Tensor] = {}
    for d in detectors:
        if d.name not in failed_detectors and all(d.name in u.embeddings.get(sid, {}) for sid in ids for u in holding[sid]):
            embeddings[d.name] = merge_rows(holding, ids, n, lambda u, sid, name=d.name: u.embeddings[sid].pop(name))
    representation = (merge_rows(holding, ids, n, lambda u, sid: u.embeddings[sid].pop(REPRESENTATION))
                      if ids and all(REPRESENTATION in u.embeddings.get(sid, {}) for sid in ids for u in holding[sid])
                      else None)
    params = {sid: {k: torch.cat([u.params[sid][k] for u in holding[sid]]) for k in holding[sid][0].params.get(sid, {})}
              for sid in ids}
    seconds = {sid: sum(u.seconds.get(sid, 0.0) for u in holding[sid]) for sid in ids}
    maps = {sid: torch.cat([u.maps.pop(sid) for u in holding[sid]]) for sid in ids
            if holding[sid] and all(sid in u.maps for u in holding[sid])}
    units.clear()
    del holding
    release_free_memory()  # the units' parts, now merged
    return ForwardResult(scenarios, outputs, embeddings, params, seconds, output_kind, resumed, failures,
                         failed_detectors, memory_format, maps, pad_last, representation)
