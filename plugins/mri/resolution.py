"""``mri.gibbs`` and ``mri.anisotropy``: resolution loss, in k-space (truncation) and along one axis."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from medaudit.perturbation import Perturbation, check_input, check_shape, finish, in_blocks
from medaudit.rng import SampleRNG

from .phase_encode import draw_axis


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
        # normalised centred coordinate ((u + N//2) mod N - N//2) / (N/2), as in medaudit.kspace.kspace_coordinates.
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
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomAnisotropy; Billot et al., SynthSR, Med. Image Anal. 83 (2023)."
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
