"""The model-free floor: intensity histograms against numpy, and through a whole audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from medaudit.plugins.ood import Histogram, intensity_histograms

ROOT = Path(__file__).resolve().parents[1]


def test_histograms_equal_numpy_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 9, 7, generator=g)
    images[0, 0, 0, 0], images[1, 1, 2, 3] = 1.0, 0.0  # the closed last bin and the first edge
    got = intensity_histograms(images, 8)
    for i in range(3):
        expected = np.concatenate([np.histogram(images[i, c].numpy(), bins=8, range=(0.0, 1.0))[0] / 63.0
                                   for c in range(2)])
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=0, atol=1e-7)


def test_score_is_the_distance_to_the_kth_nearest_reference_histogram() -> None:
    g = torch.Generator().manual_seed(1)
    ref, query = torch.rand(30, 1, 6, 6, generator=g), torch.rand(5, 1, 6, 6, generator=g) ** 3
    det = Histogram(bins=10, k=4)
    bank = det.embed(None, ref)
    det.fit(bank, torch.zeros(30, dtype=torch.long))
    q = det.embed(None, query)
    d = np.sqrt(((q.double().numpy()[:, None] - bank.double().numpy()[None]) ** 2).sum(-1))
    np.testing.assert_allclose(det.score(q).numpy(), np.sort(d, axis=1)[:, 3], rtol=1e-12)


def test_the_histogram_floor_sees_an_intensity_shift_in_an_audit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "medaudit.cli", "run", str(ROOT / "examples" / "model.pt"), "--data",
                          str(ROOT / "examples" / "mni-patches" / "test.npz"), "--config",
                          str(ROOT / "examples" / "mni-patches.yaml"), "--out", str(out), "--quiet",
                          "--perturbation", "intensity.gamma", "--perturbation", "intensity.inversion", "--severities", "5",
                          "--bootstrap", "50"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode in (0, 1), res.stderr
    results = json.loads((out / "results.json").read_text())
    ood = {s["id"]: s["ood"] for s in results["scenarios"] if s["id"] != "clean"}
    assert ood["intensity.inversion@5"]["histogram"]["auroc"]["value"] > 0.99  # every histogram mirrored
    assert ood["intensity.gamma@5"]["histogram"]["auroc"]["value"] > 0.8  # 0.89 at the time of writing
