r"""MRI acquisition artifacts: motion, ghosting, spikes, bias field, Rician noise, Gibbs, anisotropy.

One module per artifact family: :mod:`.motion`, :mod:`.kspace_artifacts` (ghosting, spike),
:mod:`.bias_field`, :mod:`.noise` and :mod:`.resolution` (Gibbs, anisotropy), with the
phase-encode helpers they share in :mod:`.phase_encode`. Conventions shared by every perturbation
of this package:

* **k-space** is the centred DFT over the spatial axes, :func:`medaudit.kspace.centred_fft`
  (``fftshift`` after ``fftn``, TorchIO's ``FourierTransform`` convention), so index ``N // 2``
  along an axis holds the zero frequency and line ``0`` the most negative one.
* **Reconstruction** is the real part of the inverse DFT, as in TorchIO: the signed overshoots of
  ringing and ghosts are kept and :func:`~medaudit.perturbation.finish` clamps to ``[0, 1]``
  afterwards.
* **Phase-encode axis**: scanners acquire k-space line by line along the phase-encode (PE)
  direction, so temporal effects (motion, periodic modulation) act on whole lines/planes
  perpendicular to it. The PE axis is not known from a tensor, so it is drawn per sample
  uniformly among the spatial axes (:func:`.phase_encode.draw_axis`). A k-space change that
  varies along one axis only is a 1-D operation along it (the transforms along the other axes
  cancel), so motion and ghosting run 1-D real FFTs along each sample's PE axis
  (:func:`.phase_encode.per_pe_axis`); the line of uncentred FFT index ``u`` sits at centred
  position ``(u + N // 2) mod N``, which lets them skip the ``fftshift`` copies.
* Channels share a sample's parameters (TorchIO loops over channels with the same parameters).
* Spatial axes are ``(H, W)`` for ``[B, C, H, W]`` and ``(D, H, W)`` for ``[B, C, D, H, W]``;
  per-axis parameters are given in that order.
"""

from __future__ import annotations

from medaudit.hookspecs import hookimpl
from medaudit.perturbation import Perturbation

from .bias_field import BiasField, monomial_exponents
from .kspace_artifacts import Ghosting, Spike
from .motion import Motion
from .noise import RicianNoise
from .resolution import Anisotropy, Gibbs

__all__ = [
    "MRI_PERTURBATIONS", "Anisotropy", "BiasField", "Ghosting", "Gibbs", "Motion", "RicianNoise", "Spike",
    "monomial_exponents",
]

MEDAUDIT_API_VERSION = 1

MRI_PERTURBATIONS: list[type[Perturbation]] = [Motion, Ghosting, Spike, BiasField, RicianNoise, Gibbs, Anisotropy]


@hookimpl
def medaudit_perturbations() -> list[type[Perturbation]]:
    return list(MRI_PERTURBATIONS)
