"""``mri.motion``: rigid motion between k-space segments."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from medaudit.perturbation import Perturbation, check_input, check_shape, finish, host_constant, in_blocks
from medaudit.resample import affine_grid, two_pass_resample
from medaudit.rng import SampleRNG

from .phase_encode import draw_axis, per_pe_axis


def _rotation(degrees: Tensor, nd: int) -> Tensor:
    """Rotation matrices ``[..., nd, nd]`` in grid-coordinate order (x=W, y=H[, z=D]).

    2D: one in-plane angle. 3D: Euler angles about x, y, z, composed ``Rz @ Ry @ Rx``.
    """
    rad = torch.deg2rad(degrees)
    eye = torch.eye(nd, device=degrees.device).expand(*degrees.shape[:-1], nd, nd)
    planes = [(0, 1)] if nd == 2 else [(1, 2), (2, 0), (0, 1)]  # planes rotated by each angle
    rot = eye
    for n, (i, j) in enumerate(planes):
        c, s = torch.cos(rad[..., n]), torch.sin(rad[..., n])
        r = eye.clone()
        r[..., i, i] = c
        r[..., j, j] = c
        r[..., i, j] = -s
        r[..., j, i] = s
        rot = r @ rot
    return rot


class Motion(Perturbation):
    r"""Rigid head motion during the acquisition (Shaw et al. 2019; TorchIO ``RandomMotion``).

    The object takes :math:`K+1` rigid positions during the scan. Position :math:`j` is
    acquired for the k-space lines (along the phase-encode axis, in acquisition order
    :math:`-k_{max} \to k_{max}`) between times :math:`t_j` and :math:`t_{j+1}`, so the
    recorded k-space is a patchwork of the spectra of :math:`K+1` rigidly transformed images
    (:math:`t_0=0,\ t_{K+1}=1`). The segment holding the k-space centre is given the unmoved
    image, so the artifact is ghosting/blurring rather than a global shift.

    .. math::
        \theta_{k,a} = s\,m,\ s\sim\mathcal{U}\{-1,1\},\ m\sim\mathcal{U}(\text{degrees});\quad
        \tau_{k,a} = s'\,m',\ m'\sim\mathcal{U}(\text{translation});\quad
        t_k = \tfrac{k}{K+1} + \mathcal{U}\!\left(-\tfrac{0.3}{K+1}, \tfrac{0.3}{K+1}\right)

    for :math:`k=1..K` (``num_moves``), one in-plane angle in 2D and three Euler angles in 3D,
    translations as a fraction of the field of view per spatial axis; the phase-encode axis is
    uniform over the spatial axes. Rotations are about the image centre; voxels moved in from
    outside the field of view are 0.

    TorchIO mapping: ``Motion(degrees=θ, translation=τ·N mm at 1 mm spacing, times=t)`` with
    segments along TorchIO's last axis equals ``pe_axis = nd - 1`` here (TorchIO 2D images have a
    singleton last axis, so its 2D motion degenerates to one rigid transform; compare in 3D).

    Severity mostly grows through :math:`K`: the unmoved centre segment spans :math:`1/(K+1)`
    of k-space, so more moves corrupt lower frequencies (angles beyond a few degrees saturate
    the damage to the segments they touch).

    Resampling is linear with zero padding: bilinear in 2D; in 3D two passes of 2-D bilinear
    sampling (:func:`medaudit.resample.two_pass_resample`), which differ from trilinear
    interpolation by interpolation error only and run about 2.5x faster on a CPU. Since the
    k-space patchwork varies along the phase-encode axis only, the spectra are 1-D transforms
    along that axis (:func:`_motion_kspace`), equal to the n-D construction up to float rounding.

    .. note:: Cost is :math:`K` resamplings plus :math:`K+1` 1-D FFTs per sample and memory
        :math:`(K+1)\times` the batch: at severity 5 (:math:`K=10`) about 10x ``mri.ghosting``.
    """

    name = "mri.motion"
    suite = "mri"
    modalities = ("mri",)
    dims = (2, 3)
    summary = "Rigid patient motion between k-space segments: ghosts and blurring along the phase-encode axis."
    citation = (
        "Shaw et al., MRI k-space motion artefact augmentation, MIDL 2019 (PMLR 102:427-436); "
        "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomMotion."
    )
    severities = {
        1: {"degrees": (0.5, 1.5), "translation": (0.005, 0.01), "num_moves": 2},
        2: {"degrees": (1.5, 3.0), "translation": (0.01, 0.02), "num_moves": 4},
        3: {"degrees": (3.0, 5.0), "translation": (0.02, 0.035), "num_moves": 6},
        4: {"degrees": (5.0, 8.0), "translation": (0.035, 0.05), "num_moves": 8},
        5: {"degrees": (8.0, 12.0), "translation": (0.05, 0.07), "num_moves": 10},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        nd = check_shape(self.name, self.dims, rng, shape)
        k = int(self.spec(severity, "num_moves"))
        step = 1.0 / (k + 1)
        degrees = self.draw_signed(rng, severity, "degrees", k, 1 if nd == 2 else 3)
        translation = self.draw_signed(rng, severity, "translation", k, nd)
        base = torch.arange(1, k + 1, device=rng.device, dtype=torch.float32) * step
        times = base + rng.uniform(k, low=-0.3 * step, high=0.3 * step)
        return {"degrees": degrees, "translation": translation, "times": times, "pe_axis": draw_axis(rng, nd)}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return in_blocks(self._apply, x, params)

    def _apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        nd = check_input(self.name, self.dims, x)
        xf = x.float()
        b, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
        degrees = params["degrees"].to(torch.float32)
        k = degrees.shape[1]

        # affine_grid works in normalised coordinates ordered (W, H[, D]); conjugating by the
        # half-size scaling keeps rotations rigid on non-square grids.
        half = host_constant(list(spatial[::-1]), x.device) / 2
        rot = _rotation(degrees, nd)
        linear = rot * half[None, :] / half[:, None]  # S^-1 R S
        shift = 2.0 * params["translation"].to(torch.float32).flip(-1)  # fraction of FOV -> [-1, 1] units
        theta = torch.cat([linear, shift[..., None]], dim=-1)  # [B, K, nd, nd + 1]
        # Position 0 (unmoved) and the K moved positions in one buffer, so one transform covers all.
        states = torch.empty(k + 1, b, c, *spatial, device=x.device)
        states[0] = xf
        if nd == 3:
            two_pass_resample(xf, theta, out=states[1:])
        else:
            # The K grids of a sample are stacked along the first spatial axis, so one
            # grid_sample reads the unrepeated input instead of K copies of it.
            grid = affine_grid(theta.reshape(b * k, nd, nd + 1), [b * k, c, *spatial])
            grid = grid.reshape(b, k * spatial[0], *spatial[1:], nd)
            moved = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            states[1:] = moved.reshape(b, c, k, *spatial).permute(2, 0, 1, *range(3, 3 + nd))
        times = params["times"].to(torch.float32)

        def patchwork(idx: Tensor | None, axis: int) -> Tensor:
            if idx is None:
                return _motion_kspace(states, times, axis)
            return _motion_kspace(states[:, idx], times[idx], axis)

        return finish(per_pe_axis(params["pe_axis"], nd, patchwork), x)


def _motion_lines(times: Tensor, size: int) -> Tensor:
    """The position (0 = unmoved) acquiring each line of a ``size``-line axis, ``[B, size]``.

    Lines are in uncentred FFT order: index ``u`` sits at centred position ``(u + N//2) mod N``,
    acquired from ``-k_max`` to ``k_max``; segment ``j`` spans the centred positions between
    ``N t_j`` and ``N t_{j+1}``, and the segment holding the centre swaps states with segment 0.
    """
    centred = (torch.arange(size, device=times.device) + size // 2) % size
    bounds = torch.floor(size * times)  # [B, K]
    segment = (centred[None, :, None] >= bounds[:, None, :]).sum(-1)  # [B, N]
    centre = (size // 2 >= bounds).sum(-1, keepdim=True)  # [B, 1]
    return torch.where(segment == centre, 0, torch.where(segment == 0, centre, segment))


def _motion_kspace(states: Tensor, times: Tensor, axis: int) -> Tensor:
    """Real part of the image whose k-space lines along ``axis`` come from the positions' spectra.

    ``states`` ``[K+1, B, C, *S]`` holds the unmoved image (position 0) and the moved ones. The
    patchwork of n-D spectra only varies along the phase-encode axis, so the DFTs along the other
    axes cancel against the inverse: 1-D transforms along ``axis`` give the same image for a third
    of the work. The real part of an inverse DFT is the inverse of the spectrum's Hermitian part,
    ``(K[u] + conj K[-u]) / 2``, and for spectra of real images ``conj X[-u] = X[u]``, so the
    half spectrum of a real-to-complex transform holds everything:
    ``K_h[u] = (X_{s(u)}[u] + X_{s(-u)}[u]) / 2`` for ``u <= N/2``, inverted by ``irfft``. (The
    1-D ``irfft`` is batch-invariant; torch's n-D ``irfftn`` is not.)
    """
    b, nd = states.shape[1], states.ndim - 3
    dim = 3 + axis
    size = states.shape[dim]
    spectra = torch.fft.rfft(states, dim=dim)  # [K+1, B, C, ..., N//2 + 1, ...]
    lines = _motion_lines(times, size)
    u = torch.arange(size // 2 + 1, device=states.device)
    view = [1, b, 1] + [1] * nd
    view[dim] = len(u)
    shape = [1, *spectra.shape[1:]]
    positive = torch.gather(spectra, 0, lines[:, u].reshape(view).expand(shape))
    hermitian = positive.add_(torch.gather(spectra, 0, lines[:, (-u) % size].reshape(view).expand(shape))).mul_(0.5)
    return torch.fft.irfft(hermitian[0], n=size, dim=dim - 1)
