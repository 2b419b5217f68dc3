"""Intensity shifts that any modality meets: gamma, contrast, brightness and friends.

Each perturbation is a thin sampling layer over a functional op of the same module
(:func:`adjust_contrast`, :func:`rewindow`, ...), so a single corruption can be reproduced from its
recorded parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from medaudit.hookspecs import hookimpl
from medaudit.perturbation import Perturbation, batch_param, finish, per_sample
from medaudit.rng import SampleRNG

MEDAUDIT_API_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Functional ops: deterministic, batched, float32 inside, input dtype out
# ---------------------------------------------------------------------------------------------


def adjust_gamma(x: Tensor, log_gamma: float | Tensor) -> Tensor:
    """``x ** exp(log_gamma)`` per sample."""
    xf = x.float()
    gamma = per_sample(torch.exp(batch_param(log_gamma, "log_gamma", x)), xf)
    return finish(xf.clamp(0.0, 1.0).pow(gamma), x)


def adjust_contrast(x: Tensor, log_contrast: float | Tensor) -> Tensor:
    """Scale deviations from each image's mean intensity by ``exp(log_contrast)``."""
    xf = x.float()
    c = per_sample(torch.exp(batch_param(log_contrast, "log_contrast", x)), xf)
    # Accumulate in float64: a float32 reduction's rounding depends on how threads split the batch,
    # which would make a sample's output depend on its batch; the float64 sum rounds back identically.
    mean = xf.double().mean(dim=tuple(range(1, x.ndim)), keepdim=True).float()
    return finish(mean + c * (xf - mean), x)


def adjust_brightness(x: Tensor, shift: float | Tensor) -> Tensor:
    """Add ``shift`` to every intensity."""
    xf = x.float()
    return finish(xf + per_sample(batch_param(shift, "shift", x, -1.0, 1.0), xf), x)


def remap_histogram(x: Tensor, knots: Tensor) -> Tensor:
    """Piecewise-linear intensity remap through ``knots`` ``[B, K+1]`` at ``0, 1/K, ..., 1``.

    The knots must be non-decreasing for the remap to be monotone (it is not checked: that would
    be a host round trip); :class:`HistogramShift` builds them so.
    """
    if knots.ndim != 2 or knots.shape[0] != x.shape[0] or knots.shape[1] < 2:
        raise ValueError(f"knots must have shape [{x.shape[0]}, K+1] with K >= 1, got {tuple(knots.shape)}")
    xf = x.float().clamp(0.0, 1.0)
    k = knots.shape[1] - 1
    flat = xf.reshape(x.shape[0], -1) * k
    idx = flat.floor().clamp(max=k - 1)
    frac = flat - idx
    idx = idx.long()
    kn = knots.to(device=x.device, dtype=torch.float32)
    lo = torch.gather(kn, 1, idx)
    hi = torch.gather(kn, 1, idx + 1)
    return finish((lo + frac * (hi - lo)).reshape(x.shape), x)


def rewindow(x: Tensor, level_shift: float | Tensor, log_width: float | Tensor) -> Tensor:
    """Re-window an image already windowed to ``[0, 1]``: new level ``0.5 + level_shift``, new
    width ``exp(log_width)``, both in units of the current window."""
    xf = x.float()
    level = per_sample(0.5 + batch_param(level_shift, "level_shift", x, -1.0, 1.0), xf)
    width = per_sample(torch.exp(batch_param(log_width, "log_width", x, -3.0, 3.0)), xf)
    return finish((xf - (level - 0.5 * width)) / width, x)


def quantize(x: Tensor, bits: float | Tensor) -> Tensor:
    """Round intensities to ``2**bits`` evenly spaced levels on ``[0, 1]``."""
    b = batch_param(bits, "bits", x, 1, 16).clamp(1.0, 16.0).round()
    xf = x.float().clamp(0.0, 1.0)
    levels = per_sample(torch.pow(2.0, b) - 1.0, xf)
    return finish(torch.round(xf * levels) / levels, x)


def invert(x: Tensor, alpha: float | Tensor) -> Tensor:
    """Blend towards the inverted image: ``(1 - alpha) x + alpha (1 - x)``."""
    xf = x.float()
    a = per_sample(batch_param(alpha, "alpha", x, 0.0, 1.0).clamp(0.0, 1.0), xf)
    return finish(xf + a * (1.0 - 2.0 * xf), x)


# ---------------------------------------------------------------------------------------------
# Perturbations
# ---------------------------------------------------------------------------------------------


class Gamma(Perturbation):
    r"""Gamma (power-law) intensity change, as from a different display or reconstruction LUT.

    .. math:: y = x^{\gamma}, \qquad \log\gamma = s\,m,\; s \sim \mathcal{U}\{-1, +1\},\;
              m \sim \mathcal{U}(m_{lo}, m_{hi})

    with the magnitude range :math:`(m_{lo}, m_{hi})` of ``log_gamma`` given per severity, so
    a severity brightens or darkens mid-tones with equal probability. Equivalent to
    ``torchio.Gamma(gamma=exp(log_gamma))`` on ``[0, 1]`` images (TorchIO's ``RandomGamma``
    samples ``log_gamma`` uniformly in a signed range instead).
    """

    name = "intensity.gamma"
    suite = "intensity"
    modalities = ("any",)
    summary = "Power-law change of the intensity curve (brighter or darker mid-tones)."
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomGamma."
    severities = {
        1: {"log_gamma": (0.10, 0.20)},
        2: {"log_gamma": (0.20, 0.30)},
        3: {"log_gamma": (0.30, 0.45)},
        4: {"log_gamma": (0.45, 0.60)},
        5: {"log_gamma": (0.60, 0.80)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"log_gamma": self.draw_signed(rng, severity, "log_gamma")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return adjust_gamma(x, params["log_gamma"])


class Contrast(Perturbation):
    r"""Global contrast change about the image mean, as from a different acquisition gain or
    display contrast setting.

    .. math:: y = \bar{x} + c\,(x - \bar{x}), \qquad \log c = s\,m,\;
              s \sim \mathcal{U}\{-1, +1\},\; m \sim \mathcal{U}(m_{lo}, m_{hi})

    where :math:`\bar{x}` is the mean of the image (all channels and voxels) and the range of
    ``log_contrast`` magnitude :math:`m` is given per severity; ``c < 1`` flattens and ``c > 1``
    stretches (and clips) the histogram. The result is clipped to ``[0, 1]``.
    """

    name = "intensity.contrast"
    suite = "intensity"
    modalities = ("any",)
    summary = "Contrast stretched or flattened about the image mean."
    citation = "Hendrycks & Dietterich, Benchmarking neural network robustness to common corruptions and perturbations, ICLR 2019 (contrast)."
    severities = {
        1: {"log_contrast": (0.10, 0.20)},
        2: {"log_contrast": (0.20, 0.35)},
        3: {"log_contrast": (0.35, 0.50)},
        4: {"log_contrast": (0.50, 0.70)},
        5: {"log_contrast": (0.70, 0.95)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"log_contrast": self.draw_signed(rng, severity, "log_contrast")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return adjust_contrast(x, params["log_contrast"])


class Brightness(Perturbation):
    r"""Additive brightness offset, as from a calibration or normalisation offset.

    .. math:: y = \operatorname{clip}(x + b), \qquad b = s\,m,\; s \sim \mathcal{U}\{-1, +1\},\;
              m \sim \mathcal{U}(m_{lo}, m_{hi})

    with the ``shift`` magnitude range given per severity in units of the ``[0, 1]`` intensity range.
    """

    name = "intensity.brightness"
    suite = "intensity"
    modalities = ("any",)
    summary = "Constant brightness offset (brighter or darker image)."
    citation = "Hendrycks & Dietterich, Benchmarking neural network robustness to common corruptions and perturbations, ICLR 2019 (brightness)."
    severities = {
        1: {"shift": (0.03, 0.06)},
        2: {"shift": (0.06, 0.10)},
        3: {"shift": (0.10, 0.15)},
        4: {"shift": (0.15, 0.21)},
        5: {"shift": (0.21, 0.30)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"shift": self.draw_signed(rng, severity, "shift")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return adjust_brightness(x, params["shift"])


class HistogramShift(Perturbation):
    r"""Non-linear monotone remap of the histogram (a random piecewise-linear CDF warp), as
    between scanners or reconstruction kernels whose intensity responses differ non-linearly.

    A random monotone curve :math:`r` through :math:`K + 1 = 9` knots at :math:`0, 1/K, \dots, 1`
    is blended with the identity:

    .. math:: r(k/K) = \frac{\sum_{j<k} e^{z_j}}{\sum_{j<K} e^{z_j}},\; z_j \sim \mathcal{N}(0, 1),
              \qquad y = (1 - \alpha)\,x + \alpha\,r(x),\; \alpha \sim \mathcal{U}(\alpha_{lo}, \alpha_{hi})

    (:math:`r` linear between knots). :math:`r(0) = 0`, :math:`r(1) = 1` and increments are
    positive, so the remap keeps the order of intensities and the end points; ``alpha`` (per
    severity) moves it from the identity (0) to the full random curve (1). The recorded parameters
    are the blended ``knots`` ``[B, 9]`` and ``alpha``. It is the inverse of what piecewise-linear
    histogram standardisation (Nyúl et al.) undoes: a landmark-to-landmark intensity mapping.
    """

    name = "intensity.histogram_shift"
    suite = "intensity"
    modalities = ("any",)
    summary = "Random monotone non-linear remap of the intensity histogram."
    citation = "Nyúl, Udupa & Zhang, New variants of a method of MRI scale standardization, IEEE TMI 19(2) 2000."
    n_segments = 8
    severities = {
        1: {"alpha": (0.15, 0.25)},
        2: {"alpha": (0.30, 0.40)},
        3: {"alpha": (0.45, 0.55)},
        4: {"alpha": (0.60, 0.75)},
        5: {"alpha": (0.80, 1.00)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        alpha = self.draw(rng, severity, "alpha")
        steps = torch.exp(rng.normal(self.n_segments))
        curve = torch.cumsum(steps, dim=1) / steps.sum(dim=1, keepdim=True)
        curve = torch.cat([torch.zeros_like(curve[:, :1]), curve], dim=1)
        identity = torch.linspace(0.0, 1.0, self.n_segments + 1, device=rng.device)
        knots = identity + alpha[:, None] * (curve - identity)
        return {"alpha": alpha, "knots": knots}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return remap_histogram(x, params["knots"])


class Window(Perturbation):
    r"""CT window level/width set differently, expressed on the ``[0, 1]`` windowed image.

    The input is taken to be windowed already (level 0.5, width 1 in its own units); re-windowing
    with level :math:`L = 0.5 + \Delta` and width :math:`W` gives

    .. math:: y = \operatorname{clip}\Big(\frac{x - (L - W/2)}{W}\Big), \qquad
              \Delta = s_1 m_1,\; \log W = s_2 m_2,\; s_i \sim \mathcal{U}\{-1, +1\},\;
              m_i \sim \mathcal{U}(\text{range per severity})

    ``level_shift`` is in units of the current window width (0.1 of a 400 HU soft-tissue window is
    40 HU) and ``log_width`` scales the width by ``exp(log_width)``. Intensities outside the
    original window were lost when it was applied, so a wider window cannot restore them: it only
    compresses the image into a smaller range, as a narrower window clips more of it.
    """

    name = "intensity.window"
    suite = "intensity"
    modalities = ("any",)
    summary = "Display window level and width set differently (CT windowing)."
    citation = "Bushberg et al., The Essential Physics of Medical Imaging, 3rd ed. (2012), ch. 10 (CT windowing)."
    severities = {
        1: {"level_shift": (0.02, 0.04), "log_width": (0.05, 0.10)},
        2: {"level_shift": (0.04, 0.07), "log_width": (0.10, 0.20)},
        3: {"level_shift": (0.07, 0.10), "log_width": (0.20, 0.30)},
        4: {"level_shift": (0.10, 0.14), "log_width": (0.30, 0.42)},
        5: {"level_shift": (0.14, 0.20), "log_width": (0.42, 0.60)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"level_shift": self.draw_signed(rng, severity, "level_shift"),
                "log_width": self.draw_signed(rng, severity, "log_width")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return rewindow(x, params["level_shift"], params["log_width"])


class BitDepth(Perturbation):
    r"""Quantisation to fewer bits, as from a lower stored bit depth or an 8-bit export chain.

    .. math:: y = \frac{\operatorname{round}\big(x\,(2^{n} - 1)\big)}{2^{n} - 1}

    with ``bits`` :math:`n` fixed per severity (6, 5, 4, 3, 2 bits; the scaled input is usually
    8 bits or more). No dithering: the banding is the corruption.
    """

    name = "intensity.bit_depth"
    suite = "intensity"
    modalities = ("any",)
    summary = "Intensities quantised to fewer bits (banding)."
    citation = "Gonzalez & Woods, Digital Image Processing, 4th ed. (2018), §2.4 (intensity quantization)."
    severities = {1: {"bits": 6}, 2: {"bits": 5}, 3: {"bits": 4}, 4: {"bits": 3}, 5: {"bits": 2}}

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"bits": self.draw(rng, severity, "bits")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return quantize(x, params["bits"])


class Inversion(Perturbation):
    r"""Intensity inversion, as when a MONOCHROME1 image is read as MONOCHROME2 (or vice versa).

    .. math:: y = (1 - \alpha)\,x + \alpha\,(1 - x)

    The real-world error is the full inversion (severity 5, :math:`\alpha = 1`). To give five
    monotone levels the inverted image is blended in by ``alpha`` = 0.2, 0.4, 0.6, 0.8, 1.0:
    levels 1-2 flatten contrast towards uniform grey (``alpha`` = 0.5 would erase it), levels 3-5
    show an inverted image of increasing contrast. The change :math:`|y - x| = \alpha|1 - 2x|`
    grows linearly with ``alpha``.
    """

    name = "intensity.inversion"
    suite = "intensity"
    modalities = ("any",)
    # inverted polarity is a real X-ray failure (MONOCHROME1 read as MONOCHROME2); MRI, CT and
    # colour images are never displayed inverted, so there it only probes the model's limits
    stress_test = ("mri", "ct", "dermoscopy", "pathology")
    summary = "Intensities inverted (1 - x), blended in by severity; level 5 is the full inversion."
    citation = "DICOM PS3.3 C.7.6.3.1.2, Photometric Interpretation (MONOCHROME1 vs MONOCHROME2)."
    severities = {1: {"alpha": 0.2}, 2: {"alpha": 0.4}, 3: {"alpha": 0.6}, 4: {"alpha": 0.8}, 5: {"alpha": 1.0}}

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"alpha": self.draw(rng, severity, "alpha")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return invert(x, params["alpha"])


PERTURBATIONS: list[type[Perturbation]] = [Gamma, Contrast, Brightness, HistogramShift, Window, BitDepth, Inversion]


@hookimpl
def medaudit_perturbations() -> list[type[Perturbation]]:
    return list(PERTURBATIONS)
