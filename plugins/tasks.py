"""The built-in task types: ``binary``, ``multiclass`` and ``multilabel`` classification, and
``embedding`` (an encoder audited through probes).

Contributed through ``medaudit_tasks`` exactly as a third-party task would be, on the public API
only (:mod:`medaudit.task`, :mod:`medaudit.probes`). The classification tasks keep one per-sample
quantity, ``probs`` ``[K]`` (``K = 2`` for binary), computed from the raw outputs on the device;
``embedding`` keeps the embedding ``[D]`` and reads class probabilities out of it with a linear
and a k-NN probe fitted on the ``--reference`` set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from medaudit.config import TaskConfig
from medaudit.errors import DataError, ModelOutputError, OutputWidthError
from medaudit.hookspecs import hookimpl
from medaudit.probes import fit_knn_probe, fit_linear_probe, probe_record
from medaudit.task import (
    CALIBRATION,
    CLASS_PROBABILITIES,
    FAILURE_DETECTION,
    OUTPUT_FEATURES,
    SINGLE_LABEL,
    SUBGROUPS,
    TARGET_CLASS_SET,
    TEMPERATURE_SCALING,
    OutputKind,
    Readout,
    Task,
    check_class_probabilities,
    read_class_labels,
    read_multi_hot,
)

MEDAUDIT_API_VERSION = 1


def _as_columns(out: Tensor) -> Tensor:
    """Raw outputs as ``[B, K]`` float (``[B]`` is one column)."""
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise ModelOutputError(f"model output has shape {tuple(out.shape)}; expected [B, K], [B, 1] or [B]")
    return out.float()


class _ClassificationTask(Task):
    """What the three built-ins share: a ``probs`` quantity ``[K]`` and class-probability checks."""

    metric_input: ClassVar[str] = "probs"
    #: Probability rows sum to 1 (softmax of logits) rather than being independent sigmoids.
    exclusive: ClassVar[bool] = True
    #: The number of classes when the task fixes it.
    fixed_classes: ClassVar[int | None] = None

    def quantities(self, cfg: TaskConfig) -> dict[str, tuple[int, ...]]:
        return {"probs": (len(cfg.classes),)}

    def check_outputs(self, outputs: Mapping[str, Tensor], targets: Tensor, weights: Tensor | None = None) -> None:
        probs = outputs["probs"]
        check_class_probabilities(probs, targets, task_name=self.name, exclusive=self.exclusive,
                                  n_classes=self.fixed_classes, weights=weights)

    def detect_output_kind(self, out: Tensor) -> OutputKind:
        """Probabilities when all outputs lie in [0, 1] and, for exclusive classes, rows sum to 1."""
        o = out.float()
        if o.ndim == 1:
            o = o[:, None]
        if not bool(((o >= 0) & (o <= 1)).all()):
            return "logits"
        if not self.exclusive or o.shape[1] == 1:
            return "probabilities"
        return "probabilities" if torch.allclose(o.sum(dim=1), torch.ones(o.shape[0]), atol=1e-3) else "logits"


class BinaryTask(_ClassificationTask):
    """Two classes (negative, positive); the model may emit one score or two."""

    name = "binary"
    description = "two classes (negative, positive); outputs [B], [B, 1] (positive class) or [B, 2]"
    capabilities = frozenset({CLASS_PROBABILITIES, SINGLE_LABEL, CALIBRATION, TEMPERATURE_SCALING,
                              FAILURE_DETECTION, SUBGROUPS})
    fixed_classes = 2

    def validate_config(self, cfg: TaskConfig) -> None:
        if cfg.classes and len(cfg.classes) != 2:
            raise ValueError(f"a binary task has 2 classes (negative, positive), got {len(cfg.classes)}")

    def read_targets(self, raw: Any, cfg: TaskConfig, where: str) -> tuple[np.ndarray, list[str]]:
        labels, classes = read_class_labels(raw, cfg.classes, where)
        if len(classes) != 2:
            raise DataError(f"{where}: a binary task needs exactly 2 classes but the labels hold {len(classes)}: "
                            f"{classes}; set task.classes or task.type: multiclass")
        return labels, classes

    def quantities(self, cfg: TaskConfig) -> dict[str, tuple[int, ...]]:
        return {"probs": (2,)}

    def reduce(self, out: Tensor, kind: OutputKind, cfg: TaskConfig,
               targets: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        out = _as_columns(out)
        if out.shape[1] == 1:
            p1 = torch.sigmoid(out[:, 0]) if kind == "logits" else out[:, 0]
            return {"probs": torch.stack([1 - p1, p1], dim=1)}
        if out.shape[1] != 2:
            raise ModelOutputError(f"binary task but the model outputs {out.shape[1]} values per sample (expected 1 or 2)")
        return {"probs": torch.softmax(out, dim=1) if kind == "logits" else out}


class MulticlassTask(_ClassificationTask):
    """One of ``K`` classes per sample; softmax over the outputs."""

    name = "multiclass"
    description = "one of K classes per sample; outputs [B, K] (softmax of logits, or probabilities)"
    capabilities = frozenset({CLASS_PROBABILITIES, SINGLE_LABEL, CALIBRATION, TEMPERATURE_SCALING,
                              FAILURE_DETECTION, SUBGROUPS})

    def read_targets(self, raw: Any, cfg: TaskConfig, where: str) -> tuple[np.ndarray, list[str]]:
        return read_class_labels(raw, cfg.classes, where)

    def reduce(self, out: Tensor, kind: OutputKind, cfg: TaskConfig,
               targets: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        out = _checked_width(_as_columns(out), len(cfg.classes))
        return {"probs": torch.softmax(out, dim=1) if kind == "logits" else out}


class MultilabelTask(_ClassificationTask):
    """Any subset of ``K`` labels per sample; independent sigmoids."""

    name = "multilabel"
    description = "any subset of K labels per sample; outputs [B, K] (independent sigmoids of logits, or probabilities)"
    targets = TARGET_CLASS_SET
    exclusive = False
    # Failure detection needs one true class per sample: not applicable.
    capabilities = frozenset({CLASS_PROBABILITIES, CALIBRATION, TEMPERATURE_SCALING, SUBGROUPS})

    def read_targets(self, raw: Any, cfg: TaskConfig, where: str) -> tuple[np.ndarray, list[str]]:
        return read_multi_hot(raw, cfg.classes, where, self.name)

    def reduce(self, out: Tensor, kind: OutputKind, cfg: TaskConfig,
               targets: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        out = _checked_width(_as_columns(out), len(cfg.classes))
        return {"probs": torch.sigmoid(out) if kind == "logits" else out}


class EmbeddingTask(Task):
    """An encoder (a foundation-model backbone) that returns one embedding ``[B, D]`` per image.

    The transfer-evaluation protocol of the foundation-model literature, under shift: a linear
    probe (scikit-learn logistic regression on standardised embeddings, ``task.probe_c``) and a
    k-NN probe (cosine, ``task.probe_k``) are fitted on the clean ``--reference`` embeddings, and
    their class probabilities on every scenario are evaluated as a classifier's: the linear
    probe's under the classification metric names, the k-NN probe's under ``knn_probe/<metric>``.
    """

    name = "embedding"
    description = ("an encoder's embeddings [B, D], audited through a linear and a k-NN probe fitted on the labelled "
                   "--reference set")
    metric_input: ClassVar[str] = "probs"
    capabilities = frozenset({OUTPUT_FEATURES, SINGLE_LABEL, CALIBRATION, FAILURE_DETECTION, SUBGROUPS})
    needs_reference = True
    readout_prefixes = ("knn_probe/",)

    def read_targets(self, raw: Any, cfg: TaskConfig, where: str) -> tuple[np.ndarray, list[str]]:
        return read_class_labels(raw, cfg.classes, where)

    def metric_task(self, cfg: TaskConfig) -> str:
        return "binary" if len(cfg.classes) == 2 else "multiclass"

    def quantities(self, cfg: TaskConfig) -> dict[str, tuple[int, ...]]:
        return {"embedding": (-1,)}

    def reduce(self, out: Tensor, kind: OutputKind, cfg: TaskConfig,
               targets: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        if out.ndim != 2:
            hint = (" (a token sequence [B, T, C]: set model.output_key to the pooled output, e.g. pooler_output, or "
                    "return one vector per image)" if out.ndim == 3 else "")
            raise ModelOutputError(f"an embedding task needs one embedding per image [B, D]; the model outputs "
                                   f"{list(out.shape)}{hint}")
        return {"embedding": out.float()}

    def check_outputs(self, outputs: Mapping[str, Tensor], targets: Tensor, weights: Tensor | None = None) -> None:
        emb = outputs["embedding"]
        bad = ~torch.isfinite(emb).all(dim=1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten()
            raise ValueError(f"embeddings contain NaN or Inf in {rows.numel()} of {emb.shape[0]} rows (first: row {int(rows[0])})")

    def readout(self, reference: Mapping[str, Tensor], labels: Tensor, cfg: TaskConfig,
                reference_sha256: str) -> Readout:
        emb = reference["embedding"]
        k = len(cfg.classes)
        linear = fit_linear_probe(emb, labels, k, C=cfg.probe_c)
        knn = fit_knn_probe(emb, labels, k, k=cfg.probe_k)
        return Readout(self.metric_task(cfg),
                       {"": lambda q: linear.probabilities(q["embedding"]),
                        "knn_probe/": lambda q: knn.probabilities(q["embedding"])},
                       probe_record(linear, knn, reference_sha256, int(emb.shape[0])))


def _checked_width(out: Tensor, n_classes: int) -> Tensor:
    if out.shape[1] != n_classes:
        raise OutputWidthError(
            f"the model outputs {out.shape[1]} values per sample but task.classes names {n_classes} classes",
            int(out.shape[1]), n_classes)
    return out


@hookimpl
def medaudit_tasks() -> list[Task]:
    return [BinaryTask(), MulticlassTask(), MultilabelTask(), EmbeddingTask()]
