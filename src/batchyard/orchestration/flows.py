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

Operations (see the README's deploy section):

- every flow takes typed `options` (`orchestration.options`) besides its keyword arguments;
- a deployment run with no profile uses `$BATCHYARD_PROFILE`, else the Prefect Variable
  `batchyard_profile` (`prefect variable set batchyard_profile prod`), else the defaults;
- batchyard's log records (INFO and up, from any thread) go to the flow run's logs, and the
  known noise is silenced as in the CLI;
- cancelling a flow run in Prefect cancels its batchyard run (`on_cancellation`), as
  `batchyard cancel` does: the flow run carries the run id as a tag, `batchyard-run:<id>`;
- a flow run's final state says what the run's exit code says: `Failed` when an integrity
  check failed (5) or the run stopped on an error (1), `Cancelled` when the run was cancelled
  (4), `Completed` otherwise; a run that finished with failed units (3) is `Completed` with a
  warning in its logs and a `<run>-failures` table artifact;
- `rerun` and `audit` are flows too, so every command that reads or writes a run's assets
  leaves a flow run behind.

The core library never imports Prefect: this module only wraps `batchyard.runner`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, TypeVar

for _k, _v in {
    "DO_NOT_TRACK": "1",  # no first-run telemetry notice, no analytics calls from the SDK
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_k, _v)

from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import AbstractContextManager, contextmanager, nullcontext  # noqa: E402

from prefect import flow, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.assets import Asset, materialize  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import FlowRunContext  # noqa: E402
from prefect.exceptions import MissingContextError  # noqa: E402
from prefect.logging.handlers import APILogHandler  # noqa: E402
from prefect.states import Cancelled, Failed  # noqa: E402

from batchyard import runner  # noqa: E402
from batchyard.context import RunContext, RunRef, context_for, register, run_ref  # noqa: E402
from batchyard.errors import RunBusy, TerminalError  # noqa: E402
from batchyard.logs import FOR_PREFECT_ONLY, silence_noise  # noqa: E402
from batchyard.orchestration.options import RunOptions, SettingsOptions, merge_overrides  # noqa: E402
from batchyard.pricing import figure  # noqa: E402
from batchyard.settings import load_settings  # noqa: E402
from batchyard.storage.runs import RunStore, find_run  # noqa: E402
from batchyard.targets import load_targets  # noqa: E402

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun, State

    from batchyard.jobs.base import Job
    from batchyard.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)

RUN_TAG = "batchyard-run:"
"""Tag prefix that names the batchyard run a flow run drives (what `on_cancellation` cancels)."""

PROFILE_VARIABLE = "batchyard_profile"
"""The Prefect Variable that names the profile of deployment runs given none."""

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


def _distributed() -> bool:
    """Whether the running flow's task runner ships tasks to other processes (Dask)."""
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    ctx = FlowRunContext.get()
    return ctx is not None and not isinstance(ctx.task_runner, ThreadPoolTaskRunner)


class PrefectEngine:
    """Runs a run's steps as Prefect task runs (thread pool or Dask, per the flow's task runner)."""

    def __init__(self, ref: RunRef) -> None:
        self.ref = ref

    def map(self, step: str, items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        futures: list[Any]
        if not _distributed():
            # on the flow's thread pool, one at a time keeps memory bounded by a partition (plan)
            # or a shard attempt (collect), and threads add no core (the GIL); on Dask, each
            # worker process takes its own
            if step == "plan":
                return [plan_task.submit(self.ref, pid).result() for pid in items]
            if step == "collect":
                return [collect_task.submit(self.ref, pid, name).result() for pid, name in items]
        if step == "plan":
            futures = [plan_task.submit(self.ref, pid) for pid in items]
        elif step == "collect":
            futures = [collect_task.submit(self.ref, pid, name) for pid, name in items]
        else:
            raise ValueError(f"unknown mapped step {step!r}")
        return [f.result() for f in futures]

    def run(self, step: str, fn: Callable[[], T]) -> T:
        result: T = round_step(step, fn)  # type: ignore[assignment]  # a sync task returns its value
        return result


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


def deployable(flow_fn: Any) -> Any:
    """`flow_fn` as a deployment runs it (`flows/*.py`): with the task runner of the settings of
    its environment, e.g. `BATCHYARD_ORCHESTRATION__TASK_RUNNER=dask` in the worker's."""
    return with_runner(flow_fn, load_settings())


# --------------------------------------------------------------------------- assets


def _asset(key: str, description: str = "") -> Asset:
    from prefect.assets import AssetProperties

    return Asset(key=key, properties=AssetProperties(description=description[:2500]) if description else None)


def _materialize_stage(ctx: RunContext, job: Job, run: RunStore, asset: str) -> None:
    """One materialization of `asset` per bin that touched partition keys, with its manifest's
    figures and the keys it touched as metadata.

    Keys are stable (`asset_key`): the partition keys touched are in the payload (at most 100
    listed; `more_keys` counts the rest), and the task version is the `code_version`. A failed
    check fails the materialization (Prefect records `...materialization.failed`); each check
    is also a `batchyard.asset.check.passed|failed` event. Upstream: the previous asset of the
    graph (for `chunks`, the MongoDB source collection).
    """
    from prefect.assets import add_asset_metadata
    from prefect.events import emit_event

    from batchyard.assets import ASSET_BY_KEY, asset_key, read_manifest, source_asset_key

    root = ctx.staging.root
    spec = ASSET_BY_KEY[asset]
    key = asset_key(job, asset, root)
    deps = [_asset(asset_key(job, d, root)) for d in spec.deps] or [_asset(source_asset_key(ctx), "MongoDB chunks")]
    for part in run.partitions():
        manifest = read_manifest(part, asset)
        state = part.read_state()
        touched = state.get("partition_keys") or {}
        if manifest is None or not state.get("snapshot", {}).get("chunks"):
            continue  # a bin with nothing to do materializes nothing
        checks = manifest.get("checks", [])
        failed = [c for c in checks if not c["passed"]]
        metadata = {
            "run_id": run.run_id, "bin": part.pid, "rows": manifest["rows"],
            "data_version": manifest["data_version"], "code_version": job.selection_version or manifest["code_version"],
            "inputs": manifest["inputs"], "staging_path": manifest["paths"][0], **manifest.get("metadata", {}),
            "partition_keys": touched.get("partition_keys") or state.get("keys", [])[:100],
            "more_keys": touched.get("more_keys", max(0, len(state.get("keys", [])) - 100)),
            "checks": {c["name"]: "passed" if c["passed"] else f"failed: {c['detail']}" for c in checks},
        }

        def body(metadata: dict[str, Any] = metadata, failed: list[dict[str, Any]] = failed) -> int:
            add_asset_metadata(key, metadata)
            if failed:
                raise AssetCheckFailed(key, [f"{c['name']}: {c['detail']}" for c in failed])
            return int(metadata["rows"])

        task = materialize(_asset(key, spec.description), by="batchyard", cache_policy=NO_CACHE,
                           task_run_name=f"{asset}-{part.pid}", asset_deps=list[Asset | str](deps))(body)
        task(return_state=True)  # a failed check is the task's Failed state, not an exception here
        for check in checks:
            emit_event(
                event=f"batchyard.asset.check.{'passed' if check['passed'] else 'failed'}",
                resource={"prefect.resource.id": key, "batchyard.check": check["name"],
                          "batchyard.partition": part.pid, "batchyard.run": run.run_id},
                payload={"detail": check["detail"], **check.get("metadata", {})},
            )


class AssetCheckFailed(TerminalError):
    """An asset check failed: its materialization fails (and the run exits 5)."""

    def __init__(self, key: str, checks: list[str]) -> None:
        self.key = key
        self.checks = checks
        super().__init__(f"asset {key}: check(s) failed: {'; '.join(checks)}")


def _materialize_targets(ctx: RunContext, job: Job, run: RunStore, info: dict[str, Any]) -> None:
    """One materialization per run of each collection the results went to, with the rows it
    holds in total and for the companies the run touched (counted once, not per bin)."""
    from prefect.assets import add_asset_metadata

    from batchyard.assets import asset_key, target_asset_keys

    figures = (info.get("corpus") or {}).get("targets") or {}
    if not figures:
        return
    sinks = _asset(asset_key(job, "sinks", ctx.staging.root))
    for target in target_asset_keys(ctx, job):
        # the marks live in the chunks collection: their count is the vectors'
        metadata = {"run_id": run.run_id, "rows": figures.get("rows"), "target": figures.get("target"),
                    "rows_by_company": dict(list((figures.get("by_company") or {}).items())[:100]),
                    "code_version": job.selection_version or None}

        def body(metadata: dict[str, Any] = metadata, target: str = target) -> None:
            add_asset_metadata(target, metadata)

        materialize(_asset(target, "where the results are stored"), by="batchyard", cache_policy=NO_CACHE,
                    task_run_name=f"target-{target.split('/')[-1]}", asset_deps=[sinks])(body)()


def _progress_hook(job: Job, run: RunStore) -> Callable[[dict[str, Any]], None]:
    progress_id: Any = create_progress_artifact(  # a UUID in a sync flow
        0.0, key=f"{run.run_id.lower()}-progress", description=f"{job.name} run {run.run_id}: shards collected"
    )

    seen: dict[str, Any] = {}

    def on_progress(event: dict[str, Any]) -> None:
        if event.get("stage") == "batches" and event.get("total"):
            update_progress_artifact(progress_id, 100.0 * event["completed"] / max(event["total"], 1))
        _log_round(run, event, seen)
        for hook in PROGRESS_HOOKS:
            hook(event)

    return on_progress


def _log_round(run: RunStore, event: dict[str, Any], seen: dict[str, Any]) -> None:
    """One INFO line per tracker round whose shard-attempt states changed."""
    by_state = (event.get("batches") or {}).get("by_state") if event.get("stage") == "batches" else None
    if by_state and by_state != seen.get("by_state"):
        seen["by_state"] = by_state
        log.info("run %s shard attempts: %s", run.run_id, ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())))


def _run_stages(ctx: RunContext, job: Job, run: RunStore, *, wait: bool = True) -> dict[str, Any]:
    with runner.recording_stop(run, ctx.settings):
        return _stages(ctx, job, run, wait=wait)


def _stages(ctx: RunContext, job: Job, run: RunStore, *, wait: bool) -> dict[str, Any]:
    engine = PrefectEngine(run_ref(ctx, job.name, run.run_id))
    on_progress = _progress_hook(job, run)
    phase = run.read_run().get("phase")
    # each stage runs first and is materialized after, with its figures: submitting mapped
    # tasks from inside a task would ship that task's context (its closure) to Dask
    if phase == "snapshot":
        stats = runner.snapshot(ctx, job, run, on_progress=on_progress)
        _materialize_stage(ctx, job, run, "chunks")
        log.info("run %s snapshot: %s", run.run_id, stats)
        phase = "plan"
    if phase == "plan":
        stats = runner.plan(ctx, job, run, engine, on_progress=on_progress)
        _materialize_stage(ctx, job, run, "requests")
        log.info("run %s plan: %s", run.run_id, stats)
        phase = "batches"
    if phase == "batches":
        summary = runner.drive(ctx, job, run, engine=engine, on_progress=on_progress,
                               max_rounds=None if wait else 1)
        log.info("run %s batches: %s", run.run_id, summary)
    info = _finish(ctx, job, run, on_progress=on_progress)
    log.info("run %s: %s (phase %s)", run.run_id, info.get("state"), info.get("phase"))
    return info


def _finish(ctx: RunContext, job: Job, run: RunStore, *, on_progress: Callable[[dict[str, Any]], None] | None = None,
            assets: Sequence[str] = ("batches", "results", "sinks"), info: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """Materialize `assets` once the run is done, with its summary artifact (and its failures
    table when units failed). Progress events go on through this stage, so a progress bar
    does not stand still after the last batch."""
    if any(p.read_state().get("phase") != "done" for p in run.partitions()):
        return run.read_run()
    steps = ["summary", *assets, "artifacts"]
    emit = (lambda i, what: on_progress({"stage": "finish", "completed": i, "total": len(steps), "detail": what})
            ) if on_progress else (lambda i, what: None)
    emit(0, "summary and manifests")
    info = info if info is not None else runner.finish(ctx, job, run)
    for i, asset in enumerate(assets, start=1):
        emit(i, f"materializing {asset}")
        _materialize_stage(ctx, job, run, asset)
    emit(len(steps) - 1, "target collections and artifacts")
    if "sinks" in assets:
        _materialize_targets(ctx, job, run, info)
    final = info.get("final", {})
    rows = {**info.get("plan", {}), **{k: v for k, v in final.items() if not isinstance(v, dict)}}
    create_table_artifact(
        [{"metric": k, "value": figure(k, v)} for k, v in rows.items()],
        key=f"{run.run_id.lower()}-summary",
        description=f"{job.name} run {run.run_id}: {info.get('state')}",
    )
    if final.get("failures"):
        _failures_artifact(job, run, final)
    _report_artifact(run)
    emit(len(steps), "done")
    return info


FAILURES_ARTIFACT_ROWS = 1_000
"""Failed units listed in a run's failures artifact (the failures dataset holds them all)."""


def _failures_artifact(job: Job, run: RunStore, final: dict[str, Any]) -> None:
    """A warning in the flow run's logs and a `<run>-failures` table artifact: the failed units
    with their stage, code and message (the first `FAILURES_ARTIFACT_ROWS`)."""
    by_code = ", ".join(f"{code} {n}" for code, n in sorted(final.get("failures_by_code", {}).items()))
    log.warning("run %s finished with %d failed unit(s): %s (exit code 3; `batchyard audit %s` lists them)",
                run.run_id, final["failures"], by_code, run.run_id, extra=FOR_PREFECT_ONLY)
    frame = runner.failures_frame(run)
    cols = [c for c in ("unit_id", "stage", "code", "message", "attempt") if c in frame.columns]
    rows = frame.select(cols).head(FAILURES_ARTIFACT_ROWS).to_dicts()
    more = frame.height - len(rows)
    create_table_artifact(
        rows, key=f"{run.run_id.lower()}-failures",
        description=f"{job.name} run {run.run_id}: {final['failures']} failed unit(s) ({by_code})"
        + (f"; the first {len(rows)} are listed, {more} more in its failures dataset" if more > 0 else ""),
    )


def outcome_state(info: dict[str, Any]) -> Any:
    """The flow run's final state for a run's outcome: what `runner.exit_code` tells scripts.

    Cancelled (4, cancelled) -> `Cancelled`; an integrity check failed (5) -> `Failed`; else the
    summary itself, so the flow run is `Completed` (failed units, 3: with a warning and the
    failures artifact written by `_finish`; not finished yet, `--no-wait`: the tracker goes on).
    """
    run_id = info.get("run_id")
    if info.get("state") == "cancelled":
        return Cancelled(message=f"batchyard run {run_id} was cancelled; `batchyard resume {run_id}` continues it",
                         data=info)
    if runner.exit_code(info) == 5:
        checks = ", ".join(info.get("final", {}).get("checks_failed", []))
        log.error("run %s: integrity check(s) failed: %s (exit code 5)", run_id, checks, extra=FOR_PREFECT_ONLY)
        return Failed(message=f"batchyard run {run_id}: integrity check(s) failed: {checks}", data=info)
    return info


def outcome(state: Any) -> dict[str, Any]:
    """What a flow run called with `return_state=True` returned: its summary whatever its final
    state, or the exception it stopped on, raised again."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return dict(result)


def _report_artifact(run: RunStore) -> None:
    """Write the run's HTML report (`batchyard report`) to its staging folder and link it from
    the flow run. A report that cannot be drawn is logged; it never changes the run's outcome."""
    from pathlib import Path

    from batchyard.report import write

    try:
        written = write(run)
    except Exception as exc:  # the report is a view of the run, not part of it
        log.warning("run %s: the report was not written: %s", run.run_id, exc)
        return
    link = written.location if written.location.startswith("s3://") else Path(written.location).as_uri()
    create_link_artifact(link, link_text=f"report of run {run.run_id}", key=f"{run.run_id.lower()}-report",
                         description=f"{run.job} run {run.run_id}: summary, cost, timeline, queue, failures")


# --------------------------------------------------------------------------- logs


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, bound to one flow run: records from threads that carry no run
    context (the driver's I/O pool, the embedded server) still reach that run's logs."""

    def __init__(self, flow_run_id: Any) -> None:
        super().__init__(level=logging.INFO)
        self.flow_run_id = flow_run_id

    def prepare(self, record: logging.LogRecord) -> dict[str, Any]:
        try:
            return super().prepare(record)
        except MissingContextError:
            record.flow_run_id = self.flow_run_id
            return super().prepare(record)


@contextmanager
def run_logs(flow_run_id: Any) -> Iterator[None]:
    """batchyard's log records go to the flow run's logs while this is open, the noise does not.

    INFO and up, whoever started the flow run: a deployment's, and one the CLI started, whatever
    its terminal shows (the CLI's own handler keeps its `--verbose` level). Under a worker the
    records also reach the process's console through the root logger (the worker prints them).
    One flow run at a time per process: records from threads without a run context go to it.
    """
    silence_noise()
    if flow_run_id is None:  # the flow's function called on its own (`.fn`): no run to log to
        yield
        return
    root = logging.getLogger("batchyard")
    handler = _RunLogHandler(flow_run_id)
    previous = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


# --------------------------------------------------------------------------- settings of a flow run


def default_profile(profile: str | None, *, deployed: bool) -> str | None:
    """The profile a flow run loads: the given one, else `$BATCHYARD_PROFILE` (read by
    `load_settings`), else, for deployment runs only, the Prefect Variable `batchyard_profile`.

    The Variable is the production switch of the shipped deployments: `prefect variable set
    batchyard_profile prod` moves every deployment, the scheduled tracker included, at its next
    run, with no redeploy. CLI runs never read it (their profile is `--profile`).
    """
    if profile or os.environ.get("BATCHYARD_PROFILE") or not deployed:
        return profile
    from prefect.variables import Variable

    value = Variable.get(PROFILE_VARIABLE, default=None)
    return str(value) if value else None


def _settings_args(profile: str | None, overrides: dict[str, Any] | None, options: SettingsOptions | None,
                   *, deployed: bool) -> tuple[str | None, dict[str, Any]]:
    """Profile and settings overrides of a flow run: explicit arguments win over `options`."""
    if options is not None:
        profile = profile or options.profile
        overrides = merge_overrides(options.to_overrides(), overrides or {})
    return default_profile(profile, deployed=deployed), dict(overrides or {})


_PROVIDED: list[RunContext] = []


@contextmanager
def provided_context(ctx: RunContext) -> Iterator[RunContext]:
    """While open, flow runs of this process whose settings equal `ctx`'s run in `ctx` (and
    leave it open) instead of opening clients of their own: the CLI opens its context while
    Prefect starts (`batchyard.launch`), and a command that makes several runs, like the demo,
    starts Milvus Lite and the embedded Batch API server once."""
    _PROVIDED.append(ctx)
    try:
        yield ctx
    finally:
        _PROVIDED.remove(ctx)


def _context(profile: str | None, overrides: dict[str, Any] | None) -> AbstractContextManager[RunContext]:
    settings = load_settings(profile, **(overrides or {}))
    provided = next((c for c in reversed(_PROVIDED) if c.settings == settings), None)
    ctx = provided or RunContext(settings)
    register(ctx, profile=profile, overrides=overrides)
    return nullcontext(ctx) if provided is not None else ctx


def _current_flow_run() -> FlowRun | None:
    run_ctx = FlowRunContext.get()
    return run_ctx.flow_run if run_ctx is not None else None


@contextmanager
def _flow_context(profile: str | None, overrides: dict[str, Any] | None,
                  options: SettingsOptions | None) -> Iterator[RunContext]:
    """The run context of the current flow run, with its logs routed to Prefect."""
    flow_run = _current_flow_run()
    deployed = flow_run is not None and flow_run.deployment_id is not None
    profile, overrides = _settings_args(profile, overrides, options, deployed=deployed)
    with run_logs(flow_run.id if flow_run else None), _context(profile, overrides) as ctx:
        yield ctx


def _run_args(targets: str | None, run_id: str | None, wait: bool, options: RunOptions | None
              ) -> tuple[str, str | None, bool]:
    """Targets, run id and wait: explicit arguments win, `options` fills what they leave unset."""
    if options is not None:
        targets = targets if targets is not None else options.targets
        run_id = run_id or options.run_id
        wait = wait and options.wait
    if targets is None:
        raise TerminalError("no targets file: give `targets` or `options.targets`")
    return targets, run_id, wait


# --------------------------------------------------------------------------- cancellation

CANCEL_WAIT_S = 30.0
"""How long the cancellation hook waits for a live driver (another process) to act."""


def _tag_flow_run(run_id: str) -> None:
    """Tag the current flow run `batchyard-run:<run_id>`: the UI shows which run it drives, and
    `cancel_batchyard_run` finds the run to cancel."""
    flow_run = _current_flow_run()
    tag = RUN_TAG + run_id
    if flow_run is None or tag in flow_run.tags:
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=[*flow_run.tags, tag])
    except Exception as exc:  # a missing tag only costs the cancellation hook its target
        log.warning("could not tag flow run %s with %s: %s", flow_run.id, tag, exc)


def _tagged_run_id(flow_run: FlowRun) -> str | None:
    """The batchyard run a flow run drives, from its tag (read fresh: it was added while running)."""
    from prefect.client.orchestration import get_client

    tags = list(flow_run.tags)
    try:
        with get_client(sync_client=True) as client:
            tags = list(client.read_flow_run(flow_run.id).tags)
    except Exception as exc:
        log.warning("could not read flow run %s, using its tags as given: %s", flow_run.id, exc)
    return next((t[len(RUN_TAG):] for t in tags if t.startswith(RUN_TAG)), None)


def cancel_batchyard_run(flow: Any, flow_run: FlowRun, state: State) -> None:
    """`on_cancellation` hook: cancel the flow run's batchyard run, as `batchyard cancel` does.

    A worker kills the flow run's process first, then runs this hook in a fresh process; without
    a worker, it runs in the flow's process after the flow stopped. Either way the run's driver
    is gone (its leases released, or held by a dead pid), so `runner.cancel` cancels the live
    batches itself and marks the run `cancelled`; `resume` (or the tracker) collects what
    finished. When another live process drives the run, it acts on the request within a round.
    """
    run_id = _tagged_run_id(flow_run)
    if run_id is None:  # cancelled before its run existed: nothing was submitted
        return
    params = dict(flow_run.parameters or {})
    options = RunOptions.model_validate(params["options"]) if params.get("options") else None
    profile, overrides = _settings_args(params.get("profile"), params.get("overrides"), options,
                                        deployed=flow_run.deployment_id is not None)
    with run_logs(flow_run.id), _context(profile, overrides) as ctx:
        out = runner.cancel(ctx, run_id, wait_s=CANCEL_WAIT_S)
        if out["driven_by"] is None:
            log.warning("run %s cancelled with its flow run: %s live batch(es) asked to cancel",
                        run_id, out["cancelled_batches"])
        else:
            log.warning("run %s: cancel %s by its driver %s", run_id,
                        "acknowledged" if out["acknowledged"] else "recorded, not yet acknowledged",
                        out["driven_by"].get("owner"))


# --------------------------------------------------------------------------- flows


def _open_run(ctx: RunContext, job: Job, run_id: str | None) -> RunStore:
    if run_id:
        existing = RunStore(ctx.staging, job.name, run_id)
        if existing.exists():
            if existing.read_run().get("state") in runner.STOPPED_STATES:
                runner.reopen(existing)
            return existing
    return runner.create_run(ctx, job, run_id=run_id)


@flow(name="batchyard-embeddings", log_prints=False, on_cancellation=[cancel_batchyard_run])
def embeddings_flow(targets: str | None = None, run_id: str | None = None, profile: str | None = None,
                    overrides: dict[str, Any] | None = None, wait: bool = True,
                    options: RunOptions | None = None) -> Any:
    """Embed the target chunks and load them into Milvus and MongoDB.

    `options` (what deployments set) fills the keyword arguments left unset.
    """
    from batchyard.jobs.embeddings import EmbeddingsJob

    targets, run_id, wait = _run_args(targets, run_id, wait, options)
    with _flow_context(profile, overrides, options) as ctx:
        job = EmbeddingsJob(ctx, load_targets(targets))
        run = _open_run(ctx, job, run_id)
        _tag_flow_run(run.run_id)
        return outcome_state(_run_stages(ctx, job, run, wait=wait))


@flow(name="batchyard-inference", log_prints=False, on_cancellation=[cancel_batchyard_run])
def inference_flow(task_name: str, targets: str | None = None, run_id: str | None = None,
                   profile: str | None = None, overrides: dict[str, Any] | None = None, wait: bool = True,
                   options: RunOptions | None = None) -> Any:
    """Run one inference task over the targets and store results in MongoDB.

    `options` (what deployments set) fills the keyword arguments left unset.
    """
    from batchyard.jobs.inference import InferenceJob

    targets, run_id, wait = _run_args(targets, run_id, wait, options)
    with _flow_context(profile, overrides, options) as ctx:
        job = InferenceJob(ctx, load_targets(targets), task_name)
        run = _open_run(ctx, job, run_id)
        _tag_flow_run(run.run_id)
        return outcome_state(_run_stages(ctx, job, run, wait=wait))


@flow(name="batchyard-resume", log_prints=False, on_cancellation=[cancel_batchyard_run])
def resume_flow(run_id: str, profile: str | None = None, overrides: dict[str, Any] | None = None,
                options: SettingsOptions | None = None) -> Any:
    """Continue an interrupted, failed or cancelled run from its recorded phase."""
    with _flow_context(profile, overrides, options) as ctx:
        run = find_run(ctx.staging, run_id)
        _tag_flow_run(run.run_id)
        runner.reopen(run)
        return outcome_state(_run_stages(ctx, _job(ctx, run), run))


@flow(name="batchyard-rerun", log_prints=False)
def rerun_flow(run_id: str, start: str = "sinks", profile: str | None = None,
               overrides: dict[str, Any] | None = None, options: SettingsOptions | None = None) -> Any:
    """Re-materialize a finished run from its staged files (`results` or `sinks`), with no Batch
    API call, and materialize the assets it rewrote."""
    with _flow_context(profile, overrides, options) as ctx:
        run = find_run(ctx.staging, run_id)
        _tag_flow_run(run.run_id)
        log.info("run %s: re-materializing from %s, from staging alone", run_id, start)
        info = runner.rematerialize(ctx, run_id, start=start)
        assets = ("results", "sinks") if start == "results" else ("sinks",)
        info = _finish(ctx, _job(ctx, run), run, assets=assets, info=info)
        log.info("run %s: re-materialized from %s: %s", run_id, start, info.get("state"))
        return outcome_state(info)


@flow(name="batchyard-audit", log_prints=False)
def audit_flow(run_id: str, unit_id: str | None = None, sinks: bool = True, full: bool = False,
               profile: str | None = None, overrides: dict[str, Any] | None = None,
               options: SettingsOptions | None = None) -> Any:
    """Reconcile a run from its staged files and the sinks (`batchyard audit`), or follow one
    unit through it (`unit_id`). `Failed` when something differs, with the differences in the
    flow run's logs and a `<run>-audit` table artifact."""
    from batchyard.trail import audit_or_trail

    with _flow_context(profile, overrides, options) as ctx:
        run = find_run(ctx.staging, run_id)
        _tag_flow_run(run.run_id)
        out = audit_or_trail(ctx, run, unit_id=unit_id, sinks=sinks, full=full)
        differences = out["differences"]
        what = f"trail of {unit_id} in run {run_id}" if unit_id else f"audit of run {run_id}"
        if differences:
            rows = [d if isinstance(d, dict) else {"difference": d} for d in differences]
            create_table_artifact(rows, key=f"{run_id.lower()}-audit", description=f"{what}: what differs")
            for d in differences:
                log.error("%s: %s", what, d.get("check", d) if isinstance(d, dict) else d, extra=FOR_PREFECT_ONLY)
            return Failed(message=f"{what}: {len(differences)} difference(s)", data=out)
        log.info("%s: everything agrees%s", what, f" ({out['checks']:,} counts reconciled)" if "checks" in out else "")
        return out


@flow(name="batchyard-tracker", log_prints=False)
def tracker_flow(profile: str | None = None, overrides: dict[str, Any] | None = None, rounds: int = 1,
                 options: SettingsOptions | None = None) -> list[dict[str, Any]]:
    """Scheduled tracker: a few cheap rounds over every unfinished run (poll, collect, load, submit).

    Cancelling a tracker flow run only stops that tick: its runs go on at the next one.
    """
    out: list[dict[str, Any]] = []
    with _flow_context(profile, overrides, options) as ctx:
        from batchyard.storage.runs import list_runs

        for run in list_runs(ctx.staging):
            info = run.read_run()
            if info.get("phase") != "batches":
                continue
            job = _job(ctx, run)
            engine = PrefectEngine(run_ref(ctx, job.name, run.run_id))
            try:
                with runner.recording_stop(run, ctx.settings):
                    summary = runner.drive(ctx, job, run, engine=engine, poll_interval=0, max_rounds=rounds)
            except RunBusy as exc:  # another process drives every open partition right now
                log.info("tracker: run %s skipped: %s", run.run_id, exc)
                out.append({"run_id": run.run_id, "skipped": str(exc)})
                continue
            _finish(ctx, job, run)
            log.info("tracker: run %s: %s", run.run_id, summary.get("by_state"))
            out.append({"run_id": run.run_id, **summary})
        if not out:
            log.info("tracker: no open run in %s", ctx.staging.root)
    return out
