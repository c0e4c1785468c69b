"""The figures of a run report, derived from what the run staged (pure: no I/O, no plotting).

Why a module of its own: the page shows what the ledger and the datasets say, so the derivations
(when an attempt was in flight, how full the queue was, what failed and why) are plain functions
over records and frames that the tests can check against the staged files, apart from how they
are drawn (`plots.py`) and laid out (`page.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl

from batchyard.errors import TerminalError

TERMINAL = ("completed", "failed", "expired", "cancelled")
_STARTS = ("creating", "submitted")
"""History states that begin a submission: the create call (batch lane) or the first real-time
call (`planned -> submitted`). An upload before it is not in the provider's queue yet."""
_ENDS = ("ended", "collected")
QUEUE_COLUMNS = ("t", "reserved_tokens", "cap_tokens", "run_inflight_tokens", "run_waiting_tokens")


def epoch(iso: str) -> float:
    """Seconds since the epoch of an ISO timestamp (as the ledger writes them)."""
    return datetime.fromisoformat(iso).timestamp()


@dataclass(frozen=True)
class Span:
    """One submission of a shard attempt: from its submit to its terminal status.

    `end` is None while it is in flight. `queued_from` is when it started waiting to be
    submitted: its plan for the first submission, the previous submission's end for a requeue.
    """

    key: str
    lane: str
    submission: int
    tokens: int
    queued_from: float
    start: float
    end: float | None
    status: str


def attempt_spans(key: str, lane: str, tokens: int, history: Sequence[dict[str, Any]],
                  batch_status: str | None) -> list[Span]:
    """The submissions of one shard attempt, read from its ledger history (`status`, `at`).

    A submission starts at `creating` (or `submitted` when there was no create: the real-time
    lane) and ends at the first terminal batch status after it (`batch:completed`, ...) or, when
    the provider's status was not recorded as an event, at `ended`/`collected` with the record's
    `batch_status`. A requeued attempt (token limit) has one span per submission.
    """
    spans: list[Span] = []
    queued_from: float | None = None
    start: float | None = None
    for event in history:
        status, at = str(event["status"]), epoch(str(event["at"]))
        if queued_from is None:
            queued_from = at
        if start is None:
            if status in _STARTS:
                start = at
            continue
        terminal = status.removeprefix("batch:") if status.startswith("batch:") else None
        if terminal in TERMINAL or status in _ENDS:
            spans.append(Span(key, lane, len(spans) + 1, tokens, queued_from, start, at,
                              terminal or batch_status or "completed"))
            queued_from, start = at, None
    if start is not None:
        spans.append(Span(key, lane, len(spans) + 1, tokens, queued_from or start, start, None, "in flight"))
    return spans


def inflight_series(spans: Iterable[Span], *, now: float) -> tuple[list[float], list[int]]:
    """This run's tokens in the provider's queue over time, as a step function (`where="post"`):
    the sum of the tokens of every submission between its submit and its terminal status.

    Only the batch lane counts (a real-time call is not enqueued), and not a submission that
    ended `failed` (refused at validation, e.g. `token_limit_exceeded`: the provider never
    queued it); an unfinished span counts until `now`.
    """
    deltas: dict[float, int] = {}
    for s in spans:
        if s.lane != "batch" or s.status == "failed":
            continue
        deltas[s.start] = deltas.get(s.start, 0) + s.tokens
        end = s.end if s.end is not None else now
        deltas[end] = deltas.get(end, 0) - s.tokens
    times = sorted(deltas)
    level, values = 0, []
    for t in times:
        level += deltas[t]
        values.append(level)
    return times, values


class BadQueueSamples(TerminalError, ValueError):
    """A run's queue samples file lacks a column the report plots."""


def check_queue_samples(frame: pl.DataFrame, where: str = "queue.parquet") -> pl.DataFrame:
    """The provider-queue samples (`queue.parquet`), sorted by time; a clear error naming the
    file when a column is missing."""
    missing = [c for c in QUEUE_COLUMNS if c not in frame.columns]
    if missing:
        raise BadQueueSamples(f"{where} lacks column(s) {', '.join(missing)}")
    return frame.select(QUEUE_COLUMNS).sort("t")


def time_unit(seconds: float) -> tuple[str, float]:
    """The unit to label a time axis of this length with, and its size in seconds."""
    if seconds < 600:
        return "s", 1.0
    if seconds < 6 * 3600:
        return "min", 60.0
    return "h", 3600.0


@dataclass(frozen=True)
class AttemptTokens:
    """Tokens of one shard attempt: planned, and what the provider reported using."""

    key: str
    lane: str
    planned: int
    input_reported: int | None
    output_reported: int | None


def attempt_tokens(key: str, lane: str, planned: int, usage: dict[str, Any] | None) -> AttemptTokens:
    """Planned and reported tokens of one attempt (`usage` is the ledger's, None when none)."""
    def num(name: str) -> int | None:
        v = (usage or {}).get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    return AttemptTokens(key, lane, planned, num("input_tokens"), num("output_tokens"))


def failures_by_code(failures: pl.DataFrame, *, examples: int = 3) -> list[dict[str, Any]]:
    """Failures grouped by code, most frequent first, with the first `examples` of each
    (unit_id, stage, message)."""
    if failures.is_empty():
        return []
    out = []
    grouped = failures.group_by("code").agg(
        pl.len().alias("count"),
        pl.struct("unit_id", "stage", "message").head(examples).alias("examples"),
    ).sort(["count", "code"], descending=[True, False])
    for row in grouped.iter_rows(named=True):
        out.append({"code": row["code"], "count": int(row["count"]), "examples": row["examples"]})
    return out


def cost_rows(final: dict[str, Any]) -> dict[str, Any]:
    """Cost per lane, estimated against reported, from a run summary (`final`).

    The plan's estimate is for the whole plan at one lane's price (batch, and real-time);
    `reported` is what the provider finished, each lane at its own price.
    """
    lanes = final.get("lanes") or {}
    return {
        "estimate_batch_usd": float(final.get("cost_estimate_usd") or 0.0),
        "estimate_realtime_usd": float(final.get("cost_estimate_realtime_usd") or 0.0),
        "estimate_tokens": final.get("cost_estimate_tokens") or {},
        "reported_usd": float(final.get("cost_reported_usd") or 0.0),
        "lanes": [{"lane": name, "input_tokens": int(v.get("input_tokens") or 0),
                   "output_tokens": int(v.get("output_tokens") or 0), "usd": float(v.get("usd") or 0.0)}
                  for name, v in sorted(lanes.items())],
        "usage": final.get("usage") or {},
    }


def summary_rows(info: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """The run's scalar figures per stage (snapshot, plan, final) as (name, value) text rows."""
    from batchyard.pricing import figure

    out: dict[str, list[tuple[str, str]]] = {}
    for stage in ("snapshot", "plan", "final"):
        rows = []
        for k, v in (info.get(stage) or {}).items():
            if isinstance(v, list):
                rows.append((k, ", ".join(map(str, v)) or "none"))
            elif isinstance(v, int) and not isinstance(v, bool):
                rows.append((k, f"{v:,}"))
            elif not isinstance(v, dict):
                rows.append((k, figure(k, v)))
        if rows:
            out[stage] = rows
    return out
