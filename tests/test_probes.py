"""Linear and k-NN probes on reference embeddings: checked against scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medaudit import probes
from medaudit.probes import PROBE_MAX_ITER, fit_knn_probe, fit_linear_probe, probe_record

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def embeddings(n_classes: int, n: int = 300, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy, non-separable classes in dimensions whose scales span five orders of magnitude.

    A probe that skipped the standardisation would fit the raw dimensions and give other
    probabilities than scikit-learn's pipeline.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centres = rng.normal(size=(n_classes, dim))
    z = centres[y] + 1.5 * rng.normal(size=(n, dim))
    scales = np.logspace(-2, 3, dim)
    return z * scales + rng.normal(size=dim) * scales, y


def sklearn_pipeline(x: np.ndarray, y: np.ndarray, C: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, random_state=0)).fit(x, y)


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("C", [1.0, 0.05])
def test_linear_probe_matches_sklearn_pipeline(n_classes: int, C: float) -> None:
    x, y = embeddings(n_classes, n=500)
    x, y, x_test, y_test = x[:300], y[:300], x[300:], y[300:]  # one distribution, held-out test rows
    assert x.std(0).max() / x.std(0).min() > 1e4  # the standardisation matters
    reference = sklearn_pipeline(x, y, C)

    probe = fit_linear_probe(x, y, n_classes, C=C)
    probs = probe.probabilities(torch.from_numpy(x_test))

    assert probs.shape == (200, n_classes)
    np.testing.assert_allclose(probs.double().numpy(), reference.predict_proba(x_test), atol=1e-6, rtol=0)
    accuracy = (probs.argmax(1).numpy() == y_test).mean()
    assert accuracy == reference.score(x_test, y_test)
    assert probe.C == C and probe.converged and 0 < probe.n_iter < PROBE_MAX_ITER
    assert probe.mean.dtype == probe.scale.dtype == probe.coef.dtype == probe.intercept.dtype == torch.float64
    np.testing.assert_allclose(probe.scale.numpy(), x.std(0))  # population std


def test_binary_probe_is_a_softmax_over_zero_and_sklearn_logit() -> None:
    x, y = embeddings(2)
    probe = fit_linear_probe(torch.from_numpy(x).float(), torch.from_numpy(y), 2)  # tensors accepted
    lr = sklearn_pipeline(x.astype(np.float32).astype(np.float64), y, 1.0)[-1]
    assert probe.coef.shape == (2, x.shape[1]) and probe.intercept.shape == (2,)
    assert torch.all(probe.coef[0] == 0) and probe.intercept[0] == 0
    np.testing.assert_allclose(probe.coef[1].numpy(), lr.coef_[0], rtol=1e-6)
    np.testing.assert_allclose(probe.intercept[1].item(), lr.intercept_[0], rtol=1e-6)


def test_constant_dimension_gets_scale_one() -> None:
    x, y = embeddings(3)
    x[:, 2] = 3.7
    probe = fit_linear_probe(x, y, 3)
    assert probe.scale[2].item() == 1.0
    probs = probe.probabilities(torch.from_numpy(x))
    assert torch.isfinite(probs).all()
    np.testing.assert_allclose(probs.double().numpy(), sklearn_pipeline(x, y, 1.0).predict_proba(x), atol=1e-6)


def test_linear_probe_standardises_in_float64() -> None:
    """A dimension far from 0 (1e6 + N(0, 1)) loses its digits in float32: the probe must not."""
    x, y = embeddings(3, dim=4)
    x[:, 0] = 1e6 + x[:, 0] / x[:, 0].std()
    reference = sklearn_pipeline(x, y, 1.0)
    probs = fit_linear_probe(x, y, 3).probabilities(torch.from_numpy(x))
    np.testing.assert_allclose(probs.double().numpy(), reference.predict_proba(x), atol=1e-6, rtol=0)


def test_non_convergence_is_recorded_not_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "PROBE_MAX_ITER", 2)
    x, y = embeddings(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = fit_linear_probe(x, y, 4)
    assert probe.n_iter == 2 and not probe.converged


def test_missing_class_is_named() -> None:
    x, y = embeddings(4)
    y[y == 2] = 1
    with pytest.raises(ValueError, match=r"no sample of class\(es\) \[2\].*--reference"):
        fit_linear_probe(x, y, 4)
    with pytest.raises(ValueError, match=r"class\(es\) \[2, 3\]"):
        fit_linear_probe(x[y < 2], y[y < 2], 4)


@pytest.mark.parametrize("fit", [fit_linear_probe, fit_knn_probe])
def test_bad_reference_is_refused(fit) -> None:
    x, y = embeddings(3)
    nan = x.copy()
    nan[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN/Inf.*row 7"):
        fit(nan, y, 3)
    inf = x.copy()
    inf[4, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit(torch.from_numpy(inf), y, 3)
    with pytest.raises(ValueError, match=r"0\.\.2.*\[3\]"):
        fit(x, np.where(y == 0, 3, y), 3)
    with pytest.raises(ValueError, match=r"0\.\.2.*\[-1\]"):
        fit(x, np.where(y == 0, -1, y), 3)
    with pytest.raises(ValueError, match="2-D"):
        fit(x[:, :, None], y, 3)
    with pytest.raises(ValueError, match="labels for"):
        fit(x, y[:-1], 3)
    with pytest.raises(ValueError, match="whole class indices"):
        fit(x, y + 0.5, 3)


def test_too_few_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_linear_probe(np.ones((1, 3)), np.array([0]), 2)
    with pytest.raises(ValueError, match="at least 1"):
        fit_knn_probe(np.ones((0, 3)), np.array([], dtype=int), 2)
    assert fit_knn_probe(np.ones((1, 3)), np.array([1]), 2, k=20).k == 1


# ---------------------------------------------------------------------------------------------
# k-NN probe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [5, 100])
def test_knn_probe_matches_sklearn(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 8)) * np.logspace(0, 1, 8)
    y = rng.integers(0, 3, 60)
    queries = rng.normal(size=(45, 8)) * np.logspace(0, 1, 8)
    probe = fit_knn_probe(x, y, 3, k=k)
    assert probe.k == min(k, 60)  # capped at the reference size
    knn = KNeighborsClassifier(n_neighbors=probe.k, metric="cosine", algorithm="brute").fit(x, y)
    expected = knn.predict_proba(queries)

    probs = probe.probabilities(torch.from_numpy(queries))
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-6)
    if k == 5:
        assert not np.allclose(expected, expected[0])  # the votes differ between queries
    # blocks of 7 queries give the same votes as one block
    monkeypatch.setattr(probes, "_KNN_BLOCK_ELEMENTS", 7 * 60)
    np.testing.assert_array_equal(probe.probabilities(torch.from_numpy(queries)).numpy(), probs.numpy())


def test_knn_probe_compares_half_precision_queries_in_float32() -> None:
    """Cosines 0.999992, 0.9999955 and 0.9999995 are all 1.0 in float16; float32 tells them apart."""
    angles = np.array([0.004, 0.003, 0.001])
    probe = fit_knn_probe(np.stack([np.cos(angles), np.sin(angles)], 1), np.array([0, 1, 2]), 3, k=1)
    for dtype in (torch.float16, torch.bfloat16):
        probs = probe.probabilities(torch.tensor([[1.0, 0.0]], dtype=dtype))
        assert probs.tolist() == [[0.0, 0.0, 1.0]]


def test_knn_probe_stores_normalised_reference() -> None:
    x, y = embeddings(3, n=50)
    probe = fit_knn_probe(torch.from_numpy(x), torch.from_numpy(y), 3, k=7)
    assert probe.reference.dtype == torch.float32 and probe.labels.dtype == torch.int64
    np.testing.assert_allclose(probe.reference.norm(dim=1).numpy(), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        fit_knn_probe(x, y, 3, k=0)


# ---------------------------------------------------------------------------------------------
# Both probes: dtype, device, broken rows, the record
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted() -> tuple:
    x, y = embeddings(3, dim=5)
    x = x / np.logspace(-2, 3, 5)  # float16 cannot hold the raw scales' digits
    return fit_linear_probe(x, y, 3), fit_knn_probe(x, y, 3, k=10), x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("which", [0, 1])
def test_probabilities_dtype_device_and_sums(fitted, which: int, dtype: torch.dtype, device: str) -> None:
    probe, x = fitted[which], fitted[2]
    queries = torch.from_numpy(x[:40]).to(device=device, dtype=dtype)
    probs = probe.probabilities(queries)
    assert probs.dtype == torch.float32 and probs.device == queries.device and probs.shape == (40, 3)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(40, device=device), atol=1e-6, rtol=0)
    exact = probe.probabilities(torch.from_numpy(x[:40])).to(device)
    if which == 0:  # the linear probe: only the rounding of the input differs
        torch.testing.assert_close(probs, exact, atol=0.05 if dtype in (torch.float16, torch.bfloat16) else 1e-6,
                                   rtol=0)
    else:  # the k-NN probe: multiples of 1/k
        torch.testing.assert_close(probs * probe.k, (probs * probe.k).round(), atol=1e-5, rtol=0)
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(probs, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", [0, 1])
def test_broken_query_rows_are_nan(fitted, which: int) -> None:
    probe, x = fitted[which], fitted[2]
    queries = torch.from_numpy(x[:6]).clone()
    queries[1, 0] = float("nan")
    queries[4, 2] = float("inf")
    probs = probe.probabilities(queries)
    assert torch.isnan(probs[[1, 4]]).all()
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(probs[keep], probe.probabilities(queries[keep]))


@pytest.mark.parametrize("which", [0, 1])
def test_wrong_query_shape_is_refused(fitted, which: int) -> None:
    probe, x = fitted[which], fitted[2]
    with pytest.raises(ValueError, match="5-dimensional"):
        probe.probabilities(torch.from_numpy(x[:, :4]))
    with pytest.raises(ValueError, match="5-dimensional"):
        probe.probabilities(torch.from_numpy(x[0]))


def test_probe_record(fitted) -> None:
    linear, knn, x = fitted
    record = probe_record(linear, knn, "ab" * 32, n_reference=x.shape[0])
    assert record == {
        "kind": "linear+knn",
        "linear": {"C": 1.0, "scaling": "standardised on the clean reference embeddings (mean, population std)",
                   "solver": "lbfgs", "max_iter": 1000, "n_iter": linear.n_iter, "converged": True},
        "knn": {"k": 10, "metric": "cosine", "weights": "uniform"},
        "reference": {"n_samples": 300, "sha256": "ab" * 32},
        "embedding_dim": 5,
    }
    assert isinstance(record["linear"]["n_iter"], int) and record["linear"]["n_iter"] > 0
    other = fit_knn_probe(x[:, :4], np.zeros(len(x), dtype=int), 3)
    with pytest.raises(ValueError, match="same embeddings"):
        probe_record(linear, other, "ab" * 32, n_reference=x.shape[0])
