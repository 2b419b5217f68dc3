"""``mri.bias_field``: smooth multiplicative intensity non-uniformity (a polynomial log-field)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from medaudit.perturbation import Perturbation, check_input, check_shape, finish, host_constant
from medaudit.rng import SampleRNG


def monomial_exponents(order: int, nd: int) -> list[tuple[int, ...]]:
    """Exponents of the monomials of total degree <= ``order``, in TorchIO's coefficient order."""
    if nd == 2:
        return [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    return [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]


def _contract(t: Tensor, basis: Tensor, dim: int) -> Tensor:
    """Replace axis ``dim`` of ``t`` (size ``P``) by ``sum_p t[..., p, ...] * basis[p]`` (``basis`` ``[P, N]``).

    An explicit sum of broadcast products rather than ``einsum``: a GEMM's blocking depends on
    the batch size, which would make a sample's field depend on its batch in the last bit.
    """
    view = [1] * t.ndim
    view[dim] = basis.shape[1]
    out = t.narrow(dim, 0, 1) * basis[0].reshape(view)
    for p in range(1, basis.shape[0]):
        out = out + t.narrow(dim, p, 1) * basis[p].reshape(view)
    return out


def _order_of(num_coefficients: int, nd: int) -> int:
    for order in range(16):
        if len(monomial_exponents(order, nd)) == num_coefficients:
            return order
    raise ValueError(f"coefficients: {num_coefficients} is not the number of {nd}D monomials of any order < 16")


class BiasField(Perturbation):
    r"""Smooth multiplicative intensity non-uniformity from the receive coil (TorchIO ``BiasField``).

    Coil sensitivity makes intensity drift smoothly across the field of view. The log-field is a
    polynomial of total degree :math:`\le` ``order`` in coordinates normalised to :math:`[-1,1]`
    per axis (Van Leemput et al. 1999):

    .. math::
        y = x\,\exp\Big(\sum_{i+j(+l)\le O} c_{ij(l)}\, u^i v^j (w^l)\Big),\quad
        c = s\,m,\ s\sim\mathcal{U}\{-1,1\},\ m\sim\mathcal{U}(\text{coefficients})

    (the constant term scales the whole image). All coefficients zero is the identity.

    TorchIO mapping: ``BiasField(coefficients=c, order=O)`` gives the same field
    (:meth:`field`) for the same coefficients, in TorchIO's order (``monomial_exponents``; for
    2D pass TorchIO the 3D list with our values at the ``l = 0`` terms); ``RandomBiasField``
    draws :math:`c\sim\mathcal{U}(-a, a)` where we draw signed magnitudes.

    The field is a separable contraction (one axis at a time), so it costs :math:`O+1`
    full-volume multiply-adds instead of one full-volume power product per monomial; it is several times
    faster than TorchIO's NumPy loop (tested).
    """

    name = "mri.bias_field"
    suite = "mri"
    modalities = ("mri",)
    dims = (2, 3)
    summary = "Smooth multiplicative intensity non-uniformity (coil sensitivity)."
    citation = (
        "Van Leemput et al., IEEE Trans. Med. Imaging 18 (1999) 897-908; Sudre et al., MICCAI 2017; "
        "Pérez-García et al., TorchIO, Comput. Methods Programs Biomed. 208 (2021), RandomBiasField."
    )
    severities = {
        1: {"coefficients": (0.03, 0.06), "order": 3},
        2: {"coefficients": (0.06, 0.11), "order": 3},
        3: {"coefficients": (0.11, 0.17), "order": 3},
        4: {"coefficients": (0.17, 0.25), "order": 3},
        5: {"coefficients": (0.25, 0.35), "order": 3},
    }

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        nd = check_shape(self.name, self.dims, rng, shape)
        order = int(self.spec(severity, "order"))
        count = len(monomial_exponents(order, nd))
        return {"coefficients": self.draw_signed(rng, severity, "coefficients", count)}

    @staticmethod
    def field(coefficients: Tensor, spatial_shape: Sequence[int]) -> Tensor:
        """The multiplicative field ``[B, *spatial_shape]`` (float32) for coefficients ``[B, M]``."""
        nd = len(spatial_shape)
        if nd not in (2, 3) or coefficients.ndim != 2:
            raise ValueError(
                f"field: needs coefficients [B, M] and a 2D/3D spatial_shape, got coefficients of shape "
                f"{tuple(coefficients.shape)} and spatial_shape={tuple(spatial_shape)}"
            )
        order = _order_of(coefficients.shape[1], nd)
        device = coefficients.device
        exps = host_constant(monomial_exponents(order, nd), device, torch.int64)  # [M, nd]
        flat = (exps * host_constant([(order + 1) ** (nd - 1 - a) for a in range(nd)], device, torch.int64)).sum(-1)
        grid = torch.zeros(coefficients.shape[0], (order + 1) ** nd, device=device)
        grid[:, flat] = coefficients.to(torch.float32)
        coef = grid.reshape(-1, *([order + 1] * nd))  # c[b, i, j(, l)], zero above the total degree
        powers = torch.arange(order + 1, device=device, dtype=torch.float32)[:, None]
        # TorchIO's grid: cell centres normalised so the outermost ones sit at -1 and 1 (0 for N = 1).
        axes = [
            torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)
            for n in spatial_shape
        ]
        log_field = coef
        for a in reversed(range(nd)):  # contract one axis at a time: i/j/l power -> voxel
            log_field = _contract(log_field, axes[a][None, :] ** powers, 1 + a)  # 0**0 = 1 as NumPy
        return torch.exp(log_field)

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        check_input(self.name, self.dims, x)
        field = self.field(params["coefficients"].to(x.device), tuple(x.shape[2:]))
        return finish(x.float() * field[:, None], x)
