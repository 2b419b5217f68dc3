"""Fitting detectors, scoring every scenario, and the OOD / failure-detection results.

Default fitting is **cross-fitted** on the clean audit data: a permutation drawn from the
audit's stream ``"cross-fit"`` (:mod:`medaudit.rng`) splits the clean samples into halves A
and B; a detector fitted on A scores every scenario's samples of B and one fitted on B scores
those of A. So no sample is ever scored by a detector that saw it (its clean version) during
fitting, and sample ``i`` of every scenario is scored by the same detector, which keeps the
clean-vs-shifted comparison paired.
With an explicit in-distribution ``reference`` set, each detector is fitted once on it and
scores everything.

Results per detector (``value``, ``ci_low``, ``ci_high``: percentile bootstrap over the audit's
weight rows, :func:`medaudit.bootstrap.interval`):

* ``ood[scenario][detector]``: ``auroc``, ``aupr``, ``fpr95`` of separating the scenario's
  samples (positives) from the clean samples (negatives); sample ``i`` clean and sample ``i``
  shifted carry the same bootstrap count (paired).
* ``failure_detection[scenario][detector]``: AUROC of the score at separating wrong predictions
  (positives) from right ones, in every scenario including clean.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .bootstrap import interval
from .detector import Detector
from .memory import release_free_memory
from .ood_metrics import (auroc_within, clean_threshold, delong_interval, detection_measures, flagged_share,
                          prevented_drop)
from .results import WarningRecord
from .rng import stream_generator

__all__ = ["ShiftResult", "cross_fit_halves", "evaluate_detectors", "evaluate_external"]

Interval = dict[str, float | None]


@dataclass
class ShiftResult:
    """What :func:`evaluate_detectors` returns (results.json ``ood`` / ``failure_detection``)."""

    ood: dict[str, dict[str, dict[str, Interval]]] = field(default_factory=dict)
    failure_detection: dict[str, dict[str, Interval]] = field(default_factory=dict)
    # scenario -> detector -> share of the wrong predictions flagged where 95 % of clean inputs pass
    flagged_errors: dict[str, dict[str, Interval]] = field(default_factory=dict)
    # scenario -> detector -> the performance drop referring its flagged inputs would prevent (epd)
    epd: dict[str, dict[str, Interval]] = field(default_factory=dict)
    # detector -> its operating point: the clean score below which 95 % of clean inputs fall
    thresholds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)
    records: list[WarningRecord] = field(default_factory=list)  # results.json warning_records
    fitting: str = "cross-fitted"
    # Detector name -> its fitted copies: [fitted on the reference], or [fitted on half A,
    # fitted on half B]; :func:`evaluate_external` scores external sets with them.
    fitted: dict[str, list[Detector]] = field(default_factory=dict)
    # Detector name -> "delong" for detectors whose AUROC intervals are DeLong's (others: bootstrap).
    auroc_ci: dict[str, str] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        return [w.message for w in self.records]

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready part (scores stay out: they go to predictions.npz)."""
        return {"fitting": self.fitting, "ood": self.ood, "failure_detection": self.failure_detection}


#: Fewest distinct scores a detector must give the clean data (or half of them, for fewer than
#: twice as many samples) to be reported: a constant, or nearly constant, score cannot rank inputs,
#: and its AUROC would read 0.5 whatever the shift — a reassuring number from a broken detector.
MIN_DISTINCT_SCORES = 10


def distinct_floor(n: int) -> int:
    """The :data:`MIN_DISTINCT_SCORES` floor for ``n`` clean samples (at least 2)."""
    return max(2, min(MIN_DISTINCT_SCORES, n // 2))


def cross_fit_halves(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of halves A and B of ``n`` samples (a permutation from the audit seed's stream
    ``"cross-fit"``; A gets ``n // 2``)."""
    perm = torch.randperm(n, generator=stream_generator(seed, "cross-fit"))
    return perm[: n // 2].sort().values, perm[n // 2 :].sort().values


def _score_all(det: Detector, emb: Tensor, device: torch.device, rows: Tensor | None = None) -> Tensor:
    """Score ``[S, N, D]`` embeddings (only ``rows`` of each scenario, when given) on ``device``,
    one scenario at a time, returning ``[S, n]`` on the CPU.

    One scenario at a time bounds the device memory, and the host memory of selecting ``rows``,
    to one ``[n, D]`` block whatever the number of scenarios.
    """
    return torch.stack([det.score((emb[s] if rows is None else emb[s, rows]).to(device)).reshape(-1).double().cpu()
                        for s in range(emb.shape[0])])


def _fit_and_score(det: Detector, emb: Tensor, labels: Tensor, clean: int, seed: int,
                   reference: Tensor | None, reference_labels: Tensor | None,
                   device: torch.device) -> tuple[Tensor, list[Detector]]:
    """Scores ``[S, n]`` of every scenario, and the fitted copies of ``det`` that gave them."""
    if reference is not None:
        fitted = copy.deepcopy(det)
        ref_labels = reference_labels if reference_labels is not None else torch.zeros(reference.shape[0], dtype=torch.long)
        fitted.fit(reference.to(device), ref_labels.to(device))
        return _score_all(fitted, emb, device), [fitted]
    n = emb.shape[1]
    a, b = cross_fit_halves(n, seed)
    scores = torch.full((emb.shape[0], n), float("nan"), dtype=torch.float64)
    fits = []
    for fit_idx, score_idx in ((a, b), (b, a)):
        # A fresh copy per half: detectors keep fitted state on themselves.
        fitted = copy.deepcopy(det)
        fitted.fit(emb[clean, fit_idx].to(device), labels[fit_idx].to(device))
        scores[:, score_idx] = _score_all(fitted, emb, device, score_idx)
        fits.append(fitted)
    return scores, fits


def _failure_auroc(score: Tensor, probs: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """AUROC of ``score`` ``[S, N]`` at separating wrong predictions from right ones, per scenario: ``[S, R]``."""
    wrong = probs.argmax(dim=-1) != labels
    return auroc_within(score, wrong, weights)


def evaluate_detectors(
    detectors: Sequence[Detector],
    embeddings: dict[str, Tensor],
    labels: Tensor,
    probs: Tensor,
    scenario_ids: list[str],
    weights: Tensor,
    confidence: float,
    seed: int,
    reference: dict[str, Tensor] | None = None,
    reference_labels: Tensor | None = None,
    output_kind: str = "logits",
    device: torch.device | None = None,
    failure_detection: bool | None = None,
    task_name: str = "multilabel",
    explain_skip: bool = True,
    feature_layer: str | None = None,
    quality: Tensor | None = None,
) -> ShiftResult:
    """Fit every detector, score every scenario, and compute OOD and failure-detection AUROCs.

    Parameters
    ----------
    detectors : sequence of Detector
        Unfitted instances (they are copied before fitting, never modified).
    embeddings : dict
        Detector name -> ``[S, N, D]`` embeddings (``ForwardResult.embeddings``); detectors
        without an entry (feature layer missing) are skipped with a warning.
    labels : Tensor ``[N]`` (``[N, K]`` multilabel: failure detection is skipped)
    probs : Tensor ``[S, N, K]``
        Class probabilities; only failure detection reads them (its arg-max is the prediction).
    scenario_ids : list of str
        Must contain ``"clean"``.
    weights : Tensor ``[1 + R, N]``
        Row 0 ones, other rows bootstrap counts (:func:`medaudit.bootstrap.bootstrap_weights`).
    confidence : float
        Interval coverage.
    seed : int
        The audit seed (the cross-fitting split is its stream ``"cross-fit"``).
    reference, reference_labels : optional
        Detector name -> ``[M, D]`` in-distribution embeddings and their labels ``[M]``;
        when given, detectors are fitted once on them instead of cross-fitted.
    output_kind : "logits" | "probabilities"
        What the model outputs; logit-only detectors are skipped for probabilities.
    device : torch.device, optional
        Where detectors are fitted and score (the audit's GPU: kNN and Mahalanobis on 1024-d
        features are dense float64 algebra); default the CPU. Scores come back to the CPU.
    failure_detection : bool, optional
        Whether the task has one true class per sample, so scores are also evaluated at separating
        wrong predictions from right ones (the task's ``failure_detection`` capability); default:
        whether ``labels`` is ``[N]``. When not, a warning names ``task_name`` (unless
        ``explain_skip`` is False: a task that measures failures its own way, e.g. by Dice).
    feature_layer : str, optional
        The layer feature-based detectors read, named in the warning that skips a detector whose
        clean scores take fewer than :func:`distinct_floor` distinct values.
    quality : Tensor ``[S, N]``, optional
        Each sample's performance per scenario, higher is better (a segmentation's Dice), for
        ``epd`` (:func:`medaudit.ood_metrics.prevented_drop`); default, with failure detection:
        1 for a right prediction, 0 for a wrong one.

    Returns
    -------
    ShiftResult
    """
    if "clean" not in scenario_ids:
        raise ValueError(f"scenario_ids must include 'clean', got {scenario_ids[:5]}")
    clean = scenario_ids.index("clean")
    n = labels.shape[0]
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must be [1 + R, {n}], got {tuple(weights.shape)}")
    # Measures run where the weights are (the GPU for large audits); fitting and scoring on `device`.
    # The weights stay as given (float32 counts): the measures convert each chunk of rows to
    # float64, exactly, so a float64 copy of the whole [1 + R, N] matrix is not needed.
    dev = weights.device
    device = device or torch.device("cpu")
    result = ShiftResult(fitting="reference" if reference is not None else "cross-fitted")
    if failure_detection is None:
        failure_detection = labels.ndim == 1
    if not failure_detection and explain_skip:
        result.records.append(WarningRecord(
            code="failure-detection-skipped",
            message=f"ood: failure detection needs one true class per sample and is skipped for {task_name} "
                    "tasks; output-based detectors treat the outputs as one softmax over the labels"))
    if quality is None and failure_detection and probs is not None:
        quality = (probs.argmax(dim=-1) == labels.to(probs.device)).double()
    for det in detectors:
        name = det.name
        if getattr(det, "logits_only", False) and output_kind == "probabilities":
            result.records.append(WarningRecord(
                code="detector-skipped", subject=name,
                message=f"ood: detector {name!r} needs logits but the model outputs probabilities; skipped"))
            continue
        emb = embeddings.get(name)
        if emb is None or emb.numel() == 0:
            why = ("model.feature_layer is not set or could not be captured" if det.needs == "features" else
                   "model.feature_layers found no layers, or they could not be captured" if det.needs == "stages"
                   else "no outputs were kept")
            result.records.append(WarningRecord(code="detector-skipped", subject=name,
                                                message=f"ood: detector {name!r} skipped ({why})"))
            continue
        if emb.shape[:2] != (len(scenario_ids), n):
            raise ValueError(f"embeddings[{name!r}] must be [S={len(scenario_ids)}, N={n}, D], got {tuple(emb.shape)}")
        det = copy.deepcopy(det)
        if hasattr(det, "output_kind"):
            det.output_kind = output_kind  # type: ignore[attr-defined]
        ref = reference.get(name) if reference is not None else None
        if reference is not None and ref is None:
            result.records.append(WarningRecord(
                code="detector-cross-fitted", subject=name,
                message=f"ood: no reference embeddings for {name!r}; it is cross-fitted on the clean data"))
        if ref is None and n < 4:
            result.records.append(WarningRecord(
                code="detector-skipped", subject=name,
                message=f"ood: detector {name!r} skipped: cross-fitting needs at least 4 samples, got {n}"))
            continue
        try:
            scores, fits = _fit_and_score(det, emb, labels, clean, seed, ref, reference_labels, device)
        except Exception as exc:  # e.g. spectral on a layer without spatial extent, or a broken plugin
            result.records.append(WarningRecord(code="detector-skipped", subject=name,
                                                message=f"ood: detector {name!r} skipped: {type(exc).__name__}: {exc}"))
            continue
        finally:
            # Scoring's transients (knn distance blocks, index copies) are freed; return their pages
            # before the next detector, or each detector's fragments add to the phase's peak.
            release_free_memory()
        if bool(torch.isnan(scores).any()) or bool(torch.isinf(scores).any()):
            result.records.append(WarningRecord(code="detector-skipped", subject=name,
                                                message=f"ood: detector {name!r} skipped: it produced non-finite scores"))
            continue
        distinct = int(torch.unique(scores[clean]).numel())
        if distinct < distinct_floor(n):
            source = (f"layer {feature_layer!r}" if det.needs == "features" and feature_layer else
                      "the feature layer" if det.needs == "features" else
                      "the layers of model.feature_layers" if det.needs == "stages" else
                      "the input images" if det.needs == "inputs" else "the model's outputs")
            result.records.append(WarningRecord(
                code="detector-constant", subject=name,
                message=(f"ood: detector {name!r} skipped: its scores of the {n} clean samples take {distinct} distinct "
                         f"value(s) (fewer than {distinct_floor(n)}), so it cannot rank inputs and its AUROC would read "
                         f"0.5 whatever the shift; it reads {source}, which gives it nothing to tell inputs apart "
                         "(e.g. 1×1 feature maps for spectral, or saturated outputs)")))
            continue
        result.scores[name] = scores.float()
        result.fitted[name] = fits
        scores = scores.to(dev)
        # every scenario against the same clean scores: one batched call shares their sort
        shifted = [s for s in range(len(scenario_ids)) if s != clean]
        delong = det.auroc_ci == "delong"
        if shifted:
            measures = detection_measures(scores[shifted], scores[clean], weights, weights)
            for j, s in enumerate(shifted):
                entry = {k: interval(v[j], confidence) for k, v in measures.items()}
                if delong:  # sample i clean and sample i shifted are the same input: paired
                    entry["auroc"] = delong_interval(scores[s].cpu(), scores[clean].cpu(), confidence, paired=True)
                result.ood.setdefault(scenario_ids[s], {})[name] = entry
        result.thresholds[name] = float(clean_threshold(scores[clean], weights[:1])[0, 0])
        if quality is not None:
            epd = prevented_drop(scores, quality.to(dev), scores[clean], quality[clean].to(dev), weights)
            for s, sid in enumerate(scenario_ids):
                if s != clean:
                    result.epd.setdefault(sid, {})[name] = interval(epd[s], confidence)
        if failure_detection:
            failure = _failure_auroc(scores, probs.to(dev), labels.to(dev), weights)
            errors = probs.to(dev).argmax(dim=-1) != labels.to(dev)
            flagged = flagged_share(scores, errors, scores[clean], weights)
            for s, sid in enumerate(scenario_ids):
                result.flagged_errors.setdefault(sid, {})[name] = interval(flagged[s], confidence)
            wrong = (probs.argmax(dim=-1) != labels).cpu() if delong else None
            for s, sid in enumerate(scenario_ids):
                if wrong is not None:  # wrong and right predictions are different inputs: unpaired
                    value = delong_interval(scores[s].cpu()[wrong[s]], scores[s].cpu()[~wrong[s]], confidence)
                else:
                    value = interval(failure[s], confidence)
                result.failure_detection.setdefault(sid, {})[name] = value
        if delong:
            result.auroc_ci[name] = "delong"
    return result


def evaluate_external(
    fitted: dict[str, list[Detector]],
    clean_scores: dict[str, Tensor],
    external: dict[str, Tensor],
    weights: Tensor,
    external_weights: Tensor,
    confidence: float,
    device: torch.device | None = None,
) -> tuple[dict[str, dict[str, Interval]], dict[str, Tensor]]:
    """OOD measures of an external data set (``--ood-data``): its samples against the clean ones.

    The external samples are scored by the detectors :func:`evaluate_detectors` fitted
    (``ShiftResult.fitted``), so positives and negatives are scored by the same fitted copies:
    cross-fitted, external sample ``j`` by the copy fitted on half A when ``j`` is even and on
    half B when odd; with a reference set, by the one copy fitted on it. The two sets are
    resampled independently (``weights`` ``[1 + R, N]`` for clean, ``external_weights``
    ``[1 + R, M]`` for the external set).

    Parameters
    ----------
    fitted : detector name -> fitted copies (``ShiftResult.fitted``)
    clean_scores : detector name -> clean scores ``[N]`` (from :func:`evaluate_detectors`);
        only detectors present here, in ``fitted`` and in ``external`` are evaluated.
    external : detector name -> external embeddings ``[M, D]``
    device : where the detectors score, as in :func:`evaluate_detectors`

    Returns
    -------
    (measures, scores): detector name -> {``auroc``, ``aupr``, ``fpr95``} intervals, and
    detector name -> external scores ``[M]``.
    """
    measures: dict[str, dict[str, Interval]] = {}
    scores: dict[str, Tensor] = {}
    external_weights = external_weights.to(weights.device)
    device = device or torch.device("cpu")
    for name, fits in fitted.items():
        if name not in clean_scores or name not in external:
            continue
        ext = external[name]
        pos = torch.empty(ext.shape[0], dtype=torch.float64)
        for parity, det in enumerate(fits):  # one copy: every sample; two: alternate samples
            pos[parity::len(fits)] = det.score(ext[parity::len(fits)].to(device)).reshape(-1).double().cpu()
        neg = clean_scores[name].double()
        values = detection_measures(pos.to(weights.device), neg.to(weights.device), external_weights, weights)
        measures[name] = {k: interval(v, confidence) for k, v in values.items()}
        scores[name] = pos.float()
    return measures, scores
