"""The bundled segmentation example (examples/segmentation_model.pt on examples/mni-slices/test.npz with
examples/mni-slices.yaml) audited through the CLI on a reduced scenario set, and the committed
test.npz checked against what examples/build_segmentation_example.py makes from the template."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medaudit.cli import cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "segmentation_model.pt"
DATA = EXAMPLES / "mni-slices" / "test.npz"
CONFIG = EXAMPLES / "mni-slices.yaml"
SHARED = ROOT.parent / "shared" / "data" / "mni152"

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, dict[str, Any]]:
    """Exit code, output folder and results.json of the example's audit under two perturbations."""
    out = tmp_path_factory.mktemp("segmentation-example") / "out"
    result = CliRunner().invoke(cli, [
        "run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet",
        "--perturbation", "mri.noise", "--perturbation", "geometry.flip_lr", "--severities", "1,5",
        "--bootstrap", "100",
    ])
    assert (out / "results.json").exists(), result.output
    return result.exit_code, out, json.loads((out / "results.json").read_text())


def scenario(results: dict[str, Any], sid: str) -> dict[str, Any]:
    return next(s for s in results["scenarios"] if s["id"] == sid)


def test_the_example_passes_its_check_with_a_good_clean_dice(audit: tuple[int, Path, dict[str, Any]]) -> None:
    code, out, results = audit
    assert code == 0  # the config's only check, "clean.dice<0.8", passes
    assert [(c["passed"]) for c in results["checks"]] == [True]
    clean = scenario(results, "clean")["metrics"]
    assert clean["dice"]["value"] >= 0.85
    assert clean["dice/grey_matter"]["value"] >= 0.85
    assert clean["dice/white_matter"]["value"] >= 0.85
    assert "dice/background" not in clean
    assert results["model"]["task"] == "segmentation"
    assert results["dataset"]["class_counts"] == {"background": 44, "grey_matter": 44, "white_matter": 44}
    assert (out / "report.html").exists()


def test_strong_noise_breaks_the_example_and_a_flip_does_not(audit: tuple[int, Path, dict[str, Any]]) -> None:
    _, _, results = audit
    noise = scenario(results, "mri.noise@5")["drop"]["dice"]
    assert noise["value"] > 0.2 and noise["significant"] is True  # 0.93 → 0.62 at the time of writing
    # trained with left-right flips: flipping image and mask together costs (almost) nothing
    assert abs(scenario(results, "geometry.flip_lr@5")["drop"]["dice"]["value"]) < 0.01
    assert "mri.noise" in results["verdict"]["breaking"]
    assert "geometry.flip_lr" not in results["verdict"]["breaking"]


def test_feature_detectors_run_on_the_bottleneck_and_levels_are_stratified(
        audit: tuple[int, Path, dict[str, Any]]) -> None:
    _, _, results = audit
    ood = scenario(results, "mri.noise@5")["ood"]
    for detector in ("mahalanobis", "knn", "spectral"):  # model.feature_layer: bottleneck
        assert ood[detector]["auroc"]["value"] is not None
    groups = {g["group"]: g["n"] for g in results["subgroups"] if g["scenario"] == "clean" and g["attribute"] == "level"}
    assert groups == {"inferior": 16, "middle": 16, "superior": 12}


def test_the_model_is_a_small_torchscript_unet_with_logits_per_pixel() -> None:
    assert MODEL.stat().st_size < 1_000_000 and DATA.stat().st_size < 1_000_000
    model = torch.jit.load(str(MODEL)).eval()
    assert "bottleneck" in dict(model.named_children())
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 96, 96)).shape == (2, 3, 96, 96)


@pytest.mark.skipif(not (SHARED / "t1.nii.gz").exists(), reason=f"the MNI152 template is not at {SHARED}")
def test_committed_test_set_is_what_the_builder_makes(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(EXAMPLES / "build_segmentation_example.py"), "--shared", str(SHARED),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    with np.load(DATA) as committed, np.load(tmp_path / "test.npz") as built:
        assert sorted(committed.files) == sorted(built.files) == ["images", "masks", "meta_level"]
        for key in built.files:
            assert committed[key].dtype == built[key].dtype, key
            np.testing.assert_array_equal(committed[key], built[key], err_msg=key)
        images, masks = built["images"], built["masks"]
    assert images.shape == masks.shape == (44, 96, 96) and images.dtype == masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1, 2}
