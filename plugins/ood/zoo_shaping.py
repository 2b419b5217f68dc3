"""Activation-shaping and decision-boundary OOD detectors: ReAct, ASH-S, SCALE, DICE and fDBD.

All five reuse the model's classification head (:class:`medaudit.detector.LinearHead`, weight
``W [K, D]``, bias ``b [K]``, fed by the globally average-pooled output ``z [D]`` of the configured
feature layer), so every one declares ``needs = "features"`` and ``needs_head = True``.

* ``react``, ``ash``, ``scale`` and ``dice_sparse`` reshape the features (or the head's weights)
  and score the free energy of the recomputed logits, ``E(l) = −logsumexp_k(l_k)`` (Liu et al.,
  NeurIPS 2020; in-distribution inputs have lower energy, so ``E`` itself is the score).
* ``fdbd`` scores the feature's mean distance to the head's decision boundaries, relative to its
  distance from the in-distribution mean (negated: higher = more shifted).

Split of the work (see :class:`medaudit.detector.Detector`): ``embed`` runs inside the forward
loop *before* any ``fit``, so a fitted quantity (ReAct's threshold, DICE's mask, fDBD's mean) is
applied in ``score``. ASH-S and SCALE are per-sample and need no fit: the whole shaping happens
in ``embed``, which sees the full feature map, and the embedding is the shaped logits ``[B, K]``.
The others keep the pooled features ``[B, D]``. A head with one output (a binary model emitting
one logit ``l``) is treated as the two-class head ``[0, l]``, as medaudit's ``energy`` does.

Reference: the fixtures ``tests/data/ood-reference`` hold pytorch-ood 0.4.0's scores for
``react``, ``ash_s``, ``scale`` and ``dice`` on fixed arrays; ``tests/test_ood_zoo_shaping.py``
matches them (relative differences below 1e-6, the float32 precision pytorch-ood computed in).
Fitting and scoring run in float64.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from medaudit.detector import Detector, LinearHead

from .detectors import pool, two_class

#: Fewest reference samples a fitted detector accepts.
_MIN_FIT = 2
#: Floor of ``‖z − μ‖`` in fDBD: a feature exactly at the reference mean gets a finite score.
_FDBD_FLOOR = 1e-12


def free_energy(logits: Tensor) -> Tensor:
    """``E = −logsumexp_k(l_k)`` per row of ``[N, K]`` logits in float64 (``[N]`` or ``[N, 1]``
    one-logit rows are the two-class logits ``[0, l]``)."""
    return -torch.logsumexp(two_class(logits.double()), dim=1)


def linear_percentile(values: Tensor, q: float) -> Tensor:
    """The ``q``-quantile (``0 ≤ q ≤ 1``) of all elements of ``values``, by linear interpolation
    between order statistics: ``numpy.quantile(values, q)`` = ``numpy.percentile(values, 100 q)``
    (their default ``"linear"`` method, also ``torch.quantile``'s), including numpy's two-sided interpolation
    ``v_hi − (v_hi − v_lo)(1 − f)`` for ``f ≥ ½``.

    With ``n`` values sorted ascending ``v_0 ≤ … ≤ v_{n−1}``, ``h = q (n − 1)``, ``i = ⌊h⌋``,
    ``f = h − i``: ``v_i + f (v_{i+1} − v_i)``. Uses two ``kthvalue`` selections, not
    ``torch.quantile``, which refuses inputs of more than 2^24 elements (a 30,000-sample reference
    set of 2048-dimensional features has 61 million).
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("percentile of an empty tensor")
    h = n * q + (1 - q) - 1  # = q (n − 1), rounded as numpy's linear method computes it
    i = max(0, min(int(math.floor(h)), n - 1))
    f = h - i
    lo = torch.kthvalue(flat, i + 1).values
    hi = torch.kthvalue(flat, min(i + 2, n)).values if f > 0 else lo
    return hi - (hi - lo) * (1 - f) if f >= 0.5 else lo + (hi - lo) * f


def _require_head(det: Detector) -> LinearHead:
    if det.head is None:
        raise RuntimeError(f"{det.name} needs the model's classification head: the audit sets detector.head "
                           "(a medaudit.detector.LinearHead) before the forward passes; set it before embed/fit/score")
    return det.head


def _require_features(det: Detector, features: Tensor | None) -> Tensor:
    if features is None:
        raise ValueError(f"{det.name} needs features (configure model.feature_layer)")
    return features


def _check_fit_size(det: Detector, embeddings: Tensor) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"{det.name}: expected embeddings [N, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] < _MIN_FIT:
        raise ValueError(f"{det.name} needs at least {_MIN_FIT} reference samples, got {embeddings.shape[0]}")


def _head_params(head: LinearHead, device: torch.device, expand: bool = False) -> tuple[Tensor, Tensor]:
    """``(W [K, D], b [K])`` in float64 on ``device``; with ``expand``, a one-output head becomes
    the two-class head ``[0; w], [0; b]`` (without, :func:`free_energy` expands its logits)."""
    w = head.weight.to(device, torch.float64)
    b = head.bias.to(device, torch.float64)
    if w.ndim == 1:
        w = w[None]
    b = b.reshape(-1)
    if expand and w.shape[0] == 1:
        w = torch.cat([torch.zeros_like(w), w])
        b = torch.cat([torch.zeros_like(b), b])
    return w, b


def _flat_map(features: Tensor) -> tuple[Tensor, int, int]:
    """``(x [B, C·S], C, S)`` of a feature map ``[B, C, *spatial]`` (``S = 1`` for ``[B, D]``),
    in float32 or float64 (half-precision maps are upcast before ranking and summing)."""
    b, c = features.shape[0], features.shape[1]
    x = features.reshape(b, -1)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x, c, x.shape[1] // max(c, 1)


def _kept(n: int, percentile: float) -> int:
    """Elements kept by ASH / SCALE: ``n − round(n · p)`` (round half to even, as ``numpy.round``),
    at least 1."""
    return max(1, n - int(round(n * percentile)))


def _check_fraction(name: str, value: float, *, closed_top: bool = False) -> float:
    v = float(value)
    ok = 0.0 <= v <= 1.0 if closed_top else 0.0 <= v < 1.0
    if not ok or not math.isfinite(v):
        top = "1]" if closed_top else "1)"
        raise ValueError(f"{name} must be a fraction in [0, {top}, got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------
# ReAct
# ---------------------------------------------------------------------------------------------


class ReAct(Detector):
    """ReAct: rectified activations, scored with the free energy (Sun, Guo & Li, NeurIPS 2021).

    Embedding: pooled features ``z = GAP(f) [D]`` (in the features' dtype).
    Fit: the clipping threshold ``c`` = the ``percentile`` quantile (default 0.9, the paper's
    90th percentile) of **all** activations of the pooled reference features, i.e. of the ``N·D``
    values ``z_{i,d}`` together, by linear interpolation (``numpy.percentile``; see
    :func:`linear_percentile`).
    Score: ``E(W min(z, c) + b) = −logsumexp_k((W min(z, c) + b)_k)``, the energy of the logits
    recomputed from the features clipped from above at ``c`` (elementwise).

    This is pytorch-ood 0.4.0's ``ReAct(backbone=pooling, head, percentile=0.9)``
    (``src/pytorch_ood/detector/react.py``: ``_set_threshold_from_activations`` takes
    ``np.percentile(activations, 100·percentile)`` of the flattened backbone outputs;
    ``predict_feature_maps`` applies ``x.clip(max=threshold)``, then the head and
    ``EnergyBased.score``). With ``backbone`` = global average pooling, both the threshold and
    the clipping act on the pooled penultimate features, as in the paper, which clips the
    penultimate layer's activations at the 90th percentile of their in-distribution values.
    """

    name = "react"
    needs: ClassVar[Literal["logits", "features"]] = "features"
    needs_head: ClassVar[bool] = True
    summary = "free energy of the logits recomputed from pooled features clipped at their in-distribution percentile"
    citation = ("Sun, Guo & Li, ReAct: Out-of-distribution Detection With Rectified Activations, NeurIPS 2021")

    def __init__(self, percentile: float = 0.9) -> None:
        self.percentile = _check_fraction("react percentile", percentile, closed_top=True)
        self.threshold: Tensor | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        return pool(_require_features(self, features))

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        _check_fit_size(self, embeddings)
        self.threshold = linear_percentile(embeddings.double(), self.percentile)

    def score(self, embeddings: Tensor) -> Tensor:
        if self.threshold is None:
            raise RuntimeError("react: fit() must be called before score()")
        z = embeddings.double()
        w, b = _head_params(_require_head(self), z.device)
        clipped = torch.minimum(z, self.threshold.to(z.device))
        return free_energy(clipped @ w.T + b)


# ---------------------------------------------------------------------------------------------
# ASH-S and SCALE (per sample, no fit)
# ---------------------------------------------------------------------------------------------


class _ShapedEnergy(Detector):
    """Per-sample shaping of the feature map in :meth:`embed` → pooled → head → logits ``[B, K]``
    (float64); :meth:`score` is their free energy. No fitting (``fit`` is a no-op)."""

    needs: ClassVar[Literal["logits", "features"]] = "features"
    needs_head: ClassVar[bool] = True

    def __init__(self, percentile: float = 0.65) -> None:
        self.percentile = _check_fraction(f"{self.name} percentile", percentile)

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        head = _require_head(self)
        pooled = self.shaped_pooled(_require_features(self, features))
        return head(pooled)

    def shaped_pooled(self, features: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, embeddings: Tensor) -> Tensor:
        return free_energy(embeddings)


class ASH(_ShapedEnergy):
    """ASH-S: activation pruning and exponential rescaling, scored with the free energy
    (Djurisic, Bozanic, Ashok & Liu, ICLR 2023).

    For each sample, with ``a`` the ``n = C·H·W`` elements of its feature map (``n = D`` for
    vector features) and ``k = n − round(n·p)`` (``p`` = ``percentile``, default 0.65; numpy's
    round half to even; at least 1):

    * ``s₁ = Σ_j a_j`` (all elements), ``T`` = the indices of the ``k`` largest elements,
      ``s₂ = Σ_{j∈T} a_j``;
    * pruned map ``a'_j = a_j`` for ``j ∈ T``, else 0; shaped map ``a'' = a' · exp(s₁ / s₂)``;
    * logits ``W · GAP(a'') + b``; score ``E = −logsumexp_k`` of them.

    The embedding is those logits ``[B, K]`` (float64): ASH needs the whole map, which only
    :meth:`embed` sees. Pruning is per sample over all of its map's elements (not per channel),
    exactly as pytorch-ood 0.4.0's ``ash_s`` (``src/pytorch_ood/detector/ash.py``: ``topk`` of the
    ``[B, C·H·W]`` view with ``k = n − int(np.round(n·percentile))``, ``scale = s1 / s2`` with
    ``s2`` the sum after pruning, ``x · exp(scale)``), used as
    ``ASH(backbone, head=pooling+linear, variant="ash-s", percentile=0.65)``. Ties at the
    pruning boundary keep an arbitrary one of the equal elements (as ``torch.topk`` does there).
    ASH assumes non-negative (post-ReLU) activations; a map whose kept elements sum to 0 keeps
    factor 1 (its pooled features are 0 then anyway) instead of pytorch-ood's NaN.
    """

    name = "ash"
    summary = "free energy after pruning each feature map to its top (1 − p) activations and rescaling by exp(sum ratio) (ASH-S)"
    citation = ("Djurisic, Bozanic, Ashok & Liu, Extremely Simple Activation Shaping for Out-of-Distribution "
                "Detection, ICLR 2023")

    def shaped_pooled(self, features: Tensor) -> Tensor:
        x, c, s = _flat_map(features)
        top, idx, ratio = _top_and_ratio(x, self.percentile)
        # GAP of the pruned map: add each kept element to its channel (element j is in channel j // S)
        pooled = torch.zeros(x.shape[0], c, dtype=torch.float64, device=x.device)
        pooled.scatter_add_(1, torch.div(idx, s, rounding_mode="floor"), top)
        return pooled / s * torch.exp(ratio)[:, None]


def _top_and_ratio(x: Tensor, percentile: float) -> tuple[Tensor, Tensor, Tensor]:
    """ASH-S's and SCALE's shared step on flattened maps ``[B, n]``: the top-``k`` activations
    (float64) and their indices, and ``r = s₁ / s₂``, the total over the kept sum (0 where the kept
    sum is 0, so that the factor ``exp(r)`` is 1)."""
    top, idx = torch.topk(x, _kept(x.shape[1], percentile), dim=1)
    top = top.double()
    s1, s2 = x.double().sum(dim=1), top.sum(dim=1)
    return top, idx, torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, 1.0), 0.0)


class SCALE(_ShapedEnergy):
    """SCALE: activation rescaling without pruning, scored with the free energy
    (Xu, Chen, Franchi & Yao, ICLR 2024).

    For each sample, with ``a``, ``n``, ``k``, ``s₁``, ``s₂`` as in :class:`ASH`
    (``p`` = ``percentile``, default 0.65): ``r = s₁ / s₂`` (total over the top-``k`` sum) and the
    **whole, unpruned** map is rescaled, ``a'' = a · exp(r)``; logits ``W · GAP(a'') + b``; score
    ``E = −logsumexp_k`` of them. Embedding: those logits ``[B, K]`` (float64).

    As pytorch-ood 0.4.0's ``scale`` (``src/pytorch_ood/detector/scale.py``: ``s1`` = sum of all
    activations, ``s2`` = sum of the ``topk`` values with ``k = n − int(np.round(n·percentile))``,
    ``x · exp(s1 / s2)``), used as ``SCALE(backbone, head=pooling+linear, percentile=0.65)``.
    A map whose top-``k`` sum is 0 keeps factor 1.
    """

    name = "scale"
    summary = "free energy after rescaling each feature map by exp(total / top-(1 − p) activation sum) (SCALE)"
    citation = ("Xu, Chen, Franchi & Yao, Scaling for Training Time and Post-hoc Out-of-distribution Detection "
                "Enhancement, ICLR 2024")

    def shaped_pooled(self, features: Tensor) -> Tensor:
        x, c, s = _flat_map(features)
        _, _, ratio = _top_and_ratio(x, self.percentile)
        return x.double().reshape(x.shape[0], c, s).mean(dim=2) * torch.exp(ratio)[:, None]


# ---------------------------------------------------------------------------------------------
# DICE
# ---------------------------------------------------------------------------------------------


class DICE(Detector):
    """DICE: directed sparsification of the head's weights, scored with the free energy
    (Sun & Li, ECCV 2022).

    Embedding: pooled features ``z [D]``.
    Fit: ``m̄`` = mean pooled reference feature; the contribution matrix ``V = W ⊙ m̄``
    (``V_{kd} = W_{kd} · m̄_d``, ``[K, D]``); the threshold ``t`` = the ``p`` quantile of the
    ``K·D`` entries of ``V`` (linear interpolation, ``torch.quantile``); the mask
    ``M = 1[V > t]`` keeps the largest ``(1 − p)`` share of contributions (``p`` = ``sparsity``,
    default 0.7).
    Score: ``E((W ⊙ M) z + b) = −logsumexp_k`` of the logits of the sparsified head.

    Matches pytorch-ood 0.4.0's ``DICE(w, b, p=0.7)`` on the fixtures
    (``src/pytorch_ood/detector/dice.py``: ``fit_features`` takes the mean feature, ``contrib =
    mean[None, :] * weight``, ``torch.quantile(contrib.flatten(), q)`` and
    ``torch.where(contrib > threshold, weight, 0)``; ``predict_features`` sums
    ``x[:, None, :] * masked_w`` plus the bias, then ``EnergyBased.score``). The fixture's scores
    equal the quantile at ``q = 0.7`` (179 of 256 weights dropped), not at ``p / 100 = 0.007``
    as in the versions of pytorch-ood's ``dice.py`` that were readable when this was written
    (2 weights dropped; scores up to ≈ 1 away): ``sparsity`` is the paper's fraction
    ``p ∈ [0, 1)`` of contributions dropped.
    The mask is fitted from the head present at :meth:`fit`.
    """

    name = "dice_sparse"
    needs: ClassVar[Literal["logits", "features"]] = "features"
    needs_head: ClassVar[bool] = True
    summary = "free energy of the head sparsified to its largest (1 − p) mean-feature contributions (DICE)"
    citation = "Sun & Li, DICE: Leveraging Sparsification for Out-of-Distribution Detection, ECCV 2022"

    def __init__(self, sparsity: float = 0.7) -> None:
        self.sparsity = _check_fraction("dice_sparse sparsity", sparsity)
        self.mean: Tensor | None = None
        self.threshold: Tensor | None = None
        self.masked_weight: Tensor | None = None
        self.bias: Tensor | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        return pool(_require_features(self, features))

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        _check_fit_size(self, embeddings)
        z = embeddings.double()
        w, b = _head_params(_require_head(self), z.device)
        if w.shape[1] != z.shape[1]:
            raise ValueError(f"dice_sparse: the head takes {w.shape[1]} features, the embeddings have {z.shape[1]}")
        self.mean = z.mean(dim=0)
        contrib = w * self.mean[None, :]
        self.threshold = linear_percentile(contrib, self.sparsity)
        self.masked_weight = torch.where(contrib > self.threshold, w, torch.zeros_like(w))
        self.bias = b

    def score(self, embeddings: Tensor) -> Tensor:
        if self.masked_weight is None or self.bias is None:
            raise RuntimeError("dice_sparse: fit() must be called before score()")
        z = embeddings.double()
        w, b = self.masked_weight.to(z.device), self.bias.to(z.device)
        return free_energy(z @ w.T + b)


# ---------------------------------------------------------------------------------------------
# fDBD
# ---------------------------------------------------------------------------------------------


class FDBD(Detector):
    """fDBD: distance to the decision boundaries relative to the distance from the
    in-distribution mean (Liu & Qin, ICML 2024).

    Embedding: pooled features ``z [D]``. Fit: ``μ`` = mean pooled reference feature.
    Score, with logits ``l = W z + b``, the predicted class ``ŷ = argmax_k l_k`` and ``K`` classes:

    * closed-form distance of ``z`` to the boundary between ``ŷ`` and ``k`` of the linear head,
      ``d_k(z) = |(w_ŷ − w_k)ᵀ z + (b_ŷ − b_k)| / ‖w_ŷ − w_k‖₂ = (l_ŷ − l_k) / ‖w_ŷ − w_k‖₂``
      (the paper's closed-form estimate, a lower bound, of the feature distance to a decision boundary);
    * ``fDBD(z) = (1/(K − 1)) Σ_{k≠ŷ} d_k(z) / ‖z − μ‖₂`` (the average boundary distance
      regularised by the deviation from the training-feature mean, the paper's detection score;
      higher for in-distribution);
    * medaudit's score is ``−fDBD(z)`` (higher = more shifted).

    Equation numbers are not cited: the copies of the paper reachable when this was written showed
    only its abstract; the formula follows that abstract ("regularizing the distances to decision boundaries
    based on feature deviation from the mean") and the authors' code (litianliu/fDBD-OOD,
    ``run_cifar.py``: ``Σ_k |l_ŷ − l_k| / ‖w_ŷ − w_k‖`` (with ``‖·‖ := 1`` for ``k = ŷ``,
    contributing 0) divided by ``‖z − μ_train‖``). That code sums over ``k``; the average used here
    (as pytorch-ood's ``fDBD``) differs by the constant ``K − 1`` and ranks identically.
    Assumptions: ``μ`` is the mean of the reference (fit) features — the training set's in the
    paper; classes whose weight vector equals ``w_ŷ`` have no boundary with ``ŷ`` and are left out
    of the average; ``‖z − μ‖`` is floored at 1e-12 (a feature exactly at the mean gets a large
    finite in-distribution score); a one-output head is the two-class head ``[0; w]``.
    """

    name = "fdbd"
    needs: ClassVar[Literal["logits", "features"]] = "features"
    needs_head: ClassVar[bool] = True
    summary = "negative mean distance to the head's decision boundaries over the distance to the in-distribution feature mean (fDBD)"
    citation = "Liu & Qin, Fast Decision Boundary based Out-of-Distribution Detector, ICML 2024"

    def __init__(self) -> None:
        self.mean: Tensor | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        return pool(_require_features(self, features))

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        _check_fit_size(self, embeddings)
        self.mean = embeddings.double().mean(dim=0)

    def score(self, embeddings: Tensor) -> Tensor:
        if self.mean is None:
            raise RuntimeError("fdbd: fit() must be called before score()")
        z = embeddings.double()
        w, b = _head_params(_require_head(self), z.device, expand=True)
        logits = z @ w.T + b
        top, pred = logits.max(dim=1)
        # ‖w_i − w_j‖ computed from the differences (no ‖a‖² + ‖b‖² − 2ab cancellation)
        wdist = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")[pred]  # [N, K]
        has_boundary = wdist > 0  # also False at k = ŷ
        gaps = (top[:, None] - logits).clamp_min(0.0)
        dist = torch.where(has_boundary, gaps / torch.where(has_boundary, wdist, 1.0), 0.0)
        count = has_boundary.sum(dim=1).clamp_min(1)
        mean_dist = dist.sum(dim=1) / count
        dev = (z - self.mean.to(z.device)).norm(dim=1).clamp_min(_FDBD_FLOOR)
        return -(mean_dist / dev)


__all__ = ["ASH", "DICE", "FDBD", "SCALE", "ReAct", "free_energy", "linear_percentile"]
