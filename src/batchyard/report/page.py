"""`batchyard report RUN`: one self-contained HTML page about a run, from its staging alone.

Why: auditing a run should not mean reading tables in a terminal. The page shows the summary,
the cost per lane (estimated against reported), a timeline of every shard attempt, the provider
queue's fill, tokens per shard attempt, failures by code with examples, and the bins with their
partition keys. It reads only staged files (run.json, partition.json, the ledger, the failures
dataset, `queue.parquet` when the run has it), so it works after the provider deleted its files
and makes no API call. The page loads nothing: the plots are inline SVG with text drawn as
paths, the style sheet is inline, and there is no script.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from markupsafe import Markup

from batchyard.report import data, plots

if TYPE_CHECKING:
    from batchyard.storage.runs import RunStore

QUEUE_FILE = "queue.parquet"
REPORT_FILE = "report.html"
MAX_KEYS_SHOWN = 50
"""Partition keys listed per bin (the rest are counted)."""

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("batchyard.report", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class Written:
    """Where a report went: a staging path (local or s3://) or a local file."""

    location: str
    bytes: int


def build(run: RunStore, *, now: float | None = None) -> str:
    """The report page of `run`, as HTML text."""
    from batchyard.runner.summary import failures_frame, partition_table
    from batchyard.storage.ledger import run_records

    info = run.read_run()
    now = now if now is not None else time.time()
    t0 = data.epoch(info["created_at"])
    records = run_records(run)
    spans = [s for r in records
             for s in data.attempt_spans(r.key, r.lane, r.tokens, [e.model_dump() for e in r.history], r.batch_status)]
    last_event = max([data.epoch(e.at) for r in records for e in r.history] or [t0])
    if info.get("phase") == "done":
        now = min(now, last_event)  # a finished run's time axis ends with its last event
    times, values = data.inflight_series(spans, now=now)
    samples = _queue_samples(run)
    tokens = [data.attempt_tokens(r.key, r.lane, r.tokens, r.usage) for r in records]
    failures = data.failures_by_code(failures_frame(run))
    cost = data.cost_rows(info.get("final") or {})
    budget = _budget(info, {r.model for r in records})
    sections = {
        "cost": plots.cost_plot(cost) if info.get("final") else None,
        "timeline": plots.timeline_plot(spans, t0=t0, now=now) if spans else None,
        "queue": plots.queue_plot(t0=t0, times=times, values=values, budget=budget, samples=samples)
        if spans or samples is not None else None,
        "tokens": plots.tokens_plot(tokens) if tokens else None,
        "failures": plots.failures_plot(failures) if failures else None,
    }
    return _ENV.get_template("report.html.j2").render(
        info=info,
        run_id=run.run_id,
        job=run.job,
        summary=data.summary_rows(info),
        cost=cost,
        spans=spans,
        attempts=len(records),
        submissions=len(spans),
        queue_sampled=samples is not None,
        budget=budget,
        failures=failures,
        partitions=_partitions(run, partition_table(run)),
        plots={k: Markup(v) if v else None for k, v in sections.items()},
        generated_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )


def write(run: RunStore, out: Path | None = None) -> Written:
    """Build the report and write it: to `out` (a local file), or to `<run>/report.html` in
    staging (local or S3, atomically)."""
    page = build(run).encode("utf-8")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(page)
        return Written(str(out.resolve()), len(page))
    rel = run.rel(REPORT_FILE)
    run.staging.write_bytes(rel, page)
    return Written(run.staging.path(rel), len(page))


def _queue_samples(run: RunStore) -> Any:
    rel = run.rel(QUEUE_FILE)
    if not run.staging.exists(rel):
        return None
    return data.check_queue_samples(run.staging.read_parquet(rel), where=run.staging.path(rel))


def _budget(info: dict[str, Any], models: set[str]) -> int | None:
    """The enqueued-token budget the run's throttle kept under: the configured one, or the
    provider's stated limit for the run's model (run.json `provider_limits`) when lower."""
    budget = ((info.get("params") or {}).get("limits") or {}).get("enqueued_token_budget")
    stated = [v.get("enqueued_tokens") for limits in (info.get("provider_limits") or {}).values()
              for m, v in limits.items() if m in models and isinstance(v, dict)]
    candidates = [b for b in [budget, *stated] if isinstance(b, int) and b > 0]
    return min(candidates) if candidates else None


def _partitions(run: RunStore, table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The status table's bins, each with its partition keys in full (up to MAX_KEYS_SHOWN)."""
    by_pid = {p.pid: p for p in run.partitions()}
    out = []
    for row in table:
        state = by_pid[row["partition"]].read_state()
        keys = list(state.get("keys") or state.get("companies") or [])
        out.append({**row, "keys": keys[:MAX_KEYS_SHOWN], "more_keys": max(0, len(keys) - MAX_KEYS_SHOWN)})
    return out
