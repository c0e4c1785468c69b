"""Run a job through every stage, partition by partition, resumably; the same code under Prefect
or plain Python.

```
create_run ─▶ snapshot ─▶ plan ─▶ drive (rounds) ─▶ finish
  run.json     partitions,   per partition   poll (one list call) · download ended batches ·
               chunk parts,  (mappable:      collect (mappable: parse, join, follow-ups) ·
               duplicates    CPU only)       load new results parts · submit · finalize
```

Every step records its progress in staging (run.json, partition.json, the ledger, load
receipts), so `resume` picks up wherever a crash, a cancel or a Ctrl-C left the run. Results
are loaded into the sinks as each shard attempt is collected, so a run whose tail is still
retrying already serves the finished vectors.

An `Engine` runs the CPU-heavy steps (plan per partition, collect per shard attempt): a thread
pool in plain Python (`LocalEngine`), or Prefect task runs, on threads or on Dask (see
`batchyard.orchestration`). The I/O steps (Batch API calls, sink writes) always run in the
driving process: Milvus Lite and the MongoDB stand-in allow one process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import socket
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import polars as pl

from batchyard import __version__
from batchyard.assets import run_checks, write_manifest, write_run_manifests
from batchyard.crash import crashpoint
from batchyard.errors import RunBusy
from batchyard.gctune import fewer_collections
from batchyard.schemas import FAILURES
from batchyard.stages import batches
from batchyard.stages.partition import (
    PartitionSpec,
    bucket_of,
    plan_partitions,
    size_targets,
    unmatched_targets,
)
from batchyard.storage.ledger import Ledger, ShardRecord
from batchyard.storage.runs import PartitionStore, RunStore, driver_id, find_run, new_run_id, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from batchyard.clients.realtime import RateLimits
    from batchyard.context import RunContext
    from batchyard.jobs.base import Job
    from batchyard.settings import LaneSettings
    from batchyard.targets import Targets

    Progress = Callable[[dict[str, Any]], None]

log = logging.getLogger(__name__)
T = TypeVar("T")

PHASES = ("snapshot", "plan", "batches", "done")
LEASE_TTL_MIN_S = 120.0


class Engine(Protocol):
    """Runs the steps of a run.

    `map` runs a mappable CPU step over items, possibly in other processes: `plan` (items:
    partition ids) and `collect` (items: (partition id, shard-attempt name) pairs); one result
    per item, in order. `run` runs an I/O step of a round (`track`, `load`, `submit`) once, in
    this process (under Prefect: one task run per call, whatever the number of shards).
    """

    def map(self, step: str, items: Sequence[Any]) -> list[Any]: ...

    def run(self, step: str, fn: Callable[[], T]) -> T: ...


class LocalEngine:
    """The plain-Python engine: the steps in this process, one after another."""

    def __init__(self, ctx: RunContext, job: Job, run: RunStore) -> None:
        self.ctx, self.job, self.store = ctx, job, run

    def map(self, step: str, items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        fn = STEPS[step]

        def one(item: Any) -> Any:
            args = item if isinstance(item, tuple) else (item,)
            return fn(self.ctx, self.job, self.store, *args)

        # one at a time: memory stays bounded by a partition (plan) or a shard attempt (collect).
        # Threads would not add cores: the tokenizer and the JSON decoder hold the GIL, and
        # token counting already uses every core through its own process pool.
        out = [one(item) for item in items]
        trim_memory()
        return out

    def run(self, step: str, fn: Callable[[], T]) -> T:
        return fn()


def trim_memory() -> None:
    """Give the C heap's free pages back to the system (glibc keeps them otherwise): a long run
    that works partition after partition then stays at the size of one."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_timings(run: RunStore, raised: dict[str, float] | None = None, **seconds: float) -> None:
    """Add seconds spent per stage to run.json's `timings` (they accumulate across resumes).

    `raised`: the process's peak RSS (MB) at the end of each stage that raised it, kept in
    `peak_rss_mb`, so a run says which stage set its memory high-water mark.
    """
    info = run.read_run()
    timings = dict(info.get("timings", {}))
    for stage, s in seconds.items():
        timings[stage] = round(timings.get(stage, 0.0) + s, 3)
    peaks = dict(info.get("peak_rss_mb", {}))
    for stage, mb in (raised or {}).items():
        peaks[stage] = round(max(peaks.get(stage, 0.0), mb), 1)
    run.update_run(timings=timings, peak_rss_mb=peaks)


def _emit(on_progress: Progress | None, stage: str, completed: int, total: int | None, **extra: Any) -> None:
    if on_progress is not None:
        on_progress({"stage": stage, "completed": completed, "total": total, **extra})


# --------------------------------------------------------------------------- create


def create_run(ctx: RunContext, job: Job, *, run_id: str | None = None) -> RunStore:
    """Create the run folder and run.json (phase `snapshot`)."""
    run = RunStore(ctx.staging, job.name, run_id or new_run_id())
    run.write_run(
        {
            "run_id": run.run_id,
            "job": job.name,
            "kind": job.kind,
            "params": job.params(),
            "code_version": __version__,
            "profile": ctx.settings.profile,
            "provider": ctx.provider_label,
            "document_store": "pending",
            "state": "planning",
            "phase": "snapshot",
            "created_at": utcnow().isoformat(),
        }
    )
    return run


# --------------------------------------------------------------------------- snapshot


def _restricted(targets: Targets, companies: list[str]) -> Targets:
    keep = set(companies)
    return targets.model_copy(update={"companies": [c for c in targets.companies if c.company_id in keep]})


def _units(specs: list[PartitionSpec]) -> list[list[PartitionSpec]]:
    """Partitions that one source query fills: a packed partition, or every bucket of a company."""
    groups: dict[tuple[str, ...], list[PartitionSpec]] = {}
    for spec in specs:
        groups.setdefault(tuple(spec.companies), []).append(spec)
    return list(groups.values())


def _clear(part: PartitionStore) -> None:
    st = part.staging
    for name in st.list(part.rel("chunks"), ".parquet"):
        st.delete(part.rel("chunks", name))
    for name in st.list(part.rel("failures"), ".parquet"):
        if name.startswith("snapshot-"):
            st.delete(part.rel("failures", name))


def _snapshot_unit(job: Job, run: RunStore, specs: list[PartitionSpec]) -> None:
    """Page the source rows of one unit into its partitions' chunk parts (by hash bucket)."""
    parts = [run.partition(s.id) for s in specs]
    for part in parts:
        _clear(part)
    by_bucket = {s.bucket or 0: run.partition(s.id) for s in specs}
    buckets = specs[0].buckets
    counts: dict[str, int] = defaultdict(int)
    rejected: dict[str, int] = defaultdict(int)
    st = run.staging
    for page_no, (chunks, rejects) in enumerate(job.source_pages(_restricted(job.targets, specs[0].companies))):
        for frame, folder, tally in ((chunks, "chunks", counts), (rejects, "failures", rejected)):
            if frame.height == 0:
                continue
            key = job.bucket_key() if folder == "chunks" else pl.col("unit_id")
            routed = frame.with_columns(
                _b=key.map_elements(lambda c: bucket_of(c, buckets), return_dtype=pl.Int64)
                if buckets > 1 else pl.lit(0, pl.Int64)
            )
            for (b,), rows in routed.group_by(["_b"]):
                part = by_bucket[int(b)]  # type: ignore[call-overload]
                name = f"{page_no:05d}.parquet" if folder == "chunks" else f"snapshot-{page_no:05d}.parquet"
                st.write_parquet(part.rel(folder, name), rows.drop("_b"))
                tally[part.pid] += rows.height
    for spec, part in zip(specs, parts, strict=True):
        job.after_snapshot(part)
        stats = {"chunks": counts[part.pid], "rejected": rejected[part.pid]}
        write_manifest(part, "chunks", rows=counts[part.pid], seconds=0.0, params=job.params(), metadata=stats)
        part.update_state(phase="plan", companies=spec.companies, bucket=spec.bucket, buckets=spec.buckets,
                          snapshot=stats)


def _find_duplicates(run: RunStore) -> int:
    """Chunk ids that repeat across the whole snapshot: `duplicates.parquet` + failures parts."""
    from batchyard.stages.snapshot import duplicate_failures, find_duplicates

    st = run.staging
    rels = [p.rel("chunks", n) for p in run.partitions() for n in st.list(p.rel("chunks"), ".parquet")]
    if not rels:
        return 0
    scan = st.scan_parquet(rels, include_file_paths="_path").with_columns(
        _pid=pl.col("_path").str.extract(r"/p=([^/]+)/chunks/", 1)
    )
    dups = find_duplicates(scan.select("chunk_id", "source_id", "company_id", "document_id", "_pid"))
    if dups.height == 0:
        return 0
    located = scan.join(dups.lazy().select("chunk_id").unique(), on="chunk_id", how="semi").select(
        "chunk_id", "source_id", "_pid"
    ).collect()
    st.write_parquet(run.rel("duplicates.parquet"), dups)
    failures = duplicate_failures(dups).with_columns(
        _pid=pl.Series(located.sort("chunk_id", "source_id")["_pid"])
    )
    for (pid,), rows in failures.group_by(["_pid"]):
        part = run.partition(str(pid))
        st.write_parquet(part.rel("failures", "duplicates.parquet"), rows.drop("_pid"))
    log.warning("%d chunk id(s) repeat in the source; none of their copies is used", dups["chunk_id"].n_unique())
    return dups.height


@fewer_collections()
def snapshot(ctx: RunContext, job: Job, run: RunStore, *, on_progress: Progress | None = None) -> dict[str, Any]:
    """Phase `snapshot`: size the targets into partitions, stage every partition's source rows."""
    from batchyard.stages.snapshot import iter_orphans

    t0 = time.perf_counter()
    info = run.read_run()
    fields = ctx.settings.mongo.fields
    if "partitions" not in info:
        by_company, by_document = size_targets(ctx.store.chunks, job.targets, fields)
        specs = plan_partitions(by_company, job.targets.company_ids, ctx.settings.run.partition_max_chunks)
        unmatched = unmatched_targets(job.targets, by_company, by_document)
        for target in unmatched:
            log.warning("target %s matched no chunk in %s", target, ctx.store.label)
        info = run.update_run(partitions=[s.to_json() for s in specs], targets_unmatched=unmatched,
                              document_store=ctx.store.label)
    specs = [PartitionSpec.from_json(p) for p in info["partitions"]]
    units = _units(specs)
    for i, unit in enumerate(units):
        _emit(on_progress, "snapshot", i, len(units), detail=", ".join(unit[0].companies[:3]))
        if all(run.partition(s.id).read_state().get("snapshot") for s in unit):
            continue
        _snapshot_unit(job, run, unit)
    _emit(on_progress, "snapshot", len(units), len(units))
    orphans = [r for _, r in iter_orphans(ctx.store.chunks, job.targets, fields, page_size=ctx.page_size)]
    if orphans:
        run.staging.write_parquet(run.rel("failures", "snapshot-orphans.parquet"), pl.concat(orphans))
    duplicates = _find_duplicates(run)
    crashpoint("after_snapshot")
    totals: dict[str, Any] = defaultdict(int)
    for part in run.partitions():
        for k, v in part.read_state().get("snapshot", {}).items():
            totals[k] += v
    stats = {**totals, "partitions": len(specs), "orphans": sum(o.height for o in orphans),
             "duplicate_ids": duplicates}
    run.update_run(phase="plan", snapshot=stats)
    add_timings(run, {"snapshot": peak_rss_mb()}, snapshot=time.perf_counter() - t0)
    trim_memory()
    return stats


# --------------------------------------------------------------------------- plan


def plan_one(ctx: RunContext, job: Job, run: RunStore, pid: str) -> dict[str, Any]:
    """Plan one partition (staging only: runs on any engine worker)."""
    part = run.partition(pid)
    state = part.read_state()
    if state.get("phase") != "plan":
        return dict(state.get("plan", {}))
    t0 = time.perf_counter()
    stats = job.plan_partition(part)
    checks = [c.to_json() for c in run_checks(ctx, job, part, "requests")]
    write_manifest(part, "requests", rows=stats.get("requests", 0), seconds=time.perf_counter() - t0,
                   params=job.params(), metadata=stats, checks=checks)
    part.update_state(phase="batches", plan=stats, planned_by=f"{socket.gethostname()}:{os.getpid()}")
    return stats


def plan(ctx: RunContext, job: Job, run: RunStore, engine: Engine, *, on_progress: Progress | None = None,
         dry: bool = False) -> dict[str, Any]:
    """Phase `plan`: every partition's requests, shard files and ledger records.

    `dry`: a dry run; the run stays in phase `plan` with state `dry_run` (see `dry_run`).
    """
    t0, peak = time.perf_counter(), peak_rss_mb()
    pids = [p.pid for p in run.partitions()]
    _emit(on_progress, "plan", 0, len(pids))
    engine.map("plan", pids)
    totals: dict[str, Any] = defaultdict(int)
    for part in run.partitions():
        for k, v in part.read_state().get("plan", {}).items():
            totals[k] += v
    totals = {k: round(v, 6) if isinstance(v, float) else v for k, v in totals.items()}
    _emit(on_progress, "plan", len(pids), len(pids))
    lane = choose_lane(ctx.settings.lane, int(totals.get("tokens", 0)))
    run.update_run(phase="plan" if dry else "batches", state="dry_run" if dry else "running", plan=dict(totals),
                   lane=lane)
    raised = {"plan": now} if (now := peak_rss_mb()) > peak else {}
    add_timings(run, raised, plan=time.perf_counter() - t0)
    return dict(totals)


def choose_lane(settings: LaneSettings, tokens: int) -> str:
    """The lane of a run's first pass: `batch` or `realtime` (auto: by its planned tokens)."""
    if settings.mode == "auto":
        return "realtime" if tokens < settings.auto_max_tokens else "batch"
    return settings.mode


# --------------------------------------------------------------------------- collect and load


def collect_one(ctx: RunContext, job: Job, run: RunStore, pid: str, name: str) -> list[ShardRecord]:
    """Collect one downloaded shard attempt (staging only: runs on any engine worker)."""
    retries = batches.Retries.from_settings(ctx.settings.limits, ctx.settings.provider, ctx.settings.lane)
    return batches.collect_shard(run.partition(pid), name, job, retries)


STEPS: dict[str, Callable[..., Any]] = {"plan": plan_one, "collect": collect_one}


def unloaded_parts(part: PartitionStore) -> list[str]:
    """Results parts of a partition that have no load receipt yet."""
    done = {n[: -len(".json")] for n in part.staging.list(part.rel("loads"), ".json")}
    return [n for n in part.parts("results") if n not in done]


def load_parts(ctx: RunContext, job: Job, parts: Sequence[PartitionStore]) -> list[dict[str, Any]]:
    """Load every results part that has no receipt; receipts are written after the sinks are
    saved, so a crash anywhere in between only means loading that part again (upserts)."""
    loaded: list[tuple[PartitionStore, str, list[dict[str, Any]]]] = []
    for part in parts:
        for name in unloaded_parts(part):
            frame = part.staging.read_parquet(part.rel("results", f"{name}.parquet"))
            receipts = job.load_part(part, frame) if frame.height else []
            loaded.append((part, name, receipts))
    if not loaded:
        return []
    ctx.store.save()
    trim_memory()
    crashpoint("before_receipt")
    out = []
    for part, name, receipts in loaded:
        receipt = {"part": name, "partition": part.pid, "rows": sum(r.get("rows", 0) for r in receipts),
                   "sinks": receipts, "at": utcnow().isoformat()}
        part.staging.write_json(part.rel("loads", f"{name}.json"), receipt)
        out.append(receipt)
    return out


# --------------------------------------------------------------------------- drive


def settled(records: Sequence[ShardRecord], *, cancelled: bool) -> bool:
    """Whether no shard attempt needs more work (planned ones may wait when cancelled)."""
    waiting = {"planned", "uploaded"} if cancelled else set()
    return all(r.state == "collected" or r.state in waiting for r in records)


class _Driver:
    """The state of one `drive` call: the partitions it leased and their records in memory.

    The driver is the only writer of its partitions' ledgers (it holds their leases), so it
    reads them once and keeps them current from what each step returns.
    """

    def __init__(self, ctx: RunContext, job: Job, run: RunStore, engine: Engine, ttl_s: float) -> None:
        self.ctx, self.job, self.run, self.engine = ctx, job, run, engine
        self.owner = driver_id()
        self.ttl_s = ttl_s
        self.parts: dict[str, PartitionStore] = {}
        self.records: dict[str, ShardRecord] = {}
        self.seconds: dict[str, float] = defaultdict(float)
        self.raised: dict[str, float] = {}  # stage -> peak RSS (MB) when that stage raised it
        self.lane = str(run.read_run().get("lane", "batch"))
        self.cancel_event = threading.Event()
        self._limits: RateLimits | None = None
        self.retries = batches.Retries.from_settings(ctx.settings.limits, ctx.settings.provider, ctx.settings.lane)

    def claim(self) -> None:
        """Lease open partitions (at most `run.partitions_per_driver` at a time) and load their records.

        Called at the start and after every round, so a driver that finished its share takes
        partitions nobody holds. RunBusy when no partition could be leased at the start.
        """
        limit = self.ctx.settings.run.partitions_per_driver
        busy = []
        for part in self.run.partitions():
            open_now = [p for p in self.parts.values() if p.read_state().get("phase") != "done"]
            if limit is not None and len(open_now) >= limit:
                break
            if part.pid in self.parts or part.read_state().get("phase") == "done":
                continue
            try:
                part.claim(self.owner, self.ttl_s)
            except RunBusy as exc:
                busy.append(exc)
                continue
            drivers = part.read_state().get("drivers", [])
            part.update_state(drivers=[*drivers, self.owner][-10:])  # who drove it, for audit
            self.parts[part.pid] = part
            for rec in Ledger(part).all():
                self.records[rec.key] = rec
        if busy and not self.parts:
            raise busy[0]

    def release(self) -> None:
        for part in self.parts.values():
            part.release(self.owner)

    def heartbeat(self) -> None:
        for part in self.parts.values():
            part.heartbeat(self.owner)

    def keep(self, recs: Sequence[ShardRecord]) -> None:
        for rec in recs:
            self.records[rec.key] = rec

    def by_part(self) -> dict[str, list[ShardRecord]]:
        out: dict[str, list[ShardRecord]] = defaultdict(list)
        for rec in self.records.values():
            out[rec.partition].append(rec)
        return out

    def io(self, fn: Callable[[ShardRecord], ShardRecord], recs: Sequence[ShardRecord]) -> None:
        """Run an I/O step over records on a small thread pool of this process."""
        if not recs:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(recs))) as pool:
            self.keep(list(pool.map(fn, recs)))

    def track(self) -> int:
        """Poll every live batch with one list call, record changes, download ended batches."""
        api = self.ctx.api
        found = batches.poll_batches(api, self.records.values())
        for rec in [r for r in self.records.values() if r.batch_id in found and r.state == "submitted"]:
            self.keep([batches.observe(self.parts[rec.partition], rec, found[rec.batch_id or ""])])
        ended = [r for r in self.records.values() if r.state == "ended" and not r.downloaded and r.batch_status != "failed"]
        self.io(lambda r: batches.download_shard(self.parts[r.partition], api, r.name), ended)
        return len(found)

    def submit(self, chosen: Sequence[ShardRecord]) -> int:
        api = self.ctx.api
        self.io(lambda r: batches.submit_shard(self.parts[r.partition], api, r.name), chosen)
        return len(chosen)

    def realtime(self, chosen: Sequence[ShardRecord]) -> int:
        """Send shard attempts through the real-time lane (sharing one set of client-side limits)."""
        from batchyard.clients.realtime import RateLimits

        lane = self.ctx.settings.lane
        if self._limits is None:
            self._limits = RateLimits(lane.realtime)
        client = self.ctx.api.client
        limits = self._limits
        self.io(lambda r: batches.run_realtime(self.parts[r.partition], client, r.name, lane, limits=limits,
                                               cancel=self.cancel_event), chosen)
        return len(chosen)

    def realtime_due(self) -> list[ShardRecord]:
        """Shard attempts the real-time lane takes now.

        Interrupted real-time attempts; every waiting attempt when the run's lane is real-time;
        follow-ups routed there (past the requeue limit); and, with `lane.mode = auto`, the
        retry tail of a batch run: once its first pass is submitted, the waiting follow-ups when
        they total fewer than `lane.tail_max_tokens`.
        """
        recs = list(self.records.values())
        resumed = [r for r in recs if r.state == "submitted" and r.lane == "realtime"]
        waiting = [r for r in recs if r.state in ("planned", "uploaded")]
        if self.lane == "realtime":
            return resumed + waiting
        routed = [r for r in waiting if r.lane == "realtime"]
        lane = self.ctx.settings.lane
        first_pass_out = all(r.state not in ("planned", "uploaded") for r in recs if r.attempt == 1)
        if lane.mode == "auto" and first_pass_out and waiting and sum(r.tokens for r in waiting) < lane.tail_max_tokens:
            return resumed + waiting
        return resumed + routed

    def timed(self, stage: str, fn: Callable[[], T]) -> T:
        t0, peak = time.perf_counter(), peak_rss_mb()
        try:
            return fn()
        finally:
            self.seconds[stage] += time.perf_counter() - t0
            if (now := peak_rss_mb()) > peak:
                self.raised[stage] = now

    def round(self, *, cancelled: bool) -> bool:
        """One tracker round; returns whether anything changed."""
        before = {k: (r.state, r.batch_status, r.downloaded) for k, r in self.records.items()}
        if any(r.state == "submitted" or (r.state == "ended" and not r.downloaded) for r in self.records.values()):
            self.timed("track", lambda: self.engine.run("track", self.track))
        ready = [(r.partition, r.name) for r in self.records.values()
                 if r.state == "ended" and (r.downloaded or r.batch_status == "failed")]
        for recs in self.timed("collect", lambda: self.engine.map("collect", ready)):
            self.keep(recs)
        parts = list(self.parts.values())
        loaded = (self.timed("load", lambda: self.engine.run("load", lambda: load_parts(self.ctx, self.job, parts)))
                  if any(unloaded_parts(p) for p in parts) else [])
        if loaded and self.ctx.settings.run.partitions_per_driver is not None:
            self.ctx.release_store()  # other drivers of this run take their turn with the stand-in
        if not cancelled:
            rt = self.realtime_due()
            if rt:
                self.timed("realtime", lambda: self.engine.run("realtime", lambda: self.realtime(rt)))
            taken = {r.key for r in rt}
            throttle = batches.Throttle.from_limits(self.ctx.settings.limits)
            waiting = [r for r in self.records.values() if r.key not in taken]
            chosen = batches.select_submittable(waiting, throttle, now=time.time())
            if chosen:
                self.timed("submit", lambda: self.engine.run("submit", lambda: self.submit(chosen)))
        self.finalize_done(cancelled=cancelled)
        after = {k: (r.state, r.batch_status, r.downloaded) for k, r in self.records.items()}
        return after != before or bool(loaded)

    def finalize_done(self, *, cancelled: bool) -> None:
        """Finish every leased partition whose shard attempts are settled and loaded."""
        grouped = self.by_part()
        for pid, part in self.parts.items():
            if part.read_state().get("phase") == "done":
                continue
            if not settled(grouped.get(pid, []), cancelled=cancelled) or unloaded_parts(part):
                continue
            materialize_partition(self.ctx, self.job, part, grouped.get(pid, []), cancelled=cancelled)

    def all_done(self) -> bool:
        return all(p.read_state().get("phase") == "done" for p in self.parts.values())

    def cancel_live(self) -> int:
        live = [r for r in self.records.values() if r.state == "submitted" and r.lane == "batch"]
        api = self.ctx.api
        self.io(lambda r: batches.cancel_shard(self.parts[r.partition], api, r.name), live)
        return len(live)

    def next_wake(self) -> float | None:
        waits = [r.not_before for r in self.records.values()
                 if r.state in ("planned", "uploaded") and r.not_before is not None]
        return min(waits) if waits else None


def materialize_partition(ctx: RunContext, job: Job, part: PartitionStore, records: Sequence[ShardRecord], *,
                          cancelled: bool) -> dict[str, Any]:
    """Finish a settled, loaded partition: its `final` failures, then the batches, results and
    sinks manifests with their checks; the partition is then done."""
    t0 = time.perf_counter()
    stats = job.finalize_partition(part, cancelled=cancelled)
    params = job.params()
    st = part.staging
    statuses: dict[str, int] = defaultdict(int)
    for rec in records:
        statuses[rec.batch_status or rec.state] += 1
    write_manifest(part, "batches", rows=len(records), seconds=0.0, params=params,
                   metadata={"shards": len({r.shard for r in records}), "attempts": len(records),
                             "batches": sum(1 for r in records if r.batch_id) + sum(len(r.past_batches) for r in records),
                             "by_status": dict(statuses), "tokens": sum(r.tokens for r in records if r.attempt == 1)})
    results = sum(st.count_rows(part.rel("results", f"{n}.parquet")) for n in part.parts("results"))
    fails = [st.read_parquet(part.rel("failures", f"{n}.parquet")).select("code") for n in part.parts("failures")]
    by_code = ({str(c): int(n) for c, n in pl.concat(fails).group_by("code").len().sort("code").iter_rows()}
               if fails else {})
    checks = [c.to_json() for c in run_checks(ctx, job, part, "results")]
    write_manifest(part, "results", rows=results, seconds=time.perf_counter() - t0, params=params,
                   metadata={"results": results, "failures": sum(by_code.values()), "failures_by_code": by_code,
                             **stats}, checks=checks)
    loads = _receipts(part)
    sink_checks = [c.to_json() for c in run_checks(ctx, job, part, "sinks")]
    write_manifest(part, "sinks", rows=sum(r.get("rows", 0) for r in loads), seconds=0.0, params=params,
                   metadata={"parts": len(loads), "sinks": _sink_totals(loads)}, checks=sink_checks)
    failed = [c["name"] for c in checks + sink_checks if not c["passed"]]
    if failed:
        log.error("partition %s of run %s failed check(s): %s", part.pid, part.run_id, ", ".join(failed))
    return part.update_state(phase="done", final=stats, cancelled=cancelled, checks_failed=failed)


def _apply_cancel_request(run: RunStore, driver: _Driver) -> bool:
    """Act on `batchyard cancel`: mark the run cancelled and cancel its live batches."""
    request = run.cancel_requested()
    if request is None:
        cancelled = run.read_run().get("state") == "cancelled"
        if cancelled:
            driver.cancel_event.set()
        return cancelled
    run.update_run(state="cancelled", cancel=request)
    driver.cancel_event.set()
    n = driver.cancel_live()
    run.clear_cancel()
    log.warning("run %s cancelled (%s): %d live batch(es) asked to cancel", run.run_id, request.get("requested_by"), n)
    return True


def poll_intervals(ctx: RunContext, override: float | None) -> Callable[[int], float]:
    """Seconds to sleep after `k` rounds without change.

    Real providers: the configured interval. The embedded server answers in seconds, so it
    starts at 1 s (or less, if configured lower) and backs off by 1.5x while nothing changes.
    """
    configured = override if override is not None else ctx.settings.provider.poll_interval_s
    if override is not None or not ctx.settings.provider.embedded:
        return lambda k: configured
    first = min(1.0, configured)
    return lambda k: min(configured, first * 1.5 ** min(k, 60))


def drive(
    ctx: RunContext,
    job: Job,
    run: RunStore,
    *,
    engine: Engine | None = None,
    on_progress: Progress | None = None,
    poll_interval: float | None = None,
    max_rounds: int | None = None,
) -> dict[str, Any]:
    """Phase `batches`: rounds until every leased partition is settled, loaded and finalized.

    Returns the ledger summary of the partitions this process drove. Partitions another live
    process drives are left to it (RunBusy when all of them are).
    """
    engine = engine or LocalEngine(ctx, job, run)
    interval = poll_intervals(ctx, poll_interval)
    longest = poll_interval if poll_interval is not None else ctx.settings.provider.poll_interval_s
    driver = _Driver(ctx, job, run, engine, ttl_s=max(LEASE_TTL_MIN_S, 5 * longest))
    driver.claim()
    rounds = idle = 0
    try:
        while True:
            cancelled = _apply_cancel_request(run, driver)
            changed = driver.round(cancelled=cancelled)
            info = batches.summary(list(driver.records.values()))
            _emit(on_progress, "batches", info["by_state"].get("collected", 0), info["shards"], batches=info)
            if driver.all_done():
                driver.claim()  # a share of partitions is done: take open ones nobody drives
                if driver.all_done():
                    break
            rounds += 1
            if max_rounds is not None and rounds >= max_rounds:
                break
            driver.heartbeat()
            idle = 0 if changed else idle + 1
            if not changed:
                sleep = interval(idle - 1)
                wake = driver.next_wake()
                if wake is not None:
                    sleep = max(0.0, min(sleep, wake - time.time()))
                driver.timed("wait", functools.partial(time.sleep, sleep))
    finally:
        driver.release()
        add_timings(run, driver.raised, **driver.seconds)
    return info


# --------------------------------------------------------------------------- finish and summary


def _count_rows(ctx: RunContext, rels: list[str]) -> int:
    return sum(ctx.staging.count_rows(r) for r in rels)


def run_summary(ctx: RunContext, job: Job, run: RunStore) -> dict[str, Any]:
    """Counts over the run's datasets and ledger: results, failures by code, usage, cost."""
    from batchyard.pricing import estimate
    from batchyard.storage.ledger import run_records

    st = ctx.staging
    results = _count_rows(ctx, [r for r in run.dataset_parts("results")])
    failure_parts = run.dataset_parts("failures")
    codes = (
        pl.concat([st.read_parquet(r).select("code") for r in failure_parts]).group_by("code").len()
        if failure_parts else pl.DataFrame(schema={"code": pl.String, "len": pl.UInt32})
    )
    by_code = {str(c): int(n) for c, n in codes.sort("code").iter_rows()}
    records = run_records(run)
    usage: dict[str, int] = defaultdict(int)
    for rec in records:
        for k, v in (rec.usage or {}).items():
            if isinstance(v, int):
                usage[k] += v
    cost = plan_cost_of(ctx, job, run.read_run().get("plan", {}))
    reported = estimate(ctx.settings.pricing, job.model, input_tokens=usage.get("input_tokens", 0),
                        output_tokens=usage.get("output_tokens", 0))
    sent: dict[str, int] = defaultdict(int)
    for rec in records:
        if rec.batch_id or rec.past_batches:
            sent[rec.lane] += rec.tokens * (1 + len(rec.past_batches))
    by_lane = {lane: {"tokens": n, "usd": estimate(ctx.settings.pricing, job.model, input_tokens=n)[
        "batch_usd" if lane == "batch" else "realtime_usd"]} for lane, n in sorted(sent.items())}
    return {
        "results": results,
        "failures": sum(by_code.values()),
        "failures_by_code": by_code,
        "anomalies": _count_rows(ctx, run.dataset_parts("anomalies")),
        "shards": len({(r.partition, r.shard) for r in records}),
        "shard_attempts": len(records),
        "batches": sum(1 for r in records if r.batch_id) + sum(len(r.past_batches) for r in records),
        "usage": dict(usage),
        "cost_estimate_usd": cost["batch_usd"],
        "cost_estimate_realtime_usd": cost["realtime_usd"],
        "cost_estimate_tokens": {"input": cost["input_tokens"], "output_max": cost["output_tokens"]},
        "cost_reported_usd": reported["batch_usd"],
        "lanes": by_lane,
    }


def plan_cost_of(ctx: RunContext, job: Job, plan_stats: dict[str, Any]) -> dict[str, Any]:
    """The estimated cost of a run's plan at batch prices (inference: at most `max_output_tokens`
    per request on the output side)."""
    from batchyard.pricing import plan_cost

    return plan_cost(ctx.settings.pricing, job.model, input_tokens=int(plan_stats.get("tokens", 0)),
                     requests=int(plan_stats.get("requests", 0)),
                     max_output_tokens=int(job.params().get("max_output_tokens") or 0))


def finish(ctx: RunContext, job: Job, run: RunStore) -> dict[str, Any]:
    """Phase `done`: once every partition is done, the run's summary, manifests and state."""
    info = run.read_run()
    parts = run.partitions()
    if any(p.read_state().get("phase") != "done" for p in parts):
        return info
    cancelled = info.get("state") == "cancelled"
    summary = run_summary(ctx, job, run)
    manifests = write_run_manifests(run)
    summary["checks_failed"] = sorted({c for m in manifests.values() for c in m["checks_failed"]})
    loads = [st for p in parts for st in _receipts(p)]
    if ctx.settings.provider.delete_remote_files and not cancelled:
        delete_remote_files(ctx, run)
    return run.update_run(phase="done", state="cancelled" if cancelled else "finished", final=summary,
                          loads=_sink_totals(loads))


def _receipts(part: PartitionStore) -> list[dict[str, Any]]:
    st = part.staging
    return [dict(st.read_json(part.rel("loads", n))) for n in st.list(part.rel("loads"), ".json")]


def _sink_totals(receipts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sink (milvus, mongo.marks, mongo.results): rows, upserted, modified, parts."""
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for receipt in receipts:
        for r in receipt.get("sinks", []):
            t = totals.setdefault((r["sink"], r["target"]), {"sink": r["sink"], "target": r["target"], "rows": 0,
                                                             "upserted": 0, "modified": 0, "parts": 0})
            for k in ("rows", "upserted", "modified"):
                t[k] += int(r.get(k, 0))
            t["parts"] += 1
    return list(totals.values())


def delete_remote_files(ctx: RunContext, run: RunStore) -> int:
    """Delete a run's remote input, output and error files; returns how many were deleted."""
    from batchyard.storage.ledger import run_records

    n = 0
    for rec in run_records(run):
        for fid in (rec.file_id, rec.output_file_id, rec.error_file_id):
            if fid:
                ctx.api.delete_file(fid)
                n += 1
    return n


# --------------------------------------------------------------------------- whole runs


def execute(
    ctx: RunContext,
    job: Job,
    *,
    run_id: str | None = None,
    engine: Engine | None = None,
    on_progress: Progress | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Run a job end to end (or continue it, when `run_id` names an existing run).

    `wait=False` snapshots, plans and submits what the throttle allows, then returns: the
    scheduled tracker (or `resume`) finishes the run.
    """
    run = RunStore(ctx.staging, job.name, run_id) if run_id else None
    if run is None or not run.exists():
        run = create_run(ctx, job, run_id=run_id)
    return continue_run(ctx, job, run, engine=engine, on_progress=on_progress, wait=wait)


def continue_run(
    ctx: RunContext,
    job: Job,
    run: RunStore,
    *,
    engine: Engine | None = None,
    on_progress: Progress | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Carry a run from its recorded phase to the end (or, `wait=False`, to its first submissions)."""
    engine = engine or LocalEngine(ctx, job, run)
    phase = prepare(ctx, job, run, engine, on_progress=on_progress)
    if phase == "batches":
        drive(ctx, job, run, engine=engine, on_progress=on_progress, max_rounds=None if wait else 1)
    _emit(on_progress, "finish", 0, None)
    return finish(ctx, job, run)


def prepare(
    ctx: RunContext, job: Job, run: RunStore, engine: Engine, *, on_progress: Progress | None = None,
    dry: bool = False,
) -> str:
    """Snapshot and plan under the run lease, from the recorded phase; returns the phase after."""
    phase = str(run.read_run().get("phase", "snapshot"))
    if phase not in ("snapshot", "plan"):
        return phase
    owner = driver_id()
    run.claim(owner, LEASE_TTL_MIN_S)
    try:
        if phase == "snapshot":
            snapshot(ctx, job, run, on_progress=on_progress)
        plan(ctx, job, run, engine, on_progress=on_progress, dry=dry)
    finally:
        run.release(owner)
    return "plan" if dry else "batches"


def dry_run(
    ctx: RunContext, job: Job, *, run_id: str | None = None, on_progress: Progress | None = None
) -> dict[str, Any]:
    """Snapshot and plan a run without contacting the Batch API provider; estimate its size and cost.

    The run is kept, in state `dry_run` with its run-level phase left at `plan` (every partition
    is planned): the scheduled tracker only drives runs in phase `batches`, so it leaves a dry
    run alone, and `execute`/`resume` with its id re-enter `plan` (a no-op for planned
    partitions) and submit exactly the plan that was estimated. Returns run.json with the
    estimate under `dry_run`. A run that is already past planning is only estimated.
    """
    run = RunStore(ctx.staging, job.name, run_id) if run_id else None
    if run is None or not run.exists():
        run = create_run(ctx, job, run_id=run_id)
    prepare(ctx, job, run, LocalEngine(ctx, job, run), on_progress=on_progress, dry=True)
    return run.update_run(dry_run=plan_estimate(ctx, job, run))


def plan_estimate(ctx: RunContext, job: Job, run: RunStore) -> dict[str, Any]:
    """What a planned run will send and cost: partitions, shards, requests, inputs, tokens, USD."""
    from batchyard.storage.ledger import run_records

    info = run.read_run()
    stats = info.get("plan", {})
    firsts = [r for r in run_records(run) if r.attempt == 1]
    cost = plan_cost_of(ctx, job, stats)
    snap = info.get("snapshot", {})
    return {
        "model": job.model,
        "partitions": len(info.get("partitions", [])),
        "shards": len(firsts),
        "requests": sum(r.n_requests for r in firsts),
        "inputs": sum(r.n_inputs for r in firsts),
        "units": int(stats.get("units", 0)),
        "rejected": int(stats.get("rejected", 0)) + int(snap.get("rejected", 0)) + int(snap.get("orphans", 0))
        + int(snap.get("duplicate_ids", 0)),
        "input_tokens": cost["input_tokens"],
        "output_tokens_max": cost["output_tokens"],
        "bytes": sum(r.bytes for r in firsts),
        "cost_batch_usd": cost["batch_usd"],
        "cost_realtime_usd": cost["realtime_usd"],
        "lane": choose_lane(ctx.settings.lane, cost["input_tokens"]),
        "priced": cost["priced"],
        "tokens_saved": int(stats.get("tokens_saved", 0)),
        "cost_saved_usd": float(stats.get("cost_saved_usd", 0.0)),
    }


def cancel(ctx: RunContext, run_id: str, *, wait_s: float = 0.0) -> dict[str, Any]:
    """Cancel a run: no new submissions, live batches cancelled; `resume` re-enables it.

    The request is recorded in the run's staging folder. When a live process drives the run, it
    acts on it within one poll round (this call waits up to `wait_s` for that); otherwise this
    process cancels the live batches itself.
    """
    run = find_run(ctx.staging, run_id)
    run.request_cancel(by=driver_id())
    ttl = LEASE_TTL_MIN_S
    driven = [p for p in run.partitions() if p.lease_holder(ttl) is not None]
    if driven:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and run.cancel_requested() is not None:
            time.sleep(0.2)
        acted = run.cancel_requested() is None
        return {"run_id": run_id, "cancelled_batches": None, "driven_by": driven[0].lease_holder(ttl),
                "acknowledged": acted}
    run.update_run(state="cancelled")
    live = 0
    for part in run.partitions():
        for rec in Ledger(part).all():
            if rec.state == "submitted":
                batches.cancel_shard(part, ctx.api, rec.name)
                live += 1
    run.clear_cancel()
    return {"run_id": run_id, "cancelled_batches": live, "driven_by": None, "acknowledged": True}


def job_for_run(ctx: RunContext, run: RunStore) -> Job:
    """Rebuild the job of an existing run from its run.json parameters."""
    from batchyard.jobs.factory import job_from_params

    info = run.read_run()
    return job_from_params(ctx, info["kind"], info["params"])


def reopen(run: RunStore) -> None:
    """Make a cancelled (or finished-as-cancelled) run resumable: partitions back to `batches`."""
    info = run.read_run()
    run.clear_cancel()
    if info.get("state") != "cancelled":
        return
    for part in run.partitions():
        state = part.read_state()
        if state.get("phase") == "done" and state.get("cancelled"):
            part.update_state(phase="batches", cancelled=False)
    phase = info.get("phase")
    run.update_run(state="running", phase="batches" if phase == "done" else phase)


def resume(
    ctx: RunContext, run_id: str, *, engine: Engine | None = None, on_progress: Progress | None = None
) -> dict[str, Any]:
    """Continue an interrupted or cancelled run from its recorded phase."""
    run = find_run(ctx.staging, run_id)
    reopen(run)
    job = job_for_run(ctx, run)
    return continue_run(ctx, job, run, engine=engine, on_progress=on_progress)


REMATERIALIZE_FROM = ("results", "sinks")


def rematerialize(ctx: RunContext, run_id: str, *, start: str) -> dict[str, Any]:
    """Re-materialize a finished run's assets from staging alone, with no Batch API call.

    `start="results"` re-parses every collected shard attempt from its staged output and error
    files (results, failures and anomalies parts), then reloads the sinks; `start="sinks"`
    reloads Milvus/MongoDB from the results parts.
    """
    if start not in REMATERIALIZE_FROM:
        raise ValueError(f"cannot re-materialize from {start!r}; choose one of {sorted(REMATERIALIZE_FROM)}")
    run = find_run(ctx.staging, run_id)
    info = run.read_run()
    if info.get("phase") != "done":
        raise ValueError(f"run {run_id} is in phase {info.get('phase')!r}: its batches are not settled yet")
    job = job_for_run(ctx, run)
    retries = batches.Retries.from_settings(ctx.settings.limits, ctx.settings.provider, ctx.settings.lane)
    parts = run.partitions()
    for part in parts:
        if start == "results":
            for rec in Ledger(part).all():
                if rec.state == "collected" and rec.batch_status != "failed":
                    batches.recollect_shard(part, rec, job, retries)
        for name in part.staging.list(part.rel("loads"), ".json"):
            part.staging.delete(part.rel("loads", name))
    load_parts(ctx, job, parts)
    for part in parts:
        materialize_partition(ctx, job, part, Ledger(part).all(), cancelled=bool(part.read_state().get("cancelled")))
    run.update_run(phase="done")
    return finish(ctx, job, run)


def exit_code(info: dict[str, Any]) -> int:
    """The process exit code a run's outcome maps to (see `batchyard --help`).

    0: every unit succeeded; 3: the run finished but some units failed; 4: the run was
    cancelled or is unfinished (e.g. detached with `--no-wait`); 5: an integrity check failed.
    """
    if info.get("state") == "cancelled" or info.get("phase") != "done":
        return 4
    final = info.get("final", {})
    if final.get("checks_failed"):
        return 5
    return 3 if final.get("failures", 0) else 0


def partition_table(run: RunStore) -> list[dict[str, Any]]:
    """Per partition: companies, phase, chunks, requests, shards, results, failures."""
    out = []
    records = defaultdict(list)
    for part in run.partitions():
        for rec in Ledger(part).all():
            records[part.pid].append(rec)
    for part in run.partitions():
        state = part.read_state()
        recs = records[part.pid]
        companies = state.get("companies", [])
        bucket = state.get("bucket")
        out.append({
            "partition": part.pid,
            "companies": ", ".join(companies[:3]) + (f" (+{len(companies) - 3})" if len(companies) > 3 else "")
            + (f" [{bucket + 1}/{state.get('buckets')}]" if bucket is not None else ""),
            "phase": state.get("phase", "snapshot"),
            "chunks": state.get("snapshot", {}).get("chunks", 0),
            "requests": state.get("plan", {}).get("requests", 0),
            "shards": f"{sum(1 for r in recs if r.state == 'collected')}/{len(recs)}",
            "waiting": sum(1 for r in recs if r.waiting_note),
            "results": sum(part.staging.count_rows(part.rel("results", f"{n}.parquet")) for n in part.parts("results")),
            "loaded_parts": len(part.parts("results")) - len(unloaded_parts(part)),
        })
    return out


def failures_frame(run: RunStore) -> pl.DataFrame:
    """The run's failures dataset as one frame."""
    return run.read_dataset("failures", FAILURES)


def results_frame(run: RunStore) -> pl.DataFrame:
    """The run's results dataset as one frame."""
    return run.read_dataset("results")


# --------------------------------------------------------------------------- asset freshness


def current_job(ctx: RunContext, run: RunStore) -> Job:
    """The job a run would be with today's settings, code and prompts (for staleness)."""
    from batchyard.targets import Targets

    info = run.read_run()
    targets = Targets.model_validate(info["params"]["targets"])
    if info["kind"] == "embeddings":
        from batchyard.jobs.embeddings import EmbeddingsJob

        return EmbeddingsJob(ctx, targets)
    from batchyard.jobs.inference import InferenceJob

    return InferenceJob(ctx, targets, info["params"]["task"])


def pending_by_company(job: Job) -> dict[str, int]:
    """Units the source holds that `job` would select now, per company (reads the source)."""
    counts: dict[str, int] = defaultdict(int)
    for chunks, _ in job.source_pages(job.targets):
        if chunks.height == 0:
            continue
        unit = "chunk" if job.kind == "embeddings" else job.task.unit  # type: ignore[attr-defined]
        key = "chunk_id" if unit == "chunk" else "document_id"
        for company, n in chunks.group_by("company_id").agg(pl.col(key).n_unique()).iter_rows():
            counts[str(company)] += int(n)
    return dict(counts)


def asset_status(ctx: RunContext, *, job_name: str | None = None) -> list[dict[str, Any]]:
    """Every asset of the latest run of each job scope: data version, when, fresh or stale and why."""
    from batchyard.assets import job_scope, staleness
    from batchyard.storage.runs import list_runs

    latest: dict[str, tuple[RunStore, Job]] = {}
    for run in list_runs(ctx.staging):
        if job_name is not None and run.job != job_name:
            continue
        info = run.read_run()
        if info.get("state") == "dry_run" or "partitions" not in info:
            continue
        job = current_job(ctx, run)
        recorded = (f"embeddings/{info['params']['space']}" if info["kind"] == "embeddings"
                    else f"inference/{info['params']['task']}@{info['params']['task_version']}")
        latest[recorded] = (run, job)  # runs are listed oldest first
    out: list[dict[str, Any]] = []
    for scope, (run, job) in sorted(latest.items()):
        pending = pending_by_company(job)
        for status in staleness(ctx, job, run, pending):
            row = status.to_json()
            row["scope"] = scope
            if job_scope(job) != scope:
                row["status"] = "stale"
                row["reasons"] = [*row["reasons"], f"now {job_scope(job)}"]
            out.append(row)
    return out
