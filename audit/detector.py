"""The OOD / shift-detector contract.

A detector turns each sample into a score where **higher means more shifted**. Work is split so
that nothing large is kept per sample: :meth:`Detector.embed` runs on the device inside the
forward loop and reduces a batch's logits (and, for feature-based detectors, the output of the
configured intermediate layer) to a small vector per sample; :meth:`Detector.fit` sees the
embeddings of an in-distribution reference set; :meth:`Detector.score` scores embeddings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import ClassVar, Literal

from torch import Tensor


class Detector(ABC):
    """Base class of a detector.

    Class attributes
    ----------------
    name : str
        Public key in results.json (``ood``) and predictions.npz (``ood_<name>``).
    needs : "logits" | "features"
        ``"features"`` detectors receive the configured layer's output in :meth:`embed` and are
        skipped, with a limitation noted in the report, when no layer is configured.
    summary, citation : str
        For the report's catalogue.
    """

    name: ClassVar[str]
    needs: ClassVar[Literal["logits", "features"]] = "logits"
    summary: ClassVar[str] = ""
    citation: ClassVar[str] = ""

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor | Future[Tensor]:
        """Reduce one batch to per-sample embeddings ``[B, D]`` (on the batch's device).

        Work that would stall the device queue (a host round trip) may instead be submitted to a
        thread and returned as a ``concurrent.futures.Future`` of the ``[B, D]`` tensor; the
        runner resolves it at the end of the shard. Exceptions surface there and are treated
        like exceptions from ``embed``.
        """
        return logits

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        """Fit on in-distribution reference embeddings ``[N, D]`` with labels ``[N]``."""

    @abstractmethod
    def score(self, embeddings: Tensor) -> Tensor:
        """Scores ``[N]``; higher means more shifted. Must not modify fitted state."""
