r"""MRI acquisition artifacts: motion, ghosting, spikes, bias field, Rician noise, Gibbs, anisotropy.

Conventions shared by every perturbation of this module (and reused by :mod:`medaudit.plugins.ct`):

* **k-space** is the centred DFT over the spatial axes, :func:`centred_fft` (``fftshift`` after
  ``fftn``, TorchIO's ``FourierTransform`` convention), so index ``N // 2`` along an axis holds
  the zero frequency and line ``0`` the most negative one.
* **Reconstruction** is the real part of the inverse DFT, :func:`centred_ifft_real`, as in
  TorchIO: the signed overshoots of ringing and ghosts are kept and :func:`finish` clamps to
  ``[0, 1]`` afterwards.
* **Phase-encode axis**: scanners acquire k-space line by line along the phase-encode (PE)
  direction, so temporal effects (motion, periodic modulation) act on whole lines/planes
  perpendicular to it. The PE axis is not known from a tensor, so it is drawn per sample
  uniformly among the spatial axes (:func:`draw_axis`). A k-space change that varies along one
  axis only is a 1-D operation along it (the transforms along the other axes cancel), so motion
  and ghosting run 1-D real FFTs along each sample's PE axis (:func:`per_pe_axis`); the line of
  uncentred FFT index ``u`` sits at centred position ``(u + N // 2) mod N``, which lets them skip
  the ``fftshift`` copies.
* Channels share a sample's parameters (TorchIO loops over channels with the same parameters).
* Spatial axes are ``(H, W)`` for ``[B, C, H, W]`` and ``(D, H, W)`` for ``[B, C, D, H, W]``;
  per-axis parameters are given in that order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medaudit.hookspecs import hookimpl
from medaudit.perturbation import Perturbation, finish, host_constant, host_readable, in_blocks, per_sample
from medaudit.plugins.geometry import affine_grid, two_pass_resample
from medaudit.plugins.intensity import finish_
from medaudit.rng import SampleRNG

MEDAUDIT_API_VERSION = 1

_TORCHIO = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021)"


# ---------------------------------------------------------------------------------------------
# Shared helpers (k-space, phase-encode axis, argument checks, parameter draws)
# ---------------------------------------------------------------------------------------------


def _spatial_dims_of(nd: int) -> tuple[int, ...]:
    return tuple(range(-nd, 0))


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
    """Centred n-D DFT over the last ``nd`` axes (zero frequency at index ``N // 2``)."""
    dims = _spatial_dims_of(nd)
    checker = _checkerboard(x.shape[-nd:], x.device)
    if checker is None:
        return torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)
    return torch.fft.fftn(x * checker, dim=dims)


def centred_ifft_real(k: Tensor, nd: int) -> Tensor:
    """Inverse of :func:`centred_fft`, real part (see the module notes on reconstruction)."""
    dims = _spatial_dims_of(nd)
    checker = _checkerboard(k.shape[-nd:], k.device)
    if checker is None:
        return torch.fft.ifftn(torch.fft.ifftshift(k, dim=dims), dim=dims).real
    return torch.fft.ifftn(k, dim=dims).real * checker


def kspace_coordinates(spatial_shape: Sequence[int], device: torch.device) -> list[Tensor]:
    """Normalised centred frequency of every k-space line, one broadcastable tensor per axis.

    Axis ``a`` gets ``(i - N_a // 2) / (N_a / 2)`` in ``[-1, 1)`` shaped to broadcast against
    ``[*spatial_shape]``.
    """
    nd = len(spatial_shape)
    out = []
    for a, size in enumerate(spatial_shape):  # loop over axes (<= 3), not samples
        view = [1] * nd
        view[a] = size
        i = torch.arange(size, device=device, dtype=torch.float32)
        out.append(((i - size // 2) / (size / 2)).reshape(view))
    return out


def draw_axis(rng: SampleRNG, nd: int) -> Tensor:
    """A phase-encode (or resampling) axis per sample, uniform over the ``nd`` spatial axes."""
    return rng.integers(0, nd, 1)[:, 0]


def per_pe_axis(pe_axis: Tensor, nd: int, fn: Callable[[Tensor | None, int], Tensor]) -> Tensor:
    """Combine ``fn(samples, axis)`` over the phase-encode axes: each sample takes its own axis's result.

    ``fn`` transforms the samples with index tensor ``samples`` (``None``: all of them) along one
    spatial axis and must not depend on its batch-mates. When the axis draws can be read for
    free (:func:`~medaudit.perturbation.host_readable`: a CPU batch), each axis runs on its own
    samples only (a third of the work in 3D); otherwise every sample runs along every axis and
    ``torch.where`` selects, which needs no host synchronisation. Both give identical values.
    """
    if host_readable(pe_axis):
        out: Tensor | None = None
        for a in range(nd):  # loop over axes, not samples
            idx = (pe_axis == a).nonzero()[:, 0]
            if len(idx) == len(pe_axis):
                return fn(None, a)
            if len(idx):
                part = fn(idx, a)
                if out is None:
                    out = part.new_empty((len(pe_axis), *part.shape[1:]))
                out[idx] = part
        assert out is not None, "per_pe_axis needs a non-empty batch"
        return out
    combined = fn(None, 0)
    for a in range(1, nd):
        pick = (pe_axis == a).reshape(-1, *([1] * (combined.ndim - 1)))
        combined = torch.where(pick, fn(None, a), combined)
    return combined


def check_shape(name: str, dims: tuple[int, ...], rng: SampleRNG, shape: Sequence[int]) -> int:
    """Validate ``sample``'s arguments; return the number of spatial dimensions."""
    nd = len(shape) - 2
    if nd not in dims:
        want = " or ".join({2: "[B, C, H, W]", 3: "[B, C, D, H, W]"}[d] for d in dims)
        raise ValueError(f"{name}: shape must be {want}, got shape={tuple(shape)}")
    if rng.batch_size != shape[0]:
        raise ValueError(f"{name}: rng has batch size {rng.batch_size} but shape[0]={shape[0]}")
    return nd


def check_input(name: str, dims: tuple[int, ...], x: Tensor) -> int:
    """Validate ``apply``'s image; return the number of spatial dimensions."""
    nd = x.ndim - 2
    if nd not in dims:
        want = " or ".join({2: "[B, C, H, W]", 3: "[B, C, D, H, W]"}[d] for d in dims)
        raise ValueError(f"{name}: x must be {want}, got x of shape {tuple(x.shape)}")
    return nd


def _bounds(cls: type[Perturbation], severity: int, param: str) -> tuple[float, float]:
    spec = cls.spec(severity, param)
    return (float(spec[0]), float(spec[1])) if isinstance(spec, tuple) else (float(spec), float(spec))


def draw_signed(cls: type[Perturbation], rng: SampleRNG, severity: int, param: str, *shape: int) -> Tensor:
    """Magnitude ``U(low, high)`` of ``param`` with a random sign, ``[B, *shape]``.

    Drawing the magnitude from the documented range (instead of ``U(-high, high)``) keeps every
    draw of a severity stronger than every draw of the level below it.
    """
    low, high = _bounds(cls, severity, param)
    magnitude = rng.uniform(*shape, low=low, high=high)
    sign = torch.where(rng.uniform(*shape) < 0.5, -1.0, 1.0)
    return magnitude * sign


def draw_int(cls: type[Perturbation], rng: SampleRNG, severity: int, param: str) -> Tensor:
    """An integer parameter per sample (int64 ``[B]``); a range ``(low, high)`` is inclusive."""
    low, high = _bounds(cls, severity, param)
    return rng.integers(int(low), int(high) + 1, 1)[:, 0]


def _bview(v: Tensor, nd: int) -> Tensor:
    """``[B]`` -> ``[B, 1, 1, ...]`` broadcasting over channels and ``nd`` spatial axes (float32)."""
    return v.to(torch.float32).reshape(-1, *([1] * (nd + 1)))


# ---------------------------------------------------------------------------------------------
# Perturbations
# ---------------------------------------------------------------------------------------------


def _rotation(degrees: Tensor, nd: int) -> Tensor:
    """Rotation matrices ``[..., nd, nd]`` in grid-coordinate order (x=W, y=H[, z=D]).

    2D: one in-plane angle. 3D: Euler angles about x, y, z, composed ``Rz @ Ry @ Rx``.
    """
    rad = torch.deg2rad(degrees)
    eye = torch.eye(nd, device=degrees.device).expand(*degrees.shape[:-1], nd, nd)
    planes = [(0, 1)] if nd == 2 else [(1, 2), (2, 0), (0, 1)]  # planes rotated by each angle
    rot = eye
    for n, (i, j) in enumerate(planes):
        c, s = torch.cos(rad[..., n]), torch.sin(rad[..., n])
        r = eye.clone()
        r[..., i, i] = c
        r[..., j, j] = c
        r[..., i, j] = -s
        r[..., j, i] = s
        rot = r @ rot
    return rot


class Motion(Perturbation):
    r"""Rigid head motion during the acquisition (Shaw et al. 2019; TorchIO ``RandomMotion``).

    The object takes :math:`K+1` rigid positions during the scan. Position :math:`j` is
    acquired for the k-space lines (along the phase-encode axis, in acquisition order
    :math:`-k_{max} \to k_{max}`) between times :math:`t_j` and :math:`t_{j+1}`, so the
    recorded k-space is a patchwork of the spectra of :math:`K+1` rigidly transformed images
    (:math:`t_0=0,\ t_{K+1}=1`). The segment holding the k-space centre is given the unmoved
    image, so the artifact is ghosting/blurring rather than a global shift.

    .. math::
        \theta_{k,a} = s\,m,\ s\sim\mathcal{U}\{-1,1\},\ m\sim\mathcal{U}(\text{degrees});\quad
        \tau_{k,a} = s'\,m',\ m'\sim\mathcal{U}(\text{translation});\quad
        t_k = \tfrac{k}{K+1} + \mathcal{U}\!\left(-\tfrac{0.3}{K+1}, \tfrac{0.3}{K+1}\right)

    for :math:`k=1..K` (``num_moves``), one in-plane angle in 2D and three Euler angles in 3D,
    translations as a fraction of the field of view per spatial axis; the phase-encode axis is
    uniform over the spatial axes. Rotations are about the image centre; voxels moved in from
    outside the field of view are 0.

    TorchIO mapping: ``Motion(degrees=θ, translation=τ·N mm at 1 mm spacing, times=t)`` with
    segments along TorchIO's last axis equals ``pe_axis = nd - 1`` here (TorchIO 2D images have a
    singleton last axis, so its 2D motion degenerates to one rigid transform; compare in 3D).

    Severity mostly grows through :math:`K`: the unmoved centre segment spans :math:`1/(K+1)`
    of k-space, so more moves corrupt lower frequencies (angles beyond a few degrees saturate
    the damage to the segments they touch).

    Resampling is linear with zero padding: bilinear in 2D; in 3D two passes of 2-D bilinear
    sampling (:func:`~medaudit.plugins.geometry.two_pass_resample`), which differ from trilinear
    interpolation by interpolation error only and run about 2.5x faster on a CPU. Since the
    k-space patchwork varies along the phase-encode axis only, the spectra are 1-D transforms
    along that axis (:func:`_motion_kspace`), equal to the n-D construction up to float rounding.

    .. note:: Cost is :math:`K` resamplings plus :math:`K+1` 1-D FFTs per sample and memory
        :math:`(K+1)\times` the batch: at severity 5 (:math:`K=10`) about 10x ``mri.ghosting``.
    """

    name = "mri.motion"
    suite = "mri"
    modalities = ("mri",)
    dims = (2, 3)
    summary = "Rigid patient motion between k-space segments: ghosts and blurring along the phase-encode axis."
    citation = (
        "Shaw et al., MRI k-space motion artefact augmentation, MIDL 2019 (PMLR 102:427-436); "
        + _TORCHIO
        + ", RandomMotion."
    )
    severities = {
        1: {"degrees": (0.5, 1.5), "translation": (0.005, 0.01), "num_moves": 2},
        2: {"degrees": (1.5, 3.0), "translation": (0.01, 0.02), "num_moves": 4},
        3: {"degrees": (3.0, 5.0), "translation": (0.02, 0.035), "num_moves": 6},
        4: {"degrees": (5.0, 8.0), "translation": (0.035, 0.05), "num_moves": 8},
        5: {"degrees": (8.0, 12.0), "translation": (0.05, 0.07), "num_moves": 10},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        nd = check_shape(self.name, self.dims, rng, shape)
        k = int(self.spec(severity, "num_moves"))
        step = 1.0 / (k + 1)
        degrees = draw_signed(type(self), rng, severity, "degrees", k, 1 if nd == 2 else 3)
        translation = draw_signed(type(self), rng, severity, "translation", k, nd)
        base = torch.arange(1, k + 1, device=rng.device, dtype=torch.float32) * step
        times = base + rng.uniform(k, low=-0.3 * step, high=0.3 * step)
        return {"degrees": degrees, "translation": translation, "times": times, "pe_axis": draw_axis(rng, nd)}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return in_blocks(self._apply, x, params)

    def _apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        nd = check_input(self.name, self.dims, x)
        xf = x.float()
        b, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
        degrees = params["degrees"].to(torch.float32)
        k = degrees.shape[1]

        # affine_grid works in normalised coordinates ordered (W, H[, D]); conjugating by the
        # half-size scaling keeps rotations rigid on non-square grids.
        half = host_constant(list(spatial[::-1]), x.device) / 2
        rot = _rotation(degrees, nd)
        linear = rot * half[None, :] / half[:, None]  # S^-1 R S
        shift = 2.0 * params["translation"].to(torch.float32).flip(-1)  # fraction of FOV -> [-1, 1] units
        theta = torch.cat([linear, shift[..., None]], dim=-1)  # [B, K, nd, nd + 1]
        # Position 0 (unmoved) and the K moved positions in one buffer, so one transform covers all.
        states = torch.empty(k + 1, b, c, *spatial, device=x.device)
        states[0] = xf
        if nd == 3:
            two_pass_resample(xf, theta, out=states[1:])
        else:
            # The K grids of a sample are stacked along the first spatial axis, so one
            # grid_sample reads the unrepeated input instead of K copies of it.
            grid = affine_grid(theta.reshape(b * k, nd, nd + 1), [b * k, c, *spatial])
            grid = grid.reshape(b, k * spatial[0], *spatial[1:], nd)
            moved = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            states[1:] = moved.reshape(b, c, k, *spatial).permute(2, 0, 1, *range(3, 3 + nd))
        times = params["times"].to(torch.float32)

        def patchwork(idx: Tensor | None, axis: int) -> Tensor:
            if idx is None:
                return _motion_kspace(states, times, axis)
            return _motion_kspace(states[:, idx], times[idx], axis)

        return finish(per_pe_axis(params["pe_axis"], nd, patchwork), x)


def _motion_lines(times: Tensor, size: int) -> Tensor:
    """The position (0 = unmoved) acquiring each line of a ``size``-line axis, ``[B, size]``.

    Lines are in uncentred FFT order: index ``u`` sits at centred position ``(u + N//2) mod N``,
    acquired from ``-k_max`` to ``k_max``; segment ``j`` spans the centred positions between
    ``N t_j`` and ``N t_{j+1}``, and the segment holding the centre swaps states with segment 0.
    """
    centred = (torch.arange(size, device=times.device) + size // 2) % size
    bounds = torch.floor(size * times)  # [B, K]
    segment = (centred[None, :, None] >= bounds[:, None, :]).sum(-1)  # [B, N]
    centre = (size // 2 >= bounds).sum(-1, keepdim=True)  # [B, 1]
    return torch.where(segment == centre, 0, torch.where(segment == 0, centre, segment))


def _motion_kspace(states: Tensor, times: Tensor, axis: int) -> Tensor:
    """Real part of the image whose k-space lines along ``axis`` come from the positions' spectra.

    ``states`` ``[K+1, B, C, *S]`` holds the unmoved image (position 0) and the moved ones. The
    patchwork of n-D spectra only varies along the phase-encode axis, so the DFTs along the other
    axes cancel against the inverse: 1-D transforms along ``axis`` give the same image for a third
    of the work. The real part of an inverse DFT is the inverse of the spectrum's Hermitian part,
    ``(K[u] + conj K[-u]) / 2``, and for spectra of real images ``conj X[-u] = X[u]``, so the
    half spectrum of a real-to-complex transform holds everything:
    ``K_h[u] = (X_{s(u)}[u] + X_{s(-u)}[u]) / 2`` for ``u <= N/2``, inverted by ``irfft``. (The
    1-D ``irfft`` is batch-invariant; torch's n-D ``irfftn`` is not.)
    """
    b, nd = states.shape[1], states.ndim - 3
    dim = 3 + axis
    size = states.shape[dim]
    spectra = torch.fft.rfft(states, dim=dim)  # [K+1, B, C, ..., N//2 + 1, ...]
    lines = _motion_lines(times, size)
    u = torch.arange(size // 2 + 1, device=states.device)
    view = [1, b, 1] + [1] * nd
    view[dim] = len(u)
    shape = [1, *spectra.shape[1:]]
    positive = torch.gather(spectra, 0, lines[:, u].reshape(view).expand(shape))
    hermitian = positive.add_(torch.gather(spectra, 0, lines[:, (-u) % size].reshape(view).expand(shape))).mul_(0.5)
    return torch.fft.irfft(hermitian[0], n=size, dim=dim - 1)


class Ghosting(Perturbation):
    r"""Periodic k-space line modulation: discrete ghosts along the phase-encode axis (TorchIO ``Ghosting``).

    Pulsatile flow, cardiac or respiratory motion that is periodic in the line acquisition order
    modulates every :math:`n`-th phase-encode line; the image gains :math:`n` replicas shifted by
    FOV/:math:`n`. Lines :math:`i \equiv 0 \pmod n` along the PE axis are scaled by
    :math:`1-s`, except the centre line (TorchIO's ``restore=None``):

    .. math::
        \hat{k}_i = k_i\,(1 - s\,[i \bmod n = 0 \wedge i \neq \lfloor N/2 \rfloor]),\quad
        s\sim\mathcal{U}(\text{intensity}),\ n\sim\mathcal{U}\{\text{num\_ghosts}\}

    with the PE axis uniform over the spatial axes. ``s = 0`` is the identity.

    TorchIO mapping: identical to ``Ghosting(num_ghosts=n, axis=pe_axis, intensity=s,
    restore=None)`` on a TorchIO image whose spatial axes are ours (2D as ``(H, W, 1)``).
    """

    name = "mri.ghosting"
    suite = "mri"
    modalities = ("mri",)
    dims = (2, 3)
    summary = "Ghost replicas along the phase-encode axis from periodic k-space line modulation."
    citation = _TORCHIO + ", RandomGhosting; Zaitsev, Maclaren & Herbst, J. Magn. Reson. Imaging 42 (2015) 887-901."
    severities = {
        1: {"intensity": (0.10, 0.20), "num_ghosts": (2, 3)},
        2: {"intensity": (0.20, 0.32), "num_ghosts": (2, 3)},
        3: {"intensity": (0.32, 0.48), "num_ghosts": (2, 3)},
        4: {"intensity": (0.48, 0.70), "num_ghosts": (2, 3)},
        5: {"intensity": (0.70, 1.00), "num_ghosts": (2, 3)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        nd = check_shape(self.name, self.dims, rng, shape)
        return {
            "intensity": self.draw(rng, severity, "intensity"),
            "num_ghosts": draw_int(type(self), rng, severity, "num_ghosts"),
            "pe_axis": draw_axis(rng, nd),
        }

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return in_blocks(self._apply, x, params)

    def _apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        nd = check_input(self.name, self.dims, x)
        spatial = tuple(x.shape[2:])
        xf = x.float()
        num_ghosts = params["num_ghosts"].to(torch.float32)[:, None]
        intensity = params["intensity"].to(torch.float32)[:, None]

        def modulate(idx: Tensor | None, axis: int) -> Tensor:
            xs, n, s = (xf, num_ghosts, intensity) if idx is None else (xf[idx], num_ghosts[idx], intensity[idx])
            size = spatial[axis]

            def gain(u: Tensor) -> Tensor:  # line gain at uncentred index u (centred (u + N//2) mod N)
                centred = ((u + size // 2) % size).to(torch.float32)[None, :]
                return 1.0 - s * ((torch.remainder(centred, n) == 0) & (centred != size // 2))

            # The gain varies along the phase-encode axis only, so 1-D transforms along it suffice;
            # the real part of the inverse is the inverse of the Hermitian part of the modulated
            # spectrum, X[u] (g[u] + g[-u]) / 2, which irfft inverts from the half spectrum.
            u = torch.arange(size // 2 + 1, device=x.device)
            view = [len(xs), 1] + [1] * nd
            view[2 + axis] = len(u)
            hermitian = (0.5 * (gain(u) + gain((-u) % size))).reshape(view)
            return torch.fft.irfft(torch.fft.rfft(xs, dim=2 + axis) * hermitian, n=size, dim=2 + axis)

        return finish(per_pe_axis(params["pe_axis"], nd, modulate), x)


class Spike(Perturbation):
    r"""Herringbone (spike / corduroy) artifact: bright points in k-space (TorchIO ``Spike``).

    A discharge or a loose RF component corrupts a few k-space samples with a large value; each
    corrupted point adds a plane wave (stripes) over the whole image. Each of :math:`S`
    (``num_spikes``) spikes is placed at a uniform position and adds a fraction :math:`r` of the
    largest k-space magnitude of the channel (one-sided, as in TorchIO, so stripes are a complex
    wave whose real part is seen):

    .. math::
        \hat{k} = k + r\,\max|k| \sum_{j=1}^{S} \delta_{\lfloor p_j \odot N \rfloor},\quad
        p_j \sim \mathcal{U}[0,1)^{d},\ r\sim\mathcal{U}(\text{intensity})

    A spike's stripes have amplitude :math:`r\,\bar{x}` (mean image intensity). ``r = 0`` is the
    identity. For images in :math:`[0, 1]` the largest k-space magnitude is the DC term, so each
    spike is added directly as its image-space cosine wave
    :math:`r\,\bar{x}\cos(2\pi\,u\cdot n / N)` (:math:`u` its DFT frequency), without a transform.

    TorchIO mapping: identical to ``Spike(spikes_positions=p (a third coordinate of 0 for 2D),
    intensity=r)``.
    """

    name = "mri.spike"
    suite = "mri"
    modalities = ("mri",)
    dims = (2, 3)
    summary = "Herringbone stripes across the image from a few corrupted k-space samples."
    citation = _TORCHIO + ", RandomSpike; Zhuo & Gullapalli, RadioGraphics 26 (2006) 275-297 (AAPM/RSNA physics tutorial)."
    severities = {
        1: {"intensity": (0.08, 0.15), "num_spikes": 1},
        2: {"intensity": (0.15, 0.25), "num_spikes": 1},
        3: {"intensity": (0.20, 0.30), "num_spikes": 2},
        4: {"intensity": (0.30, 0.45), "num_spikes": 2},
        5: {"intensity": (0.35, 0.55), "num_spikes": 3},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        nd = check_shape(self.name, self.dims, rng, shape)
        num = int(self.spec(severity, "num_spikes"))
        return {"intensity": self.draw(rng, severity, "intensity"), "positions": rng.uniform(num, nd)}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return in_blocks(self._apply, x, params)

    def _apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        nd = check_input(self.name, self.dims, x)
        b, spatial = x.shape[0], tuple(x.shape[2:])
        xf = x.float()
        positions = params["positions"].to(torch.float32)  # [B, S, nd]
        size = host_constant(list(spatial), x.device)
        index = torch.minimum(torch.floor(positions * size), size - 1).long()  # centred k-space index
        # A k-space point of value A at DFT frequency u adds (A / N) exp(2 pi i u.n / N) to the
        # image, whose real part is a cosine wave: no transform is needed. For images in [0, 1]
        # the largest k-space magnitude is the DC term, the sum of the image (|X(f)| <= sum |x|),
        # so A / N = r * mean(x). The wave factors over the last axis,
        # cos(p + q) = cos p cos q - sin p sin q, with p the phase over the other axes (a small
        # plane), so each spike costs two broadcast multiply-adds over the volume. Phases come from
        # exact integer products u * n mod N.
        num = index.shape[1]
        phases = []
        for a, n in enumerate(spatial):  # loop over axes, not samples
            u = (index[..., a] - n // 2) % n  # centred index c holds frequency (c - N // 2) mod N
            view = [b, num] + [1] * nd
            view[2 + a] = n
            along = (u[..., None] * torch.arange(n, device=x.device)) % n  # [B, S, n]
            phases.append((along.to(torch.float32) * (2.0 * math.pi / n)).reshape(view))
        plane = sum(phases[:-1], torch.zeros((), device=x.device))  # [B, S, ..., 1]
        last = phases[-1]  # [B, S, 1, ..., W]
        stripes = torch.zeros(b, 1, *spatial, device=x.device)
        for j in range(num):  # loop over spikes (at most 3), not samples
            p, q = plane[:, j:j + 1], last[:, j:j + 1]
            stripes.addcmul_(torch.cos(p), torch.cos(q)).addcmul_(torch.sin(p), torch.sin(q), value=-1.0)
        # float64 accumulation: a float32 reduction's rounding depends on how threads split the
        # batch; the float64 sum rounds back identically
        dims = _spatial_dims_of(nd)
        mean = (torch.sum(xf, dim=dims, keepdim=True, dtype=torch.float64) / math.prod(spatial)).float()
        return finish(torch.addcmul(xf, stripes, _bview(params["intensity"], nd) * mean), x)


def monomial_exponents(order: int, nd: int) -> list[tuple[int, ...]]:
    """Exponents of the monomials of total degree <= ``order``, in TorchIO's coefficient order."""
    if nd == 2:
        return [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    return [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]


def _contract(t: Tensor, basis: Tensor, dim: int) -> Tensor:
    """Replace axis ``dim`` of ``t`` (size ``P``) by ``sum_p t[..., p, ...] * basis[p]`` (``basis`` ``[P, N]``).

    An explicit sum of broadcast products rather than ``einsum``: a GEMM's blocking depends on
    the batch size, which would make a sample's field depend on its batch in the last bit.
    """
    view = [1] * t.ndim
    view[dim] = basis.shape[1]
    out = t.narrow(dim, 0, 1) * basis[0].reshape(view)
    for p in range(1, basis.shape[0]):
        out = out + t.narrow(dim, p, 1) * basis[p].reshape(view)
    return out


def _order_of(num_coefficients: int, nd: int) -> int:
    for order in range(16):
        if len(monomial_exponents(order, nd)) == num_coefficients:
            return order
    raise ValueError(f"coefficients: {num_coefficients} is not the number of {nd}D monomials of any order < 16")


class BiasField(Perturbation):
    r"""Smooth multiplicative intensity non-uniformity from the receive coil (TorchIO ``BiasField``).

    Coil sensitivity makes intensity drift smoothly across the field of view. The log-field is a
    polynomial of total degree :math:`\le` ``order`` in coordinates normalised to :math:`[-1,1]`
    per axis (Van Leemput et al. 1999):

    .. math::
        y = x\,\exp\Big(\sum_{i+j(+l)\le O} c_{ij(l)}\, u^i v^j (w^l)\Big),\quad
        c = s\,m,\ s\sim\mathcal{U}\{-1,1\},\ m\sim\mathcal{U}(\text{coefficients})

    (the constant term scales the whole image). All coefficients zero is the identity.

    TorchIO mapping: ``BiasField(coefficients=c, order=O)`` gives the same field
    (:meth:`field`) for the same coefficients, in TorchIO's order (``monomial_exponents``; for
    2D pass TorchIO the 3D list with our values at the ``l = 0`` terms); ``RandomBiasField``
    draws :math:`c\sim\mathcal{U}(-a, a)` where we draw signed magnitudes.

    The field is a separable contraction (one axis at a time), so it costs :math:`O+1`
    full-volume multiply-adds instead of one full-volume power product per monomial; it is several times
    faster than TorchIO's NumPy loop (tested).
    """

    name = "mri.bias_field"
    suite = "mri"
    modalities = ("mri",)
    dims = (2, 3)
    summary = "Smooth multiplicative intensity non-uniformity (coil sensitivity)."
    citation = (
        "Van Leemput et al., IEEE Trans. Med. Imaging 18 (1999) 897-908; Sudre et al., MICCAI 2017; "
        + _TORCHIO
        + ", RandomBiasField."
    )
    severities = {
        1: {"coefficients": (0.03, 0.06), "order": 3},
        2: {"coefficients": (0.06, 0.11), "order": 3},
        3: {"coefficients": (0.11, 0.17), "order": 3},
        4: {"coefficients": (0.17, 0.25), "order": 3},
        5: {"coefficients": (0.25, 0.35), "order": 3},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        nd = check_shape(self.name, self.dims, rng, shape)
        order = int(self.spec(severity, "order"))
        count = len(monomial_exponents(order, nd))
        return {"coefficients": draw_signed(type(self), rng, severity, "coefficients", count)}

    @staticmethod
    def field(coefficients: Tensor, spatial_shape: Sequence[int]) -> Tensor:
        """The multiplicative field ``[B, *spatial_shape]`` (float32) for coefficients ``[B, M]``."""
        nd = len(spatial_shape)
        if nd not in (2, 3) or coefficients.ndim != 2:
            raise ValueError(
                f"field: needs coefficients [B, M] and a 2D/3D spatial_shape, got coefficients of shape "
                f"{tuple(coefficients.shape)} and spatial_shape={tuple(spatial_shape)}"
            )
        order = _order_of(coefficients.shape[1], nd)
        device = coefficients.device
        exps = host_constant(monomial_exponents(order, nd), device, torch.int64)  # [M, nd]
        flat = (exps * host_constant([(order + 1) ** (nd - 1 - a) for a in range(nd)], device, torch.int64)).sum(-1)
        grid = torch.zeros(coefficients.shape[0], (order + 1) ** nd, device=device)
        grid[:, flat] = coefficients.to(torch.float32)
        coef = grid.reshape(-1, *([order + 1] * nd))  # c[b, i, j(, l)], zero above the total degree
        powers = torch.arange(order + 1, device=device, dtype=torch.float32)[:, None]
        # TorchIO's grid: cell centres normalised so the outermost ones sit at -1 and 1 (0 for N = 1).
        axes = [
            torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)
            for n in spatial_shape
        ]
        log_field = coef
        for a in reversed(range(nd)):  # contract one axis at a time: i/j/l power -> voxel
            log_field = _contract(log_field, axes[a][None, :] ** powers, 1 + a)  # 0**0 = 1 as NumPy
        return torch.exp(log_field)

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        check_input(self.name, self.dims, x)
        field = self.field(params["coefficients"].to(x.device), tuple(x.shape[2:]))
        return finish(x.float() * field[:, None], x)


class RicianNoise(Perturbation):
    r"""Thermal noise of a magnitude image: Rician, not Gaussian (Gudbjartsson & Patz 1995).

    Thermal noise is Gaussian and independent in the real and imaginary channels of the
    complex image; taking the magnitude makes it Rician, which biases dark regions upwards
    (background becomes Rayleigh-distributed with mean :math:`\sigma\sqrt{\pi/2}`):

    .. math::
        y = \sqrt{(x + \sigma n_1)^2 + (\sigma n_2)^2},\quad n_1, n_2 \sim \mathcal{N}(0, 1)
        \text{ i.i.d. per voxel},\ \sigma\sim\mathcal{U}(\text{sigma})

    The noise field is regenerated in :meth:`apply` from ``noise_key``. ``σ = 0`` is the identity.

    TorchIO mapping: TorchIO's ``Noise(mean=0, std=σ)`` is the additive Gaussian limit, which
    this matches where the signal is much larger than :math:`\sigma` (tested).
    """

    name = "mri.noise"
    suite = "mri"
    modalities = ("mri",)
    dims = (2, 3)
    summary = "Rician thermal noise of a magnitude MR image."
    citation = "Gudbjartsson & Patz, Magn. Reson. Med. 34 (1995) 910-914."
    severities = {
        1: {"sigma": (0.010, 0.020)},
        2: {"sigma": (0.020, 0.035)},
        3: {"sigma": (0.035, 0.050)},
        4: {"sigma": (0.050, 0.070)},
        5: {"sigma": (0.070, 0.100)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        check_shape(self.name, self.dims, rng, shape)
        return {"sigma": self.draw(rng, severity, "sigma"), "noise_key": rng.bits(1)[:, 0]}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        check_input(self.name, self.dims, x)
        xf = x.float()
        noise = SampleRNG(params["noise_key"].to(x.device)).normal(2, *x.shape[1:])  # [B, 2, C, ...]
        sigma = per_sample(params["sigma"], xf)
        # in place on the noise field this method owns: each avoided temporary is a full pass
        real = noise[:, 0].mul_(sigma).add_(xf)
        imag = noise[:, 1].mul_(sigma)
        return finish_(torch.hypot(real, imag), x)


class Gibbs(Perturbation):
    r"""Gibbs ringing from truncated k-space sampling.

    Acquiring only the central part of k-space convolves the image with a sinc kernel: edges
    blur and ring (overshoot bands parallel to them). Everything outside a centred box of
    half-width :math:`f` (normalised frequency, 1 = Nyquist) along every spatial axis is zeroed:

    .. math:: \hat{k}(\mathbf{u}) = k(\mathbf{u})\,[\max_a |u_a| \le f],\quad f\sim\mathcal{U}(\text{keep})

    ``f = 1`` keeps all of k-space (identity). The box is separable, so it is applied as a 1-D
    low-pass along each axis in turn. TorchIO has no counterpart; MONAI's ``GibbsNoise`` is the
    same box low-pass parameterised by :math:`\alpha = 1 - f`.
    """

    name = "mri.gibbs"
    suite = "mri"
    modalities = ("mri",)
    dims = (2, 3)
    summary = "Ringing and blurring at edges from truncated k-space."
    citation = "Gibbs, Nature 59 (1899) 606; Kellner et al., Magn. Reson. Med. 76 (2016) 1574-1581."
    severities = {
        1: {"keep": (0.70, 0.80)},
        2: {"keep": (0.56, 0.70)},
        3: {"keep": (0.44, 0.56)},
        4: {"keep": (0.34, 0.44)},
        5: {"keep": (0.25, 0.34)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        check_shape(self.name, self.dims, rng, shape)
        return {"keep": self.draw(rng, severity, "keep")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return in_blocks(self._apply, x, params)

    def _apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        nd = check_input(self.name, self.dims, x)
        keep = params["keep"].to(torch.float32)[:, None]
        y = x.float()
        # The box is a product of one symmetric 1-D mask per axis, so the low-pass is separable:
        # one real 1-D transform pair per axis (half the work of the n-D complex pair, and
        # batch-invariant, unlike torch's n-D irfftn). Frequency u of an axis of N lines has the
        # normalised centred coordinate ((u + N//2) mod N - N//2) / (N/2), as in kspace_coordinates.
        for a, n in enumerate(x.shape[2:]):  # loop over axes, not samples
            u = torch.arange(n // 2 + 1, device=x.device)
            coordinate = (((u + n // 2) % n) - n // 2).to(torch.float32) / (n / 2)
            view = [x.shape[0], 1] + [1] * nd
            view[2 + a] = len(u)
            mask = (coordinate.abs()[None, :] <= keep).to(torch.float32).reshape(view)
            y = torch.fft.irfft(torch.fft.rfft(y, dim=2 + a) * mask, n=n, dim=2 + a)
        return finish(y, x)


class Anisotropy(Perturbation):
    r"""Thick-slice / low-resolution acquisition along one axis (TorchIO ``RandomAnisotropy``).

    Clinical protocols often acquire one axis at a coarser spacing and are resampled to a
    finer grid for the model. Along a uniformly drawn axis the image is subsampled by nearest
    neighbour with a spacing :math:`r` times larger (sample centres at
    :math:`(m+\tfrac12) r - \tfrac12`) and linearly interpolated back to the original grid;
    other axes are untouched:

    .. math:: r\sim\mathcal{U}(\text{downsampling}),\quad a\sim\mathcal{U}\{0..d-1\}

    ``r = 1`` is the identity.

    TorchIO mapping: ``RandomAnisotropy(axes=(a,), downsampling=(r, r))`` (nearest down, linear
    up); SimpleITK's grid origin differs by up to half a coarse voxel, so outputs match in error
    magnitude, not voxel by voxel (tested).
    """

    name = "mri.anisotropy"
    suite = "mri"
    modalities = ("mri",)
    dims = (2, 3)
    summary = "Resolution loss along one axis: nearest downsampling and linear upsampling."
    citation = _TORCHIO + ", RandomAnisotropy; Billot et al., SynthSR, Med. Image Anal. 83 (2023)."
    severities = {
        1: {"downsampling": (1.5, 2.0)},
        2: {"downsampling": (2.0, 2.75)},
        3: {"downsampling": (2.75, 3.5)},
        4: {"downsampling": (3.5, 4.5)},
        5: {"downsampling": (4.5, 6.0)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        nd = check_shape(self.name, self.dims, rng, shape)
        return {"downsampling": self.draw(rng, severity, "downsampling"), "axis": draw_axis(rng, nd)}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        nd = check_input(self.name, self.dims, x)
        y = x.float()
        b = x.shape[0]
        factor = params["downsampling"].to(torch.float32)
        # Resample along every axis with factor 1 (exact identity) except each sample's chosen one,
        # so one batched pass serves samples with different axes.
        for a in range(nd):
            size = x.shape[2 + a]
            r = torch.where(params["axis"] == a, factor, torch.ones_like(factor))[:, None]  # [B, 1]
            coarse = torch.clamp(torch.round(size / r), min=1.0)  # number of coarse samples
            i = torch.arange(size, device=x.device, dtype=torch.float32)[None, :]
            u = (i + 0.5) / r - 0.5  # fine voxel centre in coarse-grid coordinates
            m0 = torch.floor(u)
            w = u - m0
            lo = m0.clamp(min=0.0)
            lo = torch.minimum(lo, coarse - 1)
            hi = torch.minimum((m0 + 1).clamp(min=0.0), coarse - 1)

            def nearest(m: Tensor, size: int = size, r: Tensor = r) -> Tensor:
                return torch.round((m + 0.5) * r - 0.5).clamp(0, size - 1).long()

            view = [b, 1] + [1] * nd
            view[2 + a] = size
            expand = list(y.shape)
            g0 = torch.gather(y, 2 + a, nearest(lo).reshape(view).expand(expand))
            g1 = torch.gather(y, 2 + a, nearest(hi).reshape(view).expand(expand))
            y = g0 + w.reshape(view) * (g1 - g0)
        return finish(y, x)


MRI_PERTURBATIONS: list[type[Perturbation]] = [Motion, Ghosting, Spike, BiasField, RicianNoise, Gibbs, Anisotropy]


@hookimpl
def medaudit_perturbations() -> list[type[Perturbation]]:
    return list(MRI_PERTURBATIONS)
