"""The plugin conformance kit: contract checks for perturbations, metrics, detectors and loaders.

Modelled on scikit-learn's estimator checks: every ``check_*`` function tests one clause of a
contract and raises ``AssertionError`` (failed) or :class:`SkipCheck` (not applicable); which
checks apply to an object is decided by :func:`yield_checks` from what the object declares
(a perturbation's ``dims``, a metric's ``tasks``, a detector's ``needs``). Use it either way::

    from medaudit.testing import check_plugin_object, parametrize_with_checks

    check_plugin_object(MyPerturbation).assert_ok()          # one report, all checks

    @parametrize_with_checks([MyPerturbation, MyMetric()])   # one pytest test per check
    def test_conformance(obj, check):
        check(obj)

Per-object options (real images for the severity check, the tasks a metric is checked on,
metric keys allowed to be NaN, expected failures) are given by wrapping the object with
:func:`subject`. Expected failures are declared with a reason, ``xfail={"check_name": "why"}``;
a key is a check's base name (all its variants) or its full name (``"check_x[3d]"``).

Sizes are small so the whole catalogue is checked in seconds: 2D images are 32×32 and 3D volumes
16³. A perturbation that needs larger inputs declares ``min_spatial_size: int`` (the smallest
edge length it supports) and is checked at that size instead.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import json
import math
import tempfile
import traceback
import unittest
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .config import Config
from .data import AuditDataset
from .detector import Detector
from .errors import DataError
from .metric import Metric, MetricContext
from .perturbation import MODALITIES, SEVERITY_LEVELS, Perturbation, accelerator_paths
from .rng import SampleRNG, sample_keys, stream_key
from .sections import ReportSection

__all__ = [
    "CheckRecord", "CheckReport", "DatasetLoader", "SkipCheck", "Subject", "check_plugin_object",
    "parametrize_with_checks", "phantom", "render_section", "subject", "yield_checks",
]

Status = Literal["passed", "failed", "skipped", "xfailed", "xpassed"]

#: Edge length of the synthetic images: 2D images are 32×32, 3D volumes 16³.
DEFAULT_SIZE = {2: 32, 3: 16}
#: Dtypes a perturbation must accept and return unchanged.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TASKS = ("binary", "multiclass", "multilabel")


class SkipCheck(unittest.SkipTest):
    """Raised by a check that does not apply; pytest reports a ``unittest.SkipTest`` as skipped."""


# ---------------------------------------------------------------------------------------------
# What is checked, and with which options
# ---------------------------------------------------------------------------------------------


@dataclass
class DatasetLoader:
    """A ``medaudit_open_dataset`` implementation plus factories that write files in its format.

    ``write_valid(folder)`` writes a small valid dataset into ``folder`` and returns its path.
    ``write_truncated`` and ``write_garbage`` default to the valid file cut to half its bytes and
    to random bytes under the valid file's name; pass your own for folder-based formats.
    """

    open: Callable[[Path, Config], AuditDataset | None]
    write_valid: Callable[[Path], Path]
    name: str = ""
    config: Config = field(default_factory=Config)
    write_truncated: Callable[[Path], Path] | None = None
    write_garbage: Callable[[Path], Path] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            self.name = getattr(self.open, "__module__", "loader") + "." + getattr(self.open, "__name__", "open")


@dataclass
class Subject:
    """An object to check plus the options of its checks (see :func:`subject`)."""

    obj: Any
    name: str = ""
    xfail: Mapping[str, str] = field(default_factory=dict)
    device: str = "cpu"
    images: Mapping[int, Tensor] | None = None
    tasks: tuple[str, ...] | None = None
    nan_keys: tuple[str, ...] = ()
    monotone_rtol: float = 0.02
    feature_shape: tuple[int, ...] = (8, 2, 2)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = object_name(self.obj)


def subject(obj: Any, **options: Any) -> Subject:
    """Wrap ``obj`` with check options.

    :param xfail: ``{check name: reason}`` of checks expected to fail.
    :param device: where tensors are created (``"cpu"``, ``"cuda"``): every check runs there.
    :param images: perturbations: real images ``{2: [B, C, H, W], 3: [B, C, D, H, W]}`` in ``[0, 1]``
        used, besides the phantom, by the severity check.
    :param tasks: metrics: tasks to check (default: the metric's ``tasks``).
    :param nan_keys: metrics: result keys (fnmatch patterns) documented to be NaN when a class is
        absent; extends the metric's own ``nan_keys`` attribute.
    :param monotone_rtol: perturbations: relative slack of the severity-monotonicity check.
    :param feature_shape: detectors: per-sample shape of the synthetic feature map.
    """
    if isinstance(obj, Subject):
        raise TypeError("subject() was given a Subject; pass the plain object")
    return Subject(obj, **options)


def object_name(obj: Any) -> str:
    if isinstance(obj, Subject):
        return obj.name
    if isinstance(obj, DatasetLoader):
        return obj.name
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(obj, "__qualname__", type(obj).__qualname__)


def _kind(obj: Any) -> str:
    if isinstance(obj, type) and issubclass(obj, Perturbation):
        return "perturbation"
    if isinstance(obj, Perturbation):
        return "perturbation"
    if isinstance(obj, Metric):
        return "metric"
    if isinstance(obj, Detector):
        return "detector"
    if isinstance(obj, DatasetLoader):
        return "loader"
    raise TypeError(
        f"medaudit.testing cannot check {obj!r}: expected a Perturbation subclass, a Metric or Detector "
        "instance, or a medaudit.testing.DatasetLoader")


# ---------------------------------------------------------------------------------------------
# Records and reports
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckRecord:
    """The outcome of one check on one object."""

    check: str
    object: str
    status: Status
    reason: str = ""
    exception: BaseException | None = None


@dataclass
class CheckReport:
    """Every check record of one object; ``str()`` is a table of what did not pass."""

    object: str
    records: list[CheckRecord] = field(default_factory=list)

    @property
    def failed(self) -> list[CheckRecord]:
        # an expected failure that passes is reported too: the xfail declaration is stale
        return [r for r in self.records if r.status in ("failed", "xpassed")]

    @property
    def ok(self) -> bool:
        return not self.failed

    def status_of(self, check: str) -> Status:
        """Status of the check named ``check`` (full or base name; all variants must agree)."""
        found = {r.status for r in self.records if r.check == check or _base(r.check) == check}
        if not found:
            raise KeyError(f"no check named {check!r} ran on {self.object}")
        for status in ("failed", "xpassed", "xfailed", "passed", "skipped"):
            if status in found:
                return status  # type: ignore[return-value]
        raise AssertionError("unreachable")

    def __str__(self) -> str:
        counts = {s: sum(r.status == s for r in self.records) for s in ("passed", "failed", "skipped", "xfailed", "xpassed")}
        head = f"{self.object}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        shown = [r for r in self.records if r.status != "passed"]
        if not shown:
            return head
        width = max(len(r.check) for r in shown)
        lines = [head, f"  {'check':<{width}}  status   reason"]
        for r in shown:
            reason = " ".join(r.reason.split())
            lines.append(f"  {r.check:<{width}}  {r.status:<7}  {reason[:300]}")
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` with the table of failures unless every check passed or was skipped."""
        if not self.ok:
            raise AssertionError(str(self))


def _base(check_name: str) -> str:
    return check_name.split("[", 1)[0]


def _xfail_reason(xfail: Mapping[str, str], check_name: str) -> str | None:
    return xfail.get(check_name, xfail.get(_base(check_name)))


# ---------------------------------------------------------------------------------------------
# Check generation and running
# ---------------------------------------------------------------------------------------------


class Check:
    """A check bound to its options: call it with the object (``check(obj)``)."""

    def __init__(self, func: Callable[..., None], variant: str = "", **kwargs: Any) -> None:
        self.func = func
        self.kwargs = kwargs
        self.name = func.__name__ + (f"[{variant}]" if variant else "")
        functools.update_wrapper(self, func)

    def __call__(self, obj: Any) -> None:
        self.func(obj.obj if isinstance(obj, Subject) else obj, **self.kwargs)

    def __repr__(self) -> str:
        return self.name


def yield_checks(obj: Any) -> Iterator[Check]:
    """The checks that apply to ``obj`` (or a :class:`Subject`), chosen from what it declares."""
    sub = obj if isinstance(obj, Subject) else Subject(obj)
    kind = _kind(sub.obj)
    if kind == "perturbation":
        yield from _perturbation_checks(sub)
    elif kind == "metric":
        yield from _metric_checks(sub)
    elif kind == "detector":
        yield from _detector_checks(sub)
    else:
        yield from _loader_checks(sub)


def check_plugin_object(obj: Any, *, xfail: Mapping[str, str] | None = None, **options: Any) -> CheckReport:
    """Run every applicable check on ``obj`` and return the :class:`CheckReport`.

    ``options`` are those of :func:`subject`; ``obj`` may also be a :class:`Subject` already.
    """
    sub = obj if isinstance(obj, Subject) else Subject(obj, **options)
    if xfail:
        sub.xfail = {**sub.xfail, **xfail}
    report = CheckReport(sub.name)
    for check in yield_checks(sub):
        expected = _xfail_reason(sub.xfail, check.name)
        try:
            check(sub)
        except SkipCheck as exc:
            report.records.append(CheckRecord(check.name, sub.name, "skipped", str(exc)))
        except Exception as exc:  # noqa: BLE001 - any error in a check is that check's failure
            reason = _describe_exception(exc)
            status: Status = "xfailed" if expected is not None else "failed"
            if expected is not None:
                reason = f"expected: {expected} ({reason})"
            report.records.append(CheckRecord(check.name, sub.name, status, reason, exc))
        else:
            if expected is not None:
                report.records.append(CheckRecord(check.name, sub.name, "xpassed",
                                                  f"declared as expected to fail ({expected}) but passed"))
            else:
                report.records.append(CheckRecord(check.name, sub.name, "passed"))
    return report


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, AssertionError):
        return str(exc) or "assertion failed"
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def parametrize_with_checks(objects: Iterable[Any], *, xfail: Mapping[str, str] | None = None) -> Any:
    """A ``pytest.mark.parametrize`` over ``(obj, check)``: one test id per object and check.

    Ids are ``"<object name>-<check name>"`` so ``pytest -k`` selects a check. Checks declared in
    ``xfail`` (here, for every object, or per object with :func:`subject`) are marked
    ``xfail(strict=True)`` with their reason, so a stale declaration is noticed. Use as::

        @parametrize_with_checks([MyPerturbation, subject(MyMetric(), tasks=("binary",))])
        def test_conformance(obj, check):
            check(obj)
    """
    import pytest  # only needed here: the rest of the kit works without pytest

    params = []
    for obj in objects:
        sub = obj if isinstance(obj, Subject) else Subject(obj)
        declared = {**(xfail or {}), **sub.xfail}
        for check in yield_checks(sub):
            reason = _xfail_reason(declared, check.name)
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason is not None else []
            params.append(pytest.param(sub, check, id=f"{sub.name}-{check.name}", marks=marks))
    return pytest.mark.parametrize("obj, check", params)


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------


def phantom(batch: int, dims: int, size: int | None = None, channels: int = 1, seed: int = 0,
            device: str | torch.device = "cpu") -> Tensor:
    """Smooth, asymmetric synthetic images in ``[0, 1]``: ``[B, C, H, W]`` or ``[B, C, D, H, W]``.

    A soft-edged ellipse/ellipsoid ("body") with two off-centre blobs and a gentle gradient; each
    sample has its own blob positions and contrasts. Asymmetric so that flips and rotations
    change it; smooth so that resampling does not create large interpolation differences; its own
    ``torch.Generator`` keeps the global RNG untouched.
    """
    size = size or DEFAULT_SIZE[dims]
    gen = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1.0, 1.0, size)] * dims, indexing="ij")
    grid = torch.stack(axes)  # [dims, *spatial]
    out = []
    for _ in range(batch):  # test-data generation only; the perturbations themselves are batched
        radii = 0.6 + 0.25 * torch.rand(dims, generator=gen)
        body = torch.sigmoid((1.0 - ((grid / radii.view(-1, *[1] * dims)) ** 2).sum(0)) * 8.0)
        img = 0.45 * body + 0.1 * (grid[-1] + 1.0) / 2.0
        for _blob in range(2):
            centre = (torch.rand(dims, generator=gen) - 0.3) * 0.7
            width = 0.15 + 0.15 * torch.rand(1, generator=gen)
            d2 = ((grid - centre.view(-1, *[1] * dims)) ** 2).sum(0)
            img = img + (0.2 + 0.25 * torch.rand(1, generator=gen)) * torch.exp(-d2 / (2 * width**2))
        out.append(img.clamp(0.0, 1.0).expand(channels, *img.shape))
    return torch.stack(out).to(device).contiguous()


def _keys(n: int, salt: object, device: str | torch.device, start: int = 0) -> Tensor:
    return sample_keys(stream_key("medaudit.testing", salt), torch.arange(start, start + n, device=device))


def _instance(obj: type[Perturbation] | Perturbation) -> Perturbation:
    # medaudit instantiates perturbation classes without arguments (medaudit_perturbations)
    return obj() if isinstance(obj, type) else obj


def _size_for(pert: Perturbation, dims: int) -> int:
    return max(DEFAULT_SIZE[dims], int(getattr(pert, "min_spatial_size", 0) or 0))


def _sub_images(images: Mapping[int, Tensor] | None, dims: int) -> Tensor | None:
    return None if images is None else images.get(dims)


# ---------------------------------------------------------------------------------------------
# Perturbation checks
# ---------------------------------------------------------------------------------------------


def _perturbation_checks(sub: Subject) -> Iterator[Check]:
    cls = sub.obj if isinstance(sub.obj, type) else type(sub.obj)
    yield Check(check_perturbation_declaration)
    yield Check(check_perturbation_severities_documented)
    yield Check(check_perturbation_describe_json)
    dims_declared = tuple(getattr(cls, "dims", ()))
    for dims in (2, 3):
        variant = f"{dims}d"
        if dims not in dims_declared:
            continue  # a capability it does not declare is not checked (as sklearn's tags)
        kw = {"dims": dims, "device": sub.device}
        yield Check(check_perturbation_sample_params, variant, **kw)
        for dtype in FLOAT_DTYPES:
            yield Check(check_perturbation_shape_dtype_device, f"{variant}-{str(dtype).replace('torch.', '')}",
                        dtype=dtype, **kw)
        yield Check(check_perturbation_finite_in_range, variant, **kw)
        yield Check(check_perturbation_deterministic, variant, **kw)
        yield Check(check_perturbation_batch_split_invariant, variant, **kw)
        yield Check(check_perturbation_severity_monotone, variant, images=_sub_images(sub.images, dims),
                    rtol=sub.monotone_rtol, **kw)
        yield Check(check_perturbation_severity_zero_identity, variant, **kw)
        yield Check(check_perturbation_inference_mode, variant, **kw)
        yield Check(check_perturbation_no_host_sync, variant, **kw)


def check_perturbation_declaration(obj: type[Perturbation] | Perturbation) -> None:
    """Name ``<suite>.<what>``, known modalities, a summary and dims within (2, 3)."""
    cls = obj if isinstance(obj, type) else type(obj)
    assert isinstance(obj, (type, Perturbation)), f"{obj!r} is not a Perturbation"
    assert issubclass(cls, Perturbation), f"{cls.__qualname__} does not subclass medaudit.perturbation.Perturbation"
    name, suite = getattr(cls, "name", None), getattr(cls, "suite", None)
    assert isinstance(name, str) and isinstance(suite, str) and name.startswith(suite + "."), (
        f"name {name!r} must be '<suite>.<what>' with suite {suite!r}")
    what = name[len(suite) + 1:]
    assert what and "@" not in name and " " not in name, f"name {name!r}: '@' and spaces are reserved (scenario ids are name@severity)"
    modalities = tuple(cls.modalities)
    allowed = set(MODALITIES) | {"any"}
    assert modalities and set(modalities) <= allowed, f"modalities {modalities} must be a non-empty subset of {sorted(allowed)}"
    assert isinstance(cls.summary, str) and cls.summary.strip(), "summary is empty: give one sentence saying what it simulates"
    assert cls.dims and set(cls.dims) <= {2, 3}, f"dims {cls.dims} must be a non-empty subset of (2, 3)"
    min_size = getattr(cls, "min_spatial_size", None)
    assert min_size is None or (isinstance(min_size, int) and min_size > 0), f"min_spatial_size must be a positive int, got {min_size!r}"


def check_perturbation_severities_documented(obj: type[Perturbation] | Perturbation) -> None:
    """``severities`` documents levels 1..5 with numbers or ``(low, high)`` ranges."""
    cls = obj if isinstance(obj, type) else type(obj)
    levels = tuple(sorted(cls.severities))
    assert levels == SEVERITY_LEVELS, f"severities must document levels 1..5, has {list(levels)}"
    names = None
    for level in SEVERITY_LEVELS:
        params = cls.severities[level]
        assert isinstance(params, Mapping) and params, f"severity {level}: parameters must be a non-empty mapping"
        if names is None:
            names = set(params)
        assert set(params) == names, f"severity {level} documents {sorted(params)}, severity 1 documents {sorted(names)}"
        for key, spec in params.items():
            if isinstance(spec, tuple):
                assert len(spec) == 2 and all(_is_number(v) for v in spec) and spec[0] <= spec[1], (
                    f"severity {level}, {key}: a range must be (low, high) numbers with low <= high, got {spec!r}")
            else:
                assert _is_number(spec), f"severity {level}, {key}: expected a number or a (low, high) range, got {spec!r}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_perturbation_describe_json(obj: type[Perturbation] | Perturbation) -> None:
    """``describe()`` is JSON-serialisable and round-trips (it goes into results.json)."""
    desc = obj.describe()
    try:
        text = json.dumps(desc, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"describe() is not JSON-serialisable: {exc}") from None
    assert json.loads(text) == desc, "describe() does not survive a JSON round trip (tuples or non-str keys?)"
    for key in ("name", "suite", "severities"):
        assert key in desc, f"describe() lacks {key!r}"


def check_perturbation_sample_params(obj: type[Perturbation] | Perturbation, dims: int, device: str = "cpu") -> None:
    """``sample()`` returns ``{str: Tensor}`` with batch-first shapes on ``rng.device``, at every severity."""
    pert = _instance(obj)
    size = _size_for(pert, dims)
    x = phantom(3, dims, size, device=device)
    for severity in SEVERITY_LEVELS:
        params = pert.sample(severity, SampleRNG(_keys(3, "sample", device)), x.shape)
        assert isinstance(params, dict), f"severity {severity}: sample() returned {type(params).__name__}, expected dict"
        for key, value in params.items():
            assert isinstance(key, str), f"severity {severity}: parameter key {key!r} is not a str"
            assert isinstance(value, Tensor), f"severity {severity}: parameter {key!r} is a {type(value).__name__}, expected a Tensor"
            assert value.ndim >= 1 and value.shape[0] == 3, (
                f"severity {severity}: parameter {key!r} has shape {tuple(value.shape)}; the first dimension must be the batch (3)")
            assert value.device == x.device, f"severity {severity}: parameter {key!r} is on {value.device}, rng is on {x.device}"


def check_perturbation_shape_dtype_device(obj: type[Perturbation] | Perturbation, dims: int, dtype: torch.dtype,
                                          device: str = "cpu") -> None:
    """The output keeps the input's shape, dtype and device (severities 1 and 5)."""
    pert = _instance(obj)
    x = phantom(2, dims, _size_for(pert, dims), device=device).to(dtype)
    for severity in (1, 5):
        y, _ = pert(x, severity, SampleRNG(_keys(2, "dtype", device)))
        assert isinstance(y, Tensor), f"severity {severity}: returned {type(y).__name__}, expected a Tensor"
        assert y.shape == x.shape, f"severity {severity}: shape {tuple(x.shape)} became {tuple(y.shape)}"
        assert y.dtype == dtype, f"severity {severity}: dtype {dtype} became {y.dtype}"
        assert y.device == x.device, f"severity {severity}: device {x.device} became {y.device}"


def check_perturbation_finite_in_range(obj: type[Perturbation] | Perturbation, dims: int, device: str = "cpu") -> None:
    """No NaN/Inf and values within [0, 1] on the phantom, a constant image and an all-zero image."""
    pert = _instance(obj)
    size = _size_for(pert, dims)
    inputs = {
        "phantom": phantom(2, dims, size, device=device),
        "constant 0.5": torch.full((2, 1, *[size] * dims), 0.5, device=device),
        "all-zero": torch.zeros((2, 1, *[size] * dims), device=device),
        "all-one": torch.ones((2, 1, *[size] * dims), device=device),
    }
    for label, x in inputs.items():
        for severity in SEVERITY_LEVELS:
            y, _ = pert(x, severity, SampleRNG(_keys(2, "range", device)))
            yf = y.float()
            bad = (~torch.isfinite(yf)).sum()
            assert int(bad) == 0, f"{label} image, severity {severity}: {int(bad)} NaN/Inf values in the output"
            lo, hi = float(yf.min()), float(yf.max())
            assert lo >= 0.0 and hi <= 1.0, f"{label} image, severity {severity}: output range [{lo:.4g}, {hi:.4g}] leaves [0, 1]"


def check_perturbation_deterministic(obj: type[Perturbation] | Perturbation, dims: int, device: str = "cpu") -> None:
    """The same keys give the same parameters and image, whatever the global RNG state."""
    pert = _instance(obj)
    x = phantom(3, dims, _size_for(pert, dims), device=device)
    keys = _keys(3, "determinism", device)
    runs = []
    # a different global seed before each run exposes any use of torch's global RNG; fork_rng
    # restores the caller's RNG state afterwards
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device]):
        for seed in (1, 2):
            torch.manual_seed(seed)
            np.random.seed(seed)
            runs.append(pert(x, 4, SampleRNG(keys.clone())))
    (y1, p1), (y2, p2) = runs
    _assert_params_equal(p1, p2, "two runs with the same keys")
    assert torch.equal(y1, y2), (
        f"two runs with the same keys differ (max |diff| {float((y1.float() - y2.float()).abs().max()):.3g}); "
        "draw every random number from the SampleRNG passed to sample(), never from torch/numpy global RNGs")


def _assert_params_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str) -> None:
    assert set(a) == set(b), f"{what}: parameter keys differ ({sorted(a)} vs {sorted(b)})"
    for key in a:
        assert a[key].shape == b[key].shape and torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6, equal_nan=True), (
            f"{what}: parameter {key!r} differs")


def check_perturbation_batch_split_invariant(obj: type[Perturbation] | Perturbation, dims: int, device: str = "cpu") -> None:
    """A batch of 4 equals batches of 1 and 3 with the matching keys (a sample's corruption does
    not depend on its batch-mates)."""
    pert = _instance(obj)
    x = phantom(4, dims, _size_for(pert, dims), device=device)
    keys = _keys(4, "split", device)
    for severity in (2, 5):
        y_all, p_all = pert(x, severity, SampleRNG(keys))
        y_a, p_a = pert(x[:1], severity, SampleRNG(keys[:1]))
        y_b, p_b = pert(x[1:], severity, SampleRNG(keys[1:]))
        joined = {k: torch.cat([p_a[k], p_b[k]]) for k in p_a if k in p_b}
        _assert_params_equal(p_all, joined, f"severity {severity}, batch of 4 vs 1+3")
        diff = float((y_all.float() - torch.cat([y_a, y_b]).float()).abs().max())
        assert diff <= 1e-5, (
            f"severity {severity}: batch of 4 vs 1+3 with the same keys differ by up to {diff:.3g}; "
            "per-sample randomness must come from the sample's key and batch statistics must not mix samples")


def check_perturbation_severity_monotone(obj: type[Perturbation] | Perturbation, dims: int, device: str = "cpu",
                                         images: Tensor | None = None, rtol: float = 0.02) -> None:
    """Mean |perturbed - clean| does not decrease over severities 1..5, and severity 5 changes the image.

    Averaged over 4 phantoms × 3 key sets (and ``images``, if given), so that random parameter
    draws average out; ``rtol`` is the relative slack allowed between consecutive levels.
    """
    pert = _instance(obj)
    xs = [phantom(4, dims, _size_for(pert, dims), device=device, seed=7)]
    if images is not None:
        assert images.ndim == dims + 2, f"images for the {dims}D check must be [B, C, {'D, ' if dims == 3 else ''}H, W]"
        xs.append(images.to(device=device, dtype=torch.float32))
    change = []
    for severity in SEVERITY_LEVELS:
        total, count = 0.0, 0
        for x in xs:
            for rep in range(3):
                keys = _keys(x.shape[0], ("monotone", rep), device)
                y, _ = pert(x, severity, SampleRNG(keys))
                total += float((y.float() - x).abs().mean()) * x.shape[0]
                count += x.shape[0]
        change.append(total / count)
    table = ", ".join(f"{s}: {c:.4g}" for s, c in zip(SEVERITY_LEVELS, change))
    assert change[-1] > 1e-4, f"severity 5 barely changes the image (mean |change| by severity: {table})"
    for s in range(1, 5):
        assert change[s] >= change[s - 1] * (1 - rtol) - 1e-6, (
            f"mean |change| falls from severity {s} to {s + 1} ({table})")


def check_perturbation_severity_zero_identity(obj: type[Perturbation] | Perturbation, dims: int, device: str = "cpu") -> None:
    """Severity 0 returns the input unchanged with no parameters."""
    pert = _instance(obj)
    x = phantom(2, dims, _size_for(pert, dims), device=device)
    y, params = pert(x.clone(), 0, SampleRNG(_keys(2, "zero", device)))
    assert torch.equal(y, x), "severity 0 changed the image; it must be the identity"
    assert not params, f"severity 0 returned parameters {sorted(params)}; expected none"


def check_perturbation_inference_mode(obj: type[Perturbation] | Perturbation, dims: int, device: str = "cpu") -> None:
    """Works under ``torch.inference_mode()`` (as in the runner) and gives the same result."""
    pert = _instance(obj)
    x = phantom(2, dims, _size_for(pert, dims), device=device)
    keys = _keys(2, "inference", device)
    y_ref, _ = pert(x, 3, SampleRNG(keys))
    with torch.inference_mode():
        xi = x.clone()
        y_inf, _ = pert(xi, 3, SampleRNG(keys.clone()))
    assert torch.equal(y_ref, y_inf), "the result under torch.inference_mode() differs from the result outside it"


#: Tensor methods that copy a value to the host (on CUDA: wait for the device), or make a shape
#: depend on data. Patched during the host-sync check to record calls.
_HOST_SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "nonzero", "unique")


@contextlib.contextmanager
def _record_host_syncs() -> Iterator[list[str]]:
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_SYNC_METHODS}

    def spy(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            frame = traceback.extract_stack(limit=2)[0]
            calls.append(f"Tensor.{name}() at {Path(frame.filename).name}:{frame.lineno}")
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, spy(name, original))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def check_perturbation_no_host_sync(obj: type[Perturbation] | Perturbation, dims: int, device: str = "cpu") -> None:
    """No host round trip in ``sample``/``apply``: ``.item()``, ``.tolist()``, ``.cpu()``,
    ``.numpy()``, ``bool()/float()/int()`` of a tensor, or data-dependent shapes (``nonzero``,
    ``unique``). Each one stalls the GPU pipeline once per batch.

    Detected by recording calls of those tensor methods, so it runs on any device. Runs inside
    :func:`~medaudit.perturbation.accelerator_paths`, so code that reads values only where
    :func:`~medaudit.perturbation.host_readable` allows it is checked on its accelerator path.
    On CUDA, PyTorch's sync debug mode is also set to raise: it catches the synchronisations no
    tensor method shows, such as ``torch.tensor(values, device="cuda")`` (a blocking copy from
    pageable memory, which waits for all queued GPU work; use
    :func:`~medaudit.perturbation.host_constant`).
    """
    pert = _instance(obj)
    x = phantom(2, dims, _size_for(pert, dims), device=device)
    keys = _keys(2, "sync", device)
    cuda = torch.device(device).type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if cuda else 0
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        with accelerator_paths(), _record_host_syncs() as calls:
            pert(x, 3, SampleRNG(keys))
    except RuntimeError as exc:
        if "synchronizing" not in str(exc):
            raise
        raise AssertionError(f"host synchronisation in sample()/apply() on {device}: {exc}") from None
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)
    assert not calls, "host round trips in sample()/apply(): " + "; ".join(dict.fromkeys(calls))


# ---------------------------------------------------------------------------------------------
# Metric checks
# ---------------------------------------------------------------------------------------------


def _metric_checks(sub: Subject) -> Iterator[Check]:
    metric: Metric = sub.obj
    yield Check(check_metric_declaration)
    declared = tuple(t for t in getattr(metric, "tasks", ()) if t in TASKS)
    tasks = tuple(t for t in (sub.tasks or declared) if t in declared)
    nan_keys = tuple(getattr(metric, "nan_keys", ())) + tuple(sub.nan_keys)
    for task in tasks:
        ctx = default_context(task)
        yield Check(check_metric_returns_rows, task, ctx=ctx)
        yield Check(check_metric_permutation_invariant, task, ctx=ctx)
        yield Check(check_metric_point_row_unweighted, task, ctx=ctx)
        yield Check(check_metric_count_weights_equal_resampling, task, ctx=ctx)
        yield Check(check_metric_edge_cases, task, ctx=ctx, nan_keys=nan_keys)
        yield Check(check_metric_inputs_unchanged, task, ctx=ctx)
        yield Check(check_metric_curves_json, task, ctx=ctx)


def default_context(task: str) -> MetricContext:
    """The context the metric checks use: 2 classes for binary, 3 for multiclass and multilabel."""
    classes = ("negative", "positive") if task == "binary" else ("a", "b", "c")
    return MetricContext(task=task, classes=classes, n_bins=5)  # type: ignore[arg-type]


def synthetic_predictions(n: int, ctx: MetricContext, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Informative but imperfect predictions ``[N, K]`` and labels, every class present."""
    gen = torch.Generator().manual_seed(seed)
    k = len(ctx.classes)
    if ctx.task == "multilabel":
        labels = (torch.rand(n, k, generator=gen) < 0.5).to(torch.int64)
        labels[0], labels[1] = 1, 0  # every label has positives and negatives
        logits = 1.5 * (2 * labels - 1).double() + torch.randn(n, k, generator=gen, dtype=torch.float64)
        return torch.sigmoid(logits), labels
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=gen)]
    logits = 2.0 * torch.nn.functional.one_hot(labels, k).double() + torch.randn(n, k, generator=gen, dtype=torch.float64)
    return torch.softmax(logits, dim=1), labels


def _compute(metric: Metric, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
    out = metric.compute(probs, labels, weights, ctx)
    assert isinstance(out, dict) and out, f"compute() returned {type(out).__name__} {out!r}; expected a non-empty dict"
    return out


def _assert_results_close(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str, atol: float = 1e-9,
                          rtol: float = 1e-6) -> None:
    assert set(a) == set(b), f"{what}: result keys differ ({sorted(set(a) ^ set(b))})"
    for key in a:
        x, y = a[key].double().cpu(), b[key].double().cpu()
        assert x.shape == y.shape, f"{what}: {key!r} has shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            raise AssertionError(f"{what}: {key!r} differs: {x.tolist()} vs {y.tolist()}")


def check_metric_declaration(metric: Metric) -> None:
    """A non-empty ``name``, ``tasks`` within binary/multiclass/multilabel, a bool ``higher_is_better``."""
    assert isinstance(metric, Metric), f"{metric!r} is not a medaudit.metric.Metric instance"
    assert isinstance(metric.name, str) and metric.name.strip(), "name must be a non-empty str"
    assert metric.tasks and set(metric.tasks) <= set(TASKS), f"tasks {metric.tasks} must be a non-empty subset of {TASKS}"
    assert isinstance(metric.higher_is_better, bool), "higher_is_better must be a bool"


def check_metric_returns_rows(metric: Metric, ctx: MetricContext) -> None:
    """``compute`` returns ``{str: float Tensor [R]}`` with the same keys every call, finite on regular data."""
    probs, labels = synthetic_predictions(60, ctx)
    gen = torch.Generator().manual_seed(1)
    weights = torch.cat([torch.ones(1, 60), torch.randint(1, 3, (3, 60), generator=gen).float()])  # no class dropped
    out = _compute(metric, probs, labels, weights, ctx)
    for key, value in out.items():
        assert isinstance(key, str) and key, f"result key {key!r} must be a non-empty str"
        assert not any(c in key for c in "<>=! "), f"result key {key!r}: '<>=!' and spaces break --fail-on expressions"
        assert isinstance(value, Tensor), f"{key!r}: {type(value).__name__}, expected a Tensor"
        assert value.shape == (4,), f"{key!r}: shape {tuple(value.shape)}, expected [R] = (4,) for 4 weight rows"
        assert torch.is_floating_point(value), f"{key!r}: dtype {value.dtype}, expected floating point"
        assert bool(torch.isfinite(value).all()), f"{key!r} is not finite on regular data: {value.tolist()}"
    again = _compute(metric, probs, labels, torch.ones(2, 60), ctx)
    assert set(again) == set(out), f"the result keys depend on the weights: {sorted(set(again) ^ set(out))}"


def check_metric_permutation_invariant(metric: Metric, ctx: MetricContext) -> None:
    """Permuting the samples (probabilities, labels and weight columns together) changes nothing."""
    probs, labels = synthetic_predictions(50, ctx, seed=2)
    gen = torch.Generator().manual_seed(3)
    weights = torch.cat([torch.ones(1, 50), torch.randint(0, 4, (2, 50), generator=gen).float()])
    perm = torch.randperm(50, generator=gen)
    a = _compute(metric, probs, labels, weights, ctx)
    b = _compute(metric, probs[perm], labels[perm], weights[:, perm], ctx)
    _assert_results_close(a, b, "after permuting the samples")


def check_metric_point_row_unweighted(metric: Metric, ctx: MetricContext) -> None:
    """Each weight row is computed on its own: the ones row inside ``[R, N]`` equals the
    unweighted (single ones row) computation, and so does every other row alone."""
    probs, labels = synthetic_predictions(40, ctx, seed=4)
    gen = torch.Generator().manual_seed(5)
    weights = torch.cat([torch.ones(1, 40), torch.randint(0, 3, (2, 40), generator=gen).float()])
    stacked = _compute(metric, probs, labels, weights, ctx)
    for r in range(weights.shape[0]):
        alone = _compute(metric, probs, labels, weights[r : r + 1], ctx)
        what = "the point row (ones) vs the unweighted computation" if r == 0 else f"weight row {r} in a stack vs alone"
        _assert_results_close({k: v[r : r + 1] for k, v in stacked.items()}, alone, what)


def check_metric_count_weights_equal_resampling(metric: Metric, ctx: MetricContext) -> None:
    """Integer count weights equal the same metric on the data repeated by those counts (``np.repeat``)."""
    probs, labels = synthetic_predictions(40, ctx, seed=6)
    counts = np.random.default_rng(7).integers(0, 4, size=40)
    counts[: len(ctx.classes) * 2] = np.maximum(counts[: len(ctx.classes) * 2], 1)
    idx = torch.from_numpy(np.repeat(np.arange(40), counts))
    weighted = _compute(metric, probs, labels, torch.from_numpy(counts).double()[None], ctx)
    resampled = _compute(metric, probs[idx], labels[idx], torch.ones(1, idx.numel()), ctx)
    _assert_results_close(weighted, resampled, "count weights vs np.repeat resampling", atol=1e-7, rtol=1e-5)


def check_metric_edge_cases(metric: Metric, ctx: MetricContext, nan_keys: Sequence[str] = ()) -> None:
    """No exception and ``[R]`` results when one class is present, on tied and on hard 0/1
    probabilities; NaN only in keys documented as undefined (``nan_keys``), never ±Inf."""
    k = len(ctx.classes)
    n = 24
    probs, labels = synthetic_predictions(n, ctx, seed=8)
    single = torch.zeros_like(labels)  # only class 0 (multilabel: no label positive)
    ties = torch.full_like(probs, 0.5 if ctx.task == "multilabel" else 1.0 / k)
    hard_labels = labels
    if ctx.task == "multilabel":
        hard = labels.double().clone()
        hard[:3] = 1 - hard[:3]  # three confidently wrong samples
    else:
        hard_pred = labels.clone()
        hard_pred[:3] = (hard_pred[:3] + 1) % k
        hard = torch.nn.functional.one_hot(hard_pred, k).double()
    cases = {"one class present": (probs, single, True), "tied probabilities": (ties, labels, False),
             "hard 0/1 probabilities": (hard, hard_labels, False)}
    weights = torch.ones(2, n)
    for label, (p, y, nan_ok) in cases.items():
        try:
            out = metric.compute(p, y, weights, ctx)
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"{label}: compute() raised {type(exc).__name__}: {exc}") from None
        for key, value in out.items():
            assert isinstance(value, Tensor) and value.shape == (2,), f"{label}: {key!r} has shape {tuple(getattr(value, 'shape', ()))}, expected (2,)"
            v = value.double()
            assert not bool(torch.isinf(v).any()), f"{label}: {key!r} is infinite ({v.tolist()})"
            if bool(torch.isnan(v).any()):
                documented = nan_ok and any(fnmatch.fnmatchcase(key, pat) for pat in nan_keys)
                assert documented, (
                    f"{label}: {key!r} is NaN; NaN is allowed only for keys documented as undefined when a class "
                    f"is absent (nan_keys={list(nan_keys)})")


def check_metric_inputs_unchanged(metric: Metric, ctx: MetricContext) -> None:
    """``compute`` does not modify its inputs in place (the same tensors are shared by every metric)."""
    probs, labels = synthetic_predictions(30, ctx, seed=9)
    weights = torch.cat([torch.ones(1, 30), torch.full((1, 30), 2.0)])
    copies = (probs.clone(), labels.clone(), weights.clone())
    _compute(metric, probs, labels, weights, ctx)
    for name, before, after in zip(("probs", "labels", "weights"), copies, (probs, labels, weights)):
        assert torch.equal(before, after), f"compute() modified {name} in place"


def check_metric_curves_json(metric: Metric, ctx: MetricContext) -> None:
    """``curves()`` returns None or JSON-serialisable plot data without NaN."""
    probs, labels = synthetic_predictions(30, ctx, seed=10)
    curves = metric.curves(probs, labels, ctx)
    if curves is None:
        return
    try:
        json.dumps(curves, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"curves() is not JSON-serialisable (NaN must be None): {exc}") from None


# ---------------------------------------------------------------------------------------------
# Detector checks
# ---------------------------------------------------------------------------------------------


def _detector_checks(sub: Subject) -> Iterator[Check]:
    yield Check(check_detector_declaration)
    kw = {"feature_shape": sub.feature_shape, "device": sub.device}
    yield Check(check_detector_embed_shape, **kw)
    yield Check(check_detector_score_contract, **kw)
    yield Check(check_detector_detects_obvious_shift, **kw)
    yield Check(check_detector_score_keeps_state, **kw)
    yield Check(check_detector_deterministic, **kw)


def synthetic_batch(n: int, shifted: bool, feature_shape: tuple[int, ...] = (8, 2, 2), k: int = 3, seed: int = 0,
                    device: str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """``(logits [N, K], features [N, *feature_shape], labels [N])`` of a toy classifier.

    In distribution: confident logits and features clustered around one mean per class. Shifted
    (the obvious case every detector must see): near-uniform logits and features far from every
    class mean.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    f = int(np.prod(feature_shape))
    means = 2.0 * torch.randn(k, f, generator=torch.Generator().manual_seed(1234))
    if shifted:
        logits = 0.1 * torch.randn(n, k, generator=gen)
        feats = means.mean(0) + 12.0 + 3.0 * torch.randn(n, f, generator=gen)
    else:
        logits = 5.0 * torch.nn.functional.one_hot(labels, k).float() + 0.5 * torch.randn(n, k, generator=gen)
        feats = means[labels] + 0.5 * torch.randn(n, f, generator=gen)
    return logits.to(device), feats.reshape(n, *feature_shape).to(device), labels.to(device)


def _embed(det: Detector, logits: Tensor, feats: Tensor) -> Tensor:
    return det.embed(logits, feats if det.needs == "features" else None)


def _fitted(det: Detector, feature_shape: tuple[int, ...], device: str) -> Detector:
    fresh = copy.deepcopy(det)
    logits, feats, labels = synthetic_batch(120, False, feature_shape, seed=0, device=device)
    fresh.fit(_embed(fresh, logits, feats), labels)
    return fresh


def _state(obj: Any) -> dict[str, Any]:
    """A deep copy of an object's attributes, for before/after comparison."""
    return copy.deepcopy(dict(vars(obj)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==: compare their attributes
        return hasattr(a, "__dict__") and hasattr(b, "__dict__") and _same(vars(a), vars(b))


def check_detector_declaration(det: Detector) -> None:
    """A non-empty ``name`` usable as a results key and ``needs`` of ``"logits"`` or ``"features"``."""
    assert isinstance(det, Detector), f"{det!r} is not a medaudit.detector.Detector instance"
    assert isinstance(det.name, str) and det.name.strip() and " " not in det.name, f"name {det.name!r} must be a non-empty str without spaces"
    assert det.needs in ("logits", "features"), f"needs must be 'logits' or 'features', got {det.needs!r}"


def check_detector_embed_shape(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """``embed`` returns ``[B, D]`` on the batch's device, each row depending only on its sample."""
    logits, feats, _ = synthetic_batch(6, False, feature_shape, device=device)
    emb = _embed(det, logits, feats)
    assert isinstance(emb, Tensor) and emb.ndim == 2 and emb.shape[0] == 6, (
        f"embed() returned shape {tuple(getattr(emb, 'shape', ()))}; expected [B, D] with B = 6")
    assert emb.device == logits.device, f"embed() returned a tensor on {emb.device}, the batch is on {logits.device}"
    split = torch.cat([_embed(det, logits[:2], feats[:2]), _embed(det, logits[2:], feats[2:])])
    assert torch.allclose(emb.float(), split.float(), atol=1e-5), "embed() of a batch differs from embed() of its parts"


def check_detector_score_contract(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """After ``fit``, ``score`` returns finite floats ``[N]``, one per embedding."""
    fitted = _fitted(det, feature_shape, device)
    for shifted in (False, True):
        logits, feats, _ = synthetic_batch(30, shifted, feature_shape, seed=11, device=device)
        s = fitted.score(_embed(fitted, logits, feats))
        assert isinstance(s, Tensor) and s.shape == (30,), f"score() returned shape {tuple(getattr(s, 'shape', ()))}; expected [N] = (30,)"
        assert torch.is_floating_point(s), f"score() returned dtype {s.dtype}; expected floating point"
        assert bool(torch.isfinite(s).all()), f"score() returned non-finite values ({'shifted' if shifted else 'in-distribution'} data)"


def check_detector_detects_obvious_shift(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """Scores are higher for obviously shifted data than for in-distribution data (AUROC > 0.9)."""
    fitted = _fitted(det, feature_shape, device)
    li, fi, _ = synthetic_batch(40, False, feature_shape, seed=12, device=device)
    lo, fo, _ = synthetic_batch(40, True, feature_shape, seed=13, device=device)
    s_in = fitted.score(_embed(fitted, li, fi)).double().cpu()
    s_out = fitted.score(_embed(fitted, lo, fo)).double().cpu()
    # AUROC of "shifted" vs "in-distribution" by pairwise comparison (ties count one half)
    auroc = float(((s_out[:, None] > s_in[None, :]).double() + 0.5 * (s_out[:, None] == s_in[None, :]).double()).mean())
    assert auroc > 0.9, (f"shifted data does not score higher (AUROC {auroc:.3f}; mean in-distribution "
                         f"{float(s_in.mean()):.4g}, shifted {float(s_out.mean()):.4g}); higher must mean more shifted")


def check_detector_score_keeps_state(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """``score`` does not modify the fitted state (the same detector scores every scenario)."""
    fitted = _fitted(det, feature_shape, device)
    before = _state(fitted)
    li, fi, _ = synthetic_batch(20, False, feature_shape, seed=14, device=device)
    lo, fo, _ = synthetic_batch(20, True, feature_shape, seed=15, device=device)
    first = fitted.score(_embed(fitted, li, fi))
    fitted.score(_embed(fitted, lo, fo))
    again = fitted.score(_embed(fitted, li, fi))
    changed = [k for k in set(before) | set(vars(fitted)) if not _same(before.get(k), vars(fitted).get(k))]
    assert not changed, f"score() modified fitted state: {sorted(changed)}"
    assert torch.equal(first, again), "scoring the same data after other data gives different scores"


def check_detector_deterministic(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """Two detectors fitted on the same data give identical scores, whatever the global RNG state."""
    with torch.random.fork_rng(devices=[] if device == "cpu" else [torch.device(device)]):
        torch.manual_seed(1)
        a = _fitted(det, feature_shape, device)
        torch.manual_seed(2)
        b = _fitted(det, feature_shape, device)
    logits, feats, _ = synthetic_batch(20, True, feature_shape, seed=16, device=device)
    sa, sb = a.score(_embed(a, logits, feats)), b.score(_embed(b, logits, feats))
    assert torch.equal(sa, sb), "two fits on the same data give different scores; do not use global RNGs"


# ---------------------------------------------------------------------------------------------
# Dataset loader checks
# ---------------------------------------------------------------------------------------------


def _loader_checks(sub: Subject) -> Iterator[Check]:
    yield Check(check_loader_opens_valid)
    yield Check(check_loader_missing_file)
    yield Check(check_loader_bad_file, "truncated", kind="truncated")
    yield Check(check_loader_bad_file, "garbage", kind="garbage")


def _names_file(message: str, path: Path) -> bool:
    return str(path) in message or path.name in message


def _read_all(ds: AuditDataset) -> None:
    for i in range(len(ds)):
        ds[i]


def check_loader_opens_valid(loader: DatasetLoader) -> None:
    """The valid file opens as an :class:`AuditDataset` whose samples read."""
    with tempfile.TemporaryDirectory() as tmp:
        path = loader.write_valid(Path(tmp))
        ds = loader.open(path, loader.config)
        assert isinstance(ds, AuditDataset), f"open({path.name}) returned {type(ds).__name__}; expected an AuditDataset"
        assert len(ds) > 0, "the valid dataset opened empty"
        _read_all(ds)


def check_loader_missing_file(loader: DatasetLoader) -> None:
    """A path that does not exist raises :class:`DataError` naming it."""
    with tempfile.TemporaryDirectory() as tmp:
        # a sibling of a valid file, so the name has the format's suffix the loader looks for
        sample = loader.write_valid(Path(tmp))
        missing = sample.with_name("does-not-exist" + "".join(sample.suffixes))
        try:
            result = loader.open(missing, loader.config)
        except DataError as exc:
            assert _names_file(str(exc), missing), f"the DataError does not name the file: {exc}"
            return
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"a missing file raised {type(exc).__name__}: {exc}; expected a DataError naming the file") from None
        raise AssertionError(f"a missing file {missing.name} gave {type(result).__name__} instead of a DataError naming it")


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(path: Path) -> Path:
    size = max(path.stat().st_size, 64)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def check_loader_bad_file(loader: DatasetLoader, kind: Literal["truncated", "garbage"]) -> None:
    """A truncated or garbage file raises :class:`DataError` naming it, at open or when a sample is read."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        custom = loader.write_truncated if kind == "truncated" else loader.write_garbage
        path = custom(folder) if custom is not None else (_truncate if kind == "truncated" else _garbage)(loader.write_valid(folder))
        try:
            ds = loader.open(path, loader.config)
            assert ds is not None, f"the {kind} file {path.name} was not claimed (open returned None); raise a DataError naming it"
            _read_all(ds)
        except DataError as exc:
            assert _names_file(str(exc), path), f"the DataError for the {kind} file does not name it: {exc}"
            return
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"the {kind} file raised {type(exc).__name__}: {exc}; expected a DataError naming {path.name}") from None
        raise AssertionError(f"the {kind} file {path.name} opened and read without error")


# ---------------------------------------------------------------------------------------------
# Report sections
# ---------------------------------------------------------------------------------------------


def render_section(section: ReportSection, results: Mapping[str, Any]) -> str:
    """Render a section exactly as the report does (autoescape on, undefined names are errors)."""
    from .report import render_section as render

    assert isinstance(section, ReportSection), f"{section!r} is not a medaudit.sections.ReportSection"
    assert section.id and " " not in section.id, f"section id {section.id!r} must be a non-empty HTML id without spaces"
    assert section.title.strip(), "section title is empty"
    return render(section, dict(results))
