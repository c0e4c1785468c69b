"""The layout of one run in staging: run.json, its partitions, leases and datasets.

```
<root>/<job>/<run_id>/
  run.json                         parameters (no secrets), versions, partition list, state
  driver.json                      lease of the process running run-level steps (snapshot, plan)
  cancel.json                      a cancel request (`batchyard cancel`); the driver acts on it
  duplicates.parquet               chunk ids that repeat in the source (none of them is used)
  failures/<source>.parquet        run-level failures (chunks that belong to no partition)
  manifests/<asset>.json           run-level roll-up of the asset manifests
  p=<partition>/
    partition.json                 its companies (and hash bucket), phase, counts
    lease.json                     lease of the process driving its batches
    chunks/<page>.parquet          snapshot parts (selected source rows, page by page)
    inputs.parquet | units.parquet every planned unit, with how it is served
    requests.parquet               the first attempt's plan: one row per request
    followups/<shard>.<n>.parquet  plans of follow-up attempts (n > 1)
    shards/<shard>.<n>.jsonl       the exact bytes uploaded
    ledger/<shard>.<n>.json        shard-attempt state record (see ledger.py)
    outputs/<shard>.<n>.jsonl      raw output file as downloaded
    errors/<shard>.<n>.jsonl       raw error file as downloaded
    parsed/<shard>.<n>.parquet     that attempt's per-unit outcome, joined on custom_id
    results/<part>.parquet         results dataset: one part per collected shard attempt
    failures/<part>.parquet        failures dataset: snapshot, plan, per attempt, final
    anomalies/<shard>.<n>.parquet  output lines that match no planned request
    loads/<part>.json              load receipt of each results part
    manifests/<asset>.json         per-asset data version, inputs, row counts, timings
```

Results and failures are Parquet *datasets*: parts are only ever added (or, for a partition's
`final` failures part, rewritten whole), never one file that grows with the run.
`RunStore.read_dataset` reads one across every partition.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from batchyard.errors import RunBusy, RunNotFound

if TYPE_CHECKING:
    from batchyard.storage.staging import Staging

TRunState = Literal["planning", "running", "cancelled", "finished"]
DATASETS = ("results", "failures", "anomalies")


def utcnow() -> datetime:
    """Timezone-aware now."""
    return datetime.now(UTC)


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus random suffix."""
    return utcnow().strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class _Lease:
    """A lease file: one live process at a time may hold it (`host:pid:random` + heartbeat).

    A lease is stale when its heartbeat is older than `ttl_s`, or at once when its owner was a
    process on this host that no longer exists (a crash leaves no lease behind). On S3 the
    write is a whole-object PUT, so two processes racing for a free lease can both believe
    they won; the second to write wins and the loser notices at its next heartbeat.
    """

    def __init__(self, staging: Staging, rel: str, what: str) -> None:
        self.staging = staging
        self.rel = rel
        self.what = what

    def read(self) -> dict[str, Any] | None:
        try:
            return dict(self.staging.read_json(self.rel)) if self.staging.exists(self.rel) else None
        except (FileNotFoundError, ValueError):
            return None

    def holder(self, ttl_s: float) -> dict[str, Any] | None:
        """The live holder's lease record, or None when free or stale."""
        lease = self.read()
        if lease is None or lease_stale(lease, ttl_s):
            return None
        return lease

    def claim(self, owner: str, ttl_s: float) -> None:
        lease = self.read()
        if lease and lease["owner"] != owner and not lease_stale(lease, ttl_s):
            raise RunBusy(self.what, lease["owner"], lease["heartbeat_at"])
        self.heartbeat(owner)

    def heartbeat(self, owner: str) -> None:
        self.staging.write_json(self.rel, {"owner": owner, "heartbeat_at": utcnow().isoformat()})

    def release(self, owner: str) -> None:
        lease = self.read()
        if lease is not None and lease.get("owner") == owner:
            self.staging.delete(self.rel)


class RunStore:
    """Paths and small state files of one run."""

    def __init__(self, staging: Staging, job: str, run_id: str) -> None:
        self.staging = staging
        self.job = job
        self.run_id = run_id
        self.prefix = f"{job}/{run_id}"
        self._lease = _Lease(staging, self.rel("driver.json"), run_id)

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

    # partitions

    def partition(self, pid: str) -> PartitionStore:
        """One partition of the run."""
        return PartitionStore(self, pid)

    def partitions(self) -> list[PartitionStore]:
        """Every partition recorded in run.json, in order."""
        return [self.partition(p["id"]) for p in self.read_run().get("partitions", [])]

    # datasets

    def dataset_parts(self, name: str) -> list[str]:
        """Relative paths of every part of a dataset (results, failures, anomalies)."""
        rels = [self.rel(name, n) for n in self.staging.list(self.rel(name), ".parquet")]
        for part in self.partitions():
            rels += [part.rel(name, n) for n in self.staging.list(part.rel(name), ".parquet")]
        return rels

    def read_dataset(self, name: str, schema: pl.Schema | None = None) -> pl.DataFrame:
        """A dataset of the run as one frame (empty, with `schema`, when it has no part)."""
        rels = self.dataset_parts(name)
        frames = [self.staging.read_parquet(r) for r in rels]
        frames = [f for f in frames if f.width]
        if not frames:
            return schema.to_frame() if schema is not None else pl.DataFrame()
        return pl.concat(frames, how="diagonal_relaxed")

    # cancellation: a request file, so a cancel never needs the clients a live driver holds

    def request_cancel(self, by: str) -> None:
        """Record that the run must be cancelled (the driver acts on it within one round)."""
        self.staging.write_json(self.rel("cancel.json"), {"requested_by": by, "at": utcnow().isoformat()})

    def cancel_requested(self) -> dict[str, Any] | None:
        """The pending cancel request, if any."""
        rel = self.rel("cancel.json")
        return dict(self.staging.read_json(rel)) if self.staging.exists(rel) else None

    def clear_cancel(self) -> None:
        """Forget a cancel request (`resume`)."""
        self.staging.delete(self.rel("cancel.json"))

    # the run-level lease (driver.json): snapshot and plan run in one process at a time

    def claim(self, owner: str, ttl_s: float) -> None:
        """Take the run lease, unless another live process holds a fresh one (RunBusy)."""
        self._lease.claim(owner, ttl_s)

    def heartbeat(self, owner: str) -> None:
        """Refresh the run lease this process holds."""
        self._lease.heartbeat(owner)

    def release(self, owner: str) -> None:
        """Drop the run lease if this process holds it."""
        self._lease.release(owner)

    def lease_holder(self, ttl_s: float) -> dict[str, Any] | None:
        """Who holds the run lease (None: nobody alive)."""
        return self._lease.holder(ttl_s)


class PartitionStore:
    """Paths and state of one partition of a run (`p=<id>/` under the run)."""

    def __init__(self, run: RunStore, pid: str) -> None:
        self.run = run
        self.pid = pid
        self.staging = run.staging
        self.prefix = f"{run.prefix}/p={pid}"
        self._lease = _Lease(run.staging, self.rel("lease.json"), f"{run.run_id} partition {pid}")

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def rel(self, *parts: str) -> str:
        """A path inside the partition, relative to the staging root."""
        return "/".join([self.prefix, *parts])

    def read_state(self) -> dict[str, Any]:
        """partition.json (empty before the partition was first written)."""
        rel = self.rel("partition.json")
        return dict(self.staging.read_json(rel)) if self.staging.exists(rel) else {}

    def update_state(self, **changes: Any) -> dict[str, Any]:
        """Apply changes to partition.json and return it."""
        state = self.read_state()
        state.update(changes, id=self.pid, updated_at=utcnow().isoformat())
        self.staging.write_json(self.rel("partition.json"), state)
        return state

    def shard_names(self) -> list[str]:
        """Every `<shard>.<attempt>` with a ledger record, sorted."""
        return [n[: -len(".json")] for n in self.staging.list(self.rel("ledger"), ".json")]

    def parts(self, name: str) -> list[str]:
        """Part names (without `.parquet`) of one of the partition's datasets."""
        return [n[: -len(".parquet")] for n in self.staging.list(self.rel(name), ".parquet")]

    def claim(self, owner: str, ttl_s: float) -> None:
        """Take the partition lease (RunBusy when another live process holds it)."""
        self._lease.claim(owner, ttl_s)

    def heartbeat(self, owner: str) -> None:
        """Refresh the lease this process holds."""
        self._lease.heartbeat(owner)

    def release(self, owner: str) -> None:
        """Drop the lease if this process holds it."""
        self._lease.release(owner)

    def lease_holder(self, ttl_s: float) -> dict[str, Any] | None:
        """Who holds the partition lease (None: nobody alive)."""
        return self._lease.holder(ttl_s)


def driver_id() -> str:
    """`host:pid:random`, naming this process as a run driver."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def lease_stale(lease: dict[str, Any], ttl_s: float) -> bool:
    """Whether a lease no longer protects anything (dead local owner or old heartbeat)."""
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
        if job.startswith((".", "_")):
            continue
        if run_id in staging.list_dirs(job):
            store = RunStore(staging, job, run_id)
            if store.exists():
                return store
    raise RunNotFound(run_id, staging.root)


def list_runs(staging: Staging) -> list[RunStore]:
    """Every run in the staging root, oldest first."""
    runs = []
    for job in staging.list_dirs(""):
        if job.startswith((".", "_")):
            continue
        for run_id in staging.list_dirs(job):
            store = RunStore(staging, job, run_id)
            if store.exists():
                runs.append(store)
    return sorted(runs, key=lambda r: r.run_id)
