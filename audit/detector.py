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
from dataclasses import dataclass
from collections.abc import Callable
from typing import ClassVar, Literal

from torch import Tensor


@dataclass(frozen=True)
class LinearHead:
    """The model's classification head, ``logits = features @ weight.T + bias``: the last linear
    layer, fed by the (pooled) features of the configured layer. Detectors that reshape features
    before the head (ReAct, ASH, SCALE, DICE, ViM, …) recompute logits with it."""

    weight: Tensor  # [K, D]
    bias: Tensor  # [K]

    def __call__(self, features: Tensor) -> Tensor:
        """Logits ``[N, K]`` of pooled features ``[N, D]`` (in the features' dtype and device)."""
        w = self.weight.to(features.device, features.dtype)
        return features @ w.T + self.bias.to(features.device, features.dtype)


class Detector(ABC):
    """Base class of a detector.

    Class attributes
    ----------------
    name : str
        Public key in results.json (``ood``) and predictions.npz (``ood_<name>``).
    needs : "logits" | "features" | "stages" | "inputs"
        ``"features"`` detectors receive the configured layer's output in :meth:`embed` and are
        skipped, with a limitation noted in the report, when no layer is configured.
        ``"stages"`` detectors receive a list with the output of every layer of
        ``model.feature_layers`` (the network's main stages, shallow to deep), for multi-layer
        signatures; skipped like ``"features"`` detectors when there are none.
        ``"inputs"`` detectors receive the (perturbed) input images ``[B, C, *spatial]`` in
        ``[0, 1]``, before normalisation, as their second argument: model-free baselines.
    summary, citation : str
        For the report's catalogue.
    needs_head : bool
        The detector also needs the model's classification head (:class:`LinearHead`); the
        audit sets :attr:`head` before the forward passes, and leaves the detector out with a
        warning where the model has no linear head fed by the feature layer.
    needs_model : bool
        The detector calls the model itself (e.g. ODIN's gradient step on the input): the audit
        sets :attr:`model` before the forward passes to a callable that takes images in
        ``[0, 1]`` ``[B, C, *spatial]``, applies the audit's normalisation and returns the model's
        outputs with autograd available (the runner's inference mode is lifted inside it). Such
        a detector is usually ``needs="inputs"``; it costs extra forward and backward passes.
    """

    name: ClassVar[str]
    needs: ClassVar[Literal["logits", "features", "stages", "inputs"]] = "logits"
    needs_head: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    #: Set by the audit for a detector that :attr:`needs_head` (tests set it directly).
    head: LinearHead | None = None
    #: Set by the audit for a detector that :attr:`needs_model` (tests set it directly).
    model: Callable[[Tensor], Tensor] | None = None
    #: Set by the audit for a ``"stages"`` detector: the layer names of ``model.feature_layers``
    #: and each one's per-sample output shape ``(C, *spatial)``, in the order :meth:`embed`
    #: receives them (so :meth:`fit` can split concatenated embeddings per layer).
    stages: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: How the intervals of this detector's AUROCs (shift detection, failure detection) are
    #: computed: the audit's percentile bootstrap, or DeLong's asymptotic variance
    #: (:func:`medaudit.ood_metrics.delong_interval`); the built-in plugin sets it from
    #: ``plugins.ood.auroc_ci``.
    auroc_ci: Literal["bootstrap", "delong"] = "bootstrap"

    def embed(self, logits: Tensor, features: Tensor | list[Tensor] | None) -> Tensor | Future[Tensor]:
        """Reduce one batch to per-sample embeddings ``[B, D]`` (on the batch's device).

        ``features`` is what :attr:`needs` asks for: None (``"logits"``), the feature layer's
        output (``"features"``), one output per stage (``"stages"``) or the images (``"inputs"``).

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
