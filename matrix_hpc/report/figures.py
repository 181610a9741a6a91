"""The report's figures, drawn with matplotlib's object API (``Figure``, no
pyplot state, the Agg renderer) from :mod:`matrix_hpc.report.aggregate`'s
results. Each function returns PNG bytes.

matplotlib is imported here only; the report package is imported only by
``matrix-hpc report``, so ``import matrix_hpc`` never pays for it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from matrix_hpc.report.aggregate import Distribution, RoleLatency, Timeline, WorkflowPanel

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STATUS_COLOURS = {"ok": "#2e7d32", "filtered": "#f9a825", "failed": "#c62828"}
OTHER_COLOUR = "#546e7a"
SIZE_IN = (7.5, 3.4)
DPI = 110


def new_figure(size_in: tuple[float, float] = SIZE_IN, left_in: float = 0.8) -> tuple[Figure, Axes]:
    """A figure with fixed margins (inches): a layout engine would draw every figure twice."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # a dependency of matrix_hpc; missing only in a hand-made environment
        raise RuntimeError("matrix-hpc report needs matplotlib: pip install matplotlib") from e
    width, height = size_in
    fig = Figure(figsize=size_in, dpi=DPI)
    fig.subplots_adjust(left=left_in / width, right=1 - 0.8 / width, bottom=0.6 / height, top=1 - 0.4 / height)
    return fig, fig.subplots()


def number(v: float) -> str:
    """3 significant digits below 1,000, thousands separated above (never 6.45e+03)."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _label_width_in(labels: Iterable[str]) -> float:
    """Room for y tick labels (about 0.075 in a character at the default 10 pt font)."""
    return min(3.5, 0.3 + 0.075 * max((len(s) + 10 for s in labels), default=8))


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this output", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def throughput(tl: Timeline) -> bytes:
    fig, ax = new_figure()
    centres = (tl.edges_s[:-1] + tl.edges_s[1:]) / 2
    if not tl.by_status:
        _empty(ax, "timed rows")
        return png(fig)
    ax.plot(centres, tl.rows_per_s(), color="#1565c0", label="rows/s")
    ax.set_xlabel("seconds since the first admission")
    ax.set_ylabel("rows finished / s", color="#1565c0")
    ax.set_ylim(bottom=0)
    if tl.tokens.any():
        tok = ax.twinx()
        tok.plot(centres, tl.tokens_per_s(), color="#6a1b9a", alpha=0.7, label="tokens/s")
        tok.set_ylabel("tokens / s", color="#6a1b9a")
        tok.set_ylim(bottom=0)
    ax.set_title(f"Throughput ({tl.width_s:.3g} s bins)")
    return png(fig)


def completions_by_status(tl: Timeline) -> bytes:
    fig, ax = new_figure()
    if not tl.by_status:
        _empty(ax, "timed rows")
        return png(fig)
    cumulative = tl.cumulative()
    ax.stackplot(tl.edges_s[1:], *cumulative.values(), labels=list(cumulative),
                 colors=[STATUS_COLOURS.get(s, OTHER_COLOUR) for s in cumulative], alpha=0.85)
    ax.set_xlabel("seconds since the first admission")
    ax.set_ylabel("rows committed (cumulative)")
    ax.legend(loc="upper left")
    ax.set_title("Completions by status over time")
    return png(fig)


def histogram(d: Distribution, title: str, xlabel: str, unit: str = "rows", marks: bool = True) -> bytes:
    fig, ax = new_figure()
    if not d.count:
        _empty(ax, xlabel)
        return png(fig)
    ax.stairs(d.counts, d.edges, fill=True, color="#1565c0", alpha=0.8)
    if marks:
        for p, style in ((50, "-"), (95, "--"), (99, ":")):
            if p in d.percentiles:
                ax.axvline(d.percentiles[p], color="#c62828", linestyle=style, label=f"p{p} {number(d.percentiles[p])}")
        ax.legend(loc="upper right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(unit)
    ax.set_title(f"{title} (n={d.count:,}, mean {number(d.mean)})")
    return png(fig)


def step_latency(roles: list[RoleLatency]) -> bytes:
    fig, ax = new_figure((7.5, max(2.4, 0.55 * len(roles) + 1.2)), left_in=_label_width_in(r.role for r in roles))
    if not roles:
        _empty(ax, "timed messages")
        return png(fig)
    stats: list[dict[str, Any]] = [
        {"label": f"{r.role} (n={r.count:,})", "whislo": r.percentiles_s[5], "q1": r.percentiles_s[25],
         "med": r.percentiles_s[50], "q3": r.percentiles_s[75], "whishi": r.percentiles_s[95],
         "mean": r.mean_s, "fliers": []} for r in roles]
    ax.bxp(stats, orientation="horizontal", showmeans=True, patch_artist=True,
           boxprops={"facecolor": "#bbdefb"})
    ax.set_xlabel("seconds per step (box p25-p75, whiskers p5-p95, triangle = mean)")
    ax.set_title("Step latency per role")
    return png(fig)


def bars(panel: WorkflowPanel) -> bytes:
    if panel.distribution is not None:
        return histogram(panel.distribution, panel.title, panel.xlabel, panel.unit, marks=False)
    fig, ax = new_figure((7.5, max(2.4, 0.45 * len(panel.bars) + 1.2)),
                         left_in=_label_width_in(label for label, _ in panel.bars))
    if not panel.bars:
        _empty(ax, "values")
        return png(fig)
    labels = [label for label, _ in panel.bars]
    values = np.array([value for _, value in panel.bars])
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color="#1565c0", alpha=0.85)
    ax.set_yticks(y, labels)
    for yi, v in zip(y, values, strict=True):
        ax.text(v, yi, " " + number(v), va="center")
    ax.set_xlabel(panel.unit)
    ax.set_xlim(0, max(float(values.max()), 1e-9) * 1.15)
    ax.set_title(panel.title)
    return png(fig)
