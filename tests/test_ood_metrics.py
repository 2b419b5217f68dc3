"""AUROC / AUPR / FPR95 against scikit-learn, including ties and bootstrap-count weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from medaudit import bootstrap
from medaudit.bootstrap import bootstrap_weights
from medaudit.ood_metrics import aupr, auroc, fpr95, fpr_at_tpr


def _sk_fpr95(pos: np.ndarray, neg: np.ndarray, tpr: float = 0.95) -> float:
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    fpr, tprs, _ = roc_curve(y, np.r_[pos, neg], drop_intermediate=False)
    return float(fpr[np.argmax(tprs >= tpr)])


def _sk(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float, float]:
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    return roc_auc_score(y, s), average_precision_score(y, s), _sk_fpr95(pos, neg)


def _ones(n: int) -> torch.Tensor:
    return torch.ones(1, n)


@pytest.mark.parametrize("tied", [False, True])
def test_point_estimates_match_sklearn(tied: bool) -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(150, generator=g) + 0.8
    neg = torch.randn(230, generator=g)
    if tied:  # coarse scores: many ties within and across the two sides
        pos, neg = torch.round(pos * 2) / 2, torch.round(neg * 2) / 2
    a, p, f = _sk(pos.numpy(), neg.numpy())
    assert float(auroc(pos, neg, _ones(150), _ones(230))[0]) == pytest.approx(a, abs=1e-12)
    assert float(aupr(pos, neg, _ones(150), _ones(230))[0]) == pytest.approx(p, abs=1e-12)
    assert float(fpr95(pos, neg, _ones(150), _ones(230))[0]) == pytest.approx(f, abs=1e-12)


def test_all_tied_scores() -> None:
    pos, neg = torch.zeros(10), torch.zeros(7)
    assert float(auroc(pos, neg, _ones(10), _ones(7))[0]) == pytest.approx(0.5)
    assert float(aupr(pos, neg, _ones(10), _ones(7))[0]) == pytest.approx(10 / 17)
    assert float(fpr95(pos, neg, _ones(10), _ones(7))[0]) == pytest.approx(1.0)


def test_hand_computed_example() -> None:
    # pos {3, 1}, neg {2, 0}: pairs (3>2, 3>0, 1<2, 1>0) -> AUROC 3/4.
    pos, neg = torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0])
    assert float(auroc(pos, neg, _ones(2), _ones(2))[0]) == pytest.approx(0.75)
    # thresholds 3: P=1 R=.5; 2: P=.5; 1: P=2/3 R=1 -> AP = .5*1 + .5*2/3
    assert float(aupr(pos, neg, _ones(2), _ones(2))[0]) == pytest.approx(0.5 + 1 / 3)
    # TPR >= .95 needs threshold 1, where one of two negatives (2.0) is flagged.
    assert float(fpr95(pos, neg, _ones(2), _ones(2))[0]) == pytest.approx(0.5)


def test_bootstrap_counts_equal_explicit_resampling() -> None:
    """Paired rows: pos i and neg i are the same sample, so the same count row weights both."""
    g = torch.Generator().manual_seed(1)
    n = 60
    neg = torch.round(torch.randn(n, generator=g) * 3) / 3
    pos = torch.round((neg + torch.randn(n, generator=g) * 0.7 + 0.5) * 3) / 3
    w = bootstrap_weights(n, 25, seed=3)
    got = {f.__name__: f(pos, neg, w, w) for f in (auroc, aupr, fpr95)}
    for r in range(1, w.shape[0]):
        idx = np.repeat(np.arange(n), w[r].numpy().astype(int))
        a, p, f = _sk(pos.numpy()[idx], neg.numpy()[idx])
        assert float(got["auroc"][r]) == pytest.approx(a, abs=1e-12)
        assert float(got["aupr"][r]) == pytest.approx(p, abs=1e-12)
        assert float(got["fpr95"][r]) == pytest.approx(f, abs=1e-12)


def test_fractional_weights_match_sklearn_sample_weight() -> None:
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(40, generator=g) + 1, torch.randn(50, generator=g)
    wp, wn = torch.rand(1, 40, generator=g), torch.rand(1, 50, generator=g)
    y = np.r_[np.ones(40), np.zeros(50)]
    s = np.r_[pos.numpy(), neg.numpy()]
    sw = np.r_[wp[0].numpy(), wn[0].numpy()].astype(np.float64)
    assert float(auroc(pos, neg, wp, wn)[0]) == pytest.approx(roc_auc_score(y, s, sample_weight=sw), abs=1e-9)
    assert float(aupr(pos, neg, wp, wn)[0]) == pytest.approx(average_precision_score(y, s, sample_weight=sw), abs=1e-9)


def test_other_tpr_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", 50)  # force several row chunks
    g = torch.Generator().manual_seed(4)
    pos, neg = torch.randn(30, generator=g) + 0.5, torch.randn(30, generator=g)
    w = bootstrap_weights(30, 9, seed=0)
    values = fpr_at_tpr(pos, neg, w, w, tpr=0.8)
    assert values.shape == (10,)
    assert float(values[0]) == pytest.approx(_sk_fpr95(pos.numpy(), neg.numpy(), 0.8))


def test_zero_weight_side_is_nan_and_bad_input_raises() -> None:
    pos, neg = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5])
    w = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert torch.isnan(auroc(pos, neg, w, torch.ones(2, 2))[1])
    assert torch.isnan(aupr(pos, neg, w, torch.ones(2, 2))[1])
    assert torch.isnan(fpr95(pos, neg, w, torch.ones(2, 2))[1])
    with pytest.raises(ValueError, match="w_pos must be"):
        auroc(pos, neg, torch.ones(1, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan"), 1.0]), neg, torch.ones(1, 2), torch.ones(1, 2))


@pytest.mark.parametrize("chunk", [None, 3000])
def test_several_positive_sets_equal_separate_calls_and_sklearn(chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """detection_measures on [S, Npos] (scenarios against one clean set) gives each set's own
    results, with ties inside and across sets, bootstrap rows, and row chunks."""
    from medaudit.ood_metrics import detection_measures

    if chunk is not None:
        monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(5)
    neg = torch.randint(0, 40, (150,), generator=g).double()
    pos = torch.stack([torch.randint(lo, lo + 40, (150,), generator=g).double() for lo in (0, 5, 20, 60)])
    w = bootstrap_weights(150, 30, 1).double()
    together = detection_measures(pos, neg, w, w)
    for s in range(pos.shape[0]):
        alone = detection_measures(pos[s], neg, w, w)
        for key in ("auroc", "aupr", "fpr95"):
            assert together[key].shape == (4, 31)
            torch.testing.assert_close(together[key][s], alone[key], rtol=1e-12, atol=1e-12, equal_nan=True)
        reference = _sk(pos[s].numpy(), neg.numpy())
        for key, value in zip(("auroc", "aupr", "fpr95"), reference):
            assert together[key][s, 0].item() == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("chunk", [None, 500])
def test_auroc_within_sets_equals_auroc_of_the_split(chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failure-detection AUROC of several scenarios at once (positives = a mask within each set)
    equals auroc() on the explicitly split scores and weights, with ties, bootstrap rows (some
    leaving a side empty: NaN) and row chunks; and sklearn on the point row."""
    from medaudit.ood_metrics import auroc_within

    if chunk is not None:
        monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(8)
    scores = torch.randint(0, 12, (3, 40), generator=g).double()
    positive = torch.rand(3, 40, generator=g) < torch.tensor([[0.3], [0.5], [0.0]])
    positive[2, :2] = True  # two positives: some resamples leave that side empty
    w = bootstrap_weights(40, 25, 2).double()
    got = auroc_within(scores, positive, w)
    assert got.shape == (3, 26)
    for s in range(3):
        p = positive[s]
        want = auroc(scores[s][p], scores[s][~p], w[:, p], w[:, ~p])
        torch.testing.assert_close(got[s], want, rtol=1e-12, atol=1e-12, equal_nan=True)
        y = p.numpy().astype(int)
        assert got[s, 0].item() == pytest.approx(roc_auc_score(y, scores[s].numpy()), abs=1e-12)
    assert torch.isnan(got[2]).any() and not torch.isnan(got[2]).all()


def _sk_weighted(pos: np.ndarray, neg: np.ndarray, wp: np.ndarray, wn: np.ndarray) -> tuple[float, float, float]:
    y, s, w = np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg], np.r_[wp, wn]
    fpr, tprs, _ = roc_curve(y, s, sample_weight=w, drop_intermediate=False)
    return (roc_auc_score(y, s, sample_weight=w), average_precision_score(y, s, sample_weight=w),
            float(fpr[np.argmax(tprs >= 0.95 - 1e-12)]))


@pytest.mark.parametrize("ties", ["none", "within", "across", "both"])
def test_each_tie_structure_matches_weighted_sklearn(ties: str) -> None:
    """Ties are handled sparsely (only the positives that tie a negative get AUROC's half credit,
    the tie-group ends only when positives tie each other): every combination, on bootstrap rows,
    against scikit-learn with the same sample weights."""
    from medaudit.ood_metrics import detection_measures

    g = torch.Generator().manual_seed(11)
    neg = torch.randn(120, generator=g).double()
    pos = torch.randn(3, 90, generator=g).double() + torch.tensor([[0.0], [0.7], [2.0]])
    if ties in ("within", "both"):  # repeat positives within each set
        pos[:, 1::3] = pos[:, 0::3][:, : pos[:, 1::3].shape[1]]
    if ties in ("across", "both"):  # some positives equal a negative exactly
        pos[:, 5:60:7] = neg[torch.arange(5, 60, 7) % 120]
    w = bootstrap_weights(90, 12, 3).double()[:, :90]
    wn = bootstrap_weights(120, 12, 4).double()
    got = detection_measures(pos, neg, w, wn)
    for s in range(3):
        for r in range(w.shape[0]):
            want = _sk_weighted(pos[s].numpy(), neg.numpy(), w[r].numpy(), wn[r].numpy())
            for key, value in zip(("auroc", "aupr", "fpr95"), want):
                assert got[key][s, r].item() == pytest.approx(value, abs=1e-12), (key, s, r)


@pytest.mark.parametrize("ties", ["none", "few", "many"])
def test_auroc_within_with_and_without_ties_matches_weighted_sklearn(ties: str) -> None:
    """Tie groups get a sparse correction: none, a few (one set only, a group at the lowest
    score included) and many (coarse scores) all match scikit-learn."""
    from medaudit.ood_metrics import auroc_within

    g = torch.Generator().manual_seed(12)
    scores = torch.randn(2, 200, generator=g).double()
    if ties == "few":
        lowest = int(scores[1].argmin())
        scores[1, [3, 7, 11]] = scores[1, 5].item()
        scores[1, [0, 1]] = scores[1, lowest].item()
    elif ties == "many":
        scores = torch.round(scores * 3) / 3
    positive = torch.rand(2, 200, generator=g) < 0.3
    w = bootstrap_weights(200, 10, 5).double()
    got = auroc_within(scores, positive, w)
    for s in range(2):
        y = positive[s].numpy().astype(int)
        for r in range(w.shape[0]):
            want = roc_auc_score(y, scores[s].numpy(), sample_weight=w[r].numpy())
            assert got[s, r].item() == pytest.approx(want, abs=1e-12)


def _sk_trapz(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray | None = None, w_neg: np.ndarray | None = None) -> float:
    from sklearn.metrics import auc, precision_recall_curve

    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    w = None if w_pos is None else np.r_[w_pos, w_neg]
    precision, recall, _ = precision_recall_curve(y, np.r_[pos, neg], sample_weight=w)
    return float(auc(recall, precision))


def _sk_fpr95_in(pos: np.ndarray, neg: np.ndarray) -> float:
    """ODIN's convention: clean (neg) is the positive class, scored by −s; FPR at 95 % TPR."""
    y = np.r_[np.ones(len(neg)), np.zeros(len(pos))]
    fpr, tpr, _ = roc_curve(y, -np.r_[neg, pos], drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


@pytest.mark.parametrize("ties", ["none", "coarse", "all"])
def test_aupr_trapz_and_fpr95_in_match_sklearn(ties: str) -> None:
    from medaudit.ood_metrics import aupr_trapz, detection_measures, fpr95_in

    g = torch.Generator().manual_seed(4)
    pos, neg = torch.randn(120, generator=g) + 1.0, torch.randn(170, generator=g)
    if ties == "coarse":
        pos, neg = torch.round(pos * 2) / 2, torch.round(neg * 2) / 2
    elif ties == "all":
        pos, neg = torch.zeros(120), torch.zeros(170)
    p, n = pos.double().numpy(), neg.double().numpy()
    assert float(aupr_trapz(pos, neg, _ones(120), _ones(170))[0]) == pytest.approx(_sk_trapz(p, n), abs=1e-12)
    assert float(fpr95_in(pos, neg, _ones(120), _ones(170))[0]) == pytest.approx(_sk_fpr95_in(p, n), abs=1e-12)
    # bootstrap counts equal the explicitly resampled sets (one weight row shared, paired)
    w = bootstrap_weights(120, 3, 1)[1:]
    wn = bootstrap_weights(170, 3, 2)[1:]
    got = aupr_trapz(pos, neg, w, wn)
    for r in range(3):
        rp, rn = np.repeat(p, w[r].long().numpy()), np.repeat(n, wn[r].long().numpy())
        assert float(got[r]) == pytest.approx(_sk_trapz(rp, rn), abs=1e-12)
        assert float(fpr95_in(pos, neg, w[r:r + 1], wn[r:r + 1])[0]) == pytest.approx(_sk_fpr95_in(rp, rn), abs=1e-12)
    # several scenarios at once, as the audit calls it
    sets = torch.stack([pos, pos - 0.5])
    both = detection_measures(sets, neg, _ones(120), _ones(170))
    for j in range(2):
        assert float(both["aupr_trapz"][j, 0]) == pytest.approx(_sk_trapz(sets[j].double().numpy(), n), abs=1e-12)
        assert float(both["fpr95_in"][j, 0]) == pytest.approx(_sk_fpr95_in(sets[j].double().numpy(), n), abs=1e-12)


def test_aupr_trapz_with_fractional_weights_matches_sklearn_sample_weight() -> None:
    from medaudit.ood_metrics import aupr_trapz

    g = torch.Generator().manual_seed(5)
    pos, neg = torch.round(torch.randn(40, generator=g) * 2) / 2 + 0.5, torch.round(torch.randn(60, generator=g) * 2) / 2
    wp, wn = torch.rand(1, 40, generator=g), torch.rand(1, 60, generator=g)
    wp[0, :3] = 0  # zero-weight positives add thresholds but no recall
    expected = _sk_trapz(pos.double().numpy(), neg.double().numpy(), wp[0].double().numpy(), wn[0].double().numpy())
    assert float(aupr_trapz(pos, neg, wp, wn)[0]) == pytest.approx(expected, abs=1e-9)


def _naive_delong(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) from the definitions, O(m·n): ψ(x, y) = 1[x > y] + ½ 1[x = y],
    V10_i = mean_j ψ(x_i, y_j), V01_j = mean_i ψ(x_i, y_j), Var = S10/m + S01/n."""
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(psi.mean()), float(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


@pytest.mark.parametrize("tied", [False, True])
def test_delong_interval_equals_the_definition(tied: bool) -> None:
    from scipy.stats import norm

    from medaudit.ood_metrics import delong_interval

    g = torch.Generator().manual_seed(6)
    pos, neg = torch.randn(70, generator=g) + 0.7, torch.randn(90, generator=g)
    if tied:
        pos, neg = torch.round(pos), torch.round(neg)
    auc, var = _naive_delong(pos.double().numpy(), neg.double().numpy())
    got = delong_interval(pos, neg, 0.9)
    half = norm.ppf(0.95) * np.sqrt(var)
    assert got["value"] == pytest.approx(auc, abs=1e-12)
    assert got["ci_low"] == pytest.approx(auc - half, abs=1e-12) and got["ci_high"] == pytest.approx(auc + half, abs=1e-12)
    assert got["value"] == pytest.approx(roc_auc_score(np.r_[np.ones(70), np.zeros(90)], np.r_[pos, neg]), abs=1e-12)


def test_paired_delong_covers_the_true_auroc_of_correlated_pairs() -> None:
    """Clean and shifted scores of the same inputs are correlated; the paired variance accounts for
    it. Over 300 simulated audits its 95 % interval covers the true AUROC about 95 % of the time,
    where the unpaired formula (which ignores the correlation) over-covers."""
    from scipy.stats import norm

    from medaudit.ood_metrics import delong_interval

    rho, shift, n = 0.8, 0.5, 60
    # shifted ~ N(shift, 1) and clean ~ N(0, 1): P(shifted_i > clean_j) for the n² − n pairs i ≠ j
    truth = float(norm.cdf(shift / np.sqrt(2)))
    rng = np.random.default_rng(0)
    hits_paired = hits_unpaired = 0
    for _ in range(300):
        clean = rng.normal(size=n)
        shifted = rho * clean + np.sqrt(1 - rho ** 2) * rng.normal(size=n) + shift
        p = delong_interval(torch.from_numpy(shifted), torch.from_numpy(clean), 0.95, paired=True)
        u = delong_interval(torch.from_numpy(shifted), torch.from_numpy(clean), 0.95)
        hits_paired += p["ci_low"] <= truth <= p["ci_high"]
        hits_unpaired += u["ci_low"] <= truth <= u["ci_high"]
    assert 0.90 <= hits_paired / 300 <= 0.99
    assert hits_unpaired > hits_paired  # wider: the positive correlation between the pairs is ignored


def test_flagged_share_by_hand_and_on_resamples() -> None:
    """The threshold lets 95 % of the clean inputs through; the share is of the errors above it."""
    from medaudit.ood_metrics import flagged_share

    clean = torch.arange(1.0, 21.0)  # 20 clean scores 1..20: 95 % pass at t = 19, so only > 19 is flagged
    scores = torch.tensor([[5.0, 19.0, 19.5, 25.0, 30.0, 1.0] + [0.0] * 14])
    wrong = torch.tensor([[True, True, True, True, False, False] + [False] * 14])
    got = flagged_share(scores, wrong, clean, torch.ones(1, 20))
    assert float(got[0, 0]) == pytest.approx(2 / 4)  # 19.5 and 25 of the errors 5, 19, 19.5, 25
    # a weight row equals the explicitly resampled data
    g = torch.Generator().manual_seed(2)
    clean, shifted = torch.randn(50, generator=g), torch.randn(50, generator=g) + 1
    wrong = torch.rand(50, generator=g) < 0.4
    w = bootstrap_weights(50, 3, 5)
    rows = flagged_share(shifted[None], wrong[None], clean, w)[0]
    for r in range(4):
        idx = np.repeat(np.arange(50), w[r].long().numpy())
        c = np.sort(clean.numpy()[idx])
        t = c[int(np.ceil(0.95 * len(c))) - 1]  # the smallest clean score with 95 % at or below it
        errs = wrong.numpy()[idx]
        expected = (shifted.numpy()[idx][errs] > t).mean()
        assert float(rows[r]) == pytest.approx(expected, abs=1e-12)
