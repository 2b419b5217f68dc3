"""Intensity suite, plus the generic contract checks the xray and geometry tests import from here.

The generic checks run every perturbation of a suite on real MNI152 images (fixtures in
conftest.py): shape/dtype/device/range contract, batch-composition determinism, severity 0
identity and monotone severities. Monotonicity uses common random numbers: the stream key does
not depend on severity, so every severity sees the same per-sample draws and only the documented
magnitude changes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

from medaudit.perturbation import Perturbation
from medaudit.plugin_manager import get_plugin_manager
from medaudit.plugins import intensity as I
from medaudit.rng import SampleRNG, sample_keys, stream_key

# ---------------------------------------------------------------------------------------------
# Generic checks (imported by test_perturbations_xray.py and test_perturbations_geometry.py)
# ---------------------------------------------------------------------------------------------


def rng_for(name: str, seed: int, indices: list[int] | torch.Tensor) -> SampleRNG:
    return SampleRNG(sample_keys(stream_key(seed, name), torch.as_tensor(indices)))


def check_contract(cls: type[Perturbation], x: torch.Tensor) -> None:
    """Shape, dtype, device, range and finiteness for each input dtype and severity."""
    p = cls()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        for severity in (1, 3, 5):
            y, params = p(xd, severity, rng_for(cls.name, 0, range(x.shape[0])))
            assert y.shape == x.shape and y.dtype == dtype and y.device == x.device, (cls.name, dtype)
            yf = y.float()
            assert torch.isfinite(yf).all(), (cls.name, dtype, severity)
            assert yf.min() >= 0.0 and yf.max() <= 1.0, (cls.name, dtype, severity)
            for k, v in params.items():
                assert isinstance(v, torch.Tensor) and v.shape[0] == x.shape[0], (cls.name, k)


def check_batch_invariance(cls: type[Perturbation], x: torch.Tensor) -> None:
    """A sample's output depends only on its key: batch of 4 == batch of 1 + batch of 3."""
    p = cls()
    x4 = torch.cat([x, x.flip(0)])[:4]
    idx = torch.tensor([7, 11, 13, 17])
    key = stream_key(3, cls.name, 4)
    whole, _ = p(x4, 4, SampleRNG(sample_keys(key, idx)))
    first, _ = p(x4[:1], 4, SampleRNG(sample_keys(key, idx[:1])))
    rest, _ = p(x4[1:], 4, SampleRNG(sample_keys(key, idx[1:])))
    torch.testing.assert_close(whole, torch.cat([first, rest]), rtol=0, atol=0)


def check_severity_zero(cls: type[Perturbation], x: torch.Tensor) -> None:
    y, params = cls()(x, 0, rng_for(cls.name, 0, range(x.shape[0])))
    assert params == {} and torch.equal(y, x)


def severity_curve(cls: type[Perturbation], x: torch.Tensor, seeds: int) -> tuple[list[float], list[float]]:
    """Mean absolute change and PSNR (dB) to the clean image for severities 1..5."""
    p = cls()
    mac, psnr = [], []
    for severity in range(1, 6):
        abs_sum, sq_sum = 0.0, 0.0
        for seed in range(seeds):
            y, _ = p(x, severity, rng_for(cls.name, seed, range(x.shape[0])))
            diff = y.float() - x.float()
            abs_sum += diff.abs().mean().item()
            sq_sum += diff.pow(2).mean().item()
        mac.append(abs_sum / seeds)
        psnr.append(10.0 * float(np.log10(1.0 / max(sq_sum / seeds, 1e-12))))
    return mac, psnr


def check_monotone(cls: type[Perturbation], x: torch.Tensor, seeds: int = 4) -> None:
    mac, psnr = severity_curve(cls, x, seeds)
    assert all(b > a for a, b in zip(mac, mac[1:])), f"{cls.name}: mean |change| not increasing: {mac}"
    assert all(b < a for a, b in zip(psnr, psnr[1:])), f"{cls.name}: PSNR not decreasing: {psnr}"


def check_suite(cls: type[Perturbation], slices: torch.Tensor, volumes: torch.Tensor, seeds_2d: int = 4,
                seeds_3d: int = 2) -> None:
    """Every generic check on the dims the perturbation declares; undeclared dims must raise."""
    for nd, x, seeds in ((2, slices, seeds_2d), (3, volumes, seeds_3d)):
        if nd not in cls.dims:
            with pytest.raises(ValueError, match=rf"'{cls.name}' supports .*{nd}-D batch"):
                cls()(x, 3, rng_for(cls.name, 0, range(x.shape[0])))
            continue
        check_contract(cls, x)
        check_batch_invariance(cls, x)
        check_severity_zero(cls, x)
        check_monotone(cls, x, seeds)


def check_registered(module: object, names: set[str]) -> None:
    found = get_plugin_manager(extra=[("under_test", module)], autoload=False).perturbations()
    assert names <= set(found)
    for name in names:
        cls = found[name][1]
        assert cls.summary and cls.citation and cls.__doc__ and ".. math::" in cls.__doc__, name


# ---------------------------------------------------------------------------------------------
# Intensity suite
# ---------------------------------------------------------------------------------------------

NAMES = {"intensity.gamma", "intensity.contrast", "intensity.brightness", "intensity.histogram_shift",
         "intensity.window", "intensity.bit_depth", "intensity.inversion"}


def test_registered() -> None:
    check_registered(I, NAMES)
    assert all(c.modalities == ("any",) for c in I.PERTURBATIONS)


@pytest.mark.parametrize("cls", I.PERTURBATIONS, ids=lambda c: c.name)
def test_generic(cls: type[Perturbation], mni_slices: torch.Tensor, mni_volumes: torch.Tensor) -> None:
    check_suite(cls, mni_slices, mni_volumes)


def test_identities(mni_slices: torch.Tensor) -> None:
    x = mni_slices
    torch.testing.assert_close(I.adjust_gamma(x, 0.0), x)
    torch.testing.assert_close(I.adjust_contrast(x, 0.0), x)
    torch.testing.assert_close(I.adjust_brightness(x, 0.0), x)
    torch.testing.assert_close(I.rewindow(x, 0.0, 0.0), x)
    torch.testing.assert_close(I.invert(x, 0.0), x)
    identity = torch.linspace(0, 1, 9).expand(x.shape[0], 9)
    torch.testing.assert_close(I.remap_histogram(x, identity), x)
    x8 = torch.round(x * 255) / 255  # an 8-bit image is unchanged by 8-bit quantisation
    torch.testing.assert_close(I.quantize(x8, 8), x8)
    torch.testing.assert_close(I.invert(x, 1.0), 1.0 - x)


def test_gamma_matches_torchio(mni_slices: torch.Tensor) -> None:
    for log_gamma in (-0.5, 0.3):
        ref = tio.Gamma(gamma=float(np.exp(log_gamma)))(tio.ScalarImage(tensor=mni_slices[0][..., None])).data[..., 0]
        torch.testing.assert_close(I.adjust_gamma(mni_slices[:1], log_gamma)[0], ref, atol=1e-5, rtol=0)


def test_gamma_sampling_unchanged() -> None:
    """Gamma keeps its original draw order: magnitude first, then the sign from one uniform."""
    rng_a, rng_b = rng_for("intensity.gamma", 0, range(6)), rng_for("intensity.gamma", 0, range(6))
    params = I.Gamma().sample(3, rng_a, torch.Size([6, 1, 8, 8]))
    magnitude = rng_b.uniform(1, low=0.30, high=0.45)[:, 0]
    sign = torch.where(rng_b.uniform(1)[:, 0] < 0.5, -1.0, 1.0)
    torch.testing.assert_close(params["log_gamma"], magnitude * sign)


def test_histogram_shift_is_monotone_and_keeps_ends() -> None:
    ramp = torch.linspace(0, 1, 1001).reshape(1, 1, 1, 1001).expand(8, 1, 1, 1001).contiguous()
    y, params = I.HistogramShift()(ramp, 5, rng_for("intensity.histogram_shift", 1, range(8)))
    assert (y[..., 1:] - y[..., :-1] >= -1e-6).all()
    torch.testing.assert_close(y[..., 0], torch.zeros(8, 1, 1))
    torch.testing.assert_close(y[..., -1], torch.ones(8, 1, 1))
    assert params["knots"].shape == (8, 9)


def test_window_values() -> None:
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).reshape(1, 1, 1, 5)
    # half the width about the same level: [0.25, 0.75] -> [0, 1]
    torch.testing.assert_close(I.rewindow(x, 0.0, float(np.log(0.5))), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]).reshape(1, 1, 1, 5))
    # level raised by 0.25: what was 0.75 is now mid-grey
    torch.testing.assert_close(I.rewindow(x, 0.25, 0.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75]).reshape(1, 1, 1, 5))


def test_bit_depth_levels(mni_slices: torch.Tensor) -> None:
    for severity, bits in ((1, 6), (5, 2)):
        y, _ = I.BitDepth()(mni_slices, severity, rng_for("intensity.bit_depth", 0, range(4)))
        assert torch.unique(y).numel() <= 2 ** bits


def test_invalid_arguments(mni_slices: torch.Tensor) -> None:
    x = mni_slices
    with pytest.raises(ValueError, match=r"severity of 'intensity.contrast' must be an integer 0..5, got 6"):
        I.Contrast()(x, 6, rng_for("c", 0, range(4)))
    with pytest.raises(ValueError, match=r"bits must be in \[1, 16\], got 0"):
        I.quantize(x, 0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        I.invert(x, 1.5)
    with pytest.raises(ValueError, match=r"shift must be in \[-1, 1\], got nan"):
        I.adjust_brightness(x, float("nan"))
    with pytest.raises(ValueError, match=r"log_contrast must be a number or a tensor of shape \[4\], got shape \(3,\)"):
        I.adjust_contrast(x, torch.zeros(3))
    with pytest.raises(TypeError, match=r"log_gamma must be a number or a tensor, got '0.5'"):
        I.adjust_gamma(x, "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"knots must have shape \[4, K\+1\] with K >= 1, got \(4,\)"):
        I.remap_histogram(x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"expected a \[B, C, H, W\] or \[B, C, D, H, W\] batch, got shape \(128, 128\)"):
        I.Window().apply(x[0, 0], {"level_shift": torch.zeros(1), "log_width": torch.zeros(1)})
