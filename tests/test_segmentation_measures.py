"""The segmentation kernels against independent references: MONAI's metrics and scipy's EDT for
the overlap and surface measures, medaudit's per-sample calibration metrics (themselves tested
against netcal) and scikit-learn for the voxel calibration statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDiceMetric, SurfaceDistanceMetric
from netcal.metrics import ECE
from scipy import ndimage
from sklearn.metrics import log_loss

from medaudit.metric import MetricContext
from medaudit.plugins.calibration.metrics import CalibrationMetrics
from medaudit.plugins.segmentation.measures import distance_to, edges, one_hot, overlap, surface_metrics
from medaudit.plugins.segmentation.voxel_calibration import boundary_band, calibration_from_stats, calibration_stats

CASES = [((3, 32, 40), (1.0, 0.7)), ((2, 12, 16, 20), (2.5, 1.0, 0.8)), ((2, 20, 24), (1.0, 1.0))]


def blobs(shape: tuple[int, ...], seed: int, k: int = 3) -> torch.Tensor:
    """Label maps of smooth random blobs (thresholded smoothed noise), classes 0..k-1."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(shape[0]):
        a = ndimage.gaussian_filter(rng.random(shape[1:]), 2)
        maps.append(np.digitize(a, np.quantile(a, np.linspace(0, 1, k + 1)[1:-1])))
    return torch.from_numpy(np.stack(maps))


#: Both ways of computing the surface distances: the device transform and scipy's at the boundaries.
METHODS = ["torch", "scipy"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,spacing", CASES)
def test_overlap_and_surface_measures_equal_monai(shape: tuple[int, ...], spacing: tuple[float, ...], method: str) -> None:
    pred, ref = one_hot(blobs(shape, 1), 3), one_hot(blobs(shape, 2), 3)
    sp = torch.tensor([spacing] * shape[0])
    ov = overlap(pred, ref)
    sm = surface_metrics(pred, ref, sp, 1.0, method=method)
    p, r = pred.float(), ref.float()
    torch.testing.assert_close(ov["dice"], DiceMetric(include_background=True, reduction="none")(p, r))
    torch.testing.assert_close(ov["iou"], MeanIoU(include_background=True, reduction="none")(p, r))
    kw = {"include_background": True, "reduction": "none"}
    torch.testing.assert_close(sm["hd95"], HausdorffDistanceMetric(percentile=95, **kw)(p, r, spacing=list(spacing)),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sm["assd"], SurfaceDistanceMetric(symmetric=True, **kw)(p, r, spacing=list(spacing)),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sm["nsd"], SurfaceDiceMetric(class_thresholds=[1.0] * 3, **kw)(p, r, spacing=list(spacing)),
                               rtol=1e-4, atol=1e-4)


def test_edges_and_distance_equal_scipy_with_a_border_object() -> None:
    mask = torch.zeros(1, 1, 10, 12, dtype=torch.bool)
    mask[0, 0, 0:4, 3:9] = True  # touches the top border: its border row is boundary (zero padding)
    mask[0, 0, 7, 10] = True  # a single voxel is its own boundary
    e = edges(mask)
    expected = mask[0, 0].numpy() & ~ndimage.binary_erosion(mask[0, 0].numpy(), border_value=0)
    np.testing.assert_array_equal(e[0, 0].numpy(), expected)
    d = distance_to(e, torch.tensor([[1.5, 0.5]]))
    np.testing.assert_allclose(d[0, 0].numpy(), ndimage.distance_transform_edt(~expected, sampling=(1.5, 0.5)), rtol=1e-5)
    assert torch.isinf(distance_to(torch.zeros(1, 1, 4, 4, dtype=torch.bool), torch.ones(1, 2))).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ignore_empty", [True, False])
def test_empty_classes_follow_monai_for_overlap(ignore_empty: bool, method: str) -> None:
    ref = torch.zeros(3, 8, 8, dtype=torch.int64)
    pred = torch.zeros(3, 8, 8, dtype=torch.int64)
    ref[0, 2:5, 2:5] = 1  # image 0: class 1 in the reference only
    pred[1, 2:5, 2:5] = 1  # image 1: class 1 in the prediction only; image 2: absent from both
    p, r = one_hot(pred, 2), one_hot(ref, 2)
    ov = overlap(p, r, ignore_empty=ignore_empty)
    monai = DiceMetric(include_background=True, reduction="none", ignore_empty=ignore_empty)(p.float(), r.float())
    torch.testing.assert_close(ov["dice"], monai, equal_nan=True)
    sm = surface_metrics(p, r, torch.ones(3, 2), 1.0, method=method)
    assert torch.isinf(sm["hd95"][0, 1]) and torch.isinf(sm["hd95"][1, 1]) and torch.isnan(sm["hd95"][2, 1])
    assert torch.isinf(sm["assd"][0, 1]) and torch.isnan(sm["assd"][2, 1])
    assert sm["nsd"][0, 1] == 0 and torch.isnan(sm["nsd"][2, 1])
    assert torch.isnan(ov["volume_error"][2, 1]) and ov["volume_error"][0, 1] == 1.0


def softmax_maps(shape: tuple[int, ...], k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(shape[0], k, *shape[1:], generator=g), dim=1)
    probs[(0, slice(None)) + (0,) * (len(shape) - 1)] = torch.tensor([1.0] + [0.0] * (k - 1))  # a confidence of exactly 1: the last bin
    ref = torch.randint(0, k, (shape[0], *shape[1:]), generator=g)
    return probs, ref


@pytest.mark.parametrize("shape", [(4, 9, 11), (3, 5, 6, 7)])
def test_voxel_calibration_equals_per_sample_metrics_on_the_voxels(shape: tuple[int, ...]) -> None:
    probs, ref = softmax_maps(shape, 3, 0)
    stats = calibration_stats(probs, ref, 15)
    ones = torch.ones(1, shape[0])
    got = calibration_from_stats(stats, ones)
    flat_p = probs.movedim(1, -1).reshape(-1, 3)
    flat_y = ref.reshape(-1)
    ctx = MetricContext("multiclass", ("a", "b", "c"), n_bins=15)
    per_sample = CalibrationMetrics().compute(flat_p, flat_y, torch.ones(1, flat_y.numel(), dtype=torch.float64), ctx)
    for key in ("ece", "classwise_ece", "brier", "nll"):
        torch.testing.assert_close(got[key], per_sample[key], rtol=1e-9, atol=1e-12)
    # independently: netcal's ECE on top-label confidences (3 labels occur: netcal stays multiclass)
    netcal = ECE(bins=15).measure(flat_p.double().numpy(), flat_y.numpy())
    assert float(got["ece"][0]) == pytest.approx(netcal, abs=1e-9)
    # scikit-learn clips a probability of 0 at float64's eps, medaudit (as netcal) at the input dtype's:
    # compare on the voxels whose true-class probability is not 0
    keep = flat_p[torch.arange(len(flat_y)), flat_y] > 0
    sub = calibration_from_stats(calibration_stats(probs[1:], ref[1:], 15), torch.ones(1, shape[0] - 1))
    rest = flat_p.reshape(shape[0], -1, 3)[1:].reshape(-1, 3).double().numpy()
    assert bool(keep.all()) or float(sub["nll"][0]) == pytest.approx(
        log_loss(ref[1:].reshape(-1).numpy(), rest, labels=[0, 1, 2]), rel=1e-6)
    onehot = torch.nn.functional.one_hot(flat_y, 3).double()
    assert float(got["brier"][0]) == pytest.approx(float(((flat_p.double() - onehot) ** 2).sum(dim=1).mean()), rel=1e-9)


def test_integer_image_weights_equal_replicated_images() -> None:
    probs, ref = softmax_maps((4, 8, 8), 3, 1)
    stats = calibration_stats(probs, ref, 15, band=boundary_band(probs.argmax(dim=1), 1))
    counts = torch.tensor([[2.0, 0.0, 1.0, 3.0]])
    idx = torch.tensor([0, 0, 2, 3, 3, 3])
    replicated = calibration_stats(probs[idx], ref[idx], 15, band=boundary_band(probs[idx].argmax(dim=1), 1))
    weighted = calibration_from_stats(stats, counts)
    plain = calibration_from_stats(replicated, torch.ones(1, 6))
    for key in weighted:
        torch.testing.assert_close(weighted[key], plain[key], rtol=1e-12, atol=1e-12)


def test_boundary_band_equals_scipy_dilation_and_boundary_ece_uses_only_the_band() -> None:
    labels = blobs((2, 20, 24), 5)
    band = boundary_band(labels, 2)
    for i in range(2):
        lab = labels[i].numpy()
        boundary = np.zeros_like(lab, dtype=bool)
        for axis in range(2):
            d = np.diff(lab, axis=axis) != 0
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            boundary[tuple(lo)] |= d
            boundary[tuple(hi)] |= d
        expected = ndimage.binary_dilation(boundary, structure=np.ones((3, 3)), iterations=2)
        np.testing.assert_array_equal(band[i].numpy(), expected)
    probs, ref = softmax_maps((2, 20, 24), 3, 2)
    got = calibration_from_stats(calibration_stats(probs, ref, 15, band=band), torch.ones(1, 2))
    inside = band.reshape(-1)
    flat_p = probs.movedim(1, -1).reshape(-1, 3)[inside]
    flat_y = ref.reshape(-1)[inside]
    ctx = MetricContext("multiclass", ("a", "b", "c"), n_bins=15)
    ece_band = CalibrationMetrics().compute(flat_p, flat_y, torch.ones(1, flat_y.numel(), dtype=torch.float64), ctx)["ece"]
    torch.testing.assert_close(got["boundary_ece"], ece_band, rtol=1e-9, atol=1e-12)


def test_surface_metrics_on_a_3d_volume_run_with_bounded_blocks_and_agree_between_methods() -> None:
    pred, ref = one_hot(blobs((2, 64, 64, 64), 3, k=2), 2), one_hot(blobs((2, 64, 64, 64), 4, k=2), 2)
    sp = torch.tensor([[1.2, 0.9, 1.0], [1.0, 1.0, 1.0]])
    sm = surface_metrics(pred, ref, sp, 1.0, method="torch")
    assert sm["hd95"].shape == (2, 2) and torch.isfinite(sm["hd95"]).all()
    for key, value in surface_metrics(pred, ref, sp, 1.0, method="scipy").items():
        torch.testing.assert_close(value, sm[key], rtol=1e-5, atol=1e-5)


def test_edges_of_thin_and_border_touching_masks_equal_scipy_erosion() -> None:
    masks = torch.from_numpy(np.random.default_rng(7).random((3, 2, 9, 1, 7)) > 0.4)  # an axis of length 1
    e = edges(masks)
    for idx in np.ndindex(3, 2):
        m = masks[idx].numpy()
        np.testing.assert_array_equal(e[idx].numpy(), m & ~ndimage.binary_erosion(m, border_value=0))


def test_dice_failure_detection_equals_sklearn_auroc() -> None:
    from sklearn.metrics import roc_auc_score

    from medaudit.config import Config
    from medaudit.outputs import AuditOutputs, Scenario
    from medaudit.plugins.segmentation.failure import failure_analysis

    g = torch.Generator().manual_seed(0)
    n = 40
    dice_fg = torch.rand(n, generator=g)
    dice = torch.stack([torch.ones(n), dice_fg], dim=1)[None]  # [1, N, 2]; class 0 is background
    entropy = (1 - dice_fg + 0.3 * torch.rand(n, generator=g))[None]
    score = torch.rand(1, n, generator=g)
    score[0, :5] = float("nan")  # samples that fitted a cross-fitted detector carry no weight
    cfg = Config.model_validate({"task": {"type": "segmentation", "classes": ["bg", "fg"]}})
    ctx = MetricContext("segmentation", ("bg", "fg"))
    outputs = AuditOutputs([Scenario.clean()], [str(i) for i in range(n)], torch.zeros(n, 2), None, {}, [], ctx,
                           torch.ones(1, n), 0.95, 0, {"knn": score}, quantities={"dice": dice, "entropy": entropy})
    result = failure_analysis(outputs, cfg)
    threshold = 0.8 * float(torch.median(dice_fg))  # torch's lower median, as nanmedian
    assert result["failure_threshold"] == pytest.approx(threshold)
    failed = (dice_fg < threshold).numpy()
    got = result["failure_detection"]["clean"]
    assert got["mean_entropy"]["auroc"]["value"] == pytest.approx(roc_auc_score(failed, entropy[0].numpy()))
    assert got["knn"]["auroc"]["value"] == pytest.approx(roc_auc_score(failed[5:], score[0, 5:].numpy()))
    assert got["knn"]["images"] == n - 5 and got["mean_entropy"]["failures"] == int(failed.sum())
    assert result["uncertainty_dice_correlation"]["clean"] < -0.5  # more uncertain where Dice is low


def test_structure_calibration_equals_the_multilabel_metrics_on_the_voxel_structure_pairs() -> None:
    """Sigmoid maps with overlapping reference structures: every (voxel, structure) pair is a binary
    prediction, scored as medaudit's multilabel calibration metrics (tested against netcal) score
    the flattened voxels: Brier and NLL summed over structures, classwise ECE the mean of each
    structure's ECE, ECE the positive-class ECE pooled over structures."""
    g = torch.Generator().manual_seed(3)
    probs = torch.sigmoid(3 * torch.randn(3, 2, 10, 12, generator=g))
    ref = torch.rand(3, 2, 10, 12, generator=g) < probs  # calibrated by construction, up to noise
    ref[:, 1] &= ref[:, 0]  # structure 1 lies inside structure 0: they overlap
    got = calibration_from_stats(calibration_stats(probs, ref, 15), torch.ones(1, 3))
    flat_p = probs.movedim(1, -1).reshape(-1, 2)
    flat_y = ref.movedim(1, -1).reshape(-1, 2).long()
    ones = torch.ones(1, flat_y.shape[0], dtype=torch.float64)
    multilabel = CalibrationMetrics().compute(flat_p, flat_y, ones, MetricContext("multilabel", ("a", "b"), n_bins=15))
    for key in ("brier", "nll"):
        torch.testing.assert_close(got[key], multilabel[key], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["classwise_ece"], multilabel["ece"], rtol=1e-9, atol=1e-12)
    pooled = CalibrationMetrics().compute(flat_p.reshape(-1, 1), flat_y.reshape(-1, 1),
                                          torch.ones(1, flat_y.numel(), dtype=torch.float64),
                                          MetricContext("multilabel", ("pair",), n_bins=15))
    torch.testing.assert_close(got["ece"], pooled["ece"], rtol=1e-9, atol=1e-12)
    # scikit-learn: the NLL is the per-structure binary log loss, summed over structures
    bce = sum(log_loss(flat_y[:, c].numpy(), flat_p[:, c].double().numpy(), labels=[0, 1]) for c in range(2))
    assert float(got["nll"][0]) == pytest.approx(bce, rel=1e-6)


def test_boundary_band_of_structures_is_the_union_of_each_structures_band() -> None:
    labels = blobs((2, 20, 24), 6)
    structures = torch.stack([labels >= 1, labels == 2], dim=1)  # overlapping: class 2 lies inside "≥ 1"
    union = boundary_band((labels >= 1).long(), 2) | boundary_band((labels == 2).long(), 2)
    torch.testing.assert_close(boundary_band(structures, 2), union)


def test_channel_max_equals_torch_max_with_ties_to_the_first_channel() -> None:
    from medaudit.plugins.segmentation.measures import channel_max

    x = torch.randint(0, 3, (4, 5, 6, 7)).float()  # many ties
    values, index = channel_max(x)
    ref_values, ref_index = x.max(dim=1)
    torch.testing.assert_close(values, ref_values)
    torch.testing.assert_close(index, x.argmax(dim=1))
    assert torch.equal(index, ref_index)


def test_equal_width_bin_index_equals_searchsorted_on_edges_and_between() -> None:
    from medaudit.binning import bin_index, equal_width_bin_index, equal_width_edges

    for n_bins in (10, 15, 7):
        edges = equal_width_edges(n_bins)
        values = torch.cat([edges, torch.nextafter(edges, torch.zeros_like(edges)),
                            torch.nextafter(edges, torch.ones_like(edges)), torch.rand(10_000, dtype=torch.float64)])
        torch.testing.assert_close(equal_width_bin_index(values, edges), bin_index(values, edges), rtol=0, atol=0)
        # probabilities of lower precision are binned as their exact float64 promotions, including
        # the values of their own dtype next to each edge (the edges round to them)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            near = edges.to(dtype)
            low = torch.cat([near, torch.nextafter(near, torch.zeros_like(near)), torch.nextafter(near, torch.ones_like(near)),
                             torch.rand(10_000).to(dtype)]).clamp(0, 1)
            torch.testing.assert_close(equal_width_bin_index(low, edges), bin_index(low.double(), edges), rtol=0, atol=0)


def test_voxelwise_output_detectors_score_each_image_by_the_mean_of_its_voxel_rows() -> None:
    from medaudit.plugins.ood import GEN, MSP, Energy, Entropy, MaxLogit

    g = torch.Generator().manual_seed(5)
    maps = torch.randn(3, 4, 6, 7, 5, generator=g) * 3
    for detector in (MSP(), MaxLogit(), Energy(2.0), Entropy(), GEN()):
        rows = maps.movedim(1, -1).reshape(-1, 4)  # one row of class scores per voxel, scored in float64
        expected = detector.score_rows(rows).reshape(3, -1).mean(dim=1)
        detector.voxelwise = True
        got = detector.score(detector.embed(maps, None))
        # each voxel scored in the map's float32, the mean in float64
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert got.dtype == torch.float64
