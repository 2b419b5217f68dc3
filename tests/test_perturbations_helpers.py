"""Tests of the public perturbation helpers: ``medaudit.kspace``, ``medaudit.resample`` and the
sampling/checking/finishing helpers of ``medaudit.perturbation``.

Each is checked against an independent reference (torch's own FFT and ``affine_grid``, an
``einsum``, hand-computed values, draws replayed from a second stream), not against itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medaudit.kspace import centred_fft, centred_ifft_real, kspace_coordinates
from medaudit.perturbation import Perturbation, batch_param, check_input, check_shape, finish, finish_
from medaudit.resample import along_axis, affine_grid, matrices_allowed, normalised_centres
from medaudit.rng import SampleRNG


class _Signed(Perturbation):
    name = "helpers.signed"
    suite = "helpers"
    severities = {level: {"ranged": (0.2 * level, 0.2 * level + 0.1), "fixed": 0.5} for level in range(1, 6)}

    def sample(self, severity, rng, shape):  # pragma: no cover - not called
        return {}

    def apply(self, x, params):  # pragma: no cover - not called
        return x


def _keys(n: int) -> torch.Tensor:
    return torch.arange(11, 11 + n, dtype=torch.int64)


# --- medaudit.kspace ----------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(8, 6), (7, 5), (4, 6, 8), (5, 4, 3)], ids=str)
def test_centred_fft_is_shifted_fftn_and_inverts(spatial: tuple[int, ...]) -> None:
    """Even grids take the checkerboard path, odd ones the roll: both equal fftshift(fftn)."""
    nd = len(spatial)
    x = torch.rand(2, 3, *spatial, generator=torch.Generator().manual_seed(nd))
    dims = tuple(range(-nd, 0))
    k = centred_fft(x, nd)
    torch.testing.assert_close(k, torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims), atol=1e-5, rtol=0)
    # the zero frequency (the sum) sits at index N // 2 of every axis
    centre = k[(slice(None), slice(None), *(n // 2 for n in spatial))]
    torch.testing.assert_close(centre.real, x.sum(dim=dims), atol=1e-4, rtol=0)
    torch.testing.assert_close(centred_ifft_real(k, nd), x, atol=1e-6, rtol=0)


def test_kspace_coordinates_hand_computed() -> None:
    even, odd = kspace_coordinates((4, 3), torch.device("cpu"))
    assert even.shape == (4, 1) and odd.shape == (1, 3)
    assert even.flatten().tolist() == [-1.0, -0.5, 0.0, 0.5]  # (i - 2) / 2
    torch.testing.assert_close(odd.flatten(), torch.tensor([-2 / 3, 0.0, 2 / 3]))  # (i - 1) / 1.5


# --- medaudit.resample --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 2, 7, 10), (2, 1, 5, 6, 9)], ids=["2d", "3d"])
def test_affine_grid_equals_torch(shape: tuple[int, ...]) -> None:
    nd = len(shape) - 2
    theta = torch.randn(shape[0], nd, nd + 1, generator=torch.Generator().manual_seed(nd))
    ours = affine_grid(theta, shape)
    torch.testing.assert_close(ours, F.affine_grid(theta, list(shape), align_corners=False), atol=1e-6, rtol=0)
    # batch-invariant: one sample's grid alone equals its slice of the batch's
    assert torch.equal(affine_grid(theta[1:2], [1, *shape[1:]]), ours[1:2])


def test_normalised_centres_hand_computed() -> None:
    assert normalised_centres(2, torch.device("cpu")).tolist() == [-0.5, 0.5]
    assert normalised_centres(4, torch.device("cpu")).tolist() == [-0.75, -0.25, 0.25, 0.75]


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_along_axis_equals_einsum(dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    y = torch.rand(3, 2, 5, 6, 7, generator=g)
    n = y.shape[dim]
    mats = torch.rand(3, n, n, generator=g)
    letters = "bcdhw"
    src = letters[:dim] + "j" + letters[dim + 1:]
    dst = letters[:dim] + "i" + letters[dim + 1:]
    reference = torch.einsum(f"bij,{src}->{dst}", mats, y)
    torch.testing.assert_close(along_axis(y, mats, dim), reference, atol=1e-5, rtol=0)


def test_matrices_allowed_follows_matmul_precision() -> None:
    x = torch.zeros(1, 1, 4, 4)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert not matrices_allowed(x)
        torch.set_float32_matmul_precision("highest")
        onednn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
        assert matrices_allowed(x) == (getattr(onednn, "fp32_precision", "none") in ("none", "ieee"))
    finally:
        torch.set_float32_matmul_precision(before)


# --- medaudit.perturbation ----------------------------------------------------------------------


def test_draw_signed_replays_magnitude_then_sign() -> None:
    """A range: one uniform per value in the range, then one uniform per value for the sign."""
    ours = _Signed.draw_signed(SampleRNG(_keys(64)), 3, "ranged", 2)
    replay = SampleRNG(_keys(64))
    magnitude = replay.uniform(2, low=0.6, high=0.7)
    negative = replay.uniform(2) < 0.5
    assert ours.shape == (64, 2) and ours.dtype == torch.float32
    assert torch.equal(ours, torch.where(negative, -magnitude, magnitude))
    assert ((ours.abs() > 0.6) & (ours.abs() < 0.7)).all()
    assert (ours < 0).any() and (ours > 0).any()


def test_draw_signed_constant_takes_only_the_sign_draw() -> None:
    rng = SampleRNG(_keys(32))
    ours = _Signed.draw_signed(rng, 1, "fixed")
    replay = SampleRNG(_keys(32))
    sign = torch.where(replay.uniform() < 0.5, -1.0, 1.0)
    assert ours.shape == (32,) and torch.equal(ours, 0.5 * sign)
    # the stream advanced by the sign's draw only, as Perturbation.draw takes none for a constant
    assert torch.equal(rng.uniform(), replay.uniform())


def test_check_input_and_check_shape() -> None:
    x3 = torch.zeros(2, 1, 4, 5, 6)
    assert check_input("helpers.op", (2, 3), x3) == 3
    assert check_input("helpers.op", (2,), x3[:, :, 0]) == 2
    with pytest.raises(ValueError, match=r"^helpers\.op: x must be \[B, C, H, W\], got x of shape \(2, 1, 4, 5, 6\) "
                                         r"\('helpers\.op' supports \(2,\)-D batches only, got a 3-D batch\)$"):
        check_input("helpers.op", (2,), x3)
    rng = SampleRNG(_keys(2))
    assert check_shape("helpers.op", (3,), rng, x3.shape) == 3
    with pytest.raises(ValueError, match=r"^helpers\.op: shape must be \[B, C, D, H, W\], got shape=\(2, 1, 4, 5\)$"):
        check_shape("helpers.op", (3,), rng, (2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"^helpers\.op: rng has batch size 2 but shape\[0\]=3$"):
        check_shape("helpers.op", (3,), rng, (3, 1, 4, 5, 6))


def test_batch_param_values() -> None:
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float16)
    assert torch.equal(batch_param(2, "p", x, 0, 5), torch.full((3,), 2.0))
    tensor = torch.tensor([7.0, -1.0, 0.5], dtype=torch.float64)
    out = batch_param(tensor, "p", x, 0.0, 1.0)  # tensors are not range-checked (no host sync)
    assert out.dtype == torch.float32 and out.tolist() == [7.0, -1.0, 0.5]
    with pytest.raises(ValueError, match=r"p must be in \[0, 5\], got 6"):
        batch_param(6, "p", x, 0, 5)
    with pytest.raises(TypeError, match=r"p must be a number or a tensor, got True"):
        batch_param(True, "p", x)


def test_finish_in_place_equals_finish() -> None:
    like = torch.zeros(1, 1, 2, 3, dtype=torch.bfloat16)
    values = torch.tensor([[[[float("nan"), float("inf"), -float("inf")], [-0.5, 0.25, 1.5]]]])
    expected = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 0.25, 1.0]]]], dtype=torch.bfloat16)
    assert torch.equal(finish(values.clone(), like), expected)
    y = values.clone()
    out = finish_(y, like)
    assert torch.equal(out, expected) and out.dtype == torch.bfloat16
    assert y.tolist() == [[[[0.0, 1.0, 0.0], [0.0, 0.25, 1.0]]]]  # y itself was overwritten
