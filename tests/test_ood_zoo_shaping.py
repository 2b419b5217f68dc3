"""ReAct, ASH-S, SCALE, DICE and fDBD (plugins/ood/zoo_shaping.py).

The first four against pytorch-ood 0.4.0's scores on fixed arrays (tests/data/ood-reference, see
its README for how each was made); fDBD, which has no reference there, against hand computations
from the paper's definition. pytorch-ood computed in float32: its scores agree with the float64
ones here to a relative 5e-7 (measured; the fixtures' largest |score| is ~50), hence rtol = 1e-5.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from medaudit.detector import LinearHead
from medaudit.plugins.ood.zoo_shaping import ASH, DICE, FDBD, SCALE, ReAct, linear_percentile

RTOL, ATOL = 1e-5, 1e-5

#: medaudit detector -> (fixture key, constructor); pytorch-ood's scores are already oriented
#: higher = more OOD (EnergyBased.score is the energy −logsumexp), so no sign flip is needed.
REFERENCED = {
    "react": ("react", lambda: ReAct(percentile=0.9)),
    "ash": ("ash_s", lambda: ASH(percentile=0.65)),
    "scale": ("scale", lambda: SCALE(percentile=0.65)),
    "dice_sparse": ("dice", lambda: DICE(sparsity=0.7)),
}


@pytest.fixture(scope="module")
def ref(ood_reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return ood_reference


def head_of(ref: dict[str, np.ndarray]) -> LinearHead:
    return LinearHead(torch.from_numpy(ref["head_weight"]), torch.from_numpy(ref["head_bias"]))


def fitted(det, ref: dict[str, np.ndarray]):
    det.head = head_of(ref)
    maps = torch.from_numpy(ref["fit_maps"])
    det.fit(det.embed(torch.empty(len(maps), 4), maps), torch.from_numpy(ref["fit_labels"]))
    return det


def scores(det, maps: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(maps)
    emb = det.embed(torch.empty(len(x), 4), x)
    return det.score(emb).numpy()


def test_declarations() -> None:
    dets = [ReAct(), ASH(), SCALE(), DICE(), FDBD()]
    assert [d.name for d in dets] == ["react", "ash", "scale", "dice_sparse", "fdbd"]
    for d in dets:
        assert d.needs == "features" and d.needs_head is True
        assert d.summary and d.citation and "20" in d.citation  # venue and year
    assert (ReAct().percentile, ASH().percentile, SCALE().percentile, DICE().sparsity) == (0.9, 0.65, 0.65, 0.7)


@pytest.mark.parametrize("name", sorted(REFERENCED))
def test_matches_pytorch_ood(name: str, ref: dict[str, np.ndarray]) -> None:
    key, make = REFERENCED[name]
    det = fitted(make(), ref)
    for split in ("id", "ood"):
        got, want = scores(det, ref[f"{split}_maps"]), ref[f"{key}_{split}"]
        assert got.dtype == np.float64 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{name} {split}")
    assert scores(det, ref["ood_maps"]).mean() > scores(det, ref["id_maps"]).mean()


def test_react_threshold_is_numpy_percentile_of_pooled_fit_features(ref: dict[str, np.ndarray]) -> None:
    det = fitted(ReAct(), ref)
    pooled = ref["fit_maps"].reshape(800, 64, -1).mean(axis=2)
    assert float(det.threshold) == pytest.approx(float(np.percentile(pooled.astype(np.float64), 90)), rel=1e-12)


def test_dice_mask_keeps_largest_contributions(ref: dict[str, np.ndarray]) -> None:
    det = fitted(DICE(sparsity=0.7), ref)
    w = ref["head_weight"].astype(np.float64)
    contrib = w * ref["fit_maps"].reshape(800, 64, -1).mean(axis=2).astype(np.float64).mean(axis=0)
    keep = contrib > np.quantile(contrib, 0.7)
    assert keep.sum() == 77  # 256 − 179: the largest 30 %
    np.testing.assert_array_equal(det.masked_weight.numpy(), np.where(keep, w, 0.0))


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.65, 0.9, 0.999, 1.0])
def test_linear_percentile_is_numpy_quantile(q: float) -> None:
    x = torch.randn(37, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert float(linear_percentile(x, q)) == np.quantile(x.numpy(), q)
    assert float(linear_percentile(x[:1, :1], q)) == float(x[0, 0])


# ---------------------------------------------------------------------------------------------
# fDBD
# ---------------------------------------------------------------------------------------------


def test_fdbd_by_hand() -> None:
    """3 classes in 2-D: w₀ = (1, 0), w₁ = (0, 1), w₂ = (−1, −1); b = (0, ½, 0); μ = (1, 1).

    z = (2, 1): l = (2, 1.5, −3), ŷ = 0.
        d₁ = |(1, −1)·z + (0 − ½)| / √2 = ½/√2;  d₂ = |(2, 1)·z + 0| / √5 = 5/√5 = √5;
        ‖z − μ‖ = ‖(1, 0)‖ = 1  →  fDBD = (½/√2 + √5) / 2.
    z = (−1, −2): l = (−1, −2.5, 3), ŷ = 2.
        d₀ = |(−2, −1)·z + 0| / √5 = 4/√5;  d₁ = |(−1, −2)·z + (0 − ½)| / √5 = 4.5/√5;
        ‖z − μ‖ = ‖(−2, −3)‖ = √13  →  fDBD = (8.5 / (2√5)) / √13.
    medaudit's score is −fDBD.
    """
    det = FDBD()
    det.head = LinearHead(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), torch.tensor([0.0, 0.5, 0.0]))
    det.fit(det.embed(torch.empty(2, 3), torch.tensor([[1.0, 0.0], [1.0, 2.0]])), torch.tensor([0, 1]))
    z = torch.tensor([[2.0, 1.0], [-1.0, -2.0]])
    want = [-(0.5 / math.sqrt(2) + math.sqrt(5)) / 2, -(8.5 / (2 * math.sqrt(5))) / math.sqrt(13)]
    assert det.score(det.embed(torch.empty(2, 3), z)).tolist() == pytest.approx(want, rel=1e-12)
    # feature maps are pooled first: a [B, 2, 2, 2] map whose spatial mean is z scores the same
    maps = z[:, :, None, None] + torch.tensor([[1.0, -1.0], [0.5, -0.5]])
    assert det.score(det.embed(torch.empty(2, 3), maps)).tolist() == pytest.approx(want, rel=1e-12)


def test_fdbd_binary_head_is_two_class() -> None:
    """One logit l = wᵀz + b is the two-class head [0; w], [0; b]: one boundary, wᵀz + b = 0."""
    det = FDBD()
    det.head = LinearHead(torch.tensor([[3.0, 4.0]]), torch.tensor([1.0]))
    det.fit(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]))  # μ = (1, 0)
    z = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    # |3·1 + 4·1 + 1| / 5 = 8/5, ‖z − μ‖ = 1;  |−3 + 1| / 5 = 2/5, ‖z − μ‖ = 2
    assert det.score(z).tolist() == pytest.approx([-8 / 5, -1 / 5], rel=1e-12)


def fdbd_numpy(fit_maps: np.ndarray, maps: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """fDBD written out sample by sample, class by class."""
    mu = fit_maps.astype(np.float64).reshape(len(fit_maps), w.shape[1], -1).mean(axis=2).mean(axis=0)
    out = []
    for z in maps.astype(np.float64).reshape(len(maps), w.shape[1], -1).mean(axis=2):
        logits = w @ z + b
        p = int(np.argmax(logits))
        d = [abs((w[p] - w[k]) @ z + (b[p] - b[k])) / np.linalg.norm(w[p] - w[k]) for k in range(len(w)) if k != p]
        out.append(-np.mean(d) / np.linalg.norm(z - mu))
    return np.array(out)


def test_fdbd_fixture_arrays_against_numpy(ref: dict[str, np.ndarray]) -> None:
    det = fitted(FDBD(), ref)
    w, b = ref["head_weight"].astype(np.float64), ref["head_bias"].astype(np.float64)
    for split in ("id", "ood"):
        want = fdbd_numpy(ref["fit_maps"], ref[f"{split}_maps"], w, b)
        # embed pools in the maps' float32 (as every pooled embedding is kept), numpy here in
        # float64: measured relative difference 2e-8
        np.testing.assert_allclose(scores(det, ref[f"{split}_maps"]), want, rtol=1e-6, atol=0)
    assert scores(det, ref["ood_maps"]).mean() > scores(det, ref["id_maps"]).mean()


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------

ALL = {**{k: v[1] for k, v in REFERENCED.items()}, "fdbd": FDBD}


@pytest.mark.parametrize("name", sorted(ALL))
def test_batch_split_and_single_sample(name: str, ref: dict[str, np.ndarray]) -> None:
    det = fitted(ALL[name](), ref)
    maps = torch.from_numpy(ref["ood_maps"][:50])
    whole = det.embed(torch.empty(50, 4), maps)
    halves = torch.cat([det.embed(torch.empty(20, 4), maps[:20]), det.embed(torch.empty(30, 4), maps[20:])])
    assert whole.ndim == 2 and whole.shape[0] == 50
    torch.testing.assert_close(halves, whole, rtol=1e-12, atol=1e-12)
    one = det.embed(torch.empty(1, 4), maps[7:8])
    s1 = det.score(one)
    assert s1.shape == (1,) and s1.dtype == torch.float64
    assert float(s1[0]) == pytest.approx(float(det.score(whole)[7]), rel=1e-12)


@pytest.mark.parametrize("name", sorted(ALL))
def test_score_keeps_state(name: str, ref: dict[str, np.ndarray]) -> None:
    det = fitted(ALL[name](), ref)
    before = copy.deepcopy(vars(det))
    first = scores(det, ref["id_maps"][:10])
    scores(det, ref["ood_maps"])
    np.testing.assert_array_equal(scores(det, ref["id_maps"][:10]), first)
    after = vars(det)
    assert before.keys() == after.keys()
    for k, v in before.items():
        if isinstance(v, LinearHead):
            same = torch.equal(v.weight, after[k].weight) and torch.equal(v.bias, after[k].bias)
        else:
            same = torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]
        assert same, f"score() changed {k}"


@pytest.mark.parametrize("make", [ReAct, DICE, FDBD])
def test_fit_needs_two_samples(make, ref: dict[str, np.ndarray]) -> None:
    det = make()
    det.head = head_of(ref)
    emb = det.embed(torch.empty(1, 4), torch.from_numpy(ref["fit_maps"][:1]))
    with pytest.raises(ValueError, match="at least 2 reference samples, got 1"):
        det.fit(emb, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("make", [ReAct, ASH, SCALE, DICE, FDBD])
def test_missing_head_is_a_clear_error(make, ref: dict[str, np.ndarray]) -> None:
    det = make()
    maps = torch.from_numpy(ref["fit_maps"][:4])
    with pytest.raises(RuntimeError, match="classification head"):
        emb = det.embed(torch.empty(4, 4), maps)
        det.fit(emb, torch.zeros(4, dtype=torch.long))
        det.score(emb)


def test_unfitted_score_and_bad_parameters(ref: dict[str, np.ndarray]) -> None:
    for make in (ReAct, DICE, FDBD):
        det = make()
        det.head = head_of(ref)
        with pytest.raises(RuntimeError, match="fit"):
            det.score(torch.zeros(2, 64))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            ReAct(percentile=bad)
    for bad in (1.0, -0.1):
        for make in (lambda p: ASH(percentile=p), lambda p: SCALE(percentile=p), lambda p: DICE(sparsity=p)):
            with pytest.raises(ValueError):
                make(bad)


def test_ash_scale_vector_features_and_half_precision(ref: dict[str, np.ndarray]) -> None:
    """[B, D] features (no spatial extent) prune over D; float16 maps are upcast, not summed in half."""
    head = head_of(ref)
    z = torch.from_numpy(ref["id_maps"][:5]).mean(dim=(2, 3))
    x = z.double().numpy()
    k = 64 - round(64 * 0.65)
    for det in (ASH(), SCALE()):
        det.head = head
        top = np.sort(x, axis=1)[:, ::-1][:, :k]
        factor = np.exp(x.sum(1) / top.sum(1))[:, None]
        shaped = np.where(x >= top[:, -1:], x, 0.0) if det.name == "ash" else x
        want = -np.log(np.exp((shaped * factor) @ ref["head_weight"].T.astype(np.float64)
                              + ref["head_bias"].astype(np.float64)).sum(1))
        np.testing.assert_allclose(det.score(det.embed(torch.empty(5, 4), z)).numpy(), want, rtol=1e-6)
        half = det.score(det.embed(torch.empty(5, 4), torch.from_numpy(ref["id_maps"][:5]).half()))
        full = det.score(det.embed(torch.empty(5, 4), torch.from_numpy(ref["id_maps"][:5]).half().float()))
        torch.testing.assert_close(half, full, rtol=1e-12, atol=1e-12)
