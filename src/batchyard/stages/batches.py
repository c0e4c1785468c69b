"""Submit, track and collect shard attempts through the Batch API and the ledger.

Each function handles one shard attempt and is safe to call again after a crash at any point:
intent is in the ledger before every remote side effect, an interrupted upload or create
adopts what the server already has (matched by file name or batch metadata), and downloads
and parsing are idempotent rewrites. `select_submittable` is the pure throttle.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import polars as pl

from batchyard.crash import crashpoint
from batchyard.errors import ApiTerminalError, LedgerError
from batchyard.stages.join import OUTCOMES, next_attempt
from batchyard.stages.plan import shard_bytes
from batchyard.storage.ledger import Ledger, ShardRecord
from batchyard.storage.runs import utcnow

if TYPE_CHECKING:
    from collections.abc import Sequence

    from batchyard.clients.batch_api import BatchApi
    from batchyard.settings import LimitsSettings
    from batchyard.storage.runs import RunStore

log = logging.getLogger(__name__)

_SLACK_S = 300.0  # clock skew allowed when adopting remote objects


class ShardParser(Protocol):
    """What a job provides to turn one attempt's files into per-unit rows."""

    def parse_attempt(
        self, requests: pl.DataFrame, output: bytes, errors: bytes, batch: ShardRecord
    ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """(payload rows keyed by custom_id[/unit_id], OUTCOMES, anomalies)."""
        ...

    def payload_keys(self) -> list[str]:
        """Join keys of the payload rows: ["custom_id"] or ["custom_id", "unit_id"]."""
        ...


# throttle


@dataclass(frozen=True)
class Throttle:
    """Admission limits for new batches."""

    token_budget: int
    batches_per_hour: int
    max_live: int

    @classmethod
    def from_limits(cls, limits: LimitsSettings) -> Throttle:
        """From settings."""
        return cls(limits.enqueued_token_budget, limits.batches_per_hour, limits.max_live_batches)


def select_submittable(records: Sequence[ShardRecord], throttle: Throttle, *, now: float) -> list[ShardRecord]:
    """Shard attempts to submit now, in order, keeping every model under its token budget.

    Interrupted submissions (uploading, creating) always continue: their tokens already count.
    A shard requeued after `token_limit_exceeded` waits until its model has nothing in flight,
    then runs alone, so a second token-limit failure proves it can never fit.
    The queue is kept as full as the budget allows: every shard that fits is admitted.
    """
    inflight: dict[str, int] = defaultdict(int)
    live = 0
    for r in records:
        if r.in_flight:
            inflight[r.model] += r.tokens
            live += 1
    created = sorted(r.created_at for r in records if r.created_at is not None)
    recent = sum(1 for t in created if now - t < 3600)
    chosen = [r for r in records if r.state in ("uploading", "creating")]
    exclusive: set[str] = set()  # models whose requeued shard must run alone this round
    for r in records:
        if r.state not in ("planned", "uploaded") or live >= throttle.max_live:
            continue
        if recent + len(chosen) >= throttle.batches_per_hour:
            break
        if r.model in exclusive or (r.wait_for_drain and inflight[r.model] > 0):
            continue
        if inflight[r.model] and inflight[r.model] + r.tokens > throttle.token_budget:
            continue
        chosen.append(r)
        inflight[r.model] += r.tokens
        live += 1
        if r.wait_for_drain:
            exclusive.add(r.model)
    return chosen


# submit


def submit_shard(run: RunStore, api: BatchApi, name: str) -> ShardRecord:
    """Upload a shard attempt and create its batch (resuming whatever a crash interrupted)."""
    ledger = Ledger(run)
    rec = ledger.load(name)
    resumed = rec.state
    if rec.state == "planned":
        rec = ledger.move(rec, "uploading", intent_at=_iso_now())
    if rec.state == "uploading":
        data = run.staging.read_bytes(run.rel("shards", f"{name}.jsonl"))
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            raise LedgerError(name, "shard file does not match its recorded sha256")
        file_id = None
        if resumed == "uploading":
            file_id = api.find_file(rec.upload_filename, len(data), since=_since(rec))
        file_id = file_id or api.upload(rec.upload_filename, data)
        crashpoint("after_upload")
        rec = ledger.move(rec, "uploaded", file_id=file_id)
    if rec.state == "uploaded":
        rec = ledger.move(rec, "creating", intent_at=_iso_now(), wait_for_drain=False)
    if rec.state == "creating":
        batch = api.find_batch(rec.metadata(), since=_since(rec)) if resumed == "creating" else None
        if batch is not None:
            log.warning("shard %s: adopted existing batch %s", name, batch["id"])
        batch = batch or api.create_batch(rec.file_id or "", rec.endpoint, rec.metadata(), since=_since(rec))
        crashpoint("after_create")
        rec = ledger.move(
            rec, "submitted", batch_id=batch["id"], batch_status=batch["status"], created_at=float(batch["created_at"])
        )
    return rec


def _iso_now() -> str:
    return utcnow().isoformat()


def _since(rec: ShardRecord) -> float:
    """Oldest creation time a remote object of this submission can have (for adoption scans)."""
    if rec.intent_at is None:
        return 0.0
    return datetime.fromisoformat(rec.intent_at).timestamp() - _SLACK_S


# track


def poll_shard(run: RunStore, api: BatchApi, name: str) -> ShardRecord:
    """Fetch a submitted batch's status into the ledger."""
    ledger = Ledger(run)
    rec = ledger.load(name)
    if rec.state != "submitted" or rec.batch_id is None:
        return rec
    batch = api.retrieve(rec.batch_id)
    crashpoint("during_poll")
    return ledger.observe(rec, batch)


def cancel_shard(run: RunStore, api: BatchApi, name: str) -> ShardRecord:
    """Ask the server to cancel a live batch; the tracker collects what finished."""
    ledger = Ledger(run)
    rec = ledger.load(name)
    if rec.state != "submitted" or not rec.batch_id or rec.batch_status == "cancelling":
        return rec
    try:
        batch = api.cancel(rec.batch_id)
    except ApiTerminalError:
        # it ended meanwhile (a terminal batch cannot be cancelled): record what it is now
        batch = api.retrieve(rec.batch_id)
    return ledger.observe(rec, batch)


# collect


def attempt_requests(run: RunStore, shard: str, attempt: int) -> pl.DataFrame:
    """The plan rows of one shard attempt."""
    if attempt == 1:
        return run.staging.read_parquet(run.rel("requests.parquet")).filter(pl.col("shard") == shard)
    return run.staging.read_parquet(run.rel("followups", f"{shard}.{attempt}.parquet"))


def _download(run: RunStore, api: BatchApi, file_id: str | None, folder: str, name: str) -> bytes:
    if not file_id:
        return b""
    rel = run.rel(folder, f"{name}.jsonl")
    if run.staging.exists(rel):
        return run.staging.read_bytes(rel)
    data = api.content(file_id)
    run.staging.write_bytes(rel, data)
    return data


def collect_shard(run: RunStore, api: BatchApi, name: str, parser: ShardParser, *, max_attempts: int) -> ShardRecord:
    """Download, join and settle an ended shard attempt; plan its follow-up attempt if needed."""
    ledger = Ledger(run)
    rec = ledger.load(name)
    if rec.state != "ended":
        return rec
    requests = attempt_requests(run, rec.shard, rec.attempt)
    if rec.batch_status == "failed":
        if any(e.get("code") == "token_limit_exceeded" for e in rec.errors):
            if rec.submission == 1:
                return ledger.requeue(rec, "token_limit_exceeded")
            # it was requeued and ran alone, and still did not fit: waiting cannot help
            outcomes = _all_fail(requests, "token_limit_exceeded",
                                 f"shard {name} alone exceeds the provider's enqueued-token limit "
                                 f"({rec.tokens} tokens planned); lower limits.max_tokens_per_batch")
        else:
            outcomes = _validation_outcomes(requests, rec)
        payload, anomalies = pl.DataFrame(), None
    else:
        output = _download(run, api, rec.output_file_id, "outputs", name)
        crashpoint("during_download")
        errors = _download(run, api, rec.error_file_id, "errors", name)
        payload, outcomes, anomalies = parser.parse_attempt(requests, output, errors, rec)
    crashpoint("before_collect")
    nxt, failed = next_attempt(requests, outcomes, max_attempts=max_attempts)
    units = _unit_rows(requests, outcomes, failed, rec)
    units = units.join(payload, on=parser.payload_keys(), how="left") if payload.height else units
    run.staging.write_parquet(run.rel("parsed", f"{name}.parquet"), units)
    if anomalies is not None and anomalies.height:
        run.staging.write_parquet(run.rel("anomalies", f"{name}.parquet"), anomalies)
    if nxt.height:
        plan_followup(run, rec, nxt)
    counts = {k: int(v) for k, v in outcomes.group_by("outcome").len().iter_rows()}
    return ledger.move(rec, "collected", outcome=counts)


def _all_fail(requests: pl.DataFrame, code: str, message: str) -> pl.DataFrame:
    return requests.select(
        "custom_id", outcome=pl.lit("fail"), code=pl.lit(code), message=pl.lit(message),
        status_code=pl.lit(None, pl.Int64),
    )


def _validation_outcomes(requests: pl.DataFrame, rec: ShardRecord) -> pl.DataFrame:
    """A batch failed validation: named lines fail, the rest are requeued; no line named: retry all."""
    lines = requests.select("custom_id").with_row_index("line_no", offset=1)
    by_line = {int(e["line"]): e for e in rec.errors if e.get("line")}
    rows = []
    for line, cid in lines.iter_rows():
        err = by_line.get(int(line))
        if err:
            rows.append((cid, "fail", err.get("code") or "invalid_request",
                         f"batch {rec.batch_id} rejected line {line} ({cid}): {err.get('message')}", None))
        elif by_line:
            rows.append((cid, "requeue", "batch_failed", f"batch {rec.batch_id} failed on other lines", None))
        else:
            # no line named: the file as a whole was refused; retry it within the budget
            msg = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in rec.errors) or "no reason given"
            rows.append((cid, "retry", "batch_failed", f"batch {rec.batch_id} failed validation: {msg}", None))
    return pl.DataFrame(rows, schema=OUTCOMES, orient="row")


def _unit_rows(requests: pl.DataFrame, outcomes: pl.DataFrame, failed: pl.DataFrame, rec: ShardRecord) -> pl.DataFrame:
    """Per unit: its request's outcome, settled as ok / fail (final) / pending (follow-up)."""
    final_fail = failed["custom_id"].implode()
    return (
        requests.select("custom_id", "unit_ids")
        .explode("unit_ids")
        .rename({"unit_ids": "unit_id"})
        .join(outcomes, on="custom_id", how="left")
        .with_columns(
            final=pl.when(pl.col("outcome") == "ok")
            .then(pl.lit("ok"))
            .when(pl.col("custom_id").is_in(final_fail))
            .then(pl.lit("fail"))
            .otherwise(pl.lit("pending")),
            attempt=pl.lit(rec.attempt, pl.Int64),
            shard=pl.lit(rec.shard),
            batch_id=pl.lit(rec.batch_id, pl.String),
        )
    )


def plan_followup(run: RunStore, rec: ShardRecord, nxt: pl.DataFrame) -> ShardRecord:
    """Write the follow-up attempt's plan, shard file (identical lines) and ledger record."""
    attempt = rec.attempt + 1
    name = f"{rec.shard}.{attempt}"
    ledger = Ledger(run)
    if ledger.exists(name):
        return ledger.load(name)
    nxt = nxt.with_columns(attempt=pl.lit(attempt, pl.Int64))
    run.staging.write_parquet(run.rel("followups", f"{name}.parquet"), nxt)
    data = shard_bytes(nxt["line"])
    run.staging.write_bytes(run.rel("shards", f"{name}.jsonl"), data)
    return ledger.create(
        ShardRecord(
            run_id=rec.run_id, job=rec.job, shard=rec.shard, attempt=attempt, endpoint=rec.endpoint,
            model=rec.model, sha256=hashlib.sha256(data).hexdigest(), n_requests=nxt.height,
            n_inputs=int(nxt["n_inputs"].sum()), bytes=len(data), tokens=int(nxt["tokens"].sum()),
        )
    )


def write_shards(run: RunStore, requests: pl.DataFrame, *, job: str, endpoint: str, model: str) -> list[ShardRecord]:
    """Write the first attempt's shard files and `planned` ledger records."""
    ledger = Ledger(run)
    out = []
    for (shard,), part in requests.group_by(["shard"], maintain_order=True):
        data = shard_bytes(part["line"])
        name = f"{shard}.1"
        run.staging.write_bytes(run.rel("shards", f"{name}.jsonl"), data)
        out.append(
            ledger.create(
                ShardRecord(
                    run_id=run.run_id, job=job, shard=str(shard), attempt=1, endpoint=endpoint, model=model,
                    sha256=hashlib.sha256(data).hexdigest(), n_requests=part.height,
                    n_inputs=int(part["n_inputs"].sum()), bytes=len(data), tokens=int(part["tokens"].sum()),
                )
            )
        )
    return out


def summary(records: Sequence[ShardRecord]) -> dict[str, Any]:
    """Counts by state and by batch status."""
    by_state: dict[str, int] = defaultdict(int)
    by_status: dict[str, int] = defaultdict(int)
    for r in records:
        by_state[r.state] += 1
        if r.batch_status:
            by_status[r.batch_status] += 1
    return {"shards": len(records), "by_state": dict(by_state), "by_status": dict(by_status)}
