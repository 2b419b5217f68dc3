"""Report figures: small functions that draw with matplotlib (Agg) and return inline SVG strings.

Why SVG strings: the report is one self-contained HTML file, so figures are inlined rather than
linked, stay sharp when printed to PDF, and keep their text selectable.

Determinism: the same inputs give the same bytes. ``svg.hashsalt`` is set per figure (so ids are
reproducible *and* distinct between the figures of one document, which share one HTML id space),
the ``<metadata>`` block (date, creator) is dropped, every element id is prefixed with the
figure's key (matplotlib's ``figure_1``/``axes_1`` group ids repeat across figures), and ``svg.fonttype='none'`` keeps text as
``<text>`` elements instead of glyph outlines whose ids would repeat across figures.

Escaping: matplotlib escapes ``<``, ``>`` and ``&`` in SVG text; user strings (class, group,
perturbation names) additionally get ``$`` escaped so that mathtext never interprets them. The alt
text put on the ``<svg>`` root is escaped here with :func:`markupsafe.escape`.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from typing import TYPE_CHECKING, Any

from markupsafe import Markup, escape

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Figures are built with matplotlib.figure.Figure directly, never pyplot: no global figure
# registry, no backend switch in the caller's process (e.g. a notebook rendering a report).
# matplotlib is imported when the first figure is drawn, not with this module: the plugins that
# contribute report sections import the view helpers at load time, and an audit or a `medaudit`
# command that draws nothing should not pay matplotlib's ~0.3 s and ~30 MB.


def _rc_context(params: dict[str, Any]) -> Any:
    import matplotlib

    return matplotlib.rc_context(params)

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision
# deficiency. Yellow comes last: it has the lowest contrast against the white background.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
# Colour alone must not carry the meaning (WCAG 1.4.1): lines also differ by marker and dash.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", "-.", ":")

_STYLE = {
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 8,
}


@dataclass
class Series:
    """One line: y (with optional CI band) against x. ``None`` values are gaps."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    low: Sequence[float | None] | None = None
    high: Sequence[float | None] | None = None
    marked: Sequence[bool] = field(default_factory=tuple)  # points drawn filled-red: significant drops


@dataclass
class Interval:
    """One row of a forest plot."""

    label: str
    value: float | None
    low: float | None = None
    high: float | None = None
    note: str = ""


def style(i: int) -> dict[str, str]:
    """Colour, marker and dash for the i-th series (cycles with distinct combinations)."""
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": DASHES[(i // len(OKABE_ITO)) % len(DASHES)]}


def text(s: str) -> str:
    """A user string as plain matplotlib text: ``$`` would start mathtext."""
    return s.replace("$", r"\$")


def _num(v: float | None) -> float:
    return math.nan if v is None or not math.isfinite(v) else float(v)


_PROLOG = re.compile(r"^.*?(?=<svg\b)", re.DOTALL)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)
_ID = re.compile(r'\b(id)="([^"]+)"')
_REF = re.compile(r'((?:xlink:href|href)="|url\()#([^")]+)')


def to_svg(fig: Figure, key: str, alt: str) -> Markup:
    """Serialise ``fig`` as an inline ``<svg>`` element with ``role="img"``, aria-label and title.

    ``key`` must be unique within a document and stable across runs: it salts the element ids.
    """
    buf = io.StringIO()
    with _rc_context({"svg.hashsalt": f"medaudit-{key}", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    svg = _PROLOG.sub("", buf.getvalue(), count=1)
    svg = _METADATA.sub("", svg, count=1)
    # matplotlib names groups figure_1, axes_1, patch_1 … in every figure; inline SVGs share the
    # document's id space, so every id and every reference to one gets the figure's key as prefix
    prefix = re.sub(r"[^A-Za-z0-9_-]", "-", key)
    svg = _ID.sub(lambda m: f'{m.group(1)}="{prefix}-{m.group(2)}"', svg)
    svg = _REF.sub(lambda m: f"{m.group(1)}#{prefix}-{m.group(2)}", svg)
    # the pt width/height stay (natural size, readable text); CSS max-width lets it shrink
    head, rest = svg.split(">", 1)
    label = escape(alt)
    return Markup(f'{head} role="img" aria-label="{label}" class="figure"><title>{label}</title>{rest.strip()}')


def _new(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, list(axes[0])


def degradation(panels: Sequence[tuple[str, str, Sequence[Series]]], key: str, alt: str,
                higher_is_better: Sequence[bool] | None = None, xlabel: str = "severity (0 = clean)",
                chance: float | None = None) -> Markup:
    """Metric against severity (0 = clean), one panel per (title, y label, series), CI bands shaded.

    Points whose drop from clean is significant are drawn as filled markers with a dark edge, so
    the marking survives greyscale printing.
    """
    with _rc_context(_STYLE):
        fig, axes = _new(3.9 * len(panels), 3.2, len(panels))
        for p, (ax, (title, ylabel, series)) in enumerate(zip(axes, panels)):
            for i, s in enumerate(series):
                st = style(i)
                y = [_num(v) for v in s.y]
                ax.plot(s.x, y, label=text(s.label), color=st["color"], linestyle=st["linestyle"],
                        marker=st["marker"], markersize=4, markerfacecolor="white", linewidth=1.3)
                if s.low is not None and s.high is not None:
                    ax.fill_between(s.x, [_num(v) for v in s.low], [_num(v) for v in s.high],
                                    color=st["color"], alpha=0.15, linewidth=0)
                hits = [(x, v) for x, v, m in zip(s.x, y, s.marked) if m]
                if hits:
                    ax.plot([h[0] for h in hits], [h[1] for h in hits], linestyle="none", marker=st["marker"],
                            markersize=5.5, color=st["color"], markeredgecolor="black", markeredgewidth=0.8)
            if chance is not None:  # e.g. AUROC 0.5: where a detector is no better than a coin
                ax.axhline(chance, color="#777777", linestyle=":", linewidth=0.9)
            ax.set_title(text(title), fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(text(ylabel))
            ax.set_xticks(range(6))
            if higher_is_better is not None:
                ax.annotate("higher is better" if higher_is_better[p] else "lower is better",
                            xy=(1, 1.0), xycoords="axes fraction", ha="right", va="bottom", fontsize=7, color="#555555")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(3, max(1, len(labels))), fontsize=8)
        fig.tight_layout()
    return to_svg(fig, key, alt)


def reliability(curves: Sequence[tuple[str, Sequence[dict]]], key: str, alt: str) -> Markup:
    """Reliability diagram: accuracy against confidence per bin, one line per scenario, diagonal = perfect."""
    with _rc_context(_STYLE):
        fig, (ax,) = _new(4.4, 4.4)
        ax.plot([0, 1], [0, 1], color="#888888", linewidth=0.8, linestyle=":", label="perfect calibration")
        for i, (label, bins) in enumerate(curves):
            st = style(i)
            pts = [(b["confidence"], b["accuracy"], b.get("count", 0)) for b in bins
                   if b.get("confidence") is not None and b.get("accuracy") is not None]
            if not pts:
                continue
            total = sum(c for *_, c in pts) or 1
            # thin connecting line: sparse bins jump around, the markers carry the data
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=st["color"], linestyle=st["linestyle"],
                    linewidth=0.9, alpha=0.8, marker=st["marker"], markersize=3, label=text(label))
            # marker area ∝ bin count: sparse bins are visibly less trustworthy
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=[8 + 120 * c / total for *_, c in pts],
                       color=st["color"], marker=st["marker"], zorder=3, linewidths=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (bin mean)")
        ax.set_ylabel("accuracy (bin mean)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=1)
        fig.tight_layout()
    return to_svg(fig, key, alt)


def forest(rows: Sequence[Interval], xlabel: str, key: str, alt: str, reference: float | None = None) -> Markup:
    """Forest plot: one row per group, point estimate with its CI; dashed line at ``reference``."""
    with _rc_context(_STYLE):
        fig, (ax,) = _new(4.8, 0.9 + 0.32 * max(1, len(rows)))
        ys = list(range(len(rows)))[::-1]
        for y, r in zip(ys, rows):
            v = _num(r.value)
            if r.low is not None and r.high is not None:
                ax.plot([_num(r.low), _num(r.high)], [y, y], color=OKABE_ITO[0], linewidth=1.6)
            ax.plot([v], [y], marker="D" if not r.note else "o", color=OKABE_ITO[0] if not r.note else "#888888",
                    markersize=5, markerfacecolor=OKABE_ITO[0] if not r.note else "white")
        if reference is not None and math.isfinite(reference):
            ax.axvline(reference, color="#555555", linestyle="--", linewidth=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([text(r.label + (f" ({r.note})" if r.note else "")) for r in rows])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlabel(text(xlabel))
        ax.grid(axis="y", visible=False)
        fig.tight_layout()
    return to_svg(fig, key, alt)
