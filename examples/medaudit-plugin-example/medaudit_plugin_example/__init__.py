"""An example third-party medaudit plugin.

It contributes, through the ``medaudit`` entry-point group (see ``pyproject.toml``):

* the perturbation ``example.vignetting`` (radial fall-off of illumination, :class:`Vignetting`);
* the metric ``example.youden_j`` (result key ``youden_j``, :class:`YoudenJ`);
* a report section summarising both (:func:`medaudit_report_sections`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext
from medaudit.perturbation import Perturbation, finish
from medaudit.rng import SampleRNG
from medaudit.sections import ReportSection
from torch import Tensor

__version__ = "0.1.0"

# The hook API this plugin is written against; medaudit refuses to load it under another.
MEDAUDIT_API_VERSION = 1


class Vignetting(Perturbation):
    r"""Natural vignetting: illumination falls off towards the edge of the field of view.

    An ideal lens images an off-axis point at field angle :math:`\theta` with relative
    illumination :math:`\cos^4\theta` (the cosine-fourth law). With the optical axis at
    :math:`c` and the image plane at normalised distance :math:`f` from the exit pupil,
    :math:`\tan\theta = r / f` for a pixel at distance :math:`r` from :math:`c`, so

    .. math:: y = x \cos^4\theta = \frac{x}{\big(1 + (r/f)^2\big)^{2}}.

    Severity sets ``falloff``, the fraction of light lost at :math:`r = 1` (the middle of an
    image edge, coordinates normalised to :math:`[-1, 1]`), from which
    :math:`f = 1 / \sqrt{(1 - \text{falloff})^{-1/2} - 1}`; the optical centre is offset from the
    image centre by up to ``offset`` (normalised units, uniform per axis). The fall-off is in-plane
    (H, W): 3D volumes get the same fall-off on every slice, as a stack of 2D acquisitions
    (microscopy, endoscopy, fundus or dermoscopy video) would. Intensities only decrease, so the
    result stays in ``[0, 1]``.
    """

    name = "example.vignetting"
    suite = "example"
    modalities = ("dermoscopy", "pathology", "generic")
    dims = (2, 3)
    summary = "Radial illumination fall-off towards the image edges (cosine-fourth law)."
    citation = "Goldman, Vignette and exposure calibration and compensation, IEEE TPAMI 32(12) 2010."
    severities = {
        1: {"falloff": (0.05, 0.10), "offset": 0.05},
        2: {"falloff": (0.10, 0.20), "offset": 0.10},
        3: {"falloff": (0.20, 0.35), "offset": 0.15},
        4: {"falloff": (0.35, 0.50), "offset": 0.20},
        5: {"falloff": (0.50, 0.70), "offset": 0.25},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        # Every number comes from `rng`: per-sample, batch-independent and device-independent.
        falloff = self.draw(rng, severity, "falloff")
        offset = self.draw(rng, severity, "offset")
        centre = (2.0 * rng.uniform(2) - 1.0) * offset[:, None]  # [B, 2]: (row, column) of the axis
        return {"falloff": falloff, "centre": centre}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return vignette(x, params["falloff"], params["centre"])


def vignette(x: Tensor, falloff: Tensor, centre: Tensor) -> Tensor:
    """Apply cosine-fourth vignetting with per-sample ``falloff`` ``[B]`` and ``centre`` ``[B, 2]``."""
    xf = x.float()
    h, w = x.shape[-2], x.shape[-1]
    rows = torch.linspace(-1.0, 1.0, h, device=x.device)
    cols = torch.linspace(-1.0, 1.0, w, device=x.device)
    dr = rows[None, :, None] - centre[:, 0, None, None].float()
    dc = cols[None, None, :] - centre[:, 1, None, None].float()
    r2 = dr**2 + dc**2  # [B, H, W]
    lost = falloff.float().clamp(0.0, 0.99)  # clamped, not checked: checking would sync with the host
    inv_f2 = (1.0 - lost).rsqrt() - 1.0  # 1/f² from cos⁴θ = 1 - falloff at r = 1
    gain = (1.0 + r2 * inv_f2[:, None, None]).pow(-2.0)
    gain = gain.reshape(x.shape[0], *([1] * (x.ndim - 3)), h, w)  # broadcast over C (and D)
    return finish(xf * gain, x)


class YoudenJ(Metric):
    r"""Youden's J statistic, :math:`J = \text{sensitivity} + \text{specificity} - 1`.

    Binary: at ``ctx.threshold`` on :math:`p_1`. Multiclass: the mean over classes of the
    one-vs-rest J of the arg-max prediction. ``J`` is 0 for an uninformative classifier and 1 for
    a perfect one; it is NaN where a class has no positives or no negatives in a weight row
    (sensitivity or specificity undefined).
    """

    name: ClassVar[str] = "example.youden_j"
    tasks: ClassVar[tuple[str, ...]] = ("binary", "multiclass")
    higher_is_better: ClassVar[bool] = True
    # result keys that are NaN when a class is absent (read by medaudit.testing)
    nan_keys: ClassVar[tuple[str, ...]] = ("youden_j",)

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        k = probs.shape[1]
        w = weights.to(device=probs.device, dtype=torch.float64)
        labels = labels.to(probs.device, torch.int64)
        pred = (probs[:, 1] >= ctx.threshold).long() if ctx.task == "binary" else probs.argmax(dim=1)
        eye = torch.eye(k, dtype=torch.float64, device=probs.device)
        truth, guess = eye[labels], eye[pred]
        tp = w @ (truth * guess)  # [R, K] weighted one-vs-rest counts
        pos = w @ truth
        neg = w.sum(dim=1, keepdim=True) - pos
        fp = w @ guess - tp
        sens = tp / pos  # NaN (0/0) where a class is absent, as documented
        spec = (neg - fp) / neg
        j = sens + spec - 1.0
        return {"youden_j": j[:, 1] if ctx.task == "binary" else j.mean(dim=1)}


SECTION_TEMPLATE = """
<p>Youden's J (sensitivity + specificity &minus; 1) on clean data and under vignetting
(radial illumination fall-off, <code>example.vignetting</code>).</p>
<table>
  <thead><tr><th>Scenario</th><th>Youden's J [95% CI]</th></tr></thead>
  <tbody>
  {% for s in rows %}
    <tr><td>{{ s.id }}</td><td>{{ fmt_ci(s.metrics.get("youden_j")) }}</td></tr>
  {% endfor %}
  </tbody>
</table>
"""


@hookimpl
def medaudit_perturbations() -> list[type[Perturbation]]:
    return [Vignetting]


@hookimpl
def medaudit_metrics(config: Any) -> list[Metric]:
    return [YoudenJ()]


@hookimpl
def medaudit_report_sections(results: dict[str, Any]) -> list[ReportSection]:
    # Only what is in results.json is available here (the report can be re-rendered from it).
    rows = [s for s in results.get("scenarios", [])
            if s.get("id") == "clean" or str(s.get("id", "")).startswith("example.vignetting@")]
    if not any("youden_j" in s.get("metrics", {}) for s in rows):
        return []
    return [ReportSection(id="example-vignetting", title="Vignetting and Youden's J (example plugin)",
                          template=SECTION_TEMPLATE, context={"rows": rows}, order=650)]


def cos4_gain(radius: float, falloff: float) -> float:
    """Reference value of the gain at ``radius`` for ``falloff`` (used by the tests)."""
    inv_f2 = 1.0 / math.sqrt(1.0 - falloff) - 1.0
    return (1.0 + radius**2 * inv_f2) ** -2
