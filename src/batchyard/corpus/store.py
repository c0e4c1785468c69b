"""The corpus state of one scope, as small files under the staging root (local or S3).

```
<root>/_corpus/<job>/<space or "-">/<source>/
  companies.json           per company: buckets, cursor, source count, documents covered
  partitions/<key>.json    per partition key: the latest materialization of each asset
  runs/<run_id>.json       the open runs of the scope (whose selections are claims)
  retry/<run_id>.parquet   units a finished run failed in its batches (selected again)
  lease.json               one run at a time selects and claims in the scope
```

Every file is rewritten whole and atomically (`Staging`). `companies.json` changes only under
the scope's lease; a partition record is read, merged and rewritten by the run that
materialized the key, and two runs that touch one key at once both write a valid record (the
later one wins, which is what "latest materialization" means).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import polars as pl

from batchyard.corpus.keys import key_file
from batchyard.errors import RunBusy
from batchyard.storage.runs import _Lease, utcnow

if TYPE_CHECKING:
    from collections.abc import Iterator

    from batchyard.context import RunContext
    from batchyard.jobs.base import Job
    from batchyard.storage.staging import Staging

log = logging.getLogger(__name__)

ROOT = "_corpus"
LEASE_TTL_S = 300.0


def source_id(ctx: RunContext) -> str:
    """The document store a scope reads, as one path segment (never credentials)."""
    m = ctx.settings.mongo
    if m.uri is None:
        where = "standin"
    else:
        from batchyard.clients.mongo import redact_uri

        where = redact_uri(m.uri.get_secret_value()).split("://", 1)[-1]
    return quote(f"{m.database}.{m.chunks_collection}@{where}", safe="-_.@,+=")


def scope_of(ctx: RunContext, job: Job) -> str:
    """`<job>/<space or ->/<source>`: one lineage of results in one source.

    Embeddings: one scope per embedding space. Inference: one per task, whatever its version
    (a new prompt is a new version of the same results, not another corpus).
    """
    space = job.emb.space if job.kind == "embeddings" else "-"  # type: ignore[attr-defined]
    return f"{job.name}/{space}/{source_id(ctx)}"


class Corpus:
    """The state files of one scope."""

    def __init__(self, staging: Staging, scope: str) -> None:
        self.staging = staging
        self.scope = scope
        self.prefix = f"{ROOT}/{scope}"
        self._lease = _Lease(staging, self.rel("lease.json"), f"corpus {scope}")

    @classmethod
    def of(cls, ctx: RunContext, job: Job) -> Corpus:
        """The corpus state of a job's scope."""
        return cls(ctx.staging, scope_of(ctx, job))

    def rel(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def _read(self, rel: str, default: Any) -> Any:
        try:
            return self.staging.read_json(rel) if self.staging.exists(rel) else default
        except (FileNotFoundError, ValueError):
            return default

    # ------------------------------------------------------------------ the lease

    @contextmanager
    def lease(self, owner: str, *, wait_s: float, ttl_s: float = LEASE_TTL_S) -> Iterator[None]:
        """Hold the scope's lease while a run selects units or updates the registry (waits up to
        `wait_s` for another holder)."""
        deadline = time.monotonic() + wait_s
        delay = 0.2
        while True:
            try:
                self._lease.claim(owner, ttl_s)
                break
            except RunBusy as exc:
                if time.monotonic() >= deadline:
                    raise RunBusy(f"corpus {self.scope}", exc.owner, exc.heartbeat_at) from None
                log.info("corpus %s: another run is selecting (%s); waiting", self.scope, exc.owner)
                time.sleep(delay)
                delay = min(delay * 1.5, 5.0)
        try:
            yield
        finally:
            self._lease.release(owner)

    def heartbeat(self, owner: str) -> None:
        """Keep the lease during a long selection."""
        self._lease.heartbeat(owner)

    # ------------------------------------------------------------------ companies

    def companies(self) -> dict[str, dict[str, Any]]:
        """Per company: `buckets`, `cursor` (ISO time or None), `source_count`, `documents`."""
        return dict(self._read(self.rel("companies.json"), {}).get("companies", {}))

    def update_companies(self, changes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Merge per-company changes into companies.json (call under the lease)."""
        current = self.companies()
        for company, fields in changes.items():
            current[company] = {**current.get(company, {}), **fields}
        self.staging.write_json(self.rel("companies.json"), {"scope": self.scope, "companies": current,
                                                             "updated_at": utcnow().isoformat()})
        return current

    # ------------------------------------------------------------------ open runs

    def register(self, run_id: str, **info: Any) -> None:
        """Record an open run of the scope (its selection is a claim)."""
        self.staging.write_json(self.rel("runs", f"{run_id}.json"),
                                {"run_id": run_id, "registered_at": utcnow().isoformat(), **info})

    def unregister(self, run_id: str) -> None:
        """The run finished or was cancelled: it claims nothing any more."""
        self.staging.delete(self.rel("runs", f"{run_id}.json"))

    def open_runs(self) -> list[dict[str, Any]]:
        """Every registered open run, oldest first."""
        names = self.staging.list(self.rel("runs"), ".json")
        out = [r for n in names if (r := self._read(self.rel("runs", n), None)) is not None]
        return sorted(out, key=lambda r: r["run_id"])

    # ------------------------------------------------------------------ retry set

    def write_retry(self, run_id: str, frame: pl.DataFrame) -> None:
        """Units a finished run failed in its batches (unit_id, company_id), to select again."""
        rel = self.rel("retry", f"{run_id}.parquet")
        if frame.height:
            self.staging.write_parquet(rel, frame)
        elif self.staging.exists(rel):
            self.staging.delete(rel)

    def retry_parts(self) -> list[str]:
        """Run ids with a retry part."""
        return [n[: -len(".parquet")] for n in self.staging.list(self.rel("retry"), ".parquet")]

    def read_retry(self, run_ids: list[str] | None = None) -> pl.DataFrame:
        """The retry set (of the given runs' parts, or all), one row per unit."""
        names = self.retry_parts() if run_ids is None else run_ids
        frames = [self.staging.read_parquet(self.rel("retry", f"{n}.parquet")) for n in names
                  if self.staging.exists(self.rel("retry", f"{n}.parquet"))]
        if not frames:
            return pl.DataFrame(schema={"unit_id": pl.String, "company_id": pl.String})
        return pl.concat(frames, how="diagonal_relaxed").unique("unit_id", keep="last")

    def drop_retry(self, run_ids: list[str]) -> None:
        """Forget retry parts a finished run consumed."""
        for run_id in run_ids:
            rel = self.rel("retry", f"{run_id}.parquet")
            if self.staging.exists(rel):
                self.staging.delete(rel)

    # ------------------------------------------------------------------ partitions

    def read_partition(self, key: str) -> dict[str, Any] | None:
        """A key's record: its latest materialization per asset, or None."""
        result: dict[str, Any] | None = self._read(self.rel("partitions", key_file(key)), None)
        return result

    def write_partition(self, key: str, record: dict[str, Any]) -> None:
        self.staging.write_json(self.rel("partitions", key_file(key)), record)

    def partitions(self) -> dict[str, dict[str, Any]]:
        """Every key's record, by key."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.staging.list(self.rel("partitions"), ".json"):
            rec = self._read(self.rel("partitions", name), None)
            if rec is not None:
                out[str(rec["key"])] = rec
        return out
