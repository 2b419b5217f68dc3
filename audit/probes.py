r"""Linear and k-NN probes: class probabilities from an encoder's embeddings.

An encoder (a foundation-model backbone) returns embeddings, not class scores. medaudit audits it
with the transfer-evaluation protocol of the foundation-model literature: two probes are fitted
on the embeddings of the labelled, clean **reference** set, and then applied, frozen, to the
embeddings of every scenario, clean and perturbed; the class probabilities they return are what
the classification metrics evaluate.

Linear probe
    The embeddings are standardised with the reference embeddings' mean and population standard
    deviation (scikit-learn's ``StandardScaler``; a dimension of zero variance keeps scale 1),
    and an L2-regularised logistic regression (``LogisticRegression``, lbfgs, multinomial for
    more than two classes) is fitted on them with a **fixed, recorded** ``C``. There is no
    hyper-parameter search: the audit has no validation split, and a ``C`` searched on a random
    split of the reference would make every number of the audit depend on that split.
    Whether lbfgs converged within :data:`PROBE_MAX_ITER` iterations is recorded, not raised.

k-NN probe
    The ``k`` nearest reference embeddings by cosine similarity vote with equal weight, as in
    DINO's evaluation (Caron et al. 2021; Oquab et al. 2023 for DINOv2). A class's probability is
    its share of the ``k`` votes, so every probability is a multiple of ``1/k``: the calibration
    measures of the k-NN probe describe that vote, not a model's confidence, and its ranking
    measures (AUROC) see at most ``k + 1`` distinct scores.

Both probes see only the reference set: nothing of the scenarios they score enters their fit,
so a perturbation cannot move the probe towards itself. A query row with a NaN or infinite
embedding gets NaN probabilities from either probe, so the validation of the probabilities
downstream names the broken row instead of a probe inventing a prediction for it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PROBE_MAX_ITER", "KNNProbe", "LinearProbe", "fit_knn_probe", "fit_linear_probe", "probe_record"]

PROBE_MAX_ITER = 1000
"""lbfgs iterations allowed to the linear probe (scikit-learn's default of 100 is often too few
for the hundreds to thousands of dimensions of a foundation model's embeddings)."""

# Similarities held at once by the k-NN probe ([block, M]): 2**24 of them are 64 MiB in float32,
# whatever the number of queries, so a large scenario cannot exhaust a GPU's memory.
_KNN_BLOCK_ELEMENTS = 2**24


# ---------------------------------------------------------------------------------------------
# Input validation (the reference set comes from the user: every problem is named)
# ---------------------------------------------------------------------------------------------


def _to_float64_numpy(embeddings: np.ndarray | Tensor) -> np.ndarray:
    """The reference embeddings as a finite float64 ``[M, D]`` array on the CPU."""
    if isinstance(embeddings, Tensor):
        # .to(float64) first: numpy has no bfloat16, and a CUDA tensor must come to the CPU anyway
        array = embeddings.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(embeddings)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"reference embeddings must be numbers, got dtype {array.dtype}")
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise ValueError(f"reference embeddings must be 2-D [samples, dimensions], got shape {tuple(array.shape)}")
    if array.shape[1] < 1:
        raise ValueError("reference embeddings have no dimension (shape [M, 0])")
    bad = ~np.isfinite(array)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"reference embeddings hold NaN/Inf in {rows.size} of {array.shape[0]} samples "
                         f"(first: row {int(rows[0])})")
    return array


def _to_label_array(labels: np.ndarray | Tensor, n_samples: int, n_classes: int) -> np.ndarray:
    """The reference labels as an int64 ``[M]`` array with values in ``0..n_classes-1``."""
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"reference labels must be 1-D class indices, got shape {tuple(array.shape)}")
    if array.shape[0] != n_samples:
        raise ValueError(f"{array.shape[0]} reference labels for {n_samples} reference embeddings")
    if array.dtype.kind == "f":
        # whole-valued floats (labels read from a CSV, say) are accepted; 0.5 or NaN is not a class
        if not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise ValueError("reference labels must be whole class indices, got fractional or NaN values")
    elif array.dtype.kind not in "biu":
        raise ValueError(f"reference labels must be integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    outside = (array < 0) | (array >= n_classes)
    if outside.any():
        values = sorted({int(v) for v in array[outside]})
        raise ValueError(f"reference labels must lie in 0..{n_classes - 1}; found {values[:10]}"
                         f"{' …' if len(values) > 10 else ''}")
    return array


def _check_n_classes(n_classes: int, minimum: int) -> None:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < minimum:
        raise ValueError(f"n_classes must be an integer >= {minimum}, got {n_classes!r}")


def _check_queries(embeddings: Tensor, dim: int, probe: str) -> None:
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"the {probe} probe takes a torch.Tensor of embeddings, got {type(embeddings).__name__}")
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise ValueError(f"the {probe} probe was fitted on {dim}-dimensional embeddings; "
                         f"got shape {tuple(embeddings.shape)}")


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value, so field-wise == would raise
class LinearProbe:
    """A logistic regression on standardised embeddings, fitted on the clean reference set.

    Attributes
    ----------
    mean : Tensor ``[D]`` float64
        The reference embeddings' mean.
    scale : Tensor ``[D]`` float64
        Their population standard deviation; 1 where it is 0 (as scikit-learn's ``StandardScaler``).
    coef : Tensor ``[K, D]`` float64
        Weights of the standardised embeddings. For two classes the first row is zero and the second
        holds scikit-learn's ``coef_``, so that the softmax reproduces its ``[1 - p, p]``.
    intercept : Tensor ``[K]`` float64
        Biases (``[0, b]`` for two classes).
    C : float
        The inverse L2 regularisation strength it was fitted with.
    converged : bool
        Whether lbfgs stopped before :data:`PROBE_MAX_ITER` iterations.
    n_iter : int
        lbfgs iterations run.
    """

    mean: Tensor
    scale: Tensor
    coef: Tensor
    intercept: Tensor
    C: float
    converged: bool
    n_iter: int

    def probabilities(self, embeddings: Tensor) -> Tensor:
        """Class probabilities of embeddings.

        Parameters
        ----------
        embeddings : Tensor ``[N, D]``
            Any float dtype, on any device.

        Returns
        -------
        Tensor ``[N, K]`` float32
            The softmax of the standardised embeddings' logits, on the embeddings' device; computed
            in float64 (standardising a float16 embedding in its own precision would lose digits),
            then cast. A row with a NaN/Inf embedding is NaN.
        """
        _check_queries(embeddings, self.coef.shape[1], "linear")
        device = embeddings.device
        # MPS has no float64: there the float64 arithmetic runs on the CPU and the result goes back
        work = torch.device("cpu") if device.type == "mps" else device
        x = embeddings.detach().to(work, torch.float64)
        mean, scale, coef, intercept = (t.to(work) for t in (self.mean, self.scale, self.coef, self.intercept))
        logits = ((x - mean) / scale) @ coef.T + intercept
        probs = torch.softmax(logits, dim=1)
        # NaN for a NaN/Inf embedding by contract, not only because ±inf logits happen to softmax to NaN
        probs = torch.where(torch.isfinite(x).all(dim=1, keepdim=True), probs, torch.full_like(probs, math.nan))
        return probs.to(device=device, dtype=torch.float32)


def fit_linear_probe(embeddings: np.ndarray | Tensor, labels: np.ndarray | Tensor, n_classes: int, C: float = 1.0,
                     seed: int = 0) -> LinearProbe:
    """Fit the linear probe on the reference embeddings.

    scikit-learn's ``StandardScaler`` then ``LogisticRegression(C=C, max_iter=PROBE_MAX_ITER,
    random_state=seed)`` (lbfgs; multinomial for more than two classes), in float64.

    Parameters
    ----------
    embeddings : ndarray or Tensor ``[M, D]``
        The clean reference set's embeddings (any float dtype, any device).
    labels : ndarray or Tensor ``[M]``
        Their class indices in ``0..n_classes-1``.
    n_classes : int
        The task's number of classes (at least 2); every class must occur in ``labels``.
    C : float
        Inverse L2 regularisation strength, fixed and recorded (no search: see the module docstring).
    seed : int
        ``random_state`` of the regression (lbfgs is deterministic; passed for completeness).

    Returns
    -------
    LinearProbe

    Raises
    ------
    ValueError
        When the embeddings are not 2-D or hold NaN/Inf, there are fewer than 2 samples, labels are
        not class indices in range, a class has no reference sample, or ``C`` is not positive.
    """
    # imported here: scikit-learn is only needed when an encoder is audited
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    _check_n_classes(n_classes, 2)
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not (math.isfinite(C) and C > 0):
        raise ValueError(f"the linear probe's C must be a positive finite number, got {C!r}")
    x = _to_float64_numpy(embeddings)
    if x.shape[0] < 2:
        raise ValueError(f"the linear probe needs at least 2 reference samples, got {x.shape[0]}")
    y = _to_label_array(labels, x.shape[0], n_classes)
    missing = sorted(set(range(n_classes)) - {int(v) for v in np.unique(y)})
    if missing:
        # LogisticRegression would silently fit only the classes present, and the columns of the
        # probabilities would no longer be the task's classes
        raise ValueError(f"the reference set has no sample of class(es) {missing}; the probe cannot learn them: "
                         "add them to --reference")

    scaler = StandardScaler().fit(x)
    regression = LogisticRegression(C=float(C), max_iter=PROBE_MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        # non-convergence is recorded (converged, n_iter in results.json), not warned about
        warnings.simplefilter("ignore", ConvergenceWarning)
        regression.fit(scaler.transform(x), y)

    coef = np.asarray(regression.coef_, dtype=np.float64)
    intercept = np.asarray(regression.intercept_, dtype=np.float64)
    if n_classes == 2:
        # sklearn: p1 = sigmoid(w·x + b); softmax([0, w·x + b]) is exactly [1 - p1, p1]
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros(1), intercept])
    n_iter = int(np.max(regression.n_iter_))
    return LinearProbe(
        mean=torch.from_numpy(np.asarray(scaler.mean_, dtype=np.float64).copy()),
        scale=torch.from_numpy(np.asarray(scaler.scale_, dtype=np.float64).copy()),
        coef=torch.from_numpy(coef.copy()),
        intercept=torch.from_numpy(intercept.copy()),
        C=float(C),
        converged=n_iter < PROBE_MAX_ITER,
        n_iter=n_iter,
    )


# ---------------------------------------------------------------------------------------------
# k-NN probe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value, so field-wise == would raise
class KNNProbe:
    """Uniform votes of the ``k`` reference embeddings nearest by cosine similarity.

    Attributes
    ----------
    reference : Tensor ``[M, D]`` float32
        The L2-normalised reference embeddings (a zero embedding stays zero: cosine similarity 0
        with everything, as scikit-learn).
    labels : Tensor ``[M]`` int64
        Their classes.
    k : int
        Neighbours that vote (already capped at ``M``).
    n_classes : int
        Columns of the probabilities.
    """

    reference: Tensor
    labels: Tensor
    k: int
    n_classes: int

    def probabilities(self, embeddings: Tensor) -> Tensor:
        """Class probabilities of embeddings: each class's share of the ``k`` nearest votes.

        What scikit-learn's ``KNeighborsClassifier(metric="cosine", weights="uniform").predict_proba``
        returns (which of several equidistant neighbours vote may differ). Queries are processed in
        blocks of bounded memory, on the embeddings' device (the reference is moved there once per
        call).

        Parameters
        ----------
        embeddings : Tensor ``[N, D]``
            Any float dtype, any device; float16/bfloat16 are upcast to float32, float64 kept.

        Returns
        -------
        Tensor ``[N, K]`` float32
            Multiples of ``1/k``, rows summing to 1; a row with a NaN/Inf embedding is NaN.
        """
        _check_queries(embeddings, self.reference.shape[1], "k-NN")
        device = embeddings.device
        # float32 at least (half precision would blur near neighbours); float64 queries stay float64
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        if not dtype.is_floating_point:
            dtype = torch.float32
        reference = self.reference.to(device=device, dtype=dtype)
        labels = self.labels.to(device)
        n = embeddings.shape[0]
        out = torch.empty((n, self.n_classes), dtype=torch.float32, device=device)
        block = max(1, _KNN_BLOCK_ELEMENTS // max(1, reference.shape[0]))
        for start in range(0, n, block):
            queries = embeddings[start:start + block].detach().to(dtype)
            similarity = torch.nn.functional.normalize(queries, dim=1) @ reference.T
            nearest = similarity.topk(self.k, dim=1, largest=True, sorted=False).indices
            votes = torch.zeros((queries.shape[0], self.n_classes), dtype=torch.float32, device=device)
            votes.scatter_add_(1, labels[nearest], torch.ones(nearest.shape, dtype=torch.float32, device=device))
            shares = votes / self.k
            # topk ranks NaN similarities first, which would pass off a broken embedding as a vote
            finite = torch.isfinite(queries).all(dim=1, keepdim=True)
            out[start:start + block] = torch.where(finite, shares, torch.full_like(shares, math.nan))
        return out


def fit_knn_probe(embeddings: np.ndarray | Tensor, labels: np.ndarray | Tensor, n_classes: int,
                  k: int = 20) -> KNNProbe:
    """Store the normalised reference embeddings for the k-NN probe.

    Parameters
    ----------
    embeddings : ndarray or Tensor ``[M, D]``
        The clean reference set's embeddings.
    labels : ndarray or Tensor ``[M]``
        Their class indices in ``0..n_classes-1`` (a class without a sample never gets a vote).
    n_classes : int
        The task's number of classes.
    k : int
        Neighbours that vote; capped at ``M`` (a vote of all the reference when it is smaller).

    Returns
    -------
    KNNProbe

    Raises
    ------
    ValueError
        When there is no reference sample, the embeddings are not 2-D or hold NaN/Inf, labels are
        not class indices in range, or ``k < 1``.
    """
    _check_n_classes(n_classes, 1)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"the k-NN probe's k must be an integer >= 1, got {k!r}")
    x = _to_float64_numpy(embeddings)
    if x.shape[0] < 1:
        raise ValueError("the k-NN probe needs at least 1 reference sample, got 0")
    y = _to_label_array(labels, x.shape[0], n_classes)
    # normalised in float64, stored in float32: the rounding is then that of float32 storage only
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    normalised = x / np.where(norms > 0, norms, 1.0)
    return KNNProbe(
        reference=torch.from_numpy(normalised.astype(np.float32)),
        labels=torch.from_numpy(y),
        k=int(min(k, x.shape[0])),
        n_classes=int(n_classes),
    )


# ---------------------------------------------------------------------------------------------
# The record in results.json
# ---------------------------------------------------------------------------------------------


def probe_record(linear: LinearProbe, knn: KNNProbe, reference_sha256: str, n_reference: int) -> dict[str, Any]:
    """What results.json ``model.probe`` records about the probes.

    Parameters
    ----------
    linear : LinearProbe
    knn : KNNProbe
        Fitted on the same reference embeddings.
    reference_sha256 : str
        The reference set's hash, so a reader can tell which set the probes learned from.
    n_reference : int
        Reference samples.

    Returns
    -------
    dict
        ``{"kind": "linear+knn", "linear": {...}, "knn": {...}, "reference": {...}, "embedding_dim": D}``.

    Raises
    ------
    ValueError
        When the two probes were fitted on embeddings of different dimensions.
    """
    dim = int(linear.coef.shape[1])
    if int(knn.reference.shape[1]) != dim:
        raise ValueError(f"the linear probe has {dim} dimensions and the k-NN probe {knn.reference.shape[1]}: "
                         "they were not fitted on the same embeddings")
    return {
        "kind": "linear+knn",
        "linear": {
            "C": float(linear.C),
            "scaling": "standardised on the clean reference embeddings (mean, population std)",
            "solver": "lbfgs",
            "max_iter": PROBE_MAX_ITER,
            "n_iter": int(linear.n_iter),
            "converged": bool(linear.converged),
        },
        "knn": {"k": int(knn.k), "metric": "cosine", "weights": "uniform"},
        "reference": {"n_samples": int(n_reference), "sha256": str(reference_sha256)},
        "embedding_dim": dim,
    }
