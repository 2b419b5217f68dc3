"""Detectors against hand / numpy / scikit-learn computations."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf, ledoit_wolf as sk_ledoit_wolf
from sklearn.metrics import roc_auc_score

from medaudit.config import Config
from medaudit.plugin_manager import get_plugin_manager
from medaudit.plugins import ood
from medaudit.plugins.ood import (KNN, MSP, Energy, Entropy, Mahalanobis, MahalanobisEnsemble, MaxLogit, Spectral,
                                  ledoit_wolf, medaudit_detectors, spectral_signature)
from medaudit.settings import resolve_settings


def default_config() -> Config:
    """A config with the ood plugin's default settings resolved, as the hook receives it in an audit."""
    return resolve_settings(Config(), get_plugin_manager(autoload=False, extra=[("ood", ood)]))


def test_catalogue_names_and_needs() -> None:
    dets = medaudit_detectors(default_config())
    assert [d.name for d in dets] == ["msp", "max_logit", "energy", "entropy", "gen", "kl_matching", "mahalanobis",
                                      "mahalanobis_ensemble", "knn", "spectral", "vim", "react", "ash", "scale",
                                      "dice_sparse", "rmd", "she", "nnguide", "fdbd", "histogram"]
    assert {d.name for d in dets if d.needs == "features"} == {"mahalanobis", "knn", "vim", "react", "ash",
                                                                "scale", "dice_sparse", "rmd", "she", "nnguide", "fdbd"}
    assert {d.name for d in dets if d.needs == "stages"} == {"spectral", "mahalanobis_ensemble"}
    assert {d.name for d in dets if d.needs_head} == {"vim", "react", "ash", "scale", "dice_sparse", "she", "nnguide",
                                                       "fdbd"}
    assert all(d.summary and d.citation for d in dets)


def test_mahalanobis_ensemble_is_offered_for_two_stages_or_more() -> None:
    pm = get_plugin_manager(autoload=False, extra=[("ood", ood)])

    def names(stages: object) -> set[str]:
        return {d.name for d in medaudit_detectors(resolve_settings(
            Config.model_validate({"model": {"feature_layers": stages}}), pm))}

    assert "mahalanobis_ensemble" in names(["a", "b"]) and "mahalanobis_ensemble" in names("auto")
    assert "mahalanobis_ensemble" not in names(["bottleneck"]) and "mahalanobis_ensemble" not in names(None)


def test_odin_is_offered_only_when_asked_for() -> None:
    pm = get_plugin_manager(autoload=False, extra=[("ood", ood)])
    assert "odin" not in {d.name for d in medaudit_detectors(default_config())}
    odin_settings = {"plugins": {"ood": {"odin": True, "odin_temperature": 10.0, "odin_epsilon": 0.002}}}
    odin = [d for d in medaudit_detectors(resolve_settings(Config.model_validate(odin_settings), pm)) if d.name == "odin"]
    assert len(odin) == 1 and odin[0].needs_model and (odin[0].temperature, odin[0].epsilon) == (10.0, 0.002)
    seg = Config.model_validate({**odin_settings, "task": {"type": "segmentation", "classes": ["bg", "fg"]}})
    assert "odin" not in {d.name for d in medaudit_detectors(resolve_settings(seg, pm))}


def test_output_detectors_by_hand() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    emb = MSP().embed(z, None)
    e = [math.exp(1), math.exp(2), math.exp(3)]
    lse = math.log(sum(e))
    p = [v / sum(e) for v in e]
    assert MSP().score(emb).tolist() == pytest.approx([-p[2], -1 / 3])
    assert MaxLogit().score(emb).tolist() == pytest.approx([-3.0, 0.0])
    assert Energy().score(emb).tolist() == pytest.approx([-lse, -math.log(3)])
    t = 2.0
    assert Energy(temperature=t).score(emb).tolist() == pytest.approx(
        [-t * math.log(sum(math.exp(v / t) for v in (1, 2, 3))), -t * math.log(3)])
    assert Entropy().score(emb).tolist() == pytest.approx([-sum(q * math.log(q) for q in p), math.log(3)])


def test_single_logit_binary_is_two_class() -> None:
    z = torch.tensor([[2.0], [-1.0]])  # [B, 1]
    s = 1 / (1 + math.exp(-2.0))
    assert MSP().score(MSP().embed(z, None)).tolist() == pytest.approx([-s, -1 / (1 + math.exp(-1.0))])
    assert MaxLogit().score(z).tolist() == pytest.approx([-2.0, 0.0])
    assert Energy().score(z[:, 0]).tolist() == pytest.approx([-math.log(1 + math.exp(2)), -math.log(1 + math.exp(-1))])
    ent = Entropy()
    assert float(ent.score(z)[0]) == pytest.approx(-(s * math.log(s) + (1 - s) * math.log(1 - s)))


def test_probability_outputs() -> None:
    msp, ent = MSP(), Entropy()
    msp.output_kind = ent.output_kind = "probabilities"
    p = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    assert msp.score(p).tolist() == pytest.approx([-0.7, -1.0])
    assert ent.score(p).tolist() == pytest.approx([-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)), 0.0])
    assert msp.score(torch.tensor([[0.8]])).tolist() == pytest.approx([-0.8])  # [1 − p, p]
    with pytest.raises(ValueError, match="temperature"):
        Energy(temperature=0.0)


@pytest.mark.parametrize("n,p", [(40, 5), (15, 30)])
def test_ledoit_wolf_matches_sklearn(n: int, p: int) -> None:
    x = np.random.default_rng(0).normal(size=(n, p)) @ np.random.default_rng(1).normal(size=(p, p))
    x -= x.mean(0)
    cov, shrink = ledoit_wolf(torch.from_numpy(x))
    sk_cov, sk_shrink = sk_ledoit_wolf(x, assume_centered=True)
    assert shrink == pytest.approx(sk_shrink, abs=1e-10)
    np.testing.assert_allclose(cov.numpy(), sk_cov, atol=1e-10)


def test_mahalanobis_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(60, 8, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=60)
    feats[labels == 1] += 1.0
    det = Mahalanobis()
    emb = det.embed(torch.zeros(60, 3), torch.from_numpy(feats))
    det.fit(emb[:45], torch.from_numpy(labels[:45]))
    got = det.score(emb[45:]).numpy()
    # Direct computation: pooled features, class means, tied LW covariance, min squared distance.
    f = feats.reshape(60, 8, -1).mean(-1).astype(np.float64)
    fit, y = f[:45], labels[:45]
    means = {c: fit[y == c].mean(0) for c in np.unique(y)}
    centred = np.stack([fit[i] - means[y[i]] for i in range(45)])
    prec = np.linalg.inv(LedoitWolf(assume_centered=True).fit(centred).covariance_)
    want = np.array([min((q - m) @ prec @ (q - m) for m in means.values()) for q in f[45:]])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_knn_matches_brute_force_and_caps_k() -> None:
    rng = np.random.default_rng(4)
    feats = torch.from_numpy(rng.normal(size=(30, 6, 2, 2)).astype(np.float32))
    det = KNN(k=3)
    emb = det.embed(torch.zeros(30, 2), feats)
    det.fit(emb[:20], torch.zeros(20, dtype=torch.long))
    got = det.score(emb[20:]).numpy()
    f = feats.numpy().reshape(30, 6, -1).mean(-1).astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    d = np.linalg.norm(f[20:, None] - f[None, :20], axis=-1)
    np.testing.assert_allclose(got, np.sort(d, axis=1)[:, 2], rtol=1e-6)
    big = KNN()  # k = 50 > bank of 20 -> 19
    big.fit(emb[:20], torch.zeros(20, dtype=torch.long))
    assert big.k_used == 19
    np.testing.assert_allclose(big.score(emb[20:]).numpy(), np.sort(d, axis=1)[:, 18], rtol=1e-6)


def test_spectral_signature_definition() -> None:
    f = torch.randn(3, 4, 5, 6)
    s = torch.linalg.svdvals(f.reshape(3, 4, 30).double())
    want = torch.log(s / s.sum(1, keepdim=True))
    torch.testing.assert_close(spectral_signature(f).double(), want, atol=1e-5, rtol=1e-5)
    assert torch.isnan(spectral_signature(torch.randn(3, 8))).all()  # no spatial extent


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_spectral_eigensolves_split_over_threads_give_identical_values(threads: int) -> None:
    """On a CPU the batch's eigensolves are split over torch's threads: the same bits as one call."""
    from medaudit.plugins.ood.detectors import _eigvalsh_split

    a = torch.randn(23, 9, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gram = a @ a.transpose(1, 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert torch.equal(_eigvalsh_split(gram), torch.linalg.eigvalsh(gram))
        assert torch.get_num_threads() == threads  # the main thread keeps its intra-op threads
    finally:
        torch.set_num_threads(before)


def test_spectral_pool_threads_run_torch_single_threaded() -> None:
    """Pool threads with torch's default parallelism would start OpenMP teams that slow the main
    thread's later work; each runs with one intra-op thread."""
    from medaudit.plugins.ood.detectors import _torch_pool

    pool = _torch_pool(2, "test")
    try:
        assert set(pool.map(lambda _: torch.get_num_threads(), range(4))) == {1}
    finally:
        pool.shutdown()


@pytest.mark.parametrize("scoring", ["whitened", "knn"])
def test_spectral_separates_low_rank_from_full_rank(scoring: str) -> None:
    g = torch.Generator().manual_seed(0)
    c, hw = 8, 36
    full = torch.randn(200, c, hw, generator=g)  # in-distribution: full-rank maps
    low = torch.randn(100, c, 2, generator=g) @ torch.randn(100, 2, hw, generator=g)  # rank-2 maps
    det = Spectral(scoring=scoring)
    emb_id = det.embed(torch.zeros(1), full.reshape(200, c, 6, 6))
    emb_ood = det.embed(torch.zeros(1), low.reshape(100, c, 6, 6) + 0.01 * torch.randn(100, c, 6, 6, generator=g))
    det.fit(emb_id[:100], torch.zeros(100, dtype=torch.long))
    s_id, s_ood = det.score(emb_id[100:]), det.score(emb_ood)
    y = np.r_[np.zeros(100), np.ones(100)]
    assert roc_auc_score(y, np.r_[s_id.numpy(), s_ood.numpy()]) > 0.99
    # Scale invariance: a globally rescaled map has the same signature.
    torch.testing.assert_close(det.embed(None, full[:5].reshape(5, c, 6, 6) * 7.0),  # type: ignore[arg-type]
                               emb_id[:5], atol=1e-4, rtol=1e-4)


def test_unfitted_and_bad_features_raise() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        Mahalanobis().score(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="spatial extent"):
        Spectral().fit(spectral_signature(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be"):
        KNN(k=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_detectors_run_on_cuda() -> None:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, generator=g)
    feats = torch.randn(40, 16, 4, 4, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    for det in medaudit_detectors(default_config()):
        emb_cpu = det.embed(logits, feats)
        emb = det.embed(logits.to(dev), feats.to(dev))
        if isinstance(emb, Future):  # spectral solves on a host thread so the GPU queue never waits
            emb = emb.result().to(dev)
        assert emb.device.type == "cuda"
        torch.testing.assert_close(emb.cpu(), emb_cpu, atol=1e-4, rtol=1e-4)
        det.fit(emb[:30], labels[:30].to(dev))
        s = det.score(emb[30:])
        assert s.device.type == "cuda" and s.shape == (10,) and torch.isfinite(s).all()
        det.fit(emb_cpu[:30], labels[:30])
        torch.testing.assert_close(s.cpu(), det.score(emb_cpu[30:]), atol=1e-3, rtol=1e-3)


def _blocks_seen(call: Callable[[], object]) -> list[int]:
    """Run ``call``; the size of every distance block ``kth_nn_distance`` wrote meanwhile."""
    seen: list[int] = []
    real = torch.addmm

    def spy(*args: object, out: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append(out.shape[0] * out.shape[1])
        return real(*args, out=out, **kwargs)

    torch.addmm = spy
    try:
        call()
    finally:
        torch.addmm = real
    return seen


def test_kth_nn_distance_in_bounded_blocks_matches_brute_force() -> None:
    from medaudit.plugins.ood import kth_nn_distance

    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    distances = ((queries[:, None, :] - bank[None]) ** 2).sum(-1).sqrt()  # by definition, no expansion
    blocked: list[torch.Tensor] = []
    seen = _blocks_seen(lambda: blocked.append(kth_nn_distance(queries, bank, 3, block=100)))  # 2 queries x 40
    assert max(seen) <= 100 and len(seen) == 25
    torch.testing.assert_close(blocked[0], distances.kthvalue(3, dim=1).values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kth_nn_distance(queries, bank, 3), distances.kthvalue(3, dim=1).values,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kth_nn_distance(queries, bank, 40), distances.max(dim=1).values, rtol=1e-12, atol=1e-12)
    # a query in the bank is at distance zero (not NaN from the root of a rounding error below zero)
    assert float(kth_nn_distance(bank[:5].clone(), bank, 1).max()) < 1e-7
    assert kth_nn_distance(queries[:0], bank, 3).shape == (0,)


def test_kth_nn_distance_default_blocks_on_a_cpu_stay_small() -> None:
    """2**21 distances (16 MiB) per block on a CPU, whatever the bank: the peak does not grow with N."""
    from medaudit.plugins.ood import kth_nn_distance

    g = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(3000, 4, generator=g, dtype=torch.float64), torch.randn(5000, 4, generator=g, dtype=torch.float64)
    seen = _blocks_seen(lambda: kth_nn_distance(queries, bank, 5))
    assert max(seen) <= 1 << 21 and len(seen) == -(-3000 // ((1 << 21) // 5000))


def _paper_signature(maps: np.ndarray) -> np.ndarray:
    """Karimi & Gholipour's spectral signature of one sample's map, written directly from the
    paper: the singular values of the C × (H·W) matrix, divided by their sum, logged."""
    sv = np.linalg.svd(maps.reshape(maps.shape[0], -1).astype(np.float64), compute_uv=False)
    return np.log(np.maximum(sv / sv.sum(), 1e-12))


def test_multi_layer_spectral_signature_is_the_papers_concatenation() -> None:
    """The paper's multi-layer setting: every stage's signature, each normalised on its own,
    concatenated shallow to deep; here on a real MONAI DenseNet121's stages chosen by auto."""
    from monai.networks.nets import DenseNet121

    from medaudit.features import choose_feature_layer, choose_stages, make_extractor
    from medaudit.model import LoadedModel

    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3).eval()
    model = LoadedModel(module=net, path=Path("densenet.pt"), format="state_dict", sha256="", num_parameters=0,
                        dtype="float32", summary="", feature_modules={})
    x = torch.randn(3, 1, 48, 48)
    choice = choose_feature_layer(model, "auto", x)
    stages, source, _ = choose_stages(model, "auto", choice.layer, x)
    names = [n for n, _ in stages]
    assert source == "auto" and names == ["features.relu0", "features.denseblock1", "features.denseblock2",
                                          "features.denseblock3"]
    extract, warning = make_extractor(model, names)
    assert warning is None
    with torch.inference_mode():
        _, feats = extract(x)
    emb = Spectral().embed(torch.zeros(3, 3), [feats[n] for n in names])
    direct = np.stack([np.concatenate([_paper_signature(feats[n][i].numpy()) for n in names]) for i in range(3)])
    assert emb.shape == direct.shape == (3, 64 + 144 + 36 + 9)
    np.testing.assert_allclose(emb.numpy(), direct, atol=1e-4)


def test_mahalanobis_ensemble_standardises_and_sums_the_layers() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 4, generator=g), torch.randn(200, 6, generator=g) * 3 + 1
    labels = torch.arange(200) % 2
    det = MahalanobisEnsemble()
    det.stages = (("a", (4, 2, 2)), ("b", (6, 1, 1)))
    det.fit(torch.cat([a, b], dim=1), labels)
    new = torch.randn(30, 10, generator=g) * 2
    one, two = Mahalanobis(), Mahalanobis()
    one.fit(a, labels)
    two.fit(b, labels)
    fit_a, fit_b = one.score(a), two.score(b)
    expected = ((one.score(new[:, :4]) - fit_a.mean()) / fit_a.std() + (two.score(new[:, 4:]) - fit_b.mean()) / fit_b.std())
    torch.testing.assert_close(det.score(new), expected)
    with pytest.raises(ValueError, match="stages"):
        det.score(new[:, :9])


def test_spectral_names_the_flat_stage() -> None:
    det = Spectral()
    det.stages = (("early", (4, 3, 3)), ("late", (8, 1, 1)))
    emb = torch.cat([spectral_signature(torch.rand(20, 4, 3, 3)), spectral_signature(torch.rand(20, 8, 1, 1))], dim=1)
    with pytest.raises(ValueError, match=r"\['late'\]"):
        det.fit(emb, torch.zeros(20, dtype=torch.long))


@pytest.mark.parametrize("dims", [48, 256])
def test_mahalanobis_scores_do_not_depend_on_the_thread_count(dims: int) -> None:
    # Two causes of results.json depending on audit.threads, each failing one case before the fix:
    # on an AMD EPYC, MKL's triangular solve of the 3 class means gave other last bits with 1 and 2
    # threads (48); on any CPU, torch split the Ledoit-Wolf sums over 256² values between threads (256).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, dims, generator=g, dtype=torch.float64) @ torch.randn(dims, dims, generator=g, dtype=torch.float64)
    y = torch.arange(600) % 3
    before = torch.get_num_threads()
    scores = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            det = Mahalanobis()
            det.fit(x[:300], y[:300])
            scores[threads] = det.score(x[300:])
            assert torch.get_num_threads() == threads  # the fit restores the caller's thread count
    finally:
        torch.set_num_threads(before)
    assert torch.equal(scores[1], scores[2])
    # still the Mahalanobis distance: against a direct solve with the fitted covariance
    assert det.means is not None and det.whitener is not None
    cov = torch.linalg.inv(det.whitener.T @ det.whitener)
    d = x[300:, None] - det.means[None]
    direct = torch.einsum("ncd,de,nce->nc", d, torch.linalg.inv(cov), d).min(dim=1).values
    torch.testing.assert_close(scores[1], direct, rtol=1e-8, atol=1e-8)
