"""``mri.ghosting`` and ``mri.spike``: artifacts made by corrupting k-space lines or points."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from medaudit.perturbation import Perturbation, check_input, check_shape, finish, host_constant, in_blocks, per_sample
from medaudit.rng import SampleRNG

from .phase_encode import draw_axis, per_pe_axis


def draw_int(cls: type[Perturbation], rng: SampleRNG, severity: int, param: str) -> Tensor:
    """An integer parameter per sample (int64 ``[B]``); a range ``(low, high)`` is inclusive."""
    spec = cls.spec(severity, param)
    low, high = spec if isinstance(spec, tuple) else (spec, spec)
    return rng.integers(int(low), int(high) + 1, 1)[:, 0]


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
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomGhosting; Zaitsev, Maclaren & Herbst, J. Magn. Reson. Imaging 42 (2015) 887-901."
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
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomSpike; Zhuo & Gullapalli, RadioGraphics 26 (2006) 275-297 (AAPM/RSNA physics tutorial)."
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
        mean = (torch.sum(xf, dim=tuple(range(-nd, 0)), keepdim=True, dtype=torch.float64) / math.prod(spatial)).float()
        return finish(torch.addcmul(xf, stripes, per_sample(params["intensity"], mean) * mean), x)
