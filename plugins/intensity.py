"""Intensity shifts that any modality meets: gamma, contrast, brightness and friends."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from medaudit.hookspecs import hookimpl
from medaudit.perturbation import Perturbation, finish, per_sample
from medaudit.rng import SampleRNG

MEDAUDIT_API_VERSION = 1


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
        magnitude = self.draw(rng, severity, "log_gamma")
        sign = torch.where(rng.uniform(1)[:, 0] < 0.5, -1.0, 1.0)
        return {"log_gamma": magnitude * sign}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        gamma = per_sample(torch.exp(params["log_gamma"]), x.float())
        return finish(x.float().clamp(0.0, 1.0).pow(gamma), x)


@hookimpl
def medaudit_perturbations() -> list[type[Perturbation]]:
    return [Gamma]
