"""Literature robustness scores (medaudit.scores): hand-computed tables, a published row, paired rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medaudit.bootstrap import interval
from medaudit.metric import MetricContext
from medaudit.plugins.classification import ClassificationMetrics
from medaudit.scores import (
    ROOD_ALPHA,
    SCORE_METRIC,
    SCORES,
    corruption_error,
    mean_over_perturbations,
    relative_corruption_error,
    rood_degradation,
    summarize_scores,
)


def rows(*values):
    """A scenario's rows with R = 0: only the full-data value."""
    return np.array(values, dtype=float)


def point(d):
    """``{p: {s: value}}`` -> ``{p: {s: rows [1]}}``."""
    return {p: {s: rows(v) for s, v in sev.items()} for p, sev in d.items()}


# ---------------------------------------------------------------------------------------------
# ImageNet-C: CE and relative CE, 2 corruptions x 3 severities, by hand
# ---------------------------------------------------------------------------------------------

# accuracies; errors are 1 - accuracy
MODEL_ACC = {"noise": {1: 0.80, 2: 0.70, 3: 0.50}, "blur": {1: 0.90, 2: 0.80, 3: 0.60}}
MODEL_CLEAN = 0.95
BASE_ACC = {"noise": {1: 0.60, 2: 0.50, 3: 0.40}, "blur": {1: 0.70, 2: 0.60, 3: 0.50}}
BASE_CLEAN = 0.80


def test_imagenet_c_mce_by_hand():
    # errors: model noise .2+.3+.5 = 1.0, blur .1+.2+.4 = .7; baseline noise .4+.5+.6 = 1.5, blur .3+.4+.5 = 1.2
    # CE_noise = 1.0/1.5 = 2/3, CE_blur = .7/1.2 = 7/12, mCE = (2/3 + 7/12)/2 = 15/24
    out = summarize_scores("mce_vs_baseline", point(MODEL_ACC), rows(MODEL_CLEAN), baseline=BASE_ACC,
                           baseline_clean=BASE_CLEAN, metric="accuracy")
    json.dumps(out)
    assert out["perturbations"]["noise"]["value"] == pytest.approx(2 / 3)
    assert out["perturbations"]["blur"]["value"] == pytest.approx(7 / 12)
    assert out["value"] == pytest.approx(15 / 24)
    assert out["n_perturbations"] == 2 and out["left_out"] == [] and out["reason"] is None
    assert out["perturbations"]["noise"]["severities"] == [1, 2, 3]
    assert out["ci_low"] is None  # R = 0: no interval


def test_imagenet_c_relative_mce_by_hand():
    # E0 = .05, E0^b = .2; noise: (1.0 - 3*.05)/(1.5 - 3*.2) = .85/.9 = 17/18
    # blur: (.7 - .15)/(1.2 - .6) = .55/.6 = 11/12; relative mCE = (17/18 + 11/12)/2 = 67/72
    out = summarize_scores("relative_mce_vs_baseline", point(MODEL_ACC), rows(MODEL_CLEAN), baseline=BASE_ACC,
                           baseline_clean=BASE_CLEAN)
    assert out["perturbations"]["noise"]["value"] == pytest.approx(17 / 18)
    assert out["perturbations"]["blur"]["value"] == pytest.approx(11 / 12)
    assert out["value"] == pytest.approx(67 / 72)
    # the clean error is subtracted at every severity, not once from the sum: (1.0-.05)/(1.5-.2) would be 0.7308
    assert out["perturbations"]["noise"]["value"] != pytest.approx(0.95 / 1.3)


# ---------------------------------------------------------------------------------------------
# ImageNet-C: a published row
# ---------------------------------------------------------------------------------------------

# AlexNet's top-1 errors on ImageNet-C, each the mean over the 5 severities, as published with the
# benchmark (hendrycks/robustness) and copied verbatim in google-research/augmix imagenet.py,
# "ALEXNET_ERR" ("Raw AlexNet errors taken from https://github.com/hendrycks/robustness").
ALEXNET_ERR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
# AlexNet's clean top-1 error: the torchvision weights ImageNet-C evaluated (alexnet-owt-4df8aa71,
# = AlexNet_Weights.IMAGENET1K_V1), acc@1 56.522 (https://pytorch.org/vision/stable/models/generated/
# torchvision.models.alexnet.html).
ALEXNET_CLEAN_ERR = 1 - 0.56522
# Torchvision ResNet-50 on ImageNet-C: top-1 accuracy (%) per corruption, averaged over the 5
# severities, with the CE each one gives. Source: bethgelab/game-of-noise, Results/clean_results.txt
# at commit 82423a1 ("ImageNet val: Top1 accuracy: 76.13 ... Full ImageNet-C: ... mCE: 76.70"),
# the vanilla-ResNet-50 baseline of Rusak et al. 2020. The benchmark's own leaderboard
# (hendrycks/robustness README.md, "ResNet-50 Baseline | 76.7% | 23.85%") and the paper (ResNet-50
# mCE 76.7) give the same mCE; the paper prints per-corruption CEs only rounded to integers.
RESNET50_ACC = {
    "brightness": (68.02, 56.64), "contrast": (39.06, 71.43), "defocus_blur": (38.75, 74.71),
    "elastic_transform": (45.25, 84.75), "fog": (45.83, 66.11), "frost": (38.14, 74.84),
    "gaussian_noise": (29.29, 79.77), "glass_blur": (26.79, 88.61), "impulse_noise": (23.81, 82.58),
    "jpeg_compression": (53.41, 76.82), "motion_blur": (38.67, 78.03), "pixelate": (44.79, 76.92),
    "shot_noise": (27.03, 81.58), "snow": (32.53, 77.83), "zoom_blur": (36.24, 79.86),
}
RESNET50_CLEAN_ACC = 0.7613
# Relative mCE of ResNet-50 in Hendrycks & Dietterich (2019): 105.0, the number the task quoting the
# paper gives; the paper's own text could not be read through the search tool, so this one is not
# independently checked here. Reading the formula as subtracting E_clean once from the 5-severity
# sum would give 79.4 instead, so the test does tell the two readings apart.
RESNET50_RELATIVE_MCE = 105.0


def resnet50_vs_alexnet(score):
    # only the severity means are published: every severity gets the mean, so sum_s = 5 x mean
    model = {c: {s: rows(acc / 100) for s in range(1, 6)} for c, (acc, _) in RESNET50_ACC.items()}
    base = {c: {s: 1 - err for s in range(1, 6)} for c, err in ALEXNET_ERR.items()}
    return summarize_scores(score, model, rows(RESNET50_CLEAN_ACC), baseline=base,
                            baseline_clean=1 - ALEXNET_CLEAN_ERR)


def test_imagenet_c_published_resnet50_mce():
    out = resnet50_vs_alexnet("mce_vs_baseline")
    assert out["n_perturbations"] == 15
    for c, (_, published_ce) in RESNET50_ACC.items():
        # accuracies are rounded to 0.01 %, so each CE to within ~0.01 points
        assert out["perturbations"][c]["value"] * 100 == pytest.approx(published_ce, abs=0.015), c
    assert out["value"] * 100 == pytest.approx(76.70, abs=0.01)


def test_imagenet_c_published_resnet50_relative_mce():
    out = resnet50_vs_alexnet("relative_mce_vs_baseline")
    assert out["value"] * 100 == pytest.approx(RESNET50_RELATIVE_MCE, abs=0.1)
    once = np.mean([(5 * (1 - acc / 100) - (1 - RESNET50_CLEAN_ACC)) / (5 * ALEXNET_ERR[c] - ALEXNET_CLEAN_ERR)
                    for c, (acc, _) in RESNET50_ACC.items()])
    assert once * 100 == pytest.approx(79.4, abs=0.1)  # the other reading, far from the published number


def test_baseline_against_itself_is_100():
    base = {c: {s: 1 - err for s in range(1, 6)} for c, err in ALEXNET_ERR.items()}
    out = summarize_scores("mce_vs_baseline", point(base), rows(1 - ALEXNET_CLEAN_ERR), baseline=base)
    assert out["value"] == pytest.approx(1.0)  # AlexNet's published mCE is 100 by construction


# ---------------------------------------------------------------------------------------------
# MedMNIST-C: BE and rBE on balanced errors, 2 corruptions x 3 severities, by hand
# ---------------------------------------------------------------------------------------------

# balanced accuracies; balanced errors are 1 - balanced accuracy
MODEL_BA = {"contrast_down": {1: 0.90, 2: 0.80, 3: 0.70}, "pixelate": {1: 0.85, 2: 0.85, 3: 0.55}}
MODEL_BA_CLEAN = 0.92
BASE_BA = {"contrast_down": {1: 0.80, 2: 0.70, 3: 0.60}, "pixelate": {1: 0.70, 2: 0.60, 3: 0.50}}
BASE_BA_CLEAN = 0.90


def test_medmnist_c_be_by_hand():
    # medmnistc/eval.py: BE_c = mean_s(BE) / mean_s(BE^b). contrast: mean(.1,.2,.3) = .2 over mean(.2,.3,.4)
    # = .3 -> 2/3; pixelate: mean(.15,.15,.45) = .25 over mean(.3,.4,.5) = .4 -> 5/8; BE = (2/3 + 5/8)/2 = 31/48
    out = summarize_scores("be", point(MODEL_BA), rows(MODEL_BA_CLEAN), baseline=BASE_BA, baseline_clean=BASE_BA_CLEAN,
                           metric="balanced_accuracy")
    assert out["perturbations"]["contrast_down"]["value"] == pytest.approx(2 / 3)
    assert out["perturbations"]["pixelate"]["value"] == pytest.approx(5 / 8)
    assert out["value"] == pytest.approx(31 / 48)
    assert out["metric"] == "balanced_accuracy"


def test_medmnist_c_rbe_by_hand():
    # rBE_c = (mean_s(BE) - BE_0) / (mean_s(BE^b) - BE^b_0), BE_0 = .08, BE^b_0 = .1
    # contrast: (.2 - .08)/(.3 - .1) = .6; pixelate: (.25 - .08)/(.4 - .1) = 17/30; rBE = (.6 + 17/30)/2 = 7/12
    out = summarize_scores("rbe", point(MODEL_BA), rows(MODEL_BA_CLEAN), baseline=BASE_BA, baseline_clean=BASE_BA_CLEAN)
    assert out["perturbations"]["contrast_down"]["value"] == pytest.approx(0.6)
    assert out["perturbations"]["pixelate"]["value"] == pytest.approx(17 / 30)
    assert out["value"] == pytest.approx(7 / 12)
    assert out["warnings"] == []


def test_medmnist_c_negative_denominator_of_the_published_baseline_warns():
    # francescodisalvo05/medmnistc-api, medmnistc/utils/baselines.py, "pneumoniamnist": the reference
    # model's clean balanced error 0.10085470085470083 and its mean over severities on contrast_up
    # 0.09529914529914527 (lower than clean) and gaussian_blur 0.2730769230769231
    clean_be, contrast_up, blur = 0.10085470085470083, 0.09529914529914527, 0.2730769230769231
    base = {"contrast_up": {s: 1 - contrast_up for s in range(1, 6)},
            "gaussian_blur": {s: 1 - blur for s in range(1, 6)}}
    model = {"contrast_up": {s: rows(0.85) for s in range(1, 6)}, "gaussian_blur": {s: rows(0.7) for s in range(1, 6)}}
    out = summarize_scores("rbe", model, rows(0.9), baseline=base, baseline_clean=1 - clean_be)
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("contrast_up")
    # computed as the paper's formula does, sign and all
    assert out["perturbations"]["contrast_up"]["value"] == pytest.approx((0.15 - 0.1) / (contrast_up - clean_be))
    assert out["perturbations"]["contrast_up"]["value"] < 0


# ---------------------------------------------------------------------------------------------
# ROOD-MRI: severity-weighted degradation, by hand
# ---------------------------------------------------------------------------------------------


def test_rood_degradation_dice_by_hand():
    # clean Dice .90. ghosting at 1,2,3: .88,.80,.70 -> drops .02,.10,.20; weights (2/3)^s = 18/27, 12/27, 8/27:
    # D = (18*.02 + 12*.10 + 8*.20)/(18 + 12 + 8) = 3.16/38
    # motion at 2,4: .85,.60 -> drops .05,.30; weights 36/81, 16/81: D = (36*.05 + 16*.30)/52 = 6.6/52
    dice = {"ghosting": {1: 0.88, 2: 0.80, 3: 0.70}, "motion": {2: 0.85, 4: 0.60}}
    out = summarize_scores("rood_degradation", point(dice), rows(0.90), metric="dice")
    assert out["perturbations"]["ghosting"]["value"] == pytest.approx(3.16 / 38)
    assert out["perturbations"]["motion"]["value"] == pytest.approx(6.6 / 52)
    assert out["value"] == pytest.approx((3.16 / 38 + 6.6 / 52) / 2)
    assert out["alpha"] == pytest.approx(2 / 3) and ROOD_ALPHA == pytest.approx(2 / 3)
    assert out["left_out"] == []


def test_rood_degradation_lower_is_better_and_alpha():
    # HD95 (mm, lower is better), clean 2.0; noise at 1,3,5: 2.5, 4.0, 8.0 -> degradations .5, 2, 6;
    # weights (2/3)^1, ^3, ^5 = 162/243, 72/243, 32/243: D = (162*.5 + 72*2 + 32*6)/266 = 417/266
    hd = {"noise": {1: 2.5, 3: 4.0, 5: 8.0}}
    out = summarize_scores("rood_degradation", point(hd), rows(2.0), higher_is_better=False)
    assert out["value"] == pytest.approx(417 / 266)
    # alpha = 1: the plain mean of the degradations
    flat = summarize_scores("rood_degradation", point(hd), rows(2.0), higher_is_better=False, alpha=1.0)
    assert flat["value"] == pytest.approx((0.5 + 2 + 6) / 3)


def test_rood_degradation_refuses_a_baseline():
    with pytest.raises(ValueError, match="no baseline"):
        summarize_scores("rood_degradation", point({"n": {1: 0.5}}), rows(0.9), baseline={"n": {1: 0.4}})


# ---------------------------------------------------------------------------------------------
# Baselines: shared pairs only, missing baseline, zero denominators
# ---------------------------------------------------------------------------------------------


def test_only_shared_pairs_count_and_the_rest_is_reported():
    model = {"noise": {1: 0.8, 2: 0.7, 3: 0.5}, "blur": {1: 0.9, 2: 0.8}}
    base = {"noise": {1: 0.6, 2: 0.5}, "blur": {1: 0.7, 2: 0.6, 3: 0.5}, "fog": {1: 0.5}, "snow": {2: None}}
    out = summarize_scores("mce_vs_baseline", point(model), rows(0.95), baseline=base)
    # noise at 1,2: (.2+.3)/(.4+.5) = 5/9; blur at 1,2: (.1+.2)/(.3+.4) = 3/7
    assert out["perturbations"]["noise"]["severities"] == [1, 2]
    assert out["perturbations"]["noise"]["value"] == pytest.approx(5 / 9)
    assert out["perturbations"]["blur"]["value"] == pytest.approx(3 / 7)
    assert out["value"] == pytest.approx((5 / 9 + 3 / 7) / 2)
    assert out["left_out"] == [
        {"perturbation": "blur", "severity": 3, "why": "not audited by the model"},
        {"perturbation": "fog", "severity": 1, "why": "not audited by the model"},
        {"perturbation": "noise", "severity": 3, "why": "not audited in the baseline"},
        {"perturbation": "snow", "severity": 2, "why": "undefined in the baseline"},
    ]


def test_severity_keys_from_results_json_are_strings():
    model = {"noise": {"1": rows(0.8), "2": rows(0.7)}}
    out = summarize_scores("mce_vs_baseline", model, rows(0.95), baseline={"noise": {"1": 0.6, "2": 0.5}})
    assert out["value"] == pytest.approx(0.5 / 0.9)


@pytest.mark.parametrize("score", ["mce_vs_baseline", "relative_mce_vs_baseline", "be", "rbe"])
def test_without_a_baseline_the_score_is_none_with_a_reason(score):
    out = summarize_scores(score, point(MODEL_ACC), rows(MODEL_CLEAN))
    assert out["value"] is None and "baseline" in out["reason"]
    json.dumps(out)


@pytest.mark.parametrize("score", ["relative_mce_vs_baseline", "rbe"])
def test_relative_scores_need_the_baseline_clean_value(score):
    out = summarize_scores(score, point(MODEL_ACC), rows(MODEL_CLEAN), baseline=BASE_ACC)
    assert out["value"] is None and "baseline_clean" in out["reason"]


def test_zero_denominators_give_none_with_a_reason():
    model = {"noise": {1: 0.8}, "blur": {1: 0.7}}
    perfect = {"noise": {1: 1.0}, "blur": {1: 0.5}}  # the baseline makes no error under noise
    out = summarize_scores("mce_vs_baseline", point(model), rows(0.95), baseline=perfect, baseline_clean=1.0)
    assert out["perturbations"]["noise"]["value"] is None and "no error" in out["perturbations"]["noise"]["reason"]
    assert out["perturbations"]["blur"]["value"] == pytest.approx(0.3 / 0.5)
    assert out["value"] is None and "noise" in out["reason"]
    flat = {"noise": {1: 0.9}, "blur": {1: 0.9}}  # the baseline does not degrade: relative denominators 0
    rel = summarize_scores("relative_mce_vs_baseline", point(model), rows(0.95), baseline=flat, baseline_clean=0.9)
    assert rel["value"] is None and "denominator 0" in rel["perturbations"]["noise"]["reason"]


def test_no_shared_pair():
    out = summarize_scores("be", point({"noise": {1: 0.8}}), rows(0.9), baseline={"blur": {1: 0.7}})
    assert out["value"] is None and "share no" in out["reason"] and out["n_perturbations"] == 0


def test_unpaired_rows_and_bad_input_are_refused():
    with pytest.raises(ValueError, match="paired"):
        summarize_scores("rood_degradation", {"n": {1: np.zeros(3)}}, np.zeros(4))
    with pytest.raises(ValueError, match="severities"):
        summarize_scores("rood_degradation", {"n": {0: np.zeros(1)}}, np.zeros(1))
    with pytest.raises(ValueError, match="unknown score"):
        summarize_scores("mce", {}, np.zeros(1))


def test_score_metric_keys_are_emitted_by_the_classification_plugin():
    assert set(SCORE_METRIC) == set(SCORES)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    out = ClassificationMetrics().compute(probs, labels, torch.ones(1, 4), MetricContext("binary", ("n", "p")))
    for key in filter(None, SCORE_METRIC.values()):
        assert key in out
    # balanced accuracy here: (1/1 + 2/3)/2; BE = 1 - it
    assert float(out["balanced_accuracy"][0]) == pytest.approx((1 + 2 / 3) / 2)


# ---------------------------------------------------------------------------------------------
# Bootstrap rows: vectorised = row by row; a baseline's constants broadcast
# ---------------------------------------------------------------------------------------------


def random_audit(seed=0, n_rows=41):
    rng = np.random.default_rng(seed)
    clean = 0.9 + 0.02 * rng.standard_normal(n_rows)
    model = {p: {s: clean - 0.05 * s * (1 + k) + 0.02 * rng.standard_normal(n_rows) for s in (1, 2, 3)}
             for k, p in enumerate(("noise", "blur"))}
    base = {p: {s: 0.7 - 0.08 * s * (1 + k) for s in (1, 2, 3)} for k, p in enumerate(("noise", "blur"))}
    return model, clean, base, 0.75


def test_vectorised_functions_equal_row_by_row():
    model, clean, base, base_clean = random_audit()
    for p in model:
        e = 1 - np.stack([model[p][s] for s in (1, 2, 3)])  # [S, 1+R]
        b = 1 - np.array([base[p][s] for s in (1, 2, 3)])   # [S]
        ce = corruption_error(e, b)
        rel = relative_corruption_error(e, 1 - clean, b, 1 - base_clean)
        rd = rood_degradation(1 - e, clean, [1, 2, 3])
        assert ce.shape == rel.shape == rd.shape == clean.shape
        for r in range(clean.size):
            assert ce[r] == pytest.approx(e[:, r].sum() / b.sum())
            assert rel[r] == pytest.approx((e[:, r] - (1 - clean[r])).sum() / (b - (1 - base_clean)).sum())
            w = (2 / 3) ** np.array([1, 2, 3])
            assert rd[r] == pytest.approx((w * (clean[r] - (1 - e[:, r]))).sum() / w.sum())
            assert float(corruption_error(e[:, r], b)) == pytest.approx(ce[r])
            assert float(relative_corruption_error(e[:, r], 1 - clean[r], b, 1 - base_clean)) == pytest.approx(rel[r])
            assert float(rood_degradation(1 - e[:, r], clean[r], [1, 2, 3])) == pytest.approx(rd[r])


@pytest.mark.parametrize("score", ["mce_vs_baseline", "relative_mce_vs_baseline", "rood_degradation"])
def test_interval_is_that_of_the_row_by_row_score(score):
    model, clean, base, base_clean = random_audit(seed=1)
    kwargs = {} if score == "rood_degradation" else {"baseline": base, "baseline_clean": base_clean}
    out = summarize_scores(score, model, clean, **kwargs)
    per_row = []
    for r in range(clean.size):
        one = {p: {s: v[r : r + 1] for s, v in sev.items()} for p, sev in model.items()}
        per_row.append(summarize_scores(score, one, clean[r : r + 1], **kwargs)["value"])
    expected = interval(torch.tensor(per_row, dtype=torch.float64))
    assert out["value"] == pytest.approx(expected["value"])
    assert out["ci_low"] == pytest.approx(expected["ci_low"]) and out["ci_high"] == pytest.approx(expected["ci_high"])
    assert out["ci_low"] < out["value"] < out["ci_high"]
    for p, entry in out["perturbations"].items():
        assert entry["ci_low"] is not None and entry["ci_low"] <= entry["ci_high"]


def test_baseline_constants_broadcast_like_paired_rows():
    model, clean, base, base_clean = random_audit(seed=2)
    e = 1 - np.stack([model["noise"][s] for s in (1, 2, 3)])
    b = 1 - np.array([base["noise"][s] for s in (1, 2, 3)])
    tiled = np.broadcast_to(b[:, None], e.shape)
    np.testing.assert_allclose(corruption_error(e, b), corruption_error(e, tiled))
    np.testing.assert_allclose(relative_corruption_error(e, 1 - clean, b, 1 - base_clean),
                               relative_corruption_error(e, 1 - clean, tiled, np.full(clean.shape, 1 - base_clean)))
    with pytest.raises(ValueError, match="shape"):
        corruption_error(e, b[:2])


def test_nan_rows_are_dropped_from_the_interval_only():
    model, clean, base, base_clean = random_audit(seed=3)
    model["noise"][2] = model["noise"][2].copy()
    model["noise"][2][5] = np.nan  # the metric undefined on one resample
    out = summarize_scores("mce_vs_baseline", model, clean, baseline=base)
    assert out["value"] is not None and out["ci_low"] is not None
    model["noise"][2][0] = np.nan  # undefined on the full data
    out = summarize_scores("mce_vs_baseline", model, clean, baseline=base)
    assert out["value"] is None and "noise" in out["reason"]


def test_mean_over_perturbations():
    np.testing.assert_allclose(mean_over_perturbations([np.array([1.0, 2.0]), np.array([3.0, 6.0])]), [2.0, 4.0])
    with pytest.raises(ValueError):
        mean_over_perturbations([])
