"""Baseline JPEG round trip for ``xray.jpeg``: 8×8 block DCT quantised with the IJG tables."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from medaudit.perturbation import Perturbation, batch_param, finish, host_constant


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
