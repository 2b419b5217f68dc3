"""Tests of the CT perturbation suite (``medaudit.plugins.ct``).

Contract checks run on small synthetic batches, severity monotonicity on the MNI152 fixtures of
``conftest.py`` (brain MRI stands in for an axial CT slice: only the change to the image is
measured).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

import pytest
import torch
from torch import Tensor

from medaudit import kspace, perturbation
from medaudit.perturbation import Perturbation
from medaudit.plugins import ct
from test_perturbations_mri import SHAPES, check_contract, make_rng, synthetic

PERTURBATIONS = ct.CT_PERTURBATIONS
NAMES = {"ct.noise", "ct.streak", "ct.ring", "ct.cupping", "ct.slice_thickness"}
def cases() -> list:
    return [pytest.param(cls, nd, id=f"{cls.name}-{nd}d") for cls in PERTURBATIONS for nd in (2, 3) if nd in cls.dims]


def test_registration_names_and_api_version() -> None:
    assert ct.MEDAUDIT_API_VERSION == 1
    assert {cls.name for cls in ct.medaudit_perturbations()} == NAMES
    (ep,) = [e for e in entry_points(group="medaudit") if e.name == "ct"]
    assert ep.load() is ct


def test_shared_helpers_are_not_copied() -> None:
    assert ct.centred_fft is kspace.centred_fft and ct.check_shape is perturbation.check_shape


@pytest.mark.parametrize("cls", PERTURBATIONS, ids=lambda c: c.name)
def test_class_metadata_and_docs(cls: type[Perturbation]) -> None:
    assert cls.suite == "ct" and cls.modalities == ("ct",) and cls.summary and cls.citation
    doc = cls.__doc__ or ""
    assert ".. math::" in doc and "identity" in doc
    assert "Dropped" in doc or cls is ct.SliceThickness  # what the image-domain model leaves out
    for level in range(1, 6):
        for param in cls.severities[level]:
            assert param in doc, f"{param} undocumented in {cls.name}"
    cls.describe()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("cls", "nd"), cases())
def test_contract_shape_dtype_range(cls: type[Perturbation], nd: int, dtype: torch.dtype) -> None:
    check_contract(cls, nd, dtype)


def _monotone(cls: type[Perturbation], x: Tensor, seeds: range) -> None:
    mad, psnr = [], []
    for severity in range(1, 6):
        m, q = [], []
        for seed in seeds:
            y, _ = cls()(x, severity, make_rng(cls.name, severity, seed, x.shape[0]))
            d = (y - x).flatten(1)
            m.append(d.abs().mean(1))
            q.append(-10 * torch.log10(d.pow(2).mean(1).clamp(min=1e-12)))
        mad.append(torch.cat(m).mean().item())
        psnr.append(torch.cat(q).mean().item())
    assert all(b > a * 1.05 for a, b in zip(mad, mad[1:])), mad
    assert all(b < a - 0.3 for a, b in zip(psnr, psnr[1:])), psnr


@pytest.mark.parametrize("cls", [c for c in PERTURBATIONS if 2 in c.dims], ids=lambda c: c.name)
def test_monotone_in_severity_2d(cls: type[Perturbation], mni_slices: Tensor) -> None:
    _monotone(cls, mni_slices, range(6))


@pytest.mark.parametrize("cls", PERTURBATIONS, ids=lambda c: c.name)
def test_monotone_in_severity_3d(cls: type[Perturbation], mni_volumes: Tensor) -> None:
    _monotone(cls, mni_volumes, range(10))


B = 2
IDENTITY_PARAMS: dict[str, Callable[[int], Mapping[str, Tensor]]] = {
    "ct.noise": lambda nd: {"dose": torch.ones(B), "noise_key": torch.tensor([3, 4])},
    "ct.streak": lambda nd: {"amplitude": torch.zeros(B, 3), "angle": torch.rand(B, 3), "centre": torch.zeros(B, 2)},
    "ct.ring": lambda nd: {"amplitude": torch.zeros(B, 4), "radius": torch.rand(B, 4)},
    "ct.cupping": lambda nd: {"depth": torch.zeros(B)},
    "ct.slice_thickness": lambda nd: {"thickness": torch.ones(B)},
}


@pytest.mark.parametrize(("cls", "nd"), cases())
def test_identity_parameters_leave_image_unchanged(cls: type[Perturbation], nd: int) -> None:
    x = synthetic((B, *SHAPES[nd][1:]))
    assert torch.equal(cls().apply(x, IDENTITY_PARAMS[cls.name](nd)), x)


# --- physics ------------------------------------------------------------------------------------


def test_low_dose_noise_variance_scales_with_inverse_dose_and_attenuation() -> None:
    x = torch.full((2, 1, 96, 96), 0.3)
    x[1] = 0.7
    keys = torch.tensor([21, 22])

    def std(dose: float, image: Tensor) -> Tensor:
        y = ct.LowDoseNoise().apply(image, {"dose": torch.full((2,), dose), "noise_key": keys})
        return (y - image).flatten(1).std(1)

    sigma = ct.LowDoseNoise.reference_sigma
    s = std(0.1, x)
    assert s[0].item() == pytest.approx(sigma * math.sqrt(9 * 1.3), rel=0.05)
    assert s[1].item() == pytest.approx(sigma * math.sqrt(9 * 1.7), rel=0.05)
    assert (std(0.05, x) / s).tolist() == pytest.approx([math.sqrt(19 / 9)] * 2, rel=0.05)


def test_low_dose_noise_has_ramp_texture() -> None:
    """Noise power rises with in-plane frequency (filtered back-projection), unlike white noise."""
    x = torch.full((1, 1, 128, 128), 0.5)
    y = ct.LowDoseNoise().apply(x, {"dose": torch.tensor([0.1]), "noise_key": torch.tensor([5])})
    power = kspace.centred_fft(y - x, 2).abs().pow(2)[0, 0]
    fy, fx = kspace.kspace_coordinates((128, 128), x.device)
    radius = torch.sqrt(fy * fy + fx * fx)
    low = power[(radius > 0.05) & (radius < 0.25)].mean()
    high = power[(radius > 0.6) & (radius < 0.9)].mean()
    assert high > 2.5 * low


def test_streaks_are_straight_lines_through_the_centre_point() -> None:
    x = torch.full((1, 1, 65, 65), 0.5)
    params = {"amplitude": torch.tensor([[0.2]]), "angle": torch.tensor([[0.0]]), "centre": torch.zeros(1, 2)}
    d = ct.Streak().apply(x, params) - x  # angle 0: a horizontal line through the centre row
    torch.testing.assert_close(d[0, 0, 32], torch.full((65,), 0.2))
    assert d[0, 0, 36].abs().max() < 1e-3


def test_rings_are_concentric_about_the_centre() -> None:
    x = torch.full((1, 1, 3, 64, 64), 0.5)
    params = {"amplitude": torch.tensor([[-0.2]]), "radius": torch.tensor([[0.5]])}
    d = (ct.Ring().apply(x, params) - x)[0, 0]
    assert torch.equal(d[0], d[2])  # same in every slice (rotation axis along D)
    r = torch.tensor(16.0)  # 0.5 × 32 pixels from the centre (31.5, 31.5)
    ring_value = d[0, 31, int(31.5 + r + 0.5)]
    assert ring_value < -0.1
    assert ring_value == pytest.approx(d[0, int(31.5 + r + 0.5), 31].item(), abs=1e-6)  # rotational symmetry
    assert d[0, 31, 31].abs() < 1e-4  # nothing at the centre


def test_cupping_depresses_the_centre_not_the_edge() -> None:
    x = torch.full((1, 1, 64, 64), 0.8)
    y = ct.Cupping().apply(x, {"depth": torch.tensor([0.25])})
    assert y[0, 0, 31, 31].item() == pytest.approx(0.8 * 0.75, rel=0.01)
    assert y[0, 0, 0, 0].item() == pytest.approx(0.8)
    profile = y[0, 0, 31, 31:]
    assert torch.all(profile[1:] >= profile[:-1])  # rises monotonically towards the edge


def test_slice_thickness_blurs_only_along_slices_and_keeps_mass() -> None:
    x = torch.zeros(1, 1, 33, 8, 8)
    x[:, :, 16] = 0.9  # one bright slice
    y = ct.SliceThickness().apply(x, {"thickness": torch.tensor([5.0])})
    profile = y[0, 0, :, 4, 4]
    sigma = math.sqrt(24) / (2 * math.sqrt(2 * math.log(2)))
    assert profile.sum().item() == pytest.approx(0.9, rel=1e-4)
    fwhm_profile = profile / profile.max()
    assert fwhm_profile[16 + 2].item() == pytest.approx(math.exp(-4 / (2 * sigma**2)), rel=0.02)
    assert torch.equal(y[0, 0, :, 0, 0], y[0, 0, :, 7, 7])  # no in-plane blur


def test_errors_name_argument_and_value() -> None:
    x2 = synthetic(SHAPES[2])
    with pytest.raises(ValueError, match=r"ct\.slice_thickness: x must be \[B, C, D, H, W\], got x of shape \(3, 2, 32, 24\)"):
        ct.SliceThickness().apply(x2, {"thickness": torch.ones(3)})
    with pytest.raises(ValueError, match=r"ct\.slice_thickness: shape must be \[B, C, D, H, W\], got shape=\(3, 2, 32, 24\)"):
        ct.SliceThickness().sample(1, make_rng("ct.slice_thickness", 1, 0, 3), x2.shape)
    with pytest.raises(ValueError, match=r"ct\.ring: rng has batch size 1 but shape\[0\]=3"):
        ct.Ring().sample(2, make_rng("ct.ring", 2, 0, 1), x2.shape)
    with pytest.raises(ValueError, match=r"severity of 'ct\.cupping' must be an integer 0\.\.5, got -1"):
        ct.Cupping()(x2, -1, make_rng("ct.cupping", 1, 0, 3))
