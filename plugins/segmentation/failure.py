"""Dice-failure detection: how well each detector's score, and the mean voxel entropy, flag the
images a segmentation model gets wrong.

An image *fails* when its Dice (the mean over its foreground classes) falls below
``task.failure_dice``, by default 0.8 × the clean median Dice. Per scenario and score, the AUROC of
the score at separating failed images from the others (ties ½, bootstrap interval over images,
the audit's weights); images without a Dice (no foreground class in the reference) or without a
score (a sample used to fit a cross-fitted detector) carry no weight. Also per scenario: the
Spearman correlation of per-image uncertainty (mean voxel entropy) with Dice — negative when the
model is more uncertain where it fails, as it should be.
"""

from __future__ import annotations

from typing import Any

import torch
from scipy.stats import spearmanr

from medaudit.bootstrap import interval
from medaudit.config import Config
from medaudit.ood_metrics import auroc_within
from medaudit.outputs import AuditOutputs

from .metrics import foreground

#: The name the mean voxel entropy is reported under among the detectors' scores.
ENTROPY = "mean_entropy"


def failure_analysis(outputs: AuditOutputs, config: Config) -> dict[str, Any]:
    """``analyses["segmentation"]``: the failure threshold, failure detection per scenario and
    score, and the uncertainty–Dice correlation per scenario."""
    per_class = outputs.quantities["dice"].double()  # [S, N, K]
    dice = torch.nanmean(per_class[..., foreground(per_class.shape[-1], config.task.background)], dim=-1)  # [S, N]
    clean = outputs.index("clean")
    if config.task.failure_dice is not None:
        threshold, source = float(config.task.failure_dice), "task.failure_dice"
    else:
        median = torch.nanmedian(dice[clean])
        threshold, source = 0.8 * float(median), "0.8 × the clean median Dice"
    scores = {**outputs.ood_scores, ENTROPY: outputs.quantities["entropy"]}
    weights = outputs.bootstrap_weights.double()
    detection: dict[str, dict[str, Any]] = {}
    correlation: dict[str, float | None] = {}
    for s, scenario in enumerate(outputs.scenarios):
        failed = dice[s] < threshold
        for name, score in scores.items():
            row = score[s].double()
            valid = ~torch.isnan(row) & ~torch.isnan(dice[s])
            auc = auroc_within(torch.where(valid, row, 0.0)[None], failed[None], weights * valid[None])[0]
            detection.setdefault(scenario.id, {})[name] = {
                "auroc": interval(auc, outputs.confidence), "failures": int((failed & valid).sum()),
                "images": int(valid.sum())}
        entropy = outputs.quantities["entropy"][s].double()
        ok = ~torch.isnan(dice[s]) & ~torch.isnan(entropy)
        x, y = entropy[ok], dice[s][ok]
        # undefined for fewer than 3 images or a constant side (e.g. Dice 1 everywhere)
        defined = len(x) > 2 and bool(x.std() > 0) and bool(y.std() > 0)
        rho = spearmanr(x.numpy(), y.numpy()).statistic if defined else float("nan")
        correlation[scenario.id] = None if rho != rho else float(rho)
    return {"failure_threshold": threshold, "failure_threshold_source": source,
            "failure_detection": detection, "uncertainty_dice_correlation": correlation}
