"""Cross-fitting, reference fitting and the OOD / failure-detection results of evaluate_detectors."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import Tensor

from medaudit.bootstrap import bootstrap_weights
from medaudit.detector import Detector
from medaudit.plugins.ood import MSP, Energy, Mahalanobis, Spectral
from medaudit.shift import cross_fit_halves, evaluate_detectors


class Recorder(Detector):
    """Embedding = sample index; score = sample index, asserting the sample was not in the fit set."""

    name = "recorder"
    log: ClassVar[list[tuple[frozenset[int], list[int]]]] = []

    def __init__(self) -> None:
        self.fitted: frozenset[int] | None = None

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        self.fitted = frozenset(int(v) for v in embeddings[:, 0])

    def score(self, embeddings: Tensor) -> Tensor:
        assert self.fitted is not None
        ids = [int(v) for v in embeddings[:, 0]]
        Recorder.log.append((self.fitted, ids))
        return embeddings[:, 0].double()


def _index_embeddings(s: int, n: int) -> Tensor:
    return torch.arange(n, dtype=torch.float32)[None, :, None].expand(s, n, 1).clone()


def _probs(s: int, n: int, k: int = 3, seed: int = 0) -> Tensor:
    return torch.softmax(torch.randn(s, n, k, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_cross_fitting_never_scores_a_sample_with_a_detector_fitted_on_it() -> None:
    Recorder.log.clear()
    s, n = 3, 21
    res = evaluate_detectors([Recorder()], {"recorder": _index_embeddings(s, n)}, torch.zeros(n, dtype=torch.long),
                             _probs(s, n), ["clean", "a@1", "b@1"], bootstrap_weights(n, 5, 0), 0.95, seed=7)
    # one fitted detector per half, scoring one scenario at a time
    fitted_sets = list(dict.fromkeys(f for f, _ in Recorder.log))
    assert len(fitted_sets) == 2 and len(Recorder.log) == 2 * s
    assert fitted_sets[0].isdisjoint(fitted_sets[1]) and fitted_sets[0] | fitted_sets[1] == set(range(n))
    for fitted, ids in Recorder.log:
        assert fitted.isdisjoint(ids)
        assert sorted(ids) == sorted(set(range(n)) - fitted)
    # Every scenario's sample i got exactly its own score, i.e. was scored by the same (other-half) detector.
    assert torch.equal(res.scores["recorder"], torch.arange(n, dtype=torch.float32).expand(s, n))
    a, b = cross_fit_halves(n, 7)
    assert len(a) == n // 2 and fitted_sets[0] == frozenset(a.tolist())
    assert not torch.equal(cross_fit_halves(n, 8)[0], a)  # the split follows the seed
    assert res.fitting == "cross-fitted"


def test_reference_fitting_fits_once_on_the_reference() -> None:
    Recorder.log.clear()
    s, n = 2, 10
    ref = torch.arange(100, 140, dtype=torch.float32)[:, None]
    res = evaluate_detectors([Recorder()], {"recorder": _index_embeddings(s, n)}, torch.zeros(n, dtype=torch.long),
                             _probs(s, n), ["clean", "x@2"], bootstrap_weights(n, 0, 0), 0.95, seed=0,
                             reference={"recorder": ref}, reference_labels=torch.zeros(40, dtype=torch.long))
    assert len(Recorder.log) == s  # one scoring call per scenario, all by the one fitted detector
    assert {fitted for fitted, _ in Recorder.log} == {frozenset(range(100, 140))}
    assert all(sorted(ids) == list(range(n)) for _, ids in Recorder.log)
    assert res.fitting == "reference"


def test_ood_and_failure_results_match_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    n = 80
    logits = torch.randn(n, 3, generator=g) * 3
    shifted = logits * 0.3  # less confident -> higher MSP score
    emb = torch.stack([logits, shifted])
    probs = torch.softmax(emb, dim=-1)
    labels = torch.randint(0, 3, (n,), generator=g)
    w = bootstrap_weights(n, 200, seed=1)
    res = evaluate_detectors([MSP()], {"msp": emb}, labels, probs, ["clean", "blur@3"], w, 0.9, seed=0)
    score = res.scores["msp"].double()
    torch.testing.assert_close(score[0], -probs[0].max(1).values.double(), atol=1e-6, rtol=0)
    y = np.r_[np.ones(n), np.zeros(n)]
    s = np.r_[score[1].numpy(), score[0].numpy()]
    ood = res.ood["blur@3"]["msp"]
    assert ood["auroc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert ood["aupr"]["value"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert ood["auroc"]["value"] > 0.8
    assert ood["auroc"]["ci_low"] <= ood["auroc"]["value"] <= ood["auroc"]["ci_high"]
    assert set(ood) == {"auroc", "aupr", "fpr95", "fpr95_in", "aupr_trapz"} and "clean" not in res.ood
    for i, sid in enumerate(["clean", "blur@3"]):
        wrong = (probs[i].argmax(1) != labels).numpy()
        fd = res.failure_detection[sid]["msp"]
        assert fd["value"] == pytest.approx(roc_auc_score(wrong, score[i].numpy()), abs=1e-9)


def test_skips_and_warnings() -> None:
    g = torch.Generator().manual_seed(2)
    s, n = 2, 12
    logits = torch.randn(s, n, 3, generator=g)
    probs = torch.softmax(logits, dim=-1)
    labels = torch.randint(0, 3, (n,), generator=g)
    w = bootstrap_weights(n, 3, 0)
    flat_feats = Spectral().embed(None, torch.randn(s * n, 5)).reshape(s, n, -1)  # type: ignore[arg-type]
    res = evaluate_detectors([Energy(), MSP(), Mahalanobis(), Spectral()],
                             {"energy": probs, "msp": probs, "spectral": flat_feats}, labels, probs,
                             ["clean", "noise@1"], w, 0.95, seed=0, output_kind="probabilities")
    text = "\n".join(res.warnings)
    assert "'energy' needs logits" in text
    assert "'mahalanobis' skipped (model.feature_layer is not set" in text
    assert "'spectral' skipped" in text and "spatial extent" in text
    assert list(res.scores) == ["msp"]
    torch.testing.assert_close(res.scores["msp"], -probs.max(-1).values)  # probabilities used as such
    with pytest.raises(ValueError, match="clean"):
        evaluate_detectors([MSP()], {"msp": logits}, labels, probs, ["a", "b"], w, 0.95, seed=0)
    with pytest.raises(ValueError, match=r"embeddings\['msp'\]"):
        evaluate_detectors([MSP()], {"msp": logits[:, :5]}, labels, probs, ["clean", "b"], w, 0.95, seed=0)


def test_feature_detector_end_to_end_detects_shift() -> None:
    g = torch.Generator().manual_seed(3)
    n = 120
    labels = torch.randint(0, 2, (n,), generator=g)
    clean = torch.randn(n, 6, 3, 3, generator=g) + labels[:, None, None, None] * 2.0
    shifted = clean + 3.0 * torch.randn(n, 6, 3, 3, generator=g)
    det = Mahalanobis()
    emb = torch.stack([det.embed(None, clean), det.embed(None, shifted)])  # type: ignore[arg-type]
    probs = _probs(2, n, 2)
    res = evaluate_detectors([det], {"mahalanobis": emb}, labels, probs, ["clean", "noise@5"],
                             bootstrap_weights(n, 50, 0), 0.95, seed=0)
    assert res.ood["noise@5"]["mahalanobis"]["auroc"]["value"] > 0.9
    assert res.ood["noise@5"]["mahalanobis"]["fpr95"]["value"] < 0.5
    assert det.means is None  # the caller's instance is never fitted


@pytest.mark.parametrize("with_reference", [False, True])
def test_external_set_is_scored_by_the_detectors_fitted_for_the_audit(with_reference: bool) -> None:
    from medaudit.ood_metrics import detection_measures
    from medaudit.shift import evaluate_external

    g = torch.Generator().manual_seed(4)
    n, m = 40, 15
    labels = torch.randint(0, 2, (n,), generator=g)
    clean = torch.randn(n, 5, generator=g) + labels[:, None] * 2.0
    emb = torch.stack([clean, clean + torch.randn(n, 5, generator=g)])
    external = torch.randn(m, 5, generator=g) * 3.0
    reference = torch.randn(30, 5, generator=g) if with_reference else None
    ref_labels = torch.randint(0, 2, (30,), generator=g) if with_reference else None
    w, w_ext = bootstrap_weights(n, 20, 0), bootstrap_weights(m, 20, 1)
    res = evaluate_detectors([Mahalanobis()], {"mahalanobis": emb}, labels, _probs(2, n, 2), ["clean", "noise@1"], w,
                             0.9, seed=7, reference={"mahalanobis": reference} if with_reference else None,
                             reference_labels=ref_labels)
    assert len(res.fitted["mahalanobis"]) == (1 if with_reference else 2)
    measures, scores = evaluate_external(res.fitted, {"mahalanobis": res.scores["mahalanobis"][0]},
                                         {"mahalanobis": external}, w, w_ext, 0.9)
    # by hand: the same fits (reference, or halves A/B of the seeded split, A scoring even samples)
    expected = torch.empty(m, dtype=torch.float64)
    if with_reference:
        det = Mahalanobis()
        det.fit(reference, ref_labels)
        expected[:] = det.score(external)
    else:
        for parity, half in enumerate(cross_fit_halves(n, 7)):
            det = Mahalanobis()
            det.fit(clean[half], labels[half])
            expected[parity::2] = det.score(external[parity::2])
    torch.testing.assert_close(scores["mahalanobis"], expected.float())
    ref_measures = detection_measures(expected, res.scores["mahalanobis"][0].double(), w_ext.double(), w.double())
    assert measures["mahalanobis"]["auroc"]["value"] == pytest.approx(float(ref_measures["auroc"][0]))


class Constant(Detector):
    """A broken detector: the same score for every input, or one of two values."""

    name = "constant"
    needs = "features"

    def __init__(self, levels: int = 1) -> None:
        self.levels = levels

    def score(self, embeddings: Tensor) -> Tensor:
        return (embeddings[:, 0] % self.levels).double()


@pytest.mark.parametrize("levels", [1, 2])
def test_a_constant_detector_is_skipped_loudly_never_reported_at_chance(levels: int) -> None:
    s, n = 2, 40
    res = evaluate_detectors([Constant(levels), Recorder()], {"constant": _index_embeddings(s, n),
                                                               "recorder": _index_embeddings(s, n)},
                             torch.zeros(n, dtype=torch.long), _probs(s, n), ["clean", "a@1"], bootstrap_weights(n, 5, 0),
                             0.95, seed=7, feature_layer="layer4")
    assert "constant" not in res.ood["a@1"] and "recorder" in res.ood["a@1"]
    [record] = [r for r in res.records if r.subject == "constant"]
    assert record.code == "detector-constant"
    assert f"take {levels} distinct value(s) (fewer than 10)" in record.message and "layer 'layer4'" in record.message


def test_spectral_on_1x1_maps_is_skipped_with_the_layer_explained() -> None:
    """A layer whose maps are 1×1 (a DenseNet's last block at small inputs) has one singular value
    per sample: no spectrum. The detector must be skipped with the reason, not score AUROC 0.5."""
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 30, 16, 1, 1, generator=g)
    emb = torch.stack([Spectral().embed(None, maps[i]) for i in range(2)])
    res = evaluate_detectors([Spectral()], {"spectral": emb}, torch.zeros(30, dtype=torch.long), _probs(2, 30),
                             ["clean", "a@1"], bootstrap_weights(30, 5, 0), 0.95, seed=1, feature_layer="features")
    assert res.ood.get("a@1", {}).get("spectral") is None
    [record] = res.records
    assert record.code == "detector-skipped" and "1×1" in record.message and "no spatial extent" in record.message


def test_delong_intervals_replace_the_bootstrap_ones_when_a_detector_asks() -> None:
    from medaudit.ood_metrics import delong_interval

    s, n = 2, 50
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(s, n, 4, generator=g)
    emb[1] += 0.7
    det = MSP()
    det.auroc_ci = "delong"
    probs = torch.softmax(emb[..., :3], dim=-1)
    labels = torch.randint(0, 3, (n,), generator=g)
    res = evaluate_detectors([det], {"msp": emb[..., :3]}, labels, probs, ["clean", "a@1"],
                             bootstrap_weights(n, 20, 0), 0.95, seed=1)
    scores = res.scores["msp"].double()
    assert res.ood["a@1"]["msp"]["auroc"] == pytest.approx(delong_interval(scores[1], scores[0], 0.95, paired=True))
    wrong = probs[1].argmax(-1) != labels
    assert res.failure_detection["a@1"]["msp"] == pytest.approx(delong_interval(scores[1][wrong], scores[1][~wrong], 0.95))
    assert res.auroc_ci == {"msp": "delong"}
