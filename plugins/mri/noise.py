"""``mri.noise``: Rician thermal noise of a magnitude image."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from medaudit.perturbation import Perturbation, check_input, check_shape, finish_, per_sample
from medaudit.rng import SampleRNG


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
