"""Where completed units of work are kept, so an interrupted audit can ``--resume``.

A store is keyed by unit: :meth:`ShardStore.load` returns a unit's outputs if it was completed
by an earlier run of the same audit, whichever executor ran it. The audit's fingerprint (model
and data hashes, input spec, seed, scenarios, shard layout, …) is the store's business: a store
from another configuration is never reused. :class:`ShardCache` keeps units in a local folder.

:func:`to_arrays` and :func:`from_arrays` are the one plain-array form of :class:`UnitOutputs`
(no pickle), used by the folder store and by anything that ships outputs between processes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .plan import WorkUnit
from .shard import UnitOutputs


class ShardStore(Protocol):
    """Completed units of work of one audit."""

    def load(self, unit: WorkUnit) -> UnitOutputs | None:
        """The unit's outputs if an earlier run completed it, else None."""

    def save(self, unit: WorkUnit, outputs: UnitOutputs) -> None:
        """Keep a completed unit (may finish in the background: see :meth:`flush`)."""

    def flush(self) -> None:
        """Return once every saved unit is kept."""


def to_arrays(outputs: UnitOutputs) -> dict[str, np.ndarray]:
    """A unit's outputs as named arrays (``kind|scenario|name``); strings as 0-d string arrays."""
    arrays: dict[str, np.ndarray] = {}
    for name, per_scenario in outputs.outputs.items():  # quantity names hold no "|" (medaudit.task)
        for sid, t in per_scenario.items():
            arrays[f"out|{name}|{sid}"] = t.numpy()
    for sid in next(iter(outputs.outputs.values()), {}):  # the scenarios kept (not failed)
        arrays[f"sec|{sid}"] = np.asarray(outputs.seconds.get(sid, 0.0))
    for sid, dd in outputs.embeddings.items():
        for det, t in dd.items():
            arrays[f"emb|{sid}|{det}"] = t.numpy()
    for sid, pp in outputs.params.items():
        for name, t in pp.items():
            arrays[f"param|{sid}|{name}"] = t.numpy()
    for sid, t in outputs.maps.items():
        arrays[f"map|{sid}"] = t.numpy()
    for sid, msg in outputs.failed.items():
        arrays[f"fail|{sid}"] = np.asarray(msg)
    for det, msg in outputs.failed_detectors.items():
        arrays[f"faildet|{det}"] = np.asarray(msg)
    return arrays


def from_arrays(start: int, stop: int, arrays: dict[str, np.ndarray]) -> UnitOutputs | None:
    """The inverse of :func:`to_arrays`; None when the arrays have another length than the unit
    (written with another shard layout: recompute rather than misalign)."""
    if any(k.startswith("out|") and len(v) != stop - start for k, v in arrays.items()):
        return None
    out = UnitOutputs(start, stop, outputs={}, embeddings={}, params={}, seconds={})
    for key, arr in arrays.items():
        kind, _, rest = key.partition("|")
        if kind == "out":
            name, _, sid = rest.partition("|")
            out.outputs.setdefault(name, {})[sid] = torch.from_numpy(arr)
        elif kind == "emb":
            sid, _, det = rest.partition("|")
            out.embeddings.setdefault(sid, {})[det] = torch.from_numpy(arr)
        elif kind == "param":
            sid, _, name = rest.partition("|")
            out.params.setdefault(sid, {})[name] = torch.from_numpy(arr)
        elif kind == "map":
            out.maps[rest] = torch.from_numpy(arr)
        elif kind == "sec":
            out.seconds[rest] = float(arr)
        elif kind == "fail":
            out.failed[rest] = str(arr)
        elif kind == "faildet":
            out.failed_detectors[rest] = str(arr)
    return out


class ShardCache:
    """A :class:`ShardStore` in a local folder, one ``.npz`` file per unit.

    Keyed by a fingerprint of everything that determines the outputs (model and data hashes,
    the input spec, seed, scenarios, shard layout): a cache from another configuration is never
    reused. Files are ``.npz`` (no pickle) written atomically, on a background thread: the
    write (hundreds of MB with feature embeddings) overlaps the next shard or the evaluation;
    :meth:`flush` waits for it.
    """

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.dir = root / fingerprint  # created by the first save, so a run that fails early leaves nothing
        self._writes: list[threading.Thread] = []

    @staticmethod
    def fingerprint(parts: dict[str, object]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _path(self, unit: WorkUnit) -> Path:
        return self.dir / f"shard-{unit.key}.npz"

    def load(self, unit: WorkUnit) -> UnitOutputs | None:
        path = self._path(unit)
        if not path.exists():
            return None
        out = from_arrays(unit.start, unit.stop, dict(np.load(path, allow_pickle=False)))
        if out is None or out.held() | set(out.failed) != set(unit.scenarios):
            return None  # written for another grouping of the scenarios: recompute rather than mix
        return out

    def save(self, unit: WorkUnit, outputs: UnitOutputs) -> None:
        arrays = to_arrays(outputs)
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self._path(unit)
        tmp = final.with_suffix(".tmp.npz")

        def write() -> None:  # the arrays share memory with tensors nobody modifies any more
            np.savez(tmp, **arrays)
            tmp.replace(final)

        # not a daemon: an interpreter that exits (even on an error) finishes the write first
        thread = threading.Thread(target=write, name="medaudit-shard-cache")
        thread.start()
        self._writes.append(thread)

    def flush(self) -> None:
        """Wait until every saved shard is on disk."""
        while self._writes:
            self._writes.pop().join()
