"""Centred Fourier transforms and k-space coordinates for perturbations that act in k-space.

The convention is TorchIO's ``FourierTransform``: k-space is ``fftshift(fftn(x))`` over the
spatial axes, so index ``N // 2`` along an axis holds the zero frequency and index ``0`` the most
negative one, and a reconstruction is the real part of the inverse (the signed overshoots of
ringing and ghosts are kept; :func:`~medaudit.perturbation.finish` clamps them afterwards).
MRI artifacts (``mri.*``) and CT noise texture (``ct.noise``) share these helpers, and a
third-party k-space perturbation gets the same convention by using them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _checkerboard(shape: Sequence[int], device: torch.device) -> Tensor | None:
    """``(-1)^(n_1 + … + n_d)`` over a spatial grid with every side even, else None.

    For an even length ``N``, ``fftshift(fft(x)) = fft(x · (-1)^n)`` and
    ``ifft(ifftshift(K)) = (-1)^n · ifft(K)``: the shift becomes one real multiplication instead of
    a roll (a full copy) of the complex k-space — the roll was half of the 3D k-space cost on CPU.
    """
    if any(n % 2 for n in shape):
        return None
    sign = torch.zeros((), dtype=torch.int64, device=device)
    for a, n in enumerate(shape):
        idx = torch.arange(n, device=device).reshape([n if b == a else 1 for b in range(len(shape))])
        sign = sign + idx
    return 1.0 - 2.0 * (sign % 2).to(torch.float32)


def centred_fft(x: Tensor, nd: int) -> Tensor:
    """Centred n-D DFT over the last ``nd`` axes.

    Parameters
    ----------
    x : Tensor
        Real or complex, ``[..., *S]`` with ``nd`` spatial axes ``S`` last (e.g. ``[B, C, H, W]``
        with ``nd = 2``).
    nd : int
        How many trailing axes to transform.

    Returns
    -------
    Tensor
        Complex, the shape of ``x``: ``fftshift(fftn(x))`` over those axes, zero frequency at
        index ``N // 2`` of each. Grids whose sides are all even take a faster path (a sign
        flip instead of the shift) with the same values up to float rounding.
    """
    dims = tuple(range(-nd, 0))
    checker = _checkerboard(x.shape[-nd:], x.device)
    if checker is None:
        return torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)
    return torch.fft.fftn(x * checker, dim=dims)


def centred_ifft_real(k: Tensor, nd: int) -> Tensor:
    """Inverse of :func:`centred_fft`, real part.

    Parameters
    ----------
    k : Tensor
        Complex centred k-space ``[..., *S]`` with ``nd`` spatial axes last.
    nd : int
        How many trailing axes to transform.

    Returns
    -------
    Tensor
        Real (float32 for complex64 input), the shape of ``k``: ``ifftn(ifftshift(k)).real``.
    """
    dims = tuple(range(-nd, 0))
    checker = _checkerboard(k.shape[-nd:], k.device)
    if checker is None:
        return torch.fft.ifftn(torch.fft.ifftshift(k, dim=dims), dim=dims).real
    return torch.fft.ifftn(k, dim=dims).real * checker


def kspace_coordinates(spatial_shape: Sequence[int], device: torch.device) -> list[Tensor]:
    """Normalised centred frequency of every k-space line, one broadcastable tensor per axis.

    Parameters
    ----------
    spatial_shape : Sequence[int]
        The spatial sizes ``(H, W)`` or ``(D, H, W)``.
    device : torch.device
        Where the tensors are made.

    Returns
    -------
    list[Tensor]
        One float32 tensor per axis ``a``, holding ``(i - N_a // 2) / (N_a / 2)`` (in
        ``[-1, 1)``, 0 at the centre, 1 = Nyquist) and shaped to broadcast against
        ``[*spatial_shape]`` (size ``N_a`` along axis ``a``, 1 elsewhere); e.g. the radial
        frequency is ``sqrt(sum(c * c for c in coords))``.
    """
    nd = len(spatial_shape)
    out = []
    for a, size in enumerate(spatial_shape):  # loop over axes (<= 3), not samples
        view = [1] * nd
        view[a] = size
        i = torch.arange(size, device=device, dtype=torch.float32)
        out.append(((i - size // 2) / (size / 2)).reshape(view))
    return out
