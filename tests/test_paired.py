"""medaudit.paired against independent references: statsmodels (McNemar, Holm), a direct
O(m n) implementation of DeLong et al. (1988) written here, scikit-learn's AUC, and hand
computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medaudit import paired
from medaudit.bootstrap import bootstrap_weights
from medaudit.paired import delong, delong_ovr, holm, mcnemar, paired_bootstrap

sm_tables = pytest.importorskip("statsmodels.stats.contingency_tables")
sm_multitest = pytest.importorskip("statsmodels.stats.multitest")


# ---------------------------------------------------------------------------------------------
# McNemar
# ---------------------------------------------------------------------------------------------


def _vectors_for(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample correctness of A and B realising a 2x2 table [[both, A only], [B only, neither]]."""
    (n11, n10), (n01, n00) = table
    a = np.array([1] * n11 + [1] * n10 + [0] * n01 + [0] * n00, dtype=bool)
    b = np.array([1] * n11 + [0] * n10 + [1] * n01 + [0] * n00, dtype=bool)
    order = np.random.default_rng(int(table.sum())).permutation(a.size)  # order must not matter
    return a[order], b[order]


def _statsmodels_mcnemar(table: np.ndarray) -> tuple[float, float]:
    res = sm_tables.mcnemar(table, exact=True)
    return float(res.statistic), float(res.pvalue)


@pytest.mark.parametrize("table", [
    *[np.random.default_rng(s).integers(0, 40, size=(2, 2)) for s in range(8)],
    np.array([[30, 0], [0, 12]]),    # b + c = 0: the models never disagree
    np.array([[10, 0], [7, 3]]),     # b = 0
    np.array([[10, 5], [0, 3]]),     # c = 0
    np.array([[0, 1], [0, 0]]),      # a single discordant sample
    np.array([[4, 6], [6, 4]]),      # b = c
    np.array([[500, 210], [260, 30]]),  # large counts
])
def test_mcnemar_matches_statsmodels_exact(table: np.ndarray) -> None:
    a, b = _vectors_for(table)
    res = mcnemar(a, b)
    stat, p = _statsmodels_mcnemar(table)
    assert (res["b"], res["c"]) == (table[0, 1], table[1, 0])
    assert res["statistic"] == stat
    assert res["p_value"] == pytest.approx(p, rel=1e-12, abs=1e-300)
    assert 0.0 <= res["p_value"] <= 1.0


def test_mcnemar_edge_cases_by_hand() -> None:
    same = np.array([1, 0, 1, 1, 0], dtype=bool)
    assert mcnemar(same, same)["p_value"] == 1.0
    # b = 0, c = 5: p = 2 * 0.5**5
    res = mcnemar([0] * 5 + [1], [1] * 5 + [1])
    assert (res["b"], res["c"], res["statistic"]) == (0, 5, 0)
    assert res["p_value"] == pytest.approx(2 * 0.5 ** 5)


def test_mcnemar_integer_weights_are_multiplicities() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random(40) < 0.7, rng.random(40) < 0.6
    w = rng.integers(0, 4, size=40)
    expanded = mcnemar(np.repeat(a, w), np.repeat(b, w))
    assert mcnemar(a, b, weights=w) == expanded
    assert mcnemar(a, b, weights=w.astype(float)) == expanded


@pytest.mark.parametrize("weights", [np.full(4, 0.5), np.array([1, -1, 1, 1]), np.array([1, np.nan, 1, 1])])
def test_mcnemar_refuses_fractional_or_negative_weights(weights: np.ndarray) -> None:
    with pytest.raises(ValueError, match="whole numbers"):
        mcnemar([1, 0, 1, 0], [0, 0, 1, 1], weights=weights)


def test_mcnemar_refuses_scores_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0.9, 0.2], [1, 0])
    with pytest.raises(ValueError, match="same samples"):
        mcnemar([1, 0, 1], [1, 0])


# ---------------------------------------------------------------------------------------------
# DeLong
# ---------------------------------------------------------------------------------------------


def _delong_reference(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """DeLong, DeLong & Clarke-Pearson (1988) straight from the definitions, O(m n).

    psi(x, y) = 1, 1/2, 0 for x >, =, < y; V10(X_i) = mean_j psi(X_i, Y_j),
    V01(Y_j) = mean_i psi(X_i, Y_j); S10, S01 the (m-1)- and (n-1)-normalised covariance
    matrices of the placements over the two models; S = S10 / m + S01 / n.
    """
    labels = np.asarray(labels, dtype=bool)
    thetas, v10s, v01s = [], [], []
    for s in (np.asarray(scores_a, float), np.asarray(scores_b, float)):
        x, y = s[labels], s[~labels]
        psi = np.zeros((x.size, y.size))
        for i in range(x.size):
            for j in range(y.size):
                psi[i, j] = 1.0 if x[i] > y[j] else (0.5 if x[i] == y[j] else 0.0)
        thetas.append(psi.mean())
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
    m, n = v10s[0].size, v01s[0].size

    def cov(u: np.ndarray, v: np.ndarray, tu: float, tv: float, k: int) -> float:
        return float(sum((u[i] - tu) * (v[i] - tv) for i in range(k)) / (k - 1))

    s = np.empty((2, 2))
    for k in range(2):
        for l in range(2):
            s[k, l] = (cov(v10s[k], v10s[l], thetas[k], thetas[l], m) / m
                       + cov(v01s[k], v01s[l], thetas[k], thetas[l], n) / n)
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    z = (thetas[1] - thetas[0]) / math.sqrt(var)
    return {"auc_a": thetas[0], "auc_b": thetas[1], "se": math.sqrt(var), "z": z,
            "p_value": math.erfc(abs(z) / math.sqrt(2))}


def _tied_data(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated scores of two models, rounded to 1 decimal so that many ties occur, within
    and across classes."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    y[:2], y[2:4] = True, False
    latent = rng.normal(size=n) + 1.0 * y
    a = np.round(latent + rng.normal(scale=0.8, size=n), 1)
    b = np.round(latent + rng.normal(scale=0.5, size=n) + 0.3 * y, 1)
    return a, b, y.astype(int)


@pytest.mark.parametrize("seed", range(6))
def test_delong_matches_the_direct_definition_with_ties(seed: int) -> None:
    a, b, y = _tied_data(seed)
    assert len(np.unique(a)) < a.size / 2  # the data really has ties
    res, ref = delong(a, b, y), _delong_reference(a, b, y)
    for key in ("auc_a", "auc_b", "se", "z", "p_value"):
        assert res[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert res["difference"] == pytest.approx(ref["auc_b"] - ref["auc_a"], abs=1e-12)
    assert "reason" not in res


@pytest.mark.parametrize("seed", range(4))
def test_delong_aucs_are_sklearn_aucs(seed: int) -> None:
    a, b, y = _tied_data(seed, n=300)
    res = delong(a, b, y)
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert res["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)


def test_delong_by_hand() -> None:
    # positives A = (0.8, 0.4), negatives A = (0.6, 0.2): AUC 3/4, V10 = (1, 1/2), V01 = (1/2, 1)
    # positives B = (0.9, 0.7), negatives B = (0.7, 0.1), one tie: AUC 7/8, V10 = (1, 3/4), V01 = (3/4, 1)
    # S10 = S01 = [[1/8, 1/16], [1/16, 1/32]], S = (S10 + S01) / 2 = S10
    # var = 1/8 + 1/32 - 2/16 = 1/32; z = (1/8) / sqrt(1/32) = 1/sqrt(2); p = erfc(1/2)
    y = np.array([0, 1, 0, 1])
    a = np.array([0.6, 0.8, 0.2, 0.4])
    b = np.array([0.7, 0.9, 0.1, 0.7])
    res = delong(a, b, y)
    assert res["auc_a"] == pytest.approx(0.75)
    assert res["auc_b"] == pytest.approx(0.875)
    assert res["difference"] == pytest.approx(0.125)
    assert res["se"] == pytest.approx(math.sqrt(1 / 32))
    assert res["z"] == pytest.approx(1 / math.sqrt(2))
    assert res["p_value"] == pytest.approx(math.erfc(0.5))
    # swapping the models flips the sign only
    swapped = delong(b, a, y)
    assert swapped["z"] == pytest.approx(-res["z"]) and swapped["p_value"] == pytest.approx(res["p_value"])


def test_delong_detects_a_better_model() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.5
    latent = rng.normal(size=y.size)
    a = latent + 0.5 * y + rng.normal(size=y.size)
    b = latent + 1.5 * y + rng.normal(size=y.size) * 0.5
    res = delong(a, b, y)
    assert res["difference"] > 0.1 and res["p_value"] < 1e-10


def test_delong_degenerate_cases_return_none_with_a_reason() -> None:
    one_class = delong([0.1, 0.5, 0.9], [0.2, 0.3, 0.4], [1, 1, 1])
    assert one_class["p_value"] is None and one_class["auc_a"] is None and "one class" in one_class["reason"]

    single_positive = delong([0.1, 0.5, 0.9], [0.2, 0.3, 0.4], [0, 0, 1])
    assert single_positive["p_value"] is None and single_positive["auc_a"] == 1.0
    assert "at least two" in single_positive["reason"]

    s = np.random.default_rng(1).random(50)
    y = np.arange(50) % 2
    same = delong(s, s, y)
    assert same["p_value"] is None and same["se"] == 0.0 and "zero" in same["reason"]
    assert same["difference"] == 0.0

    # both separate perfectly, with different scores: AUC 1 each, no variance
    perfect = delong(y + 0.1 * s, 2 * y - 0.1 * s, y)
    assert perfect["auc_a"] == perfect["auc_b"] == 1.0 and perfect["p_value"] is None and "reason" in perfect

    # a monotone transform of the scores keeps the ranking: no difference to test
    monotone = delong(s, np.exp(3 * s), y)
    assert monotone["p_value"] is None

    for res in (one_class, single_positive, same, perfect, monotone):
        assert not any(isinstance(v, float) and math.isnan(v) for v in res.values())


def test_delong_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        delong([0.1, np.nan, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        delong([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="same samples"):
        delong([0.1, 0.2, 0.3], [0.1, 0.2], [0, 1, 0])


def test_delong_ovr_is_delong_per_class() -> None:
    rng = np.random.default_rng(5)
    n, k = 200, 3
    y = rng.integers(0, k, size=n)
    logits_a = rng.normal(size=(n, k)) + 1.0 * np.eye(k)[y]
    logits_b = logits_a + rng.normal(scale=0.7, size=(n, k)) + 0.5 * np.eye(k)[y]
    pa = np.exp(logits_a) / np.exp(logits_a).sum(1, keepdims=True)
    pb = np.exp(logits_b) / np.exp(logits_b).sum(1, keepdims=True)
    res = delong_ovr(pa, pb, y, k)
    assert sorted(res) == [0, 1, 2]
    for c in range(k):
        ref = _delong_reference(pa[:, c], pb[:, c], (y == c).astype(int))
        assert res[c]["p_value"] == pytest.approx(ref["p_value"], rel=1e-9)
        assert res[c]["auc_a"] == pytest.approx(roc_auc_score(y == c, pa[:, c]))
    # the caller's multiplicity correction accepts the per-class p-values as they are
    assert len(holm([r["p_value"] for r in res.values()])) == k


def test_delong_ovr_absent_class_and_bad_labels() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=30)  # class 2 never occurs
    p = rng.random((30, 3))
    res = delong_ovr(p, p[::-1].copy(), y, 3)
    assert res[2]["p_value"] is None and "one class" in res[2]["reason"]
    assert res[0]["p_value"] is not None
    with pytest.raises(ValueError, match="class indices"):
        delong_ovr(p, p, np.full(30, 3), 3)
    with pytest.raises(ValueError, match="shape"):
        delong_ovr(p, p, y, 4)


# ---------------------------------------------------------------------------------------------
# Paired bootstrap
# ---------------------------------------------------------------------------------------------


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == labels))


def mean_gain(values: np.ndarray, labels: np.ndarray) -> float:
    """Mean of a per-sample score (labels unused): isolates the effect of pairing."""
    return float(np.mean(values))


def _classifier_outputs(seed: int, n: int, flip_a: float, flip_b: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    pred_a = np.where(rng.random(n) < flip_a, 1 - y, y)
    pred_b = np.where(rng.random(n) < flip_b, 1 - y, y)
    return np.eye(2)[pred_a], np.eye(2)[pred_b], y


def test_paired_bootstrap_is_deterministic_for_a_seed() -> None:
    a, b, y = _classifier_outputs(0, 150, 0.3, 0.25)
    first = paired_bootstrap(accuracy, a, b, y, n_resamples=300, seed=7)
    assert first == paired_bootstrap(accuracy, a, b, y, n_resamples=300, seed=7)
    assert first != paired_bootstrap(accuracy, a, b, y, n_resamples=300, seed=8)
    assert first["difference"] == pytest.approx(accuracy(b, y) - accuracy(a, y))
    assert first["n_used"] == 300


def test_identical_models_differ_by_nothing() -> None:
    a, _, y = _classifier_outputs(1, 100, 0.3, 0.3)
    res = paired_bootstrap(accuracy, a, a.copy(), y, n_resamples=500, seed=0)
    assert res["difference"] == 0.0 and res["ci_low"] == 0.0 and res["ci_high"] == 0.0
    assert res["p_value"] == 1.0


def test_clearly_better_model_is_detected() -> None:
    a, b, y = _classifier_outputs(2, 400, 0.35, 0.05)
    res = paired_bootstrap(accuracy, a, b, y, n_resamples=1000, seed=0)
    assert res["difference"] > 0.2
    assert 0.0 < res["ci_low"] <= res["difference"] <= res["ci_high"]
    assert res["p_value"] < 0.01
    # and the other way round: B worse than A, the interval lies below 0
    rev = paired_bootstrap(accuracy, b, a, y, n_resamples=1000, seed=0)
    assert rev["ci_high"] < 0.0 and rev["p_value"] < 0.01


def test_p_value_is_twice_the_smaller_tail_share() -> None:
    # a small difference whose bootstrap distribution straddles 0: recompute p from the very
    # same draws (same seed, same index sets) by hand
    a, b, y = _classifier_outputs(3, 80, 0.3, 0.27)
    res = paired_bootstrap(accuracy, a, b, y, n_resamples=400, seed=11, confidence=0.9)
    counts = bootstrap_weights(80, 400, 11).numpy().astype(int)  # the audit's resamples for seed 11
    diffs = []
    for r in range(1, 401):
        idx = np.repeat(np.arange(80), counts[r])
        diffs.append(accuracy(b[idx], y[idx]) - accuracy(a[idx], y[idx]))
    diffs = np.array(diffs)
    expected = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    assert 0.0 < expected < 1.0  # the case really has both tails
    assert res["p_value"] == pytest.approx(expected)
    assert res["ci_low"] == pytest.approx(np.quantile(diffs, 0.05))
    assert res["ci_high"] == pytest.approx(np.quantile(diffs, 0.95))


def test_pairing_matters() -> None:
    # B improves every sample by the same small amount; samples differ hugely from each other.
    # Paired, the difference is 0.05 on every resample; unpaired, the between-sample spread
    # swamps it.
    rng = np.random.default_rng(4)
    a = rng.normal(scale=5.0, size=200)
    b = a + 0.05 + rng.normal(scale=0.01, size=200)
    y = np.zeros(200)
    res = paired_bootstrap(mean_gain, a, b, y, n_resamples=1000, seed=0)
    assert res["ci_low"] > 0.0 and res["p_value"] == 0.0

    # the unpaired bootstrap (independent index sets for the two models) on the same data
    unpaired = np.empty(1000)
    for r in range(1000):
        ia, ib = rng.integers(0, 200, size=200), rng.integers(0, 200, size=200)
        unpaired[r] = mean_gain(b[ib], y[ib]) - mean_gain(a[ia], y[ia])
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert low < 0.0 < high


def test_nan_resamples_are_dropped() -> None:
    def auc(scores: np.ndarray, labels: np.ndarray) -> float:
        return float("nan") if len(np.unique(labels)) < 2 else float(roc_auc_score(labels, scores))

    # 1 positive in 6: about a third of the resamples (5/6)^6 miss it and have no AUC
    y = np.array([1, 0, 0, 0, 0, 0])
    a = np.array([0.6, 0.1, 0.7, 0.3, 0.2, 0.4])
    b = np.array([0.9, 0.1, 0.7, 0.3, 0.2, 0.4])
    res = paired_bootstrap(auc, a, b, y, n_resamples=600, seed=3)
    assert 300 < res["n_used"] < 500
    assert res["p_value"] is not None and not math.isnan(res["ci_low"]) and not math.isnan(res["ci_high"])

    never = paired_bootstrap(lambda p, l: float("nan"), a, b, y, n_resamples=10, seed=0)
    assert never["difference"] is None and never["p_value"] is None and "reason" in never


def test_paired_bootstrap_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="first dimension"):
        paired_bootstrap(mean_gain, np.zeros(5), np.zeros(4), np.zeros(5), n_resamples=10, seed=0)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap(mean_gain, np.zeros(5), np.zeros(5), np.zeros(5), n_resamples=0, seed=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(mean_gain, np.zeros(5), np.zeros(5), np.zeros(5), n_resamples=10, seed=0, confidence=95)


# ---------------------------------------------------------------------------------------------
# Holm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_holm_matches_statsmodels_with_none_entries(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = list(rng.random(12) ** 3)
    raw[3] = raw[7]                                 # a tie
    raw[5] = 0.0
    with_none: list[float | None] = list(raw)
    for i in rng.choice(12, size=3, replace=False):
        with_none[i] = None
    defined = [p for p in with_none if p is not None]
    expected = iter(sm_multitest.multipletests(defined, method="holm")[1])
    got = holm(with_none)
    for g, p in zip(got, with_none):
        if p is None:
            assert g is None
        else:
            assert g == pytest.approx(next(expected), rel=1e-12, abs=0)


def test_holm_edge_cases() -> None:
    assert holm([]) == []
    assert holm([None, None]) == [None, None]
    assert holm([0.2]) == [0.2]
    with pytest.raises(ValueError, match="None"):
        holm([0.1, float("nan")])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


def test_holm_has_one_implementation() -> None:
    # the subgroup plugin re-exports the core function instead of keeping a copy
    import medaudit.plugins.subgroups as sg
    from medaudit.plugins.subgroups import permutations

    assert permutations.holm is paired.holm and sg.holm is paired.holm
