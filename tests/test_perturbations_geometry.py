"""Geometry suite: generic checks, identities and agreement with torchio.Affine / torchio.Flip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio

from medaudit.perturbation import Perturbation
from medaudit.plugins import geometry as G
from medaudit.resample import two_pass_resample
from test_perturbations_intensity import check_registered, check_suite, rng_for

NAMES = {"geometry.rotation", "geometry.translation", "geometry.scale", "geometry.flip_lr"}


def tio_affine(image: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """torchio.Affine on one ``[C, *spatial]`` image (2D stored as ``[C, H, W, 1]``), 1 mm spacing."""
    is_2d = image.ndim == 3
    data = image[..., None] if is_2d else image
    out = tio.Affine(center="image", default_pad_value=0, image_interpolation="linear", **kwargs)(
        tio.ScalarImage(tensor=data)).data
    return out[..., 0] if is_2d else out


CROPS = Path(__file__).resolve().parent / "data" / "mni152_crops.npz"


@pytest.fixture(scope="module")
def wide_slices() -> torch.Tensor:
    """Non-square 128×160 MNI152 slices: catches rotations that are not rigid in pixel units."""
    with np.load(CROPS) as d:
        return torch.from_numpy(d["wide"].astype(np.float32) / 255.0)[:, None].contiguous()


def test_registered() -> None:
    check_registered(G, NAMES)


@pytest.mark.parametrize("cls", G.PERTURBATIONS, ids=lambda c: c.name)
def test_generic(cls: type[Perturbation], mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    # flip_lr is binary per sample: more seeds so every 0.2 step of probability flips someone new
    seeds = 8 if cls is G.FlipLR else 4
    check_suite(cls, mni_slices, mni_volumes, seeds_2d=seeds, seeds_3d=seeds)


def test_identities(mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    for x in (mni_slices, mni_volumes):
        b, nd = x.shape[0], x.ndim - 2
        axis = torch.tensor([[1.0, 0.0, 0.0]] * b) if nd == 3 else None
        # grid_sample at exact pixel centres: unchanged up to float rounding of the grid
        torch.testing.assert_close(G.rotate(x, 0.0, axis), x, atol=1e-5, rtol=0)
        torch.testing.assert_close(G.translate(x, torch.zeros(b, nd)), x, atol=1e-5, rtol=0)
        torch.testing.assert_close(G.zoom(x, 0.0), x, atol=1e-5, rtol=0)
        assert torch.equal(G.flip_lr(x, 0.0), x)
    # whole-pixel translations move pixels exactly
    torch.testing.assert_close(G.translate(mni_slices, torch.tensor([[0.0, 3.0]] * 4))[..., 3:], mni_slices[..., :-3], atol=1e-5, rtol=0)


def test_rotation_is_rigid_on_non_square(wide_slices: torch.Tensor) -> None:
    y = G.rotate(wide_slices, 90.0)
    # a 90° turn of a 128×160 image about its centre maps the central 128×128 square onto itself
    centre = wide_slices[..., 16:144]
    torch.testing.assert_close(y[..., 16:144], torch.rot90(centre, k=1, dims=(2, 3)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("angle", [-12.0, 7.0])
def test_rotation_matches_torchio(wide_slices: torch.Tensor, mni_volumes: torch.Tensor, angle: float) -> None:
    ours = G.rotate(wide_slices, angle)
    for i in range(2):
        ref = tio_affine(wide_slices[i], scales=(1, 1, 1), degrees=(0, 0, angle), translation=(0, 0, 0))
        assert (ours[i] - ref).abs().mean() < 2e-3
    ours3 = G.rotate(mni_volumes[:1], angle, torch.tensor([[1.0, 0.0, 0.0]]))
    ref3 = tio_affine(mni_volumes[0], scales=(1, 1, 1), degrees=(angle, 0, 0), translation=(0, 0, 0))
    inner = (slice(None), slice(6, -6), slice(6, -6), slice(6, -6))  # the crop is brain to its edges:
    assert (ours3[0] - ref3)[inner].abs().mean() < 2e-3  # ITK and grid_sample pad differently there
    assert (G.rotate(mni_volumes[:1], -angle, torch.tensor([[1.0, 0.0, 0.0]]))[0] - ref3)[inner].abs().mean() > 0.02


def test_translation_and_scale_match_torchio(wide_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    shift = torch.tensor([[3.0, -5.0]])
    ref = tio_affine(wide_slices[0], scales=(1, 1, 1), degrees=(0, 0, 0), translation=(3.0, -5.0, 0))
    torch.testing.assert_close(G.translate(wide_slices[:1], shift)[0], ref, atol=1e-4, rtol=0)
    # sub-pixel shifts agree inside; ITK's linear interpolator pads the boundary differently
    ref = tio_affine(wide_slices[0], scales=(1, 1, 1), degrees=(0, 0, 0), translation=(3.5, -5.25, 0))
    assert (G.translate(wide_slices[:1], torch.tensor([[3.5, -5.25]]))[0] - ref).abs().mean() < 2e-3
    shift3 = torch.tensor([[2.0, -1.0, 4.0]])
    ref3 = tio_affine(mni_volumes[0], scales=(1, 1, 1), degrees=(0, 0, 0), translation=(2.0, -1.0, 4.0))
    torch.testing.assert_close(G.translate(mni_volumes[:1], shift3)[0], ref3, atol=1e-4, rtol=0)
    for log_scale in (-0.2, 0.15):
        s = float(np.exp(log_scale))
        ref = tio_affine(wide_slices[0], scales=(s, s, 1), degrees=(0, 0, 0), translation=(0, 0, 0))
        # zooming out pulls the (ITK- vs grid_sample-padded) border inside: compare the interior
        assert (G.zoom(wide_slices[:1], log_scale)[0] - ref)[:, 16:-16, 16:-16].abs().mean() < 2e-3
        ref3 = tio_affine(mni_volumes[0], scales=(s, s, s), degrees=(0, 0, 0), translation=(0, 0, 0))
        assert (G.zoom(mni_volumes[:1], log_scale)[0] - ref3)[:, 6:-6, 6:-6, 6:-6].abs().mean() < 2e-3
        assert (G.zoom(mni_volumes[:1], -log_scale)[0] - ref3)[:, 6:-6, 6:-6, 6:-6].abs().mean() > 0.01


def test_flip_matches_torchio(mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    y = G.flip_lr(mni_slices, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    ref = tio.Flip(axes=(1,))(tio.ScalarImage(tensor=mni_slices[0][..., None])).data[..., 0]
    assert torch.equal(y[0], ref) and torch.equal(y[1], mni_slices[1])
    ref3 = tio.Flip(axes=(2,))(tio.ScalarImage(tensor=mni_volumes[0])).data
    assert torch.equal(G.flip_lr(mni_volumes, 1.0)[0], ref3)


def test_flip_fraction_follows_severity() -> None:
    x = torch.rand(1, 1, 4, 4).expand(2000, 1, 4, 4)
    rng = rng_for("geometry.flip_lr", 0, range(2000))
    for severity in range(1, 6):
        params = G.FlipLR().sample(severity, rng_for("geometry.flip_lr", 0, range(2000)), x.shape)
        assert abs(params["flip"].mean().item() - 0.2 * severity) < 0.03
    assert G.FlipLR().sample(5, rng, x.shape)["flip"].all()


def test_translation_length(mni_volumes: torch.Tensor) -> None:
    params = G.Translation().sample(5, rng_for("geometry.translation", 0, range(64)), torch.Size([64, 1, 48, 48, 48]))
    length = params["shift"].norm(dim=1) / 48.0
    assert ((length >= 0.09 - 1e-6) & (length <= 0.12 + 1e-6)).all()


def test_3d_rotation_axis_is_unit(mni_volumes: torch.Tensor) -> None:
    params = G.Rotation().sample(3, rng_for("geometry.rotation", 0, range(2)), mni_volumes.shape)
    torch.testing.assert_close(params["axis"].norm(dim=1), torch.ones(2))
    assert "axis" not in G.Rotation().sample(3, rng_for("geometry.rotation", 0, range(2)), torch.Size([2, 1, 8, 8]))


def test_invalid_arguments(mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"angle_deg must be in \[-180, 180\], got 400"):
        G.rotate(mni_slices, 400)
    with pytest.raises(ValueError, match=r"axis \(\[B, 3\], in \(D, H, W\) order\) is required to rotate a 3D batch"):
        G.rotate(mni_volumes, 5.0)
    with pytest.raises(ValueError, match=r"axis must have shape \[2, 3\], got \(2, 2\)"):
        G.rotate(mni_volumes, 5.0, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"offset must have shape \[4, 2\] for this batch, got \(4, 3\)"):
        G.translate(mni_slices, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"log_scale must be in \[-2, 2\], got 3.0"):
        G.zoom(mni_slices, 3.0)
    with pytest.raises(ValueError, match=r"flip must be in \[0, 1\], got 2"):
        G.flip_lr(mni_slices, 2)
    with pytest.raises(ValueError, match=r"matrix must have shape \[4, 2, 2\] for this batch, got \(4, 3, 3\)"):
        G.affine_warp(mni_slices, torch.eye(3).expand(4, 3, 3))


# --- two-pass resampling (used by 3D mri.motion) ---------------------------------------------


def _theta(degrees: torch.Tensor, shift: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``[B, K, 3, 4]`` affine_grid matrices: rigid rotation (Euler degrees about x, y, z in
    normalised (W, H, D) order, conjugated by the half sizes) and a shift in [-1, 1] units."""
    from medaudit.plugins.mri.motion import _rotation

    half = torch.tensor(spatial[::-1], dtype=torch.float32) / 2
    linear = _rotation(degrees, 3) * half[None, :] / half[:, None]
    return torch.cat([linear, shift[..., None]], dim=-1)


def _trilinear(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    b, k = theta.shape[:2]
    grid = torch.nn.functional.affine_grid(theta.reshape(b * k, 3, 4), [b * k, *x.shape[1:]], align_corners=False)
    out = torch.nn.functional.grid_sample(x.repeat_interleave(k, 0), grid, align_corners=False)
    return out.reshape(b, k, *x.shape[1:]).transpose(0, 1)


def test_two_pass_resample_equals_trilinear_when_slices_do_not_mix(mni_volumes: torch.Tensor) -> None:
    """A rotation about the D axis plus any shift keeps each D-slice a 2-D bilinear warp, which
    is exactly what trilinear grid_sample computes; pass A is then the identity along D."""
    x = mni_volumes[..., :40, :48, :44].contiguous()  # non-cubic
    degrees = torch.tensor([[[0.0, 0.0, 7.0], [0.0, 0.0, -11.0]], [[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]])
    shift = torch.tensor([[[0.05, -0.03, 0.1], [0.0, 0.02, -0.05]], [[-0.1, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    theta = _theta(degrees, shift, tuple(x.shape[2:]))
    torch.testing.assert_close(two_pass_resample(x, theta), _trilinear(x, theta), atol=2e-5, rtol=0)
    # the identity map (last one) returns the input
    torch.testing.assert_close(two_pass_resample(x, theta)[1, 1], x[1], atol=1e-5, rtol=0)


def test_two_pass_resample_is_a_linear_interpolation_of_the_rigid_map(mni_volumes: torch.Tensor) -> None:
    """Rotations that tilt the slices: the same geometry as trilinear, different interpolation
    error only; a rotation of the opposite sign is far off (the test can fail)."""
    x = mni_volumes[..., :40, :48, :44].contiguous()
    g = torch.Generator().manual_seed(0)
    degrees = (torch.rand(2, 3, 3, generator=g) - 0.5) * 24  # up to 12 degrees about every axis
    shift = (torch.rand(2, 3, 3, generator=g) - 0.5) * 0.14
    theta = _theta(degrees, shift, tuple(x.shape[2:]))
    ours = two_pass_resample(x, theta)
    ref = _trilinear(x, theta)
    wrong = _trilinear(x, _theta(-degrees, shift, tuple(x.shape[2:])))
    assert (ours - ref).abs().mean() < 2e-3
    assert (wrong - ref).abs().mean() > 20 * (ours - ref).abs().mean()
    # zero outside the field of view, like grid_sample's zero padding
    far = _theta(torch.zeros(1, 1, 3), torch.tensor([[[0.0, 0.0, 2.5]]]), tuple(x.shape[2:]))
    assert two_pass_resample(x[:1], far).abs().max() == 0


def test_two_pass_resample_batch_invariant_and_writes_out(mni_volumes: torch.Tensor) -> None:
    x = mni_volumes
    theta = _theta(torch.tensor([[[3.0, -5.0, 2.0]], [[-8.0, 1.0, 4.0]]]), torch.full((2, 1, 3), 0.02), (48, 48, 48))
    whole = two_pass_resample(x, theta)
    parts = torch.cat([two_pass_resample(x[i:i + 1], theta[i:i + 1]) for i in range(2)], dim=1)
    assert torch.equal(whole, parts)
    out = torch.full((1, 2, 1, 48, 48, 48), float("nan"))
    assert two_pass_resample(x, theta, out=out) is out
    assert torch.equal(out, whole)
