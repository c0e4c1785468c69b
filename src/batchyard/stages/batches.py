"""Submit, track, download and collect shard attempts through the Batch API and the ledger.

Each function handles one shard attempt (or, for polling, one round over many) and is safe to
call again after a crash at any point: intent is in the ledger before every remote side
effect, an interrupted upload or create adopts what the server already has (matched by file
name or batch metadata), and downloads and parsing are idempotent rewrites.

The work splits by what it needs, so that each part can run where it belongs:

- `submit_shard`, `poll_batches`, `download_shard`, `cancel_shard`: talk to the Batch API (I/O);
- `run_realtime`: the same request lines through the synchronous endpoints (the real-time lane),
  answered into the same output and error files, so collecting cannot tell the lanes apart;
- `collect_shard`: staging only (CPU: parse, join, follow-up plan), so it can run in another
  process or on a Dask worker;
- `select_submittable`, `requeue_delay`: pure decisions.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import polars as pl

from batchyard.crash import crashpoint
from batchyard.errors import ApiTerminalError, BatchyardError, LedgerError, in_shard
from batchyard.quota import TOKEN_LIMIT_CODE, describe_cap, effective_cap, refusal_limit
from batchyard.schemas import FAILURES
from batchyard.stages.join import OUTCOMES, next_attempt
from batchyard.stages.plan import shard_bytes
from batchyard.storage.ledger import Ledger, ShardRecord
from batchyard.storage.runs import utcnow

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from batchyard.clients.batch_api import BatchApi
    from batchyard.clients.realtime import RateLimits
    from batchyard.settings import LaneSettings, LimitsSettings, ProviderSettings
    from batchyard.storage.runs import PartitionStore

log = logging.getLogger(__name__)

_SLACK_S = 300.0  # clock skew allowed when adopting remote objects or scanning batch lists


class ShardParser(Protocol):
    """What a job provides to turn one attempt's files into per-unit rows and results."""

    def parse_attempt(
        self, requests: pl.DataFrame, output: bytes, errors: bytes, batch: ShardRecord
    ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """(payload rows keyed by custom_id[/unit_id], OUTCOMES, anomalies)."""
        ...

    def payload_keys(self) -> list[str]:
        """Join keys of the payload rows: ["custom_id"] or ["custom_id", "unit_id"]."""
        ...

    def payload_schema(self) -> dict[str, pl.DataType]:
        """Columns of the payload rows (typed nulls when an attempt produced none)."""
        ...

    def expand_units(self, part: PartitionStore, units: pl.DataFrame) -> pl.DataFrame:
        """Unit rows plus the rows of units served by the same request (aliases)."""
        ...

    def result_rows(self, part: PartitionStore, ok: pl.DataFrame) -> pl.DataFrame:
        """Typed result rows from settled `ok` unit rows."""
        ...

    def replan_requests(
        self, part: PartitionStore, requests: pl.DataFrame, max_tokens: int
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(requests re-cut into shards of at most `max_tokens` tokens, unfittable units)."""
        ...


@dataclass(frozen=True)
class Retries:
    """How failed and unfinished work is retried (from settings)."""

    max_attempts: int
    max_requeues: int
    backoff_s: float
    backoff_max_s: float
    token_budget: int
    token_limit_wait_s: float
    realtime_tail: bool = False
    """auto lane: requests past the requeue limit go to a real-time follow-up instead of failing."""

    @classmethod
    def from_settings(cls, limits: LimitsSettings, provider: ProviderSettings,
                      lane: LaneSettings | None = None) -> Retries:
        """From the limits, provider and lane settings."""
        return cls(
            max_attempts=limits.max_attempts,
            max_requeues=limits.max_requeues,
            backoff_s=provider.requeue_backoff_s,
            backoff_max_s=provider.requeue_backoff_max_s,
            token_budget=limits.enqueued_token_budget,
            token_limit_wait_s=limits.token_limit_wait_s,
            realtime_tail=lane is not None and lane.mode == "auto",
        )

    def delay(self, n: int) -> float:
        """Seconds to wait before the n-th successive requeue (n >= 1): base, 2x base, 4x ..."""
        return min(self.backoff_s * 2 ** max(0, n - 1), self.backoff_max_s)


# throttle


@dataclass(frozen=True)
class Throttle:
    """Admission limits for new batches, and what the provider's queue already holds."""

    token_budget: int
    batches_per_hour: int
    max_live: int
    learned: Mapping[str, int] = field(default_factory=dict)
    """Model -> the enqueued-token limit the provider stated (`batchyard.quota`)."""
    others: Mapping[str, int] = field(default_factory=dict)
    """Model -> tokens (ours) other runs and workers of the account hold in the queue."""
    others_requests: Mapping[str, int] = field(default_factory=dict)
    """Model -> requests other runs and workers of the account hold in the queue."""
    ratio: Mapping[str, float] = field(default_factory=dict)
    """Model -> the provider's tokens per token of ours (learned; 1.0 when unknown)."""
    request_budget: int | None = None
    """Enqueued requests allowed per model (embeddings; None: no cap)."""

    @classmethod
    def from_limits(cls, limits: LimitsSettings, learned: Mapping[str, int] | None = None) -> Throttle:
        """From settings, and the limits the provider stated."""
        return cls(limits.enqueued_token_budget, limits.batches_per_hour, limits.max_live_batches,
                   dict(learned or {}))

    def budget(self, model: str) -> int:
        """Tokens allowed in flight for `model`: the configured budget, or the stated limit if lower."""
        return effective_cap(self.token_budget, self.learned.get(model))

    def largest(self, model: str) -> int:
        """The most tokens (ours) one shard may have to fit the budget in the provider's count."""
        from batchyard.provider_queue import MARGIN

        return int(self.budget(model) / (self.ratio.get(model, 1.0) * (1 + MARGIN)))

    def fits(self, model: str, inflight: int, tokens: int) -> bool:
        """Whether `tokens` more fit beside `inflight` (ours) under the budget, as the provider counts."""
        from batchyard.provider_queue import fits

        return fits(inflight, tokens, self.budget(model), self.ratio.get(model, 1.0))


def select_submittable(records: Sequence[ShardRecord], throttle: Throttle, *, now: float) -> list[ShardRecord]:
    """Shard attempts to submit now, in order, keeping every model under its token budget.

    Interrupted submissions (uploading, creating) always continue: their tokens already count.
    What other runs of the account hold counts too (`throttle.others`), in the provider's count
    (`throttle.ratio`). A shard held back by a backoff (`not_before`) waits, except one refused
    for the queue's capacity while other batches held it: that one goes as soon as it fits again
    (a batch ended), not after its backoff. One being re-planned (`split_cap`) is never sent.
    The queue is kept as full as the budget allows: every shard that fits is admitted; a shard
    larger than the whole budget is still admitted when nothing else of its model is in flight,
    so a run can never deadlock.
    """
    inflight: dict[str, int] = defaultdict(int, throttle.others)
    requests: dict[str, int] = defaultdict(int, throttle.others_requests)
    live = 0
    for r in records:
        if r.in_flight:
            inflight[r.model] += r.tokens
            requests[r.model] += r.n_requests
            live += 1
    created = sorted(r.created_at for r in records if r.created_at is not None)
    recent = sum(1 for t in created if now - t < 3600)
    chosen = [r for r in records if r.state in ("uploading", "creating")]
    for r in records:
        if r.state not in ("planned", "uploaded") or live >= throttle.max_live or r.split_cap is not None:
            continue
        if recent + len(chosen) >= throttle.batches_per_hour:
            break
        busy = inflight[r.model] > 0
        if r.not_before is not None and r.not_before > now:
            capacity_refused = r.token_limit_since is not None and r.submission > 1
            if not (capacity_refused and busy and throttle.fits(r.model, inflight[r.model], r.tokens)):
                continue
        if busy and not throttle.fits(r.model, inflight[r.model], r.tokens):
            continue
        if (throttle.request_budget is not None and requests[r.model]
                and requests[r.model] + r.n_requests > throttle.request_budget):
            continue
        chosen.append(r)
        inflight[r.model] += r.tokens
        requests[r.model] += r.n_requests
        live += 1
    return chosen


# submit


def submit_shard(part: PartitionStore, api: BatchApi, name: str) -> ShardRecord:
    """Upload a shard attempt and create its batch (resuming whatever a crash interrupted).

    An input file the provider no longer has (expired, deleted) is uploaded again from staging
    (sha256 checked) instead of creating with a dead id. Any failure's message names the run
    and the shard.
    """
    ledger = Ledger(part)
    rec = ledger.load(name)
    try:
        return _submit(part, api, ledger, rec)
    except BatchyardError as exc:
        raise in_shard(exc, rec.run_id, rec.key)  # noqa: B904 - the same exception, re-raised


def _submit(part: PartitionStore, api: BatchApi, ledger: Ledger, rec: ShardRecord) -> ShardRecord:
    resumed = rec.state
    if rec.state == "planned":
        rec = ledger.move(rec, "uploading", intent_at=_iso_now())
    if rec.state == "uploading":
        rec = _upload(part, api, ledger, rec, adopt=resumed == "uploading")
    if rec.state == "uploaded":
        rec = ledger.move(rec, "creating", intent_at=_iso_now())
    if rec.state == "creating":
        batch = api.find_batch(rec.metadata(), since=_since(rec)) if resumed == "creating" else None
        if batch is not None:
            log.warning("shard %s: adopted existing batch %s", rec.key, batch["id"])
        else:
            rec, batch = _create(part, api, ledger, rec)
        crashpoint("after_create")
        rec = ledger.move(
            rec, "submitted", batch_id=batch["id"], batch_status=batch["status"], created_at=float(batch["created_at"])
        )
        log.info("shard %s: batch %s created (%s)", rec.key, rec.batch_id, rec.batch_status)
    return rec


def _upload(part: PartitionStore, api: BatchApi, ledger: Ledger, rec: ShardRecord, *, adopt: bool) -> ShardRecord:
    """`uploading` -> `uploaded`: the staged shard file (its sha256 checked), or, after a crash
    (`adopt`), the file the interrupted upload left on the server."""
    data = part.staging.read_bytes(part.rel("shards", f"{rec.name}.jsonl"))
    if hashlib.sha256(data).hexdigest() != rec.sha256:
        raise LedgerError(rec.key, f"shards/{rec.name}.jsonl does not match its recorded sha256; nothing was sent")
    file_id = api.find_file(rec.upload_filename, len(data), since=_since(rec)) if adopt else None
    file_id = file_id or api.upload(rec.upload_filename, data)
    crashpoint("after_upload")
    return ledger.move(rec, "uploaded", file_id=file_id)


def _create(part: PartitionStore, api: BatchApi, ledger: Ledger, rec: ShardRecord
            ) -> tuple[ShardRecord, dict[str, Any]]:
    """Create the batch; when the provider lost the input file, upload the shard again once."""
    try:
        return rec, api.create_batch(rec.file_id or "", rec.endpoint, rec.metadata(), since=_since(rec))
    except ApiTerminalError:
        if not rec.file_id or api.file_exists(rec.file_id):
            raise
    log.warning("shard %s: the provider no longer has input file %s; uploading the shard again from staging",
                rec.key, rec.file_id)
    rec = ledger.move(rec, "uploading", note=f"input file {rec.file_id} gone at the provider: uploading again",
                      file_id=None, intent_at=_iso_now())
    rec = _upload(part, api, ledger, rec, adopt=False)
    rec = ledger.move(rec, "creating", intent_at=_iso_now())
    return rec, api.create_batch(rec.file_id or "", rec.endpoint, rec.metadata(), since=_since(rec))


def _iso_now() -> str:
    return utcnow().isoformat()


def _since(rec: ShardRecord) -> float:
    """Oldest creation time a remote object of this submission can have (for adoption scans)."""
    if rec.intent_at is None:
        return 0.0
    return datetime.fromisoformat(rec.intent_at).timestamp() - _SLACK_S


# the real-time lane


def run_realtime(
    part: PartitionStore,
    client: Any,
    name: str,
    settings: LaneSettings,
    *,
    limits: RateLimits | None = None,
    cancel: threading.Event | None = None,
    encoding: str | None = None,
) -> ShardRecord:
    """Send a shard attempt's lines to the synchronous endpoints; stage the answers like a batch's.

    The answers are staged slice by slice (`outputs/<name>.rt/<first>-<end>.jsonl`: the
    attempt's requests first..end-1, errors alike). A slice holds at most
    `settings.slice_requests` requests and at most one window of the lane's tokens (a larger
    request is a slice of its own), so a crash re-sends at most that much, and a resumed attempt
    sends only the requests no staged slice holds, whatever the settings are by then. Once every
    request is answered, the slices are joined in order into `outputs/<name>.jsonl` and
    `errors/<name>.jsonl` and the attempt is `ended` as a `completed` batch of the `realtime`
    lane, with the usage its answers carry (as a batch reports it). Requests are fitted to the
    lane's window (`clients/realtime.py`: an embeddings request is sent as several calls, with
    `encoding` to count its inputs).
    """
    from batchyard.clients.realtime import RateLimits, add_counts, run_shard, usage_of

    ledger = Ledger(part)
    rec = ledger.load(name)
    if rec.state in ("planned", "uploaded"):
        rec = ledger.move(rec, "submitted", lane="realtime", batch_id=f"realtime:{rec.key}#{rec.submission}",
                          batch_status="in_progress", created_at=time.time(), intent_at=_iso_now())
    if rec.state != "submitted" or rec.lane != "realtime":
        return rec
    st = part.staging
    lines = st.read_bytes(part.rel("shards", f"{name}.jsonl")).splitlines()
    tokens = attempt_requests(part, rec.shard, rec.attempt)["tokens"].to_list()
    limits = limits or RateLimits(settings.realtime)
    staged = [_slice_range(n) for n in st.list(part.rel("outputs", f"{name}.rt"), ".jsonl")]
    done = {i for r in staged if r for i in range(*r)}
    for lo, hi in realtime_slices(tokens, done, max_requests=settings.slice_requests, max_tokens=limits.max_tokens):
        answered = run_shard(client, zip(lines[lo:hi], tokens[lo:hi], strict=True),
                             settings.realtime, limits=limits, cancel=cancel, encoding=encoding)
        st.write_bytes(part.rel("errors", f"{name}.rt", f"{lo:06d}-{hi:06d}.jsonl"), answered.errors)
        # last: its presence marks the slice answered
        st.write_bytes(part.rel("outputs", f"{name}.rt", f"{lo:06d}-{hi:06d}.jsonl"), answered.output)
        rec = ledger.move(rec, "submitted", realtime=add_counts(dict(rec.realtime or {}), answered.stats.as_dict()))
        crashpoint("during_realtime")
    slices = st.list(part.rel("outputs", f"{name}.rt"), ".jsonl")
    output = b"".join(st.read_bytes(part.rel("outputs", f"{name}.rt", n)) for n in slices)
    errors = b"".join(st.read_bytes(part.rel("errors", f"{name}.rt", n)) for n in slices)
    st.write_bytes(part.rel("outputs", f"{name}.jsonl"), output)
    st.write_bytes(part.rel("errors", f"{name}.jsonl"), errors)
    n_out, n_err = output.count(b"\n"), errors.count(b"\n")
    stats = rec.realtime or {}
    log.info("shard %s: %d request(s) answered real-time in %d slice(s), %d call(s), %d attempt(s), retries %s "
             "(%d ok lines, %d error lines)", rec.key, len(lines), len(slices), stats.get("calls", 0),
             stats.get("attempts", 0), stats.get("retries") or "none", n_out, n_err)
    counts = {"total": len(lines), "completed": n_out, "failed": n_err}
    return ledger.observe(rec, {"status": "completed", "request_counts": counts, "usage": usage_of(output)},
                          downloaded=True)


def _slice_range(name: str) -> tuple[int, int] | None:
    """(first, end) of a staged slice named `<first>-<end>.jsonl`."""
    first, _, end = name.removesuffix(".jsonl").partition("-")
    return (int(first), int(end)) if first.isdigit() and end.isdigit() else None


def realtime_slices(tokens: Sequence[int], done: set[int], *, max_requests: int,
                    max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive ranges [first, end) of the requests not `done`, each at most `max_requests`
    requests and `max_tokens` planned tokens (a larger request alone)."""
    out: list[tuple[int, int]] = []
    lo = 0
    while lo < len(tokens):
        if lo in done:
            lo += 1
            continue
        hi, total = lo, 0
        while (hi < len(tokens) and hi not in done and hi - lo < max_requests
               and (hi == lo or total + tokens[hi] <= max_tokens)):
            total += tokens[hi]
            hi += 1
        out.append((lo, hi))
        lo = hi
    return out


# track


def poll_batches(api: BatchApi, records: Iterable[ShardRecord]) -> dict[str, dict[str, Any]]:
    """Current state of every submitted batch among `records`, by batch id.

    One paginated list call (newest first), stopping at the oldest open batch, instead of one
    retrieve per shard; a tracked batch the list did not show (a server that orders otherwise)
    is retrieved on its own.
    """
    open_recs = [r for r in records if r.state == "submitted" and r.batch_id and r.lane == "batch"]
    if not open_recs:
        return {}
    wanted = {r.batch_id for r in open_recs if r.batch_id}
    oldest = min(r.created_at or 0.0 for r in open_recs) - _SLACK_S
    found = api.list_batches(wanted, since=oldest)
    for batch_id in sorted(wanted - found.keys()):
        log.debug("batch %s not in the list: retrieving it", batch_id)
        found[batch_id] = api.retrieve(batch_id)
    crashpoint("during_poll")
    return found


def observe(part: PartitionStore, rec: ShardRecord, batch: dict[str, Any]) -> ShardRecord:
    """Record a polled batch when it changed; moves to `ended` when its status is terminal."""
    if batch["status"] == rec.batch_status and batch.get("request_counts") == rec.request_counts:
        return rec
    new = Ledger(part).observe(rec, batch)
    if new.batch_status != rec.batch_status:
        log.info("shard %s: batch %s is %s", rec.key, rec.batch_id, new.batch_status)
    return new


def cancel_shard(part: PartitionStore, api: BatchApi, name: str) -> ShardRecord:
    """Ask the server to cancel a live batch; the tracker collects what finished."""
    ledger = Ledger(part)
    rec = ledger.load(name)
    if rec.state != "submitted" or not rec.batch_id or rec.batch_status == "cancelling":
        return rec
    try:
        batch = api.cancel(rec.batch_id)
    except ApiTerminalError:
        # it ended meanwhile (a terminal batch cannot be cancelled): record what it is now
        batch = api.retrieve(rec.batch_id)
    return ledger.observe(rec, batch)


# download (I/O) and collect (staging only)


def _download(part: PartitionStore, api: BatchApi, file_id: str | None, folder: str, name: str) -> None:
    if not file_id:
        return
    rel = part.rel(folder, f"{name}.jsonl")
    if not part.staging.exists(rel):
        api.download(file_id, functools.partial(part.staging.write_stream, rel))


def download_shard(part: PartitionStore, api: BatchApi, name: str) -> ShardRecord:
    """Fetch an ended batch's output and error files into staging (idempotent)."""
    ledger = Ledger(part)
    rec = ledger.load(name)
    if rec.state != "ended" or rec.downloaded:
        return rec
    _download(part, api, rec.output_file_id, "outputs", name)
    crashpoint("during_download")
    _download(part, api, rec.error_file_id, "errors", name)
    return ledger.move(rec, "ended", downloaded=True)


def _read(part: PartitionStore, folder: str, name: str) -> bytes:
    rel = part.rel(folder, f"{name}.jsonl")
    return part.staging.read_bytes(rel) if part.staging.exists(rel) else b""


def attempt_requests(part: PartitionStore, shard: str, attempt: int) -> pl.DataFrame:
    """The plan rows of one shard attempt."""
    if attempt == 1:  # only the row groups that hold this shard are read (requests are in shard order)
        return part.staging.scan_parquet([part.rel("requests.parquet")]).filter(pl.col("shard") == shard).collect()
    return part.staging.read_parquet(part.rel("followups", f"{shard}.{attempt}.parquet"))


def collect_shard(
    part: PartitionStore, name: str, parser: ShardParser, retries: Retries, *, now: float | None = None
) -> list[ShardRecord]:
    """Parse and settle a downloaded shard attempt from staging (no API call).

    Writes the attempt's unit rows (`parsed/`), its results part, its failures part and
    anomalies, plans the follow-up attempt for what did not finish, and moves the record to
    `collected`. A batch refused with `token_limit_exceeded` that is larger than the limit
    (the provider's stated one, or the configured budget if lower) is re-planned into shards
    that fit (`split_shard`); one that fits is requeued (with backoff: other batches hold the
    quota) until it has waited `limits.token_limit_wait_s`.
    Returns the records it wrote (the collected or requeued one, and new follow-ups).
    """
    now = time.time() if now is None else now
    ledger = Ledger(part)
    rec = ledger.load(name)
    if rec.state != "ended" or not (rec.downloaded or rec.batch_status == "failed"):
        return [rec]
    verdict = None
    if rec.batch_status == "failed" and any(e.get("code") == TOKEN_LIMIT_CODE for e in rec.errors):
        cap = rec.split_cap or effective_cap(retries.token_budget, refusal_limit(rec.errors))
        if rec.tokens > cap:  # it can never be queued as it is: re-plan it into shards that fit
            return split_shard(part, name, parser, cap, budget=retries.token_budget)
        verdict = _token_limit_waited(rec, retries, now)
        if verdict is None:  # it fits the limit: other batches (maybe other runs') hold the quota
            since = rec.token_limit_since or now
            delay = retries.delay(rec.submission)
            log.warning("shard %s: token_limit_exceeded; resubmitting in %.0f s", rec.key, delay)
            return [ledger.requeue(rec, TOKEN_LIMIT_CODE, not_before=now + delay, since=since)]
    requests = attempt_requests(part, rec.shard, rec.attempt)
    payload, anomalies = pl.DataFrame(), None
    if rec.batch_status == "failed":
        if any(e.get("code") == TOKEN_LIMIT_CODE for e in rec.errors):
            outcomes = _all_fail(requests, TOKEN_LIMIT_CODE, verdict or "")
        else:
            outcomes = _validation_outcomes(requests, rec)
    else:
        output, errors = _read(part, "outputs", name), _read(part, "errors", name)
        payload, outcomes, anomalies = parser.parse_attempt(requests, output, errors, rec)
    crashpoint("before_collect")
    keep = retries.realtime_tail and rec.lane == "batch"
    nxt, failed = next_attempt(requests, outcomes, max_attempts=retries.max_attempts,
                               max_requeues=retries.max_requeues, keep_over_limit=keep)
    _write_attempt(part, rec, parser, _unit_rows(requests, outcomes, failed, rec), payload, anomalies)
    written = []
    if nxt.height:
        requeued = outcomes.filter(pl.col("outcome") == "requeue").height > 0
        over_limit = bool((nxt["requeues"] > retries.max_requeues).any())
        written.append(plan_followup(part, rec, nxt, now=now, retries=retries, requeued=requeued,
                                     lane="realtime" if over_limit else rec.lane))
    counts = {k: int(v) for k, v in outcomes.group_by("outcome").len().iter_rows()}
    return [ledger.move(rec, "collected", outcome=counts), *written]


def recollect_shard(part: PartitionStore, rec: ShardRecord, parser: ShardParser, retries: Retries) -> None:
    """Rebuild a collected attempt's parsed, results, failures and anomalies parts from its
    staged output and error files (`batchyard rerun --from results`); no API call, no new
    follow-up (the one planned at collection stays as it was)."""
    requests = attempt_requests(part, rec.shard, rec.attempt)
    output, errors = _read(part, "outputs", rec.name), _read(part, "errors", rec.name)
    payload, outcomes, anomalies = parser.parse_attempt(requests, output, errors, rec)
    _, failed = next_attempt(requests, outcomes, max_attempts=retries.max_attempts, max_requeues=retries.max_requeues)
    _write_attempt(part, rec, parser, _unit_rows(requests, outcomes, failed, rec), payload, anomalies)


def _write_attempt(
    part: PartitionStore, rec: ShardRecord, parser: ShardParser, units: pl.DataFrame, payload: pl.DataFrame,
    anomalies: pl.DataFrame | None,
) -> None:
    units = units.join(payload, on=parser.payload_keys(), how="left") if payload.height else units
    units = units.with_columns(
        pl.lit(None, dtype).alias(col) for col, dtype in parser.payload_schema().items() if col not in units.columns
    )
    units = parser.expand_units(part, units)
    st, name = part.staging, rec.name
    st.write_parquet(part.rel("parsed", f"{name}.parquet"), units)
    ok = units.filter(pl.col("final") == "ok")
    st.write_parquet(part.rel("results", f"{name}.parquet"), parser.result_rows(part, ok))
    st.write_parquet(part.rel("failures", f"{name}.parquet"), failure_rows(units.filter(pl.col("final") == "fail")))
    if anomalies is not None and anomalies.height:
        st.write_parquet(part.rel("anomalies", f"{name}.parquet"), anomalies)


def _token_limit_waited(rec: ShardRecord, retries: Retries, now: float) -> str | None:
    """Why a token-limited shard that fits the limit fails for good (it waited too long), or None
    when it should wait and retry."""
    since = rec.token_limit_since or now
    if now - since > retries.token_limit_wait_s:
        return (f"shard {rec.key} ({rec.tokens} tokens) was refused with token_limit_exceeded for "
                f"{now - since:.0f} s, over limits.token_limit_wait_s ({retries.token_limit_wait_s:.0f} s)")
    return None


def split_shard(part: PartitionStore, name: str, parser: ShardParser, cap: int, *, budget: int) -> list[ShardRecord]:
    """Re-plan a shard attempt larger than `cap` into follow-up shards that fit under it.

    `cap` is the provider's stated enqueued-token limit or `budget` (limits.enqueued_token_budget),
    whichever is lower. The attempt was refused (`ended`, `token_limit_exceeded`) or is still
    waiting (`planned`, `uploaded`: the limit was learned from another shard). Its requests
    are re-cut by the job (`replan_requests`: embedding inputs are re-packed, inference requests
    kept whole) into `<shard>-<k>` at the next attempt number; a unit too large for `cap` on its
    own fails as `token_limit_unfittable`, naming the limit. The attempt's units are then
    `pending` (in exactly one follow-up) or failed, never both, and the attempt is `collected`
    with `split_into` naming the follow-ups. Crash-safe: the cap is recorded before anything
    is written, so a resumed split cuts the same shards.
    """
    ledger = Ledger(part)
    rec = ledger.load(name)
    if rec.state == "collected":
        return [rec]
    if rec.split_cap is None:
        why = "refused with token_limit_exceeded" if rec.state == "ended" else "not sent"
        rec = ledger.intend_split(rec, cap, f"{why}: {rec.tokens:,} tokens, over "
                                  f"{describe_cap(cap, budget, rec.model)}: re-planning")
    cap = rec.split_cap or cap
    limit = describe_cap(cap, budget, rec.model)
    requests = attempt_requests(part, rec.shard, rec.attempt)
    # pieces fit the cap with the queue's margin (`provider_queue.MARGIN`), as the throttle admits
    # them: a piece cut to the cap itself could never be sent and would be cut again
    from batchyard.provider_queue import MARGIN

    pieces, unfit = parser.replan_requests(part, requests, int(cap / (1 + MARGIN)))
    attempt = rec.attempt + 1
    children = []
    for k, (_, rows) in enumerate(pieces.group_by("shard", maintain_order=True), start=1):
        rows = rows.with_columns(shard=pl.lit(f"{rec.shard}-{k}"), attempt=pl.lit(attempt, pl.Int64))
        children.append(_write_followup(part, rec, rows, shard=f"{rec.shard}-{k}", lane=rec.lane,
                                        requeues=rec.requeues, not_before=None, split_from=rec.name))
    crashpoint("before_collect")
    into = [c.name for c in children]
    hint = "" if cap < budget else "; raise limits.enqueued_token_budget to send it"
    units = _split_unit_rows(rec, requests, unfit, into, limit, hint)
    _write_attempt(part, rec, parser, units, pl.DataFrame(), None)
    if unfit.height:
        log.error("shard %s: %d unit(s) over %s on their own fail as token_limit_unfittable",
                  rec.key, unfit.height, limit)
    log.warning("shard %s (%s tokens) re-planned into %d shard(s) under %s", rec.key, f"{rec.tokens:,}",
                len(children), limit)
    counts = {"replanned": units.height - int(units["final"].eq("fail").sum()), "unfittable": unfit.height}
    done = ledger.move(rec, "collected", note=f"re-planned into {', '.join(into) or 'nothing'}",
                       outcome={k: v for k, v in counts.items() if v}, split_into=into)
    return [done, *children]


def _split_unit_rows(rec: ShardRecord, requests: pl.DataFrame, unfit: pl.DataFrame, into: list[str], limit: str,
                     hint: str) -> pl.DataFrame:
    """Unit rows of a re-planned attempt: `pending` (in one of `into`), or failed as
    `token_limit_unfittable` when the unit alone is over the limit."""
    is_unfit = pl.col("unit_id").is_in(unfit["unit_id"].unique().implode())
    tokens = pl.col("unit_id").replace_strict(dict(unfit.select("unit_id", "tokens").iter_rows()), default=None,
                                              return_dtype=pl.Int64)
    return (
        requests.select("custom_id", "unit_ids").explode("unit_ids").rename({"unit_ids": "unit_id"})
        .with_columns(
            outcome=pl.when(is_unfit).then(pl.lit("fail")).otherwise(pl.lit("requeue")),
            code=pl.when(is_unfit).then(pl.lit("token_limit_unfittable")).otherwise(pl.lit(TOKEN_LIMIT_CODE)),
            message=pl.when(is_unfit)
            .then(pl.format("{} tokens on its own, more than {}: it can never be queued{}", tokens, pl.lit(limit),
                            pl.lit(hint)))
            .otherwise(pl.lit(f"re-planned into {', '.join(into)} to fit {limit}")),
            status_code=pl.lit(None, pl.Int64),
            final=pl.when(is_unfit).then(pl.lit("fail")).otherwise(pl.lit("pending")),
            attempt=pl.lit(rec.attempt, pl.Int64), shard=pl.lit(rec.shard), batch_id=pl.lit(rec.batch_id, pl.String),
            lane=pl.lit(rec.lane),
        )
    )


def failure_rows(units: pl.DataFrame) -> pl.DataFrame:
    """FAILURES rows for settled `fail` unit rows (each message names its unit)."""
    return units.select(
        "unit_id",
        stage=pl.lit("batch"),
        code=pl.col("code").fill_null("failed"),
        message=pl.format("unit {}: {}", "unit_id", pl.col("message").fill_null("failed")),
        attempt="attempt",
        batch_id="batch_id",
        raw=pl.col("raw_text") if "raw_text" in units.columns else pl.lit(None, pl.String),
    ).cast(FAILURES)  # type: ignore[arg-type]


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
    final = failed.select("custom_id", f_code="code", f_message="message")
    return (
        requests.select("custom_id", "unit_ids")
        .explode("unit_ids")
        .rename({"unit_ids": "unit_id"})
        .join(outcomes, on="custom_id", how="left")
        .join(final, on="custom_id", how="left")
        .with_columns(
            final=pl.when(pl.col("outcome") == "ok")
            .then(pl.lit("ok"))
            .when(pl.col("f_code").is_not_null() | pl.col("custom_id").is_in(final["custom_id"].implode()))
            .then(pl.lit("fail"))
            .otherwise(pl.lit("pending")),
            code=pl.coalesce("f_code", "code"),
            message=pl.coalesce("f_message", "message"),
            attempt=pl.lit(rec.attempt, pl.Int64),
            shard=pl.lit(rec.shard),
            batch_id=pl.lit(rec.batch_id, pl.String),
            lane=pl.lit(rec.lane),
        )
        .drop("f_code", "f_message")
    )


def plan_followup(
    part: PartitionStore, rec: ShardRecord, nxt: pl.DataFrame, *, now: float, retries: Retries, requeued: bool,
    lane: str = "batch",
) -> ShardRecord:
    """Write the follow-up attempt's plan, shard file (identical lines) and ledger record.

    A follow-up that carries unfinished (expired/cancelled) work waits `retries.delay(n)` for
    the n-th successive requeue of this shard, so a provider that keeps expiring batches is
    not hammered.
    """
    requeues = rec.requeues + 1 if requeued else 0
    nxt = nxt.with_columns(attempt=pl.lit(rec.attempt + 1, pl.Int64))
    return _write_followup(part, rec, nxt, shard=rec.shard, lane=lane, requeues=requeues,
                           not_before=now + retries.delay(requeues) if requeued else None)


def _write_followup(
    part: PartitionStore, rec: ShardRecord, rows: pl.DataFrame, *, shard: str, lane: str, requeues: int,
    not_before: float | None, split_from: str | None = None,
) -> ShardRecord:
    """The plan, shard file and `planned` ledger record of `shard` at `rec`'s next attempt
    (idempotent: an existing record is kept)."""
    name = f"{shard}.{rec.attempt + 1}"
    ledger = Ledger(part)
    if ledger.exists(name):
        return ledger.load(name)
    part.staging.write_parquet(part.rel("followups", f"{name}.parquet"), rows)
    data = shard_bytes(rows["line"])
    part.staging.write_bytes(part.rel("shards", f"{name}.jsonl"), data)
    return ledger.create(
        ShardRecord(
            run_id=rec.run_id, job=rec.job, partition=rec.partition, shard=shard, attempt=rec.attempt + 1,
            endpoint=rec.endpoint, model=rec.model, lane=lane, sha256=hashlib.sha256(data).hexdigest(),
            n_requests=rows.height, n_inputs=int(rows["n_inputs"].sum()), bytes=len(data),
            tokens=int(rows["tokens"].sum()), requeues=requeues, not_before=not_before, split_from=split_from,
        )
    )


def write_shards(
    part: PartitionStore, requests: pl.DataFrame, *, job: str, endpoint: str, model: str
) -> list[ShardRecord]:
    """Write the first attempt's shard files and `planned` ledger records."""
    ledger = Ledger(part)
    out = []
    for (shard,), rows in requests.group_by(["shard"], maintain_order=True):
        data = shard_bytes(rows["line"])
        name = f"{shard}.1"
        part.staging.write_bytes(part.rel("shards", f"{name}.jsonl"), data)
        out.append(
            ledger.create(
                ShardRecord(
                    run_id=part.run_id, job=job, partition=part.pid, shard=str(shard), attempt=1,
                    endpoint=endpoint, model=model, sha256=hashlib.sha256(data).hexdigest(),
                    n_requests=rows.height, n_inputs=int(rows["n_inputs"].sum()), bytes=len(data),
                    tokens=int(rows["tokens"].sum()),
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
    waiting = sum(1 for r in records if r.waiting_note)
    out: dict[str, Any] = {"shards": len(records), "by_state": dict(by_state), "by_status": dict(by_status)}
    if waiting:
        out["waiting"] = waiting
    return out
