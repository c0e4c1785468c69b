"""Run a job through every stage, resumably; the same code under Prefect or plain Python.

`start_run` snapshots and plans; `drive` submits, tracks and collects shard attempts until every
attempt is settled; `finish` writes the final tables and loads the sinks. Each step records its
phase in run.json, so `resume` picks up wherever a crash, a cancel or a Ctrl-C left the run.

The `Mapper` runs one function over many shards: a thread pool in plain Python, mapped tasks
under Prefect (see `batchyard.orchestration`).
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from batchyard import __version__
from batchyard.assets import write_manifest
from batchyard.stages import batches
from batchyard.storage.ledger import Ledger
from batchyard.storage.runs import RunStore, driver_id, find_run, new_run_id, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from batchyard.context import RunContext
    from batchyard.jobs.base import Job
    from batchyard.storage.ledger import ShardRecord

    Mapper = Callable[[Callable[[str], Any], Sequence[str]], list[Any]]
    Progress = Callable[[dict[str, Any]], None]

log = logging.getLogger(__name__)

PHASES = ("snapshot", "plan", "batches", "finalize", "load", "done")


def thread_mapper(workers: int = 8) -> Mapper:
    """Run a function over shard names in a thread pool (the plain-Python engine)."""

    def run(fn: Callable[[str], Any], names: Sequence[str]) -> list[Any]:
        if not names:
            return []
        with ThreadPoolExecutor(max_workers=min(workers, len(names))) as pool:
            return list(pool.map(fn, names))

    return run


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


def snapshot(ctx: RunContext, job: Job, run: RunStore) -> dict[str, int]:
    """Phase `snapshot`: select source rows into chunks.parquet."""
    t0 = time.perf_counter()
    stats = job.snapshot(run)
    write_manifest(run, "chunks", rows=stats.get("chunks", 0), seconds=time.perf_counter() - t0, params=job.params())
    run.update_run(phase="plan", snapshot=stats, document_store=ctx.store.label)
    return stats


def plan(ctx: RunContext, job: Job, run: RunStore) -> dict[str, int]:
    """Phase `plan`: requests.parquet, shard files and ledger records."""
    t0 = time.perf_counter()
    stats = job.plan(run)
    write_manifest(run, "requests", rows=stats.get("requests", 0), seconds=time.perf_counter() - t0, params=job.params())
    run.update_run(phase="batches", state="running", plan=stats)
    return stats


def batch_round(ctx: RunContext, job: Job, run: RunStore, mapper: Mapper) -> tuple[list[ShardRecord], bool]:
    """One tracker round: poll live batches, collect ended ones, submit what the budget allows.

    Returns the records after the round and whether anything changed.
    """
    ledger = Ledger(run)
    api = ctx.api
    records = ledger.all()
    before = {r.name: (r.state, r.batch_status) for r in records}
    mapper(functools.partial(batches.poll_shard, run, api), [r.name for r in records if r.state == "submitted"])
    records = ledger.all()
    max_attempts = ctx.settings.limits.max_attempts
    collect = functools.partial(batches.collect_shard, run, api, parser=job, max_attempts=max_attempts)
    mapper(collect, [r.name for r in records if r.state == "ended"])
    records = ledger.all()
    if run.read_run().get("state") != "cancelled":
        throttle = batches.Throttle.from_limits(ctx.settings.limits)
        chosen = batches.select_submittable(records, throttle, now=time.time())
        mapper(functools.partial(batches.submit_shard, run, api), [r.name for r in chosen])
        records = ledger.all()
    after = {r.name: (r.state, r.batch_status) for r in records}
    return records, after != before


def settled(records: Sequence[ShardRecord], *, cancelled: bool) -> bool:
    """Whether no shard attempt needs more work (planned ones may wait when cancelled)."""
    waiting = {"planned", "uploaded"} if cancelled else set()
    return all(r.state == "collected" or r.state in waiting for r in records)


def drive(
    ctx: RunContext,
    job: Job,
    run: RunStore,
    *,
    mapper: Mapper | None = None,
    on_progress: Progress | None = None,
    poll_interval: float | None = None,
    max_rounds: int | None = None,
) -> dict[str, Any]:
    """Phase `batches`: rounds until every shard attempt is settled; returns the ledger summary."""
    mapper = mapper or thread_mapper()
    interval = poll_interval if poll_interval is not None else ctx.settings.provider.poll_interval_s
    owner = driver_id()
    run.claim(owner, ttl_s=max(120.0, 5 * interval))
    rounds = 0
    try:
        while True:
            records, changed = batch_round(ctx, job, run, mapper)
            cancelled = run.read_run().get("state") == "cancelled"
            info = batches.summary(records)
            if on_progress:
                on_progress(info)
            if settled(records, cancelled=cancelled):
                break
            rounds += 1
            if max_rounds is not None and rounds >= max_rounds:
                return info
            run.heartbeat(owner)
            if not changed:
                time.sleep(interval)
    finally:
        run.release(owner)
    run.update_run(phase="finalize", batches=info)
    return info


def finish(ctx: RunContext, job: Job, run: RunStore) -> dict[str, Any]:
    """Phases `finalize` and `load`: final tables, then sinks."""
    info = run.read_run()
    cancelled = info.get("state") == "cancelled"
    if info.get("phase") in ("batches", "finalize"):
        t0 = time.perf_counter()
        stats = job.finalize(run, cancelled=cancelled)
        write_manifest(run, "results", rows=stats["results"], seconds=time.perf_counter() - t0, params=job.params())
        info = run.update_run(phase="load", final=stats)
    if info.get("phase") == "load":
        t0 = time.perf_counter()
        receipts = job.load(run)
        write_manifest(run, "sinks", rows=sum(r.get("rows", 0) for r in receipts),
                       seconds=time.perf_counter() - t0, params=job.params())
        if ctx.settings.provider.delete_remote_files and not cancelled:
            delete_remote_files(ctx, run)
        info = run.update_run(phase="done", state="cancelled" if cancelled else "finished", loads=receipts)
    return info


def delete_remote_files(ctx: RunContext, run: RunStore) -> int:
    """Delete a run's remote input, output and error files; returns how many were deleted."""
    n = 0
    for rec in Ledger(run).all():
        for fid in (rec.file_id, rec.output_file_id, rec.error_file_id):
            if fid:
                ctx.api.delete_file(fid)
                n += 1
    return n


def execute(
    ctx: RunContext,
    job: Job,
    *,
    run_id: str | None = None,
    mapper: Mapper | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Run a job end to end (or continue it, when `run_id` names an existing run)."""
    run = RunStore(ctx.staging, job.name, run_id) if run_id else None
    if run is None or not run.exists():
        run = create_run(ctx, job, run_id=run_id)
    return continue_run(ctx, job, run, mapper=mapper, on_progress=on_progress)


def continue_run(
    ctx: RunContext, job: Job, run: RunStore, *, mapper: Mapper | None = None, on_progress: Progress | None = None
) -> dict[str, Any]:
    """Carry a run from its recorded phase to the end."""
    phase = run.read_run().get("phase", "snapshot")
    if phase == "snapshot":
        snapshot(ctx, job, run)
        phase = "plan"
    if phase == "plan":
        plan(ctx, job, run)
        phase = "batches"
    if phase == "batches":
        drive(ctx, job, run, mapper=mapper, on_progress=on_progress)
    return finish(ctx, job, run)


def cancel(ctx: RunContext, run_id: str) -> dict[str, Any]:
    """Cancel a run: no new submissions, live batches cancelled; `resume` re-enables it."""
    run = find_run(ctx.staging, run_id)
    run.update_run(state="cancelled")
    ledger = Ledger(run)
    live = [r.name for r in ledger.all() if r.state == "submitted"]
    for name in live:
        batches.cancel_shard(run, ctx.api, name)
    return {"run_id": run_id, "cancelled_batches": len(live)}


def job_for_run(ctx: RunContext, run: RunStore) -> Job:
    """Rebuild the job of an existing run from its run.json parameters."""
    from batchyard.jobs.factory import job_from_params

    info = run.read_run()
    return job_from_params(ctx, info["kind"], info["params"])


def resume(
    ctx: RunContext, run_id: str, *, mapper: Mapper | None = None, on_progress: Progress | None = None
) -> dict[str, Any]:
    """Continue an interrupted or cancelled run from its recorded phase."""
    run = find_run(ctx.staging, run_id)
    info = run.read_run()
    if info.get("state") == "cancelled" and info.get("phase") != "done":
        run.update_run(state="running")
    elif info.get("phase") == "done" and info.get("state") == "cancelled":
        run.update_run(state="running", phase="batches")
    job = job_for_run(ctx, run)
    return continue_run(ctx, job, run, mapper=mapper, on_progress=on_progress)


REMATERIALIZE_FROM = {"results": "finalize", "sinks": "load"}


def rematerialize(ctx: RunContext, run_id: str, *, start: str) -> dict[str, Any]:
    """Re-materialize a finished run's assets from staging alone, with no Batch API call.

    `start="results"` rebuilds results/failures from the staged per-attempt outcomes and reloads
    the sinks; `start="sinks"` reloads Milvus/MongoDB from results.parquet.
    """
    if start not in REMATERIALIZE_FROM:
        raise ValueError(f"cannot re-materialize from {start!r}; choose one of {sorted(REMATERIALIZE_FROM)}")
    run = find_run(ctx.staging, run_id)
    info = run.read_run()
    if info.get("phase") not in ("finalize", "load", "done"):
        raise ValueError(f"run {run_id} is in phase {info.get('phase')!r}: its batches are not settled yet")
    run.update_run(phase=REMATERIALIZE_FROM[start])
    return finish(ctx, job_for_run(ctx, run), run)
