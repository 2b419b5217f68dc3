"""Choosing and running checks: which apply to an object, one report, or one pytest test each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..detector import Detector
from ..metric import Metric
from ..perturbation import Perturbation
from .detectors import detector_checks
from .loaders import DatasetLoader, loader_checks
from .metrics import metric_checks
from .perturbations import perturbation_checks
from .records import Check, CheckRecord, CheckReport, SkipCheck, Status, Subject, describe_exception, xfail_reason


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


def yield_checks(obj: Any) -> Iterator[Check]:
    """The checks that apply to ``obj`` (or a :class:`Subject`), chosen from what it declares."""
    sub = obj if isinstance(obj, Subject) else Subject(obj)
    kind = _kind(sub.obj)
    if kind == "perturbation":
        yield from perturbation_checks(sub)
    elif kind == "metric":
        yield from metric_checks(sub)
    elif kind == "detector":
        yield from detector_checks(sub)
    else:
        yield from loader_checks(sub)


def check_plugin_object(obj: Any, *, xfail: Mapping[str, str] | None = None, **options: Any) -> CheckReport:
    """Run every applicable check on ``obj`` and return the :class:`CheckReport`.

    ``options`` are those of :func:`subject`; ``obj`` may also be a :class:`Subject` already.
    """
    sub = obj if isinstance(obj, Subject) else Subject(obj, **options)
    if xfail:
        sub.xfail = {**sub.xfail, **xfail}
    report = CheckReport(sub.name)
    for check in yield_checks(sub):
        expected = xfail_reason(sub.xfail, check.name)
        try:
            check(sub)
        except SkipCheck as exc:
            report.records.append(CheckRecord(check.name, sub.name, "skipped", str(exc)))
        except Exception as exc:  # noqa: BLE001 - any error in a check is that check's failure
            reason = describe_exception(exc)
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
            reason = xfail_reason(declared, check.name)
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason is not None else []
            params.append(pytest.param(sub, check, id=f"{sub.name}-{check.name}", marks=marks))
    return pytest.mark.parametrize("obj, check", params)
