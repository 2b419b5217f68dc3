"""X-ray and 2D photographic acquisition corruptions: exposure, detector noise, blur, JPEG,
anti-scatter grid lines and resolution loss.

Every perturbation is a sampling layer over a functional op of this package (:func:`expose`,
:func:`detector_noise`, :func:`gaussian_blur`, :func:`jpeg_compress`, :func:`grid_lines`,
:func:`degrade_resolution`); the ops are batched pure tensor code and run on the batch's device.
The point-wise ops are here; the separable blur and resolution-loss machinery is in :mod:`.blur`
and the JPEG codec in :mod:`.jpeg`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from medaudit.hookspecs import hookimpl
from medaudit.perturbation import Perturbation, batch_param, check_input, finish, finish_, per_sample
from medaudit.rng import SampleRNG

from .blur import degrade_resolution, gaussian_blur
from .jpeg import jpeg_compress

__all__ = [
    "PERTURBATIONS", "XRAY_LIKE", "Blur", "Exposure", "Grid", "Jpeg", "Noise", "Resolution", "degrade_resolution",
    "detector_noise", "expose", "gaussian_blur", "grid_lines", "jpeg_compress",
]

MEDAUDIT_API_VERSION = 1

XRAY_LIKE = ("xray", "dermoscopy", "pathology")


# ---------------------------------------------------------------------------------------------
# Point-wise functional ops
# ---------------------------------------------------------------------------------------------


def expose(x: Tensor, log_exposure: float | Tensor) -> Tensor:
    """Shift the exposure on a logistic characteristic curve: ``logit(y) = logit(x) - log_exposure``.

    Written as ``y = x / (x + e (1 - x))`` with ``e = exp(log_exposure)`` so 0 and 1 stay exact.
    """
    xf = x.float().clamp(0.0, 1.0)
    e = per_sample(torch.exp(batch_param(log_exposure, "log_exposure", x, -5.0, 5.0)), xf)
    return finish(xf / (xf + e * (1.0 - xf)), x)


def detector_noise(x: Tensor, gain: float | Tensor, read_sd: float | Tensor, noise_key: Tensor) -> Tensor:
    """Poisson-Gaussian noise (Gaussian approximation): ``y = x + sqrt(gain * x + read_sd**2) * n``,
    ``n ~ N(0, 1)`` regenerated per sample from ``noise_key`` (int64 ``[B]``)."""
    xf = x.float().clamp(0.0, 1.0)
    a = per_sample(batch_param(gain, "gain", x, 0.0, 1.0).clamp(min=0.0), xf)
    b = per_sample(batch_param(read_sd, "read_sd", x, 0.0, 1.0).clamp(min=0.0), xf)
    n = SampleRNG(noise_key.to(x.device)).normal(*x.shape[1:])
    # In place on tensors this function owns: on a 3D batch each avoided temporary is a full
    # pass over memory (plus page faults), comparable to generating the noise itself.
    y = torch.addcmul(b * b, a, xf).sqrt_().mul_(n).add_(xf)
    return finish_(y, x)


def grid_lines(x: Tensor, depth: float | Tensor, frequency: float | Tensor, phase: float | Tensor,
               orientation: float | Tensor) -> Tensor:
    """Multiply by a cosine line pattern ``1 - depth * (1 + cos(2 pi f u + phase)) / 2`` where
    ``u`` is the column index (``orientation`` 0: vertical lines) or the row index (1: horizontal)."""
    check_input("grid_lines", (2,), x)
    xf = x.float()
    d = per_sample(batch_param(depth, "depth", x, 0.0, 1.0).clamp(0.0, 1.0), xf)
    f = per_sample(batch_param(frequency, "frequency", x, 0.0, 0.5), xf)
    ph = per_sample(batch_param(phase, "phase", x), xf)
    o = per_sample(batch_param(orientation, "orientation", x, 0.0, 1.0).clamp(0.0, 1.0).round(), xf)
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device, dtype=torch.float32)[:, None]
    cols = torch.arange(w, device=x.device, dtype=torch.float32)[None, :]
    u = o * rows + (1.0 - o) * cols
    pattern = 1.0 - d * 0.5 * (1.0 + torch.cos(2.0 * math.pi * f * u + ph))
    return finish(xf * pattern, x)


# ---------------------------------------------------------------------------------------------
# Perturbations
# ---------------------------------------------------------------------------------------------


class Exposure(Perturbation):
    r"""Under- or over-exposure seen through a saturating characteristic curve.

    The displayed value is modelled as a logistic (H&D-like) function of log exposure, so a
    relative exposure error :math:`e` shifts its logit:

    .. math:: \operatorname{logit} y = \operatorname{logit} x - \log e, \quad\text{i.e.}\quad
              y = \frac{x}{x + e\,(1 - x)}, \qquad \log e = s\,m,\; s \sim \mathcal{U}\{-1, +1\},\;
              m \sim \mathcal{U}(m_{lo}, m_{hi})

    ``log_exposure`` > 0 (over-exposure) darkens attenuating structures, < 0 brightens them; mid-
    tones move most while 0 and 1 stay fixed (toe and shoulder of the curve). ``m`` per severity
    is the magnitude of ``log_exposure`` (1.0 is a factor of 2.7 in mAs).
    """

    name = "xray.exposure"
    suite = "xray"
    modalities = XRAY_LIKE
    summary = "Under- or over-exposure through a saturating characteristic curve."
    citation = "Bushberg et al., The Essential Physics of Medical Imaging, 3rd ed. (2012), ch. 7 (characteristic curve, exposure latitude)."
    severities = {
        1: {"log_exposure": (0.15, 0.30)},
        2: {"log_exposure": (0.30, 0.50)},
        3: {"log_exposure": (0.50, 0.75)},
        4: {"log_exposure": (0.75, 1.05)},
        5: {"log_exposure": (1.05, 1.40)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"log_exposure": self.draw_signed(rng, severity, "log_exposure")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return expose(x, params["log_exposure"])


class Noise(Perturbation):
    r"""Detector noise: signal-dependent quantum (Poisson) noise plus signal-independent read noise.

    .. math:: y = x + \sqrt{a\,x + b^2}\;n, \qquad n \sim \mathcal{N}(0, 1)\ \text{i.i.d. per pixel},\;
              a \sim \mathcal{U}(a_{lo}, a_{hi}),\; b \sim \mathcal{U}(b_{lo}, b_{hi})

    the heteroscedastic Gaussian approximation of the Poisson-Gaussian model, with ``gain`` :math:`a`
    and ``read_sd`` :math:`b` per severity, clipped to ``[0, 1]``. The field :math:`n` is regenerated
    in :meth:`apply` from the recorded ``noise_key``. With ``gain = 0`` it is
    ``torchio.Noise(mean=0, std=read_sd)`` (TorchIO draws its field from its own seed, so the
    two agree in distribution, not pixel by pixel).
    """

    name = "xray.noise"
    suite = "xray"
    modalities = XRAY_LIKE
    summary = "Poisson-Gaussian detector noise (quantum plus read noise)."
    citation = "Foi et al., Practical Poissonian-Gaussian noise modeling and fitting for single-image raw-data, IEEE TIP 17(10) 2008."
    severities = {
        1: {"gain": (0.0004, 0.0008), "read_sd": (0.005, 0.010)},
        2: {"gain": (0.0010, 0.0020), "read_sd": (0.010, 0.020)},
        3: {"gain": (0.0030, 0.0050), "read_sd": (0.020, 0.030)},
        4: {"gain": (0.0070, 0.0120), "read_sd": (0.030, 0.045)},
        5: {"gain": (0.0150, 0.0250), "read_sd": (0.045, 0.065)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"gain": self.draw(rng, severity, "gain"), "read_sd": self.draw(rng, severity, "read_sd"),
                "noise_key": rng.bits(1)[:, 0]}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return detector_noise(x, params["gain"], params["read_sd"], params["noise_key"])


class Blur(Perturbation):
    r"""Gaussian blur: focal-spot / detector unsharpness, defocus of a camera or scanner.

    .. math:: y = G_\sigma * x, \qquad \sigma \sim \mathcal{U}(\sigma_{lo}, \sigma_{hi})\ \text{pixels}

    isotropic and separable over all spatial axes, kernel truncated at :math:`4\sigma` with
    symmetric borders. Same as ``torchio.Blur(std=sigma)`` on an image of 1 mm spacing (TorchIO
    calls ``scipy.ndimage.gaussian_filter``).
    """

    name = "xray.blur"
    suite = "xray"
    modalities = XRAY_LIKE
    summary = "Gaussian blur (focal spot, detector or optical unsharpness)."
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomBlur."
    max_sigma = 2.5
    severities = {
        1: {"sigma": (0.40, 0.60)},
        2: {"sigma": (0.60, 0.90)},
        3: {"sigma": (0.90, 1.30)},
        4: {"sigma": (1.30, 1.80)},
        5: {"sigma": (1.80, 2.50)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"sigma": self.draw(rng, severity, "sigma")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return gaussian_blur(x, params["sigma"], max_sigma=self.max_sigma)


class Jpeg(Perturbation):
    r"""Lossy JPEG compression (baseline, IJG tables), as in exported, PACS-archived or web images.

    .. math:: \hat{F}_{uv} = Q_{uv}\,\operatorname{round}(F_{uv} / Q_{uv}), \qquad
              Q = \operatorname{clip}_{[1, 255]}\Big\lfloor \frac{T\,S(q) + 50}{100} \Big\rfloor,\;
              S(q) = \begin{cases} 5000/q & q < 50 \\ 200 - 2q & q \ge 50 \end{cases}

    for the 8×8 DCT coefficients :math:`F` of each block, the standard table :math:`T` and the
    integer quality :math:`q \sim \mathcal{U}(q_{lo}, q_{hi})` (rounded) per severity. See
    :func:`jpeg_compress` for colour and 3D handling. Matches Pillow's encoder at the same quality
    to within float-vs-integer DCT rounding (tested by PSNR).
    """

    name = "xray.jpeg"
    suite = "xray"
    modalities = XRAY_LIKE
    summary = "JPEG compression artefacts (8×8 block DCT quantisation)."
    citation = "Wallace, The JPEG still picture compression standard, IEEE Trans. Consum. Electron. 38(1) 1992; ITU-T T.81 Annex K."
    severities = {
        1: {"quality": (60.0, 75.0)},
        2: {"quality": (40.0, 55.0)},
        3: {"quality": (25.0, 35.0)},
        4: {"quality": (15.0, 22.0)},
        5: {"quality": (6.0, 12.0)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"quality": self.draw(rng, severity, "quality").round()}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return jpeg_compress(x, params["quality"])


class Grid(Perturbation):
    r"""Anti-scatter grid lines: the periodic shadow of a stationary (or mis-aligned) grid.

    .. math:: y = x\Big(1 - d\,\frac{1 + \cos(2\pi f u + \phi)}{2}\Big), \qquad
              d \sim \mathcal{U}(d_{lo}, d_{hi}),\; f \sim \mathcal{U}(0.10, 0.45),\;
              \phi \sim \mathcal{U}(0, 2\pi),\; u \in \{\text{column}, \text{row}\}\ \text{equiprobable}

    ``depth`` :math:`d` (per severity) is the modulation depth; the line frequency :math:`f`
    (cycles/pixel) is the alias of a 40-80 lines/cm grid on the detector pixel pitch, which can
    land anywhere below Nyquist, so it is drawn uniformly and does not depend on severity.
    2D only (a projection artefact).
    """

    name = "xray.grid"
    suite = "xray"
    modalities = ("xray",)
    dims = (2,)
    summary = "Anti-scatter grid line pattern (multiplicative periodic lines)."
    citation = "Gauntt & Barnes, Grid line artifact formation: a comprehensive theory, Med. Phys. 33(6) 2006."
    severities = {
        1: {"depth": (0.03, 0.06), "frequency": (0.10, 0.45)},
        2: {"depth": (0.06, 0.10), "frequency": (0.10, 0.45)},
        3: {"depth": (0.10, 0.15), "frequency": (0.10, 0.45)},
        4: {"depth": (0.15, 0.22), "frequency": (0.10, 0.45)},
        5: {"depth": (0.22, 0.30), "frequency": (0.10, 0.45)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"depth": self.draw(rng, severity, "depth"), "frequency": self.draw(rng, severity, "frequency"),
                "phase": rng.uniform(1, high=2.0 * math.pi)[:, 0],
                "orientation": (rng.uniform(1)[:, 0] < 0.5).float()}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        check_input(self.name, self.dims, x)
        return grid_lines(x, params["depth"], params["frequency"], params["phase"], params["orientation"])


class Resolution(Perturbation):
    r"""Resolution loss: acquisition at a coarser pixel size, displayed at the original size.

    .. math:: y = U_f\,D_f\,(G_{(f-1)/2} * x), \qquad f \sim \mathcal{U}(f_{lo}, f_{hi})

    with anti-aliasing blur :math:`G`, linear down-sampling :math:`D_f` by ``factor`` :math:`f`
    along every spatial axis, and linear up-sampling :math:`U_f` back (see
    :func:`degrade_resolution`). Comparable to ``torchio.RandomAnisotropy`` applied to all axes.
    """

    name = "xray.resolution"
    suite = "xray"
    modalities = XRAY_LIKE
    summary = "Lower acquisition resolution (down-sampled and up-sampled back)."
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomAnisotropy; van der Walt et al., scikit-image, PeerJ 2014 (rescale anti-aliasing)."
    max_factor = 4.0
    severities = {
        1: {"factor": (1.30, 1.60)},
        2: {"factor": (1.60, 2.00)},
        3: {"factor": (2.00, 2.60)},
        4: {"factor": (2.60, 3.30)},
        5: {"factor": (3.30, 4.00)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"factor": self.draw(rng, severity, "factor")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return degrade_resolution(x, params["factor"], max_factor=self.max_factor)


PERTURBATIONS: list[type[Perturbation]] = [Exposure, Noise, Blur, Jpeg, Grid, Resolution]


@hookimpl
def medaudit_perturbations() -> list[type[Perturbation]]:
    return list(PERTURBATIONS)
