"""Representation robustness measures: cosine to clean, weighted median, linear CKA, k-NN consistency.

Every function is checked against an independent reference (numpy, scikit-learn) and, for the
weighted forms, against the statistic of the data resampled by the integer count weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from medaudit import representation as rep
from medaudit.bootstrap import bootstrap_weights
from medaudit.representation import (
    DEFINITIONS,
    REPRESENTATION_MEASURES,
    cosine_to_clean,
    knn_consistency,
    knn_votes,
    linear_cka,
    representation_measures,
    weighted_median,
)


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA straight from Kornblith et al. (2019): HSIC with the centring matrix H = I - 11ᵀ/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h))

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


# ---------------------------------------------------------------------------------------------
# cosine
# ---------------------------------------------------------------------------------------------


def test_cosine_matches_numpy_and_zero_vector_is_nan():
    rng = np.random.default_rng(0)
    c, s = rng.normal(size=(40, 7)), rng.normal(size=(40, 7))
    c[3] = 0.0
    s[5] = 0.0
    got = cosine_to_clean(torch.from_numpy(c).float(), torch.from_numpy(s).float())
    assert got.dtype == torch.float64 and got.shape == (40,)
    with np.errstate(invalid="ignore"):
        want = (c * s).sum(1) / (np.linalg.norm(c, axis=1) * np.linalg.norm(s, axis=1))
    ok = np.ones(40, bool)
    ok[[3, 5]] = False
    np.testing.assert_allclose(got.numpy()[ok], want[ok], rtol=1e-6)
    assert torch.isnan(got[[3, 5]]).all()
    same = torch.from_numpy(c)
    assert torch.allclose(cosine_to_clean(same, same)[ok], torch.ones(38, dtype=torch.float64))
    with pytest.raises(ValueError):
        cosine_to_clean(same, same[:, :3])


# ---------------------------------------------------------------------------------------------
# weighted median
# ---------------------------------------------------------------------------------------------


def test_weighted_median_equals_numpy_median_of_resampled_data():
    rng = np.random.default_rng(1)
    n = 23
    values = np.round(rng.normal(size=n), 1)  # rounded: ties among the values too
    counts = rng.integers(0, 4, size=(300, n))
    counts[rng.random((300, n)) < 0.5] = 0  # sparse rows: many small totals, odd and even
    counts[0] = 0
    counts[1] = 0
    counts[1, 7] = 2
    got = weighted_median(torch.from_numpy(values), torch.from_numpy(counts).float())
    assert got.dtype == torch.float64 and got.shape == (300,)
    totals = counts.sum(1)
    assert (totals[1:] % 2 == 0).any() and (totals % 2 == 1).any()
    assert math.isnan(got[0])
    for r in range(1, 300):
        want = np.median(np.repeat(values, counts[r])) if totals[r] else np.nan
        np.testing.assert_equal(got[r].item(), want)
    # the point-estimate row is the plain median
    ones = torch.ones(1, n)
    assert weighted_median(torch.from_numpy(values), ones).item() == np.median(values)


def test_weighted_median_ignores_nan():
    rng = np.random.default_rng(2)
    values = rng.normal(size=15)
    values[[2, 9]] = np.nan
    counts = rng.integers(0, 3, size=(100, 15))
    got = weighted_median(torch.from_numpy(values), torch.from_numpy(counts).float())
    keep = ~np.isnan(values)
    for r in range(100):
        data = np.repeat(values[keep], counts[r, keep])
        want = np.median(data) if data.size else np.nan
        np.testing.assert_equal(got[r].item(), want)
    # a row that weighs only NaN values has no median
    only_nan = torch.zeros(1, 15)
    only_nan[0, 2] = 5
    assert math.isnan(weighted_median(torch.from_numpy(values), only_nan).item())
    all_nan = torch.full((4,), float("nan"))
    assert torch.isnan(weighted_median(all_nan, torch.ones(2, 4))).all()


# ---------------------------------------------------------------------------------------------
# linear CKA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d1, d2", [(30, 5, 4), (12, 40, 30)])  # feature form; Gram form (D > N)
def test_cka_matches_numpy_hsic(n, d1, d2):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, d1)) + 3.0  # a non-zero mean: centring matters
    y = x[:, :d2] @ rng.normal(size=(d2, d2)) + 0.5 * rng.normal(size=(n, d2))
    got = linear_cka(torch.from_numpy(x), torch.from_numpy(y))
    assert got.dtype == torch.float64 and got.ndim == 0
    want = numpy_cka(x, y)
    assert 0 < want < 1
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_cka_invariances_and_identity():
    torch.manual_seed(4)
    x = torch.randn(50, 6, dtype=torch.float64)
    y = x @ torch.randn(6, 6, dtype=torch.float64) + 0.3 * torch.randn(50, 6, dtype=torch.float64)
    base = linear_cka(x, y).item()
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert linear_cka(x, y @ q).item() == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, 7.5 * y).item() == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, y + 100.0).item() == pytest.approx(base, rel=1e-8)
    # a non-isotropic scaling changes it: the invariance checks above can fail
    stretch = torch.tensor([10.0, 1, 1, 1, 1, 0.1], dtype=torch.float64)
    assert abs(linear_cka(x, y * stretch).item() - base) > 1e-3


def test_cka_zero_variance_is_nan():
    torch.manual_seed(10)
    for n in (7, 20, 33):  # constants whose mean is not exact leave a rounding residue, not an exact 0
        x = torch.randn(n, 4, dtype=torch.float64)
        for const in (0.1, 0.7, 1.1, 1 / 3):
            flat = torch.full((n, 3), const, dtype=torch.float64)
            assert math.isnan(linear_cka(x, flat).item())
            assert math.isnan(linear_cka(flat, x).item())
            assert torch.isnan(linear_cka(x, flat, torch.ones(2, n))).all()
    assert math.isnan(linear_cka(torch.zeros(20, 3), torch.randn(20, 4)).item())
    x = torch.randn(20, 4, dtype=torch.float64)
    y = 2 * x + torch.randn(20, 4, dtype=torch.float64)
    w = torch.zeros(102, 20)
    for i in range(100):  # resamples that drew a single sample: no variance (a rounding residue of either sign)
        w[i, i % 20] = 7 + i
    w[101] = 1  # row 100: no weight at all
    out = linear_cka(x, y, w)
    assert torch.isnan(out[:101]).all()
    assert out[101].item() == pytest.approx(linear_cka(x, y).item(), rel=1e-10) and 0 < out[101].item() < 1


@pytest.mark.parametrize("tiny_chunks", [False, True])
def test_cka_weighted_rows_equal_cka_of_resampled_data(monkeypatch, tiny_chunks):
    if tiny_chunks:  # several Gram column blocks and row chunks
        monkeypatch.setattr(rep, "_CHUNK_ELEMENTS", 2000)
    rng = np.random.default_rng(5)
    n = 40
    x = rng.normal(size=(n, 8)) + 1.0
    y = np.tanh(x @ rng.normal(size=(8, 5))) + 0.2 * rng.normal(size=(n, 5))
    w = bootstrap_weights(n, 30, seed=3)
    got = linear_cka(torch.from_numpy(x), torch.from_numpy(y), w)
    assert got.shape == (31,) and got.dtype == torch.float64
    assert got[0].item() == pytest.approx(numpy_cka(x, y), rel=1e-10)
    assert got[0].item() == pytest.approx(linear_cka(torch.from_numpy(x), torch.from_numpy(y)).item(), rel=1e-10)
    counts = w.numpy().astype(int)
    for r in range(1, 31):
        idx = np.repeat(np.arange(n), counts[r])
        assert got[r].item() == pytest.approx(numpy_cka(x[idx], y[idx]), rel=1e-9)
    assert len(set(np.round(got.numpy(), 6))) > 20  # rows really differ


# ---------------------------------------------------------------------------------------------
# k-NN
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes, k", [(2, 5), (3, 7), (3, 4)])
def test_knn_votes_match_sklearn(n_classes, k):
    rng = np.random.default_rng(6 + n_classes + k)
    centres = rng.normal(size=(n_classes, 6))
    labels = rng.integers(0, n_classes, size=120)
    labels[:n_classes] = np.arange(n_classes)
    ref = centres[labels] + 1.2 * rng.normal(size=(120, 6))
    queries = centres[rng.integers(0, n_classes, size=300)] + 1.2 * rng.normal(size=(300, 6))
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(ref, labels)
    want = clf.predict(queries)
    got = knn_votes(torch.from_numpy(ref), torch.from_numpy(labels), torch.from_numpy(queries), k, n_classes)
    assert got.dtype == torch.int64 and got.shape == (300,)
    np.testing.assert_array_equal(got.numpy(), want)
    assert len(np.unique(want)) == n_classes


def test_knn_votes_blocks_and_k_cap(monkeypatch):
    rng = np.random.default_rng(7)
    ref, labels = rng.normal(size=(9, 3)), rng.integers(0, 2, size=9)
    queries = rng.normal(size=(25, 3))
    whole = knn_votes(torch.from_numpy(ref), torch.from_numpy(labels), torch.from_numpy(queries), 3, 2)
    monkeypatch.setattr(rep, "_QUERY_BLOCK", 4)
    assert torch.equal(knn_votes(torch.from_numpy(ref), torch.from_numpy(labels), torch.from_numpy(queries), 3, 2),
                       whole)
    # k beyond the reference: every row votes, the majority class of the reference wins
    capped = knn_votes(torch.from_numpy(ref), torch.from_numpy(labels), torch.from_numpy(queries), 50, 2)
    majority = int(np.bincount(labels, minlength=2).argmax())
    assert (capped == majority).all()


def test_knn_votes_exclude():
    # reference rows on the unit circle: row 0 (class 0) at 0°, row 1 (class 1) at 10°, row 2 (class 0) at 90°
    angles = torch.tensor([0.0, 10.0, 90.0]) * math.pi / 180
    ref = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 0])
    query = ref[:1].clone()  # identical to reference row 0
    assert knn_votes(ref, labels, query, 1, 2).item() == 0  # finds itself
    assert knn_votes(ref, labels, query, 1, 2, exclude=torch.tensor([0])).item() == 1  # must not
    assert knn_votes(ref, labels, query, 1, 2, exclude=torch.tensor([-1])).item() == 0
    # k is capped at the usable rows: with one row excluded, k = 3 counts the other two only
    labels3 = torch.tensor([0, 1, 1])
    assert knn_votes(ref, labels3, query, 3, 2).item() == 1  # 2 of 3 vote 1
    assert knn_votes(ref, labels3, query, 3, 2, exclude=torch.tensor([1])).item() == 0  # 1-1 tie -> lowest class
    assert knn_votes(ref, labels3, query, 3, 2, exclude=torch.tensor([0])).item() == 1
    with pytest.raises(ValueError):
        knn_votes(ref[:1], labels[:1], query, 1, 2, exclude=torch.tensor([0]))


def test_knn_consistency_identity_and_self_exclusion():
    rng = np.random.default_rng(8)
    emb = torch.from_numpy(rng.normal(size=(60, 5)))
    labels = torch.from_numpy(rng.integers(0, 3, size=60))
    for self_ref in (True, False):
        same = knn_consistency(emb, labels, emb, emb.clone(), 5, 3, self_reference=self_ref)
        assert same.dtype == torch.float64 and torch.equal(same, torch.ones(60, dtype=torch.float64))
    # sample 0 (class 0) at 0°, sample 1 (class 1) at 10°, sample 2 (class 0) at 90°; sample 0 shifted to 12°
    angles = torch.tensor([0.0, 10.0, 90.0]) * math.pi / 180
    clean = torch.stack([angles.cos(), angles.sin()], dim=1).double()
    shifted_angles = torch.tensor([12.0, 10.0, 90.0]) * math.pi / 180
    shifted = torch.stack([shifted_angles.cos(), shifted_angles.sin()], dim=1).double()
    lab = torch.tensor([0, 1, 0])
    # excluded: sample 0's clean and shifted embeddings both find sample 1 (class 1): consistent
    assert knn_consistency(clean, lab, clean, shifted, 1, 2, self_reference=True)[0].item() == 1.0
    # were it its own neighbour, the clean vote would be its own label 0, the shifted one 1
    assert knn_consistency(clean, lab, clean, shifted, 1, 2, self_reference=False)[0].item() == 0.0
    with pytest.raises(ValueError):
        knn_consistency(clean[:2], lab[:2], clean, shifted, 1, 2, self_reference=True)


# ---------------------------------------------------------------------------------------------
# all three with intervals
# ---------------------------------------------------------------------------------------------


def test_representation_measures_values_and_intervals():
    torch.manual_seed(9)
    n, d = 200, 16
    labels = torch.randint(0, 3, (n,))
    centres = 0.7 * torch.randn(3, d, dtype=torch.float64)
    clean = centres[labels] + torch.randn(n, d, dtype=torch.float64)
    shifted = clean + 0.6 * torch.randn(n, d, dtype=torch.float64)
    w = bootstrap_weights(n, 200, seed=0)
    out = representation_measures(clean, shifted, w, 0.95, reference=clean, reference_labels=labels, k=5,
                                  n_classes=3, self_reference=True)
    assert tuple(out) == REPRESENTATION_MEASURES and set(DEFINITIONS) == set(REPRESENTATION_MEASURES)
    for name, res in out.items():
        assert set(res) == {"value", "ci_low", "ci_high"}
        assert all(v is not None and math.isfinite(v) for v in res.values()), name
        assert res["ci_low"] <= res["value"] <= res["ci_high"], name
        assert res["ci_low"] < res["ci_high"], name
    cos = cosine_to_clean(clean, shifted)
    agree = knn_consistency(clean, labels, clean, shifted, 5, 3, self_reference=True)
    assert out["cosine"]["value"] == pytest.approx(float(np.median(cos.numpy())), rel=1e-12)
    assert out["cka"]["value"] == pytest.approx(linear_cka(clean, shifted).item(), rel=1e-10)
    assert out["knn_consistency"]["value"] == pytest.approx(agree.mean().item(), rel=1e-12)
    # moderately perturbed: clearly below the unperturbed values, clearly above nothing in common
    assert 0.5 < out["cosine"]["value"] < 0.999 and 0.5 < out["cka"]["value"] < 0.999
    assert 0.5 < out["knn_consistency"]["value"] < 1.0
    unperturbed = representation_measures(clean, clean.clone(), w, 0.95, reference=clean, reference_labels=labels,
                                          k=5, n_classes=3, self_reference=True)
    for name in REPRESENTATION_MEASURES:
        assert unperturbed[name]["value"] == pytest.approx(1.0)
