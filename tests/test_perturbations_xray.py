"""X-ray / photographic suite: generic checks, identities, torchio and Pillow references."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchio as tio
from PIL import Image

from medaudit.perturbation import Perturbation
from medaudit.plugins import xray as X
from test_perturbations_intensity import check_registered, check_suite, rng_for

NAMES = {"xray.exposure", "xray.noise", "xray.blur", "xray.jpeg", "xray.grid", "xray.resolution"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10.0 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_registered() -> None:
    check_registered(X, NAMES)
    assert X.Grid.dims == (2,)


@pytest.mark.parametrize("cls", X.PERTURBATIONS, ids=lambda c: c.name)
def test_generic(cls: type[Perturbation], mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    check_suite(cls, mni_slices, mni_volumes)


def test_identities(mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    for x in (mni_slices, mni_volumes):
        key = torch.arange(x.shape[0])
        torch.testing.assert_close(X.expose(x, 0.0), x)
        torch.testing.assert_close(X.detector_noise(x, 0.0, 0.0, key), x)
        torch.testing.assert_close(X.gaussian_blur(x, 0.0, max_sigma=2.5), x, rtol=0, atol=0)
        torch.testing.assert_close(X.degrade_resolution(x, 1.0, max_factor=4.0), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(X.grid_lines(mni_slices, 0.0, 0.3, 0.0, 0.0), mni_slices)
    x8 = torch.round(mni_slices * 255) / 255
    # quality 100 quantises every coefficient by 1: only DCT rounding is left
    assert (X.jpeg_compress(x8, 100.0) - x8).abs().max() <= 1.5 / 255


def test_exposure_direction() -> None:
    x = torch.full((2, 1, 4, 4), 0.5)
    y = X.expose(x, torch.tensor([1.0, -1.0]))
    assert y[0].max() < 0.5 < y[1].min()  # over-exposure darkens, under-exposure brightens


def test_noise_matches_torchio_in_distribution(mni_slices: torch.Tensor) -> None:
    """gain = 0 is torchio.Noise(std=read_sd): same residual standard deviation (not clipped)."""
    x = mni_slices
    mid = (x > 0.25) & (x < 0.75)  # away from the clipping bounds
    ours = X.detector_noise(x, 0.0, 0.05, torch.arange(4)) - x
    ref = torch.stack([tio.Noise(mean=0.0, std=0.05, seed=i)(tio.ScalarImage(tensor=x[i][..., None])).data[..., 0]
                       for i in range(4)]) - x
    assert abs(ours[mid].std().item() - ref[mid].std().item()) < 0.05 * 0.05
    assert abs(ours[mid].mean().item()) < 0.002


def test_noise_is_signal_dependent() -> None:
    x = torch.cat([torch.full((1, 1, 64, 64), 0.1), torch.full((1, 1, 64, 64), 0.8)])
    r = X.detector_noise(x, 0.02, 0.0, torch.tensor([5, 5])) - x
    ratio = r[1].std() / r[0].std()
    assert abs(ratio.item() - np.sqrt(8.0)) < 0.25  # std grows as sqrt(gain * x)


def test_blur_matches_torchio(mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    for sigma in (0.7, 2.0):
        ref = tio.Blur(std=(sigma, sigma, 0.0))(tio.ScalarImage(tensor=mni_slices[0][..., None])).data[..., 0]
        torch.testing.assert_close(X.gaussian_blur(mni_slices[:1], sigma, max_sigma=2.5)[0], ref, atol=2e-4, rtol=0)
    ref3 = tio.Blur(std=1.5)(tio.ScalarImage(tensor=mni_volumes[0])).data
    torch.testing.assert_close(X.gaussian_blur(mni_volumes[:1], 1.5)[0], ref3, atol=2e-4, rtol=0)


@pytest.mark.parametrize("quality", [90, 75, 50, 30, 15, 6])
def test_jpeg_matches_pillow_grey(mni_slices: torch.Tensor, quality: int) -> None:
    x8 = torch.round(mni_slices * 255) / 255
    ours = X.jpeg_compress(x8, float(quality)).numpy()
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.round(x8[i, 0].numpy() * 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
        pil = np.asarray(Image.open(buf), dtype=np.float32) / 255
        clean = x8[i, 0].numpy()
        assert abs(psnr(ours[i, 0], clean) - psnr(pil, clean)) < 0.3, (quality, i)
        assert psnr(ours[i, 0], pil) > 40.0, (quality, i)  # rare rounding ties flip a coefficient


def test_jpeg_matches_pillow_rgb() -> None:
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")[100:228, 200:337]  # real photo, 128×137 (not a multiple of 8)
    x = torch.from_numpy(photo.astype(np.float32) / 255).permute(2, 0, 1)[None]
    for quality in (80, 40, 10):
        ours = X.jpeg_compress(x, float(quality))[0].permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="JPEG", quality=quality, subsampling=0)
        pil = np.asarray(Image.open(buf), dtype=np.float32) / 255
        clean = photo.astype(np.float32) / 255
        assert abs(psnr(ours, clean) - psnr(pil, clean)) < 0.5, quality
        assert psnr(ours, pil) > 35.0, quality


def test_jpeg_3d_is_slicewise(mni_volumes: torch.Tensor) -> None:
    vol = X.jpeg_compress(mni_volumes, 30.0)
    torch.testing.assert_close(vol[:, :, 10], X.jpeg_compress(mni_volumes[:, :, 10], 30.0))


def test_grid_is_periodic_lines(mni_slices: torch.Tensor) -> None:
    ones = torch.ones(1, 1, 32, 32)
    vertical = X.grid_lines(ones, 0.2, 0.25, 0.0, 0.0)[0, 0]
    assert torch.allclose(vertical, vertical[:1].expand(32, 32))  # constant down each column
    torch.testing.assert_close(vertical[:, :28], vertical[:, 4:])  # period 1 / 0.25 = 4 pixels
    assert vertical.min().item() == pytest.approx(0.8, abs=1e-6)
    horizontal = X.grid_lines(ones, 0.2, 0.25, 0.0, 1.0)[0, 0]
    torch.testing.assert_close(horizontal, vertical.T)


@pytest.mark.parametrize("factor", [2, 4])
def test_resolution_matches_interpolate(mni_slices: torch.Tensor, mni_volumes: torch.Tensor, factor: int) -> None:
    """For integer factors the gather-based resampling is blur + F.interpolate down and up."""
    import torch.nn.functional as F

    for x, mode in ((mni_slices, "bilinear"), (mni_volumes, "trilinear")):
        blurred = X.gaussian_blur(x, (factor - 1) / 2)
        down = F.interpolate(blurred, scale_factor=1 / factor, mode=mode, align_corners=False)
        ref = F.interpolate(down, size=x.shape[2:], mode=mode, align_corners=False)
        torch.testing.assert_close(X.degrade_resolution(x, float(factor)), ref, atol=1e-5, rtol=0)


def test_invalid_arguments(mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    x = mni_slices
    with pytest.raises(ValueError, match=r"quality must be in \[1, 100\], got 0"):
        X.jpeg_compress(x, 0)
    with pytest.raises(ValueError, match=r"sigma must be in \[0, 2.5\], got -1"):
        X.gaussian_blur(x, -1.0, max_sigma=2.5)
    with pytest.raises(ValueError, match=r"max_sigma is required when sigma is a tensor"):
        X.gaussian_blur(x, torch.ones(4))
    with pytest.raises(ValueError, match=r"max_sigma must be in \[0, 64\], got 100.0"):
        X.gaussian_blur(x, 1.0, max_sigma=100.0)
    with pytest.raises(ValueError, match=r"factor must be in \[1, 4\], got 0.5"):
        X.degrade_resolution(x, 0.5, max_factor=4.0)
    with pytest.raises(ValueError, match=r"frequency must be in \[0, 0.5\], got 0.7"):
        X.grid_lines(x, 0.1, 0.7, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"'grid_lines' supports \(2,\)-D batches only, got a 3-D batch"):
        X.grid_lines(mni_volumes, 0.1, 0.2, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"gain must be in \[0, 1\], got -0.1"):
        X.detector_noise(x, -0.1, 0.0, torch.arange(4))
    with pytest.raises(ValueError, match=r"blur radius 10 exceeds the image size 4"):
        X.gaussian_blur(torch.zeros(1, 1, 4, 4), 2.5)
    with pytest.raises(ValueError, match=r"severity of 'xray.jpeg' must be an integer 0..5, got -1"):
        X.Jpeg()(x, -1, rng_for("xray.jpeg", 0, range(4)))
