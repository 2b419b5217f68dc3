"""What the kit records: the objects it checks, the checks bound to their options, and outcomes.

A :class:`Subject` is an object plus the options of its checks; a :class:`Check` is one
contract clause bound to its options; each run of a check on an object gives a
:class:`CheckRecord`, and the records of one object make its :class:`CheckReport`.
"""

from __future__ import annotations

import functools
import traceback
import unittest
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

Status = Literal["passed", "failed", "skipped", "xfailed", "xpassed"]


class SkipCheck(unittest.SkipTest):
    """Raised by a check that does not apply; pytest reports a ``unittest.SkipTest`` as skipped."""


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
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(obj, "__qualname__", type(obj).__qualname__)


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


def xfail_reason(xfail: Mapping[str, str], check_name: str) -> str | None:
    return xfail.get(check_name, xfail.get(_base(check_name)))


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


def describe_exception(exc: BaseException) -> str:
    if isinstance(exc, AssertionError):
        return str(exc) or "assertion failed"
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"
