"""Prefect flows and tasks: the asset graph of `batchyard.assets`, materialized by Prefect.

Each stage is a materializing task (`@materialize`) whose asset key names the job, the
embedding space or task version, and the staging root (see `asset_key`), so Prefect records
lineage source → chunks → requests → batches → results → sinks. The CPU-heavy steps (plan per
partition, collect per shard attempt) are mapped task runs that take only plain, picklable
arguments (a `RunRef`, a partition id, a shard name) and open what they need from settings:
they run on the flow's thread pool by default, or on Dask workers with
`orchestration.task_runner = "dask"`. The I/O steps of a tracker round (poll every batch with
one list call, download, load, submit) are one task run each per round, whatever the number of
shards.

The core library never imports Prefect: this module only wraps `batchyard.runner`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_k, _v)

from collections.abc import Callable, Sequence  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.assets import Asset, materialize  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from batchyard import runner  # noqa: E402
from batchyard.context import RunContext, RunRef, context_for, register, run_ref  # noqa: E402
from batchyard.errors import RunBusy, TerminalError  # noqa: E402
from batchyard.settings import load_settings  # noqa: E402
from batchyard.storage.runs import RunStore, find_run  # noqa: E402
from batchyard.targets import load_targets  # noqa: E402

if TYPE_CHECKING:
    from batchyard.jobs.base import Job
    from batchyard.settings import Settings

T = TypeVar("T")

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


# --------------------------------------------------------------------------- mapped steps


def _resolve(ref: RunRef) -> tuple[RunContext, Job, RunStore]:
    ctx = context_for(ref)
    run = RunStore(ctx.staging, ref.job, ref.run_id)
    return ctx, _job(ctx, run), run


_JOBS: dict[tuple[int, str], Job] = {}


def _job(ctx: RunContext, run: RunStore) -> Job:
    key = (id(ctx), run.run_id)
    if key not in _JOBS:
        _JOBS[key] = runner.job_for_run(ctx, run)
    return _JOBS[key]


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient_only,
      task_run_name="plan-{pid}")
def plan_task(ref: RunRef, pid: str) -> dict[str, Any]:
    """Plan one partition (staging only)."""
    ctx, job, run = _resolve(ref)
    return runner.plan_one(ctx, job, run, pid)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient_only,
      task_run_name="collect-{pid}-{name}")
def collect_task(ref: RunRef, pid: str, name: str) -> list[Any]:
    """Parse and settle one downloaded shard attempt (staging only)."""
    ctx, job, run = _resolve(ref)
    return runner.collect_one(ctx, job, run, pid, name)


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_transient_only,
      task_run_name="{step}")
def round_step(step: str, fn: Callable[[], Any]) -> Any:
    """One I/O step of a tracker round (track, load, submit), in the flow's process."""
    return fn()


class PrefectEngine:
    """Runs a run's steps as Prefect task runs (thread pool or Dask, per the flow's task runner)."""

    def __init__(self, ref: RunRef) -> None:
        self.ref = ref

    def map(self, step: str, items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        if step == "plan":
            futures = [plan_task.submit(self.ref, pid) for pid in items]
        elif step == "collect":
            futures = [collect_task.submit(self.ref, pid, name) for pid, name in items]
        else:
            raise ValueError(f"unknown mapped step {step!r}")
        return [f.result() for f in futures]

    def run(self, step: str, fn: Callable[[], T]) -> T:
        return round_step(step, fn)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- task runners


def task_runner_for(settings: Settings) -> Any:
    """The Prefect task runner `orchestration.task_runner` names.

    `threads`: the flow's thread pool. `dask`: prefect-dask's `DaskTaskRunner`, on the cluster
    at `dask_address`, or on a local cluster of `dask_workers` processes (one thread each: the
    tokenizer and the decoders hold the GIL, so processes are what adds cores).
    """
    orch = settings.orchestration
    if orch.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TerminalError("orchestration.task_runner is 'dask' but prefect-dask is not installed: "
                            "pip install 'batchyard[dask]'") from exc
    if orch.dask_address:
        return DaskTaskRunner(address=orch.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": orch.dask_workers, "processes": True,
                                          "threads_per_worker": 1, "dashboard_address": None})


def with_runner(flow_fn: Any, settings: Settings) -> Any:
    """`flow_fn` with the task runner the settings ask for."""
    return flow_fn.with_options(task_runner=task_runner_for(settings))


# --------------------------------------------------------------------------- assets


def _asset(key: str, description: str = "") -> Asset:
    return Asset(key=key, properties={"description": description[:2500]} if description else None)


def _materialize_stage(ctx: RunContext, job: Job, run: RunStore, asset: str) -> None:
    """One materialization per partition of `asset`, with its manifest's figures as metadata.

    Upstream: the previous asset of the graph (for `chunks`, the MongoDB source collection);
    `sinks` also materializes the Milvus and MongoDB collections the results went to. Each of
    the asset's checks becomes a `batchyard.asset.check.passed|failed` event.
    """
    from prefect.assets import add_asset_metadata
    from prefect.events import emit_event

    from batchyard.assets import (
        ASSET_BY_KEY,
        asset_key,
        read_manifest,
        source_asset_key,
        target_asset_keys,
    )

    root = ctx.staging.root
    spec = ASSET_BY_KEY[asset]
    key = asset_key(job, asset, root)
    deps = [_asset(asset_key(job, d, root)) for d in spec.deps] or [_asset(source_asset_key(ctx), "MongoDB chunks")]
    targets = [_asset(k, "where the results are stored") for k in target_asset_keys(ctx, job)] if asset == "sinks" else []
    for part in run.partitions():
        manifest = read_manifest(part, asset)
        if manifest is None:
            continue
        checks = manifest.get("checks", [])
        metadata = {
            "run_id": run.run_id, "partition": part.pid, "rows": manifest["rows"],
            "data_version": manifest["data_version"], "code_version": manifest["code_version"],
            "inputs": manifest["inputs"], "staging_path": manifest["paths"][0], **manifest.get("metadata", {}),
            "checks": {c["name"]: "passed" if c["passed"] else f"failed: {c['detail']}" for c in checks},
        }

        def body(metadata: dict[str, Any] = metadata) -> int:
            for target in [key, *(t.key for t in targets)]:
                add_asset_metadata(target, metadata)
            return int(metadata["rows"])

        materialize(_asset(key, spec.description), *targets, by="batchyard", cache_policy=NO_CACHE,
                    task_run_name=f"{asset}-{part.pid}", asset_deps=deps)(body)()
        for check in checks:
            emit_event(
                event=f"batchyard.asset.check.{'passed' if check['passed'] else 'failed'}",
                resource={"prefect.resource.id": key, "batchyard.check": check["name"],
                          "batchyard.partition": part.pid, "batchyard.run": run.run_id},
                payload={"detail": check["detail"], **check.get("metadata", {})},
            )


def _progress_hook(job: Job, run: RunStore) -> Callable[[dict[str, Any]], None]:
    progress_id = create_progress_artifact(
        0.0, key=f"{run.run_id.lower()}-progress", description=f"{job.name} run {run.run_id}: shards collected"
    )

    def on_progress(event: dict[str, Any]) -> None:
        if event.get("stage") == "batches" and event.get("total"):
            update_progress_artifact(progress_id, 100.0 * event["completed"] / max(event["total"], 1))
        for hook in PROGRESS_HOOKS:
            hook(event)

    return on_progress


def _run_stages(ctx: RunContext, job: Job, run: RunStore, *, wait: bool = True) -> dict[str, Any]:
    logger = get_run_logger()
    engine = PrefectEngine(run_ref(ctx, job.name, run.run_id))
    on_progress = _progress_hook(job, run)
    phase = run.read_run().get("phase")
    # each stage runs first and is materialized after, with its figures: submitting mapped
    # tasks from inside a task would ship that task's context (its closure) to Dask
    if phase == "snapshot":
        stats = runner.snapshot(ctx, job, run, on_progress=on_progress)
        _materialize_stage(ctx, job, run, "chunks")
        logger.info("snapshot: %s", stats)
        phase = "plan"
    if phase == "plan":
        stats = runner.plan(ctx, job, run, engine, on_progress=on_progress)
        _materialize_stage(ctx, job, run, "requests")
        logger.info("plan: %s", stats)
        phase = "batches"
    if phase == "batches":
        summary = runner.drive(ctx, job, run, engine=engine, on_progress=on_progress,
                               max_rounds=None if wait else 1)
        logger.info("batches: %s", summary)
    return _finish(ctx, job, run)


def _finish(ctx: RunContext, job: Job, run: RunStore) -> dict[str, Any]:
    """Materialize batches, results and sinks once the run is done, with its summary artifact."""
    if any(p.read_state().get("phase") != "done" for p in run.partitions()):
        return run.read_run()
    info = runner.finish(ctx, job, run)
    for asset in ("batches", "results", "sinks"):
        _materialize_stage(ctx, job, run, asset)
    final = info.get("final", {})
    rows = {**info.get("plan", {}), **{k: v for k, v in final.items() if not isinstance(v, dict)}}
    create_table_artifact(
        [{"metric": k, "value": v} for k, v in rows.items()],
        key=f"{run.run_id.lower()}-summary",
        description=f"{job.name} run {run.run_id}: {info.get('state')}",
    )
    return info


# --------------------------------------------------------------------------- flows


def _context(profile: str | None, overrides: dict[str, Any] | None) -> RunContext:
    ctx = RunContext(load_settings(profile, **(overrides or {})))
    register(ctx, profile=profile, overrides=overrides)
    return ctx


def _open_run(ctx: RunContext, job: Job, run_id: str | None) -> RunStore:
    if run_id:
        existing = RunStore(ctx.staging, job.name, run_id)
        if existing.exists():
            return existing
    return runner.create_run(ctx, job, run_id=run_id)


@flow(name="batchyard-embeddings", log_prints=False)
def embeddings_flow(targets: str, run_id: str | None = None, profile: str | None = None,
                    overrides: dict[str, Any] | None = None, wait: bool = True) -> dict[str, Any]:
    """Embed the target chunks and load them into Milvus and MongoDB."""
    from batchyard.jobs.embeddings import EmbeddingsJob

    with _context(profile, overrides) as ctx:
        job = EmbeddingsJob(ctx, load_targets(targets))
        run = _open_run(ctx, job, run_id)
        return _run_stages(ctx, job, run, wait=wait)


@flow(name="batchyard-inference", log_prints=False)
def inference_flow(task_name: str, targets: str, run_id: str | None = None, profile: str | None = None,
                   overrides: dict[str, Any] | None = None, wait: bool = True) -> dict[str, Any]:
    """Run one inference task over the targets and store results in MongoDB."""
    from batchyard.jobs.inference import InferenceJob

    with _context(profile, overrides) as ctx:
        job = InferenceJob(ctx, load_targets(targets), task_name)
        run = _open_run(ctx, job, run_id)
        return _run_stages(ctx, job, run, wait=wait)


@flow(name="batchyard-resume", log_prints=False)
def resume_flow(run_id: str, profile: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Continue an interrupted or cancelled run from its recorded phase."""
    with _context(profile, overrides) as ctx:
        run = find_run(ctx.staging, run_id)
        runner.reopen(run)
        return _run_stages(ctx, _job(ctx, run), run)


@flow(name="batchyard-tracker", log_prints=False)
def tracker_flow(profile: str | None = None, overrides: dict[str, Any] | None = None, rounds: int = 1) -> list[dict[str, Any]]:
    """Scheduled tracker: a few cheap rounds over every unfinished run (poll, collect, load, submit)."""
    out: list[dict[str, Any]] = []
    with _context(profile, overrides) as ctx:
        from batchyard.storage.runs import list_runs

        for run in list_runs(ctx.staging):
            info = run.read_run()
            if info.get("phase") != "batches":
                continue
            job = _job(ctx, run)
            engine = PrefectEngine(run_ref(ctx, job.name, run.run_id))
            try:
                summary = runner.drive(ctx, job, run, engine=engine, poll_interval=0, max_rounds=rounds)
            except RunBusy as exc:  # another process drives every open partition right now
                out.append({"run_id": run.run_id, "skipped": str(exc)})
                continue
            _finish(ctx, job, run)
            out.append({"run_id": run.run_id, **summary})
    return out
