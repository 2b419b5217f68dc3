"""A segmentation audit end to end: masks through the loaders, perturbations, the task's device-side
reduction, the metrics and the CLI, on phantoms whose right answers are known."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medaudit.config import Config
from medaudit.errors import DataError
from medaudit.plugin_manager import get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]


class Threshold(nn.Module):
    """A 'segmentation network' with a known answer: class 1 where the [0, 1] image is above 0.5.

    Two output maps, logits ±20·(x − 0.5): the voxel's class flips exactly at the threshold and the
    outputs are confident, so a phantom whose disc is bright gets Dice 1 on clean images.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 20.0 * (x[:, :1] - 0.5)
        return torch.cat([-z, z], dim=1)


def save_model(path: Path, dims: int) -> Path:
    example = torch.rand(2, 1, *([12] * dims))
    torch.jit.save(torch.jit.trace(Threshold(), example), str(path))
    return path


def disc_phantoms(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs (left-right symmetric about the image's centre column) on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] + 0.5
    images, masks = [], []
    for _ in range(n):
        r = rng.uniform(5, 10)
        cy = rng.uniform(12, 20)
        inside = (yy - cy) ** 2 + (xx - size / 2) ** 2 < r ** 2
        images.append(np.where(inside, 200, 20).astype(np.uint8))
        masks.append(inside.astype(np.uint8))
    return np.stack(images), np.stack(masks)


def run_cli(args: list[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "medaudit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


CONFIG_2D = """\
input: {channels: 1, dims: 2, mean: [0.0], std: [1.0], intensity: {scaling: fixed, max_value: 255}}
task: {type: segmentation, classes: [background, disc]}
audit: {bootstrap: 50, seed: 3}
"""


@pytest.fixture(scope="module")
def seg2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("seg2d")
    images, masks = disc_phantoms(12)
    np.savez(d / "discs.npz", images=images, masks=masks, meta_site=np.array(["a", "b"] * 6))
    (d / "seg.yaml").write_text(CONFIG_2D)
    return save_model(d / "threshold.pt", 2), d / "discs.npz", d / "seg.yaml"


@pytest.fixture(scope="module")
def audit2d(seg2d: tuple[Path, Path, Path]) -> dict:
    model, data, config = seg2d
    out = model.parent / "out"
    res = run_cli(["run", str(model), "--data", str(data), "--config", str(config), "--out", str(out), "--quiet",
                   "--perturbation", "geometry.flip_lr", "--perturbation", "intensity.inversion",
                   "--perturbation", "geometry.translation", "--severities", "1,5",
                   "--fail-on", "geometry.flip_lr@5.drop.dice>0.05"])
    assert res.returncode == 0, res.stderr + res.stdout
    return json.loads((out / "results.json").read_text())


def scenario(results: dict, sid: str) -> dict:
    return next(s for s in results["scenarios"] if s["id"] == sid)


def test_clean_phantoms_score_perfectly(audit2d: dict) -> None:
    clean = scenario(audit2d, "clean")["metrics"]
    assert clean["dice"]["value"] == pytest.approx(1.0)
    assert clean["dice/disc"]["value"] == pytest.approx(1.0)
    assert clean["iou"]["value"] == pytest.approx(1.0)
    assert clean["hd95"]["value"] == pytest.approx(0.0)
    assert clean["nsd"]["value"] == pytest.approx(1.0)
    assert clean["volume_error"]["value"] == pytest.approx(0.0)
    for key in ("ece", "classwise_ece", "brier", "nll", "boundary_ece"):
        assert key in clean and clean[key]["value"] >= 0
    assert "dice/background" not in clean  # the background is not a structure the audit scores
    assert audit2d["model"]["task"] == "segmentation"
    assert audit2d["dataset"]["class_counts"] == {"background": 12, "disc": 12}  # images holding each class


def test_a_geometric_perturbation_moves_the_mask_with_the_image(audit2d: dict) -> None:
    # the discs are symmetric about the flip axis: image and mask flip together, Dice stays 1
    flip = scenario(audit2d, "geometry.flip_lr@5")
    assert flip["metrics"]["dice"]["value"] == pytest.approx(1.0)
    assert audit2d["checks"][0]["passed"] is True
    # a translation moves the disc off its original place: if the mask stayed, Dice would fall
    moved = scenario(audit2d, "geometry.translation@5")["metrics"]["dice"]["value"]
    assert moved > 0.97


def test_an_intensity_perturbation_never_touches_the_mask(audit2d: dict) -> None:
    # inverted intensities: the threshold model labels the background as disc; the reference stays
    inverted = scenario(audit2d, "intensity.inversion@5")
    assert inverted["metrics"]["dice"]["value"] < 0.5
    assert inverted["drop"]["dice"]["significant"] is True


def test_dice_failures_are_analysed_per_scenario(audit2d: dict) -> None:
    seg = audit2d["analyses"]["segmentation"]
    assert seg["failure_threshold"] == pytest.approx(0.8)  # 0.8 × the clean median Dice of 1
    inverted = seg["failure_detection"]["intensity.inversion@5"]["mean_entropy"]
    assert inverted["failures"] == inverted["images"] == 12  # every inverted image fails
    assert seg["failure_detection"]["clean"]["msp"]["failures"] == 0


def test_output_detectors_score_maps_per_image(audit2d: dict) -> None:
    ood = scenario(audit2d, "intensity.inversion@5")["ood"]
    assert {"msp", "entropy", "energy"} <= set(ood)
    # detectors that need a class per image or a linear head are not offered for maps: no noise warnings
    codes = {w["code"] for w in audit2d["warning_records"]}
    assert not {"head-detectors-skipped", "detector-skipped"} & codes, codes


def test_model_output_of_another_size_is_an_error_naming_both_shapes(tmp_path: Path, seg2d: tuple[Path, Path, Path]) -> None:
    class Pool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.nn.functional.avg_pool2d(x[:, :1], 2)
            return torch.cat([-z, z], dim=1)

    model = tmp_path / "pool.pt"
    torch.jit.save(torch.jit.trace(Pool(), torch.rand(2, 1, 8, 8)), str(model))
    _, data, config = seg2d
    res = run_cli(["run", str(model), "--data", str(data), "--config", str(config), "--out", str(tmp_path / "o"),
                   "--quiet", "--perturbation", "intensity.gamma", "--severities", "1"])
    assert res.returncode == 2, res.stdout + res.stderr
    assert "(16, 16)" in res.stderr and "(32, 32)" in res.stderr
    assert not (tmp_path / "o").exists()


def _manifest(tmp_path: Path, masks: list[np.ndarray], shapes_ok: bool = True) -> Path:
    images, _ = disc_phantoms(len(masks))
    rows = ["path,mask,site"]
    for i, m in enumerate(masks):
        Image.fromarray(images[i]).save(tmp_path / f"img{i}.png")
        Image.fromarray(m.astype(np.uint8)).save(tmp_path / f"mask{i}.png")
        rows.append(f"img{i}.png,mask{i}.png,s{i % 2}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "manifest.csv"


def _open(path: Path, classes: list[str]) -> object:
    cfg = Config.model_validate({"input": {"channels": 1, "dims": 2}, "task": {"type": "segmentation", "classes": classes}})
    pm = get_plugin_manager()
    from medaudit.audit import open_dataset
    from medaudit.task import bind_task

    bind_task(cfg, pm.tasks())
    return open_dataset(pm, path, cfg)


def test_manifest_mask_column_reads_label_maps(tmp_path: Path) -> None:
    _, masks = disc_phantoms(4)
    ds = _open(_manifest(tmp_path, list(masks)), ["background", "disc"])
    x, index, extras = ds[2]  # type: ignore[index]
    assert extras["labels"].shape == (32, 32) and torch.equal(extras["labels"].long(), torch.from_numpy(masks[2]).long())
    assert extras["spacing"].tolist() == [1.0, 1.0]
    assert ds.metadata == {"site": ["s0", "s1", "s0", "s1"]}  # type: ignore[attr-defined]


def test_mask_with_a_value_outside_the_classes_names_file_and_row(tmp_path: Path) -> None:
    _, masks = disc_phantoms(3)
    masks[1][0, 0] = 7
    with pytest.raises(DataError, match=r"row 2.* mask value 7, but task.classes names 2 classes"):
        _open(_manifest(tmp_path, list(masks)), ["background", "disc"])


def test_missing_mask_file_names_the_row(tmp_path: Path) -> None:
    _, masks = disc_phantoms(2)
    manifest = _manifest(tmp_path, list(masks))
    (tmp_path / "mask1.png").unlink()
    with pytest.raises(DataError, match=r"row 2: mask file 'mask1.png' does not exist"):
        _open(manifest, ["background", "disc"])


def test_mask_of_another_shape_is_an_error_through_the_cli(tmp_path: Path) -> None:
    _, masks = disc_phantoms(3)
    bad = list(masks)
    bad[2] = np.zeros((16, 16), dtype=np.uint8)
    manifest = _manifest(tmp_path, bad)
    (tmp_path / "seg.yaml").write_text(CONFIG_2D)
    model = save_model(tmp_path / "m.pt", 2)
    res = run_cli(["run", str(model), "--data", str(manifest), "--config", str(tmp_path / "seg.yaml"),
                   "--out", str(tmp_path / "o"), "--quiet", "--perturbation", "intensity.gamma", "--severities", "1"])
    assert res.returncode == 2, res.stdout + res.stderr
    assert "row 3" in res.stderr and "(16, 16)" in res.stderr and "(32, 32)" in res.stderr
    assert not (tmp_path / "o").exists()


def test_npz_masks_of_another_shape_are_refused(tmp_path: Path) -> None:
    images, masks = disc_phantoms(3)
    np.savez(tmp_path / "d.npz", images=images, masks=masks[:, :16])
    with pytest.raises(DataError, match=r"'masks' has shape \(3, 16, 32\) but the images' spatial shape is \(32, 32\)"):
        _open(tmp_path / "d.npz", ["background", "disc"])


def test_3d_nifti_segmentation_audit_end_to_end(tmp_path: Path) -> None:
    """Spheres in anisotropic NIfTI volumes: spacing from the header reaches the surface metrics."""
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:12, :16, :16] + 0.5
    rows = ["path,mask"]
    for i in range(6):
        r = rng.uniform(3, 5)
        inside = (zz - 6) ** 2 + (yy - 8) ** 2 + (xx - 8) ** 2 < r ** 2
        affine = np.diag([2.0, 1.0, 1.0, 1.0])
        nib.save(nib.Nifti1Image(np.where(inside, 200, 20).astype(np.float32), affine), tmp_path / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), tmp_path / f"m{i}.nii.gz")
        rows.append(f"v{i}.nii.gz,m{i}.nii.gz")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "seg.yaml").write_text(CONFIG_2D.replace("dims: 2", "dims: 3"))
    model = save_model(tmp_path / "m.pt", 3)
    out = tmp_path / "out"
    res = run_cli(["run", str(model), "--data", str(tmp_path / "manifest.csv"), "--config", str(tmp_path / "seg.yaml"),
                   "--out", str(out), "--quiet", "--perturbation", "geometry.rotation", "--perturbation", "mri.noise",
                   "--severities", "3"])
    assert res.returncode == 0, res.stderr + res.stdout
    results = json.loads((out / "results.json").read_text())
    clean = scenario(results, "clean")["metrics"]
    assert clean["dice"]["value"] == pytest.approx(1.0)
    rotated = scenario(results, "geometry.rotation@3")["metrics"]
    assert rotated["dice"]["value"] > 0.85  # the mask turned with the sphere (nearest vs linear at the rim)
    assert scenario(results, "mri.noise@3")["metrics"]["hd95"]["value"] >= 0
    from PIL import Image

    # 3D overlays: one slice per sample (severity 3 only: a column for clean and one for 3)
    png = Image.open(io.BytesIO(base64.b64decode(results["assets"]["overlay_best_png"])))
    assert png.size == (250 + 2 * 128, 72 + 2 * 128 + 34)


def test_predictions_hold_per_image_metrics_and_the_saved_label_maps(tmp_path: Path, seg2d: tuple[Path, Path, Path]) -> None:
    model, data, _ = seg2d
    out = tmp_path / "out"
    config = tmp_path / "seg.yaml"
    config.write_text(CONFIG_2D + "output: {save_labelmaps: [intensity.inversion@5]}\n")
    res = run_cli(["run", str(model), "--data", str(data), "--config", str(config), "--out", str(out), "--quiet",
                   "--perturbation", "geometry.flip_lr", "--perturbation", "intensity.inversion", "--severities", "5",
                   "--save-predictions"])
    assert res.returncode == 0, res.stderr + res.stdout
    with np.load(out / "predictions.npz", allow_pickle=False) as npz:
        keys = set(npz.files)
        assert {"dice", "dice_per_class", "hd95", "labelmaps_clean", "labelmaps_intensity.inversion@5"} <= keys
        assert "labels" not in keys and "probs" not in keys and "labelmaps_geometry.flip_lr@5" not in keys
        ids = list(npz["scenario_ids"])
        assert npz["dice"].shape == (3, 12) and npz["dice_per_class"].shape == (3, 12, 2)
        np.testing.assert_allclose(npz["dice"][ids.index("clean")], 1.0)
        clean = npz["labelmaps_clean"]
        assert clean.dtype == np.uint8 and clean.shape == (12, 32, 32)
        _, masks = disc_phantoms(12)
        np.testing.assert_array_equal(clean, masks)  # the threshold model reproduces the discs
        np.testing.assert_array_equal(npz["labelmaps_intensity.inversion@5"], 1 - masks)


def test_unknown_scenario_in_save_labelmaps_is_a_config_error(tmp_path: Path, seg2d: tuple[Path, Path, Path]) -> None:
    model, data, _ = seg2d
    config = tmp_path / "seg.yaml"
    config.write_text(CONFIG_2D + "output: {save_labelmaps: [mri.motion@9]}\n")
    res = run_cli(["run", str(model), "--data", str(data), "--config", str(config), "--out", str(tmp_path / "o"),
                   "--quiet", "--perturbation", "intensity.gamma", "--severities", "1", "--save-predictions"])
    assert res.returncode == 2 and "output.save_labelmaps" in res.stderr and "mri.motion@9" in res.stderr


def test_report_has_the_segmentation_section(audit2d: dict, seg2d: tuple[Path, Path, Path]) -> None:
    html = (seg2d[0].parent / "out" / "report.html").read_text()
    assert 'id="segmentation"' in html
    assert "Dice per class against severity" in html and "Voxel reliability diagram" in html
    assert (seg2d[0].parent / "out" / "tables" / "segmentation-failure_detection.csv").is_file()
    assert "<script" not in html.lower()


def test_subgroups_report_dice_gaps_computed_from_the_maps(tmp_path: Path) -> None:
    """Site 'b' images carry a dim outer ring that the reference includes but the threshold model
    calls background: the subgroup analysis must find site b's Dice lower by exactly what the
    maps say, and the `subgroup.site.dice_gap` gate must fail on it."""
    images, masks = disc_phantoms(24, seed=5)
    site = np.array(["a", "b"] * 12)
    yy, xx = np.mgrid[:32, :32] + 0.5
    for i in np.flatnonzero(site == "b"):
        ring = masks[i].astype(bool)
        # grow the reference by a 2-pixel ring the image shows at 100 (below the model's threshold)
        grown = np.zeros_like(ring)
        cy, cx = np.argwhere(ring).mean(axis=0) + 0.5
        r = np.sqrt(ring.sum() / np.pi)
        grown = (yy - cy) ** 2 + (xx - cx) ** 2 < (r + 2) ** 2
        images[i] = np.where(ring, 200, np.where(grown, 100, 20))
        masks[i] = grown.astype(np.uint8)
    np.savez(tmp_path / "sites.npz", images=images, masks=masks, meta_site=site)
    (tmp_path / "seg.yaml").write_text(CONFIG_2D + "subgroups: {attributes: [site], min_group_size: 5, permutations: 199}\n")
    model = save_model(tmp_path / "threshold.pt", 2)
    out = tmp_path / "out"
    res = run_cli(["run", str(model), "--data", str(tmp_path / "sites.npz"), "--config", str(tmp_path / "seg.yaml"),
                   "--out", str(out), "--quiet", "--perturbation", "mri.noise", "--severities", "5",
                   "--fail-on", "subgroup.site.dice_gap>0.05"])
    assert res.returncode == 1, res.stderr + res.stdout
    results = json.loads((out / "results.json").read_text())
    pred = images > 127.5  # the model's answer on clean images
    dice = 2 * (pred & (masks == 1)).sum(axis=(1, 2)) / (pred.sum(axis=(1, 2)) + (masks == 1).sum(axis=(1, 2)))
    groups = {(g["scenario"], g["group"]): g for g in results["subgroups"] if g["attribute"] == "site"}
    for name in ("a", "b"):
        assert groups[("clean", name)]["metrics"]["dice"]["value"] == pytest.approx(dice[site == name].mean(), abs=1e-9)
    assert dice[site == "a"].mean() == pytest.approx(1.0)
    gap = next(g for g in results["analyses"]["subgroup_gaps"] if g["scenario"] == "clean" and g["metric"] == "dice")
    assert gap["worst_group"] == "b"
    assert gap["gap"]["value"] == pytest.approx(dice[site == "a"].mean() - dice[site == "b"].mean(), abs=1e-9)
    assert gap["p_value"] < 0.05
    # the perturbed scenario reports the segmentation headline metrics per group, with drops
    noisy = groups[("mri.noise@5", "b")]
    assert {"dice", "nsd", "hd95"} <= set(noisy["metrics"]) and "dice" in noisy["drop"]
    check = next(c for c in results["checks"] if c["expr"].startswith("subgroup.site.dice_gap"))
    assert not check["passed"] and check["value"] == pytest.approx(gap["gap"]["value"], abs=1e-9)


def site_phantoms(tmp_path: Path) -> Path:
    """24 disc phantoms whose site-b images carry a dim reference ring the model misses (Dice < 1)."""
    images, masks = disc_phantoms(24, seed=5)
    site = np.array(["a", "b"] * 12)
    yy, xx = np.mgrid[:32, :32] + 0.5
    for i in np.flatnonzero(site == "b"):
        disc = masks[i].astype(bool)
        cy, cx = np.argwhere(disc).mean(axis=0) + 0.5
        grown = (yy - cy) ** 2 + (xx - cx) ** 2 < (np.sqrt(disc.sum() / np.pi) + 1 + i % 3) ** 2
        images[i] = np.where(disc, 200, np.where(grown, 100, 20))
        masks[i] = grown.astype(np.uint8)
    np.savez(tmp_path / "sites.npz", images=images, masks=masks, meta_site=site)
    return tmp_path / "sites.npz"


def test_overlay_samples_are_best_median_and_worst_without_repeats() -> None:
    from medaudit.overlays import pick_samples

    q = torch.tensor([0.5, float("nan"), 0.9, 0.1, 0.9, 0.7])
    assert pick_samples(q) == [("best", 2), ("median", 5), ("worst", 3)]  # ties: the lower index
    assert pick_samples(torch.tensor([0.3, 0.8])) == [("best", 1), ("worst", 0)]  # lower median = worst
    assert pick_samples(torch.tensor([0.4])) == [("best", 0)]
    assert pick_samples(torch.tensor([float("nan")])) == []


def test_overlay_replay_shows_what_the_audit_scored(tmp_path: Path) -> None:
    """Replayed panels (image, moved reference, prediction) are labelled with the audit's scores, and
    the maps they draw score exactly that for those samples, perturbations that move the anatomy
    included."""
    from medaudit.audit import prepare
    from medaudit.config import load_config
    from medaudit.overlays import overlay_grid, replay
    from medaudit.runner import run_forward
    from medaudit.task import task_of

    data = site_phantoms(tmp_path)
    config = CONFIG_2D.replace("audit: {", "audit: {suites: [], perturbations: [geometry.rotation, mri.noise], "
                                          "severities: [1, 3, 5], ")
    (tmp_path / "seg.yaml").write_text(config)
    model = save_model(tmp_path / "threshold.pt", 2)
    prep = prepare(get_plugin_manager(warn=lambda m: None), model, data, load_config(tmp_path / "seg.yaml"))
    fwd = run_forward(prep.model, prep.extract, prep.dataset, prep.config, prep.scenarios, prep.perturbations,
                      prep.device)
    task = task_of(prep.config.task)
    indices = [1, 6, 23]
    audited = {sc.id: task.sample_quality({k: v[s] for k, v in fwd.outputs.items()}, prep.config.task)
               for s, sc in enumerate(fwd.scenarios)}
    panels = replay(prep.dataset, indices, prep.config, prep.extract, fwd.scenarios, prep.perturbations, fwd, prep.device,
                    audited)
    columns, rows = overlay_grid(fwd.scenarios)
    assert columns == [1, 3, 5] and list(rows) == ["geometry.rotation", "mri.noise"]
    for sc in fwd.scenarios:
        for j, i in enumerate(indices):
            panel = panels[j][sc.id]
            assert panel.quality == float(audited[sc.id][i])  # labelled with the audit's score
            # and the drawn maps are the ones that score it: the foreground Dice of what is drawn
            pred, ref = panel.prediction == 1, panel.reference == 1
            drawn_dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
            assert drawn_dice == pytest.approx(panel.quality, abs=1e-6), (sc.id, i)  # the audit keeps float32
    clean = panels[0]["clean"]
    with np.load(data) as d:
        np.testing.assert_array_equal(clean.reference, d["masks"][1])
        np.testing.assert_allclose(clean.image, d["images"][1] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(clean.prediction, clean.image > 0.5)
    rotated = panels[0]["geometry.rotation@5"]
    assert not np.array_equal(rotated.reference, clean.reference)  # the reference moved with the image


def test_report_draws_overlays_of_the_best_median_and_worst_clean_samples(tmp_path: Path) -> None:
    from html import unescape

    from PIL import Image

    data = site_phantoms(tmp_path)
    (tmp_path / "seg.yaml").write_text(CONFIG_2D)
    model = save_model(tmp_path / "threshold.pt", 2)
    out = tmp_path / "out"
    res = run_cli(["run", str(model), "--data", str(data), "--config", str(tmp_path / "seg.yaml"), "--out", str(out),
                   "--quiet", "--perturbation", "mri.noise", "--perturbation", "intensity.gamma", "--severities", "1,3,5",
                   "--save-predictions"])
    assert res.returncode == 0, res.stderr + res.stdout
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "predictions.npz") as p:
        dice = p["dice"][list(p["scenario_ids"]).index("clean")]
        ids = list(p["sample_ids"])
    order = np.argsort(-dice, kind="stable")
    expected = {"best": ids[order[0]], "median": ids[order[(len(order) - 1) // 2]], "worst": ids[order[-1]]}
    html = (out / "report.html").read_text()
    for pos, sid in expected.items():
        alt = results["assets"][f"overlay_{pos}_alt"]
        assert alt.startswith(f"Sample {sid}, the {pos} of the clean data")
        assert f"{dice[ids.index(sid)]:.3f} clean" in alt
        png = Image.open(io.BytesIO(base64.b64decode(results["assets"][f"overlay_{pos}_png"])))
        # a title row, two perturbation rows, a legend; clean + severities 1, 3, 5
        assert png.size == (250 + 4 * 128, 72 + 2 * 128 + 34)
        assert f'alt="{alt}"' in unescape(html)
    assert dice[ids.index(expected["worst"])] < 0.9 < dice[ids.index(expected["best"])]


def test_preprocessing_probe_scores_voxels_of_a_segmentation_model(tmp_path: Path, seg2d: tuple[Path, Path, Path]) -> None:
    """/25 instead of /255 puts every voxel above the threshold model's cut: a constant map, voxel
    balanced accuracy 1/2 (chance for two classes); min-max scaling gives it back (1.00)."""
    model, data, config = seg2d
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(config.read_text().replace("max_value: 255", "max_value: 25"))
    out = tmp_path / "out"
    res = run_cli(["run", str(model), "--data", str(data), "--config", str(wrong), "--out", str(out), "--quiet",
                   "--perturbation", "mri.noise", "--severities", "1"])
    assert res.returncode == 0, res.stderr + res.stdout
    message = ("with `input.intensity.scaling: minmax` the model scores a voxel balanced accuracy of 1.00 on 12 probe "
               "samples (0.50 as configured)")
    assert message in res.stderr
    results = json.loads((out / "results.json").read_text())
    alert = next(w for w in results["warning_records"] if w["code"] == "preprocessing-suspect")
    assert alert["alert"] and message in alert["message"]
    # the correct spec raises nothing
    assert "preprocessing-suspect" not in run_cli(["run", str(model), "--data", str(data), "--config", str(config),
                                                   "--out", str(tmp_path / "ok"), "--quiet", "--perturbation",
                                                   "mri.noise", "--severities", "1"]).stderr


class TwoThresholds(nn.Module):
    """Two sigmoid structures with known answers: 'outer' where the [0, 1] image is above 0.3,
    'inner' where it is above 0.6 (inner lies inside outer: the structures overlap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([20.0 * (x[:, :1] - 0.3), 20.0 * (x[:, :1] - 0.6)], dim=1)


def nested_discs(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An outer disc (intensity 120) holding an inner disc (220): masks [N, 2, H, W], one 0/1 map per structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] + 0.5
    images, masks = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(13, 19), rng.uniform(13, 19), rng.uniform(7, 11)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        outer, inner = d2 < r ** 2, d2 < (r / 2) ** 2
        images.append(np.where(inner, 220, np.where(outer, 120, 10)).astype(np.uint8))
        masks.append(np.stack([outer, inner]).astype(np.uint8))
    return np.stack(images), np.stack(masks)


CONFIG_SIGMOID = """\
input: {channels: 1, dims: 2, mean: [0.0], std: [1.0], intensity: {scaling: fixed, max_value: 255}}
task: {type: segmentation, classes: [outer, inner], activation: sigmoid, background: null}
audit: {bootstrap: 50, seed: 3}
"""


def test_overlapping_structures_of_a_sigmoid_model_end_to_end(tmp_path: Path) -> None:
    images, masks = nested_discs(10)
    np.savez(tmp_path / "nested.npz", images=images, masks=masks)
    (tmp_path / "seg.yaml").write_text(CONFIG_SIGMOID)
    model = tmp_path / "two.pt"
    torch.jit.save(torch.jit.trace(TwoThresholds(), torch.rand(2, 1, 12, 12)), str(model))
    out = tmp_path / "out"
    res = run_cli(["run", str(model), "--data", str(tmp_path / "nested.npz"), "--config", str(tmp_path / "seg.yaml"),
                   "--out", str(out), "--quiet", "--perturbation", "geometry.rotation", "--perturbation", "mri.noise",
                   "--severities", "1,5", "--save-predictions"])
    assert res.returncode == 0, res.stderr + res.stdout
    results = json.loads((out / "results.json").read_text())
    clean = scenario(results, "clean")["metrics"]
    for key in ("dice", "dice/outer", "dice/inner", "nsd"):
        assert clean[key]["value"] == pytest.approx(1.0), key
    assert clean["hd95"]["value"] == pytest.approx(0.0)
    # both structures turn with the image: nearest-neighbour masks against linearly resampled discs
    assert scenario(results, "geometry.rotation@5")["metrics"]["dice/inner"]["value"] > 0.8
    with np.load(out / "predictions.npz") as p:
        maps = p["labelmaps_clean"]
        assert maps.shape == (10, 2, 32, 32) and maps.dtype == np.uint8
        np.testing.assert_array_equal(maps, masks)  # overlapping predicted structures, each its own map
    assert "overlay_best_png" in results["assets"]


def test_structure_masks_need_a_sigmoid_model_and_values_0_or_1(tmp_path: Path) -> None:
    images, masks = nested_discs(4)
    np.savez(tmp_path / "nested.npz", images=images, masks=masks)
    (tmp_path / "softmax.yaml").write_text(CONFIG_SIGMOID.replace("activation: sigmoid", "activation: softmax"))
    model = tmp_path / "two.pt"
    torch.jit.save(torch.jit.trace(TwoThresholds(), torch.rand(2, 1, 12, 12)), str(model))
    res = run_cli(["run", str(model), "--data", str(tmp_path / "nested.npz"), "--config", str(tmp_path / "softmax.yaml"),
                   "--out", str(tmp_path / "o1"), "--quiet"])
    assert res.returncode == 2 and "needs task.activation: sigmoid" in res.stderr and "row 1" in res.stderr
    assert not (tmp_path / "o1").exists()
    masks[2, 1, 5, 5] = 3
    np.savez(tmp_path / "bad.npz", images=images, masks=masks)
    (tmp_path / "seg.yaml").write_text(CONFIG_SIGMOID)
    res = run_cli(["run", str(model), "--data", str(tmp_path / "bad.npz"), "--config", str(tmp_path / "seg.yaml"),
                   "--out", str(tmp_path / "o2"), "--quiet"])
    assert res.returncode == 2 and "bad.npz" in res.stderr and "row 3" in res.stderr and "value 3" in res.stderr


def test_manifest_structure_masks_from_channel_files(tmp_path: Path) -> None:
    """K-channel .npy mask files in a manifest are read as structure maps (bool [K, *S])."""
    from medaudit.config import load_config

    images, masks = nested_discs(3, seed=4)
    rows = ["path,mask"]
    for i in range(3):
        np.save(tmp_path / f"i{i}.npy", images[i])
        np.save(tmp_path / f"m{i}.npy", masks[i])
        rows.append(f"i{i}.npy,m{i}.npy")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "seg.yaml").write_text(CONFIG_SIGMOID)
    from medaudit.audit import open_dataset

    dataset = open_dataset(get_plugin_manager(warn=lambda m: None), tmp_path / "manifest.csv",
                           load_config(tmp_path / "seg.yaml"), role="--data")
    _, _, extras = dataset[1]
    assert extras["labels"].shape == (2, 32, 32)
    np.testing.assert_array_equal(extras["labels"].numpy(), masks[1])
    np.testing.assert_array_equal(dataset.labels, np.ones((3, 2)))  # both structures in every image
