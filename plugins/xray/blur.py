"""Separable blur and resolution loss for ``xray.blur`` and ``xray.resolution``.

Both are per-axis linear maps with per-sample kernels: on the CPU an axis up to
:data:`~medaudit.resample.MATRIX_MAX_SIZE` long is one batched matmul with a dense ``[n, n]``
matrix per sample (:func:`~medaudit.resample.along_axis`); longer axes (and CUDA) run an
elementwise tap loop and gathers. Both paths agree to float rounding and are batch-invariant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medaudit.perturbation import Perturbation, batch_param, finish, finish_, per_sample
from medaudit.resample import MATRIX_MAX_SIZE, along_axis, matrices_allowed


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
