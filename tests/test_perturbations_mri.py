"""Tests of the MRI perturbation suite (``medaudit.plugins.mri``).

Contract checks run on small synthetic batches; severity monotonicity and the TorchIO
comparisons run on the real MNI152 fixtures of ``conftest.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
import torchio as tio
from torch import Tensor

from medaudit.kspace import centred_fft
from medaudit.perturbation import Perturbation
from medaudit.plugins import mri
from medaudit.rng import SampleRNG, sample_keys, stream_key

PERTURBATIONS = mri.MRI_PERTURBATIONS
NAMES = {"mri.motion", "mri.ghosting", "mri.spike", "mri.bias_field", "mri.noise", "mri.gibbs", "mri.anisotropy"}
SHAPES = {2: (3, 2, 32, 24), 3: (2, 1, 12, 16, 10)}


def make_rng(name: str, severity: int, seed: int, n: int, start: int = 0) -> SampleRNG:
    """The runner's keying: one stream per (seed, perturbation, severity), one key per sample index."""
    return SampleRNG(sample_keys(stream_key(seed, name, severity), torch.arange(start, start + n)))


def synthetic(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """A smooth blob plus texture in [0, 1]: non-trivial k-space, some background at 0."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape[2:]], indexing="ij")
    blob = (1 - sum(a * a for a in axes)).clamp(min=0)
    return (blob * (0.5 + 0.5 * torch.rand(shape, generator=g))).clamp(0, 1)


def effect(p: Perturbation, x: Tensor, severity: int, seeds: range) -> tuple[float, float]:
    """Mean absolute change and mean PSNR (dB, peak 1) over samples and seeds."""
    mad, psnr = [], []
    for seed in seeds:
        y, _ = p(x, severity, make_rng(p.name, severity, seed, x.shape[0]))
        d = (y.float() - x).flatten(1)
        mad.append(d.abs().mean(1))
        psnr.append(-10 * torch.log10(d.pow(2).mean(1).clamp(min=1e-12)))
    return torch.cat(mad).mean().item(), torch.cat(psnr).mean().item()


def cases(dims: tuple[int, ...] = (2, 3)) -> list:
    return [pytest.param(cls, nd, id=f"{cls.name}-{nd}d") for cls in PERTURBATIONS for nd in dims if nd in cls.dims]


# --- registration and documentation -------------------------------------------------------------


def test_registration_names_and_api_version() -> None:
    assert mri.MEDAUDIT_API_VERSION == 1
    assert {cls.name for cls in mri.medaudit_perturbations()} == NAMES
    (ep,) = [e for e in entry_points(group="medaudit") if e.name == "mri"]
    assert ep.load() is mri


@pytest.mark.parametrize("cls", PERTURBATIONS, ids=lambda c: c.name)
def test_class_metadata_and_docs(cls: type[Perturbation]) -> None:
    assert cls.suite == "mri" and cls.modalities == ("mri",) and set(cls.dims) == {2, 3}
    assert cls.summary and cls.citation
    doc = cls.__doc__ or ""
    assert ".. math::" in doc, "sampling distribution must be written as math"
    for level in range(1, 6):
        for param in cls.severities[level]:
            assert param in doc or param.replace("_", "\\_") in doc, f"{param} undocumented in {cls.name}"
    cls.describe()  # JSON-ready


def test_physics_text_not_duplicated() -> None:
    paragraphs: dict[str, str] = {}
    for cls in PERTURBATIONS:
        for para in (cls.__doc__ or "").split("\n\n"):
            text = " ".join(para.split())
            if len(text) > 80:
                assert text not in paragraphs, f"{cls.name} repeats a paragraph of {paragraphs.get(text)}"
                paragraphs[text] = cls.name


# --- contract --------------------------------------------------------------------------------------


def check_contract(cls: type[Perturbation], nd: int, dtype: torch.dtype) -> None:
    """Shape, dtype, device and range kept; the image changes; parameters are small per-sample
    tensors (never dense fields); low-precision input gives the float32 result (shared with the
    CT suite's tests)."""
    x = synthetic(SHAPES[nd]).to(dtype)
    p = cls()
    for severity in (1, 5):
        y, params = p(x, severity, make_rng(cls.name, severity, 0, x.shape[0]))
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert torch.isfinite(y.float()).all() and y.min() >= 0 and y.max() <= 1
        assert not torch.equal(y, x)
        for key, value in params.items():
            assert value.shape[0] == x.shape[0] and value[0].numel() <= 64, key
    if dtype != torch.float32:  # low precision input is computed in float32
        y32, _ = p(x.float(), 3, make_rng(cls.name, 3, 0, x.shape[0]))
        y16, _ = p(x, 3, make_rng(cls.name, 3, 0, x.shape[0]))
        torch.testing.assert_close(y16.float(), y32.to(dtype).float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("cls", "nd"), cases())
def test_contract_shape_dtype_range(cls: type[Perturbation], nd: int, dtype: torch.dtype) -> None:
    check_contract(cls, nd, dtype)


# --- severity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", PERTURBATIONS, ids=lambda c: c.name)
def test_monotone_in_severity_2d(cls: type[Perturbation], mni_slices: Tensor) -> None:
    results = [effect(cls(), mni_slices, s, range(6)) for s in range(1, 6)]
    mad = [r[0] for r in results]
    psnr = [r[1] for r in results]
    assert all(b > a * 1.05 for a, b in zip(mad, mad[1:])), mad
    assert all(b < a - 0.3 for a, b in zip(psnr, psnr[1:])), psnr


@pytest.mark.parametrize("cls", PERTURBATIONS, ids=lambda c: c.name)
def test_monotone_in_severity_3d(cls: type[Perturbation], mni_volumes: Tensor) -> None:
    results = [effect(cls(), mni_volumes, s, range(10)) for s in range(1, 6)]
    mad = [r[0] for r in results]
    psnr = [r[1] for r in results]
    assert all(b > a * 1.05 for a, b in zip(mad, mad[1:])), mad
    assert all(b < a - 0.3 for a, b in zip(psnr, psnr[1:])), psnr


def test_severity_zero_is_identity_and_bad_severity_is_named() -> None:
    x = synthetic(SHAPES[2])
    y, params = mri.Ghosting()(x, 0, make_rng("mri.ghosting", 0, 0, 3))
    assert y is x and params == {}
    with pytest.raises(ValueError, match=r"severity of 'mri.spike' must be an integer 0\.\.5, got 6"):
        mri.Spike()(x, 6, make_rng("mri.spike", 6, 0, 3))


# --- identities -----------------------------------------------------------------------------------

B = 2


def _zeros(*shape: int) -> Tensor:
    return torch.zeros(B, *shape)


IDENTITY_PARAMS: dict[str, Callable[[int], Mapping[str, Tensor]]] = {
    "mri.motion": lambda nd: {
        "degrees": _zeros(3, 1 if nd == 2 else 3),
        "translation": _zeros(3, nd),
        "times": torch.tensor([[0.25, 0.5, 0.75]]).expand(B, 3),
        "pe_axis": torch.tensor([0, nd - 1]),
    },
    "mri.ghosting": lambda nd: {"intensity": _zeros(), "num_ghosts": torch.tensor([2, 3]), "pe_axis": torch.tensor([0, 1])},
    "mri.spike": lambda nd: {"intensity": _zeros(), "positions": torch.rand(B, 2, nd)},
    "mri.bias_field": lambda nd: {"coefficients": _zeros(10 if nd == 2 else 20)},
    "mri.noise": lambda nd: {"sigma": _zeros(), "noise_key": torch.tensor([5, 9])},
    "mri.gibbs": lambda nd: {"keep": torch.ones(B)},
    "mri.anisotropy": lambda nd: {"downsampling": torch.ones(B), "axis": torch.tensor([0, nd - 1])},
}


@pytest.mark.parametrize(("cls", "nd"), cases())
def test_identity_parameters_leave_image_unchanged(cls: type[Perturbation], nd: int) -> None:
    x = synthetic((B, *SHAPES[nd][1:]))
    y = cls().apply(x, IDENTITY_PARAMS[cls.name](nd))
    # FFT round trips and grid resampling are exact only to float32 rounding
    torch.testing.assert_close(y, x, atol=2e-6, rtol=0)


def test_motion_without_moves_in_centre_segment_keeps_k_space_centre() -> None:
    """Moves acquired away from the centre leave the lowest frequencies of the clean image."""
    x = synthetic((1, 1, 32, 32))
    params = {
        "degrees": torch.tensor([[[20.0]]]),
        "translation": torch.tensor([[[0.2, 0.1]]]),
        "times": torch.tensor([[0.9]]),
        "pe_axis": torch.tensor([0]),
    }
    y = mri.Motion().apply(x, params)
    kx, ky = centred_fft(x, 2), centred_fft(y.float(), 2)
    assert not torch.allclose(y, x, atol=1e-3)
    # lines below floor(0.9 * 32) = 28 come from the unmoved image (up to the [0, 1] clamp)
    torch.testing.assert_close(ky[..., 14:18, 14:18], kx[..., 14:18, 14:18], atol=0.05 * kx.abs().max().item(), rtol=0)


# --- physics and TorchIO comparisons ---------------------------------------------------------------

def _tio(tensor: Tensor, **kwargs: object) -> tio.ScalarImage:
    """A TorchIO image of one sample: 2D ``[C, H, W]`` becomes ``[C, H, W, 1]``; 1 mm spacing."""
    data = tensor[..., None] if tensor.ndim == 3 else tensor
    return tio.ScalarImage(tensor=data.clone(), affine=np.eye(4), **kwargs)


def _untio(image: tio.ScalarImage, nd: int) -> Tensor:
    data = image.data.float()
    return (data[..., 0] if nd == 2 else data).clamp(0, 1)


@pytest.mark.parametrize("nd", [2, 3])
def test_ghosting_matches_torchio(nd: int, mni_slices: Tensor, mni_volumes: Tensor) -> None:
    x = (mni_slices if nd == 2 else mni_volumes)[:2]
    setups = [(3, 0, 0.6), (4, nd - 1, 0.9)]
    params = {
        "num_ghosts": torch.tensor([n for n, _, _ in setups]),
        "pe_axis": torch.tensor([a for _, a, _ in setups]),
        "intensity": torch.tensor([s for _, _, s in setups]),
    }
    ours = mri.Ghosting().apply(x, params)
    for b, (n, axis, s) in enumerate(setups):
        theirs = tio.Ghosting(num_ghosts=n, axis=axis, intensity=s, restore=None)(_tio(x[b]))
        torch.testing.assert_close(ours[b], _untio(theirs, nd), atol=1e-5, rtol=0)


@pytest.mark.parametrize("nd", [2, 3])
def test_spike_matches_torchio(nd: int, mni_slices: Tensor, mni_volumes: Tensor) -> None:
    x = (mni_slices if nd == 2 else mni_volumes)[:2]
    positions = torch.tensor([[[0.10, 0.70, 0.3], [0.55, 0.20, 0.9]], [[0.80, 0.45, 0.6], [0.33, 0.95, 0.1]]])[..., :nd]
    intensity = torch.tensor([0.3, 0.8])
    ours = mri.Spike().apply(x, {"positions": positions, "intensity": intensity})
    for b in range(2):
        tio_positions = np.zeros((2, 3))
        tio_positions[:, :nd] = positions[b].numpy()
        theirs = tio.Spike(spikes_positions=tio_positions, intensity=float(intensity[b]))(_tio(x[b]))
        torch.testing.assert_close(ours[b], _untio(theirs, nd), atol=1e-5, rtol=0)
    # herringbone: stripe amplitude is intensity × mean image intensity, away from the clamp
    one = mri.Spike().apply(x[:1] * 0.5, {"positions": positions[:1, :1], "intensity": intensity[:1]})
    amplitude = (one - x[:1] * 0.5).abs().amax()
    assert amplitude == pytest.approx(0.3 * (x[:1] * 0.5).mean().item(), rel=0.05)


@pytest.mark.parametrize("shape", [(40, 36), (24, 20, 16)])
def test_bias_field_equals_torchio_field(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    nd = len(shape)
    coefficients = (torch.rand(1, len(mri.monomial_exponents(3, nd)), generator=g) - 0.5)
    ours = mri.BiasField.field(coefficients, shape)[0]
    # TorchIO always uses the 3D monomial list; in 2D its z-terms vanish (z = 0), give them noise
    values = iter(coefficients[0].tolist())
    tio_coefficients = [next(values) if (nd == 3 or k == 0) else 9.0 for (_, _, k) in mri.monomial_exponents(3, 3)]
    data = torch.zeros(1, *shape, *([1] * (3 - nd)))
    theirs = tio.BiasField.generate_bias_field(data, 3, tio_coefficients).reshape(shape)
    torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=1e-5, atol=1e-5)


def test_motion_effect_is_comparable_to_torchio(mni_volumes: Tensor) -> None:
    degrees = np.array([[0.0, 0.0, 4.0], [2.0, 0.0, -3.0]])
    translation_mm = np.array([[2.0, -1.5, 0.0], [-1.0, 2.0, 1.0]])
    times = np.array([0.3, 0.7])
    x = mni_volumes
    params = {
        "degrees": torch.tensor(degrees, dtype=torch.float32).expand(2, 2, 3),
        "translation": torch.tensor(translation_mm / 48.0, dtype=torch.float32).expand(2, 2, 3),
        "times": torch.tensor(times, dtype=torch.float32).expand(2, 2),
        "pe_axis": torch.tensor([2, 2]),  # TorchIO segments k-space along its last axis
    }
    ours = (mri.Motion().apply(x, params) - x).abs().mean().item()
    motion = tio.Motion(degrees=degrees, translation=translation_mm, times=times, image_interpolation="linear")
    theirs = np.mean([(_untio(motion(_tio(x[b])), 3) - x[b]).abs().mean().item() for b in range(2)])
    assert 0.7 < ours / theirs < 1.4, (ours, theirs)


def _motion_nd_reference(x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """mri.motion's definition, built the direct way: the n-D spectrum of every position,
    k-space lines gathered along the PE axis from the position acquiring them, n-D inverse."""
    from medaudit.perturbation import finish
    from medaudit.plugins.mri.motion import _motion_lines, _rotation
    from medaudit.resample import two_pass_resample

    nd, b, c, spatial = x.ndim - 2, x.shape[0], x.shape[1], tuple(x.shape[2:])
    half = torch.tensor(spatial[::-1], dtype=torch.float32) / 2
    linear = _rotation(params["degrees"], nd) * half[None, :] / half[:, None]
    theta = torch.cat([linear, 2.0 * params["translation"].flip(-1)[..., None]], dim=-1)
    if nd == 3:
        moved = two_pass_resample(x, theta)
    else:
        k = theta.shape[1]
        grid = torch.nn.functional.affine_grid(theta.reshape(b * k, 2, 3), [b * k, c, *spatial], align_corners=False)
        moved = torch.nn.functional.grid_sample(x.repeat_interleave(k, 0), grid, align_corners=False)
        moved = moved.reshape(b, k, c, *spatial).transpose(0, 1)
    spectra = torch.fft.fftn(torch.cat([x[None], moved]), dim=tuple(range(-nd, 0)))  # [K+1, B, C, ...]
    out = torch.empty_like(x)
    for i in range(b):
        axis = int(params["pe_axis"][i])
        size = spatial[axis]
        lines = _motion_lines(params["times"][i:i + 1], size)[0]  # uncentred line -> position
        view = [size if a == axis else 1 for a in range(nd)]
        index = lines.reshape(1, 1, *view).expand(1, c, *spatial)
        kspace = torch.gather(spectra[:, i], 0, index)[0]
        out[i] = torch.fft.ifftn(kspace, dim=tuple(range(-nd, 0))).real
    return finish(out, x)


@pytest.mark.parametrize("shape", [(5, 2, 20, 24, 18), (4, 1, 17, 16, 15), (4, 2, 30, 25), (3, 1, 31, 32)])
@pytest.mark.parametrize("severity", [1, 5])
def test_motion_half_spectrum_equals_nd_construction(shape: tuple[int, ...], severity: int) -> None:
    """The 1-D real-FFT patchwork (odd and even sizes, several channels, mixed PE axes) is the
    n-D k-space construction of the docstring up to float rounding."""
    x = synthetic(shape)
    params = mri.Motion().sample(severity, make_rng("mri.motion", severity, 4, shape[0]), x.shape)
    assert len(set(params["pe_axis"].tolist())) > 1
    torch.testing.assert_close(mri.Motion().apply(x, params), _motion_nd_reference(x, params), atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["mri.motion", "mri.ghosting"])
@pytest.mark.parametrize("nd", [2, 3])
def test_cpu_axis_grouping_equals_accelerator_path(name: str, nd: int) -> None:
    """On a CPU the samples of each PE axis are transformed separately; the synchronisation-free
    path accelerators take (every axis for every sample, then a selection) gives the same bits."""
    from medaudit.perturbation import accelerator_paths

    cls = next(c for c in PERTURBATIONS if c.name == name)
    x = synthetic((6, *SHAPES[nd][1:]))
    params = {**cls().sample(4, make_rng(name, 4, 11, 6), x.shape), "pe_axis": torch.arange(6) % nd}
    with accelerator_paths():
        other = cls().apply(x, params)
    assert torch.equal(cls().apply(x, params), other)


@pytest.mark.parametrize("name", ["mri.motion", "mri.ghosting"])
def test_blocked_cpu_batches_equal_whole_batches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large CPU batches run in blocks (to reuse memory); blocking changes no value."""
    from medaudit import perturbation

    cls = next(c for c in PERTURBATIONS if c.name == name)
    x = synthetic((5, *SHAPES[3][1:]))
    params = cls().sample(3, make_rng(name, 3, 2, 5), x.shape)
    whole = cls().apply(x, params)
    monkeypatch.setattr(perturbation, "BLOCK_VOXELS", 2 * x[0].numel())  # blocks of 2, 2 and 1 samples
    assert torch.equal(cls().apply(x, params), whole)


@pytest.mark.parametrize(("nd", "axis", "factor"), [(2, 0, 3.0), (2, 1, 2.0), (3, 2, 4.0), (3, 0, 2.5)])
def test_anisotropy_error_matches_torchio(nd: int, axis: int, factor: float, mni_slices: Tensor, mni_volumes: Tensor) -> None:
    x = mni_slices if nd == 2 else mni_volumes
    n = x.shape[0]
    ours = mri.Anisotropy().apply(x, {"downsampling": torch.full((n,), factor), "axis": torch.full((n,), axis)})
    transform = tio.RandomAnisotropy(axes=(axis,), downsampling=(factor, factor))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.stack([_untio(transform(_tio(x[b])), nd) for b in range(n)])
    ours_error, theirs_error = (ours - x).abs().mean().item(), (theirs - x).abs().mean().item()
    assert 0.7 < ours_error / theirs_error < 1.3, (ours_error, theirs_error)
    # only the chosen axis is degraded: profiles along another axis of a row-constant image are intact
    other = (axis + 1) % nd
    ramp_shape = [1] * nd
    ramp_shape[other] = x.shape[2 + other]
    ramp = torch.linspace(0, 1, x.shape[2 + other]).reshape(ramp_shape).expand(x.shape[2:])[None, None]
    kept = mri.Anisotropy().apply(ramp, {"downsampling": torch.tensor([factor]), "axis": torch.tensor([axis])})
    torch.testing.assert_close(kept, ramp)


def test_rician_noise_statistics_match_gaussian_limit_and_rayleigh_background(mni_volumes: Tensor) -> None:
    sigma = 0.05
    x = mni_volumes
    y = mri.RicianNoise().apply(x, {"sigma": torch.full((2,), sigma), "noise_key": torch.tensor([11, 12])})
    bright = (x > 0.35) & (x < 0.65)
    ours_std = (y - x)[bright].std().item()
    theirs = torch.stack([tio.Noise(mean=0.0, std=sigma, seed=b)(_tio(x[b])).data.float() for b in range(2)])
    theirs_std = (theirs - x)[bright].std().item()
    assert ours_std == pytest.approx(theirs_std, rel=0.1)
    assert ours_std == pytest.approx(sigma, rel=0.1)
    background = x == 0
    assert background.sum() > 1000
    assert y[background].mean().item() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.1)


def test_gibbs_rings_at_an_edge() -> None:
    """A step edge low-passed in k-space overshoots next to the edge and is exact at DC."""
    x = torch.full((1, 1, 64, 64), 0.25)  # grey background: under/overshoots stay inside [0, 1]
    x[..., 16:48, 16:48] = 0.5
    y = mri.Gibbs().apply(x, {"keep": torch.tensor([0.4])})
    inside = y[0, 0, 32, 16:48]
    assert inside.max() > 0.5 + 0.05 * 0.25  # Gibbs overshoot is ~9 % of the 0.25 step
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=1e-4)


# --- errors -------------------------------------------------------------------------------------------


def test_errors_name_argument_and_value() -> None:
    x2 = synthetic(SHAPES[2])
    with pytest.raises(ValueError, match=r"mri\.motion: x must be .* got x of shape \(3, 32, 24\)"):
        mri.Motion().apply(x2[:, 0], {})
    with pytest.raises(ValueError, match=r"mri\.noise: shape must be .* got shape=\(3, 32\)"):
        mri.RicianNoise().sample(1, make_rng("mri.noise", 1, 0, 3), torch.Size([3, 32]))
    with pytest.raises(ValueError, match=r"mri\.gibbs: rng has batch size 2 but shape\[0\]=3"):
        mri.Gibbs().sample(1, make_rng("mri.gibbs", 1, 0, 2), x2.shape)
    with pytest.raises(ValueError, match=r"coefficients: 7 is not the number of 2D monomials"):
        mri.BiasField.field(torch.zeros(1, 7), (8, 8))
    with pytest.raises(ValueError, match=r"spatial_shape=\(8,\)"):
        mri.BiasField.field(torch.zeros(1, 4), (8,))
