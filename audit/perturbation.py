"""The perturbation contract every suite (built-in or third-party) implements.

A perturbation is split as in TorchIO: :meth:`Perturbation.sample` draws concrete parameters for
every sample of a batch from a per-sample random stream, and :meth:`Perturbation.apply` is a
deterministic, batched function of the image and those parameters. The sampled parameters are
small tensors (``[B]`` or ``[B, k]``), so the exact corruption of any sample can be replayed
and summarised in the results.

Contract (checked by :mod:`medaudit.testing`):

* input ``x`` is ``[B, C, H, W]`` (2D) or ``[B, C, D, H, W]`` (3D), float32/float16/bfloat16,
  intensities scaled to ``[0, 1]`` by the audit's intensity scaling;
* output has the same shape, dtype and device, lies in ``[0, 1]`` and has no NaN/Inf;
* all randomness comes from the :class:`~medaudit.rng.SampleRNG` passed to ``sample``;
* no per-sample Python loops and no host round trips (``.item()``, ``.cpu()``) in either method;
* severity 1..5 are increasingly strong; the parameters of each level are documented in
  ``severities`` (a value, or a ``(low, high)`` range sampled uniformly).
"""

from __future__ import annotations

import contextvars
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from .rng import SampleRNG

SEVERITY_LEVELS = (1, 2, 3, 4, 5)
MODALITIES = ("mri", "ct", "xray", "dermoscopy", "pathology", "generic")

ParamSpec = float | int | tuple[float, float]


class Perturbation(ABC):
    """Base class of a perturbation. Subclasses set the class attributes and two methods.

    Class attributes
    ----------------
    name : str
        Public name ``"<suite>.<what>"``, e.g. ``"mri.motion"``; used in configs, results.json
        scenario ids (``"mri.motion@3"``) and ``--fail-on`` expressions.
    suite : str
        The suite it belongs to (the part of ``name`` before the dot).
    modalities : tuple[str, ...]
        Modalities whose default audit includes it, from :data:`MODALITIES`, or ``("any",)``.
    dims : tuple[int, ...]
        Spatial dimensionalities it supports: ``(2,)``, ``(3,)`` or ``(2, 3)``.
    summary : str
        One sentence saying what it simulates, for catalogues and the report.
    citation : str
        Reference for the physics or the corruption model.
    stress_test : tuple[str, ...]
        Modalities for which it is a stress test rather than a realistic acquisition change
        (``("any",)`` for all), e.g. intensity inversion for MRI. The report still shows its
        results, marked as a stress test, and keeps them apart in the robustness verdict.
    severities : Mapping[int, Mapping[str, ParamSpec]]
        Documented parameters of levels 1..5.
    moves_anatomy : bool
        Whether it moves the anatomy within the field of view (``geometry.*``). A segmentation
        audit then replays the same sampled parameters on the reference label map
        (:meth:`apply_to_labels`), so image and mask stay aligned. Intensity and acquisition
        artifacts — ``mri.motion`` included, whose ghosts and blur are an acquisition effect while
        the reference anatomy stays put — leave it False and never touch the mask.
    """

    name: ClassVar[str]
    suite: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]] = ("any",)
    dims: ClassVar[tuple[int, ...]] = (2, 3)
    summary: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    stress_test: ClassVar[tuple[str, ...]] = ()
    moves_anatomy: ClassVar[bool] = False
    severities: ClassVar[Mapping[int, Mapping[str, ParamSpec]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "__abstractmethods__", None):
            return
        for attr in ("name", "suite", "severities"):
            if not hasattr(cls, attr):
                raise TypeError(f"perturbation class {cls.__qualname__} must define '{attr}'")
        if not cls.name.startswith(cls.suite + "."):
            raise TypeError(f"perturbation name '{cls.name}' must start with its suite '{cls.suite}.'")
        if tuple(sorted(cls.severities)) != SEVERITY_LEVELS:
            raise TypeError(f"perturbation '{cls.name}' must document severities 1..5, has {sorted(cls.severities)}")
        unknown = set(cls.stress_test) - {*MODALITIES, "any"}
        if unknown:
            raise TypeError(f"perturbation '{cls.name}' stress_test names unknown modalities {sorted(unknown)}; "
                            f"use {list(MODALITIES)} or 'any'")
        bad = set(cls.dims) - {2, 3}
        if bad or not cls.dims:
            raise TypeError(f"perturbation '{cls.name}' dims must be a non-empty subset of (2, 3), got {cls.dims}")

    @abstractmethod
    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        """Draw concrete parameters for every sample of a batch of ``shape``.

        Returns a dict of tensors whose first dimension is the batch size, on ``rng.device``.
        Dense random fields (noise) are not returned; return a key (``rng.bits()``) and let
        :meth:`apply` regenerate the field with ``SampleRNG(params["noise_key"])``.
        """

    @abstractmethod
    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """Apply the perturbation with concrete parameters: deterministic and batched."""

    def apply_to_labels(self, labels: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """Replay ``params`` (what :meth:`sample` drew for the image batch) on integer label maps
        ``[B, C, *spatial]`` (int64; ``C`` is 1 for a map of class indices, K for one 0/1 map per
        structure), moving them exactly as :meth:`apply` moved the images but with
        nearest-neighbour resampling, every channel alike; outside the field of view is label 0.

        Only called for a perturbation that :attr:`moves_anatomy`; the default refuses, so a
        geometric third-party perturbation without a label replay is left out of a segmentation
        audit (with a warning) rather than scored against a mask it has moved away from.
        """
        raise NotImplementedError(f"perturbation '{self.name}' moves the anatomy but does not implement "
                                  "apply_to_labels, so reference masks cannot follow it")

    @classmethod
    def replays_labels(cls) -> bool:
        """Whether a segmentation audit can score this perturbation: it leaves the anatomy in place,
        or it moves it and implements :meth:`apply_to_labels`."""
        return not cls.moves_anatomy or cls.apply_to_labels is not Perturbation.apply_to_labels

    def __call__(self, x: Tensor, severity: int, rng: SampleRNG) -> tuple[Tensor, dict[str, Tensor]]:
        """Sample and apply; returns ``(perturbed, params)``. Severity 0 is the identity."""
        check_severity(self.name, severity)
        if severity == 0:
            return x, {}
        params = self.sample(severity, rng, x.shape)
        return self.apply(x, params), params

    # --- helpers for subclasses -------------------------------------------------------------
    @classmethod
    def spec(cls, severity: int, param: str) -> ParamSpec:
        """The documented value or range of ``param`` at ``severity``."""
        check_severity(cls.name, severity)
        return cls.severities[severity][param]

    @classmethod
    def draw(cls, rng: SampleRNG, severity: int, param: str) -> Tensor:
        """Draw ``param`` for each sample: uniform in its range, or its constant value (``[B]``)."""
        spec = cls.spec(severity, param)
        if isinstance(spec, tuple):
            return rng.uniform(1, low=spec[0], high=spec[1])[:, 0]
        return torch.full((rng.batch_size,), float(spec), device=rng.device)

    @classmethod
    def draw_signed(cls, rng: SampleRNG, severity: int, param: str, *shape: int) -> Tensor:
        """Draw ``param``'s magnitude from its severity range, then a fair random sign per value.

        Parameters
        ----------
        rng : SampleRNG
            The per-sample stream given to :meth:`sample`.
        severity : int
            Level 1..5 whose documented value or ``(low, high)`` range gives the magnitude.
        param : str
            A key of ``severities[severity]``.
        *shape : int
            Extra dimensions: one independent signed draw per entry (e.g. ``k`` streak amplitudes).

        Returns
        -------
        Tensor
            float32 ``[B, *shape]`` on ``rng.device``.

        Drawing the magnitude from the documented range (instead of ``U(-high, high)``) keeps
        every draw of a severity stronger than every draw of the level below it, in either
        direction. A range takes one uniform per value, then one more for the sign; a constant
        takes only the sign's, as :meth:`draw` takes none for it.
        """
        spec = cls.spec(severity, param)
        if isinstance(spec, tuple):
            magnitude = rng.uniform(*shape, low=spec[0], high=spec[1])
        else:
            magnitude = torch.full((rng.batch_size, *shape), float(spec), device=rng.device)
        sign = torch.where(rng.uniform(*shape) < 0.5, -1.0, 1.0)
        return magnitude * sign

    @staticmethod
    def spatial_dims(x: Tensor) -> int:
        """2 for ``[B, C, H, W]``, 3 for ``[B, C, D, H, W]``."""
        if x.ndim not in (4, 5):
            raise ValueError(f"expected a [B, C, H, W] or [B, C, D, H, W] batch, got shape {tuple(x.shape)}")
        return x.ndim - 2

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """A JSON-ready description for catalogues, ``medaudit perturbations`` and the report."""
        return {
            "name": cls.name,
            "suite": cls.suite,
            "modalities": list(cls.modalities),
            "dims": list(cls.dims),
            "summary": cls.summary,
            "citation": cls.citation,
            "stress_test": list(cls.stress_test),
            "moves_anatomy": cls.moves_anatomy,
            "severities": {
                str(level): {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
                for level, params in sorted(cls.severities.items())
            },
        }


def is_stress_test(stress_test: Sequence[str], modality: str) -> bool:
    """Whether a perturbation declaring ``stress_test`` (its catalogue entry's list) is a stress
    test for ``modality``."""
    return "any" in stress_test or modality.lower() in stress_test


def check_severity(name: str, severity: int) -> None:
    if severity not in (0, *SEVERITY_LEVELS):
        raise ValueError(f"severity of '{name}' must be an integer 0..5, got {severity!r}")


_LAYOUTS = {2: "[B, C, H, W]", 3: "[B, C, D, H, W]"}


def check_input(name: str, dims: tuple[int, ...], x: Tensor) -> int:
    """Check that ``apply``'s image ``x`` is a batch of a dimensionality in ``dims``.

    Parameters
    ----------
    name : str
        The perturbation (or functional op) named in the error.
    dims : tuple[int, ...]
        The supported spatial dimensionalities, usually the class's ``dims``.
    x : Tensor
        The image batch, ``[B, C, H, W]`` (2) or ``[B, C, D, H, W]`` (3).

    Returns
    -------
    int
        The number of spatial dimensions of ``x``. Raises ValueError naming ``name``, the
        layout it needs and the shape it got otherwise.
    """
    nd = x.ndim - 2
    if nd not in dims:
        want = " or ".join(_LAYOUTS[d] for d in dims)
        raise ValueError(f"{name}: x must be {want}, got x of shape {tuple(x.shape)} "
                         f"('{name}' supports {dims}-D batches only, got a {nd}-D batch)")
    return nd


def check_shape(name: str, dims: tuple[int, ...], rng: SampleRNG, shape: Sequence[int]) -> int:
    """Check ``sample``'s arguments: ``shape`` is a batch of a dimensionality in ``dims`` whose
    size is ``rng``'s.

    Parameters
    ----------
    name : str
        The perturbation named in the error.
    dims : tuple[int, ...]
        The supported spatial dimensionalities, usually the class's ``dims``.
    rng : SampleRNG
        The stream given to ``sample``; one key per sample.
    shape : Sequence[int]
        The batch shape given to ``sample``, ``[B, C, H, W]`` or ``[B, C, D, H, W]``.

    Returns
    -------
    int
        The number of spatial dimensions. Raises ValueError naming ``name`` and the mismatch.
    """
    nd = len(shape) - 2
    if nd not in dims:
        want = " or ".join(_LAYOUTS[d] for d in dims)
        raise ValueError(f"{name}: shape must be {want}, got shape={tuple(shape)}")
    if rng.batch_size != shape[0]:
        raise ValueError(f"{name}: rng has batch size {rng.batch_size} but shape[0]={shape[0]}")
    return nd


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample ``[B]`` parameter to broadcast against ``x`` ``[B, ...]``."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def batch_param(value: float | Tensor, name: str, x: Tensor, low: float | None = None,
                high: float | None = None) -> Tensor:
    """A per-sample parameter of a functional op, from a number or a per-sample tensor.

    Parameters
    ----------
    value : float or Tensor
        One number for the whole batch, or a tensor ``[B]`` (e.g. ``params["sigma"]``).
    name : str
        The parameter's name, used in errors.
    x : Tensor
        The image batch ``[B, C, H, W]`` or ``[B, C, D, H, W]`` (checked first, so every op
        using this rejects other shapes).
    low, high : float, optional
        The valid range of a Python number (inclusive; None is unbounded).

    Returns
    -------
    Tensor
        float32 ``[B]`` on ``x.device``.

    Python numbers are validated against ``[low, high]`` (the error names ``name`` and the
    value). Tensors are only checked for shape: checking their values would need a host round
    trip, so the functional ops clamp tensor parameters into their valid range instead.
    """
    Perturbation.spatial_dims(x)
    batch = x.shape[0]
    if isinstance(value, Tensor):
        if value.ndim != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a number or a tensor of shape [{batch}], got shape {tuple(value.shape)}")
        return value.to(device=x.device, dtype=torch.float32)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {value!r}")
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return torch.full((batch,), float(value), device=x.device)


def finish(x: Tensor, like: Tensor) -> Tensor:
    """Clamp to ``[0, 1]``, replace non-finite values, and restore the input dtype."""
    return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0).to(like.dtype)


def finish_(y: Tensor, like: Tensor) -> Tensor:
    """:func:`finish` in place on a float32 ``y`` the caller owns (a fresh result of its own ops).

    Parameters
    ----------
    y : Tensor
        float32, any shape; overwritten.
    like : Tensor
        The perturbation's input, whose dtype the result takes.

    Returns
    -------
    Tensor
        ``y`` clamped to ``[0, 1]`` with NaN -> 0, +Inf -> 1, -Inf -> 0, in ``like.dtype``: the
        same values as ``finish(y, like)``, with one full-size temporary fewer (``finish`` copies
        in ``nan_to_num``); on a 3D batch that copy is a pass over memory plus fresh-page faults.
        Never pass the input ``x`` itself: it would be modified.
    """
    return y.nan_to_num_(nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0).to(like.dtype)


#: Voxels per block in :func:`in_blocks`: one 128³ volume, or 32 images of 256².
BLOCK_VOXELS = 128**3


def in_blocks(apply: Callable[[Tensor, Mapping[str, Tensor]], Tensor], x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """``apply(x, params)`` on a CPU batch in blocks of about :data:`BLOCK_VOXELS` voxels.

    For perturbations whose intermediates are several times the batch (K motion states and
    their spectra): on the CPU a tensor of more than 32 MB is a fresh ``mmap`` each time, whose
    page faults cost more than the arithmetic on it (measured: 8 volumes of 128³ at once took
    2.3x as long per volume as one). Blocks keep the intermediates small enough to be reused from
    the heap. ``apply`` must be batch-invariant (every perturbation is), so blocking does not
    change any value; other devices get the whole batch.
    """
    step = max(1, BLOCK_VOXELS // max(math.prod(x.shape[1:]), 1))
    if x.device.type != "cpu" or len(x) <= step:
        return apply(x, params)
    return torch.cat([apply(x[i:i + step], {k: v[i:i + step] for k, v in params.items()}) for i in range(0, len(x), step)])


_HOST_READS = contextvars.ContextVar("medaudit_host_reads", default=True)


def host_readable(t: Tensor) -> bool:
    """Whether reading ``t``'s values costs no synchronisation: it is a CPU tensor.

    A perturbation may read such values to skip work on the CPU (``mri.motion`` picks the
    samples of each phase-encode axis) where on an accelerator it must stay data-independent.
    Inside :func:`accelerator_paths` this is False for every tensor.
    """
    return t.device.type == "cpu" and _HOST_READS.get()


@contextmanager
def accelerator_paths() -> Iterator[None]:
    """Make :func:`host_readable` False, so CPU tensors take the code path accelerators take.

    The conformance kit's host-sync check runs inside it, so that it checks on a CPU the path
    that would stall a GPU; tests use it to compare both paths.
    """
    token = _HOST_READS.set(False)
    try:
        yield
    finally:
        _HOST_READS.reset(token)


def host_constant(values: Any, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """A small constant tensor (sizes, matrices from Python numbers) on ``device``, without a sync.

    ``torch.tensor(values, device="cuda")`` copies from pageable host memory with a blocking
    copy, which waits for all the work queued on the GPU: once per batch in a perturbation it
    stalls the pipeline. A non-blocking copy stages the bytes and returns at once.
    """
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
