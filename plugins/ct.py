r"""CT reconstruction artifacts: low-dose noise, streaks, rings, cupping, slice thickness.

Conventions of this module:

* Images are window-scaled attenuation in ``[0, 1]`` (the audit's intensity scaling), so an
  amplitude of 0.1 is a tenth of the display window (e.g. 50 HU in a 500 HU window).
* The scanner's rotation axis is the first spatial axis ``D`` of ``[B, C, D, H, W]``; axial slices
  are ``(H, W)``. Artifacts born in the projection geometry (noise texture, streaks, rings,
  cupping) are modelled in the axial plane around the image centre (the isocentre) and repeat
  over ``D``; a 2D batch is one axial slice per sample.
* All models are image-domain approximations of projection-domain effects: no sinogram is
  simulated, which keeps every perturbation a few batched tensor ops. Each docstring says what
  the approximation keeps and what it drops.
* k-space/Fourier helpers come from :mod:`medaudit.kspace`, in the same convention as ``mri.*``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from medaudit.hookspecs import hookimpl
from medaudit.kspace import centred_fft, centred_ifft_real, kspace_coordinates
from medaudit.perturbation import Perturbation, check_input, check_shape, finish, host_constant, per_sample
from medaudit.rng import SampleRNG

MEDAUDIT_API_VERSION = 1


def _plane_offsets(x: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel offsets from the axial-plane centre: ``(dy [H, 1], dx [1, W])`` float32."""
    h, w = x.shape[-2:]
    dy = torch.arange(h, device=x.device, dtype=torch.float32)[:, None] - (h - 1) / 2
    dx = torch.arange(w, device=x.device, dtype=torch.float32)[None, :] - (w - 1) / 2
    return dy, dx


def _over_slices(field: Tensor, x: Tensor) -> Tensor:
    """An in-plane field ``[B, H, W]`` shaped to broadcast over ``x``'s channels (and slices)."""
    return field.reshape(field.shape[0], 1, *([1] * (x.ndim - 4)), *field.shape[-2:])


class LowDoseNoise(Perturbation):
    r"""Quantum noise of a reduced-dose scan (image-domain approximation).

    Fewer photons make the projection data Poisson-noisier; after filtered back-projection the
    image noise variance scales as :math:`1/\text{dose}`, is larger behind dense tissue and has
    the ramp-filter texture (noise power spectrum rising with in-plane frequency). Simulating a
    scan at a fraction :math:`d` of the reference dose adds the missing variance:

    .. math::
        y = x + \sigma_{ref}\sqrt{(1/d - 1)(1 + x)}\;\tilde n,\quad
        \tilde n = \frac{\mathcal{F}^{-1}_{2D}\big(\sqrt{|\mathbf{f}|}\,\mathcal{F}_{2D} n\big)}
                        {\sqrt{\overline{|\mathbf{f}|}}},\quad n\sim\mathcal{N}(0, I),\
        d\sim\mathcal{U}(\text{dose})

    with :math:`\sigma_{ref} = 0.02` (:attr:`reference_sigma`, the noise of the reference-dose
    image), :math:`|\mathbf{f}|` the normalised in-plane radial frequency, and ``1 + x`` a linear
    stand-in for the attenuation dependence. Dropped: the exact NPS of a given kernel, noise
    correlation across slices and photon starvation (see ``ct.streak``). ``d = 1`` is the
    identity. TorchIO has no counterpart.
    """

    name = "ct.noise"
    suite = "ct"
    modalities = ("ct",)
    dims = (2, 3)
    summary = "Correlated quantum noise of a reduced-dose scan, stronger in dense tissue."
    citation = (
        "Yu et al., Development and validation of a practical lower-dose-simulation tool, "
        "Med. Phys. 39 (2012) 2936-2945; Hanson, Med. Phys. 6 (1979) 441-451."
    )
    reference_sigma = 0.02
    severities = {
        1: {"dose": (0.35, 0.50)},
        2: {"dose": (0.20, 0.35)},
        3: {"dose": (0.10, 0.20)},
        4: {"dose": (0.05, 0.10)},
        5: {"dose": (0.025, 0.05)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        check_shape(self.name, self.dims, rng, shape)
        return {"dose": self.draw(rng, severity, "dose"), "noise_key": rng.bits(1)[:, 0]}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        check_input(self.name, self.dims, x)
        xf = x.float()
        white = SampleRNG(params["noise_key"].to(x.device)).normal(*x.shape[1:])
        fy, fx = kspace_coordinates(tuple(x.shape[-2:]), x.device)
        ramp = torch.sqrt(fy * fy + fx * fx)
        # sqrt of the ramp on the amplitude gives an NPS proportional to |f|; dividing by the rms
        # gain restores unit variance so that sigma keeps its meaning.
        texture = centred_ifft_real(centred_fft(white, 2) * torch.sqrt(ramp), 2) / torch.sqrt(ramp.mean())
        dose = per_sample(params["dose"], xf)
        std = self.reference_sigma * torch.sqrt((1.0 / dose - 1.0).clamp(min=0.0) * (1.0 + xf))
        return finish(xf + std * texture, x)


class Streak(Perturbation):
    r"""Metal / photon-starvation streaks: straight bright and dark lines through one point.

    A highly attenuating object (metal implant, dense bone) starves some projections of
    photons; filtered back-projection spreads the resulting errors along those rays, giving
    straight streaks that radiate from the object and cross the whole field of view. Model:
    :math:`K` (``num_streaks``) lines through a common point :math:`\mathbf{c}`, each a Gaussian ridge across its
    direction:

    .. math::
        y = x + \sum_{k=1}^{K} a_k \exp\!\Big(-\frac{((\mathbf{p}-\mathbf{c})\cdot \mathbf{n}_k)^2}{2 w^2}\Big),\quad
        \mathbf{n}_k = (-\sin\phi_k, \cos\phi_k),\ \phi_k\sim\mathcal{U}[0,\pi),\
        a_k = s\,m,\ m\sim\mathcal{U}(\text{amplitude}),

    :math:`s` a random sign (bright or dark streak), :math:`\mathbf{c}` uniform in the central
    half of the slice (in pixels), :math:`w = 1` pixel (:attr:`width`). Repeats over ``D`` (an
    implant spanning the volume). Dropped: the metal itself and the fall-off of streak intensity
    with distance. ``a = 0`` is the identity.
    """

    name = "ct.streak"
    suite = "ct"
    modalities = ("ct",)
    dims = (2, 3)
    summary = "Bright and dark straight streaks radiating from a dense object."
    citation = "Barrett & Keat, Artifacts in CT: recognition and avoidance, RadioGraphics 24 (2004) 1679-1691."
    width = 1.0
    severities = {
        1: {"amplitude": (0.05, 0.10), "num_streaks": 2},
        2: {"amplitude": (0.10, 0.15), "num_streaks": 3},
        3: {"amplitude": (0.15, 0.20), "num_streaks": 4},
        4: {"amplitude": (0.20, 0.28), "num_streaks": 6},
        5: {"amplitude": (0.28, 0.36), "num_streaks": 8},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        check_shape(self.name, self.dims, rng, shape)
        k = int(self.spec(severity, "num_streaks"))
        return {
            "amplitude": self.draw_signed(rng, severity, "amplitude", k),
            "angle": rng.uniform(k, low=0.0, high=math.pi),
            "centre": rng.uniform(2, low=-0.25, high=0.25),  # fraction of (H, W) from the centre
        }

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        check_input(self.name, self.dims, x)
        dy, dx = _plane_offsets(x)
        size = host_constant(list(x.shape[-2:]), x.device)
        centre = params["centre"].to(torch.float32) * size  # [B, 2] pixels
        angle = params["angle"].to(torch.float32)[..., None, None]  # [B, K, 1, 1]
        ry = dy - centre[:, 0, None, None, None]
        rx = dx - centre[:, 1, None, None, None]
        distance = ry * torch.cos(angle) - rx * torch.sin(angle)  # [B, K, H, W]
        ridges = torch.exp(-0.5 * (distance / self.width) ** 2)
        field = (params["amplitude"].to(torch.float32)[..., None, None] * ridges).sum(1)
        return finish(x.float() + _over_slices(field, x), x)


class Ring(Perturbation):
    r"""Ring artifacts from miscalibrated detector elements.

    A detector element with a gain error gives a consistent error at a fixed distance from the
    rotation axis in every projection; back-projection turns it into a circle about the
    isocentre. :math:`K` (``num_rings``) thin rings (Gaussian profile of width :math:`w = 0.75` pixel,
    :attr:`width`) centred on the slice centre:

    .. math::
        y = x + \sum_{k=1}^{K} a_k \exp\!\Big(-\frac{(\lVert\mathbf{p}\rVert - r_k)^2}{2 w^2}\Big),\quad
        r_k\sim\mathcal{U}(0.05, 0.95)\,R,\ a_k = s\,m,\ m\sim\mathcal{U}(\text{amplitude}),

    :math:`R` half the smaller in-plane size and :math:`s` a random sign (a hot or a dead
    element). Repeats over ``D``. Dropped: partial rings (short scans) and detector-row
    dependence along ``D``. ``a = 0`` is the identity.
    """

    name = "ct.ring"
    suite = "ct"
    modalities = ("ct",)
    dims = (2, 3)
    summary = "Concentric rings about the isocentre from miscalibrated detector elements."
    citation = "Sijbers & Postnov, Reduction of ring artefacts in high resolution micro-CT reconstructions, Phys. Med. Biol. 49 (2004) N247-N253."
    width = 0.75
    severities = {
        1: {"amplitude": (0.05, 0.10), "num_rings": 3},
        2: {"amplitude": (0.10, 0.15), "num_rings": 4},
        3: {"amplitude": (0.15, 0.20), "num_rings": 6},
        4: {"amplitude": (0.20, 0.28), "num_rings": 8},
        5: {"amplitude": (0.28, 0.36), "num_rings": 10},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        check_shape(self.name, self.dims, rng, shape)
        k = int(self.spec(severity, "num_rings"))
        return {
            "amplitude": self.draw_signed(rng, severity, "amplitude", k),
            "radius": rng.uniform(k, low=0.05, high=0.95),  # fraction of R
        }

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        check_input(self.name, self.dims, x)
        dy, dx = _plane_offsets(x)
        r = torch.sqrt(dy * dy + dx * dx)  # [H, W]
        radius = params["radius"].to(torch.float32)[..., None, None] * (min(x.shape[-2:]) / 2)
        rings = torch.exp(-0.5 * ((r - radius) / self.width) ** 2)  # [B, K, H, W]
        field = (params["amplitude"].to(torch.float32)[..., None, None] * rings).sum(1)
        return finish(x.float() + _over_slices(field, x), x)


class Cupping(Perturbation):
    r"""Beam-hardening cupping: intensity depressed towards the centre of the object.

    A polychromatic beam hardens (loses its soft photons) along long paths, so rays through the
    middle of the body are attenuated less per unit length than the monochromatic model assumes
    and the reconstructed attenuation sags towards the centre. A radially symmetric
    multiplicative depression about the isocentre:

    .. math::
        y = x\,\big(1 - c\,(1 - \rho^2)\big),\quad \rho = \min(\lVert\mathbf{p}\rVert / R, 1),\
        c\sim\mathcal{U}(\text{depth}),

    :math:`R` half the smaller in-plane size. The parabola stands in for the path-length
    dependence of a centred round object. Dropped: the true object shape and streaks between
    dense structures. ``c = 0`` is the identity.
    """

    name = "ct.cupping"
    suite = "ct"
    modalities = ("ct",)
    dims = (2, 3)
    summary = "Beam-hardening cupping: attenuation sags towards the centre of the slice."
    citation = "Brooks & Di Chiro, Beam hardening in X-ray reconstructive tomography, Phys. Med. Biol. 21 (1976) 390-398."
    severities = {
        1: {"depth": (0.04, 0.08)},
        2: {"depth": (0.08, 0.13)},
        3: {"depth": (0.13, 0.19)},
        4: {"depth": (0.19, 0.26)},
        5: {"depth": (0.26, 0.35)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        check_shape(self.name, self.dims, rng, shape)
        return {"depth": self.draw(rng, severity, "depth")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        check_input(self.name, self.dims, x)
        dy, dx = _plane_offsets(x)
        rho = (torch.sqrt(dy * dy + dx * dx) / (min(x.shape[-2:]) / 2)).clamp(max=1.0)
        depth = params["depth"].to(torch.float32)[:, None, None]
        gain = 1.0 - depth * (1.0 - rho * rho)  # [B, H, W]
        return finish(x.float() * _over_slices(gain, x), x)


class SliceThickness(Perturbation):
    r"""Thicker reconstructed slices: blur along the slice (``D``) axis of a volume.

    The slice sensitivity profile (SSP) of a thick-slice reconstruction averages tissue over the
    slice thickness, causing partial-volume loss of small or obliquely cut structures. The SSP
    is taken as a Gaussian whose FWHM is :math:`t` native slices, i.e. extra blur of

    .. math::
        \sigma = \frac{\sqrt{t^2 - 1}}{2\sqrt{2\ln 2}},\quad t\sim\mathcal{U}(\text{thickness})

    applied along ``D`` with the kernel renormalised at the volume's ends; the slice spacing is
    kept (resampling to a coarser spacing is ``mri.anisotropy``'s job). 3D only: a 2D batch has
    no slice axis (its channels are not assumed to be neighbouring slices). ``t = 1`` is the
    identity.

    .. warning:: Implemented as a dense ``D × D`` matrix per sample, so cost grows as
        :math:`D^2 H W`: about 35 MFLOP for 48³ but 4 GFLOP per 256³ volume.
    """

    name = "ct.slice_thickness"
    suite = "ct"
    modalities = ("ct",)
    dims = (3,)
    summary = "Thicker slice reconstruction: partial-volume blur along the slice axis."
    citation = "Polacin, Kalender & Marchal, Evaluation of section sensitivity profiles and image noise in spiral CT, Radiology 185 (1992) 29-35."
    severities = {
        1: {"thickness": (1.5, 2.0)},
        2: {"thickness": (2.0, 3.0)},
        3: {"thickness": (3.0, 4.5)},
        4: {"thickness": (4.5, 6.5)},
        5: {"thickness": (6.5, 9.0)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        check_shape(self.name, self.dims, rng, shape)
        return {"thickness": self.draw(rng, severity, "thickness")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        check_input(self.name, self.dims, x)
        depth = x.shape[2]
        t = params["thickness"].to(torch.float32)
        sigma = torch.sqrt((t * t - 1.0).clamp(min=0.0)) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        i = torch.arange(depth, device=x.device, dtype=torch.float32)
        gap = (i[:, None] - i[None, :]) ** 2  # [D, D]
        # The tiny floor makes sigma = 0 an exact identity matrix instead of 0/0.
        kernel = torch.exp(-gap[None] / (2.0 * sigma[:, None, None] ** 2 + 1e-12))
        kernel = kernel / kernel.sum(-1, keepdim=True)
        return finish(torch.einsum("bij,bcjhw->bcihw", kernel, x.float()), x)


CT_PERTURBATIONS: list[type[Perturbation]] = [LowDoseNoise, Streak, Ring, Cupping, SliceThickness]


@hookimpl
def medaudit_perturbations() -> list[type[Perturbation]]:
    return list(CT_PERTURBATIONS)
