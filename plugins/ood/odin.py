"""ODIN: temperature scaling and a gradient step on the input before the softmax score.

Liang, Li & Srikant, *Enhancing the Reliability of Out-of-Distribution Image Detection in Neural
Networks*, ICLR 2018. With the model's logits ``f(x)`` on an image ``x`` in ``[0, 1]``, the
temperature-scaled softmax ``S(x; T) = softmax(f(x) / T)`` and the predicted class
``ŷ = argmax_k f_k(x)``, ODIN moves the image one signed-gradient step towards a more confident
prediction and reads the maximum softmax there:

.. math::

    x̃ = x − ε · sign(∇_x [−log S_ŷ(x; T)]),   s_ODIN(x) = max_k S_k(x̃; T)

In-distribution inputs gain more confidence from the step than shifted ones, and the high
temperature (``T = 1000`` in the paper) spreads the scores; ``ε = 0`` is the temperature-scaled
maximum softmax probability.

What it costs: the detector calls the model itself (``needs_model``; the audit hands it a
callable that normalises ``[0, 1]`` images and returns the model's outputs with autograd
available), so each batch of each scenario costs one extra forward and backward pass (for the
input gradient) and one extra forward pass (on ``x̃``), about three times the audit's own forward
cost; it is therefore off by default. It reads logits (``logits_only``: a probability output is
not a logit up to the temperature) of a classifier, ``[B, K]``, or of a binary model with one
value per sample (``[B]`` or ``[B, 1]``), taken as the two-class logits ``[0, z]`` as in
:func:`.detectors.two_class`.

Units of ``ε``: the step is taken on the images in ``[0, 1]`` *before* the audit's
normalisation, so ``ε`` is an intensity step in ``[0, 1]`` units. This is what the authors'
code does too (facebookresearch/odin, ``code/calData.py``: the sign of the gradient is divided
by each channel's standard deviation before it is subtracted from the normalised image), and
what pytorch-ood's ``odin_preprocessing`` does when given ``norm_std``. Without ``norm_std``,
pytorch-ood steps on whatever its model receives, usually normalised images ``(x − μ_c) / σ_c``;
its ``eps`` is then in normalised units and equals this ``ε / σ_c`` (channel ``c``), e.g.
pytorch-ood's default ``eps = 0.05`` at ``σ = 0.25`` is ``ε = 0.0125`` here. The perturbed image
is not clipped to ``[0, 1]`` (neither the paper nor the reference code clips).

Two departures of pytorch-ood 0.4.0 (``src/pytorch_ood/detector/odin.py``) from the paper that
this module does **not** follow: its default criterion is ``nll_loss`` applied to ``f(x)/T``
itself (the gradient of ``−f_ŷ(x)/T``, not of ``−log S_ŷ``), and its final score is the softmax
of ``f(x̃)`` without the temperature.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from medaudit.detector import Detector

from .detectors import two_class

#: The authors' default perturbation magnitude (facebookresearch/odin, ``code/main.py``,
#: ``--magnitude 0.0014``, used with ``--temperature 1000``; the paper tunes ``ε`` over 21 evenly
#: spaced values in ``[0, 0.004]``), in ``[0, 1]`` intensity units.
DEFAULT_EPSILON = 0.0014


class ODIN(Detector):
    """ODIN (Liang, Li & Srikant, ICLR 2018): the maximum temperature-scaled softmax after one
    signed-gradient step of the input towards the predicted class.

    Embedding ``[B, 1]``: ``s = max_k softmax(f(x̃) / T)_k`` with
    ``x̃ = x − ε · sign(∂L/∂x)``, ``L = Σ_i −log softmax(f(x_i) / T)_{ŷ_i}`` (summed over the
    batch: each sample's gradient is its own term's, the model being in eval mode) and
    ``ŷ_i = argmax_k f_k(x_i)``. No fitting. Score: ``−s``, the negative of the paper's score, so
    that higher means more shifted (as ``msp``).

    Parameters
    ----------
    temperature : float
        ``T > 0``; the paper's default (and pytorch-ood's) is 1000.
    epsilon : float
        ``ε ≥ 0``, the step in ``[0, 1]`` intensity units (the audit's normalisation comes after
        it); default :data:`DEFAULT_EPSILON` = 0.0014, the authors' code's default. pytorch-ood's
        ``eps`` without ``norm_std`` is in normalised units: ``ε = eps · σ`` (see the module).

    The audit sets :attr:`model` (tests set it directly): a callable from images ``[B, C,
    *spatial]`` in ``[0, 1]`` to the model's logits. Gradients are taken with
    :func:`torch.autograd.grad` with respect to the input only, so no ``.grad`` is left on the
    model's parameters, and they work inside the runner's ``torch.inference_mode()``.
    """

    name = "odin"
    needs = "inputs"
    needs_model = True
    logits_only = True
    summary = "negative maximum softmax at temperature T after a signed-gradient input step of size ε (ODIN)"
    citation = ("Liang, Li & Srikant, Enhancing the Reliability of Out-of-Distribution Image Detection in "
                "Neural Networks, ICLR 2018")

    def __init__(self, temperature: float = 1000.0, epsilon: float = DEFAULT_EPSILON) -> None:
        if not (isinstance(temperature, Real) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"odin temperature must be positive and finite, got {temperature!r}")
        if not (isinstance(epsilon, Real) and math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"odin epsilon must be finite and >= 0 (a step in [0, 1] intensity units), "
                             f"got {epsilon!r}")
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)

    def _logits(self, x: Tensor) -> Tensor:
        """The model's logits ``[B, K]`` of images ``x`` (one-value binary outputs as ``[0, z]``), in
        float32 at least."""
        assert self.model is not None
        out = self.model(x)
        if not isinstance(out, Tensor):
            raise ValueError(f"odin: the model must return a tensor of logits, got {type(out).__name__}")
        if out.ndim not in (1, 2) or out.shape[0] != x.shape[0]:
            raise ValueError(f"odin needs class logits [B, K] (or [B] / [B, 1] for a binary model) for a batch of "
                             f"B = {x.shape[0]} images, got outputs of shape {tuple(out.shape)}; it is not defined "
                             "for per-voxel outputs")
        out = two_class(out)
        return out if out.dtype in (torch.float32, torch.float64) else out.float()

    def embed(self, logits: Tensor, features: Tensor | list[Tensor] | None) -> Tensor:
        """``[B, 1]`` ODIN scores ``max_k softmax(f(x̃) / T)_k`` of the images ``features``
        (``[B, C, *spatial]`` in ``[0, 1]``), on their device; ``logits`` are not used (the model is
        called again, with gradients)."""
        if self.model is None:
            raise ValueError("odin needs the model: the audit sets detector.model (a callable from [0, 1] images to "
                             "logits) before the forward passes; set it before embed")
        if features is None or not isinstance(features, Tensor) or features.ndim < 3:
            raise ValueError("odin needs the input images [B, C, *spatial] in [0, 1] (needs = 'inputs')")
        t = self.temperature
        # The runner embeds inside torch.inference_mode(): lift it and enable autograd for the step.
        with torch.inference_mode(False), torch.enable_grad():
            x = features.clone().detach().requires_grad_(True)
            z = self._logits(x) / t
            y_hat = z.argmax(dim=1)
            loss = -torch.log_softmax(z, dim=1).gather(1, y_hat[:, None]).sum()
            (grad,) = torch.autograd.grad(loss, x)
            x_tilde = x.detach() - self.epsilon * grad.sign()
        with torch.no_grad():
            z_tilde = self._logits(x_tilde).double() / t
        return torch.softmax(z_tilde, dim=1).max(dim=1, keepdim=True).values.to(features.device)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        """Nothing to fit: ODIN needs no in-distribution data."""

    def score(self, embeddings: Tensor) -> Tensor:
        """``−s`` ``[N]`` (float64): the negative of the paper's score, higher = more shifted."""
        if embeddings.ndim != 2 or embeddings.shape[1] < 1:
            raise ValueError(f"odin: expected embeddings [N, 1], got shape {tuple(embeddings.shape)}")
        return -embeddings[:, 0].double()
