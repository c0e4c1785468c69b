"""Prefect flows and tasks: the asset graph of `batchyard.assets`, materialized by Prefect.

Each stage is a materializing task (`@materialize`) whose asset key is
`batchyard://<job>/<asset>`, so Prefect records lineage chunks → requests → batches → results
→ sinks. Shard work (submit, poll, collect) runs as mapped tasks, one task run per shard per
round. Tasks pass run ids and shard names, never frames (clients are opened inside the flow).
Terminal errors are not retried; transient ones are, with backoff.

The core library never imports Prefect: this module only wraps `batchyard.runner`.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_k, _v)

from collections.abc import Callable  # noqa: E402

from prefect import flow, get_run_logger, task, unmapped  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.assets import Asset, materialize  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from batchyard import runner  # noqa: E402
from batchyard.assets import ASSETS  # noqa: E402
from batchyard.context import RunContext  # noqa: E402
from batchyard.errors import RunBusy, TerminalError  # noqa: E402
from batchyard.settings import load_settings  # noqa: E402
from batchyard.storage.runs import RunStore, find_run  # noqa: E402
from batchyard.targets import load_targets  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

    from batchyard.jobs.base import Job


PROGRESS_HOOKS: list[Callable[[dict[str, Any]], None]] = []
"""Extra progress callbacks (the CLI's progress bar registers one while a flow runs)."""


def _transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: never retry a terminal error."""
    try:
        state.result()
    except TerminalError:
        return False
    except Exception:
        return True
    return False


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_transient_only,
      task_run_name="{op}-{name}")
def shard_op(op: str, name: str, fn: Callable[[str], Any]) -> Any:
    """One shard step (submit, poll or collect) for one shard attempt."""
    rec = fn(name)
    return {"name": name, "state": rec.state, "batch_status": rec.batch_status}


def prefect_mapper(fn: Callable[[str], Any], names: Sequence[str]) -> list[Any]:
    """Map a shard step over shard names as Prefect task runs."""
    if not names:
        return []
    base = fn.func if isinstance(fn, functools.partial) else fn
    op = getattr(base, "__name__", "shard").removesuffix("_shard")
    return list(shard_op.map(op, list(names), unmapped(fn)).result())


def _asset(job: Job, key: str) -> Asset:
    spec = next(a for a in ASSETS if a.key == key)
    return Asset(key=f"batchyard://{job.name}/{key}", properties={"description": spec.description})


def _stage_task(job: Job, key: str, fn: Callable[..., Any]) -> Any:
    spec = next(a for a in ASSETS if a.key == key)
    deps = [_asset(job, d) for d in spec.deps]
    return materialize(_asset(job, key), cache_policy=NO_CACHE, task_run_name=key, asset_deps=deps)(fn)


def _run_stages(ctx: RunContext, job: Job, run: RunStore) -> dict[str, Any]:
    logger = get_run_logger()
    progress_id = create_progress_artifact(0.0, description=f"{job.name} run {run.run_id}: shards collected")

    def on_progress(info: dict[str, Any]) -> None:
        total = max(info["shards"], 1)
        done = info["by_state"].get("collected", 0)
        update_progress_artifact(progress_id, 100.0 * done / total)
        for hook in PROGRESS_HOOKS:
            hook(info)

    phase = run.read_run().get("phase")
    if phase == "snapshot":
        stats = _stage_task(job, "chunks", lambda: runner.snapshot(ctx, job, run))()
        logger.info("snapshot: %s", stats)
        phase = "plan"
    if phase == "plan":
        stats = _stage_task(job, "requests", lambda: runner.plan(ctx, job, run))()
        logger.info("plan: %s", stats)
        phase = "batches"
    if phase == "batches":
        # the tracker loop runs in the flow; its shard steps are mapped task runs
        summary = runner.drive(ctx, job, run, mapper=prefect_mapper, on_progress=on_progress)
        _stage_task(job, "batches", lambda: summary)()
    info = _stage_task(job, "results", lambda: runner.finish(ctx, job, run))()
    update_progress_artifact(progress_id, 100.0)
    final = info.get("final", {})
    create_table_artifact(
        [{"metric": k, "value": v} for k, v in {**info.get("plan", {}), **final}.items()],
        key=f"{job.name}-summary".replace("_", "-").lower(),
        description=f"{job.name} run {run.run_id}",
    )
    return info


@flow(name="batchyard-embeddings", log_prints=False)
def embeddings_flow(targets: str, run_id: str | None = None, profile: str | None = None,
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Embed the target chunks and load them into Milvus and MongoDB."""
    from batchyard.jobs.embeddings import EmbeddingsJob

    settings = load_settings(profile, **(overrides or {}))
    with RunContext(settings) as ctx:
        job = EmbeddingsJob(ctx, load_targets(targets))
        run = _open_run(ctx, job, run_id)
        return _run_stages(ctx, job, run)


@flow(name="batchyard-inference", log_prints=False)
def inference_flow(task_name: str, targets: str, run_id: str | None = None, profile: str | None = None,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one inference task over the targets and store results in MongoDB."""
    from batchyard.jobs.inference import InferenceJob

    settings = load_settings(profile, **(overrides or {}))
    with RunContext(settings) as ctx:
        job = InferenceJob(ctx, load_targets(targets), task_name)
        run = _open_run(ctx, job, run_id)
        return _run_stages(ctx, job, run)


@flow(name="batchyard-resume", log_prints=False)
def resume_flow(run_id: str, profile: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Continue an interrupted or cancelled run from its recorded phase."""
    settings = load_settings(profile, **(overrides or {}))
    with RunContext(settings) as ctx:
        run = find_run(ctx.staging, run_id)
        info = run.read_run()
        if info.get("state") == "cancelled":
            run.update_run(state="running", phase="batches" if info.get("phase") == "done" else info.get("phase"))
        job = runner.job_for_run(ctx, run)
        return _run_stages(ctx, job, run)


@flow(name="batchyard-tracker", log_prints=False)
def tracker_flow(profile: str | None = None, overrides: dict[str, Any] | None = None, rounds: int = 1) -> list[dict[str, Any]]:
    """Scheduled tracker: one cheap round over every unfinished run (poll, collect, submit)."""
    settings = load_settings(profile, **(overrides or {}))
    out = []
    with RunContext(settings) as ctx:
        from batchyard.storage.runs import list_runs

        for run in list_runs(ctx.staging):
            info = run.read_run()
            if info.get("phase") != "batches" or info.get("state") == "cancelled":
                continue
            job = runner.job_for_run(ctx, run)
            try:
                summary = runner.drive(ctx, job, run, mapper=prefect_mapper, poll_interval=0, max_rounds=rounds)
            except RunBusy as exc:  # another flow is driving it right now
                out.append({"run_id": run.run_id, "skipped": str(exc)})
                continue
            if run.read_run().get("phase") == "finalize":  # settled in this round: finish it
                runner.finish(ctx, job, run)
            out.append({"run_id": run.run_id, **summary})
    return out


def _open_run(ctx: RunContext, job: Job, run_id: str | None) -> RunStore:
    if run_id:
        existing = RunStore(ctx.staging, job.name, run_id)
        if existing.exists():
            return existing
    return runner.create_run(ctx, job, run_id=run_id)
