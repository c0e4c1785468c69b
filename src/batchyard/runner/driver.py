"""Phase `batches`: the driver's rounds (poll, download, collect, load, submit, finalize) over the
partitions it leases, until each is settled, loaded and materialized."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import polars as pl

from batchyard import quota
from batchyard.assets import run_checks, write_manifest
from batchyard.corpus.lifecycle import materialize_keys
from batchyard.errors import RunBusy
from batchyard.provider_queue import AccountQueue, Reservation, account_of, attempt_key
from batchyard.runner.engine import (
    LEASE_TTL_MIN_S,
    Engine,
    LocalEngine,
    add_timings,
    emit,
    peak_rss_mb,
)
from batchyard.runner.loads import load_parts, receipts, sink_totals, unloaded_parts
from batchyard.runner.phases import plan_one
from batchyard.stages import batches
from batchyard.storage.ledger import Ledger, ShardRecord
from batchyard.storage.runs import PartitionStore, RunStore, driver_id

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from batchyard.clients.realtime import RateLimits
    from batchyard.context import RunContext
    from batchyard.jobs.base import Job

    Progress = Callable[[dict[str, Any]], None]

log = logging.getLogger(__name__)
T = TypeVar("T")


# --------------------------------------------------------------------------- collect and load


def collect_one(ctx: RunContext, job: Job, run: RunStore, pid: str, name: str) -> list[ShardRecord]:
    """Collect one downloaded shard attempt (staging only: runs on any engine worker)."""
    retries = batches.Retries.from_settings(ctx.settings.limits, ctx.settings.provider, ctx.settings.lane)
    return batches.collect_shard(run.partition(pid), name, job, retries)


STEPS: dict[str, Callable[..., Any]] = {"plan": plan_one, "collect": collect_one}


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
        self.provider = quota.provider_key(ctx.settings.provider)
        self.learned = quota.learned_limits(run.read_run(), self.provider)  # model -> stated limit
        self.queue = AccountQueue(ctx.staging, account_of(ctx.settings.provider), job.model)
        self.queue_view: list[Reservation] = []  # the account's reservations at the last sync
        self.samples: list[dict[str, Any]] = []  # the queue's fill, one row per round
        self._flushed = 0.0
        self._collected_at = time.monotonic()

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
        """Poll every live batch with one list call and record what changed."""
        api = self.ctx.api
        found = batches.poll_batches(api, self.records.values())
        for rec in [r for r in self.records.values() if r.batch_id in found and r.state == "submitted"]:
            new = batches.observe(self.parts[rec.partition], rec, found[rec.batch_id or ""])
            self.keep([new])
            if new.batch_status == "failed":
                self.learn(new)
        return len(found)

    def download(self) -> int:
        """Fetch the output and error files of every ended batch into staging."""
        api = self.ctx.api
        ended = [r for r in self.records.values() if r.state == "ended" and not r.downloaded and r.batch_status != "failed"]
        self.io(lambda r: batches.download_shard(self.parts[r.partition], api, r.name), ended)
        return len(ended)

    def learn(self, rec: ShardRecord) -> None:
        """Remember the enqueued-token limit a refused batch states (`batchyard.quota`), and tell
        the account's queue what was in flight when it was refused (it learns the provider's
        count from that)."""
        limit = quota.refusal_limit(rec.errors)
        if any(e.get("code") == quota.TOKEN_LIMIT_CODE for e in rec.errors):
            mine = attempt_key(rec)
            reserved = sum(r.tokens for r in self.queue_view if r.key != mine)
            self.queue.observe_refusal(limit, reserved, rec.tokens)
        if limit is None or self.learned.get(rec.model) == limit:
            return
        self.learned[rec.model] = limit
        quota.learn(self.run, self.provider, rec.model, limit, shard=rec.key)
        budget = self.ctx.settings.limits.enqueued_token_budget
        log.warning("run %s: the provider states a limit of %s enqueued tokens for %s; shards are held to %s",
                    self.run.run_id, f"{limit:,}", rec.model,
                    quota.describe_cap(quota.effective_cap(budget, limit), budget, rec.model))

    def replan_over_limit(self, throttle: batches.Throttle) -> int:
        """Re-plan waiting shard attempts that can never fit the provider's queue as it counts
        (its stated limit, or the budget; times the learned ratio of its count to ours) before
        they are sent, and finish re-plans a crash interrupted."""
        budget = self.ctx.settings.limits.enqueued_token_budget
        learned = self.job.model in self.learned or throttle.ratio.get(self.job.model, 1.0) > 1.0
        over = [r for r in self.records.values()
                if r.state in ("planned", "uploaded") and r.lane == "batch" and self.lane != "realtime"
                and (r.split_cap is not None or (learned and r.tokens > throttle.largest(r.model)))]
        for rec in over:
            cap = rec.split_cap or throttle.largest(rec.model)
            self.keep(batches.split_shard(self.parts[rec.partition], rec.name, self.job, cap, budget=budget))
        return len(over)

    # ------------------------------------------------------------------ the account's queue

    def throttle(self, view: Sequence[Reservation]) -> batches.Throttle:
        """Admission limits with what the rest of the account holds and what was learned of it."""
        limits = self.ctx.settings.limits
        cal = self.queue.calibration()
        learned = dict(self.learned)
        if cal.cap is not None:
            learned[self.job.model] = min(cal.cap, learned.get(self.job.model, cal.cap))
        mine = {attempt_key(r) for r in self.records.values()}
        others = [r for r in view if r.key not in mine]
        model = self.job.model
        return replace(batches.Throttle.from_limits(limits, learned),
                       others={model: sum(r.tokens for r in others)},
                       others_requests={model: sum(r.requests for r in others)},
                       ratio={model: cal.ratio},
                       request_budget=limits.enqueued_request_budget if self.job.endpoint == "/v1/embeddings"
                       else None)

    def admit(self, waiting: Sequence[ShardRecord]) -> list[ShardRecord]:
        """Choose what to submit now and reserve it in the account's queue, under its lease, so
        two drivers (of this run or of others) never admit into the same room."""
        if not any(r.state in ("planned", "uploaded", "uploading", "creating") for r in waiting):
            return []
        with self.queue.admission(self.owner):
            self.queue_view = self.queue.reservations()
            chosen = batches.select_submittable(waiting, self.throttle(self.queue_view), now=time.time())
            fresh = [r for r in chosen if r.state in ("planned", "uploaded")]
            self.queue_view += self.queue.reserve(fresh)
        return chosen

    def sync_queue(self) -> None:
        """Make this driver's markers match its attempts in flight (after a crash, a resume takes
        them over; an attempt that left flight frees its room), and record the queue's fill."""
        view = self.queue.reservations()
        by_key = {r.key: r for r in view}
        flying = {attempt_key(r): r for r in self.records.values() if r.in_flight and r.lane == "batch"}
        mine_prefix = {f"{self.run.run_id}~{pid}~" for pid in self.parts}
        stale = [r for r in view if any(r.key.startswith(p) for p in mine_prefix) and r.key not in flying]
        self.queue.release(stale)
        missing = [rec for key, rec in flying.items() if key not in by_key]
        added = self.queue.reserve(missing)
        self.queue_view = [r for r in view if r not in stale] + added
        if time.monotonic() - self._collected_at > GC_EVERY_S:
            self._collected_at = time.monotonic()
            orphans = orphaned(self.ctx, self.run.run_id, self.queue_view, lease_ttl_s=self.ttl_s)
            if orphans:
                self.queue.release(orphans)
                self.queue_view = [r for r in self.queue_view if r not in orphans]
                log.info("queue %s: %d reservation(s) of runs nobody drives released (their batches ended)",
                         self.queue.model, len(orphans))
        self.sample()

    def observe_usage(self, recs: Sequence[ShardRecord]) -> None:
        """A batch that finished every request tells how the provider counts our tokens."""
        for rec in recs:
            counts, usage = rec.request_counts or {}, rec.usage or {}
            provider = usage.get("input_tokens") or usage.get("prompt_tokens")
            if (rec.state == "collected" and rec.lane == "batch" and isinstance(provider, int)
                    and counts.get("total") and counts.get("completed") == counts.get("total")):
                self.queue.observe_usage(provider, rec.tokens)

    def sample(self) -> None:
        """One row of the queue's fill (what `queue.parquet` and the report show)."""
        throttle = self.throttle(self.queue_view)
        model = self.job.model
        ratio = throttle.ratio.get(model, 1.0)
        own = sum(r.tokens for r in self.records.values() if r.in_flight and r.lane == "batch")
        waiting = sum(r.tokens for r in self.records.values()
                      if r.state in ("planned", "uploaded") and r.lane == "batch" and r.split_cap is None)
        self.samples.append({"t": time.time(), "reserved_tokens": int(sum(r.tokens for r in self.queue_view) * ratio),
                             "cap_tokens": throttle.budget(model), "run_inflight_tokens": int(own * ratio),
                             "run_waiting_tokens": int(waiting * ratio), "driver": self.owner})
        if time.monotonic() - self._flushed > 30:
            self.flush_samples()

    def flush_samples(self) -> None:
        """Add this driver's samples to the run's `queue.parquet`."""
        self._flushed = time.monotonic()
        if not self.samples:
            return
        st, rel = self.run.staging, self.run.rel("queue.parquet")
        frame = pl.DataFrame(self.samples)
        if st.exists(rel):
            frame = pl.concat([st.read_parquet(rel), frame], how="diagonal_relaxed").unique(["t", "driver"])
        st.write_parquet(rel, frame.sort("t"))
        self.samples = []

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
        encoding = self.ctx.settings.embedding.encoding  # what the plan counted embeddings inputs with
        self.io(lambda r: batches.run_realtime(self.parts[r.partition], client, r.name, lane, limits=limits,
                                               cancel=self.cancel_event, encoding=encoding), chosen)
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
        """One tracker round; returns whether anything changed.

        The queue is refilled right after the poll, before the ended batches are downloaded,
        collected and loaded: the room a batch frees is taken within one poll interval, not after
        its results are in the sinks; what the collect plans (follow-ups) goes in the same round.
        """
        before = {k: (r.state, r.batch_status, r.downloaded) for k, r in self.records.items()}
        if any(r.state == "submitted" or (r.state == "ended" and not r.downloaded) for r in self.records.values()):
            self.timed("track", lambda: self.engine.run("track", self.track))
        if not cancelled:
            self.refill()
        if any(r.state == "ended" and not r.downloaded and r.batch_status != "failed" for r in self.records.values()):
            self.timed("download", lambda: self.engine.run("download", self.download))
        ready = [(r.partition, r.name) for r in self.records.values()
                 if r.state == "ended" and (r.downloaded or r.batch_status == "failed")]
        for recs in self.timed("collect", lambda: self.engine.map("collect", ready)):
            self.keep(recs)
            self.observe_usage(recs)
        if ready and not cancelled:
            self.refill()  # follow-ups and requeues the collect planned
        parts = list(self.parts.values())
        loaded = (self.timed("load", lambda: self.engine.run("load", lambda: load_parts(self.ctx, self.job, parts)))
                  if any(unloaded_parts(p) for p in parts) else [])
        if loaded and self.ctx.settings.run.partitions_per_driver is not None:
            self.ctx.release_store()  # other drivers of this run take their turn with the stand-in
        if not cancelled:
            rt = self.realtime_due()
            if rt:
                self.timed("realtime", lambda: self.engine.run("realtime", lambda: self.realtime(rt)))
        self.timed("queue", self.sync_queue)
        self.finalize_done(cancelled=cancelled)
        self.ctx.yield_store()  # another process of the project directory waits for the stand-in
        after = {k: (r.state, r.batch_status, r.downloaded) for k, r in self.records.items()}
        return after != before or bool(loaded)

    def refill(self) -> None:
        """Re-plan what can never fit, then admit and submit what fits the provider's queue now
        (the real-time lane's attempts are left to it)."""
        rt = {r.key for r in self.realtime_due()}
        throttle = self.throttle(self.queue_view)
        learned = self.learned or throttle.ratio.get(self.job.model, 1.0) > 1.0
        if learned or any(r.split_cap is not None for r in self.records.values()):
            self.timed("replan", lambda: self.engine.run("replan", lambda: self.replan_over_limit(throttle)))
        waiting = [r for r in self.records.values() if r.key not in rt]
        chosen = self.timed("admit", lambda: self.admit(waiting))
        if chosen:
            self.timed("submit", lambda: self.engine.run("submit", lambda: self.submit(chosen)))

    def finalize_done(self, *, cancelled: bool) -> None:
        """Finish every leased partition whose shard attempts are settled and loaded.

        Under a cancel, a partition counts as cancelled only when the cancel left work undone
        (attempts still waiting); one whose every attempt was collected simply finished.
        """
        grouped = self.by_part()
        for pid, part in self.parts.items():
            if part.read_state().get("phase") == "done":
                continue
            records = grouped.get(pid, [])
            if not settled(records, cancelled=cancelled) or unloaded_parts(part):
                continue
            cut_short = cancelled and not settled(records, cancelled=False)
            materialize_partition(self.ctx, self.job, part, records, cancelled=cut_short)

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


GC_EVERY_S = 10.0
"""How often a driver looks at other runs' reservations (recovery of crashed holders)."""


def orphaned(ctx: RunContext, run_id: str, view: Sequence[Reservation], *, lease_ttl_s: float,
             max_retrieves: int = 10) -> list[Reservation]:
    """Reservations of other runs that hold nothing any more: the run is gone or ended, or no
    process drives it and its attempt is not in flight (by its ledger), or its batch is terminal
    at the provider (one retrieve each, at most `max_retrieves` per call)."""
    from batchyard.provider_queue import attempt_key
    from batchyard.storage.ledger import TERMINAL_STATUSES
    from batchyard.storage.runs import find_run

    out: list[Reservation] = []
    by_run: dict[str, list[Reservation]] = defaultdict(list)
    for res in view:
        if res.run_id != run_id:
            by_run[res.run_id].append(res)
    retrieves = 0
    for other, held in by_run.items():
        try:
            run = find_run(ctx.staging, other)
        except FileNotFoundError:
            out += held
            continue
        info = run.read_run()
        if info.get("state") in ("finished", "cancelled") or info.get("phase") == "done":
            out += held
            continue
        parts = run.partitions()
        if run.lease_holder(lease_ttl_s) or any(p.lease_holder(lease_ttl_s) for p in parts):
            continue  # a live driver syncs its own reservations
        records = {attempt_key(r): (p, r) for p in parts for r in Ledger(p).all()}
        for res in held:
            found = records.get(res.key)
            if found is None or not found[1].in_flight:
                out.append(res)
            elif found[1].batch_id and retrieves < max_retrieves:
                retrieves += 1
                try:
                    batch = ctx.api.retrieve(found[1].batch_id)
                except Exception as exc:  # a provider blip: look again next time
                    log.debug("queue: retrieving %s failed: %s", found[1].batch_id, exc)
                    continue
                if batch.get("status") in TERMINAL_STATUSES:
                    out.append(res)
    return out


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
    loads = receipts(part)
    sink_checks = [c.to_json() for c in run_checks(ctx, job, part, "sinks")]
    write_manifest(part, "sinks", rows=sum(r.get("rows", 0) for r in loads), seconds=0.0, params=params,
                   metadata={"parts": len(loads), "sinks": sink_totals(loads)}, checks=sink_checks)
    failed = [c["name"] for c in checks + sink_checks if not c["passed"]]
    if failed:
        log.error("partition %s of run %s failed check(s): %s", part.pid, part.run_id, ", ".join(failed))
    touched = materialize_keys(ctx, job, part, cancelled=cancelled)
    return part.update_state(phase="done", final=stats, cancelled=cancelled, checks_failed=failed,
                             partition_keys=touched)


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
            emit(on_progress, "batches", info["by_state"].get("collected", 0), info["shards"], batches=info)
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
        with contextlib.suppress(Exception):  # the fill is a report, never a reason to fail a run
            driver.flush_samples()
        add_timings(run, driver.raised, **driver.seconds)
    return info


