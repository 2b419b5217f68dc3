"""Writing outputs so that a failed run never leaves a half-written file behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import TaskConfig
from .outputs import AuditOutputs
from .task import TARGET_LABEL_MAP


def write_atomic(path: Path, data: bytes) -> None:
    """Write a single file via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp creates 0600; an output file gets the mode any new file would (0644 under umask 022)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicOutputDir:
    """Stage every output in a temporary folder beside ``out`` and move files in only on success.

    On failure the staging folder is removed, and ``out`` is removed too if this run created it
    and left it empty, so no half-written report or results are ever left behind. On success, the
    names in ``replaces`` that this run did not write (a previous run's report.pdf or
    predictions.npz) are removed, so the folder never mixes two audits' outputs.
    """

    def __init__(self, out: Path, replaces: tuple[str, ...] = ()) -> None:
        self.out = out
        self.replaces = replaces

    def __enter__(self) -> Path:
        self.created = not self.out.exists()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self.stage

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.out.mkdir(parents=True, exist_ok=True)
                for name in self.replaces:
                    stale = self.out / name
                    if not (self.stage / name).exists() and (stale.is_file() or stale.is_dir()):
                        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
                for item in sorted(self.stage.iterdir()):
                    target = self.out / item.name
                    if item.is_dir() and target.is_dir():
                        # a folder of outputs (tables/) replaces the previous run's whole, never merges with it
                        shutil.rmtree(target)
                    os.replace(item, target)
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)
            if exc_type is not None and self.created and self.out.exists() and not any(self.out.iterdir()):
                self.out.rmdir()


def predictions_arrays(outputs: AuditOutputs, external: dict[str, dict[str, torch.Tensor]],
                       maps: dict[str, torch.Tensor] | None = None,
                       task_config: TaskConfig | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``predictions.npz`` (documented in the README). A task whose targets are
    label maps writes its per-image metrics and the predicted label maps ``labelmaps_<scenario>``
    of the saved scenarios instead of ``labels``."""
    task = outputs.task
    arrays: dict[str, np.ndarray] = {
        "scenario_ids": np.array([s.id for s in outputs.scenarios]),
        "sample_ids": np.array(outputs.sample_ids),
        # the per-sample quantities the task keeps: "probs" [S, N, K] for the classification tasks
        **task.prediction_arrays(outputs.quantities, task_config if task_config is not None else TaskConfig(
            type=outputs.ctx.task, classes=list(outputs.ctx.classes))),
    }
    if task.targets != TARGET_LABEL_MAP:
        arrays["labels"] = outputs.labels.numpy()
    for sid, labelmaps in (maps or {}).items():
        arrays[f"labelmaps_{sid}"] = labelmaps.numpy()
    for name, scores in outputs.ood_scores.items():
        arrays[f"ood_{name}"] = scores.numpy()
    for set_name, tensors in external.items():
        for key, value in tensors.items():
            arrays[f"external_{set_name}_{key}"] = value.numpy()
    return arrays
