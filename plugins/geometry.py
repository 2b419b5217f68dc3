"""Geometric changes of positioning: small rotations, translations, scaling and left-right flips.

All resampling is one op, :func:`affine_warp` (an affine grid + ``grid_sample``,
bilinear/trilinear, zero padding), with the transform written in voxel units about the image
centre so that rotations stay rigid on non-square images. Translations and scalings are
axis-aligned, so CPU volumes take a separable fast path with the same values (one batched
matmul per axis, see :func:`_axis_aligned_warp`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from medaudit.hookspecs import hookimpl
from medaudit.perturbation import Perturbation, batch_param, finish_, host_constant
from medaudit.resample import MATRIX_MAX_SIZE, affine_grid, along_axis, matrices_allowed
from medaudit.rng import SampleRNG

MEDAUDIT_API_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Functional ops
# ---------------------------------------------------------------------------------------------


def affine_warp(x: Tensor, matrix: Tensor, offset: Tensor | None = None) -> Tensor:
    """Resample ``x`` so that output voxel ``p`` takes the input at ``matrix @ p + offset``.

    ``p`` is measured in voxels from the image centre, along the tensor's spatial axes in order
    (``(H, W)`` or ``(D, H, W)``); ``matrix`` is ``[B, n, n]``, ``offset`` ``[B, n]`` voxels.
    Linear interpolation (label maps: :func:`warp_labels`); outside the field of view is 0 (the
    background after ``[0, 1]`` scaling).
    """
    return finish_(F.grid_sample(x.float(), _grid(x, matrix, offset), mode="bilinear", padding_mode="zeros",
                                 align_corners=False), x)


def _grid(x: Tensor, matrix: Tensor, offset: Tensor | None) -> Tensor:
    """The ``grid_sample`` grid of :func:`affine_warp` for a batch shaped like ``x`` (one
    definition for images and label maps, so a mask follows its image voxel for voxel)."""
    nd = Perturbation.spatial_dims(x)
    b = x.shape[0]
    if matrix.shape != (b, nd, nd):
        raise ValueError(f"matrix must have shape [{b}, {nd}, {nd}] for this batch, got {tuple(matrix.shape)}")
    if offset is None:
        offset = torch.zeros(b, nd, device=x.device)
    if offset.shape != (b, nd):
        raise ValueError(f"offset must have shape [{b}, {nd}] for this batch, got {tuple(offset.shape)}")
    half = host_constant([s / 2.0 for s in x.shape[2:]], x.device)  # voxels per normalised unit
    a = matrix.to(device=x.device, dtype=torch.float32)
    # normalised coordinates u = p / half (align_corners=False): u_in = S^-1 A S u_out + S^-1 t
    theta_a = a * half[None, None, :] / half[None, :, None]
    theta_t = offset.to(device=x.device, dtype=torch.float32) / half[None, :]
    # affine_grid orders coordinates (x, y[, z]) = (W, H[, D]): reverse the tensor axis order
    theta = torch.cat([theta_a.flip(1, 2), theta_t.flip(1)[:, :, None]], dim=2)
    return affine_grid(theta, x.shape)


def warp_labels(labels: Tensor, matrix: Tensor, offset: Tensor | None = None) -> Tensor:
    """:func:`affine_warp` of integer label maps ``[B, 1, *spatial]``: the same sampling grid, the
    nearest voxel's label (interpolating labels would invent classes between them), 0 outside."""
    # float32 holds label indices exactly (far beyond 255 classes); no [0, 1] clamp for labels
    warped = F.grid_sample(labels.float(), _grid(labels, matrix, offset), mode="nearest", padding_mode="zeros", align_corners=False)
    return warped.round().to(labels.dtype)


def _linear_matrices(scale: Tensor, offset: Tensor, n: int) -> Tensor:
    """``[B, n, n]`` matrices of 1-D linear resampling, zero outside: output pixel ``i`` takes the
    input at ``scale * p + offset`` where ``p = i + 1/2 - n/2`` is measured from the centre."""
    p = torch.arange(n, device=scale.device, dtype=torch.float32) + (0.5 - n / 2.0)
    pos = scale[:, None] * p[None, :] + offset[:, None] + (n / 2.0 - 0.5)  # [B, n] input pixel index
    i0 = pos.floor()
    w1 = pos - i0
    i0 = i0.long()
    i1 = i0 + 1
    # a corner outside the image contributes 0 (grid_sample's zero padding): zero its weight and
    # point it anywhere valid
    w0 = torch.where((i0 >= 0) & (i0 < n), 1.0 - w1, 0.0)
    w1 = torch.where((i1 >= 0) & (i1 < n), w1, 0.0)
    m = torch.zeros(scale.shape[0], n, n, device=scale.device)
    m.scatter_add_(2, i0.clamp(0, n - 1)[..., None], w0[..., None])
    return m.scatter_add_(2, i1.clamp(0, n - 1)[..., None], w1[..., None])


def _axis_aligned_warp(x: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """:func:`affine_warp` with the diagonal ``matrix = diag(scale)`` (``scale``, ``offset``
    ``[B, n]``, tensor axis order).

    Multilinear interpolation with zero padding at an axis-aligned affine map is separable:
    for CPU volumes with axes up to :data:`MATRIX_MAX_SIZE`, the axes are resampled one at a
    time by a batched matmul with per-sample ``[n, n]`` interpolation matrices (same values as
    ``grid_sample`` up to float rounding, 3.5x faster on 128³); otherwise ``grid_sample``.
    """
    nd = Perturbation.spatial_dims(x)
    b = x.shape[0]
    # the same checks and messages as affine_warp, whichever path runs
    if scale.shape != (b, nd):
        raise ValueError(f"scale must have shape [{b}, {nd}] for this batch, got {tuple(scale.shape)}")
    if offset.shape != (b, nd):
        raise ValueError(f"offset must have shape [{b}, {nd}] for this batch, got {tuple(offset.shape)}")
    # In 2D, grid_sample's 4 corners per pixel beat n multiply-adds per pixel and axis (measured
    # 2x on 256²); in 3D its 8 scattered corners lose to 3 matmuls (3.5x on 128³).
    if nd != 3 or not matrices_allowed(x) or max(x.shape[2:]) > MATRIX_MAX_SIZE:
        return affine_warp(x, torch.diag_embed(scale), offset)
    y = x.float()
    for axis in range(nd):
        y = along_axis(y, _linear_matrices(scale[:, axis], offset[:, axis], x.shape[2 + axis]), 2 + axis)
    return finish_(y, x)  # y is a fresh tensor of this function


def rotation_matrix(angle_deg: Tensor, axis: Tensor | None = None) -> Tensor:
    """Rotation matrices ``[B, n, n]`` in tensor-axis coordinates.

    2D (``axis`` None): rotation by ``angle_deg`` in the (H, W) plane, positive from +H towards +W.
    3D: Rodrigues' formula about unit ``axis`` ``[B, 3]`` given in (D, H, W) order.
    """
    t = angle_deg.float() * (math.pi / 180.0)
    c, s = torch.cos(t), torch.sin(t)
    if axis is None:
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    k = axis.float() / axis.float().norm(dim=1, keepdim=True).clamp(min=1e-12)
    zero = torch.zeros_like(t)
    kx = torch.stack([
        torch.stack([zero, -k[:, 2], k[:, 1]], -1),
        torch.stack([k[:, 2], zero, -k[:, 0]], -1),
        torch.stack([-k[:, 1], k[:, 0], zero], -1),
    ], -2)
    eye = torch.eye(3, device=t.device).expand_as(kx)
    return eye + s[:, None, None] * kx + (1.0 - c)[:, None, None] * (kx @ kx)


def rotate(x: Tensor, angle_deg: float | Tensor, axis: Tensor | None = None) -> Tensor:
    """Rotate the content by ``angle_deg`` about the image centre (about ``axis`` in 3D)."""
    nd = Perturbation.spatial_dims(x)
    angle = batch_param(angle_deg, "angle_deg", x, -180.0, 180.0)
    if nd == 3:
        if axis is None:
            raise ValueError("axis ([B, 3], in (D, H, W) order) is required to rotate a 3D batch")
        if axis.shape != (x.shape[0], 3):
            raise ValueError(f"axis must have shape [{x.shape[0]}, 3], got {tuple(axis.shape)}")
        r = rotation_matrix(angle, axis.to(x.device))
    else:
        r = rotation_matrix(angle)
    # the content turns by R when each output voxel reads the input at R^-1 p = R^T p
    return affine_warp(x, r.transpose(1, 2))


def translate(x: Tensor, shift: Tensor) -> Tensor:
    """Move the content by ``shift`` ``[B, n]`` voxels along the tensor's spatial axes."""
    nd = Perturbation.spatial_dims(x)
    return _axis_aligned_warp(x, torch.ones(x.shape[0], nd, device=x.device), -shift.to(x.device).float())


def zoom(x: Tensor, log_scale: float | Tensor) -> Tensor:
    """Scale the content isotropically by ``exp(log_scale)`` about the image centre."""
    nd = Perturbation.spatial_dims(x)
    s = torch.exp(batch_param(log_scale, "log_scale", x, -2.0, 2.0))
    inv = (1.0 / s)[:, None].expand(x.shape[0], nd)
    return _axis_aligned_warp(x, inv, torch.zeros(x.shape[0], nd, device=x.device))


def flip_lr(x: Tensor, flip: float | Tensor) -> Tensor:
    """Mirror the last spatial axis of the samples whose ``flip`` is 1 (0 keeps them)."""
    return finish_(_flip_columns(x.float(), flip), x)


def _flip_columns(x: Tensor, flip: float | Tensor) -> Tensor:
    """``x`` (any dtype) with the last axis reversed where ``flip`` is 1: :func:`flip_lr` without
    the intensity contract, so label maps keep their values."""
    f = batch_param(flip, "flip", x, 0.0, 1.0).round().clamp(0.0, 1.0).to(torch.bool)
    w = x.shape[-1]
    cols = torch.arange(w, device=x.device)
    # One gather with a per-sample column order (reversed for flipped samples): a single pass,
    # where torch.where(mask, x.flip(-1), x) flips every sample and then selects, and no host
    # sync to pick the flipped samples. The index is expanded (stride 0), not materialised.
    order = torch.where(f[:, None], w - 1 - cols[None, :], cols[None, :])  # [B, W]
    index = order.reshape(x.shape[0], *([1] * (x.ndim - 2)), w).expand(x.shape)
    return torch.gather(x, -1, index)


# ---------------------------------------------------------------------------------------------
# Perturbations
# ---------------------------------------------------------------------------------------------


class Rotation(Perturbation):
    r"""Small in-plane (2D) or 3D rotation, as from patient positioning.

    .. math:: \theta = s\,m,\; s \sim \mathcal{U}\{-1, +1\},\; m \sim \mathcal{U}(m_{lo}, m_{hi})
              \ \text{degrees}; \qquad \mathbf{k} = \mathbf{g}/\lVert\mathbf{g}\rVert,\;
              \mathbf{g} \sim \mathcal{N}(0, I_3)\ \text{(3D axis, uniform on the sphere)}

    about the image centre, linear interpolation, zero padding. ``angle_deg`` magnitude per
    severity is the total rotation angle in both 2D and 3D. The 2D rotation turns content from
    +H towards +W; ``torchio.Affine(scales=1, degrees=(0, 0, angle_deg), translation=0,
    center='image', default_pad_value=0)`` on the same slice stored as ``[C, H, W, 1]`` gives the
    same image up to interpolation rounding (tested); in 3D, TorchIO's per-axis Euler angles
    about (D, H, W) = its (x, y, z) match ``axis`` = that unit vector.
    """

    name = "geometry.rotation"
    suite = "geometry"
    moves_anatomy = True
    modalities = ("any",)
    summary = "Small rotation about the image centre (patient positioning)."
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomAffine."
    severities = {
        1: {"angle_deg": (2.0, 4.0)},
        2: {"angle_deg": (4.0, 7.0)},
        3: {"angle_deg": (7.0, 10.0)},
        4: {"angle_deg": (10.0, 14.0)},
        5: {"angle_deg": (14.0, 20.0)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        params = {"angle_deg": self.draw_signed(rng, severity, "angle_deg")}
        if len(shape) == 5:
            g = rng.normal(3)
            params["axis"] = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return params

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return rotate(x, params["angle_deg"], params.get("axis"))

    def apply_to_labels(self, labels: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        axis = params.get("axis")
        r = rotation_matrix(params["angle_deg"].to(labels.device), None if axis is None else axis.to(labels.device))
        return warp_labels(labels, r.transpose(1, 2))


class Translation(Perturbation):
    r"""Translation of the content within the field of view (positioning, cropping offset).

    .. math:: \mathbf{t} = m\,\mathbf{d}\odot\mathbf{N}, \qquad m \sim \mathcal{U}(m_{lo}, m_{hi}),\;
              \mathbf{d} = \mathbf{g}/\lVert\mathbf{g}\rVert,\; \mathbf{g} \sim \mathcal{N}(0, I_n)

    a random direction and a length ``fraction`` :math:`m` (per severity) of the image size
    :math:`\mathbf{N}` along each axis, in voxels; zero padding. Recorded as ``shift`` ``[B, n]``
    voxels in tensor-axis order. Equals ``torchio.Affine(scales=1, degrees=0,
    translation=shift)`` on 1 mm images with the tensor's spatial axes as TorchIO's (x, y, z)
    (same order and sign; tested).
    """

    name = "geometry.translation"
    suite = "geometry"
    moves_anatomy = True
    modalities = ("any",)
    summary = "Content shifted within the field of view."
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomAffine."
    severities = {
        1: {"fraction": (0.01, 0.02)},
        2: {"fraction": (0.02, 0.04)},
        3: {"fraction": (0.04, 0.06)},
        4: {"fraction": (0.06, 0.09)},
        5: {"fraction": (0.09, 0.12)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        nd = len(shape) - 2
        m = self.draw(rng, severity, "fraction")
        g = rng.normal(nd)
        d = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)
        size = host_constant([float(s) for s in shape[2:]], rng.device)
        return {"fraction": m, "shift": m[:, None] * d * size[None, :]}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return translate(x, params["shift"])

    def apply_to_labels(self, labels: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        eye = torch.eye(labels.ndim - 2, device=labels.device).expand(labels.shape[0], -1, -1)
        return warp_labels(labels, eye, -params["shift"].to(labels.device).float())


class Scale(Perturbation):
    r"""Isotropic zoom in or out about the image centre (magnification, field-of-view change).

    .. math:: y(\mathbf{p}) = x(\mathbf{p}/z), \qquad \log z = s\,m,\; s \sim \mathcal{U}\{-1, +1\},\;
              m \sim \mathcal{U}(m_{lo}, m_{hi})

    with the ``log_scale`` magnitude :math:`m` per severity (0.1 is about 10 %); linear
    interpolation, zero padding. ``torchio.Affine(scales=exp(log_scale), degrees=0,
    translation=0)`` gives the same image (tested).
    """

    name = "geometry.scale"
    suite = "geometry"
    moves_anatomy = True
    modalities = ("any",)
    summary = "Content magnified or shrunk about the image centre."
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomAffine."
    severities = {
        1: {"log_scale": (0.02, 0.05)},
        2: {"log_scale": (0.05, 0.09)},
        3: {"log_scale": (0.09, 0.14)},
        4: {"log_scale": (0.14, 0.20)},
        5: {"log_scale": (0.20, 0.28)},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"log_scale": self.draw_signed(rng, severity, "log_scale")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return zoom(x, params["log_scale"])

    def apply_to_labels(self, labels: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        inv = torch.exp(-params["log_scale"].to(labels.device).float())
        return warp_labels(labels, torch.diag_embed(inv[:, None].expand(labels.shape[0], labels.ndim - 2)))


class FlipLR(Perturbation):
    r"""Left-right flip: a laterality error (image mirrored by a wrong orientation flag or a
    radiological/neurological convention mix-up).

    .. math:: \text{flip} = \mathbb{1}[u < p], \qquad u \sim \mathcal{U}(0, 1),\;
              p = 0.2, 0.4, 0.6, 0.8, 1.0

    A flip has no magnitude, so severity is the ``probability`` :math:`p` that a sample is
    flipped, i.e. the fraction of the test set with the laterality error; the expected change
    (and the expected accuracy loss) grows linearly with severity, and level 5 flips every
    sample. Flips the last spatial axis (image columns: the patient's left-right in a
    conventionally displayed image); flipped samples equal ``torchio.Flip(axes=<that axis>)``.
    """

    name = "geometry.flip_lr"
    suite = "geometry"
    moves_anatomy = True
    modalities = ("any",)
    summary = "Left-right mirror (laterality error) of a fraction of the samples."
    citation = "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomFlip; DICOM PS3.3 C.7.6.1.1.1, Patient Orientation."
    severities = {1: {"probability": 0.2}, 2: {"probability": 0.4}, 3: {"probability": 0.6},
                  4: {"probability": 0.8}, 5: {"probability": 1.0}}

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        p = self.draw(rng, severity, "probability")
        return {"flip": (rng.uniform(1)[:, 0] < p).float()}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return flip_lr(x, params["flip"])

    def apply_to_labels(self, labels: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return _flip_columns(labels, params["flip"])


PERTURBATIONS: list[type[Perturbation]] = [Rotation, Translation, Scale, FlipLR]


@hookimpl
def medaudit_perturbations() -> list[type[Perturbation]]:
    return list(PERTURBATIONS)
