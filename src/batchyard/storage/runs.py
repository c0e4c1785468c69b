"""The layout of one run in staging, and `run.json`.

```
<root>/<job>/<run_id>/
  run.json                       parameters (no secrets), versions, state
  driver.json                    lease of the process driving the batches (while one does)
  chunks.parquet                 snapshot of the selected source rows
  rejects.parquet                rows rejected before any request was built, with reasons
  requests.parquet               the first attempt's plan: one row per request
  followups/<shard>.<n>.parquet  plans of retry attempts (n > 1)
  shards/<shard>.<n>.jsonl       the exact bytes uploaded
  ledger/<shard>.<n>.json        shard-attempt state record (see ledger.py)
  outputs/<shard>.<n>.jsonl      raw output file as downloaded
  errors/<shard>.<n>.jsonl       raw error file as downloaded
  parsed/<shard>.<n>.parquet     that attempt's per-unit outcome, joined on custom_id
  results.parquet                final successful results, one row per unit
  failures.parquet               units that finally failed, with code and message
  anomalies.parquet              output lines that match no planned request
  loads/<sink>.json              load receipts
  manifests/<asset>.json         per-asset data version, inputs, row counts, timings
```
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from batchyard.errors import RunBusy, RunNotFound

if TYPE_CHECKING:
    from batchyard.storage.staging import Staging

TRunState = Literal["planning", "running", "cancelled", "finished"]


def utcnow() -> datetime:
    """Timezone-aware now."""
    return datetime.now(UTC)


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus random suffix."""
    return utcnow().strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class RunStore:
    """Paths and small state files of one run."""

    def __init__(self, staging: Staging, job: str, run_id: str) -> None:
        self.staging = staging
        self.job = job
        self.run_id = run_id
        self.prefix = f"{job}/{run_id}"

    def rel(self, *parts: str) -> str:
        """A path inside the run, relative to the staging root."""
        return "/".join([self.prefix, *parts])

    def exists(self) -> bool:
        """Whether run.json exists."""
        return self.staging.exists(self.rel("run.json"))

    def read_run(self) -> dict[str, Any]:
        """run.json."""
        if not self.exists():
            raise RunNotFound(self.run_id, self.staging.root)
        return dict(self.staging.read_json(self.rel("run.json")))

    def write_run(self, run: dict[str, Any]) -> None:
        """Rewrite run.json atomically."""
        run = {**run, "updated_at": utcnow().isoformat()}
        self.staging.write_json(self.rel("run.json"), run)

    def update_run(self, **changes: Any) -> dict[str, Any]:
        """Apply changes to run.json and return it."""
        run = self.read_run()
        run.update(changes)
        self.write_run(run)
        return run

    # the driver lease (driver.json, apart from run.json so that a heartbeat never overwrites a
    # concurrent change such as `cancel`): one process drives a run's batches at a time

    def claim(self, owner: str, ttl_s: float) -> None:
        """Take the driver lease, unless another live process holds a fresh one.

        A lease is stale when its heartbeat is older than `ttl_s`, or at once when its owner was
        a process on this host that no longer exists (a crash leaves no lease behind).
        """
        rel = self.rel("driver.json")
        lease = self.staging.read_json(rel) if self.staging.exists(rel) else None
        if lease and lease["owner"] != owner and not _lease_stale(lease, ttl_s):
            raise RunBusy(self.run_id, lease["owner"], lease["heartbeat_at"])
        self.heartbeat(owner)

    def heartbeat(self, owner: str) -> None:
        """Refresh the lease this process holds."""
        self.staging.write_json(self.rel("driver.json"), {"owner": owner, "heartbeat_at": utcnow().isoformat()})

    def release(self, owner: str) -> None:
        """Drop the lease if this process holds it."""
        rel = self.rel("driver.json")
        if self.staging.exists(rel) and self.staging.read_json(rel).get("owner") == owner:
            self.staging.delete(rel)

    def shard_names(self) -> list[str]:
        """Every `<shard>.<attempt>` with a ledger record, sorted."""
        return [n[: -len(".json")] for n in self.staging.list(self.rel("ledger"), ".json")]


def driver_id() -> str:
    """`host:pid:random`, naming this process as a run driver."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _lease_stale(lease: dict[str, Any], ttl_s: float) -> bool:
    host, _, rest = lease["owner"].partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    age = (utcnow() - datetime.fromisoformat(lease["heartbeat_at"])).total_seconds()
    return age > ttl_s


def find_run(staging: Staging, run_id: str) -> RunStore:
    """Locate a run by id under any job."""
    for job in staging.list_dirs(""):
        if run_id in staging.list_dirs(job):
            store = RunStore(staging, job, run_id)
            if store.exists():
                return store
    raise RunNotFound(run_id, staging.root)


def list_runs(staging: Staging) -> list[RunStore]:
    """Every run in the staging root, oldest first."""
    runs = []
    for job in staging.list_dirs(""):
        if job.startswith("."):
            continue
        for run_id in staging.list_dirs(job):
            store = RunStore(staging, job, run_id)
            if store.exists():
                runs.append(store)
    return sorted(runs, key=lambda r: r.run_id)
