"""Number and label formatting shared by every table of the report (core and plugin sections)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: fixed digits, an en dash for undefined values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.{digits}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"
    return str(value)


def fmt_ci(est: Mapping[str, Any] | None, digits: int = 3) -> str:
    """An estimate as ``value [low, high]``; just the value when it has no interval."""
    if not est:
        return "–"
    if est.get("ci_low") is None:
        return fmt(est.get("value"), digits)
    return f"{fmt(est['value'], digits)} [{fmt(est['ci_low'], digits)}, {fmt(est['ci_high'], digits)}]"


def fmt_p(p: float | None) -> str:
    """A p-value: three decimals, or ``< 0.001``."""
    if p is None:
        return "–"
    return "<\u00a00.001" if p < 0.001 else f"{p:.3f}"


def label(key: str) -> str:
    """A metric key as a column header: ``false_positive_rate`` → ``false positive rate``."""
    return key.replace("_", " ")


def fmt_metric(est: Mapping[str, Any] | float | None, info: Mapping[str, Any] | None) -> str:
    """An estimate (or a bare value) of a metric key as its family declares (``digits``, ``percent``).

    ``info`` is the key's entry of :func:`medaudit.report.views.metric_info`; ``None`` formats
    like :func:`fmt_ci` (three digits).
    """
    digits = (info or {}).get("digits", 3)
    percent = bool((info or {}).get("percent"))

    def one(value: Any) -> str:
        text = fmt(value * 100 if percent and isinstance(value, float) else value, digits)
        return text + "%" if percent and text != "–" else text

    if not isinstance(est, Mapping):
        return one(est)
    if not est:
        return "–"
    if est.get("ci_low") is None:
        return one(est.get("value"))
    return f"{one(est['value'])} [{one(est['ci_low'])}, {one(est['ci_high'])}]"
