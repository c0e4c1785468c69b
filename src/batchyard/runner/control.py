"""Whole runs and what operators do to them: execute, continue, cancel, reopen, resume, and
re-materialize from staging; and what a run that stopped early says about itself.

A run that stops before it finishes records why in its state (`recording_stop`):
`interrupted` (Ctrl-C, SIGTERM) or `failed` with the cause in `error` (one line: the
component that could not be reached, say). `status` shows it and `resume` continues it from
its recorded phase, as it does a cancelled run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from batchyard.corpus.lifecycle import release_run, reregister
from batchyard.errors import RunBusy
from batchyard.infra import one_line
from batchyard.runner.driver import drive, load_parts, materialize_partition
from batchyard.runner.engine import LEASE_TTL_MIN_S, Engine, LocalEngine, emit
from batchyard.runner.phases import create_run, prepare
from batchyard.runner.summary import finish
from batchyard.stages import batches
from batchyard.storage.ledger import Ledger
from batchyard.storage.runs import RunStore, driver_id, find_run, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable

    from batchyard.context import RunContext
    from batchyard.jobs.base import Job
    from batchyard.settings import Settings

    Progress = Callable[[dict[str, Any]], None]

log = logging.getLogger(__name__)

LIVE_STATES = ("planning", "running")
"""States of a run that is (or was, until it stopped) being worked on."""

STOPPED_STATES = ("interrupted", "failed")
"""States of a run that stopped before it finished; `resume` continues it."""


# --------------------------------------------------------------------------- stopped runs


def describe_state(info: dict[str, Any]) -> str:
    """A run's state as `status` shows it: `failed: <cause>` for a failed run."""
    state = str(info.get("state", "?"))
    return f"{state}: {info['error']}" if state == "failed" and info.get("error") else state


def _mark_stopped(run: RunStore, state: str, error: str | None) -> None:
    """Record that a live run stopped (never over `finished`, `cancelled` or `dry_run`)."""
    try:
        if run.read_run().get("state") not in LIVE_STATES:
            return
        run.update_run(state=state, error=error, stopped_at=utcnow().isoformat())
    except Exception as exc:  # the staging root itself may be what failed: nothing to record in
        log.warning("run %s stopped (%s) but its state could not be recorded: %s", run.run_id, state,
                    one_line(exc))


@contextmanager
def recording_stop(run: RunStore, settings: Settings | None = None) -> Iterator[None]:
    """Record why `run` stops if it stops early: `interrupted` on Ctrl-C or SIGTERM
    (KeyboardInterrupt, and anything else that is not an Exception, such as Prefect's
    termination signal), `failed` with the cause in one line on an error. RunBusy (another
    process drives the run) leaves it as it is. The exception goes on, carrying
    `batchyard_run = (job, run_id, state)` for whoever reports it."""
    try:
        yield
    except RunBusy:
        raise
    except Exception as exc:
        _mark_stopped(run, "failed", one_line(exc, settings))
        _tag(exc, run)
        raise
    except BaseException as exc:
        _mark_stopped(run, "interrupted", None)
        _tag(exc, run)
        raise


def _tag(exc: BaseException, run: RunStore) -> None:
    if getattr(exc, "batchyard_run", None) is None:
        # an exception type that takes no attributes, or a staging root that is gone: no tag
        with contextlib.suppress(Exception):
            exc.batchyard_run = (run.job, run.run_id, run.read_run().get("state"))  # type: ignore[attr-defined]


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
    elif run.read_run().get("state") in STOPPED_STATES:
        reopen(run)
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
    """Carry a run from its recorded phase to the end (or, `wait=False`, to its first submissions).

    If it stops early, its state says why (`recording_stop`)."""
    engine = engine or LocalEngine(ctx, job, run)
    with recording_stop(run, ctx.settings):
        phase = prepare(ctx, job, run, engine, on_progress=on_progress)
        if phase == "batches":
            drive(ctx, job, run, engine=engine, on_progress=on_progress, max_rounds=None if wait else 1)
        emit(on_progress, "finish", 0, 1, detail="summary and manifests")
        info = finish(ctx, job, run)
        emit(on_progress, "finish", 1, 1, detail="done")
        return info


def cancel(ctx: RunContext, run_id: str, *, wait_s: float = 0.0) -> dict[str, Any]:
    """Cancel a run: no new submissions, live batches cancelled; `resume` re-enables it.

    The request is recorded in the run's staging folder. When a live process drives the run, it
    acts on it within one poll round (this call waits up to `wait_s` for that); otherwise this
    process cancels the live batches itself. A run that already ended (finished, or cancelled
    before) is left as it is: `ended` names its state.
    """
    run = find_run(ctx.staging, run_id)
    info = run.read_run()
    if info.get("phase") == "done":
        return {"run_id": run_id, "ended": info.get("state"), "cancelled_batches": 0, "driven_by": None,
                "acknowledged": False}
    run.request_cancel(by=driver_id())
    ttl = LEASE_TTL_MIN_S
    driven = [p for p in run.partitions() if p.lease_holder(ttl) is not None]
    if driven:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and run.cancel_requested() is not None:
            time.sleep(0.2)
        acted = run.cancel_requested() is None
        return {"run_id": run_id, "ended": None, "cancelled_batches": None,
                "driven_by": driven[0].lease_holder(ttl), "acknowledged": acted}
    run.update_run(state="cancelled")
    release_run(run)
    live = 0
    for part in run.partitions():
        for rec in Ledger(part).all():
            if rec.state == "submitted":
                batches.cancel_shard(part, ctx.api, rec.name)
                live += 1
    run.clear_cancel()
    return {"run_id": run_id, "ended": None, "cancelled_batches": live, "driven_by": None, "acknowledged": True}


def job_for_run(ctx: RunContext, run: RunStore) -> Job:
    """Rebuild the job of an existing run from its run.json parameters."""
    from batchyard.jobs.factory import job_from_params

    info = run.read_run()
    return job_from_params(ctx, info["kind"], info["params"])


def reopen(run: RunStore) -> None:
    """Make a stopped run resumable: an interrupted or failed one back to its live state (it
    goes on from its recorded phase), a cancelled (or finished-as-cancelled) one with its
    partitions back to `batches`."""
    info = run.read_run()
    run.clear_cancel()
    if info.get("state") in STOPPED_STATES:
        live = "planning" if info.get("phase") in ("snapshot", "plan") else "running"
        run.update_run(state=live, error=None)
        return
    if info.get("state") != "cancelled":
        return
    for part in run.partitions():
        state = part.read_state()
        if state.get("phase") == "done" and state.get("cancelled"):
            part.update_state(phase="batches", cancelled=False)
    phase = info.get("phase")
    run.update_run(state="running", phase="batches" if phase == "done" else phase)
    reregister(run)


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
                if rec.state == "collected" and rec.batch_status != "failed" and not rec.split_into:
                    batches.recollect_shard(part, rec, job, retries)
        for name in part.staging.list(part.rel("loads"), ".json"):
            part.staging.delete(part.rel("loads", name))
    load_parts(ctx, job, parts)
    for part in parts:
        materialize_partition(ctx, job, part, Ledger(part).all(), cancelled=bool(part.read_state().get("cancelled")))
    run.update_run(phase="done")
    return finish(ctx, job, run)


