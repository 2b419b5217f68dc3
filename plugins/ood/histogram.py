"""The model-free floor: intensity histograms of the input images.

A shift that changes the images' intensities — most synthetic artifacts do — shows in their
histograms without any model at all. A detector that reads the model's outputs or features and
does no better than this one adds nothing the raw pixels did not already say; shown beside the
others, it is the sanity floor a detector must beat.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medaudit.detector import Detector

from .detectors import _effective_k, kth_nn_distance


def intensity_histograms(images: Tensor, bins: int) -> Tensor:
    """Per image and channel, the share of voxels in each of ``bins`` equal-width bins of
    ``[0, 1]`` (a value of exactly 1 in the last bin, values outside clipped in), concatenated over
    channels: ``[B, C · bins]`` float32, each channel's block summing to 1."""
    b, c = images.shape[:2]
    x = images.reshape(b, c, -1).clamp(0.0, 1.0)
    index = (x * bins).long().clamp_(max=bins - 1)
    counts = torch.zeros(b, c, bins, dtype=torch.float32, device=images.device)
    counts.scatter_add_(2, index, torch.ones_like(x, dtype=torch.float32))
    return (counts / x.shape[2]).reshape(b, c * bins)


class Histogram(Detector):
    """Intensity-histogram baseline: no model at all.

    Embedding: :func:`intensity_histograms` of the input images as the model receives them
    (after the perturbation and the configured intensity scaling, before normalisation), ``bins``
    (default 32) per channel. Fit: keep the reference histograms. Score: the Euclidean distance
    to the ``k``-th nearest reference histogram (``k`` default 10, capped at ``n − 1``), as
    :class:`~medaudit.plugins.ood.KNN` does on features.
    """

    name = "histogram"
    needs = "inputs"
    summary = "distance of the image's intensity histogram to the k-th nearest in-distribution histogram (no model)"
    citation = ("a model-free baseline: intensity histograms as shift features (e.g. the dataset-shift "
                "baselines of Rabanser, Günnemann & Lipton, Failing Loudly, NeurIPS 2019)")

    def __init__(self, bins: int = 32, k: int = 10) -> None:
        if bins < 2 or k < 1:
            raise ValueError(f"histogram needs bins >= 2 and k >= 1, got bins={bins}, k={k}")
        self.bins, self.k = int(bins), int(k)
        self.bank: Tensor | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        if features is None or features.ndim < 3:
            raise ValueError("histogram needs the input images [B, C, *spatial] (needs = 'inputs')")
        return intensity_histograms(features, self.bins)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.shape[0] < 2:
            raise ValueError(f"histogram needs at least 2 reference images, got {embeddings.shape[0]}")
        self.bank = embeddings.double()

    def score(self, embeddings: Tensor) -> Tensor:
        if self.bank is None:
            raise RuntimeError("histogram: fit() must be called before score()")
        x = embeddings.double().to(self.bank.device)
        return kth_nn_distance(x, self.bank, _effective_k(self.k, self.bank.shape[0]))
