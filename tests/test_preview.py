"""Preview grid and single-image perturb I/O (medaudit.preview, medaudit.imagefile)."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medaudit.errors import DataError
from medaudit.imagefile import perturb_array, perturb_file, read_image, single_sample_rng, write_image
from medaudit.plugins import mri
from medaudit.plugins.geometry import FlipLR, Rotation
from medaudit.plugins.intensity import Gamma
from medaudit.plugins.xray import Grid, Noise
from medaudit.preview import CELL_PX, LABEL_PX, TITLE_PX, grid_png_bytes, preview_grid, save_grid_png

# ---------------------------------------------------------------------------------------------
# Preview grid
# ---------------------------------------------------------------------------------------------


def expected_shape(rows: int) -> tuple[int, int, int]:
    return (TITLE_PX + CELL_PX * rows, LABEL_PX + CELL_PX * 6, 3)


def test_grid_shape_2d_and_3d(mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    grid = preview_grid(mni_slices[0], [Gamma, Noise, Rotation], seed=0)
    assert grid.dtype == np.uint8 and grid.shape == expected_shape(3)
    grid3 = preview_grid(mni_volumes[0], [Gamma, Grid], seed=0)  # Grid is 2-D only: a labelled blank row
    assert grid3.shape == expected_shape(2)


def test_grid_cells_show_the_perturbed_image(mni_slices: torch.Tensor) -> None:
    clean = preview_grid(mni_slices[0], [FlipLR], seed=0)
    panels = [clean[TITLE_PX + 10: TITLE_PX + CELL_PX - 10, LABEL_PX + k * CELL_PX + 10: LABEL_PX + (k + 1) * CELL_PX - 10].astype(int)
              for k in range(6)]
    # severity 5 flips for sure: its panel differs from the clean one; severity 0 column is the clean image
    assert np.abs(panels[5] - panels[0]).mean() > 5
    # and the grid is deterministic in the seed
    assert np.array_equal(clean, preview_grid(mni_slices[0], [FlipLR], seed=0))


def test_grid_uses_middle_slice(mni_volumes: torch.Tensor) -> None:
    vol = mni_volumes[0]
    a = preview_grid(vol, [Gamma], seed=1)
    b = preview_grid(vol[:, vol.shape[1] // 2: vol.shape[1] // 2 + 1].expand_as(vol).contiguous(), [Gamma], seed=1)
    assert np.array_equal(a, b)


def test_grid_png(tmp_path, mni_slices: torch.Tensor) -> None:
    grid = preview_grid(mni_slices[1], [Gamma], seed=3)
    save_grid_png(grid, tmp_path / "g.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), grid)
    data = grid_png_bytes(mni_slices[1], [Gamma], seed=3)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), grid)


def test_grid_invalid_arguments(mni_slices: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"image must be a \[C, H, W\] or \[C, D, H, W\] tensor, got torch.Size\(\[4, 1, 128, 128, 1\]\)"):
        preview_grid(mni_slices[..., None], [Gamma], 0)
    with pytest.raises(ValueError, match=r"image intensities must be in \[0, 1\], got range \[0, 1.84314\]"):
        preview_grid(mni_slices[0] * 2, [Gamma], 0)
    with pytest.raises(TypeError, match=r"perturbations must be Perturbation subclasses, got 'intensity.gamma'"):
        preview_grid(mni_slices[0], ["intensity.gamma"], 0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"perturbations must name at least one perturbation class"):
        preview_grid(mni_slices[0], [], 0)
    with pytest.raises(ValueError, match=r"grid must be a uint8 \[height, width, 3\] array, got float64"):
        save_grid_png(np.zeros((4, 4, 3)), "x.png")


# ---------------------------------------------------------------------------------------------
# Image files and perturb_file
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def slice_u8(mni_slices: torch.Tensor) -> np.ndarray:
    return np.round(mni_slices[0, 0].numpy() * 255).astype(np.uint8)


def test_png_round_trip_8_16_rgb(tmp_path, slice_u8: np.ndarray) -> None:
    Image.fromarray(slice_u8).save(tmp_path / "a.png")
    arr, meta = read_image(tmp_path / "a.png")
    assert arr.shape == (1, 128, 128) and arr.dtype == np.float32 and meta["bit_depth"] == 8
    write_image(tmp_path / "b.png", arr, meta)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), slice_u8)

    u16 = slice_u8.astype(np.uint16) * 257
    Image.fromarray(u16).save(tmp_path / "c.png")
    arr16, meta16 = read_image(tmp_path / "c.png")
    assert meta16["bit_depth"] == 16 and arr16.max() == u16.max()
    write_image(tmp_path / "d.png", arr16, meta16)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d.png")), u16)

    rgb = np.stack([slice_u8, slice_u8[::-1], slice_u8.T], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "e.png")
    arr_rgb, meta_rgb = read_image(tmp_path / "e.png")
    assert arr_rgb.shape == (3, 128, 128)
    write_image(tmp_path / "f.png", arr_rgb, meta_rgb)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "f.png")), rgb)


def test_nifti_and_npy_round_trip(tmp_path, mni_volumes: torch.Tensor) -> None:
    vol = mni_volumes[0, 0].numpy() * 1000.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-90, -126, -72]
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "v.nii.gz")
    arr, meta = read_image(tmp_path / "v.nii.gz")
    assert arr.shape == (1, 48, 48, 48)
    write_image(tmp_path / "w.nii", arr, meta)
    back = nib.load(tmp_path / "w.nii")
    assert np.array_equal(back.affine, affine) and np.allclose(np.asarray(back.dataobj), vol)

    np.save(tmp_path / "s.npy", vol[10])
    arr2, meta2 = read_image(tmp_path / "s.npy")
    assert arr2.shape == (1, 48, 48) and meta2["squeezed"]
    write_image(tmp_path / "t.npy", arr2, meta2)
    assert np.load(tmp_path / "t.npy").shape == (48, 48)


def test_perturb_file_keeps_range_and_matches_seeding(tmp_path, mni_volumes: torch.Tensor) -> None:
    vol = mni_volumes[0, 0].numpy() * 800.0 + 100.0  # range [100 + ..., 900]: not [0, 1]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "in.nii.gz")
    record = perturb_file(tmp_path / "in.nii.gz", tmp_path / "out.nii.gz", Noise, 3, seed=7)
    out = nib.load(tmp_path / "out.nii.gz")
    data = np.asarray(out.dataobj)
    lo, hi = float(vol.min()), float(vol.max())
    assert np.array_equal(out.affine, affine)
    assert data.min() >= lo - 1e-3 and data.max() <= hi + 1e-3 and not np.allclose(data, vol)
    # same result as perturbing the min-max scaled image with sample 0 of stream (seed, name, severity)
    x = torch.from_numpy((vol - lo) / (hi - lo)).float()[None, None]
    y, _ = Noise()(x, 3, single_sample_rng(7, "xray.noise", 3))
    np.testing.assert_allclose(data, y[0, 0].numpy() * (hi - lo) + lo, atol=1e-3)
    assert record["range"] == [lo, hi] and record["perturbation"] == "xray.noise" and "noise_key" in record["params"]
    # deterministic in the seed
    perturb_file(tmp_path / "in.nii.gz", tmp_path / "again.nii.gz", Noise, 3, seed=7)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "again.nii.gz").dataobj), data)


def test_perturb_png(tmp_path, slice_u8: np.ndarray) -> None:
    Image.fromarray(slice_u8).save(tmp_path / "in.png")
    perturb_file(tmp_path / "in.png", tmp_path / "out.png", Gamma, 5, seed=0)
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.dtype == np.uint8 and out.shape == slice_u8.shape and not np.array_equal(out, slice_u8)
    perturb_file(tmp_path / "in.png", tmp_path / "same.png", Gamma, 0, seed=0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "same.png")), slice_u8)


def test_perturb_npy_volume_with_dims(tmp_path, mni_volumes: torch.Tensor) -> None:
    """A (D, H, W) .npy is a single-channel volume with --dims 3 (3-D motion, written back 3-D);
    without it the same array is read as (C, H, W) slices; a wrong --dims is named."""
    from click.testing import CliRunner

    from medaudit.cli import cli

    vol = mni_volumes[0, 0].numpy()
    np.save(tmp_path / "vol.npy", vol)
    res = CliRunner().invoke(cli, ["perturb", str(tmp_path / "vol.npy"), "-p", "mri.motion", "-s", "5", "--seed", "1",
                                   "--dims", "3", "-o", str(tmp_path / "out.npy")])
    assert res.exit_code == 0, res.output
    out = np.load(tmp_path / "out.npy")
    assert out.shape == vol.shape and not np.allclose(out, vol)
    # the same as perturbing the [1, 1, D, H, W] volume directly (min-max scaled, sample 0 of the stream)
    lo, hi = float(vol.min()), float(vol.max())
    y, _ = mri.Motion()(torch.from_numpy((vol - lo) / (hi - lo)).float()[None, None], 5, single_sample_rng(1, "mri.motion", 5))
    np.testing.assert_allclose(out, y[0, 0].numpy() * (hi - lo) + lo, atol=1e-4)
    as_slices, meta = read_image(tmp_path / "vol.npy")
    assert as_slices.shape == vol.shape and not meta["squeezed"]  # (C, H, W): 48 channels of 2-D slices
    np.save(tmp_path / "vol4.npy", vol[None])
    with pytest.raises(DataError, match=r"vol4\.npy: expected a \(H, W\) or \(C, H, W\) array for 2-D images, got 4 dimensions"):
        read_image(tmp_path / "vol4.npy", dims=2)
    Image.fromarray((vol[24] * 255).astype(np.uint8)).save(tmp_path / "slice.png")
    with pytest.raises(DataError, match=r"slice\.png: is a 2-D image \(channel-first shape \(1, 48, 48\)\), not 3-D"):
        read_image(tmp_path / "slice.png", dims=3)


def test_io_errors_name_the_file(tmp_path, mni_volumes: torch.Tensor) -> None:
    with pytest.raises(DataError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "x.tif").write_bytes(b"II*\x00")
    with pytest.raises(DataError, match=r"x\.tif: unsupported image file type; use one of \.npy, \.png, \.nii, \.nii\.gz"):
        read_image(tmp_path / "x.tif")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png: cannot read \.png image: UnidentifiedImageError"):
        read_image(tmp_path / "bad.png")
    np.save(tmp_path / "nan.npy", np.full((4, 4), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match=r"nan\.npy: image contains NaN or Inf values"):
        read_image(tmp_path / "nan.npy")
    np.save(tmp_path / "v.npy", mni_volumes[0].numpy())
    with pytest.raises(DataError, match=r"out\.png: PNG holds a 2-D grey or RGB image, got channel-first shape \(1, 48, 48, 48\)"):
        perturb_file(tmp_path / "v.npy", tmp_path / "out.png", Gamma, 2, seed=0)
    with pytest.raises(DataError, match=r"'xray.grid' supports \(2,\)-D images, this one is 3-D"):
        perturb_array(mni_volumes[0].numpy(), Grid, 2, seed=0)
    with pytest.raises(ValueError, match=r"severity of 'intensity.gamma' must be an integer 0..5, got 9"):
        perturb_file(tmp_path / "v.npy", tmp_path / "o.npy", Gamma, 9, seed=0)
