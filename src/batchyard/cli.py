"""`batchyard`: the command line (Typer + rich).

Exit codes are part of the interface (scripts and schedulers read them):

| code | meaning |
|------|---------|
| 0 | the run finished and every unit succeeded |
| 1 | error: the command could not do its work (one line on stderr; `--verbose` for the traceback) |
| 2 | usage error: a bad option, argument, targets file, task name, profile or setting |
| 3 | the run finished, but some units failed (see `failures` in the summary) |
| 4 | the run was cancelled, or is not finished yet (e.g. `--no-wait`) |
| 5 | an integrity check failed (`audit`, asset checks) |

Every user error is checked before Prefect starts, so it costs no server start-up.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchyard.errors import BatchyardError, ConfigError

if TYPE_CHECKING:
    from batchyard.settings import Settings

# quiet, offline-friendly Prefect for the command line (a profile or the shell may override);
# a loaded 2-core machine can take far longer than Prefect's default 20 s to start its
# temporary server on the first run
for _k, _v in {
    "DO_NOT_TRACK": "1",  # no first-run telemetry notice from the Prefect SDK
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "ERROR",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}.items():
    os.environ.setdefault(_k, _v)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILURES, EXIT_UNFINISHED, EXIT_CHECKS = 0, 1, 2, 3, 4, 5
EPILOG = (
    "Exit codes: 0 every unit succeeded · 1 error · 2 usage error · 3 finished with failed units · "
    "4 cancelled or unfinished · 5 integrity check failed."
)

app = typer.Typer(help="Batch embeddings and LLM inference over MongoDB chunks.", no_args_is_help=True,
                  epilog=EPILOG, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect configuration.")
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True)

_state: dict[str, Any] = {}


class EngineChoice(enum.StrEnum):
    """How a run's steps execute."""

    prefect = "prefect"
    local = "local"


Engine = Annotated[EngineChoice, typer.Option(help="prefect (flows, tasks, artifacts) or local (plain threads).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON (for scripts).")]


class LaneChoice(enum.StrEnum):
    """Which lane requests take."""

    batch = "batch"
    realtime = "realtime"
    auto = "auto"


LaneOption = Annotated[LaneChoice | None, typer.Option(
    "--lane", help="batch (Batch API, half price, up to 24 h), realtime (synchronous calls, same bodies), "
    "or auto (real-time under lane.auto_max_tokens, and for a small retry tail). Default: lane.mode.")]


@app.callback()
def main(
    profile: Annotated[str | None, typer.Option(help="Environment profile: profiles/<name>.env.")] = None,
    root: Annotated[str | None, typer.Option(help="Staging root (local path or s3://bucket/prefix).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level; show tracebacks.")] = False,
) -> None:
    """Global options."""
    _state["profile"] = profile
    _state["root"] = root
    _state["verbose"] = verbose
    from batchyard.logs import configure_logging

    configure_logging(logging.INFO if verbose else logging.WARNING)


# --------------------------------------------------------------------------- errors


def _fail(exc: BaseException, code: int = EXIT_ERROR) -> NoReturn:
    """One line on stderr (the traceback only with --verbose), then exit with `code`."""
    if _state.get("verbose"):
        err_console.print_exception()
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _usage_error(exc: BaseException) -> NoReturn:
    _fail(exc, EXIT_USAGE)


def _overrides(lane: str | None = None, **limits: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if _state.get("root"):
        out["staging"] = {"root": _state["root"]}
    if lane is not None:
        out["lane"] = {"mode": lane}
    lim = {k: v for k, v in limits.items() if v is not None}
    if "max_inputs_per_batch" in lim:
        lim.setdefault("max_inputs_per_request", min(2048, lim["max_inputs_per_batch"]))
    if lim:
        out["limits"] = lim
    return out


def _settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Settings, or a one-line usage error (bad profile, invalid value)."""
    from pydantic import ValidationError

    from batchyard.settings import load_settings

    try:
        return load_settings(_state.get("profile"), **(overrides or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        _usage_error(ConfigError(f"invalid setting {where}: {first.get('msg')} (input: {first.get('input')!r})"))
    except (FileNotFoundError, ConfigError) as exc:
        _usage_error(exc)


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------- configuration and tasks


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (secrets masked) and which profile file was used."""
    from batchyard.settings import profile_source

    s = _settings(_overrides())
    out = {"profile_file": profile_source(_state.get("profile")), **s.masked()}
    console.print_json(json.dumps(out))


@app.command()
def tasks() -> None:
    """List the inference tasks with their versions and endpoints."""
    from batchyard.tasks.prompts import resolve_prompts_dir
    from batchyard.tasks.registry import list_tasks

    s = _settings(_overrides())
    prompts = resolve_prompts_dir(s.prompts_dir)
    t = Table(title="inference tasks")
    for col in ("task", "version", "unit", "endpoint", "prompt", "description"):
        t.add_column(col, no_wrap=col in ("task", "version"))
    for task in list_tasks():
        t.add_row(task.name, task.task_version(prompts), task.unit, task.endpoint, task.prompt, task.description)
    console.print(t)


# --------------------------------------------------------------------------- source


@app.command()
def seed(
    chunks: Annotated[int, typer.Option(help="Number of synthetic chunks to write.")] = 1000,
    targets_out: Annotated[Path, typer.Option(help="Where to write the matching targets file.")] = Path("targets.yaml"),
    seed_value: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    companies: Annotated[int | None, typer.Option(help="Number of companies (default: scales with chunks).")] = None,
    list_documents: Annotated[bool, typer.Option(help="List each document in the targets file "
                                                      "(default: companies only, i.e. all their documents).")] = False,
) -> None:
    """Write a realistic synthetic corpus into the configured document store, plus a targets file."""
    from batchyard.context import RunContext
    from batchyard.seed import seed_store, targets_for
    from batchyard.targets import write_targets

    s = _settings(_overrides())
    try:
        with RunContext(s) as ctx:
            store = ctx.store
            console.print(f"document store: [bold]{store.label}[/bold]")
            with console.status(f"seeding {chunks:,} chunks"):
                report = seed_store(store, chunks, fields=s.mongo.fields, seed=seed_value, n_companies=companies)
            store.save()
            write_targets(targets_out, targets_for(report, all_documents=not list_documents))
    except BatchyardError as exc:
        _fail(exc)
    console.print(f"seeded {report.chunks:,} chunks in {report.documents:,} documents of {report.companies:,} "
                  f"companies; targets written to {targets_out}")


# --------------------------------------------------------------------------- jobs


def _progress() -> tuple[Progress, Any]:
    progress = Progress(
        TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=err_console, transient=True,
    )
    bar = progress.add_task("starting", total=None, detail="")

    def update(event: dict[str, Any]) -> None:
        detail = str(event.get("detail", ""))
        info = event.get("batches")
        if info:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(info["by_state"].items()))
            if info.get("waiting"):
                detail += f" ({info['waiting']} waiting)"
        progress.update(bar, description=event.get("stage", ""), total=event.get("total"),
                        completed=event.get("completed", 0), detail=detail)

    return progress, update


def _check_inputs(kind: str, targets: Path | None, task: str | None) -> None:
    """Usage errors that must not wait for Prefect: the targets file and the task name."""
    from batchyard.errors import TargetsError, TaskNotFound

    try:
        if targets is not None:
            from batchyard.targets import load_targets

            load_targets(targets)
        if kind == "inference":
            from batchyard.tasks.registry import get_task

            get_task(task or "")
    except (TargetsError, TaskNotFound) as exc:
        _usage_error(exc)


def _check_locks(s: Settings) -> None:
    """Fail fast when another process holds the embedded MongoDB stand-in this run needs."""
    import fcntl

    from batchyard.clients.mongo import standin_path
    from batchyard.storage.staging import Staging

    if s.mongo.uri is not None:
        return
    path = standin_path(Staging.from_settings(s.staging).local_dir(".mongo-standin"), s.mongo.database)
    lock = path.with_name(path.name + ".lock")
    if not lock.exists():
        return
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            _fail(BatchyardError(f"the MongoDB stand-in at {path} is in use by another process (pid {holder}); "
                                 "wait for it to finish, or set BATCHYARD_MONGO__URI"))
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run_job(kind: str, targets: Path | None, *, engine: EngineChoice | str, overrides: dict[str, Any],
             task: str | None = None, run_id: str | None = None, wait: bool = True,
             show_progress: bool = True) -> dict[str, Any]:
    from batchyard import runner
    from batchyard.context import RunContext

    engine = EngineChoice(engine)
    _check_inputs(kind, targets, task)
    settings = _settings(overrides)
    _check_locks(settings)
    progress, update = _progress()
    profile = _state.get("profile")
    with progress if show_progress else _Quiet():
        hook = update if show_progress else None
        if engine is EngineChoice.prefect:
            return _run_prefect(kind, targets, task=task, run_id=run_id, wait=wait, profile=profile,
                                overrides=overrides, hook=hook)
        with RunContext(settings) as ctx:
            if kind == "resume":
                return runner.resume(ctx, run_id or "", on_progress=hook)
            from batchyard.targets import load_targets

            tg = load_targets(targets) if targets else None
            if kind == "embeddings":
                from batchyard.jobs.embeddings import EmbeddingsJob

                job: Any = EmbeddingsJob(ctx, tg)  # type: ignore[arg-type]
            else:
                from batchyard.jobs.inference import InferenceJob

                job = InferenceJob(ctx, tg, task or "")  # type: ignore[arg-type]
            return runner.execute(ctx, job, run_id=run_id, on_progress=hook, wait=wait)


class _Quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _run_prefect(kind: str, targets: Path | None, *, task: str | None, run_id: str | None, wait: bool,
                 profile: str | None, overrides: dict[str, Any], hook: Any) -> dict[str, Any]:
    try:
        from batchyard.orchestration import flows
    except Exception as exc:  # pragma: no cover - broken install
        _fail(exc)
    if hook is not None:
        flows.PROGRESS_HOOKS.append(hook)
    settings = _settings(overrides)
    try:
        if kind == "embeddings":
            return flows.with_runner(flows.embeddings_flow, settings)(
                targets=str(targets), run_id=run_id, profile=profile, overrides=overrides, wait=wait)
        if kind == "inference":
            return flows.with_runner(flows.inference_flow, settings)(
                task_name=task or "", targets=str(targets), run_id=run_id, profile=profile, overrides=overrides,
                wait=wait)
        return flows.with_runner(flows.resume_flow, settings)(run_id=run_id or "", profile=profile,
                                                              overrides=overrides)
    except RuntimeError as exc:
        if "ephemeral Prefect API server" in str(exc):
            _fail(BatchyardError(
                "Prefect's temporary API server did not start in time "
                f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={os.environ.get('PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS')}); "
                "run again, raise that timeout, or use --engine local"))
        raise
    finally:
        if hook is not None:
            flows.PROGRESS_HOOKS.remove(hook)


def _print_run(info: dict[str, Any]) -> None:
    t = Table(title=f"run {info['run_id']} ({info['job']}): {info['state']}", title_justify="left")
    t.add_column("stage", no_wrap=True)
    t.add_column("figures")
    for key in ("snapshot", "plan", "final"):
        if key in info:
            val = {k: v for k, v in info[key].items() if not isinstance(v, dict)}
            t.add_row(key, ", ".join(f"{k}={v}" for k, v in val.items()))
    by_code = info.get("final", {}).get("failures_by_code")
    if by_code:
        t.add_row("failures", ", ".join(f"{k}={v}" for k, v in by_code.items()))
    lanes = info.get("final", {}).get("lanes")
    if lanes:
        t.add_row("lanes", ", ".join(f"{k}: {v['tokens']:,} tokens, ${v['usd']:.4f}" for k, v in lanes.items()))
    for r in info.get("loads", []):
        t.add_row(f"load {r.get('sink')}", f"{r.get('target')}: rows={r.get('rows')}, upserted={r.get('upserted')}, "
                  f"modified={r.get('modified')}, parts={r.get('parts')}")
    unmatched = info.get("targets_unmatched")
    if unmatched:
        t.add_row("unmatched targets", ", ".join(unmatched))
    t.add_row("document store", str(info.get("document_store")))
    t.add_row("provider", str(info.get("provider")))
    console.print(t)
    if info.get("phase") == "done" and not info.get("plan", {}).get("units") and not info.get("final", {}).get("failures"):
        console.print("nothing to do: every targeted unit is up to date (its assets are fresh); nothing was submitted")
    if info.get("phase") != "done":
        console.print(f"run {info['run_id']} is not finished (phase {info.get('phase')}): the scheduled tracker "
                      f"or `batchyard resume {info['run_id']}` finishes it")


def _report(info: dict[str, Any], as_json: bool) -> NoReturn:
    """Print the run's summary (table or JSON) and exit with the run's exit code."""
    from batchyard.runner import exit_code

    if as_json:
        _emit_json(info)
    else:
        _print_run(info)
    raise typer.Exit(exit_code(info))


def _guarded(fn: Any) -> dict[str, Any]:
    """Run a job, turning batchyard errors into one-line exits."""
    try:
        return dict(fn())
    except typer.Exit:
        raise
    except (ConfigError, FileNotFoundError) as exc:
        _usage_error(exc)
    except BatchyardError as exc:
        _fail(exc)


@app.command(epilog=EPILOG)
def embed(
    targets: Annotated[Path, typer.Option(help="Targets file (YAML or CSV).")],
    engine: Engine = EngineChoice.prefect,
    max_inputs_per_batch: Annotated[int | None, typer.Option(help="Embedding inputs per batch (shard size).")] = None,
    max_requests_per_batch: Annotated[int | None, typer.Option(help="Requests per batch file.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Continue or name this run.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the batches (default), or submit and "
                                       "return: the scheduled tracker finishes the run.")] = True,
    lane: LaneOption = None,
    as_json: AsJson = False,
) -> None:
    """Embed the target chunks that are new or changed; load Milvus; mark MongoDB."""
    over = _overrides(lane=lane.value if lane else None, max_inputs_per_batch=max_inputs_per_batch,
                      max_requests_per_batch=max_requests_per_batch)
    info = _guarded(lambda: _run_job("embeddings", targets, engine=engine, run_id=run_id, overrides=over,
                                     wait=wait, show_progress=not as_json))
    _report(info, as_json)


@app.command(epilog=EPILOG)
def infer(
    task: Annotated[str, typer.Argument(help="Task name (see `batchyard tasks`).")],
    targets: Annotated[Path, typer.Option(help="Targets file (YAML or CSV).")],
    engine: Engine = EngineChoice.prefect,
    max_requests_per_batch: Annotated[int | None, typer.Option(help="Requests per batch file.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Continue or name this run.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the batches (default), or submit and "
                                       "return: the scheduled tracker finishes the run.")] = True,
    lane: LaneOption = None,
    as_json: AsJson = False,
) -> None:
    """Run an inference task over the target units without a result for its version."""
    over = _overrides(lane=lane.value if lane else None, max_requests_per_batch=max_requests_per_batch)
    info = _guarded(lambda: _run_job("inference", targets, engine=engine, task=task, run_id=run_id,
                                     overrides=over, wait=wait, show_progress=not as_json))
    _report(info, as_json)


@app.command(epilog=EPILOG)
def resume(run_id: Annotated[str, typer.Argument(help="Run id.")], engine: Engine = EngineChoice.prefect,
           as_json: AsJson = False) -> None:
    """Continue an interrupted or cancelled run from where it stopped."""
    _check_run_exists(run_id)
    info = _guarded(lambda: _run_job("resume", None, engine=engine, run_id=run_id, overrides=_overrides(),
                                     show_progress=not as_json))
    _report(info, as_json)


def _check_run_exists(run_id: str) -> None:
    from batchyard.errors import RunNotFound
    from batchyard.storage.runs import find_run
    from batchyard.storage.staging import Staging

    try:
        find_run(Staging.from_settings(_settings(_overrides()).staging), run_id)
    except RunNotFound as exc:
        _usage_error(exc)


class RerunFrom(enum.StrEnum):
    """Where `rerun` starts re-materializing."""

    results = "results"
    sinks = "sinks"


@app.command(epilog=EPILOG)
def rerun(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    start: Annotated[RerunFrom, typer.Option("--from", help="results (re-parse staged outputs, reload sinks) or "
                                             "sinks (reload only).")] = RerunFrom.sinks,
    as_json: AsJson = False,
) -> None:
    """Re-materialize a finished run from its staged files, without calling the Batch API."""
    from batchyard import runner
    from batchyard.context import RunContext

    _check_run_exists(run_id)

    def go() -> dict[str, Any]:
        with RunContext(_settings(_overrides())) as ctx:
            try:
                return runner.rematerialize(ctx, run_id, start=start.value)
            except ValueError as exc:
                _fail(exc)

    _report(_guarded(go), as_json)


@app.command()
def cancel(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    wait_s: Annotated[float, typer.Option("--wait", help="Seconds to wait for a live driver to act.")] = 30.0,
) -> None:
    """Cancel a run: live batches are cancelled, what finished is kept; `resume` continues it.

    Works while another process drives the run: the request is recorded in the run's staging
    folder and that process acts on it within one poll round.
    """
    from batchyard import runner
    from batchyard.context import RunContext

    _check_run_exists(run_id)
    try:
        with RunContext(_settings(_overrides())) as ctx:
            out = runner.cancel(ctx, run_id, wait_s=wait_s)
    except BatchyardError as exc:
        _fail(exc)
    if out["driven_by"]:
        owner = out["driven_by"]["owner"]
        state = "acknowledged" if out["acknowledged"] else "recorded (not yet acknowledged)"
        console.print(f"run {run_id}: cancel {state}; the process driving it ({owner}) cancels its live batches, "
                      "collects what finished and stops")
    else:
        console.print(f"run {run_id}: cancel requested for {out['cancelled_batches']} live batch(es); "
                      f"`batchyard resume {run_id}` collects what finished and finishes the run")


@app.command()
def status(
    run_id: Annotated[str | None, typer.Argument(help="Run id (default: list runs).")] = None,
    shards: Annotated[bool, typer.Option("--shards", help="Also list every shard attempt.")] = False,
    as_json: AsJson = False,
) -> None:
    """Show runs, or one run's partitions (and shards), as tables or JSON."""
    from batchyard.runner import partition_table
    from batchyard.storage.ledger import run_records
    from batchyard.storage.runs import find_run, list_runs
    from batchyard.storage.staging import Staging

    s = _settings(_overrides())
    staging = Staging.from_settings(s.staging)
    if run_id is None:
        rows = []
        for run in list_runs(staging):
            info = run.read_run()
            final = info.get("final", {})
            rows.append({"run": run.run_id, "job": run.job, "state": info.get("state", "?"),
                         "phase": info.get("phase", "?"), "partitions": len(info.get("partitions", [])),
                         "shards": info.get("plan", {}).get("shards"), "results": final.get("results"),
                         "failures": final.get("failures")})
        if as_json:
            _emit_json(rows)
            return
        t = Table(title=f"runs in {staging.root}", title_justify="left")
        for col in ("run", "job", "state", "phase", "partitions", "shards", "results", "failures"):
            t.add_column(col, no_wrap=col == "run", min_width=len("20261130T070000Z-abcdef") if col == "run" else None)
        for r in rows:
            t.add_row(*("" if v is None else str(v) for v in r.values()))
        console.print(t)
        return
    try:
        run = find_run(staging, run_id)
    except BatchyardError as exc:
        _usage_error(exc)
    info = run.read_run()
    parts = partition_table(run)
    records = run_records(run)
    if as_json:
        _emit_json({"run": info, "partitions": parts,
                    "shards": [r.model_dump(mode="json", exclude={"history"}) for r in records] if shards else None})
        return
    t = Table(title=f"run {run_id} ({run.job}): {info.get('state')} / {info.get('phase')}", title_justify="left")
    for col in ("partition", "companies", "phase", "chunks", "requests", "shards", "waiting", "results",
                "loaded_parts"):
        t.add_column(col, no_wrap=col == "partition")
    for p in parts:
        t.add_row(*(str(v) for v in p.values()))
    console.print(t)
    waiting = [r for r in records if r.waiting_note]
    if shards or waiting:
        st = Table(title="shard attempts" if shards else "waiting shard attempts", title_justify="left")
        for col in ("shard", "state", "batch status", "requests", "inputs", "tokens", "batch", "outcome / note"):
            st.add_column(col, no_wrap=col in ("shard", "batch"))
        for rec in records if shards else waiting:
            note = rec.waiting_note or ", ".join(f"{k} {v}" for k, v in (rec.outcome or {}).items())
            st.add_row(rec.key, rec.state, rec.batch_status or "", str(rec.n_requests), str(rec.n_inputs),
                       str(rec.tokens), rec.batch_id or "", note)
        console.print(st)


@app.command()
def assets(
    job: Annotated[str | None, typer.Option("--job", help="Only this job (embeddings, inference-<task>).")] = None,
    as_json: AsJson = False,
) -> None:
    """Every asset of the latest run of each job: data version, when, fresh or stale (and why).

    An asset is stale when the source has new or changed chunks, its code version, the task's
    prompt version or the settings that feed it changed, or one of its checks failed.
    """
    from batchyard import runner
    from batchyard.context import RunContext

    with RunContext(_settings(_overrides())) as ctx:
        rows = _guarded(lambda: {"rows": runner.asset_status(ctx, job_name=job)})["rows"]
    if as_json:
        _emit_json(rows)
        return
    t = Table(title="assets", title_justify="left")
    for col in ("scope", "asset", "partition", "run", "data version", "materialized", "status", "reason"):
        t.add_column(col, no_wrap=col in ("asset", "partition", "run", "status"))
    for r in rows:
        color = "green" if r["status"] == "fresh" else "yellow"
        t.add_row(r["scope"], r["asset"], r["partition"], r["run_id"], (r["data_version"] or "")[:12],
                  (r["materialized_at"] or "")[:19], f"[{color}]{r['status']}[/{color}]", "; ".join(r["reasons"]))
    console.print(t)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Bind address (other than loopback only with API keys, or --insecure).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    state_dir: Annotated[Path, typer.Option(help="Where files and batches persist.")] = Path(".batchyard-server"),
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve a non-loopback address without API keys (anyone who reaches it can read every file).")] = False,
) -> None:
    """Run the local OpenAI-compatible Batch API server (files + batches) in the foreground.

    With provider.local.api_keys (BATCHYARD_PROVIDER__LOCAL__API_KEYS='["<key>"]') or
    provider.local.api_keys_file set, every request needs `Authorization: Bearer <key>`.
    """
    from batchyard.localapi.runner import ServeError, ServeRefused
    from batchyard.localapi.runner import serve as serve_forever
    from batchyard.localapi.store import StateDirLockedError

    s = _settings(_overrides())
    cfg = s.provider.local.model_copy(update={"host": host, "port": port})
    access = "API key required" if cfg.api_keys or cfg.api_keys_file else "no API key: loopback only"
    if insecure and not (cfg.api_keys or cfg.api_keys_file):
        access = "no API key: --insecure"

    def ready(url: str) -> None:
        console.print(f"batchyard Batch API server on http://{host}:{port}/v1 ({access}; state in {state_dir})")

    try:
        serve_forever(cfg, state_dir, on_ready=ready, insecure=insecure)
    except ServeRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (ServeError, StateDirLockedError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command(epilog=EPILOG)
def demo(
    chunks: Annotated[int, typer.Option(help="Chunks to seed.")] = 300,
    engine: Engine = EngineChoice.prefect,
    task: Annotated[str, typer.Option(help="Inference task to run after the embeddings.")] = "classify",
) -> None:
    """Seed a small corpus, embed it, run one inference task, and show what came back."""
    from batchyard.demo import run_demo

    _check_inputs("inference", None, task)
    os.environ.setdefault("BATCHYARD_PROVIDER__POLL_INTERVAL_S", "0.5")
    code = _guarded(lambda: {"code": run_demo(console, chunks=chunks, engine=engine.value, task=task,
                                              run_job=_run_job, overrides=_overrides(),
                                              settings=_settings(_overrides()), print_run=_print_run)})["code"]
    raise typer.Exit(code)


def run() -> None:  # pragma: no cover - the console script
    """Entry point: `batchyard`."""
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
