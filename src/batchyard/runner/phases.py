"""The run-level phases before the batches: create, snapshot (partitions and their source rows),
plan (requests, shards, ledger records), and the dry run that stops there."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard import __version__
from batchyard.assets import run_checks, write_manifest
from batchyard.corpus.detect import Detection
from batchyard.corpus.store import Corpus
from batchyard.crash import crashpoint
from batchyard.gctune import fewer_collections
from batchyard.runner.engine import (
    LEASE_TTL_MIN_S,
    Engine,
    LocalEngine,
    add_timings,
    emit,
    peak_rss_mb,
    trim_memory,
)
from batchyard.stages.partition import PartitionSpec
from batchyard.storage.runs import PartitionStore, RunStore, driver_id, new_run_id, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable

    from batchyard.context import RunContext
    from batchyard.corpus.claims import Claims
    from batchyard.jobs.base import Job
    from batchyard.settings import LaneSettings
    from batchyard.targets import Targets

    Progress = Callable[[dict[str, Any]], None]

log = logging.getLogger(__name__)


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
    """Bins that one source query fills: a packed bin, or every bucket bin of a split company."""
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


def _snapshot_unit(ctx: RunContext, job: Job, run: RunStore, specs: list[PartitionSpec], det: Detection,
                   claims: Claims, excluded: dict[str, int]) -> None:
    """Page the source rows of one query unit into its bins' chunk parts (by partition key).

    Units other open runs hold (`claims`) are left out and counted per run in `excluded`.
    """
    from batchyard.corpus.detect import selection_clause
    from batchyard.corpus.keys import key_expr

    parts = [run.partition(s.id) for s in specs]
    for part in parts:
        _clear(part)
    by_key = {k: run.partition(s.id) for s in specs for k in s.keys}
    buckets = specs[0].buckets
    companies = specs[0].companies
    extra = selection_clause(det, companies, ctx.settings.mongo.fields, _retry_ids(run, companies))
    counts: dict[str, int] = defaultdict(int)
    rejected: dict[str, int] = defaultdict(int)
    held = claims.units.select("unit_id", "run_id")
    st = run.staging
    for page_no, (chunks, rejects) in enumerate(job.source_pages(_restricted(job.targets, companies), extra)):
        if chunks.height and held.height:
            units = chunks.with_columns(_unit=job.unit_ids(chunks))
            taken = units.join(held, left_on="_unit", right_on="unit_id", how="inner")
            for (run_id,), rows in taken.group_by(["run_id"]):
                excluded[str(run_id)] += rows.height
            chunks = units.join(held, left_on="_unit", right_on="unit_id", how="anti").drop("_unit")
        for frame, folder, tally in ((chunks, "chunks", counts), (rejects, "failures", rejected)):
            if frame.height == 0:
                continue
            if len(specs) == 1:
                groups = [(specs[0].keys[0], frame)]
            else:  # the bucket bins of one split company
                basis = job.bucket_key() if folder == "chunks" else pl.col("unit_id")
                keyed = frame.with_columns(_company=pl.lit(companies[0])) if folder != "chunks" else frame
                routed = keyed.with_columns(_k=key_expr(basis, buckets, "_company" if folder != "chunks"
                                                        else "company_id"))
                groups = [(str(k), rows.drop("_k", "_company", strict=False))
                          for (k,), rows in routed.group_by(["_k"])]
            for key, rows in groups:
                part = by_key[key]
                name = f"{page_no:05d}.parquet" if folder == "chunks" else f"snapshot-{page_no:05d}.parquet"
                st.write_parquet(part.rel(folder, name), rows)
                tally[part.pid] += rows.height
    for spec, part in zip(specs, parts, strict=True):
        job.after_snapshot(part)
        stats = {"chunks": counts[part.pid], "rejected": rejected[part.pid]}
        write_manifest(part, "chunks", rows=counts[part.pid], seconds=0.0, params=job.params(), metadata=stats)
        part.update_state(phase="plan", companies=spec.companies, keys=spec.keys, buckets=spec.buckets,
                          snapshot=stats)


def _retry_ids(run: RunStore, companies: list[str]) -> list[Any]:
    """The MongoDB ids of the retried chunks of these companies (see `select_units`)."""
    from batchyard.stages.snapshot import mongo_id

    rel = run.rel("retry.parquet")
    if not run.staging.exists(rel):
        return []
    retry = run.staging.read_parquet(rel).filter(pl.col("company_id").is_in(companies))
    return [mongo_id(c, k or "str") for c, k in retry.select("chunk_id", "id_kind").iter_rows()]


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
def snapshot(ctx: RunContext, job: Job, run: RunStore, *, on_progress: Progress | None = None,
             dry: bool = False) -> dict[str, Any]:
    """Phase `snapshot`: detect what changed, pack the touched partition keys into bins, stage
    each bin's source rows (less what other open runs hold), then prune what the source lost.

    Selection runs under the scope's corpus lease, so two runs of a scope never select at once;
    the run registers itself as open (its selection is its claim) before the lease is released.
    A dry run neither registers nor prunes.
    """
    from batchyard.corpus import lifecycle
    from batchyard.stages.snapshot import iter_orphans

    t0 = time.perf_counter()
    fields = ctx.settings.mongo.fields
    corpus = Corpus.of(ctx, job)
    owner = driver_id()
    excluded: dict[str, int] = defaultdict(int)
    with corpus.lease(owner, wait_s=ctx.settings.corpus.select_wait_s):
        info = run.read_run()
        if "partitions" not in info:
            info = lifecycle.select_units(ctx, job, run, corpus, dry=dry)
        det = Detection.from_json(info["detection"])
        claims = lifecycle.claims_for(ctx, job, run, corpus)
        specs = [PartitionSpec.from_json(p) for p in info["partitions"]]
        units = _units(specs)
        for i, unit in enumerate(units):
            emit(on_progress, "snapshot", i, len(units), detail=", ".join(unit[0].companies[:3]))
            if all(run.partition(s.id).read_state().get("snapshot") for s in unit):
                continue
            _snapshot_unit(ctx, job, run, unit, det, claims, excluded)
            corpus.heartbeat(owner)
        emit(on_progress, "snapshot", len(units), len(units))
    orphans = [r for _, r in iter_orphans(ctx.store.chunks, job.targets, fields, page_size=ctx.page_size)]
    if orphans:
        run.staging.write_parquet(run.rel("failures", "snapshot-orphans.parquet"), pl.concat(orphans))
    duplicates = _find_duplicates(run)
    crashpoint("after_snapshot")
    if not dry:
        lifecycle.new_units(ctx, job, run)  # before any load marks them: what the sink never had
    pruned = lifecycle.prune_run(ctx, job, run, det, dry=dry)
    totals: dict[str, Any] = defaultdict(int)
    for part in run.partitions():
        for k, v in part.read_state().get("snapshot", {}).items():
            totals[k] += v
    held = dict(info.get("held_by_open_runs", {}))
    for run_id, n in excluded.items():
        held[run_id] = held.get(run_id, 0) + n
    if held:
        log.warning("%d unit(s) left to open run(s) of this scope that hold them: %s", sum(held.values()),
                    ", ".join(f"{r} ({n})" for r, n in sorted(held.items())))
    stats = {"chunks": 0, "rejected": 0, **totals, "partitions": len(specs), "orphans": sum(o.height for o in orphans),
             "duplicate_ids": duplicates, "held_by_open_runs": sum(held.values()),
             "pruned": int(pruned.get("pruned", 0)), "read": "full" if not det.since else
             ("changes" if not det.full else "mixed")}
    run.update_run(phase="plan", snapshot=stats, held_by_open_runs=held)
    add_timings(run, {"snapshot": peak_rss_mb()}, snapshot=time.perf_counter() - t0)
    trim_memory()
    ctx.yield_store()  # another process of the project directory waits for the stand-in
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
    emit(on_progress, "plan", 0, len(pids))
    engine.map("plan", pids)
    totals: dict[str, Any] = defaultdict(int)
    for part in run.partitions():
        for k, v in part.read_state().get("plan", {}).items():
            totals[k] += v
    totals = {k: round(v, 6) if isinstance(v, float) else v for k, v in totals.items()}
    emit(on_progress, "plan", len(pids), len(pids))
    if not dry and run.read_run().get("state") == "dry_run":
        from batchyard.corpus.lifecycle import reregister

        reregister(run)  # a dry run that is submitted now claims its units
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
            snapshot(ctx, job, run, on_progress=on_progress, dry=dry)
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
    from batchyard.runner.summary import plan_cost_of
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


