"""Perturbation checks: declaration, output contract, determinism, severities, host syncs.

Each check runs on the synthetic :func:`phantom` images (2D 32×32, 3D 16³, or the
perturbation's ``min_spatial_size``) with per-sample keys of the kit's own stream.
"""

from __future__ import annotations

import contextlib
import json
import math
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..perturbation import MODALITIES, SEVERITY_LEVELS, Perturbation, accelerator_paths
from ..rng import SampleRNG, sample_keys, stream_key
from .records import Check, Subject

#: Edge length of the synthetic images: 2D images are 32×32, 3D volumes 16³.
DEFAULT_SIZE = {2: 32, 3: 16}
#: Dtypes a perturbation must accept and return unchanged.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def perturbation_checks(sub: Subject) -> Iterator[Check]:
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
