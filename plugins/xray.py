"""X-ray and 2D photographic acquisition corruptions: exposure, detector noise, blur, JPEG,
anti-scatter grid lines and resolution loss.

Every perturbation is a sampling layer over a functional op of this module (:func:`expose`,
:func:`detector_noise`, :func:`gaussian_blur`, :func:`jpeg_compress`, :func:`grid_lines`,
:func:`degrade_resolution`); the ops are batched pure tensor code and run on the batch's device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from medaudit.hookspecs import hookimpl
from medaudit.perturbation import Perturbation, batch_param, check_input, finish, finish_, host_constant, per_sample
from medaudit.resample import MATRIX_MAX_SIZE, along_axis, matrices_allowed
from medaudit.rng import SampleRNG

MEDAUDIT_API_VERSION = 1

XRAY_LIKE = ("xray", "dermoscopy", "pathology")


# ---------------------------------------------------------------------------------------------
# Functional ops
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


def _symmetric_pad(x: Tensor, dim: int, r: int) -> Tensor:
    # scipy.ndimage's default 'reflect' mode (d c b a | a b c d), which torch's F.pad lacks;
    # matching it lets the blur be compared with torchio.Blur exactly, borders included.
    n = x.shape[dim]
    return torch.cat([x.narrow(dim, 0, r).flip(dim), x, x.narrow(dim, n - r, r).flip(dim)], dim=dim)


def _blur_matrices(k: Tensor, n: int) -> Tensor:
    """Dense ``[B, n, n]`` matrices of the 1-D blurs with kernels ``k`` ``[B, 2r+1]`` (r <= n),
    scipy 'reflect' borders folded in: ``K[b, i, reflect(i + t - r)] += k[b, t]``."""
    b, taps = k.shape
    r = (taps - 1) // 2
    idx = torch.arange(n, device=k.device)[:, None] + torch.arange(-r, r + 1, device=k.device)[None, :]
    idx = torch.where(idx < 0, -idx - 1, idx)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    # CPU scatter_add_ adds each row's taps in index order: deterministic, batch-independent
    return torch.zeros(b, n, n, device=k.device).scatter_add_(2, idx.expand(b, n, taps), k[:, None, :].expand(b, n, taps))


def _blur_taps(y: Tensor, k: Tensor, dim: int) -> Tensor:
    """1-D blur of axis ``dim`` with per-sample kernels ``k`` ``[B, 2r+1]``, scipy 'reflect' borders.

    A shift-and-add over the kernel taps (not a grouped convolution): elementwise ops in a fixed
    order, so a sample's result is bit-identical whatever batch it is in (CPU convolution
    kernels pick algorithms by batch size and differ in the last bit).
    """
    r = (k.shape[1] - 1) // 2
    padded = _symmetric_pad(y, dim, r)
    n = y.shape[dim]
    acc = padded.narrow(dim, 0, n) * per_sample(k[:, 0], y)
    for j in range(1, 2 * r + 1):
        acc.addcmul_(padded.narrow(dim, j, n), per_sample(k[:, j], y))
    return acc


def _gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Normalised Gaussian taps ``[B, 2 radius + 1]`` for per-sample ``sigma``."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    # sigma -> 0 gives a unit impulse (exp underflows to exactly 0), so sigma = 0 is the identity.
    k = torch.exp(-0.5 * (t[None, :] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: float | Tensor, max_sigma: float | None = None) -> Tensor:
    """Separable isotropic Gaussian blur with per-sample ``sigma`` (pixels), scipy 'reflect' borders.

    The kernel radius is ``int(4 * max_sigma + 0.5)`` (scipy's ``truncate=4``); a tensor ``sigma``
    needs ``max_sigma`` (and is clamped to it) because the radius must be known without reading
    the tensor back to the host. On the CPU, axes up to :data:`MATRIX_MAX_SIZE` are blurred by one
    batched matmul with the dense blur matrix of each sample; longer axes (and CUDA) use an
    elementwise loop over the taps.
    """
    nd = Perturbation.spatial_dims(x)
    if max_sigma is None:
        if isinstance(sigma, Tensor):
            raise ValueError("max_sigma is required when sigma is a tensor")
        max_sigma = float(sigma)
    if not 0.0 <= max_sigma <= 64.0:
        raise ValueError(f"max_sigma must be in [0, 64], got {max_sigma!r}")
    s = batch_param(sigma, "sigma", x, 0.0, max_sigma).clamp(0.0, max_sigma)
    radius = int(4.0 * max_sigma + 0.5)
    xf = x.float()
    if radius == 0:
        return finish(xf, x)
    for axis in range(2, 2 + nd):
        if radius > x.shape[axis]:
            raise ValueError(f"blur radius {radius} exceeds the image size {x.shape[axis]} along dim {axis}; use a smaller sigma")
    k = _gaussian_kernels(s, radius)
    dense = matrices_allowed(x)
    y = xf
    for axis in range(2, 2 + nd):
        n = x.shape[axis]
        y = along_axis(y, _blur_matrices(k, n), axis) if dense and n <= MATRIX_MAX_SIZE else _blur_taps(y, k, axis)
    return finish_(y, x)  # y is a fresh tensor of this function


# Standard IJG (ITU-T T.81 Annex K) quantisation tables at quality 50.
_JPEG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56), (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
_JPEG_CHROMA = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99), (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4


def jpeg_tables(quality: Tensor, chroma: bool = False) -> Tensor:
    """IJG quantisation tables ``[B, 8, 8]`` for integer qualities ``[B]`` (libjpeg's
    ``jpeg_quality_scaling`` with baseline clamping to 1..255)."""
    q = quality.float().clamp(1.0, 100.0)
    scale = torch.where(q < 50.0, 5000.0 / q, 200.0 - 2.0 * q)
    base = host_constant(_JPEG_CHROMA if chroma else _JPEG_LUMA, quality.device)
    return torch.floor((base[None] * scale[:, None, None] + 50.0) / 100.0).clamp(1.0, 255.0)


def _dct_matrix(device: torch.device) -> Tensor:
    n = torch.arange(8, device=device, dtype=torch.float32)
    m = torch.cos((2.0 * n[None, :] + 1.0) * n[:, None] * math.pi / 16.0) * math.sqrt(2.0 / 8.0)
    m[0] = m[0] / math.sqrt(2.0)
    return m  # orthonormal DCT-II: coefficients = M @ block @ M.T


_RGB_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def jpeg_compress(x: Tensor, quality: float | Tensor) -> Tensor:
    """Baseline JPEG round trip (8-bit samples, 8×8 block DCT, IJG tables scaled by ``quality``).

    One channel or any channel count other than 3: every channel is coded like a greyscale image
    with the luminance table. Three channels: RGB -> YCbCr (JFIF), luminance table for Y and the
    chrominance table for Cb/Cr, without chroma subsampling (Pillow's ``subsampling=0``, 4:4:4).
    3D batches are coded slice by slice along the first spatial axis (as in a lossy-JPEG DICOM
    series). Image sizes that are not multiples of 8 are padded by edge replication (as libjpeg
    does) and cropped back.
    """
    nd = Perturbation.spatial_dims(x)
    q = batch_param(quality, "quality", x, 1, 100).clamp(1.0, 100.0).round()
    xf = x.float().clamp(0.0, 1.0)
    b, c = x.shape[:2]
    if nd == 3:  # fold slices into the batch: [B, C, D, H, W] -> [B*D, C, H, W]
        d = x.shape[2]
        xf = xf.permute(0, 2, 1, 3, 4).reshape(b * d, c, *x.shape[3:])
        q = q.repeat_interleave(d)
    n, _, h, w = xf.shape
    ph, pw = (-h) % 8, (-w) % 8
    v = torch.round(xf * 255.0)
    if ph or pw:
        v = F.pad(v, (0, pw, 0, ph), mode="replicate")
    rgb = c == 3
    if rgb:
        v = torch.einsum("ij,njhw->nihw", host_constant(_RGB_TO_YCC, x.device), v)
        v = v + host_constant([0.0, 128.0, 128.0], x.device).reshape(1, 3, 1, 1)
        v = torch.round(v).clamp(0.0, 255.0)  # the encoder works on 8-bit YCbCr samples
    hb, wb = v.shape[2] // 8, v.shape[3] // 8
    blocks = (v - 128.0).reshape(n, c, hb, 8, wb, 8).permute(0, 1, 2, 4, 3, 5)  # [N, C, hb, wb, 8, 8]
    m = _dct_matrix(x.device)
    coef = m @ blocks @ m.T
    luma = jpeg_tables(q)
    if rgb:
        tables = torch.stack([luma, jpeg_tables(q, chroma=True), jpeg_tables(q, chroma=True)], dim=1)
    else:
        tables = luma[:, None].expand(n, c, 8, 8)
    tables = tables[:, :, None, None]  # [N, C, 1, 1, 8, 8]
    rec = m.T @ (torch.round(coef / tables) * tables) @ m + 128.0
    rec = rec.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hb * 8, wb * 8)
    if rgb:
        rec = rec - host_constant([0.0, 128.0, 128.0], x.device).reshape(1, 3, 1, 1)
        inv = torch.linalg.inv(torch.tensor(_RGB_TO_YCC, dtype=torch.float64)).float().to(x.device, non_blocking=True)
        rec = torch.einsum("ij,njhw->nihw", inv, rec)
    out = torch.round(rec[:, :, :h, :w]).clamp(0.0, 255.0) / 255.0  # the decoder outputs 8-bit samples
    if nd == 3:
        out = out.reshape(b, -1, c, h, w).permute(0, 2, 1, 3, 4)
    return finish(out.reshape(x.shape), x)


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


def _interp_weights(pos: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Linear interpolation at per-sample positions ``pos`` ``[B, M]`` (pixel units, clamped to
    ``[0, n - 1]``): left indices, right indices and the right weight."""
    p = pos.clamp(0.0, n - 1.0)
    i0 = p.floor()
    w = p - i0
    i0 = i0.long()
    return i0, (i0 + 1).clamp(max=n - 1), w


def _interp_along(x: Tensor, dim: int, pos: Tensor) -> Tensor:
    """Linear interpolation of ``x`` along ``dim`` at per-sample positions ``pos`` ``[B, M]``
    (pixel units, clamped to the border), batched with ``gather``."""
    i0, i1, w = _interp_weights(pos, x.shape[dim])
    view = [x.shape[0]] + [1] * (x.ndim - 1)
    view[dim] = pos.shape[1]
    size = list(x.shape)
    size[dim] = pos.shape[1]
    g0 = torch.gather(x, dim, i0.reshape(view).expand(size))
    g1 = torch.gather(x, dim, i1.reshape(view).expand(size))
    return g0 + w.reshape(view) * (g1 - g0)


def _interp_matrices(pos: Tensor, n: int) -> Tensor:
    """``[B, M, n]`` matrices of :func:`_interp_along` at ``pos`` ``[B, M]``."""
    i0, i1, w = _interp_weights(pos, n)
    m = torch.zeros(pos.shape[0], pos.shape[1], n, device=pos.device)
    return m.scatter_add_(2, i0[..., None], (1.0 - w)[..., None]).scatter_add_(2, i1[..., None], w[..., None])


def _resample_positions(f: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Positions ``[B, n]`` of the coarse samples on the fine grid and of the fine pixels on the
    coarse grid for per-sample factors ``f``."""
    idx = torch.arange(n, device=f.device, dtype=torch.float32)[None, :]
    coarse = (idx + 0.5) * f[:, None] - 0.5  # coarse sample k sits here on the fine grid
    back = (idx + 0.5) / f[:, None] - 0.5  # fine pixel i sits here on the coarse grid
    # only floor(n / f) coarse samples exist (as F.interpolate): clamp to the last of them
    return coarse, torch.minimum(back, torch.floor(n / f)[:, None] - 1.0)


def degrade_resolution(x: Tensor, factor: float | Tensor, max_factor: float | None = None) -> Tensor:
    """Down-sample by ``factor`` (anti-aliased, linear) and up-sample back (linear), per sample.

    Each spatial axis in turn: Gaussian anti-aliasing with ``sigma = (factor - 1) / 2`` (as
    scikit-image's ``rescale``), samples at the coarse pixel centres ``(k + 1/2) f - 1/2``, then
    linear interpolation back to the original centres. A tensor ``factor`` needs ``max_factor``
    (it sets the blur kernel's radius; see :func:`gaussian_blur`) and is clamped to it.

    The three steps are linear along one axis, so on the CPU an axis up to
    :data:`MATRIX_MAX_SIZE` long is resampled by their product, one ``[n, n]`` matrix per sample
    (one batched matmul instead of a blur and two gathers); longer axes (and CUDA) blur with the
    tap loop and resample with gathers. The two agree to float rounding.
    """
    nd = Perturbation.spatial_dims(x)
    if max_factor is None:
        if isinstance(factor, Tensor):
            raise ValueError("max_factor is required when factor is a tensor")
        max_factor = float(factor)
    if not 1.0 <= max_factor <= 8.0:
        raise ValueError(f"max_factor must be in [1, 8], got {max_factor!r}")
    f = batch_param(factor, "factor", x, 1.0, max_factor).clamp(1.0, max_factor)
    max_sigma = (max_factor - 1.0) / 2.0
    radius = int(4.0 * max_sigma + 0.5)
    for axis in range(2, 2 + nd):
        if radius > x.shape[axis]:
            raise ValueError(f"blur radius {radius} exceeds the image size {x.shape[axis]} along dim {axis}; use a smaller max_factor")
    k = _gaussian_kernels((f - 1.0) / 2.0, radius)
    dense = matrices_allowed(x)
    y = x.float()
    for axis in range(2, 2 + nd):
        n = x.shape[axis]
        coarse, back = _resample_positions(f, n)
        if dense and n <= MATRIX_MAX_SIZE:
            # up @ (down @ blur): [B, n, n] products, tiny next to applying them to the image
            mats = torch.bmm(_interp_matrices(back, n), torch.bmm(_interp_matrices(coarse, n), _blur_matrices(k, n)))
            y = along_axis(y, mats, axis)
        else:
            blurred = _blur_taps(y, k, axis) if radius > 0 else y
            y = _interp_along(_interp_along(blurred, axis, coarse), axis, back)
    return finish_(y, x)  # y is a fresh tensor of this function


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
