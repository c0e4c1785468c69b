"""The shard ledger: one small JSON record per shard attempt, the only code that moves state.

A record is rewritten whole (atomically) on every change, so it is correct on local disk and on
S3 alike. Intent is recorded before each remote side effect:

```
planned ──▶ uploading ──▶ uploaded ──▶ creating ──▶ submitted ──▶ ended ──▶ collected
               │ crash: look for the      │ crash: adopt the batch     (batch terminal; files
               │ uploaded file, else      │ whose metadata matches,    downloaded into staging
               ▼ upload again             ▼ else create               (`downloaded`), then parsed
                                          │ (input file gone at the    in `collected`)
                                          ▼ provider: back to uploading)
```

`requeue()` sends a shard whose batch failed with `token_limit_exceeded` back to `uploaded`
with `submission + 1` and a `not_before` time (exponential backoff); the batch metadata carries
the submission number, so adoption after a crash never confuses the failed batch with its
successor. A shard larger than the provider's stated limit is re-planned instead: `intend_split`
records the cap first, then its follow-up shards are written, then it moves to `collected`
with `split_into` naming them (from `ended` when it was refused, or straight from `planned` or
`uploaded` when the limit was already known). Records live per partition (`p=<id>/ledger/`); `run_records` reads a whole run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from batchyard.errors import LedgerError
from batchyard.storage.runs import utcnow

if TYPE_CHECKING:
    from batchyard.storage.runs import PartitionStore, RunStore

TShardState = Literal["planned", "uploading", "uploaded", "creating", "submitted", "ended", "collected"]
TBatchStatus = Literal[
    "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"
]

TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "expired", "cancelled"})
LIVE_STATES: frozenset[str] = frozenset({"uploading", "uploaded", "creating", "submitted"})

_NEXT: dict[str, set[str]] = {
    "planned": {"uploading", "submitted", "collected"},  # submitted: the real-time lane; collected: split
    "uploading": {"uploaded"},
    "uploaded": {"creating", "submitted", "collected"},
    "creating": {"submitted", "uploading"},  # uploading again: the provider lost the input file
    "submitted": {"submitted", "ended"},
    "ended": {"ended", "collected", "uploaded"},
    "collected": set(),
}


class StatusEvent(BaseModel):
    """One observed state or batch status, with its time."""

    status: str
    at: str
    note: str | None = None


class ShardRecord(BaseModel):
    """State of one shard attempt: `shards/<shard>.<attempt>.jsonl` and its batch."""

    run_id: str
    job: str
    partition: str = ""
    shard: str
    attempt: int
    endpoint: str
    model: str
    sha256: str
    n_requests: int
    n_inputs: int
    bytes: int
    tokens: int
    state: TShardState = "planned"
    lane: str = "batch"
    submission: int = 1
    not_before: float | None = None
    requeues: int = 0
    token_limit_since: float | None = None
    file_id: str | None = None
    batch_id: str | None = None
    batch_status: str | None = None
    intent_at: str | None = None
    created_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    downloaded: bool = False
    request_counts: dict[str, int] | None = None
    usage: dict[str, Any] | None = None
    realtime: dict[str, Any] | None = None
    """The real-time lane's own record: requests, calls (a split request makes several),
    HTTP attempts, retries by reason, seconds waited (`LaneStats`, summed over slices)."""
    errors: list[dict[str, Any]] = Field(default_factory=list)
    outcome: dict[str, int] | None = None
    history: list[StatusEvent] = Field(default_factory=list)
    past_batches: list[str] = Field(default_factory=list)
    split_cap: int | None = None
    """Tokens the follow-up shards of a re-planned attempt fit under (recorded before they are written)."""
    split_into: list[str] = Field(default_factory=list)
    """`<shard>.<attempt>` of the follow-up shards this attempt was re-planned into."""
    split_from: str | None = None
    """The attempt this one was re-planned from (`<shard>.<attempt>`)."""

    @property
    def name(self) -> str:
        """`<shard>.<attempt>`: the file name stem everywhere in the run."""
        return f"{self.shard}.{self.attempt}"

    @property
    def key(self) -> str:
        """`<partition>/<shard>.<attempt>`: unique within the run."""
        return f"{self.partition}/{self.name}"

    @property
    def upload_filename(self) -> str:
        """The file name given to the Files API (unique per run, partition and attempt)."""
        return f"{self.run_id}.{self.partition}.{self.name}.jsonl"

    def metadata(self) -> dict[str, str]:
        """Batch metadata that identifies this submission (used to adopt after a crash)."""
        return {
            "batchyard_run": self.run_id,
            "batchyard_job": self.job,
            "partition": self.partition,
            "shard": self.shard,
            "attempt": str(self.attempt),
            "submission": str(self.submission),
            "sha256": self.sha256,
        }

    @property
    def in_flight(self) -> bool:
        """Counts against the enqueued-token budget: submission under way or batch not terminal.

        A shard waiting in `uploaded` (before its create, or requeued) does not count.
        """
        return self.state in ("uploading", "creating", "submitted")

    @property
    def waiting_note(self) -> str | None:
        """Why a shard is held back, for `status` (None when it is not waiting)."""
        if self.state in ("planned", "uploaded") and self.not_before:
            at = datetime.fromtimestamp(self.not_before, UTC).strftime("%H:%M:%S")
            why = "token limit" if self.token_limit_since is not None and self.submission > 1 else "backoff"
            return f"waiting ({why}) until {at} UTC"
        return None


def shard_name(shard: str, attempt: int) -> str:
    """`<shard>.<attempt>`."""
    return f"{shard}.{attempt}"


def parse_shard_name(name: str) -> tuple[str, int]:
    """Split `<shard>.<attempt>`; raises LedgerError on anything else."""
    shard, _, attempt = name.rpartition(".")
    if not shard or not attempt.isdigit() or int(attempt) < 1:
        raise LedgerError(name, "malformed shard name (expected <shard>.<attempt>)")
    return shard, int(attempt)


class Ledger:
    """Reads and writes shard records of one partition; every state change goes through here."""

    def __init__(self, part: PartitionStore) -> None:
        self.part = part

    def _rel(self, name: str) -> str:
        return self.part.rel("ledger", f"{name}.json")

    def exists(self, name: str) -> bool:
        """Whether a record exists."""
        return self.part.staging.exists(self._rel(name))

    def load(self, name: str) -> ShardRecord:
        """One record."""
        try:
            return ShardRecord.model_validate(self.part.staging.read_json(self._rel(name)))
        except FileNotFoundError as exc:
            raise LedgerError(name, "no ledger record") from exc
        except ValueError as exc:
            raise LedgerError(name, f"corrupt ledger record: {exc}") from exc

    def all(self) -> list[ShardRecord]:
        """Every record of the partition, in name order."""
        return [self.load(n) for n in self.part.shard_names()]

    def _save(self, rec: ShardRecord) -> ShardRecord:
        self.part.staging.write_json(self._rel(rec.name), rec.model_dump(mode="json"))
        return rec

    def create(self, rec: ShardRecord) -> ShardRecord:
        """Write a new `planned` record; an existing record is kept (idempotent re-plan)."""
        if self.exists(rec.name):
            return self.load(rec.name)
        rec.history.append(StatusEvent(status="planned", at=utcnow().isoformat()))
        return self._save(rec)

    def move(self, rec: ShardRecord, state: TShardState, note: str | None = None, **fields: Any) -> ShardRecord:
        """Apply a legal transition with extra fields, and persist it."""
        if state not in _NEXT[rec.state]:
            raise LedgerError(rec.name, f"illegal transition {rec.state} -> {state}")
        updated = rec.model_copy(update={**fields, "state": state})
        if state != rec.state or note:
            updated.history = [*rec.history, StatusEvent(status=state, at=utcnow().isoformat(), note=note)]
        return self._save(updated)

    def observe(self, rec: ShardRecord, batch: dict[str, Any], **extra: Any) -> ShardRecord:
        """Record a polled batch (and `extra` fields); moves to `ended` when its status is terminal."""
        status = batch["status"]
        fields = {
            "batch_status": status,
            "request_counts": batch.get("request_counts"),
            "usage": batch.get("usage"),
            "output_file_id": batch.get("output_file_id"),
            "error_file_id": batch.get("error_file_id"),
            "errors": ((batch.get("errors") or {}).get("data") or []),
        }
        history = rec.history
        if status != rec.batch_status:
            history = [*history, StatusEvent(status=f"batch:{status}", at=utcnow().isoformat())]
        state: TShardState = "ended" if status in TERMINAL_STATUSES else "submitted"
        updated = rec.model_copy(update={**fields, **extra, "state": state, "history": history})
        return self._save(updated)

    def intend_split(self, rec: ShardRecord, cap: int, reason: str) -> ShardRecord:
        """Record, before any follow-up is written, the cap a shard attempt is re-planned under
        (so that a resumed re-plan cuts the same shards)."""
        if rec.state not in ("planned", "uploaded", "ended"):
            raise LedgerError(rec.name, f"cannot re-plan a shard attempt in state {rec.state}")
        updated = rec.model_copy(update={"split_cap": cap})
        updated.history = [*rec.history, StatusEvent(status=rec.state, at=utcnow().isoformat(), note=reason)]
        return self._save(updated)

    def requeue(self, rec: ShardRecord, reason: str, *, not_before: float, since: float) -> ShardRecord:
        """Send an `ended` shard back to `uploaded` for a new submission of the same file.

        It is not submitted before `not_before`; `since` is when it first hit this reason.
        """
        return self.move(
            rec,
            "uploaded",
            note=f"requeued: {reason}",
            submission=rec.submission + 1,
            not_before=not_before,
            token_limit_since=since,
            past_batches=[*rec.past_batches, rec.batch_id or ""],
            batch_id=None,
            batch_status=None,
            created_at=None,
            output_file_id=None,
            error_file_id=None,
            downloaded=False,
            request_counts=None,
            usage=None,
            errors=[],
        )


def run_records(run: RunStore) -> list[ShardRecord]:
    """Every shard-attempt record of every partition of a run."""
    return [rec for part in run.partitions() for rec in Ledger(part).all()]
