"""The report's plots, drawn with matplotlib's SVG backend into inline `<svg>` text.

Why matplotlib: a well-kept library draws axes, ticks, legends and step lines correctly, and its
SVG backend needs no display. Text is drawn as glyph paths (`svg.fonttype = "path"`), so the
page needs no font from anywhere; ids are salted with a fixed string and the date left out, so
the same run gives the same bytes. Figures are made with `matplotlib.figure.Figure` (no
`pyplot`, no global figure registry), so a report can be drawn from any thread.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from batchyard.report.data import AttemptTokens, Span, time_unit

if TYPE_CHECKING:
    import polars as pl

STATUS_COLORS = {
    "completed": "#2e7d32",
    "failed": "#c62828",
    "expired": "#ef6c00",
    "cancelled": "#757575",
    "in flight": "#1565c0",
}
QUEUED_COLOR = "#d9d9d9"
LANE_COLORS = {"batch": "#1565c0", "realtime": "#8e24aa"}
MAX_LABELLED_ROWS = 60
_RC: dict[Any, Any] = {"svg.fonttype": "path", "svg.hashsalt": "batchyard-report", "font.size": 9,
       "axes.spines.top": False, "axes.spines.right": False}
_LOCK = threading.Lock()  # rc_context changes process-wide settings


def to_svg(fig: Figure) -> str:
    """The figure as an `<svg>` element (no XML declaration or doctype: it goes inline)."""
    buf = io.StringIO()
    with _LOCK, matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    with _LOCK, matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        ax = fig.add_subplot()
    return fig, ax


def _legend_above(ax: Any, **kwargs: Any) -> None:
    """A legend in one row above the axes, where it covers nothing."""
    handles = kwargs.get("handles") or ax.get_legend_handles_labels()[0]
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncols=min(len(handles), 4), frameon=False,
              borderaxespad=0, **kwargs)


def cost_plot(cost: dict[str, Any]) -> str:
    """The plan's estimate at batch and at real-time prices, beside the reported cost stacked by lane."""
    fig, ax = _figure(7, 2.6)
    names = ["estimate\n(batch prices)", "estimate\n(real-time prices)", "reported\n(provider usage)"]
    ax.barh([0, 1], [cost["estimate_batch_usd"], cost["estimate_realtime_usd"]], color="#9e9e9e")
    left = 0.0
    for lane in cost["lanes"]:
        ax.barh([2], [lane["usd"]], left=left, color=LANE_COLORS.get(lane["lane"], "#455a64"),
                label=f"{lane['lane']} lane")
        left += lane["usd"]
    ax.set_yticks([0, 1, 2], names)
    ax.invert_yaxis()
    ax.set_xlabel("USD")
    ax.xaxis.set_major_formatter(lambda x, _pos: f"${x:,.6f}".rstrip("0").rstrip("."))
    if cost["lanes"]:
        _legend_above(ax)
    return to_svg(fig)


def timeline_plot(spans: Sequence[Span], *, t0: float, now: float) -> str:
    """One row per shard attempt: waiting to be submitted (grey), then each submission from its
    submit to its terminal status, coloured by that status."""
    keys = sorted({s.key for s in spans}, key=lambda k: min(s.start for s in spans if s.key == k))
    row = {k: i for i, k in enumerate(keys)}
    end = max([now, *[s.end or now for s in spans]])
    label, unit = time_unit(end - t0)
    fig, ax = _figure(9, min(12.0, 1.2 + 0.16 * len(keys)))
    ys = [row[s.key] for s in spans]
    ax.barh(ys, [(s.start - s.queued_from) / unit for s in spans],
            left=[(s.queued_from - t0) / unit for s in spans], color=QUEUED_COLOR, height=0.8)
    ax.barh(ys, [((s.end if s.end is not None else end) - s.start) / unit for s in spans],
            left=[(s.start - t0) / unit for s in spans], height=0.8,
            color=[STATUS_COLORS.get(s.status, "#455a64") for s in spans],
            hatch=["//" if s.lane == "realtime" else "" for s in spans] if any(s.lane == "realtime" for s in spans) else None)
    if len(keys) <= MAX_LABELLED_ROWS:
        ax.set_yticks(range(len(keys)), keys, fontsize=7)
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"{len(keys):,} shard attempts")
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} since the run was created")
    seen = {s.status for s in spans}
    handles = [Patch(color=QUEUED_COLOR, label="waiting to be submitted")]
    handles += [Patch(color=c, label=name) for name, c in STATUS_COLORS.items() if name in seen]
    if any(s.lane == "realtime" for s in spans):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="real-time lane"))
    ax.set_xlim(left=0)
    _legend_above(ax, handles=handles)
    return to_svg(fig)


def queue_plot(*, t0: float, times: Sequence[float], values: Sequence[int], budget: int | None,
               samples: pl.DataFrame | None) -> str:
    """The provider queue's fill over time: the sampled reservations of every run of the account
    against the cap (`samples`), or else this run's own in-flight tokens against its budget."""
    fig, ax = _figure(9, 3.0)
    if samples is not None and samples.height:
        t = samples["t"].to_list()
        label, unit = time_unit(max(t) - t0)
        x = [(v - t0) / unit for v in t]
        ax.fill_between(x, samples["reserved_tokens"].to_list(), step="post", color="#90caf9",
                        label="reserved, every run of the account")
        ax.step(x, samples["run_inflight_tokens"].to_list(), where="post", color="#1565c0",
                label="this run, in flight")
        ax.step(x, samples["run_waiting_tokens"].to_list(), where="post", color="#ef6c00",
                linestyle="--", label="this run, waiting")
        ax.step(x, samples["cap_tokens"].to_list(), where="post", color="#c62828", label="cap")
    else:
        label, unit = time_unit((max(times) - t0) if times else 1.0)
        x = [(v - t0) / unit for v in times]
        ax.fill_between(x, values, step="post", color="#90caf9", label="this run, in flight (from the ledger)")
        if budget:
            ax.axhline(budget, color="#c62828", label="enqueued-token budget")
    ax.set_xlabel(f"{label} since the run was created")
    ax.set_ylabel("tokens")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(lambda y, _pos: f"{y:,.0f}")
    _legend_above(ax)
    return to_svg(fig)


def tokens_plot(rows: Sequence[AttemptTokens]) -> str:
    """Tokens of each shard attempt: planned (bars, by lane), and what the provider reported
    (input as dots, output stacked on the bar where there was any)."""
    fig, ax = _figure(9, 3.0)
    xs = range(len(rows))
    ax.bar(xs, [r.planned for r in rows], color=[LANE_COLORS.get(r.lane, "#455a64") for r in rows], width=0.8,
           label="planned input")
    reported = [(i, r.input_reported) for i, r in enumerate(rows) if r.input_reported is not None]
    if reported:
        ax.plot([i for i, _ in reported], [v for _, v in reported], "o", color="#212121", markersize=3,
                label="reported input")
    outputs = [(i, r.output_reported, r.planned) for i, r in enumerate(rows) if r.output_reported]
    if outputs:
        ax.bar([i for i, _, _ in outputs], [o for _, o, _ in outputs], bottom=[p for _, _, p in outputs],
               color="#fbc02d", width=0.8, label="reported output")
    if len(rows) <= 40:
        ax.set_xticks(list(xs), [r.key for r in rows], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(rows):,} shard attempts, in ledger order")
    ax.set_ylabel("tokens")
    ax.yaxis.set_major_formatter(lambda y, _pos: f"{y:,.0f}")
    _legend_above(ax)
    return to_svg(fig)


def failures_plot(groups: Sequence[dict[str, Any]]) -> str:
    """Failed units by failure code, most frequent on top."""
    fig, ax = _figure(7, 0.8 + 0.3 * len(groups))
    ax.barh(range(len(groups)), [g["count"] for g in groups], color="#c62828")
    ax.set_yticks(range(len(groups)), [g["code"] for g in groups])
    ax.invert_yaxis()
    ax.set_xlabel("failed units")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return to_svg(fig)
