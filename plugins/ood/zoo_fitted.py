"""Fitted post-hoc OOD detectors: ViM, RMD, GEN, KL matching, SHE and NNGuide.

Every score is oriented **higher = more shifted**. Definitions follow pytorch-ood 0.4.0
(``src/pytorch_ood/detector/{vim,rmd,mahalanobis,gen,klmatching,she,nnguide}.py``), which the
fixtures ``tests/data/ood-reference`` hold scores of; ``tests/test_ood_zoo_fitted.py`` matches
them. Where pytorch-ood departs from the paper (a mean instead of a sum, an unnormalised scatter
matrix instead of a covariance, the minimum over templates) the docstring of the detector says so.

Split of the work (see :class:`medaudit.detector.Detector`):

* ``gen`` and ``kl_matching`` read the model outputs (subclasses of :class:`.OutputDetector`: the
  embedding is the raw outputs ``[B, K]``, logits or probabilities, and binary one-value outputs
  are the two-class rows ``[0, z]``).
* ``vim``, ``rmd``, ``she`` and ``nnguide`` embed the globally average-pooled output ``z [D]`` of the
  configured feature layer. ``vim``, ``she`` and ``nnguide`` also need the model's linear head
  (``needs_head = True``, :class:`medaudit.detector.LinearHead`): they recompute the logits
  ``l = W z + b`` from the pooled features in float64 (a head with one output is the two-class
  head ``[0, l]``, as medaudit's ``energy`` treats one-logit models).

Fitting and scoring run in float64 on the embeddings' device; ``score`` never modifies the
fitted state. Fit labels may be class indices ``[N]`` or, for multilabel tasks, multi-hot rows
``[N, K]``; each detector says how it uses them (``vim``, ``gen``, ``kl_matching`` and ``nnguide``
do not use labels at all).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from medaudit.detector import Detector, LinearHead

from .detectors import OutputDetector, pool, query_chunk, two_class

#: Fewest reference samples a fitted detector accepts.
_MIN_FIT = 2
#: GEN's clamp of the probabilities to ``[ε, 1 − ε]`` (pytorch-ood gen.py, ``GEN.score``).
_GEN_CLAMP = 1e-7
#: Ridge added to RMD's scatter matrices before inversion (pytorch-ood's ``1e-6``).
_RMD_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _pooled(det: Detector, features: Tensor | None) -> Tensor:
    """Globally average-pooled features ``[B, D]`` (half precision is upcast to float32 first)."""
    if features is None:
        raise ValueError(f"{det.name} needs features (configure model.feature_layer)")
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()
    return pool(features)


def _require_head(det: Detector) -> LinearHead:
    if det.head is None:
        raise RuntimeError(f"{det.name} needs the model's classification head: the audit sets detector.head "
                           "(a medaudit.detector.LinearHead) before the forward passes; set it before fit/score")
    return det.head


def _fit_rows(det: Detector, embeddings: Tensor, minimum: int = _MIN_FIT) -> Tensor:
    """The reference embeddings in float64, checked to be ``[N, D]`` with ``N ≥ minimum``."""
    if embeddings.ndim != 2:
        raise ValueError(f"{det.name}: expected embeddings [N, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] < minimum:
        raise ValueError(f"{det.name} needs at least {minimum} reference samples, got {embeddings.shape[0]}")
    return embeddings.double()


def _head_logits(det: Detector, z: Tensor) -> Tensor:
    """Float64 logits ``[N, K]`` of pooled features ``z [N, D]`` through :attr:`Detector.head`; a
    one-output head gives the two-class logits ``[0, l]``."""
    head = _require_head(det)
    d_head = head.weight.shape[-1]
    if z.shape[1] != d_head:
        raise ValueError(f"{det.name}: the head expects {d_head} features, the feature layer gives {z.shape[1]}")
    return two_class(head(z.double()))


def _class_masks(labels: Tensor, n: int, device: torch.device) -> list[Tensor]:
    """Boolean masks ``[N]`` of the reference samples of each class present.

    ``[N]`` class indices: one mask per distinct label. ``[N, K]`` multi-hot rows (multilabel
    tasks): one mask per label column with a positive sample (a sample belongs to every label it
    is positive for), and one more for the samples positive for none (e.g. "no finding").
    """
    labels = labels.to(device)
    if labels.ndim == 1:
        if labels.shape[0] != n:
            raise ValueError(f"got {labels.shape[0]} labels for {n} reference samples")
        y = labels.long()
        return [y == c for c in torch.unique(y)]
    if labels.ndim != 2 or labels.shape[0] != n:
        raise ValueError(f"labels must be [N] class indices or [N, K] multi-hot rows, got shape {tuple(labels.shape)} "
                         f"for {n} reference samples")
    pos = labels > 0
    masks = [pos[:, k] for k in range(pos.shape[1]) if bool(pos[:, k].any())]
    none = ~pos.any(dim=1)
    return masks + ([none] if bool(none.any()) else [])


def _pinv_whitener(cov: Tensor) -> Tensor:
    """``A [D, r]`` with ``A Aᵀ = pinv(cov)`` for a symmetric positive semi-definite ``cov``, so
    that ``(x − μ)ᵀ pinv(cov) (x − μ) = ‖(x − μ) A‖²``.

    From ``cov = V diag(λ) Vᵀ``: ``A = V_r diag(λ_r^{−1/2})`` over the eigenvalues above
    ``torch.linalg.pinv``'s default cut-off ``D · ε_float64 · λ_max`` (the others are dropped, as
    ``pinv`` drops them). For a positive definite, well-conditioned ``cov`` this is the inverse.
    """
    lam, vec = torch.linalg.eigh(cov)
    cutoff = cov.shape[0] * torch.finfo(cov.dtype).eps * float(lam[-1].clamp_min(0))
    keep = lam > cutoff
    if not bool(keep.any()):
        raise ValueError("the covariance of the reference features is zero: are the features constant?")
    return vec[:, keep] * lam[keep].rsqrt()


def _sq_norms_to(x: Tensor, means: Tensor) -> Tensor:
    """``[N, C]`` squared distances ``‖x_i − m_c‖²`` (as ``‖x‖² − 2 x·m + ‖m‖²``, clamped at 0)."""
    sq = x.pow(2).sum(dim=1, keepdim=True) - 2 * x @ means.T + means.pow(2).sum(dim=1)
    return sq.clamp_min(0)


def topk_mean_inner(queries: Tensor, bank: Tensor, k: int, block: int | None = None) -> Tensor:
    """Mean of the ``k`` largest inner products ``⟨q, b⟩`` of every query with the rows of ``bank``.

    Queries are taken in chunks whose ``[chunk, M]`` block of inner products has at most
    ``block`` entries (default 2**21 on a CPU, 2**24 on an accelerator, as
    :func:`.kth_nn_distance`), so memory stays bounded as the bank grows with the data set.
    """
    n = queries.shape[0]
    out = bank.new_empty(n)
    if n == 0:
        return out
    queries = queries.to(bank.dtype)
    chunk = query_chunk(bank, block)
    for s in range(0, n, chunk):
        q = queries[s : s + chunk]
        out[s : s + q.shape[0]] = (q @ bank.T).topk(k, dim=1).values.mean(dim=1)
    return out


# ---------------------------------------------------------------------------------------------
# ViM
# ---------------------------------------------------------------------------------------------


class ViM(Detector):
    """Virtual-logit matching (Wang, Li, Feng & Zhang, CVPR 2022).

    Embedding: pooled features ``z [D]``; logits ``l = W z + b`` from the head. Fit, on the
    reference features: the origin ``u = −pinv(W) b`` (the point the head maps to zero logits);
    the uncentred second moment ``C = (1/N) Σ_i (z_i − u)(z_i − u)ᵀ`` (sklearn's
    ``EmpiricalCovariance(assume_centered=True)``, as the paper's code and pytorch-ood); its
    principal subspace = the eigenvectors of the ``d`` largest eigenvalues, and ``R [D, D − d]`` the
    eigenvectors of the others (the residual space); the scale
    ``α = mean_i max_k l_k(z_i) / mean_i ‖(z_i − u) R‖``. Score::

        vim(z) = α ‖(z − u) R‖ − logsumexp_k l_k(z)

    the virtual logit minus the energy ``logsumexp l``. The paper scores the softmax probability of
    the virtual logit among the logits, ``σ(vlogit − logsumexp l)``, an increasing function of this
    difference; pytorch-ood (vim.py, ``ViM.predict_features``) returns ``−(energy − vlogit)``, the
    difference itself, followed here. Higher = more shifted.

    ``d`` (default 16, pytorch-ood's reference value; the paper uses ``d = 1000`` for ``D ≥ 1500``,
    ``512`` for ``D = 768``) must be smaller than ``D``; when it is not, ``D // 2`` is used instead, as
    pytorch-ood's ``ViM.fit_features`` does for ``D < d`` (``d_used`` records it). Labels are unused.
    """

    name = "vim"
    needs = "features"
    needs_head = True
    summary = "virtual logit (scaled norm of the pooled features outside their principal subspace) minus the energy"
    citation = ("Haoqi Wang, Zhizhong Li, Litong Feng & Wayne Zhang, ViM: Out-Of-Distribution with Virtual-logit "
                "Matching, CVPR 2022")

    def __init__(self, d: int = 16) -> None:
        if int(d) != d or d < 1:
            raise ValueError(f"vim principal subspace dimension d must be a positive integer, got {d}")
        self.d = int(d)
        self.d_used: int | None = None
        self.origin: Tensor | None = None
        self.residual: Tensor | None = None
        self.alpha: float | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        return _pooled(self, features)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        z = _fit_rows(self, embeddings)
        logits = _head_logits(self, z)
        head = _require_head(self)
        w = head.weight.to(z.device, torch.float64).reshape(-1, z.shape[1])
        b = head.bias.to(z.device, torch.float64).reshape(-1)
        origin = -(torch.linalg.pinv(w) @ b)
        x = z - origin
        moment = x.T @ x / x.shape[0]
        dim = x.shape[1]
        d = self.d if self.d < dim else dim // 2
        _, vec = torch.linalg.eigh(moment)  # ascending eigenvalues: the residual space comes first
        residual = vec[:, : dim - d].contiguous()
        norm = (x @ residual).norm(dim=1).mean()
        if not float(norm) > 0:
            raise ValueError(f"vim: the reference features have no component outside their {d}-dimensional "
                             "principal subspace, so the virtual logit cannot be scaled; lower d")
        self.alpha = float(logits.max(dim=1).values.mean() / norm)
        self.origin, self.residual, self.d_used = origin, residual, d

    def score(self, embeddings: Tensor) -> Tensor:
        if self.origin is None or self.residual is None or self.alpha is None:
            raise RuntimeError("vim: fit() must be called before score()")
        z = embeddings.double().to(self.origin.device)
        vlogit = self.alpha * ((z - self.origin) @ self.residual).norm(dim=1)
        return vlogit - torch.logsumexp(_head_logits(self, z), dim=1)


# ---------------------------------------------------------------------------------------------
# RMD
# ---------------------------------------------------------------------------------------------


class RMD(Detector):
    """Relative Mahalanobis distance (Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, 2021).

    Embedding: pooled features ``z``. Fit: class means ``μ_c`` and the tied scatter matrix
    ``S = Σ_i (z_i − μ_{y_i})(z_i − μ_{y_i})ᵀ``; the background mean ``μ_0`` (all samples) and scatter
    ``S_0 = Σ_i (z_i − μ_0)(z_i − μ_0)ᵀ``. Score::

        rmd(z) = min_c [ (z − μ_c)ᵀ Σ⁻¹ (z − μ_c) − (z − μ_0)ᵀ Σ_0⁻¹ (z − μ_0) ]

    **Estimator**: to match pytorch-ood 0.4.0 numerically (its ``Mahalanobis.fit_features`` and
    ``RMD.fit_features``), ``Σ = S + εI`` and ``Σ_0 = S_0 + εI`` with ``ε = 1e-6`` — the
    *unnormalised* scatter matrices (not divided by ``N``), inverted by ``pinv`` (pytorch-ood inverts
    ``Σ`` with ``torch.linalg.pinv`` and ``Σ_0`` with ``torch.linalg.inv``, the same for a positive
    definite matrix; here both via :func:`_pinv_whitener`). Up to the negligible ridge, the scores are
    Ren et al.'s RMD (covariances ``S/N``, ``S_0/N``) divided by ``N``: the same ranking. Unlike
    medaudit's ``mahalanobis``, there is no Ledoit–Wolf shrinkage: with fewer reference samples
    than feature dimensions the scatter is singular and the ridge ``ε`` makes directions outside
    the reference span weigh ``1/ε``.

    Labels: ``[N]`` class indices, or ``[N, K]`` multi-hot rows, where each label with a positive
    sample is a class (a sample counts, and is centred, in every class it is positive for) and the
    samples positive for none form one more. At least two classes are needed: with one, the class
    and background Gaussians coincide and every score is 0.
    """

    name = "rmd"
    needs = "features"
    summary = "min class-conditional Mahalanobis distance minus the background (one-Gaussian) Mahalanobis distance"
    citation = ("Jie Ren, Stanislav Fort, Jeremiah Liu, Abhijit Guha Roy, Shreyas Padhy & Balaji Lakshminarayanan, "
                "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection, ICML 2021 Workshop on "
                "Uncertainty and Robustness in Deep Learning (arXiv:2106.09022), 2021")

    def __init__(self, eps: float = _RMD_EPS) -> None:
        if not eps >= 0:
            raise ValueError(f"rmd eps must be non-negative, got {eps}")
        self.eps = float(eps)
        self.means: Tensor | None = None
        self.whitener: Tensor | None = None
        self.background_mean: Tensor | None = None
        self.background_whitener: Tensor | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        return _pooled(self, features)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        z = _fit_rows(self, embeddings)
        masks = _class_masks(labels, z.shape[0], z.device)
        if len(masks) < 2:
            raise ValueError(f"rmd needs reference samples of at least 2 classes, got {len(masks)}: with one, the "
                             "class-conditional and background Gaussians coincide and every score is 0")
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        means = torch.stack([z[m].mean(dim=0) for m in masks])
        scatter = sum(((z[m] - mu).T @ (z[m] - mu) for m, mu in zip(masks, means)), torch.zeros_like(eye))
        background = z.mean(dim=0)
        centred = z - background
        self.whitener = _pinv_whitener(scatter + self.eps * eye)
        self.background_whitener = _pinv_whitener(centred.T @ centred + self.eps * eye)
        self.means, self.background_mean = means, background

    def score(self, embeddings: Tensor) -> Tensor:
        if self.means is None or self.whitener is None or self.background_whitener is None:
            raise RuntimeError("rmd: fit() must be called before score()")
        assert self.background_mean is not None  # set with the others
        # Centred on the background mean first, so the expanded squared norms stay small.
        x = embeddings.double().to(self.means.device) - self.background_mean
        d0 = (x @ self.background_whitener).pow(2).sum(dim=1)
        dk = _sq_norms_to(x @ self.whitener, (self.means - self.background_mean) @ self.whitener)
        return (dk - d0[:, None]).min(dim=1).values


# ---------------------------------------------------------------------------------------------
# Output-based: GEN, KL matching
# ---------------------------------------------------------------------------------------------


class GEN(OutputDetector):
    """Generalized entropy (Liu, Lochman & Zach, CVPR 2023).

    With ``p = softmax(z)`` (or the probabilities as given) clamped to ``[1e-7, 1 − 1e-7]``::

        gen(z) = (1/M) Σ_{j ∈ top-M(p)} p_j^γ (1 − p_j)^γ

    over the ``M`` largest probabilities (``M = None``: all classes). Peaky in-distribution
    posteriors score low. The paper sums the terms (and negates, for a confidence); pytorch-ood
    0.4.0 (gen.py, ``GEN.score``) averages them, a constant factor that leaves every ranking
    unchanged, and is followed here so the scores match it. ``gamma = 0.1`` is the paper's choice;
    the paper uses ``M = 100`` for ImageNet.
    """

    name = "gen"
    summary = "generalized entropy: mean of p^γ(1−p)^γ over the top-M class probabilities"
    citation = ("Xixi Liu, Yaroslava Lochman & Christopher Zach, GEN: Pushing the Limits of Softmax-Based "
                "Out-of-Distribution Detection, CVPR 2023")

    def __init__(self, gamma: float = 0.1, M: int | None = None) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gen gamma must be positive, got {gamma}")
        if M is not None and (int(M) != M or M < 1):
            raise ValueError(f"gen M must be a positive integer or None, got {M}")
        self.gamma = float(gamma)
        self.M = None if M is None else int(M)

    def score_rows(self, embeddings: Tensor) -> Tensor:
        p = self.probs(embeddings).clamp(_GEN_CLAMP, 1 - _GEN_CLAMP)
        if self.M is not None and self.M < p.shape[1]:
            p = p.topk(self.M, dim=1).values
        g = self.gamma
        return (p.pow(g) * (1 - p).pow(g)).mean(dim=1)


class KLMatching(OutputDetector):
    """KL matching (Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, ICML 2022).

    Fit: for every class ``k`` the model predicts on the reference set (``argmax p = k``), the
    template ``d_k`` = the mean posterior ``p`` of the reference samples predicted as ``k`` (labels are
    not used: the paper's templates need none). Score::

        kl(p) = min_k KL(p ‖ d_k) = min_k Σ_j p_j (log p_j − log d_kj)

    the divergence of the posterior from its closest template, as pytorch-ood 0.4.0
    (klmatching.py, ``KLMatching._score_probabilities``: the minimum over the templates of the
    predicted classes, not the template of the sample's own predicted class as earlier versions).
    ``0 log 0 = 0``; a template entry of exactly 0 is floored at the smallest normal float64
    (pytorch-ood uses the lowest finite log), so such terms stay finite.

    Uses the probabilities (softmax of logits, or the outputs as given for probability models).
    Segmentation maps (``voxelwise``) are not supported: the templates are of image-level outputs.
    """

    name = "kl_matching"
    summary = "min KL divergence of the softmax from the mean softmax of each predicted class (fitted)"
    citation = ("Dan Hendrycks, Steven Basart, Mantas Mazeika, Andy Zou, Joseph Kwon, Mohammadreza Mostajabi, "
                "Jacob Steinhardt & Dawn Song, Scaling Out-of-Distribution Detection for Real-World Settings, "
                "ICML 2022")

    def __init__(self) -> None:
        super().__init__()
        self.templates: Tensor | None = None
        self.classes: Tensor | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        if self.voxelwise:
            raise ValueError("kl_matching fits templates of image-level outputs; "
                             "per-voxel class maps are not supported")
        return super().embed(logits, features)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.ndim == 1:
            embeddings = embeddings[:, None]
        p = self.probs(_fit_rows(self, embeddings))
        pred = p.argmax(dim=1)
        classes = torch.unique(pred)
        self.templates = torch.stack([p[pred == c].mean(dim=0) for c in classes])
        self.classes = classes

    def score(self, embeddings: Tensor) -> Tensor:
        return self.score_rows(embeddings)

    def score_rows(self, embeddings: Tensor) -> Tensor:
        if self.templates is None:
            raise RuntimeError("kl_matching: fit() must be called before score()")
        p = self.probs(embeddings.to(self.templates.device))
        log_d = self.templates.clamp_min(torch.finfo(torch.float64).tiny).log()
        kl = torch.special.xlogy(p, p).sum(dim=1, keepdim=True) - p @ log_d.T
        return kl.min(dim=1).values


# ---------------------------------------------------------------------------------------------
# SHE
# ---------------------------------------------------------------------------------------------


class SHE(Detector):
    """Simplified Hopfield energy (Zhang, Fu, Chen, Du, Li, Wang, Liu, Han & Zhang, ICLR 2023).

    Embedding: pooled features ``z``; predictions ``ŷ = argmax_k l_k(z)`` from the head. Fit: the
    stored pattern of class ``k`` is the mean pooled feature ``S_k`` of the reference samples the
    model classifies correctly as ``k`` (``ŷ_i = y_i = k``; pytorch-ood she.py,
    ``SHE._filter_correct_predictions`` and ``fit_features``). Score::

        she(z) = −⟨z, S_ŷ(z)⟩

    the negative inner product with the pattern of the predicted class (pytorch-ood's
    ``predict_features``; the paper's energy with its simplified, inner-product Hopfield form).

    A head class without a correctly classified reference sample (pytorch-ood raises; in an
    audit's cross-fitted halves a rare class may have none) gets the zero pattern: inputs predicted
    as it score 0, no agreement with any memorised pattern (for non-negative features, as after a
    ReLU, the largest score there is); :attr:`unmatched` lists such classes. Multi-hot labels
    ``[N, K]``: a prediction is correct when the predicted class is one of the sample's positive
    labels. Fitting needs at least one correctly classified reference sample.
    """

    name = "she"
    needs = "features"
    needs_head = True
    summary = ("negative inner product of the pooled features with the mean pooled feature of the correctly "
               "classified reference samples of the predicted class")
    citation = ("Jinsong Zhang, Qiang Fu, Xu Chen, Lun Du, Zelin Li, Gang Wang, Xiaoguang Liu, Shi Han & Dongmei "
                "Zhang, Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization with "
                "Modern Hopfield Energy, ICLR 2023")

    def __init__(self) -> None:
        self.patterns: Tensor | None = None
        self.unmatched: list[int] = []

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        return _pooled(self, features)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        z = _fit_rows(self, embeddings)
        logits = _head_logits(self, z)
        pred = logits.argmax(dim=1)
        labels = labels.to(z.device)
        if labels.ndim == 1:
            if labels.shape[0] != z.shape[0]:
                raise ValueError(f"she: got {labels.shape[0]} labels for {z.shape[0]} reference samples")
            correct = pred == labels.long()
        elif labels.ndim == 2 and labels.shape[0] == z.shape[0]:
            cols = pred.clamp_max(labels.shape[1] - 1)
            correct = (pred < labels.shape[1]) & (labels.gather(1, cols[:, None])[:, 0] > 0)
        else:
            raise ValueError(f"she: labels must be [N] class indices or [N, K] multi-hot rows, got shape "
                             f"{tuple(labels.shape)} for {z.shape[0]} reference samples")
        if not bool(correct.any()):
            raise ValueError("she: no reference sample is classified correctly, so there is no pattern to store")
        k = logits.shape[1]
        patterns = z.new_zeros((k, z.shape[1]))
        unmatched = []
        for c in range(k):
            m = correct & (pred == c)
            if bool(m.any()):
                patterns[c] = z[m].mean(dim=0)
            else:
                unmatched.append(c)
        self.patterns, self.unmatched = patterns, unmatched

    def score(self, embeddings: Tensor) -> Tensor:
        if self.patterns is None:
            raise RuntimeError("she: fit() must be called before score()")
        z = embeddings.double().to(self.patterns.device)
        pred = _head_logits(self, z).argmax(dim=1)
        return -(z * self.patterns[pred]).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# NNGuide
# ---------------------------------------------------------------------------------------------


class NNGuide(Detector):
    """Nearest-neighbour guidance (Park, Jung & Teoh, ICCV 2023).

    Embedding: pooled features ``z``; ``E(z) = logsumexp_k l_k(z)`` the energy confidence of its
    logits (the negative free energy: higher = more in-distribution) and ``ẑ = z / ‖z‖``. Fit: the
    bank ``B = {E(z_i) ẑ_i}`` of normalised reference features scaled by their confidence. Score::

        nnguide(z) = −E(z) · (1/k) Σ_{b ∈ top-k} ⟨ẑ, b⟩

    the energy guided by the mean of the ``k`` largest inner products of the normalised feature
    with the bank, negated (higher = more shifted), as pytorch-ood 0.4.0 (nnguide.py,
    ``NNGuide.fit_features`` / ``predict_features``: ``F.normalize`` of the features, bank scaled
    by the raw ``logsumexp``, exact top-``k`` inner products). ``k = 10``; fitting needs at least
    ``max(k, 2)`` reference samples (pytorch-ood raises below ``k`` too). The paper builds the bank
    from a random subset of the training data; here it is the whole reference (or cross-fitted)
    set. Labels are unused.
    """

    name = "nnguide"
    needs = "features"
    needs_head = True
    summary = "energy times the mean top-k inner product with energy-scaled normalised in-distribution features"
    citation = ("Jaewoo Park, Yoon Gyo Jung & Andrew Beng Jin Teoh, Nearest Neighbor Guidance for "
                "Out-of-Distribution Detection, ICCV 2023")

    def __init__(self, k: int = 10) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"nnguide k must be a positive integer, got {k}")
        self.k = int(k)
        self.bank: Tensor | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        return _pooled(self, features)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        z = _fit_rows(self, embeddings, max(self.k, _MIN_FIT))
        energy = torch.logsumexp(_head_logits(self, z), dim=1)
        self.bank = torch.nn.functional.normalize(z, dim=1) * energy[:, None]

    def score(self, embeddings: Tensor) -> Tensor:
        if self.bank is None:
            raise RuntimeError("nnguide: fit() must be called before score()")
        z = embeddings.double().to(self.bank.device)
        energy = torch.logsumexp(_head_logits(self, z), dim=1)
        guidance = topk_mean_inner(torch.nn.functional.normalize(z, dim=1), self.bank, self.k)
        return -(guidance * energy)


__all__ = ["GEN", "RMD", "SHE", "KLMatching", "NNGuide", "ViM", "topk_mean_inner"]
