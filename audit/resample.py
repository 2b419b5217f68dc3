"""Resampling helpers for perturbations: affine sampling grids, two-pass volume resampling and
dense per-axis resampling matrices.

Conventions: tensors are ``[B, C, H, W]`` or ``[B, C, D, H, W]``; affine maps ``theta`` follow
``F.affine_grid`` (normalised coordinates in ``[-1, 1]``, ``align_corners=False``, columns in
``(x, y[, z]) = (W, H[, D])`` order, output point ``p`` reads the input at ``L p + s``). Every
helper is batch-invariant: a sample's result does not depend on its batch-mates, as the
perturbation contract requires. Used by ``geometry.*``, ``mri.motion`` and ``xray.blur`` /
``xray.resolution``; a third-party perturbation that warps or resamples can use them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Longest axis that a CPU path should resample with a dense per-sample ``[n, n]`` matrix (one
#: batched matmul per axis, see :func:`along_axis`; built-ins: blur, resolution loss, translation
#: and scaling).
#: The matmul costs ``n`` multiply-adds per voxel, the fallbacks (an elementwise tap loop,
#: gathers, ``grid_sample``) a few memory passes per tap or corner; measured on 2 cores, the
#: matmul wins up to 256-pixel axes (5-20x on 128³ volumes) and loses on 512 and beyond.
MATRIX_MAX_SIZE = 256


def matrices_allowed(x: Tensor) -> bool:
    """Whether ``x`` may be resampled with dense per-sample matrices: CPU, exact float32 matmuls.

    Returns True only for a CPU tensor while float32 matmuls run at full precision; callers then
    use :func:`along_axis` for axes up to :data:`MATRIX_MAX_SIZE` and their elementwise path
    otherwise.

    ``torch.set_float32_matmul_precision("high"/"medium")`` lets oneDNN run float32 matmuls in
    TF32/bfloat16 (a 1e-3 error), and a perturbation must not change with a global speed flag,
    so then (and on CUDA, where TF32 is a common setting and the fallbacks are fast anyway) the
    callers use their elementwise fallback. Both paths agree to float rounding (about 1e-6).
    """
    if x.device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return False
    onednn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(onednn, "fp32_precision", "none") in ("none", "ieee")


def along_axis(y: Tensor, mats: Tensor, dim: int) -> Tensor:
    """Apply one linear map per sample along one axis: ``out[b, ..., i, ...] = sum_j mats[b, i, j]
    * y[b, ..., j, ...]``.

    Parameters
    ----------
    y : Tensor
        float32 ``[B, ...]`` with ``n`` entries along ``dim``.
    mats : Tensor
        float32 ``[B, n, n]``, output index first (e.g. interpolation or blur weights).
    dim : int
        The axis of ``y`` to transform (non-negative, ``>= 1``).

    Returns
    -------
    Tensor
        A new tensor of ``y``'s shape. One batched matmul: each sample's product has the same
        shape whatever the batch, so its result does not depend on its batch-mates. Use it only
        where :func:`matrices_allowed` says so.
    """
    b, n = y.shape[0], y.shape[dim]
    pre = math.prod(y.shape[1:dim])
    if dim == y.ndim - 1:
        return torch.matmul(y.reshape(b, pre, n), mats.transpose(1, 2)).reshape(y.shape)
    post = math.prod(y.shape[dim + 1:])
    return torch.matmul(mats[:, None], y.reshape(b, pre, n, post)).reshape(y.shape)


def normalised_centres(size: int, device: torch.device) -> Tensor:
    """Voxel centres of an axis of ``size`` voxels in ``grid_sample`` coordinates.

    Returns float32 ``[size]``: ``(2 i + 1) / size - 1``, the normalised position of voxel ``i``
    with ``align_corners=False`` (``-1`` and ``1`` are the outer edges of the end voxels).
    """
    return (torch.arange(size, device=device, dtype=torch.float32) * 2.0 + 1.0) / size - 1.0


def affine_grid(theta: Tensor, shape: Sequence[int]) -> Tensor:
    """``F.affine_grid(theta, shape, align_corners=False)``, built as a broadcast sum.

    Parameters
    ----------
    theta : Tensor
        float32 ``[B, n, n + 1]`` affine maps in normalised ``(x, y[, z])`` order (see the module
        notes), ``n`` = 2 or 3.
    shape : Sequence[int]
        The output size ``[B, C, H, W]`` or ``[B, C, D, H, W]``.

    Returns
    -------
    Tensor
        The sampling grid ``[B, H, W, 2]`` or ``[B, D, H, W, 3]`` for ``F.grid_sample``.

    The grid is affine in each coordinate, so it is the sum of one small term per spatial axis;
    one broadcasting add writes it, where ``affine_grid`` runs a ``[B, N, n + 1] @ [B, n + 1, n]``
    matmul over every voxel (as slow as ``grid_sample`` itself on a CPU). Elementwise, so a
    sample's grid does not depend on its batch.
    """
    sizes = list(shape[2:])  # tensor order (D,) H, W; theta's columns are in (x, y[, z]) = (W, H[, D])
    nd = len(sizes)
    b = theta.shape[0]
    grid = theta[:, :, nd].reshape(b, *([1] * nd), nd)  # translation column
    for col, size in enumerate(reversed(sizes)):
        axis = nd - 1 - col  # tensor spatial axis of this column
        c = normalised_centres(size, theta.device)
        view = [1] * nd
        view[axis] = size
        term = c.reshape(1, *view, 1) * theta[:, :, col].reshape(b, *([1] * nd), nd)
        grid = grid + term  # stays small until the last term broadcasts it to the full grid
    return grid


def two_pass_resample(x: Tensor, theta: Tensor, out: Tensor | None = None) -> Tensor:
    r"""Resample a volume with several affine maps each, as two passes of 2-D bilinear sampling.

    ``x`` is ``[B, C, D, H, W]``, ``theta`` ``[B, K, 3, 4]`` in ``F.affine_grid``'s normalised
    ``(x, y, z) = (W, H, D)`` convention (output point ``p`` reads the input at ``L p + s``);
    returns ``[K, B, C, D, H, W]`` (written into ``out`` when given), zero outside the field of
    view.

    A 3-D affine map factors into a 1-D resampling along D followed by a 2-D affine warp of each
    D-slice (Catmull & Smith, "3-D transformations of images in scanline order", SIGGRAPH 1980):
    with :math:`(w, v) = (q_x(p), q_y(p))`, the output is :math:`n(z, v, w)` where
    :math:`n(z, v, w) = x(Q_z(z, v, w), v, w)` and :math:`Q_z` is :math:`q_z` re-expressed in
    :math:`(z, v, w)` by inverting the in-slice 2×2 block of :math:`L` (invertible for rotations
    well below 90°, as all of this package's are). Both passes run as ``grid_sample`` on 2-D
    planes, whose CPU kernel is vectorised; the 3-D kernel is scalar, and this is about 5× faster
    on 128³ volumes. Each output is still a linear interpolation of its input neighbourhood
    (along a line through the exact source point instead of along the D axis), so the result
    differs from trilinear ``grid_sample`` by interpolation error only, and each voxel's value
    does not depend on the batch.
    """
    b, c, d, h, w = x.shape
    k = theta.shape[1]
    t = theta.to(torch.float32)
    lin, s = t[..., :3], t[..., 3]  # [B, K, 3, 3], [B, K, 3]; rows and columns in (x, y, z) order
    # r = [L_zx, L_zy] @ M^-1 with M the in-slice block [[L_xx, L_xy], [L_yx, L_yy]]
    det = lin[..., 0, 0] * lin[..., 1, 1] - lin[..., 0, 1] * lin[..., 1, 0]
    r0 = (lin[..., 2, 0] * lin[..., 1, 1] - lin[..., 2, 1] * lin[..., 1, 0]) / det
    r1 = (lin[..., 2, 1] * lin[..., 0, 0] - lin[..., 2, 0] * lin[..., 0, 1]) / det
    q_z = lin[..., 2, 2] - r0 * lin[..., 0, 2] - r1 * lin[..., 1, 2]
    q_0 = s[..., 2] - r0 * s[..., 0] - r1 * s[..., 1]
    zn, vn, wn = (normalised_centres(n, x.device) for n in (d, h, w))
    planes = x.float().permute(0, 3, 1, 2, 4).reshape(b * h, c, d, w)  # (z, w) planes, one per v
    if out is None:
        out = torch.empty(k, b, c, d, h, w, device=x.device)
    # One map at a time, reusing the grids: fresh multi-hundred-MB grids for all K maps cost more
    # in page faults than the sampling itself (measured 2.7x slower on 128³, K = 6).
    grid_a = torch.empty(b, h, d, w, 2, device=x.device)
    grid_a[..., 0] = wn
    grid_b = torch.empty(b, d, h, w, 2, device=x.device)
    for j in range(k):  # loop over maps (K <= 10), not samples
        def at(v: Tensor, *view: int) -> Tensor:
            return v[:, j].reshape(b, *view)

        # Pass A: sample each (z, w) plane at row Q_z(z, v, w), column w (exact).
        rows = at(r1, 1, 1, 1) * vn.reshape(1, h, 1, 1) + (at(q_z, 1, 1, 1) * zn.reshape(1, 1, d, 1) + at(q_0, 1, 1, 1))
        torch.add(rows, at(r0, 1, 1, 1) * wn, out=grid_a[..., 1])
        n = F.grid_sample(planes, grid_a.reshape(b * h, d, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
        # Pass B: each z-slice of n, warped in (v, w) to (q_x(p), q_y(p)).
        slices = n.reshape(b, h, c, d, w).permute(0, 3, 2, 1, 4).reshape(b * d, c, h, w)
        for col in range(2):  # grid component x (col 0) and y (col 1)
            base = at(lin[..., col, 2], 1, 1, 1) * zn.reshape(1, d, 1, 1) + at(s[..., col], 1, 1, 1)
            base = base + at(lin[..., col, 1], 1, 1, 1) * vn.reshape(1, 1, h, 1)
            torch.add(base, at(lin[..., col, 0], 1, 1, 1) * wn, out=grid_b[..., col])
        moved = F.grid_sample(slices, grid_b.reshape(b * d, h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
        out[j] = moved.reshape(b, d, c, h, w).transpose(1, 2)
    return out
