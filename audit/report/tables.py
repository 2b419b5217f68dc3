"""The report's full tables as CSV files (``tables/<section>.csv`` beside results.json).

The appendix of the HTML report shows every full table collapsed; the same tables are written
as CSV so a reviewer can sort and filter them, and a script can read them without parsing HTML.
Rows that carry raw ``values`` are written unrounded, with intervals as separate columns;
other rows as their displayed cells.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .views import Table


@dataclass
class AppendixTable:
    """One full table of a section, in document order: where it comes from and its CSV file name."""

    section: str
    table: Table

    @property
    def filename(self) -> str:
        stem = self.section if not self.table.name else f"{self.section}-{self.table.name}"
        return re.sub(r"[^A-Za-z0-9_.-]", "-", stem) + ".csv"


def _raw(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value


def table_csv(t: Table) -> str:
    """``t`` as CSV text (RFC 4180, ``\\n`` line ends): raw values where the rows carry them."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    raw = t.columns is not None and all(r.values is not None for r in t.rows)
    writer.writerow(t.columns if raw else t.headers)
    for r in t.rows:
        writer.writerow([_raw(v) for v in r.values] if raw and r.values is not None else r.cells)
    return buf.getvalue()


def csv_files(tables: Sequence[AppendixTable]) -> dict[str, str]:
    """File name → CSV text for every table with rows; a repeated name gets ``-2``, ``-3`` …"""
    out: dict[str, str] = {}
    for entry in tables:
        if not entry.table.rows:
            continue
        name, k = entry.filename, 2
        while name in out:
            name, k = f"{entry.filename.removesuffix('.csv')}-{k}.csv", k + 1
        out[name] = table_csv(entry.table)
    return out
